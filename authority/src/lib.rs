//! The certificate authority of a node: its authorities' lifecycle, decided by a pure
//! schedule and carried out through the CA journal; key handling; certificate building;
//! minting; bundles.
//!
//! - [`schedule`]: what to prepare, activate and retire next (pure; table-tested).
//! - [`engine`]: [`Ca`], which asks the schedule, carries its steps out through the
//!   [`Journal`] (the node implements it over Raft), keeps the signers of the active
//!   authorities, mints X.509-SVIDs and JWT-SVIDs and builds the bundles.
//! - [`keys`]: the key managers of the three roles, every signature metered and each
//!   role's health tracked ([`keys::KeyEvents`] is where they report).
//! - [`x509`]: certificates built by rcgen and signed by an async key (an HSM or KMS
//!   signature never blocks a thread).
//!
//! # The schedule
//!
//! Every node keeps an active root (one for the cluster), an active intermediate and an
//! active JWT signing key (one each per node), and replaces each before it runs out: the
//! successor is *prepared* at [`Rotation::prepare_fraction`] of the current one's lifetime
//! and *activated* (the current one retired) at [`Rotation::activate_fraction`]; on an
//! operator's request ([`ca_state::RotationRequest`]) at once, after a propagation window
//! for what relying parties must fetch first (roots and JWT keys, which are published in
//! the trust bundle; intermediates are not, SVID chains carry them). A revoked or expired
//! authority is replaced at once.
//!
//! [`schedule::next_step`] is that rule as a pure function: the CA journal, the rotation
//! requests, the time and a few facts only the caller can know (whether a key is at hand)
//! go in; a [`schedule::Plan`] comes out: which authority signs meanwhile and the one
//! [`schedule::Step`] to take (make a successor, activate one, retire others). The node's
//! CA engine carries the step out through the replicated log and calls again; every rule
//! of the schedule is covered by table tests here, without a clock or a key manager.
//!
//! ```
//! use ca_authority::schedule::{candidates, next_step, Policy, Rotation, Step, Usable};
//! use ca_state::{AuthorityKind, AuthorityRecord, AuthorityState};
//! let jwt = AuthorityRecord {
//!     id: "jwt-1".into(),
//!     kind: AuthorityKind::Jwt,
//!     state: AuthorityState::Active,
//!     node_id: "ca-1".into(),
//!     key_backend: "soft".into(),
//!     key_id: "k1".into(),
//!     cert_der: vec![],
//!     public_key: vec![],
//!     not_before: 0,
//!     not_after: 1200,
//!     key_destroyed: false,
//! };
//! let policy = Policy { node_id: "ca-1".into(), rotation: Rotation::default(), ttl: 1200, leader: false };
//! let auths = [jwt];
//! // Half-way through its life, its successor is prepared (and published).
//! let plan = next_step(AuthorityKind::Jwt, &auths, &[], 600, &policy, Usable::ALL);
//! assert_eq!(plan.current.as_deref(), Some("jwt-1"));
//! assert!(matches!(plan.step, Some(Step::Prepare { .. })));
//! # let _ = candidates;
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod engine;
mod error;
pub mod journal;
pub mod keys;
pub mod schedule;
pub mod x509;

pub use engine::{Ca, CaSettings, Checked, IntermediateMode, Signer, Tainted};
pub use error::{Error, Result};
pub use journal::Journal;
pub use schedule::{Plan, Policy, Rotation, Step};

/// CA certificates start this many seconds in the past, for clocks slightly behind.
pub const BACKDATE: i64 = 60;

/// When `a` was made (the backdating of CA certificates is not counted as lifetime).
pub fn issued_at(a: &ca_state::AuthorityRecord) -> i64 {
    if a.cert_der.is_empty() {
        a.not_before
    } else {
        a.not_before + BACKDATE
    }
}

/// The fraction of its lifetime `a` has used at `t`.
pub fn age_fraction(a: &ca_state::AuthorityRecord, t: i64) -> f64 {
    let start = issued_at(a);
    let life = a.not_after - start;
    if life <= 0 {
        return 1.0;
    }
    (t - start) as f64 / life as f64
}
