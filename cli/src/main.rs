//! `ca-node`: see [`ca_node_cli`].

/// mimalloc instead of glibc's malloc: the node allocates and frees small buffers across
/// many threads (gRPC, Raft, SQLite), where glibc's arenas cost ~15 % of its CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ca_node_cli::main()
}
