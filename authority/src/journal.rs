//! How the engine sees the CA journal: [`Journal`], read from this node's replica and
//! written through the replicated log. The node implements it over its Raft state machine
//! and proposer; the engine never sees either.

use async_trait::async_trait;
use ca_state::{AuthorityRecord, Command, Response, RotationRequest};

use crate::Result;

/// The CA journal and the rotation requests, as this node's replica has them, and the way
/// to change them.
#[async_trait]
pub trait Journal: Send + Sync + 'static {
    /// The CA journal, oldest first.
    async fn authorities(&self) -> Result<Vec<AuthorityRecord>>;
    /// The log index of the last change to the CA journal: the trust bundle's sequence
    /// number.
    async fn authorities_version(&self) -> Result<i64>;
    /// Rotation requests (at most one per kind and node).
    async fn rotation_requests(&self) -> Result<Vec<RotationRequest>>;
    /// Proposes `cmd` and waits until it is applied; the state machine's answer.
    async fn propose(&self, cmd: Command) -> Result<Response>;
}
