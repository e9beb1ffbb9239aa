//! openraft's `VoteRequest` / `VoteResponse` <-> `raft.VoteRequest` / `raft.VoteReply`.

use ca_proto::raft as pb;
use openraft::raft::{VoteRequest, VoteResponse};

use super::{FromPb, IntoPb};
use crate::types::{LogId, NodeId, Vote};

impl IntoPb<pb::VoteRequest> for VoteRequest<NodeId> {
    fn into_pb(self) -> pb::VoteRequest {
        pb::VoteRequest {
            vote: Some(self.vote.into_pb()),
            last_log_id: self.last_log_id.into_pb(),
        }
    }
}

impl FromPb<pb::VoteRequest> for VoteRequest<NodeId> {
    fn from_pb(v: pb::VoteRequest) -> Result<Self, tonic::Status> {
        Ok(VoteRequest::new(
            Vote::from_pb(v.vote)?,
            Option::<LogId>::from_pb(v.last_log_id)?,
        ))
    }
}

impl IntoPb<pb::VoteReply> for VoteResponse<NodeId> {
    fn into_pb(self) -> pb::VoteReply {
        pb::VoteReply {
            vote: Some(self.vote.into_pb()),
            vote_granted: self.vote_granted,
            last_log_id: self.last_log_id.into_pb(),
            error: Vec::new(),
        }
    }
}

impl FromPb<pb::VoteReply> for VoteResponse<NodeId> {
    fn from_pb(v: pb::VoteReply) -> Result<Self, tonic::Status> {
        Ok(VoteResponse {
            vote: Vote::from_pb(v.vote)?,
            vote_granted: v.vote_granted,
            last_log_id: Option::<LogId>::from_pb(v.last_log_id)?,
        })
    }
}
