//! The agent's client of the CA nodes' node API: gRPC over TLS on TCP, the node
//! authenticated by its X.509-SVID (`spiffe://TD/ca-node/...`) against the live trust
//! bundle, the agent authenticated by its own SVID as client certificate once it has one.
//!
//! Calls fail over between the configured addresses: a connect error, `Unavailable` or a
//! timeout moves on to the next address, and the address that answered is tried first next
//! time. Loops that call the nodes periodically back off exponentially with jitter
//! ([`Backoff`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ca_identity::tls::{Authorizer, LiveRoots, SvidResolver};
use ca_identity::{JwtAuthority, TrustBundle, TrustDomain};
use ca_proto::node::node_client::NodeClient as RawClient;
use hyper_util::rt::TokioIo;
use rand::Rng;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::Error;

/// How long one node call may take before the next address is tried.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a TCP + TLS connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Converts the node API's bundle message.
pub fn bundle_from_proto(b: ca_proto::types::Bundle) -> Result<TrustBundle, Error> {
    let td = TrustDomain::new(&b.trust_domain)?;
    Ok(TrustBundle {
        trust_domain: td,
        x509_authorities: b.x509_authorities,
        jwt_authorities: b
            .jwt_authorities
            .into_iter()
            .map(|k| JwtAuthority {
                key_id: k.key_id,
                public_key: k.public_key,
                expires_at: k.expires_at,
            })
            .collect(),
        sequence_number: b.sequence_number,
        refresh_hint: b.refresh_hint,
    })
}

/// Converts a bundle into the node API's message.
pub fn bundle_to_proto(b: &TrustBundle) -> ca_proto::types::Bundle {
    ca_proto::types::Bundle {
        trust_domain: b.trust_domain.as_str().to_owned(),
        x509_authorities: b.x509_authorities.clone(),
        jwt_authorities: b
            .jwt_authorities
            .iter()
            .map(|k| ca_proto::types::JwtKey {
                key_id: k.key_id.clone(),
                public_key: k.public_key.clone(),
                expires_at: k.expires_at,
            })
            .collect(),
        sequence_number: b.sequence_number,
        refresh_hint: b.refresh_hint,
    }
}

/// Exponential backoff with full jitter, capped.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, doubles up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay: uniformly random in [cap/2, cap], cap = min(max, base * 2^attempt).
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        let cap = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let ms = cap.as_millis().max(1) as u64;
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many failures in a row.
    pub fn failures(&self) -> u32 {
        self.attempt
    }
}

/// Whether an error means "try another node" rather than "the node said no".
pub fn is_failover(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Aborted
    )
}

/// A person-readable description of a failed node call.
pub fn describe(what: &str, status: &Status) -> String {
    match status.code() {
        Code::PermissionDenied => format!(
            "{what}: permission denied by the CA: {} (this agent may be banned or evicted; \
             it keeps serving cached SVIDs and keeps retrying)",
            status.message()
        ),
        Code::Unauthenticated => format!(
            "{what}: the CA did not accept this agent's SVID: {}",
            status.message()
        ),
        Code::Unavailable => format!("{what}: no CA node reachable: {}", status.message()),
        _ => format!("{what}: {:?}: {}", status.code(), status.message()),
    }
}

/// Accepts any server certificate: only for `insecure_bootstrap` first contact.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

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

fn insecure_config() -> rustls::ClientConfig {
    let provider = ca_identity::tls::provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

fn server_name_for(addr: &str) -> ServerName<'static> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("ca-node").expect("valid name"))
}

