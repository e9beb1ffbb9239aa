//! One cluster member: a running openraft instance over this crate's stores and network,
//! and the operations the node needs from it — writes with forwarding to the leader,
//! linearizable read barriers, cluster membership, status.

pub mod batcher;
pub mod proposer;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ca_proto::raft as pb;
use openraft::error::{
    CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError, RaftError,
};
use openraft::{ServerState, SnapshotPolicy};
use tokio::time::Instant;

use crate::membership::{
    change_membership_local, membership_refusal, MembershipChange, MembershipLock,
};
use crate::node::batcher::WriteBatcher;
use crate::store::log_store::LogStore;
use crate::store::state_machine::StateMachine;
use crate::transport::network::{Connector, Network, Peers};
use crate::transport::pb::{forward_from_pb, from_json, to_json, FromPb, IntoPb};
use crate::transport::service::RaftGrpc;
use crate::types::{LogId, NodeId, NodeInfo, Raft, RaftMetrics};
use crate::{Error, Result};
use ca_state::{Command, Response};

/// File name of the Raft log database, beside the state database.
pub const LOG_DB_FILE: &str = "raft-log.db";
/// File name of the state database.
pub const STATE_DB_FILE: &str = "state.db";

/// openraft settings suited to a LAN cluster of 3 or 5 nodes with fsync'ed SQLite stores:
/// heartbeat 100 ms, election timeout 400–700 ms (openraft 0.9 starts an election after
/// the leader's lease, the maximum, plus the random timeout: 1.1–1.4 s), a snapshot every
/// 10 000 entries keeping 1 000
/// entries of log behind it, snapshots sent in 1 MiB chunks.
pub fn recommended_config(cluster_name: &str) -> openraft::Config {
    openraft::Config {
        cluster_name: cluster_name.to_owned(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 700,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(10_000),
        max_in_snapshot_log_to_keep: 1_000,
        snapshot_max_chunk_size: 1024 * 1024,
        purge_batch_size: 256,
        max_payload_entries: 300,
        ..Default::default()
    }
}

/// How long one forwarded write may wait for the leader's answer before the current leader
/// is looked up again (a forwarded write that outlives it is retried, see [`RaftNode::write`]).
pub const FORWARD_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);

/// How a node runs its Raft.
#[derive(Clone, Debug)]
pub struct RaftNodeConfig {
    /// This node's Raft ID.
    pub id: NodeId,
    /// This node as members see it (its Raft address and ca-node ID).
    pub node: NodeInfo,
    /// openraft's settings (validated at start); see [`recommended_config`].
    pub raft: openraft::Config,
    /// How long a write or a read barrier may wait for a leader and a quorum before it fails
    /// with [`Error::Unavailable`].
    pub timeout: Duration,
}

impl RaftNodeConfig {
    /// Settings for node `id` at `node`, with [`recommended_config`] and a 10 s timeout.
    pub fn new(id: NodeId, node: NodeInfo) -> Self {
        Self {
            id,
            node,
            raft: recommended_config("ca"),
            timeout: Duration::from_secs(10),
        }
    }
}

/// A role in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Accepts writes and replicates them.
    Leader,
    /// A voter following a leader.
    Follower,
    /// A voter asking for votes.
    Candidate,
    /// Receives the log but does not vote.
    Learner,
    /// Stopped.
    Shutdown,
}

impl Role {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        }
    }
}

/// How far one member's log is replicated (known on the leader only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replication {
    /// The last log ID known to match the leader's.
    pub matched: Option<LogId>,
    /// Entries the member is behind the leader's last log entry.
    pub lag: u64,
}

/// A member of the cluster configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its address and ca-node ID.
    pub node: NodeInfo,
    /// Whether it votes (else it is a learner).
    pub voter: bool,
}

