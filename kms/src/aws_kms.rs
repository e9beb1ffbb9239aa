//! The AWS KMS key manager: asymmetric `SIGN_VERIFY` keys created and used inside AWS KMS.
//!
//! Keys are found by alias: a key called `name` is the KMS key behind the alias
//! `alias/<alias_prefix><name>`, with each `.` of the name written as `/` (KMS aliases allow
//! `A-Z a-z 0-9 / _ -`, key names allow `A-Z a-z 0-9 . _ -`, so the mapping is one-to-one).
//! Every key is created with the configured tags (which must name the trust domain and the
//! node, see [`TAG_TRUST_DOMAIN`] and [`TAG_NODE_ID`]) plus [`TAG_KEY_NAME`].
//!
//! | [`KeyAlgorithm`] | KMS `KeySpec` | `SigningAlgorithm` |
//! |---|---|---|
//! | `ec-p256` | `ECC_NIST_P256` | `ECDSA_SHA_256` |
//! | `ec-p384` | `ECC_NIST_P384` | `ECDSA_SHA_384` |
//! | `rsa2048` | `RSA_2048` | `RSASSA_PKCS1_V1_5_SHA_256` |
//! | `rsa3072` | `RSA_3072` | `RSASSA_PKCS1_V1_5_SHA_256` |
//!
//! **Message types.** A message of at most 4096 bytes (the KMS limit for `MessageType=RAW`) is
//! sent as is with `RAW` and KMS hashes it; every TBSCertificate and JWT signing input the CA
//! produces is far below that limit. A longer message is hashed here and sent with
//! `MessageType=DIGEST`. The `DIGEST` path is **not exercised by the emulator tests**: the
//! emulator they use (moto 5.2) hashes a `DIGEST` message again before signing, so its
//! signatures over a digest do not verify, whereas real KMS signs the digest as given.
//!
//! **Deletion.** KMS never deletes a key at once: [`KeyManager::delete`] schedules the key's
//! deletion with the shortest waiting period KMS allows (7 days) and removes its alias. The
//! key can no longer sign from then on; until the period ends an administrator can still
//! cancel the deletion in KMS.
//!
//! **Credentials and region** come from the standard AWS chain (environment, shared config and
//! credential files, web identity, ECS and EC2 instance metadata); the configuration only
//! names the region when the environment does not. Requests time out per attempt and per
//! operation, and throttling (`ThrottlingException`, `LimitExceededException`, ...), 5xx
//! answers and connection failures are retried with exponential backoff and jitter (the SDK's
//! standard retry strategy) up to `max_attempts`.
//!
//! **Errors.** Refused credentials or permissions (`AccessDeniedException`,
//! `UnrecognizedClientException`, missing credentials) are [`Error::PermissionDenied`] naming
//! the KMS action and the key; an unreachable endpoint, exhausted retries, a disabled key or a
//! key pending deletion are [`Error::Unavailable`] with a message saying which.
//!
//! The client is a cheap handle over one connection pool: keys sign concurrently from any
//! number of tasks.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{
    KeyMetadata, KeySpec, KeyState, KeyUsageType, MessageType, SigningAlgorithmSpec, Tag,
};
use aws_sdk_kms::Client;
use aws_smithy_http_client::tls;
use serde::Deserialize;

use crate::{
    validate_key_name, Error, KeyAlgorithm, KeyManager, KeyProtection, Result, SigningKey,
};

const BACKEND: &str = "aws_kms";

/// Tag key every key is created with: the SPIFFE trust domain. Required in
/// [`AwsKmsConfig::tags`].
pub const TAG_TRUST_DOMAIN: &str = "spiffe-ca:trust-domain";
/// Tag key every key is created with: the CA node that created it. Required in
/// [`AwsKmsConfig::tags`].
pub const TAG_NODE_ID: &str = "spiffe-ca:node-id";
/// Tag key added to every key: its name in this key manager.
pub const TAG_KEY_NAME: &str = "spiffe-ca:key-name";

/// The largest message KMS accepts with `MessageType=RAW`.
pub const MAX_RAW_MESSAGE: usize = 4096;

/// The shortest pending-deletion window KMS allows, in days.
pub const DELETION_WINDOW_DAYS: i32 = 7;

const MAX_ALIAS_LEN: usize = 256;

