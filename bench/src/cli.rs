//! `issuance-load`: the command line and the run, start to finish.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;

use crate::backend::{Backend, BackendKind, RawSigning};
use crate::baseline;
use crate::load::{self, CsrPool, Limit, Load};
use crate::node::{NodeExe, NodeProcess, NodeSettings};
use crate::procstat;
use crate::report::{
    BackendResult, InFlight, Latency, LoadInfo, Machine, Measured, NodeInfo, Report, ServerMetrics,
    TARGET_CPU_US_PER_SVID,
};

/// Drives a real `ca-node` (separate process) with `BatchNewX509Svid` over mTLS gRPC and
/// reports the node's CPU time per issued X.509-SVID next to the raw cost of one P-256
/// signature plus one verification measured in the same run; with `--backend softhsm|kms`,
/// also SVIDs/s next to that backend's raw signing rate measured in the same run.
#[derive(Parser, Debug, Clone)]
#[command(name = "issuance-load", version)]
pub struct Args {
    /// Where the node keeps its CA keys: `soft` (PKCS#8 files), `softhsm` (a SoftHSM2 token
    /// made for the run, `type = "pkcs11"`) or `kms` (the AWS KMS emulator moto on
    /// 127.0.0.1, `type = "aws_kms"`). For `softhsm` and `kms` the backend's raw signing
    /// rate is measured too, in this process, right before and right after the measured
    /// phase (the node up but idle).
    #[arg(long, value_enum, default_value_t = BackendKind::Soft)]
    pub backend: BackendKind,
    /// Signatures the raw backend measurement keeps in flight; default: as many as the node
    /// can have outstanding, `--concurrency` × `--batch` (the node signs up to 32 CSRs of a
    /// call at once), for PKCS#11 at most the session pool (8).
    #[arg(long)]
    pub raw_in_flight: Option<usize>,
    /// Seconds of the raw backend measurement, split in two rounds (each after 1 s of
    /// warm-up): right before and right after the node's measured phase.
    #[arg(long, default_value_t = 6.0)]
    pub raw_secs: f64,
    /// KMS only: put a proxy in front of the emulator that delays every `Sign` by this many
    /// milliseconds (a network round trip to a real KMS), for the node and the raw
    /// measurement alike.
    #[arg(long)]
    pub kms_latency_ms: Option<u64>,
    /// Exit with status 2 when the run misses its target: SVIDs/s >= 70 % (softhsm) or
    /// 85 % (kms) of the raw signing rate; for soft, <= 100 µs of node CPU per SVID.
    #[arg(long)]
    pub check_targets: bool,
    /// The node executable: `auto` (the `ca-node` next to this executable, else `self`),
    /// `self` (this executable re-run as ca-node), or a path to a `ca-node` binary.
    #[arg(long, default_value = "auto")]
    pub ca_node: NodeExe,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Instead of a duration: stop after asking for this many SVIDs (whole batches).
    #[arg(long)]
    pub count: Option<u64>,
    /// Seconds of unmeasured load first (connections, caches, allocator).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// TLS connections the requests are spread over (all with the one agent's SVID).
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// CSRs per BatchNewX509Svid request.
    #[arg(long, default_value_t = 10)]
    pub batch: usize,
    /// Entries registered under the agent (requests cycle through them).
    #[arg(long, default_value_t = 10)]
    pub entries: usize,
    /// Distinct pre-generated CSRs (fresh P-256 keys) the requests cycle through.
    #[arg(long, default_value_t = 512)]
    pub csr_pool: usize,
    /// Verify one issued certificate in this many in full (chain to the bundle, SPIFFE
    /// ID, public key); 0: none (every result is still checked for an error).
    #[arg(long, default_value_t = 50)]
    pub verify_every: u64,
    /// The node's `intermediate_mode`: `key_manager` or `memory` (default: the config's,
    /// i.e. `key_manager`).
    #[arg(long, value_parser = ["key_manager", "memory"])]
    pub intermediate_mode: Option<String>,
    /// A TOML file whose top-level keys replace those of the generated node configuration,
    /// e.g. a `[key_manager]` table for another backend, `[ttl]`, `log_level`.
    #[arg(long)]
    pub node_config: Option<PathBuf>,
    /// Worker threads of the node's runtime (`TOKIO_WORKER_THREADS`); default: one per core.
    #[arg(long)]
    pub node_threads: Option<usize>,
    /// Worker threads of this load process.
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// Seconds spent measuring the raw sign + verify baseline.
    #[arg(long, default_value_t = 3.0)]
    pub baseline_secs: f64,
    /// Exit with status 2 when the server CPU per SVID is above this many µs.
    #[arg(long)]
    pub max_cpu_us_per_svid: Option<f64>,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Keep the node's temporary directory (config, state, log) and print its path.
    #[arg(long)]
    pub keep_dir: bool,
}

