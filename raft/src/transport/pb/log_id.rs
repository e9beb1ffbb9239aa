//! [`LogId`] <-> `raft.LogId` (an absent message is `None`).

use ca_proto::raft as pb;

use super::{FromPb, IntoPb};
use crate::types::LogId;

impl IntoPb<pb::LogId> for LogId {
    fn into_pb(self) -> pb::LogId {
        pb::LogId {
            term: self.leader_id.term,
            node_id: self.leader_id.node_id,
            index: self.index,
        }
    }
}

impl IntoPb<Option<pb::LogId>> for Option<LogId> {
    fn into_pb(self) -> Option<pb::LogId> {
        self.map(IntoPb::into_pb)
    }
}

impl FromPb<Option<pb::LogId>> for Option<LogId> {
    fn from_pb(v: Option<pb::LogId>) -> Result<Self, tonic::Status> {
        Ok(v.map(|l| LogId::new(openraft::CommittedLeaderId::new(l.term, l.node_id), l.index)))
    }
}
