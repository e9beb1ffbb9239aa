//! `docs/DEPLOYING.md`, run as written on five hosts (network namespaces: `ca-1`..`ca-3`,
//! `app-1`, `app-2`), with the shipped unit and config files and SoftHSM2 as every node's
//! HSM ([`chaos_tests::deploy`] says what is substituted). From empty hosts: the nodes'
//! setup, `init`, both joins at the same moment, agents with join tokens, two workloads
//! (separate processes as uid 1001 and 1002) that then talk mutual TLS across the network
//! without pause while writers create entries through every node; then the runbooks: rotate
//! every intermediate (`--wait`), a rolling restart, a node whose disk died replaced, a
//! backup, and a restore into a fresh cluster. No handshake may fail, no acknowledged write
//! may be lost, and the restored cluster must hold every entry. The wall time from empty
//! hosts to the workloads' first exchange is printed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ca_proto::admin::ClusterStatusRequest;
use ca_test_support::process::Proc;
use chaos_tests::cluster::admin_call;
use chaos_tests::cluster::entries_at;
use chaos_tests::deploy::{Guide, Site};
use chaos_tests::load::{check_writes_at, Targets, Writers};
use chaos_tests::net::Network;
use chaos_tests::report::{ms, say};
use chaos_tests::Mode;

const TEST: &str = "deploying";
const TD: &str = "prod.example.org";
const NODES: [&str; 3] = ["ca-1", "ca-2", "ca-3"];
const BILLING: &str = "spiffe://prod.example.org/service/billing";
const LEDGER: &str = "spiffe://prod.example.org/service/ledger";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What the guide's commands find in their working directory: the two programs and `ops/`.
fn stage(dir: &Path) -> PathBuf {
    let stage = dir.join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_chaos-ca-node"), stage.join("ca-node")).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_chaos-agent"), stage.join("agent")).unwrap();
    std::os::unix::fs::symlink(repo().join("ops"), stage.join("ops")).unwrap();
    stage
}

/// A workload on `host` running as `uid`, talking mutual TLS (`serve` or `connect`).
struct Workload {
    proc: Proc,
}

impl Workload {
    fn start(site: &Site, host: &str, uid: u32, role: &str, addr: &str, peer: &str) -> Self {
        let h = site.host(host);
        let bin = h.path("/usr/bin/chaos-workload");
        std::fs::copy(env!("CARGO_BIN_EXE_chaos-workload"), &bin).unwrap();
        let mut cmd = site.net.command(&h.host, Path::new("setpriv"));
        cmd.args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
        ])
        .arg(&bin)
        .args([role, addr, peer])
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!(
                "unix://{}",
                h.path("/run/spiffe-agent/agent.sock").display()
            ),
        );
        let log = h.root.join(format!("workload-{uid}.log"));
        Self {
            proc: Proc::spawn(&format!("{host}/workload-{uid}"), cmd, &log).unwrap(),
        }
    }

    /// Exchanges done and failures so far, from its log.
    fn counts(&self) -> (u64, usize) {
        let text = std::fs::read_to_string(self.proc.log()).unwrap_or_default();
        let failed = text
            .lines()
            .filter(|l| l.contains("HANDSHAKE FAILED"))
            .count();
        let ok = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("ok "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        (ok, failed)
    }

    fn failures(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.proc.log()).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("HANDSHAKE FAILED"))
            .map(str::to_owned)
            .collect()
    }
}

/// The site, shared with the async test body; its calls block, so they run in
/// `block_in_place`.
#[derive(Clone)]
struct Shared(Arc<Mutex<Site>>);

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut Site) -> T) -> T {
        tokio::task::block_in_place(|| f(&mut self.0.lock().unwrap()))
    }
}

