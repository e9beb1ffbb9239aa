//! Starting a node: state, key manager, CA, the node API (TLS), the admin API (Unix
//! socket), `/metrics` `/healthz` `/readyz`, and the maintenance loop (intermediate and
//! JWT key lifecycle, root rotation, node SVID renewal, bundle refresh).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_kms::KeyManager;
use ca_proto::node::node_server::NodeServer;
use ca_raft::{
    LogStore, NodeInfo, RaftNode, RaftNodeConfig, RaftProposer, StateMachine, LOG_DB_FILE,
    STATE_DB_FILE,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin_api::AdminApi;
use crate::ca::keys::KeyManagers;
use crate::ca::{Ca, CaSettings};
use crate::cluster;
use crate::config::{KeyManagerConfig, NodeConfig};
use crate::core::NodeCore;
use crate::metrics::{MeteredProposer, Metrics, OpenConnection};
use crate::node_api::NodeApi;
use crate::peer_gate::{CheckedProposer, PeerGate};
use crate::raft_tls::TlsConnector;
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
    /// Why the node stopped on its own, once it has ([`watch_storage`]).
    failed: watch::Receiver<Option<String>>,
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
        let _ = self.core.raft.shutdown().await;
        // Applied writes still in the state store's open transaction: on disk now rather
        // than applied again from the log at the next start.
        if let Err(e) = self.core.sm.commit_applied().await {
            tracing::warn!(error = %e, "committing applied writes at shutdown failed; the next start applies them again from the log");
        }
        let _ = std::fs::remove_file(&self.admin_socket);
    }

    /// Resolves when the node has failed for good and stopped serving (its Raft log or
    /// state cannot be written), with the reason; never while it runs.
    pub fn failure(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut failed = self.failed.clone();
        async move {
            let why = match failed.wait_for(Option::is_some).await {
                Ok(why) => why.clone(),
                Err(_) => None,
            };
            match why {
                Some(why) => why,
                None => std::future::pending().await,
            }
        }
    }

    /// Whether the node is ready to serve (a Raft leader known, the CA able to mint), and
    /// why (what `/readyz` and `ca-node healthcheck` answer).
    pub fn readiness(&self) -> (bool, String) {
        readiness(&self.core)
    }

    /// Waits until the node is ready ([`NodeHandle::readiness`]), at most `timeout`;
    /// returns the last reason it was not.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (ok, detail) = self.readiness();
            if ok {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(detail);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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

/// Opens the key manager of each role (root, intermediate, JWT); roles with the same
/// configuration share one.
async fn open_key_managers(cfg: &NodeConfig) -> Result<[Arc<dyn KeyManager>; 3], Error> {
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
    <[Arc<dyn KeyManager>; 3]>::try_from(per_role)
        .map_err(|_| Error::Internal("three roles".into()))
}

/// At most this many connections on the node port at once (fewer if `RLIMIT_NOFILE` is
/// lower; 512 descriptors are kept for everything else). An agent holds one.
pub const MAX_NODE_CONNECTIONS: usize = 16_384;
/// Concurrent HTTP/2 streams per node-port connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// Largest request header block on the node port.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// How long a TLS handshake on the node port may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once from one source address (many agents behind one
/// NAT address reconnecting together stay well below it).
pub const HANDSHAKES_PER_ADDRESS: usize = 256;
/// Concurrent streams on a connection without a client certificate.
pub const ANONYMOUS_STREAMS_PER_CONNECTION: u32 = 4;
/// Longest call (until the response starts) on a connection without a client certificate.
pub const ANONYMOUS_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Header list size on a connection without a client certificate.
pub const ANONYMOUS_HEADER_LIST_BYTES: u32 = 16 * 1024;

fn refuse_anonymous(core: &NodeCore, peer: SocketAddr, why: &str) {
    core.metrics
        .rate_limited
        .with_label_values(&["unauthenticated_connections"])
        .inc();
    tracing::debug!(%peer, "{why}; closing the connection");
}

/// A node-port connection, TLS done, holding its connection permits.
type NodePortConnection =
    ca_identity::serve::Permitted<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// Serves `routes` with `builder`'s limits (plus the node port's keepalive) on the
/// connections arriving on `incoming`, until `stop` changes; logs if the server fails.
fn serve_node_port(
    builder: tonic::transport::Server,
    routes: tonic::service::Routes,
    incoming: tokio::sync::mpsc::Receiver<std::io::Result<NodePortConnection>>,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
) -> JoinHandle<()> {
    let mut builder = builder
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)));
    tokio::spawn(async move {
        let r = builder
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(incoming),
                async move {
                    let _ = stop.changed().await;
                },
            )
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, server = what, "node API server stopped");
        }
    })
}

