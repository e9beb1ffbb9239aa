//! The cluster of ca-nodes as a member serves it: the `Cluster` service (a joining node's
//! `Join` and `AddMe`, members' `SignIntermediate`, `IssuedCounts` and `Clock`), the root
//! used across members, and membership changes.
//!
//! - **Joining** (the member's side; the new node's is [`crate::bootstrap::join`]): the
//!   member consumes a ca-node join token through Raft (at most once in the whole cluster,
//!   whichever member is asked) and returns the node's first ca-node SVID; `AddMe`, with
//!   that SVID, adds it as a learner, which catches up (log or snapshot) and is promoted.
//! - **The root** ([`ClusterRootKeyManager`]): every node signs its own intermediate with
//!   the cluster root. If this node's root key manager holds the root key (a network HSM
//!   or a KMS key shared by every node: the production setup), it signs locally. If not
//!   (software keys, or per-node HSMs), the intermediate's TBSCertificate is sent to the
//!   members in turn (`Cluster.SignIntermediate`); a member whose key manager holds the root
//!   checks that it is an intermediate CA certificate for the calling node of this trust
//!   domain within the configured lifetime, and signs it.
//! - The files a node keeps about its membership are [`crate::registry`]'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_identity::TrustDomain;
use ca_kms::{KeyAlgorithm, KeyManager, KeyProtection, SigningKey};
use ca_proto::admin::cluster_client::ClusterClient;
use ca_proto::admin::cluster_server::{Cluster, ClusterServer};
use ca_proto::admin::*;
use ca_raft::{NodeId, NodeInfo, RaftNode, StateMachine};
use ca_state::{AgentRecord, AuthorityKind, AuthorityState, Command};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::config::valid_node_id;
use crate::convert::bundle_to_proto;
use crate::core::{propose, NodeCore};
use crate::raft_tls;
use crate::Error;

pub(crate) fn valid_addr(a: &str) -> bool {
    a.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
}

// ---------------------------------------------------------------------------------------
// Reaching other members

/// A cached channel's member, address and the leaf certificate this node presented on it.
type ChannelKey = (NodeId, String, Vec<u8>);

/// Channels to other members' cluster service, over mutually authenticated TLS.
#[derive(Clone)]
pub struct Peers {
    raft: RaftNode,
    svid: SvidResolver,
    roots: LiveRoots,
    td: TrustDomain,
    channels: Arc<Mutex<HashMap<ChannelKey, Channel>>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Peers")
    }
}

impl Peers {
    /// Peers as `raft`'s membership knows them, reached with `svid` against `roots`.
    pub fn new(raft: RaftNode, svid: SvidResolver, roots: LiveRoots, td: TrustDomain) -> Self {
        Self {
            raft,
            svid,
            roots,
            td,
            channels: Arc::default(),
        }
    }

    /// The other members, the leader first.
    pub fn others(&self) -> Vec<(NodeId, NodeInfo)> {
        let st = self.raft.status();
        let mut out: Vec<(NodeId, NodeInfo)> = st
            .members
            .iter()
            .filter(|(id, _)| **id != st.id)
            .map(|(id, m)| (*id, m.node.clone()))
            .collect();
        out.sort_by_key(|(id, _)| (Some(*id) != st.leader, *id));
        out
    }

    /// A cluster-service client for member `id`.
    pub fn client(&self, id: NodeId, node: &NodeInfo) -> Result<ClusterClient<Channel>, Error> {
        // A connection keeps the certificate it was opened with: a renewed SVID gets new ones.
        let leaf = self
            .svid
            .current()
            .and_then(|k| k.cert.first().map(|c| c.to_vec()))
            .unwrap_or_default();
        let key = (id, node.addr.clone(), leaf);
        let mut map = self.channels.lock().expect("channels lock");
        map.retain(|(i, a, l), _| *i != id || *a != node.addr || *l == key.2);
        let ch = match map.get(&key) {
            Some(c) => c.clone(),
            None => {
                let expected = raft_tls::ca_node_id(&self.td, &node.node_id)?;
                let tls = raft_tls::client_tls(&self.svid, &self.roots, expected);
                let c = raft_tls::tls_channel(&node.addr, tls)
                    .map_err(|e| Error::Internal(format!("channel to {}: {e}", node.addr)))?;
                map.insert(key, c.clone());
                c
            }
        };
        Ok(ClusterClient::new(ch))
    }
}

// ---------------------------------------------------------------------------------------
// The root, wherever it is

