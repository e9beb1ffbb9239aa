//! End-to-end tests with independent SPIFFE clients.
//!
//! A real node and a real agent ([`ca_dev::DevEnv`]: mTLS gRPC on loopback, the
//! Workload API on a Unix socket) serve workloads that are not ours: the Rust `spiffe`
//! crate, the Python `spiffe` package (a script in `tests/py/`) and `openssl verify`. Every
//! X509-SVID and JWT-SVID rule is asserted on what was really issued, with checks that do
//! not reuse the product's own parsers or validators (x509-parser, ring, openssl).
//!
//! Python 3 with the `spiffe` package and the `openssl` command are required: a test that
//! needs them fails (never skips) when they are missing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use ca_dev::{DevEnv, DEMO_ID, DEV_TRUST_DOMAIN};
use ca_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ca_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use futures::StreamExt as _;
use spiffe::{BundleSource as _, JwtSvid, TrustDomain, WorkloadApiClient, X509Source};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer as _;

/// The dev trust domain's SPIFFE ID (what signing certificates carry as URI SAN).
const TD_ID: &str = "spiffe://dev.example.org";
/// How long anything that should happen at once may take.
const READY: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- environment helpers

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn my_selector() -> String {
    format!("unix:uid:{}", uid())
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// What to register: an entry for the test process unless `selectors` says otherwise.
#[derive(Default)]
struct EntrySpec<'a> {
    spiffe_id: &'a str,
    selectors: Vec<String>,
    dns_names: &'a [&'a str],
    hint: &'a str,
}

/// Registers an entry under the dev agent through the admin API on the node's
/// owner-only socket, as an operator would (`ca-node entry create`).
async fn register(env: &DevEnv, spec: EntrySpec<'_>) -> Result<()> {
    let selectors = if spec.selectors.is_empty() {
        vec![my_selector()]
    } else {
        spec.selectors
    };
    let selectors = selectors
        .iter()
        .map(|s| {
            let (t, v) = s.split_once(':').expect("selector is type:value");
            ca_proto::types::Selector {
                r#type: t.into(),
                value: v.into(),
            }
        })
        .collect();
    let entry = ca_proto::types::Entry {
        spiffe_id: spec.spiffe_id.into(),
        parent_id: env.agent.spiffe_id().to_string(),
        selectors,
        dns_names: spec.dns_names.iter().map(|d| d.to_string()).collect(),
        hint: spec.hint.into(),
        ..Default::default()
    };
    let channel = ca_node_cli::uds_channel(&env.node.admin_socket)
        .await
        .map_err(|e| anyhow!("admin socket: {e}"))?;
    ca_proto::admin::admin_client::AdminClient::new(channel)
        .create_entry(ca_proto::admin::CreateEntryRequest { entry: Some(entry) })
        .await
        .with_context(|| format!("registering {}", spec.spiffe_id))?;
    Ok(())
}

async fn start_env(dir: &Path, tweak: impl FnOnce(&mut ca_node::NodeConfig)) -> Result<DevEnv> {
    let dir = dir.join("env");
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let mut cfg = ca_dev::node_config(&dir);
    tweak(&mut cfg);
    DevEnv::start_with(cfg, |_| {})
        .await
        .map_err(|e| anyhow!("starting the dev environment: {e}"))
}

fn socket_path(env: &DevEnv) -> PathBuf {
    env.agent.socket_path().to_owned()
}

/// The trust bundle as the node publishes it: root DERs and the JWT key IDs.
fn node_bundle(env: &DevEnv) -> (Vec<Vec<u8>>, BTreeSet<String>) {
    let b = env.node.core.ca().bundle().expect("node bundle");
    let kids = b.jwt_authorities.iter().map(|k| k.key_id.clone()).collect();
    (b.x509_authorities.clone(), kids)
}

fn td() -> TrustDomain {
    TrustDomain::new(DEV_TRUST_DOMAIN).expect("trust domain")
}

// ---------------------------------------------------------------- X509-SVID rules

fn parse_cert(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).expect("a DER certificate");
    assert!(rest.is_empty(), "trailing bytes after a certificate");
    cert
}

/// The subject alternative names: (URIs, DNS names, anything else).
fn sans(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<String>, usize) {
    let Some(ext) = cert
        .subject_alternative_name()
        .expect("a well-formed subjectAltName")
    else {
        return (Vec::new(), Vec::new(), 0);
    };
    let (mut uris, mut dns, mut other) = (Vec::new(), Vec::new(), 0);
    for n in &ext.value.general_names {
        match n {
            GeneralName::URI(u) => uris.push(u.to_string()),
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            _ => other += 1,
        }
    }
    (uris, dns, other)
}

/// Checks a serial number: positive, at most 20 octets (RFC 5280), at least 64 significant
/// bits (the random serials are 127 bits: a shorter one has a chance of 2^-63).
fn assert_serial(what: &str, raw: &[u8]) {
    assert!(!raw.is_empty(), "{what}: empty serial");
    assert!(raw.len() <= 20, "{what}: serial longer than 20 octets");
    assert_eq!(raw[0] & 0x80, 0, "{what}: negative serial");
    let significant = raw.iter().skip_while(|b| **b == 0).count();
    let bits = significant * 8
        - raw
            .iter()
            .find(|b| **b != 0)
            .map_or(8, |b| b.leading_zeros() as usize);
    assert!(
        bits >= 64,
        "{what}: serial {} has only {bits} significant bits; a random serial needs >= 64",
        hex::encode(raw)
    );
}

/// One X.509-SVID as a client received it.
struct Svid {
    spiffe_id: String,
    /// Leaf first, then intermediates.
    chain: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    key: Vec<u8>,
}

