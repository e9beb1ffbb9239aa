//! The client side of the Raft transport: openraft's RPCs to other nodes over gRPC
//! (`ca_proto::raft`), on channels made by a caller-provided [`Connector`].
//!
//! The node decides how channels are made (mutually authenticated TLS with SPIFFE IDs
//! `spiffe://TD/ca-node/<id>` in production); [`PlaintextConnector`] is for tests and
//! development only. Channels are cached per node ([`Peers`]) and shared by openraft's
//! replication, the write forwarding of [`crate::RaftProposer`] and read barriers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ca_proto::raft as pb;
use ca_proto::raft::raft_service_client::RaftServiceClient;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::pb::{from_json, FromPb, IntoPb};
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// A boxed error, as a [`Connector`] reports it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest gRPC message of the Raft transport, both ways (snapshot chunks and batches of
/// entries stay well below it).
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Makes gRPC channels to other cluster members.
///
/// Called when a node is first contacted and again when its address changes; the channel is
/// then reused (tonic reconnects it as needed), so a lazy channel
/// ([`tonic::transport::Endpoint::connect_lazy`]) is the usual answer.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    /// A channel to node `id`, reachable at `node.addr`, whose identity is `node.node_id`.
    async fn connect(&self, id: NodeId, node: &NodeInfo) -> Result<Channel, BoxError>;
}

/// Plain HTTP/2 without TLS: for tests and development only.
#[derive(Clone, Debug)]
pub struct PlaintextConnector {
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
}

impl Default for PlaintextConnector {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
        }
    }
}

#[async_trait]
impl Connector for PlaintextConnector {
    async fn connect(&self, _id: NodeId, node: &NodeInfo) -> Result<Channel, BoxError> {
        Ok(
            tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr))?
                .connect_timeout(self.connect_timeout)
                .tcp_nodelay(true)
                .connect_lazy(),
        )
    }
}

/// Cached channels to the other members, made by a [`Connector`].
#[derive(Clone)]
pub struct Peers {
    connector: Arc<dyn Connector>,
    cache: Arc<Mutex<HashMap<NodeId, (String, Channel)>>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").finish_non_exhaustive()
    }
}

impl Peers {
    /// Peers reached through `connector`.
    pub fn new(connector: Arc<dyn Connector>) -> Self {
        Self {
            connector,
            cache: Arc::default(),
        }
    }

    /// A Raft service client for node `id`.
    pub async fn client(
        &self,
        id: NodeId,
        node: &NodeInfo,
    ) -> Result<RaftServiceClient<Channel>, BoxError> {
        let cached = {
            let cache = self.cache.lock().expect("peer cache lock");
            cache
                .get(&id)
                .filter(|(addr, _)| *addr == node.addr)
                .map(|(_, ch)| ch.clone())
        };
        let channel = match cached {
            Some(ch) => ch,
            None => {
                let ch = self.connector.connect(id, node).await?;
                self.cache
                    .lock()
                    .expect("peer cache lock")
                    .insert(id, (node.addr.clone(), ch.clone()));
                ch
            }
        };
        Ok(RaftServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE))
    }

    /// Drops the channel to `id` (the next call makes a new one).
    pub fn forget(&self, id: NodeId) {
        self.cache.lock().expect("peer cache lock").remove(&id);
    }
}

/// openraft's network factory over [`Peers`].
#[derive(Clone, Debug)]
pub struct Network {
    peers: Peers,
}

impl Network {
    /// A network over `peers`.
    pub fn new(peers: Peers) -> Self {
        Self { peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Connection {
        Connection {
            peers: self.peers.clone(),
            target,
            node: node.clone(),
            append_stream: None,
            streaming: true,
        }
    }
}

/// openraft's connection to one node.
///
/// AppendEntries (replication and heartbeats: openraft sends one at a time per follower)
/// go over one long-lived `AppendEntriesStream`, opened on first use and dropped on any
/// failure, timeout or cancelled call, so that a reply never answers the wrong request; the
/// next request opens a new one. A node without that RPC gets unary `AppendEntries` instead.
#[derive(Debug)]
pub struct Connection {
    peers: Peers,
    target: NodeId,
    node: NodeInfo,
    append_stream: Option<AppendStream>,
    /// False once the node answered `AppendEntriesStream` with `Unimplemented`.
    streaming: bool,
}

/// An open `AppendEntriesStream`: requests go in through `requests`, each answered in order
/// on `replies`.
#[derive(Debug)]
struct AppendStream {
    requests: mpsc::Sender<pb::AppendEntriesRequest>,
    replies: tonic::Streaming<pb::AppendEntriesReply>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

impl Connection {
    async fn client<E: std::error::Error>(&self) -> Result<RaftServiceClient<Channel>, RpcErr<E>> {
        self.peers
            .client(self.target, &self.node)
            .await
            .map_err(|e| {
                RPCError::Unreachable(Unreachable::from(openraft::AnyError::error(e.to_string())))
            })
    }

    fn status_err<E: std::error::Error>(&self, s: tonic::Status) -> RpcErr<E> {
        status_to_rpc_error(s)
    }

    fn remote<E: std::error::Error>(&self, e: RaftError<NodeId, E>) -> RpcErr<E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }
}

/// A transport failure as openraft classifies it: a node that cannot be reached is
/// `Unreachable` (openraft backs off), anything else a `Network` error (retried).
pub(crate) fn status_to_rpc_error<E: std::error::Error>(s: tonic::Status) -> RpcErr<E> {
    match s.code() {
        tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&s)),
        _ => RPCError::Network(NetworkError::new(&s)),
    }
}

