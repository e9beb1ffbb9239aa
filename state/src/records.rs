//! The records the state machine stores.

use serde::{Deserialize, Serialize};

/// A selector as stored (`kind`, `value`), e.g. (`unix`, `uid:1001`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SelectorRecord {
    /// Selector type.
    pub kind: String,
    /// Selector value.
    pub value: String,
}

/// A registration entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    /// Unique ID (UUID).
    pub id: String,
    /// The SPIFFE ID workloads matching it get.
    pub spiffe_id: String,
    /// The agent (or entry) SPIFFE ID it is nested under.
    pub parent_id: String,
    /// Selectors, sorted.
    pub selectors: Vec<SelectorRecord>,
    /// X.509-SVID TTL in seconds, 0 for the default.
    pub x509_svid_ttl: i64,
    /// JWT-SVID TTL in seconds, 0 for the default.
    pub jwt_svid_ttl: i64,
    /// DNS SANs for its X.509-SVIDs.
    pub dns_names: Vec<String>,
    /// Whether workloads with it may use the admin API (reserved).
    pub admin: bool,
    /// Operator hint passed to workloads.
    pub hint: String,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Bumped on every update.
    pub revision: i64,
}

/// An attested agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// `join_token` or `x509pop`.
    pub attestation_type: String,
    /// Serial (hex) of its current agent SVID.
    pub x509_svid_serial: String,
    /// Expiry of its current agent SVID, Unix seconds.
    pub x509_svid_expires_at: i64,
    /// Serial of the SVID it renewed last, still accepted until that SVID expires: an
    /// agent's open connections use it for a moment after a renewal. Empty after
    /// (re-)attestation, so a replaced host's certificate stops working at once.
    #[serde(default)]
    pub previous_x509_svid_serial: String,
    /// Banned agents can neither call the node API nor re-attest.
    pub banned: bool,
    /// When it attested, Unix seconds.
    pub attested_at: i64,
    /// Node selectors from attestation.
    pub selectors: Vec<SelectorRecord>,
}

/// A join token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// The secret.
    pub token: String,
    /// The SPIFFE ID the agent gets.
    pub spiffe_id: String,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// When it was used, if it was.
    pub used_at: Option<i64>,
}

/// What an authority is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorityKind {
    /// A root of the trust bundle.
    Root,
    /// A node's intermediate, signed by a root, signing SVIDs.
    Intermediate,
    /// A JWT-SVID signing key.
    Jwt,
}

/// Where an authority is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorityState {
    /// Created and published, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// No longer signing; still published while what it signed is valid.
    Retired,
    /// Must not be used or trusted.
    Revoked,
}

macro_rules! str_enum {
    ($t:ty { $($v:ident => $s:literal),* }) => {
        impl $t {
            /// The stored name.
            pub fn as_str(self) -> &'static str { match self { $(Self::$v => $s),* } }
            /// Parses the stored name.
            pub fn parse(s: &str) -> Option<Self> { match s { $($s => Some(Self::$v),)* _ => None } }
        }
    };
}
str_enum!(AuthorityKind { Root => "root", Intermediate => "intermediate", Jwt => "jwt" });
str_enum!(AuthorityState { Prepared => "prepared", Active => "active", Retired => "retired", Revoked => "revoked" });

/// An entry of the CA journal: a root, an intermediate or a JWT key, and its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityRecord {
    /// Unique ID.
    pub id: String,
    /// What it is.
    pub kind: AuthorityKind,
    /// Its state.
    pub state: AuthorityState,
    /// The node it belongs to (intermediates, JWT keys); empty for roots.
    pub node_id: String,
    /// Key-manager backend holding the key (`soft`, `memory`, `pkcs11`, `aws_kms`).
    pub key_backend: String,
    /// The key's name in that backend.
    pub key_id: String,
    /// Certificate DER (roots, intermediates); empty for JWT keys.
    pub cert_der: Vec<u8>,
    /// Public key, SPKI DER.
    pub public_key: Vec<u8>,
    /// Validity start, Unix seconds.
    pub not_before: i64,
    /// Validity end, Unix seconds.
    pub not_after: i64,
    /// Whether its private key has been destroyed (or scheduled for deletion) in the key
    /// manager, once nothing it signed could still be valid.
    #[serde(default)]
    pub key_destroyed: bool,
}

/// An operator's request that a node replace its authority of one kind (or, for roots,
/// that the cluster replace its root) now rather than on schedule. The node it names acts
/// on it when it sees it in the log: at once, or when it is back if it was down. Fulfilled
/// once `replaces` is no longer active (comparing IDs, not clocks of different nodes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationRequest {
    /// What to rotate.
    pub kind: AuthorityKind,
    /// The node whose authority to rotate; empty for the root.
    pub node_id: String,
    /// When it was requested, Unix seconds (for people).
    pub requested_at: i64,
    /// The authority that was active when it was requested.
    pub replaces: String,
}