/// Configuration of the AWS KMS key manager (e.g. a `[kms.aws]` table).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsKmsConfig {
    /// The AWS region; `None` takes it from the standard chain (`AWS_REGION`, profile, ...).
    #[serde(default)]
    pub region: Option<String>,
    /// Another endpoint than the region's public one: a VPC endpoint, or an emulator in tests.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Put before every key name to form its alias, e.g. `spiffe-ca/prod_example_org/node-1/`
    /// (see [`AwsKmsConfig::for_node`]). `A-Z a-z 0-9 / _ -`, ending in `/`. May be left
    /// out of a config file and filled by [`AwsKmsConfig::with_node_defaults`].
    #[serde(default)]
    pub alias_prefix: String,
    /// Tags for every key created; must contain [`TAG_TRUST_DOMAIN`] and [`TAG_NODE_ID`]
    /// (filled by [`AwsKmsConfig::with_node_defaults`] when left out).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Time to establish a connection, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time for one attempt of a request (connect, send, answer), in milliseconds.
    #[serde(default = "default_attempt_timeout_ms")]
    pub attempt_timeout_ms: u64,
    /// Time for a whole operation including its retries, in milliseconds.
    #[serde(default = "default_operation_timeout_ms")]
    pub operation_timeout_ms: u64,
    /// Attempts per request (1 = no retry) on throttling, 5xx and connection errors.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Upper bound of the first retry's randomized backoff, in milliseconds; it doubles with
    /// each further attempt.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Upper bound of any retry's backoff, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_connect_timeout_ms() -> u64 {
    3_000
}
fn default_attempt_timeout_ms() -> u64 {
    5_000
}
fn default_operation_timeout_ms() -> u64 {
    20_000
}
fn default_max_attempts() -> u32 {
    5
}
fn default_initial_backoff_ms() -> u64 {
    200
}
fn default_max_backoff_ms() -> u64 {
    5_000
}