/// Asserts the X509-SVID standard on `svid` for an entry `want_id` with `want_dns`, issued
/// under one of `roots`. Returns the leaf's raw serial.
fn assert_x509_svid(svid: &Svid, want_id: &str, want_dns: &[&str], roots: &[Vec<u8>]) -> Vec<u8> {
    assert_eq!(svid.spiffe_id, want_id, "the response's spiffe_id");
    assert_eq!(
        svid.chain.len(),
        2,
        "the chain is the leaf and this node's intermediate"
    );
    let leaf = parse_cert(&svid.chain[0]);
    let int = parse_cert(&svid.chain[1]);
    let t = now();

    // Leaf: exactly one URI SAN, the entry's SPIFFE ID; the entry's DNS names as DNS SANs.
    let (uris, dns, other) = sans(&leaf);
    assert_eq!(uris, vec![want_id.to_string()], "leaf URI SANs");
    let dns: BTreeSet<_> = dns.into_iter().collect();
    let want: BTreeSet<_> = want_dns.iter().map(|d| d.to_string()).collect();
    assert_eq!(dns, want, "leaf DNS SANs are the entry's DNS names");
    assert_eq!(other, 0, "leaf has SANs other than URI and DNS");

    let bc = leaf
        .basic_constraints()
        .expect("well-formed basicConstraints")
        .expect("leaf has basicConstraints");
    assert!(!bc.value.ca, "leaf basicConstraints cA must be false");
    assert!(!leaf.is_ca());
    let ku = leaf
        .key_usage()
        .expect("well-formed keyUsage")
        .expect("leaf has keyUsage");
    assert!(ku.critical, "leaf keyUsage must be critical");
    assert!(
        ku.value.digital_signature(),
        "leaf keyUsage digitalSignature"
    );
    assert!(
        !ku.value.key_cert_sign(),
        "leaf keyUsage must not have keyCertSign"
    );
    assert!(!ku.value.crl_sign(), "leaf keyUsage must not have cRLSign");
    let eku = leaf
        .extended_key_usage()
        .expect("well-formed extendedKeyUsage")
        .expect("leaf has extendedKeyUsage");
    assert!(eku.value.server_auth, "leaf EKU serverAuth");
    assert!(eku.value.client_auth, "leaf EKU clientAuth");

    let lv = leaf.validity();
    let iv = int.validity();
    assert!(
        lv.not_before.timestamp() <= t + 5,
        "leaf not valid yet ({} > now {t})",
        lv.not_before.timestamp()
    );
    assert!(lv.not_after.timestamp() > t, "leaf already expired");
    assert!(
        lv.not_after.timestamp() <= iv.not_after.timestamp(),
        "leaf outlives its intermediate ({} > {})",
        lv.not_after.timestamp(),
        iv.not_after.timestamp()
    );
    assert_serial("leaf", leaf.raw_serial());

    // Intermediate: a CA signing certificate with the trust domain's ID.
    let bc = int
        .basic_constraints()
        .expect("well-formed basicConstraints")
        .expect("intermediate has basicConstraints");
    assert!(bc.value.ca, "intermediate basicConstraints cA must be true");
    assert!(
        bc.critical,
        "intermediate basicConstraints must be critical"
    );
    let ku = int
        .key_usage()
        .expect("well-formed keyUsage")
        .expect("intermediate has keyUsage");
    assert!(ku.critical, "intermediate keyUsage must be critical");
    assert!(
        ku.value.key_cert_sign(),
        "intermediate keyUsage keyCertSign"
    );
    let (uris, _, _) = sans(&int);
    assert_eq!(uris, vec![TD_ID.to_string()], "intermediate URI SAN");
    assert!(iv.not_after.timestamp() > t, "intermediate expired");
    assert_serial("intermediate", int.raw_serial());

    // Names chain up: leaf <- intermediate <- a root of the bundle (signatures: openssl).
    assert_eq!(
        leaf.issuer().as_raw(),
        int.subject().as_raw(),
        "leaf issuer is the intermediate"
    );
    assert!(
        roots
            .iter()
            .any(|r| parse_cert(r).subject().as_raw() == int.issuer().as_raw()),
        "the intermediate's issuer is not a root of the bundle"
    );
    assert!(
        !roots.contains(&svid.chain[1]),
        "the intermediate must not be in the bundle"
    );

    // The private key belongs to the leaf: same public key, and a signature verifies.
    assert_key_matches(&svid.key, &leaf);
    leaf.raw_serial().to_vec()
}

fn assert_key_matches(pkcs8: &[u8], leaf: &X509Certificate<'_>) {
    use ring::signature::{
        EcdsaKeyPair, KeyPair as _, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
        ECDSA_P256_SHA256_ASN1_SIGNING,
    };
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng)
        .expect("the SVID key is a P-256 PKCS#8 key");
    let leaf_pub = &leaf.public_key().subject_public_key.data;
    assert_eq!(
        key.public_key().as_ref(),
        leaf_pub.as_ref(),
        "the private key does not belong to the leaf certificate"
    );
    let msg = b"proof of possession";
    let sig = key.sign(&rng, msg).expect("sign");
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, leaf_pub.as_ref())
        .verify(msg, sig.as_ref())
        .expect("a signature by the SVID key verifies with the leaf's public key");
}

// ---------------------------------------------------------------- JWT-SVID rules

fn b64json(part: &str) -> serde_json::Map<String, serde_json::Value> {
    let bytes = B64URL.decode(part).expect("base64url JWT part");
    match serde_json::from_slice(&bytes).expect("JSON JWT part") {
        serde_json::Value::Object(m) => m,
        other => panic!("JWT part is not an object: {other}"),
    }
}

