//! Protocol definitions of the CA, generated at build time from `proto/*.proto`
//! with a pure-Rust protobuf compiler (no `protoc` needed).
//!
//! - [`workload`]: the standard SPIFFE Workload API (`SpiffeWorkloadAPI`, no protobuf package),
//!   wire-identical to the upstream `workload.proto`.
//! - [`node`]: what agents ask of any ca-node (attestation, entry sync, SVID minting).
//! - [`admin`]: what the `ca-node` CLI asks of its local node.
//! - [`types`]: domain messages shared by the node and admin APIs.
//! - [`raft`]: the Raft transport between ca-nodes (openraft RPCs, forwarded writes).
#![forbid(unsafe_code)]

/// The SPIFFE Workload API (standard, no protobuf package).
#[allow(missing_docs, clippy::all)]
pub mod workload {
    tonic::include_proto!("_");
}

/// Generated packages, nested as protobuf packages are.
#[allow(missing_docs, clippy::all)]
pub mod spiffeca {
    /// Shared domain messages.
    pub mod types {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("spiffeca.types.v1");
        }
    }
    /// The node API.
    pub mod node {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("spiffeca.node.v1");
        }
    }
    /// The Raft transport between ca-nodes.
    pub mod raft {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("spiffeca.raft.v1");
        }
    }
    /// The admin API.
    pub mod admin {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("spiffeca.admin.v1");
        }
    }
}

pub use spiffeca::admin::v1 as admin;
pub use spiffeca::node::v1 as node;
pub use spiffeca::raft::v1 as raft;
pub use spiffeca::types::v1 as types;
