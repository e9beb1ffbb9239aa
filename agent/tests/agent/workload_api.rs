//! The Workload API over a real Unix socket, with a cache filled from a test CA.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ca_agent::cache::{Cache, CachedSvid, JwtCache, JwtMinter, WorkloadEntry};
use ca_agent::config::WorkloadApiConfig;
use ca_agent::testing::TestCa;
use ca_agent::workload_api::{self, WorkloadApi};
use ca_agent::workload_attestor::WorkloadAttestor;
use ca_identity::{Selector, SpiffeId, TrustDomain};
use ca_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ca_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tonic::transport::Endpoint;
use tonic::Code;

const TD: &str = "example.org";
const WORKLOAD_ID: &str = "spiffe://example.org/workload/test";

/// Mints real JWT-SVIDs with the test CA.
struct CaMinter {
    ca: Arc<TestCa>,
    ids: std::collections::HashMap<String, String>,
}

#[async_trait::async_trait]
impl JwtMinter for CaMinter {
    async fn mint(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, i64), tonic::Status> {
        let id = self
            .ids
            .get(entry_id)
            .ok_or_else(|| tonic::Status::not_found("no such entry"))?;
        Ok((
            self.ca.jwt(id, audience, 300),
            ca_identity::unix_now() + 300,
        ))
    }
}

fn entry(id: &str, spiffe_id: &str, selector: &str) -> WorkloadEntry {
    let (kind, value) = selector.split_once(':').unwrap();
    WorkloadEntry {
        id: id.into(),
        spiffe_id: SpiffeId::parse(spiffe_id).unwrap(),
        selectors: vec![Selector::new(kind, value)],
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        hint: "internal".into(),
        revision: 1,
    }
}

fn svid_for(ca: &TestCa, e: &WorkloadEntry) -> CachedSvid {
    let (chain, key) = ca.issue(e.spiffe_id.as_str(), 3600);
    CachedSvid::new(e, chain, key).unwrap()
}

async fn raw_client(path: &Path) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    let p = path.to_owned();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .unwrap();
    SpiffeWorkloadApiClient::new(channel)
}

