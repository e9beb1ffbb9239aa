//! The key managers of the CA's three roles (root, intermediate, JWT), and a wrapper that
//! meters every signature (latency, errors by kind, operations in flight) and tracks
//! whether each role's key manager is currently usable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ca_kms::{KeyAlgorithm, KeyManager, SigningKey};

use ca_state::AuthorityKind;

/// Where the key managers' operations and the CA's lifecycle events are reported: the
/// node's metrics.
pub trait KeyEvents: Send + Sync + std::fmt::Debug + 'static {
    /// Whether role `role`'s key manager is usable, after an operation on it.
    fn key_manager_up(&self, role: KeyRole, up: bool);
    /// An operation on key manager `backend` failed with an error of `kind`.
    fn key_manager_error(&self, backend: &str, kind: &str);
    /// A signature started.
    fn sign_started(&self);
    /// A signature by `backend` for `role` ended after `seconds`.
    fn sign_finished(&self, backend: &str, role: KeyRole, seconds: f64);
    /// A lifecycle step of an authority of `kind` (`event`: `failed`, ...).
    fn authority_event(&self, kind: AuthorityKind, event: &str);
}

/// The events a key manager's operations report to.
type Events = Arc<dyn KeyEvents>;

/// What a key is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyRole {
    /// The trust domain's root CA.
    Root,
    /// A node's intermediate CA.
    Intermediate,
    /// A node's JWT signing key.
    Jwt,
}

impl KeyRole {
    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRole::Root => "root",
            KeyRole::Intermediate => "intermediate",
            KeyRole::Jwt => "jwt",
        }
    }
}

/// The health of one role's key manager as seen by the last operation on it.
#[derive(Debug, Default)]
pub struct KeyHealth {
    ok: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl KeyHealth {
    fn record(&self, r: Result<(), &ca_kms::Error>) {
        match r {
            Ok(()) => {
                self.ok.store(true, Ordering::Relaxed);
                *self.last_error.lock().expect("health lock") = None;
            }
            // A refused or unreachable backend makes the role unusable until it recovers;
            // other errors (bad input, not found) say nothing about the backend's health.
            Err(e @ (ca_kms::Error::Unavailable(_) | ca_kms::Error::PermissionDenied(_))) => {
                self.ok.store(false, Ordering::Relaxed);
                *self.last_error.lock().expect("health lock") = Some(e.to_string());
            }
            Err(_) => {}
        }
    }

    /// `None` when usable, else why not.
    pub fn problem(&self) -> Option<String> {
        if self.ok.load(Ordering::Relaxed) {
            None
        } else {
            Some(
                self.last_error
                    .lock()
                    .expect("health lock")
                    .clone()
                    .unwrap_or_else(|| "not used yet".into()),
            )
        }
    }
}

/// One role's key manager and its health.
#[derive(Clone, Debug)]
pub struct RoleKeys {
    /// Which role.
    pub role: KeyRole,
    /// The manager.
    pub km: Arc<dyn KeyManager>,
    /// Health from the last operation.
    pub health: Arc<KeyHealth>,
    metrics: Events,
}

impl RoleKeys {
    /// Wraps `km` for `role`.
    pub fn new(role: KeyRole, km: Arc<dyn KeyManager>, metrics: Events) -> Self {
        Self {
            role,
            km,
            health: Arc::new(KeyHealth::default()),
            metrics,
        }
    }

    fn observe<T>(&self, r: ca_kms::Result<T>) -> ca_kms::Result<T> {
        observe(
            self.metrics.as_ref(),
            &self.health,
            self.km.backend(),
            self.role,
            r,
        )
    }

    fn wrap(&self, key: Arc<dyn SigningKey>) -> Arc<dyn SigningKey> {
        Arc::new(MeteredKey {
            inner: key,
            backend: self.km.backend(),
            role: self.role,
            metrics: self.metrics.clone(),
            health: self.health.clone(),
        })
    }

