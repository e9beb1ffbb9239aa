//! The AWS KMS backend against a KMS emulator (moto, `pip install 'moto[server]'`) started on
//! 127.0.0.1 by this test binary ([`ca_test_support::moto`]). A missing python3 or moto fails
//! the tests, it never skips them.
//!
//! Faults the emulator cannot produce (throttling, refused credentials, an outage, a slow
//! answer) come from a small HTTP proxy in front of it that answers chosen KMS actions itself
//! ([`ca_test_support::kms_proxy`]).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{future, ProvideCredentials};
use base64::Engine as _;
use ca_kms::aws_kms::{AwsKmsConfig, AwsKmsManager, TAG_KEY_NAME, TAG_NODE_ID};
use ca_kms::{Error, KeyAlgorithm, KeyManager, SigningKey};
use ca_test_support::kms_proxy::{Proxy, Rule};
use ca_test_support::moto::{self, Moto};

fn config(test: &str, endpoint: &str) -> AwsKmsConfig {
    moto::fast_config("test.example.org", test, endpoint)
}

async fn manager(test: &str, endpoint: &str) -> AwsKmsManager {
    AwsKmsManager::connect(config(test, endpoint))
        .await
        .unwrap()
}

/// The Debug form of a key handle, which names the KMS key it signs with.
fn debug_of(key: &Arc<dyn SigningKey>) -> String {
    format!("{key:?}")
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// The shared suite, with every algorithm: moto 5.2 creates and signs (RAW) with P-256, P-384,
/// RSA 2048 and RSA 3072 keys.
#[tokio::test]
async fn conforms_against_the_emulator() {
    let m = moto::shared();
    let cfg = config("conformance", &m.url());
    let sdk = cfg.sdk_config_loader().load().await;
    conformance_with(cfg, sdk).await;
}

async fn conformance_with(cfg: AwsKmsConfig, sdk: SdkConfig) {
    crate::common::conformance(
        move || {
            let km = AwsKmsManager::with_sdk_config(cfg.clone(), &sdk).unwrap();
            assert!(km.is_production_grade());
            assert_eq!(km.backend(), "aws_kms");
            Arc::new(km)
        },
        &[
            KeyAlgorithm::EcP256,
            KeyAlgorithm::EcP384,
            KeyAlgorithm::Rsa2048,
            KeyAlgorithm::Rsa3072,
        ],
        false,
    )
    .await;
}

/// `openssl` (an independent implementation) verifies what KMS signed.
#[tokio::test]
async fn openssl_verifies_kms_signatures() {
    let m = moto::shared();
    let km = manager("openssl", &m.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let msg = b"a TBSCertificate, or a JWT signing input";
    let msg_path = dir.path().join("msg");
    std::fs::write(&msg_path, msg).unwrap();
    for (alg, digest) in [
        (KeyAlgorithm::EcP256, "-sha256"),
        (KeyAlgorithm::EcP384, "-sha384"),
        (KeyAlgorithm::Rsa2048, "-sha256"),
    ] {
        let key = km.generate(&format!("ossl-{alg}"), alg).await.unwrap();
        let sig = key.sign(msg).await.unwrap();
        let pubp = dir.path().join(format!("{alg}.pub.der"));
        let sigp = dir.path().join(format!("{alg}.sig"));
        std::fs::write(&pubp, key.public_key_spki()).unwrap();
        std::fs::write(&sigp, &sig).unwrap();
        let out = Command::new("openssl")
            .args(["dgst", digest, "-verify"])
            .arg(&pubp)
            .args(["-keyform", "DER", "-signature"])
            .arg(&sigp)
            .arg(&msg_path)
            .output()
            .expect("openssl must be installed for this test");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Verified OK"),
            "openssl rejects the {alg} signature: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A changed message is rejected by openssl too.
        std::fs::write(dir.path().join("other"), b"other").unwrap();
        let bad = Command::new("openssl")
            .args(["dgst", digest, "-verify"])
            .arg(&pubp)
            .args(["-keyform", "DER", "-signature"])
            .arg(&sigp)
            .arg(dir.path().join("other"))
            .output()
            .unwrap();
        assert!(!bad.status.success());
    }
}

/// Keys carry the configured tags, KMS metadata backs `protection`, and `delete` schedules
/// the deletion (7 days) and removes the alias.
#[tokio::test]
async fn tags_protection_and_scheduled_deletion() {
    let m = moto::shared();
    let km = manager("lifecycle", &m.url()).await;
    let key = km.generate("root-1.a", KeyAlgorithm::EcP256).await.unwrap();
    let alias = km.alias_for("root-1.a").unwrap();
    assert_eq!(alias, "alias/spiffe-ca/test_example_org/lifecycle/root-1/a");
    let md = km
        .client()
        .describe_key()
        .key_id(&alias)
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap();
    let key_id = md.key_id().to_owned();
    assert!(debug_of(&key).contains(&key_id), "{key:?}");
    let tags = km
        .client()
        .list_resource_tags()
        .key_id(&key_id)
        .send()
        .await
        .unwrap();
    let tags: BTreeMap<_, _> = tags
        .tags()
        .iter()
        .map(|t| (t.tag_key().to_owned(), t.tag_value().to_owned()))
        .collect();
    assert_eq!(
        tags.get("spiffe-ca:trust-domain").map(String::as_str),
        Some("test.example.org")
    );
    assert_eq!(tags.get(TAG_NODE_ID).map(String::as_str), Some("lifecycle"));
    assert_eq!(tags.get(TAG_KEY_NAME).map(String::as_str), Some("root-1.a"));

    let prot = km.protection("root-1.a").await.unwrap();
    assert!(!prot.extractable);
    for needle in [
        "KeyManager=CUSTOMER",
        "Origin=AWS_KMS",
        "KeyState=Enabled",
        "KeySpec=ECC_NIST_P256",
        "KeyUsage=SIGN_VERIFY",
    ] {
        assert!(prot.detail.contains(needle), "{}", prot.detail);
    }
    assert_eq!(km.list().await.unwrap(), vec!["root-1.a".to_string()]);

    // A message at the RAW limit still goes RAW and verifies.
    let big = vec![7u8; ca_kms::aws_kms::MAX_RAW_MESSAGE];
    let sig = key.sign(&big).await.unwrap();
    ca_identity::pubkey::verify_x509_signature(key.public_key_spki(), &big, &sig).unwrap();

    km.delete("root-1.a").await.unwrap();
    let md = km
        .client()
        .describe_key()
        .key_id(&key_id)
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap();
    assert_eq!(md.key_state().map(|s| s.as_str()), Some("PendingDeletion"));
    assert!(md.deletion_date().is_some());
    assert!(km.list().await.unwrap().is_empty());
    assert!(matches!(km.get("root-1.a").await, Err(Error::NotFound(_))));
    assert!(matches!(
        km.delete("root-1.a").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        km.protection("root-1.a").await,
        Err(Error::NotFound(_))
    ));
    // moto 5.2 still signs with a key pending deletion (real KMS answers
    // KMSInvalidStateException): that answer's mapping is checked in
    // `disabled_and_deleted_keys_are_reported` through the proxy.
}

/// A disabled key, or one pending deletion, fails to sign with a clear error. moto 5.2 keeps
/// the key state (DescribeKey reports it) but still signs with such keys, so the refusals
/// real KMS sends (DisabledException, KMSInvalidStateException) come from the proxy.
#[tokio::test]
async fn disabled_and_deleted_keys_are_reported() {
    let m = moto::shared();
    let proxy = Proxy::start(m.port()).await;
    let km = manager("disabled", &proxy.url()).await;
    let key = km.generate("k", KeyAlgorithm::EcP256).await.unwrap();
    let alias = km.alias_for("k").unwrap();
    // DisableKey takes a key id, not an alias.
    let md = km
        .client()
        .describe_key()
        .key_id(&alias)
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap();
    km.client()
        .disable_key()
        .key_id(md.key_id())
        .send()
        .await
        .unwrap();
    let prot = km.protection("k").await.unwrap();
    assert!(prot.detail.contains("KeyState=Disabled"), "{}", prot.detail);
    assert!(!prot.extractable);

    proxy.rule(Rule::error(
        "Sign",
        Some(1),
        400,
        "DisabledException",
        &format!("{} is disabled.", md.arn().unwrap_or_default()),
    ));
    let err = key.sign(b"m").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    let s = err.to_string();
    assert!(
        s.contains("disabled") && s.contains(&alias) && s.contains("Sign"),
        "{s}"
    );

    proxy.rule(Rule::error(
        "Sign",
        Some(1),
        400,
        "KMSInvalidStateException",
        &format!("{} is pending deletion.", md.arn().unwrap_or_default()),
    ));
    let err = key.sign(b"m").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    let s = err.to_string();
    assert!(s.contains("pending deletion") && s.contains(&alias), "{s}");
}

/// Messages above the RAW limit are hashed here and sent as DIGEST. The emulator signs a
/// DIGEST wrongly (it hashes it again), so only the request is checked, not the signature.
#[tokio::test]
async fn long_messages_are_sent_as_digest() {
    let m = moto::shared();
    let proxy = Proxy::start(m.port()).await;
    let km = manager("digest", &proxy.url()).await;
    for (alg, d) in [
        (KeyAlgorithm::EcP256, &ring::digest::SHA256),
        (KeyAlgorithm::EcP384, &ring::digest::SHA384),
        (KeyAlgorithm::Rsa2048, &ring::digest::SHA256),
    ] {
        let key = km.generate(&format!("d-{alg}"), alg).await.unwrap();
        let msg = vec![1u8; ca_kms::aws_kms::MAX_RAW_MESSAGE + 1];
        key.sign(&msg).await.unwrap();
        let body = proxy.last_body("Sign").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["MessageType"], "DIGEST");
        let sent = base64::engine::general_purpose::STANDARD
            .decode(v["Message"].as_str().unwrap())
            .unwrap();
        assert_eq!(sent, ring::digest::digest(d, &msg).as_ref());
        let want_alg = match alg {
            KeyAlgorithm::EcP256 => "ECDSA_SHA_256",
            KeyAlgorithm::EcP384 => "ECDSA_SHA_384",
            _ => "RSASSA_PKCS1_V1_5_SHA_256",
        };
        assert_eq!(v["SigningAlgorithm"], want_alg);
    }
}

/// Throttling is retried with backoff until it stops; when it never stops, the error is
/// Unavailable after exactly `max_attempts` tries. 5xx answers are retried too.
#[tokio::test]
async fn throttling_is_retried() {
    let m = moto::shared();
    let proxy = Proxy::start(m.port()).await;
    let mut cfg = config("throttle", &proxy.url());
    cfg.max_attempts = 4;
    let km = AwsKmsManager::connect(cfg).await.unwrap();
    let key = km.generate("k", KeyAlgorithm::EcP256).await.unwrap();

    proxy.rule(Rule::error(
        "Sign",
        Some(3),
        400,
        "ThrottlingException",
        "Rate exceeded",
    ));
    let before = proxy.count("Sign");
    let sig = key.sign(b"busy").await.unwrap();
    ca_identity::pubkey::verify_x509_signature(key.public_key_spki(), b"busy", &sig).unwrap();
    assert_eq!(proxy.count("Sign") - before, 4, "3 throttled + 1 ok");

    proxy.rule(Rule::error(
        "Sign",
        Some(2),
        400,
        "LimitExceededException",
        "too many",
    ));
    let before = proxy.count("Sign");
    key.sign(b"busy").await.unwrap();
    assert_eq!(proxy.count("Sign") - before, 3);

    proxy.rule(Rule::error(
        "Sign",
        Some(2),
        500,
        "KMSInternalException",
        "oops",
    ));
    let before = proxy.count("Sign");
    key.sign(b"busy").await.unwrap();
    assert_eq!(proxy.count("Sign") - before, 3);

    proxy.clear_rules();
    proxy.rule(Rule::error(
        "Sign",
        None,
        400,
        "ThrottlingException",
        "Rate exceeded",
    ));
    let before = proxy.count("Sign");
    let err = key.sign(b"busy").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("ThrottlingException"), "{err}");
    assert!(err.to_string().contains("Sign"), "{err}");
    assert_eq!(proxy.count("Sign") - before, 4, "max_attempts tries");
    proxy.clear_rules();
    key.sign(b"calm").await.unwrap();
}

