//! The `agent` binary; everything lives in the library (`ca_agent::cli`).

fn main() -> std::process::ExitCode {
    ca_agent::cli::main()
}
