//! The result of one `issuance-load` run: a serializable record (`--json`) and the table
//! printed for people.

use std::fmt::Write as _;

use serde::Serialize;

use crate::backend::{BackendKind, RawSigning};
use crate::baseline::RawCost;

/// The target of the issue: server CPU per X.509-SVID, µs, on one core.
pub const TARGET_CPU_US_PER_SVID: f64 = 100.0;

/// Where the run happened.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub cores: usize,
    /// `model name` of `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    /// This machine.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        Self {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// The node under test.
#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    /// The executable that ran it.
    pub executable: String,
    /// `key_manager.type`.
    pub key_manager: String,
    /// `intermediate_mode`.
    pub intermediate_mode: String,
    /// Its runtime's worker threads, when set.
    pub worker_threads: Option<usize>,
}

/// The shape of the load.
#[derive(Clone, Debug, Serialize)]
pub struct LoadInfo {
    /// Entries registered under the agent.
    pub entries: usize,
    /// CSRs per `BatchNewX509Svid`.
    pub batch: usize,
    /// Requests in flight.
    pub concurrency: usize,
    /// TLS connections.
    pub connections: usize,
    /// Distinct CSRs.
    pub csr_pool: usize,
    /// One certificate in this many verified in full.
    pub verify_every: u64,
    /// What ended the measured phase, e.g. `10 s` or `50000 SVIDs`.
    pub limit: String,
    /// Warm-up before measuring, s.
    pub warmup_s: f64,
    /// Load-process runtime worker threads.
    pub client_threads: usize,
}

/// Batch call latency, µs.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Maximum.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

/// What the node's own `/metrics` say about the measured phase.
#[derive(Clone, Debug, Serialize)]
pub struct ServerMetrics {
    /// `ca_x509_svids_issued_total{result="ok"}` increase.
    pub svids_ok: f64,
    /// `ca_x509_svids_issued_total{result="error"}` increase.
    pub svids_error: f64,
    /// Mean of `ca_x509_svid_issue_seconds` (CSR parse + mint, wall), µs.
    pub issue_mean_us: f64,
    /// Mean of `ca_keymanager_sign_seconds{role="intermediate"}` (the key manager's sign
    /// call, wall), µs.
    pub sign_mean_us: f64,
}

/// The measured phase.
#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    /// Wall time, s.
    pub wall_s: f64,
    /// Batch calls.
    pub requests: u64,
    /// X.509-SVIDs issued (every result checked).
    pub svids_issued: u64,
    /// Errors (calls and results).
    pub errors: u64,
    /// Certificates verified in full.
    pub verified: u64,
    /// SVIDs per second of wall time.
    pub svids_per_s_wall: f64,
    /// Node process user + system CPU, s.
    pub server_cpu_s: f64,
    /// Of which user time, s.
    pub server_user_s: f64,
    /// Of which system (kernel) time, s.
    pub server_system_s: f64,
    /// Node CPU per issued SVID, µs.
    pub server_cpu_us_per_svid: f64,
    /// Node CPU / wall: how many cores the node kept busy.
    pub server_cores_busy: f64,
    /// SVIDs per second one core of the node can issue (1 / CPU per SVID).
    pub svids_per_server_core_s: f64,
    /// Load process CPU per issued SVID, µs.
    pub client_cpu_us_per_svid: f64,
    /// CPU of the backend's emulator process (KMS) per issued SVID, µs.
    pub emulator_cpu_us_per_svid: Option<f64>,
    /// The node's key-manager operations in flight, sampled every 100 ms.
    pub node_sign_in_flight: InFlight,
    /// Batch latency.
    pub latency: Latency,
    /// The node's metrics over the phase.
    pub server_metrics: ServerMetrics,
}

/// Samples of the node's `ca_keymanager_in_flight` gauge.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InFlight {
    /// Samples taken.
    pub samples: usize,
    /// Mean.
    pub mean: f64,
    /// Maximum.
    pub max: f64,
}

