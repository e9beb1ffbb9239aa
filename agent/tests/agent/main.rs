//! The agent's integration tests, one binary.

mod fake_node;
mod workload_api;