fn algorithm_of(spki: &[u8]) -> Option<KeyAlgorithm> {
    use ca_identity::pubkey::KeyKind;
    Some(match ca_identity::pubkey::parse_spki(spki).ok()?.kind {
        KeyKind::EcP256 => KeyAlgorithm::EcP256,
        KeyKind::EcP384 => KeyAlgorithm::EcP384,
        KeyKind::Rsa { bits: 2048 } => KeyAlgorithm::Rsa2048,
        KeyKind::Rsa { bits: 3072 } => KeyAlgorithm::Rsa3072,
        KeyKind::Rsa { .. } => return None,
    })
}

/// The root role's key manager in a cluster: this node's own root key manager, and, for a
/// root it does not hold, signatures by the member that does (see the module docs).
#[derive(Debug)]
pub struct ClusterRootKeyManager {
    local: Arc<dyn KeyManager>,
    sm: StateMachine,
    peers: Peers,
}

impl ClusterRootKeyManager {
    /// Over this node's own root key manager `local`.
    pub fn new(local: Arc<dyn KeyManager>, sm: StateMachine, peers: Peers) -> Self {
        Self { local, sm, peers }
    }
}

#[async_trait]
impl KeyManager for ClusterRootKeyManager {
    fn backend(&self) -> &'static str {
        self.local.backend()
    }
    fn is_production_grade(&self) -> bool {
        self.local.is_production_grade()
    }
    async fn generate(&self, name: &str, alg: KeyAlgorithm) -> ca_kms::Result<Arc<dyn SigningKey>> {
        self.local.generate(name, alg).await
    }
    async fn get(&self, name: &str) -> ca_kms::Result<Arc<dyn SigningKey>> {
        match self.local.get(name).await {
            Err(ca_kms::Error::NotFound(_)) => {}
            other => return other,
        }
        let root = self
            .sm
            .authorities()
            .await
            .map_err(|e| ca_kms::Error::Backend(format!("reading the CA journal: {e}")))?
            .into_iter()
            .find(|a| a.kind == AuthorityKind::Root && a.key_id == name)
            .ok_or_else(|| ca_kms::Error::NotFound(name.to_owned()))?;
        let alg = algorithm_of(&root.public_key).ok_or_else(|| {
            ca_kms::Error::Backend(format!("root {} has an unsupported key", root.id))
        })?;
        Ok(Arc::new(RemoteRootKey {
            root_id: root.id,
            name: name.to_owned(),
            alg,
            spki: root.public_key,
            peers: self.peers.clone(),
        }))
    }
    async fn delete(&self, name: &str) -> ca_kms::Result<()> {
        match self.local.delete(name).await {
            Err(ca_kms::Error::NotFound(_)) => Err(ca_kms::Error::Unsupported {
                backend: "cluster",
                what: format!(
                    "root key {name} is held by another member's key manager; that member destroys it"
                ),
            }),
            other => other,
        }
    }
    async fn list(&self) -> ca_kms::Result<Vec<String>> {
        self.local.list().await
    }
    async fn protection(&self, name: &str) -> ca_kms::Result<KeyProtection> {
        self.local.protection(name).await
    }
}

/// The root key of another member: signatures of intermediate certificates only.
#[derive(Debug)]
struct RemoteRootKey {
    root_id: String,
    name: String,
    alg: KeyAlgorithm,
    spki: Vec<u8>,
    peers: Peers,
}

#[async_trait]
impl SigningKey for RemoteRootKey {
    fn name(&self) -> &str {
        &self.name
    }
    fn algorithm(&self) -> KeyAlgorithm {
        self.alg
    }
    fn public_key_spki(&self) -> &[u8] {
        &self.spki
    }
    async fn sign(&self, msg: &[u8]) -> ca_kms::Result<Vec<u8>> {
        let mut why = Vec::new();
        for (id, node) in self.peers.others() {
            let mut client = match self.peers.client(id, &node) {
                Ok(c) => c,
                Err(e) => {
                    why.push(format!("{node}: {e}"));
                    continue;
                }
            };
            let mut req = Request::new(SignIntermediateRequest {
                root_id: self.root_id.clone(),
                tbs_certificate: msg.to_vec(),
            });
            req.set_timeout(Duration::from_secs(10));
            match client.sign_intermediate(req).await {
                Ok(r) => {
                    let sig = r.into_inner().signature;
                    // A member could only hand back garbage by a bug; catch it here rather
                    // than record an intermediate nobody can verify.
                    ca_identity::pubkey::verify_x509_signature(&self.spki, msg, &sig).map_err(
                        |e| ca_kms::Error::Backend(format!("member {node} signed wrongly: {e}")),
                    )?;
                    tracing::info!(root = %self.root_id, member = %node, "the root was used by another member to sign this node's intermediate");
                    return Ok(sig);
                }
                Err(s) => why.push(format!("{node}: {}", s.message())),
            }
        }
        Err(ca_kms::Error::Unavailable(format!(
            "this node's root key manager does not hold root {} and no member that does answered ({})",
            self.root_id,
            if why.is_empty() {
                "no other members".to_owned()
            } else {
                why.join("; ")
            }
        )))
    }
}

