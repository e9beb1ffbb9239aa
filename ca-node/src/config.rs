//! The node's TOML configuration, validated in full at start.

use std::net::SocketAddr;
use std::path::PathBuf;

use ca_identity::TrustDomain;
use ca_kms::KeyAlgorithm;
use serde::Deserialize;

use crate::Error;

/// Where the admin socket is unless configured otherwise.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/spiffe-ca/admin.sock";

/// At most this many CSRs in one `BatchNewX509Svid` (agents send 100 at a time).
pub const MAX_BATCH_CSRS: usize = 500;

pub use ca_authority::IntermediateMode;

/// Which key manager holds the CA keys.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyManagerConfig {
    /// Software keys in files. Development only.
    Soft {
        /// Key directory; default `<data_dir>/keys`.
        #[serde(default)]
        dir: Option<PathBuf>,
    },
    /// A PKCS#11 token (HSM): module, token label, PIN file or variable, key label prefix.
    Pkcs11(ca_kms::pkcs11::Pkcs11Config),
    /// AWS KMS: region and credentials from the standard chain; aliases under a per-node
    /// prefix (default `spiffe-ca/<trust domain>/<node id>/`), tagged with both.
    AwsKms(ca_kms::aws_kms::AwsKmsConfig),
}

impl KeyManagerConfig {
    /// Checks the backend's own settings (without contacting it).
    pub fn validate(&self, trust_domain: &str, node_id: &str) -> Result<(), Error> {
        match self {
            KeyManagerConfig::Soft { .. } => Ok(()),
            KeyManagerConfig::Pkcs11(c) => c.validate().map_err(|e| Error::Config(e.to_string())),
            KeyManagerConfig::AwsKms(c) => c
                .clone()
                .with_node_defaults(trust_domain, node_id)
                .validate()
                .map_err(|e| Error::Config(e.to_string())),
        }
    }
}

/// The node's configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's ID, `[a-z0-9-]`, unique in the cluster.
    pub node_id: String,
    /// The trust domain, e.g. `prod.example.org`.
    pub trust_domain: String,
    /// Where state and (soft) keys live.
    pub data_dir: PathBuf,
    /// TCP address of the node API (agents), e.g. `0.0.0.0:8081`.
    #[serde(default = "default_node_listen")]
    pub node_listen: SocketAddr,
    /// Unix socket of the admin API (owner-only).
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// HTTP address for `/metrics`, `/healthz`, `/readyz`; none to disable.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// The key manager of every CA key, unless a role below has its own.
    #[serde(default = "default_km")]
    pub key_manager: KeyManagerConfig,
    /// Key manager of the root CA key (default: `key_manager`).
    #[serde(default)]
    pub root_key_manager: Option<KeyManagerConfig>,
    /// Key manager of intermediate CA keys in `key_manager` mode (default: `key_manager`).
    #[serde(default)]
    pub intermediate_key_manager: Option<KeyManagerConfig>,
    /// Key manager of JWT signing keys (default: `key_manager`).
    #[serde(default)]
    pub jwt_key_manager: Option<KeyManagerConfig>,
    /// Algorithm of root and intermediate keys: `ec-p256`, `ec-p384`, `rsa2048`, `rsa3072`.
    #[serde(default = "default_ca_alg")]
    pub ca_key_algorithm: KeyAlgorithm,
    /// Algorithm of JWT signing keys (`ec-p256` gives ES256, `ec-p384` ES384, RSA RS256).
    #[serde(default = "default_ca_alg")]
    pub jwt_key_algorithm: KeyAlgorithm,
    /// Where intermediate keys live.
    #[serde(default)]
    pub intermediate_mode: IntermediateMode,
    /// Lifetimes, in seconds.
    #[serde(default)]
    pub ttl: TtlConfig,
    /// When authorities are replaced.
    #[serde(default)]
    pub rotation: ca_authority::Rotation,
    /// Raft timings.
    #[serde(default)]
    pub raft: RaftConfig,
    /// What callers of the node port may use: rate limits and connection bounds.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How far (seconds) this node's clock may differ from a quorum of the other members'
    /// before it stops minting and reports not ready; 0 turns the check off.
    #[serde(default = "default_max_clock_skew")]
    pub max_clock_skew_secs: u64,
    /// PEM file of provisioning CA certificates for x509pop node attestation (optional).
    #[serde(default)]
    pub x509pop_ca_bundle: Option<PathBuf>,
    /// Log filter (`info`, `debug`, `ca_node=debug`).
    #[serde(default = "default_log")]
    pub log_level: String,
    /// This node's Raft ID: unique in the cluster and never reused (a node that is removed
    /// and wiped joins again under a new one). Default 1, for the first node.
    #[serde(default = "default_raft_id")]
    pub raft_id: u64,
    /// `host:port` other members (and the cluster membership) reach this node's API at; the
    /// Raft transport is served on the node API's mutually authenticated TLS port. Default:
    /// the address `node_listen` is bound to (which must then not be `0.0.0.0`/`::` in a
    /// cluster of more than one node).
    #[serde(default)]
    pub advertise_addr: Option<String>,
}

