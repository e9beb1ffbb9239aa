//! `agent-fleet`: see `ca_bench::fleet`. Re-run with `CA_BENCH_EXEC_CA_NODE=1` it is
//! `ca-node` itself (the same `ca_node_cli::main`), so a run needs no separate build of the
//! node binary; with `CA_BENCH_EXEC_AGENT=1` it is the `agent`.
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::var_os(ca_bench::node::SELF_EXEC_ENV).is_some() {
        return ca_node_cli::main();
    }
    if std::env::var_os(ca_bench::fleet::AGENT_EXEC_ENV).is_some() {
        return ca_agent::cli::main();
    }
    ca_bench::fleet::main()
}
