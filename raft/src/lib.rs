//! Replicated state of the CA: every change is a [`Command`] applied, in log order, by one
//! deterministic [`StateMachine`] to a durable SQLite store (sqlx).
//!
//! Nothing else writes state. A [`Proposer`] takes a command to the log and returns the
//! state machine's [`Response`] once it is applied. Today's proposer is [`LocalProposer`]
//! (one node: the log is this node's); the Raft issue replaces it with openraft, which
//! replicates exactly these commands, so no caller changes.
//!
//! Commands carry everything that varies (timestamps, random tokens, serials), so applying
//! the same log on any replica gives the same state. A command that breaks a rule
//! (duplicate entry, used join token) is still applied, as a no-op with a
//! [`Response::Rejected`], so replicas agree on that too.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod command;
pub mod proposer;
pub mod records;
pub mod state_machine;

pub use command::{Command, RejectCode, Response};
pub use proposer::{LocalProposer, Proposer};
pub use records::*;
pub use state_machine::StateMachine;

/// Errors of the store (not rule violations: those are [`Response::Rejected`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// SQLite failed.
    #[error("state store: {0}")]
    Store(#[from] sqlx::Error),
    /// A stored value could not be decoded.
    #[error("state store holds a corrupt value: {0}")]
    Corrupt(String),
    /// The log is not accepting writes (e.g. shutting down, no leader).
    #[error("replicated log unavailable: {0}")]
    Unavailable(String),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
