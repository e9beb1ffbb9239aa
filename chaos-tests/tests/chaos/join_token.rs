//! One join token presented to all three nodes at the same moment is used at most once:
//!
//! - agents: three `agent` processes started together with the same join token, each
//!   configured with a different node; exactly one attests and serves, the others exit
//!   refused, every node records exactly one agent for it, and the token presented once
//!   more is refused (several rounds);
//! - ca-nodes: three `ca-node join` processes for the same new node ID started together
//!   with the same ca-node join token, each through a different member; exactly one joins.

use std::time::{Duration, Instant};

use chaos_tests::cluster::wait_agent;
use chaos_tests::report::{say, Table};
use chaos_tests::{Cluster, NodeState, TD};

const TEST: &str = "join-token";
const ROUNDS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_join_token_presented_to_three_nodes_at_once_is_used_once() {
    let _solo = crate::common::solo().await;
    let t0 = Instant::now();
    let mode = crate::common::mode(TEST);
    let mut c = Cluster::start(TEST, 3, crate::common::bins(), mode)
        .await
        .expect("the cluster forms");
    let servers: Vec<String> = c.nodes.iter().map(|n| n.addr.clone()).collect();
    let mut table = Table::new(&["round", "kind", "accepted by", "refused by", "replay"]);

    for r in 1..=ROUNDS {
        let id = format!("spiffe://{TD}/agent/contested-{r}");
        let token = c.ca_node_token(r % 3, &id).await.expect("token");
        let mut agents = Vec::new();
        for (i, s) in servers.iter().enumerate() {
            agents.push(
                c.spawn_agent(
                    &format!("race-{r}-{i}"),
                    &id,
                    &token,
                    std::slice::from_ref(s),
                )
                .expect("spawn agent"),
            );
        }
        let mut won = Vec::new();
        let mut lost = Vec::new();
        for (i, a) in agents.iter_mut().enumerate() {
            match wait_agent(a, Duration::from_secs(60)).await {
                Ok(true) => won.push(i),
                Ok(false) => {
                    let status = a.proc.exited().expect("exited");
                    assert!(!status.success(), "a refused agent exited 0");
                    lost.push(i);
                }
                Err(e) => panic!("agent {i}: {e}; log:\n{}", a.proc.log_tail(20)),
            }
        }
        let logs: Vec<String> = agents.iter().map(|a| a.proc.log_tail(3)).collect();
        assert_eq!(
            won.len(),
            1,
            "round {r}: agents that attested with one token: {won:?}; logs:\n{logs:#?}"
        );
        for i in &lost {
            assert!(
                logs[*i].contains("refused"),
                "round {r}: agent {i} failed for another reason than a refusal:\n{}",
                logs[*i]
            );
        }
        for n in 0..3 {
            let held = c.agents_on(n).await.expect("agents");
            let count = held.iter().filter(|a| a.spiffe_id == id).count();
            assert_eq!(count, 1, "round {r}: node {n} records {count} agents {id}");
        }
        // The token once more, through the node that accepted it: refused.
        let mut again = c
            .spawn_agent(
                &format!("replay-{r}"),
                &id,
                &token,
                std::slice::from_ref(&servers[won[0]]),
            )
            .expect("spawn agent");
        let replay = wait_agent(&mut again, Duration::from_secs(60))
            .await
            .expect("replay");
        assert!(!replay, "a used join token attested another agent");
        table.row(vec![
            r.to_string(),
            "agent".into(),
            format!("n{}", won[0] + 1),
            lost.iter()
                .map(|i| format!("n{}", i + 1))
                .collect::<Vec<_>>()
                .join(","),
            "refused".into(),
        ]);
        // Keep the winner out of the way.
        for mut a in agents.into_iter().chain(std::iter::once(again)) {
            a.proc.kill_hard();
        }
    }

    // Three `ca-node join` for the same new node ID, one token, one member each.
    let node_id = "n4";
    let token = c
        .ca_node_token(1, &format!("spiffe://{TD}/ca-node/{node_id}"))
        .await
        .expect("token");
    let token_file = c.dir.join("n4-token");
    std::fs::write(&token_file, &token).expect("token file");
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("token file mode");
    let mut joiners = Vec::new();
    for k in 0..3 {
        let i = c
            .add_node(&format!("n4-{k}"), node_id, 4 + k as u64)
            .expect("node");
        joiners.push(i);
    }
    for (k, i) in joiners.iter().enumerate() {
        c.spawn_join(*i, k, &token_file).expect("spawn join");
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut won = Vec::new();
    let mut lost = Vec::new();
    for (k, i) in joiners.iter().enumerate() {
        loop {
            if c.exited(*i).is_some() {
                lost.push(k);
                break;
            }
            let voter = c.wait_voter(*i, Duration::from_millis(200)).await.is_ok();
            if voter {
                won.push(k);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ca-node join {k} neither joined nor exited"
            );
        }
    }
    assert_eq!(
        won.len(),
        1,
        "ca-node joins that used the one token: {won:?}"
    );
    for k in &lost {
        let log = ca_test_support::process::log_tail(&c.nodes[joiners[*k]].log_path(), 3);
        assert!(
            log.contains("join token already used") || log.contains("already a member"),
            "ca-node join {k} failed for another reason than the used token:\n{log}"
        );
        assert_eq!(c.nodes[joiners[*k]].state(), NodeState::Down);
    }
    let st = c.status(0).await.expect("status");
    let n4: Vec<_> = st.members.iter().filter(|m| m.node_id == node_id).collect();
    assert_eq!(n4.len(), 1, "{st:?}");
    assert_eq!(st.members.len(), 4, "{st:?}");
    table.row(vec![
        "-".into(),
        "ca-node".into(),
        format!("n{} (raft id {})", won[0] + 1, n4[0].raft_id),
        lost.iter()
            .map(|k| format!("n{}", k + 1))
            .collect::<Vec<_>>()
            .join(","),
        "-".into(),
    ]);
    say(&format!(
        "[{TEST}] one join token presented to the three nodes at once:\n{}",
        table.render()
    ));
    say(&format!("[{TEST}] PASSED in {} s", t0.elapsed().as_secs()));
}
