//! The whole agent against an in-test node API server (TLS on loopback, certificates from
//! a test CA): attestation by join token and x509pop, failover past a dead address,
//! entry sync (polled: `sync = "poll"`) and minting, re-minting on a revision change, agent SVID renewal with the
//! SVID as client certificate, a ban, restart from the stored SVID, and expiry handling.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ca_agent::testing::TestCa;
use ca_agent::AgentConfig;
use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_proto::node::node_server::{Node, NodeServer};
use ca_proto::node::*;
use ca_proto::types;
use ca_proto::workload::{JwtsvidRequest, X509svidRequest};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

const TD: &str = "example.org";

/// A TLS connection that exposes the client's certificate chain to handlers.
struct TlsIo(tokio_rustls::server::TlsStream<TcpStream>);

#[derive(Clone, Debug)]
struct PeerCerts(Vec<Vec<u8>>);

impl Connected for TlsIo {
    type ConnectInfo = PeerCerts;
    fn connect_info(&self) -> PeerCerts {
        PeerCerts(
            self.0
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|d| d.to_vec()).collect())
                .unwrap_or_default(),
        )
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

struct FakeNode {
    ca: Arc<TestCa>,
    agent_ttl: i64,
    used_tokens: Mutex<Vec<String>>,
    entries: Mutex<Vec<types::Entry>>,
    attests: AtomicUsize,
    renewals_with_client_cert: AtomicUsize,
    mints: AtomicUsize,
    banned: AtomicBool,
}

fn agent_id_of<T>(req: &Request<T>) -> Result<String, Status> {
    let certs = req
        .extensions()
        .get::<PeerCerts>()
        .map(|p| p.0.clone())
        .unwrap_or_default();
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let id = ca_identity::x509::spiffe_id_of(leaf)
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
    if !id.path().starts_with("/agent/") {
        return Err(Status::permission_denied("not an agent"));
    }
    Ok(id.to_string())
}

impl FakeNode {
    fn bundle(&self) -> types::Bundle {
        ca_agent::node_client::bundle_to_proto(&self.ca.bundle())
    }