/// Runs block `name` on `hosts` at once (each with its values); panics with the output
/// and the services' logs if it fails.
fn run(
    site: &Shared,
    guide: &Guide,
    used: &mut Vec<String>,
    name: &str,
    hosts: &[(&str, &[(&str, &str)])],
) -> Vec<String> {
    used.push(name.to_owned());
    let block = guide.block(name).clone();
    site.with(|s| {
        s.run_at_once(&block, hosts).unwrap_or_else(|e| {
            let mut logs = String::new();
            for h in NODES {
                logs += &format!("\n--- {h} ca-node log:\n{}", s.log_tail(h, "ca-node", 25));
            }
            panic!("{e:#}{logs}")
        })
    })
}

async fn status(site: &Shared, host: &str) -> ca_proto::admin::ClusterStatusResponse {
    let sock = site.with(|s| s.host(host).path("/run/spiffe-ca/admin.sock"));
    admin_call(&sock, Duration::from_secs(15), |mut a| async move {
        a.cluster_status(ClusterStatusRequest {}).await
    })
    .await
    .unwrap_or_else(|e| panic!("cluster status on {host}: {e:#}"))
}

/// Waits until `host` sees exactly `raft_ids` as voters, with a leader.
async fn wait_voters(site: &Shared, host: &str, raft_ids: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(site, host).await;
        let mut voters: Vec<u64> = st
            .members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.raft_id)
            .collect();
        voters.sort_unstable();
        if voters == raft_ids && st.leader_id != 0 && !st.joint {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host} sees voters {voters:?} (leader {}), want {raft_ids:?}",
            st.leader_id
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// GET `path` from `addr` as seen from `host` (its own loopback).
fn http_get(site: &Shared, host: &str, addr: &str, path: &str) -> String {
    site.with(|s| {
        let h = s.host(host).host.clone();
        let mut tcp = s.net.connect(&h, addr.parse().unwrap()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(tcp, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut text = String::new();
        let _ = tcp.read_to_string(&mut text);
        text
    })
}

fn agent_last_sync(site: &Shared, host: &str) -> f64 {
    let text = http_get(site, host, "127.0.0.1:8088", "/metrics");
    ca_test_support::http::metric(&text, "ca_agent_last_sync_success_timestamp_seconds")
        .unwrap_or(0.0)
}

/// The admin sockets of the nodes now on the node hosts, with their node IDs.
fn node_sockets(site: &Shared, ids: [&str; 3]) -> Vec<(String, PathBuf)> {
    site.with(|s| {
        NODES
            .iter()
            .zip(ids)
            .map(|(h, id)| (id.to_owned(), s.host(h).path("/run/spiffe-ca/admin.sock")))
            .collect()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn the_deployment_guide_works_as_written() {
    let _solo = crate::common::solo().await;
    let mode = crate::common::mode(TEST);
    if mode != Mode::Netns {
        say(&format!(
            "[{TEST}] SKIPPED: five hosts need network namespaces (root with `ip netns`); mode is {mode}"
        ));
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("deploying")
        .tempdir()
        .unwrap();
    let stage = stage(dir.path());
    let guide = Guide::load(&repo().join("docs/DEPLOYING.md")).unwrap();
    let site = Site::new(
        dir.path(),
        Network::new(Mode::Netns).unwrap(),
        &["ca-1", "ca-2", "ca-3", "app-1", "app-2"],
        &stage,
    )
    .unwrap();
    let site = Shared(Arc::new(Mutex::new(site)));
    let mut used = Vec::new();
    let u = &mut used;
    let none: &[(&str, &str)] = &[];
    let all_nodes: Vec<(&str, &[(&str, &str)])> = NODES.iter().map(|h| (*h, none)).collect();

    // 1-3: empty hosts to workloads with SVIDs.
    let t0 = Instant::now();
    run(&site, &guide, u, "node-host", &all_nodes);
    run(&site, &guide, u, "hsm-token", &all_nodes);
    run(
        &site,
        &guide,
        u,
        "node-config",
        &[
            ("ca-1", &[("N", "1"), ("HOST", "ca-1")]),
            ("ca-2", &[("N", "2"), ("HOST", "ca-2")]),
            ("ca-3", &[("N", "3"), ("HOST", "ca-3")]),
        ],
    );
    run(&site, &guide, u, "init", &[("ca-1", none)]);
    let joins = Instant::now();
    run(&site, &guide, u, "join", &[("ca-2", none), ("ca-3", none)]);
    say(&format!(
        "[{TEST}] both joins, started together, done in {} ms",
        ms(joins.elapsed())
    ));
    let out = run(&site, &guide, u, "check", &[("ca-1", none)]);
    assert!(out[0].contains("healthy"), "{out:?}");
    wait_voters(&site, "ca-1", &[1, 2, 3]).await;
    run(
        &site,
        &guide,
        u,
        "agent-host",
        &[("app-1", none), ("app-2", none)],
    );
    run(&site, &guide, u, "agent-tokens", &[("ca-1", none)]);
    run(
        &site,
        &guide,
        u,
        "agent-start",
        &[
            ("app-1", &[("HOST", "app-1")]),
            ("app-2", &[("HOST", "app-2")]),
        ],
    );
    run(&site, &guide, u, "register", &[("ca-2", none)]);
    let app2_ip = site.with(|s| s.host("app-2").host.ip);
    let (bob, alice) = site.with(|s| {
        (
            Workload::start(s, "app-2", 1002, "serve", "0.0.0.0:7443", BILLING),
            Workload::start(
                s,
                "app-1",
                1001,
                "connect",
                &format!("{app2_ip}:7443"),
                LEDGER,
            ),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while alice.counts().0 == 0 {
        assert!(
            Instant::now() < deadline,
            "no mTLS exchange within 120 s:\nalice: {}\nbob: {}",
            alice.proc.log_tail(10),
            bob.proc.log_tail(10)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = t0.elapsed();
    // Connections refused before bob had his SVID and listened are not failed handshakes:
    // count from the first exchange on.
    let startup_failures = alice.failures().len();
    say(&format!(
        "[{TEST}] empty hosts to the first mTLS exchange between two workloads (both SVIDs): {} ms (commands only: no typing, no copying between hosts)",
        ms(first)
    ));

    // Traffic and writes from here on.
    let targets = Arc::new(Targets::default());
    for (i, (_, sock)) in node_sockets(&site, ["node-1", "node-2", "node-3"])
        .into_iter()
        .enumerate()
    {
        targets.add(i, sock);
    }
    let writers = Writers::start_in(TD, TEST, 3, targets.clone(), Duration::from_millis(50));
    let mut phases = Vec::new();
    let mut phase = |name: &str, t: Instant, before: (u64, usize)| {
        // The workloads print their counts every 200 ms.
        std::thread::sleep(Duration::from_millis(500));
        let after = alice.counts();
        phases.push(format!(
            "{name}: {} ms, {} exchanges, {} failed",
            ms(t.elapsed()),
            after.0 - before.0,
            after.1 - before.1
        ));
        assert!(
            after.0 > before.0,
            "no exchange during {name}:\nalice ({}): {}\nbob: {}",
            std::fs::read_to_string(format!("/proc/{}/status", alice.proc.pid()))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("State") || l.starts_with("Threads"))
                .collect::<Vec<_>>()
                .join(" "),
            alice.proc.log_tail(15),
            bob.proc.log_tail(15)
        );
    };

    // Rotate every intermediate, waiting for every node.
    let (t, c) = (Instant::now(), alice.counts());
    let out = run(&site, &guide, u, "rotate-intermediate", &[("ca-2", none)]);
    for node in ["node-1", "node-2", "node-3"] {
        assert!(
            out[0].contains(node),
            "no progress line for {node}: {out:?}"
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    phase("rotate-intermediate --all --wait", t, c);

    // Rolling restart, one node after the other.
    let (t, c) = (Instant::now(), alice.counts());
    for h in NODES {
        run(&site, &guide, u, "rolling-restart", &[(h, none)]);
    }
    wait_voters(&site, "ca-1", &[1, 2, 3]).await;
    phase("rolling restart", t, c);

    // ca-3's disk dies: a new host in its place, as node-4.
    let (t, c) = (Instant::now(), alice.counts());
    targets.remove(2);
    site.with(|s| {
        s.kill("ca-3", "ca-node");
        s.fresh_disk("ca-3").unwrap();
    });
    run(&site, &guide, u, "replace-remove", &[("ca-1", none)]);
    run(&site, &guide, u, "node-host", &[("ca-3", none)]);
    run(&site, &guide, u, "hsm-token", &[("ca-3", none)]);
    run(
        &site,
        &guide,
        u,
        "node-config",
        &[("ca-3", &[("N", "4"), ("HOST", "ca-3")])],
    );
    run(&site, &guide, u, "join", &[("ca-3", none)]);
    wait_voters(&site, "ca-1", &[1, 2, 4]).await;
    targets.add(
        2,
        site.with(|s| s.host("ca-3").path("/run/spiffe-ca/admin.sock")),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    phase("node replacement", t, c);

    let ledger = writers.stop().await;
    let check = check_writes_at(
        &node_sockets(&site, ["node-1", "node-2", "node-4"]),
        &chaos_tests::load::writer_parent_in(TD, TEST),
        &ledger,
    )
    .await
    .expect("entries read");
    say(&format!(
        "[{TEST}] writes: {} attempted, {} acknowledged, {} without an answer ({} of them applied); per node {:?}",
        check.attempted, check.acked, check.unknown, check.unknown_applied, check.per_node
    ));
    check.assert_invariants(3);
    assert!(
        check.acked > 50,
        "too few writes to mean anything: {check:?}"
    );

    // Back up, then restore into a fresh cluster once the old one is gone.
    run(&site, &guide, u, "backup", &[("ca-2", none)]);
    let (t, c) = (Instant::now(), alice.counts());
    site.with(|s| {
        s.stop("ca-2", "ca-node").unwrap();
        s.stop("ca-3", "ca-node").unwrap();
    });
    run(&site, &guide, u, "restore", &[("ca-1", none)]);
    site.with(|s| {
        s.fresh_disk("ca-2").unwrap();
        s.fresh_disk("ca-3").unwrap();
    });
    let fresh: Vec<(&str, &[(&str, &str)])> = vec![("ca-2", none), ("ca-3", none)];
    run(&site, &guide, u, "node-host", &fresh);
    run(&site, &guide, u, "hsm-token", &fresh);
    run(
        &site,
        &guide,
        u,
        "node-config",
        &[
            ("ca-2", &[("N", "5"), ("HOST", "ca-2")]),
            ("ca-3", &[("N", "6"), ("HOST", "ca-3")]),
        ],
    );
    run(&site, &guide, u, "join", &fresh);
    wait_voters(&site, "ca-1", &[1, 5, 6]).await;
    let restored = node_sockets(&site, ["node-1", "node-5", "node-6"]);
    let check = check_writes_at(
        &restored,
        &chaos_tests::load::writer_parent_in(TD, TEST),
        &ledger,
    )
    .await
    .expect("entries read after the restore");
    check.assert_invariants(3);
    for (id, parent) in [(BILLING, "app-1"), (LEDGER, "app-2")] {
        let e = entries_at(&restored[0].1, &format!("spiffe://{TD}/agent/{parent}"))
            .await
            .unwrap();
        assert!(
            e.iter().any(|e| e.spiffe_id == id),
            "{id} lost in the restore: {e:?}"
        );
    }
    // The agents are in sync with the restored cluster (the only nodes left): their last
    // sync is newer than now (a poll answered, or, watching, a stream open and current).
    for app in ["app-1", "app-2"] {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as f64)
            .unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(60);
        while agent_last_sync(&site, app) <= now {
            assert!(
                Instant::now() < deadline,
                "{app} does not sync with the restored cluster"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    phase("restore into a fresh cluster", t, c);

    let failures: Vec<String> = alice
        .failures()
        .into_iter()
        .skip(startup_failures)
        .chain(bob.failures())
        .collect();
    say(&format!("[{TEST}] {}", phases.join("; ")));
    assert!(failures.is_empty(), "failed handshakes: {failures:#?}");

    used.sort();
    used.dedup();
    assert_eq!(
        used,
        guide.names(),
        "every block of the guide runs in this test"
    );
    drop((alice, bob));
}
