//! The server side of the Raft transport: [`RaftGrpc`] implements the generated
//! `RaftService` over a local [`Raft`]. The node mounts it on its own (TLS) server, e.g.
//! with [`crate::RaftNode::grpc_service`]; every call (and every message of a stream) is
//! checked against the node's [`PeerPolicy`] first, and every proposal too.

use std::pin::Pin;
use std::sync::Arc;

use ca_proto::raft as pb;
use ca_proto::raft::raft_service_server::{RaftService, RaftServiceServer};
use futures::{Stream, StreamExt};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::network::MAX_MESSAGE_SIZE;
use crate::node::{change_membership_local, MembershipChange, MembershipLock};
use crate::pb::{from_json, to_json, FromPb, IntoPb};
use crate::policy::PeerPolicy;
use crate::types::{NodeId, Raft, TypeConfig};
use ca_state::Command;

/// The Raft transport's server: hands each RPC to the local Raft.
#[derive(Clone)]
pub struct RaftGrpc {
    raft: Raft,
    membership: MembershipLock,
    stop: watch::Receiver<bool>,
    policy: Arc<dyn PeerPolicy>,
}

impl std::fmt::Debug for RaftGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftGrpc").finish_non_exhaustive()
    }
}

impl RaftGrpc {
    /// The service over `raft`. Its `AppendEntriesStream`s end once `stop` turns true (or
    /// its sender is dropped), so that a graceful shutdown of the server, which waits for
    /// open streams, is not held up by a leader's long-lived one. Callers and proposals
    /// are checked against `policy`.
    pub(crate) fn new(
        raft: Raft,
        membership: MembershipLock,
        stop: watch::Receiver<bool>,
        policy: Arc<dyn PeerPolicy>,
    ) -> Self {
        Self {
            raft,
            membership,
            stop,
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

/// Hands one AppendEntries to `raft`; a failure of the node itself is the reply's `error`.
pub(crate) async fn append_entries(
    raft: &Raft,
    request: pb::AppendEntriesRequest,
) -> Result<pb::AppendEntriesReply, Status> {
    let req = AppendEntriesRequest::<TypeConfig>::from_pb(request)?;
    Ok(match raft.append_entries(req).await {
        Ok(resp) => resp.into_pb(),
        Err(e) => pb::AppendEntriesReply {
            result: Some(pb::append_entries_reply::Result::Error(fatal_json(e))),
        },
    })
}

/// Whether the node ends the stream or link that carried `reply` after sending it: a reply
/// that reports this node failed or stopped, refuses a malformed request, or is empty.
pub(crate) fn ends_exchange(reply: &pb::AppendEntriesReply) -> bool {
    use pb::append_entries_reply::Result as R;
    matches!(reply.result, None | Some(R::Error(_) | R::Rejected(_)))
}

/// The replies of an `AppendEntriesStream`, one per request, in order.
type AppendEntriesReplies =
    Pin<Box<dyn Stream<Item = Result<pb::AppendEntriesReply, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesReply>, Status> {
        self.policy.admit(request.extensions()).await?.full()?;
        Ok(Response::new(
            append_entries(&self.raft, request.into_inner()).await?,
        ))
    }

    type AppendEntriesStreamStream = AppendEntriesReplies;

    /// Each request is handed to Raft only once the previous one is answered, so replies
    /// come back in the order of the requests. The stream ends after a request that does not
    /// decode (with its error), after a reply that reports this node failed or stopped, after
    /// a request from a caller the policy no longer admits, and when the server stops; the
    /// leader then opens a new one.
    async fn append_entries_stream(
        &self,
        request: Request<Streaming<pb::AppendEntriesRequest>>,
    ) -> Result<Response<Self::AppendEntriesStreamStream>, Status> {
        let caller = self.policy.admit(request.extensions()).await?.full()?;
        let open = Some((self.raft.clone(), request.into_inner()));
        let replies = futures::stream::unfold(open, move |open| {
            let caller = caller.clone();
            async move {
                let (raft, mut requests) = open?;
                let reply = match requests.next().await? {
                    Ok(req) => match caller.recheck() {
                        Ok(()) => append_entries(&raft, req).await,
                        Err(s) => Err(s),
                    },
                    Err(s) => Err(s),
                };
                let failed = reply.as_ref().map_or(true, ends_exchange);
                let next = if failed { None } else { Some((raft, requests)) };
                Some((reply, next))
            }
        });
        let mut stop = self.stop.clone();
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        Ok(Response::new(Box::pin(replies.take_until(stopped))))
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
            Err(RaftError::APIError(e)) => R::Error(crate::node::membership_refusal(&e)),
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