/// Lifetimes, in seconds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtlConfig {
    /// Root CA lifetime.
    pub root: i64,
    /// Intermediate CA lifetime; the next one is prepared and activated at the
    /// `[rotation]` fractions of it.
    pub intermediate: i64,
    /// JWT signing key lifetime; rotated like intermediates.
    pub jwt_key: i64,
    /// Default X.509-SVID lifetime (entries may set their own).
    pub x509_svid: i64,
    /// Default JWT-SVID lifetime (entries may set their own).
    pub jwt_svid: i64,
    /// Agent SVID lifetime.
    pub agent_svid: i64,
    /// Default join token lifetime.
    pub join_token: i64,
}

impl Default for TtlConfig {
    fn default() -> Self {
        Self {
            root: 365 * 24 * 3600,
            intermediate: 24 * 3600,
            jwt_key: 24 * 3600,
            x509_svid: 3600,
            jwt_svid: 300,
            agent_svid: 3600,
            join_token: 600,
        }
    }
}

/// Raft timings, in milliseconds. Every member should use the same values.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// How often the leader sends heartbeats.
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for `election_timeout_max_ms` (the leader's lease,
    /// during which it refuses to vote for anyone else) plus a random time in
    /// `[election_timeout_min_ms, election_timeout_max_ms)` starts an election. So after a
    /// leader dies, a new one is elected within about max + [min, max): 1.1–1.4 s with the
    /// defaults.
    pub election_timeout_min_ms: u64,
    /// See `election_timeout_min_ms`.
    pub election_timeout_max_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 700,
        }
    }
}

/// Rate limits and connection bounds of the node port. SPIRE's defaults where it has one
/// (one attestation per second per source address); a rate of 0 turns that limit off.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Agent attestations per second per source IP address.
    pub attestations_per_second: f64,
    /// Attestations one address may make at once after a quiet period.
    pub attestation_burst: u32,
    /// Signatures (X.509-SVID CSRs, JWT-SVIDs, agent renewals) per second per agent.
    pub signings_per_second: f64,
    /// Signatures one agent may ask for at once; at least the largest batch (500 CSRs).
    pub signing_burst: u32,
    /// Connections without a client certificate (agents attesting, nodes joining) open at
    /// once, from all addresses together.
    pub unauthenticated_connections: usize,
    /// Connections without a client certificate open at once per source IP address.
    pub unauthenticated_connections_per_address: usize,
    /// Seconds a connection without a client certificate may stay open (attesting takes
    /// well under a second); it is closed at this age whatever it does.
    pub unauthenticated_max_age_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            attestations_per_second: 1.0,
            attestation_burst: 10,
            signings_per_second: 500.0,
            signing_burst: 1000,
            unauthenticated_connections: 1024,
            unauthenticated_connections_per_address: 32,
            unauthenticated_max_age_secs: 60,
        }
    }
}

impl LimitsConfig {
    /// The attestation rate per source address.
    pub fn attestation_rate(&self) -> ca_identity::rate_limit::Rate {
        ca_identity::rate_limit::Rate {
            per_second: self.attestations_per_second,
            burst: self.attestation_burst,
        }
    }

