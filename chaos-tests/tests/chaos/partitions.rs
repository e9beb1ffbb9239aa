//! Network partitions (iptables DROP inside each node's namespace) while clients write
//! through every node and a workload fetches through an agent that reaches every node:
//!
//! 1. a follower is cut off (minority partition): the majority keeps acknowledging writes,
//!    the isolated follower acknowledges none;
//! 2. the leader is cut off (the majority partitioned away from it): the majority elects a
//!    new leader and acknowledges writes again; the old leader acknowledges none;
//! 3. every node cut off from every other (no majority anywhere): no write is acknowledged,
//!    the agent keeps serving its cached SVID;
//!
//! each healed before the next. Invariants: no acknowledged write lost, every node the
//! same afterwards, no failed fetch while a majority is connected. Needs the netns mode;
//! in loopback mode the test says SKIPPED.

use std::time::{Duration, Instant};

use chaos_tests::load::{check_writes, wait_fetch, Fetcher, Outcome, Targets, Writers};
use chaos_tests::report::{ms, say, Table};
use chaos_tests::{Cluster, Mode};

const TEST: &str = "partitions";
/// How long each partition is held (longer than an election takes: the 0.7 s leader lease plus up to 0.7 s).
const HOLD: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_then_heal_lose_no_acknowledged_write() {
    let _solo = crate::common::solo().await;
    let t0 = Instant::now();
    let mode = crate::common::mode(TEST);
    if mode != Mode::Netns {
        say(&format!(
            "[{TEST}] SKIPPED: partitions need the netns mode (root, `ip netns`, `iptables`); nothing was checked"
        ));
        return;
    }
    let mut c = Cluster::start(TEST, 3, crate::common::bins(), mode)
        .await
        .expect("the cluster forms");
    let a = c.start_agent("host-a", 0).await.expect("the agent starts");
    let workload = c
        .register_workload(a, TEST, 0)
        .await
        .expect("workload entry");
    let endpoint = c.agents[a].endpoint();
    wait_fetch(&endpoint, &workload, Duration::from_secs(30))
        .await
        .expect("the workload gets its SVID");
    let fetcher = Fetcher::start(endpoint, workload, Duration::from_millis(100));
    // Two writers per node, the cut-off ones included.
    let writers = Writers::start(TEST, 6, Targets::all_up(&c), Duration::from_millis(40));
    writers
        .wait_acks(30, Duration::from_secs(30))
        .await
        .expect("writes are acknowledged");

    let mut table = Table::new(&[
        "partition",
        "cut off",
        "leader after",
        "new leader after ms",
        "writes unavailable ms",
        "acks majority side",
        "acks cut-off side",
        "caught up after heal ms",
    ]);
    let all: Vec<usize> = (0..c.nodes.len()).collect();

    for phase in ["follower", "leader", "everyone"] {
        let (leader, _) = c
            .wait_leader(&all, None, Duration::from_secs(20))
            .await
            .expect("a leader");
        let cut: Vec<usize> = match phase {
            "follower" => vec![(leader + 1) % 3],
            "leader" => vec![leader],
            _ => all.clone(),
        };
        let groups: Vec<Vec<_>> = if phase == "everyone" {
            all.iter().map(|i| vec![c.nodes[*i].host.clone()]).collect()
        } else {
            vec![
                cut.iter().map(|i| c.nodes[*i].host.clone()).collect(),
                all.iter()
                    .filter(|i| !cut.contains(i))
                    .map(|i| c.nodes[*i].host.clone())
                    .collect(),
            ]
        };
        let fetch_before = fetcher.counts();
        c.net.partition(&groups).expect("partition");
        // From here on every rule is in place.
        let t_cut = Instant::now();
        let majority: Vec<usize> = if phase == "everyone" {
            vec![]
        } else {
            all.iter().copied().filter(|i| !cut.contains(i)).collect()
        };
        let mut new_leader = "-".to_string();
        let mut elected_ms = "-".to_string();
        let mut writes_back_ms = "-".to_string();
        if phase == "leader" {
            let (elected, back) = tokio::join!(
                c.wait_leader(&majority, Some(leader), Duration::from_secs(20)),
                writers.unavailable_after(t_cut, Duration::from_secs(30))
            );
            let (l, d) = elected.expect("the majority elects a new leader");
            new_leader = c.nodes[l].node_id.clone();
            elected_ms = ms(d);
            writes_back_ms = ms(back.expect("the majority acknowledges writes again"));
            // Writes go on through the majority for a while.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::time::sleep(HOLD.saturating_sub(t_cut.elapsed())).await;
        let t_heal = Instant::now();
        c.net.heal().expect("heal");
        // Acknowledgements of writes sent during the partition and answered before it
        // healed, by side.
        let recs = writers.ledger.records();
        let during = |side: &[usize]| {
            recs.iter()
                .filter(|r| {
                    side.contains(&r.node)
                        && r.sent >= t_cut
                        && r.done < t_heal
                        && matches!(r.outcome, Outcome::Acked(_))
                })
                .count()
        };
        let acks_majority = during(&majority);
        let acks_cut = during(&cut);
        let mut converged = Duration::ZERO;
        for i in &cut {
            converged = converged.max(
                c.wait_caught_up(*i, Duration::from_secs(45))
                    .await
                    .expect("the cut-off nodes catch up after healing"),
            );
        }
        let fetch_after = fetcher.counts();
        table.row(vec![
            phase.into(),
            cut.iter()
                .map(|i| c.nodes[*i].node_id.clone())
                .collect::<Vec<_>>()
                .join(","),
            new_leader,
            elected_ms,
            writes_back_ms,
            acks_majority.to_string(),
            acks_cut.to_string(),
            ms(converged),
        ]);
        say(&format!(
            "[{TEST}] {phase} cut off for {} ms: fetches {} ok / {} failed during it",
            (t_heal - t_cut).as_millis(),
            fetch_after.0 - fetch_before.0,
            fetch_after.1 - fetch_before.1
        ));
        assert_eq!(
            acks_cut, 0,
            "{phase}: a node cut off from the majority acknowledged writes"
        );
        if phase != "everyone" {
            assert!(
                acks_majority > 0,
                "{phase}: the majority acknowledged no write while partitioned"
            );
            assert_eq!(
                fetch_after.1, fetch_before.1,
                "{phase}: workload fetches failed while a majority was connected"
            );
        }
        writers
            .wait_acks(20, Duration::from_secs(30))
            .await
            .expect("writes go on after healing");
    }

    let ledger = writers.stop().await;
    c.wait_converged(Duration::from_secs(30))
        .await
        .expect("the nodes converge");
    let check = check_writes(&c, TEST, &ledger).await.expect("entries read");
    let fetches = fetcher.stop().await;
    say(&format!(
        "[{TEST}] partitions held {} ms each, then healed:\n{}",
        HOLD.as_millis(),
        table.render()
    ));
    say(&format!(
        "[{TEST}] writes: {} attempted, {} acknowledged (slowest in {} ms), {} without answer ({} of those applied all the same); entries per node {:?}",
        check.attempted, check.acked, ledger.slowest_ack().as_millis(), check.unknown, check.unknown_applied, check.per_node
    ));
    say(&format!(
        "[{TEST}] workload fetches: {} ok, {} failed (all phases), slowest {} ms",
        fetches.ok,
        fetches.failures.len(),
        fetches.max_latency.as_millis()
    ));
    check.assert_invariants(3);
    say(&format!("[{TEST}] PASSED in {} s", t0.elapsed().as_secs()));
}
