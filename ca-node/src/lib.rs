//! The CA server node.
//!
//! A node is the certificate authority of one SPIFFE trust domain, together with its peers: it keeps the root and its own intermediate in a key manager,
//! attests agents (join token, x509pop), serves them the entries they are authorized for,
//! signs their workloads' CSRs into X.509-SVIDs and mints JWT-SVIDs.
//!
//! - [`config`]: the TOML configuration, validated in full at start.
//! - [`ca`]: root, intermediate and JWT key lifecycle through the CA journal; minting.
//! - [`core`]: what the APIs share; rules for entries and join tokens.
//! - [`node_api`]: the API agents call, over TLS authenticated by SPIFFE ID;
//!   [`entry_watch`]: its `WatchEntries` stream, pushing each agent's entries as they change,
//!   woken by [`watch_hub`].
//! - [`admin_api`]: the API the CLI calls, over an owner-only Unix socket.
//! - [`server`]: starting and stopping all of it. The one-command local setup is the
//!   `ca-dev` crate's, the `ca-node` command line the `ca-node-cli` crate's.
//! - [`registry`]: the files a node keeps about its membership; [`wallclock`]: this node's
//!   own clock readings; [`validate`]: what an entry must be before it reaches the log.
//! - [`cluster`]: membership and the root used across members, the cluster service;
//!   [`bootstrap`]: joining a cluster; [`raft_tls`]: mTLS between ca-nodes; [`clock`]:
//!   comparing clocks with the members; [`backup`]: state backups and disaster recovery.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin_api;
pub mod backup;
pub mod bootstrap;
pub mod ca;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod convert;
pub mod core;
pub mod entry_watch;
pub mod error;
pub mod metrics;
pub mod node;
pub mod node_api;
pub mod peer_gate;
pub mod raft_tls;
pub mod registry;
pub mod validate;
pub mod wallclock;
pub mod watch_hub;

pub use config::NodeConfig;
pub use error::Error;
pub use node::{start, NodeHandle};
