//! Who may call this node's Raft transport, and what a caller may propose.
//!
//! Raft has no authentication of its own: a follower takes log entries from whoever
//! claims a higher term, and a leader appends whatever command it is handed. So the node
//! gives its [`RaftGrpc`](crate::RaftGrpc) service and its replication links a
//! [`PeerPolicy`]: every call, and every later message of a stream or link, is checked
//! against it ([`PeerPolicy::admit`], [`Admitted::recheck`]), and every forwarded proposal
//! is checked as the leader would check its own ([`PeerPolicy::check_proposal`]).

use std::sync::Arc;

use tonic::Status;

use crate::command::Command;

/// A caller the policy let in. A stream or link keeps it and calls [`Admitted::recheck`]
/// before each later message, so a caller that stops being allowed (removed from the
/// membership, its issuer revoked) is cut off mid-stream.
#[derive(Clone)]
pub struct Admitted {
    node_id: String,
    recheck: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
}

impl std::fmt::Debug for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitted")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl Admitted {
    /// Caller `node_id`, still allowed as long as `recheck` says so.
    pub fn new(
        node_id: String,
        recheck: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            node_id,
            recheck: Arc::new(recheck),
        }
    }

    /// The caller's node ID (its `NodeInfo::node_id`).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Whether the caller is still allowed; `PERMISSION_DENIED` saying why if not.
    pub fn recheck(&self) -> Result<(), Status> {
        (self.recheck)().map_err(Status::permission_denied)
    }
}

/// The rules for callers of the Raft transport; see the module docs.
#[async_trait::async_trait]
pub trait PeerPolicy: Send + Sync + 'static {
    /// The caller of a gRPC call, from the request's extensions (its TLS peer
    /// certificates); refused with a status saying why.
    async fn admit(&self, extensions: &tonic::Extensions) -> Result<Admitted, Status>;

    /// Refuses (with a reason a person can act on) a command that `caller` may not
    /// propose. Called on every node for every forwarded proposal, before it is appended.
    async fn check_proposal(&self, caller: &str, cmd: &Command) -> Result<(), String>;
}