/// Checks that `tbs` (a DER TBSCertificate) is an intermediate CA certificate of `td` for
/// node `node_id`, issued by `root_der`, living at most `max_lifetime` seconds (plus the
/// 60 s backdating), and not outliving the root.
pub fn check_intermediate_tbs(
    tbs: &[u8],
    root_der: &[u8],
    td: &TrustDomain,
    node_id: &str,
    max_lifetime: i64,
) -> Result<(), Error> {
    use x509_parser::prelude::*;
    let bad = |m: String| Error::PermissionDenied(format!("refusing to sign: {m}"));
    let (rest, tbs) =
        TbsCertificate::from_der(tbs).map_err(|e| bad(format!("not a TBSCertificate: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the TBSCertificate".into()));
    }
    let (_, root) = X509Certificate::from_der(root_der)
        .map_err(|e| Error::Internal(format!("the root certificate does not parse: {e}")))?;
    if tbs.issuer().as_raw() != root.subject().as_raw() {
        return Err(bad("its issuer is not the root".into()));
    }
    match tbs.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca && bc.value.path_len_constraint == Some(0) => {}
        _ => return Err(bad("not a CA certificate with path length 0".into())),
    }
    let want_uri = td.id().to_string();
    match tbs.subject_alternative_name() {
        Ok(Some(san))
            if san.value.general_names.len() == 1
                && matches!(san.value.general_names[0], GeneralName::URI(u) if u == want_uri) => {}
        _ => return Err(bad(format!("its only URI SAN must be {want_uri}"))),
    }
    let cn = tbs
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default();
    if !cn.contains(&format!(" intermediate int-{node_id}-")) {
        return Err(bad(format!(
            "its subject {cn:?} is not an intermediate of node {node_id}"
        )));
    }
    let nb = tbs.validity().not_before.timestamp();
    let na = tbs.validity().not_after.timestamp();
    let now = ca_identity::unix_now();
    if na - nb > max_lifetime + 60 + 5 {
        return Err(bad(format!(
            "it lives {}s, more than ttl.intermediate ({max_lifetime}s) allows",
            na - nb
        )));
    }
    if nb < now - 600 || nb > now + 600 {
        return Err(bad("its notBefore is not close to now".into()));
    }
    if na > root.validity().not_after.timestamp() {
        return Err(bad("it would outlive the root".into()));
    }
    Ok(())
}

/// The SubjectPublicKeyInfo (DER) of a DER TBSCertificate.
pub fn tbs_public_key(tbs: &[u8]) -> Result<Vec<u8>, Error> {
    use x509_parser::prelude::*;
    let (_, tbs) = TbsCertificate::from_der(tbs).map_err(|e| {
        Error::PermissionDenied(format!("refusing to sign: not a TBSCertificate: {e}"))
    })?;
    Ok(tbs.subject_pki.raw.to_vec())
}

// ---------------------------------------------------------------------------------------
// The cluster service (server side)

/// `spiffeca.admin.v1.Cluster`, served on the node API's TLS port.
#[derive(Clone, Debug)]
pub struct ClusterService {
    core: Arc<NodeCore>,
}

impl ClusterService {
    /// The service over the node core.
    pub fn new(core: Arc<NodeCore>) -> Self {
        Self { core }
    }

    /// The tonic server.
    pub fn into_server(self) -> ClusterServer<Self> {
        ClusterServer::new(self)
    }

