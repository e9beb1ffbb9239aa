//! Three Raft nodes in one process, each with its own SQLite stores and a real tonic server
//! on 127.0.0.1 (plaintext: TLS is the node's business): election, writes forwarded from
//! followers, leader loss, catch-up by snapshot, and a join token used exactly once under
//! concurrent attestation through every node.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ca_raft::*;
use ca_state::{
    AgentRecord, Command, EntryRecord, JoinTokenRecord, RejectCode, Response, SelectorRecord,
};
use openraft::SnapshotPolicy;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// One member: its Raft, its server, its folder.
struct TestNode {
    id: NodeId,
    addr: SocketAddr,
    dir: PathBuf,
    node: RaftNode,
    proposer: RaftProposer,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
    /// The gRPC paths its server was called on, in order.
    calls: Calls,
}

type Calls = Arc<Mutex<Vec<String>>>;

/// Records the path of every call to the server it wraps.
#[derive(Clone)]
struct Gate<S> {
    inner: S,
    calls: Calls,
}

type HttpReq = http::Request<tonic::body::Body>;
type HttpResp = http::Response<tonic::body::Body>;

impl<S> tower::Service<HttpReq> for Gate<S>
where
    S: tower::Service<HttpReq, Response = HttpResp> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = HttpResp;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<HttpResp, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpReq) -> Self::Future {
        self.calls.lock().unwrap().push(req.uri().path().to_owned());
        Box::pin(self.inner.call(req))
    }
}

/// How many calls `n`'s server got on RaftService method `method`.
fn calls_to(n: &TestNode, method: &str) -> usize {
    let path = format!("/spiffeca.raft.v1.RaftService/{method}");
    n.calls
        .lock()
        .unwrap()
        .iter()
        .filter(|p| **p == path)
        .count()
}

fn raft_config(snapshot_every: u64) -> openraft::Config {
    let mut c = node::recommended_config("test");
    c.heartbeat_interval = 100;
    c.election_timeout_min = 500;
    c.election_timeout_max = 1000;
    c.snapshot_policy = SnapshotPolicy::LogsSinceLast(snapshot_every);
    c.max_in_snapshot_log_to_keep = 0;
    c.purge_batch_size = 1;
    c
}

impl TestNode {
    /// Starts node `id` over the stores in `dir`, serving on `addr` (port 0: any).
    async fn start(id: NodeId, dir: &Path, addr: SocketAddr, config: openraft::Config) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let sm = StateMachine::open(&dir.join(STATE_DB_FILE)).await.unwrap();
        let log = LogStore::open(&dir.join(LOG_DB_FILE)).await.unwrap();
        let mut cfg = RaftNodeConfig::new(
            id,
            NodeInfo {
                addr: addr.to_string(),
                node_id: format!("ca-{id}"),
            },
        );
        cfg.raft = config;
        cfg.timeout = Duration::from_secs(15);
        let connector = PlaintextConnector::default();
        let node = RaftNode::start(cfg, log, sm, Arc::new(connector))
            .await
            .unwrap();
        let (stop, mut stopped) = watch::channel(false);
        let svc = node.grpc_service(Arc::new(Plaintext));
        let calls = Calls::default();
        let gate = {
            let calls = calls.clone();
            tower::layer::layer_fn(move |inner| Gate {
                inner,
                calls: calls.clone(),
            })
        };
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .layer(gate)
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    },
                )
                .await
                .unwrap();
        });
        Self {
            id,
            addr,
            dir: dir.to_owned(),
            proposer: RaftProposer::new(node.clone()),
            node,
            stop,
            server: Some(server),
            calls,
        }
    }

    fn info(&self) -> NodeInfo {
        NodeInfo {
            addr: self.addr.to_string(),
            node_id: format!("ca-{}", self.id),
        }
    }

    /// Stops Raft and the server (the stores stay).
    async fn stop(&mut self) {
        self.node.shutdown().await.unwrap();
        self.stop_server().await;
    }

    /// Stops the servers only (Raft runs on).
    async fn stop_server(&mut self) {
        let _ = self.stop.send(true);
        if let Some(h) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(5), h)
                .await
                .unwrap_or_else(|_| panic!("node {}'s server did not stop", self.id))
                .unwrap();
        }
    }

    fn sm(&self) -> &StateMachine {
        self.node.state_machine()
    }
}

/// These tests run the transport on plain TCP between nodes of one process: every caller
/// is a member and may propose anything (the node's own policy is tested in ca-node).
struct Plaintext;

