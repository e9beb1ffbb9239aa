//! ca-node's integration tests, one binary (the node is linked once, not once per file).

mod admin_paging;
mod admin_rejects;
mod cli;
mod cluster;
mod common;
mod entry_watch;
mod hsm_node;
mod independent_clients;
mod key_backends;
mod key_lifecycle;
mod kms_node;
mod memory_mode;
mod node_api_rejects;
mod ops_examples;
mod restart;
mod rotation;
mod trust_boundaries;
