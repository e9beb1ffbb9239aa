//! Multi-process cluster tests under faults: real `ca-node` and `agent` processes, killed,
//! paused, restarted, wiped and partitioned while clients write and workloads fetch SVIDs.
//!
//! # Running
//!
//! `cargo test -p chaos-tests` (also part of `cargo test --workspace`). The two programs
//! are this crate's own binary targets `chaos-ca-node` and `chaos-agent`, which are exactly
//! `ca_node_cli::main` and `ca_agent::cli::main`: Cargo builds them before it runs this
//! crate's tests and passes their paths as `CARGO_BIN_EXE_*`, so a test never runs a
//! missing or stale binary.
//!
//! # Network modes ([`net`])
//!
//! - **netns** (root with `ip netns` and `iptables`; what CI runs): each node, and the
//!   agents, run in a network namespace of their own (`ip netns exec`), linked by veth pairs
//!   to a bridge in a hub namespace; addresses `10.201.0.0/24`. Partitions are iptables DROP
//!   rules inside the namespaces. Everything is removed on drop, also when a test panics;
//!   namespaces of a test process that was itself killed are removed by the next run.
//! - **loopback** (not root, or `CHAOS_NET=loopback`): 127.0.0.1 and distinct ports. Kills,
//!   pauses, restarts, wipes and join-token races run the same; the partition scenarios
//!   cannot, and print `SKIPPED` instead of passing silently. As root, a missing `iptables`
//!   fails the tests rather than falling back, and so does any fallback under CI (`CI`
//!   set); `CHAOS_NET=loopback` chooses loopback explicitly.
//!
//! The mode is printed at the start of every test.
//!
//! # Pieces
//!
//! - [`cluster::Cluster`]: forms a cluster as an operator would (`ca-node init`, then per
//!   node a join token created on a member and `ca-node join`), starts agents, and kills
//!   (SIGKILL), stops (SIGTERM), pauses (SIGSTOP), resumes, restarts (`ca-node run`) and
//!   wipes-and-rejoins nodes (`cluster remove`, new Raft ID, new token, `ca-node join`).
//!   Everything is driven through the nodes' admin Unix sockets.
//! - [`load::Writers`]: clients creating entries through the admin sockets of the nodes
//!   that are up, each outcome recorded in a [`load::Ledger`]; [`load::check_writes`] then
//!   compares what every node holds with what was acknowledged: no acknowledged write lost,
//!   nothing nobody wrote, every node the same; writes whose answer was lost are counted
//!   apart.
//! - [`load::Fetcher`]: a workload fetching its X.509-SVID through the agent's Workload API
//!   with the independent `spiffe` crate, counting failures.
//! - [`deploy`]: `docs/DEPLOYING.md` run as written on hosts of a network (its marked
//!   command blocks, with only paths, per-host values, users and `systemctl` substituted).
//! - [`report`]: figures and verdicts written to stderr, so they show in `cargo test`
//!   output without `--nocapture`.
//!
//! Set `CHAOS_KEEP=1` to keep each test's directory (configs, data, logs); a failing test
//! keeps it anyway and prints the tail of every process's log.

pub mod cluster;
pub mod deploy;
pub mod load;
pub mod net;
pub mod report;

pub use cluster::{Binaries, Cluster, NodeState, TD};
pub use net::Mode;