#[async_trait::async_trait]
impl ca_raft::PeerPolicy for Plaintext {
    async fn admit(&self, _: &tonic::Extensions) -> Result<ca_raft::Admitted, tonic::Status> {
        Ok(ca_raft::Admitted::new("peer".into()))
    }
    async fn check_proposal(
        &self,
        _: &ca_raft::Admitted,
        _: &ca_state::Command,
    ) -> Result<(), String> {
        Ok(())
    }
}

/// Three nodes, node 1 initialized and 2 and 3 added and promoted.
async fn cluster(root: &Path, config: openraft::Config) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let dir = root.join(format!("n{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let addr = "127.0.0.1:0".parse().unwrap();
        nodes.push(TestNode::start(id, &dir, addr, config.clone()).await);
    }
    let n1 = &nodes[0].node;
    n1.initialize().await.unwrap();
    n1.raft()
        .wait(Some(WAIT))
        .current_leader(1, "node 1 leads its one-node cluster")
        .await
        .unwrap();
    assert!(
        matches!(n1.initialize().await, Err(Error::Cluster(_))),
        "a second init is refused"
    );
    // Membership changes run on the leader, or are forwarded to it (here from learners).
    n1.add_learner(2, nodes[1].info(), true).await.unwrap();
    nodes[1]
        .node
        .add_learner(3, nodes[2].info(), true)
        .await
        .unwrap();
    nodes[2].node.promote(2).await.unwrap();
    n1.promote(3).await.unwrap();
    // A refused change says what is wrong in words, on the leader and forwarded to it.
    for e in [
        n1.promote(99).await.unwrap_err(),
        nodes[2].node.promote(99).await.unwrap_err(),
    ] {
        let text = e.to_string();
        assert!(text.contains("raft id 99 is not a learner"), "{text}");
        assert!(!text.contains("LogId"), "{text}");
    }
    let st = n1.status();
    assert_eq!(st.role, Role::Leader);
    assert_eq!(
        st.members
            .iter()
            .filter(|(_, m)| m.voter)
            .map(|(id, _)| *id)
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 2, 3])
    );
    nodes
}