/// Verifies an ES256 JWS with a P-256 JWK, independently of the product's validator.
fn es256_verify(token: &str, jwk: &serde_json::Value) -> Result<()> {
    let (input, sig) = token.rsplit_once('.').ok_or_else(|| anyhow!("not a JWS"))?;
    ensure!(
        jwk["kty"] == "EC" && jwk["crv"] == "P-256",
        "not a P-256 JWK: {jwk}"
    );
    let coord = |k: &str| -> Result<Vec<u8>> {
        let v = B64URL.decode(jwk[k].as_str().ok_or_else(|| anyhow!("JWK {k}"))?)?;
        ensure!(v.len() == 32, "JWK {k} is {} bytes", v.len());
        Ok(v)
    };
    let mut point = vec![4u8];
    point.extend(coord("x")?);
    point.extend(coord("y")?);
    let sig = B64URL.decode(sig)?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(input.as_bytes(), &sig)
        .map_err(|_| anyhow!("bad ES256 signature"))
}

/// Asserts the JWT-SVID standard on `token`: header, claims, lifetime `ttl`, and the
/// signature against `jwks` (kid -> JWK) as the client fetched them.
fn assert_jwt_svid(
    token: &str,
    want_id: &str,
    audience: &str,
    ttl: i64,
    jwks: &std::collections::BTreeMap<String, serde_json::Value>,
) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "JWS compact serialization has 3 parts");
    let header = b64json(parts[0]);
    let claims = b64json(parts[1]);
    assert_eq!(header.get("alg"), Some(&"ES256".into()), "header alg");
    let kid = header
        .get("kid")
        .and_then(|k| k.as_str())
        .expect("header kid present");
    assert!(!kid.is_empty(), "empty kid");
    if let Some(typ) = header.get("typ") {
        assert!(typ == "JWT" || typ == "JOSE", "header typ {typ}");
    }
    assert_eq!(claims.get("sub"), Some(&want_id.into()), "claim sub");
    let aud: Vec<&str> = match claims.get("aud").expect("claim aud present") {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str()).collect(),
        other => panic!("claim aud {other}"),
    };
    assert!(aud.contains(&audience), "aud {aud:?} lacks {audience}");
    let exp = claims
        .get("exp")
        .and_then(|v| v.as_i64())
        .expect("claim exp (integer)");
    let iat = claims
        .get("iat")
        .and_then(|v| v.as_i64())
        .expect("claim iat (integer)");
    let t = now();
    assert!(exp > iat, "exp {exp} <= iat {iat}");
    assert!(
        (exp - iat - ttl).abs() <= 1,
        "exp - iat = {}s, configured JWT-SVID TTL {ttl}s",
        exp - iat
    );
    assert!(exp > t, "token already expired");
    assert!((iat - t).abs() <= 120, "iat {iat} is far from now {t}");

    let jwk = jwks
        .get(kid)
        .unwrap_or_else(|| panic!("kid {kid} not in the JWT bundle {:?}", jwks.keys()));
    es256_verify(token, jwk).expect("signature verifies against the bundle key");
}

/// The JWKs of the dev trust domain's JWT bundle as the Rust client fetched it.
fn jwks_of(set: &spiffe::JwtBundleSet) -> std::collections::BTreeMap<String, serde_json::Value> {
    let bundle = set.get(&td()).expect("a JWT bundle for the trust domain");
    bundle
        .jwt_authorities()
        .map(|a| {
            (
                a.key_id().to_string(),
                serde_json::from_slice(a.jwk_json()).expect("JWK JSON"),
            )
        })
        .collect()
}

/// `token` with its `sub` changed after signing.
fn forge_sub(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims = b64json(parts[1]);
    let sub = claims["sub"].as_str().expect("sub").to_string();
    claims.insert("sub".into(), format!("{sub}-forged").into());
    let c = B64URL.encode(serde_json::Value::Object(claims).to_string());
    format!("{}.{c}.{}", parts[0], parts[2])
}

/// `token` re-signed as `alg: none` with an empty signature.
fn alg_none(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut header = b64json(parts[0]);
    header.insert("alg".into(), "none".into());
    let h = B64URL.encode(serde_json::Value::Object(header).to_string());
    format!("{h}.{}.", parts[1])
}

/// `token`'s header and claims signed by a fresh P-256 key that is not in any bundle.
fn foreign_signature(token: &str) -> String {
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .expect("key");
    let (input, _) = token.rsplit_once('.').expect("JWS");
    let sig = key.sign(&rng, input.as_bytes()).expect("sign");
    format!("{input}.{}", B64URL.encode(sig.as_ref()))
}

/// `token` with one bit of its signature flipped.
fn flip_signature(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').expect("JWS");
    let mut sig = B64URL.decode(sig).expect("signature");
    sig[5] ^= 0x01;
    format!("{input}.{}", B64URL.encode(sig))
}

// ---------------------------------------------------------------- subprocesses

/// Runs `openssl` with `args`; fails clearly when it is not installed.
fn openssl(args: &[&str]) -> Output {
    match std::process::Command::new("openssl").args(args).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "the `openssl` command is required by this test and was not found on PATH \
             (Debian: apt-get install openssl)"
        ),
        Err(e) => panic!("cannot run openssl: {e}"),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pem_certs(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
        .collect()
}

