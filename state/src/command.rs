//! The commands of the replicated log and the state machine's answers.

use serde::{Deserialize, Serialize};

use crate::records::*;

/// A change to the replicated state. Deterministic: everything that varies is inside.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Command {
    /// Create an entry (rejected if one with the same SPIFFE ID, parent and selectors exists).
    CreateEntry {
        /// The entry.
        entry: EntryRecord,
    },
    /// Replace an entry's fields (its revision is bumped).
    UpdateEntry {
        /// The entry, by ID.
        entry: EntryRecord,
    },
    /// Delete an entry.
    DeleteEntry {
        /// Its ID.
        id: String,
    },
    /// Create a join token.
    CreateJoinToken {
        /// The token.
        token: JoinTokenRecord,
    },
    /// Consume a join token and register the agent it attests, atomically: the token must
    /// exist, be unused and unexpired at `now`.
    AttestWithJoinToken {
        /// The token.
        token: String,
        /// Attestation time.
        now: i64,
        /// The agent to register.
        agent: AgentRecord,
    },
    /// Register (or re-register) an agent attested by other means (x509pop).
    RegisterAgent {
        /// The agent.
        agent: AgentRecord,
    },
    /// Record an agent's renewed SVID.
    RenewAgent {
        /// Which agent.
        spiffe_id: String,
        /// New SVID serial (hex).
        serial: String,
        /// New SVID expiry.
        expires_at: i64,
        /// Serial of the SVID the agent authenticated the renewal with; the renewal is
        /// refused unless it is the agent's current (or previous) one.
        #[serde(default)]
        caller_serial: String,
    },
    /// Forget an agent; it must attest again.
    EvictAgent {
        /// Which agent.
        spiffe_id: String,
    },
    /// Ban an agent: refused on every call and on re-attestation.
    BanAgent {
        /// Which agent.
        spiffe_id: String,
    },
    /// Add or replace an authority in the CA journal.
    PutAuthority {
        /// The authority.
        authority: AuthorityRecord,
    },
    /// Change an authority's state. Refused when applied: leaving `revoked`; activating an
    /// authority expired at `at`; retiring the only active root.
    SetAuthorityState {
        /// Which authority.
        id: String,
        /// New state.
        state: AuthorityState,
        /// When the proposer decided it (Unix seconds, its wall clock). The leader refuses
        /// a lifecycle decision stamped further from its own clock than the cluster allows,
        /// and the state machine judges it at this time, so a node whose clock jumped
        /// cannot retire or destroy what is still in use.
        at: i64,
    },
    /// Record that an authority's private key is to be destroyed in its key manager; the
    /// holder deletes it once this is applied. Refused unless the authority is revoked, or
    /// retired and expired at `at` (nothing it signed can still be valid).
    KeyDestroyed {
        /// Which authority.
        id: String,
        /// When the proposer decided it (Unix seconds), checked as for
        /// [`Command::SetAuthorityState`].
        at: i64,
    },
    /// Ask a node to rotate an authority now (replaces an earlier request for the same kind
    /// and node).
    RequestRotation {
        /// The request.
        request: RotationRequest,
    },
    /// Several commands in one log entry, applied in order all or none, each with its
    /// own answer ([`Response::Batch`]). the replication layer makes them from writes
    /// that arrive together; only [`Command::batchable`] commands may be in one (others are
    /// answered `Rejected` there).
    Batch {
        /// The commands, in order.
        commands: Vec<Command>,
    },
}

impl Command {
    /// The agents whose credentials a command replaces or withdraws (eviction, ban, a new
    /// attestation under the ID), inside a batch too: their open streams must check them
    /// again. Renewals are not among them (the SVID renewed from stays valid until it
    /// expires). Whether a command was refused does not matter: a check too many is
    /// harmless.
    pub fn agents_withdrawn(&self) -> Vec<&str> {
        match self {
            Command::Batch { commands } => commands
                .iter()
                .flat_map(Command::agents_withdrawn)
                .collect(),
            Command::EvictAgent { spiffe_id } | Command::BanAgent { spiffe_id } => vec![spiffe_id],
            Command::AttestWithJoinToken { agent, .. } | Command::RegisterAgent { agent } => {
                vec![&agent.spiffe_id]
            }
            _ => Vec::new(),
        }
    }

    /// Whether the command changes the CA journal or the rotation requests (what a node's CA
    /// maintenance acts on); a replica notifies its CA of these.
    pub fn changes_ca_journal(&self) -> bool {
        matches!(
            self,
            Command::PutAuthority { .. }
                | Command::SetAuthorityState { .. }
                | Command::KeyDestroyed { .. }
                | Command::RequestRotation { .. }
        )
    }

    /// The decision time of a CA lifecycle command (a state change other than revocation,
    /// or a key's destruction): the leader checks it against its own clock before the
    /// command reaches the log. Revocation is never held back by a clock.
    pub fn lifecycle_time(&self) -> Option<i64> {
        match self {
            Command::SetAuthorityState { state, at, .. } if *state != AuthorityState::Revoked => {
                Some(*at)
            }
            Command::KeyDestroyed { at, .. } => Some(*at),
            _ => None,
        }
    }

    /// Whether the command may share a log entry with others: changes to entries, join
    /// tokens and agents. The CA journal's commands (which record the log index they are
    /// applied at) and batches themselves go alone.
    pub fn batchable(&self) -> bool {
        matches!(
            self,
            Command::CreateEntry { .. }
                | Command::UpdateEntry { .. }
                | Command::DeleteEntry { .. }
                | Command::CreateJoinToken { .. }
                | Command::AttestWithJoinToken { .. }
                | Command::RegisterAgent { .. }
                | Command::RenewAgent { .. }
                | Command::EvictAgent { .. }
                | Command::BanAgent { .. }
        )
    }
}

/// Why a command was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// The thing does not exist.
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// The state does not allow it (used token, expired token).
    FailedPrecondition,
    /// The subject is banned.
    PermissionDenied,
}

/// The state machine's answer to a command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// Done, nothing to return.
    Ok,
    /// The entry as stored.
    Entry(EntryRecord),
    /// The agent as stored.
    Agent(AgentRecord),
    /// Refused; nothing changed.
    Rejected {
        /// Why, as a code.
        code: RejectCode,
        /// Why, for a person.
        message: String,
    },
    /// The answers to a [`Command::Batch`], one per command, in order.
    Batch(Vec<Response>),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Agents withdrawn inside a batch count (the batcher groups whatever arrives together).
    #[test]
    fn agents_withdrawn_are_found_inside_batches() {
        let batch = Command::Batch {
            commands: vec![
                Command::DeleteEntry { id: "e".into() },
                Command::BanAgent {
                    spiffe_id: "spiffe://td/agent/a".into(),
                },
                Command::RenewAgent {
                    spiffe_id: "spiffe://td/agent/b".into(),
                    serial: "01".into(),
                    expires_at: 1,
                    caller_serial: "00".into(),
                },
                Command::EvictAgent {
                    spiffe_id: "spiffe://td/agent/c".into(),
                },
            ],
        };
        assert_eq!(
            batch.agents_withdrawn(),
            ["spiffe://td/agent/a", "spiffe://td/agent/c"]
        );
        assert!(Command::DeleteEntry { id: "e".into() }
            .agents_withdrawn()
            .is_empty());
    }
}