async fn next<T>(s: &mut tonic::Streaming<T>) -> Result<T, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a stream message within 10s")
        .map(|m| m.expect("stream still open"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sub").join("agent.sock");
    let ca = Arc::new(TestCa::new(TD));
    let uid = nix::unistd::getuid().as_raw();

    // The cache first only knows an entry for another user.
    let cache = Cache::new();
    cache.set_bundle(ca.bundle());
    let other = entry("other", "spiffe://example.org/other", "unix:uid:4242424");
    cache.insert(other.clone(), svid_for(&ca, &other));

    let mine = entry("mine", WORKLOAD_ID, &format!("unix:uid:{uid}"));
    let minter = CaMinter {
        ca: ca.clone(),
        ids: [
            ("mine".to_string(), WORKLOAD_ID.to_string()),
            (
                "other".to_string(),
                "spiffe://example.org/other".to_string(),
            ),
        ]
        .into(),
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let api = api_over(&cache, minter, &shutdown_rx, &WorkloadApiConfig::default());
    let listener = workload_api::bind(&sock).await.unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777);
    let dmode = std::fs::metadata(sock.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dmode & 0o777, 0o755);
    let server = serve(listener, api, &shutdown_rx);

    // A second agent cannot take over a live socket.
    let err = workload_api::bind(&sock).await.unwrap_err().to_string();
    assert!(err.contains("in use"), "{err}");

    // 1. No security header: InvalidArgument naming the header.
    let mut raw = raw_client(&sock).await;
    let st = raw.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("workload.spiffe.io"), "{st:?}");
    let st = raw
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");

    // 2. No matching entry: PermissionDenied on every call.
    let mut client = ca_agent::workload_client::connect(&sock).await.unwrap();
    let st = client.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("no identity issued"), "{st:?}");
    let st = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    let st = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");

    // 3. A matching entry: the SVID, key and bundle.
    let first = svid_for(&ca, &mine);
    cache.insert(mine.clone(), first.clone());
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let msg = next(&mut stream).await.unwrap();
    assert_eq!(msg.svids.len(), 1, "only this process's identity");
    let s = &msg.svids[0];
    assert_eq!(s.spiffe_id, WORKLOAD_ID);
    assert_eq!(s.x509_svid, first.chain.concat());
    assert_eq!(s.x509_svid_key, *first.key_pkcs8);
    assert_eq!(s.bundle, ca.root_der());
    assert_eq!(s.hint, "internal");
    assert!(msg.federated_bundles.is_empty());
    let leaf = ca_identity::x509::split_concatenated_der(&s.x509_svid).unwrap();
    assert_eq!(
        ca_identity::x509::check_leaf_svid(&leaf[0])
            .unwrap()
            .as_str(),
        WORKLOAD_ID
    );

    // 4. Rotation pushes a new message on the open stream.
    let second = svid_for(&ca, &mine);
    cache.insert(mine.clone(), second.clone());
    let msg = next(&mut stream).await.unwrap();
    assert_eq!(msg.svids[0].x509_svid, second.chain.concat());
    assert_eq!(msg.svids[0].x509_svid_key, *second.key_pkcs8);

    // 5. A bundle change pushes too.
    let ca2 = TestCa::new(TD);
    let mut b = ca.bundle();
    b.x509_authorities.push(ca2.root_der());
    b.sequence_number = 2;
    cache.set_bundle(b.clone());
    let msg = next(&mut stream).await.unwrap();
    assert_eq!(msg.svids[0].bundle, b.x509_der_concat());

    // X.509 bundles, keyed by the trust domain's SPIFFE ID.
    let mut bs = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let msg = next(&mut bs).await.unwrap();
    assert_eq!(
        msg.bundles.keys().collect::<Vec<_>>(),
        vec!["spiffe://example.org"]
    );
    assert_eq!(msg.bundles["spiffe://example.org"], b.x509_der_concat());

    // JWT bundles: a JWKS with the CA's key.
    let mut js = client
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let msg = next(&mut js).await.unwrap();
    let jwks: serde_json::Value =
        serde_json::from_slice(&msg.bundles["spiffe://example.org"]).unwrap();
    assert_eq!(jwks["keys"][0]["kid"], b.jwt_authorities[0].key_id.as_str());

    // JWT-SVIDs.
    let st = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("audience"), "{st:?}");
    let st = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: "spiffe://example.org/other".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    let resp = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: WORKLOAD_ID.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.svids.len(), 1);
    assert_eq!(resp.svids[0].spiffe_id, WORKLOAD_ID);
    let token = resp.svids[0].svid.clone();
    // Cached: the same token again.
    let again = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.svids[0].svid, token);

    // Validation.
    let v = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.spiffe_id, WORKLOAD_ID);
    let claims = v.claims.unwrap();
    assert!(claims.fields.contains_key("exp"));
    assert!(matches!(
        claims.fields["sub"].kind,
        Some(prost_types::value::Kind::StringValue(ref s)) if s == WORKLOAD_ID
    ));
    for (aud, svid, want) in [
        ("other-audience", token.as_str(), "audience"),
        ("db", "not.a.jwt", "invalid JWT-SVID"),
        ("", token.as_str(), "audience must be specified"),
        ("db", "", "svid must be specified"),
    ] {
        let st = client
            .validate_jwtsvid(ValidateJwtsvidRequest {
                audience: aud.into(),
                svid: svid.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{aud} {svid}: {st:?}");
        assert!(st.message().contains(want), "{st:?} lacks {want}");
    }

    // The entry disappears: the open stream ends with PermissionDenied.
    cache.remove("mine");
    let st = next(&mut stream).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");

    // Shutdown ends the open bundle streams and the server.
    shutdown_tx.send_replace(true);
    let end = tokio::time::timeout(Duration::from_secs(10), bs.message())
        .await
        .expect("stream ends on shutdown");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    drop((client, raw, bs, js));
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();

    // A stale socket file from a dead agent is replaced.
    assert!(sock.exists());
    let listener = workload_api::bind(&sock).await.unwrap();
    drop(listener);
}

#[tokio::test]
async fn bind_refuses_a_non_socket_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("agent.sock");
    std::fs::write(&p, "x").unwrap();
    let err = workload_api::bind(&p).await.unwrap_err().to_string();
    assert!(err.contains("not a socket"), "{err}");
}

