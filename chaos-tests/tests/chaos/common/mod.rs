//! What every chaos test shares: the programs under test and the network mode.

#![allow(dead_code)]

use chaos_tests::report::say;
use chaos_tests::{Binaries, Mode};

/// The `ca-node` and `agent` programs Cargo built for this crate.
pub fn bins() -> Binaries {
    Binaries {
        ca_node: env!("CARGO_BIN_EXE_chaos-ca-node").into(),
        agent: env!("CARGO_BIN_EXE_chaos-agent").into(),
    }
}

/// The network mode of this run, announced.
pub fn mode(test: &str) -> Mode {
    let (mode, why) = chaos_tests::net::detect().expect("network mode");
    say(&format!("[{test}] network mode: {mode} ({why})"));
    mode
}

/// Runs the cluster scenarios of this binary one at a time: each starts real processes and
/// measures timings (fail-over, catch-up) that another scenario beside it on the same two
/// cores would distort. Held for the whole scenario.
pub async fn solo() -> tokio::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ONE_AT_A_TIME.lock().await
}
