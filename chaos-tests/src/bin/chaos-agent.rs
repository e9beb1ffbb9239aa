//! The `agent` program, built as part of this crate so the chaos tests run a current build.
fn main() -> std::process::ExitCode {
    ca_agent::cli::main()
}
