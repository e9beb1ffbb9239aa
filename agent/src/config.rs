//! Agent configuration: a TOML file read by `agent run --config FILE`, or an
//! [`AgentConfig`] built in code for in-process use. Every value is validated up front
//! by [`AgentConfig::validate`] with a message that names the key and the fix.
//!
//! ```toml
//! trust_domain = "example.org"
//! server_addresses = ["127.0.0.1:8081", "127.0.0.1:8082"]
//! data_dir = "/var/lib/spiffe-agent"
//! socket_path = "/run/spiffe-agent/agent.sock"
//! trust_bundle_path = "/etc/spiffe-agent/bootstrap.pem"   # or: insecure_bootstrap = true
//! join_token = "..."                                     # or join_token_file, or [x509pop]
//! health_addr = "127.0.0.1:8088"
//! sync_interval_secs = 5
//! log_level = "info"
//!
//! [x509pop]
//! cert_path = "/etc/spiffe-agent/node.pem"
//! key_path = "/etc/spiffe-agent/node.key"
//!
//! [workload_api]                 # local callers; these are the defaults
//! requests_per_second = 50       # per user ID (0: no limit)
//! request_burst = 250
//! idle_timeout_secs = 300        # close a connection with no call open for this long
//! jwt_svid_cache_size = 1000     # JWT-SVIDs kept for reuse
//! allow_other_pid_namespaces = false  # serve callers inside containers
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ca_identity::TrustDomain;
use serde::Deserialize;

use crate::Error;

/// Where the Workload API listens unless configured otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/run/spiffe-agent/agent.sock";
/// Environment variable that supplies a join token when the file has none.
pub const JOIN_TOKEN_ENV: &str = "AGENT_JOIN_TOKEN";

/// The agent's configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The trust domain, e.g. `example.org`.
    pub trust_domain: String,
    /// CA node addresses (`host:port`); the agent fails over between them in order.
    pub server_addresses: Vec<String>,
    /// Where the agent keeps its SVID, key and bundle across restarts.
    pub data_dir: PathBuf,
    /// The Workload API Unix socket.
    #[serde(default = "default_socket_path")]
    pub socket_path: PathBuf,
    /// PEM file of root certificates to trust on first contact with a node.
    #[serde(default)]
    pub trust_bundle_path: Option<PathBuf>,
    /// Trust any node certificate on first contact (then only the attested bundle).
    #[serde(default)]
    pub insecure_bootstrap: bool,
    /// A single-use join token for node attestation.
    #[serde(default)]
    pub join_token: Option<String>,
    /// A file holding the join token (first line, whitespace trimmed).
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// Attest with a provisioned X.509 certificate and key instead of a join token.
    #[serde(default)]
    pub x509pop: Option<X509PopConfig>,
    /// Loopback address for HTTP `/healthz` and `/readyz`.
    #[serde(default)]
    pub health_addr: Option<SocketAddr>,
    /// How entries and the bundle reach the agent: `watch` (default: pushed by a node over
    /// one stream) or `poll` (the whole set every `sync_interval_secs`).
    #[serde(default)]
    pub sync: crate::cache::SyncMode,
    /// Seconds between entry polls (`sync = "poll"`), and between checks for SVIDs due
    /// for renewal.
    #[serde(default = "default_sync_interval")]
    pub sync_interval_secs: u64,
    /// Log filter, e.g. `info` or `ca_agent=debug,info`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// How the Workload API treats local callers (limits, PID namespaces).
    #[serde(default)]
    pub workload_api: WorkloadApiConfig,
}

