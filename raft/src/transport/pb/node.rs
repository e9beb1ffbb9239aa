//! [`NodeInfo`] <-> `raft.Node`.

use ca_proto::raft as pb;

use super::{FromPb, IntoPb};
use crate::types::NodeInfo;

impl IntoPb<pb::Node> for NodeInfo {
    fn into_pb(self) -> pb::Node {
        pb::Node {
            addr: self.addr,
            node_id: self.node_id,
        }
    }
}

impl FromPb<pb::Node> for NodeInfo {
    fn from_pb(v: pb::Node) -> Result<Self, tonic::Status> {
        Ok(NodeInfo {
            addr: v.addr,
            node_id: v.node_id,
        })
    }
}