/// Waits until every running node knows the same leader, and returns it.
async fn leader(nodes: &[&TestNode]) -> NodeId {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let leaders: BTreeSet<Option<NodeId>> =
            nodes.iter().map(|n| n.node.status().leader).collect();
        if leaders.len() == 1 {
            if let Some(Some(l)) = leaders.into_iter().next() {
                if nodes.iter().any(|n| n.id == l) {
                    return l;
                }
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no agreed leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `n` has applied at least `index`.
async fn applied(n: &TestNode, index: u64) {
    n.node
        .raft()
        .wait(Some(WAIT))
        .applied_index_at_least(Some(index), "catch up")
        .await
        .unwrap_or_else(|e| panic!("node {} did not apply {index}: {e}", n.id));
}

fn entry(id: &str) -> EntryRecord {
    EntryRecord {
        id: id.into(),
        spiffe_id: format!("spiffe://td/service/{id}"),
        parent_id: "spiffe://td/agent/a".into(),
        selectors: vec![SelectorRecord {
            kind: "unix".into(),
            value: "uid:1001".into(),
        }],
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        dns_names: vec![],
        admin: false,
        hint: String::new(),
        created_at: 1,
        revision: 0,
    }
}

fn agent(id: &str) -> AgentRecord {
    AgentRecord {
        spiffe_id: id.into(),
        attestation_type: "join_token".into(),
        x509_svid_serial: "01".into(),
        x509_svid_expires_at: 100,
        previous_x509_svid_serial: String::new(),
        banned: false,
        attested_at: 10,
        selectors: vec![],
    }
}

async fn create(p: &RaftProposer, id: &str) {
    match p
        .propose(Command::CreateEntry { entry: entry(id) })
        .await
        .unwrap()
    {
        Response::Entry(e) => assert_eq!(e.id, id),
        other => panic!("{other:?}"),
    }
}

/// The index of the last entry in `n`'s log.
fn last_log_index(n: &TestNode) -> u64 {
    n.node.raft().metrics().borrow().last_log_index.unwrap_or(0)
}

async fn entry_ids(sm: &StateMachine) -> Vec<String> {
    let mut ids: Vec<String> = sm
        .entries()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicates_forwards_and_survives_leader_loss() {
    init_tracing();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(root.path(), raft_config(10_000)).await;
    let l = leader(&nodes.iter().collect::<Vec<_>>()).await;
    assert_eq!(l, 1);

    // Writes proposed on followers are forwarded to the leader and applied everywhere.
    create(&nodes[1].proposer, "from-2").await;
    create(&nodes[2].proposer, "from-3").await;
    create(&nodes[0].proposer, "from-1").await;
    // A rule violation (the ID of another entry) is answered, not lost, wherever it is
    // proposed.
    let mut clash = entry("from-1");
    clash.spiffe_id = "spiffe://td/service/another".into();
    assert!(matches!(
        nodes[2]
            .proposer
            .propose(Command::CreateEntry { entry: clash })
            .await
            .unwrap(),
        Response::Rejected {
            code: RejectCode::AlreadyExists,
            ..
        }
    ));
    // A read barrier on a follower sees every write acknowledged before it.
    let read = nodes[2].node.ensure_linearizable().await.unwrap().unwrap();
    assert!(nodes[2].sm().last_applied() >= read.index);
    assert_eq!(
        entry_ids(nodes[2].sm()).await,
        vec!["from-1", "from-2", "from-3"]
    );

    // The same join token, attested through all three nodes at once: used exactly once.
    nodes[1]
        .proposer
        .propose(Command::CreateJoinToken {
            token: JoinTokenRecord {
                token: "tok".into(),
                spiffe_id: "spiffe://td/agent/join_token/tok".into(),
                expires_at: 1_000,
                used_at: None,
            },
        })
        .await
        .unwrap();
    let attempts = nodes.iter().map(|n| {
        let p = n.proposer.clone();
        let id = n.id;
        tokio::spawn(async move {
            p.propose(Command::AttestWithJoinToken {
                token: "tok".into(),
                now: 10,
                // One ID (the token's), a serial telling the attempts apart.
                agent: AgentRecord {
                    x509_svid_serial: format!("via-{id}"),
                    ..agent("spiffe://td/agent/join_token/tok")
                },
            })
            .await
            .unwrap()
        })
    });
    let mut won = Vec::new();
    let mut refused = 0;
    for a in attempts {
        match a.await.unwrap() {
            Response::Agent(a) => won.push(a.x509_svid_serial),
            Response::Rejected {
                code: RejectCode::FailedPrecondition,
                message,
            } => {
                assert!(message.contains("already used"), "{message}");
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((won.len(), refused), (1, 2), "exactly one attestation wins");
    let last = nodes[0].sm().last_applied();
    for n in &nodes {
        applied(n, last).await;
        let agents: Vec<String> = n
            .sm()
            .agents()
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.x509_svid_serial)
            .collect();
        assert_eq!(agents, won, "node {} agrees on the winner", n.id);
        assert!(n
            .sm()
            .join_token("tok")
            .await
            .unwrap()
            .unwrap()
            .used_at
            .is_some());
    }

    // Acknowledged writes, then the leader goes away.
    let mut acked: Vec<String> = vec!["from-1".into(), "from-2".into(), "from-3".into()];
    for i in 0..10 {
        let id = format!("before-{i}");
        create(&nodes[(i % 3) as usize].proposer, &id).await;
        acked.push(id);
    }
    let old = nodes.iter().position(|n| n.id == l).unwrap();
    nodes[old].stop().await;
    let rest: Vec<&TestNode> = nodes.iter().filter(|n| n.id != l).collect();
    let new_leader = leader(&rest).await;
    assert_ne!(new_leader, l, "a new leader is elected");
    assert_eq!(
        rest.iter()
            .find(|n| n.id == new_leader)
            .unwrap()
            .node
            .status()
            .role,
        Role::Leader
    );
    // Nothing acknowledged is lost, and writes go on through either survivor.
    for n in &rest {
        n.node.ensure_linearizable().await.unwrap();
        let ids = entry_ids(n.sm()).await;
        for a in &acked {
            assert!(ids.contains(a), "node {} lost acknowledged {a}", n.id);
        }
    }
    for (i, n) in rest.iter().enumerate() {
        let id = format!("after-{i}");
        create(&n.proposer, &id).await;
        acked.push(id);
    }
    acked.sort();
    let status = rest[0].node.status();
    assert_eq!(status.leader, Some(new_leader));
    assert!(status.last_applied.is_some());

    // The old leader comes back as a follower and catches up.
    let dir = nodes[old].dir.clone();
    let addr = nodes[old].addr;
    nodes[old] = TestNode::start(l, &dir, addr, raft_config(10_000)).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    let now_leader = leader(&all).await;
    let target = nodes
        .iter()
        .find(|n| n.id == now_leader)
        .unwrap()
        .sm()
        .last_applied();
    applied(&nodes[old], target).await;
    assert_eq!(entry_ids(nodes[old].sm()).await, acked);
    if now_leader == new_leader {
        let st = nodes
            .iter()
            .find(|n| n.id == now_leader)
            .unwrap()
            .node
            .status();
        assert_eq!(st.replication.len(), 3, "{st:?}");
    }

    for n in &mut nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_behind_the_purged_log_catches_up_by_snapshot() {
    init_tracing();
    let root = tempfile::tempdir().unwrap();
    // A snapshot every 10 entries, and the log purged right behind it.
    let mut nodes = cluster(root.path(), raft_config(10)).await;
    assert_eq!(leader(&nodes.iter().collect::<Vec<_>>()).await, 1);
    for i in 0..5 {
        create(&nodes[0].proposer, &format!("early-{i}")).await;
    }
    applied(&nodes[2], nodes[0].sm().last_applied()).await;
    let behind = nodes[2].node.status().last_log_index.unwrap();

    // Node 3 goes down; the cluster moves on well past its log, and purges it.
    nodes[2].stop().await;
    for i in 0..40 {
        create(&nodes[(i % 2) as usize].proposer, &format!("later-{i}")).await;
    }
    // Deleted while node 3 was away: the snapshot must not keep it.
    nodes[1]
        .proposer
        .propose(Command::DeleteEntry {
            id: "early-0".into(),
        })
        .await
        .unwrap();
    let n1 = &nodes[0].node;
    n1.raft()
        .wait(Some(WAIT))
        .metrics(
            |m| m.purged.map(|p| p.index > behind + 1).unwrap_or(false),
            "leader purged past node 3's log",
        )
        .await
        .unwrap();
    let st = n1.status();
    assert!(st.snapshot.is_some(), "{st:?}");
    let built = *nodes[0].sm().subscribe_snapshots().borrow();
    assert!(built.built >= 1 && built.installed == 0, "{built:?}");

    // Node 3 restarts with its old stores: the log it needs is gone, so it gets a snapshot.
    let dir = nodes[2].dir.clone();
    let addr = nodes[2].addr;
    nodes[2] = TestNode::start(3, &dir, addr, raft_config(10)).await;
    let target = nodes[0].sm().last_applied();
    applied(&nodes[2], target).await;
    let st3 = nodes[2].node.status();
    let snap = st3.snapshot.expect("node 3 has a snapshot");
    let activity = *nodes[2].sm().subscribe_snapshots().borrow();
    assert!(activity.installed >= 1, "{activity:?}");
    assert!(activity.last_install > std::time::Duration::ZERO);
    assert!(
        snap.index > behind,
        "installed snapshot {snap} is past {behind}"
    );
    let want = entry_ids(nodes[0].sm()).await;
    assert_eq!(want.len(), 44);
    assert!(!want.contains(&"early-0".to_string()));
    assert_eq!(entry_ids(nodes[2].sm()).await, want);
    let (applied_id, membership) = nodes[2].sm().applied_state().await.unwrap();
    assert!(applied_id.unwrap().index >= target);
    assert_eq!(
        membership.membership().voter_ids().collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 2, 3])
    );

    // And it keeps following: a write through it lands everywhere.
    create(&nodes[2].proposer, "after-snapshot").await;
    let last = nodes[2].sm().last_applied();
    for n in &nodes {
        applied(n, last).await;
        assert!(n.sm().entry("after-snapshot").await.unwrap().is_some());
    }

    // Node 3 leaves (asked through node 2, forwarded to the leader).
    nodes[1].node.remove(3).await.unwrap();
    let st = nodes[0].node.status();
    assert_eq!(st.members.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert!(st.members.values().all(|m| m.voter));

    // Node 3's state survives a restart, and its snapshot folder holds just the current one.
    for n in &mut nodes {
        n.stop().await;
    }
    let sm = StateMachine::open(&dir.join(STATE_DB_FILE)).await.unwrap();
    assert_eq!(entry_ids(&sm).await.len(), 45);
    let mut files: Vec<String> = std::fs::read_dir(dir.join("state.snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(files[0], "current.json");
    assert!(
        files[1].starts_with("snap-") && files[1].ends_with(".db"),
        "{files:?}"
    );
}

/// Many writes at once through every node: they share log entries (fewer entries than
/// writes), every caller gets its own command's answer (a duplicate in the same batch is
/// refused, its twin is not), and every node ends with exactly the acknowledged entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_log_entries_and_get_their_own_answers() {
    init_tracing();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(root.path(), raft_config(10_000)).await;
    leader(&nodes.iter().collect::<Vec<_>>()).await;
    let before = last_log_index(&nodes[0]);

    const WRITES: usize = 300;
    let mut tasks = Vec::new();
    for i in 0..WRITES {
        let p = nodes[i % 3].proposer.clone();
        // Writes 2k and 2k+1 for k < 25 are the same entry under two IDs: one is refused.
        let mut e = entry(&format!("w{i:03}"));
        if i < 50 {
            e.spiffe_id = format!("spiffe://td/service/pair-{}", i / 2);
        }
        tasks.push(tokio::spawn(async move {
            (
                e.id.clone(),
                p.propose(Command::CreateEntry { entry: e }).await,
            )
        }));
    }
    let mut acked = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (id, res) = t.await.unwrap();
        match res.unwrap() {
            Response::Entry(e) => {
                assert_eq!(e.id, id, "a caller got another command's answer");
                acked.push(id);
            }
            Response::Rejected {
                code: RejectCode::AlreadyExists,
                message,
            } => {
                assert!(message.contains("same SPIFFE ID"), "{message}");
                refused += 1;
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!(refused, 25, "one of each of the 25 pairs is refused");
    assert_eq!(acked.len(), WRITES - 25);
    acked.sort();

    let after = last_log_index(&nodes[0]);
    assert!(
        after - before < WRITES as u64,
        "{WRITES} writes took {} log entries: none were batched",
        after - before
    );
    for n in &nodes {
        applied(n, after).await;
        assert_eq!(entry_ids(n.sm()).await, acked, "node {}", n.id);
    }
    for n in &mut nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_and_read_barriers_are_unary_calls_and_servers_stop_promptly() {
    init_tracing();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(root.path(), raft_config(10_000)).await;
    assert_eq!(leader(&nodes.iter().collect::<Vec<_>>()).await, 1);
    let before: Vec<usize> = nodes.iter().map(|n| calls_to(n, "AppendEntries")).collect();
    for i in 0..20 {
        create(&nodes[0].proposer, &format!("e{i}")).await;
    }
    // A linearizable read on the leader confirms its leadership with a heartbeat, another
    // AppendEntries beside replication.
    for i in 0..10 {
        nodes[0].node.ensure_linearizable().await.unwrap();
        create(&nodes[0].proposer, &format!("after-read-{i}")).await;
    }
    let last = last_log_index(&nodes[0]);
    for n in &nodes {
        applied(n, last).await;
        assert_eq!(entry_ids(n.sm()).await.len(), 30, "node {}", n.id);
    }
    for n in &nodes[1..] {
        let calls = calls_to(n, "AppendEntries") - before[n.id as usize - 1];
        assert!(calls >= 10, "node {}: {calls} AppendEntries calls", n.id);
    }
    // The servers stop promptly though the leader keeps calling them (heartbeats).
    for n in &mut nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_request_is_refused_with_a_clear_error_and_harms_nothing() {
    use ca_proto::raft as pb;
    init_tracing();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(root.path(), raft_config(10_000)).await;
    assert_eq!(leader(&nodes.iter().collect::<Vec<_>>()).await, 1);
    create(&nodes[0].proposer, "before").await;

    // Someone (with a ca-node's credentials: the node checks those at the TLS layer) sends
    // node 2 an AppendEntries whose entry is not an openraft entry.
    let mut client =
        pb::raft_service_client::RaftServiceClient::connect(format!("http://{}", nodes[1].addr))
            .await
            .unwrap();
    let bad = pb::AppendEntriesRequest {
        vote: Some(pb::Vote {
            term: 1,
            node_id: 1,
            committed: true,
        }),
        prev_log_id: None,
        entries: vec![b"{not an entry".to_vec()],
        leader_commit: None,
    };
    let err = client.append_entries(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("malformed log entry"),
        "{}",
        err.message()
    );

    // Node 2's log and the cluster are as they were.
    create(&nodes[0].proposer, "after").await;
    let last = last_log_index(&nodes[0]);
    for n in &nodes {
        applied(n, last).await;
        assert_eq!(
            entry_ids(n.sm()).await,
            ["after", "before"],
            "node {}",
            n.id
        );
    }
    for n in &mut nodes {
        n.stop().await;
    }
}
