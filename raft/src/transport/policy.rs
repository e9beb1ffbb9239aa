//! Who may call this node's Raft transport, and what a caller may propose.
//!
//! Raft has no authentication of its own: a follower takes log entries from whoever
//! claims a higher term, and a leader appends whatever command it is handed. So the node
//! gives its [`RaftGrpc`](crate::RaftGrpc) service a [`PeerPolicy`]: every call is checked
//! against it ([`PeerPolicy::admit`]), against the node's current state, not only when the
//! connection was made; and every forwarded proposal is checked as the leader would check
//! its own ([`PeerPolicy::check_proposal`]).

use tonic::Status;

use ca_state::Command;

/// A caller the policy let in, for one call.
#[derive(Clone, Debug)]
pub struct Admitted {
    node_id: String,
    recovering: bool,
}

impl Admitted {
    /// Caller `node_id`, with full standing.
    pub fn new(node_id: String) -> Self {
        Self {
            node_id,
            recovering: false,
        }
    }

    /// Member `node_id` admitted only to replace its own revoked intermediate: it holds no
    /// other certificate until it has a new one. It may propose what the policy allows it
    /// and read, but not replicate, vote, install snapshots or change the membership.
    pub fn recovering(node_id: String) -> Self {
        Self {
            node_id,
            recovering: true,
        }
    }

    /// Whether the caller was admitted only to replace its revoked intermediate.
    pub fn is_recovering(&self) -> bool {
        self.recovering
    }

    /// The caller, if it has full standing (see [`Admitted::recovering`]).
    pub fn full(self) -> Result<Self, Status> {
        if self.recovering {
            return Err(Status::permission_denied(format!(
                "ca-node {} presents an SVID of its own revoked intermediate: it may only replace that intermediate until it has a new SVID",
                self.node_id
            )));
        }
        Ok(self)
    }

    /// The caller's node ID (its `NodeInfo::node_id`).
    pub fn node_id(&self) -> &str {
        &self.node_id
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
    async fn check_proposal(&self, caller: &Admitted, cmd: &Command) -> Result<(), String>;
}