/// Issuance next to the backend's raw signing rate (`--backend softhsm|kms`).
#[derive(Clone, Debug, Serialize)]
pub struct BackendResult {
    /// Which backend.
    pub backend: BackendKind,
    /// Where it was.
    pub description: String,
    /// Its raw signing rate, same run: both rounds together.
    pub raw: RawSigning,
    /// The rounds: right before and right after the node's measured phase.
    pub raw_rounds: Vec<RawSigning>,
    /// CPU of every process of the run (node, load, emulator) per SVID, µs.
    pub cpu_us_per_svid_all: f64,
    /// CPU of every process (this one, emulator) per raw signature, µs. When the cores are
    /// what limits both, the ratio is about this ÷ `cpu_us_per_svid_all` (exactly so when
    /// both sides get the same share of the cores).
    pub cpu_us_per_raw_sign_all: f64,
    /// SVIDs issued per second (wall) in the measured phase.
    pub svids_per_s: f64,
    /// SVIDs/s ÷ raw signatures/s.
    pub ratio: f64,
    /// The issue's target for that ratio.
    pub target_ratio: f64,
    /// Whether it is met.
    pub target_met: bool,
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Machine.
    pub machine: Machine,
    /// Node.
    pub node: NodeInfo,
    /// Load shape.
    pub load: LoadInfo,
    /// Warm-up errors (the warm-up is checked like the measured phase).
    pub warmup_errors: u64,
    /// The measured phase.
    pub measured: Measured,
    /// Raw sign + verify cost, same run.
    pub baseline: RawCost,
    /// Server CPU per SVID / raw (sign + verify) CPU.
    pub ratio_to_raw: f64,
    /// The target, µs of server CPU per SVID.
    pub target_cpu_us_per_svid: f64,
    /// Whether the target is met.
    pub target_met: bool,
    /// With `--backend softhsm|kms`: SVIDs/s next to the backend's raw signing rate.
    pub backend: Option<BackendResult>,
    /// The first error messages, if any.
    pub error_samples: Vec<String>,
}