    async fn join(&self, r: JoinRequest) -> Result<JoinResponse, Error> {
        let core = &self.core;
        let td = core.config.trust_domain();
        if !valid_node_id(&r.node_id) {
            return Err(Error::InvalidArgument(format!(
                "node_id {:?}: use 1 to 63 characters of a-z 0-9 -",
                r.node_id
            )));
        }
        if r.token.is_empty() {
            return Err(Error::InvalidArgument("the join token is empty".into()));
        }
        let id = raft_tls::ca_node_id(&td, &r.node_id)?;
        core.read_barrier().await?;
        let rec = core.sm.join_token(&r.token).await?.ok_or_else(|| {
            Error::PermissionDenied(format!(
                "unknown join token; create one on a member with `ca-node token generate --spiffe-id {id}`"
            ))
        })?;
        if rec.spiffe_id != id.as_str() {
            return Err(Error::PermissionDenied(format!(
                "this join token is for {}, not for {id}",
                rec.spiffe_id
            )));
        }
        if let Some((raft_id, _)) = core
            .raft
            .status()
            .members
            .iter()
            .find(|(_, m)| m.node.node_id == r.node_id)
        {
            return Err(Error::AlreadyExists(format!(
                "node {} is already a member (raft id {raft_id}); remove it first",
                r.node_id
            )));
        }
        let csr = rcgen::CertificateSigningRequestParams::from_der(&r.csr.clone().into()).map_err(
            |e| Error::InvalidArgument(format!("the CSR is not a valid PKCS#10 request: {e}")),
        )?;
        let chain = core
            .ca
            .mint_x509_svid(&id, &csr.public_key, core.config.max_x509_svid_ttl(), &[])
            .await?;
        let info = ca_identity::x509::cert_info(&chain[0])?;
        let now = ca_identity::unix_now();
        // Consumption is decided by the state machine, atomically, in log order: the same
        // token presented to several members at once is used at most once.
        propose(
            core.proposer.as_ref(),
            Command::AttestWithJoinToken {
                token: r.token.clone(),
                now,
                agent: AgentRecord {
                    spiffe_id: id.to_string(),
                    attestation_type: ca_state::CA_NODE_JOIN.into(),
                    x509_svid_serial: info.serial_hex,
                    x509_svid_expires_at: info.not_after,
                    previous_x509_svid_serial: String::new(),
                    banned: false,
                    attested_at: now,
                    selectors: vec![],
                },
            },
        )
        .await
        .map_err(|e| match e {
            Error::FailedPrecondition(m) | Error::NotFound(m) => Error::PermissionDenied(m),
            other => other,
        })?;
        // A node that joins has a fresh data dir: any authority left active under its node
        // ID belongs to an earlier incarnation whose keys went with it.
        retire_node_authorities(core, &r.node_id).await?;
        tracing::info!(node = %r.node_id, "a ca-node joined with a join token; it gets its first SVID");
        Ok(JoinResponse {
            svid_chain: chain,
            bundle: Some(bundle_to_proto(core.ca.bundle()?.as_ref())),
        })
    }

    async fn add_me(&self, node_id: String, serial: String, r: AddMeRequest) -> Result<u64, Error> {
        let core = &self.core;
        let td = core.config.trust_domain();
        if r.raft_id == 0 {
            return Err(Error::InvalidArgument("raft_id must be positive".into()));
        }
        if !valid_addr(&r.addr) {
            return Err(Error::InvalidArgument(format!(
                "addr {:?}: use host:port",
                r.addr
            )));
        }
        core.read_barrier().await?;
        let id = raft_tls::ca_node_id(&td, &node_id)?;
        let rec = core.sm.agent(id.as_str()).await?.ok_or_else(|| {
            Error::PermissionDenied(format!(
                "{id} has not joined with a join token (or was removed since); create a new token with `ca-node token generate --spiffe-id {id}`"
            ))
        })?;
        if rec.banned {
            return Err(Error::PermissionDenied(format!("{id} is banned")));
        }
        if rec.x509_svid_serial != serial {
            return Err(Error::PermissionDenied(format!(
                "{id}: present the SVID the Join call issued (serial {}), not serial {serial}",
                rec.x509_svid_serial
            )));
        }
        for (rid, m) in core.raft.status().members {
            if rid == r.raft_id && m.node.node_id != node_id {
                return Err(Error::AlreadyExists(format!(
                    "raft id {rid} belongs to node {}; raft ids are never reused",
                    m.node.node_id
                )));
            }
            if rid != r.raft_id && m.node.node_id == node_id {
                return Err(Error::AlreadyExists(format!(
                    "node {node_id} is already a member under raft id {rid}; remove it first"
                )));
            }
        }
        let node = NodeInfo {
            addr: r.addr.clone(),
            node_id: node_id.clone(),
        };
        let added = tokio::time::timeout(
            Duration::from_secs(60),
            core.raft.add_learner(r.raft_id, node, true),
        )
        .await
        .map_err(|_| {
            Error::Unavailable(format!(
                "node {node_id} was added as a learner and is still catching up; call again"
            ))
        })??;
        tracing::info!(node = %node_id, raft_id = r.raft_id, "added a learner that has caught up");
        if !r.promote {
            return Ok(added.index);
        }
        let promoted = core.raft.promote(r.raft_id).await?;
        tracing::info!(node = %node_id, raft_id = r.raft_id, "promoted to voter");
        Ok(promoted.index)
    }

