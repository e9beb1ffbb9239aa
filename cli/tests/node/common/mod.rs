//! Shared pieces of the end-to-end tests: nodes started in process or as a `ca-node`
//! process, node-API clients over real mTLS TCP connections, admin-API clients over the
//! real Unix socket, and snapshots of what the state machine stores.
#![allow(dead_code)]

pub mod node_checks;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_node::{NodeConfig, NodeHandle};
use ca_proto::admin::admin_client::AdminClient;
use ca_proto::node::node_client::NodeClient;
use ca_proto::node::{
    attest_agent_request, attest_agent_response, attest_params, AttestAgentRequest, AttestParams,
    AttestResult,
};
use ca_raft::StateMachine;
use ca_state::{AgentRecord, AuthorityRecord, EntryRecord};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

/// The trust domain of every test node.
pub const TD: &str = ca_dev::DEV_TRUST_DOMAIN;

/// How long anything in these tests may take to become true.
pub const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// In-process nodes

/// The dev node configuration under `dir` without the HTTP listener.
pub fn node_config(dir: &Path) -> NodeConfig {
    let mut cfg = ca_dev::node_config(dir);
    cfg.http_listen = None;
    cfg.log_level = "warn".into();
    cfg
}

/// Starts a node under `dir` after `tweak` changed its configuration.
pub async fn start_node(dir: &Path, tweak: impl FnOnce(&mut NodeConfig)) -> NodeHandle {
    let mut cfg = node_config(dir);
    tweak(&mut cfg);
    ca_node::start(cfg).await.expect("the node starts")
}

/// The node's current X.509 roots.
pub fn roots_of(node: &NodeHandle) -> Vec<Vec<u8>> {
    node.core
        .ca()
        .bundle()
        .expect("bundle")
        .x509_authorities
        .clone()
}

// ---------------------------------------------------------------------------------------
// State snapshots

/// Everything the state machine stores that a refused request could change.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    /// Every entry.
    pub entries: Vec<EntryRecord>,
    /// Every agent.
    pub agents: Vec<AgentRecord>,
    /// The CA journal.
    pub authorities: Vec<AuthorityRecord>,
}

/// Reads a [`Snapshot`].
pub async fn snapshot(sm: &StateMachine) -> Snapshot {
    Snapshot {
        entries: sm.entries().await.expect("entries"),
        agents: sm.agents().await.expect("agents"),
        authorities: sm.authorities().await.expect("authorities"),
    }
}

// ---------------------------------------------------------------------------------------
// Node API clients

/// An agent identity as the node issued it.
#[derive(Clone, Debug)]
pub struct Svid {
    /// The agent's SPIFFE ID as the node reported it.
    pub spiffe_id: String,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The agent key, PKCS#8.
    pub key_pkcs8: Vec<u8>,
}

impl Svid {
    /// The leaf's serial (hex) and expiry.
    pub fn serial_and_expiry(&self) -> (String, i64) {
        let info = ca_identity::x509::cert_info(&self.chain[0]).expect("leaf parses");
        (info.serial_hex, info.not_after)
    }
}

/// Accepts any server certificate. Only for tests that must isolate what the *server*
/// decides about the client's certificate from what the client decides about the server's.
#[derive(Debug)]
pub struct AcceptAnyServer(pub Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How the test client checks the node's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerCheck {
    /// As an agent does: chain to the roots, SPIFFE ID `spiffe://TD/ca-node/...`.
    Verify,
    /// Not at all (see [`AcceptAnyServer`]).
    AcceptAny,
}