/// `openssl verify` of `leaf` through `intermediates` to `bundle` (PEM files), for the
/// TLS client and server purposes; and a negative control that must fail.
fn openssl_verify(bundle: &Path, intermediates: &Path, leaf: &Path) {
    let (b, i, l) = (
        bundle.to_str().unwrap(),
        intermediates.to_str().unwrap(),
        leaf.to_str().unwrap(),
    );
    for purpose in ["sslclient", "sslserver"] {
        let out = openssl(&[
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            b,
            "-untrusted",
            i,
            l,
        ]);
        assert!(
            out.status.success() && text(&out.stdout).trim_end().ends_with(": OK"),
            "openssl verify -purpose {purpose} failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    // Control: without the intermediate the chain cannot be built.
    let out = openssl(&["verify", "-CAfile", b, l]);
    assert!(
        !out.status.success(),
        "openssl verify succeeded without the intermediate: {}",
        text(&out.stdout)
    );
}

/// `openssl x509 -text` sanity and key/certificate agreement as openssl sees them.
fn openssl_inspect(leaf: &Path, key: &Path, want_id: &str) {
    let out = openssl(&["x509", "-noout", "-text", "-in", leaf.to_str().unwrap()]);
    assert!(out.status.success(), "openssl x509: {}", text(&out.stderr));
    let t = text(&out.stdout);
    assert!(t.contains(&format!("URI:{want_id}")), "{t}");
    assert!(t.contains("CA:FALSE"), "{t}");
    assert!(t.contains("X509v3 Key Usage: critical"), "{t}");
    assert!(t.contains("Digital Signature"), "{t}");
    assert!(!t.contains("Certificate Sign"), "{t}");
    assert!(
        t.contains("TLS Web Server Authentication") && t.contains("TLS Web Client Authentication"),
        "{t}"
    );
    let cert_pub = openssl(&["x509", "-noout", "-pubkey", "-in", leaf.to_str().unwrap()]);
    let key_pub = openssl(&["pkey", "-pubout", "-in", key.to_str().unwrap()]);
    assert!(cert_pub.status.success() && key_pub.status.success());
    assert_eq!(
        text(&cert_pub.stdout),
        text(&key_pub.stdout),
        "openssl: the key file does not belong to the leaf"
    );
}

// ---------------------------------------------------------------- raw Workload API client

type RawClient = SpiffeWorkloadApiClient<tonic::transport::Channel>;

/// A plain tonic client on the Unix socket that adds no metadata by itself.
async fn raw_client(path: &Path) -> RawClient {
    let p = path.to_owned();
    let channel = tonic::transport::Endpoint::try_from("http://localhost")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .expect("connect to the Workload API socket");
    SpiffeWorkloadApiClient::new(channel)
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("ascii"));
    r
}

/// The status of a server-streaming call: the call's own error, else the first message's.
async fn first_status<T>(
    r: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
) -> Result<T, tonic::Status> {
    let mut stream = r?.into_inner();
    match tokio::time::timeout(READY, stream.message()).await {
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(tonic::Status::unknown("stream ended without a message")),
        Ok(Err(s)) => Err(s),
        Err(_) => Err(tonic::Status::deadline_exceeded("no message within 30s")),
    }
}

// ================================================================ tests

/// The Rust `spiffe` crate (WorkloadApiClient, X509Source, JwtSource) fetches X.509 and JWT
/// material; every X509-SVID and JWT-SVID rule holds on it; openssl verifies the chain; the
/// agent and the crate's offline validation accept the token and refuse tampered ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_spiffe_crate_fetches_standard_svids() -> Result<()> {
    const JWT_TTL: i64 = 120;
    const ID: &str = "spiffe://dev.example.org/service/e2e-rust";
    const DNS: &[&str] = &["e2e-rust.dev.example.org", "api.e2e-rust.internal"];
    const AUD: &str = "billing-api";

    let dir = tempfile::tempdir()?;
    let env = start_env(dir.path(), |c| c.ttl.jwt_svid = JWT_TTL).await?;
    register(
        &env,
        EntrySpec {
            spiffe_id: ID,
            dns_names: DNS,
            hint: "e2e",
            ..Default::default()
        },
    )
    .await?;
    env.wait_for_svid(ID, READY).await?;
    let (roots, kids) = node_bundle(&env);
    let endpoint = env.endpoint();

    let client = WorkloadApiClient::connect_to(&endpoint).await?;

    // X.509-SVID, bundles and context.
    let svid = client.fetch_x509_svid().await?;
    assert_eq!(svid.spiffe_id().to_string(), ID);
    assert_eq!(svid.hint(), Some("e2e"));
    let fetched = Svid {
        spiffe_id: svid.spiffe_id().to_string(),
        chain: svid
            .cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
        key: svid.private_key().as_bytes().to_vec(),
    };
    let bundles = client.fetch_x509_bundles().await?;
    assert_eq!(bundles.len(), 1, "only the own trust domain's bundle");
    let bundle = bundles.get(&td()).expect("bundle for the trust domain");
    let fetched_roots: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(fetched_roots, roots, "the X.509 bundle is the node's roots");
    let serial = assert_x509_svid(&fetched, ID, DNS, &fetched_roots);

    let ctx = client.fetch_x509_context().await?;
    assert_eq!(ctx.svids().len(), 1);
    assert_eq!(ctx.svids()[0].spiffe_id().to_string(), ID);
    assert!(ctx.bundle_set().get(&td()).is_some());

    // X509Source: the same identity and bundle.
    let source = X509Source::builder().endpoint(&endpoint).build().await?;
    let s = source.svid()?;
    assert_eq!(s.spiffe_id().to_string(), ID);
    assert_eq!(s.leaf().as_bytes(), fetched.chain[0].as_slice());
    let b = source
        .bundle_for_trust_domain(&td())?
        .expect("X509Source has the bundle");
    assert_eq!(b.authorities().len(), roots.len());
    source.shutdown().await;

    // openssl on what the client fetched.
    let out = dir.path().join("rust");
    std::fs::create_dir_all(&out)?;
    let (bundle_pem, int_pem, leaf_pem, key_pem) = (
        out.join("bundle.pem"),
        out.join("intermediates.pem"),
        out.join("leaf.pem"),
        out.join("key.pem"),
    );
    std::fs::write(&bundle_pem, pem_certs(&fetched_roots))?;
    std::fs::write(&int_pem, pem_certs(&fetched.chain[1..]))?;
    std::fs::write(&leaf_pem, pem_certs(&fetched.chain[..1]))?;
    std::fs::write(
        &key_pem,
        pem::encode(&pem::Pem::new("PRIVATE KEY", fetched.key.clone())),
    )?;
    openssl_verify(&bundle_pem, &int_pem, &leaf_pem);
    openssl_inspect(&leaf_pem, &key_pem, ID);

    // JWT-SVID and JWT bundles.
    let jwt = client.fetch_jwt_svid(&[AUD], None).await?;
    assert_eq!(jwt.spiffe_id().to_string(), ID);
    assert!(jwt.audience().iter().any(|a| a == AUD));
    assert!(!jwt.key_id().is_empty());
    let jwt_bundles = client.fetch_jwt_bundles().await?;
    let jwks = jwks_of(&jwt_bundles);
    assert_eq!(
        jwks.keys().cloned().collect::<BTreeSet<_>>(),
        kids,
        "the JWT bundle is the node's JWT keys"
    );
    assert_jwt_svid(jwt.token(), ID, AUD, JWT_TTL, &jwks);
    // Asking for the own SPIFFE ID by name gives the same identity.
    let named = client
        .fetch_jwt_svid(&[AUD], Some(&spiffe::SpiffeId::new(ID)?))
        .await?;
    assert_eq!(named.spiffe_id().to_string(), ID);

    // Offline validation by the crate, and validation by the agent through the crate.
    let v = JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &[AUD])?;
    assert_eq!(v.spiffe_id().to_string(), ID);
    let v = client.validate_jwt_token(AUD, jwt.token()).await?;
    assert_eq!(v.spiffe_id().to_string(), ID);

    // Tampered and misdirected tokens are refused, by the agent and offline.
    for (what, bad) in [
        ("forged sub", forge_sub(jwt.token())),
        ("flipped signature bit", flip_signature(jwt.token())),
        ("alg none", alg_none(jwt.token())),
        (
            "signature by a key outside the bundle",
            foreign_signature(jwt.token()),
        ),
    ] {
        let err = client
            .validate_jwt_token(AUD, &bad)
            .await
            .expect_err(&format!("the agent accepted a token with a {what}"));
        assert!(
            err.is_invalid_argument(),
            "{what}: want InvalidArgument, got {err}"
        );
        assert!(
            JwtSvid::parse_and_validate(&bad, &jwt_bundles, &[AUD]).is_err(),
            "{what}: offline validation accepted it"
        );
        assert!(
            es256_verify(&bad, &jwks[jwt.key_id()]).is_err(),
            "{what}: ring accepted it"
        );
    }
    let err = client
        .validate_jwt_token("another-audience", jwt.token())
        .await
        .expect_err("the agent accepted a token for another audience");
    assert!(err.is_invalid_argument(), "wrong audience: {err}");

    // JwtSource: a token for two audiences.
    let jwt_source = spiffe::JwtSource::builder()
        .endpoint(&endpoint)
        .build()
        .await?;
    let two = jwt_source.fetch_jwt_svid(["a1", "a2"]).await?;
    assert_eq!(two.spiffe_id().to_string(), ID);
    assert_jwt_svid(two.token(), ID, "a1", JWT_TTL, &jwks);
    assert_jwt_svid(two.token(), ID, "a2", JWT_TTL, &jwks);
    jwt_source.shutdown().await;

    // Serials are random: several SVIDs (other entries for this process) all differ.
    let mut ids = vec![ID.to_string()];
    for i in 0..4 {
        let id = format!("spiffe://dev.example.org/service/e2e-serial-{i}");
        register(
            &env,
            EntrySpec {
                spiffe_id: &id,
                ..Default::default()
            },
        )
        .await?;
        ids.push(id);
    }
    for id in &ids {
        env.wait_for_svid(id, READY).await?;
    }
    let all = client.fetch_all_x509_svids().await?;
    let got: BTreeSet<String> = all.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(got, ids.iter().cloned().collect::<BTreeSet<_>>());
    let mut serials = BTreeSet::new();
    for s in &all {
        let id = s.spiffe_id().to_string();
        let dns: &[&str] = if id == ID { DNS } else { &[] };
        let svid = Svid {
            spiffe_id: id.clone(),
            chain: s
                .cert_chain()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect(),
            key: s.private_key().as_bytes().to_vec(),
        };
        serials.insert(assert_x509_svid(&svid, &id, dns, &fetched_roots));
    }
    assert!(serials.contains(&serial), "the first SVID is still served");
    assert_eq!(
        serials.len(),
        all.len(),
        "serial numbers repeat: {serials:?}"
    );

    env.shutdown().await;
    Ok(())
}