impl AwsKmsConfig {
    /// A configuration with the given prefix and tags and default timeouts and retries.
    pub fn new(alias_prefix: impl Into<String>, tags: BTreeMap<String, String>) -> Self {
        Self {
            region: None,
            endpoint_url: None,
            alias_prefix: alias_prefix.into(),
            tags,
            connect_timeout_ms: default_connect_timeout_ms(),
            attempt_timeout_ms: default_attempt_timeout_ms(),
            operation_timeout_ms: default_operation_timeout_ms(),
            max_attempts: default_max_attempts(),
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }

    /// The usual configuration for one node: aliases under
    /// `spiffe-ca/<trust domain with . as _>/<node id>/` and the two required tags.
    pub fn for_node(trust_domain: &str, node_id: &str) -> Self {
        let prefix = format!(
            "spiffe-ca/{}/{}/",
            trust_domain.replace('.', "_"),
            node_id.replace('.', "_")
        );
        let tags = BTreeMap::from([
            (TAG_TRUST_DOMAIN.to_owned(), trust_domain.to_owned()),
            (TAG_NODE_ID.to_owned(), node_id.to_owned()),
        ]);
        Self::new(prefix, tags)
    }

    /// Fills what a node's config file may leave out: the alias prefix
    /// (`spiffe-ca/<trust domain>/<node id>/`) and the trust-domain and node-id tags.
    pub fn with_node_defaults(mut self, trust_domain: &str, node_id: &str) -> Self {
        let d = Self::for_node(trust_domain, node_id);
        if self.alias_prefix.is_empty() {
            self.alias_prefix = d.alias_prefix;
        }
        for (k, v) in d.tags {
            self.tags.entry(k).or_insert(v);
        }
        self
    }

    /// Checks every field; the error says which one is wrong and why.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("aws_kms: {what}")));
        if let Some(r) = &self.region {
            if r.is_empty()
                || !r
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return bad(format!(
                    "region {r:?} is not an AWS region name (like eu-west-1)"
                ));
            }
        }
        if let Some(u) = &self.endpoint_url {
            let rest = u
                .strip_prefix("https://")
                .or_else(|| u.strip_prefix("http://"));
            if rest.is_none_or(|h| h.is_empty() || h.contains(char::is_whitespace)) {
                return bad(format!(
                    "endpoint_url {u:?} must be an http:// or https:// URL"
                ));
            }
        }
        let p = &self.alias_prefix;
        if p.is_empty()
            || !p.ends_with('/')
            || p.starts_with('/')
            || p.contains("//")
            || !p.chars().all(alias_char)
        {
            return bad(format!(
                "alias_prefix {p:?} must be made of A-Z a-z 0-9 / _ - (the characters KMS \
                 allows in an alias; write a trust domain's dots as _), must not start with / \
                 and must end with / (e.g. \"spiffe-ca/prod_example_org/node-1/\")"
            ));
        }
        if p.starts_with("aws/") {
            return bad(format!(
                "alias_prefix {p:?}: aliases under aws/ are reserved by AWS"
            ));
        }
        // Leave room for a key name of at least 64 characters.
        if "alias/".len() + p.len() + 64 > MAX_ALIAS_LEN {
            return bad(format!(
                "alias_prefix {p:?} is too long: at most {} characters",
                MAX_ALIAS_LEN - "alias/".len() - 64
            ));
        }
        for required in [TAG_TRUST_DOMAIN, TAG_NODE_ID] {
            if self.tags.get(required).is_none_or(|v| v.is_empty()) {
                return bad(format!(
                    "tags must contain {required:?} with a non-empty value (keys are tagged with \
                     their trust domain and node)"
                ));
            }
        }
        if self.tags.len() + 1 > 50 {
            return bad("at most 49 tags (KMS allows 50 per key, one is the key name)".into());
        }
        for (k, v) in &self.tags {
            if k.is_empty() || k.len() > 128 || k.to_ascii_lowercase().starts_with("aws:") {
                return bad(format!(
                    "tag key {k:?} must be 1 to 128 characters and must not start with aws:"
                ));
            }
            if k == TAG_KEY_NAME {
                return bad(format!("tag {TAG_KEY_NAME:?} is set by the key manager"));
            }
            if v.len() > 256 {
                return bad(format!(
                    "tag {k:?}: the value is longer than 256 characters"
                ));
            }
        }
        if self.connect_timeout_ms == 0
            || self.attempt_timeout_ms == 0
            || self.operation_timeout_ms == 0
        {
            return bad(
                "connect_timeout_ms, attempt_timeout_ms and operation_timeout_ms must be \
                        greater than 0"
                    .into(),
            );
        }
        if self.attempt_timeout_ms > self.operation_timeout_ms {
            return bad(format!(
                "attempt_timeout_ms ({}) is longer than operation_timeout_ms ({}): no retry \
                 could ever happen",
                self.attempt_timeout_ms, self.operation_timeout_ms
            ));
        }
        if !(1..=10).contains(&self.max_attempts) {
            return bad(format!(
                "max_attempts {} must be between 1 and 10",
                self.max_attempts
            ));
        }
        if self.initial_backoff_ms == 0 || self.initial_backoff_ms > self.max_backoff_ms {
            return bad(format!(
                "initial_backoff_ms ({}) must be greater than 0 and at most max_backoff_ms ({})",
                self.initial_backoff_ms, self.max_backoff_ms
            ));
        }
        Ok(())
    }

    /// The standard AWS configuration chain (credentials, region, profile), with this
    /// backend's HTTPS client and, if set, its region. [`AwsKmsManager::connect`] loads it; a
    /// caller may adjust it first (e.g. another credentials provider) and use
    /// [`AwsKmsManager::with_sdk_config`].
    pub fn sdk_config_loader(&self) -> aws_config::ConfigLoader {
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).http_client(https_client());
        if let Some(r) = &self.region {
            loader = loader.region(Region::new(r.clone()));
        }
        loader
    }

    fn timeout_config(&self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(Duration::from_millis(self.connect_timeout_ms))
            .operation_attempt_timeout(Duration::from_millis(self.attempt_timeout_ms))
            .operation_timeout(Duration::from_millis(self.operation_timeout_ms))
            .build()
    }

    fn retry_config(&self) -> RetryConfig {
        RetryConfig::standard()
            .with_max_attempts(self.max_attempts)
            .with_initial_backoff(Duration::from_millis(self.initial_backoff_ms))
            .with_max_backoff(Duration::from_millis(self.max_backoff_ms))
    }

    /// `alias/<prefix><name>` for a (validated) key name.
    fn alias(&self, name: &str) -> Result<String> {
        validate_key_name(name)?;
        let alias = format!("alias/{}{}", self.alias_prefix, name.replace('.', "/"));
        if alias.len() > MAX_ALIAS_LEN {
            return Err(Error::Config(format!(
                "key name {name:?} is too long for a KMS alias under {:?} (at most {} characters)",
                self.alias_prefix, MAX_ALIAS_LEN
            )));
        }
        Ok(alias)
    }

    /// The key name behind an alias, if the alias is one of ours.
    fn name_of(&self, alias: &str) -> Option<String> {
        let rest = alias
            .strip_prefix("alias/")?
            .strip_prefix(&self.alias_prefix)?;
        let name = rest.replace('/', ".");
        validate_key_name(&name).ok()?;
        Some(name)
    }
}

fn alias_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-')
}

/// An HTTPS client on rustls with ring (the crypto provider the rest of the workspace uses).
fn https_client() -> aws_sdk_kms::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// Keys in AWS KMS, under one alias prefix.
#[derive(Clone)]
pub struct AwsKmsManager {
    client: Client,
    cfg: Arc<AwsKmsConfig>,
}