    async fn sign_intermediate(
        &self,
        node_id: String,
        r: SignIntermediateRequest,
    ) -> Result<Vec<u8>, Error> {
        let core = &self.core;
        let root = core
            .sm
            .authorities()
            .await?
            .into_iter()
            .find(|a| {
                a.id == r.root_id
                    && a.kind == AuthorityKind::Root
                    && a.state != AuthorityState::Revoked
            })
            .ok_or_else(|| Error::NotFound(format!("no usable root {} here", r.root_id)))?;
        let key = match core.local_root_km.get(&root.key_id).await {
            Ok(k) => k,
            Err(ca_kms::Error::NotFound(_)) => {
                return Err(Error::NotFound(format!(
                    "this node's root key manager does not hold root {}",
                    root.id
                )))
            }
            Err(e) => return Err(e.into()),
        };
        check_intermediate_tbs(
            &r.tbs_certificate,
            &root.cert_der,
            &core.config.trust_domain(),
            &node_id,
            core.config.ttl.intermediate,
        )?;
        // Only a key the journal holds as this node's prepared, not yet certified
        // intermediate: whatever the root signs is in the journal (`ca show`) and revocable.
        let spki = tbs_public_key(&r.tbs_certificate)?;
        core.read_barrier().await?;
        let recorded = core.sm.authorities().await?.into_iter().find(|a| {
            a.kind == AuthorityKind::Intermediate && a.node_id == node_id && a.public_key == spki
        });
        match recorded {
            Some(a) if a.state == AuthorityState::Prepared && a.cert_der.is_empty() => {}
            Some(a) => {
                return Err(Error::PermissionDenied(format!(
                    "refusing to sign: intermediate {} of node {node_id} is {} and {}",
                    a.id,
                    a.state.as_str(),
                    if a.cert_der.is_empty() { "uncertified" } else { "certified already" }
                )))
            }
            None => {
                return Err(Error::PermissionDenied(format!(
                    "refusing to sign: the journal holds no prepared intermediate of node {node_id} with this key (record the key first)"
                )))
            }
        }
        let sig = key.sign(&r.tbs_certificate).await?;
        tracing::info!(node = %node_id, root = %root.id, "signed an intermediate CA certificate for a member");
        Ok(sig)
    }
}

/// Moves node `node_id`'s intermediates and JWT keys that `pick` selects to `state`;
/// returns how many.
async fn set_node_authorities(
    core: &NodeCore,
    node_id: &str,
    pick: impl Fn(&ca_state::AuthorityRecord) -> bool,
    state: AuthorityState,
) -> Result<usize, Error> {
    let mut n = 0;
    for a in core.sm.authorities().await? {
        if a.node_id == node_id
            && matches!(a.kind, AuthorityKind::Intermediate | AuthorityKind::Jwt)
            && pick(&a)
        {
            propose(
                core.proposer.as_ref(),
                Command::SetAuthorityState {
                    id: a.id,
                    state,
                    at: ca_identity::unix_now(),
                },
            )
            .await?;
            n += 1;
        }
    }
    Ok(n)
}

/// Retires the active (or prepared) intermediates and JWT keys of node `node_id`.
pub async fn retire_node_authorities(core: &NodeCore, node_id: &str) -> Result<usize, Error> {
    let live = |a: &ca_state::AuthorityRecord| {
        matches!(a.state, AuthorityState::Active | AuthorityState::Prepared)
    };
    set_node_authorities(core, node_id, live, AuthorityState::Retired).await
}

/// Revokes every intermediate and JWT key of node `node_id` that is not revoked or expired:
/// a removed node's keys are out of the cluster's hands, so nothing they signed is trusted
/// any more (agents re-mint such SVIDs at their next sync).
pub async fn revoke_node_authorities(core: &NodeCore, node_id: &str) -> Result<usize, Error> {
    let t = ca_identity::unix_now();
    let valid =
        |a: &ca_state::AuthorityRecord| a.state != AuthorityState::Revoked && a.not_after > t;
    set_node_authorities(core, node_id, valid, AuthorityState::Revoked).await
}

