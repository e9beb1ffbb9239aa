//! Who may use this node's Raft transport and cluster service, and what a member may propose.
//!
//! A `spiffe://TD/ca-node/<id>` certificate that the trust bundle verifies only says that
//! its holder once got such an SVID. [`PeerGate`] admits a caller only if, in this node's
//! current view of the replicated state:
//! - `<id>` is in the effective Raft membership: a node that was `cluster remove`d, or never
//!   added, is refused. (A node that is itself in no membership yet, one that joined and
//!   waits for its first log entries, admits any ca-node the bundle verifies: it has no
//!   state to protect, and the real leader's log replaces whatever it was sent.)
//! - no certificate of its chain above the leaf is a revoked authority;
//! - its leaf was issued no earlier than the node's current join (the `attested_at` of its
//!   ca-node record, less the issuers' backdating): SVIDs of an earlier incarnation of the
//!   same node ID are refused.
//!
//! The view is kept in memory and refreshed when the membership or the CA journal changes
//! (and every few seconds), so a check costs a few hash look-ups and every call is checked.
//!
//! Every proposal, local or forwarded, is checked by [`PeerGate::check_command`] before it
//! reaches the log ([`CheckedProposer`] here, [`ca_raft::PeerPolicy::check_proposal`] on
//! the leader): entries go through the admin API's own validation, agents may not take a
//! reserved path, and the CA journal changes only in ways its rules allow (a node records
//! and activates only its own intermediates and JWT keys, certificates match their keys and
//! chain to a root of the journal, a revoked authority stays revoked).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use ca_identity::{SpiffeId, TrustDomain};
use ca_raft::{Admitted, PeerPolicy, Proposer, RaftNode, StateMachine};
use ca_state::{
    AgentRecord, AuthorityKind, AuthorityRecord, AuthorityState, Command, RejectCode, Response,
};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tonic::Status;

use crate::config::{is_reserved_path, node_id_in, valid_node_id, NodeConfig};
use crate::raft_tls;
use crate::Error;

/// How much earlier than the node's join its leaf may start (issuers backdate by 60 s).
const JOIN_SLACK: i64 = 120;
/// How often the view is rebuilt even without a change.
const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// At most one rebuild per this period on behalf of a refusal (so refused callers cannot
/// make the node read its state on every call).
const FORCED_REFRESH_EVERY: Duration = Duration::from_millis(200);

/// What this node's state says about other ca-nodes; see the module docs.
#[derive(Debug, Default)]
struct View {
    /// Node IDs in the effective membership.
    members: HashSet<String>,
    /// Public keys (SPKI DER) of revoked authorities, and their IDs and nodes.
    revoked: HashMap<Vec<u8>, (String, String)>,
    /// The CA journal, by authority ID.
    authorities: HashMap<String, AuthorityRecord>,
    /// When each member's current ca-node identity was issued by a Join.
    joined_at: HashMap<String, i64>,
}

/// What a peer's verified certificate chain says about it.
#[derive(Clone, Debug)]
struct Credential {
    node_id: String,
    not_before: i64,
    issuer_keys: Vec<Vec<u8>>,
}

/// The gate; cheap to clone. See the module docs.
#[derive(Clone)]
pub struct PeerGate {
    inner: Arc<Inner>,
}

struct Inner {
    config: NodeConfig,
    td: TrustDomain,
    raft: RaftNode,
    sm: StateMachine,
    view: RwLock<View>,
    /// When a refusal last rebuilt the view (see [`PeerGate::confirm`]).
    last_forced: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

impl std::fmt::Debug for PeerGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerGate")
    }
}

impl PeerGate {
    /// A gate over this node's Raft and state, its view loaded; [`PeerGate::run`] keeps it
    /// current.
    pub async fn new(config: NodeConfig, raft: RaftNode, sm: StateMachine) -> Result<Self, Error> {
        let gate = Self {
            inner: Arc::new(Inner {
                td: config.trust_domain(),
                config,
                raft,
                sm,
                view: RwLock::default(),
                last_forced: tokio::sync::Mutex::new(None),
            }),
        };
        gate.refresh().await?;
        Ok(gate)
    }

