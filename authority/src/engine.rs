//! The certificate authority of one node: the cluster root, this node's intermediate and
//! JWT key (all recorded in the CA journal), and minting of X.509-SVIDs and JWT-SVIDs.
//!
//! Keys go through the role's [`ca_kms::KeyManager`]; the root always lives there. The intermediate lives
//! there too, or (memory mode) only in RAM, in which case a new one is made at every start.
//! An SVID's lifetime never exceeds its issuer's remaining lifetime.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use ca_identity::{JwtAuthority, SpiffeId, TrustBundle, TrustDomain};
use ca_kms::memory::MemoryKey;
use ca_kms::{KeyAlgorithm, SigningKey};
use ca_state::{
    AuthorityKind, AuthorityRecord, AuthorityState, Command, Response, RotationRequest,
};
use rcgen::PublicKeyData;

use serde::Deserialize;

use crate::journal::Journal;
use crate::keys::{KeyManagers, RoleKeys};
use crate::schedule::{candidates, next_step, Policy, Rotation, Step, Usable};
use crate::x509::{ca_params, make_cert, svid_params, IssuerKey, RawPublicKey};
use crate::{issued_at, Error, BACKDATE};

/// Where intermediate keys live.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum IntermediateMode {
    /// Generated and used inside the key manager: every SVID is a key-manager signature.
    #[default]
    KeyManager,
    /// Generated in RAM, never stored, signed by the key-manager root; short-lived.
    Memory,
}

/// The wall clock (Unix ms) and the monotonic clock at one moment: when this node's clock
/// was last compared with the other members'.
#[derive(Clone, Copy, Debug)]
pub struct Checked {
    /// Monotonic time of the measurement.
    pub at: std::time::Instant,
    /// Wall-clock time of the measurement, Unix milliseconds.
    pub wall_ms: i64,
}

/// Settings of the CA taken from the node config.
#[derive(Clone, Debug)]
pub struct CaSettings {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// This node.
    pub node_id: String,
    /// Root lifetime (s).
    pub root_ttl: i64,
    /// Intermediate lifetime (s).
    pub intermediate_ttl: i64,
    /// JWT key lifetime (s).
    pub jwt_key_ttl: i64,
    /// Where intermediate keys live.
    pub intermediate_mode: IntermediateMode,
    /// Algorithm of the root and intermediate keys.
    pub key_algorithm: KeyAlgorithm,
    /// Algorithm of JWT signing keys.
    pub jwt_key_algorithm: KeyAlgorithm,
    /// When authorities are prepared and activated.
    pub rotation: Rotation,
}

/// A usable authority: its journal record and key handle.
#[derive(Clone, Debug)]
pub struct Signer {
    /// The journal record.
    pub record: AuthorityRecord,
    /// The key.
    pub key: Arc<dyn SigningKey>,
}

#[derive(Default)]
struct Current {
    root: Option<Signer>,
    intermediate: Option<Signer>,
    jwt: Option<Signer>,
    /// This node's prepared intermediate (the only copy of its key in memory mode).
    prepared_intermediate: Option<Signer>,
    bundle: Option<Arc<TrustBundle>>,
    tainted: Tainted,
    /// IDs of every authority seen revoked: whatever installs a signer, none of these signs.
    revoked: std::collections::HashSet<String>,
}

/// Authorities revoked while what they signed may still be valid: agents replace every
/// SVID they signed at once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tainted {
    /// Subject key identifiers of revoked intermediates (an SVID's authority key
    /// identifier names its issuer).
    pub x509_authority_key_ids: Vec<Vec<u8>>,
    /// Key IDs (`kid`) of revoked JWT keys.
    pub jwt_key_ids: Vec<String>,
}

/// SVIDs this node signed, per authority, by expiry: the approximate count of valid SVIDs
/// an authority signed (in memory: since this process started).
#[derive(Default)]
struct IssuedCounts(Mutex<HashMap<String, BTreeMap<i64, u64>>>);

impl IssuedCounts {
    fn record(&self, authority: &str, not_after: i64) {
        let mut m = self.0.lock().expect("issued lock");
        *m.entry(authority.to_owned())
            .or_default()
            .entry(not_after)
            .or_default() += 1;
    }

    fn valid(&self, t: i64) -> BTreeMap<String, u64> {
        let mut m = self.0.lock().expect("issued lock");
        m.retain(|_, by_expiry| {
            by_expiry.retain(|na, _| *na > t);
            !by_expiry.is_empty()
        });
        m.iter()
            .map(|(id, by_expiry)| (id.clone(), by_expiry.values().sum()))
            .collect()
    }
}

/// The CA of this node.
pub struct Ca {
    settings: CaSettings,
    keys: KeyManagers,
    journal: Arc<dyn Journal>,
    current: RwLock<Current>,
    issued: IssuedCounts,
    /// One upkeep round at a time: a joining node's first round and the maintenance loop's
    /// must not both see "no JWT key yet" and make one each.
    upkeep: tokio::sync::Mutex<()>,
    /// Why this node's clock cannot be trusted to mint, if it cannot (the node compares it
    /// with the other members').
    clock_problem: RwLock<Option<String>>,
    /// When the clocks were last compared.
    clock_checked: RwLock<Option<Checked>>,
    /// Authorities whose key this process has deleted from its key manager (or found
    /// gone) since the journal recorded its destruction.
    keys_deleted: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Bumped whenever the bundle or the tainted authorities change ([`Ca::subscribe_trust`]).
    trust_changes: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ca({}, node {})",
            self.settings.trust_domain, self.settings.node_id
        )
    }
}

fn now() -> i64 {
    ca_identity::unix_now()
}

