//! Multi-process cluster tests under faults (see the Raft issue); the harness lives here.
