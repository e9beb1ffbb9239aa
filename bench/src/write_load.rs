//! `cluster-write-load`: entry writes per second on a durable three-node `ca-node` cluster on
//! loopback ([`crate::ca_cluster`]), next to a three-member etcd cluster ([`crate::etcd`])
//! doing puts of the same size at the same concurrency, in the same run.
//!
//! For each concurrency level, `C` client tasks each keep one request outstanding for a
//! warm-up and then a measured period: `CreateEntry` on the CA leader's admin API (every
//! entry a new SPIFFE ID), `KV.Put` on the etcd leader (a new key; the value is the same
//! entry, protobuf-encoded, so both store the same bytes). Both systems answer only once the
//! write is committed by a majority and on disk. The two take turns: each level's measured
//! period is cut into `--slices` slices per system, run CA, etcd, etcd, CA, CA, etcd, ...
//! (which goes first also alternates from one level to the next), so that a machine whose
//! speed drifts over seconds (a shared VM) slows both alike instead of whichever ran in the
//! slower stretch. Each slice after a system's first at a level gets [`SLICE_WARMUP`] of
//! unmeasured load first, so its pipeline is full when measuring starts.
//!
//! Every acknowledged write is checked afterwards: the CA's entry count on a follower (a
//! linearizable read) and etcd's revision must both equal the number of acknowledged writes.
//!
//! ```text
//! cargo build --release -p ca-bench -p ca-node-cli
//! cargo run --release -p ca-bench --bin cluster-write-load                 # table
//! cargo run --release -p ca-bench --bin cluster-write-load -- --json       # JSON
//! ```

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use ca_proto::admin::{CreateEntryRequest, ListEntriesRequest};
use ca_proto::types::{Entry, Selector};
use clap::Parser;
use prost::Message as _;
use serde::Serialize;

use crate::ca_cluster::CaCluster;
use crate::etcd::{pb, EtcdCluster, PeerTransport};
use crate::node::{NodeExe, TRUST_DOMAIN};

/// Command line of `cluster-write-load`.
#[derive(Parser, Debug)]
#[command(
    name = "cluster-write-load",
    about = "Entry writes/s on a durable 3-node ca-node cluster vs etcd puts at the same concurrency"
)]
pub struct Args {
    /// Concurrency levels (requests in flight), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
    /// Measured seconds per level and system.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Warm-up seconds before each system's first slice at a level.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Slices the measured period of each level is cut into, per system (alternating).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub slices: u32,
    /// Cluster size (both systems).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// The ca-node executable: `auto` (beside this one, else this one re-run as ca-node),
    /// `self`, or a path.
    #[arg(long, default_value = "auto")]
    pub ca_node: NodeExe,
    /// The etcd executable (default: ETCD_BIN, else `etcd` on the PATH).
    #[arg(long)]
    pub etcd: Option<PathBuf>,
    /// How etcd's members talk to each other: `tls` (mutually authenticated, as the CA's
    /// nodes always do) or `plain` (etcd's default, plain HTTP).
    #[arg(long, value_enum, default_value = "tls")]
    pub etcd_peers: PeerTransport,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Exit non-zero when the CA writes fewer per second than etcd at any level.
    #[arg(long)]
    pub check_target: bool,
}

impl Args {
    /// One slice of a level's measured period; a system is measured `slices` of them.
    fn slice(&self) -> Duration {
        Duration::from_secs(self.duration) / self.slices
    }

    /// What each system is measured per level: its slices together (`--duration`, less
    /// what does not divide into whole slices).
    fn measured_per_level(&self) -> Duration {
        self.slice() * self.slices
    }
}

/// One system at one concurrency level.
#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    /// Writes acknowledged in the measured period.
    pub writes: u64,
    /// Writes per second.
    pub per_second: f64,
    /// Latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Failed requests (any period).
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// CPU seconds of all the system's processes per 1000 writes in the measured period.
    pub cpu_ms_per_write: f64,
}

