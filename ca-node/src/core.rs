//! The node core shared by its APIs: config, state, proposer, CA, metrics.

use std::sync::Arc;

use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_identity::SpiffeId;
use ca_kms::KeyManager;
use ca_proto::types;
use ca_raft::{Proposer, RaftNode, StateMachine};
use ca_state::{AgentRecord, Command, EntryRecord, JoinTokenRecord, Response};

use crate::ca::Ca;
use crate::config::NodeConfig;
use crate::error::from_rejection;
use crate::metrics::Metrics;
use crate::Error;

/// Everything a node's APIs need. Built once by [`crate::node::start_with`]; outside this
/// crate (the CLI, the dev cluster, tests) it is read through the accessors below.
#[derive(Debug)]
pub struct NodeCore {
    /// Configuration.
    pub(crate) config: NodeConfig,
    /// Replicated state (reads).
    pub(crate) sm: StateMachine,
    /// Replicated log (writes).
    pub(crate) proposer: Arc<dyn Proposer>,
    /// The CA.
    pub(crate) ca: Ca,
    /// Metrics.
    pub(crate) metrics: Metrics,
    /// This node's Raft member (cluster status, membership, read barrier).
    pub(crate) raft: RaftNode,
    /// The node's own SVID (`spiffe://TD/ca-node/<id>`), served and presented to peers.
    pub(crate) svid: SvidResolver,
    /// The X.509 roots peers and agents are verified against.
    pub(crate) roots: LiveRoots,
    /// This node's own root key manager (without forwarding to other members).
    pub(crate) local_root_km: Arc<dyn KeyManager>,
    /// `host:port` members reach this node at.
    pub(crate) advertise_addr: String,
    /// Who may use the Raft transport and cluster service, and what may be proposed.
    pub(crate) gate: crate::peer_gate::PeerGate,
    /// The open `WatchEntries` streams, woken by what changes for their agent.
    pub(crate) watch_hub: Arc<crate::watch_hub::WatchHub>,
}

/// Proposes a command, turning a refusal into an error.
pub async fn propose(p: &dyn Proposer, cmd: Command) -> Result<Response, Error> {
    match p.propose(cmd).await? {
        Response::Rejected { code, message } => Err(from_rejection(code, message)),
        other => Ok(other),
    }
}

impl NodeCore {
    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The replicated state as applied on this node (reads).
    pub fn state(&self) -> &StateMachine {
        &self.sm
    }

    /// Where writes go: the replicated log, through the peer gate's checks and metrics.
    pub fn proposer(&self) -> &dyn Proposer {
        self.proposer.as_ref()
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This node's Raft member.
    pub fn raft(&self) -> &RaftNode {
        &self.raft
    }

    /// The node's own serving SVID.
    pub fn svid(&self) -> &SvidResolver {
        &self.svid
    }

    /// The `host:port` members reach this node at.
    pub fn advertise_addr(&self) -> &str {
        &self.advertise_addr
    }

    /// A read barrier: returns once this node has applied everything committed before the
    /// call, so the reads that follow are current (linearizable). `UNAVAILABLE` without a
    /// leader and a quorum.
    pub async fn read_barrier(&self) -> Result<(), Error> {
        self.raft.ensure_linearizable().await?;
        Ok(())
    }

    /// The record of agent `id` if it is in good standing for a caller presenting the SVID
    /// with `serial`: attested, not banned, and the SVID its current one (or the one it just
    /// renewed). After an eviction and a new attestation under the same ID, the old host's
    /// certificate is refused even though it is otherwise valid. Checked by every node API
    /// call and again by open `WatchEntries` streams when the agent's credentials change.
    pub(crate) async fn agent_in_standing(
        &self,
        id: &str,
        serial: &str,
    ) -> Result<AgentRecord, Error> {
        let current =
            |a: &AgentRecord| serial == a.x509_svid_serial || serial == a.previous_x509_svid_serial;
        let mut agent = self.sm.agent(id).await?;
        if !agent.as_ref().is_some_and(current) {
            // Attested or renewed through another node a moment ago, perhaps: this replica
            // may not have applied it yet. Decide on current state.
            self.read_barrier().await?;
            agent = self.sm.agent(id).await?;
        }
        let agent = agent.ok_or_else(|| {
            Error::PermissionDenied(format!(
                "agent {id} is not attested (it was evicted or never attested); attest again"
            ))
        })?;
        if agent.banned {
            return Err(Error::PermissionDenied(format!("agent {id} is banned")));
        }
        if !current(&agent) {
            return Err(Error::PermissionDenied(format!(
                "agent {id}: this SVID (serial {serial}) is no longer the agent's own; the agent was evicted and attested again elsewhere. Attest this host again with a new join token"
            )));
        }
        Ok(agent)
    }

    /// Parses a SPIFFE ID that must be in this trust domain; `what` names the field.
    pub fn parse_local_id(&self, what: &str, s: &str) -> Result<SpiffeId, Error> {
        crate::validate::parse_local_id(&self.config, what, s)
    }

    /// Validates an entry from the admin API and turns it into a record.
    pub fn validate_entry(
        &self,
        e: &types::Entry,
        id: String,
        created_at: i64,
    ) -> Result<EntryRecord, Error> {
        crate::validate::validate_entry(&self.config, e, id, created_at)
    }

    /// Creates a join token (random UUID), optionally for a given agent SPIFFE ID.
    pub async fn create_join_token(
        &self,
        spiffe_id: &str,
        ttl: i64,
    ) -> Result<JoinTokenRecord, Error> {
        let ttl = if ttl == 0 {
            self.config.ttl.join_token
        } else {
            ttl
        };
        if !(1..=365 * 24 * 3600).contains(&ttl) {
            return Err(Error::InvalidArgument(format!(
                "ttl {ttl}s: use 1 second to 1 year"
            )));
        }
        let token = uuid::Uuid::new_v4().to_string();
        let spiffe_id = if spiffe_id.is_empty() {
            self.config
                .trust_domain()
                .id_with_path(&format!("/agent/join_token/{token}"))?
        } else {
            let id = self.parse_local_id("spiffe_id", spiffe_id)?;
            // A token for spiffe://TD/ca-node/<node id> lets a new ca-node join the cluster
            // (`ca-node join`); any other /ca-node/ path is reserved.
            let node_id = crate::config::node_id_in(&id);
            if id.path().is_empty() || (crate::config::is_reserved_path(&id) && node_id.is_none()) {
                return Err(Error::InvalidArgument(
                    "spiffe_id: an agent ID needs a path outside /ca-node/ (or, to let a new ca-node join, exactly spiffe://TD/ca-node/<node id>)".into(),
                ));
            }
            if let Some(node_id) = node_id {
                if let Some((raft_id, _)) = self
                    .raft
                    .status()
                    .members
                    .iter()
                    .find(|(_, m)| m.node.node_id == node_id)
                {
                    return Err(Error::InvalidArgument(format!(
                        "spiffe_id: {id} is already a member of the cluster (raft id {raft_id}); a joining ca-node needs a node ID of its own (`ca-node cluster remove` the old member first)"
                    )));
                }
            }
            id
        };
        let rec = JoinTokenRecord {
            token,
            spiffe_id: spiffe_id.to_string(),
            expires_at: ca_identity::unix_now() + ttl,
            used_at: None,
        };
        propose(
            self.proposer.as_ref(),
            Command::CreateJoinToken { token: rec.clone() },
        )
        .await?;
        Ok(rec)
    }
}