/// The endpoint going away is Unavailable (quickly, not a hang); when it comes back the same
/// manager and key handle work again.
#[tokio::test]
async fn outage_is_unavailable_and_recovers() {
    let m = moto::shared();
    let proxy = Proxy::start(m.port()).await;
    let km = manager("outage", &proxy.url()).await;
    let key = km.generate("k", KeyAlgorithm::EcP256).await.unwrap();
    key.sign(b"before").await.unwrap();

    proxy.stop();
    let t = Instant::now();
    let err = key.sign(b"during").await.unwrap_err();
    eprintln!("endpoint down: {err}");
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("Sign"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let err = km.get("k").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");

    proxy.restart().await;
    let sig = key.sign(b"after").await.unwrap();
    ca_identity::pubkey::verify_x509_signature(key.public_key_spki(), b"after", &sig).unwrap();
    km.get("k").await.unwrap();
}

/// A KMS that does not answer in time is Unavailable within the operation timeout.
#[tokio::test]
async fn slow_kms_times_out() {
    let m = moto::shared();
    let proxy = Proxy::start(m.port()).await;
    let mut cfg = config("slow", &proxy.url());
    cfg.attempt_timeout_ms = 300;
    cfg.operation_timeout_ms = 1_000;
    cfg.max_attempts = 2;
    let km = AwsKmsManager::connect(cfg).await.unwrap();
    let key = km.generate("k", KeyAlgorithm::EcP256).await.unwrap();
    proxy.rule(Rule::slow("Sign", None, Duration::from_secs(3)));
    let t = Instant::now();
    let err = key.sign(b"m").await.unwrap_err();
    eprintln!("slow endpoint: {err}");
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(
        t.elapsed() < Duration::from_millis(2_500),
        "{:?}",
        t.elapsed()
    );
    proxy.clear_rules();
    key.sign(b"m").await.unwrap();
}

/// Refused credentials are PermissionDenied naming the action and the key. moto accepts any
/// credentials by default, so the refusals come from the proxy (UnrecognizedClientException,
/// AccessDeniedException) and from a second moto that enforces authentication
/// (`INITIAL_NO_AUTH_ACTION_COUNT=0`: unknown access keys get HTTP 403 InvalidClientTokenId).
#[tokio::test]
async fn refused_credentials_are_permission_denied() {
    let m = moto::shared();
    let proxy = Proxy::start(m.port()).await;
    let km = manager("denied", &proxy.url()).await;
    let key = km.generate("k", KeyAlgorithm::EcP256).await.unwrap();
    let alias = km.alias_for("k").unwrap();

    proxy.rule(Rule::error(
        "Sign",
        Some(1),
        400,
        "UnrecognizedClientException",
        "The security token included in the request is invalid.",
    ));
    let err = key.sign(b"m").await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    let s = err.to_string();
    assert!(
        s.contains("Sign") && s.contains(&alias) && s.contains("UnrecognizedClient"),
        "{s}"
    );

    proxy.rule(Rule::error(
        "DescribeKey",
        Some(1),
        400,
        "AccessDeniedException",
        "User: arn:aws:iam::123456789012:user/ca is not authorized to perform: kms:DescribeKey",
    ));
    let err = km.get("k").await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    let s = err.to_string();
    assert!(s.contains("DescribeKey") && s.contains(&alias), "{s}");
    assert_eq!(err.kind(), "permission_denied");

    // A real refusal from an emulator that checks credentials.
    let strict = Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let km = manager("denied", &strict.url()).await;
    let err = km.get("k").await.unwrap_err();
    eprintln!("emulator refusing credentials: {err}");
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    assert!(err.to_string().contains("DescribeKey"), "{err}");
    let err = km.generate("k2", KeyAlgorithm::EcP256).await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    drop(strict);
}

#[derive(Debug)]
struct NoCredentials;

impl ProvideCredentials for NoCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(Err(CredentialsError::not_loaded(
            "no credentials in this environment",
        )))
    }
}