fn request<T>(msg: T, option: &RPCOption) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(option.hard_ttl());
    req
}

fn bad_reply<E: std::error::Error>(s: tonic::Status) -> RpcErr<E> {
    RPCError::Network(NetworkError::new(&s))
}

impl Connection {
    /// One AppendEntries exchange: on the open stream; else on a new stream that `req` opens
    /// (sent with the stream's headers, so that opening costs no extra round trip: openraft
    /// also makes a `Connection` for a single heartbeat, to confirm leadership for a read);
    /// unary if the node does not have the RPC.
    async fn exchange_append(
        &mut self,
        req: pb::AppendEntriesRequest,
        option: &RPCOption,
    ) -> Result<pb::AppendEntriesReply, RpcErr> {
        // The stream is taken out for the exchange and put back only once its reply has been
        // read. If this future is dropped midway (openraft puts its own timeout around each
        // call), the stream is dropped with it, so a late reply can never be read as the
        // answer to a later request.
        let mut stream = match self.append_stream.take() {
            Some(stream) => {
                stream.requests.send(req).await.map_err(|_| closed())?;
                stream
            }
            None => match self.open_stream(&req).await? {
                Some(stream) => stream,
                None => {
                    let mut client = self.client().await?;
                    return Ok(client
                        .append_entries(request(req, option))
                        .await
                        .map_err(|s| self.status_err(s))?
                        .into_inner());
                }
            },
        };
        let reply = next_reply(&mut stream).await?;
        self.append_stream = Some(stream);
        Ok(reply)
    }

    /// A new `AppendEntriesStream` whose first request is `first`; `None` if the node does
    /// not have the RPC (or answered so before).
    async fn open_stream(
        &mut self,
        first: &pb::AppendEntriesRequest,
    ) -> Result<Option<AppendStream>, RpcErr> {
        if !self.streaming {
            return Ok(None);
        }
        let mut client = self.client().await?;
        let (requests, rx) = mpsc::channel(1);
        // A copy: the original goes unary if the node turns out not to have the RPC. A stream
        // is opened once per replication.
        requests.try_send(first.clone()).map_err(|_| closed())?;
        match client.append_entries_stream(ReceiverStream::new(rx)).await {
            Ok(replies) => Ok(Some(AppendStream {
                requests,
                replies: replies.into_inner(),
            })),
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                self.streaming = false;
                Ok(None)
            }
            Err(s) => Err(self.status_err(s)),
        }
    }
}

fn closed() -> RpcErr {
    bad_reply(tonic::Status::unavailable("AppendEntriesStream closed"))
}