    /// Generates a key for this role.
    pub async fn generate(
        &self,
        name: &str,
        alg: KeyAlgorithm,
    ) -> ca_kms::Result<Arc<dyn SigningKey>> {
        let r = self.km.generate(name, alg).await;
        self.observe(r).map(|k| self.wrap(k))
    }

    /// Finds a key of this role.
    pub async fn get(&self, name: &str) -> ca_kms::Result<Arc<dyn SigningKey>> {
        let r = self.km.get(name).await;
        self.observe(r).map(|k| self.wrap(k))
    }

    /// Deletes (or schedules the deletion of) a key of this role, logging a failure: used
    /// to clean up after a failed preparation, where the original error matters more.
    pub async fn delete_quietly(&self, name: &str) {
        if let Err(e) = self.km.delete(name).await {
            tracing::warn!(key = name, backend = self.km.backend(), error = %e,
                "could not delete a key created for an authority that was not prepared; delete it by hand");
        }
    }

    /// Wraps a key that lives outside the key manager (memory mode), metered alike under
    /// the backend label `memory` and with a health of its own.
    pub fn wrap_memory(&self, key: Arc<dyn SigningKey>) -> Arc<dyn SigningKey> {
        Arc::new(MeteredKey {
            inner: key,
            backend: "memory",
            role: self.role,
            metrics: self.metrics.clone(),
            health: Arc::new(KeyHealth::default()),
        })
    }
}

fn observe<T>(
    m: &dyn KeyEvents,
    health: &KeyHealth,
    backend: &str,
    role: KeyRole,
    r: ca_kms::Result<T>,
) -> ca_kms::Result<T> {
    health.record(r.as_ref().map(|_| ()));
    if backend != "memory" {
        m.key_manager_up(role, health.problem().is_none());
    }
    if let Err(e) = &r {
        m.key_manager_error(backend, e.kind());
    }
    r
}

/// The key managers of the three roles (the same instance where the config shares one).
#[derive(Clone, Debug)]
pub struct KeyManagers {
    /// Root CA keys.
    pub root: RoleKeys,
    /// Intermediate CA keys (unused in memory mode).
    pub intermediate: RoleKeys,
    /// JWT signing keys.
    pub jwt: RoleKeys,
}

impl KeyManagers {
    /// Where every role's keys report to.
    pub fn events(&self) -> &dyn KeyEvents {
        self.root.metrics.as_ref()
    }
}

impl KeyManagers {
    /// Every role on one key manager.
    pub fn single(km: Arc<dyn KeyManager>, metrics: Events) -> Self {
        Self::new(km.clone(), km.clone(), km, metrics)
    }

    /// One key manager per role.
    pub fn new(
        root: Arc<dyn KeyManager>,
        intermediate: Arc<dyn KeyManager>,
        jwt: Arc<dyn KeyManager>,
        metrics: Events,
    ) -> Self {
        Self {
            root: RoleKeys::new(KeyRole::Root, root, metrics.clone()),
            intermediate: RoleKeys::new(KeyRole::Intermediate, intermediate, metrics.clone()),
            jwt: RoleKeys::new(KeyRole::Jwt, jwt, metrics),
        }
    }
}

/// A key whose signatures are timed, counted and fed into its role's health.
#[derive(Debug)]
struct MeteredKey {
    inner: Arc<dyn SigningKey>,
    backend: &'static str,
    role: KeyRole,
    metrics: Events,
    health: Arc<KeyHealth>,
}

#[async_trait]
impl SigningKey for MeteredKey {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn algorithm(&self) -> KeyAlgorithm {
        self.inner.algorithm()
    }
    fn public_key_spki(&self) -> &[u8] {
        self.inner.public_key_spki()
    }
    async fn sign(&self, msg: &[u8]) -> ca_kms::Result<Vec<u8>> {
        let m = self.metrics.as_ref();
        m.sign_started();
        let start = std::time::Instant::now();
        let r = self.inner.sign(msg).await;
        m.sign_finished(self.backend, self.role, start.elapsed().as_secs_f64());
        observe(m, &self.health, self.backend, self.role, r)
    }
}
