//! Restarts lose nothing: a node and an agent stopped and started again from the same
//! directories keep every entry, agent, the agent's identity and the CA root, and workloads
//! can still fetch; a node process killed with SIGKILL right after acknowledged admin
//! writes has all of them when it comes back.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;
use ca_dev::{DevEnv, DEMO_ID};
use ca_proto::admin::{
    CreateEntryRequest, CreateJoinTokenRequest, DeleteEntryRequest, GetBundleRequest,
    ListAgentsRequest, ListEntriesRequest, UpdateEntryRequest,
};
use ca_proto::node::attest_params;
use ca_proto::types::Entry;
use ca_proto::workload::X509svidRequest;

/// Fetches this process's X.509-SVIDs from the agent: (SPIFFE IDs, bundle of the first).
async fn fetch_x509(socket: &Path) -> (Vec<String>, Vec<u8>) {
    let mut c = ca_agent::workload_client::connect(socket)
        .await
        .expect("workload API connects");
    let mut stream = c
        .fetch_x509svid(X509svidRequest {})
        .await
        .expect("FetchX509SVID")
        .into_inner();
    let msg = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("an X.509-SVID response in time")
        .expect("stream")
        .expect("a message");
    let mut ids: Vec<String> = msg.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    ids.sort();
    let bundle = msg
        .svids
        .first()
        .map(|s| s.bundle.clone())
        .unwrap_or_default();
    (ids, bundle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_agent_restart_keep_entries_agents_identity_and_root() {
    let tmp = tempfile::tempdir().unwrap();
    let env = DevEnv::start(tmp.path()).await.expect("dev env starts");
    let dir = env.dir.clone();
    let uid = nix::unistd::getuid().as_raw();
    env.register_demo().await.unwrap();
    env.register(
        &format!("spiffe://{TD}/service/second"),
        &[
            format!("unix:uid:{uid}"),
            format!("unix:gid:{}", nix::unistd::getegid().as_raw()),
        ],
    )
    .await
    .unwrap();
    env.register(
        &format!("spiffe://{TD}/service/other-user"),
        &["unix:uid:4242".into()],
    )
    .await
    .unwrap();
    env.wait_for_svid(DEMO_ID, DEADLINE).await.unwrap();
    env.wait_for_svid(&format!("spiffe://{TD}/service/second"), DEADLINE)
        .await
        .unwrap();
    let (ids_before, bundle_before) = fetch_x509(env.agent.socket_path()).await;
    assert_eq!(
        ids_before,
        vec![DEMO_ID.to_string(), format!("spiffe://{TD}/service/second")]
    );

    let agent_id = env.agent.spiffe_id();
    let state_before = snapshot(env.node.core.state()).await;
    assert_eq!(state_before.entries.len(), 3);
    assert_eq!(state_before.agents.len(), 1);
    let ca_before = env.node.core.ca().bundle().unwrap();
    env.shutdown().await;

    // Same directories, same node configuration (new loopback ports).
    let env = DevEnv::start_with(ca_dev::node_config(&dir), |_| {})
        .await
        .expect("dev env restarts");
    assert_eq!(
        env.agent.spiffe_id(),
        agent_id,
        "the agent kept its identity"
    );
    let state_after = snapshot(env.node.core.state()).await;
    assert_eq!(state_after.entries, state_before.entries);
    assert_eq!(
        state_after.agents, state_before.agents,
        "no agent lost, none added (the restarted agent did not attest again)"
    );
    assert_eq!(state_after.authorities, state_before.authorities);
    let ca_after = env.node.core.ca().bundle().unwrap();
    assert_eq!(
        ca_after.x509_authorities, ca_before.x509_authorities,
        "same CA root"
    );
    assert_eq!(ca_after.jwt_authorities, ca_before.jwt_authorities);

    env.wait_for_svid(DEMO_ID, DEADLINE).await.unwrap();
    env.wait_for_svid(&format!("spiffe://{TD}/service/second"), DEADLINE)
        .await
        .unwrap();
    let (ids_after, bundle_after) = fetch_x509(env.agent.socket_path()).await;
    assert_eq!(ids_after, ids_before);
    assert_eq!(
        bundle_after, bundle_before,
        "workloads see the same trust bundle"
    );
    env.shutdown().await;
}

fn sorted(mut v: Vec<Entry>) -> BTreeMap<String, Entry> {
    v.drain(..).map(|e| (e.id.clone(), e)).collect()
}

/// Every entry the node lists, by ID.
async fn listed_entries(
    a: &mut ca_proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
) -> BTreeMap<String, Entry> {
    sorted(
        a.list_entries(ListEntriesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_admin_writes_survive_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("node.log");
    let mut expected: BTreeMap<String, Entry> = BTreeMap::new();
    let mut agents: Vec<String> = Vec::new();
    let mut tokens: Vec<String> = Vec::new();
    let mut root_pem: Option<String> = None;

    for round in 0..3 {
        let port = free_port();
        let (cfg, sock) = write_config(tmp.path(), &format!("127.0.0.1:{port}"), "");
        let mut node = NodeProcess::start(&cfg, &sock, &log).await;
        let mut a = admin(&sock).await;

        // Everything acknowledged before the last SIGKILL is there.
        assert_eq!(
            listed_entries(&mut a).await,
            expected,
            "round {round}: entries"
        );
        let mut listed_agents: Vec<String> = a
            .list_agents(ListAgentsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .agents
            .into_iter()
            .map(|g| g.spiffe_id)
            .collect();
        listed_agents.sort();
        assert_eq!(listed_agents, agents, "round {round}: agents");
        let bundle = a
            .get_bundle(GetBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        match &root_pem {
            None => root_pem = Some(bundle.pem.clone()),
            Some(p) => assert_eq!(&bundle.pem, p, "round {round}: the CA root changed"),
        }

        // Concurrent creates, each acknowledged.
        let mut tasks = Vec::new();
        for i in 0..12 {
            let mut a = a.clone();
            let id = format!("spiffe://{TD}/service/r{round}-{i}");
            tasks.push(tokio::spawn(async move {
                a.create_entry(CreateEntryRequest {
                    entry: Some(entry(
                        &id,
                        &format!("spiffe://{TD}/agent/host"),
                        &["unix:uid:1000"],
                    )),
                })
                .await
                .expect("create acknowledged")
                .into_inner()
                .entry
                .unwrap()
            }));
        }
        for t in tasks {
            let e = t.await.unwrap();
            expected.insert(e.id.clone(), e);
        }
        // An update and a delete of older entries.
        let victim = expected.keys().next().cloned().unwrap();
        a.delete_entry(DeleteEntryRequest { id: victim.clone() })
            .await
            .expect("delete acknowledged");
        expected.remove(&victim);
        let mut changed = expected.values().next().cloned().unwrap();
        changed.hint = format!("updated in round {round}");
        changed.dns_names = vec![format!("r{round}.example.org")];
        let updated = a
            .update_entry(UpdateEntryRequest {
                entry: Some(changed),
            })
            .await
            .expect("update acknowledged")
            .into_inner()
            .entry
            .unwrap();
        assert!(updated.revision >= 1);
        expected.insert(updated.id.clone(), updated);

        // An agent attested through the node API, and one join token left unused.
        let t = a
            .create_join_token(CreateJoinTokenRequest {
                spiffe_id: format!("spiffe://{TD}/agent/r{round}"),
                ttl_seconds: 600,
            })
            .await
            .unwrap()
            .into_inner();
        let roots = ca_identity::bundle::certs_from_pem(&bundle.pem).unwrap();
        let (csr, _key) = ca_agent::attest::new_key_and_csr().unwrap();
        let mut c = node_client(
            format!("127.0.0.1:{port}").parse().unwrap(),
            &roots,
            None,
            ServerCheck::Verify,
        );
        let r = attest_raw(
            &mut c,
            params(csr, Some(attest_params::Data::JoinToken(t.token))),
            None,
        )
        .await
        .expect("attestation acknowledged");
        agents.push(r.spiffe_id);
        agents.sort();
        let unused = a
            .create_join_token(CreateJoinTokenRequest {
                spiffe_id: String::new(),
                ttl_seconds: 600,
            })
            .await
            .unwrap()
            .into_inner();
        tokens.push(unused.token);

        // No graceful shutdown: SIGKILL right after the last acknowledgement.
        node.kill_hard();
    }

    // Once more: the restarted node applies again what its log holds beyond the state on
    // disk (applied writes reach the state store's disk in groups, see
    // `ca_raft::store::state_machine`). A read commits them; then SIGKILL again.
    let port = free_port();
    let (cfg, sock) = write_config(tmp.path(), &format!("127.0.0.1:{port}"), "");
    let mut node = NodeProcess::start(&cfg, &sock, &log).await;
    assert_eq!(
        listed_entries(&mut admin(&sock).await).await,
        expected,
        "after the last restart: entries"
    );
    node.kill_hard();

    // The state on disk, read directly after that kill.
    let sm = ca_raft::StateMachine::open(&tmp.path().join("data").join("state.db"))
        .await
        .expect("state opens");
    let stored: BTreeMap<String, Entry> = sorted(
        sm.entries()
            .await
            .unwrap()
            .iter()
            .map(ca_node::convert::entry_to_proto)
            .collect(),
    );
    assert_eq!(stored, expected);
    for t in &tokens {
        let rec = sm
            .join_token(t)
            .await
            .unwrap()
            .expect("the join token survived");
        assert_eq!(rec.used_at, None);
    }
    let mut stored_agents: Vec<String> = sm
        .agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.spiffe_id)
        .collect();
    stored_agents.sort();
    assert_eq!(stored_agents, agents);
    assert_eq!(agents.len(), 3);
}

/// A node whose Raft log is gone beside state applied from it (the file deleted, or
/// truncated to nothing) refuses to start and says what was lost and what to do: starting
/// would let it vote twice in a term and forget writes it acknowledged. A damaged log is
/// a clear error too. Refusing touches nothing: with its log back, the node starts with
/// every entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_raft_log_beside_applied_state_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let env = DevEnv::start(tmp.path()).await.expect("dev env starts");
    let dir = env.dir.clone();
    env.register_demo().await.unwrap();
    let entries_before = snapshot(env.node.core.state()).await.entries;
    env.shutdown().await;

    let cfg = ca_dev::node_config(&dir);
    let log = cfg.data_dir.join(ca_raft::LOG_DB_FILE);
    // The log and its SQLite side files, to put back at the end (a rollback journal may
    // vanish while the database closes: only what is there counts).
    let saved: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(&cfg.data_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(ca_raft::LOG_DB_FILE))
        .filter_map(|p| Some((p.clone(), std::fs::read(&p).ok()?)))
        .collect();
    let names: Vec<&std::path::PathBuf> = saved.iter().map(|(p, _)| p).collect();
    assert!(names.contains(&&log), "{names:?}");
    let start = || ca_node::node::start(cfg.clone());

    for (p, _) in &saved {
        let _ = std::fs::remove_file(p);
    }
    let err = start()
        .await
        .expect_err("a node without its log")
        .to_string();
    for want in [
        "raft-log.db is missing or empty",
        "vote twice",
        "ca-node join",
    ] {
        assert!(err.contains(want), "{err:?} lacks {want:?}");
    }
    // Truncated to nothing: the same.
    std::fs::write(&log, b"").unwrap();
    let err = start().await.expect_err("an empty log").to_string();
    assert!(err.contains("missing or empty"), "{err}");
    // Garbage: a clear error, not a panic. The attempt on the empty file may have left a
    // write-ahead log beside it (whether it is still there depends on when SQLite's last
    // connection closed); its pages would stand in for the garbage, so it goes first.
    for side in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{side}", log.display()));
    }
    std::fs::write(&log, vec![0x5a; 16 * 1024]).unwrap();
    let err = start().await.expect_err("a damaged log").to_string();
    assert!(err.contains("cannot be read"), "{err}");

    for p in std::fs::read_dir(&cfg.data_dir).unwrap() {
        let p = p.unwrap().path();
        if p.to_string_lossy().contains(ca_raft::LOG_DB_FILE) {
            std::fs::remove_file(p).unwrap();
        }
    }
    for (p, bytes) in &saved {
        std::fs::write(p, bytes).unwrap();
    }
    let env = DevEnv::start_with(ca_dev::node_config(&dir), |_| {})
        .await
        .expect("the node starts with its log back");
    assert_eq!(
        snapshot(env.node.core.state()).await.entries,
        entries_before
    );
    env.shutdown().await;
}
