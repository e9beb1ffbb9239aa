//! The crate's one error type, mapped to gRPC status codes at the API edge.

/// What can go wrong in a node; messages say what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad configuration (at start).
    #[error("configuration: {0}")]
    Config(String),
    /// A request with bad input.
    #[error("{0}")]
    InvalidArgument(String),
    /// Something asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Something to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller did not authenticate.
    #[error("{0}")]
    Unauthenticated(String),
    /// A rate limit or bound refused the call; the message says which and when to retry.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Not available right now; retry.
    #[error("{0}")]
    Unavailable(String),
    /// The key manager failed.
    #[error(transparent)]
    KeyManager(#[from] ca_kms::Error),
    /// The state store failed.
    #[error(transparent)]
    State(#[from] ca_raft::Error),
    /// A bug or an unexpected condition.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ca_authority::Error> for Error {
    fn from(e: ca_authority::Error) -> Self {
        use ca_authority::Error as A;
        match e {
            A::Config(m) => Error::Config(m),
            A::InvalidArgument(m) => Error::InvalidArgument(m),
            A::NotFound(m) => Error::NotFound(m),
            A::FailedPrecondition(m) => Error::FailedPrecondition(m),
            A::Unavailable(m) => Error::Unavailable(m),
            A::Rejected { code, message } => from_rejection(code, message),
            A::KeyManager(e) => Error::KeyManager(e),
            // The journal is the node's Raft state: its own error, as it was raised.
            A::Journal(e) => match e.downcast::<ca_raft::Error>() {
                Ok(e) => Error::State(*e),
                Err(e) => Error::Internal(e.to_string()),
            },
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<ca_identity::Error> for Error {
    fn from(e: ca_identity::Error) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            Error::Config(_) | Error::InvalidArgument(_) => Status::invalid_argument(msg),
            Error::NotFound(_) => Status::not_found(msg),
            Error::AlreadyExists(_) => Status::already_exists(msg),
            Error::FailedPrecondition(_) => Status::failed_precondition(msg),
            Error::PermissionDenied(_) => Status::permission_denied(msg),
            Error::Unauthenticated(_) => Status::unauthenticated(msg),
            Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
            Error::Unavailable(_) => Status::unavailable(msg),
            Error::KeyManager(ca_kms::Error::Unavailable(_)) => Status::unavailable(msg),
            // No leader with a quorum within the timeout: retry (the write may still land).
            Error::State(ca_raft::Error::Unavailable(_)) => Status::unavailable(msg),
            Error::State(ca_raft::Error::NotLeader { .. } | ca_raft::Error::Cluster(_)) => {
                Status::failed_precondition(msg)
            }
            Error::KeyManager(_) | Error::State(_) | Error::Internal(_) => Status::internal(msg),
        }
    }
}

impl Error {
    /// A short name of the error's kind, for metrics labels.
    pub fn code_name(&self) -> &'static str {
        match self {
            Error::Config(_) | Error::InvalidArgument(_) => "invalid_argument",
            Error::NotFound(_) => "not_found",
            Error::AlreadyExists(_) => "already_exists",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::PermissionDenied(_) => "permission_denied",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::ResourceExhausted(_) => "resource_exhausted",
            Error::Unavailable(_)
            | Error::KeyManager(ca_kms::Error::Unavailable(_))
            | Error::State(ca_raft::Error::Unavailable(_)) => "unavailable",
            Error::State(ca_raft::Error::NotLeader { .. } | ca_raft::Error::Cluster(_)) => {
                "failed_precondition"
            }
            Error::KeyManager(_) | Error::State(_) | Error::Internal(_) => "internal",
        }
    }
}

/// Turns a state machine refusal into an error.
pub fn from_rejection(code: ca_state::RejectCode, message: String) -> Error {
    use ca_state::RejectCode::*;
    match code {
        NotFound => Error::NotFound(message),
        AlreadyExists => Error::AlreadyExists(message),
        FailedPrecondition => Error::FailedPrecondition(message),
        PermissionDenied => Error::PermissionDenied(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_errors_map_to_retryable_codes() {
        let s = tonic::Status::from(Error::State(ca_raft::Error::Unavailable(
            "no leader".into(),
        )));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        let s = tonic::Status::from(Error::State(ca_raft::Error::NotLeader {
            leader_id: Some(2),
            leader_addr: None,
        }));
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        let e = Error::State(ca_raft::Error::Cluster("change in progress".into()));
        assert_eq!(e.code_name(), "failed_precondition");
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::FailedPrecondition
        );
        let e = Error::State(ca_raft::Error::Corrupt("x".into()));
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Internal);
    }
}
