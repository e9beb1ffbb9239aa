//! The leader is SIGKILLed twenty times while clients create entries through the admin
//! sockets of the live nodes and a workload fetches its X.509-SVID through an agent that
//! knows every node. After each kill the node is restarted with `ca-node run`.
//!
//! Invariants: every acknowledged write is on every node afterwards (writes whose answer
//! was lost are reported apart), nothing else is; the workload never fails a fetch (a
//! majority is always alive). Figures: per kill, time to a new leader and time until
//! writes are acknowledged again.

use std::time::{Duration, Instant};

use chaos_tests::load::{check_writes, wait_fetch, Fetcher, Targets, Writers};
use chaos_tests::report::{ms, say, Table};
use chaos_tests::Cluster;

const TEST: &str = "leader-kill";
const KILLS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_repeatedly_loses_no_acknowledged_write() {
    let _solo = crate::common::solo().await;
    let t0 = Instant::now();
    let mode = crate::common::mode(TEST);
    let mut c = Cluster::start(TEST, 3, crate::common::bins(), mode)
        .await
        .expect("the cluster forms");
    let a = c.start_agent("host-a", 0).await.expect("the agent starts");
    let workload = c
        .register_workload(a, "leader-kill", 0)
        .await
        .expect("workload entry");
    let endpoint = c.agents[a].endpoint();
    wait_fetch(&endpoint, &workload, Duration::from_secs(30))
        .await
        .expect("the workload gets its SVID");

    let fetcher = Fetcher::start(endpoint, workload, Duration::from_millis(100));
    let writers = Writers::start(TEST, 3, Targets::all_up(&c), Duration::from_millis(20));
    writers
        .wait_acks(30, Duration::from_secs(30))
        .await
        .expect("writes are acknowledged");

    let mut table = Table::new(&[
        "kill",
        "killed",
        "new leader",
        "new leader after ms",
        "writes unavailable ms",
        "restarted + ready ms",
    ]);
    let mut unavailable = Vec::new();
    for k in 1..=KILLS {
        let (old, _) = c
            .wait_leader(&c.up(), None, Duration::from_secs(20))
            .await
            .expect("a leader");
        writers.targets.remove(old);
        let t_kill = Instant::now();
        c.kill(old);
        let survivors = c.up();
        let (elected, back) = tokio::join!(
            c.wait_leader(&survivors, Some(old), Duration::from_secs(30)),
            writers.unavailable_after(t_kill, Duration::from_secs(30))
        );
        let (new, elected) = elected.expect("the survivors elect a leader");
        let back = back.unwrap_or_else(|e| panic!("kill {k}: {e}"));
        unavailable.push(back);
        let t_restart = Instant::now();
        c.restart(old).await.expect("the killed node restarts");
        let ready = t_restart.elapsed();
        writers.targets.add(old, c.nodes[old].admin_socket());
        table.row(vec![
            k.to_string(),
            c.nodes[old].node_id.clone(),
            c.nodes[new].node_id.clone(),
            ms(elected),
            ms(back),
            ms(ready),
        ]);
        writers
            .wait_acks(20, Duration::from_secs(30))
            .await
            .expect("writes go on after the restart");
    }

    let ledger = writers.stop().await;
    let converged = c
        .wait_converged(Duration::from_secs(30))
        .await
        .expect("the nodes converge");
    let check = check_writes(&c, TEST, &ledger).await.expect("entries read");
    let fetches = fetcher.stop().await;

    say(&format!(
        "[{TEST}] leader SIGKILLed {KILLS} times (the default Raft timings: heartbeat 100 ms, election timeout 400-700 ms):\n{}",
        table.render()
    ));
    let mut sorted = unavailable.clone();
    sorted.sort();
    let pct = |p: usize| sorted[(sorted.len() * p).div_ceil(100).saturating_sub(1)];
    say(&format!(
        "[{TEST}] writes unavailable after a leader SIGKILL: min {} ms, p50 {} ms, p99 {} ms, max {} ms (goal: p99 under 2000 ms)",
        ms(sorted[0]),
        ms(pct(50)),
        ms(pct(99)),
        ms(sorted[sorted.len() - 1])
    ));
    say(&format!(
        "[{TEST}] writes: {} attempted, {} acknowledged (slowest in {} ms), {} without answer ({} of those applied all the same); entries per node {:?}; converged {} ms after the load stopped",
        check.attempted, check.acked, ledger.slowest_ack().as_millis(), check.unknown, check.unknown_applied, check.per_node, converged.as_millis()
    ));
    say(&format!(
        "[{TEST}] workload fetches: {} ok, {} failed, slowest {} ms",
        fetches.ok,
        fetches.failures.len(),
        fetches.max_latency.as_millis()
    ));
    check.assert_invariants(3);
    assert!(
        fetches.failures.is_empty(),
        "workload fetches failed while a majority was alive: {:?}",
        fetches.failures
    );
    assert!(fetches.ok > 0);
    for (k, u) in unavailable.iter().enumerate() {
        assert!(
            *u < Duration::from_secs(15),
            "kill {}: writes unavailable for {u:?}",
            k + 1
        );
    }
    say(&format!("[{TEST}] PASSED in {} s", t0.elapsed().as_secs()));
}
