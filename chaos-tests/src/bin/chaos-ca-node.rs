//! The `ca-node` program, built as part of this crate so the chaos tests run a current build.
fn main() -> std::process::ExitCode {
    ca_node_cli::main()
}