/// Idle connections from one user ID take at most `MAX_CONNECTIONS_PER_UID` slots: the
/// next one is closed at once (it holds no descriptor and no memory), and a slot comes back
/// as soon as one of them closes. Before the limit, 450 idle connections exhausted the
/// agent's file descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_take_every_connection() {
    use tokio::io::AsyncReadExt;
    let agent = start(WorkloadApiConfig::default()).await;
    let sock = agent.sock.clone();

    let mut idle = Vec::new();
    for _ in 0..workload_api::MAX_CONNECTIONS_PER_UID {
        idle.push(tokio::net::UnixStream::connect(&sock).await.unwrap());
    }
    // The next one is accepted by the kernel, then closed by the agent: EOF, no answer.
    let mut extra = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
        .await
        .expect("the connection over the limit is closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "no HTTP/2 server on a connection over the limit");
    // The idle ones are still served (the server sent its SETTINGS on each).
    let n = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf))
        .await
        .expect("an admitted connection gets the server's preface")
        .unwrap();
    assert!(n > 0);

    // One closes: a real client gets its slot.
    drop(idle.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let p = sock.clone();
        let channel = Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
                }
            }))
            .await;
        let Ok(channel) = channel else {
            assert!(std::time::Instant::now() < deadline, "no slot came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut c = SpiffeWorkloadApiClient::new(channel);
        // An answer (here: the token is not a JWT) proves the connection is served.
        let mut req = tonic::Request::new(ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "not-a-jwt".into(),
        });
        req.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        match tokio::time::timeout(Duration::from_secs(2), c.validate_jwtsvid(req)).await {
            Ok(Err(s)) if s.code() == Code::InvalidArgument => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "no slot came back: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Workload API over `cache`, minting JWT-SVIDs with `minter`, attesting callers for
/// real.
fn api_over(
    cache: &Cache,
    minter: CaMinter,
    shutdown: &watch::Receiver<bool>,
    limits: &WorkloadApiConfig,
) -> WorkloadApi {
    WorkloadApi::new(
        TrustDomain::new(TD).unwrap(),
        cache.subscribe(),
        Arc::new(WorkloadAttestor::new()),
        Arc::new(JwtCache::new(Arc::new(minter))),
        shutdown.clone(),
        limits,
    )
}

/// Serves `api` on `listener` until `shutdown` turns true.
fn serve(
    listener: tokio::net::UnixListener,
    api: WorkloadApi,
    shutdown: &watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Result<(), ca_agent::Error>> {
    let mut stop = shutdown.clone();
    tokio::spawn(workload_api::serve(listener, api, async move {
        let _ = stop.wait_for(|s| *s).await;
    }))
}

/// A Workload API server on a fresh socket, with an entry for this test's user ID.
struct TestAgent {
    sock: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
    /// Streams end when the cache goes away.
    _cache: Cache,
}

async fn start(limits: WorkloadApiConfig) -> TestAgent {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let ca = Arc::new(TestCa::new(TD));
    let cache = Cache::new();
    cache.set_bundle(ca.bundle());
    let uid = nix::unistd::getuid().as_raw();
    let mine = entry("mine", WORKLOAD_ID, &format!("unix:uid:{uid}"));
    cache.insert(mine.clone(), svid_for(&ca, &mine));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let minter = CaMinter {
        ca: ca.clone(),
        ids: [("mine".to_string(), WORKLOAD_ID.to_string())].into(),
    };
    let api = api_over(&cache, minter, &shutdown_rx, &limits);
    serve(workload_api::bind(&sock).await.unwrap(), api, &shutdown_rx);
    TestAgent {
        sock,
        _dir: dir,
        _shutdown: shutdown_tx,
        _cache: cache,
    }
}

/// One cheap call: validating a token that is not a JWT (`InvalidArgument` when served).
async fn validate_garbage(c: &mut ca_agent::workload_client::Client) -> Result<(), tonic::Status> {
    match c
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "not-a-jwt".into(),
        })
        .await
    {
        Err(s) if s.code() == Code::InvalidArgument => Ok(()),
        Err(s) => Err(s),
        Ok(r) => panic!("garbage validated: {r:?}"),
    }
}

/// Calls over a user ID's rate get `ResourceExhausted` with the time to retry (before any
/// attestation work); a new connection of the same user shares the budget; the budget
/// refills. Before the limit, one local user could make the agent mint and attest without
/// bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_user_rate_are_refused() {
    let agent = start(WorkloadApiConfig {
        requests_per_second: 2,
        request_burst: 5,
        ..WorkloadApiConfig::default()
    })
    .await;
    let uid = nix::unistd::getuid().as_raw();
    let mut c = ca_agent::workload_client::connect(&agent.sock)
        .await
        .unwrap();
    for i in 0..5 {
        validate_garbage(&mut c)
            .await
            .unwrap_or_else(|s| panic!("call {i} within the burst: {s:?}"));
    }
    let st = validate_garbage(&mut c).await.unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    for want in ["rate limit", &format!("user ID {uid}"), "retry in"] {
        assert!(st.message().contains(want), "{st:?} lacks {want:?}");
    }
    // Streams count too, and another connection does not get a fresh budget.
    let mut other = ca_agent::workload_client::connect(&agent.sock)
        .await
        .unwrap();
    let st = other.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    // Two per second: within a second a call passes again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while let Err(st) = validate_garbage(&mut c).await {
        assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "the budget never refilled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A connection that never makes a call is closed after the idle timeout; a connection
/// with a stream open stays, however quiet the stream is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_open_streams_stay() {
    use tokio::io::AsyncReadExt;
    let agent = start(WorkloadApiConfig {
        idle_timeout_secs: 1,
        ..WorkloadApiConfig::default()
    })
    .await;
    // A silent connection: the server's preface, then EOF once the timeout passes.
    let mut silent = tokio::net::UnixStream::connect(&agent.sock).await.unwrap();
    let mut buf = [0u8; 1024];
    let eof = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(eof.is_ok(), "a connection with no call was never closed");

    // A watcher: its stream gets the SVID, then nothing, and stays open past the timeout.
    let mut c = ca_agent::workload_client::connect(&agent.sock)
        .await
        .unwrap();
    let mut stream = c
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await.unwrap();
    assert_eq!(first.svids.len(), 1);
    let quiet = tokio::time::timeout(Duration::from_secs(3), stream.message()).await;
    assert!(
        quiet.is_err(),
        "the stream ended or sent while idle: {quiet:?}"
    );
}
