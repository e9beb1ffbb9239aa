//! `ca-node`: see `ca_node::cli`.
fn main() -> std::process::ExitCode {
    ca_node::cli::main()
}
