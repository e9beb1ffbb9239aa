//! The client side of the Raft transport: openraft's RPCs to other nodes over gRPC
//! (`ca_proto::raft`), on channels made by a caller-provided [`Connector`], and
//! AppendEntries over replication links ([`crate::link`]) where the connector and the node
//! have them.
//!
//! The node decides how channels and links are made (mutually authenticated TLS with SPIFFE
//! IDs `spiffe://TD/ca-node/<id>` in production); [`PlaintextConnector`] is for tests and
//! development only, without links. Channels are cached per node ([`Peers`]) and shared by
//! openraft's replication, the write forwarding of [`crate::RaftProposer`] and read
//! barriers; idle links are kept per node in [`Peers`] too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

use crate::link::{self, BoxLink, Frame};
use crate::pb::{from_json, FromPb, IntoPb};
use crate::service::ends_exchange;
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

    /// A new replication link ([`crate::link`]) to node `id`, connected and authenticated
    /// the same way as [`Connector::connect`]'s channels; `Ok(None)` if this connector or
    /// that node does not have links (AppendEntries then go over gRPC). The default: none.
    async fn connect_link(&self, id: NodeId, node: &NodeInfo) -> Result<Option<BoxLink>, BoxError> {
        let _ = (id, node);
        Ok(None)
    }
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

/// Cached channels and idle replication links to the other members, made by a
/// [`Connector`].
#[derive(Clone)]
pub struct Peers {
    connector: Arc<dyn Connector>,
    cache: Arc<Mutex<HashMap<NodeId, (String, Channel)>>>,
    links: Arc<Mutex<HashMap<NodeId, LinkPool>>>,
}

/// Idle links to one node at one address.
#[derive(Default)]
struct LinkPool {
    addr: String,
    idle: Vec<BoxLink>,
    /// When the node (or the connector) last answered that it has no links.
    unsupported_since: Option<Instant>,
}

/// Idle links kept per node: one for replication, the rest for the heartbeats openraft
/// sends beside it to confirm leadership for linearizable reads.
const IDLE_LINKS_PER_NODE: usize = 4;

/// How long a node that answered it has no links is reached over gRPC before links are
/// tried again (it may have been upgraded in a rolling upgrade).
const LINK_RETRY_AFTER: Duration = Duration::from_secs(30);

