//! Starting a node: state, key manager, CA, the node API (TLS), the admin API (Unix
//! socket), `/metrics` `/healthz` `/readyz`, and the maintenance loop (intermediate and
//! JWT key rotation at half-life, node SVID renewal, bundle refresh).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_kms::KeyManager;
use ca_proto::admin::admin_server::AdminServer;
use ca_proto::node::node_server::NodeServer;
use ca_raft::{LocalProposer, StateMachine};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin_api::AdminApi;
use crate::ca::keys::KeyManagers;
use crate::ca::{Ca, CaSettings};
use crate::config::{KeyManagerConfig, NodeConfig};
use crate::core::NodeCore;
use crate::metrics::Metrics;
use crate::node_api::NodeApi;
use crate::Error;

/// A running node.
pub struct NodeHandle {
    /// Where the node API listens.
    pub node_addr: SocketAddr,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// Where `/metrics` etc. listen, if enabled.
    pub http_addr: Option<SocketAddr>,
    /// The core (for in-process callers such as `ca-node dev` and tests).
    pub core: Arc<NodeCore>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeHandle({})", self.node_addr)
    }
}

impl NodeHandle {
    /// Stops every server and loop, and waits for them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let _ = std::fs::remove_file(&self.admin_socket);
    }

    /// Waits until a shutdown is requested elsewhere (never, for a plain handle).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

fn mkdir_private(p: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(p)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", p.display())))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::Config(format!("cannot set permissions on {}: {e}", p.display())))
}

async fn open_key_manager(
    cfg: &NodeConfig,
    km: &KeyManagerConfig,
) -> Result<Arc<dyn KeyManager>, Error> {
    let km: Arc<dyn KeyManager> = match km {
        KeyManagerConfig::Soft { dir } => {
            let dir = dir.clone().unwrap_or_else(|| cfg.data_dir.join("keys"));
            tracing::warn!(
                dir = %dir.display(),
                "USING SOFTWARE KEYS: the CA's private keys are plain files. For development and tests only; use a PKCS#11 HSM or a KMS in production."
            );
            Arc::new(ca_kms::soft::SoftKeyManager::open(dir)?)
        }
        KeyManagerConfig::Pkcs11(c) => {
            let c = c.clone();
            // Loading the module and logging in talk to the token: off the async threads.
            let km =
                tokio::task::spawn_blocking(move || ca_kms::pkcs11::Pkcs11KeyManager::open(&c))
                    .await
                    .map_err(|e| Error::Internal(format!("opening the PKCS#11 token: {e}")))??;
            tracing::info!(token = km.token_label(), "PKCS#11 key manager ready");
            Arc::new(km)
        }
        KeyManagerConfig::AwsKms(c) => {
            let c = c
                .clone()
                .with_node_defaults(&cfg.trust_domain, &cfg.node_id);
            let prefix = c.alias_prefix.clone();
            let km = ca_kms::aws_kms::AwsKmsManager::connect(c).await?;
            tracing::info!(alias_prefix = %prefix, "AWS KMS key manager ready");
            Arc::new(km)
        }
    };
    Ok(km)
}

/// Opens the key manager of each role; roles with the same configuration share one.
async fn open_key_managers(cfg: &NodeConfig, metrics: &Metrics) -> Result<KeyManagers, Error> {
    let mut opened: Vec<(&KeyManagerConfig, Arc<dyn KeyManager>)> = Vec::new();
    let mut per_role = Vec::new();
    for km_cfg in cfg.role_key_managers() {
        let km = match opened.iter().find(|(c, _)| *c == km_cfg) {
            Some((_, km)) => km.clone(),
            None => {
                let km = open_key_manager(cfg, km_cfg).await?;
                opened.push((km_cfg, km.clone()));
                km
            }
        };
        per_role.push(km);
    }
    let [root, intermediate, jwt] = <[Arc<dyn KeyManager>; 3]>::try_from(per_role)
        .map_err(|_| Error::Internal("three roles".into()))?;
    Ok(KeyManagers::new(root, intermediate, jwt, metrics.clone()))
}