/// What a node knows of the cluster.
#[derive(Clone, Debug)]
pub struct ClusterStatus {
    /// This node's ID.
    pub id: NodeId,
    /// This node's role.
    pub role: Role,
    /// The leader, if known.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Index of the last entry in this node's log.
    pub last_log_index: Option<u64>,
    /// Last entry applied to this node's state machine.
    pub last_applied: Option<LogId>,
    /// Last entry covered by this node's current snapshot.
    pub snapshot: Option<LogId>,
    /// Last entry purged from this node's log.
    pub purged: Option<LogId>,
    /// The membership: every member by ID.
    pub members: BTreeMap<NodeId, Member>,
    /// Whether the membership is a joint configuration (a change in progress).
    pub joint: bool,
    /// Per member replication (leader only; empty elsewhere).
    pub replication: BTreeMap<NodeId, Replication>,
    /// Milliseconds since a quorum last acknowledged this leader (leader only).
    pub millis_since_quorum_ack: Option<u64>,
    /// Why this node's Raft stopped for good, if it did (a storage error: the log or the
    /// state could not be written).
    pub fatal: Option<String>,
}

/// A running cluster member. Cloning is cheap (clones share the instance).
#[derive(Clone)]
pub struct RaftNode {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    node: NodeInfo,
    raft: Raft,
    sm: StateMachine,
    peers: Peers,
    timeout: Duration,
    batcher: WriteBatcher,
    membership: MembershipLock,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.inner.id)
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

/// Why a forwarded call failed.
enum ForwardError {
    /// It may not have reached the leader: worth retrying.
    Transport(String),
    /// The leader refused it.
    Refused(String),
}

/// What the leader (or a node that knows it) answered to a forwarded call.
enum Forwarded<T> {
    Done(T),
    /// Not the leader; maybe who is.
    NotLeader(Option<(NodeId, NodeInfo)>),
}