impl fmt::Debug for AwsKmsManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsManager")
            .field("region", &self.client.config().region())
            .field("endpoint_url", &self.cfg.endpoint_url)
            .field("alias_prefix", &self.cfg.alias_prefix)
            .finish()
    }
}

impl AwsKmsManager {
    /// Validates `cfg`, loads credentials and region from the standard AWS chain and builds
    /// the client. Does not call KMS: an unreachable KMS shows on the first operation.
    pub async fn connect(cfg: AwsKmsConfig) -> Result<Self> {
        cfg.validate()?;
        let sdk = cfg.sdk_config_loader().load().await;
        Self::with_sdk_config(cfg, &sdk)
    }

    /// Builds the manager from an SDK configuration loaded by the caller (shared with other
    /// AWS clients). Region, endpoint, timeouts and retries from `cfg` take precedence.
    pub fn with_sdk_config(cfg: AwsKmsConfig, sdk: &SdkConfig) -> Result<Self> {
        cfg.validate()?;
        let mut b = aws_sdk_kms::config::Builder::from(sdk)
            .timeout_config(cfg.timeout_config())
            .retry_config(cfg.retry_config());
        if sdk.http_client().is_none() {
            b = b.http_client(https_client());
        }
        if let Some(r) = &cfg.region {
            b = b.region(Region::new(r.clone()));
        }
        if let Some(u) = &cfg.endpoint_url {
            b = b.endpoint_url(u.clone());
        }
        let conf = b.build();
        if conf.region().is_none() {
            return Err(Error::Config(
                "aws_kms: no AWS region: set `region` in the configuration or AWS_REGION in the \
                 environment"
                    .into(),
            ));
        }
        Ok(Self {
            client: Client::from_conf(conf),
            cfg: Arc::new(cfg),
        })
    }

    /// The KMS client (for administration beyond the [`KeyManager`] trait).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The configuration in force.
    pub fn config(&self) -> &AwsKmsConfig {
        &self.cfg
    }

    /// The alias a key called `name` has in KMS.
    pub fn alias_for(&self, name: &str) -> Result<String> {
        self.cfg.alias(name)
    }

    async fn describe(&self, name: &str, alias: &str) -> Result<KeyMetadata> {
        let out = self
            .client
            .describe_key()
            .key_id(alias)
            .send()
            .await
            .map_err(|e| map_sdk_error(e, "DescribeKey", name, alias))?;
        out.key_metadata.ok_or_else(|| {
            Error::Backend(format!("KMS DescribeKey on {alias} returned no metadata"))
        })
    }

    /// The handle for the key described by `md`, with its public key fetched from KMS.
    async fn handle(&self, name: &str, alias: &str, md: &KeyMetadata) -> Result<AwsKmsKey> {
        let key_id = md.key_id().to_owned();
        if md.key_usage() != Some(&KeyUsageType::SignVerify) {
            return Err(Error::Backend(format!(
                "KMS key {alias} ({key_id}) has key usage {:?}, not SIGN_VERIFY",
                md.key_usage().map(|u| u.as_str())
            )));
        }
        let spec = md.key_spec().ok_or_else(|| {
            Error::Backend(format!("KMS key {alias} ({key_id}) reports no key spec"))
        })?;
        let alg = alg_of_spec(spec).ok_or_else(|| Error::Unsupported {
            backend: BACKEND,
            what: format!(
                "KMS key {alias} ({key_id}) has key spec {}; supported are ECC_NIST_P256, \
                 ECC_NIST_P384, RSA_2048 and RSA_3072",
                spec.as_str()
            ),
        })?;
        let out = self
            .client
            .get_public_key()
            .key_id(&key_id)
            .send()
            .await
            .map_err(|e| map_sdk_error(e, "GetPublicKey", name, alias))?;
        if out.key_spec().is_some_and(|s| s != spec) {
            return Err(Error::Backend(format!(
                "KMS key {alias}: GetPublicKey reports key spec {:?}, DescribeKey {}",
                out.key_spec().map(|s| s.as_str()),
                spec.as_str()
            )));
        }
        let spki = out
            .public_key
            .ok_or_else(|| Error::Backend(format!("KMS GetPublicKey on {alias} returned no key")))?
            .into_inner();
        Ok(AwsKmsKey {
            name: name.to_owned(),
            alias: alias.to_owned(),
            key_id,
            alg,
            spki,
            client: self.client.clone(),
        })
    }