impl Report {
    /// The table for people.
    pub fn human(&self) -> String {
        let m = &self.measured;
        let b = &self.baseline;
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "  {k:<38} {v}");
        };
        row(
            "machine",
            format!("{} cores, {}", self.machine.cores, self.machine.cpu_model),
        );
        row("node", self.node.executable.clone());
        row(
            "key manager / intermediate",
            format!(
                "{} / {}",
                self.node.key_manager, self.node.intermediate_mode
            ),
        );
        row(
            "load",
            format!(
                "{} entries, batches of {}, {} in flight over {} connection(s), {} (+{:.1} s warm-up)",
                self.load.entries,
                self.load.batch,
                self.load.concurrency,
                self.load.connections,
                self.load.limit,
                self.load.warmup_s
            ),
        );
        row(
            "X.509-SVIDs issued",
            format!(
                "{} in {} calls (errors {}, verified in full {})",
                m.svids_issued, m.requests, m.errors, m.verified
            ),
        );
        row("wall time", format!("{:.2} s", m.wall_s));
        row("SVIDs/s (wall)", format!("{:.0}", m.svids_per_s_wall));
        row(
            "server CPU (utime+stime)",
            format!(
                "{:.2} s = {:.2} user + {:.2} system ({:.2} cores busy)",
                m.server_cpu_s, m.server_user_s, m.server_system_s, m.server_cores_busy
            ),
        );
        row(
            "server CPU per SVID",
            format!(
                "{:.1} µs  (target <= {:.0} µs: {})",
                m.server_cpu_us_per_svid,
                self.target_cpu_us_per_svid,
                if self.target_met { "MET" } else { "MISSED" }
            ),
        );
        row(
            "SVIDs/s per server core",
            format!("{:.0}", m.svids_per_server_core_s),
        );
        row(
            "load-process CPU per SVID",
            format!("{:.1} µs", m.client_cpu_us_per_svid),
        );
        row(
            "batch latency p50 / p99 / max",
            format!(
                "{:.2} / {:.2} / {:.2} ms",
                m.latency.p50_us / 1e3,
                m.latency.p99_us / 1e3,
                m.latency.max_us / 1e3
            ),
        );
        if let Some(e) = m.emulator_cpu_us_per_svid {
            row("emulator CPU per SVID", format!("{e:.1} µs"));
        }
        row(
            "node key-manager ops in flight",
            format!(
                "mean {:.1}, max {:.0} ({} samples)",
                m.node_sign_in_flight.mean,
                m.node_sign_in_flight.max,
                m.node_sign_in_flight.samples
            ),
        );
        row(
            "node metrics: issue / sign mean (wall)",
            format!(
                "{:.1} / {:.1} µs per SVID ({} ok, {} errors)",
                m.server_metrics.issue_mean_us,
                m.server_metrics.sign_mean_us,
                m.server_metrics.svids_ok,
                m.server_metrics.svids_error
            ),
        );
        row(
            "raw P-256 sign, 1 core",
            format!(
                "{:.1} µs CPU ({:.1} wall; {}, {} B message)",
                b.sign_cpu_us, b.sign_wall_us, b.primitive, b.message_bytes
            ),
        );
        row(
            "raw P-256 verify, 1 core",
            format!(
                "{:.1} µs CPU ({:.1} wall)",
                b.verify_cpu_us, b.verify_wall_us
            ),
        );
        row(
            "raw sign + verify",
            format!("{:.1} µs CPU", b.sign_plus_verify_cpu_us()),
        );
        row(
            "server CPU per SVID / raw sign+verify",
            format!("{:.2}x", self.ratio_to_raw),
        );
        if let Some(be) = &self.backend {
            let r = &be.raw;
            row("backend", be.description.clone());
            row(
                "raw rate before / after the load",
                be.raw_rounds
                    .iter()
                    .map(|r| format!("{:.0}", r.signs_per_s))
                    .collect::<Vec<_>>()
                    .join(" / ")
                    + " signatures/s",
            );
            row(
                "raw backend signing rate",
                format!(
                    "{:.0} signatures/s ({} {}, {} in flight, {} B message, {} in {:.1} s)",
                    r.signs_per_s,
                    r.what.key_manager,
                    r.what.key_algorithm,
                    r.what.in_flight,
                    r.what.message_bytes,
                    r.signs,
                    r.wall_s
                ),
            );
            row(
                "raw sign latency mean / p50 / p99",
                format!(
                    "{:.0} / {:.0} / {:.0} µs",
                    r.latency_mean_us, r.latency_p50_us, r.latency_p99_us
                ),
            );
            row(
                "raw CPU per signature",
                match r.emulator_cpu_us_per_sign {
                    Some(e) => format!(
                        "{:.1} µs this process + {e:.1} µs emulator",
                        r.process_cpu_us_per_sign
                    ),
                    None => format!("{:.1} µs", r.process_cpu_us_per_sign),
                },
            );
            row(
                "CPU per SVID / per raw sig (all procs)",
                format!(
                    "{:.0} / {:.0} µs (their ratio: {:.1} %)",
                    be.cpu_us_per_svid_all,
                    be.cpu_us_per_raw_sign_all,
                    if be.cpu_us_per_svid_all > 0.0 {
                        be.cpu_us_per_raw_sign_all / be.cpu_us_per_svid_all * 100.0
                    } else {
                        0.0
                    }
                ),
            );
            row(
                "SVIDs/s / raw signatures/s",
                format!(
                    "{:.0} / {:.0} = {:.1} %  (target >= {:.0} %: {})",
                    be.svids_per_s,
                    r.signs_per_s,
                    be.ratio * 100.0,
                    be.target_ratio * 100.0,
                    if be.target_met { "MET" } else { "MISSED" }
                ),
            );
        }
        for e in &self.error_samples {
            row("error", e.clone());
        }
        s
    }
}