/// How the Workload API treats local callers. Every local user can reach the socket, so
/// each user ID gets its own request budget.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadApiConfig {
    /// Calls (each unary call and each stream opened) per second per user ID; 0 means no
    /// limit. Over it a call gets `RESOURCE_EXHAUSTED` with the time to retry.
    pub requests_per_second: u32,
    /// Calls a user ID may make at once after a quiet period.
    pub request_burst: u32,
    /// A connection with no call open for this long is closed (clients reconnect).
    pub idle_timeout_secs: u64,
    /// JWT-SVIDs (per entry and audience list) kept for reuse; the least recently used go
    /// first.
    pub jwt_svid_cache_size: usize,
    /// Serve callers in a child PID namespace (containers). Their binary path and hash are
    /// read through their own mount namespace, which whoever controls the container
    /// controls, so they are refused unless this is set.
    pub allow_other_pid_namespaces: bool,
}

impl Default for WorkloadApiConfig {
    fn default() -> Self {
        Self {
            requests_per_second: 50,
            request_burst: 250,
            idle_timeout_secs: 300,
            jwt_svid_cache_size: 1000,
            allow_other_pid_namespaces: false,
        }
    }
}

impl WorkloadApiConfig {
    /// The per-user-ID call rate.
    pub fn rate(&self) -> ca_identity::rate_limit::Rate {
        ca_identity::rate_limit::Rate {
            per_second: f64::from(self.requests_per_second),
            burst: self.request_burst,
        }
    }

    /// Checks every value; the error names the key and how to fix it.
    pub fn validate(&self) -> Result<(), Error> {
        if self.requests_per_second > 0 && self.request_burst == 0 {
            return Err(cfg(
                "workload_api.request_burst = 0 refuses every call; use at least 1 (or requests_per_second = 0 for no limit)",
            ));
        }
        if self.idle_timeout_secs == 0 {
            return Err(cfg(
                "workload_api.idle_timeout_secs = 0 would close every connection at once; use at least 1 (default 300)",
            ));
        }
        if self.jwt_svid_cache_size == 0 {
            return Err(cfg(
                "workload_api.jwt_svid_cache_size = 0 would mint a JWT-SVID on every call; use at least 1 (default 1000)",
            ));
        }
        Ok(())
    }
}

/// Paths of the provisioned certificate (chain, leaf first) and its private key, PEM.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct X509PopConfig {
    /// PEM certificate chain, leaf first.
    pub cert_path: PathBuf,
    /// PEM private key (PKCS#8, SEC1 EC or PKCS#1 RSA).
    pub key_path: PathBuf,
}

fn default_socket_path() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET_PATH)
}
fn default_sync_interval() -> u64 {
    5
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            trust_domain: String::new(),
            server_addresses: Vec::new(),
            data_dir: PathBuf::new(),
            socket_path: default_socket_path(),
            trust_bundle_path: None,
            insecure_bootstrap: false,
            join_token: None,
            join_token_file: None,
            x509pop: None,
            health_addr: None,
            sync: Default::default(),
            sync_interval_secs: default_sync_interval(),
            log_level: default_log_level(),
            workload_api: WorkloadApiConfig::default(),
        }
    }
}

fn cfg(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}

/// How the agent proves its identity to the nodes on first contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttestationMethod {
    /// A join token.
    JoinToken(String),
    /// A provisioned certificate and key.
    X509Pop(X509PopConfig),
}

