//! Two workloads talking mutual TLS with the X.509-SVIDs and bundle an agent's Workload
//! API gives them (the Rust `spiffe` crate's `X509Source`): [`bob`] serves, [`alice`]
//! connects every 50 ms; each side verifies the other's chain against the bundle it holds
//! at that moment (webpki) and its SPIFFE ID, and every exchange is counted in a
//! [`Traffic`].

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use spiffe::x509_source::SvidPicker;
use spiffe::{X509Source, X509Svid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The authority key ID of a DER certificate (which intermediate signed it).
///
/// # Panics
/// If `cert` is not a certificate with an authority key ID.
pub fn aki(cert: &[u8]) -> Vec<u8> {
    ca_identity::x509::cert_info(cert)
        .expect("a certificate")
        .authority_key_id
        .expect("an authority key ID")
}

/// Picks the SVID with one SPIFFE ID (when one process holds several workloads' identities,
/// each uses its own).
#[derive(Debug)]
pub struct PickId(pub String);

impl SvidPicker for PickId {
    fn pick_svid(&self, svids: &[Arc<X509Svid>]) -> Option<usize> {
        svids
            .iter()
            .position(|s| s.spiffe_id().to_string() == self.0)
    }
}

/// Verifies a peer: its chain up to a root of the trust bundle the workload holds right now
/// (webpki), and its SPIFFE ID (the one URI SAN).
pub struct PeerVerifier {
    source: Arc<X509Source>,
    expected: String,
    trust_domain: spiffe::TrustDomain,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerVerifier({})", self.expected)
    }
}

impl PeerVerifier {
    /// A verifier that accepts only `expected` (a SPIFFE ID), under the bundle of its trust
    /// domain that `source` holds at each handshake.
    ///
    /// # Panics
    /// If `expected` is not a SPIFFE ID.
    pub fn new(source: Arc<X509Source>, expected: &str) -> Self {
        let id = spiffe::SpiffeId::new(expected).expect("a SPIFFE ID");
        Self {
            source,
            expected: expected.to_owned(),
            trust_domain: id.trust_domain().clone(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        let bundle = self
            .source
            .try_bundle_for_trust_domain(&self.trust_domain)
            .ok_or_else(|| rustls::Error::General("no bundle".into()))?;
        let roots: Vec<CertificateDer<'static>> = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let anchors: Vec<_> = roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect();
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("peer chain: {e}")))?;
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity.as_ref())
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        let uris: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if uris != [self.expected.as_str()] {
            return Err(rustls::Error::General(format!(
                "peer SPIFFE ID {uris:?}, expected {}",
                self.expected
            )));
        }
        Ok(())
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, webpki::KeyUsage::server_auth())?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.3 only".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, webpki::KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.3 only".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The workload's current SVID as rustls wants it.
pub fn own_identity(
    source: &X509Source,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let svid = source.svid().map_err(|e| format!("no SVID: {e}"))?;
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(svid.private_key().as_bytes().to_vec().into());
    Ok((chain, key))
}

/// Handshake counters and what went wrong.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Completed exchanges (handshake, ping, pong).
    pub ok: AtomicU64,
    /// What failed, one line each.
    pub failures: Mutex<Vec<String>>,
    /// Intermediates (subject key IDs) that signed the SVIDs peers presented.
    pub issuers_seen: Mutex<BTreeSet<Vec<u8>>>,
    /// Set to stop [`alice`].
    pub stop: AtomicBool,
}

impl Traffic {
    /// Records a failure (and prints it at once, as `HANDSHAKE FAILED <who>: <e>`).
    pub fn fail(&self, who: &str, e: impl std::fmt::Display) {
        let line = format!("{who}: {e}");
        eprintln!("HANDSHAKE FAILED {line}");
        self.failures.lock().unwrap().push(line);
    }
    fn saw(&self, chain: Option<&[CertificateDer<'_>]>) {
        if let Some(c) = chain.and_then(|c| c.first()) {
            self.issuers_seen.lock().unwrap().insert(aki(c.as_ref()));
        }
    }
}

/// Bob: accepts connections, each handshake with his current SVID, requiring the client to
/// be `peer` (a SPIFFE ID).
pub async fn bob(
    listener: tokio::net::TcpListener,
    source: Arc<X509Source>,
    traffic: Arc<Traffic>,
    peer: String,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let (source, traffic, peer) = (source.clone(), traffic.clone(), peer.clone());
        tokio::spawn(async move {
            let (chain, key) = match own_identity(&source) {
                Ok(x) => x,
                Err(e) => return traffic.fail("bob", e),
            };
            let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(Arc::new(PeerVerifier::new(source.clone(), &peer)))
            .with_single_cert(chain, key);
            let cfg = match cfg {
                Ok(c) => c,
                Err(e) => return traffic.fail("bob config", e),
            };
            let mut tls = match tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
                .accept(tcp)
                .await
            {
                Ok(t) => t,
                Err(e) => return traffic.fail("bob handshake", e),
            };
            traffic.saw(tls.get_ref().1.peer_certificates());
            let mut buf = [0u8; 4];
            if let Err(e) = tls.read_exact(&mut buf).await {
                return traffic.fail("bob read", e);
            }
            let _ = tls.write_all(b"pong").await;
            let _ = tls.shutdown().await;
        });
    }
}

/// Alice: a new connection to `addr` every 50 ms, each with her current SVID, requiring the
/// server to be `peer` (a SPIFFE ID); runs until `traffic.stop` is set.
pub async fn alice(
    addr: std::net::SocketAddr,
    source: Arc<X509Source>,
    traffic: Arc<Traffic>,
    peer: String,
) {
    while !traffic.stop.load(Ordering::SeqCst) {
        let once = async {
            let (chain, key) = own_identity(&source)?;
            let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerVerifier::new(source.clone(), &peer)))
            .with_client_auth_cert(chain, key)
            .map_err(|e| e.to_string())?;
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(ServerName::try_from("bob.invalid").unwrap(), tcp)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            traffic.saw(tls.get_ref().1.peer_certificates());
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf)
                .await
                .map_err(|e| format!("read (bob refused us?): {e}"))?;
            if &buf != b"pong" {
                return Err("bad answer".to_string());
            }
            Ok::<_, String>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), once).await {
            Ok(Ok(())) => {
                traffic.ok.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Err(e)) => traffic.fail("alice", e),
            Err(_) => traffic.fail("alice", "no answer within 5s"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