    /// The signing rate per agent.
    pub fn signing_rate(&self) -> ca_identity::rate_limit::Rate {
        ca_identity::rate_limit::Rate {
            per_second: self.signings_per_second,
            burst: self.signing_burst,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        let c = |m: String| Err(Error::Config(m));
        for (name, rate, burst) in [
            (
                "attestations",
                self.attestations_per_second,
                self.attestation_burst,
            ),
            ("signings", self.signings_per_second, self.signing_burst),
        ] {
            if !rate.is_finite() || rate < 0.0 {
                return c(format!(
                    "limits.{name}_per_second = {rate}: use a number of at least 0 (0 turns the limit off)"
                ));
            }
            if rate > 0.0 && burst == 0 {
                return c(format!(
                    "limits.{}_burst = 0 refuses every call; use at least 1",
                    name.trim_end_matches('s')
                ));
            }
        }
        let batch = MAX_BATCH_CSRS;
        if self.signings_per_second > 0.0 && (self.signing_burst as usize) < batch {
            return c(format!(
                "limits.signing_burst = {} is below the largest batch an agent sends ({batch} CSRs), so such batches could never pass; use at least {batch}",
                self.signing_burst
            ));
        }
        for (name, v) in [
            (
                "unauthenticated_connections",
                self.unauthenticated_connections,
            ),
            (
                "unauthenticated_connections_per_address",
                self.unauthenticated_connections_per_address,
            ),
            (
                "unauthenticated_max_age_secs",
                self.unauthenticated_max_age_secs as usize,
            ),
        ] {
            if v == 0 {
                return c(format!(
                    "limits.{name} = 0 would refuse every agent attestation and node join; use at least 1"
                ));
            }
        }
        Ok(())
    }
}

impl RaftConfig {
    fn validate(&self) -> Result<(), Error> {
        let c = |m: String| Err(Error::Config(m));
        if self.heartbeat_ms < 10 {
            return c(format!(
                "raft.heartbeat_ms = {}: use at least 10",
                self.heartbeat_ms
            ));
        }
        if self.election_timeout_min_ms < 3 * self.heartbeat_ms {
            return c(format!(
                "raft.election_timeout_min_ms = {} must be at least 3 x raft.heartbeat_ms ({}), or followers start elections while the leader is alive",
                self.election_timeout_min_ms,
                3 * self.heartbeat_ms
            ));
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return c(format!(
                "raft.election_timeout_max_ms = {} must be greater than raft.election_timeout_min_ms = {} (the timeout is random in between, so that candidates do not collide)",
                self.election_timeout_max_ms, self.election_timeout_min_ms
            ));
        }
        Ok(())
    }
}

fn default_node_listen() -> SocketAddr {
    "127.0.0.1:8081".parse().expect("literal")
}
fn default_max_clock_skew() -> u64 {
    10
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from(DEFAULT_ADMIN_SOCKET)
}
fn default_km() -> KeyManagerConfig {
    KeyManagerConfig::Soft { dir: None }
}
fn default_ca_alg() -> KeyAlgorithm {
    KeyAlgorithm::EcP256
}
fn default_log() -> String {
    "info".into()
}
fn default_raft_id() -> u64 {
    1
}

/// Whether `s` is a valid node ID: 1 to 63 characters of `a-z 0-9 -`.
pub fn valid_node_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
}

/// The SPIFFE ID path prefix reserved for ca-nodes: `spiffe://TD/ca-node/<node id>`.
pub const CA_NODE_PATH: &str = "/ca-node/";

/// Whether `id` lies in the reserved `/ca-node/` space (a ca-node's ID or not).
pub fn is_reserved_path(id: &ca_identity::SpiffeId) -> bool {
    id.path().starts_with(CA_NODE_PATH)
}

/// The node ID in `spiffe://TD/ca-node/<node id>` (any trust domain), if `id` is exactly
/// that with a valid node ID.
pub fn node_id_in(id: &ca_identity::SpiffeId) -> Option<&str> {
    id.path()
        .strip_prefix(CA_NODE_PATH)
        .filter(|n| valid_node_id(n))
}

impl NodeConfig {
    /// A configuration with every optional value at its default (not yet validated).
    pub fn with_defaults(node_id: &str, trust_domain: &str, data_dir: PathBuf) -> Self {
        Self {
            node_id: node_id.into(),
            trust_domain: trust_domain.into(),
            data_dir,
            node_listen: default_node_listen(),
            admin_socket: default_admin_socket(),
            http_listen: None,
            key_manager: default_km(),
            root_key_manager: None,
            intermediate_key_manager: None,
            jwt_key_manager: None,
            ca_key_algorithm: default_ca_alg(),
            jwt_key_algorithm: default_ca_alg(),
            intermediate_mode: IntermediateMode::default(),
            ttl: TtlConfig::default(),
            rotation: ca_authority::Rotation::default(),
            raft: RaftConfig::default(),
            limits: LimitsConfig::default(),
            max_clock_skew_secs: default_max_clock_skew(),
            x509pop_ca_bundle: None,
            log_level: default_log(),
            raft_id: default_raft_id(),
            advertise_addr: None,
        }
    }

