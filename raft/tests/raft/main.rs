//! ca-raft's integration tests, one binary.

mod cluster;
mod state_machine;
mod storage_suite;