fn channel_for(addr: &str, tls: Arc<rustls::ClientConfig>) -> Result<Channel, Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::Config(format!("server address {addr:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let addr = addr.to_owned();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let tls = tls.clone();
        let addr = addr.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(server_name_for(&addr), tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// A node API client with failover over several addresses.
pub struct NodeClient {
    addrs: Vec<String>,
    roots: LiveRoots,
    svid: SvidResolver,
    tls: Arc<rustls::ClientConfig>,
    preferred: AtomicUsize,
    channels: Mutex<HashMap<usize, Channel>>,
    failovers: Option<prometheus::IntCounter>,
}

impl std::fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeClient")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl NodeClient {
    /// A client of `addrs` in `trust_domain`, trusting `roots` and presenting `svid`
    /// (when set) as client certificate.
    pub fn new(
        addrs: Vec<String>,
        trust_domain: TrustDomain,
        roots: LiveRoots,
        svid: SvidResolver,
    ) -> Self {
        let authorizer: Authorizer = Arc::new(move |id: &ca_identity::SpiffeId| {
            id.is_member_of(&trust_domain) && id.path().starts_with("/ca-node/")
        });
        let mut tls = ca_identity::tls::client_config(svid.clone(), roots.clone(), authorizer);
        // A resumed session would carry the identity of the handshake it resumes; after a
        // renewal the node must see the new SVID.
        tls.resumption = rustls::client::Resumption::disabled();
        let tls = Arc::new(tls);
        Self {
            addrs,
            roots,
            svid,
            tls,
            preferred: AtomicUsize::new(0),
            channels: Mutex::new(HashMap::new()),
            failovers: None,
        }
    }

    /// Counts in `counter` the calls answered by another node than the one tried first.
    pub fn with_failover_counter(mut self, counter: prometheus::IntCounter) -> Self {
        self.failovers = Some(counter);
        self
    }

    /// The live roots the nodes are verified against.
    pub fn roots(&self) -> &LiveRoots {
        &self.roots
    }

    /// The agent SVID presented to the nodes.
    pub fn svid(&self) -> &SvidResolver {
        &self.svid
    }

    fn channel(&self, idx: usize) -> Result<Channel, Error> {
        let mut map = self.channels.lock().expect("channels lock");
        if let Some(c) = map.get(&idx) {
            return Ok(c.clone());
        }
        let c = channel_for(&self.addrs[idx], self.tls.clone())?;
        map.insert(idx, c.clone());
        Ok(c)
    }

    fn forget_channel(&self, idx: usize) {
        self.channels.lock().expect("channels lock").remove(&idx);
    }

    /// Drops every cached connection (e.g. after the agent SVID changed, so the next
    /// handshake presents the new certificate).
    pub fn reset_connections(&self) {
        self.channels.lock().expect("channels lock").clear();
    }

    /// Runs `f` against each node in turn until one answers with something other than a
    /// connectivity failure. `insecure` uses a one-off connection that accepts any server
    /// certificate (first contact with `insecure_bootstrap`).
    pub async fn call<T, F, Fut>(&self, what: &str, insecure: bool, f: F) -> Result<T, Status>
    where
        F: Fn(RawClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let n = self.addrs.len();
        let start = self.preferred.load(Ordering::Relaxed) % n.max(1);
        let mut last = Status::unavailable("no server addresses configured");
        for k in 0..n {
            let idx = (start + k) % n;
            let addr = &self.addrs[idx];
            let channel = if insecure {
                channel_for(addr, Arc::new(insecure_config()))
            } else {
                self.channel(idx)
            };
            let channel = match channel {
                Ok(c) => c,
                Err(e) => return Err(Status::invalid_argument(e.to_string())),
            };
            let result = tokio::time::timeout(CALL_TIMEOUT, f(RawClient::new(channel))).await;
            let status = match result {
                Ok(Ok(v)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    if idx != start {
                        if let Some(c) = &self.failovers {
                            c.inc();
                        }
                    }
                    return Ok(v);
                }
                Ok(Err(s)) => s,
                Err(_) => Status::deadline_exceeded(format!(
                    "no answer within {}s",
                    CALL_TIMEOUT.as_secs()
                )),
            };
            if !is_failover(&status) {
                return Err(status);
            }
            tracing::debug!(node = %addr, "{}; trying the next node", describe(what, &status));
            self.forget_channel(idx);
            last = Status::new(
                status.code(),
                format!("{} (last tried {addr})", status.message()),
            );
        }
        Err(last)
    }

    /// Fetches the trust bundle.
    pub async fn get_bundle(&self) -> Result<TrustBundle, Status> {
        let resp = self
            .call("GetBundle", false, |mut c| async move {
                c.get_bundle(ca_proto::node::GetBundleRequest {}).await
            })
            .await?
            .into_inner();
        let b = resp
            .bundle
            .ok_or_else(|| Status::internal("the node returned no bundle"))?;
        bundle_from_proto(b).map_err(|e| Status::internal(e.to_string()))
    }

    /// Mints a JWT-SVID for an entry: (token, expires_at).
    pub async fn new_jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, i64), Status> {
        let resp = self
            .call("NewJwtSvid", false, |mut c| async move {
                c.new_jwt_svid(ca_proto::node::NewJwtSvidRequest {
                    entry_id: entry_id.to_owned(),
                    audience: audience.to_vec(),
                })
                .await
            })
            .await?
            .into_inner();
        Ok((resp.token, resp.expires_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(2)));
        assert!(d[9] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn server_names() {
        assert_eq!(
            format!("{:?}", server_name_for("127.0.0.1:8081")),
            format!("{:?}", ServerName::try_from("127.0.0.1").unwrap())
        );
        assert_eq!(
            format!("{:?}", server_name_for("[::1]:8081")),
            format!("{:?}", ServerName::try_from("::1").unwrap())
        );
        assert_eq!(
            format!("{:?}", server_name_for("node-a:1")),
            format!("{:?}", ServerName::try_from("node-a").unwrap())
        );
    }

    #[tokio::test]
    async fn failover_reports_unreachable_nodes() {
        // Ports on loopback that nothing listens on (bound then released).
        let mut addrs = Vec::new();
        for _ in 0..2 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            addrs.push(l.local_addr().unwrap().to_string());
        }
        let c = NodeClient::new(
            addrs.clone(),
            TrustDomain::new("example.org").unwrap(),
            LiveRoots::default(),
            SvidResolver::default(),
        );
        let err = c.get_bundle().await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains(&addrs[1]), "{err:?}");
    }
}
