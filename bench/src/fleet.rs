//! `agent-fleet`: many agents, simulated in one process, against a real three-node cluster
//! on loopback ([`crate::ca_cluster`]), once with entries pushed (`WatchEntries`) and once
//! with today's polling (`SyncEntries` every 5 s), each on a cluster of its own, in the same
//! run.
//!
//! Every simulated agent is an agent as far as the nodes can tell: it attests with a join
//! token of its own over the node API, holds its own agent SVID and its own mTLS connection
//! (to one of the three nodes, round robin), mints the X.509-SVIDs of its entries with
//! `BatchNewX509Svid`, and keeps a watch open (or polls). What it does not do is serve
//! workloads. Per mode the run reports:
//!
//! - registering the entries (batches of 1,000 through the admin API) and attesting the
//!   agents, and the time from an agent's attestation to its full set;
//! - steady state over `--window` seconds: each node's CPU (cores busy) and RSS, and the
//!   payload bytes per second the agents receive (protobuf messages, before HTTP/2 and
//!   TLS framing) and the bytes per second through the loopback interface (every node
//!   port, framing included, the members' Raft traffic too); the renewal load of SVIDs with a 1 h TTL renewed at half-life runs
//!   meanwhile (each agent's SVIDs together, spread evenly);
//! - `--probes` entries created one at a time (50 ms apart) under agents spread over the
//!   fleet: the time from the `CreateEntry` call until the agent has it, p50/p99/max;
//! - `RevokeAuthority` of node 1's intermediate: the time until every agent has been told
//!   (a message listing a tainted authority) and until every affected agent has
//!   re-minted its SVIDs, p50/p99/max;
//! - the size of a snapshot of the state (`SaveSnapshot`), and (watch mode) how long an
//!   empty node joining afterwards takes to catch up, as a wiped node that joins again;
//! - (watch mode) the RSS of one real `agent` process holding `--real-agent-entries`
//!   entries and their SVIDs.
//!
//! ```text
//! cargo build --release -p ca-bench -p ca-node-cli
//! target/release/agent-fleet --agents 10000 --entries-per-agent 10
//! target/release/agent-fleet --agents 1000 --modes watch --json
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use ca_agent::config::AttestationMethod;
use ca_agent::node_client::NodeClient;
use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_identity::TrustDomain;
use ca_proto::admin::{
    BatchCreateEntriesRequest, CreateEntryRequest, CreateJoinTokenRequest, GetBundleRequest,
    GetCaStatusRequest, RevokeAuthorityRequest, SaveSnapshotRequest,
};
use ca_proto::node::{
    BatchNewX509SvidRequest, NewX509SvidParams, RenewAgentRequest, SyncEntriesRequest,
    WatchEntriesRequest,
};
use ca_proto::types::{Entry, Selector};
use clap::Parser;
use prost::Message as _;
use serde::Serialize;

use crate::ca_cluster::CaCluster;
use crate::load::CsrPool;
use crate::node::{NodeExe, TRUST_DOMAIN};

/// How often a polling agent syncs (the agent's default `sync_interval_secs`).
const POLL_EVERY: Duration = Duration::from_secs(5);

