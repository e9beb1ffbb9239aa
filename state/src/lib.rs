//! The CA's state as data, and the only rules that change it.
//!
//! Every change to the CA's state is a [`Command`]; [`apply`] applies one to a SQLite
//! database in the caller's transaction and answers with a [`Response`]. Commands carry
//! everything that varies (timestamps, random tokens, serials), so applying the same
//! commands in the same order on any replica gives the same state. A command that breaks a
//! rule (duplicate entry, used join token, reactivating a revoked authority) changes nothing
//! and is answered [`Response::Rejected`], on every replica alike.
//!
//! This crate is synchronous and knows nothing of replication: `ca-raft` decides the order
//! of commands, runs [`apply`] inside its own transactions and snapshots the database file;
//! the node reads through [`query`].
//!
//! # Guide
//! - [`records`]: what is stored (entries, agents, join tokens, the CA journal of
//!   authorities, rotation requests).
//! - [`command`]: [`Command`], [`Response`], [`RejectCode`].
//! - [`schema`]: the tables ([`schema::create`]), the row codecs, and the applied log
//!   position the replication layer records beside the data.
//! - [`apply`](mod@apply): the rules, one file per kind of record.
//! - [`index`]: the entries in memory, indexed by parent, kept current on apply: the
//!   entries an agent is authorized for, and which agents a change affects.
//! - [`query`]: the reads the node serves (including the entries an agent is authorized
//!   for).
//! - [`backup`]: consistent copies of a live database, checking one, and resetting a copy
//!   to seed a new cluster.
//!
//! ```
//! # fn main() -> ca_state::Result<()> {
//! use ca_state::{apply, query, schema, Command, JoinTokenRecord, Response};
//! let conn = rusqlite::Connection::open_in_memory()?;
//! schema::create(&conn)?;
//! let token = JoinTokenRecord {
//!     token: "t1".into(),
//!     spiffe_id: "spiffe://example.org/host/a".into(),
//!     expires_at: 2_000_000_000,
//!     used_at: None,
//! };
//! assert_eq!(apply(&conn, &Command::CreateJoinToken { token }, 1)?, Response::Ok);
//! assert!(query::join_token(&conn, "t1")?.is_some());
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod apply;
pub mod backup;
pub mod command;
pub mod index;
pub mod query;
pub mod records;
pub mod schema;

pub use apply::apply;
pub use command::{Command, RejectCode, Response};
pub use records::*;

/// Errors reading or writing the state (not rule violations: those are
/// [`Response::Rejected`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// SQLite failed.
    #[error("state store: {0}")]
    Store(#[from] rusqlite::Error),
    /// A stored value could not be decoded.
    #[error("state store holds a corrupt value: {0}")]
    Corrupt(String),
    /// A file is not a usable copy of the state ([`backup::check_copy`]); the message
    /// names the file and what is wrong.
    #[error("{0}")]
    NotState(String),
    /// A database file could not be opened, copied or written; the message names it.
    #[error("{0}")]
    File(String),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<rusqlite::types::FromSqlError> for Error {
    fn from(e: rusqlite::types::FromSqlError) -> Self {
        Error::Corrupt(e.to_string())
    }
}

/// The attestation type of a ca-node's identity, issued by `ca-node join`.
pub const CA_NODE_JOIN: &str = "ca_node_join";

/// Whether `spiffe_id` is a ca-node's, `spiffe://TD/ca-node/<node id>`.
pub fn is_ca_node_id(spiffe_id: &str) -> bool {
    spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, path)| path.starts_with("ca-node/"))
}
