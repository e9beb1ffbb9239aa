//! Replication of the CA's state: every change is a [`ca_state::Command`], appended to a
//! Raft log (openraft), and applied in log order by [`StateMachine`], which runs
//! `ca_state::apply` on a durable SQLite store on every replica.
//!
//! Nothing else writes state. A [`Proposer`] takes a command to the log and returns the
//! state machine's [`ca_state::Response`] once it is applied: [`RaftProposer`] in a
//! cluster, [`LocalProposer`] for one node without Raft (development, tests).
//!
//! # Guide
//! - [`types`]: the openraft [`TypeConfig`] (commands, responses, `u64` node IDs,
//!   [`NodeInfo`] members, [`SnapshotFile`] snapshots), declared once, and aliases.
//! - [`store`]: where a replica keeps things. `db`: SQLite connections (rusqlite), each on
//!   its own thread, a job running all its statements there for one hand-off from async
//!   code; [`store::log_store`]: [`LogStore`], the Raft log, vote and purge point in their
//!   own database ([`LOG_DB_FILE`]), every write committed (fsync) before openraft hears it
//!   is flushed, appends that queue up committed together; [`store::state_machine`]:
//!   [`StateMachine`] over [`STATE_DB_FILE`], each batch of entries applied together with
//!   the last applied log ID and membership, applied batches committed in groups (any read
//!   commits first; the log holds the rest), snapshots `VACUUM INTO` copies installed by
//!   copying their tables over in one transaction ([`snapshot`]).
//! - [`transport`]: [`transport::network`], the client side, one unary gRPC call per RPC
//!   (`ca_proto::raft`) over channels from a caller's [`Connector`] (the node brings
//!   mutually authenticated TLS); [`transport::service`], the server side, [`RaftGrpc`],
//!   which the node mounts on its own server; [`transport::policy`], the [`PeerPolicy`] it
//!   checks every call and proposal with.
//! - `membership`: membership changes, one at a time per node.
//! - [`node`]: [`RaftNode`], a running member: writes forwarded to the leader, the
//!   linearizable read barrier [`RaftNode::ensure_linearizable`], `init`/`add`/`promote`/
//!   `remove`, [`ClusterStatus`]; [`node::batcher`]: writes that arrive together proposed
//!   as one log entry; [`node::proposer`]: the [`Proposer`] seam.
//!
//! # Running a member
//! ```no_run
//! # async fn run() -> ca_raft::Result<()> {
//! use std::sync::Arc;
//! use ca_raft::*;
//! let dir = std::path::Path::new("/var/lib/ca-node");
//! let sm = StateMachine::open(&dir.join(STATE_DB_FILE)).await?;
//! let log = LogStore::open(&dir.join(LOG_DB_FILE)).await?;
//! let me = NodeInfo { addr: "10.0.0.1:7443".into(), node_id: "ca-1".into() };
//! let node = RaftNode::start(RaftNodeConfig::new(1, me), log, sm, Arc::new(PlaintextConnector::default())).await?;
//! // Mount node.grpc_service(policy) on the node's (TLS) gRPC server, then, on the first node only:
//! node.initialize().await?;
//! let proposer = RaftProposer::new(node.clone());
//! # let _ = proposer; Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod membership;
pub mod node;
pub mod snapshot;
pub mod store;
pub mod transport;
pub mod types;

pub use node::proposer::{LocalProposer, Proposer, RaftProposer};
pub use node::{ClusterStatus, RaftNode, RaftNodeConfig, Role, LOG_DB_FILE, STATE_DB_FILE};
pub use snapshot::SnapshotFile;
pub use store::log_store::LogStore;
pub use store::state_machine::{SnapshotActivity, StateMachine};
pub use transport::network::{BoxError, Connector, PlaintextConnector};
pub use transport::policy::{Admitted, PeerPolicy};
pub use transport::service::RaftGrpc;
pub use types::{NodeId, NodeInfo, TypeConfig};

/// Errors of the store (not rule violations: those are [`Response::Rejected`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// SQLite failed.
    #[error("state store: {0}")]
    Store(#[from] rusqlite::Error),
    /// A store's connection thread could not be started or has stopped.
    #[error("state store: {0}")]
    Io(String),
    /// A stored value could not be decoded.
    #[error("state store holds a corrupt value: {0}")]
    Corrupt(String),
    /// A snapshot could not be built, stored or installed.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A membership operation was sent to a node that is not the leader.
    #[error("not the leader; the leader is {}", leader_id.map(|i| format!("node {i} at {}", leader_addr.as_deref().unwrap_or("an unknown address"))).unwrap_or_else(|| "unknown".into()))]
    NotLeader {
        /// The leader's ID, if known.
        leader_id: Option<NodeId>,
        /// The leader's Raft address, if known.
        leader_addr: Option<String>,
    },
    /// The cluster refused an operation (already initialized, membership change in
    /// progress, unknown learner, bad configuration).
    #[error("cluster: {0}")]
    Cluster(String),
    /// The log is not accepting writes (e.g. shutting down, no leader).
    #[error("replicated log unavailable: {0}")]
    Unavailable(String),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<rusqlite::types::FromSqlError> for Error {
    fn from(e: rusqlite::types::FromSqlError) -> Self {
        Error::Corrupt(e.to_string())
    }
}

impl From<ca_state::Error> for Error {
    fn from(e: ca_state::Error) -> Self {
        match e {
            ca_state::Error::Store(e) => Error::Store(e),
            ca_state::Error::Corrupt(m) => Error::Corrupt(m),
            other => Error::Io(other.to_string()),
        }
    }
}

impl Error {
    /// The same error again, for each caller of a batched write that failed as a whole.
    pub(crate) fn for_each_caller(&self) -> Error {
        match self {
            Error::Store(e) => Error::Io(e.to_string()),
            Error::Corrupt(m) => Error::Corrupt(m.clone()),
            Error::Snapshot(m) => Error::Snapshot(m.clone()),
            Error::NotLeader {
                leader_id,
                leader_addr,
            } => Error::NotLeader {
                leader_id: *leader_id,
                leader_addr: leader_addr.clone(),
            },
            Error::Cluster(m) => Error::Cluster(m.clone()),
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
            Error::Io(m) => Error::Io(m.clone()),
        }
    }
}