    /// Reads and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The key manager configured for each role: root, intermediate, JWT.
    pub fn role_key_managers(&self) -> [&KeyManagerConfig; 3] {
        [
            self.root_key_manager.as_ref().unwrap_or(&self.key_manager),
            self.intermediate_key_manager
                .as_ref()
                .unwrap_or(&self.key_manager),
            self.jwt_key_manager.as_ref().unwrap_or(&self.key_manager),
        ]
    }

    /// The trust domain, parsed.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain::new(&self.trust_domain).expect("validated")
    }

    /// The longest X.509-SVID TTL the intermediates can carry in full: what is left of an
    /// intermediate when its successor activates.
    pub fn max_x509_svid_ttl(&self) -> i64 {
        self.rotation.left_at_activation(self.ttl.intermediate)
    }

    /// The longest JWT-SVID TTL: what is left of a JWT key when its successor activates.
    pub fn max_jwt_svid_ttl(&self) -> i64 {
        self.rotation.left_at_activation(self.ttl.jwt_key)
    }

    /// Checks every value; the message names the key and what to do.
    pub fn validate(&self) -> Result<(), Error> {
        let c = |m: String| Err(Error::Config(m));
        if !valid_node_id(&self.node_id) {
            return c(format!(
                "node_id {:?}: use 1 to 63 characters of a-z 0-9 -",
                self.node_id
            ));
        }
        TrustDomain::new(&self.trust_domain)
            .map_err(|e| Error::Config(format!("trust_domain: {e}")))?;
        if self.data_dir.as_os_str().is_empty() {
            return c("data_dir is empty".into());
        }
        self.raft.validate()?;
        self.limits.validate()?;
        if self.max_clock_skew_secs > 3600 {
            return Err(Error::Config(format!(
                "max_clock_skew_secs = {} is over an hour: SVIDs minted that far off would not verify; use 1..=3600 (default 10; 0 turns the check off)",
                self.max_clock_skew_secs
            )));
        }
        let t = &self.ttl;
        for (name, v) in [
            ("ttl.root", t.root),
            ("ttl.intermediate", t.intermediate),
            ("ttl.jwt_key", t.jwt_key),
            ("ttl.x509_svid", t.x509_svid),
            ("ttl.jwt_svid", t.jwt_svid),
            ("ttl.agent_svid", t.agent_svid),
            ("ttl.join_token", t.join_token),
        ] {
            if v <= 0 {
                return c(format!(
                    "{name} must be a positive number of seconds, got {v}"
                ));
            }
        }
        let r = &self.rotation;
        let (p, a) = (r.prepare_fraction, r.activate_fraction);
        if !(p > 0.0 && p < a && a < 1.0) {
            return c(format!(
                "rotation.prepare_fraction ({p}) and rotation.activate_fraction ({a}) must satisfy 0 < prepare_fraction < activate_fraction < 1 (defaults: 0.5 and 0.8333, i.e. 1/2 and 5/6)"
            ));
        }
        if r.propagation_window <= 0 {
            return c(format!(
                "rotation.propagation_window must be a positive number of seconds, got {}",
                r.propagation_window
            ));
        }
        let left = |ttl: i64| r.left_at_activation(ttl);
        if t.intermediate > left(t.root) {
            return c(format!(
                "ttl.intermediate ({}s) does not fit into what is left of a root when the next root activates ({}s = (1 - rotation.activate_fraction {a}) x ttl.root {}s); intermediates never outlive their root, so lower ttl.intermediate to at most {}s or raise ttl.root",
                t.intermediate, left(t.root), t.root, left(t.root)
            ));
        }
        for (name, v) in [
            ("ttl.x509_svid", t.x509_svid),
            ("ttl.agent_svid", t.agent_svid),
        ] {
            if v > self.max_x509_svid_ttl() {
                return c(format!(
                    "{name} ({v}s) does not fit into what is left of an intermediate when the next one activates ({}s = (1 - rotation.activate_fraction {a}) x ttl.intermediate {}s); an SVID never outlives its issuer, so lower {name} to at most {}s, raise ttl.intermediate, or lower rotation.activate_fraction",
                    self.max_x509_svid_ttl(),
                    t.intermediate,
                    self.max_x509_svid_ttl()
                ));
            }
        }
        if t.jwt_svid > self.max_jwt_svid_ttl() {
            return c(format!(
                "ttl.jwt_svid ({}s) does not fit into what is left of a JWT key when the next one activates ({}s = (1 - rotation.activate_fraction {a}) x ttl.jwt_key {}s); lower ttl.jwt_svid to at most {}s, raise ttl.jwt_key, or lower rotation.activate_fraction",
                t.jwt_svid,
                self.max_jwt_svid_ttl(),
                t.jwt_key,
                self.max_jwt_svid_ttl()
            ));
        }
        for (role, km) in [
            ("key_manager", Some(&self.key_manager)),
            ("root_key_manager", self.root_key_manager.as_ref()),
            (
                "intermediate_key_manager",
                self.intermediate_key_manager.as_ref(),
            ),
            ("jwt_key_manager", self.jwt_key_manager.as_ref()),
        ] {
            if let Some(km) = km {
                km.validate(&self.trust_domain, &self.node_id)
                    .map_err(|e| match e {
                        Error::Config(m) => Error::Config(format!("{role}: {m}")),
                        other => other,
                    })?;
            }
        }
        if self.intermediate_mode == IntermediateMode::Memory
            && self.intermediate_key_manager.is_some()
        {
            return c("intermediate_key_manager is set but intermediate_mode = \"memory\" keeps intermediate keys in RAM; remove one of the two".into());
        }
        if self.raft_id == 0 {
            return c(
                "raft_id must be a positive integer, unique in the cluster and never reused".into(),
            );
        }
        if let Some(a) = &self.advertise_addr {
            let ok = a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return c(format!(
                    "advertise_addr {a:?}: use host:port, e.g. \"10.0.0.1:8081\" or \"ca-1.internal:8081\""
                ));
            }
        }
        if let Some(p) = &self.x509pop_ca_bundle {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Error::Config(format!("x509pop_ca_bundle {}: {e}", p.display())))?;
            ca_identity::bundle::certs_from_pem(&text)
                .map_err(|e| Error::Config(format!("x509pop_ca_bundle {}: {e}", p.display())))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "node_id = \"n1\"\ntrust_domain = \"dev.example.org\"\ndata_dir = \"/tmp/x\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = NodeConfig::parse(BASE).unwrap();
        assert_eq!(c.ttl.x509_svid, 3600);
        assert_eq!(c.intermediate_mode, IntermediateMode::KeyManager);
    }

    #[test]
    fn raft_timings_are_parsed_and_checked() {
        let c = NodeConfig::parse(&format!(
            "{BASE}[raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\n"
        ))
        .unwrap();
        assert_eq!(
            (
                c.raft.heartbeat_ms,
                c.raft.election_timeout_min_ms,
                c.raft.election_timeout_max_ms
            ),
            (100, 400, 800)
        );
        assert_eq!(NodeConfig::parse(BASE).unwrap().raft.heartbeat_ms, 100);
        for (raft, expect) in [
            ("heartbeat_ms = 5", "raft.heartbeat_ms = 5: use at least 10"),
            (
                "heartbeat_ms = 200",
                "raft.election_timeout_min_ms = 400 must be at least 3 x raft.heartbeat_ms (600)",
            ),
            (
                "election_timeout_max_ms = 400",
                "raft.election_timeout_max_ms = 400 must be greater than raft.election_timeout_min_ms = 400",
            ),
            ("election_timeout = 3", "unknown field `election_timeout`"),
        ] {
            let e = NodeConfig::parse(&format!("{BASE}[raft]\n{raft}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect), "{raft}: {e}");
        }
    }

    #[test]
    fn key_managers_per_role_are_parsed_and_checked() {
        let c = NodeConfig::parse(&format!(
            "{BASE}jwt_key_algorithm = \"ec-p384\"\n[root_key_manager]\ntype = \"aws_kms\"\nregion = \"eu-west-1\"\n"
        ))
        .unwrap();
        let [root, int, jwt] = c.role_key_managers();
        assert!(matches!(root, KeyManagerConfig::AwsKms(_)));
        assert_eq!(int, &KeyManagerConfig::Soft { dir: None });
        assert_eq!(jwt, int);
        assert_eq!(c.jwt_key_algorithm, KeyAlgorithm::EcP384);
        for (extra, expect) in [
            (
                "[key_manager]\ntype = \"pkcs11\"\nmodule = \"/nonexistent.so\"\ntoken_label = \"ca\"\npin_env = \"PIN\"\nkey_label_prefix = \"x-\"\n",
                "key_manager: key manager misconfigured: PKCS#11 module /nonexistent.so not found",
            ),
            (
                "[key_manager]\ntype = \"pkcs11\"\nmodule = \"/x.so\"\ntoken_label = \"ca\"\npin = \"1234\"\nkey_label_prefix = \"x-\"\n",
                "unknown field `pin`",
            ),
            (
                "[jwt_key_manager]\ntype = \"aws_kms\"\nalias_prefix = \"no-slash\"\n",
                "jwt_key_manager: key manager misconfigured: aws_kms: alias_prefix",
            ),
            ("[key_manager]\ntype = \"vault\"\n", "unknown variant `vault`"),
            ("ca_key_algorithm = \"ed25519\"\n", "unknown variant `ed25519`"),
        ] {
            let err = NodeConfig::parse(&format!("{BASE}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{extra:?}: {err}");
        }
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        for (extra, expect) in [
            (
                "[ttl]\nx509_svid = 86400\n",
                "does not fit into what is left of an intermediate",
            ),
            ("[ttl]\nx509_svid = 14401\n", "at most 14400s"),
            ("[ttl]\njwt_svid = 0\n", "positive"),
            (
                "[ttl]\njwt_svid = 14401\n",
                "ttl.jwt_svid (14401s) does not fit",
            ),
            (
                "[ttl]\nintermediate = 400000000\n",
                "what is left of a root",
            ),
            (
                "[rotation]\nprepare_fraction = 0.9\nactivate_fraction = 0.8\n",
                "0 < prepare_fraction < activate_fraction < 1",
            ),
            (
                "[rotation]\nactivate_fraction = 1.0\n",
                "0 < prepare_fraction < activate_fraction < 1",
            ),
            (
                "[rotation]\nprepare_fraction = 0\n",
                "0 < prepare_fraction < activate_fraction < 1",
            ),
            ("[rotation]\npropagation_window = 0\n", "propagation_window"),
            ("[rotation]\nbogus = 1\n", "unknown field"),
            (
                "[rotation]\nactivate_fraction = 0.99\n",
                "lower rotation.activate_fraction",
            ),
            ("bogus = 1\n", "unknown field"),
            (
                "[limits]\nattestations_per_second = -1\n",
                "limits.attestations_per_second = -1: use a number of at least 0",
            ),
            (
                "[limits]\nsignings_per_second = nan\n",
                "limits.signings_per_second = NaN",
            ),
            (
                "[limits]\nattestation_burst = 0\n",
                "limits.attestation_burst = 0 refuses every call",
            ),
            (
                "[limits]\nsigning_burst = 499\n",
                "below the largest batch an agent sends (500 CSRs)",
            ),
            (
                "[limits]\nunauthenticated_connections_per_address = 0\n",
                "would refuse every agent attestation",
            ),
            (
                "[limits]\nunauthenticated_max_age_secs = 0\n",
                "limits.unauthenticated_max_age_secs = 0",
            ),
            ("[limits]\nattestations = 3\n", "unknown field"),
            ("intermediate_mode = \"disk\"\n", "unknown variant"),
            ("node_listen = \"nope\"\n", "node_listen"),
            (
                "x509pop_ca_bundle = \"/nonexistent/ca.pem\"\n",
                "x509pop_ca_bundle",
            ),
            ("raft_id = 0\n", "raft_id"),
            ("raft_id = -1\n", "raft_id"),
            ("advertise_addr = \"10.0.0.1\"\n", "advertise_addr"),
            ("advertise_addr = \":8081\"\n", "advertise_addr"),
        ] {
            let err = NodeConfig::parse(&format!("{BASE}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{extra:?}: {err}");
        }
        let err = NodeConfig::parse(&BASE.replace("dev.example.org", "Dev.Example.org"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("trust_domain") && err.contains("upper-case"),
            "{err}"
        );
        let err = NodeConfig::parse(&BASE.replace("\"n1\"", "\"Node 1\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("node_id"), "{err}");
    }

    /// Fuzz target: config text from the operator (or whoever can write the file) never
    /// panics the node, however mangled (see `ca_identity`'s fuzz module for how it runs).
    #[test]
    fn fuzz_config_text() {
        let seed = format!(
            "{BASE}raft_id = 2\nnode_listen = \"127.0.0.1:8081\"\n[limits]\nattestations_per_second = 1.0\n[ttl]\nx509_svid = 3600\n[rotation]\npropagation_window = 300\n"
        );
        NodeConfig::parse(&seed).expect("the seed is a valid config");
        bolero::check!().for_each(|ops: &[u8]| {
            let mutated = ca_test_support::fuzz::mutate(seed.as_bytes(), ops);
            for text in [mutated.as_slice(), ops] {
                let _ = NodeConfig::parse(&String::from_utf8_lossy(text));
            }
        });
    }
}
