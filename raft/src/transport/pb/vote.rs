//! [`Vote`] <-> `raft.Vote`.

use ca_proto::raft as pb;

use super::{FromPb, IntoPb};
use crate::types::Vote;

impl IntoPb<pb::Vote> for Vote {
    fn into_pb(self) -> pb::Vote {
        pb::Vote {
            term: self.leader_id.term,
            node_id: self.leader_id.node_id,
            committed: self.committed,
        }
    }
}

impl FromPb<pb::Vote> for Vote {
    fn from_pb(v: pb::Vote) -> Result<Self, tonic::Status> {
        Ok(if v.committed {
            Vote::new_committed(v.term, v.node_id)
        } else {
            Vote::new(v.term, v.node_id)
        })
    }
}

impl FromPb<Option<pb::Vote>> for Vote {
    fn from_pb(v: Option<pb::Vote>) -> Result<Self, tonic::Status> {
        Vote::from_pb(v.ok_or_else(|| super::missing("vote"))?)
    }
}