/// A Workload API stream (Rust crate) receives the rotated SVIDs (short TTL: the agent
/// re-mints at half-life), and every message carries the caller's full set of SVIDs and
/// the bundle; X509Source follows the rotation too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_spiffe_stream_receives_rotation_with_full_set() -> Result<()> {
    const OTHER: &str = "spiffe://dev.example.org/service/e2e-stream";
    // X.509-SVIDs live 20s, so the agent re-mints each one within seconds (at half-life).
    const ROTATION_DEADLINE: Duration = Duration::from_secs(60);
    let dir = tempfile::tempdir()?;
    let env = start_env(dir.path(), |c| c.ttl.x509_svid = 20).await?;
    env.register_demo().await?;
    register(
        &env,
        EntrySpec {
            spiffe_id: OTHER,
            ..Default::default()
        },
    )
    .await?;
    env.wait_for_svid(DEMO_ID, READY).await?;
    env.wait_for_svid(OTHER, READY).await?;
    let want: BTreeSet<String> = [DEMO_ID.to_string(), OTHER.to_string()].into();
    let (roots, _) = node_bundle(&env);
    let endpoint = env.endpoint();

    let client = WorkloadApiClient::connect_to(&endpoint).await?;
    let source = X509Source::builder().endpoint(&endpoint).build().await?;
    let source_first = source.svid()?.leaf().as_bytes().to_vec();

    let mut stream = client.stream_x509_contexts().await?;
    // Serial of every SVID in the first message; done once each has been replaced.
    let mut first: Option<std::collections::BTreeMap<String, Vec<u8>>> = None;
    let mut order: Option<Vec<String>> = None;
    let mut rotated = BTreeSet::new();
    let mut messages = 0;
    let deadline = tokio::time::Instant::now() + ROTATION_DEADLINE;
    while rotated != want {
        let msg = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| {
                anyhow!("no rotation of every SVID within {ROTATION_DEADLINE:?} (rotated: {rotated:?}, {messages} messages)")
            })?
            .ok_or_else(|| anyhow!("the stream ended"))??;
        messages += 1;
        let ids: Vec<String> = msg
            .svids()
            .iter()
            .map(|s| s.spiffe_id().to_string())
            .collect();
        assert_eq!(
            ids.iter().cloned().collect::<BTreeSet<_>>(),
            want,
            "message {messages} does not carry the full set of SVIDs"
        );
        assert_eq!(ids.len(), want.len(), "message {messages} repeats an SVID");
        match &order {
            None => order = Some(ids.clone()),
            Some(o) => assert_eq!(o, &ids, "the SVID order (and so the default) changed"),
        }
        let b = msg
            .bundle_set()
            .get(&td())
            .expect("every message carries the bundle");
        assert_eq!(b.authorities().len(), roots.len());
        let mut serials = std::collections::BTreeMap::new();
        for s in msg.svids() {
            let id = s.spiffe_id().to_string();
            let svid = Svid {
                spiffe_id: id.clone(),
                chain: s
                    .cert_chain()
                    .iter()
                    .map(|c| c.as_bytes().to_vec())
                    .collect(),
                key: s.private_key().as_bytes().to_vec(),
            };
            let serial = assert_x509_svid(&svid, &id, &[], &roots);
            serials.insert(id, serial);
        }
        match &first {
            None => first = Some(serials),
            Some(f) => {
                for (id, serial) in &serials {
                    if f[id] != *serial {
                        rotated.insert(id.clone());
                    }
                }
            }
        }
    }
    assert!(messages >= 2, "rotation arrived as a new message");

    // X509Source saw a new SVID too.
    let deadline = tokio::time::Instant::now() + READY;
    while source.svid()?.leaf().as_bytes() == source_first.as_slice() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "X509Source did not follow the rotation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    source.shutdown().await;

    // The JWT bundle stream sends the bundle at once.
    let mut jwt_stream = client.stream_jwt_bundles().await?;
    let set = tokio::time::timeout(READY, jwt_stream.next())
        .await?
        .ok_or_else(|| anyhow!("JWT bundle stream ended"))??;
    assert!(!jwks_of(&set).is_empty());

    env.shutdown().await;
    Ok(())
}