    /// Schedules deletion of a key this manager just created and could not name.
    async fn discard_new_key(&self, key_id: &str, alias: &str) {
        match self
            .client
            .schedule_key_deletion()
            .key_id(key_id)
            .pending_window_in_days(DELETION_WINDOW_DAYS)
            .send()
            .await
        {
            Ok(_) => tracing::warn!(
                key_id,
                alias,
                "creating the alias failed: the new KMS key is scheduled for deletion"
            ),
            Err(e) => tracing::error!(
                key_id,
                alias,
                error = %chain(&e),
                "creating the alias failed and the new KMS key could not be scheduled for \
                 deletion: delete it by hand"
            ),
        }
    }
}

fn spec_of(alg: KeyAlgorithm) -> KeySpec {
    match alg {
        KeyAlgorithm::EcP256 => KeySpec::EccNistP256,
        KeyAlgorithm::EcP384 => KeySpec::EccNistP384,
        KeyAlgorithm::Rsa2048 => KeySpec::Rsa2048,
        KeyAlgorithm::Rsa3072 => KeySpec::Rsa3072,
    }
}

fn alg_of_spec(spec: &KeySpec) -> Option<KeyAlgorithm> {
    Some(match spec {
        KeySpec::EccNistP256 => KeyAlgorithm::EcP256,
        KeySpec::EccNistP384 => KeyAlgorithm::EcP384,
        KeySpec::Rsa2048 => KeyAlgorithm::Rsa2048,
        KeySpec::Rsa3072 => KeyAlgorithm::Rsa3072,
        _ => return None,
    })
}

fn signing_algorithm(alg: KeyAlgorithm) -> SigningAlgorithmSpec {
    match alg {
        KeyAlgorithm::EcP256 => SigningAlgorithmSpec::EcdsaSha256,
        KeyAlgorithm::EcP384 => SigningAlgorithmSpec::EcdsaSha384,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => SigningAlgorithmSpec::RsassaPkcs1V15Sha256,
    }
}

#[async_trait]
impl KeyManager for AwsKmsManager {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn is_production_grade(&self) -> bool {
        true
    }

    async fn generate(&self, name: &str, alg: KeyAlgorithm) -> Result<Arc<dyn SigningKey>> {
        let alias = self.cfg.alias(name)?;
        // Refuse an existing name before creating (and paying for) a key.
        match self.describe(name, &alias).await {
            Ok(_) => return Err(Error::AlreadyExists(name.to_owned())),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let mut tags = Vec::with_capacity(self.cfg.tags.len() + 1);
        for (k, v) in self
            .cfg
            .tags
            .iter()
            .chain([(&TAG_KEY_NAME.to_owned(), &name.to_owned())])
        {
            tags.push(
                Tag::builder()
                    .tag_key(k)
                    .tag_value(v)
                    .build()
                    .map_err(|e| Error::Config(format!("aws_kms: tag {k:?}: {e}")))?,
            );
        }
        let created = self
            .client
            .create_key()
            .key_spec(spec_of(alg))
            .key_usage(KeyUsageType::SignVerify)
            .description(format!("SPIFFE CA signing key {name} ({alias})"))
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| map_sdk_error(e, "CreateKey", name, &alias))?;
        let md = created.key_metadata.ok_or_else(|| {
            Error::Backend(format!(
                "KMS CreateKey for {alias} returned no key metadata"
            ))
        })?;
        let key_id = md.key_id().to_owned();
        if let Err(e) = self
            .client
            .create_alias()
            .alias_name(&alias)
            .target_key_id(&key_id)
            .send()
            .await
        {
            let err = map_sdk_error(e, "CreateAlias", name, &alias);
            self.discard_new_key(&key_id, &alias).await;
            return Err(err);
        }
        tracing::info!(name, alias, key_id, %alg, "created KMS key");
        let key = self.handle(name, &alias, &md).await?;
        Ok(Arc::new(key))
    }

