//! The openraft types of this crate, declared once: [`TypeConfig`] (commands are
//! [`Command`], answers [`Response`], node IDs `u64`, members [`NodeInfo`], snapshots
//! [`SnapshotFile`]) and short aliases for the generic openraft types over it.

use serde::{Deserialize, Serialize};

pub use crate::snapshot::SnapshotFile;
use ca_state::{Command, Response};

/// A Raft node ID. Chosen by the operator when the node joins; unique in the cluster and
/// never reused.
pub type NodeId = u64;

/// A cluster member as the membership stores it: how to reach it and who it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its Raft gRPC address, `host:port`.
    pub addr: String,
    /// The ca-node's own node ID (the last segment of its SPIFFE ID
    /// `spiffe://TD/ca-node/<node_id>`).
    pub node_id: String,
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.node_id, self.addr)
    }
}

openraft::declare_raft_types!(
    /// The openraft type configuration of the CA's replicated state.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = NodeInfo,
        SnapshotData = SnapshotFile,
);

/// A running openraft instance of this crate.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// What a log entry carries.
pub type EntryPayload = openraft::EntryPayload<TypeConfig>;
/// A log entry's ID.
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// A membership configuration.
pub type Membership = openraft::Membership<NodeId, NodeInfo>;
/// A membership configuration and the log ID it was stored at.
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
/// A snapshot's metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
/// A snapshot.
pub type Snapshot = openraft::Snapshot<TypeConfig>;
/// A storage failure as openraft reports it.
pub type StorageError = openraft::StorageError<NodeId>;
/// openraft's metrics of a node.
pub type RaftMetrics = openraft::RaftMetrics<NodeId, NodeInfo>;
