//! While clients write and a workload fetches through the agent:
//!
//! 1. the leader is paused (SIGSTOP) past the election timeout, then resumed (SIGCONT):
//!    the others elect a new leader, the old one rejoins as a follower;
//! 2. a follower is restarted (SIGTERM, `ca-node run` on its intact data dir) and catches up;
//! 3. a follower's disk is lost: it is killed, removed from the membership (`cluster
//!    remove`), its data dir deleted, and it joins again under a new Raft ID with a new join
//!    token (`ca-node join`), catching up on everything written before.
//!
//! Invariants: no acknowledged write lost, every node (the rejoined one included) holds the
//! same entries, no failed fetch.
//!
//! A follower whose data disk fills up (a tmpfs as its data dir, filled) stops serving
//! with a clear message while the others go on; once there is room again it starts again
//! by itself and catches up, and no acknowledged write is lost.
//!
//! A node whose wall clock jumps 400 days ahead while it runs (libfaketime reading its
//! offset from a file) changes no authority: it notices before its next lifecycle
//! decision, reports not ready, and the CA journal stays as it was.
//!
//! And a node whose clock runs two minutes ahead (libfaketime on its process) finds out
//! from the others, reports not ready and mints nothing, while they stay ready; with its
//! clock right again it is ready again.

use std::time::{Duration, Instant};

use chaos_tests::load::{check_writes, wait_fetch, Fetcher, Targets, Writers};
use chaos_tests::report::{ms, say, Table};
use chaos_tests::Cluster;