/// One concurrency level.
#[derive(Clone, Debug, Serialize)]
pub struct Level {
    /// Requests in flight.
    pub concurrency: usize,
    /// The CA cluster.
    pub ca: Measured,
    /// etcd.
    pub etcd: Measured,
    /// CA writes/s ÷ etcd writes/s.
    pub ratio: f64,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Machine.
    pub machine: crate::report::Machine,
    /// Nodes per cluster.
    pub nodes: usize,
    /// etcd's version line.
    pub etcd_version: String,
    /// How etcd's members talked to each other.
    pub etcd_peers: PeerTransport,
    /// How ca-node was run.
    pub ca_node: String,
    /// Bytes of one write's value (the encoded entry).
    pub value_bytes: usize,
    /// Measured seconds per level and system, and the alternating slices they were cut into.
    pub measured: (f64, u32),
    /// Per level.
    pub levels: Vec<Level>,
    /// Writes acknowledged in all (verified against each system's state).
    pub verified: (u64, u64),
}

/// Unmeasured load before every slice but a system's first at a level.
pub const SLICE_WARMUP: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    measured: u64,
    acked: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `op(seq)` from `concurrency` tasks for `warmup` + `duration`; `seq` is unique across
/// calls (from `counter`). Returns the tally of the measured period (acks of both periods).
async fn drive<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    counter: Arc<AtomicU64>,
    op: F,
) -> Tally
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let op = op.clone();
        let counter = counter.clone();
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = Tally::default();
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let seq = counter.fetch_add(1, Ordering::Relaxed);
                match op(seq).await {
                    Ok(()) => {
                        local.acked += 1;
                        let t1 = Instant::now();
                        if t0 >= measure_from && t1 <= end {
                            local.measured += 1;
                            local.latencies.push(t1 - t0);
                        }
                    }
                    Err(e) => {
                        local.errors += 1;
                        if local.first_error.is_none() {
                            local.first_error = Some(format!("{e:#}"));
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            tally.lock().expect("tally").add(local);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Arc::try_unwrap(tally)
        .ok()
        .expect("tasks done")
        .into_inner()
        .expect("tally")
}

impl Tally {
    /// Adds another tally (of a client task, or of a slice).
    fn add(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.measured += other.measured;
        self.acked += other.acked;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// [`drive`], and the CPU the processes `pids` used meanwhile, scaled to the measured share
/// of the drive (warm-up excluded).
async fn drive_with_cpu<F, Fut>(
    pids: &[u32],
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    counter: Arc<AtomicU64>,
    op: F,
) -> (Tally, Duration)
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let cpu0 = cpu_of(pids);
    let t0 = Instant::now();
    let t = drive(concurrency, warmup, duration, counter, op).await;
    let cpu = cpu_of(pids).saturating_sub(cpu0);
    let share = duration.as_secs_f64() / t0.elapsed().as_secs_f64();
    (t, cpu.mul_f64(share))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn cpu_of(pids: &[u32]) -> Duration {
    pids.iter()
        .filter_map(|p| crate::procstat::process_cpu(*p).ok())
        .sum()
}

fn measured(mut t: Tally, duration: Duration, cpu: Duration) -> Measured {
    t.latencies.sort();
    Measured {
        writes: t.measured,
        per_second: t.measured as f64 / duration.as_secs_f64(),
        p50_ms: percentile(&t.latencies, 0.5),
        p99_ms: percentile(&t.latencies, 0.99),
        errors: t.errors,
        first_error: t.first_error,
        cpu_ms_per_write: if t.measured == 0 {
            0.0
        } else {
            cpu.as_secs_f64() * 1000.0 / t.measured as f64
        },
    }
}

/// The entry written for sequence number `seq`.
pub fn entry(seq: u64) -> Entry {
    Entry {
        spiffe_id: format!("spiffe://{TRUST_DOMAIN}/workload/w{seq:08}"),
        parent_id: format!("spiffe://{TRUST_DOMAIN}/agent/bench"),
        selectors: vec![
            Selector {
                r#type: "unix".into(),
                value: format!("uid:{}", 10_000 + seq % 50_000),
            },
            Selector {
                r#type: "unix".into(),
                value: "path:/usr/local/bin/service".into(),
            },
        ],
        ..Default::default()
    }
}

/// Runs the benchmark.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs levels of at least 1");
    }
    let exe = args.ca_node.resolve()?;
    let etcd_bin = crate::etcd::find_etcd(args.etcd.as_deref())?;
    eprintln!("starting {} ca-nodes ({})", args.nodes, exe.describe());
    let ca = CaCluster::start(&exe, args.nodes).await?;
    eprintln!(
        "starting {} etcd members ({})",
        args.nodes,
        etcd_bin.display()
    );
    let etcd = EtcdCluster::start(&etcd_bin, args.nodes, args.etcd_peers).await?;
    let result = run_levels(args, &ca, &etcd).await;
    let (ca_dir, version) = (ca.dir().to_owned(), etcd.version.clone());
    ca.stop().await;
    etcd.stop().await;
    let (levels, verified) =
        result.with_context(|| format!("ca-node logs in {}", ca_dir.display()))?;
    Ok(Report {
        machine: crate::report::Machine::detect(),
        nodes: args.nodes,
        etcd_version: version,
        etcd_peers: args.etcd_peers,
        ca_node: exe.describe(),
        value_bytes: entry(0).encoded_len(),
        measured: (args.measured_per_level().as_secs_f64(), args.slices),
        levels,
        verified,
    })
}

async fn run_levels(
    args: &Args,
    ca: &CaCluster,
    etcd: &EtcdCluster,
) -> anyhow::Result<(Vec<Level>, (u64, u64))> {
    let warmup = Duration::from_secs(args.warmup);
    let slice = args.slice();
    let measured_for = args.measured_per_level();
    let ca_leader = ca.leader().await?;
    let ca_client = ca.nodes[ca_leader].admin().await?;
    let etcd_leader = etcd.leader().await?;
    let kv = EtcdCluster::kv(etcd.channel(etcd_leader).await?);
    let ca_pids: Vec<u32> = ca.nodes.iter().map(|n| n.pid()).collect();
    let etcd_pids: Vec<u32> = etcd.members.iter().filter_map(|m| m.pid()).collect();
    let ca_seq = Arc::new(AtomicU64::new(0));
    let etcd_seq = Arc::new(AtomicU64::new(0));
    let (mut ca_acked, mut etcd_acked) = (0, 0);
    let max_revision = Arc::new(AtomicU64::new(0));
    let mut levels = Vec::new();
    for (li, &c) in args.concurrency.iter().enumerate() {
        let run_ca = |warmup| {
            let client = ca_client.clone();
            let seq = ca_seq.clone();
            let pids = ca_pids.clone();
            async move {
                drive_with_cpu(&pids, c, warmup, slice, seq, move |s| {
                    let mut client = client.clone();
                    async move {
                        client
                            .create_entry(CreateEntryRequest {
                                entry: Some(entry(s)),
                            })
                            .await
                            .map(|_| ())
                            .map_err(|st| anyhow::anyhow!("{:?}: {}", st.code(), st.message()))
                    }
                })
                .await
            }
        };
        let run_etcd = |warmup| {
            let kv = kv.clone();
            let seq = etcd_seq.clone();
            let pids = etcd_pids.clone();
            let maxrev = max_revision.clone();
            async move {
                drive_with_cpu(&pids, c, warmup, slice, seq, move |s| {
                    let mut kv = kv.clone();
                    let maxrev = maxrev.clone();
                    async move {
                        let r = kv
                            .put(pb::PutRequest {
                                key: format!("/spiffe-ca/entries/w{s:08}").into_bytes(),
                                value: entry(s).encode_to_vec(),
                                ..Default::default()
                            })
                            .await
                            .map_err(|st| anyhow::anyhow!("{:?}: {}", st.code(), st.message()))?
                            .into_inner();
                        let rev = r.header.map(|h| h.revision).unwrap_or_default();
                        maxrev.fetch_max(rev as u64, Ordering::Relaxed);
                        Ok(())
                    }
                })
                .await
            }
        };
        eprintln!("concurrency {c}: measuring");
        let (mut ct, mut et) = (Tally::default(), Tally::default());
        let (mut ccpu, mut ecpu) = (Duration::ZERO, Duration::ZERO);
        for s in 0..args.slices as usize {
            let warm = if s == 0 { warmup } else { SLICE_WARMUP };
            for ca_turn in [true, false].map(|first| first == ((li + s) % 2 == 0)) {
                if ca_turn {
                    let (t, cpu) = run_ca(warm).await;
                    ct.add(t);
                    ccpu += cpu;
                } else {
                    let (t, cpu) = run_etcd(warm).await;
                    et.add(t);
                    ecpu += cpu;
                }
            }
        }
        ca_acked += ct.acked;
        etcd_acked += et.acked;
        let cam = measured(ct, measured_for, ccpu);
        let etm = measured(et, measured_for, ecpu);
        levels.push(Level {
            concurrency: c,
            ratio: if etm.per_second > 0.0 {
                cam.per_second / etm.per_second
            } else {
                0.0
            },
            ca: cam,
            etcd: etm,
        });
    }
    // Every acknowledged write is there: on a CA follower (linearizable read) and in etcd's
    // revision (one per put, from 1 on an empty store).
    let follower = (ca_leader + 1) % ca.nodes.len();
    let listed = ca.nodes[follower]
        .admin()
        .await?
        .max_decoding_message_size(ca_node_cli::ADMIN_MAX_MESSAGE_BYTES)
        .list_entries(ListEntriesRequest::default())
        .await?
        .into_inner()
        .entries
        .len() as u64;
    if listed != ca_acked {
        bail!("the CA acknowledged {ca_acked} entries but a follower lists {listed}");
    }
    let rev = max_revision.load(Ordering::Relaxed);
    if rev != etcd_acked + 1 {
        bail!(
            "etcd acknowledged {etcd_acked} puts but its revision is {rev} (expected {})",
            etcd_acked + 1
        );
    }
    Ok((levels, (ca_acked, etcd_acked)))
}

/// Prints the report as a table.
pub fn print_table(r: &Report) {
    println!(
        "cluster-write-load: {} nodes each, loopback, durable (fsync) logs; {} CPUs; {}, peers over {}",
        r.nodes,
        r.machine.cores,
        r.etcd_version,
        match r.etcd_peers {
            PeerTransport::Tls => "mutual TLS (as the CA's nodes)",
            PeerTransport::Plain => "plain HTTP",
        }
    );
    println!(
        "ca-node: {}; value {} bytes; verified {} CA entries and {} etcd puts",
        r.ca_node, r.value_bytes, r.verified.0, r.verified.1
    );
    println!(
        "each level: {} s measured per system, in {} slices taking turns",
        r.measured.0, r.measured.1
    );
    println!(
        "{:>5} | {:>9} {:>7} {:>7} {:>8} | {:>9} {:>7} {:>7} {:>8} | {:>6}",
        "conc",
        "CA w/s",
        "p50 ms",
        "p99 ms",
        "CPU ms/w",
        "etcd w/s",
        "p50 ms",
        "p99 ms",
        "CPU ms/w",
        "CA/etcd"
    );
    for l in &r.levels {
        println!(
            "{:>5} | {:>9.0} {:>7.2} {:>7.2} {:>8.3} | {:>9.0} {:>7.2} {:>7.2} {:>8.3} | {:>6.2}",
            l.concurrency,
            l.ca.per_second,
            l.ca.p50_ms,
            l.ca.p99_ms,
            l.ca.cpu_ms_per_write,
            l.etcd.per_second,
            l.etcd.p50_ms,
            l.etcd.p99_ms,
            l.etcd.cpu_ms_per_write,
            l.ratio
        );
        for (who, m) in [("CA", &l.ca), ("etcd", &l.etcd)] {
            if let Some(e) = &m.first_error {
                println!("      {who}: {} failed requests; first: {e}", m.errors);
            }
        }
    }
}

/// The binary's main.
pub fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match crate::block_on(run(&args)) {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r).expect("json"));
            } else {
                print_table(&r);
            }
            let missed: Vec<_> = r.levels.iter().filter(|l| l.ratio < 1.0).collect();
            if args.check_target && !missed.is_empty() {
                eprintln!(
                    "target missed: the CA wrote fewer entries per second than etcd put keys at concurrency {:?}",
                    missed.iter().map(|l| l.concurrency).collect::<Vec<_>>()
                );
                return std::process::ExitCode::from(2);
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
