//! The certificate authority of one node: the cluster root, this node's intermediate and
//! JWT key (all recorded in the CA journal), and minting of X.509-SVIDs and JWT-SVIDs.
//!
//! Keys go through the [`KeyManager`]; the root always lives there. The intermediate lives
//! there too, or (memory mode) only in RAM, in which case a new one is made at every start.
//! An SVID's lifetime never exceeds its issuer's remaining lifetime.

pub mod keys;
pub mod x509;

use std::sync::{Arc, RwLock};

use ca_identity::{JwtAuthority, SpiffeId, TrustBundle, TrustDomain};
use ca_kms::memory::MemoryKey;
use ca_kms::{KeyAlgorithm, SigningKey};
use ca_raft::{
    AuthorityKind, AuthorityRecord, AuthorityState, Command, Proposer, Response, StateMachine,
};
use rcgen::PublicKeyData;

use crate::config::IntermediateMode;
use crate::Error;
use keys::{KeyManagers, RoleKeys};
use x509::{ca_params, make_cert, svid_params, IssuerKey, RawPublicKey};

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
    bundle: Option<Arc<TrustBundle>>,
}

/// The CA of this node.
pub struct Ca {
    settings: CaSettings,
    keys: KeyManagers,
    sm: StateMachine,
    proposer: Arc<dyn Proposer>,
    current: RwLock<Current>,
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

/// CA certificates start this many seconds in the past, for clocks slightly behind.
const BACKDATE: i64 = 60;

/// Whether more than half of `a`'s configured lifetime is left (the backdating of CA
/// certificates is not counted as lifetime).
fn before_half_life(a: &AuthorityRecord, t: i64) -> bool {
    let start = if a.cert_der.is_empty() {
        a.not_before
    } else {
        a.not_before + BACKDATE
    };
    a.not_after - t > (a.not_after - start) / 2
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

async fn propose_ok(p: &dyn Proposer, cmd: Command) -> Result<(), Error> {
    match p.propose(cmd).await? {
        Response::Rejected { code, message } => Err(crate::error::from_rejection(code, message)),
        _ => Ok(()),
    }
}

impl Ca {
    /// A CA over the given key manager and state.
    pub fn new(
        settings: CaSettings,
        keys: KeyManagers,
        sm: StateMachine,
        proposer: Arc<dyn Proposer>,
    ) -> Self {
        Self {
            settings,
            keys,
            sm,
            proposer,
            current: RwLock::new(Current::default()),
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.settings.trust_domain
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

    /// Why this node cannot mint X.509-SVIDs or JWT-SVIDs right now, if it cannot. The
    /// root's key manager is not needed to mint, only to rotate, so it is not a reason.
    pub fn minting_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
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

    /// Whether `a` is an active authority of `kind` belonging to this node.
    fn is_active_mine(&self, a: &AuthorityRecord, kind: AuthorityKind) -> bool {
        a.kind == kind && a.state == AuthorityState::Active && a.node_id == self.settings.node_id
    }

    /// Retires this node's active authorities of `kind` in `previous` (the journal as read
    /// before a replacement was created; the replacement itself is not in it).
    async fn retire_active(
        &self,
        previous: &[AuthorityRecord],
        kind: AuthorityKind,
    ) -> Result<(), Error> {
        for old in previous.iter().filter(|a| self.is_active_mine(a, kind)) {
            propose_ok(
                self.proposer.as_ref(),
                Command::SetAuthorityState {
                    id: old.id.clone(),
                    state: AuthorityState::Retired,
                },
            )
            .await?;
        }
        Ok(())
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

    /// Makes sure there is an active root, an active intermediate for this node with at
    /// least half its life left, and an active JWT key; creates (through the journal)
    /// whatever is missing; loads the keys. Called at start and periodically.
    pub async fn ensure_authorities(&self) -> Result<(), Error> {
        let authorities = self.sm.authorities().await?;
        let t = now();
        let (have_root, have_int, have_jwt) = {
            let cur = self.current.read().expect("ca lock");
            (cur.root.clone(), cur.intermediate.clone(), cur.jwt.clone())
        };
        // Root.
        let root = match authorities.iter().rev().find(|a| {
            a.kind == AuthorityKind::Root && a.state == AuthorityState::Active && a.not_after > t
        }) {
            Some(r) => self.signer_for(r, have_root.as_ref()).await?,
            None => self.create_root().await?,
        };
        self.current.write().expect("ca lock").root = Some(root.clone());
        // Intermediate of this node.
        let mine = authorities
            .iter()
            .rev()
            .find(|a| self.is_active_mine(a, AuthorityKind::Intermediate));
        let intermediate = match mine {
            Some(rec) if before_half_life(rec, t) && rec.cert_der_issued_by(&root.record) => {
                match (&have_int, rec.key_backend.as_str()) {
                    (Some(h), _) if h.record.id == rec.id => Some(h.clone()),
                    (_, "memory") => None, // key lost with the previous process
                    _ => Some(self.signer_for(rec, None).await?),
                }
            }
            _ => None,
        };
        let intermediate = match intermediate {
            Some(i) => i,
            None => {
                let new = self.create_intermediate(&root).await?;
                self.retire_active(&authorities, AuthorityKind::Intermediate)
                    .await?;
                new
            }
        };
        self.current.write().expect("ca lock").intermediate = Some(intermediate);
        // JWT key of this node.
        let jwt = match authorities
            .iter()
            .rev()
            .find(|a| self.is_active_mine(a, AuthorityKind::Jwt) && before_half_life(a, t))
        {
            Some(rec) => self.signer_for(rec, have_jwt.as_ref()).await?,
            None => {
                let new = self.create_jwt_key().await?;
                self.retire_active(&authorities, AuthorityKind::Jwt).await?;
                new
            }
        };
        self.current.write().expect("ca lock").jwt = Some(jwt);
        self.refresh_bundle().await?;
        Ok(())
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
            _ => Ok(Signer {
                key: self.load_key(rec).await?,
                record: rec.clone(),
            }),
        }
    }

    /// Destroys (or, where the backend only does that, schedules the deletion of) the keys
    /// of retired authorities once nothing they signed can still be valid (an SVID never
    /// outlives its issuer, so that is the authority's own expiry), and of revoked
    /// authorities at once; records it in the journal. Roots are handled by every node
    /// (a key already gone counts as destroyed); intermediates and JWT keys by their node.
    pub async fn destroy_expired_keys(&self) -> Result<usize, Error> {
        let t = now();
        let mut destroyed = 0;
        for a in self.sm.authorities().await? {
            let due = match a.state {
                AuthorityState::Retired => a.not_after < t,
                AuthorityState::Revoked => true,
                AuthorityState::Prepared | AuthorityState::Active => false,
            };
            let mine = a.kind == AuthorityKind::Root || a.node_id == self.settings.node_id;
            if !due || !mine || a.key_destroyed {
                continue;
            }
            if a.key_backend != "memory" {
                let keys = self.role_keys(a.kind);
                if a.key_backend != keys.km.backend() {
                    continue; // held by a key manager this node does not have
                }
                match keys.km.delete(&a.key_id).await {
                    Ok(()) | Err(ca_kms::Error::NotFound(_)) => {}
                    Err(e) => {
                        tracing::warn!(authority = %a.id, error = %e, "could not destroy the key of an expired authority; will retry");
                        continue;
                    }
                }
            }
            propose_ok(
                self.proposer.as_ref(),
                Command::KeyDestroyed { id: a.id.clone() },
            )
            .await?;
            tracing::info!(authority = %a.id, kind = a.kind.as_str(), backend = %a.key_backend, "destroyed the key of an authority that nothing valid depends on");
            destroyed += 1;
        }
        Ok(destroyed)
    }

    /// Rebuilds the trust bundle from the journal: roots and JWT keys that are prepared,
    /// active or retired and not yet expired.
    pub async fn refresh_bundle(&self) -> Result<Arc<TrustBundle>, Error> {
        let t = now();
        let auths = self.sm.authorities().await?;
        let published =
            |a: &&AuthorityRecord| a.state != AuthorityState::Revoked && a.not_after > t;
        let bundle = Arc::new(TrustBundle {
            trust_domain: self.settings.trust_domain.clone(),
            x509_authorities: auths
                .iter()
                .filter(|a| a.kind == AuthorityKind::Root)
                .filter(published)
                .map(|a| a.cert_der.clone())
                .collect(),
            jwt_authorities: auths
                .iter()
                .filter(|a| a.kind == AuthorityKind::Jwt)
                .filter(published)
                .map(|a| JwtAuthority {
                    key_id: a.id.clone(),
                    public_key: a.public_key.clone(),
                    expires_at: a.not_after,
                })
                .collect(),
            sequence_number: self.sm.authorities_version().await?,
            refresh_hint: 60,
        });
        self.current.write().expect("ca lock").bundle = Some(bundle.clone());
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

    /// The signing intermediate, if ready.
    pub fn intermediate(&self) -> Option<Signer> {
        self.current.read().expect("ca lock").intermediate.clone()
    }

    async fn create_root(&self) -> Result<Signer, Error> {
        let id = format!("root-{}", short_id());
        let key = self
            .keys
            .root
            .generate(&id, self.settings.key_algorithm)
            .await?;
        match self.prepare_root(&id, key).await {
            Ok(s) => Ok(s),
            Err(e) => {
                self.keys.root.delete_quietly(&id).await; // no leaked keys
                Err(e)
            }
        }
    }

    /// Certifies a new root key and records the root in the journal.
    async fn prepare_root(&self, id: &str, key: Arc<dyn SigningKey>) -> Result<Signer, Error> {
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
            state: AuthorityState::Active,
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
            self.proposer.as_ref(),
            Command::PutAuthority {
                authority: record.clone(),
            },
        )
        .await?;
        tracing::info!(authority = %id, backend = self.keys.root.km.backend(), "created root CA");
        Ok(Signer { record, key })
    }

    async fn create_intermediate(&self, root: &Signer) -> Result<Signer, Error> {
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
        match self.prepare_intermediate(root, &id, key, &backend).await {
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
        let public = RawPublicKey::from_spki(key.public_key_spki(), key.algorithm())?;
        let issuer = IssuerKey {
            cert_der: Some(root.record.cert_der.clone()),
            key: root.key.clone(),
        };
        let cert = make_cert(&params, &public, &issuer).await?;
        let record = AuthorityRecord {
            id: id.clone(),
            kind: AuthorityKind::Intermediate,
            state: AuthorityState::Active,
            node_id: self.settings.node_id.clone(),
            key_backend: backend.to_owned(),
            key_id: id.clone(),
            cert_der: cert,
            public_key: key.public_key_spki().to_vec(),
            not_before: t - BACKDATE,
            not_after,
            key_destroyed: false,
        };
        propose_ok(
            self.proposer.as_ref(),
            Command::PutAuthority {
                authority: record.clone(),
            },
        )
        .await?;
        tracing::info!(authority = %id, backend = %backend, not_after, "activated intermediate CA");
        Ok(Signer { record, key })
    }

    async fn create_jwt_key(&self) -> Result<Signer, Error> {
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
            state: AuthorityState::Active,
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
            self.proposer.as_ref(),
            Command::PutAuthority {
                authority: record.clone(),
            },
        )
        .await
        {
            self.keys.jwt.delete_quietly(&id).await;
            return Err(e);
        }
        tracing::info!(authority = %id, backend = self.keys.jwt.km.backend(), "activated JWT signing key");
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
        let int = self.intermediate().ok_or_else(|| {
            Error::Unavailable("no active intermediate CA on this node yet".into())
        })?;
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
        Ok(vec![leaf, int.record.cert_der.clone()])
    }

    /// Mints a JWT-SVID. Returns the token and its expiry.
    pub async fn mint_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: i64,
    ) -> Result<(String, i64), Error> {
        let jwt = self
            .current
            .read()
            .expect("ca lock")
            .jwt
            .clone()
            .ok_or_else(|| Error::Unavailable("no active JWT key on this node yet".into()))?;
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