fn secs(s: f64, what: &str) -> anyhow::Result<Duration> {
    if !(s.is_finite() && s >= 0.0) {
        bail!("--{what} must be a non-negative number of seconds");
    }
    Ok(Duration::from_secs_f64(s))
}

/// Prints progress on stderr.
macro_rules! progress {
    ($($t:tt)*) => { eprintln!("issuance-load: {}", format!($($t)*)) };
}

/// Runs the benchmark against a prepared backend; returns the report (errors in it do not
/// make this an `Err`).
pub async fn run(args: &Args, backend: &Backend) -> anyhow::Result<Report> {
    let duration = secs(args.duration, "duration")?;
    let warmup = secs(args.warmup, "warmup")?;
    let baseline_budget = secs(args.baseline_secs, "baseline-secs")?;
    let raw_budget = secs(args.raw_secs, "raw-secs")?;
    if args.entries == 0 || args.batch == 0 || args.concurrency == 0 || args.csr_pool == 0 {
        bail!("--entries, --batch, --concurrency and --csr-pool must be at least 1");
    }
    // The backend's [key_manager] first; --node-config's top-level keys replace it.
    let mut overlay = backend.key_manager_table().map(|km| {
        let mut t = toml::Table::new();
        t.insert("key_manager".into(), km.into());
        t
    });
    if let Some(p) = &args.node_config {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("reading --node-config {}", p.display()))?;
        let user = toml::from_str::<toml::Table>(&text)
            .with_context(|| format!("--node-config {}", p.display()))?;
        overlay.get_or_insert_with(toml::Table::new).extend(user);
    }
    let settings = NodeSettings {
        exe: args.ca_node.clone(),
        intermediate_mode: args.intermediate_mode.clone(),
        overlay,
        worker_threads: args.node_threads,
        keep_dir: args.keep_dir,
        env: backend.node_env(),
    };

    progress!("generating {} CSRs", args.csr_pool);
    let pool = tokio::task::spawn_blocking({
        let n = args.csr_pool;
        move || CsrPool::generate(n)
    })
    .await??;

    let node = NodeProcess::start(&settings).await?;
    progress!(
        "node pid {} ready at {} ({})",
        node.pid(),
        node.node_addr,
        node.exe.describe()
    );
    if backend.kind() != BackendKind::Soft {
        progress!("backend: {}", backend.describe());
    }
    let ca_alg = node.ca_key_algorithm()?;
    let raw = RawPlan {
        alg: ca_alg,
        in_flight: args.raw_in_flight.unwrap_or_else(|| {
            backend
                .kind()
                .default_raw_in_flight(args.concurrency, args.batch)
        }),
        budget: raw_budget / 2,
    };
    let result = drive(args, &node, backend, &raw, pool, duration, warmup).await;
    if result.is_err() {
        eprintln!(
            "issuance-load: node log tail ({}):\n{}",
            node.log_path.display(),
            node.log_tail(30)
        );
    }
    let node_info = NodeInfo {
        executable: node.exe.describe(),
        key_manager: node.key_manager(),
        intermediate_mode: node.intermediate_mode(),
        worker_threads: args.node_threads,
    };
    if let Some(dir) = node.stop().await? {
        progress!("kept the node's directory {}", dir.display());
    }
    let phase = result?;
    let msg = phase
        .sample_leaf
        .as_deref()
        .and_then(load::tbs_of)
        .unwrap_or_else(|| vec![0x5a; 512]);

    let backend_result = match backend.kind().target_ratio() {
        None => None,
        Some(target) => {
            let raw = RawSigning::combine(&phase.raw_rounds)
                .context("the raw signing rate was not measured")?;
            let ratio = if raw.signs_per_s > 0.0 {
                phase.measured.svids_per_s_wall / raw.signs_per_s
            } else {
                0.0
            };
            let m = &phase.measured;
            let svid_cpu_us = m.server_cpu_us_per_svid
                + m.client_cpu_us_per_svid
                + m.emulator_cpu_us_per_svid.unwrap_or(0.0);
            let sign_cpu_us =
                raw.process_cpu_us_per_sign + raw.emulator_cpu_us_per_sign.unwrap_or(0.0);
            Some(BackendResult {
                backend: backend.kind(),
                description: backend.describe(),
                cpu_us_per_svid_all: svid_cpu_us,
                cpu_us_per_raw_sign_all: sign_cpu_us,
                raw,
                raw_rounds: phase.raw_rounds,
                svids_per_s: phase.measured.svids_per_s_wall,
                ratio,
                target_ratio: target,
                target_met: phase.measured.svids_issued > 0 && ratio >= target,
            })
        }
    };

    progress!(
        "measuring raw P-256 sign + verify for {:.1} s",
        args.baseline_secs
    );
    let raw = std::thread::spawn(move || baseline::p256_ring(&msg, baseline_budget))
        .join()
        .map_err(|_| anyhow::anyhow!("the baseline thread panicked"))??;

    let m = phase.measured;
    let ratio = if raw.sign_plus_verify_cpu_us() > 0.0 {
        m.server_cpu_us_per_svid / raw.sign_plus_verify_cpu_us()
    } else {
        0.0
    };
    let mut error_samples = phase.error_samples;
    if (m.server_metrics.svids_ok - m.svids_issued as f64).abs() > 0.5 {
        error_samples.push(format!(
            "the node counted {} SVIDs issued in the measured phase, the load {}",
            m.server_metrics.svids_ok, m.svids_issued
        ));
    }
    Ok(Report {
        machine: Machine::detect(),
        node: node_info,
        load: LoadInfo {
            entries: args.entries,
            batch: args.batch,
            concurrency: args.concurrency,
            connections: args.connections.max(1),
            csr_pool: args.csr_pool,
            verify_every: args.verify_every,
            limit: match args.count {
                Some(n) => format!("{n} SVIDs"),
                None => format!("{:.1} s", args.duration),
            },
            warmup_s: args.warmup,
            client_threads: args.client_threads,
        },
        warmup_errors: phase.warmup_errors,
        target_met: m.svids_issued > 0 && m.server_cpu_us_per_svid <= TARGET_CPU_US_PER_SVID,
        measured: m,
        baseline: raw,
        ratio_to_raw: ratio,
        target_cpu_us_per_svid: TARGET_CPU_US_PER_SVID,
        backend: backend_result,
        error_samples,
    })
}