/// A node-API client over a fresh TLS connection to `addr`, presenting `svid` (if any) as
/// client certificate.
pub fn node_client(
    addr: SocketAddr,
    roots: &[Vec<u8>],
    svid: Option<&Svid>,
    check: ServerCheck,
) -> NodeClient<Channel> {
    let resolver = SvidResolver::default();
    if let Some(s) = svid {
        resolver.set(&s.chain, &s.key_pkcs8).expect("usable SVID");
    }
    let tls = match check {
        ServerCheck::Verify => {
            let td = ca_identity::TrustDomain::new(TD).expect("td");
            let authorizer: ca_identity::tls::Authorizer =
                Arc::new(move |id: &ca_identity::SpiffeId| {
                    id.is_member_of(&td) && id.path().starts_with("/ca-node/")
                });
            ca_identity::tls::client_config(resolver, LiveRoots::new(roots.to_vec()), authorizer)
        }
        ServerCheck::AcceptAny => {
            let provider = ca_identity::tls::provider();
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
                .with_client_cert_resolver(Arc::new(resolver));
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            cfg.resumption = rustls::client::Resumption::disabled();
            cfg
        }
    };
    let tls = Arc::new(tls);
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20));
    let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = ServerName::try_from("localhost").expect("name");
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    }));
    NodeClient::new(channel)
}

/// Signs an x509pop challenge with the provisioned key (X.509 signature form).
pub type ChallengeSigner<'a> = dyn Fn(&[u8]) -> Vec<u8> + Sync + 'a;

/// Runs one AttestAgent exchange: sends `first`, answers a challenge with `sign` (if the
/// node sends one), returns the result or the status the node ended the stream with.
pub async fn attest_raw(
    client: &mut NodeClient<Channel>,
    first: AttestAgentRequest,
    sign: Option<&ChallengeSigner<'_>>,
) -> Result<AttestResult, Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.expect("send first");
    let mut responses = client
        .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    loop {
        let msg = responses
            .message()
            .await?
            .ok_or_else(|| Status::internal("test: stream ended without a result"))?;
        match msg.step {
            Some(attest_agent_response::Step::Challenge(ch)) => {
                let sign = sign.expect("test: the node sent an unexpected challenge");
                tx.send(AttestAgentRequest {
                    step: Some(attest_agent_request::Step::ChallengeResponse(sign(&ch))),
                })
                .await
                .expect("send challenge response");
            }
            Some(attest_agent_response::Step::Result(r)) => return Ok(r),
            None => return Err(Status::internal("test: empty attestation message")),
        }
    }
}

/// The first AttestAgent message for `data` with `csr`.
pub fn params(csr: Vec<u8>, data: Option<attest_params::Data>) -> AttestAgentRequest {
    AttestAgentRequest {
        step: Some(attest_agent_request::Step::Params(AttestParams {
            csr,
            data,
        })),
    }
}

/// Attests with a join token (fresh P-256 key) over a new connection.
pub async fn attest_join_token(node: &NodeHandle, token: &str) -> Result<Svid, Status> {
    let (csr, key) = ca_agent::attest::new_key_and_csr().expect("csr");
    let mut c = node_client(node.node_addr, &roots_of(node), None, ServerCheck::Verify);
    let r = attest_raw(
        &mut c,
        params(csr, Some(attest_params::Data::JoinToken(token.into()))),
        None,
    )
    .await?;
    Ok(Svid {
        spiffe_id: r.spiffe_id,
        chain: r.svid_chain,
        key_pkcs8: key.serialize_der(),
    })
}

/// Creates a join token for `spiffe_id` (empty: the default ID) and attests with it.
pub async fn new_agent(node: &NodeHandle, spiffe_id: &str) -> Svid {
    let t = node
        .core
        .create_join_token(spiffe_id, 600)
        .await
        .expect("join token");
    attest_join_token(node, &t.token)
        .await
        .expect("attestation with a fresh token succeeds")
}

/// A client authenticated as `svid`.
pub fn agent_client(node: &NodeHandle, svid: &Svid) -> NodeClient<Channel> {
    node_client(
        node.node_addr,
        &roots_of(node),
        Some(svid),
        ServerCheck::Verify,
    )
}

