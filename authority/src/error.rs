//! The crate's one error type.

use ca_state::RejectCode;

/// What can go wrong in the CA engine; messages say what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The node's configuration does not fit the journal (e.g. a key manager other than
    /// the one an authority's key was made in).
    #[error("configuration: {0}")]
    Config(String),
    /// A request with bad input.
    #[error("{0}")]
    InvalidArgument(String),
    /// Something asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Not available right now (this node's clock is off, no authority yet); retry.
    #[error("{0}")]
    Unavailable(String),
    /// The journal refused a command; the message says why.
    #[error("{message}")]
    Rejected {
        /// Why, as a code.
        code: RejectCode,
        /// Why, for a person.
        message: String,
    },
    /// The key manager failed.
    #[error(transparent)]
    KeyManager(#[from] ca_kms::Error),
    /// The journal could not be read or written (the replication layer's own error).
    #[error(transparent)]
    Journal(Box<dyn std::error::Error + Send + Sync>),
    /// A bug or an unexpected condition.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ca_identity::Error> for Error {
    fn from(e: ca_identity::Error) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