/// The subject key identifier of a CA certificate.
pub fn subject_key_id(cert_der: &[u8]) -> Option<Vec<u8>> {
    ca_identity::x509::cert_info(cert_der)
        .ok()
        .and_then(|i| i.subject_key_id)
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

async fn propose_ok(p: &dyn Journal, cmd: Command) -> Result<(), Error> {
    match p.propose(cmd).await? {
        Response::Rejected { code, message } => Err(Error::Rejected { code, message }),
        _ => Ok(()),
    }
}

async fn set_state(p: &dyn Journal, id: &str, state: AuthorityState) -> Result<(), Error> {
    propose_ok(
        p,
        Command::SetAuthorityState {
            id: id.to_owned(),
            state,
            at: now(),
        },
    )
    .await
}

/// The journal entry `id`, if any.
fn find<'a>(auths: &'a [AuthorityRecord], id: Option<&str>) -> Option<&'a AuthorityRecord> {
    id.and_then(|id| auths.iter().find(|a| a.id == id))
}

/// The newest authority matching `f`.
fn newest(
    auths: &[AuthorityRecord],
    f: impl Fn(&AuthorityRecord) -> bool,
) -> Option<&AuthorityRecord> {
    auths.iter().rev().find(|&a| f(a))
}

impl Ca {
    /// A CA over the given key manager and state.
    pub fn new(settings: CaSettings, keys: KeyManagers, journal: Arc<dyn Journal>) -> Self {
        Self {
            settings,
            keys,
            journal,
            current: RwLock::new(Current::default()),
            issued: IssuedCounts::default(),
            upkeep: tokio::sync::Mutex::new(()),
            clock_problem: RwLock::new(None),
            clock_checked: RwLock::new(None),
            keys_deleted: Default::default(),
            trust_changes: tokio::sync::watch::channel(0).0,
        }
    }

    /// Changes whenever the trust bundle or the tainted authorities change (after
    /// [`Ca::refresh_bundle`]): what agents are pushed.
    pub fn subscribe_trust(&self) -> tokio::sync::watch::Receiver<u64> {
        self.trust_changes.subscribe()
    }

    /// Records when the clocks were compared.
    pub fn set_clock_checked(&self, at: Checked) {
        *self
            .clock_checked
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(at);
    }

