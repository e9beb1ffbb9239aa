//! `agent-fleet`: see `ca_bench::fleet`. Re-run with `CA_BENCH_EXEC_CA_NODE=1` it is
//! `ca-node` itself (the same `ca_node_cli::main`), so a run needs no separate build of the
//! node binary.
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::var_os(ca_bench::node::SELF_EXEC_ENV).is_some() {
        return ca_node_cli::main();
    }
    ca_bench::fleet::main()
}