/// The Python `spiffe` package (PyPI) fetches and validates X.509 and JWT material;
/// openssl verifies the chain it wrote; the rules hold on what it received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_spiffe_package_fetches_and_validates() -> Result<()> {
    const AUD: &str = "python-audience";
    const JWT_TTL: i64 = 90;
    // Fail (never skip) when the client is not available.
    match std::process::Command::new("python3")
        .args(["-c", "import spiffe"])
        .output()
    {
        Err(e) => panic!(
            "python3 is required by this test and could not be run ({e}); install Python 3 \
             and `python3 -m pip install spiffe==0.3.2`"
        ),
        Ok(o) if !o.status.success() => panic!(
            "the Python `spiffe` package is required by this test: `python3 -m pip install \
             spiffe==0.3.2` ({})",
            text(&o.stderr).trim()
        ),
        Ok(_) => {}
    }

    let dir = tempfile::tempdir()?;
    let env = start_env(dir.path(), |c| c.ttl.jwt_svid = JWT_TTL).await?;
    env.register_demo().await?;
    env.wait_for_svid(DEMO_ID, READY).await?;
    let (roots, kids) = node_bundle(&env);
    let out_dir = dir.path().join("py");
    std::fs::create_dir_all(&out_dir)?;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/workload_client.py");
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&out_dir)
        .arg(AUD)
        .env("SPIFFE_ENDPOINT_SOCKET", env.endpoint())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .map_err(|_| anyhow!("the Python client did not finish within 90s"))??;
    if !out.status.success() {
        bail!(
            "the Python client failed ({}):\n{}\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("Python output is not JSON: {}", text(&out.stdout)))?;
    eprintln!(
        "python spiffe {} ok",
        r["spiffe_package_version"].as_str().unwrap_or("?")
    );

    assert_eq!(r["spiffe_id"], DEMO_ID);
    assert_eq!(r["trust_domain"], DEV_TRUST_DOMAIN);
    assert_eq!(r["chain_len"], 2);
    assert_eq!(r["bundle_authorities"], roots.len());
    assert_eq!(r["key_matches_leaf"], true);
    assert_eq!(r["context_spiffe_ids"], serde_json::json!([DEMO_ID]));

    // openssl on the files the Python client wrote; the rules on their content.
    let path = |k: &str| PathBuf::from(r["paths"][k].as_str().expect("path"));
    openssl_verify(&path("bundle"), &path("intermediates"), &path("leaf"));
    openssl_verify(&path("bundle"), &path("chain"), &path("leaf"));
    openssl_inspect(&path("leaf"), &path("key"), DEMO_ID);
    let read_pems =
        |p: PathBuf| -> Result<Vec<pem::Pem>> { Ok(pem::parse_many(std::fs::read(&p)?)?) };
    let chain: Vec<Vec<u8>> = read_pems(path("chain"))?
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    let py_roots: Vec<Vec<u8>> = read_pems(path("bundle"))?
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    assert_eq!(
        py_roots.iter().collect::<BTreeSet<_>>(),
        roots.iter().collect::<BTreeSet<_>>(),
        "the bundle Python wrote is the node's roots"
    );
    let key = read_pems(path("key"))?;
    assert_eq!(key.len(), 1);
    assert_eq!(key[0].tag(), "PRIVATE KEY", "PKCS#8 key file");
    assert_x509_svid(
        &Svid {
            spiffe_id: r["spiffe_id"].as_str().unwrap_or_default().into(),
            chain,
            key: key[0].contents().to_vec(),
        },
        DEMO_ID,
        &[],
        &roots,
    );

    // JWT: what Python fetched and validated; checked again here against the node's keys.
    assert_eq!(r["jwt_spiffe_id"], DEMO_ID);
    assert_eq!(r["jwt_audience"], serde_json::json!([AUD]));
    assert_eq!(r["agent_validated_spiffe_id"], DEMO_ID);
    assert_eq!(r["offline_validated_spiffe_id"], DEMO_ID);
    let py_kids: BTreeSet<String> = r["jwt_bundle_kids"]
        .as_array()
        .expect("kids")
        .iter()
        .filter_map(|k| k.as_str().map(String::from))
        .collect();
    assert_eq!(py_kids, kids, "the JWT bundle Python fetched is the node's");
    let node_jwks: serde_json::Value =
        serde_json::from_str(&env.node.core.ca().bundle()?.jwt_jwks_json()?)?;
    let jwks = node_jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| (k["kid"].as_str().expect("kid").to_string(), k.clone()))
        .collect();
    let token = r["jwt_token"].as_str().expect("token");
    assert_jwt_svid(token, DEMO_ID, AUD, JWT_TTL, &jwks);
    assert_eq!(
        r["jwt_expiry"],
        b64json(token.split('.').nth(1).unwrap())["exp"]
    );
    assert_eq!(
        r["tampered_rejected_by_agent"], true,
        "the agent accepted a forged token"
    );
    assert_eq!(r["tampered_rejected_offline"], true);

    env.shutdown().await;
    Ok(())
}