    async fn get(&self, name: &str) -> Result<Arc<dyn SigningKey>> {
        let alias = self.cfg.alias(name)?;
        let md = self.describe(name, &alias).await?;
        Ok(Arc::new(self.handle(name, &alias, &md).await?))
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let alias = self.cfg.alias(name)?;
        let md = self.describe(name, &alias).await?;
        let key_id = md.key_id().to_owned();
        // The key first: once scheduled it cannot sign, whatever happens to the alias. A retry
        // after a failed alias removal finds it pending already.
        if md.key_state() != Some(&KeyState::PendingDeletion) {
            self.client
                .schedule_key_deletion()
                .key_id(&key_id)
                .pending_window_in_days(DELETION_WINDOW_DAYS)
                .send()
                .await
                .map_err(|e| map_sdk_error(e, "ScheduleKeyDeletion", name, &alias))?;
        }
        self.client
            .delete_alias()
            .alias_name(&alias)
            .send()
            .await
            .map_err(|e| map_sdk_error(e, "DeleteAlias", name, &alias))?;
        tracing::info!(
            name,
            alias,
            key_id,
            days = DELETION_WINDOW_DAYS,
            "KMS key scheduled for deletion and its alias removed"
        );
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self
                .client
                .list_aliases()
                .set_marker(marker.take())
                .send()
                .await
                .map_err(|e| map_sdk_error(e, "ListAliases", "*", &self.cfg.alias_prefix))?;
            for a in out.aliases() {
                // An alias without a target key is left over and names no key.
                if a.target_key_id().is_none() {
                    continue;
                }
                if let Some(n) = a.alias_name().and_then(|a| self.cfg.name_of(a)) {
                    names.push(n);
                }
            }
            match out.next_marker() {
                Some(m) if out.truncated() => marker = Some(m.to_owned()),
                _ => break,
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn protection(&self, name: &str) -> Result<KeyProtection> {
        let alias = self.cfg.alias(name)?;
        let md = self.describe(name, &alias).await?;
        let s = |v: Option<&str>| v.unwrap_or("?").to_owned();
        let mut detail = format!(
            "KMS key {} ({alias}): KeyManager={} Origin={} KeyState={} KeySpec={} KeyUsage={}",
            md.arn().unwrap_or(md.key_id()),
            s(md.key_manager().map(|v| v.as_str())),
            s(md.origin().map(|v| v.as_str())),
            s(md.key_state().map(|v| v.as_str())),
            s(md.key_spec().map(|v| v.as_str())),
            s(md.key_usage().map(|v| v.as_str())),
        );
        if md.origin().map(|o| o.as_str()) == Some("EXTERNAL") {
            detail.push_str(" (imported key material: a copy exists outside KMS)");
        }
        // KMS has no operation that returns an asymmetric private key: never extractable.
        Ok(KeyProtection {
            extractable: false,
            detail,
        })
    }
}

/// A KMS key: its id, algorithm and public key (fetched once), and the client to sign with.
#[derive(Clone)]
pub struct AwsKmsKey {
    name: String,
    alias: String,
    key_id: String,
    alg: KeyAlgorithm,
    spki: Vec<u8>,
    client: Client,
}

impl fmt::Debug for AwsKmsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AwsKmsKey({}, {}, {})", self.name, self.alg, self.key_id)
    }
}

impl AwsKmsKey {
    /// The KMS key id signatures are requested from. Signing goes to the key, not
    /// the alias, so that a re-pointed alias cannot change which key signs.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The key's alias.
    pub fn alias(&self) -> &str {
        &self.alias
    }
}

#[async_trait]
impl SigningKey for AwsKmsKey {
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
        let (message, message_type) = if msg.len() <= MAX_RAW_MESSAGE {
            (msg.to_vec(), MessageType::Raw)
        } else {
            let d = match self.alg {
                KeyAlgorithm::EcP384 => &ring::digest::SHA384,
                _ => &ring::digest::SHA256,
            };
            (
                ring::digest::digest(d, msg).as_ref().to_vec(),
                MessageType::Digest,
            )
        };
        let out = self
            .client
            .sign()
            .key_id(&self.key_id)
            .message(Blob::new(message))
            .message_type(message_type)
            .signing_algorithm(signing_algorithm(self.alg))
            .send()
            .await
            .map_err(|e| map_sdk_error(e, "Sign", &self.name, &self.alias))?;
        let sig = out
            .signature
            .ok_or_else(|| {
                Error::Backend(format!(
                    "KMS Sign with {} returned no signature",
                    self.alias
                ))
            })?
            .into_inner();
        let ok = match self.alg {
            KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 => is_der_ecdsa(&sig),
            KeyAlgorithm::Rsa2048 => sig.len() == 256,
            KeyAlgorithm::Rsa3072 => sig.len() == 384,
        };
        if !ok {
            return Err(Error::Backend(format!(
                "KMS Sign with {} returned a malformed {} signature ({} bytes)",
                self.alias,
                self.alg,
                sig.len()
            )));
        }
        Ok(sig)
    }
}

