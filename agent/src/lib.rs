//! The host agent of the SPIFFE CA: it attests itself to the CA nodes, keeps X.509-SVIDs
//! for the workloads registered on its host, and serves them through the standard SPIFFE
//! Workload API on a Unix socket.
//!
//! # Use
//!
//! As a program: `agent run --config agent.toml` (see [`config`] for the file), and the
//! Workload API client commands `agent api fetch x509|jwt`, `agent api validate jwt`,
//! `agent healthcheck` (see [`cli`]).
//!
//! In-process (tests, a development cluster):
//!
//! ```no_run
//! # async fn demo() -> Result<(), ca_agent::Error> {
//! let config = ca_agent::AgentConfig {
//!     trust_domain: "example.org".into(),
//!     server_addresses: vec!["127.0.0.1:8081".into()],
//!     data_dir: "/tmp/agent-data".into(),
//!     socket_path: "/tmp/agent-data/agent.sock".into(),
//!     insecure_bootstrap: true,
//!     join_token: Some("TOKEN".into()),
//!     ..Default::default()
//! };
//! let agent = ca_agent::start(config).await?;
//! println!("{} serves {}", agent.spiffe_id(), agent.socket_path().display());
//! agent.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! 1. [`start`] validates the config, then reuses the agent SVID stored in `data_dir`
//!    ([`persist`]) if it is still valid, or attests ([`attest`]) with a join token or x509pop
//!    over the node API ([`node_client`]), trusting the nodes via `trust_bundle_path` or,
//!    with `insecure_bootstrap`, blindly on first contact only.
//! 2. A renewal loop renews the agent SVID at half its lifetime.
//! 3. The cache manager ([`cache`]) syncs entries every `sync_interval_secs`, mints
//!    workload SVIDs (keys generated locally) and publishes snapshots via `watch`.
//! 4. The Workload API ([`workload_api`]) attests callers from their socket credentials
//!    ([`workload_attestor`]) and streams what they are entitled to.
//! 5. Optional `/healthz` and `/readyz` ([`health`]).
//!
//! Failure handling: nodes are tried in turn (failover) with exponential backoff and
//! jitter; when none is reachable, or the CA denies the agent, cached SVIDs keep being
//! served and the loops keep retrying.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_identity::SpiffeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod attest;
pub mod cache;
pub mod cli;
pub mod config;
mod error;
pub mod h2_authority;
pub mod health;
pub mod metrics;
pub mod node_client;
pub mod persist;
pub mod testing;
pub mod workload_api;
pub mod workload_attestor;
pub mod workload_client;

pub use cache::{Cache, CacheState};
pub use config::AgentConfig;
pub use error::Error;

use cache::{CacheManager, JwtCache};
use node_client::NodeClient;
use persist::{AgentSvid, Store};

