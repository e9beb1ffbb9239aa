//! Taking a command to the log and getting the state machine's answer.

use async_trait::async_trait;
use tokio::sync::Mutex;

use crate::node::RaftNode;
use crate::store::state_machine::StateMachine;
use crate::Result;
use ca_state::{Command, Response};

/// Takes commands to the (replicated) log; returns once the command is applied.
#[async_trait]
pub trait Proposer: Send + Sync + std::fmt::Debug {
    /// Appends `cmd` to the log and returns the state machine's response to it.
    async fn propose(&self, cmd: Command) -> Result<Response>;
}

/// The single-node log: commands are numbered and applied one at a time, durably, before
/// `propose` returns. For development and single-node use; clusters use [`RaftProposer`].
#[derive(Debug)]
pub struct LocalProposer {
    sm: StateMachine,
    order: Mutex<()>,
}

impl LocalProposer {
    /// A proposer over `sm`.
    pub fn new(sm: StateMachine) -> Self {
        Self {
            sm,
            order: Mutex::new(()),
        }
    }
}

#[async_trait]
impl Proposer for LocalProposer {
    async fn propose(&self, cmd: Command) -> Result<Response> {
        let _turn = self.order.lock().await;
        let index = self.sm.last_applied() + 1;
        self.sm.apply(index, &cmd).await
    }
}

/// The replicated log: commands go through openraft on a [`RaftNode`] — applied on every
/// member, in log order, once a quorum has them. On a follower, commands are forwarded to
/// the leader; see [`RaftNode::write`] for retries and [`crate::Error::Unavailable`].
#[derive(Clone, Debug)]
pub struct RaftProposer {
    node: RaftNode,
}

impl RaftProposer {
    /// A proposer over `node`.
    pub fn new(node: RaftNode) -> Self {
        Self { node }
    }

    /// The node it proposes through.
    pub fn node(&self) -> &RaftNode {
        &self.node
    }
}

#[async_trait]
impl Proposer for RaftProposer {
    async fn propose(&self, cmd: Command) -> Result<Response> {
        self.node.write(cmd).await
    }
}