/// A JWT-SVID is refused once its `exp` has passed, by the agent and by the crate's offline
/// validation; the agent then hands out a fresh token, never the expired one it cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_jwt_svid_is_refused_and_replaced() -> Result<()> {
    // Short, yet long enough that a fresh token is surely still valid when validated.
    const JWT_TTL: i64 = 3;
    const AUD: &str = "short-lived";
    let dir = tempfile::tempdir()?;
    let env = start_env(dir.path(), |c| c.ttl.jwt_svid = JWT_TTL).await?;
    env.register_demo().await?;
    env.wait_for_svid(DEMO_ID, READY).await?;
    let client = WorkloadApiClient::connect_to(env.endpoint()).await?;

    let jwt = client.fetch_jwt_svid(&[AUD], None).await?;
    let exp = jwt.expiry().unix_timestamp();
    let jwks = jwks_of(&client.fetch_jwt_bundles().await?);
    assert_jwt_svid(jwt.token(), DEMO_ID, AUD, JWT_TTL, &jwks);
    // Wait until `exp` is in the past (whole seconds: validators compare exp <= now).
    let wait = (exp + 1) * 1000 - SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64 + 50)).await;
    }
    assert!(now() > exp);

    let err = client
        .validate_jwt_token(AUD, jwt.token())
        .await
        .expect_err("the agent accepted an expired JWT-SVID");
    assert!(err.is_invalid_argument(), "expired token: {err}");
    assert!(
        err.to_string().contains("expired"),
        "the refusal should say the token expired: {err}"
    );
    let bundles = client.fetch_jwt_bundles().await?;
    assert!(
        JwtSvid::parse_and_validate(jwt.token(), &bundles, &[AUD]).is_err(),
        "offline validation accepted an expired token"
    );

    let fresh = client.fetch_jwt_svid(&[AUD], None).await?;
    assert_ne!(
        fresh.token(),
        jwt.token(),
        "the agent served the expired token again"
    );
    assert!(
        fresh.expiry().unix_timestamp() > now(),
        "the new token is already expired"
    );
    assert_jwt_svid(fresh.token(), DEMO_ID, AUD, JWT_TTL, &jwks_of(&bundles));
    client.validate_jwt_token(AUD, fresh.token()).await?;

    env.shutdown().await;
    Ok(())
}

