//! The client side of the Raft transport: openraft's RPCs to other nodes, each a unary
//! gRPC call (`ca_proto::raft`) on a channel made by a caller-provided [`Connector`].
//!
//! The node decides how channels are made (mutually authenticated TLS with SPIFFE IDs
//! `spiffe://TD/ca-node/<id>` in production); [`PlaintextConnector`] is for tests and
//! development only. Channels are cached per node ([`Peers`]) and shared by openraft's
//! replication, the write forwarding of [`crate::RaftProposer`] and read barriers; HTTP/2
//! multiplexes them on one connection per peer.

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
use tonic::transport::Channel;

use crate::transport::pb::{from_json, FromPb, IntoPb};
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

    /// Drops every cached channel, so that the next calls connect anew (with the node's
    /// current certificate: a TLS connection keeps the one it was opened with).
    pub fn forget_all(&self) {
        self.cache.lock().expect("peer cache lock").clear();
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
        }
    }
}

/// openraft's connection to one node: each RPC a unary call on the node's cached channel
/// (openraft sends one AppendEntries at a time per follower).
#[derive(Debug)]
pub struct Connection {
    peers: Peers,
    target: NodeId,
    node: NodeInfo,
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

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let mut client = self.client().await?;
        let reply = client
            .append_entries(request(rpc.into_pb(), &option))
            .await
            .map_err(|s| self.status_err(s))?
            .into_inner();
        match reply.result {
            Some(pb::append_entries_reply::Result::Error(e)) => {
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