/// Asserts `r` failed with `code` and a message containing every one of `needles`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    r: Result<T, Status>,
    code: tonic::Code,
    needles: &[&str],
) {
    match r {
        Ok(v) => {
            let v: String = format!("{v:?}").chars().take(300).collect();
            panic!("expected {code:?} containing {needles:?}, got success: {v}")
        }
        Err(s) => {
            assert_eq!(
                s.code(),
                code,
                "wrong code; message: {:?} (wanted {needles:?})",
                s.message()
            );
            for n in needles {
                assert!(
                    s.message().contains(n),
                    "{code:?} message {:?} does not contain {n:?}",
                    s.message()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Admin API

/// An admin client over the node's real Unix socket.
pub async fn admin(socket: &Path) -> AdminClient<Channel> {
    AdminClient::new(
        ca_node_cli::uds_channel(socket)
            .await
            .expect("admin socket connects"),
    )
}

/// An entry proto.
pub fn entry(spiffe_id: &str, parent_id: &str, selectors: &[&str]) -> ca_proto::types::Entry {
    ca_proto::types::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent_id.into(),
        selectors: selectors
            .iter()
            .map(|s| {
                let (t, v) = s.split_once(':').expect("type:value");
                ca_proto::types::Selector {
                    r#type: t.into(),
                    value: v.into(),
                }
            })
            .collect(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// `ca-node` as a process

/// The `ca-node` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ca-node")
}

pub use ca_test_support::free_port;

/// Writes a node config under `dir` (admin socket and data in `dir`, node API on
/// `node_listen`) with `extra` TOML appended; returns (config path, admin socket).
pub fn write_config(dir: &Path, node_listen: &str, extra: &str) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    let sock = dir.join("admin.sock");
    let text = format!(
        "node_id = \"proc-1\"\ntrust_domain = \"{TD}\"\ndata_dir = {data:?}\nnode_listen = \"{node_listen}\"\nadmin_socket = {sock:?}\nlog_level = \"info\"\n{extra}"
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, text).expect("write config");
    (path, sock)
}

/// A `ca-node run` process, killed (SIGKILL) when dropped.
pub struct NodeProcess {
    proc: ca_test_support::process::Proc,
    /// Its admin socket.
    pub admin_socket: PathBuf,
}

impl NodeProcess {
    /// Starts `ca-node run --config config` and waits until its admin API reports ready.
    pub async fn start(config: &Path, admin_socket: &Path, log: &Path) -> Self {
        // Earlier runs leave the socket file behind when killed; wait for a fresh one.
        let _ = std::fs::remove_file(admin_socket);
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .env_remove("CA_NODE_ADMIN_SOCKET")
            .env_remove("RUST_LOG");
        let proc =
            ca_test_support::process::Proc::spawn("ca-node", cmd, log).expect("spawn ca-node");
        let mut p = Self {
            proc,
            admin_socket: admin_socket.to_owned(),
        };
        p.wait_ready().await;
        p
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.proc.exited() {
                panic!(
                    "ca-node exited during start ({status}); its log:\n{}",
                    self.log_text()
                );
            }
            if self.admin_socket.exists() {
                if let Ok(ch) = ca_node_cli::uds_channel(&self.admin_socket).await {
                    let r = AdminClient::new(ch)
                        .health(ca_proto::admin::HealthRequest {})
                        .await;
                    if matches!(r, Ok(ref h) if h.get_ref().ready) {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "ca-node not ready within {DEADLINE:?}; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process's output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.proc.log()).unwrap_or_default()
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill_hard(&mut self) {
        self.proc.kill_hard();
    }
}

/// The outcome of a finished `ca-node` command.
#[derive(Debug)]
pub struct Output {
    /// Whether it exited 0.
    pub success: bool,
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `ca-node args...` to completion (killed after [`DEADLINE`]).
pub fn run_cli(args: &[&str]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .env_remove("CA_NODE_ADMIN_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ca-node");
    // Read both pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ca-node {args:?} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        success: status.success(),
        code: status.code(),
        stdout: t_out.join().expect("stdout thread"),
        stderr: t_err.join().expect("stderr thread"),
    }
}

/// A cluster-service client to `addr` presenting `svid` (none if empty), the server
/// verified as a ca-node of [`TD`] against `roots`.
pub fn cluster_client(
    addr: &str,
    roots: &[Vec<u8>],
    svid: &SvidResolver,
) -> ca_proto::admin::cluster_client::ClusterClient<Channel> {
    let td = ca_identity::TrustDomain::new(TD).unwrap();
    let tls = ca_node::raft_tls::any_node_tls(svid, &LiveRoots::new(roots.to_vec()), td);
    ca_proto::admin::cluster_client::ClusterClient::new(
        ca_node::raft_tls::tls_channel(addr, tls).unwrap(),
    )
}
