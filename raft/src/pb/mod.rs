//! Conversions between openraft's types and the protobuf messages of the Raft transport
//! (`ca_proto::raft`), one file per type. Small fixed-shape values map field by field;
//! openraft's own payloads (entries, snapshot metadata, errors) travel as JSON in `bytes`.

mod append_entries;
mod forward_to_leader;
mod install_snapshot;
mod log_id;
mod membership_change;
mod node;
mod vote;
mod vote_request;

pub(crate) use forward_to_leader::forward_from_pb;

/// A conversion from a domain value to its protobuf message.
pub(crate) trait IntoPb<T> {
    /// Converts.
    fn into_pb(self) -> T;
}

/// A conversion from a protobuf message to a domain value; fails on a malformed message.
pub(crate) trait FromPb<T>: Sized {
    /// Converts.
    fn from_pb(v: T) -> Result<Self, tonic::Status>;
}

/// A required field was absent.
pub(crate) fn missing(what: &str) -> tonic::Status {
    tonic::Status::invalid_argument(format!("raft message without {what}"))
}

/// JSON in a `bytes` field.
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("openraft types serialize to JSON")
}

/// JSON from a `bytes` field.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    b: &[u8],
) -> Result<T, tonic::Status> {
    serde_json::from_slice(b)
        .map_err(|e| tonic::Status::invalid_argument(format!("malformed {what}: {e}")))
}
