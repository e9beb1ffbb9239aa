//! The PKCS#11 key manager: keys generated and used inside a token (an HSM; SoftHSM2 in
//! tests), never leaving it.
//!
//! # Configuration
//! [`Pkcs11Config`]: the module (the vendor's shared library), the token's label (the slot is
//! found by the label of the token in it, never by slot number: numbers change when tokens
//! are added or the machine restarts), where the user PIN comes from (a file or an environment
//! variable, exactly one, never the config itself) and a prefix for the labels of this CA's
//! keys. A PIN file must be a non-empty regular file that neither group nor others can read
//! or write (mode `0600` or `0400`; a systemd credential is): one that they can is
//! **refused**, not warned about, since the PIN is what stands between a local user and the
//! CA's keys. One trailing newline is not part of the PIN.
//!
//! # Keys
//! Each key is a pair generated inside the token (`C_GenerateKeyPair`): the private key with
//! `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, `CKA_SIGN` true and `CKA_EXTRACTABLE` false;
//! both halves carry `CKA_LABEL` = prefix + name and the same random `CKA_ID`. They are found
//! again by label, so a restarted process (or another node sharing the HSM) finds them.
//! EC P-256 and P-384 (`CKM_EC_KEY_PAIR_GEN`; the public key is read from `CKA_EC_POINT`, a
//! DER OCTET STRING, and wrapped into SubjectPublicKeyInfo) and RSA 2048 and 3072
//! (`CKM_RSA_PKCS_KEY_PAIR_GEN`, e = 65537; SPKI from `CKA_MODULUS` and
//! `CKA_PUBLIC_EXPONENT`). [`KeyManager::protection`] reads `CKA_EXTRACTABLE`,
//! `CKA_SENSITIVE`, `CKA_NEVER_EXTRACTABLE` and `CKA_ALWAYS_SENSITIVE` back from the token.
//!
//! # Signing
//! This code hashes the message (SHA-256 for P-256 and RSA, SHA-384 for P-384) and the token
//! signs the digest: raw `CKM_ECDSA`, whose `r || s` is re-encoded as the DER
//! `SEQUENCE { r, s }` X.509 wants, or `CKM_RSA_PKCS` over the SHA-256 `DigestInfo` (falling
//! back to `CKM_SHA256_RSA_PKCS` over the message where a token lacks raw `CKM_RSA_PKCS`).
//! Every signature is verified against the key's public key before it is returned, so a
//! faulty token, or a key replaced under the same label, can never yield a bad certificate.
//!
//! # Sessions and recovery
//! Each module is loaded and `C_Initialize`d once per process and shared by every manager
//! using it (PKCS#11 state is per process: a second `C_Initialize` or a `C_Finalize` affects
//! every user). Each manager keeps a bounded pool of R/W sessions ([`DEFAULT_MAX_SESSIONS`]
//! at once, more callers wait) and logs the user in once (a login is per token and process,
//! not per session). Calls block, so they run on tokio's blocking threads. A call that fails
//! is recovered and retried, up to three attempts, without a restart of this process:
//! - a closed session (`CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`,
//!   `CKR_OPERATION_ACTIVE` on a session only this call holds): the pool's sessions are
//!   forgotten (not closed: after a reset their handles may name new sessions) and new
//!   ones are opened;
//! - a logged-out token (`CKR_USER_NOT_LOGGED_IN`, or private objects no longer visible):
//!   the user is logged in again;
//! - a stale object handle (`CKR_OBJECT_HANDLE_INVALID`, `CKR_KEY_HANDLE_INVALID`, or a
//!   signature that does not verify): the key is found again by label;
//! - a restarted or failing module (`CKR_CRYPTOKI_NOT_INITIALIZED`, `CKR_DEVICE_ERROR`,
//!   `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`, `CKR_GENERAL_ERROR`, the token's label
//!   not found): the module is finalized and initialized again (at most once every two
//!   seconds, except when it is not initialized at all, and only while no call is running in
//!   it) and the token is found again by label. A restart resets every session in the
//!   process on that module, so other managers on it (other tokens) recover too.
//!
//! What does not recover maps to a [`crate::Error`] kind: a wrong or locked PIN is
//! `PermissionDenied` ("PIN incorrect for token 'X'"), a token label that is not there is
//! `Config` at [`Pkcs11KeyManager::open`] and `Unavailable` later (both list the labels of
//! the tokens that are there), a removed token or failing device is `Unavailable`, a
//! mechanism, curve or key size the token lacks is `Unsupported`.
//!
//! A key that is not found is `NotFound` only once the session is known to be logged in
//! and the token to answer `C_GetTokenInfo`: SoftHSM2 shows a token whose storage went
//! away as an empty token, and only `C_GetTokenInfo` fails (`CKR_GENERAL_ERROR`).
//!
//! Caveats: a login is shared by everything in the process using the same token, so a
//! second manager with a wrong PIN opened while another is logged in is not refused by the
//! token. A generation whose reply was lost to a device error is retried and then reports
//! `AlreadyExists` if the token had created the pair; `delete` it and generate again.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use ring::signature as rsig;
use sha2::Digest;

use crate::{
    validate_key_name, Error, KeyAlgorithm, KeyManager, KeyProtection, Result, SigningKey,
};

const BACKEND: &str = "pkcs11";

/// How many sessions a manager keeps open (and so how many calls run at once) by default.
pub const DEFAULT_MAX_SESSIONS: usize = 8;

/// Attempts per call: the first, and up to two after a recovery.
const MAX_ATTEMPTS: usize = 3;

/// A module is finalized and initialized again at most this often because of failing calls.
const RESTART_MIN_INTERVAL: Duration = Duration::from_secs(2);

// DER pieces.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const ALG_RSA_ENCRYPTION: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
const SHA256_DIGEST_INFO_PREFIX: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];
const RSA_PUBLIC_EXPONENT: &[u8] = &[0x01, 0x00, 0x01];

// ---------------------------------------------------------------------------------------
// Configuration