/// Whether `sig` is a DER `SEQUENCE { r INTEGER, s INTEGER }` (what KMS returns for ECDSA).
fn is_der_ecdsa(sig: &[u8]) -> bool {
    fn tlv(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&t, rest) = b.split_first()?;
        if t != tag {
            return None;
        }
        let (&l, rest) = rest.split_first()?;
        let (len, rest) = match l {
            0..=0x7f => (l as usize, rest),
            0x81 => {
                let (&l2, rest) = rest.split_first()?;
                if l2 < 0x80 {
                    return None;
                }
                (l2 as usize, rest)
            }
            _ => return None,
        };
        (rest.len() >= len).then(|| rest.split_at(len))
    }
    let Some((body, after)) = tlv(sig, 0x30) else {
        return false;
    };
    if !after.is_empty() {
        return false;
    }
    let Some((r, body)) = tlv(body, 0x02) else {
        return false;
    };
    let Some((s, body)) = tlv(body, 0x02) else {
        return false;
    };
    body.is_empty() && !r.is_empty() && !s.is_empty()
}

const ACCESS_CODES: &[&str] = &[
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "MissingAuthenticationTokenException",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidAccessKeyId",
];

const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "LimitExceededException",
    "RequestLimitExceeded",
    "KMSInternalException",
    "DependencyTimeoutException",
    "KeyUnavailableException",
    "ServiceUnavailable",
    "InternalFailure",
    "RequestTimeout",
    "RequestTimeoutException",
];

const CONFIG_CODES: &[&str] = &[
    "ValidationException",
    "InvalidAliasNameException",
    "TagException",
    "InvalidArnException",
];

/// Maps an SDK error to this crate's error, naming the action and the key.
fn map_sdk_error<E>(e: SdkError<E>, action: &str, name: &str, alias: &str) -> Error
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let ctx = chain(&e);
    match &e {
        SdkError::TimeoutError(_) => Error::Unavailable(format!(
            "KMS {action} on {alias} timed out (every attempt or the whole operation): {ctx}"
        )),
        SdkError::DispatchFailure(d) => {
            if let Some(c) = credentials_error(&e) {
                return match c {
                    CredentialsError::ProviderTimedOut(_) => Error::Unavailable(format!(
                        "loading AWS credentials for KMS {action} on {alias} timed out: {ctx}"
                    )),
                    CredentialsError::InvalidConfiguration(_) => Error::Config(format!(
                        "invalid AWS credentials configuration for KMS {action} on {alias}: {ctx}"
                    )),
                    _ => Error::PermissionDenied(format!(
                        "no usable AWS credentials for KMS {action} on {alias}: {ctx}"
                    )),
                };
            }
            if d.is_user() {
                Error::Config(format!("KMS {action} on {alias} could not be sent: {ctx}"))
            } else {
                Error::Unavailable(format!(
                    "cannot reach the KMS endpoint for {action} on {alias}: {ctx}"
                ))
            }
        }
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            let code = s.err().code().unwrap_or("");
            let message = s.err().message().unwrap_or("");
            let what = if code.is_empty() {
                format!("HTTP {status}, answer: {}", excerpt(s.raw()))
            } else {
                format!("{code}: {message}")
            };
            match code {
                "NotFoundException" => Error::NotFound(name.to_owned()),
                "AlreadyExistsException" => Error::AlreadyExists(name.to_owned()),
                "DisabledException" => Error::Unavailable(format!(
                    "KMS key {alias} is disabled, {action} refused ({what}); enable the key in \
                     KMS or move to another key"
                )),
                "KMSInvalidStateException" => Error::Unavailable(format!(
                    "KMS key {alias} is not in a state that allows {action} (it is pending \
                     deletion, disabled, or not ready yet): {what}"
                )),
                c if ACCESS_CODES.contains(&c) => Error::PermissionDenied(format!(
                    "KMS refused {action} on {alias} for these credentials: {what}"
                )),
                c if TRANSIENT_CODES.contains(&c) => Error::Unavailable(format!(
                    "KMS {action} on {alias} failed after all retries: {what}"
                )),
                c if CONFIG_CODES.contains(&c) => Error::Config(format!(
                    "KMS rejected {action} on {alias} as invalid: {what}"
                )),
                _ if status == 401 || status == 403 => Error::PermissionDenied(format!(
                    "KMS refused {action} on {alias} (HTTP {status}): {what}"
                )),
                _ if status >= 500 || status == 429 => Error::Unavailable(format!(
                    "KMS {action} on {alias} failed after all retries (HTTP {status}): {what}"
                )),
                _ => Error::Backend(format!("KMS {action} on {alias} failed: {what}")),
            }
        }
        SdkError::ResponseError(r) => {
            let status = r.raw().status().as_u16();
            let ctx = format!("{ctx}; answer: {}", excerpt(r.raw()));
            if status == 401 || status == 403 {
                Error::PermissionDenied(format!(
                    "KMS refused {action} on {alias} (HTTP {status}): {ctx}"
                ))
            } else if status >= 500 || status == 429 {
                Error::Unavailable(format!(
                    "KMS {action} on {alias} failed after all retries (HTTP {status}): {ctx}"
                ))
            } else {
                Error::Backend(format!(
                    "KMS {action} on {alias}: unreadable answer (HTTP {status}): {ctx}"
                ))
            }
        }
        _ => Error::Backend(format!("KMS {action} on {alias} failed: {ctx}")),
    }
}