/// Every Workload API call without the `workload.spiffe.io: true` metadata is refused with
/// InvalidArgument; the same calls with it succeed (so the header is what decides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_requires_the_security_header() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let env = start_env(dir.path(), |_| {}).await?;
    env.register_demo().await?;
    env.wait_for_svid(DEMO_ID, READY).await?;
    let mut c = raw_client(&socket_path(&env)).await;

    let jwt_req = || JwtsvidRequest {
        audience: vec!["aud".into()],
        spiffe_id: String::new(),
    };
    // With the header: everything answers.
    let x = first_status(c.fetch_x509svid(with_header(X509svidRequest {})).await).await?;
    assert_eq!(x.svids.len(), 1);
    assert_eq!(x.svids[0].spiffe_id, DEMO_ID);
    first_status(
        c.fetch_x509_bundles(with_header(X509BundlesRequest {}))
            .await,
    )
    .await?;
    first_status(c.fetch_jwt_bundles(with_header(JwtBundlesRequest {})).await).await?;
    let token = c
        .fetch_jwtsvid(with_header(jwt_req()))
        .await?
        .into_inner()
        .svids
        .first()
        .expect("a JWT-SVID")
        .svid
        .clone();
    let v = c
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "aud".into(),
            svid: token.clone(),
        }))
        .await?
        .into_inner();
    assert_eq!(v.spiffe_id, DEMO_ID);

    // Without it: InvalidArgument, naming the header.
    let check = |what: &str, s: tonic::Status| {
        assert_eq!(
            s.code(),
            tonic::Code::InvalidArgument,
            "{what}: {}",
            s.message()
        );
        assert!(
            s.message().contains("workload.spiffe.io"),
            "{what}: the message should name the header: {}",
            s.message()
        );
    };
    check(
        "FetchX509SVID",
        first_status(
            c.fetch_x509svid(tonic::Request::new(X509svidRequest {}))
                .await,
        )
        .await
        .expect_err("FetchX509SVID without the header"),
    );
    check(
        "FetchX509Bundles",
        first_status(
            c.fetch_x509_bundles(tonic::Request::new(X509BundlesRequest {}))
                .await,
        )
        .await
        .expect_err("FetchX509Bundles without the header"),
    );
    check(
        "FetchJWTBundles",
        first_status(
            c.fetch_jwt_bundles(tonic::Request::new(JwtBundlesRequest {}))
                .await,
        )
        .await
        .expect_err("FetchJWTBundles without the header"),
    );
    check(
        "FetchJWTSVID",
        c.fetch_jwtsvid(tonic::Request::new(jwt_req()))
            .await
            .expect_err("FetchJWTSVID without the header"),
    );
    check(
        "ValidateJWTSVID",
        c.validate_jwtsvid(tonic::Request::new(ValidateJwtsvidRequest {
            audience: "aud".into(),
            svid: token,
        }))
        .await
        .expect_err("ValidateJWTSVID without the header"),
    );
    // A wrong value is as good as none.
    let mut r = tonic::Request::new(jwt_req());
    r.metadata_mut()
        .insert("workload.spiffe.io", "yes".parse().expect("ascii"));
    check(
        "FetchJWTSVID with header value yes",
        c.fetch_jwtsvid(r).await.expect_err("header value yes"),
    );

    env.shutdown().await;
    Ok(())
}

/// A caller whose selectors match no entry (the only entry is for another uid) gets
/// PermissionDenied with a message saying why, on every call, from the raw client and
/// from the Rust crate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_denies_a_caller_without_entry() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let env = start_env(dir.path(), |_| {}).await?;
    let other_uid = uid().wrapping_add(4242);
    let other_id = "spiffe://dev.example.org/service/someone-else";
    register(
        &env,
        EntrySpec {
            spiffe_id: other_id,
            selectors: vec![format!("unix:uid:{other_uid}")],
            ..Default::default()
        },
    )
    .await?;
    // The agent holds the other workload's SVID: it has synced, so a denial is final.
    env.wait_for_svid(other_id, READY).await?;
    assert!(env.agent.cache().current().synced);

    let mut c = raw_client(&socket_path(&env)).await;
    let check = |what: &str, s: tonic::Status| {
        assert_eq!(
            s.code(),
            tonic::Code::PermissionDenied,
            "{what}: {}",
            s.message()
        );
        assert!(
            s.message().contains("no identity issued")
                && s.message().contains("registration entry"),
            "{what}: the message should say that no entry matches: {}",
            s.message()
        );
    };
    check(
        "FetchX509SVID",
        first_status(c.fetch_x509svid(with_header(X509svidRequest {})).await)
            .await
            .expect_err("FetchX509SVID for a caller without entry"),
    );
    check(
        "FetchX509Bundles",
        first_status(
            c.fetch_x509_bundles(with_header(X509BundlesRequest {}))
                .await,
        )
        .await
        .expect_err("FetchX509Bundles for a caller without entry"),
    );
    check(
        "FetchJWTBundles",
        first_status(c.fetch_jwt_bundles(with_header(JwtBundlesRequest {})).await)
            .await
            .expect_err("FetchJWTBundles for a caller without entry"),
    );
    check(
        "FetchJWTSVID",
        c.fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["aud".into()],
            spiffe_id: String::new(),
        }))
        .await
        .expect_err("FetchJWTSVID for a caller without entry"),
    );
    // Nor may it ask for the other workload's identity by name.
    check(
        "FetchJWTSVID for another's ID",
        c.fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["aud".into()],
            spiffe_id: other_id.into(),
        }))
        .await
        .expect_err("FetchJWTSVID naming another workload's ID"),
    );

    // The Rust crate maps it to its "no identity issued" error.
    let client = WorkloadApiClient::connect_to(env.endpoint()).await?;
    let err = client
        .fetch_x509_svid()
        .await
        .expect_err("the crate got an SVID for a caller without entry");
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "want NoIdentityIssued, got {err:?}"
    );
    let err = client
        .fetch_jwt_svid(&["aud"], None)
        .await
        .expect_err("the crate got a JWT-SVID for a caller without entry");
    assert!(
        matches!(err, spiffe::WorkloadApiError::NoIdentityIssued),
        "want NoIdentityIssued, got {err:?}"
    );

    env.shutdown().await;
    Ok(())
}
