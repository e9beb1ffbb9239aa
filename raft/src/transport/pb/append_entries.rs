//! openraft's `AppendEntriesRequest` / `AppendEntriesResponse` <-> `raft.AppendEntriesRequest`
//! / `raft.AppendEntriesReply`. Entries are JSON, one `bytes` per entry.

use ca_proto::raft as pb;
use ca_proto::raft::append_entries_reply::Result as Reply;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};

use super::{from_json, to_json, FromPb, IntoPb};
use crate::types::{LogId, NodeId, TypeConfig, Vote};

impl IntoPb<pb::AppendEntriesRequest> for AppendEntriesRequest<TypeConfig> {
    fn into_pb(self) -> pb::AppendEntriesRequest {
        pb::AppendEntriesRequest {
            vote: Some(self.vote.into_pb()),
            prev_log_id: self.prev_log_id.into_pb(),
            entries: self.entries.iter().map(to_json).collect(),
            leader_commit: self.leader_commit.into_pb(),
        }
    }
}

impl FromPb<pb::AppendEntriesRequest> for AppendEntriesRequest<TypeConfig> {
    fn from_pb(v: pb::AppendEntriesRequest) -> Result<Self, tonic::Status> {
        Ok(AppendEntriesRequest {
            vote: Vote::from_pb(v.vote)?,
            prev_log_id: Option::<LogId>::from_pb(v.prev_log_id)?,
            entries: v
                .entries
                .iter()
                .map(|e| from_json("log entry", e))
                .collect::<Result<_, _>>()?,
            leader_commit: Option::<LogId>::from_pb(v.leader_commit)?,
        })
    }
}

impl IntoPb<pb::AppendEntriesReply> for AppendEntriesResponse<NodeId> {
    fn into_pb(self) -> pb::AppendEntriesReply {
        let r = match self {
            AppendEntriesResponse::Success => Reply::Success(pb::Empty {}),
            AppendEntriesResponse::PartialSuccess(m) => Reply::PartialSuccess(pb::PartialSuccess {
                matching: m.into_pb(),
            }),
            AppendEntriesResponse::Conflict => Reply::Conflict(pb::Empty {}),
            AppendEntriesResponse::HigherVote(v) => Reply::HigherVote(v.into_pb()),
        };
        pb::AppendEntriesReply { result: Some(r) }
    }
}

impl FromPb<Reply> for AppendEntriesResponse<NodeId> {
    fn from_pb(v: Reply) -> Result<Self, tonic::Status> {
        Ok(match v {
            Reply::Success(_) => AppendEntriesResponse::Success,
            Reply::PartialSuccess(p) => {
                AppendEntriesResponse::PartialSuccess(Option::<LogId>::from_pb(p.matching)?)
            }
            Reply::Conflict(_) => AppendEntriesResponse::Conflict,
            Reply::HigherVote(v) => AppendEntriesResponse::HigherVote(Vote::from_pb(v)?),
            Reply::Error(_) => {
                return Err(tonic::Status::internal(
                    "an error reply is not an AppendEntries response",
                ))
            }
        })
    }
}
