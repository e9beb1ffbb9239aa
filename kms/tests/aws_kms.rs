//! The AWS KMS backend against a KMS emulator (moto, `pip install 'moto[server]'`) started on
//! 127.0.0.1 by this test binary. A missing python3 or moto fails the tests, it never skips
//! them.
//!
//! Faults the emulator cannot produce (throttling, refused credentials, an outage, a slow
//! answer) come from a small HTTP proxy in front of it that answers chosen KMS actions itself.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{future, ProvideCredentials};
use base64::Engine as _;
use bytes::Bytes;
use ca_kms::aws_kms::{AwsKmsConfig, AwsKmsManager, TAG_KEY_NAME, TAG_NODE_ID};
use ca_kms::{Error, KeyAlgorithm, KeyManager, SigningKey};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

mod common;

// ---------------------------------------------------------------------------------------------
// The emulator.

/// Runs moto's server in a thread of a Python process that exits when its stdin closes, so it
/// also goes away when this test binary ends without dropping the guard (a static).
const MOTO_LAUNCHER: &str = r#"
import os, sys
try:
    from moto.server import ThreadedMotoServer
except Exception as e:
    sys.stderr.write("cannot import moto: %s\n" % e)
    sys.exit(3)
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
srv.start()
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()
os._exit(0)
"#;

const INSTALL_HINT: &str = "the AWS KMS tests need python3 with moto's server: \
     `python3 -m pip install 'moto[server]==5.2.1'` (ops/scripts/test-all.sh installs it)";

/// A moto server process; killed on drop.
struct Moto {
    child: Child,
    _stdin: ChildStdin,
    port: u16,
    _log: tempfile::NamedTempFile,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    fn start(env: &[(&str, &str)]) -> Moto {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new("python3");
        cmd.arg("-c")
            .arg(MOTO_LAUNCHER)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log.reopen().unwrap()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("cannot run python3 ({e}): {INSTALL_HINT}"),
        };
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        if line.trim() != "ready" {
            let _ = child.kill();
            let status = child.wait().ok();
            let mut err = String::new();
            let _ = log.reopen().unwrap().read_to_string(&mut err);
            panic!(
                "the KMS emulator did not start (exit {status:?}): {}\n{INSTALL_HINT}",
                err.trim()
            );
        }
        // It answers once it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto does not answer on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto {
            child,
            _stdin: stdin,
            port,
            _log: log,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The emulator shared by the tests of this binary (each test uses its own alias prefix).
fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        // Dummy credentials through the standard chain, and nothing from this machine's own
        // AWS configuration. Set before any test builds a client (they all wait here first).
        let none = std::env::temp_dir().join("ca-kms-aws-test-no-such-file");
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::remove_var("AWS_SESSION_TOKEN");
        std::env::remove_var("AWS_PROFILE");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("AWS_CONFIG_FILE", &none);
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", &none);
        Moto::start(&[])
    })
}

fn config(test: &str, endpoint: &str) -> AwsKmsConfig {
    let mut c = AwsKmsConfig::for_node("test.example.org", test);
    c.region = Some("us-east-1".into());
    c.endpoint_url = Some(endpoint.to_owned());
    c.attempt_timeout_ms = 3_000;
    c.operation_timeout_ms = 10_000;
    c.initial_backoff_ms = 20;
    c.max_backoff_ms = 200;
    c
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
// A fault-injecting proxy in front of the emulator.

#[derive(Clone)]
struct Rule {
    /// The KMS action (`Sign`, `CreateAlias`, ...), from `X-Amz-Target`.
    action: &'static str,
    /// How many requests it applies to; `None`: all.
    times: Option<u32>,
    /// Wait this long first.
    delay: Duration,
    /// Then answer with this status and JSON body; `None`: forward to the emulator.
    answer: Option<(u16, String)>,
}

impl Rule {
    fn error(action: &'static str, times: Option<u32>, status: u16, code: &str, msg: &str) -> Rule {
        Rule {
            action,
            times,
            delay: Duration::ZERO,
            answer: Some((
                status,
                serde_json::json!({"__type": code, "message": msg}).to_string(),
            )),
        }
    }
}

#[derive(Default)]
struct ProxyState {
    rules: Mutex<Vec<Rule>>,
    /// Every request seen: action and body.
    seen: Mutex<Vec<(String, Bytes)>>,
}

impl ProxyState {
    fn count(&self, action: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, _)| a == action)
            .count()
    }
}

struct Proxy {
    addr: SocketAddr,
    upstream: u16,
    state: Arc<ProxyState>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = Proxy {
            addr: listener.local_addr().unwrap(),
            upstream,
            state: Arc::default(),
            task: Mutex::new(None),
        };
        p.serve(listener);
        p
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn rule(&self, r: Rule) {
        self.state.rules.lock().unwrap().push(r);
    }

    fn clear_rules(&self) {
        self.state.rules.lock().unwrap().clear();
    }

    /// Stops listening and drops every open connection: the endpoint is gone.
    fn stop(&self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
    }

