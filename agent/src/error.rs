//! The crate's one error type. Every message says what went wrong and, where there is
//! something to do about it, what to do.

use std::path::Path;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value that cannot be used; the message names the key and the fix.
    #[error("configuration error: {0}")]
    Config(String),
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Node attestation failed (bad token, unknown provisioning CA, refused by the node...).
    #[error("node attestation failed: {0}")]
    Attestation(String),
    /// A call to the CA nodes failed.
    #[error("{0}")]
    Node(String),
    /// Stored state in the data directory is unusable (expired SVID, corrupt files).
    #[error("{0}")]
    Persist(String),
    /// Key generation, CSR or signature failure.
    #[error("crypto error: {0}")]
    Crypto(String),
    /// An identity-level check failed (SPIFFE ID, certificate, bundle).
    #[error(transparent)]
    Identity(#[from] ca_identity::Error),
    /// A Workload API client call failed.
    #[error("{0}")]
    WorkloadApi(String),
}

impl Error {
    /// An I/O error with context naming the operation and path.
    pub(crate) fn io(what: &str, path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            context: format!("{what} {}", path.display()),
            source,
        }
    }
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Error::Crypto(e.to_string())
    }
}