/// How the backend's raw rate is measured: two rounds of `budget` (after 1 s of warm-up
/// each), one right before and one right after the node's measured phase, while the node
/// is up but idle. Bracketing the phase evens out what other work on the machine does to
/// either side.
struct RawPlan {
    alg: ca_kms::KeyAlgorithm,
    in_flight: usize,
    budget: Duration,
}

impl RawPlan {
    fn measure(&self, backend: &Backend, round: &str, msg: &[u8]) -> anyhow::Result<RawSigning> {
        progress!(
            "measuring the raw {} signing rate ({}, {} in flight) for {:.1} s ({round} the load)",
            backend.kind().as_str(),
            self.alg,
            self.in_flight,
            self.budget.as_secs_f64()
        );
        tokio::task::block_in_place(|| {
            backend.measure_raw(
                &format!("raw-signing-{round}"),
                self.alg,
                msg.to_vec(),
                self.in_flight,
                Duration::from_secs(1),
                self.budget,
            )
        })
    }
}

struct Phase {
    raw_rounds: Vec<RawSigning>,
    measured: Measured,
    warmup_errors: u64,
    error_samples: Vec<String>,
    sample_leaf: Option<Vec<u8>>,
}

async fn drive(
    args: &Args,
    node: &NodeProcess,
    backend: &Backend,
    raw: &RawPlan,
    pool: CsrPool,
    duration: Duration,
    warmup: Duration,
) -> anyhow::Result<Phase> {
    let target = load::prepare(node, args.entries, args.connections).await?;
    progress!(
        "agent {} attested; {} entries registered",
        target.agent_id,
        target.entries.len()
    );
    let load = Arc::new(Load::new(
        target,
        pool,
        args.batch,
        args.concurrency,
        args.verify_every,
    )?);

    let mut error_samples = Vec::new();
    let mut warmup_errors = 0;
    let mut sample = None;
    if !warmup.is_zero() {
        progress!("warming up for {:.1} s", warmup.as_secs_f64());
        let w = load.run(Limit::Time(warmup)).await;
        warmup_errors = w.errors;
        error_samples.extend(w.error_samples);
        sample = w.sample_leaf;
    }

    let mut raw_rounds = Vec::new();
    let mut tbs = None;
    if backend.kind().target_ratio().is_some() {
        // A TBSCertificate of this node to sign: from the warm-up, or one call now.
        if sample.is_none() {
            let s = load.run(Limit::Count(1)).await;
            warmup_errors += s.errors;
            error_samples.extend(s.error_samples);
            sample = s.sample_leaf;
        }
        let msg = sample
            .as_deref()
            .and_then(load::tbs_of)
            .context("no certificate to take a TBSCertificate from")?;
        raw_rounds.push(raw.measure(backend, "before", &msg)?);
        tbs = Some(msg);
    }

    let limit = match args.count {
        Some(n) => Limit::Count(n),
        None => Limit::Time(duration),
    };
    match limit {
        Limit::Time(d) => progress!("measuring for {:.1} s", d.as_secs_f64()),
        Limit::Count(n) => progress!("measuring {n} SVIDs"),
    }
    let m0 = node.metrics().await?;
    let (s0, c0, e0) = (node.cpu()?, procstat::own_cpu()?, backend.emulator_cpu());
    let sampler = InFlightSampler::start(node.http_addr);
    let r = load.run(limit).await;
    let (s1, c1, e1) = (node.cpu()?, procstat::own_cpu()?, backend.emulator_cpu());
    let in_flight = sampler.stop().await;
    let m1 = node.metrics().await?;
    error_samples.extend(r.error_samples.iter().cloned());
    if let Some(msg) = &tbs {
        raw_rounds.push(raw.measure(backend, "after", msg)?);
    }

    let server_user = s1.0.saturating_sub(s0.0).as_secs_f64();
    let server_sys = s1.1.saturating_sub(s0.1).as_secs_f64();
    let server_cpu = server_user + server_sys;
    let client_cpu = c1.saturating_sub(c0).as_secs_f64();
    let wall = r.wall.as_secs_f64();
    let per = |x: f64| {
        if r.issued > 0 {
            x * 1e6 / r.issued as f64
        } else {
            0.0
        }
    };
    let mut lat = r.latencies_us.clone();
    lat.sort_by(f64::total_cmp);
    let mean_us = if lat.is_empty() {
        0.0
    } else {
        lat.iter().sum::<f64>() / lat.len() as f64
    };
    let delta = |name: &str, label: &str| m1.sum(name, label) - m0.sum(name, label);
    // Mean of a histogram over the phase, from its samples whose labels contain `label`
    // (all samples when none do).
    let hist_mean_us = |name: &str, label: &str| {
        let (sum, count) = (format!("{name}_sum"), format!("{name}_count"));
        let label = if delta(&count, label) > 0.0 {
            label
        } else {
            ""
        };
        let n = delta(&count, label);
        if n > 0.0 {
            delta(&sum, label) / n * 1e6
        } else {
            0.0
        }
    };
    let server_us = per(server_cpu);
    Ok(Phase {
        raw_rounds,
        measured: Measured {
            wall_s: wall,
            requests: r.requests,
            svids_issued: r.issued,
            errors: r.errors,
            verified: r.verified,
            svids_per_s_wall: if wall > 0.0 {
                r.issued as f64 / wall
            } else {
                0.0
            },
            server_cpu_s: server_cpu,
            server_user_s: server_user,
            server_system_s: server_sys,
            server_cpu_us_per_svid: server_us,
            server_cores_busy: if wall > 0.0 { server_cpu / wall } else { 0.0 },
            svids_per_server_core_s: if server_us > 0.0 {
                1e6 / server_us
            } else {
                0.0
            },
            client_cpu_us_per_svid: per(client_cpu),
            emulator_cpu_us_per_svid: match (e0, e1) {
                (Some(a), Some(b)) => Some(per(b.saturating_sub(a).as_secs_f64())),
                _ => None,
            },
            node_sign_in_flight: in_flight,
            latency: Latency {
                p50_us: load::percentile(&lat, 0.50),
                p99_us: load::percentile(&lat, 0.99),
                max_us: lat.last().copied().unwrap_or(0.0),
                mean_us,
            },
            server_metrics: ServerMetrics {
                svids_ok: delta("ca_x509_svids_issued_total", "result=\"ok\""),
                svids_error: delta("ca_x509_svids_issued_total", "result=\"error\""),
                issue_mean_us: hist_mean_us("ca_x509_svid_issue_seconds", "kind=\"workload\""),
                sign_mean_us: hist_mean_us("ca_keymanager_sign_seconds", "role=\"intermediate\""),
            },
        },
        warmup_errors,
        error_samples,
        sample_leaf: r.sample_leaf,
    })
}

