//! openraft's `InstallSnapshotRequest` / `InstallSnapshotResponse` <->
//! `raft.InstallSnapshotRequest` / `raft.InstallSnapshotReply`. The chunk's data is raw
//! bytes; the snapshot metadata (membership included) is JSON.

use ca_proto::raft as pb;
use openraft::raft::{InstallSnapshotRequest, InstallSnapshotResponse};

use super::{from_json, to_json, FromPb, IntoPb};
use crate::types::{NodeId, TypeConfig, Vote};

impl IntoPb<pb::InstallSnapshotRequest> for InstallSnapshotRequest<TypeConfig> {
    fn into_pb(self) -> pb::InstallSnapshotRequest {
        pb::InstallSnapshotRequest {
            vote: Some(self.vote.into_pb()),
            meta: to_json(&self.meta),
            offset: self.offset,
            data: self.data,
            done: self.done,
        }
    }
}

impl FromPb<pb::InstallSnapshotRequest> for InstallSnapshotRequest<TypeConfig> {
    fn from_pb(v: pb::InstallSnapshotRequest) -> Result<Self, tonic::Status> {
        Ok(InstallSnapshotRequest {
            vote: Vote::from_pb(v.vote)?,
            meta: from_json("snapshot metadata", &v.meta)?,
            offset: v.offset,
            data: v.data,
            done: v.done,
        })
    }
}

impl IntoPb<pb::InstallSnapshotReply> for InstallSnapshotResponse<NodeId> {
    fn into_pb(self) -> pb::InstallSnapshotReply {
        pb::InstallSnapshotReply {
            vote: Some(self.vote.into_pb()),
            error: Vec::new(),
        }
    }
}

impl FromPb<pb::InstallSnapshotReply> for InstallSnapshotResponse<NodeId> {
    fn from_pb(v: pb::InstallSnapshotReply) -> Result<Self, tonic::Status> {
        Ok(InstallSnapshotResponse {
            vote: Vote::from_pb(v.vote)?,
        })
    }
}