/// No credentials at all: PermissionDenied before anything is sent.
#[tokio::test]
async fn missing_credentials_are_permission_denied() {
    let m = moto::shared();
    let cfg = config("nocreds", &m.url());
    let sdk = cfg
        .sdk_config_loader()
        .credentials_provider(NoCredentials)
        .load()
        .await;
    let km = AwsKmsManager::with_sdk_config(cfg, &sdk).unwrap();
    let err = km.get("k").await.unwrap_err();
    eprintln!("no credentials: {err}");
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    assert!(err.to_string().contains("credentials"), "{err}");
}

/// A failed CreateAlias leaves no usable key behind: the new key is scheduled for deletion.
/// A name taken between the check and CreateAlias is AlreadyExists, also without a leak.
/// A public key that cannot be read back after the alias exists: key and alias go too.
#[tokio::test]
async fn failed_alias_creation_does_not_leak_keys() {
    let m = moto::shared();
    let proxy = Proxy::start(m.port()).await;
    let km = manager("leak", &proxy.url()).await;

    proxy.rule(Rule::error(
        "CreateAlias",
        Some(1),
        400,
        "AccessDeniedException",
        "not authorized to perform: kms:CreateAlias",
    ));
    let err = km.generate("k", KeyAlgorithm::EcP256).await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    assert!(err.to_string().contains("CreateAlias"), "{err}");
    assert_eq!(
        keys_named(&km, "k").await,
        vec!["PendingDeletion".to_string()]
    );
    assert!(matches!(km.get("k").await, Err(Error::NotFound(_))));

    // The name works once the refusal is gone.
    km.generate("k", KeyAlgorithm::EcP256).await.unwrap();
    // A race: the existence check misses the alias, CreateAlias then finds it.
    proxy.rule(Rule::error(
        "DescribeKey",
        Some(1),
        400,
        "NotFoundException",
        "Alias is not found.",
    ));
    let err = km.generate("k", KeyAlgorithm::EcP256).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    let mut states = keys_named(&km, "k").await;
    states.sort();
    assert_eq!(states, ["Enabled", "PendingDeletion", "PendingDeletion"]);

    // The public key cannot be read back after CreateKey and CreateAlias: the new key is
    // scheduled for deletion and its alias removed, so the name is free again.
    proxy.rule(Rule::error(
        "GetPublicKey",
        Some(1),
        400,
        "KMSInvalidStateException",
        "injected: not ready",
    ));
    let err = km.generate("k2", KeyAlgorithm::EcP256).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("GetPublicKey"), "{err}");
    assert_eq!(
        keys_named(&km, "k2").await,
        vec!["PendingDeletion".to_string()]
    );
    assert!(matches!(km.get("k2").await, Err(Error::NotFound(_))));
    assert!(!km.list().await.unwrap().contains(&"k2".to_string()));
    km.generate("k2", KeyAlgorithm::EcP256).await.unwrap();
}