/// Command line of `agent-fleet`.
#[derive(Parser, Debug)]
#[command(
    name = "agent-fleet",
    about = "N simulated agents against a 3-node cluster: entries pushed vs polled"
)]
pub struct Args {
    /// Simulated agents.
    #[arg(long, default_value_t = 10_000)]
    pub agents: usize,
    /// Entries registered under each agent.
    #[arg(long, default_value_t = 10)]
    pub entries_per_agent: usize,
    /// Modes to run, each on a cluster of its own: watch, poll.
    #[arg(long, value_delimiter = ',', default_value = "watch,poll")]
    pub modes: Vec<String>,
    /// Seconds of steady state measured.
    #[arg(long, default_value_t = 30)]
    pub window: u64,
    /// Entries created one at a time to time their arrival at the agent.
    #[arg(long, default_value_t = 100)]
    pub probes: usize,
    /// Agents attesting (and minting) at once while the fleet starts.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// X.509-SVID and agent SVID lifetime, seconds (renewed at half-life).
    #[arg(long, default_value_t = 3600)]
    pub svid_ttl: u64,
    /// Entries for one real agent process (the `agent` binary beside this one, else this
    /// one re-run as the agent) started in watch mode after the steady-state window: its
    /// RSS once it holds them and their SVIDs. 0: none.
    #[arg(long, default_value_t = 1000)]
    pub real_agent_entries: usize,
    /// The ca-node executable: `auto` (beside this one, else this one re-run as ca-node),
    /// `self`, or a path.
    #[arg(long, default_value = "auto")]
    pub ca_node: NodeExe,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Percentiles of a set of durations, milliseconds.
#[derive(Debug, Default, Serialize, Clone)]
pub struct Spread {
    /// How many.
    pub n: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

fn spread(mut v: Vec<Duration>) -> Spread {
    if v.is_empty() {
        return Spread::default();
    }
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Spread {
        n: v.len(),
        p50_ms: ms(at(0.5)),
        p99_ms: ms(at(0.99)),
        max_ms: ms(*v.last().expect("not empty")),
    }
}

/// One node in steady state.
#[derive(Debug, Default, Serialize, Clone)]
pub struct NodeLoad {
    /// Raft ID.
    pub node: u64,
    /// CPU time over wall time in the window (1.0 = one core busy).
    pub cores_busy: f64,
    /// Resident memory at the end of the window, MiB.
    pub rss_mib: f64,
    /// Resident memory before entries and agents, MiB.
    pub rss_empty_mib: f64,
}

/// What one mode measured.
#[derive(Debug, Default, Serialize, Clone)]
pub struct ModeReport {
    /// `watch` or `poll`.
    pub mode: String,
    /// Agents and entries.
    pub agents: usize,
    /// Entries in all.
    pub entries: usize,
    /// Registering every entry (admin batches of 1,000), seconds.
    pub register_secs: f64,
    /// Attesting every agent and minting its SVIDs, seconds.
    pub fleet_start_secs: f64,
    /// From an agent's attestation to its full set.
    pub full_set: Spread,
    /// Steady state, per node.
    pub nodes: Vec<NodeLoad>,
    /// Payload bytes per second received by all agents in steady state.
    pub agent_bytes_per_sec: f64,
    /// Bytes per second through the loopback interface in steady state (every node port:
    /// agents' TLS connections and the members' Raft traffic, framing included).
    pub loopback_bytes_per_sec: f64,
    /// SVIDs renewed per second in steady state (the simulated half-life renewals).
    pub renewals_per_sec: f64,
    /// From `CreateEntry` to the agent having the entry.
    pub entry_to_agent: Spread,
    /// From `RevokeAuthority` to each agent being told.
    pub revoke_told: Spread,
    /// From `RevokeAuthority` to each affected agent's SVIDs re-minted.
    pub revoke_reminted: Spread,
    /// Agents not told / not re-minted within the limit.
    pub revoke_missing: (usize, usize),
    /// Bytes of a snapshot of the state.
    pub snapshot_bytes: u64,
    /// The real agent: entries it held and its RSS then, MiB (watch mode only).
    pub real_agent: Option<(usize, f64)>,
    /// Node RSS after the entries were registered, before any agent, MiB.
    pub rss_entries_mib: Vec<f64>,
    /// An empty node joining the cluster afterwards (as a wiped node joins again): seconds
    /// until it is a voter and has applied everything, and its snapshot index then (0: it
    /// replayed the log, no snapshot).
    pub catch_up: Option<(f64, u64)>,
}

/// Set to run this executable as the `agent` (see [`main`]).
pub const AGENT_EXEC_ENV: &str = "CA_BENCH_EXEC_AGENT";

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Per mode, in the order run.
    pub modes: Vec<ModeReport>,
    /// The ca-node that ran.
    pub ca_node: String,
}

/// What the agents saw, shared with the measuring code.
struct Seen {
    t0: Instant,
    /// Probe entry SPIFFE IDs being waited for, and when each arrived (ms after t0 + 1).
    probes: Mutex<std::collections::HashMap<String, u64>>,
    /// Per agent: when it was first told of a tainted authority (ms after t0 + 1; 0 = not).
    told: Vec<AtomicU64>,
    /// Per agent: when its SVIDs were re-minted after the revocation (ms after t0 + 1).
    reminted: Vec<AtomicU64>,
    /// Per agent: whether its SVIDs were signed by the authority being revoked.
    affected: Vec<AtomicBool>,
    /// Payload bytes received.
    bytes: AtomicU64,
    /// Per agent: attestation done to full set, ms + 1.
    full_set: Vec<AtomicU64>,
    /// SVIDs minted in all.
    minted: AtomicU64,
}

impl Seen {
    fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64 + 1
    }
}

/// One simulated agent.
struct SimAgent {
    idx: usize,
    id: String,
    client: NodeClient,
    /// Its entries' IDs, for minting.
    entry_ids: Vec<String>,
    /// The authority key ID of its current SVIDs.
    aki: Mutex<Vec<u8>>,
}