/// Removes member `raft_id`: out of the membership, its ca-node identity evicted (it must
/// join again with a new token), its intermediates and JWT keys revoked.
pub async fn remove_member(core: &NodeCore, raft_id: NodeId) -> Result<u64, Error> {
    let status = core.raft.status();
    let member = status.members.get(&raft_id).cloned().ok_or_else(|| {
        Error::NotFound(format!("raft id {raft_id} is not a member of the cluster"))
    })?;
    let log = core.raft.remove(raft_id).await?;
    let node_id = member.node.node_id;
    let id = raft_tls::ca_node_id(&core.config.trust_domain(), &node_id)?;
    match propose(
        core.proposer.as_ref(),
        Command::EvictAgent {
            spiffe_id: id.to_string(),
        },
    )
    .await
    {
        Ok(_) | Err(Error::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    let revoked = revoke_node_authorities(core, &node_id).await?;
    tracing::info!(raft_id, node = %node_id, revoked, "removed a member; revoked its intermediates and JWT keys");
    Ok(log.index)
}

fn into_status<T>(r: Result<T, Error>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let r = ClusterService::join(self, req.into_inner()).await;
        if let Err(e) = &r {
            tracing::warn!(error = %e, "a Join was refused");
        }
        into_status(r)
    }

    async fn add_me(
        &self,
        req: Request<AddMeRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let node_id = raft_tls::ca_node_caller(&self.core.config.trust_domain(), &req)?;
        let serial = raft_tls::caller_serial(&req).unwrap_or_default();
        let r = ClusterService::add_me(self, node_id, serial, req.into_inner()).await;
        into_status(r.map(|log_index| MembershipResponse { log_index }))
    }

    async fn sign_intermediate(
        &self,
        req: Request<SignIntermediateRequest>,
    ) -> Result<Response<SignIntermediateResponse>, Status> {
        let caller = self.core.gate.admit_request(req.extensions()).await?;
        let node_id = caller.node_id().to_owned();
        let r = ClusterService::sign_intermediate(self, node_id, req.into_inner()).await;
        if let Err(e) = &r {
            tracing::warn!(error = %e, "SignIntermediate refused");
        }
        into_status(r.map(|signature| SignIntermediateResponse { signature }))
    }

    async fn issued_counts(
        &self,
        req: Request<IssuedCountsRequest>,
    ) -> Result<Response<IssuedCountsResponse>, Status> {
        self.core.gate.admit_request(req.extensions()).await?;
        Ok(Response::new(IssuedCountsResponse {
            valid_svids: self.core.ca.valid_issued_counts().into_iter().collect(),
        }))
    }

    async fn clock(&self, _req: Request<ClockRequest>) -> Result<Response<ClockResponse>, Status> {
        Ok(Response::new(ClockResponse {
            unix_time_micros: crate::wallclock::unix_time_micros(),
        }))
    }
}

/// The approximate number of valid SVIDs each authority signed, from every member that
/// answers within a couple of seconds (each counts its own, in memory).
pub async fn issued_counts_everywhere(
    core: &NodeCore,
) -> (std::collections::BTreeMap<String, u64>, Vec<String>) {
    let mut all = core.ca.valid_issued_counts();
    let mut silent = Vec::new();
    let peers = Peers::new(
        core.raft.clone(),
        core.svid.clone(),
        core.roots.clone(),
        core.config.trust_domain(),
    );
    let calls = peers.others().into_iter().map(|(id, node)| {
        let peers = peers.clone();
        async move {
            let ask = async {
                let mut client = peers.client(id, &node).ok()?;
                let mut req = Request::new(IssuedCountsRequest {});
                req.set_timeout(Duration::from_secs(2));
                let r = tokio::time::timeout(Duration::from_secs(3), client.issued_counts(req))
                    .await
                    .ok()?
                    .ok()?;
                Some(r.into_inner().valid_svids)
            };
            let r = ask.await;
            (node.node_id.clone(), r)
        }
    });
    for (node, r) in futures::future::join_all(calls).await {
        match r {
            Some(m) => all.extend(m),
            None => silent.push(node),
        }
    }
    (all, silent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_need_host_and_port() {
        assert!(valid_addr("10.0.0.1:8081"));
        assert!(valid_addr("[::1]:8081"));
        assert!(!valid_addr("10.0.0.1"));
        assert!(!valid_addr(":8081"));
        assert!(!valid_addr("h:0"));
    }
}
