//! The server side of the Raft transport: [`RaftGrpc`] implements the generated
//! `RaftService` over a local [`Raft`]. The node mounts it on its own (TLS) server, e.g.
//! with [`crate::RaftNode::grpc_service`]; every call is checked against the node's
//! [`PeerPolicy`] first, and every proposal too.

use std::sync::Arc;

use ca_proto::raft as pb;
use ca_proto::raft::raft_service_server::{RaftService, RaftServiceServer};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use crate::membership::{change_membership_local, MembershipChange, MembershipLock};
use crate::transport::network::MAX_MESSAGE_SIZE;
use crate::transport::pb::{from_json, to_json, FromPb, IntoPb};
use crate::transport::policy::PeerPolicy;
use crate::types::{NodeId, Raft, TypeConfig};
use ca_state::Command;

/// The Raft transport's server: hands each RPC to the local Raft.
#[derive(Clone)]
pub struct RaftGrpc {
    raft: Raft,
    membership: MembershipLock,
    policy: Arc<dyn PeerPolicy>,
}

impl std::fmt::Debug for RaftGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftGrpc").finish_non_exhaustive()
    }
}

impl RaftGrpc {
    /// The service over `raft`; callers and proposals are checked against `policy`.
    pub(crate) fn new(raft: Raft, membership: MembershipLock, policy: Arc<dyn PeerPolicy>) -> Self {
        Self {
            raft,
            membership,
            policy,
        }
    }

    /// The tonic service, with message size limits fit for snapshot chunks.
    pub fn into_server(self) -> RaftServiceServer<Self> {
        RaftServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }
}

fn fatal_json(e: RaftError<NodeId>) -> Vec<u8> {
    match e {
        RaftError::Fatal(f) => to_json(&f),
        RaftError::APIError(never) => match never {},
    }
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesReply>, Status> {
        self.policy.admit(request.extensions()).await?.full()?;
        // A failure of this node itself is the reply's `error`.
        let req = AppendEntriesRequest::<TypeConfig>::from_pb(request.into_inner())?;
        let reply = match self.raft.append_entries(req).await {
            Ok(resp) => resp.into_pb(),
            Err(e) => pb::AppendEntriesReply {
                result: Some(pb::append_entries_reply::Result::Error(fatal_json(e))),
            },
        };
        Ok(Response::new(reply))
    }

    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteReply>, Status> {
        self.policy.admit(request.extensions()).await?.full()?;
        let req = VoteRequest::<NodeId>::from_pb(request.into_inner())?;
        let reply = match self.raft.vote(req).await {
            Ok(resp) => resp.into_pb(),
            Err(e) => pb::VoteReply {
                error: fatal_json(e),
                ..Default::default()
            },
        };
        Ok(Response::new(reply))
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotReply>, Status> {
        self.policy.admit(request.extensions()).await?.full()?;
        let req = InstallSnapshotRequest::<TypeConfig>::from_pb(request.into_inner())?;
        let reply = match self.raft.install_snapshot(req).await {
            Ok(resp) => resp.into_pb(),
            Err(e) => pb::InstallSnapshotReply {
                vote: None,
                error: to_json(&e),
            },
        };
        Ok(Response::new(reply))
    }

    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeReply>, Status> {
        use pb::propose_reply::Result as R;
        let caller = self.policy.admit(request.extensions()).await?;
        let cmd: Command = from_json("command", &request.into_inner().command)?;
        if let Err(why) = self.policy.check_proposal(&caller, &cmd).await {
            tracing::warn!(caller = caller.node_id(), %why, "a forwarded proposal was refused");
            return Err(Status::permission_denied(format!(
                "proposal refused: {why}"
            )));
        }
        let result = match self.raft.client_write(cmd).await {
            Ok(resp) => R::Response(to_json(&resp.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                R::ForwardToLeader(f.into_pb())
            }
            Err(e) => R::Error(e.to_string()),
        };
        Ok(Response::new(pb::ProposeReply {
            result: Some(result),
        }))
    }

    async fn change_membership(
        &self,
        request: Request<pb::ChangeMembershipRequest>,
    ) -> Result<Response<pb::ChangeMembershipReply>, Status> {
        use pb::change_membership_reply::Result as R;
        self.policy.admit(request.extensions()).await?.full()?;
        let change = MembershipChange::from_pb(request.into_inner())?;
        let result = match change_membership_local(&self.raft, &self.membership, &change).await {
            Ok(resp) => R::LogId(resp.log_id.into_pb()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                R::ForwardToLeader(f.into_pb())
            }
            Err(RaftError::APIError(e)) => R::Error(crate::membership::membership_refusal(&e)),
            Err(e) => R::Error(e.to_string()),
        };
        Ok(Response::new(pb::ChangeMembershipReply {
            result: Some(result),
        }))
    }

    async fn read_index(
        &self,
        request: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexReply>, Status> {
        use pb::read_index_reply::Result as R;
        self.policy.admit(request.extensions()).await?;
        let result = match self.raft.get_read_log_id().await {
            Ok((read, _applied)) => R::ReadIndex(pb::ReadIndex {
                read_log_id: read.into_pb(),
            }),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                R::ForwardToLeader(f.into_pb())
            }
            Err(e) => R::Error(e.to_string()),
        };
        Ok(Response::new(pb::ReadIndexReply {
            result: Some(result),
        }))
    }
}
