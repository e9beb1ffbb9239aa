//! Nodes joining at the same moment, as Ansible or two terminals do: a one-node cluster,
//! then `ca-node join` for node 2 and node 3 started together (each with its own token,
//! both through node 1), in several fresh clusters. Every round must end with three ready
//! voters that agree on the membership and replicate a write; no join may fail.

use std::time::{Duration, Instant};

use chaos_tests::report::say;
use chaos_tests::Cluster;

const TEST: &str = "parallel-joins";
const ROUNDS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_joining_at_once_all_become_voters() {
    let _solo = crate::common::solo().await;
    let mode = crate::common::mode(TEST);
    for round in 1..=ROUNDS {
        let t0 = Instant::now();
        let mut c = Cluster::start(&format!("{TEST}-{round}"), 1, crate::common::bins(), mode)
            .await
            .expect("the first node starts");
        let mut joining = Vec::new();
        for (k, name) in ["n2", "n3"].into_iter().enumerate() {
            let i = c.add_node(name, name, 2 + k as u64).expect("node");
            let token = c
                .ca_node_token(0, &c.nodes[i].spiffe_id())
                .await
                .expect("token");
            let file = c.nodes[i].dir.join("join-token");
            std::fs::write(&file, token).expect("token file");
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("token file mode");
            joining.push((i, file));
        }
        // Both at once.
        for (i, file) in &joining {
            c.spawn_join(*i, 0, file).expect("spawn join");
        }
        for (i, _) in &joining {
            if let Err(e) = c.wait_voter(*i, Duration::from_secs(90)).await {
                let log = ca_test_support::process::log_tail(&c.nodes[*i].log_path(), 15);
                panic!(
                    "round {round}: {} did not become a voter: {e}\n{log}",
                    c.nodes[*i].node_id
                );
            }
            c.wait_ready(*i, Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| panic!("round {round}: not ready: {e}"));
        }
        c.wait_converged(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        for i in 0..3 {
            let st = c.status(i).await.expect("status");
            let voters = st.members.iter().filter(|m| m.voter).count();
            assert_eq!(voters, 3, "round {round}: node {i} sees {st:?}");
            for (k, _) in &joining {
                assert!(
                    c.exited(*k).is_none(),
                    "round {round}: a joined node exited"
                );
            }
        }
        // The three replicate a write made through the last one to join.
        let agent = format!("spiffe://{}/agent/after-{round}", chaos_tests::TD);
        c.ca_node_token(2, &agent)
            .await
            .expect("a write through node 3");
        say(&format!(
            "[{TEST}] round {round}: two nodes joined at once, three voters in {} ms",
            t0.elapsed().as_millis()
        ));
    }
}