    /// Keeps the view current until `stop` turns true: at once when the membership or the
    /// CA journal changes, and every few seconds.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut metrics = self.inner.raft.metrics();
        let mut journal = self.inner.sm.subscribe_ca();
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        let mut membership = None;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                r = metrics.changed() => {
                    if r.is_err() { return; }
                    let now = metrics.borrow_and_update().membership_config.log_id().to_owned();
                    if membership.as_ref() == Some(&now) { continue; }
                    membership = Some(now);
                }
                r = journal.changed() => { if r.is_err() { return; } }
                _ = tick.tick() => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "could not refresh the view of cluster members; keeping the last one");
            }
        }
    }

    /// Rebuilds the view from the membership and the state.
    pub async fn refresh(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let members: HashSet<String> = inner
            .raft
            .status()
            .members
            .values()
            .map(|m| m.node.node_id.clone())
            .collect();
        let auths = inner.sm.authorities().await?;
        let mut joined_at = HashMap::new();
        for node in &members {
            let id = raft_tls::ca_node_id(&inner.td, node)?;
            if let Some(rec) = inner.sm.agent(id.as_str()).await? {
                joined_at.insert(node.clone(), rec.attested_at);
            }
        }
        let view = View {
            members,
            revoked: auths
                .iter()
                .filter(|a| a.state == AuthorityState::Revoked)
                .map(|a| (a.public_key.clone(), (a.id.clone(), a.node_id.clone())))
                .collect(),
            authorities: auths.into_iter().map(|a| (a.id.clone(), a)).collect(),
            joined_at,
        };
        *inner.view.write().expect("view lock") = view;
        Ok(())
    }

    fn credential(&self, certs: Option<&[CertificateDer<'_>]>) -> Result<Credential, Status> {
        let node_id = raft_tls::node_of_certs(&self.inner.td, certs)?;
        let certs = certs.unwrap_or_default();
        let info = |c: &CertificateDer<'_>| {
            ca_identity::x509::cert_info(c.as_ref())
                .map_err(|e| Status::unauthenticated(format!("the client certificate: {e}")))
        };
        let leaf = info(&certs[0])?;
        let mut issuer_keys = Vec::new();
        for c in &certs[1..] {
            issuer_keys.push(info(c)?.spki_der);
        }
        Ok(Credential {
            node_id,
            not_before: leaf.not_before,
            issuer_keys,
        })
    }

    /// The caller's standing: `Ok(true)` in full, `Ok(false)` only to replace its own revoked
    /// intermediate (its SVID was issued by it).
    fn check(&self, c: &Credential) -> Result<bool, String> {
        let v = self.inner.view.read().expect("view lock");
        if !v.members.is_empty() && !v.members.contains(&c.node_id) {
            return Err(format!(
                "ca-node {} is not a member of this cluster (removed, or never added); only members may use the Raft and cluster services",
                c.node_id
            ));
        }
        let mut full = true;
        for (id, owner) in c.issuer_keys.iter().filter_map(|k| v.revoked.get(k)) {
            if *owner != c.node_id {
                return Err(format!(
                    "the certificate of ca-node {} was issued by revoked authority {id}",
                    c.node_id
                ));
            }
            full = false;
        }
        if let Some(since) = v.joined_at.get(&c.node_id) {
            if c.not_before < since - JOIN_SLACK {
                return Err(format!(
                    "the certificate of ca-node {} was issued before the node last joined (at {since}): it belongs to an earlier incarnation",
                    c.node_id
                ));
            }
        }
        Ok(full)
    }

    /// The caller presenting `certs` (verified at the handshake, leaf first), if it may use
    /// the Raft transport or the cluster service now.
    fn admit_certs(&self, certs: Option<&[CertificateDer<'_>]>) -> Result<Admitted, Status> {
        let cred = self.credential(certs)?;
        let full = self.check(&cred).map_err(Status::permission_denied)?;
        if !full {
            // A member whose own intermediate was revoked holds only SVIDs it issued until
            // it has a replacement, which it needs the cluster for (see `Admitted::recovering`).
            return Ok(Admitted::recovering(cred.node_id));
        }
        Ok(Admitted::new(cred.node_id))
    }

    /// Runs `check`; if it refuses, rebuilds the view (at most once per 200 ms, whoever
    /// asks) and runs it again, so that a view a few milliseconds behind the state (a root
    /// or a member just added) never refuses what the state allows.
    async fn confirm<T, E>(&self, check: impl Fn() -> Result<T, E>) -> Result<T, E> {
        let first = check();
        if first.is_ok() {
            return first;
        }
        {
            let mut last = self.inner.last_forced.lock().await;
            let now = tokio::time::Instant::now();
            if last.is_some_and(|t| now.duration_since(t) < FORCED_REFRESH_EVERY) {
                return first;
            }
            *last = Some(now);
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "could not refresh the view of cluster members");
                return first;
            }
        }
        check()
    }

    /// Like [`PeerGate::admit_certs`], the view confirmed before a refusal.
    async fn admit_certs_confirmed(
        &self,
        certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<Admitted, Status> {
        self.confirm(|| self.admit_certs(certs)).await
    }

    /// Like [`PeerGate::check_command`], the view confirmed before a refusal.
    pub async fn check_command_confirmed(&self, caller: &str, cmd: &Command) -> Result<(), String> {
        self.confirm(|| self.check_command(caller, cmd)).await
    }

    /// What a caller admitted only to replace its revoked intermediate may propose: its own
    /// intermediates (a new key, then its certificate) and their states.
    fn check_recovery_command(&self, caller: &str, cmd: &Command) -> Result<(), String> {
        let own = match cmd {
            Command::PutAuthority { authority } => {
                authority.kind == AuthorityKind::Intermediate && authority.node_id == caller
            }
            Command::SetAuthorityState { id, .. } => self
                .inner
                .view
                .read()
                .expect("view lock")
                .authorities
                .get(id)
                .is_none_or(|a| a.kind == AuthorityKind::Intermediate && a.node_id == caller),
            _ => false,
        };
        if !own {
            return Err(format!(
                "ca-node {caller} presents an SVID of its own revoked intermediate: it may only record and activate its new intermediate"
            ));
        }
        self.check_command(caller, cmd)
    }

    /// Like [`PeerGate::admit_certs`], from a gRPC request's extensions.
    pub async fn admit_request(&self, extensions: &tonic::Extensions) -> Result<Admitted, Status> {
        let certs = crate::raft_tls::peer_certs(extensions);
        self.admit_certs_confirmed(certs.as_deref().map(|c| c.as_slice()))
            .await
    }

    /// Refuses a command that member `caller` may not propose; see the module docs.
    pub fn check_command(&self, caller: &str, cmd: &Command) -> Result<(), String> {
        let inner = &self.inner;
        if let Some(at) = cmd.lifecycle_time() {
            self.check_decision_time(caller, at)?;
        }
        match cmd {
            Command::CreateEntry { entry } | Command::UpdateEntry { entry } => {
                if entry.id.is_empty() || entry.id.len() > 128 {
                    return Err("an entry ID must be 1 to 128 bytes".into());
                }
                let proto = crate::convert::entry_to_proto(entry);
                let mut valid =
                    crate::validate::validate_entry(&inner.config, &proto, entry.id.clone(), 0)
                        .map_err(|e| e.to_string())?;
                valid.created_at = entry.created_at;
                valid.revision = entry.revision;
                if &valid != entry {
                    return Err(format!(
                        "entry {} is not in the form the admin API stores",
                        entry.id
                    ));
                }
                Ok(())
            }
            Command::DeleteEntry { .. } => Ok(()),
            Command::CreateJoinToken { token } => {
                if token.token.is_empty() || token.token.len() > 128 || token.used_at.is_some() {
                    return Err("a join token must be 1 to 128 bytes and unused".into());
                }
                let id = self.local_id("join token spiffe_id", &token.spiffe_id)?;
                if id.path().is_empty() {
                    return Err(format!("join token for {id}: an agent ID needs a path"));
                }
                if is_reserved_path(&id) && node_id_in(&id).is_none() {
                    return Err(format!("join token for {id}: a reserved /ca-node/ path"));
                }
                Ok(())
            }
            Command::AttestWithJoinToken { agent, .. } => self.check_agent(agent),
            Command::RegisterAgent { agent } => {
                if agent.attestation_type == "ca_node_join" {
                    return Err("a ca-node identity is only issued by a join token".into());
                }
                self.check_agent(agent)
            }
            Command::RenewAgent { spiffe_id, .. }
            | Command::EvictAgent { spiffe_id }
            | Command::BanAgent { spiffe_id } => self.local_id("spiffe_id", spiffe_id).map(|_| ()),
            Command::PutAuthority { authority } => self.check_put_authority(caller, authority),
            Command::SetAuthorityState { id, state, .. } => {
                let v = inner.view.read().expect("view lock");
                let Some(a) = v.authorities.get(id) else {
                    return Ok(()); // refused as NotFound when applied (or applied after a put this view has not seen)
                };
                if a.state == AuthorityState::Revoked && *state != AuthorityState::Revoked {
                    return Err(format!("authority {id} is revoked; revocation is final"));
                }
                let own = a.kind == AuthorityKind::Root || a.node_id == caller;
                if matches!(state, AuthorityState::Active | AuthorityState::Prepared) && !own {
                    return Err(format!(
                        "node {caller} may not make authority {id} of node {} {}",
                        a.node_id,
                        state.as_str()
                    ));
                }
                Ok(())
            }
            Command::KeyDestroyed { id, .. } => {
                let v = inner.view.read().expect("view lock");
                match v.authorities.get(id) {
                    Some(a) if a.kind != AuthorityKind::Root && a.node_id != caller => Err(
                        format!("node {caller} may not destroy the key of node {}'s authority {id}", a.node_id),
                    ),
                    Some(a) if matches!(a.state, AuthorityState::Active | AuthorityState::Prepared) => {
                        Err(format!("authority {id} is {}; only a retired or revoked authority's key is destroyed", a.state.as_str()))
                    }
                    _ => Ok(()),
                }
            }
            Command::RequestRotation { request } => {
                if !request.node_id.is_empty() && !valid_node_id(&request.node_id) {
                    return Err(format!("rotation request for node {:?}", request.node_id));
                }
                Ok(())
            }
            Command::Batch { commands } => commands
                .iter()
                .try_for_each(|c| self.check_command(caller, c)),
            other => Err(format!("unknown command {other:?}")),
        }
    }

    fn local_id(&self, what: &str, s: &str) -> Result<SpiffeId, String> {
        crate::validate::parse_local_id(&self.inner.config, what, s).map_err(|e| e.to_string())
    }

    fn check_agent(&self, agent: &AgentRecord) -> Result<(), String> {
        let id = self.local_id("agent spiffe_id", &agent.spiffe_id)?;
        let node = node_id_in(&id);
        match (agent.attestation_type.as_str(), node) {
            ("ca_node_join", Some(_)) => Ok(()),
            ("ca_node_join", None) => Err(format!("{id} is not a ca-node identity")),
            (_, _) if is_reserved_path(&id) => Err(format!(
                "{id}: the /ca-node/ path is reserved for ca-nodes; an agent may not take it"
            )),
            (_, _) if id.path().is_empty() => Err(format!("{id}: an agent ID needs a path")),
            _ => Ok(()),
        }
    }

    /// Refuses a lifecycle decision of `caller` stamped `at` further from this node's clock
    /// than `max_clock_skew_secs`: on the leader, which checks every forwarded proposal,
    /// that is the leader's time (a node whose clock jumped cannot retire or destroy on the
    /// strength of its own clock).
    fn check_decision_time(&self, caller: &str, at: i64) -> Result<(), String> {
        let max = i64::try_from(self.inner.config.max_clock_skew_secs).unwrap_or(i64::MAX);
        if max == 0 {
            return Ok(());
        }
        let off = at.saturating_sub(ca_identity::unix_now());
        if off.saturating_abs() > max {
            return Err(format!(
                "node {caller} decided a CA lifecycle step at {at}, {off} s from this node's clock (more than max_clock_skew_secs = {max}); it is not taken until the clocks agree (check time synchronization)"
            ));
        }
        Ok(())
    }

    fn check_put_authority(&self, caller: &str, a: &AuthorityRecord) -> Result<(), String> {
        let v = self.inner.view.read().expect("view lock");
        if let Some(old) = v.authorities.get(&a.id) {
            if old.state == AuthorityState::Revoked {
                return Err(format!(
                    "authority {} is revoked; revocation is final",
                    a.id
                ));
            }
            if old.kind != a.kind
                || old.node_id != a.node_id
                || old.public_key != a.public_key
                || old.key_id != a.key_id
                || (!old.cert_der.is_empty() && old.cert_der != a.cert_der)
            {
                return Err(format!(
                    "authority {} exists: only its certificate (once) and state may change",
                    a.id
                ));
            }
        }
        ca_identity::pubkey::parse_spki(&a.public_key)
            .map_err(|e| format!("authority {}: its public key: {e}", a.id))?;
        match a.kind {
            AuthorityKind::Root if !a.node_id.is_empty() => {
                return Err(format!("root {} must not name a node", a.id))
            }
            AuthorityKind::Root => {}
            _ if a.node_id != caller => {
                return Err(format!(
                    "node {caller} may not record authority {} for node {}",
                    a.id, a.node_id
                ))
            }
            _ => {}
        }
        if a.cert_der.is_empty() {
            return match a.kind {
                AuthorityKind::Root => Err(format!("root {} needs its certificate", a.id)),
                _ => Ok(()),
            };
        }
        let info = ca_identity::x509::cert_info(&a.cert_der)
            .map_err(|e| format!("authority {}: its certificate: {e}", a.id))?;
        if info.spki_der != a.public_key || !info.is_ca {
            return Err(format!(
                "authority {}: its certificate is not a CA certificate for its public key",
                a.id
            ));
        }
        let issuers: Vec<&AuthorityRecord> = match a.kind {
            AuthorityKind::Root => vec![a],
            AuthorityKind::Intermediate => v
                .authorities
                .values()
                .filter(|r| r.kind == AuthorityKind::Root && r.state != AuthorityState::Revoked)
                .collect(),
            AuthorityKind::Jwt => return Err(format!("JWT key {} has no certificate", a.id)),
        };
        let signed_by = |r: &AuthorityRecord| {
            tbs_and_signature(&a.cert_der).is_some_and(|(tbs, sig)| {
                ca_identity::pubkey::verify_x509_signature(&r.public_key, &tbs, &sig).is_ok()
            })
        };
        if issuers.into_iter().any(signed_by) {
            Ok(())
        } else {
            Err(format!(
                "authority {}: its certificate is not signed by {}",
                a.id,
                if a.kind == AuthorityKind::Root {
                    "its own key"
                } else {
                    "a root of the journal that is not revoked"
                }
            ))
        }
    }
}

