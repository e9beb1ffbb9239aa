//! A node's life: [`start_with`] builds it ([`build`]: state, log, the node port bound, the
//! Raft member, key managers, the CA and the [`NodeCore`]), then spawns it ([`spawn`]: the
//! node port's servers ([`node_port`]), the CA brought up to date, the admin socket,
//! `/metrics` `/healthz` `/readyz` ([`health`]) and the long-running [`tasks`]: intermediate
//! and JWT key lifecycle, root rotation, node SVID renewal, bundle refresh).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::NodeConfig;
use crate::core::NodeCore;
use crate::Error;

mod build;
pub mod health;
pub mod node_port;
mod spawn;
pub(crate) mod tasks;

pub use health::free_bytes;
pub use node_port::{
    ANONYMOUS_CALL_TIMEOUT, ANONYMOUS_HEADER_LIST_BYTES, ANONYMOUS_STREAMS_PER_CONNECTION,
    HANDSHAKES_PER_ADDRESS, MAX_HEADER_LIST_BYTES, MAX_NODE_CONNECTIONS,
    MAX_STREAMS_PER_CONNECTION, TLS_HANDSHAKE_TIMEOUT,
};

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
    /// Why the node stopped on its own, once it has ([`health::watch_storage`]).
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
        health::readiness(&self.core)
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

/// Starts a node; see [`Bootstrap`]. Builds it, then spawns it; returns once every
/// listener is bound.
pub async fn start_with(config: NodeConfig, bootstrap: Bootstrap) -> Result<NodeHandle, Error> {
    build::build(config, bootstrap).await?.spawn().await
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