impl AgentConfig {
    /// Parses TOML text (no environment lookups) and validates it.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let c: Self = toml::from_str(text).map_err(|e| cfg(e.to_string().trim().to_owned()))?;
        c.validate()?;
        Ok(c)
    }

    /// Reads and validates a config file; a join token may also come from
    /// `AGENT_JOIN_TOKEN` when the file configures neither a token nor x509pop.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            cfg(format!(
                "cannot read config file {}: {e}; pass an existing file with --config",
                path.display()
            ))
        })?;
        let mut c: Self = toml::from_str(&text)
            .map_err(|e| cfg(format!("{}: {}", path.display(), e.to_string().trim())))?;
        if c.join_token.is_none() && c.join_token_file.is_none() && c.x509pop.is_none() {
            if let Ok(t) = std::env::var(JOIN_TOKEN_ENV) {
                if !t.trim().is_empty() {
                    c.join_token = Some(t.trim().to_owned());
                }
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// The parsed trust domain.
    pub fn trust_domain(&self) -> Result<TrustDomain, Error> {
        TrustDomain::new(&self.trust_domain).map_err(|e| {
            cfg(format!(
                "trust_domain: {e}; use a lower-case name such as \"example.org\""
            ))
        })
    }

    /// Checks every value; the error names the key and how to fix it.
    pub fn validate(&self) -> Result<(), Error> {
        if self.trust_domain.is_empty() {
            return Err(cfg(
                "trust_domain is empty; set it to your trust domain, e.g. trust_domain = \"example.org\"",
            ));
        }
        self.trust_domain()?;
        if self.server_addresses.is_empty() {
            return Err(cfg(
                "server_addresses is empty; list at least one CA node, e.g. server_addresses = [\"127.0.0.1:8081\"]",
            ));
        }
        for a in &self.server_addresses {
            check_host_port(a)?;
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(cfg(
                "data_dir is empty; set it to a directory the agent may write, e.g. data_dir = \"/var/lib/spiffe-agent\"",
            ));
        }
        if !self.socket_path.is_absolute() {
            return Err(cfg(format!(
                "socket_path {:?} is not absolute; use an absolute path such as {DEFAULT_SOCKET_PATH:?}",
                self.socket_path.display().to_string()
            )));
        }
        // sockaddr_un allows 108 bytes including the terminating NUL.
        if self.socket_path.as_os_str().len() > 107 {
            return Err(cfg(format!(
                "socket_path is {} bytes long; Unix socket paths must be at most 107 bytes",
                self.socket_path.as_os_str().len()
            )));
        }
        match (&self.trust_bundle_path, self.insecure_bootstrap) {
            (None, false) => {
                return Err(cfg(
                    "no way to trust the CA nodes on first contact: set trust_bundle_path to a PEM file of the trust domain's root certificates, or set insecure_bootstrap = true (not for production)",
                ))
            }
            (Some(_), true) => {
                return Err(cfg(
                    "trust_bundle_path and insecure_bootstrap are both set; remove one (trust_bundle_path is the safe choice)",
                ))
            }
            (Some(p), false) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    cfg(format!(
                        "trust_bundle_path {}: {e}; point it at a readable PEM file of root certificates",
                        p.display()
                    ))
                })?;
                ca_identity::bundle::certs_from_pem(&text).map_err(|e| {
                    cfg(format!(
                        "trust_bundle_path {}: {e}; it must hold PEM CERTIFICATE blocks",
                        p.display()
                    ))
                })?;
            }
            (None, true) => {}
        }
        if let Some(t) = &self.join_token {
            if t.trim().is_empty() {
                return Err(cfg(
                    "join_token is empty; set it to the token printed by the CA, or remove the key",
                ));
            }
        }
        if self.join_token.is_some() && self.join_token_file.is_some() {
            return Err(cfg("join_token and join_token_file are both set; keep one"));
        }
        if (self.join_token.is_some() || self.join_token_file.is_some()) && self.x509pop.is_some() {
            return Err(cfg(
                "both a join token and [x509pop] are configured; choose one attestation method",
            ));
        }
        if let Some(x) = &self.x509pop {
            for (key, p) in [("cert_path", &x.cert_path), ("key_path", &x.key_path)] {
                if !p.is_file() {
                    return Err(cfg(format!(
                        "x509pop.{key} {} does not exist or is not a file",
                        p.display()
                    )));
                }
            }
        }
        if let Some(h) = &self.health_addr {
            if !h.ip().is_loopback() {
                return Err(cfg(format!(
                    "health_addr {h} is not a loopback address; use 127.0.0.1:PORT"
                )));
            }
        }
        if self.sync_interval_secs == 0 || self.sync_interval_secs > 3600 {
            return Err(cfg(format!(
                "sync_interval_secs = {} is out of range; use 1..=3600 (default 5)",
                self.sync_interval_secs
            )));
        }
        self.workload_api.validate()?;
        tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|e| {
            cfg(format!(
                "log_level {:?}: {e}; use error, warn, info, debug or trace",
                self.log_level
            ))
        })?;
        Ok(())
    }

    /// The attestation method configured, if any (join token from the key or the file).
    pub fn attestation_method(&self) -> Result<Option<AttestationMethod>, Error> {
        if let Some(t) = &self.join_token {
            return Ok(Some(AttestationMethod::JoinToken(t.trim().to_owned())));
        }
        if let Some(p) = &self.join_token_file {
            let text = ca_identity::private_file::read(p, "join_token_file").map_err(cfg)?;
            let token = text.lines().next().unwrap_or("").trim().to_owned();
            if token.is_empty() {
                return Err(cfg(format!(
                    "join_token_file {} is empty; write the join token to it",
                    p.display()
                )));
            }
            return Ok(Some(AttestationMethod::JoinToken(token)));
        }
        Ok(self.x509pop.clone().map(AttestationMethod::X509Pop))
    }
}