/// Refuses a data dir whose state was applied from a Raft log that is now gone (deleted,
/// or truncated to nothing): the log held this node's vote and entries it acknowledged, so
/// starting would let it vote twice in one term and forget acknowledged writes. A restored
/// backup has no Raft bookkeeping and passes.
async fn refuse_lost_log(sm: &StateMachine, log: &LogStore, log_path: &Path) -> Result<(), Error> {
    let (applied, _) = sm.applied_state().await?;
    let Some(applied) = applied else {
        return Ok(());
    };
    if log.is_blank().await? {
        return Err(Error::Config(format!(
            "{} is missing or empty, but this data dir's state was applied from a Raft log up to index {}: the node's vote and the entries it acknowledged are lost, and starting would let it vote twice in a term. Restore the whole data dir from one backup (state and log together), or empty the data dir and `ca-node join` the cluster again (a lone node: `ca-node snapshot restore` a backup into an empty data dir)",
            log_path.display(),
            applied.index
        )));
    }
    Ok(())
}

/// How a node's Raft membership begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// `ca-node run`: a member starts as one; an empty data dir becomes a new single-node
    /// cluster (as with [`Bootstrap::Init`]); a data dir that joined but was never added
    /// waits to be added.
    Auto,
    /// `ca-node init`: a new cluster of this one node, which creates the root. Refused if the
    /// data dir is a member of a cluster already.
    Init,
    /// `ca-node join` (after the join token exchange): wait for the leader to add this node.
    Join,
}

/// Starts a node from a validated config ([`Bootstrap::Auto`]); returns once every
/// listener is bound.
pub async fn start(config: NodeConfig) -> Result<NodeHandle, Error> {
    start_with(config, Bootstrap::Auto).await
}

/// The address members reach this node at: `advertise_addr`, else the bound node API
/// address.
fn advertise_addr(config: &NodeConfig, bound: SocketAddr) -> String {
    if let Some(a) = &config.advertise_addr {
        return a.clone();
    }
    if bound.ip().is_unspecified() {
        tracing::warn!(%bound, "node_listen is a wildcard address and advertise_addr is not set; other members will not be able to reach this node (set advertise_addr)");
        return SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), bound.port()).to_string();
    }
    bound.to_string()
}

/// The X.509 roots to verify peers with before the CA is ready: the journal's, else the
/// bundle a joining node was given.
async fn initial_roots(config: &NodeConfig, sm: &StateMachine) -> Result<Vec<Vec<u8>>, Error> {
    let t = ca_identity::unix_now();
    let roots: Vec<Vec<u8>> = sm
        .authorities()
        .await?
        .into_iter()
        .filter(|a| {
            a.kind == ca_state::AuthorityKind::Root
                && a.state != ca_state::AuthorityState::Revoked
                && a.not_after > t
        })
        .map(|a| a.cert_der)
        .collect();
    if !roots.is_empty() {
        return Ok(roots);
    }
    match std::fs::read_to_string(config.data_dir.join(crate::registry::BUNDLE_FILE)) {
        Ok(text) => Ok(ca_identity::bundle::certs_from_pem(&text)?),
        Err(_) => Ok(Vec::new()),
    }
}