    fn check<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let id = agent_id_of(req)?;
        if self.banned.load(Ordering::SeqCst) {
            return Err(Status::permission_denied("agent is banned"));
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl Node for FakeNode {
    type AttestAgentStream =
        Pin<Box<dyn futures::Stream<Item = Result<AttestAgentResponse, Status>> + Send>>;

    async fn attest_agent(
        &self,
        request: Request<Streaming<AttestAgentRequest>>,
    ) -> Result<Response<Self::AttestAgentStream>, Status> {
        let mut input = request.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty stream"))?;
        let Some(attest_agent_request::Step::Params(params)) = first.step else {
            return Err(Status::invalid_argument("first message must carry params"));
        };
        let ca = self.ca.clone();
        let ttl = self.agent_ttl;
        let bundle = self.bundle();
        let result = move |id: String| -> Result<AttestAgentResponse, Status> {
            let chain = ca
                .sign_csr(&params.csr, &id, ttl)
                .map_err(Status::invalid_argument)?;
            Ok(AttestAgentResponse {
                step: Some(attest_agent_response::Step::Result(AttestResult {
                    spiffe_id: id,
                    svid_chain: chain,
                    bundle: Some(bundle),
                })),
            })
        };
        self.attests.fetch_add(1, Ordering::SeqCst);
        match params.data {
            Some(attest_params::Data::JoinToken(t)) => {
                let mut used = self.used_tokens.lock().unwrap();
                if !t.starts_with("good-") || used.contains(&t) {
                    return Err(Status::permission_denied(
                        "join token is unknown or was already used",
                    ));
                }
                used.push(t.clone());
                let msg = result(format!("spiffe://{TD}/agent/join_token/{t}"))?;
                Ok(Response::new(Box::pin(futures::stream::iter([Ok(msg)]))))
            }
            Some(attest_params::Data::X509pop(chain)) => {
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                let leaf = chain.certificates.first().cloned().unwrap_or_default();
                tokio::spawn(async move {
                    let challenge = b"nonce-1234".to_vec();
                    let _ = tx
                        .send(Ok(AttestAgentResponse {
                            step: Some(attest_agent_response::Step::Challenge(challenge.clone())),
                        }))
                        .await;
                    let reply = match input.message().await {
                        Ok(Some(AttestAgentRequest {
                            step: Some(attest_agent_request::Step::ChallengeResponse(sig)),
                        })) => {
                            let info = ca_identity::x509::cert_info(&leaf).unwrap();
                            match ca_identity::pubkey::verify_x509_signature(
                                &info.spki_der,
                                &challenge,
                                &sig,
                            ) {
                                Ok(()) => result(format!(
                                    "spiffe://{TD}/agent/x509pop/{}",
                                    info.serial_hex
                                )),
                                Err(e) => Err(Status::permission_denied(format!(
                                    "challenge signature: {e}"
                                ))),
                            }
                        }
                        _ => Err(Status::invalid_argument("expected a challenge response")),
                    };
                    let _ = tx.send(reply).await;
                });
                Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
            }
            None => Err(Status::invalid_argument("no attestation data")),
        }
    }

    async fn renew_agent(
        &self,
        request: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let id = self.check(&request)?;
        self.renewals_with_client_cert
            .fetch_add(1, Ordering::SeqCst);
        let chain = self
            .ca
            .sign_csr(&request.get_ref().csr, &id, self.agent_ttl)
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(RenewAgentResponse { svid_chain: chain }))
    }

    async fn sync_entries(
        &self,
        request: Request<SyncEntriesRequest>,
    ) -> Result<Response<SyncEntriesResponse>, Status> {
        self.check(&request)?;
        Ok(Response::new(SyncEntriesResponse {
            entries: self.entries.lock().unwrap().clone(),
            bundle: Some(self.bundle()),
            ..Default::default()
        }))
    }

    type WatchEntriesStream = ReceiverStream<Result<WatchEntriesResponse, Status>>;

    async fn watch_entries(
        &self,
        _: Request<WatchEntriesRequest>,
    ) -> Result<Response<Self::WatchEntriesStream>, Status> {
        Err(Status::unimplemented(
            "this fake node answers SyncEntries polls only",
        ))
    }

    async fn batch_new_x509_svid(
        &self,
        request: Request<BatchNewX509SvidRequest>,
    ) -> Result<Response<BatchNewX509SvidResponse>, Status> {
        self.check(&request)?;
        let entries = self.entries.lock().unwrap().clone();
        let results = request
            .into_inner()
            .params
            .into_iter()
            .map(|p| match entries.iter().find(|e| e.id == p.entry_id) {
                Some(e) => {
                    self.mints.fetch_add(1, Ordering::SeqCst);
                    match self.ca.sign_csr(&p.csr, &e.spiffe_id, 3600) {
                        Ok(chain) => NewX509SvidResult {
                            entry_id: p.entry_id,
                            svid_chain: chain,
                            error: String::new(),
                        },
                        Err(err) => NewX509SvidResult {
                            entry_id: p.entry_id,
                            svid_chain: vec![],
                            error: err,
                        },
                    }
                }
                None => NewX509SvidResult {
                    entry_id: p.entry_id,
                    svid_chain: vec![],
                    error: "no such entry".into(),
                },
            })
            .collect();
        Ok(Response::new(BatchNewX509SvidResponse { results }))
    }

    async fn new_jwt_svid(
        &self,
        request: Request<NewJwtSvidRequest>,
    ) -> Result<Response<NewJwtSvidResponse>, Status> {
        self.check(&request)?;
        let req = request.into_inner();
        let entries = self.entries.lock().unwrap().clone();
        let e = entries
            .iter()
            .find(|e| e.id == req.entry_id)
            .ok_or_else(|| Status::not_found("no such entry"))?;
        Ok(Response::new(NewJwtSvidResponse {
            token: self.ca.jwt(&e.spiffe_id, &req.audience, 300),
            expires_at: ca_identity::unix_now() + 300,
        }))
    }

    async fn get_bundle(
        &self,
        _request: Request<GetBundleRequest>,
    ) -> Result<Response<GetBundleResponse>, Status> {
        Ok(Response::new(GetBundleResponse {
            bundle: Some(self.bundle()),
        }))
    }
}

/// Starts the fake node on loopback; returns its address.
async fn spawn_node(node: Arc<FakeNode>) -> String {
    let (chain, key) = node.ca.issue(&format!("spiffe://{TD}/ca-node/n1"), 3600);
    let svid = SvidResolver::default();
    svid.set(&chain, &key).unwrap();
    let roots = LiveRoots::new(vec![node.ca.root_der()]);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ca_identity::tls::server_config(
        svid, roots, false,
    )));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<TlsIo, std::io::Error>>(16);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok(TlsIo(tls))).await;
                }
            });
        }
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(NodeServer::from_arc(node))
            .serve_with_incoming(ReceiverStream::new(rx))
            .await
            .unwrap();
    });
    addr
}

fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn entry(id: &str, spiffe_id: &str, uid: u32, revision: i64) -> types::Entry {
    types::Entry {
        id: id.into(),
        spiffe_id: spiffe_id.into(),
        parent_id: String::new(),
        selectors: vec![types::Selector {
            r#type: "unix".into(),
            value: format!("uid:{uid}"),
        }],
        revision,
        ..Default::default()
    }
}

async fn first_x509(socket: &std::path::Path) -> ca_proto::workload::X509svidResponse {
    let mut c = ca_agent::workload_client::connect(socket).await.unwrap();
    let mut s = c
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("an X.509-SVID within 20s")
        .unwrap()
        .unwrap()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_against_a_fake_node() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("ca_agent=debug")
        .with_test_writer()
        .try_init();
    let ca = Arc::new(TestCa::new(TD));
    let uid = nix::unistd::getuid().as_raw();
    let node = Arc::new(FakeNode {
        ca: ca.clone(),
        agent_ttl: 8,
        used_tokens: Mutex::new(vec![]),
        entries: Mutex::new(vec![entry("e1", "spiffe://example.org/app", uid, 1)]),
        attests: AtomicUsize::new(0),
        renewals_with_client_cert: AtomicUsize::new(0),
        mints: AtomicUsize::new(0),
        banned: AtomicBool::new(false),
    });
    let addr = spawn_node(node.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let bundle_pem = dir.path().join("bootstrap.pem");
    std::fs::write(&bundle_pem, ca.bundle().x509_pem()).unwrap();
    let config = AgentConfig {
        trust_domain: TD.into(),
        server_addresses: vec![dead_addr(), addr.clone()],
        data_dir: dir.path().join("data"),
        socket_path: dir.path().join("agent.sock"),
        trust_bundle_path: Some(bundle_pem.clone()),
        join_token: Some("good-1".into()),
        health_addr: Some("127.0.0.1:0".parse().unwrap()),
        sync_interval_secs: 1,
        // The fake node answers polls only; the watch runs against real nodes.
        sync: ca_agent::cache::SyncMode::Poll,
        ..Default::default()
    };

    // Attestation by join token, failing over past the dead first address.
    let agent = ca_agent::start(config.clone()).await.unwrap();
    assert_eq!(
        agent.spiffe_id().as_str(),
        "spiffe://example.org/agent/join_token/good-1"
    );
    assert_eq!(node.attests.load(Ordering::SeqCst), 1);

    // The workload gets its SVID; keys were made locally.
    let msg = first_x509(agent.socket_path()).await;
    assert_eq!(msg.svids.len(), 1);
    assert_eq!(msg.svids[0].spiffe_id, "spiffe://example.org/app");
    assert_eq!(msg.svids[0].bundle, ca.root_der());
    let leaf = ca_identity::x509::split_concatenated_der(&msg.svids[0].x509_svid).unwrap();
    ca_identity::x509::check_leaf_svid(&leaf[0]).unwrap();

    // JWT-SVIDs come from the node.
    let mut c = ca_agent::workload_client::connect(agent.socket_path())
        .await
        .unwrap();
    let jwt = c
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwt.svids[0].spiffe_id, "spiffe://example.org/app");

    // Ready.
    let health = agent.health_addr().unwrap();
    let r = http_get(health, "/readyz").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(http_get(health, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));

    // A revision bump re-mints, and the open stream pushes it.
    let mut s = c
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let before = s.message().await.unwrap().unwrap();
    node.entries.lock().unwrap()[0].revision = 2;
    let after = tokio::time::timeout(Duration::from_secs(15), s.message())
        .await
        .expect("re-minted SVID pushed")
        .unwrap()
        .unwrap();
    assert_ne!(before.svids[0].x509_svid, after.svids[0].x509_svid);
    assert_ne!(before.svids[0].x509_svid_key, after.svids[0].x509_svid_key);

    // The agent SVID (8s) is renewed at half-life, with the SVID as client certificate.
    let first_expiry = agent.svid_expires_at();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while agent.svid_expires_at() == first_expiry {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent SVID not renewed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(node.renewals_with_client_cert.load(Ordering::SeqCst) >= 1);

    // Banned: the node refuses, cached SVIDs keep being served.
    node.banned.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let msg = first_x509(agent.socket_path()).await;
    assert_eq!(msg.svids[0].spiffe_id, "spiffe://example.org/app");
    node.banned.store(false, Ordering::SeqCst);

    drop((c, s));
    let socket = agent.socket_path().to_owned();
    agent.shutdown().await.unwrap();
    assert!(!socket.exists(), "socket removed on shutdown");

    // Restart: the stored SVID is reused (the join token was single use anyway).
    let mut again = config.clone();
    again.join_token = None;
    let agent = ca_agent::start(again).await.unwrap();
    assert_eq!(
        agent.spiffe_id().as_str(),
        "spiffe://example.org/agent/join_token/good-1"
    );
    assert_eq!(node.attests.load(Ordering::SeqCst), 1, "no re-attestation");
    let msg = first_x509(agent.socket_path()).await;
    assert_eq!(msg.svids[0].spiffe_id, "spiffe://example.org/app");
    agent.shutdown().await.unwrap();

    // A used token is refused with the node's reason.
    let mut reuse = config.clone();
    reuse.data_dir = dir.path().join("data2");
    let err = ca_agent::start(reuse).await.unwrap_err().to_string();
    assert!(err.contains("already used"), "{err}");

    // An expired stored SVID without a way to re-attest: a clear error.
    let store = ca_agent::persist::Store::new(dir.path().join("data3"));
    let (chain, key) = ca.issue("spiffe://example.org/agent/join_token/old", -100);
    store
        .save_svid(&ca_agent::persist::AgentSvid::new(chain, key).unwrap())
        .unwrap();
    store.save_bundle(&ca.bundle()).unwrap();
    let mut expired = config.clone();
    expired.data_dir = dir.path().join("data3");
    expired.join_token = None;
    let err = ca_agent::start(expired.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("expired"), "{err}");
    assert!(err.contains("join token"), "{err}");
    // With a new token it attests again.
    expired.join_token = Some("good-2".into());
    expired.trust_bundle_path = None;
    expired.insecure_bootstrap = true;
    let agent = ca_agent::start(expired).await.unwrap();
    assert_eq!(
        agent.spiffe_id().as_str(),
        "spiffe://example.org/agent/join_token/good-2"
    );
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_and_insecure_bootstrap() {
    let ca = Arc::new(TestCa::new(TD));
    let node = Arc::new(FakeNode {
        ca: ca.clone(),
        agent_ttl: 3600,
        used_tokens: Mutex::new(vec![]),
        entries: Mutex::new(vec![]),
        attests: AtomicUsize::new(0),
        renewals_with_client_cert: AtomicUsize::new(0),
        mints: AtomicUsize::new(0),
        banned: AtomicBool::new(false),
    });
    let addr = spawn_node(node.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    // A provisioned certificate from some provisioning CA.
    let prov = TestCa::new("provisioning.test");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let chain = prov.issue_for("spiffe://provisioning.test/host-1", 3600, &key);
    let cert_path = dir.path().join("node.pem");
    let key_path = dir.path().join("node.key");
    std::fs::write(
        &cert_path,
        pem::encode(&pem::Pem::new("CERTIFICATE", chain[0].clone())),
    )
    .unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let config = AgentConfig {
        trust_domain: TD.into(),
        server_addresses: vec![addr],
        data_dir: dir.path().join("data"),
        socket_path: dir.path().join("agent.sock"),
        insecure_bootstrap: true,
        x509pop: Some(ca_agent::config::X509PopConfig {
            cert_path,
            key_path,
        }),
        sync: ca_agent::cache::SyncMode::Poll,
        ..Default::default()
    };
    let agent = ca_agent::start(config).await.unwrap();
    assert!(
        agent
            .spiffe_id()
            .as_str()
            .starts_with("spiffe://example.org/agent/x509pop/"),
        "{}",
        agent.spiffe_id()
    );
    // No entries for this agent: callers get PermissionDenied once synced.
    let mut c = ca_agent::workload_client::connect(agent.socket_path())
        .await
        .unwrap();
    let st = c.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied);
    drop(c);
    agent.shutdown().await.unwrap();
}