    /// Listens again on the same address.
    async fn restart(&self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let state = self.state.clone();
        let upstream = self.upstream;
        let task = tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build_http::<Full<Bytes>>();
            // Dropped with this task when it is aborted: every connection ends with it.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                let client = client.clone();
                let svc = hyper::service::service_fn(move |req| {
                    handle(req, state.clone(), client.clone(), upstream)
                });
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

async fn handle(
    req: Request<Incoming>,
    state: Arc<ProxyState>,
    client: HttpClient,
    upstream: u16,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let action = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("")
        .to_owned();
    state
        .seen
        .lock()
        .unwrap()
        .push((action.clone(), body.clone()));
    let rule = {
        let mut rules = state.rules.lock().unwrap();
        rules
            .iter_mut()
            .find(|r| r.action == action && r.times != Some(0))
            .map(|r| {
                if let Some(n) = r.times.as_mut() {
                    *n -= 1;
                }
                r.clone()
            })
    };
    if let Some(r) = &rule {
        tokio::time::sleep(r.delay).await;
        if let Some((status, body)) = &r.answer {
            return Ok(Response::builder()
                .status(*status)
                .header("content-type", "application/x-amz-json-1.1")
                .header("x-amzn-requestid", "fault-injected")
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap());
        }
    }
    let uri = format!(
        "http://127.0.0.1:{upstream}{}",
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let mut fwd = Request::builder().method(parts.method).uri(uri);
    for (k, v) in &parts.headers {
        fwd = fwd.header(k, v);
    }
    let answer = match client.request(fwd.body(Full::new(body)).unwrap()).await {
        Ok(a) => a,
        Err(e) => {
            return Ok(Response::builder()
                .status(502)
                .body(Full::new(Bytes::from(format!("upstream: {e}"))))
                .unwrap())
        }
    };
    let (aparts, abody) = answer.into_parts();
    let abody = abody
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut out = Response::builder().status(aparts.status);
    for (k, v) in &aparts.headers {
        if !matches!(
            k.as_str(),
            "transfer-encoding" | "connection" | "content-length"
        ) {
            out = out.header(k, v);
        }
    }
    Ok(out.body(Full::new(abody)).unwrap())
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// The shared suite, with every algorithm: moto 5.2 creates and signs (RAW) with P-256, P-384,
/// RSA 2048 and RSA 3072 keys.
#[tokio::test]
async fn conforms_against_the_emulator() {
    let m = moto();
    let cfg = config("conformance", &m.url());
    let sdk = cfg.sdk_config_loader().load().await;
    conformance_with(cfg, sdk).await;
}

async fn conformance_with(cfg: AwsKmsConfig, sdk: SdkConfig) {
    common::conformance(
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
    let m = moto();
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
    let m = moto();
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
    let m = moto();
    let proxy = Proxy::start(m.port).await;
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
    let m = moto();
    let proxy = Proxy::start(m.port).await;
    let km = manager("digest", &proxy.url()).await;
    for (alg, d) in [
        (KeyAlgorithm::EcP256, &ring::digest::SHA256),
        (KeyAlgorithm::EcP384, &ring::digest::SHA384),
        (KeyAlgorithm::Rsa2048, &ring::digest::SHA256),
    ] {
        let key = km.generate(&format!("d-{alg}"), alg).await.unwrap();
        let msg = vec![1u8; ca_kms::aws_kms::MAX_RAW_MESSAGE + 1];
        key.sign(&msg).await.unwrap();
        let seen = proxy.state.seen.lock().unwrap();
        let body = &seen.iter().rev().find(|(a, _)| a == "Sign").unwrap().1;
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
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
    let m = moto();
    let proxy = Proxy::start(m.port).await;
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
    let before = proxy.state.count("Sign");
    let sig = key.sign(b"busy").await.unwrap();
    ca_identity::pubkey::verify_x509_signature(key.public_key_spki(), b"busy", &sig).unwrap();
    assert_eq!(proxy.state.count("Sign") - before, 4, "3 throttled + 1 ok");

    proxy.rule(Rule::error(
        "Sign",
        Some(2),
        400,
        "LimitExceededException",
        "too many",
    ));
    let before = proxy.state.count("Sign");
    key.sign(b"busy").await.unwrap();
    assert_eq!(proxy.state.count("Sign") - before, 3);

    proxy.rule(Rule::error(
        "Sign",
        Some(2),
        500,
        "KMSInternalException",
        "oops",
    ));
    let before = proxy.state.count("Sign");
    key.sign(b"busy").await.unwrap();
    assert_eq!(proxy.state.count("Sign") - before, 3);

    proxy.clear_rules();
    proxy.rule(Rule::error(
        "Sign",
        None,
        400,
        "ThrottlingException",
        "Rate exceeded",
    ));
    let before = proxy.state.count("Sign");
    let err = key.sign(b"busy").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("ThrottlingException"), "{err}");
    assert!(err.to_string().contains("Sign"), "{err}");
    assert_eq!(proxy.state.count("Sign") - before, 4, "max_attempts tries");
    proxy.clear_rules();
    key.sign(b"calm").await.unwrap();
}

/// The endpoint going away is Unavailable (quickly, not a hang); when it comes back the same
/// manager and key handle work again.
#[tokio::test]
async fn outage_is_unavailable_and_recovers() {
    let m = moto();
    let proxy = Proxy::start(m.port).await;
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
    let m = moto();
    let proxy = Proxy::start(m.port).await;
    let mut cfg = config("slow", &proxy.url());
    cfg.attempt_timeout_ms = 300;
    cfg.operation_timeout_ms = 1_000;
    cfg.max_attempts = 2;
    let km = AwsKmsManager::connect(cfg).await.unwrap();
    let key = km.generate("k", KeyAlgorithm::EcP256).await.unwrap();
    proxy.rule(Rule {
        action: "Sign",
        times: None,
        delay: Duration::from_secs(3),
        answer: None,
    });
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
    let m = moto();
    let proxy = Proxy::start(m.port).await;
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
    let m = moto();
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
#[tokio::test]
async fn failed_alias_creation_does_not_leak_keys() {
    let m = moto();
    let proxy = Proxy::start(m.port).await;
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
    let m = moto();
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
