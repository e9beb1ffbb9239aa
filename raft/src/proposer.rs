//! Taking a command to the log and getting the state machine's answer.

use async_trait::async_trait;
use tokio::sync::Mutex;

use crate::command::{Command, Response};
use crate::state_machine::StateMachine;
use crate::Result;

/// Takes commands to the (replicated) log; returns once the command is applied.
#[async_trait]
pub trait Proposer: Send + Sync + std::fmt::Debug {
    /// Appends `cmd` to the log and returns the state machine's response to it.
    async fn propose(&self, cmd: Command) -> Result<Response>;
}

/// The single-node log: commands are numbered and applied one at a time, durably, before
/// `propose` returns. Replaced by the openraft proposer for clusters.
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