/// How long [`start`] waits for the first entry sync before serving anyway.
const INITIAL_SYNC_WAIT: Duration = Duration::from_secs(10);
/// How long [`AgentHandle::shutdown`] waits for streams and servers to end.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    socket_path: PathBuf,
    svid: watch::Receiver<AgentSvid>,
    cache: Cache,
    health_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    server: Option<JoinHandle<Result<(), Error>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl AgentHandle {
    /// The Workload API socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The agent's SPIFFE ID.
    pub fn spiffe_id(&self) -> SpiffeId {
        self.svid.borrow().spiffe_id.clone()
    }

    /// The agent's current SVID (chain and key).
    pub fn svid(&self) -> persist::AgentSvid {
        self.svid.borrow().clone()
    }

    /// The agent SVID's expiry (Unix seconds); changes on renewal.
    pub fn svid_expires_at(&self) -> i64 {
        self.svid.borrow().not_after
    }

    /// The SVID cache (read-only use: inspect entries and SVIDs served).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The bound health endpoint address, if enabled.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// Waits until the Workload API server stops (it only stops on shutdown or failure).
    pub async fn wait(&mut self) -> Result<(), Error> {
        match self.server.as_mut() {
            Some(h) => {
                let r = h.await;
                self.server = None;
                r.map_err(|e| Error::WorkloadApi(format!("the Workload API task failed: {e}")))?
            }
            None => Ok(()),
        }
    }

    /// Stops everything gracefully and removes the socket.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.shutdown.send_replace(true);
        let mut result = Ok(());
        if let Some(server) = self.server.take() {
            match tokio::time::timeout(SHUTDOWN_WAIT, server).await {
                Ok(Ok(r)) => result = r,
                Ok(Err(e)) => {
                    result = Err(Error::WorkloadApi(format!(
                        "the Workload API task failed: {e}"
                    )))
                }
                Err(_) => tracing::warn!("the Workload API did not stop in time; dropping it"),
            }
        }
        for t in self.tasks.drain(..) {
            if tokio::time::timeout(SHUTDOWN_WAIT, &mut { t })
                .await
                .is_err()
            {
                tracing::debug!("a background task did not stop in time");
            }
        }
        let _ = std::fs::remove_file(&self.socket_path);
        tracing::info!("agent stopped");
        result
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        // A handle dropped without shutdown() still stops the background work.
        self.shutdown.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Obtains the agent SVID: the stored one if still valid, else by attestation.
async fn obtain_identity(
    config: &AgentConfig,
    store: &Store,
    node: &NodeClient,
) -> Result<(AgentSvid, ca_identity::TrustBundle), Error> {
    let td = config.trust_domain()?;
    let now = ca_identity::unix_now();
    let method = config.attestation_method()?;
    match store.load()? {
        Some(stored) if !stored.svid.spiffe_id.is_member_of(&td) => Err(Error::Persist(format!(
            "the agent SVID stored in {} is for {}, not trust domain {td}; use another data_dir or delete its contents",
            store.dir().display(),
            stored.svid.spiffe_id
        ))),
        Some(stored) if stored.svid.not_after > now => {
            tracing::info!(spiffe_id = %stored.svid.spiffe_id, expires_at = stored.svid.not_after,
                "reusing the stored agent SVID (no re-attestation)");
            Ok((stored.svid, stored.bundle))
        }
        Some(stored) => {
            let Some(method) = method else {
                return Err(Error::Persist(format!(
                    "the stored agent SVID {} expired at {} (Unix time) and join tokens are single use: \
                     create a new join token and set join_token (or configure [x509pop]) to attest again",
                    stored.svid.spiffe_id, stored.svid.not_after
                )));
            };
            tracing::warn!(spiffe_id = %stored.svid.spiffe_id,
                "the stored agent SVID expired at {}; attesting again", stored.svid.not_after);
            // The stored bundle is still the best guess of the nodes' roots.
            if config.trust_bundle_path.is_none() {
                node.roots().set(stored.bundle.x509_authorities.clone());
            }
            store.forget_svid();
            attest::attest_and_store(&method, node, store, config.insecure_bootstrap).await
        }
        None => {
            let Some(method) = method else {
                return Err(Error::Config(
                    "this agent has not attested yet: set join_token (or join_token_file, or the AGENT_JOIN_TOKEN environment variable) or configure [x509pop]".into(),
                ));
            };
            attest::attest_and_store(&method, node, store, config.insecure_bootstrap).await
        }
    }
}

/// Starts an agent: attests (or reuses its stored SVID), starts entry sync, SVID rotation
/// and the Workload API, and returns once the socket is listening.
pub async fn start(config: AgentConfig) -> Result<AgentHandle, Error> {
    config.validate()?;
    let td = config.trust_domain()?;
    let store = Store::new(&config.data_dir);
    let roots = LiveRoots::default();
    if let Some(p) = &config.trust_bundle_path {
        let text = std::fs::read_to_string(p).map_err(|e| Error::io("cannot read", p, e))?;
        roots.set(ca_identity::bundle::certs_from_pem(&text)?);
    }
    let metrics = Arc::new(metrics::AgentMetrics::new());
    let node = Arc::new(
        NodeClient::new(
            config.server_addresses.clone(),
            td.clone(),
            roots,
            SvidResolver::default(),
        )
        .with_failover_counter(metrics.failovers.clone()),
    );

    let (svid, bundle) = obtain_identity(&config, &store, &node).await?;
    node.svid().set(&svid.chain, &svid.key_pkcs8)?;
    // The attestation connection was made without a client certificate: drop it so the
    // next call handshakes with the agent SVID.
    node.reset_connections();
    node.roots().set(bundle.x509_authorities.clone());
    let (svid_tx, svid_rx) = watch::channel(svid.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let cache = Cache::new();
    cache.set_bundle(bundle);
    let manager = CacheManager::new(
        node.clone(),
        cache.clone(),
        store.clone(),
        Duration::from_secs(config.sync_interval_secs),
    )
    .with_mode(config.sync)
    .with_metrics(metrics.clone());
    let initial = match manager.mode() {
        cache::SyncMode::Poll => tokio::time::timeout(INITIAL_SYNC_WAIT, manager.sync_once())
            .await
            .map(|r| r.map_err(|s| node_client::describe("initial entry sync", &s))),
        cache::SyncMode::Watch => Ok(Ok(())),
    };
    let manager = tokio::spawn(manager.run(shutdown_rx.clone()));
    let initial = match initial {
        // Watch mode: the stream's first full set.
        Ok(Ok(())) if config.sync == cache::SyncMode::Watch => {
            let mut c = cache.subscribe();
            tokio::time::timeout(INITIAL_SYNC_WAIT, c.wait_for(|s| s.synced))
                .await
                .map(|_| Ok(()))
        }
        other => other,
    };
    match initial {
        Ok(Ok(())) => tracing::info!(
            entries = cache.current().entries.len(),
            sync = ?config.sync,
            "initial entry sync done"
        ),
        Ok(Err(s)) => tracing::warn!("{s}; serving once a sync succeeds"),
        Err(_) => tracing::warn!("initial entry sync is slow; continuing in the background"),
    }

    let mut tasks = vec![
        manager,
        tokio::spawn(attest::run_renewal(
            node.clone(),
            store.clone(),
            svid_tx,
            cache.subscribe(),
            shutdown_rx.clone(),
        )),
    ];

    let health_addr = match config.health_addr {
        Some(addr) => {
            let (bound, task) = health::spawn(
                addr,
                cache.subscribe(),
                svid_rx.clone(),
                metrics.clone(),
                health::stale_after(Duration::from_secs(config.sync_interval_secs)),
                shutdown_rx.clone(),
            )
            .await?;
            tasks.push(task);
            Some(bound)
        }
        None => None,
    };

    let listener = workload_api::bind(&config.socket_path).await?;
    let api = workload_api::WorkloadApi::new(
        td,
        cache.subscribe(),
        Arc::new(
            workload_attestor::WorkloadAttestor::new()
                .allow_other_pid_namespaces(config.workload_api.allow_other_pid_namespaces),
        ),
        Arc::new(
            JwtCache::new(node.clone())
                .with_capacity(config.workload_api.jwt_svid_cache_size)
                .with_revocations(cache.subscribe()),
        ),
        shutdown_rx.clone(),
        &config.workload_api,
    )
    .with_metrics(metrics);
    let mut stop = shutdown_rx.clone();
    let server = tokio::spawn(workload_api::serve(listener, api, async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    tracing::info!(spiffe_id = %svid.spiffe_id, socket = %config.socket_path.display(),
        "agent ready: Workload API listening");
    Ok(AgentHandle {
        socket_path: config.socket_path.clone(),
        svid: svid_rx,
        cache,
        health_addr,
        shutdown: shutdown_tx,
        server: Some(server),
        tasks,
    })
}
