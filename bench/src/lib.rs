//! Benchmarks of the CA.
//!
//! `issuance-load` (the binary of this crate) measures what an X.509-SVID costs the CA: it
//! starts a real `ca-node` as a separate process on a generated configuration ([`node`]),
//! attests an agent with a join token over the node API and registers entries under it
//! through the admin socket ([`load`]), drives `BatchNewX509Svid` over mTLS gRPC with
//! concurrent requests, and reads the node process's user + system CPU time from `/proc`
//! before and after the measured phase ([`procstat`]). Next to the server CPU per SVID it
//! reports the raw cost of one P-256 signature plus one verification measured in the same
//! run ([`baseline`]), the ratio of the two, throughput and batch latency ([`report`]).
//!
//! ```text
//! cargo build --release -p ca-bench -p ca-node-cli
//! cargo run --release -p ca-bench --bin issuance-load            # table
//! cargo run --release -p ca-bench --bin issuance-load -- --json  # JSON
//! ```
//!
//! `agent-fleet` ([`fleet`]) runs thousands of simulated agents against a three-node
//! cluster, with entries pushed and with entries polled, and reports what each costs.
//!
//! Other key managers plug in through `--node-config FILE` (its top-level keys, e.g. a
//! `[key_manager]` table, replace the generated configuration's). Figures and method:
//! `docs/BENCHMARKS.md`.

pub mod backend;
pub mod baseline;
pub mod ca_cluster;
pub mod cli;
pub mod etcd;
pub mod fleet;
pub mod load;
pub mod metrics;
pub mod node;
pub mod procstat;
pub mod report;
pub mod write_load;

/// Runs `fut` to completion on a new multi-threaded runtime (what the load binaries' `main`s
/// do with their whole run).
pub fn block_on<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start a runtime: {e}"))?;
    rt.block_on(fut)
}