impl RaftNode {
    /// Starts Raft over `log` and `sm`, reaching other members through `connector`. The
    /// node serves nothing by itself: mount [`RaftNode::grpc_service`] on the node's server.
    pub async fn start(
        config: RaftNodeConfig,
        log: LogStore,
        sm: StateMachine,
        connector: Arc<dyn Connector>,
    ) -> Result<Self> {
        let raft_config = config
            .raft
            .validate()
            .map_err(|e| Error::Cluster(format!("raft configuration: {e}")))?;
        let peers = Peers::new(connector);
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            Network::new(peers.clone()),
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| Error::Cluster(format!("starting raft: {e}")))?;
        let inner = Arc::new_cyclic(|me: &Weak<Inner>| {
            // The batching task holds the node weakly: it ends with the node.
            let me = me.clone();
            let batcher = WriteBatcher::start(move |cmd| {
                let me = me.upgrade();
                async move {
                    match me {
                        Some(inner) => RaftNode { inner }.write_one(cmd).await,
                        None => Err(Error::Unavailable("the node is shutting down".into())),
                    }
                }
            });
            Inner {
                id: config.id,
                node: config.node,
                raft,
                sm,
                peers,
                timeout: config.timeout,
                batcher,
                membership: MembershipLock::default(),
            }
        });
        Ok(Self { inner })
    }

    /// This node's Raft ID.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The openraft instance, for what this type does not wrap.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The local state machine (reads; it is written only through the log).
    pub fn state_machine(&self) -> &StateMachine {
        &self.inner.sm
    }

    /// The Raft transport's gRPC service over this node, to mount on the node's server;
    /// `policy` says who may call and propose (see [`RaftGrpc::new`]).
    pub fn grpc_service(
        &self,
        policy: Arc<dyn crate::transport::policy::PeerPolicy>,
    ) -> ca_proto::raft::raft_service_server::RaftServiceServer<RaftGrpc> {
        RaftGrpc::new(
            self.inner.raft.clone(),
            self.inner.membership.clone(),
            policy,
        )
        .into_server()
    }

    /// Makes later calls to other members open new connections (see
    /// [`crate::transport::network::Peers::forget_all`]); calls under way finish on theirs.
    pub fn reconnect(&self) {
        self.inner.peers.forget_all();
    }

    /// Stops Raft. The stores stay as they are; start again to rejoin.
    pub async fn shutdown(&self) -> Result<()> {
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| Error::Cluster(format!("raft shutdown: {e}")))
    }

    // ---- writes ----

    /// Appends `cmd` to the replicated log and returns the state machine's response once it
    /// is committed and applied here or on the leader. On a follower the command is
    /// forwarded to the leader; while a leader is being elected it retries, and fails with
    /// [`Error::Unavailable`] when there is no leader with a quorum within the timeout.
    ///
    /// After a timeout the outcome is unknown: the command may still be applied later.
    ///
    /// [`Command::batchable`] writes that arrive together share one log entry (see
    /// [`crate::node::batcher`]); each caller gets its own command's answer.
    pub async fn write(&self, cmd: Command) -> Result<Response> {
        if cmd.batchable() {
            self.inner.batcher.write(cmd).await
        } else {
            self.write_one(cmd).await
        }
    }

    /// [`RaftNode::write`] of one command (a single write or a batch) as one log entry.
    async fn write_one(&self, cmd: Command) -> Result<Response> {
        let deadline = Instant::now() + self.inner.timeout;
        let mut last_err = String::from("no leader");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Unavailable(format!(
                    "no leader with a quorum within {:?}: {last_err}",
                    self.inner.timeout
                )));
            }
            let res =
                tokio::time::timeout(remaining, self.inner.raft.client_write(cmd.clone())).await;
            let leader = match res {
                Err(_) => continue, // timed out: the loop head reports it
                Ok(Ok(resp)) => return Ok(resp.data),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => leader_of(f),
                Ok(Err(RaftError::APIError(e @ ClientWriteError::ChangeMembershipError(_)))) => {
                    return Err(Error::Cluster(e.to_string()))
                }
                Ok(Err(RaftError::Fatal(f))) => return Err(unavailable(f)),
            };
            if let Some((id, node)) = leader.filter(|(id, _)| *id != self.inner.id) {
                match self.forward_write(id, &node, &cmd, deadline).await {
                    Ok(Forwarded::Done(r)) => return Ok(r),
                    Ok(Forwarded::NotLeader(hint)) => last_err = not_leader(id, hint),
                    Err(e) => last_err = e,
                }
            }
            tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
        }
    }

    async fn forward_write(
        &self,
        id: NodeId,
        node: &NodeInfo,
        cmd: &Command,
        deadline: Instant,
    ) -> std::result::Result<Forwarded<Response>, String> {
        use pb::propose_reply::Result as R;
        let mut client = self
            .inner
            .peers
            .client(id, node)
            .await
            .map_err(|e| format!("connecting to leader {id} at {}: {e}", node.addr))?;
        let mut req = tonic::Request::new(pb::ProposeRequest {
            command: to_json(cmd),
        });
        // One attempt may not use the whole deadline: a leader that is paused or cut off
        // would hold the write until then even after another was elected. On a timeout the
        // loop asks the local Raft for the current leader and tries again. (The command may
        // still be applied by the old leader; so it may after any timeout — see `write`.)
        req.set_timeout(
            deadline
                .saturating_duration_since(Instant::now())
                .min(FORWARD_ATTEMPT_TIMEOUT),
        );
        let reply = client
            .propose(req)
            .await
            .map_err(|s| format!("forwarding to leader {id} at {}: {s}", node.addr))?
            .into_inner();
        match reply.result {
            Some(R::Response(b)) => from_json::<Response>("response", &b)
                .map(Forwarded::Done)
                .map_err(|s| s.message().to_owned()),
            Some(R::ForwardToLeader(f)) => Ok(Forwarded::NotLeader(forward_from_pb(f))),
            Some(R::Error(e)) => Err(format!("leader {id}: {e}")),
            None => Err(format!("leader {id}: empty reply")),
        }
    }

    // ---- reads ----

    /// A read barrier: returns once this node's state machine has applied every entry
    /// committed before the call, so reads from [`RaftNode::state_machine`] that follow
    /// are linearizable. The leader confirms its leadership with a quorum; a follower asks
    /// the leader for its read index and waits to apply up to it. Fails with
    /// [`Error::Unavailable`] when that is not possible within the timeout.
    pub async fn ensure_linearizable(&self) -> Result<Option<LogId>> {
        let deadline = Instant::now() + self.inner.timeout;
        let mut last_err = String::from("no leader");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Unavailable(format!(
                    "cannot confirm the leader's read index within {:?}: {last_err}",
                    self.inner.timeout
                )));
            }
            let res = tokio::time::timeout(remaining, self.inner.raft.get_read_log_id()).await;
            match res {
                Err(_) => continue,
                Ok(Ok((read, _))) => {
                    self.wait_applied(read, deadline).await?;
                    return Ok(read);
                }
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                    if let Some((id, node)) = leader_of(f).filter(|(id, _)| *id != self.inner.id) {
                        match self.forward_read_index(id, &node, deadline).await {
                            Ok(Forwarded::Done(read)) => {
                                self.wait_applied(read, deadline).await?;
                                return Ok(read);
                            }
                            Ok(Forwarded::NotLeader(hint)) => last_err = not_leader(id, hint),
                            Err(e) => last_err = e,
                        }
                    }
                }
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
                    last_err = q.to_string()
                }
                Ok(Err(RaftError::Fatal(f))) => return Err(unavailable(f)),
            }
            tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
        }
    }

    async fn wait_applied(&self, read: Option<LogId>, deadline: Instant) -> Result<()> {
        let Some(read) = read else { return Ok(()) };
        if self.inner.sm.last_applied() >= read.index {
            return Ok(());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut rx = self.inner.sm.subscribe();
        tokio::time::timeout(remaining, rx.wait_for(|applied| *applied >= read.index))
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "this node did not apply up to the read index {} in time",
                    read.index
                ))
            })?
            .map_err(|_| Error::Unavailable("state machine closed".into()))?;
        Ok(())
    }

    async fn forward_read_index(
        &self,
        id: NodeId,
        node: &NodeInfo,
        deadline: Instant,
    ) -> std::result::Result<Forwarded<Option<LogId>>, String> {
        use pb::read_index_reply::Result as R;
        let mut client = self
            .inner
            .peers
            .client(id, node)
            .await
            .map_err(|e| format!("connecting to leader {id} at {}: {e}", node.addr))?;
        let mut req = tonic::Request::new(pb::ReadIndexRequest {});
        req.set_timeout(deadline.saturating_duration_since(Instant::now()));
        let reply = client
            .read_index(req)
            .await
            .map_err(|s| format!("asking leader {id} at {}: {s}", node.addr))?
            .into_inner();
        match reply.result {
            Some(R::ReadIndex(r)) => Option::<LogId>::from_pb(r.read_log_id)
                .map(Forwarded::Done)
                .map_err(|s| s.message().to_owned()),
            Some(R::ForwardToLeader(f)) => Ok(Forwarded::NotLeader(forward_from_pb(f))),
            Some(R::Error(e)) => Err(format!("leader {id}: {e}")),
            None => Err(format!("leader {id}: empty reply")),
        }
    }

    // ---- cluster ----

    /// Makes this node a single-voter cluster (`ca-node init`). Refused if the node already
    /// has a log or a vote (it was initialized, or joined a cluster).
    pub async fn initialize(&self) -> Result<()> {
        let members = BTreeMap::from([(self.inner.id, self.inner.node.clone())]);
        match self.inner.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => Err(Error::Cluster(
                format!("this node is already initialized or part of a cluster: {e}"),
            )),
            Err(RaftError::APIError(e)) => Err(Error::Cluster(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(unavailable(f)),
        }
    }

    /// Whether this node has joined a cluster (its log or vote is not empty).
    pub async fn is_initialized(&self) -> Result<bool> {
        self.inner.raft.is_initialized().await.map_err(unavailable)
    }

    /// Adds node `id` at `node` as a learner (it receives the log but does not vote). With
    /// `wait`, returns once it has caught up with the leader. Forwarded to the leader.
    pub async fn add_learner(&self, id: NodeId, node: NodeInfo, wait: bool) -> Result<LogId> {
        self.change(MembershipChange::AddLearner { id, node, wait })
            .await
    }

    /// Makes learner `id` a voter (`ca-node cluster promote`). Forwarded to the leader.
    pub async fn promote(&self, id: NodeId) -> Result<LogId> {
        self.change(MembershipChange::Promote(id)).await
    }

    /// Removes node `id` from the cluster, voter or learner (`ca-node cluster remove`).
    /// Forwarded to the leader.
    pub async fn remove(&self, id: NodeId) -> Result<LogId> {
        self.change(MembershipChange::Remove(id)).await
    }

    /// Runs a membership change here if this node leads, else on the leader.
    async fn change(&self, change: MembershipChange) -> Result<LogId> {
        let deadline = Instant::now() + self.inner.timeout;
        let mut last_err = String::from("no leader");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Unavailable(format!(
                    "no leader to change the membership within {:?}: {last_err}",
                    self.inner.timeout
                )));
            }
            let leader =
                match change_membership_local(&self.inner.raft, &self.inner.membership, &change)
                    .await
                {
                    Ok(resp) => return Ok(resp.log_id),
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => leader_of(f),
                    Err(RaftError::APIError(e)) => {
                        return Err(Error::Cluster(membership_refusal(&e)))
                    }
                    Err(RaftError::Fatal(f)) => return Err(unavailable(f)),
                };
            if let Some((id, node)) = leader.filter(|(id, _)| *id != self.inner.id) {
                match self.forward_change(id, &node, &change, deadline).await {
                    Ok(Forwarded::Done(log_id)) => return Ok(log_id),
                    Ok(Forwarded::NotLeader(hint)) => last_err = not_leader(id, hint),
                    Err(ForwardError::Refused(e)) => return Err(Error::Cluster(e)),
                    Err(ForwardError::Transport(e)) => last_err = e,
                }
            }
            tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
        }
    }

    async fn forward_change(
        &self,
        id: NodeId,
        node: &NodeInfo,
        change: &MembershipChange,
        deadline: Instant,
    ) -> std::result::Result<Forwarded<LogId>, ForwardError> {
        use pb::change_membership_reply::Result as R;
        let mut client = self.inner.peers.client(id, node).await.map_err(|e| {
            ForwardError::Transport(format!("connecting to leader {id} at {}: {e}", node.addr))
        })?;
        let mut req = tonic::Request::new(change.clone().into_pb());
        req.set_timeout(deadline.saturating_duration_since(Instant::now()));
        let reply = client
            .change_membership(req)
            .await
            .map_err(|s| {
                ForwardError::Transport(format!("forwarding to leader {id} at {}: {s}", node.addr))
            })?
            .into_inner();
        match reply.result {
            Some(R::LogId(l)) => Option::<LogId>::from_pb(Some(l))
                .map_err(|s| ForwardError::Transport(s.message().to_owned()))?
                .map(Forwarded::Done)
                .ok_or_else(|| ForwardError::Transport("empty log id".into())),
            Some(R::ForwardToLeader(f)) => Ok(Forwarded::NotLeader(forward_from_pb(f))),
            Some(R::Error(e)) => Err(ForwardError::Refused(format!("leader {id}: {e}"))),
            None => Err(ForwardError::Transport(format!("leader {id}: empty reply"))),
        }
    }

    /// Replaces the voter set with `voters` (each must be a member already); with `retain`,
    /// removed voters stay as learners. Leader only.
    pub async fn change_voters(&self, voters: BTreeSet<NodeId>, retain: bool) -> Result<LogId> {
        let r = self.inner.raft.change_membership(voters, retain).await;
        membership_result(r)
    }

    /// Asks for a snapshot now (e.g. before maintenance).
    pub async fn trigger_snapshot(&self) -> Result<()> {
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(unavailable)
    }

    /// Builds a snapshot of everything applied so far and purges the log up to it, waiting
    /// (at most `timeout`) until both are done. From then on a member that lacks those
    /// entries is sent the snapshot: for state that no log entry holds (a restored backup).
    pub async fn snapshot_and_purge(&self, timeout: std::time::Duration) -> Result<LogId> {
        let mut metrics = self.metrics();
        let stopped = |_| Error::Unavailable("the Raft node stopped".into());
        let wait = async {
            let applied = metrics
                .wait_for(|m| m.last_applied.is_some())
                .await
                .map_err(stopped)?
                .last_applied
                .ok_or_else(|| Error::Unavailable("nothing applied yet".into()))?;
            self.trigger_snapshot().await?;
            metrics
                .wait_for(|m| m.snapshot.is_some_and(|s| s.index >= applied.index))
                .await
                .map_err(stopped)?;
            let upto = metrics.borrow().snapshot.map_or(applied.index, |s| s.index);
            self.inner
                .raft
                .trigger()
                .purge_log(upto)
                .await
                .map_err(unavailable)?;
            metrics
                .wait_for(|m| m.purged.is_some_and(|p| p.index >= upto))
                .await
                .map_err(stopped)?;
            Ok::<_, Error>(applied)
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            Error::Unavailable(format!("no snapshot and log purge within {timeout:?}"))
        })?
    }

    /// openraft's metrics of this node (a watch: `changed()` to follow them).
    pub fn metrics(&self) -> tokio::sync::watch::Receiver<RaftMetrics> {
        self.inner.raft.metrics()
    }

    /// This node's view of the cluster (`ca-node cluster status`).
    pub fn status(&self) -> ClusterStatus {
        let m = self.inner.raft.metrics().borrow().clone();
        status_from_metrics(&m)
    }
}