/// `e` and its sources joined by ": " (what `DisplayErrorContext` says, without the Debug
/// dump it appends).
fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = String::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !s.is_empty() && !out.ends_with(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
        cur = err.source();
    }
    out
}

/// The start of an answer's body, on one line, for errors the SDK could not parse.
fn excerpt(raw: &aws_sdk_kms::config::http::HttpResponse) -> String {
    let text = raw
        .body()
        .bytes()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &one_line[..i]),
        None if one_line.is_empty() => "(empty)".into(),
        None => one_line,
    }
}

/// The credentials error somewhere in `e`'s source chain, if loading credentials failed.
fn credentials_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a CredentialsError> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(c) = err.downcast_ref::<CredentialsError>() {
            return Some(c);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AwsKmsConfig {
        let mut c = AwsKmsConfig::for_node("prod.example.org", "node-1");
        c.region = Some("eu-west-1".into());
        c
    }

    #[test]
    fn for_node_is_valid_and_maps_names() {
        let c = cfg();
        c.validate().unwrap();
        assert_eq!(c.alias_prefix, "spiffe-ca/prod_example_org/node-1/");
        let a = c.alias("root-2026.01_a").unwrap();
        assert_eq!(a, "alias/spiffe-ca/prod_example_org/node-1/root-2026/01_a");
        assert_eq!(c.name_of(&a).as_deref(), Some("root-2026.01_a"));
        assert_eq!(
            c.name_of("alias/spiffe-ca/prod_example_org/node-10/x"),
            None
        );
        assert_eq!(c.name_of("alias/other"), None);
        assert!(matches!(c.alias("bad/name"), Err(Error::Config(_))));
        assert!(c.alias(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn validation_says_what_is_wrong() {
        let check = |f: &dyn Fn(&mut AwsKmsConfig), needle: &str| {
            let mut c = cfg();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        };
        check(
            &|c| c.alias_prefix = "spiffe-ca/prod.example.org/n/".into(),
            "alias_prefix",
        );
        check(&|c| c.alias_prefix = "no-slash".into(), "end with /");
        check(&|c| c.alias_prefix = "aws/x/".into(), "reserved");
        check(
            &|c| {
                c.tags.remove(TAG_NODE_ID);
            },
            TAG_NODE_ID,
        );
        check(
            &|c| {
                c.tags.insert("aws:x".into(), "y".into());
            },
            "aws:",
        );
        check(&|c| c.region = Some("EU West".into()), "region");
        check(
            &|c| c.endpoint_url = Some("localhost:4566".into()),
            "endpoint_url",
        );
        check(&|c| c.max_attempts = 0, "max_attempts");
        check(&|c| c.attempt_timeout_ms = 60_000, "attempt_timeout_ms");
        check(&|c| c.initial_backoff_ms = 0, "initial_backoff_ms");
    }

    #[test]
    fn config_deserializes_strictly() {
        #[derive(Deserialize)]
        struct W {
            aws: AwsKmsConfig,
        }
        let json = r#"{"aws": {"region": "eu-west-1", "alias_prefix": "spiffe-ca/td/n1/",
            "tags": {"spiffe-ca:trust-domain": "td", "spiffe-ca:node-id": "n1"},
            "max_attempts": 3}}"#;
        let w: W = serde_json::from_str(json).unwrap();
        assert_eq!(w.aws.max_attempts, 3);
        assert_eq!(w.aws.operation_timeout_ms, default_operation_timeout_ms());
        w.aws.validate().unwrap();
        let bad = json.replace("max_attempts", "max_attempt");
        assert!(serde_json::from_str::<W>(&bad)
            .err()
            .unwrap()
            .to_string()
            .contains("unknown field"));
    }

    #[test]
    fn der_ecdsa_check() {
        assert!(is_der_ecdsa(&[
            0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02
        ]));
        assert!(!is_der_ecdsa(&[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01]));
        assert!(!is_der_ecdsa(&[
            0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02, 0x00
        ]));
        assert!(!is_der_ecdsa(&[0u8; 64]));
    }
}
