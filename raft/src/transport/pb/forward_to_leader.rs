//! openraft's `ForwardToLeader` <-> `raft.ForwardToLeader`: who the leader is, if known.

use ca_proto::raft as pb;
use openraft::error::ForwardToLeader;

use super::{FromPb, IntoPb};
use crate::types::{NodeId, NodeInfo};

impl IntoPb<pb::ForwardToLeader> for ForwardToLeader<NodeId, NodeInfo> {
    fn into_pb(self) -> pb::ForwardToLeader {
        pb::ForwardToLeader {
            leader_id: self.leader_id,
            leader_node: self.leader_node.map(IntoPb::into_pb),
        }
    }
}

/// The leader named in a `raft.ForwardToLeader`, if any.
pub(crate) fn forward_from_pb(v: pb::ForwardToLeader) -> Option<(NodeId, NodeInfo)> {
    let id = v.leader_id?;
    let node = NodeInfo::from_pb(v.leader_node?).ok()?;
    Some((id, node))
}
