//! A membership change forwarded to the leader <-> `raft.ChangeMembershipRequest`.

use ca_proto::raft as pb;
use ca_proto::raft::change_membership_request::Change;

use super::{missing, FromPb, IntoPb};
use crate::membership::MembershipChange;
use crate::types::NodeInfo;

impl IntoPb<pb::ChangeMembershipRequest> for MembershipChange {
    fn into_pb(self) -> pb::ChangeMembershipRequest {
        let change = match self {
            MembershipChange::AddLearner { id, node, wait } => Change::AddLearner(pb::AddLearner {
                id,
                node: Some(node.into_pb()),
                wait,
            }),
            MembershipChange::Promote(id) => Change::Promote(id),
            MembershipChange::Remove(id) => Change::Remove(id),
        };
        pb::ChangeMembershipRequest {
            change: Some(change),
        }
    }
}

impl FromPb<pb::ChangeMembershipRequest> for MembershipChange {
    fn from_pb(v: pb::ChangeMembershipRequest) -> Result<Self, tonic::Status> {
        Ok(
            match v.change.ok_or_else(|| missing("membership change"))? {
                Change::AddLearner(a) => MembershipChange::AddLearner {
                    id: a.id,
                    node: NodeInfo::from_pb(a.node.ok_or_else(|| missing("learner node"))?)?,
                    wait: a.wait,
                },
                Change::Promote(id) => MembershipChange::Promote(id),
                Change::Remove(id) => MembershipChange::Remove(id),
            },
        )
    }
}