/// The reply to the request just sent on `stream`.
async fn next_reply(stream: &mut AppendStream) -> Result<pb::AppendEntriesReply, RpcErr> {
    match stream.replies.message().await {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(bad_reply(tonic::Status::unavailable(
            "AppendEntriesStream ended by the node",
        ))),
        Err(s) => Err(status_to_rpc_error(s)),
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let ttl = option.hard_ttl();
        let exchanged = tokio::time::timeout(ttl, self.exchange_append(rpc.into_pb(), &option));
        let reply = match exchanged.await {
            Ok(reply) => reply,
            Err(_) => Err(bad_reply(tonic::Status::deadline_exceeded(format!(
                "no AppendEntries reply within {ttl:?}"
            )))),
        };
        let reply = reply?;
        match reply.result {
            Some(pb::append_entries_reply::Result::Error(e)) => {
                // The node ends the stream after such a reply.
                self.append_stream = None;
                let fatal: Fatal<NodeId> = from_json("remote error", &e).map_err(bad_reply)?;
                Err(self.remote(RaftError::Fatal(fatal)))
            }
            Some(r) => AppendEntriesResponse::from_pb(r).map_err(bad_reply),
            None => Err(bad_reply(tonic::Status::internal(
                "empty AppendEntries reply",
            ))),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let mut client = self.client().await?;
        let reply = client
            .install_snapshot(request(rpc.into_pb(), &option))
            .await
            .map_err(|s| self.status_err(s))?
            .into_inner();
        if !reply.error.is_empty() {
            let err: RaftError<NodeId, InstallSnapshotError> =
                from_json("remote error", &reply.error).map_err(bad_reply)?;
            return Err(self.remote(err));
        }
        InstallSnapshotResponse::from_pb(reply).map_err(bad_reply)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        let mut client = self.client().await?;
        let reply = client
            .vote(request(rpc.into_pb(), &option))
            .await
            .map_err(|s| self.status_err(s))?
            .into_inner();
        if !reply.error.is_empty() {
            let fatal: Fatal<NodeId> =
                from_json("remote error", &reply.error).map_err(bad_reply)?;
            return Err(self.remote(RaftError::Fatal(fatal)));
        }
        VoteResponse::from_pb(reply).map_err(bad_reply)
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // An unreachable node is retried every 200 ms.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ca_proto::raft::raft_service_server::{RaftService, RaftServiceServer};
    use futures::{Stream, StreamExt};
    use std::pin::Pin;
    use tonic::{Request, Response, Status, Streaming};

    /// Answers each streamed AppendEntries with a "higher vote" of the request's term + 100
    /// (so a reply tells which request it answers), after 500 ms when the term is 1.
    struct Echo;

    type Replies = Pin<Box<dyn Stream<Item = Result<pb::AppendEntriesReply, Status>> + Send>>;

    #[tonic::async_trait]
    impl RaftService for Echo {
        type AppendEntriesStreamStream = Replies;

        async fn append_entries_stream(
            &self,
            request: Request<Streaming<pb::AppendEntriesRequest>>,
        ) -> Result<Response<Replies>, Status> {
            let replies = request.into_inner().then(|req| async move {
                let term = req?.vote.map(|v| v.term).unwrap_or(0);
                if term == 1 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(pb::AppendEntriesReply {
                    result: Some(pb::append_entries_reply::Result::HigherVote(pb::Vote {
                        term: term + 100,
                        node_id: 9,
                        committed: false,
                    })),
                })
            });
            Ok(Response::new(Box::pin(replies)))
        }

        async fn append_entries(
            &self,
            _: Request<pb::AppendEntriesRequest>,
        ) -> Result<Response<pb::AppendEntriesReply>, Status> {
            Err(Status::unimplemented("streams only"))
        }

        async fn vote(
            &self,
            _: Request<pb::VoteRequest>,
        ) -> Result<Response<pb::VoteReply>, Status> {
            Err(Status::unimplemented(""))
        }

        async fn install_snapshot(
            &self,
            _: Request<pb::InstallSnapshotRequest>,
        ) -> Result<Response<pb::InstallSnapshotReply>, Status> {
            Err(Status::unimplemented(""))
        }

        async fn propose(
            &self,
            _: Request<pb::ProposeRequest>,
        ) -> Result<Response<pb::ProposeReply>, Status> {
            Err(Status::unimplemented(""))
        }

        async fn read_index(
            &self,
            _: Request<pb::ReadIndexRequest>,
        ) -> Result<Response<pb::ReadIndexReply>, Status> {
            Err(Status::unimplemented(""))
        }

        async fn change_membership(
            &self,
            _: Request<pb::ChangeMembershipRequest>,
        ) -> Result<Response<pb::ChangeMembershipReply>, Status> {
            Err(Status::unimplemented(""))
        }
    }

    fn heartbeat(term: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: openraft::Vote::new(term, 1),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        }
    }

    /// The term of the "higher vote" a reply carries.
    fn answered(r: Result<AppendEntriesResponse<NodeId>, RpcErr>) -> u64 {
        match r {
            Ok(AppendEntriesResponse::HigherVote(v)) => v.leader_id().term,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_call_dropped_midway_leaves_no_reply_for_the_next_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServiceServer::new(Echo))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut network = Network::new(Peers::new(Arc::new(PlaintextConnector::default())));
        let node = NodeInfo {
            addr: addr.to_string(),
            node_id: "n2".into(),
        };
        let mut conn = network.new_client(2, &node).await;
        let option = || RPCOption::new(Duration::from_secs(5));
        assert_eq!(
            answered(conn.append_entries(heartbeat(5), option()).await),
            105
        );
        // openraft puts its own timeout around each call: here it drops the call while the
        // request is out and its reply is not yet back.
        let slow = conn.append_entries(heartbeat(1), option());
        assert!(tokio::time::timeout(Duration::from_millis(100), slow)
            .await
            .is_err());
        // The next call gets its own answer, not the late one.
        assert_eq!(
            answered(conn.append_entries(heartbeat(7), option()).await),
            107
        );
        assert_eq!(
            answered(conn.append_entries(heartbeat(8), option()).await),
            108
        );
    }
}