const TEST: &str = "pause-restart-wipe";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_restart_and_wipe_lose_no_acknowledged_write() {
    let _solo = crate::common::solo().await;
    let t0 = Instant::now();
    let mode = crate::common::mode(TEST);
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
    let writers = Writers::start(TEST, 3, Targets::all_up(&c), Duration::from_millis(20));
    writers
        .wait_acks(30, Duration::from_secs(30))
        .await
        .expect("writes are acknowledged");
    let all: Vec<usize> = (0..c.nodes.len()).collect();
    let mut table = Table::new(&["event", "node", "figure", "ms"]);

    // 1. Pause the leader.
    let (leader, _) = c
        .wait_leader(&all, None, Duration::from_secs(20))
        .await
        .expect("a leader");
    writers.targets.remove(leader);
    let t_pause = Instant::now();
    c.pause(leader).expect("SIGSTOP");
    let others: Vec<usize> = all.iter().copied().filter(|i| *i != leader).collect();
    let (elected, back) = tokio::join!(
        c.wait_leader(&others, Some(leader), Duration::from_secs(20)),
        writers.unavailable_after(t_pause, Duration::from_secs(30))
    );
    let (new_leader, elected) = elected.expect("the others elect a leader");
    let back = back.expect("writes come back after the pause");
    table.row(vec![
        "leader paused".into(),
        c.nodes[leader].node_id.clone(),
        format!("new leader {}", c.nodes[new_leader].node_id),
        ms(elected),
    ]);
    table.row(vec![
        "leader paused".into(),
        c.nodes[leader].node_id.clone(),
        "writes unavailable".into(),
        ms(back),
    ]);
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(t_pause.elapsed())).await;
    c.resume(leader).expect("SIGCONT");
    let t_resume = Instant::now();
    let caught_up = c
        .wait_caught_up(leader, Duration::from_secs(30))
        .await
        .expect("the resumed node catches up");
    let st = c.status(leader).await.expect("status of the resumed node");
    assert_ne!(
        st.role, "leader",
        "the resumed old leader still leads: {st:?}"
    );
    table.row(vec![
        "resumed".into(),
        c.nodes[leader].node_id.clone(),
        format!(
            "paused {} ms, caught up as {}",
            (t_resume - t_pause).as_millis(),
            st.role
        ),
        ms(caught_up),
    ]);
    writers.targets.add(leader, c.nodes[leader].admin_socket());
    writers
        .wait_acks(20, Duration::from_secs(30))
        .await
        .expect("writes go on");

    // 2. Restart a follower gracefully.
    let (leader, _) = c
        .wait_leader(&all, None, Duration::from_secs(20))
        .await
        .expect("a leader");
    let f = (leader + 1) % 3;
    writers.targets.remove(f);
    c.stop(f).expect("SIGTERM stops the node cleanly");
    writers
        .wait_acks(20, Duration::from_secs(30))
        .await
        .expect("writes go on with a node down");
    let t = Instant::now();
    c.restart(f).await.expect("the node restarts");
    let ready = t.elapsed();
    let caught_up = c
        .wait_caught_up(f, Duration::from_secs(30))
        .await
        .expect("the restarted node catches up");
    table.row(vec![
        "restarted (SIGTERM, run)".into(),
        c.nodes[f].node_id.clone(),
        format!("ready {} ms, then caught up", ready.as_millis()),
        ms(caught_up),
    ]);
    writers.targets.add(f, c.nodes[f].admin_socket());
    writers
        .wait_acks(20, Duration::from_secs(30))
        .await
        .expect("writes go on");

    // 3. Wipe a follower that does not hold the root key (n1 does: software keys) and
    //    rejoin it under a new Raft ID.
    let (leader, _) = c
        .wait_leader(&all, None, Duration::from_secs(20))
        .await
        .expect("a leader");
    let w = (1..3)
        .find(|i| *i != leader)
        .expect("a follower other than n1");
    let old_raft_id = c.nodes[w].raft_id;
    writers.targets.remove(w);
    c.kill(w);
    writers
        .wait_acks(20, Duration::from_secs(30))
        .await
        .expect("writes go on with a node dead");
    let rejoin = c
        .wipe_and_rejoin(w, leader, 10 + old_raft_id)
        .await
        .expect("the wiped node joins again");
    let caught_up = c
        .wait_caught_up(w, Duration::from_secs(30))
        .await
        .expect("the rejoined node catches up");
    table.row(vec![
        "wiped, removed, rejoined".into(),
        c.nodes[w].node_id.clone(),
        format!(
            "raft id {old_raft_id} -> {}: removal to voter {} ms, then caught up",
            c.nodes[w].raft_id,
            rejoin.as_millis()
        ),
        ms(caught_up),
    ]);
    let st = c.status(leader).await.expect("status");
    let mut ids: Vec<u64> = st.members.iter().map(|m| m.raft_id).collect();
    ids.sort();
    assert!(
        !ids.contains(&old_raft_id),
        "the old raft id is still a member: {ids:?}"
    );
    assert!(ids.contains(&c.nodes[w].raft_id), "{ids:?}");
    assert_eq!(ids.len(), 3, "{ids:?}");
    writers.targets.add(w, c.nodes[w].admin_socket());
    writers
        .wait_acks(20, Duration::from_secs(30))
        .await
        .expect("writes go on");

    let ledger = writers.stop().await;
    c.wait_converged(Duration::from_secs(30))
        .await
        .expect("the nodes converge");
    let check = check_writes(&c, TEST, &ledger).await.expect("entries read");
    let fetches = fetcher.stop().await;
    say(&format!("[{TEST}] events:\n{}", table.render()));
    say(&format!(
        "[{TEST}] writes: {} attempted, {} acknowledged (slowest in {} ms), {} without answer ({} of those applied all the same); entries per node {:?}",
        check.attempted, check.acked, ledger.slowest_ack().as_millis(), check.unknown, check.unknown_applied, check.per_node
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
    say(&format!("[{TEST}] PASSED in {} s", t0.elapsed().as_secs()));
}

/// Where Debian's `faketime` package puts the library that shifts a process's clock.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The environment that runs a process under libfaketime with `offset` (its variables),
/// the wall clock faked and timers and timeouts in real time.
fn faketime_env(offset: &[(&str, String)]) -> Vec<(String, String)> {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: install Debian's faketime package (the test command does)"
    );
    let mut env = vec![
        ("LD_PRELOAD".to_string(), LIBFAKETIME.to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".to_string(), "1".to_string()),
    ];
    env.extend(offset.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

/// Waits until node `i` reports not ready because of its clock; its health detail.
async fn wait_clock_refusal(c: &Cluster, i: usize, timeout: Duration) -> String {
    let t = Instant::now();
    loop {
        match c.health(i).await {
            Ok((false, d)) if d.contains("clock") => return d,
            other => assert!(
                t.elapsed() < timeout,
                "node {i} never noticed its clock: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_wrong_clock_stops_minting_and_the_others_do_not() {
    let _solo = crate::common::solo().await;
    let mode = crate::common::mode("clock-skew");
    let mut c = Cluster::start("clock-skew", 3, crate::common::bins(), mode)
        .await
        .expect("the cluster forms");
    let skewed = 2;
    c.kill(skewed); // SIGKILL: a joined node may still be finishing `ca-node join`
    c.nodes[skewed].env = faketime_env(&[("FAKETIME", "+120s".into())]);
    let t = Instant::now();
    c.spawn_run(skewed).expect("start with a clock 2 min ahead");
    let detail = wait_clock_refusal(&c, skewed, Duration::from_secs(60)).await;
    say(&format!(
        "clock-skew: noticed after {} ms: {detail}",
        t.elapsed().as_millis()
    ));
    assert!(detail.contains("ahead of"), "{detail}");
    for i in 0..2 {
        let (ready, d) = c.health(i).await.expect("health");
        assert!(ready && !d.contains("clock"), "node {i}: {d}");
    }
    // Still true a measurement later (every 10 s): the others do not blame themselves.
    tokio::time::sleep(Duration::from_secs(11)).await;
    for i in 0..2 {
        let (ready, d) = c.health(i).await.expect("health");
        assert!(ready, "node {i}: {d}");
    }
    assert!(!c.health(skewed).await.expect("health").0);

    c.stop(skewed).expect("stop");
    c.nodes[skewed].env.clear();
    c.restart(skewed)
        .await
        .expect("with its clock right it is ready again");
}

/// A tmpfs mounted on a directory for the test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Self {
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("mount runs")
            .success();
        assert!(ok, "mounting a tmpfs on {} failed", dir.display());
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_a_node_which_comes_back_by_itself_with_room() {
    let _solo = crate::common::solo().await;
    const TEST: &str = "disk-full";
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "[{TEST}] needs root (it mounts a tmpfs); CI must run it"
        );
        say(&format!(
            "[{TEST}] SKIPPED: needs root to mount a tmpfs; nothing checked"
        ));
        return;
    }
    let mode = crate::common::mode(TEST);
    let mut c = Cluster::start(TEST, 3, crate::common::bins(), mode)
        .await
        .expect("the cluster forms");
    let all: Vec<usize> = (0..3).collect();
    let (leader, _) = c
        .wait_leader(&all, None, Duration::from_secs(20))
        .await
        .expect("a leader");
    let f = (0..3).rev().find(|i| *i != leader).expect("a follower");

    // Its data dir onto a small tmpfs, contents kept (SIGKILL: a joined node may still be
    // finishing `ca-node join`, before its SIGTERM handler is installed).
    c.kill(f);
    let data = c.nodes[f].data_dir();
    let saved = c.nodes[f].dir.join("data.saved");
    std::fs::rename(&data, &saved).unwrap();
    std::fs::create_dir(&data).unwrap();
    let _tmpfs = Tmpfs::mount(&data, "48m");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", saved.display()))
        .arg(&data)
        .status()
        .unwrap()
        .success();
    assert!(copied);
    c.restart(f).await.expect("the node runs from the tmpfs");

    let writers = Writers::start(TEST, 2, Targets::all_up(&c), Duration::from_millis(20));
    writers.targets.remove(f);
    writers
        .wait_acks(20, Duration::from_secs(30))
        .await
        .expect("writes are acknowledged");
    // Fill it.
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M"])
        .arg(format!("of={}", data.join("filler").display()))
        .stderr(std::process::Stdio::null())
        .status();
    let t = Instant::now();
    let log_says = |c: &Cluster, what: &str| {
        std::fs::read_to_string(c.nodes[f].log_path()).is_ok_and(|l| l.contains(what))
    };
    while !log_says(&c, "waiting for 16 MiB free to start again") {
        assert!(
            c.exited(f).is_none(),
            "the node exited instead of waiting for room"
        );
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the node with a full disk did not stop serving: {}",
            ca_test_support::process::log_tail(&c.nodes[f].log_path(), 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        log_says(&c, "cannot be written") && log_says(&c, "MiB free"),
        "the log says why: {}",
        ca_test_support::process::log_tail(&c.nodes[f].log_path(), 20)
    );
    say(&format!(
        "[{TEST}] the node stopped serving {} ms after its disk filled",
        t.elapsed().as_millis()
    ));
    assert!(c.health(f).await.is_err(), "it answers nothing meanwhile");
    writers
        .wait_acks(20, Duration::from_secs(30))
        .await
        .expect("writes go on without it");

    // Room again: it starts again by itself (same process) and catches up.
    std::fs::remove_file(data.join("filler")).unwrap();
    let t = Instant::now();
    c.wait_ready(f, Duration::from_secs(60))
        .await
        .expect("the node starts again by itself once there is room");
    say(&format!(
        "[{TEST}] ready again {} ms after the room came back",
        t.elapsed().as_millis()
    ));
    c.wait_caught_up(f, Duration::from_secs(30))
        .await
        .expect("it catches up");
    let ledger = writers.stop().await;
    c.wait_converged(Duration::from_secs(30))
        .await
        .expect("the nodes converge");
    let check = check_writes(&c, TEST, &ledger).await.expect("entries read");
    check.assert_invariants(3);
    c.stop(f).expect("stop before unmounting");
}

/// The CA journal as node `i` reports it: (id, state) of every authority.
async fn authorities(c: &Cluster, i: usize) -> Vec<(String, String)> {
    let st = chaos_tests::cluster::admin_call(
        &c.nodes[i].admin_socket(),
        Duration::from_secs(5),
        |mut a| async move {
            a.get_ca_status(ca_proto::admin::GetCaStatusRequest {})
                .await
        },
    )
    .await
    .expect("ca status");
    let mut out: Vec<(String, String)> = st
        .authorities
        .into_iter()
        .map(|a| (a.id, a.state))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_jump_on_a_running_node_changes_no_authority() {
    let _solo = crate::common::solo().await;
    clock_jump("clock-jump", false).await;
}

/// The same with another member down: the one member that answers disagrees and none
/// agrees, and the node's own wall clock was seen to jump, so the fault is still found
/// here (a quorum of disagreeing answers is not needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_jump_with_a_member_down_changes_no_authority() {
    let _solo = crate::common::solo().await;
    clock_jump("clock-jump-member-down", true).await;
}

async fn clock_jump(test: &str, member_down: bool) {
    let mode = crate::common::mode(test);
    let mut c = Cluster::start(test, 3, crate::common::bins(), mode)
        .await
        .expect("the cluster forms");
    let j = 2;
    let offset_file = c.nodes[j].dir.join("faketime");
    std::fs::write(&offset_file, "+0\n").unwrap();
    c.kill(j); // SIGKILL: a joined node may still be finishing `ca-node join`
               // The offset read from a file at every clock reading, so the test can move it.
    c.nodes[j].env = faketime_env(&[
        ("FAKETIME_TIMESTAMP_FILE", offset_file.display().to_string()),
        ("FAKETIME_NO_CACHE", "1".into()),
    ]);
    c.restart(j)
        .await
        .expect("the node runs with a clock it can jump");
    let before = authorities(&c, 0).await;
    if member_down {
        // Node 0 and the jumping node keep a quorum (node 0 holds the root).
        c.kill(1);
        c.wait_leader(&[0, j], Some(1), Duration::from_secs(20))
            .await
            .expect("a leader among the two left");
    }

    // 400 days ahead: its intermediate and JWT key would look long expired.
    std::fs::write(&offset_file, "+400d\n").unwrap();
    let t = Instant::now();
    wait_clock_refusal(&c, j, Duration::from_secs(30)).await;
    say(&format!(
        "[{test}] the jump was noticed after {} ms",
        t.elapsed().as_millis()
    ));
    // Three maintenance rounds later (every 5 s), the journal has not moved.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(authorities(&c, 0).await, before, "an authority changed");
    assert!(!c.health(j).await.expect("health").0);

    // Back to the right time: ready again, still nothing changed.
    std::fs::write(&offset_file, "+0\n").unwrap();
    c.wait_ready(j, Duration::from_secs(30))
        .await
        .expect("ready again with the right clock");
    assert_eq!(authorities(&c, 0).await, before);
}