/// The TBSCertificate and signature of a DER certificate.
fn tbs_and_signature(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some((
        cert.tbs_certificate.as_ref().to_vec(),
        cert.signature_value.data.to_vec(),
    ))
}

#[async_trait]
impl PeerPolicy for PeerGate {
    async fn admit(&self, extensions: &tonic::Extensions) -> Result<Admitted, Status> {
        self.admit_request(extensions).await
    }
    async fn check_proposal(&self, caller: &Admitted, cmd: &Command) -> Result<(), String> {
        if caller.is_recovering() {
            return self
                .confirm(|| self.check_recovery_command(caller.node_id(), cmd))
                .await;
        }
        self.check_command_confirmed(caller.node_id(), cmd).await
    }
}

/// This node's own proposals, checked by the same [`PeerGate::check_command`] as forwarded
/// ones before they reach the log; a refused one is answered `Rejected`.
#[derive(Debug)]
pub struct CheckedProposer {
    inner: Arc<dyn Proposer>,
    gate: PeerGate,
    me: String,
}

impl CheckedProposer {
    /// Proposals of node `me` through `inner`, checked by `gate`.
    pub fn new(inner: Arc<dyn Proposer>, gate: PeerGate, me: String) -> Self {
        Self { inner, gate, me }
    }
}

#[async_trait]
impl Proposer for CheckedProposer {
    async fn propose(&self, cmd: Command) -> ca_raft::Result<Response> {
        if let Err(message) = self.gate.check_command_confirmed(&self.me, &cmd).await {
            tracing::warn!(%message, "refused a proposal of this node");
            return Ok(Response::Rejected {
                code: RejectCode::PermissionDenied,
                message,
            });
        }
        self.inner.propose(cmd).await
    }
}