/// Starts a node; see [`Bootstrap`]. Returns once every listener is bound.
pub async fn start_with(config: NodeConfig, bootstrap: Bootstrap) -> Result<NodeHandle, Error> {
    config.validate()?;
    mkdir_private(&config.data_dir)?;
    let td = config.trust_domain();
    let marker = crate::registry::read_marker(&config.data_dir)?;
    if let Some(m) = &marker {
        if m.raft_id != config.raft_id {
            return Err(Error::Config(format!(
                "raft_id {} does not match data_dir {}, which belongs to raft id {}; raft IDs never change",
                config.raft_id,
                config.data_dir.display(),
                m.raft_id
            )));
        }
    }
    let state_path = config.data_dir.join(STATE_DB_FILE);
    let log_path = config.data_dir.join(LOG_DB_FILE);
    let metrics = Metrics::new();
    let sm = StateMachine::open(&state_path).await?;
    let log = match LogStore::open(&log_path).await {
        Ok(log) => log,
        Err(e) => {
            sm.close().await;
            return Err(Error::Config(format!(
                "the Raft log {} cannot be read ({e}); if it is damaged, restore the whole data dir from one backup, or empty the data dir and `ca-node join` the cluster again",
                log_path.display()
            )));
        }
    };
    if let Err(e) = refuse_lost_log(&sm, &log, &log_path).await {
        // Closed before the refusal reaches the caller, so that nothing of this attempt
        // writes the data dir after it (a closing connection checkpoints its WAL).
        sm.close().await;
        log.close().await;
        return Err(e);
    }

    // The node API is bound first: its address is this node's address in the membership.
    let listener = TcpListener::bind(config.node_listen).await.map_err(|e| {
        Error::Config(format!(
            "cannot listen on node_listen {}: {e}",
            config.node_listen
        ))
    })?;
    let node_addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let advertise = advertise_addr(&config, node_addr);

    let svid = SvidResolver::default();
    if let Some((chain, key)) = crate::registry::load_node_svid(&config.data_dir) {
        if let Err(e) = svid.set(&chain, &key) {
            tracing::warn!(error = %e, "the saved node SVID is unusable; waiting for the CA");
        }
    }
    let roots = LiveRoots::new(initial_roots(&config, &sm).await?);
    let connector = Arc::new(TlsConnector::new(svid.clone(), roots.clone(), td.clone()));
    let mut raft_config = RaftNodeConfig::new(
        config.raft_id,
        NodeInfo {
            addr: advertise.clone(),
            node_id: config.node_id.clone(),
        },
    );
    raft_config.raft.heartbeat_interval = config.raft.heartbeat_ms;
    raft_config.raft.election_timeout_min = config.raft.election_timeout_min_ms;
    raft_config.raft.election_timeout_max = config.raft.election_timeout_max_ms;
    // A data dir with CA state but no Raft log or marker is a restored backup.
    let restored = marker.is_none() && !sm.authorities().await?.is_empty();
    let raft = RaftNode::start(raft_config, log, sm.clone(), connector).await?;
    let initialized = raft.is_initialized().await?;
    let joined = marker.as_ref().map(|m| m.origin) == Some(crate::registry::Origin::Join);
    let new_cluster = match (bootstrap, initialized) {
        (Bootstrap::Init, true) => {
            let _ = raft.shutdown().await;
            return Err(Error::Config(format!(
                "data_dir {} is a member of a cluster already; start it with `ca-node run`",
                config.data_dir.display()
            )));
        }
        (Bootstrap::Init, false) => true,
        (Bootstrap::Auto, false) if !joined => {
            if restored {
                tracing::info!("restored state: initializing a new single-node cluster with it (other nodes join it with `ca-node join`)");
            } else {
                tracing::info!("empty data dir: initializing a new single-node cluster (use `ca-node join` to join an existing one instead)");
            }
            true
        }
        (Bootstrap::Auto, false) => {
            tracing::warn!("this node joined but was not added to the cluster yet; waiting for the leader (run `ca-node cluster add` on a member)");
            false
        }
        (Bootstrap::Join, _) | (Bootstrap::Auto, true) => false,
    };
    if new_cluster {
        if let Err(e) = raft.initialize().await {
            let _ = raft.shutdown().await;
            return Err(e.into());
        }
    }
    if new_cluster || initialized {
        // The membership is applied (and, alone, this node elected) in a moment: wait for
        // it so that the CA below starts now rather than at the first maintenance tick.
        let mut metrics = raft.metrics();
        let id = config.raft_id;
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            metrics.wait_for(|m| {
                let ms = m.membership_config.membership();
                let alone = ms.voter_ids().all(|v| v == id);
                ms.get_node(&id).is_some() && (!alone || m.current_leader == Some(id))
            }),
        )
        .await;
    }
    if new_cluster && restored {
        // The restored state is in the state machine but in no log entry: a node that joins
        // would replay the new log from its start and never see it. Snapshot and purge the
        // log, so that joining nodes are sent the state as a snapshot.
        match raft.snapshot_and_purge(Duration::from_secs(60)).await {
            Ok(at) => tracing::info!(
                index = at.index,
                "restored state: snapshot built and log purged, so joining nodes receive it"
            ),
            Err(e) => {
                let _ = raft.shutdown().await;
                return Err(Error::Internal(format!(
                    "the restored state could not be snapshotted for joining nodes: {e}"
                )));
            }
        }
    }
    if marker.is_none() {
        crate::registry::write_marker(
            &config.data_dir,
            &crate::registry::Marker {
                raft_id: config.raft_id,
                origin: if bootstrap == Bootstrap::Join {
                    crate::registry::Origin::Join
                } else {
                    crate::registry::Origin::Init
                },
            },
        )?;
    }

    let gate = match PeerGate::new(config.clone(), raft.clone(), sm.clone()).await {
        Ok(g) => g,
        Err(e) => {
            let _ = raft.shutdown().await;
            return Err(e);
        }
    };
    let proposer: Arc<dyn ca_raft::Proposer> = Arc::new(MeteredProposer::new(
        Arc::new(CheckedProposer::new(
            Arc::new(RaftProposer::new(raft.clone())),
            gate.clone(),
            config.node_id.clone(),
        )),
        sm.clone(),
        metrics.clone(),
    ));
    let [local_root, intermediate_km, jwt_km] = match open_key_managers(&config).await {
        Ok(k) => k,
        Err(e) => {
            let _ = raft.shutdown().await;
            return Err(e);
        }
    };
    let peers = cluster::Peers::new(raft.clone(), svid.clone(), roots.clone(), td.clone());
    let root_km: Arc<dyn KeyManager> = Arc::new(cluster::ClusterRootKeyManager::new(
        local_root.clone(),
        sm.clone(),
        peers,
    ));
    for km in [&root_km, &intermediate_km, &jwt_km] {
        metrics.init_key_manager(km.backend());
    }
    let keys = KeyManagers::new(root_km, intermediate_km, jwt_km, Arc::new(metrics.clone()));
    let ca = Ca::new(
        CaSettings {
            trust_domain: td.clone(),
            node_id: config.node_id.clone(),
            root_ttl: config.ttl.root,
            intermediate_ttl: config.ttl.intermediate,
            jwt_key_ttl: config.ttl.jwt_key,
            intermediate_mode: config.intermediate_mode,
            key_algorithm: config.ca_key_algorithm,
            jwt_key_algorithm: config.jwt_key_algorithm,
            rotation: config.rotation.clone(),
        },
        keys,
        Arc::new(crate::ca::RaftJournal::new(sm.clone(), proposer.clone())),
    );
    let core = Arc::new(NodeCore {
        config: config.clone(),
        sm,
        proposer,
        ca,
        metrics,
        raft: raft.clone(),
        svid: svid.clone(),
        roots: roots.clone(),
        local_root_km: local_root,
        advertise_addr: advertise.clone(),
        gate: gate.clone(),
    });
    let (shutdown, _) = watch::channel(false);
    let mut tasks = vec![tokio::spawn(gate.clone().run(shutdown.subscribe()))];

    // The node API, the Raft transport and the cluster service, over TLS. Served before the
    // CA is ready: a member's peers need its Raft service first.
    let tls = ca_identity::tls::server_config(svid.clone(), roots.clone(), false);
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
    let (anon_tx, anon_rx) = tokio::sync::mpsc::channel(128);
    let conn_limit = ca_identity::serve::ConnectionLimit::new(
        ca_identity::connection_cap(MAX_NODE_CONNECTIONS, ca_identity::nofile_limit(), 512),
        "node API",
    );
    let limits = &config.limits;
    let anon_limit = ca_identity::serve::ConnectionLimit::new(
        limits.unauthenticated_connections,
        "node API (no client certificate)",
    );
    let per_address =
        ca_identity::serve::KeyedLimit::new(limits.unauthenticated_connections_per_address);
    let handshaking = ca_identity::serve::KeyedLimit::new(HANDSHAKES_PER_ADDRESS);
    let anon_max_age = Duration::from_secs(limits.unauthenticated_max_age_secs);
    let accept_errors = Arc::new(ca_identity::LogThrottle::default());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let mut stop = shutdown.subscribe();
    let accepting = core.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                accepted = listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(c) => c,
                        Err(e) => {
                            ca_identity::serve::accept_backoff("node API", &e, &accept_errors).await;
                            continue;
                        }
                    };
                    // Over a limit: closed at once (unauthenticated callers hold nothing).
                    // Handshakes in progress are bounded per source address and in time.
                    let Some(permit) = conn_limit.try_admit() else { continue };
                    let Some(handshake) = handshaking.admit(peer.ip()) else {
                        refuse_anonymous(&accepting, peer, "too many TLS handshakes in progress from this address");
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let (tx, anon_tx, anon_limit) = (conn_tx.clone(), anon_tx.clone(), anon_limit.clone());
                    let per_address = per_address.clone();
                    let core = accepting.clone();
                    tokio::spawn(async move {
                        let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                        };
                        drop(handshake);
                        let conn = tls.get_ref().1;
                        let authenticated = conn.peer_certificates().is_some_and(|c| !c.is_empty());
                        if !authenticated {
                            // Attesting agents and joining nodes: served apart, with few
                            // streams, short calls and a maximum age, and a share per
                            // source address (an agent with its SVID never counts here).
                            let Some(slot) = per_address.admit(peer.ip()) else {
                                return refuse_anonymous(&core, peer, "too many connections without a client certificate from this address");
                            };
                            let Some(anon) = anon_limit.try_admit() else {
                                return refuse_anonymous(&core, peer, "the node's limit of connections without a client certificate is reached");
                            };
                            let open = OpenConnection::new(core.metrics.connections_open.with_label_values(&["unauthenticated"]));
                            let conn = ca_identity::serve::Permitted::new(tls, (permit, anon, slot, open))
                                .with_max_age(anon_max_age);
                            let _ = anon_tx.send(Ok::<_, std::io::Error>(conn)).await;
                            return;
                        }
                        let open = OpenConnection::new(core.metrics.connections_open.with_label_values(&["authenticated"]));
                        let conn = ca_identity::serve::Permitted::new(tls, (permit, open));
                        let _ = tx.send(Ok::<_, std::io::Error>(conn)).await;
                    });
                }
            }
        }
    }));
    let node_api = NodeServer::new(NodeApi::new(core.clone()));
    let raft_api = raft.grpc_service(Arc::new(gate.clone()));
    let cluster_api = cluster::ClusterService::new(core.clone()).into_server();
    // Callers without a client certificate reach only what they can use (attestation,
    // join; every other call needs an SVID and is refused there anyway), each call bounded.
    let anonymous = tonic::service::Routes::new(node_api.clone())
        .add_service(cluster_api.clone())
        // The Raft service only to refuse such callers with a clear UNAUTHENTICATED.
        .add_service(raft_api.clone());
    tasks.push(serve_node_port(
        tonic::transport::Server::builder()
            .timeout(ANONYMOUS_CALL_TIMEOUT)
            .max_concurrent_streams(Some(ANONYMOUS_STREAMS_PER_CONNECTION))
            .http2_max_header_list_size(Some(ANONYMOUS_HEADER_LIST_BYTES)),
        anonymous,
        anon_rx,
        shutdown.subscribe(),
        "node API server (no client certificate)",
    ));
    let authenticated = tonic::service::Routes::new(node_api)
        .add_service(raft_api)
        .add_service(cluster_api);
    tasks.push(serve_node_port(
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES)),
        authenticated,
        conn_rx,
        shutdown.subscribe(),
        "node API server",
    ));

    // Nothing is minted or decided by the clock before it is compared with the others'.
    crate::clock::check(&core).await;
    // The CA: root (first node only), this node's intermediate and JWT key.
    let fatal = match crate::tasks::ensure_ca_unless_clock_is_off(&core).await {
        Ok(true) => None,
        Ok(false) => {
            tracing::info!("waiting for the replicated log to bring the CA journal's root");
            None
        }
        // An HSM or KMS that is down at start is waited for: the node starts not ready and
        // the maintenance loop retries. So is a cluster without a quorum. Anything else (a
        // wrong PIN, a bad config) is fatal.
        Err(Error::KeyManager(e @ ca_kms::Error::Unavailable(_))) => {
            tracing::error!(error = %e, "the key manager is unavailable at start; the node is NOT READY and retries every 5s");
            None
        }
        Err(e @ (Error::State(ca_raft::Error::Unavailable(_)) | Error::Unavailable(_))) => {
            tracing::error!(error = %e, "no quorum at start; the node is NOT READY and retries every 5s");
            None
        }
        Err(e) => Some(e),
    };
    if let Some(e) = fatal {
        let _ = shutdown.send(true);
        let _ = raft.shutdown().await;
        return Err(e);
    }
    let svid_issuer = core
        .ca
        .intermediate()
        .map(|i| i.record.id)
        .unwrap_or_default();
    let svid_validity = match core.ca.intermediate() {
        Some(_) if core.ca.clock_problem().is_some() => None,
        Some(_) => match crate::tasks::renew_node_svid(&core, &svid).await {
            Ok(validity) => Some(validity),
            Err(e) => {
                let _ = shutdown.send(true);
                let _ = raft.shutdown().await;
                return Err(e);
            }
        },
        None => None, // no serving certificate of its own until the CA is ready
    };
    if let Ok(b) = core.ca.bundle() {
        roots.set(b.x509_authorities.clone());
    }

    // Admin API on a private Unix socket.
    let admin_socket = config.admin_socket.clone();
    let uds = ca_identity::unix_socket::bind(&admin_socket, 0o700, 0o600, "ca-node")
        .await
        .map_err(|e| Error::Config(format!("admin_socket: {e}")))?;
    let ready_core = core.clone();
    let ready = Arc::new(move || readiness(&ready_core));
    let admin = AdminApi::server(core.clone(), ready.clone());
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
            let stop = async move {
                let _ = stop.changed().await;
            };
            ca_identity::http_probe::serve(l, app, "node HTTP (metrics, health)", stop).await;
        }));
    }

    // Clock offsets to the other members: a node whose clock a quorum disagrees with stops
    // minting.
    tasks.push(crate::clock::spawn(core.clone(), shutdown.subscribe()));
    tasks.push(crate::tasks::spawn_raft_metrics(
        &core,
        shutdown.subscribe(),
    ));

    // The node's serving SVID, renewed when half of its remaining life is gone (on its own
    // timer: short lifetimes must not wait for the maintenance tick), and as soon as the
    // intermediate changed (rotated or revoked), checked every second.
    tasks.push(crate::tasks::spawn_svid_renewal(
        core.clone(),
        svid.clone(),
        svid_validity,
        svid_issuer,
        shutdown.subscribe(),
    ));

    // Maintenance: the authorities' lifecycle, expired key destruction, bundle refresh.
    tasks.push(crate::tasks::spawn_maintenance(
        core.clone(),
        roots.clone(),
        shutdown.subscribe(),
    ));

    tracing::info!(%node_addr, admin_socket = %admin_socket.display(), trust_domain = %config.trust_domain, node_id = %config.node_id, "ca-node started");
    let (failed_tx, failed) = watch::channel(None);
    tasks.push(watch_storage(core.clone(), shutdown.clone(), failed_tx));
    Ok(NodeHandle {
        node_addr,
        admin_socket,
        http_addr,
        core,
        shutdown,
        failed,
        tasks,
    })
}

