//! Membership changes, one at a time per node: [`MembershipChange`] as a node asks it of the
//! leader (here or forwarded), run by [`change_membership_local`] on the leader, and what a
//! refusal means for a person ([`membership_refusal`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, ForwardToLeader, RaftError};
use openraft::{ChangeMembers, ServerState};
use tokio::time::Instant;

use crate::types::{NodeId, NodeInfo, Raft};

/// A membership change, as a node asks it of the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MembershipChange {
    /// Add a learner.
    AddLearner {
        /// Its ID.
        id: NodeId,
        /// Its address and ca-node ID.
        node: NodeInfo,
        /// Answer once it has caught up.
        wait: bool,
    },
    /// Make a learner a voter.
    Promote(NodeId),
    /// Remove a member, voter or learner.
    Remove(NodeId),
}

type WriteResult = std::result::Result<
    openraft::raft::ClientWriteResponse<crate::types::TypeConfig>,
    RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>,
>;

/// How long a membership change waits for the leader to have applied the membership it took
/// over; see [`change_membership_local`].
const MEMBERSHIP_SETTLE: Duration = Duration::from_secs(2);

/// One membership change at a time on a node: openraft refuses a change while another is
/// uncommitted ("in progress"), so changes that arrive together (nodes joining at once,
/// directly or forwarded) wait their turn here instead.
pub(crate) type MembershipLock = Arc<tokio::sync::Mutex<()>>;

/// How long a change keeps retrying while openraft still reports another one in progress
/// (one started before this node's lock saw it, e.g. by a previous leader).
const IN_PROGRESS_RETRY: Duration = Duration::from_secs(20);

pub(crate) async fn change_membership_local(
    raft: &Raft,
    lock: &MembershipLock,
    change: &MembershipChange,
) -> WriteResult {
    let _turn = lock.lock().await;
    let deadline = Instant::now() + IN_PROGRESS_RETRY;
    loop {
        match change_membership_once(raft, change).await {
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(p),
            ))) if Instant::now() < deadline => {
                tracing::debug!(in_progress = ?p, "another membership change is in progress; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Runs `change` on this node's Raft if it is the leader; else answers who the leader is.
/// (openraft checks a change against the local membership before it checks leadership, and
/// a follower's membership may be behind the leader's.)
async fn change_membership_once(raft: &Raft, change: &MembershipChange) -> WriteResult {
    let (state, leader, leader_node) = {
        let m = raft.metrics();
        let m = m.borrow();
        let leader_node = m
            .current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        (m.state, m.current_leader, leader_node)
    };
    if state != ServerState::Leader {
        return Err(RaftError::APIError(ClientWriteError::ForwardToLeader(
            ForwardToLeader {
                leader_id: leader,
                leader_node,
            },
        )));
    }
    // A new leader commits the membership it took over only with its first entry, a moment
    // after its election (the leader does not wait for its own flush before replicating, so
    // even a one-node cluster takes that moment); until then openraft refuses a change as "in
    // progress". The wait ends as soon as the membership is applied, or after
    // MEMBERSHIP_SETTLE, when openraft's own answer stands.
    let _ = raft
        .wait(Some(MEMBERSHIP_SETTLE))
        .metrics(
            |m| {
                m.state != ServerState::Leader
                    || m.last_applied.as_ref() >= m.membership_config.log_id().as_ref()
            },
            "the membership is applied",
        )
        .await;
    match change {
        MembershipChange::AddLearner { id, node, wait } => {
            raft.add_learner(*id, node.clone(), *wait).await
        }
        MembershipChange::Promote(id) => {
            raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([*id])), false)
                .await
        }
        MembershipChange::Remove(id) => {
            let m = raft.metrics().borrow().membership_config.clone();
            let change = if m.membership().voter_ids().any(|v| v == *id) {
                ChangeMembers::RemoveVoters(BTreeSet::from([*id]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([*id]))
            };
            raft.change_membership(change, false).await
        }
    }
}

/// What a refused membership change means, for a person (openraft's own texts print its
/// internal log IDs).
pub(crate) fn membership_refusal(e: &ClientWriteError<NodeId, NodeInfo>) -> String {
    match e {
        ClientWriteError::ForwardToLeader(f) => match f.leader_id {
            Some(id) => format!("this node is not the leader; node {id} is"),
            None => "there is no leader right now; retry in a moment".into(),
        },
        ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_)) => {
            "another membership change is still being committed; retry in a moment".into()
        }
        ClientWriteError::ChangeMembershipError(ChangeMembershipError::LearnerNotFound(l)) => {
            format!(
                "raft id {} is not a learner of this cluster: add it first (`ca-node cluster add`, or `ca-node join`)",
                l.node_id
            )
        }
        ClientWriteError::ChangeMembershipError(ChangeMembershipError::EmptyMembership(_)) => {
            "the change would leave the cluster without a voter".into()
        }
    }
}