fn not_leader(id: NodeId, hint: Option<(NodeId, NodeInfo)>) -> String {
    match hint {
        Some((l, n)) => format!("node {id} is no longer leader; node {l} at {} is", n.addr),
        None => format!("node {id} is no longer leader"),
    }
}

fn leader_of(f: ForwardToLeader<NodeId, NodeInfo>) -> Option<(NodeId, NodeInfo)> {
    Some((f.leader_id?, f.leader_node?))
}

fn membership_result(
    r: std::result::Result<
        openraft::raft::ClientWriteResponse<crate::types::TypeConfig>,
        RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>,
    >,
) -> Result<LogId> {
    match r {
        Ok(resp) => Ok(resp.log_id),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(Error::NotLeader {
            leader_id: f.leader_id,
            leader_addr: f.leader_node.map(|n| n.addr),
        }),
        Err(RaftError::APIError(e)) => Err(Error::Cluster(membership_refusal(&e))),
        Err(RaftError::Fatal(f)) => Err(unavailable(f)),
    }
}

/// A [`ClusterStatus`] from openraft's metrics.
pub fn status_from_metrics(m: &RaftMetrics) -> ClusterStatus {
    let role = if m.running_state.is_err() {
        Role::Shutdown
    } else {
        match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        }
    };
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, n)| {
            (
                *id,
                Member {
                    node: n.clone(),
                    voter: voters.contains(id),
                },
            )
        })
        .collect();
    let last = m.last_log_index.unwrap_or(0);
    let replication = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .map(|(id, matched)| {
                    let at = matched.map(|l| l.index).unwrap_or(0);
                    (
                        *id,
                        Replication {
                            matched: *matched,
                            lag: last.saturating_sub(at),
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    ClusterStatus {
        id: m.id,
        role,
        leader: m.current_leader,
        term: m.current_term,
        last_log_index: m.last_log_index,
        last_applied: m.last_applied,
        snapshot: m.snapshot,
        purged: m.purged,
        members,
        joint: membership.get_joint_config().len() > 1,
        replication,
        millis_since_quorum_ack: m.millis_since_quorum_ack,
        fatal: m.running_state.as_ref().err().map(ToString::to_string),
    }
}
