//! Signing keys for the CA: one [`KeyManager`] trait that every root, intermediate and JWT
//! key goes through, and its backends.
//!
//! The trait is shaped for a remote signer (an HSM over PKCS#11, a cloud KMS): it is async,
//! keys are handles found again by name after a restart, the public key is exposed as SPKI
//! DER, and `sign` takes the message (the backend hashes as its algorithm requires) and
//! returns the signature in X.509 form (ECDSA as DER `SEQUENCE { r, s }`).
//!
//! Backends:
//! - [`soft`]: PKCS#8 files on disk. **Development and tests only**: the key material is in
//!   a file, readable by whoever can read the directory.
//! - [`memory`]: keys that exist only in RAM, for short-lived intermediates ("memory mode").
//! - [`pkcs11`]: keys generated and kept inside a PKCS#11 token (an HSM; SoftHSM2 in tests),
//!   found by label, never extractable; a session pool that recovers from closed sessions, a
//!   logged-out token and a restarted module.
//! - [`aws_kms`]: AWS KMS (`SIGN_VERIFY` keys found by alias; production grade).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

pub mod aws_kms;
pub mod memory;
pub mod pkcs11;
pub mod soft;

/// Key algorithms a key manager may be asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    /// ECDSA P-256 with SHA-256.
    EcP256,
    /// ECDSA P-384 with SHA-384.
    EcP384,
    /// RSA 2048 PKCS#1 v1.5 with SHA-256.
    Rsa2048,
    /// RSA 3072 PKCS#1 v1.5 with SHA-256.
    Rsa3072,
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyAlgorithm::EcP256 => "ec-p256",
            KeyAlgorithm::EcP384 => "ec-p384",
            KeyAlgorithm::Rsa2048 => "rsa2048",
            KeyAlgorithm::Rsa3072 => "rsa3072",
        })
    }
}

/// What can go wrong with a key manager. [`Error::Unavailable`] is transient: retry later.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No key by that name.
    #[error("key {0:?} not found in the key manager")]
    NotFound(String),
    /// A key by that name exists already.
    #[error("key {0:?} already exists in the key manager")]
    AlreadyExists(String),
    /// The backend cannot do this (e.g. an algorithm it does not support).
    #[error("not supported by the {backend} key manager: {what}")]
    Unsupported {
        /// Which backend.
        backend: &'static str,
        /// What was asked.
        what: String,
    },
    /// The backend is unreachable or overloaded right now; the operation may succeed later.
    #[error("key manager unavailable: {0}")]
    Unavailable(String),
    /// Credentials, PIN or permissions are wrong.
    #[error("key manager refused access: {0}")]
    PermissionDenied(String),
    /// The backend's configuration is wrong.
    #[error("key manager misconfigured: {0}")]
    Config(String),
    /// Anything else the backend reported.
    #[error("key manager error: {0}")]
    Backend(String),
}

impl Error {
    /// A short label for metrics (`errors by kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "not_found",
            Error::AlreadyExists(_) => "already_exists",
            Error::Unsupported { .. } => "unsupported",
            Error::Unavailable(_) => "unavailable",
            Error::PermissionDenied(_) => "permission_denied",
            Error::Config(_) => "config",
            Error::Backend(_) => "backend",
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A key held by a key manager. Cheap to clone behind an `Arc`; safe to use from many tasks.
#[async_trait]
pub trait SigningKey: Send + Sync + fmt::Debug {
    /// The name the key manager finds it by.
    fn name(&self) -> &str;
    /// Its algorithm.
    fn algorithm(&self) -> KeyAlgorithm;
    /// Its public key as SubjectPublicKeyInfo DER.
    fn public_key_spki(&self) -> &[u8];
    /// Signs `msg` (hashing it as the algorithm requires); X.509 signature form.
    async fn sign(&self, msg: &[u8]) -> Result<Vec<u8>>;
}

/// A store of signing keys whose private halves never leave it.
#[async_trait]
pub trait KeyManager: Send + Sync + fmt::Debug {
    /// The backend's name: `soft`, `memory`, `pkcs11`, `aws_kms`.
    fn backend(&self) -> &'static str;
    /// Whether keys in this backend are protected by hardware or a managed service.
    fn is_production_grade(&self) -> bool;
    /// Generates a new key inside the backend.
    async fn generate(&self, name: &str, alg: KeyAlgorithm) -> Result<Arc<dyn SigningKey>>;
    /// Finds an existing key by name (e.g. after a restart).
    async fn get(&self, name: &str) -> Result<Arc<dyn SigningKey>>;
    /// Destroys a key (or schedules its deletion, where the backend only does that).
    async fn delete(&self, name: &str) -> Result<()>;
    /// Names of the keys this manager holds.
    async fn list(&self) -> Result<Vec<String>>;
    /// How the key called `name` is protected, as the backend itself reports it (token
    /// attributes, the service's key metadata), not as this code assumes.
    async fn protection(&self, name: &str) -> Result<KeyProtection>;
}

/// How a key is protected, as read back from its backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyProtection {
    /// Whether the private key can be read out of the backend.
    pub extractable: bool,
    /// What the backend reported (attribute values, key state), for logs and errors.
    pub detail: String,
}

/// Checks a key name: 1..=128 characters of `[A-Za-z0-9._-]`, so every backend can store it.
pub fn validate_key_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(Error::Config(format!(
            "invalid key name {name:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ -"
        )));
    }
    Ok(())
}