/// A link checked out of [`Peers`] for one exchange.
struct CheckedOut {
    link: BoxLink,
    /// Taken from the idle ones rather than opened for this exchange: it may have been
    /// closed by the node meanwhile (e.g. by a restart).
    reused: bool,
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
            links: Arc::default(),
        }
    }

    /// A link to node `id`: an idle one, else a new one; `None` if the node or the
    /// connector has no links.
    async fn take_link(&self, id: NodeId, node: &NodeInfo) -> Result<Option<CheckedOut>, BoxError> {
        {
            let mut links = self.links.lock().expect("link pool lock");
            let pool = links.entry(id).or_default();
            if pool.addr != node.addr {
                *pool = LinkPool {
                    addr: node.addr.clone(),
                    ..LinkPool::default()
                };
            }
            if pool
                .unsupported_since
                .is_some_and(|since| since.elapsed() < LINK_RETRY_AFTER)
            {
                return Ok(None);
            }
            if let Some(link) = pool.idle.pop() {
                return Ok(Some(CheckedOut { link, reused: true }));
            }
        }
        self.open_link(id, node).await
    }

    /// A new link to node `id` (see [`Peers::take_link`]).
    async fn open_link(&self, id: NodeId, node: &NodeInfo) -> Result<Option<CheckedOut>, BoxError> {
        let link = self.connector.connect_link(id, node).await?;
        let mut links = self.links.lock().expect("link pool lock");
        let pool = links.entry(id).or_default();
        if pool.addr == node.addr {
            pool.unsupported_since = link.is_none().then(Instant::now);
        }
        Ok(link.map(|link| CheckedOut {
            link,
            reused: false,
        }))
    }

    /// Puts back a link whose last exchange was answered in full.
    fn put_link(&self, id: NodeId, node: &NodeInfo, link: BoxLink) {
        let mut links = self.links.lock().expect("link pool lock");
        if let Some(pool) = links.get_mut(&id) {
            if pool.addr == node.addr && pool.idle.len() < IDLE_LINKS_PER_NODE {
                pool.idle.push(link);
            }
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

    /// Drops the channel and the idle links to `id` (the next call makes new ones).
    pub fn forget(&self, id: NodeId) {
        self.cache.lock().expect("peer cache lock").remove(&id);
        self.links.lock().expect("link pool lock").remove(&id);
    }

    /// Drops every cached channel and idle link, so that the next calls connect anew (with
    /// the node's current certificate: a TLS connection keeps the one it was opened with).
    pub fn forget_all(&self) {
        self.cache.lock().expect("peer cache lock").clear();
        self.links.lock().expect("link pool lock").clear();
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
/// go over a replication link ([`crate::link`]) checked out of [`Peers`] for the exchange.
/// Where there are no links, they go over one long-lived `AppendEntriesStream`, opened on
/// first use. Either is dropped on any failure, timeout or cancelled call, so that a reply
/// never answers the wrong request; the next request opens a new one. A node without that
/// RPC gets unary `AppendEntries` instead.
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
            .map_err(unreachable)
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

/// A node that could not be connected to (openraft backs off).
fn unreachable<E: std::error::Error>(e: BoxError) -> RpcErr<E> {
    RPCError::Unreachable(Unreachable::from(openraft::AnyError::error(e.to_string())))
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
    /// One AppendEntries exchange: on a replication link if the node has them; else on the
    /// open stream; else on a new stream that `req` opens
    /// (sent with the stream's headers, so that opening costs no extra round trip: openraft
    /// also makes a `Connection` for a single heartbeat, to confirm leadership for a read);
    /// unary if the node does not have the RPC.
    async fn exchange_append(
        &mut self,
        req: pb::AppendEntriesRequest,
        option: &RPCOption,
    ) -> Result<pb::AppendEntriesReply, RpcErr> {
        if self.append_stream.is_none() {
            if let Some(reply) = self.exchange_on_link(&req).await? {
                return Ok(reply);
            }
        }
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

    /// One exchange on a replication link; `None` if the node (or the connector) has none.
    /// A link that was idle and turns out closed is replaced by a new one, once: the node
    /// may have restarted since. AppendEntries is idempotent, so sending it again is safe.
    async fn exchange_on_link(
        &mut self,
        req: &pb::AppendEntriesRequest,
    ) -> Result<Option<pb::AppendEntriesReply>, RpcErr> {
        let Some(mut out) = self
            .peers
            .take_link(self.target, &self.node)
            .await
            .map_err(unreachable)?
        else {
            return Ok(None);
        };
        loop {
            match link_exchange(&mut out.link, req).await {
                Ok(reply) => {
                    // Only a link in a known state goes back: after a reply that ends it
                    // (error, rejected), the node closes its end.
                    if !ends_exchange(&reply) {
                        self.peers.put_link(self.target, &self.node, out.link);
                    }
                    return Ok(Some(reply));
                }
                Err(e) if out.reused => {
                    tracing::debug!(target = self.target, error = %e, "idle replication link was closed; opening a new one");
                    match self
                        .peers
                        .open_link(self.target, &self.node)
                        .await
                        .map_err(unreachable)?
                    {
                        Some(fresh) => out = fresh,
                        None => return Ok(None),
                    }
                }
                Err(e) => {
                    return Err(bad_reply(tonic::Status::unavailable(format!(
                        "replication link to node {}: {e}",
                        self.target
                    ))))
                }
            }
        }
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

/// Sends `req` on `link` and reads its reply.
async fn link_exchange(
    link: &mut BoxLink,
    req: &pb::AppendEntriesRequest,
) -> std::io::Result<pb::AppendEntriesReply> {
    link::write_frame(link, req).await?;
    match link::read_frame(link).await? {
        Frame::Message(reply) => Ok(reply),
        Frame::Closed => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed by the node",
        )),
        Frame::Malformed(why) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unreadable reply: {why}"),
        )),
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
            Some(pb::append_entries_reply::Result::Rejected(why)) => Err(bad_reply(
                tonic::Status::invalid_argument(format!("node {} refused: {why}", self.target)),
            )),
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
