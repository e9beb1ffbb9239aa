//! Identity primitives shared by `ca-node` and `agent`.
//!
//! - [`spiffe_id`]: the one strict SPIFFE ID parser ([`SpiffeId`], [`TrustDomain`]).
//! - [`selector`]: workload selectors and entry matching.
//! - [`pubkey`]: what kind of public key a SubjectPublicKeyInfo holds, signature verification.
//! - [`x509`]: reading SPIFFE IDs out of certificates and checking X509-SVID rules.
//! - [`jwt`]: building and validating JWT-SVIDs.
//! - [`bundle`]: trust bundles as PEM, DER and SPIFFE bundle (JWKS) documents.
//! - [`tls`]: rustls verifiers that authenticate peers by SPIFFE ID against a live bundle.
//! - [`serve`]: connection limits and accept back-off for servers facing untrusted callers.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bundle;
#[cfg(test)]
mod fuzz;
pub mod http_probe;
pub mod jwt;
pub mod logging;
pub mod private_file;
pub mod pubkey;
pub mod rate_limit;
pub mod selector;
pub mod serve;
pub mod spiffe_id;
pub mod spire_flags;
pub mod systemd;
pub mod tls;
pub mod unix_socket;
pub mod x509;

pub use bundle::{JwtAuthority, TrustBundle};
pub use selector::Selector;
pub use spiffe_id::{SpiffeId, TrustDomain};

/// The soft limit on this process's open file descriptors (`RLIMIT_NOFILE`; 1024 if it
/// cannot be read).
pub fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// At most `wanted` connections, and never so many that the process would run out of file
/// descriptors: `headroom` below the soft `RLIMIT_NOFILE` (`nofile`) is kept for everything
/// else the process opens.
pub fn connection_cap(wanted: usize, nofile: u64, headroom: u64) -> usize {
    let fit = nofile.saturating_sub(headroom).max(16);
    wanted.min(usize::try_from(fit).unwrap_or(usize::MAX))
}

/// Everything that can go wrong in this crate; messages say what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A SPIFFE ID or trust domain that breaks the SPIFFE-ID standard.
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    InvalidSpiffeId {
        /// What was given (truncated).
        input: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// A selector that is malformed or of a type no agent produces.
    #[error("invalid selector {input:?}: {reason}")]
    InvalidSelector {
        /// What was given (truncated).
        input: String,
        /// Why it is refused.
        reason: String,
    },
    /// A certificate that cannot be parsed or breaks the X509-SVID standard.
    #[error("invalid X.509-SVID: {0}")]
    InvalidX509Svid(String),
    /// A JWT-SVID that is malformed, badly signed, expired or for another audience.
    #[error("invalid JWT-SVID: {0}")]
    InvalidJwtSvid(String),
    /// A JWT-SVID audience list that cannot be minted.
    #[error("invalid JWT-SVID audience: {0}")]
    InvalidAudience(String),
    /// A public key of a kind this crate does not handle.
    #[error("unsupported public key: {0}")]
    UnsupportedKey(String),
    /// A bundle document that cannot be used.
    #[error("invalid bundle: {0}")]
    InvalidBundle(String),
}

/// Lets a repeated warning through at most once a second, so that a flood of refused
/// callers (or failing accepts) cannot flood the log too.
#[derive(Debug, Default)]
pub struct LogThrottle(std::sync::atomic::AtomicI64);

impl LogThrottle {
    /// Whether to log now: true at most once per second.
    pub fn ready(&self) -> bool {
        let now = unix_now();
        self.0.swap(now, std::sync::atomic::Ordering::Relaxed) != now
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
