//! The node's side of its certificate authority ([`ca_authority`]): the CA journal as the
//! engine sees it, over this node's Raft replica and proposer ([`RaftJournal`]), and the
//! node's metrics as the place key managers report to.

use std::sync::Arc;

use async_trait::async_trait;
use ca_authority::keys::{KeyEvents, KeyRole};
use ca_raft::{Proposer, StateMachine};
use ca_state::{AuthorityKind, AuthorityRecord, Command, Response, RotationRequest};

use crate::metrics::Metrics;

pub use ca_authority::engine::subject_key_id;
pub use ca_authority::{issued_at, keys, x509, Ca, CaSettings, Signer, Tainted};

/// The CA journal in this node's replicated state: read from its own replica, changed
/// through `proposer` (which checks and meters every command).
pub struct RaftJournal {
    sm: StateMachine,
    proposer: Arc<dyn Proposer>,
}

impl RaftJournal {
    /// The journal of `sm`, written through `proposer`.
    pub fn new(sm: StateMachine, proposer: Arc<dyn Proposer>) -> Self {
        Self { sm, proposer }
    }
}

fn journal_err(e: ca_raft::Error) -> ca_authority::Error {
    ca_authority::Error::Journal(Box::new(e))
}

#[async_trait]
impl ca_authority::Journal for RaftJournal {
    async fn authorities(&self) -> ca_authority::Result<Vec<AuthorityRecord>> {
        self.sm.authorities().await.map_err(journal_err)
    }

    async fn authorities_version(&self) -> ca_authority::Result<i64> {
        self.sm.authorities_version().await.map_err(journal_err)
    }

    async fn rotation_requests(&self) -> ca_authority::Result<Vec<RotationRequest>> {
        self.sm.rotation_requests().await.map_err(journal_err)
    }

    async fn propose(&self, cmd: Command) -> ca_authority::Result<Response> {
        self.proposer.propose(cmd).await.map_err(journal_err)
    }
}

impl KeyEvents for Metrics {
    fn key_manager_up(&self, role: KeyRole, up: bool) {
        self.keymanager_up
            .with_label_values(&[role.as_str()])
            .set(i64::from(up));
    }

    fn key_manager_error(&self, backend: &str, kind: &str) {
        self.km_errors.with_label_values(&[backend, kind]).inc();
    }

    fn sign_started(&self) {
        self.km_in_flight.inc();
    }

    fn sign_finished(&self, backend: &str, role: KeyRole, seconds: f64) {
        self.km_in_flight.dec();
        self.km_sign_seconds
            .with_label_values(&[backend, role.as_str()])
            .observe(seconds);
    }

    fn authority_event(&self, kind: AuthorityKind, event: &str) {
        Metrics::authority_event(self, kind, event)
    }
}
