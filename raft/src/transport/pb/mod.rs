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

/// Fuzz targets for what a peer sends (see `ca_identity`'s fuzz module for how they run):
/// arbitrary bytes and mutations of a valid message, decoded as the Raft service decodes
/// them, then converted. Nothing may panic.
#[cfg(test)]
mod fuzz {
    use ca_proto::raft as pb;
    use ca_test_support::fuzz::mutate;
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
    use prost::Message;

    use super::{FromPb, IntoPb};
    use crate::membership::MembershipChange;
    use crate::types::{LogId, TypeConfig, Vote};

    #[test]
    fn fuzz_messages_from_peers() {
        let vote = Vote::new(3, 1);
        let log_id = LogId::new(openraft::CommittedLeaderId::new(3, 1), 7);
        let entry = openraft::Entry::<TypeConfig> {
            log_id,
            payload: openraft::EntryPayload::Blank,
        };
        let seed = AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: Some(log_id),
            entries: vec![entry],
            leader_commit: Some(log_id),
        }
        .into_pb()
        .encode_to_vec();
        bolero::check!().for_each(|ops: &[u8]| {
            for bytes in [mutate(&seed, ops), ops.to_vec()] {
                let b = bytes.as_slice();
                if let Ok(m) = pb::AppendEntriesRequest::decode(b) {
                    let _ = AppendEntriesRequest::<TypeConfig>::from_pb(m);
                }
                if let Ok(m) = pb::VoteRequest::decode(b) {
                    let _ = VoteRequest::<crate::types::NodeId>::from_pb(m);
                }
                if let Ok(m) = pb::InstallSnapshotRequest::decode(b) {
                    let _ = InstallSnapshotRequest::<TypeConfig>::from_pb(m);
                }
                if let Ok(m) = pb::ChangeMembershipRequest::decode(b) {
                    let _ = MembershipChange::from_pb(m);
                }
                if let Ok(m) = pb::ForwardToLeader::decode(b) {
                    let _ = super::forward_from_pb(m);
                }
            }
        });
    }
}