fn check_host_port(a: &str) -> Result<(), Error> {
    let bad = |why: &str| {
        cfg(format!(
            "server_addresses entry {a:?} {why}; use host:port, e.g. \"127.0.0.1:8081\" or \"[::1]:8081\""
        ))
    };
    if a.contains("://") {
        return Err(bad("has a scheme"));
    }
    let Some((host, port)) = a.rsplit_once(':') else {
        return Err(bad("has no port"));
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(bad("is an IPv6 address without brackets"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad("has an invalid port")),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(extra: &str) -> String {
        format!(
            "trust_domain = \"example.org\"\nserver_addresses = [\"127.0.0.1:8081\"]\ndata_dir = \"/tmp/x\"\ninsecure_bootstrap = true\n{extra}"
        )
    }

    fn err_of(text: &str) -> String {
        AgentConfig::from_toml(text)
            .expect_err("should fail")
            .to_string()
    }

    #[test]
    fn minimal_config_with_defaults() {
        let c = AgentConfig::from_toml(&base("")).unwrap();
        assert_eq!(c.socket_path, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(c.sync_interval_secs, 5);
        assert_eq!(c.log_level, "info");
        assert_eq!(c.workload_api, WorkloadApiConfig::default());
        let off = AgentConfig::from_toml(&base(
            "[workload_api]\nrequests_per_second = 0\nrequest_burst = 0",
        ))
        .unwrap();
        assert!(!off.workload_api.rate().is_limited());
        assert_eq!(c.trust_domain().unwrap().as_str(), "example.org");
        assert_eq!(c.attestation_method().unwrap(), None);
    }

    #[test]
    fn each_bad_value_has_its_message() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("x.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let cases: Vec<(String, &str)> = vec![
            (base("bogus = 1"), "unknown field `bogus`"),
            (base("").replace("example.org", "Example.org"), "upper-case"),
            (base("").replace("example.org", ""), "trust_domain is empty"),
            (
                base("").replace("[\"127.0.0.1:8081\"]", "[]"),
                "server_addresses is empty",
            ),
            (
                base("").replace("127.0.0.1:8081", "127.0.0.1"),
                "has no port",
            ),
            (
                base("").replace("127.0.0.1:8081", "https://h:1"),
                "has a scheme",
            ),
            (
                base("").replace("127.0.0.1:8081", "h:99999"),
                "invalid port",
            ),
            (
                base("").replace("insecure_bootstrap = true", ""),
                "set trust_bundle_path",
            ),
            (
                base(&format!(
                    "trust_bundle_path = {:?}",
                    not_pem.display().to_string()
                )),
                "both set",
            ),
            (
                base("").replace(
                    "insecure_bootstrap = true",
                    "trust_bundle_path = \"/nonexistent/b.pem\"",
                ),
                "trust_bundle_path /nonexistent/b.pem",
            ),
            (
                base("").replace(
                    "insecure_bootstrap = true",
                    &format!("trust_bundle_path = {:?}", not_pem.display().to_string()),
                ),
                "PEM CERTIFICATE",
            ),
            (base("socket_path = \"rel/agent.sock\""), "not absolute"),
            (base("sync_interval_secs = 0"), "out of range"),
            (base("health_addr = \"0.0.0.0:80\""), "not a loopback"),
            (base("health_addr = \"nope\""), "health_addr"),
            (base("log_level = \"info,,=x=y\""), "log_level"),
            (base("join_token = \"  \""), "join_token is empty"),
            (
                base("join_token = \"a\"\njoin_token_file = \"/t\""),
                "both set; keep one",
            ),
            (
                base("join_token = \"a\"\n[x509pop]\ncert_path = \"/a\"\nkey_path = \"/b\""),
                "choose one attestation method",
            ),
            (
                base("[x509pop]\ncert_path = \"/nonexistent/c.pem\"\nkey_path = \"/b\""),
                "x509pop.cert_path /nonexistent/c.pem does not exist",
            ),
            (
                base("[x509pop]\ncert_path = \"/a\"\nkey_path = \"/b\"\nextra = 1"),
                "unknown field `extra`",
            ),
            (base("").replace("data_dir = \"/tmp/x\"", ""), "data_dir"),
            (
                base("[workload_api]\nrequest_burst = 0"),
                "workload_api.request_burst = 0 refuses every call",
            ),
            (
                base("[workload_api]\nidle_timeout_secs = 0"),
                "workload_api.idle_timeout_secs = 0",
            ),
            (
                base("[workload_api]\njwt_svid_cache_size = 0"),
                "workload_api.jwt_svid_cache_size = 0",
            ),
            (
                base("[workload_api]\nrequests_per_second = -1"),
                "requests_per_second",
            ),
            (base("[workload_api]\nrate = 1"), "unknown field `rate`"),
        ];
        for (text, want) in cases {
            let got = err_of(&text);
            assert!(got.contains(want), "{text:?}\n -> {got:?}\n lacks {want:?}");
        }
    }

    #[test]
    fn join_token_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "tok-123\n").unwrap();
        let mode = |m| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(m)).unwrap();
        };
        mode(0o644);
        let readable = AgentConfig::from_toml(&base(&format!(
            "join_token_file = {:?}",
            f.display().to_string()
        )))
        .unwrap();
        let e = readable.attestation_method().unwrap_err().to_string();
        assert!(
            e.contains("join_token_file") && e.contains("chmod 600"),
            "{e}"
        );
        mode(0o600);
        let c = AgentConfig::from_toml(&base(&format!(
            "join_token_file = {:?}",
            f.display().to_string()
        )))
        .unwrap();
        assert_eq!(
            c.attestation_method().unwrap(),
            Some(AttestationMethod::JoinToken("tok-123".into()))
        );
        std::fs::write(&f, "\n").unwrap();
        assert!(c
            .attestation_method()
            .unwrap_err()
            .to_string()
            .contains("is empty"));
    }

    /// Fuzz target: config text never panics the agent, however mangled (see
    /// `ca_identity`'s fuzz module for how it runs).
    #[test]
    fn fuzz_config_text() {
        let seed = base(
            "join_token = \"abc\"\nhealth_addr = \"127.0.0.1:8088\"\n[workload_api]\nrequests_per_second = 5\nidle_timeout_secs = 30\n",
        );
        AgentConfig::from_toml(&seed).expect("the seed is a valid config");
        bolero::check!().for_each(|ops: &[u8]| {
            let mutated = ca_test_support::fuzz::mutate(seed.as_bytes(), ops);
            for text in [mutated.as_slice(), ops] {
                let _ = AgentConfig::from_toml(&String::from_utf8_lossy(text));
            }
        });
    }
}