    /// When the clocks were last compared, if ever.
    pub fn clock_checked(&self) -> Option<Checked> {
        *self.clock_checked.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Records whether this node's clock disagrees with the cluster's: while it does, the
    /// node mints nothing and is not ready.
    pub fn set_clock_problem(&self, problem: Option<String>) {
        *self
            .clock_problem
            .write()
            .unwrap_or_else(|e| e.into_inner()) = problem;
    }

    /// Why this node's clock cannot be trusted to mint, if it cannot.
    pub fn clock_problem(&self) -> Option<String> {
        self.clock_problem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn check_clock(&self) -> Result<(), Error> {
        match self.clock_problem() {
            Some(p) => Err(Error::Unavailable(p)),
            None => Ok(()),
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.settings.trust_domain
    }

    /// The settings.
    pub fn settings(&self) -> &CaSettings {
        &self.settings
    }

    /// The key managers of the three roles.
    pub fn keys(&self) -> &KeyManagers {
        &self.keys
    }

    fn role_keys(&self, kind: AuthorityKind) -> &RoleKeys {
        match kind {
            AuthorityKind::Root => &self.keys.root,
            AuthorityKind::Intermediate => &self.keys.intermediate,
            AuthorityKind::Jwt => &self.keys.jwt,
        }
    }

    /// How many SVIDs this node signed with each authority that are still valid (counted in
    /// memory since this process started: approximate).
    pub fn valid_issued_counts(&self) -> BTreeMap<String, u64> {
        self.issued.valid(now())
    }

    /// The revoked authorities agents must replace SVIDs of.
    pub fn tainted(&self) -> Tainted {
        self.current.read().expect("ca lock").tainted.clone()
    }

    /// Why this node cannot mint X.509-SVIDs or JWT-SVIDs right now, if it cannot. The
    /// root's key manager is not needed to mint, only to rotate, so it is not a reason.
    pub fn minting_problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self.clock_problem().into_iter().collect();
        let cur = self.current.read().expect("ca lock");
        let t = now();
        match &cur.intermediate {
            None => out.push("no active intermediate CA".to_string()),
            Some(i) if i.record.not_after <= t => {
                out.push(format!("intermediate {} has expired", i.record.id))
            }
            Some(i) if i.record.key_backend != "memory" => {
                if let Some(p) = self.keys.intermediate.health.problem() {
                    out.push(format!(
                        "intermediate key manager ({}): {p}",
                        self.keys.intermediate.km.backend()
                    ));
                }
            }
            Some(_) => {}
        }
        match &cur.jwt {
            None => out.push("no active JWT signing key".to_string()),
            Some(_) => {
                if let Some(p) = self.keys.jwt.health.problem() {
                    out.push(format!(
                        "JWT key manager ({}): {p}",
                        self.keys.jwt.km.backend()
                    ));
                }
            }
        }
        out
    }

    /// Tries one signature with each role key this node mints with whose key manager
    /// failed last, so a recovered HSM or KMS is noticed without waiting for traffic.
    /// The root's key manager is checked on every call by finding the root key again (no
    /// signature: a CA key signs nothing but certificates), so a root outage shows in
    /// `ca_keymanager_up{role="root"}` long before a rotation needs the root.
    pub async fn probe_key_managers(&self) {
        let (root, int, jwt) = {
            let cur = self.current.read().expect("ca lock");
            (cur.root.clone(), cur.intermediate.clone(), cur.jwt.clone())
        };
        if let Some(r) = root {
            if let Err(e) = self.keys.root.get(&r.record.key_id).await {
                tracing::warn!(authority = %r.record.id, error = %e, "the root's key manager is not usable; minting continues, but intermediates cannot be rotated until it is back");
            }
        }
        for (signer, keys) in [(int, &self.keys.intermediate), (jwt, &self.keys.jwt)] {
            if let Some(s) = signer {
                if s.record.key_backend != "memory" && keys.health.problem().is_some() {
                    let _ = s.key.sign(b"key manager health probe").await;
                }
            }
        }
    }

    /// Retires the authorities `ids` (of `kind`), as a schedule step asked.
    async fn retire(&self, ids: &[String], kind: AuthorityKind) -> Result<(), Error> {
        for id in ids {
            set_state(self.journal.as_ref(), id, AuthorityState::Retired).await?;
            tracing::info!(authority = %id, kind = kind.as_str(), "retired (what it signed stays valid until it expires)");
        }
        Ok(())
    }

    /// The schedule's view of this node for `kind`.
    fn policy(&self, kind: AuthorityKind, leader: bool) -> Policy {
        let s = &self.settings;
        Policy {
            node_id: s.node_id.clone(),
            rotation: s.rotation.clone(),
            ttl: match kind {
                AuthorityKind::Root => s.root_ttl,
                AuthorityKind::Intermediate => s.intermediate_ttl,
                AuthorityKind::Jwt => s.jwt_key_ttl,
            },
            leader,
        }
    }

    async fn load_key(&self, rec: &AuthorityRecord) -> Result<Arc<dyn SigningKey>, Error> {
        let keys = self.role_keys(rec.kind);
        if rec.key_backend != keys.km.backend() {
            return Err(Error::Config(format!(
                "{} {} has its key in the {:?} key manager, but this node's {} key manager is {:?}; configure the {} key manager it was created with",
                rec.kind.as_str(),
                rec.id,
                rec.key_backend,
                keys.role.as_str(),
                keys.km.backend(),
                keys.role.as_str(),
            )));
        }
        Ok(keys.get(&rec.key_id).await?)
    }

    /// Makes sure there is an active root, an active intermediate and an active JWT key for
    /// this node, each replaced on schedule (prepared at `rotation.prepare_fraction` of its
    /// lifetime, activated at `rotation.activate_fraction`), on request (rotation requests
    /// in the journal) and when revoked; loads the keys; rebuilds the bundle. Root changes
    /// (scheduled or requested) are made by the Raft leader only (`leader`). Called at start,
    /// periodically, and whenever the journal changes.
    ///
    /// A replacement is always created before its predecessor is retired: when the key
    /// manager (or the member holding the root) is unavailable, the current authority stays
    /// active, the reason is logged, and the next call tries again.
    pub async fn ensure_authorities(&self, leader: bool) -> Result<(), Error> {
        let _one_at_a_time = self.upkeep.lock().await;
        let auths = self.journal.authorities().await?;
        let requests = self.journal.rotation_requests().await?;
        let t = now();
        let root = self.ensure_root(&auths, &requests, t, leader).await?;
        self.current.write().expect("ca lock").root = Some(root.clone());
        // The root step may have changed the journal (activated a root).
        let auths = self.journal.authorities().await?;
        let intermediate = self
            .ensure_intermediate(&auths, &requests, &root, t)
            .await?;
        self.current.write().expect("ca lock").intermediate = Some(intermediate);
        let jwt = self.ensure_jwt(&auths, &requests, t).await?;
        self.current.write().expect("ca lock").jwt = Some(jwt);
        self.refresh_bundle().await?;
        Ok(())
    }

    async fn ensure_root(
        &self,
        auths: &[AuthorityRecord],
        requests: &[RotationRequest],
        t: i64,
        leader: bool,
    ) -> Result<Signer, Error> {
        let kind = AuthorityKind::Root;
        let have = self.current.read().expect("ca lock").root.clone();
        let plan = next_step(
            kind,
            auths,
            requests,
            t,
            &self.policy(kind, leader),
            Usable::ALL,
        );
        let current = find(auths, plan.current.as_deref());
        match (plan.step, current) {
            (Some(Step::Replace { why, .. }), _) => {
                let root = self.create_root(AuthorityState::Active).await?;
                tracing::info!(authority = %root.record.id, why, "created the cluster root");
                Ok(root)
            }
            (Some(Step::Activate { id, retire, why }), _) => {
                set_state(self.journal.as_ref(), &id, AuthorityState::Active).await?;
                self.retire(&retire, kind).await?;
                match current {
                    None => {
                        tracing::warn!(authority = %id, why, "activated the prepared root at once")
                    }
                    Some(old) => {
                        tracing::info!(authority = %id, replaces = %old.id, why, "activated the new root: intermediates are now signed by it; the old root stays in the bundle until everything it signed has expired")
                    }
                }
                let mut rec = find(auths, Some(&id))
                    .expect("the schedule names a journal entry")
                    .clone();
                rec.state = AuthorityState::Active;
                self.signer_for(&rec, have.as_ref()).await
            }
            (Some(Step::Prepare { why, .. }), Some(active)) => {
                match self.create_root(AuthorityState::Prepared).await {
                    Ok(p) => {
                        tracing::info!(authority = %p.record.id, replaces = %active.id, why, "prepared a new root: published in the trust bundle from now on; intermediates are signed by it once it is activated after the propagation window")
                    }
                    Err(e) => {
                        tracing::warn!(replaces = %active.id, why, error = %e, "cannot create the next root yet (root key manager unavailable?); the current root stays active; retrying every 5s");
                        self.keys.events().authority_event(kind, "failed");
                    }
                }
                self.signer_for(active, have.as_ref()).await
            }
            (_, Some(active)) => self.signer_for(active, have.as_ref()).await,
            (_, None) => unreachable!("the schedule keeps no root without an active one"),
        }
    }

    /// The usable signer of this node's prepared intermediate `rec`, if it was signed by
    /// `root` and its key is at hand (a memory-mode key only lives in this process).
    async fn usable_prepared_intermediate(
        &self,
        rec: &AuthorityRecord,
        root: &Signer,
    ) -> Option<Signer> {
        if !rec.cert_der_issued_by(&root.record) {
            return None;
        }
        let have = self
            .current
            .read()
            .expect("ca lock")
            .prepared_intermediate
            .clone();
        match (have, rec.key_backend.as_str()) {
            (Some(h), _) if h.record.id == rec.id => Some(h),
            (_, "memory") => None,
            _ => self.signer_for(rec, None).await.ok(),
        }
    }

    async fn ensure_intermediate(
        &self,
        auths: &[AuthorityRecord],
        requests: &[RotationRequest],
        root: &Signer,
        t: i64,
    ) -> Result<Signer, Error> {
        let kind = AuthorityKind::Intermediate;
        let have = self.current.read().expect("ca lock").intermediate.clone();
        let c = candidates(kind, auths, &self.settings.node_id, t);
        let usable_active = match c.active {
            Some(rec) if rec.not_after > t && rec.cert_der_issued_by(&root.record) => {
                match (&have, rec.key_backend.as_str()) {
                    (Some(h), _) if h.record.id == rec.id => Some(h.clone()),
                    (_, "memory") => None, // key lost with the previous process
                    _ => Some(self.signer_for(rec, None).await?),
                }
            }
            _ => None,
        };
        let usable_prepared = match c.prepared {
            Some(p) => self.usable_prepared_intermediate(p, root).await,
            None => None,
        };
        let usable = Usable {
            active: usable_active.is_some(),
            prepared: usable_prepared.is_some(),
        };
        let plan = next_step(kind, auths, requests, t, &self.policy(kind, false), usable);
        let (next, retire, why) = match plan.step {
            None => return Ok(usable_active.expect("the schedule keeps only a usable one")),
            Some(Step::Prepare { retire, why }) => {
                let active = usable_active.expect("the schedule prepares beside a usable one");
                self.retire(&retire, kind).await?;
                match self
                    .create_intermediate(root, AuthorityState::Prepared)
                    .await
                {
                    Ok(p) => {
                        tracing::info!(authority = %p.record.id, current = %active.record.id, why, "prepared the next intermediate CA (activated at rotation.activate_fraction)");
                        self.current.write().expect("ca lock").prepared_intermediate = Some(p);
                    }
                    Err(e) => {
                        tracing::warn!(current = %active.record.id, error = %e, "cannot prepare the next intermediate yet (root or key manager unavailable?); the current one stays active; retrying every 5s");
                        self.keys.events().authority_event(kind, "failed");
                    }
                }
                return Ok(active);
            }
            Some(Step::Activate { retire, why, .. }) => (
                Ok(usable_prepared.expect("the schedule activates a usable one")),
                retire,
                why,
            ),
            Some(Step::Replace { retire, why }) => (
                self.create_intermediate(root, AuthorityState::Prepared)
                    .await,
                retire,
                why,
            ),
        };
        match next {
            Ok(mut next) => {
                set_state(
                    self.journal.as_ref(),
                    &next.record.id,
                    AuthorityState::Active,
                )
                .await?;
                self.retire(&retire, kind).await?;
                tracing::info!(authority = %next.record.id, replaces = c.active.map(|a| a.id.as_str()).unwrap_or("-"), why, not_after = next.record.not_after, "activated intermediate CA");
                next.record.state = AuthorityState::Active;
                self.current.write().expect("ca lock").prepared_intermediate = None;
                Ok(next)
            }
            Err(e) => match usable_active {
                Some(a) => {
                    tracing::warn!(authority = %a.record.id, why, error = %e, "cannot replace the intermediate yet (root or key manager unavailable?); it stays active; retrying every 5s");
                    self.keys.events().authority_event(kind, "failed");
                    Ok(a)
                }
                None => Err(e),
            },
        }
    }

    async fn ensure_jwt(
        &self,
        auths: &[AuthorityRecord],
        requests: &[RotationRequest],
        t: i64,
    ) -> Result<Signer, Error> {
        let kind = AuthorityKind::Jwt;
        let have = self.current.read().expect("ca lock").jwt.clone();
        let plan = next_step(
            kind,
            auths,
            requests,
            t,
            &self.policy(kind, false),
            Usable::ALL,
        );
        let current = find(auths, plan.current.as_deref());
        let (next, retire, why) = match (plan.step, current) {
            (None, Some(active)) => return self.signer_for(active, have.as_ref()).await,
            (Some(Step::Prepare { why, .. }), Some(active)) => {
                match self.create_jwt_key(AuthorityState::Prepared).await {
                    Ok(p) => {
                        tracing::info!(authority = %p.record.id, current = %active.id, why, "prepared the next JWT signing key: published in the JWT bundle now, signs after the propagation window")
                    }
                    Err(e) => {
                        tracing::warn!(current = %active.id, error = %e, "cannot prepare the next JWT key yet (key manager unavailable?); the current one stays active; retrying every 5s");
                        self.keys.events().authority_event(kind, "failed");
                    }
                }
                return self.signer_for(active, have.as_ref()).await;
            }
            (Some(Step::Replace { retire, why }), _) => (
                self.create_jwt_key(AuthorityState::Prepared).await,
                retire,
                why,
            ),
            (Some(Step::Activate { id, retire, why }), _) => {
                let rec = find(auths, Some(&id)).expect("the schedule names a journal entry");
                (self.signer_for(rec, None).await, retire, why)
            }
            (_, None) => unreachable!("the schedule keeps no JWT key without an active one"),
        };
        match (next, current) {
            (Ok(mut next), _) => {
                set_state(
                    self.journal.as_ref(),
                    &next.record.id,
                    AuthorityState::Active,
                )
                .await?;
                self.retire(&retire, kind).await?;
                tracing::info!(authority = %next.record.id, replaces = current.map(|a| a.id.as_str()).unwrap_or("-"), why, "activated JWT signing key; the old one stays in the JWT bundle until it expires");
                next.record.state = AuthorityState::Active;
                Ok(next)
            }
            (Err(e), Some(active)) => {
                tracing::warn!(error = %e, why, "cannot load the next JWT key yet; the current one stays active; retrying every 5s");
                self.keys.events().authority_event(kind, "failed");
                self.signer_for(active, have.as_ref()).await
            }
            (Err(e), None) => Err(e),
        }
    }

    /// The signer of `rec`: the one already loaded if it is the same authority, else its
    /// key loaded from the role's key manager.
    async fn signer_for(
        &self,
        rec: &AuthorityRecord,
        have: Option<&Signer>,
    ) -> Result<Signer, Error> {
        match have {
            Some(h) if h.record.id == rec.id && h.record.state == rec.state => Ok(h.clone()),
            Some(h) if h.record.id == rec.id => Ok(Signer {
                key: h.key.clone(),
                record: rec.clone(),
            }),
            _ => Ok(Signer {
                key: self.load_key(rec).await?,
                record: rec.clone(),
            }),
        }
    }

    /// Records an operator's request to rotate `kind` on `node_id` (empty for the root):
    /// validated here, carried out by that node (the Raft leader for roots) when it sees it
    /// in the log. Returns the request.
    pub async fn request_rotation(
        &self,
        kind: AuthorityKind,
        node_id: &str,
    ) -> Result<RotationRequest, Error> {
        let auths = self.journal.authorities().await?;
        let t = now();
        let active = if kind == AuthorityKind::Root {
            if let Some(p) = newest(&auths, |a| {
                a.kind == kind && a.state == AuthorityState::Prepared && a.not_after > t
            }) {
                return Err(Error::FailedPrecondition(format!(
                    "a root rotation is already in progress: root {} is prepared (published since {}) and is activated once rotation.propagation_window ({}s) has passed",
                    p.id,
                    issued_at(p),
                    self.settings.rotation.propagation_window
                )));
            }
            newest(&auths, |a| {
                a.kind == kind && a.state == AuthorityState::Active && a.not_after > t
            })
        } else {
            newest(&auths, |a| {
                a.kind == kind && a.state == AuthorityState::Active && a.node_id == node_id
            })
        };
        let Some(active) = active else {
            return Err(Error::NotFound(if node_id.is_empty() {
                format!("there is no active {}", kind.as_str())
            } else {
                format!(
                    "node {node_id:?} has no active {} (is it a member of this cluster? see `ca-node ca show`)",
                    kind.as_str()
                )
            }));
        };
        let request = RotationRequest {
            kind,
            node_id: node_id.to_owned(),
            requested_at: t,
            replaces: active.id.clone(),
        };
        propose_ok(
            self.journal.as_ref(),
            Command::RequestRotation {
                request: request.clone(),
            },
        )
        .await?;
        tracing::info!(kind = kind.as_str(), node = %node_id, replaces = %active.id, "rotation requested");
        Ok(request)
    }

    /// Revokes intermediate or JWT key `id` through the journal: from the moment the entry
    /// is applied no node signs with it or publishes it, agents are told to replace what it
    /// signed, and its node replaces it (at once: no propagation window for a compromised
    /// key). Refuses unknown IDs, roots, the wrong kind and what is revoked already.
    pub async fn revoke(&self, id: &str, kind: AuthorityKind) -> Result<AuthorityRecord, Error> {
        let auths = self.journal.authorities().await?;
        let Some(a) = auths.iter().find(|a| a.id == id) else {
            let known: Vec<&str> = auths
                .iter()
                .filter(|a| a.kind == kind && a.state != AuthorityState::Revoked)
                .map(|a| a.id.as_str())
                .collect();
            return Err(Error::NotFound(format!(
                "no authority {id:?} in the CA journal ({} IDs that could be revoked: {}; see `ca-node ca show`)",
                kind.as_str(),
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        };
        if a.kind == AuthorityKind::Root {
            let active_roots = auths
                .iter()
                .filter(|r| r.kind == AuthorityKind::Root && r.state == AuthorityState::Active)
                .count();
            return Err(Error::FailedPrecondition(format!(
                "{id} is a root, not a{} {}; roots are replaced with `ca-node rotate-root`, not revoked{}",
                if kind == AuthorityKind::Intermediate { "n" } else { "" },
                kind.as_str(),
                if a.state == AuthorityState::Active && active_roots == 1 {
                    " (and it is the only active root: revoking it would leave the cluster unable to sign anything)"
                } else {
                    ""
                }
            )));
        }
        if a.kind != kind {
            return Err(Error::InvalidArgument(format!(
                "{id} is a{} {} authority, not a{} {}; use `ca-node revoke-{}`",
                if a.kind == AuthorityKind::Intermediate {
                    "n"
                } else {
                    ""
                },
                a.kind.as_str(),
                if kind == AuthorityKind::Intermediate {
                    "n"
                } else {
                    ""
                },
                kind.as_str(),
                if a.kind == AuthorityKind::Jwt {
                    "jwt-key"
                } else {
                    "intermediate"
                },
            )));
        }
        if a.state == AuthorityState::Revoked {
            return Err(Error::FailedPrecondition(format!(
                "{id} is revoked already"
            )));
        }
        set_state(self.journal.as_ref(), id, AuthorityState::Revoked).await?;
        tracing::warn!(authority = %id, kind = kind.as_str(), node = %a.node_id, "REVOKED: no node signs with or publishes it from now on; agents replace every SVID it signed");
        let mut a = a.clone();
        a.state = AuthorityState::Revoked;
        Ok(a)
    }

    /// Destroys (or, where the backend only does that, schedules the deletion of) the keys
    /// of retired authorities once nothing they signed can still be valid (an SVID never
    /// outlives its issuer, so that is the authority's own expiry), and of revoked
    /// authorities at once. The decision goes through Raft first ([`Command::KeyDestroyed`],
    /// stamped with this node's time, which the leader checks against its own clock and the
    /// state machine judges), and the key is deleted only once it is applied; a deletion that
    /// fails is retried every round. Roots are handled by every node (each deletes its copy;
    /// a key already gone counts as deleted); intermediates and JWT keys by their node.
    pub async fn destroy_expired_keys(&self) -> Result<usize, Error> {
        let t = now();
        let mut destroyed = 0;
        for a in self.journal.authorities().await? {
            let mine = a.kind == AuthorityKind::Root || a.node_id == self.settings.node_id;
            if !mine || a.key_backend == "memory" {
                continue;
            }
            let keys = self.role_keys(a.kind);
            if a.key_backend != keys.km.backend() {
                continue; // held by a key manager this node does not have
            }
            if a.key_destroyed {
                if self
                    .keys_deleted
                    .lock()
                    .expect("keys_deleted lock")
                    .contains(&a.id)
                {
                    continue;
                }
            } else {
                let due = match a.state {
                    AuthorityState::Retired => a.not_after < t,
                    AuthorityState::Revoked => true,
                    AuthorityState::Prepared | AuthorityState::Active => false,
                };
                if !due {
                    continue;
                }
                propose_ok(
                    self.journal.as_ref(),
                    Command::KeyDestroyed {
                        id: a.id.clone(),
                        at: t,
                    },
                )
                .await?;
            }
            match keys.km.delete(&a.key_id).await {
                Ok(()) | Err(ca_kms::Error::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(authority = %a.id, error = %e, "could not destroy the key of an expired authority; will retry");
                    continue;
                }
            }
            self.keys_deleted
                .lock()
                .expect("keys_deleted lock")
                .insert(a.id.clone());
            tracing::info!(authority = %a.id, kind = a.kind.as_str(), backend = %a.key_backend, "destroyed the key of an authority that nothing valid depends on");
            destroyed += 1;
        }
        Ok(destroyed)
    }

    /// Rebuilds the trust bundle from the journal: roots that are prepared or active, and
    /// retired roots while an intermediate they signed is unexpired; JWT keys that are
    /// prepared, active or retired and unexpired; never a revoked one. Also the list of
    /// revoked authorities whose SVIDs agents must replace.
    pub async fn refresh_bundle(&self) -> Result<Arc<TrustBundle>, Error> {
        let t = now();
        let auths = self.journal.authorities().await?;
        let live = |a: &&AuthorityRecord| a.state != AuthorityState::Revoked && a.not_after > t;
        let live_intermediate_akis: Vec<Vec<u8>> = auths
            .iter()
            .filter(|a| a.kind == AuthorityKind::Intermediate && a.not_after > t)
            // A revoked intermediate keeps no retired root in the bundle.
            .filter(|a| a.state != AuthorityState::Revoked)
            .filter_map(|a| ca_identity::x509::cert_info(&a.cert_der).ok())
            .filter_map(|i| i.authority_key_id)
            .collect();
        let bundle = Arc::new(TrustBundle {
            trust_domain: self.settings.trust_domain.clone(),
            x509_authorities: auths
                .iter()
                .filter(|a| a.kind == AuthorityKind::Root)
                .filter(live)
                .filter(|a| match a.state {
                    AuthorityState::Retired => subject_key_id(&a.cert_der)
                        .is_some_and(|ski| live_intermediate_akis.contains(&ski)),
                    _ => true,
                })
                .map(|a| a.cert_der.clone())
                .collect(),
            jwt_authorities: auths
                .iter()
                .filter(|a| a.kind == AuthorityKind::Jwt)
                .filter(live)
                .map(|a| JwtAuthority {
                    key_id: a.id.clone(),
                    public_key: a.public_key.clone(),
                    expires_at: a.not_after,
                })
                .collect(),
            sequence_number: self.journal.authorities_version().await?,
            refresh_hint: 60,
        });
        let revoked = |k: AuthorityKind| {
            auths
                .iter()
                .filter(move |a| a.kind == k && a.state == AuthorityState::Revoked)
                .filter(|a| a.not_after > t)
        };
        let tainted = Tainted {
            x509_authority_key_ids: revoked(AuthorityKind::Intermediate)
                .filter_map(|a| subject_key_id(&a.cert_der))
                .collect(),
            jwt_key_ids: revoked(AuthorityKind::Jwt).map(|a| a.id.clone()).collect(),
        };
        let mut guard = self.current.write().expect("ca lock");
        let cur = &mut *guard;
        // Revocation is final: the set only grows, whatever order refreshes finish in.
        cur.revoked.extend(
            auths
                .iter()
                .filter(|a| a.state == AuthorityState::Revoked)
                .map(|a| a.id.clone()),
        );
        // A revoked authority signs nothing more from the moment its revocation is seen,
        // not from the upkeep round that replaces it.
        let revoked = &cur.revoked;
        for signer in [
            &mut cur.intermediate,
            &mut cur.prepared_intermediate,
            &mut cur.jwt,
        ] {
            if signer
                .as_ref()
                .is_some_and(|s| revoked.contains(&s.record.id))
            {
                *signer = None;
            }
        }
        // Two refreshes may finish out of order (the maintenance loop's and an upkeep
        // round's): an older journal never replaces a newer bundle.
        if cur
            .bundle
            .as_ref()
            .is_some_and(|b| b.sequence_number > bundle.sequence_number)
        {
            return Ok(cur.bundle.clone().expect("checked"));
        }
        let changed = cur.bundle.as_deref() != Some(bundle.as_ref()) || cur.tainted != tainted;
        cur.bundle = Some(bundle.clone());
        cur.tainted = tainted;
        drop(guard);
        if changed {
            self.trust_changes.send_modify(|n| *n += 1);
        }
        Ok(bundle)
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Result<Arc<TrustBundle>, Error> {
        self.current
            .read()
            .expect("ca lock")
            .bundle
            .clone()
            .ok_or_else(|| Error::Unavailable("the CA is not initialized yet".into()))
    }

    /// Refuses to sign with authority `id` once its revocation was seen (an upkeep round
    /// working from a journal read before it may have installed it again).
    fn refuse_revoked(&self, id: &str) -> Result<(), Error> {
        if self.current.read().expect("ca lock").revoked.contains(id) {
            return Err(Error::Unavailable(format!(
                "{id} is revoked; this node is replacing a revoked one"
            )));
        }
        Ok(())
    }

    /// The signing intermediate, if ready (never a revoked one).
    pub fn intermediate(&self) -> Option<Signer> {
        let cur = self.current.read().expect("ca lock");
        cur.intermediate
            .clone()
            .filter(|i| !cur.revoked.contains(&i.record.id))
    }

    /// The signing JWT key, if ready (never a revoked one).
    pub fn jwt_key(&self) -> Option<Signer> {
        let cur = self.current.read().expect("ca lock");
        cur.jwt
            .clone()
            .filter(|j| !cur.revoked.contains(&j.record.id))
    }

    async fn create_root(&self, state: AuthorityState) -> Result<Signer, Error> {
        let id = format!("root-{}", short_id());
        let key = self
            .keys
            .root
            .generate(&id, self.settings.key_algorithm)
            .await?;
        match self.prepare_root(&id, key, state).await {
            Ok(s) => Ok(s),
            Err(e) => {
                self.keys.root.delete_quietly(&id).await; // no leaked keys
                Err(e)
            }
        }
    }

    /// Certifies a new root key and records the root in the journal.
    async fn prepare_root(
        &self,
        id: &str,
        key: Arc<dyn SigningKey>,
        state: AuthorityState,
    ) -> Result<Signer, Error> {
        let id = id.to_owned();
        let t = now();
        let params = ca_params(
            self.settings.trust_domain.id().as_str(),
            &format!("{} root {id}", self.settings.trust_domain),
            1,
            t - BACKDATE,
            t + self.settings.root_ttl,
        )?;
        let public = RawPublicKey::from_spki(key.public_key_spki(), key.algorithm())?;
        let cert = make_cert(
            &params,
            &public,
            &IssuerKey {
                cert_der: None,
                key: key.clone(),
            },
        )
        .await?;
        let record = AuthorityRecord {
            id: id.clone(),
            kind: AuthorityKind::Root,
            state,
            node_id: String::new(),
            key_backend: self.keys.root.km.backend().into(),
            key_id: id.clone(),
            cert_der: cert,
            public_key: key.public_key_spki().to_vec(),
            not_before: t - BACKDATE,
            not_after: t + self.settings.root_ttl,
            key_destroyed: false,
        };
        propose_ok(
            self.journal.as_ref(),
            Command::PutAuthority {
                authority: record.clone(),
            },
        )
        .await?;
        tracing::info!(authority = %id, state = state.as_str(), backend = self.keys.root.km.backend(), "created root CA");
        Ok(Signer { record, key })
    }

    async fn create_intermediate(
        &self,
        root: &Signer,
        state: AuthorityState,
    ) -> Result<Signer, Error> {
        // Only make a key when the root can sign it: while the root's key manager is down,
        // a rotation attempt every few seconds would otherwise create and delete a key each
        // time.
        self.keys.root.get(&root.record.key_id).await?;
        let id = format!("int-{}-{}", self.settings.node_id, short_id());
        let (key, backend): (Arc<dyn SigningKey>, String) = match self.settings.intermediate_mode {
            IntermediateMode::KeyManager => (
                self.keys
                    .intermediate
                    .generate(&id, self.settings.key_algorithm)
                    .await?,
                self.keys.intermediate.km.backend().into(),
            ),
            IntermediateMode::Memory => (
                self.keys.intermediate.wrap_memory(Arc::new(
                    MemoryKey::generate(&id, KeyAlgorithm::EcP256, "memory")?.0,
                )),
                "memory".into(),
            ),
        };
        match self
            .prepare_intermediate(root, &id, key, &backend, state)
            .await
        {
            Ok(s) => Ok(s),
            Err(e) => {
                if backend != "memory" {
                    self.keys.intermediate.delete_quietly(&id).await; // no leaked keys
                }
                Err(e)
            }
        }
    }

    /// Certifies a new intermediate key with the root and records it in the journal.
    async fn prepare_intermediate(
        &self,
        root: &Signer,
        id: &str,
        key: Arc<dyn SigningKey>,
        backend: &str,
        state: AuthorityState,
    ) -> Result<Signer, Error> {
        let id = id.to_owned();
        let t = now();
        let not_after = (t + self.settings.intermediate_ttl).min(root.record.not_after);
        let params = ca_params(
            self.settings.trust_domain.id().as_str(),
            &format!("{} intermediate {id}", self.settings.trust_domain),
            0,
            t - BACKDATE,
            not_after,
        )?;
        let mut record = AuthorityRecord {
            id: id.clone(),
            kind: AuthorityKind::Intermediate,
            state: AuthorityState::Prepared,
            node_id: self.settings.node_id.clone(),
            key_backend: backend.to_owned(),
            key_id: id.clone(),
            cert_der: Vec::new(),
            public_key: key.public_key_spki().to_vec(),
            not_before: t - BACKDATE,
            not_after,
            key_destroyed: false,
        };
        // The key is in the journal before the root certifies it (a member holding the root
        // signs only a key recorded so), so every intermediate the root ever signed is there.
        propose_ok(
            self.journal.as_ref(),
            Command::PutAuthority {
                authority: record.clone(),
            },
        )
        .await?;
        let public = RawPublicKey::from_spki(key.public_key_spki(), key.algorithm())?;
        let issuer = IssuerKey {
            cert_der: Some(root.record.cert_der.clone()),
            key: root.key.clone(),
        };
        let cert = match make_cert(&params, &public, &issuer).await {
            Ok(c) => c,
            Err(e) => {
                // Never certified: out of the way of the next attempt.
                let _ = set_state(self.journal.as_ref(), &id, AuthorityState::Retired).await;
                return Err(e);
            }
        };
        record.cert_der = cert;
        record.state = state;
        propose_ok(
            self.journal.as_ref(),
            Command::PutAuthority {
                authority: record.clone(),
            },
        )
        .await?;
        tracing::info!(authority = %id, root = %root.record.id, backend = %backend, not_after, state = state.as_str(), "created intermediate CA signed by the root");
        Ok(Signer { record, key })
    }

    async fn create_jwt_key(&self, state: AuthorityState) -> Result<Signer, Error> {
        let id = format!("jwt-{}-{}", self.settings.node_id, short_id());
        let key = self
            .keys
            .jwt
            .generate(&id, self.settings.jwt_key_algorithm)
            .await?;
        let t = now();
        let record = AuthorityRecord {
            id: id.clone(),
            kind: AuthorityKind::Jwt,
            state,
            node_id: self.settings.node_id.clone(),
            key_backend: self.keys.jwt.km.backend().into(),
            key_id: id.clone(),
            cert_der: Vec::new(),
            public_key: key.public_key_spki().to_vec(),
            not_before: t,
            not_after: t + self.settings.jwt_key_ttl,
            key_destroyed: false,
        };
        if let Err(e) = propose_ok(
            self.journal.as_ref(),
            Command::PutAuthority {
                authority: record.clone(),
            },
        )
        .await
        {
            self.keys.jwt.delete_quietly(&id).await;
            return Err(e);
        }
        tracing::info!(authority = %id, state = state.as_str(), backend = self.keys.jwt.km.backend(), "created JWT signing key");
        Ok(Signer { record, key })
    }

    /// Mints an X.509-SVID for `spiffe_id` over `public_key`, valid for `ttl` seconds but
    /// never past the intermediate's expiry. Returns the chain: SVID, intermediate.
    pub async fn mint_x509_svid(
        &self,
        spiffe_id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: i64,
        dns_names: &[String],
    ) -> Result<Vec<Vec<u8>>, Error> {
        self.check_clock()?;
        let int = self.intermediate().ok_or_else(|| {
            Error::Unavailable(
                "no active intermediate CA on this node (it is starting, or replacing a revoked one)"
                    .into(),
            )
        })?;
        self.refuse_revoked(&int.record.id)?;
        let t = now();
        let not_after = (t + ttl).min(int.record.not_after);
        if not_after <= t {
            return Err(Error::Unavailable(
                "the intermediate CA has expired; the node is rotating it".into(),
            ));
        }
        let rsa_key = public_key.algorithm() == &rcgen::PKCS_RSA_SHA256;
        let params = svid_params(spiffe_id.as_str(), dns_names, t - 10, not_after, rsa_key)?;
        let issuer = IssuerKey {
            cert_der: Some(int.record.cert_der.clone()),
            key: int.key.clone(),
        };
        let leaf = make_cert(&params, public_key, &issuer).await?;
        self.issued.record(&int.record.id, not_after);
        Ok(vec![leaf, int.record.cert_der.clone()])
    }

    /// Mints a JWT-SVID. Returns the token and its expiry.
    pub async fn mint_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: i64,
    ) -> Result<(String, i64), Error> {
        self.check_clock()?;
        let jwt = self
            .current
            .read()
            .expect("ca lock")
            .jwt
            .clone()
            .ok_or_else(|| {
                Error::Unavailable(
                    "no active JWT key on this node (it is starting, or replacing a revoked one)"
                        .into(),
                )
            })?;
        self.refuse_revoked(&jwt.record.id)?;
        let t = now();
        let exp = (t + ttl).min(jwt.record.not_after);
        let info = ca_identity::pubkey::parse_spki(jwt.key.public_key_spki())?;
        let input =
            ca_identity::jwt::signing_input(info.kind, &jwt.record.id, spiffe_id, audience, t, exp);
        let der = jwt.key.sign(input.as_bytes()).await?;
        let sig = match info.kind {
            ca_identity::pubkey::KeyKind::EcP256 => {
                ca_identity::pubkey::ecdsa_der_to_fixed(&der, 32)?
            }
            ca_identity::pubkey::KeyKind::EcP384 => {
                ca_identity::pubkey::ecdsa_der_to_fixed(&der, 48)?
            }
            ca_identity::pubkey::KeyKind::Rsa { .. } => der,
        };
        self.issued.record(&jwt.record.id, exp);
        Ok((ca_identity::jwt::assemble(&input, &sig), exp))
    }
}

trait IssuedBy {
    fn cert_der_issued_by(&self, root: &AuthorityRecord) -> bool;
}

impl IssuedBy for AuthorityRecord {
    /// Whether this intermediate was signed by `root` (by authority key identifier).
    fn cert_der_issued_by(&self, root: &AuthorityRecord) -> bool {
        let (Ok(me), Ok(r)) = (
            ca_identity::x509::cert_info(&self.cert_der),
            ca_identity::x509::cert_info(&root.cert_der),
        ) else {
            return false;
        };
        me.authority_key_id.is_some() && me.authority_key_id == r.subject_key_id
    }
}