/// Where the PKCS#11 key manager finds its token, PIN and keys.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (the vendor's shared library).
    pub module: PathBuf,
    /// Label of the token (found in whichever slot holds it).
    pub token_label: String,
    /// File holding the user PIN (mode 0600 or stricter). Exactly one of `pin_file` and
    /// `pin_env`.
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN. Exactly one of `pin_file` and `pin_env`.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Prefix of the `CKA_LABEL` of this CA's keys: key `name` is labelled prefix + name.
    pub key_label_prefix: String,
}

impl Pkcs11Config {
    /// Checks the configuration without touching the module or the token.
    pub fn validate(&self) -> Result<()> {
        if !self.module.is_file() {
            return Err(Error::Config(format!(
                "PKCS#11 module {} not found (the vendor's shared library, `module` in the config)",
                self.module.display()
            )));
        }
        if self.token_label.is_empty()
            || self.token_label.len() > 32
            || self.token_label.ends_with(' ')
        {
            return Err(Error::Config(format!(
                "token label {:?}: must be 1 to 32 bytes, not ending in a space (`token_label`)",
                self.token_label
            )));
        }
        if self.key_label_prefix.len() > 64 || self.key_label_prefix.chars().any(char::is_control) {
            return Err(Error::Config(format!(
                "key label prefix {:?}: at most 64 bytes, no control characters (`key_label_prefix`)",
                self.key_label_prefix
            )));
        }
        match (&self.pin_file, &self.pin_env) {
            (Some(_), Some(_)) => Err(Error::Config(
                "both pin_file and pin_env are set: set exactly one source of the token PIN".into(),
            )),
            (None, None) => Err(Error::Config(
                "no token PIN source: set pin_file or pin_env (the PIN is never written in the config)"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// Reads the user PIN from its file or environment variable.
    fn read_pin(&self) -> Result<AuthPin> {
        let pin = match (&self.pin_file, &self.pin_env) {
            (Some(path), None) => read_pin_file(path)?,
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => v,
                Ok(_) => {
                    return Err(Error::Config(format!(
                        "environment variable {var} (pin_env) is empty"
                    )))
                }
                Err(std::env::VarError::NotPresent) => {
                    return Err(Error::Config(format!(
                        "environment variable {var} (pin_env) is not set"
                    )))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(Error::Config(format!(
                        "environment variable {var} (pin_env) is not valid UTF-8"
                    )))
                }
            },
            _ => {
                return Err(Error::Config(
                    "set exactly one of pin_file and pin_env".into(),
                ))
            }
        };
        Ok(AuthPin::from(pin))
    }
}

fn read_pin_file(path: &Path) -> Result<String> {
    let text =
        ca_identity::private_file::read(path, "PIN file (pin_file)").map_err(Error::Config)?;
    let pin = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if pin.is_empty() {
        return Err(Error::Config(format!(
            "PIN file {} (pin_file) is empty",
            path.display()
        )));
    }
    Ok(pin.to_owned())
}

// ---------------------------------------------------------------------------------------
// Modules: one initialized context per library per process.

struct Module {
    path: PathBuf,
    state: RwLock<ModuleState>,
    /// Bumped whenever sessions and object handles may have become invalid (the module was
    /// restarted, or a session turned out closed). Sessions and handles carry the value they
    /// were made under and are dropped (never closed: their handle may be someone else's by
    /// now) once it moved on.
    epoch: AtomicU64,
    restarts: AtomicU64,
}

struct ModuleState {
    ctx: Pkcs11,
    last_restart: Option<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn initialize(ctx: &Pkcs11) -> Result<(), CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

impl Module {
    fn get(path: &Path) -> Result<Arc<Module>> {
        static MODULES: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut modules = lock(MODULES.get_or_init(Default::default));
        if let Some(m) = modules.get(&key) {
            return Ok(m.clone());
        }
        let ctx = Pkcs11::new(&key).map_err(|e| {
            Error::Config(format!("cannot load PKCS#11 module {}: {e}", key.display()))
        })?;
        initialize(&ctx).map_err(|e| {
            Error::Unavailable(format!(
                "PKCS#11 module {}: C_Initialize failed: {e}",
                key.display()
            ))
        })?;
        let m = Arc::new(Module {
            path: key.clone(),
            state: RwLock::new(ModuleState {
                ctx,
                last_restart: None,
            }),
            epoch: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
        });
        modules.insert(key, m.clone());
        Ok(m)
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn read(&self) -> RwLockReadGuard<'_, ModuleState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks every session and handle made under `seen` stale (once, however many callers
    /// notice).
    fn invalidate(&self, seen: u64) {
        let _ = self
            .epoch
            .compare_exchange(seen, seen + 1, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// `C_Finalize` + `C_Initialize`, waiting for the calls in flight to end. Returns false
    /// when skipped because the last restart was too recent (unless `force`); true when done,
    /// or when someone else restarted it since `seen`.
    fn restart(&self, seen: u64, force: bool, why: &str) -> Result<bool, CkError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if self.epoch() != seen {
            return Ok(true);
        }
        if !force
            && st
                .last_restart
                .is_some_and(|t| t.elapsed() < RESTART_MIN_INTERVAL)
        {
            return Ok(false);
        }
        tracing::warn!(module = %self.path.display(), reason = why, "re-initializing the PKCS#11 module");
        // CKR_CRYPTOKI_NOT_INITIALIZED here is fine: someone finalized it already.
        let _ = st.ctx.clone().finalize();
        st.last_restart = Some(Instant::now());
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.restarts.fetch_add(1, Ordering::Relaxed);
        initialize(&st.ctx)?;
        Ok(true)
    }
}

// ---------------------------------------------------------------------------------------
// Failures inside a call, and what recovers them.

enum Fail {
    Ck(CkError),
    /// Private objects are not visible: the token is not logged in (any more).
    NotLoggedIn,
    /// No initialized token has the configured label; the labels that are there.
    TokenMissing(Vec<String>),
    /// The token's signature does not verify against the key's public key.
    BadSignature,
    Kms(Error),
}

impl From<CkError> for Fail {
    fn from(e: CkError) -> Self {
        Fail::Ck(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Kms(e)
    }
}

enum Recovery {
    None,
    Login,
    Session,
    Handles,
    Module,
}

fn recovery(f: &Fail) -> Recovery {
    match f {
        Fail::NotLoggedIn => Recovery::Login,
        Fail::TokenMissing(_) => Recovery::Module,
        Fail::BadSignature => Recovery::Handles,
        Fail::Kms(_) => Recovery::None,
        Fail::Ck(CkError::Pkcs11(rv, _)) => match rv {
            RvError::UserNotLoggedIn => Recovery::Login,
            // An operation already active (or gone) on a session only this call holds: the
            // pool's handles no longer mean what it thinks (the module was reset under it).
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::OperationActive
            | RvError::OperationNotInitialized => Recovery::Session,
            RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Recovery::Handles,
            RvError::CryptokiNotInitialized
            | RvError::DeviceError
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SlotIdInvalid
            | RvError::GeneralError => Recovery::Module,
            _ => Recovery::None,
        },
        Fail::Ck(_) => Recovery::None,
    }
}

fn describe_labels(labels: &[String]) -> String {
    if labels.is_empty() {
        "there are no initialized tokens".to_string()
    } else {
        let l: Vec<String> = labels.iter().map(|l| format!("'{l}'")).collect();
        format!("tokens present: {}", l.join(", "))
    }
}

// ---------------------------------------------------------------------------------------
// The manager.

/// Keys inside a PKCS#11 token. Cheap to share behind an `Arc`; safe to use from many tasks.
pub struct Pkcs11KeyManager {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pkcs11KeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

struct Pooled {
    epoch: u64,
    session: Session,
}

struct Inner {
    module: Arc<Module>,
    token_label: String,
    prefix: String,
    pin: AuthPin,
    /// The token's slot, found by label, and the epoch it was found in.
    slot: Mutex<Option<(u64, Slot)>>,
    idle: Mutex<Vec<Pooled>>,
    permits: Arc<tokio::sync::Semaphore>,
    /// Bumped when a key handle turned out stale (deleted, replaced): cached handles go.
    handles_epoch: AtomicU64,
    /// Serializes generate and delete (the existence check and the creation).
    writes: tokio::sync::Mutex<()>,
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    relogins: AtomicU64,
    sessions_dropped: AtomicU64,
    keys_refound: AtomicU64,
}

/// How often a manager recovered from what the module did under it (for metrics and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pkcs11Stats {
    /// Logins after the token was found logged out.
    pub relogins: u64,
    /// Times the pooled sessions were found closed and dropped.
    pub sessions_dropped: u64,
    /// Times a key's object handle was found stale and the key looked up again.
    pub keys_refound: u64,
    /// `C_Finalize` + `C_Initialize` of the module, by any manager in this process.
    pub module_restarts: u64,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11KeyManager")
            .field("module", &self.module.path)
            .field("token_label", &self.token_label)
            .field("key_label_prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// What an operation gets: a logged-in session on the token, and the epochs it is valid in.
struct Op<'a> {
    ctx: &'a Pkcs11,
    slot: Slot,
    session: &'a Session,
    epoch: u64,
    handles_epoch: u64,
}

impl Pkcs11KeyManager {
    /// Loads the module, finds the token by label and logs in. Blocks (it talks to the
    /// token): call it at startup or from a blocking context. A token not found is a
    /// `Config` error naming the labels that are there; a wrong PIN is `PermissionDenied`.
    pub fn open(config: &Pkcs11Config) -> Result<Self> {
        Self::open_with_sessions(config, DEFAULT_MAX_SESSIONS)
    }

    /// [`Pkcs11KeyManager::open`] with at most `max_sessions` sessions (and calls) at once.
    pub fn open_with_sessions(config: &Pkcs11Config, max_sessions: usize) -> Result<Self> {
        config.validate()?;
        let pin = config.read_pin()?;
        let module = Module::get(&config.module)?;
        let max_sessions = max_sessions.max(1);
        let inner = Arc::new(Inner {
            module,
            token_label: config.token_label.clone(),
            prefix: config.key_label_prefix.clone(),
            pin,
            slot: Mutex::new(None),
            idle: Mutex::new(Vec::with_capacity(max_sessions)),
            permits: Arc::new(tokio::sync::Semaphore::new(max_sessions)),
            handles_epoch: AtomicU64::new(0),
            writes: tokio::sync::Mutex::new(()),
            stats: Counters::default(),
        });
        inner.locate_token()?;
        // Opens the first session and logs in, so a wrong PIN shows now.
        inner.run("log in", |_| Ok(()))?;
        tracing::info!(
            module = %inner.module.path.display(),
            token = %inner.token_label,
            "PKCS#11 key manager ready"
        );
        Ok(Self { inner })
    }

    /// The configured token label.
    pub fn token_label(&self) -> &str {
        &self.inner.token_label
    }

    /// Recovery counters since this manager was opened (module restarts: since the module
    /// was loaded).
    pub fn stats(&self) -> Pkcs11Stats {
        let c = &self.inner.stats;
        Pkcs11Stats {
            relogins: c.relogins.load(Ordering::Relaxed),
            sessions_dropped: c.sessions_dropped.load(Ordering::Relaxed),
            keys_refound: c.keys_refound.load(Ordering::Relaxed),
            module_restarts: self.inner.module.restarts.load(Ordering::Relaxed),
        }
    }

    /// The `CKA_LABEL` key `name` has on the token.
    pub fn object_label(&self, name: &str) -> String {
        self.inner.label(name)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let epoch = self.module.epoch();
        let _no_restart = self.module.read();
        for p in lock(&self.idle).drain(..) {
            if p.epoch == epoch {
                let _ = p.session.close();
            }
        }
    }
}

impl Inner {
    fn label(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn locate_token(&self) -> Result<()> {
        for attempt in 0..2 {
            let epoch = self.module.epoch();
            let found = {
                let st = self.module.read();
                find_slot(&st.ctx, &self.token_label)
            };
            let fail = match found {
                Ok(slot) => {
                    *lock(&self.slot) = Some((epoch, slot));
                    return Ok(());
                }
                Err(f) => f,
            };
            let retry = attempt == 0 && matches!(recovery(&fail), Recovery::Module);
            if !retry {
                return Err(match fail {
                    Fail::TokenMissing(labels) => Error::Config(format!(
                        "no token labelled '{}' in PKCS#11 module {}; {}",
                        self.token_label,
                        self.module.path.display(),
                        describe_labels(&labels)
                    )),
                    f => self.error("find token", f),
                });
            }
            // The module may have been initialized before the token existed (a module lists
            // the tokens it had at C_Initialize): look again after a restart.
            self.module
                .restart(epoch, true, "token not found")
                .map_err(|e| self.error("initialize module", Fail::Ck(e)))?;
        }
        unreachable!("the second attempt always returns")
    }

    fn slot(&self, ctx: &Pkcs11, epoch: u64) -> Result<Slot, Fail> {
        if let Some((e, s)) = *lock(&self.slot) {
            if e == epoch {
                return Ok(s);
            }
        }
        let s = find_slot(ctx, &self.token_label)?;
        *lock(&self.slot) = Some((epoch, s));
        Ok(s)
    }

    fn login(&self, s: &Session) -> Result<(), Fail> {
        match s.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn ensure_login(&self, s: &Session) -> Result<(), Fail> {
        match s.get_session_info()?.session_state() {
            SessionState::RoUser | SessionState::RwUser => Ok(()),
            SessionState::RwSecurityOfficer => Err(Fail::Kms(Error::PermissionDenied(format!(
                "token '{}' has its security officer logged in; the user cannot log in",
                self.token_label
            )))),
            _ => self.login(s),
        }
    }

    fn checkout(&self, ctx: &Pkcs11, slot: Slot, epoch: u64) -> Result<Pooled, Fail> {
        loop {
            let p = lock(&self.idle).pop();
            match p {
                Some(p) if p.epoch == epoch => return Ok(p),
                Some(_) => continue, // stale: dropped without closing
                None => break,
            }
        }
        let session = ctx.open_rw_session_no_drop(slot)?;
        if let Err(e) = self.ensure_login(&session) {
            let _ = session.close();
            return Err(e);
        }
        Ok(Pooled { epoch, session })
    }

    fn checkin(&self, p: Pooled) {
        if p.epoch == self.module.epoch() {
            lock(&self.idle).push(p);
        }
    }

    /// One attempt: a session from the pool, the operation, and the session-level cleanup
    /// its failure calls for.
    fn attempt<T>(
        &self,
        ctx: &Pkcs11,
        epoch: u64,
        f: &mut dyn FnMut(&Op<'_>) -> Result<T, Fail>,
    ) -> Result<T, Fail> {
        let slot = self.slot(ctx, epoch)?;
        let p = self.checkout(ctx, slot, epoch)?;
        let r = f(&Op {
            ctx,
            slot,
            session: &p.session,
            epoch,
            handles_epoch: self.handles_epoch.load(Ordering::SeqCst),
        });
        match &r {
            Ok(_) => self.checkin(p),
            Err(fail) => match recovery(fail) {
                Recovery::None => self.checkin(p),
                Recovery::Login => {
                    self.stats.relogins.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(token = %self.token_label, "PKCS#11 token logged out; logging in again");
                    let relogin = self.login(&p.session);
                    self.checkin(p);
                    relogin?;
                }
                Recovery::Handles => {
                    self.stats.keys_refound.fetch_add(1, Ordering::Relaxed);
                    self.handles_epoch.fetch_add(1, Ordering::SeqCst);
                    // A logged-out token also hides (and invalidates) private key handles.
                    let relogin = match logged_in(&p.session) {
                        Ok(false) => {
                            self.stats.relogins.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(token = %self.token_label, "PKCS#11 token logged out; logging in again");
                            self.login(&p.session)
                        }
                        _ => Ok(()),
                    };
                    self.checkin(p);
                    relogin?;
                }
                Recovery::Session => {
                    self.stats.sessions_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(token = %self.token_label, "PKCS#11 session closed under the pool; opening new ones");
                    self.module.invalidate(epoch);
                    drop(p);
                }
                Recovery::Module => drop(p),
            },
        }
        r
    }

    /// Runs `f` on a logged-in session, recovering and retrying as the module docs say.
    /// Blocking.
    fn run<T>(&self, what: &str, mut f: impl FnMut(&Op<'_>) -> Result<T, Fail>) -> Result<T> {
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS {
            let epoch = self.module.epoch();
            let result = {
                let st = self.module.read();
                self.attempt(&st.ctx, epoch, &mut f)
            };
            let fail = match result {
                Ok(v) => return Ok(v),
                Err(fail) => fail,
            };
            match recovery(&fail) {
                Recovery::None => return Err(self.error(what, fail)),
                Recovery::Login | Recovery::Session | Recovery::Handles => {}
                Recovery::Module => {
                    // Not initialized: nothing to disturb, restart whatever the rate limit.
                    let force = matches!(
                        fail,
                        Fail::Ck(CkError::Pkcs11(RvError::CryptokiNotInitialized, _))
                    );
                    match self.module.restart(epoch, force, &self.describe(&fail)) {
                        Ok(true) => {}
                        Ok(false) => return Err(self.error(what, fail)),
                        Err(e) => return Err(self.error(what, Fail::Ck(e))),
                    }
                }
            }
            last = Some(fail);
        }
        Err(self.error(what, last.unwrap_or(Fail::BadSignature)))
    }

    /// [`Inner::run`] on a blocking thread, within the session limit.
    async fn call<T: Send + 'static>(
        self: &Arc<Self>,
        what: &'static str,
        mut f: impl FnMut(&Inner, &Op<'_>) -> Result<T, Fail> + Send + 'static,
    ) -> Result<T> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Unavailable("PKCS#11 session pool closed".into()))?;
        let inner = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            inner.run(what, |op| f(&inner, op))
        })
        .await
        .map_err(|e| Error::Backend(format!("{what}: PKCS#11 worker failed: {e}")))?
    }

    fn describe(&self, fail: &Fail) -> String {
        match fail {
            Fail::Ck(CkError::Pkcs11(rv, func)) => format!("{func}: {rv:?}"),
            Fail::Ck(e) => e.to_string(),
            Fail::NotLoggedIn => "not logged in".into(),
            Fail::TokenMissing(labels) => format!(
                "no token labelled '{}'; {}",
                self.token_label,
                describe_labels(labels)
            ),
            Fail::BadSignature => "signature does not verify".into(),
            Fail::Kms(e) => e.to_string(),
        }
    }

    fn error(&self, what: &str, fail: Fail) -> Error {
        let token = &self.token_label;
        match fail {
            Fail::Kms(e) => e,
            Fail::NotLoggedIn => Error::PermissionDenied(format!(
                "{what}: token '{token}' does not keep the user logged in"
            )),
            Fail::TokenMissing(labels) => Error::Unavailable(format!(
                "{what}: no token labelled '{token}' in PKCS#11 module {}; {}",
                self.module.path.display(),
                describe_labels(&labels)
            )),
            Fail::BadSignature => Error::Backend(format!(
                "{what}: the signature made by token '{token}' does not verify against the key's public key"
            )),
            Fail::Ck(CkError::Pkcs11(rv, func)) => match rv {
                RvError::PinIncorrect => {
                    Error::PermissionDenied(format!("PIN incorrect for token '{token}'"))
                }
                RvError::PinLocked => Error::PermissionDenied(format!(
                    "PIN locked for token '{token}' (too many wrong PINs; its security officer must unlock it)"
                )),
                RvError::PinExpired | RvError::PinInvalid | RvError::PinLenRange => {
                    Error::PermissionDenied(format!("PIN refused by token '{token}': {rv:?}"))
                }
                RvError::UserPinNotInitialized => Error::Config(format!(
                    "token '{token}' has no user PIN yet (its security officer must set one)"
                )),
                RvError::UserNotLoggedIn | RvError::UserAnotherAlreadyLoggedIn => {
                    Error::PermissionDenied(format!("{what}: token '{token}': {rv:?}"))
                }
                RvError::MechanismInvalid
                | RvError::MechanismParamInvalid
                | RvError::CurveNotSupported
                | RvError::KeySizeRange
                | RvError::DomainParamsInvalid
                | RvError::FunctionNotSupported
                | RvError::AttributeValueInvalid
                | RvError::TemplateInconsistent => Error::Unsupported {
                    backend: BACKEND,
                    what: format!("{what} on token '{token}': {func}: {rv:?}"),
                },
                RvError::CryptokiNotInitialized
                | RvError::DeviceError
                | RvError::DeviceRemoved
                | RvError::DeviceMemory
                | RvError::HostMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SlotIdInvalid
                | RvError::GeneralError
                | RvError::SessionCount
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::FunctionFailed => Error::Unavailable(format!(
                    "{what}: token '{token}' unavailable: {func}: {rv:?}"
                )),
                _ => Error::Backend(format!("{what} on token '{token}': {func}: {rv:?}")),
            },
            Fail::Ck(CkError::LibraryLoading(e)) => Error::Config(format!(
                "PKCS#11 module {}: {e}",
                self.module.path.display()
            )),
            Fail::Ck(e) => Error::Backend(format!("{what} on token '{token}': {e}")),
        }
    }
}

fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Slot, Fail> {
    let mut found = Vec::new();
    let mut labels = Vec::new();
    for slot in ctx.get_slots_with_token()? {
        let info = match ctx.get_token_info(slot) {
            Ok(i) => i,
            Err(CkError::Pkcs11(
                RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SlotIdInvalid
                | RvError::DeviceRemoved,
                _,
            )) => continue,
            Err(e) => return Err(e.into()),
        };
        if !info.token_initialized() {
            continue;
        }
        if info.label() == label {
            found.push(slot);
        }
        labels.push(info.label().to_string());
    }
    match found.as_slice() {
        [s] => Ok(*s),
        [] => Err(Fail::TokenMissing(labels)),
        many => Err(Fail::Kms(Error::Config(format!(
            "{} tokens are labelled '{label}' (slots {}); token labels must be unique",
            many.len(),
            many.iter()
                .map(|s| s.id().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )))),
    }
}

fn logged_in(s: &Session) -> Result<bool, Fail> {
    Ok(matches!(
        s.get_session_info()?.session_state(),
        SessionState::RoUser | SessionState::RwUser
    ))
}

fn find_labelled(
    s: &Session,
    class: Option<ObjectClass>,
    label: &str,
) -> Result<Vec<ObjectHandle>, Fail> {
    let mut template = vec![Attribute::Label(label.as_bytes().to_vec())];
    if let Some(c) = class {
        template.push(Attribute::Class(c));
    }
    Ok(s.find_objects(&template)?)
}

/// Whether a search found nothing because there is nothing: `NotLoggedIn` when the session
/// cannot see private objects, the token's error when it is failing (SoftHSM2 shows a token
/// whose storage went away as empty, and fails `C_GetTokenInfo` with `CKR_GENERAL_ERROR`).
fn really_absent(op: &Op<'_>) -> Result<(), Fail> {
    if !logged_in(op.session)? {
        return Err(Fail::NotLoggedIn);
    }
    op.ctx.get_token_info(op.slot)?;
    Ok(())
}

/// The private key labelled `label`.
fn find_private(op: &Op<'_>, name: &str, label: &str) -> Result<ObjectHandle, Fail> {
    match find_labelled(op.session, Some(ObjectClass::PRIVATE_KEY), label)?.as_slice() {
        [h] => Ok(*h),
        [] => {
            really_absent(op)?;
            Err(Fail::Kms(Error::NotFound(name.to_owned())))
        }
        many => Err(Fail::Kms(Error::Backend(format!(
            "{} private keys are labelled {label:?}; labels must be unique",
            many.len()
        )))),
    }
}

// ---------------------------------------------------------------------------------------
// Keys

/// How a signature is checked before it is returned.
#[derive(Clone, Debug)]
enum Verifier {
    Ec {
        alg: &'static rsig::EcdsaVerificationAlgorithm,
        point: Vec<u8>,
    },
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
}

impl Verifier {
    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match self {
            Verifier::Ec { alg, point } => rsig::UnparsedPublicKey::new(*alg, point)
                .verify(msg, sig)
                .is_ok(),
            Verifier::Rsa { n, e } => rsig::RsaPublicKeyComponents { n, e }
                .verify(&rsig::RSA_PKCS1_2048_8192_SHA256, msg, sig)
                .is_ok(),
        }
    }
}

/// A public key read from the token.
struct PublicKey {
    alg: KeyAlgorithm,
    spki: Vec<u8>,
    verifier: Verifier,
}

fn read_public(s: &Session, name: &str, h: ObjectHandle) -> Result<PublicKey, Fail> {
    let attrs = s.get_attributes(
        h,
        &[
            AttributeType::KeyType,
            AttributeType::EcParams,
            AttributeType::EcPoint,
            AttributeType::Modulus,
            AttributeType::PublicExponent,
        ],
    )?;
    let (mut kt, mut params, mut point, mut n, mut e) = (None, None, None, None, None);
    for a in attrs {
        match a {
            Attribute::KeyType(t) => kt = Some(t),
            Attribute::EcParams(v) => params = Some(v),
            Attribute::EcPoint(v) => point = Some(v),
            Attribute::Modulus(v) => n = Some(v),
            Attribute::PublicExponent(v) => e = Some(v),
            _ => {}
        }
    }
    let unsupported = |what: String| {
        Fail::Kms(Error::Unsupported {
            backend: BACKEND,
            what: format!("key {name:?}: {what}"),
        })
    };
    match kt {
        Some(t) if t == KeyType::EC => {
            let params =
                params.ok_or_else(|| unsupported("EC key without CKA_EC_PARAMS".into()))?;
            let (alg, oid, field, valg) = if params == OID_P256 {
                (
                    KeyAlgorithm::EcP256,
                    OID_P256,
                    32,
                    &rsig::ECDSA_P256_SHA256_ASN1,
                )
            } else if params == OID_P384 {
                (
                    KeyAlgorithm::EcP384,
                    OID_P384,
                    48,
                    &rsig::ECDSA_P384_SHA384_ASN1,
                )
            } else {
                return Err(unsupported(format!(
                    "EC curve {} (only P-256 and P-384)",
                    hex::encode(&params)
                )));
            };
            let raw = point.ok_or_else(|| unsupported("EC key without CKA_EC_POINT".into()))?;
            let point = ec_point_from_attribute(&raw, field).map_err(Fail::Kms)?;
            Ok(PublicKey {
                alg,
                spki: ec_spki(oid, &point),
                verifier: Verifier::Ec { alg: valg, point },
            })
        }
        Some(t) if t == KeyType::RSA => {
            let (n, e) = match (n, e) {
                (Some(n), Some(e)) => (strip_zeros(&n).to_vec(), strip_zeros(&e).to_vec()),
                _ => return Err(unsupported("RSA key without modulus or exponent".into())),
            };
            let alg = match n.len() * 8 {
                2048 => KeyAlgorithm::Rsa2048,
                3072 => KeyAlgorithm::Rsa3072,
                bits => return Err(unsupported(format!("RSA-{bits} (only 2048 and 3072)"))),
            };
            Ok(PublicKey {
                alg,
                spki: rsa_spki(&n, &e),
                verifier: Verifier::Rsa { n, e },
            })
        }
        other => Err(unsupported(format!("key type {other:?}"))),
    }
}

fn key_templates(
    alg: KeyAlgorithm,
    label: &str,
    id: &[u8],
) -> (Mechanism<'static>, Vec<Attribute>, Vec<Attribute>) {
    let common = |class: ObjectClass, private: bool| {
        vec![
            Attribute::Class(class),
            Attribute::Token(true),
            Attribute::Private(private),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ]
    };
    let mut public = common(ObjectClass::PUBLIC_KEY, false);
    public.push(Attribute::Verify(true));
    let mut private = common(ObjectClass::PRIVATE_KEY, true);
    private.extend([
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
    ]);
    match alg {
        KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 => {
            let oid = if alg == KeyAlgorithm::EcP256 {
                OID_P256
            } else {
                OID_P384
            };
            public.extend([
                Attribute::KeyType(KeyType::EC),
                Attribute::EcParams(oid.to_vec()),
            ]);
            private.extend([Attribute::KeyType(KeyType::EC), Attribute::Derive(false)]);
            (Mechanism::EccKeyPairGen, public, private)
        }
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => {
            let bits: u64 = if alg == KeyAlgorithm::Rsa2048 {
                2048
            } else {
                3072
            };
            public.extend([
                Attribute::KeyType(KeyType::RSA),
                Attribute::ModulusBits(bits.into()),
                Attribute::PublicExponent(RSA_PUBLIC_EXPONENT.to_vec()),
                Attribute::Encrypt(false),
            ]);
            private.extend([Attribute::KeyType(KeyType::RSA), Attribute::Decrypt(false)]);
            (Mechanism::RsaPkcsKeyPairGen, public, private)
        }
    }
}

/// A key in a PKCS#11 token.
#[derive(Debug)]
pub struct Pkcs11Key {
    name: String,
    label: String,
    alg: KeyAlgorithm,
    spki: Vec<u8>,
    verifier: Verifier,
    inner: Arc<Inner>,
    /// The private key's handle and the (module epoch, handles epoch) it is valid in.
    handle: Arc<Mutex<Option<(u64, u64, ObjectHandle)>>>,
}

impl Pkcs11Key {
    fn new(
        inner: &Arc<Inner>,
        name: &str,
        public: PublicKey,
        handle: Option<(u64, u64, ObjectHandle)>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            label: inner.label(name),
            alg: public.alg,
            spki: public.spki,
            verifier: public.verifier,
            inner: inner.clone(),
            handle: Arc::new(Mutex::new(handle)),
        }
    }
}

#[async_trait]
impl SigningKey for Pkcs11Key {
    fn name(&self) -> &str {
        &self.name
    }

    fn algorithm(&self) -> KeyAlgorithm {
        self.alg
    }

    fn public_key_spki(&self) -> &[u8] {
        &self.spki
    }

    async fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        let alg = self.alg;
        let rsa = matches!(alg, KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072);
        let input = match alg {
            KeyAlgorithm::EcP256 => sha2::Sha256::digest(msg).to_vec(),
            KeyAlgorithm::EcP384 => sha2::Sha384::digest(msg).to_vec(),
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => {
                let mut v = SHA256_DIGEST_INFO_PREFIX.to_vec();
                v.extend_from_slice(&sha2::Sha256::digest(msg));
                v
            }
        };
        let msg = msg.to_vec();
        let name = self.name.clone();
        let label = self.label.clone();
        let verifier = self.verifier.clone();
        let cache = self.handle.clone();
        self.inner
            .call("sign", move |_, op| {
                let cached = *lock(&cache);
                let h = match cached {
                    Some((e, he, h)) if e == op.epoch && he == op.handles_epoch => h,
                    _ => {
                        let h = find_private(op, &name, &label)?;
                        *lock(&cache) = Some((op.epoch, op.handles_epoch, h));
                        h
                    }
                };
                let mechanism = if rsa {
                    Mechanism::RsaPkcs
                } else {
                    Mechanism::Ecdsa
                };
                let sig = match op.session.sign(&mechanism, h, &input) {
                    // A token without raw RSA: let it hash.
                    Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) if rsa => {
                        op.session.sign(&Mechanism::Sha256RsaPkcs, h, &msg)?
                    }
                    r => r?,
                };
                let sig = match alg {
                    KeyAlgorithm::EcP256 => ecdsa_raw_to_der(&sig, 32).map_err(Fail::Kms)?,
                    KeyAlgorithm::EcP384 => ecdsa_raw_to_der(&sig, 48).map_err(Fail::Kms)?,
                    _ => sig,
                };
                if !verifier.verify(&msg, &sig) {
                    return Err(Fail::BadSignature);
                }
                Ok(sig)
            })
            .await
    }
}

#[async_trait]
impl KeyManager for Pkcs11KeyManager {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn is_production_grade(&self) -> bool {
        true
    }

    async fn generate(&self, name: &str, alg: KeyAlgorithm) -> Result<Arc<dyn SigningKey>> {
        validate_key_name(name)?;
        let _writes = self.inner.writes.lock().await;
        let label = self.inner.label(name);
        let id: [u8; 16] = rand::random();
        let key_name = name.to_owned();
        let (public, handle) = self
            .inner
            .call("generate key", move |_, op| {
                if !logged_in(op.session)? {
                    return Err(Fail::NotLoggedIn);
                }
                if !find_labelled(op.session, None, &label)?.is_empty() {
                    return Err(Fail::Kms(Error::AlreadyExists(key_name.clone())));
                }
                let (mechanism, public, private) = key_templates(alg, &label, &id);
                let (pub_h, priv_h) = op
                    .session
                    .generate_key_pair(&mechanism, &public, &private)?;
                let public = read_public(op.session, &key_name, pub_h)?;
                Ok((public, (op.epoch, op.handles_epoch, priv_h)))
            })
            .await?;
        tracing::info!(key = name, algorithm = %alg, token = %self.inner.token_label, "generated key in PKCS#11 token");
        Ok(Arc::new(Pkcs11Key::new(
            &self.inner,
            name,
            public,
            Some(handle),
        )))
    }

    async fn get(&self, name: &str) -> Result<Arc<dyn SigningKey>> {
        validate_key_name(name)?;
        let label = self.inner.label(name);
        let key_name = name.to_owned();
        let (public, handle) = self
            .inner
            .call("find key", move |_, op| {
                let private = find_private(op, &key_name, &label)?;
                let pubs = find_labelled(op.session, Some(ObjectClass::PUBLIC_KEY), &label)?;
                let [public] = pubs.as_slice() else {
                    return Err(Fail::Kms(Error::Backend(format!(
                        "key {key_name:?}: {} public keys labelled {label:?} next to its private key (expected one)",
                        pubs.len()
                    ))));
                };
                let public = read_public(op.session, &key_name, *public)?;
                Ok((public, (op.epoch, op.handles_epoch, private)))
            })
            .await?;
        Ok(Arc::new(Pkcs11Key::new(
            &self.inner,
            name,
            public,
            Some(handle),
        )))
    }

    async fn delete(&self, name: &str) -> Result<()> {
        validate_key_name(name)?;
        let _writes = self.inner.writes.lock().await;
        let label = self.inner.label(name);
        let key_name = name.to_owned();
        self.inner
            .call("delete key", move |_, op| {
                if !logged_in(op.session)? {
                    return Err(Fail::NotLoggedIn);
                }
                let objects = find_labelled(op.session, None, &label)?;
                if objects.is_empty() {
                    really_absent(op)?;
                    return Err(Fail::Kms(Error::NotFound(key_name.clone())));
                }
                for h in objects {
                    op.session.destroy_object(h)?;
                }
                Ok(())
            })
            .await?;
        self.inner.handles_epoch.fetch_add(1, Ordering::SeqCst);
        tracing::info!(key = name, token = %self.inner.token_label, "deleted key from PKCS#11 token");
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>> {
        let prefix = self.inner.prefix.clone();
        self.inner
            .call("list keys", move |_, op| {
                really_absent(op)?;
                let mut names = Vec::new();
                let keys = op.session.find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Token(true),
                ])?;
                for h in keys {
                    for a in op.session.get_attributes(h, &[AttributeType::Label])? {
                        if let Attribute::Label(l) = a {
                            if let Some(n) = std::str::from_utf8(&l)
                                .ok()
                                .and_then(|l| l.strip_prefix(prefix.as_str()))
                            {
                                if validate_key_name(n).is_ok() {
                                    names.push(n.to_owned());
                                }
                            }
                        }
                    }
                }
                names.sort();
                names.dedup();
                Ok(names)
            })
            .await
    }

    async fn protection(&self, name: &str) -> Result<KeyProtection> {
        validate_key_name(name)?;
        let label = self.inner.label(name);
        let key_name = name.to_owned();
        let token = self.inner.token_label.clone();
        self.inner
            .call("read key attributes", move |_, op| {
                let h = find_private(op, &key_name, &label)?;
                let attrs = op.session.get_attributes(
                    h,
                    &[
                        AttributeType::Extractable,
                        AttributeType::Sensitive,
                        AttributeType::NeverExtractable,
                        AttributeType::AlwaysSensitive,
                        AttributeType::Token,
                        AttributeType::Private,
                    ],
                )?;
                let (mut extractable, mut sensitive) = (None, None);
                let mut detail = format!("token '{token}', private key {label:?}:");
                let mut show = |n: &str, v: Option<bool>| {
                    detail.push_str(&format!(
                        " {n}={}",
                        v.map_or("unavailable".to_string(), |b| b.to_string())
                    ));
                };
                let (mut never, mut always, mut tok, mut private) = (None, None, None, None);
                for a in attrs {
                    match a {
                        Attribute::Extractable(b) => extractable = Some(b),
                        Attribute::Sensitive(b) => sensitive = Some(b),
                        Attribute::NeverExtractable(b) => never = Some(b),
                        Attribute::AlwaysSensitive(b) => always = Some(b),
                        Attribute::Token(b) => tok = Some(b),
                        Attribute::Private(b) => private = Some(b),
                        _ => {}
                    }
                }
                show("CKA_EXTRACTABLE", extractable);
                show("CKA_SENSITIVE", sensitive);
                show("CKA_NEVER_EXTRACTABLE", never);
                show("CKA_ALWAYS_SENSITIVE", always);
                show("CKA_TOKEN", tok);
                show("CKA_PRIVATE", private);
                // Unknown counts as extractable; so does a key that is not sensitive (its
                // value can be read in the clear even if it cannot be wrapped).
                let extractable = extractable.unwrap_or(true) || !sensitive.unwrap_or(false);
                Ok(KeyProtection {
                    extractable,
                    detail,
                })
            })
            .await
    }
}

// ---------------------------------------------------------------------------------------
// DER

fn der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    der_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let skip = b.iter().take_while(|x| **x == 0).count();
    &b[skip.min(b.len().saturating_sub(1))..]
}

/// A DER INTEGER of the unsigned big-endian `b`.
fn der_uint(b: &[u8]) -> Vec<u8> {
    let b = strip_zeros(b);
    let mut content = Vec::with_capacity(b.len() + 1);
    if b.first().is_none_or(|x| x & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(b);
    der_tlv(0x02, &content)
}

fn ec_spki(curve_oid: &[u8], point: &[u8]) -> Vec<u8> {
    let alg = der_tlv(0x30, &[OID_EC_PUBLIC_KEY, curve_oid].concat());
    let mut bits = vec![0u8];
    bits.extend_from_slice(point);
    der_tlv(0x30, &[alg, der_tlv(0x03, &bits)].concat())
}

fn rsa_spki(n: &[u8], e: &[u8]) -> Vec<u8> {
    let rsa_key = der_tlv(0x30, &[der_uint(n), der_uint(e)].concat());
    let mut bits = vec![0u8];
    bits.extend_from_slice(&rsa_key);
    der_tlv(
        0x30,
        &[ALG_RSA_ENCRYPTION.to_vec(), der_tlv(0x03, &bits)].concat(),
    )
}

/// The uncompressed point from `CKA_EC_POINT`: a DER OCTET STRING around it (as the
/// standard says), or, as some tokens return it, the bare point.
fn ec_point_from_attribute(v: &[u8], field_len: usize) -> Result<Vec<u8>> {
    let point_len = 1 + 2 * field_len;
    if v.len() == point_len && v[0] == 0x04 {
        return Ok(v.to_vec());
    }
    let bad = || {
        Error::Backend(format!(
            "CKA_EC_POINT is not an uncompressed point: {}",
            hex::encode(v)
        ))
    };
    if v.first() != Some(&0x04) || v.len() < 2 {
        return Err(bad());
    }
    let (len, start) = match v[1] {
        l if l < 0x80 => (l as usize, 2),
        0x81 if v.len() > 2 => (v[2] as usize, 3),
        _ => return Err(bad()),
    };
    let content = &v[start..];
    if len != content.len() || len != point_len || content[0] != 0x04 {
        return Err(bad());
    }
    Ok(content.to_vec())
}

/// ECDSA `r || s` (each `field_len` bytes, as `CKM_ECDSA` returns it) to DER
/// `SEQUENCE { r INTEGER, s INTEGER }`.
fn ecdsa_raw_to_der(raw: &[u8], field_len: usize) -> Result<Vec<u8>> {
    if raw.len() != 2 * field_len {
        return Err(Error::Backend(format!(
            "CKM_ECDSA returned {} bytes, expected {}",
            raw.len(),
            2 * field_len
        )));
    }
    let (r, s) = raw.split_at(field_len);
    Ok(der_tlv(0x30, &[der_uint(r), der_uint(s)].concat()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_integers_are_minimal_and_positive() {
        assert_eq!(der_uint(&[0, 0, 1]), vec![2, 1, 1]);
        assert_eq!(der_uint(&[0x80]), vec![2, 2, 0, 0x80]);
        assert_eq!(der_uint(&[0, 0x7f]), vec![2, 1, 0x7f]);
        assert_eq!(der_uint(&[0, 0]), vec![2, 1, 0]);
    }

    #[test]
    fn ecdsa_signature_is_reencoded() {
        let mut raw = vec![0u8; 64];
        raw[31] = 5;
        raw[32] = 0xff;
        let der = ecdsa_raw_to_der(&raw, 32).unwrap();
        assert_eq!(&der[..7], &[0x30, 0x26, 0x02, 0x01, 0x05, 0x02, 0x21]);
        assert_eq!(der.len(), 0x28);
        assert!(ecdsa_raw_to_der(&raw[..63], 32).is_err());
    }

    #[test]
    fn ec_point_accepts_wrapped_and_bare() {
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let wrapped = der_tlv(0x04, &point);
        assert_eq!(ec_point_from_attribute(&wrapped, 32).unwrap(), point);
        assert_eq!(ec_point_from_attribute(&point, 32).unwrap(), point);
        let mut p384 = vec![0x04];
        p384.extend([9u8; 96]);
        assert_eq!(
            ec_point_from_attribute(&der_tlv(0x04, &p384), 48).unwrap(),
            p384
        );
        assert!(ec_point_from_attribute(&wrapped, 48).is_err());
        assert!(ec_point_from_attribute(&[0x04, 0x01, 0x02], 32).is_err());
    }

    #[test]
    fn long_lengths() {
        let mut out = Vec::new();
        der_len(&mut out, 300);
        assert_eq!(out, vec![0x82, 0x01, 0x2c]);
        let mut out = Vec::new();
        der_len(&mut out, 0x90);
        assert_eq!(out, vec![0x81, 0x90]);
    }
}