/// The states of the KMS keys tagged with this manager's node and `name`.
async fn keys_named(km: &AwsKmsManager, name: &str) -> Vec<String> {
    let node = km.config().tags[TAG_NODE_ID].clone();
    let mut out = Vec::new();
    let keys = km.client().list_keys().limit(1000).send().await.unwrap();
    for k in keys.keys() {
        let id = k.key_id().unwrap();
        let tags = km
            .client()
            .list_resource_tags()
            .key_id(id)
            .send()
            .await
            .unwrap();
        let has = |key: &str, val: &str| {
            tags.tags()
                .iter()
                .any(|t| t.tag_key() == key && t.tag_value() == val)
        };
        if has(TAG_NODE_ID, &node) && has(TAG_KEY_NAME, name) {
            let md = km.client().describe_key().key_id(id).send().await.unwrap();
            out.push(
                md.key_metadata
                    .unwrap()
                    .key_state()
                    .unwrap()
                    .as_str()
                    .to_owned(),
            );
        }
    }
    out
}

/// Many concurrent signatures through one client, checked; the requests overlap in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_signing() {
    let m = moto::shared();
    let km = manager("parallel", &m.url()).await;
    let key = km.generate("k", KeyAlgorithm::EcP256).await.unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let key = key.clone();
        set.spawn(async move {
            let msg = i.to_be_bytes();
            let sig = key.sign(&msg).await.unwrap();
            ca_identity::pubkey::verify_x509_signature(key.public_key_spki(), &msg, &sig).unwrap();
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

/// An invalid configuration is refused before any request.
#[tokio::test]
async fn invalid_config_is_refused() {
    let mut c = config("bad", "http://127.0.0.1:1");
    c.alias_prefix = "spiffe-ca/test.example.org/bad/".into();
    let err = AwsKmsManager::connect(c).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains("alias_prefix"), "{err}");
}