fn entry(spiffe_id: String, parent_id: &str, uid: usize) -> Entry {
    Entry {
        spiffe_id,
        parent_id: parent_id.into(),
        selectors: vec![Selector {
            r#type: "unix".into(),
            value: format!("uid:{uid}"),
        }],
        ..Default::default()
    }
}

/// Bytes received on the loopback interface so far (`/proc/net/dev`; every byte sent on
/// loopback is received there once).
fn loopback_bytes() -> u64 {
    std::fs::read_to_string("/proc/net/dev")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.trim_start().starts_with("lo:"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|b| b.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn cluster_settings(args: &Args) -> toml::Table {
    let mut t = toml::Table::new();
    let mut limits = toml::Table::new();
    // One source address for the whole fleet: the per-address limits of a real
    // deployment (many hosts) do not apply.
    limits.insert("attestations_per_second".into(), 1e6.into());
    limits.insert("attestation_burst".into(), 1_000_000.into());
    limits.insert("unauthenticated_connections".into(), 8192.into());
    limits.insert(
        "unauthenticated_connections_per_address".into(),
        8192.into(),
    );
    t.insert("limits".into(), limits.into());
    let mut ttl = toml::Table::new();
    ttl.insert("x509_svid".into(), (args.svid_ttl as i64).into());
    ttl.insert("agent_svid".into(), (args.svid_ttl as i64).into());
    t.insert("ttl".into(), ttl.into());
    t
}

async fn run_mode(
    exe: &crate::node::ResolvedExe,
    args: &Args,
    mode: &str,
) -> anyhow::Result<ModeReport> {
    let watch = match mode {
        "watch" => true,
        "poll" => false,
        other => bail!("--modes: {other:?} is neither watch nor poll"),
    };
    let n = args.agents;
    let per = args.entries_per_agent;
    eprintln!("[{mode}] starting 3 ca-nodes ({})", exe.describe());
    let mut cluster = CaCluster::start_with(exe, 3, cluster_settings(args)).await?;
    let pids: Vec<u32> = cluster.nodes.iter().map(|n| n.pid()).collect();
    let rss_empty: Vec<f64> = pids.iter().map(|p| rss_mib(*p)).collect();
    let mut admin = cluster.nodes[0].admin().await?;
    let roots = admin
        .get_bundle(GetBundleRequest {})
        .await?
        .into_inner()
        .bundle
        .context("no bundle")?
        .x509_authorities;
    let td = TrustDomain::new(TRUST_DOMAIN).map_err(|e| anyhow!("{e}"))?;
    let live = LiveRoots::new(roots);
    let addrs: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.node_addr.to_string())
        .collect();
    let agent_id = |i: usize| format!("spiffe://{TRUST_DOMAIN}/agent/sim-{i}");

    // Entries, in batches of 1,000, before any agent exists.
    eprintln!("[{mode}] registering {} entries", n * per);
    let t = Instant::now();
    let all: Vec<Entry> = (0..n)
        .flat_map(|i| {
            (0..per).map(move |k| {
                entry(
                    format!("spiffe://{TRUST_DOMAIN}/svc/a{i}-w{k}"),
                    &format!("spiffe://{TRUST_DOMAIN}/agent/sim-{i}"),
                    1000 + k,
                )
            })
        })
        .collect();
    let mut ids_by_agent: Vec<Vec<String>> = vec![Vec::new(); n];
    for chunk in all.chunks(1000) {
        let r = admin
            .batch_create_entries(BatchCreateEntriesRequest {
                entries: chunk.to_vec(),
            })
            .await?
            .into_inner();
        for res in r.results {
            let e = res
                .entry
                .ok_or_else(|| anyhow!("an entry was refused: {}", res.message))?;
            let i: usize = e
                .parent_id
                .rsplit_once("sim-")
                .and_then(|(_, i)| i.parse().ok())
                .context("parent of a created entry")?;
            ids_by_agent[i].push(e.id);
        }
    }
    let register_secs = t.elapsed().as_secs_f64();
    let rss_entries_mib: Vec<f64> = pids.iter().map(|p| rss_mib(*p)).collect();

    // Join tokens for the agents' IDs.
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        tokens.push(
            admin
                .create_join_token(CreateJoinTokenRequest {
                    spiffe_id: agent_id(i),
                    ttl_seconds: 3600,
                })
                .await?
                .into_inner()
                .token,
        );
    }

    let seen = Arc::new(Seen {
        t0: Instant::now(),
        probes: Mutex::default(),
        told: (0..n).map(|_| AtomicU64::new(0)).collect(),
        reminted: (0..n).map(|_| AtomicU64::new(0)).collect(),
        affected: (0..n).map(|_| AtomicBool::new(false)).collect(),
        bytes: AtomicU64::new(0),
        full_set: (0..n).map(|_| AtomicU64::new(0)).collect(),
        minted: AtomicU64::new(0),
    });
    let csrs = Arc::new(CsrPool::generate(per.max(1))?);

    // Attest, sync, mint: `concurrency` agents at a time.
    eprintln!("[{mode}] attesting {n} agents");
    let t = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let agents: Arc<Mutex<Vec<Option<Arc<SimAgent>>>>> = Arc::new(Mutex::new(vec![None; n]));
    let tokens = Arc::new(tokens);
    let ids_by_agent = Arc::new(ids_by_agent);
    let mut starters = Vec::new();
    // The agents' sync tasks, stopped when this mode ends.
    let syncing: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
    for _ in 0..args.concurrency.max(1) {
        let syncing = syncing.clone();
        let (next, agents, tokens, ids, seen, csrs, live, td, addrs) = (
            next.clone(),
            agents.clone(),
            tokens.clone(),
            ids_by_agent.clone(),
            seen.clone(),
            csrs.clone(),
            live.clone(),
            td.clone(),
            addrs.clone(),
        );
        starters.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let mut mine = addrs.clone();
                mine.rotate_left(i % addrs.len());
                let attester = NodeClient::new(
                    mine.clone(),
                    td.clone(),
                    live.clone(),
                    SvidResolver::default(),
                );
                let attested_at = Instant::now();
                let (svid, _) = ca_agent::attest::attest(
                    &attester,
                    &AttestationMethod::JoinToken(tokens[i].clone()),
                    false,
                )
                .await
                .map_err(|e| anyhow!("agent {i}: attestation: {e}"))?;
                let resolver = SvidResolver::default();
                resolver
                    .set(&svid.chain, &svid.key_pkcs8)
                    .map_err(|e| anyhow!("agent {i}: {e}"))?;
                let agent = Arc::new(SimAgent {
                    idx: i,
                    id: svid.spiffe_id.to_string(),
                    client: NodeClient::new(mine, td.clone(), live.clone(), resolver),
                    entry_ids: ids[i].clone(),
                    aki: Mutex::default(),
                });
                let (got, first) = tokio::sync::oneshot::channel();
                let task = tokio::spawn(sync_loop(
                    agent.clone(),
                    seen.clone(),
                    csrs.clone(),
                    watch,
                    attested_at,
                    got,
                ));
                syncing.lock().expect("tasks").push(task);
                let _ = first.await;
                mint(&agent, &csrs, &seen).await?;
                agents.lock().expect("agents")[i] = Some(agent);
            }
        }));
    }
    for s in starters {
        s.await??;
    }
    let fleet_start_secs = t.elapsed().as_secs_f64();
    let agents: Vec<Arc<SimAgent>> = agents
        .lock()
        .expect("agents")
        .iter()
        .map(|a| a.clone().expect("every agent started"))
        .collect();
    let full_set: Vec<Duration> = seen
        .full_set
        .iter()
        .map(|t| Duration::from_millis(t.load(Ordering::Relaxed).saturating_sub(1)))
        .collect();
    eprintln!(
        "[{mode}] fleet up in {fleet_start_secs:.1} s; steady state for {} s",
        args.window
    );

    // Steady state: renewals at the half-life rate, spread over the fleet.
    let renewing = Arc::new(AtomicBool::new(true));
    let per_sec = n as f64 / (args.svid_ttl as f64 / 2.0);
    let renewer = {
        let (agents, csrs, seen, renewing) =
            (agents.clone(), csrs.clone(), seen.clone(), renewing.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let mut done = 0usize;
            while renewing.load(Ordering::Relaxed) {
                let due = (start.elapsed().as_secs_f64() * per_sec) as usize;
                while done < due {
                    let a = agents[done % agents.len()].clone();
                    let (csrs, seen) = (csrs.clone(), seen.clone());
                    tokio::spawn(async move {
                        let _ = renew_agent(&a, &csrs).await;
                        let _ = mint(&a, &csrs, &seen).await;
                    });
                    done += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0: Vec<Duration> = pids
        .iter()
        .map(|p| crate::procstat::process_cpu(*p).unwrap_or_default())
        .collect();
    let bytes0 = seen.bytes.load(Ordering::Relaxed);
    let lo0 = loopback_bytes();
    let minted0 = seen.minted.load(Ordering::Relaxed);
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.window)).await;
    let wall = w0.elapsed();
    let nodes: Vec<NodeLoad> = pids
        .iter()
        .enumerate()
        .map(|(k, p)| NodeLoad {
            node: k as u64 + 1,
            cores_busy: (crate::procstat::process_cpu(*p)
                .unwrap_or_default()
                .saturating_sub(cpu0[k]))
            .as_secs_f64()
                / wall.as_secs_f64(),
            rss_mib: rss_mib(*p),
            rss_empty_mib: rss_empty[k],
        })
        .collect();
    let agent_bytes_per_sec =
        (seen.bytes.load(Ordering::Relaxed) - bytes0) as f64 / wall.as_secs_f64();
    let loopback_bytes_per_sec = (loopback_bytes() - lo0) as f64 / wall.as_secs_f64();
    let renewals_per_sec =
        (seen.minted.load(Ordering::Relaxed) - minted0) as f64 / wall.as_secs_f64();
    renewing.store(false, Ordering::Relaxed);
    let _ = renewer.await;

    let real_agent = if watch && args.real_agent_entries > 0 {
        eprintln!(
            "[{mode}] a real agent with {} entries",
            args.real_agent_entries
        );
        Some(real_agent(&cluster, args.real_agent_entries).await?)
    } else {
        None
    };

    // Probes: entries created one at a time under agents spread over the fleet.
    eprintln!("[{mode}] {} probe entries", args.probes);
    let mut started = Vec::new();
    for k in 0..args.probes {
        let owner = (k * 7919) % n;
        let sid = format!("spiffe://{TRUST_DOMAIN}/probe/{k}");
        seen.probes.lock().expect("probes").insert(sid.clone(), 0);
        let at = seen.ms();
        admin
            .create_entry(CreateEntryRequest {
                entry: Some(entry(sid.clone(), &agent_id(owner), 5000 + k)),
            })
            .await?;
        started.push((sid, at));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let entry_to_agent = loop {
        let probes = seen.probes.lock().expect("probes").clone();
        let arrived: Vec<Duration> = started
            .iter()
            .filter_map(|(sid, at)| match probes.get(sid) {
                Some(&got) if got > 0 => Some(Duration::from_millis(got.saturating_sub(*at))),
                _ => None,
            })
            .collect();
        if arrived.len() == started.len() || Instant::now() > deadline {
            break spread(arrived);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Revoke node 1's intermediate.
    let status = admin
        .get_ca_status(GetCaStatusRequest {})
        .await?
        .into_inner();
    let victim = status
        .authorities
        .iter()
        .find(|a| a.kind == "intermediate" && a.state == "active" && a.node_id == "bench-1")
        .context("node 1's active intermediate")?
        .id
        .clone();
    let victim_aki = {
        // The SVIDs of agent 0 (on node 1 first) are signed by it.
        agents[0].aki.lock().expect("aki").clone()
    };
    for a in &agents {
        let mine = a.aki.lock().expect("aki").clone();
        seen.affected[a.idx].store(mine == victim_aki, Ordering::Relaxed);
    }
    let affected = seen
        .affected
        .iter()
        .filter(|a| a.load(Ordering::Relaxed))
        .count();
    eprintln!("[{mode}] revoking {victim} ({affected} agents hold SVIDs it signed)");
    let at = seen.ms();
    admin
        .revoke_authority(RevokeAuthorityRequest {
            id: victim,
            kind: "intermediate".into(),
        })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let told = seen
            .told
            .iter()
            .filter(|t| t.load(Ordering::Relaxed) > 0)
            .count();
        let reminted = seen
            .reminted
            .iter()
            .filter(|t| t.load(Ordering::Relaxed) > 0)
            .count();
        if (told == n && reminted == affected) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let since = |v: &[AtomicU64], only: &dyn Fn(usize) -> bool| -> (Vec<Duration>, usize) {
        let mut out = Vec::new();
        let mut missing = 0;
        for (i, t) in v.iter().enumerate() {
            if !only(i) {
                continue;
            }
            match t.load(Ordering::Relaxed) {
                0 => missing += 1,
                got => out.push(Duration::from_millis(got.saturating_sub(at))),
            }
        }
        (out, missing)
    };
    let (told, told_missing) = since(&seen.told, &|_| true);
    let (reminted, reminted_missing) = since(&seen.reminted, &|i| {
        seen.affected[i].load(Ordering::Relaxed)
    });

    // Snapshot size.
    let mut snap = admin
        .save_snapshot(SaveSnapshotRequest { allow_stale: true })
        .await?
        .into_inner();
    let mut snapshot_bytes = 0u64;
    while let Some(c) = snap.message().await? {
        snapshot_bytes += c.data.len() as u64;
    }

    for t in syncing.lock().expect("tasks").drain(..) {
        t.abort();
    }
    let catch_up = if watch {
        eprintln!("[{mode}] an empty node joins");
        let (took, st) = cluster.add_empty_node(exe).await?;
        Some((took.as_secs_f64(), st.snapshot_index))
    } else {
        None
    };
    cluster.stop().await;
    Ok(ModeReport {
        mode: mode.into(),
        agents: n,
        entries: n * per,
        register_secs,
        fleet_start_secs,
        full_set: spread(full_set),
        nodes,
        agent_bytes_per_sec,
        loopback_bytes_per_sec,
        renewals_per_sec,
        entry_to_agent,
        revoke_told: spread(told),
        revoke_reminted: spread(reminted),
        revoke_missing: (told_missing, reminted_missing),
        snapshot_bytes,
        real_agent,
        rss_entries_mib,
        catch_up,
    })
}

/// Starts the `agent` program in watch mode on the cluster with `entries` entries, waits
/// until it holds them all and their SVIDs (its `/readyz`), and reads its RSS.
async fn real_agent(cluster: &CaCluster, entries: usize) -> anyhow::Result<(usize, f64)> {
    let dir = tempfile::Builder::new()
        .prefix("ca-bench-agent-")
        .tempdir()?;
    let id = format!("spiffe://{TRUST_DOMAIN}/agent/real");
    let mut admin = cluster.nodes[0].admin().await?;
    let token = admin
        .create_join_token(CreateJoinTokenRequest {
            spiffe_id: id.clone(),
            ttl_seconds: 600,
        })
        .await?
        .into_inner()
        .token;
    let all: Vec<Entry> = (0..entries)
        .map(|k| {
            entry(
                format!("spiffe://{TRUST_DOMAIN}/real/w{k}"),
                &id,
                20_000 + k,
            )
        })
        .collect();
    for chunk in all.chunks(1000) {
        admin
            .batch_create_entries(BatchCreateEntriesRequest {
                entries: chunk.to_vec(),
            })
            .await?;
    }
    let pem = admin
        .get_bundle(GetBundleRequest {})
        .await?
        .into_inner()
        .pem;
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, pem)?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token)?;
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let health = ca_test_support::free_port();
    let health: std::net::SocketAddr = format!("127.0.0.1:{health}").parse()?;
    let servers: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("\"{}\"", n.node_addr))
        .collect();
    let config = format!(
        "trust_domain = \"{TRUST_DOMAIN}\"\nserver_addresses = [{}]\ndata_dir = \"{}\"\nsocket_path = \"{}\"\ntrust_bundle_path = \"{}\"\njoin_token_file = \"{}\"\nhealth_addr = \"{health}\"\nlog_level = \"warn\"\n",
        servers.join(", "),
        dir.path().join("data").display(),
        dir.path().join("agent.sock").display(),
        bundle.display(),
        token_file.display(),
    );
    let config_path = dir.path().join("agent.toml");
    std::fs::write(&config_path, config)?;
    let me = std::env::current_exe()?;
    let sibling = me.with_file_name("agent");
    let mut cmd = if sibling.is_file() {
        std::process::Command::new(sibling)
    } else {
        let mut c = std::process::Command::new(&me);
        c.env(AGENT_EXEC_ENV, "1");
        c
    };
    cmd.arg("run").arg("--config").arg(&config_path);
    let proc = ca_test_support::process::Proc::spawn("agent", cmd, &dir.path().join("agent.log"))?;
    let want = format!("({entries} entries, {entries} SVIDs)");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok((200, body)) = ca_test_support::http::get(health, "/readyz").await {
            if body.contains(&want) {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the real agent did not hold {entries} entries and SVIDs in 120 s; its log:\n{}",
                proc.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Settled: a few seconds of watching and renewal checks.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss = rss_mib(proc.pid());
    drop(proc);
    Ok((entries, rss))
}

/// Keeps one agent's entries and bundle current (watch or poll) and records what the
/// measurements need; `first` fires after the first complete update.
async fn sync_loop(
    agent: Arc<SimAgent>,
    seen: Arc<Seen>,
    csrs: Arc<CsrPool>,
    watch: bool,
    attested_at: Instant,
    first: tokio::sync::oneshot::Sender<()>,
) {
    let mut first = Some(first);
    let mut revision = 0u64;
    loop {
        let r: anyhow::Result<()> = async {
            if watch {
                let from = revision;
                let mut stream = agent
                    .client
                    .call("WatchEntries", false, |mut c| async move {
                        c.watch_entries(WatchEntriesRequest { revision: from })
                            .await
                    })
                    .await?
                    .into_inner();
                while let Some(m) = stream.message().await? {
                    note(
                        &agent,
                        &seen,
                        &csrs,
                        m.encoded_len(),
                        &m.entries,
                        &m.tainted_x509_authority_key_ids,
                    );
                    if !m.more {
                        revision = m.revision;
                        first_update_done(&mut first, &seen, agent.idx, attested_at);
                    }
                }
                Ok(())
            } else {
                let m = agent
                    .client
                    .call("SyncEntries", false, |mut c| async move {
                        c.sync_entries(SyncEntriesRequest {}).await
                    })
                    .await?
                    .into_inner();
                note(
                    &agent,
                    &seen,
                    &csrs,
                    m.encoded_len(),
                    &m.entries,
                    &m.tainted_x509_authority_key_ids,
                );
                first_update_done(&mut first, &seen, agent.idx, attested_at);
                tokio::time::sleep(POLL_EVERY).await;
                Ok(())
            }
        }
        .await;
        if let Err(e) = r {
            log_once(&agent, &e);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Records the time from attestation to the agent's first complete update, once.
fn first_update_done(
    first: &mut Option<tokio::sync::oneshot::Sender<()>>,
    seen: &Seen,
    idx: usize,
    attested_at: Instant,
) {
    if let Some(f) = first.take() {
        seen.full_set[idx].store(
            attested_at.elapsed().as_millis() as u64 + 1,
            Ordering::Relaxed,
        );
        let _ = f.send(());
    }
}

fn log_once(agent: &SimAgent, e: &anyhow::Error) {
    static LOGGED: AtomicUsize = AtomicUsize::new(0);
    if LOGGED.fetch_add(1, Ordering::Relaxed) < 10 {
        eprintln!("agent {}: {e:#}", agent.id);
    }
}

/// Records a message of `bytes`: probe arrivals and a taint notice (re-minting if this
/// agent's SVIDs are affected).
fn note(
    agent: &Arc<SimAgent>,
    seen: &Arc<Seen>,
    csrs: &Arc<CsrPool>,
    bytes: usize,
    got: &[Entry],
    tainted: &[Vec<u8>],
) {
    seen.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    for e in got {
        if e.spiffe_id.contains("/probe/") {
            let mut p = seen.probes.lock().expect("probes");
            if let Some(t) = p.get_mut(&e.spiffe_id) {
                if *t == 0 {
                    *t = seen.ms();
                }
            }
        }
    }
    if !tainted.is_empty() && seen.told[agent.idx].load(Ordering::Relaxed) == 0 {
        seen.told[agent.idx].store(seen.ms(), Ordering::Relaxed);
        let mine = agent.aki.lock().expect("aki").clone();
        if tainted.contains(&mine) {
            let (agent, seen, csrs) = (agent.clone(), seen.clone(), csrs.clone());
            tokio::spawn(async move {
                for _ in 0..300 {
                    let before = agent.aki.lock().expect("aki").clone();
                    match mint(&agent, &csrs, &seen).await {
                        Ok(()) if *agent.aki.lock().expect("aki") != before => {
                            seen.reminted[agent.idx].store(seen.ms(), Ordering::Relaxed);
                            return;
                        }
                        Ok(()) => log_once(&agent, &anyhow!("re-minted by the revoked authority")),
                        Err(e) => log_once(&agent, &e),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
    }
}

/// Mints the SVIDs of all of `agent`'s entries in one call; records their issuer.
async fn mint(agent: &SimAgent, csrs: &CsrPool, seen: &Seen) -> anyhow::Result<()> {
    let params: Vec<NewX509SvidParams> = agent
        .entry_ids
        .iter()
        .enumerate()
        .map(|(k, id)| NewX509SvidParams {
            entry_id: id.clone(),
            csr: csrs.csrs[k % csrs.csrs.len()].clone(),
        })
        .collect();
    let req = BatchNewX509SvidRequest { params };
    let r = agent
        .client
        .call("BatchNewX509Svid", false, |mut c| {
            let req = req.clone();
            async move { c.batch_new_x509_svid(req).await }
        })
        .await?
        .into_inner();
    let mut aki = None;
    for res in &r.results {
        if !res.error.is_empty() || res.svid_chain.is_empty() {
            bail!("entry {}: {}", res.entry_id, res.error);
        }
        aki = ca_identity::x509::cert_info(&res.svid_chain[0])
            .ok()
            .and_then(|i| i.authority_key_id);
    }
    seen.minted
        .fetch_add(r.results.len() as u64, Ordering::Relaxed);
    if let Some(a) = aki {
        *agent.aki.lock().expect("aki") = a;
    }
    Ok(())
}

/// Renews the agent's own SVID (the key is reused: the node checks the CSR, not its age).
async fn renew_agent(agent: &SimAgent, csrs: &CsrPool) -> anyhow::Result<()> {
    let req = RenewAgentRequest {
        csr: csrs.csrs[0].clone(),
    };
    agent
        .client
        .call("RenewAgent", false, |mut c| {
            let req = req.clone();
            async move { c.renew_agent(req).await }
        })
        .await?;
    Ok(())
}

fn print(r: &Report) {
    println!("ca-node: {}", r.ca_node);
    for m in &r.modes {
        println!(
            "\n== sync = {} : {} agents, {} entries ==",
            m.mode, m.agents, m.entries
        );
        println!(
            "registered in {:.1} s; fleet attested and minted in {:.1} s",
            m.register_secs, m.fleet_start_secs
        );
        println!(
            "attestation -> full set: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            m.full_set.p50_ms, m.full_set.p99_ms, m.full_set.max_ms
        );
        for n in &m.nodes {
            println!(
                "node {}: {:.3} cores busy, RSS {:.0} MiB (empty: {:.0} MiB)",
                n.node, n.cores_busy, n.rss_mib, n.rss_empty_mib
            );
        }
        println!(
            "agents receive {:.0} payload bytes/s ({:.0} bytes/s through loopback, all node ports); {:.1} SVIDs/s renewed meanwhile",
            m.agent_bytes_per_sec, m.loopback_bytes_per_sec, m.renewals_per_sec
        );
        println!(
            "entry create -> agent ({}): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            m.entry_to_agent.n,
            m.entry_to_agent.p50_ms,
            m.entry_to_agent.p99_ms,
            m.entry_to_agent.max_ms
        );
        println!(
            "revoke -> every agent told ({}, {} missing): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            m.revoke_told.n,
            m.revoke_missing.0,
            m.revoke_told.p50_ms,
            m.revoke_told.p99_ms,
            m.revoke_told.max_ms
        );
        println!(
            "revoke -> affected SVIDs re-minted ({}, {} missing): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            m.revoke_reminted.n, m.revoke_missing.1, m.revoke_reminted.p50_ms, m.revoke_reminted.p99_ms, m.revoke_reminted.max_ms
        );
        println!(
            "snapshot: {:.1} MiB",
            m.snapshot_bytes as f64 / (1 << 20) as f64
        );
        println!(
            "node RSS with the entries, before agents: {:?} MiB",
            m.rss_entries_mib
                .iter()
                .map(|r| r.round())
                .collect::<Vec<_>>()
        );
        if let Some((secs, snap)) = m.catch_up {
            println!(
                "an empty node joined and caught up in {secs:.1} s ({})",
                if snap > 0 {
                    format!("snapshot at index {snap} installed")
                } else {
                    "log replayed".into()
                }
            );
        }
        if let Some((n, rss)) = m.real_agent {
            println!(
                "a real agent (sync = watch) holding {n} entries and their SVIDs: RSS {rss:.1} MiB"
            );
        }
    }
    if let (Some(w), Some(p)) = (
        r.modes.iter().find(|m| m.mode == "watch"),
        r.modes.iter().find(|m| m.mode == "poll"),
    ) {
        let cores = |m: &ModeReport| m.nodes.iter().map(|n| n.cores_busy).sum::<f64>();
        println!(
            "\nwatch / poll: node CPU {:.2}, agent bytes/s {:.3}, entry latency p50 {:.3}, revoke told p99 {:.3}",
            cores(w) / cores(p).max(1e-9),
            w.agent_bytes_per_sec / p.agent_bytes_per_sec.max(1e-9),
            w.entry_to_agent.p50_ms / p.entry_to_agent.p50_ms.max(1e-9),
            w.revoke_told.p99_ms / p.revoke_told.p99_ms.max(1e-9),
        );
    }
}

async fn run(args: &Args) -> anyhow::Result<Report> {
    let exe = args.ca_node.resolve()?;
    let mut modes = Vec::new();
    for m in &args.modes {
        modes.push(run_mode(&exe, args, m).await?);
    }
    Ok(Report {
        modes,
        ca_node: exe.describe(),
    })
}

/// Runs `agent-fleet`.
pub fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match crate::block_on(run(&args)) {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r).expect("json"));
            } else {
                print(&r);
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