/// Issues (or renews) the node's own serving SVID `spiffe://TD/ca-node/<id>`, with the
/// longest X.509-SVID lifetime the configuration allows (half the intermediate's).
async fn renew_node_svid(core: &NodeCore, resolver: &SvidResolver) -> Result<i64, Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::Internal(format!("node key: {e}")))?;
    let id = core
        .config
        .trust_domain()
        .id_with_path(&format!("/ca-node/{}", core.config.node_id))?;
    let chain = core
        .ca
        .mint_x509_svid(&id, &key, core.config.max_x509_svid_ttl(), &[])
        .await?;
    resolver.set(&chain, &key.serialize_der())?;
    Ok(ca_identity::x509::cert_info(&chain[0])?.not_after)
}

/// Starts a node from a validated config; returns once every listener is bound.
pub async fn start(config: NodeConfig) -> Result<NodeHandle, Error> {
    config.validate()?;
    mkdir_private(&config.data_dir)?;
    let metrics = Metrics::new();
    let sm = StateMachine::open(&config.data_dir.join("state.db")).await?;
    let proposer = Arc::new(LocalProposer::new(sm.clone()));
    let keys = open_key_managers(&config, &metrics).await?;
    let ca = Ca::new(
        CaSettings {
            trust_domain: config.trust_domain(),
            node_id: config.node_id.clone(),
            root_ttl: config.ttl.root,
            intermediate_ttl: config.ttl.intermediate,
            jwt_key_ttl: config.ttl.jwt_key,
            intermediate_mode: config.intermediate_mode,
            key_algorithm: config.ca_key_algorithm,
            jwt_key_algorithm: config.jwt_key_algorithm,
        },
        keys,
        sm.clone(),
        proposer.clone(),
    );
    match ca.ensure_authorities().await {
        Ok(()) => {}
        // An HSM or KMS that is down at start is waited for: the node starts not ready and
        // the maintenance loop retries. Anything else (a wrong PIN, a bad config) is fatal.
        Err(Error::KeyManager(e @ ca_kms::Error::Unavailable(_))) => tracing::error!(
            error = %e,
            "the key manager is unavailable at start; the node is NOT READY and retries every 5s"
        ),
        Err(e) => return Err(e),
    }
    let core = Arc::new(NodeCore {
        config: config.clone(),
        sm,
        proposer,
        ca,
        metrics,
    });
    let (shutdown, _) = watch::channel(false);
    let mut tasks = Vec::new();

    // Node API over TLS.
    let svid = SvidResolver::default();
    let svid_not_after = match core.ca.intermediate() {
        Some(_) => renew_node_svid(&core, &svid).await?,
        None => 0, // no serving certificate until the CA is ready
    };
    let roots = LiveRoots::new(
        core.ca
            .bundle()
            .map(|b| b.x509_authorities.clone())
            .unwrap_or_default(),
    );
    let tls = Arc::new(ca_identity::tls::server_config(
        svid.clone(),
        roots.clone(),
        false,
    ));
    let listener = TcpListener::bind(config.node_listen).await.map_err(|e| {
        Error::Config(format!(
            "cannot listen on node_listen {}: {e}",
            config.node_listen
        ))
    })?;
    let node_addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut stop = shutdown.subscribe();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else { continue };
                    let _ = tcp.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let tx = conn_tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => { let _ = tx.send(Ok::<_, std::io::Error>(tls)).await; }
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    }));
    let node_api = NodeServer::new(NodeApi::new(core.clone()));
    let mut stop = shutdown.subscribe();
    tasks.push(tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(node_api)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(conn_rx),
                async move {
                    let _ = stop.changed().await;
                },
            )
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "node API server stopped");
        }
    }));

    // Admin API on a private Unix socket.
    let admin_socket = config.admin_socket.clone();
    if let Some(parent) = admin_socket.parent() {
        if !parent.exists() {
            mkdir_private(parent)?;
        }
    }
    let _ = std::fs::remove_file(&admin_socket);
    let uds = UnixListener::bind(&admin_socket).map_err(|e| {
        Error::Config(format!(
            "cannot bind admin_socket {}: {e}",
            admin_socket.display()
        ))
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&admin_socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::Config(format!("admin_socket permissions: {e}")))?;
    }
    let ready_core = core.clone();
    let ready = Arc::new(move || readiness(&ready_core));
    let admin = AdminServer::new(AdminApi::new(core.clone(), ready.clone()));
    let mut stop = shutdown.subscribe();
    tasks.push(tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(admin)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(uds),
                async move {
                    let _ = stop.changed().await;
                },
            )
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "admin API server stopped");
        }
    }));

    // HTTP: metrics and health.
    let mut http_addr = None;
    if let Some(addr) = config.http_listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on http_listen {addr}: {e}")))?;
        http_addr = Some(l.local_addr().map_err(|e| Error::Internal(e.to_string()))?);
        let m = core.metrics.clone();
        let r2 = ready.clone();
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let m = m.clone();
                    async move { m.render() }
                }),
            )
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route(
                "/readyz",
                axum::routing::get(move || {
                    let (ok, detail) = r2();
                    async move {
                        if ok {
                            (axum::http::StatusCode::OK, detail)
                        } else {
                            (axum::http::StatusCode::SERVICE_UNAVAILABLE, detail)
                        }
                    }
                }),
            );
        let mut stop = shutdown.subscribe();
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(l, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.changed().await;
                })
                .await;
        }));
    }

    // The node's serving SVID, renewed when half of its remaining life is gone (on its own
    // timer: short lifetimes must not wait for the maintenance tick).
    let rcore = core.clone();
    let mut stop = shutdown.subscribe();
    tasks.push(tokio::spawn(async move {
        let mut not_after = svid_not_after;
        loop {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default();
            let wait_ms = if not_after == 0 {
                1000
            } else {
                ((not_after * 1000 - now_ms) / 2).max(200)
            };
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(Duration::from_millis(wait_ms as u64)) => {}
            }
            if rcore.ca.intermediate().is_none() {
                continue;
            }
            match renew_node_svid(&rcore, &svid).await {
                Ok(na) => not_after = na,
                Err(e) => tracing::error!(error = %e, "renewing the node's serving SVID failed; will retry"),
            }
        }
    }));

    // Maintenance: rotation at half-life, expired key destruction, bundle refresh.
    let mcore = core.clone();
    let mut stop = shutdown.subscribe();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = mcore.ca.ensure_authorities().await {
                tracing::error!(error = %e, "CA maintenance failed; will retry in 5s");
            }
            mcore.ca.probe_key_managers().await;
            if let Err(e) = mcore.ca.destroy_expired_keys().await {
                tracing::warn!(error = %e, "destroying expired authority keys failed; will retry");
            }
            if let Ok(b) = mcore.ca.bundle() {
                roots.set(b.x509_authorities.clone());
            }
            if let Ok(auths) = mcore.sm.authorities().await {
                mcore.metrics.authority_expiry.reset();
                for a in auths
                    .iter()
                    .filter(|a| a.state == ca_raft::AuthorityState::Active)
                {
                    mcore
                        .metrics
                        .authority_expiry
                        .with_label_values(&[a.kind.as_str(), &a.id])
                        .set(a.not_after);
                }
            }
        }
    }));

    tracing::info!(%node_addr, admin_socket = %admin_socket.display(), trust_domain = %config.trust_domain, node_id = %config.node_id, "ca-node started");
    Ok(NodeHandle {
        node_addr,
        admin_socket,
        http_addr,
        core,
        shutdown,
        tasks,
    })
}

fn readiness(core: &NodeCore) -> (bool, String) {
    let problems = core.ca.minting_problems();
    if problems.is_empty() {
        let id = core
            .ca
            .intermediate()
            .map(|i| i.record.id)
            .unwrap_or_default();
        (true, format!("ready: intermediate {id} active"))
    } else {
        (false, format!("not ready: {}", problems.join("; ")))
    }
}