/// Samples the node's `ca_keymanager_in_flight` gauge (key-manager operations under way)
/// every 100 ms: how many signatures the node really had outstanding.
struct InFlightSampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<f64>>,
}

impl InFlightSampler {
    fn start(addr: std::net::SocketAddr) -> Self {
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                tokio::select! {
                    _ = rx.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                if let Ok(m) = crate::metrics::scrape(addr).await {
                    samples.push(m.sum("ca_keymanager_in_flight", ""));
                }
            }
            samples
        });
        Self { stop, task }
    }

    async fn stop(self) -> InFlight {
        let _ = self.stop.send(true);
        let samples = self.task.await.unwrap_or_default();
        InFlight {
            samples: samples.len(),
            mean: if samples.is_empty() {
                0.0
            } else {
                samples.iter().sum::<f64>() / samples.len() as f64
            },
            max: samples.iter().copied().fold(0.0, f64::max),
        }
    }
}

/// Whether the report shows a failed run: errors, nothing issued, or the node's count
/// disagreeing with the load's.
pub fn failed(r: &Report) -> bool {
    r.measured.errors > 0
        || r.warmup_errors > 0
        || r.measured.svids_issued == 0
        || r.measured.server_metrics.svids_error > 0.0
        || (r.measured.server_metrics.svids_ok - r.measured.svids_issued as f64).abs() > 0.5
}