/// Bytes free for this process in the file system of `dir`, if it can be read.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Below this much free space in the data dir's file system, readiness says so.
const LOW_DISK_BYTES: u64 = 64 << 20;

/// Watches the data dir's free space (`ca_node_data_dir_free_bytes`, every 10 s) and the
/// Raft core: when it has stopped for good (the log or the state could not be written:
/// a full disk, an I/O error) the node logs why, with the free space, stops serving and
/// reports the failure to whoever runs it ([`NodeHandle::failure`]; `ca-node` then waits
/// for room and starts again; everything it acknowledged is in its log or on the other
/// members).
fn watch_storage(
    core: Arc<NodeCore>,
    shutdown: watch::Sender<bool>,
    failed: watch::Sender<Option<String>>,
) -> JoinHandle<()> {
    let mut stop = shutdown.subscribe();
    tokio::spawn(async move {
        let mut tick = 0u64;
        loop {
            if tick.is_multiple_of(20) {
                if let Some(free) = free_bytes(&core.config.data_dir) {
                    core.metrics.data_dir_free.set(free as i64);
                }
            }
            tick += 1;
            if let Some(why) = core.raft.status().fatal {
                let free = free_bytes(&core.config.data_dir)
                    .map(|b| format!("{} MiB", b >> 20))
                    .unwrap_or_else(|| "unknown".into());
                let msg = format!(
                    "this node's Raft log or state cannot be written ({why}); {} has {free} free. The node stops serving: make room (or fix the disk), then start it again; everything it acknowledged is in its log or on the other members",
                    core.config.data_dir.display()
                );
                tracing::error!("{msg}");
                let _ = failed.send(Some(msg));
                let _ = shutdown.send(true);
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
        }
    })
}

fn readiness(core: &NodeCore) -> (bool, String) {
    let st = core.raft.status();
    let raft = match st.leader {
        Some(l) => format!("raft {} (leader {l}, term {})", st.role.as_str(), st.term),
        None => format!("raft {} (no leader)", st.role.as_str()),
    };
    let (ok, detail) = minting_readiness(core);
    let disk = match free_bytes(&core.config.data_dir) {
        Some(free) if free < LOW_DISK_BYTES => format!(
            "; the data dir's file system is nearly full ({} MiB free): writes will fail",
            free >> 20
        ),
        _ => String::new(),
    };
    (ok, format!("{detail}; {raft}{disk}"))
}

/// Readiness is the ability to mint: a node without a Raft quorum still mints (minting does
/// not go through the log), so the Raft role is reported but does not decide.
fn minting_readiness(core: &NodeCore) -> (bool, String) {
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

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