/// Whether the run missed the target `--check-targets` checks: the backend's ratio target
/// (softhsm, kms) or the CPU per SVID target (soft).
pub fn missed_target(r: &Report) -> bool {
    match &r.backend {
        Some(b) => !b.target_met,
        None => !r.target_met,
    }
}

/// The program: parse, run, print; exit 1 on a failed run, 2 on a missed
/// `--max-cpu-us-per-svid` or, with `--check-targets`, a missed target.
pub fn main() -> ExitCode {
    let args = Args::parse();
    // Before any runtime or thread: this sets the process's environment for the backend.
    let mut backend = match Backend::prepare(args.backend) {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "issuance-load: cannot prepare the {} backend: {e:#}",
                args.backend.as_str()
            );
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("issuance-load: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(ms) = args.kms_latency_ms {
        if let Err(e) = rt.block_on(backend.add_sign_latency(Duration::from_millis(ms))) {
            eprintln!("issuance-load: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let report = match rt.block_on(run(&args, &backend)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("issuance-load: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("issuance-load: cannot serialize the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!("issuance-load: BatchNewX509Svid over mTLS gRPC against one ca-node process");
        print!("{}", report.human());
    }
    if failed(&report) {
        eprintln!(
            "issuance-load: FAILED: {} errors in the measured phase, {} in the warm-up, {} SVIDs issued",
            report.measured.errors, report.warmup_errors, report.measured.svids_issued
        );
        return ExitCode::FAILURE;
    }
    if let Some(max) = args.max_cpu_us_per_svid {
        if report.measured.server_cpu_us_per_svid > max {
            eprintln!(
                "issuance-load: server CPU per SVID {:.1} µs is above --max-cpu-us-per-svid {max}",
                report.measured.server_cpu_us_per_svid
            );
            return ExitCode::from(2);
        }
    }
    if args.check_targets && missed_target(&report) {
        eprintln!("issuance-load: the target was missed");
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}
