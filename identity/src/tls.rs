//! SPIFFE authentication for rustls: peers are verified by chain to the *current* trust
//! bundle (which changes on root rotation, so it is read on every handshake) and identified
//! by the SPIFFE ID in their one URI SAN, never by DNS name.
//!
//! - [`SpiffeServerVerifier`]: a client's check of a server (e.g. agent -> ca-node), with an
//!   authorizer over the server's SPIFFE ID.
//! - [`SpiffeClientVerifier`]: a server's check of client certificates; optional, so the
//!   same port serves unauthenticated attestation and authenticated calls.
//! - [`SvidResolver`]: our own SVID (chain + key), swappable at run time for renewal.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::{Error, SpiffeId};

/// The X.509 roots peers must chain to; shared and updated in place on rotation.
#[derive(Clone, Default)]
pub struct LiveRoots(Arc<RwLock<Vec<CertificateDer<'static>>>>);

impl LiveRoots {
    /// Roots from DER certificates.
    pub fn new(roots: Vec<Vec<u8>>) -> Self {
        let s = Self::default();
        s.set(roots);
        s
    }

    /// Replaces the roots.
    pub fn set(&self, roots: Vec<Vec<u8>>) {
        *self.0.write().expect("roots lock") =
            roots.into_iter().map(CertificateDer::from).collect();
    }

    /// The current roots.
    pub fn get(&self) -> Vec<CertificateDer<'static>> {
        self.0.read().expect("roots lock").clone()
    }
}

impl fmt::Debug for LiveRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "LiveRoots({} roots)",
            self.0.read().map(|r| r.len()).unwrap_or(0)
        )
    }
}

/// The crypto provider everything here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn verify_chain(
    roots: &LiveRoots,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, rustls::Error> {
    let roots = roots.get();
    let anchors: Vec<_> = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
        .collect();
    if anchors.is_empty() {
        return Err(rustls::Error::General(
            "no trust bundle to verify peers against".into(),
        ));
    }
    let cert = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| rustls::Error::General(format!("bad peer certificate: {e}")))?;
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    cert.verify_for_usage(algs, &anchors, intermediates, now, usage, None, None)
        .map_err(|e| {
            rustls::Error::InvalidCertificate(match e {
                webpki::Error::CertExpired { .. } => rustls::CertificateError::Expired,
                webpki::Error::CertNotValidYet { .. } => rustls::CertificateError::NotValidYet,
                webpki::Error::UnknownIssuer => rustls::CertificateError::UnknownIssuer,
                webpki::Error::InvalidSignatureForPublicKey => {
                    rustls::CertificateError::BadSignature
                }
                other => rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                    Error::InvalidX509Svid(other.to_string()),
                ))),
            })
        })?;
    crate::x509::spiffe_id_of(end_entity.as_ref()).map_err(|e| {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(e),
        )))
    })
}

/// Decides whether a verified peer SPIFFE ID is acceptable.
pub type Authorizer = Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>;

/// Verifies a server by chain to the live roots and an authorizer over its SPIFFE ID.
pub struct SpiffeServerVerifier {
    roots: LiveRoots,
    authorize: Authorizer,
    provider: Arc<CryptoProvider>,
    /// Check validity at the leaf's own start, not at our clock (see [`any_time_client_config`]).
    any_time: bool,
}

impl SpiffeServerVerifier {
    /// A verifier accepting servers whose SPIFFE ID passes `authorize`.
    pub fn new(roots: LiveRoots, authorize: Authorizer) -> Self {
        Self {
            roots,
            authorize,
            provider: provider(),
            any_time: false,
        }
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeServerVerifier({:?})", self.roots)
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let now = if self.any_time {
            let start = crate::x509::cert_info(end_entity.as_ref())
                .map_err(|e| rustls::Error::General(e.to_string()))?
                .not_before;
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                u64::try_from(start.saturating_add(1)).unwrap_or(0),
            ))
        } else {
            now
        };
        let id = verify_chain(
            &self.roots,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if !(self.authorize)(&id) {
            return Err(rustls::Error::General(format!(
                "server SPIFFE ID {id} is not authorized"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies client certificates by chain to the live roots. Client auth is offered but
/// optional; handlers decide per call whether a SPIFFE ID is required.
pub struct SpiffeClientVerifier {
    roots: LiveRoots,
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    /// `mandatory`: refuse clients without a certificate at the handshake.
    pub fn new(roots: LiveRoots, mandatory: bool) -> Self {
        Self {
            roots,
            mandatory,
            provider: provider(),
        }
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeClientVerifier({:?})", self.roots)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(
            &self.roots,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Our own SVID for TLS (chain DER + PKCS#8 key), replaceable while connections run.
#[derive(Clone, Default)]
pub struct SvidResolver(Arc<RwLock<Option<Arc<CertifiedKey>>>>);

impl fmt::Debug for SvidResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SvidResolver")
    }
}

impl SvidResolver {
    /// Installs a new SVID (leaf first) and its PKCS#8 private key.
    pub fn set(&self, chain: &[Vec<u8>], pkcs8_key: &[u8]) -> Result<(), Error> {
        let key = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(pkcs8_key.to_vec().into()))
            .map_err(|e| Error::UnsupportedKey(e.to_string()))?;
        let certs = chain.iter().cloned().map(CertificateDer::from).collect();
        *self.0.write().expect("svid lock") = Some(Arc::new(CertifiedKey::new(certs, key)));
        Ok(())
    }

    /// The current SVID, if any.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().expect("svid lock").clone()
    }
}

impl rustls::server::ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current().is_some()
    }
}

/// A server config: our SVID, clients verified against the live roots (optional auth).
pub fn server_config(
    svid: SvidResolver,
    roots: LiveRoots,
    client_auth_mandatory: bool,
) -> rustls::ServerConfig {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
            roots,
            client_auth_mandatory,
        )))
        .with_cert_resolver(Arc::new(svid));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: a resumed session would carry the identity (or lack of one) of an
    // earlier connection, e.g. one made before the agent attested or after it was renewed.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg
}

/// A client config: servers verified against the live roots and `authorize`; our SVID (if
/// set in `svid`) presented as client certificate.
pub fn client_config(
    svid: SvidResolver,
    roots: LiveRoots,
    authorize: Authorizer,
) -> rustls::ClientConfig {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(roots, authorize)))
        .with_client_cert_resolver(Arc::new(svid));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg
}

/// A client config for asking a server the time when our own clock is what is in doubt:
/// the server's chain (to the live roots) and SPIFFE ID (`authorize`) are checked as
/// usual, but at the leaf's own start time rather than at our clock, which may have jumped
/// past every certificate's validity. No client certificate is presented. Use it for
/// nothing but reading the time.
pub fn any_time_client_config(roots: LiveRoots, authorize: Authorizer) -> rustls::ClientConfig {
    let mut verifier = SpiffeServerVerifier::new(roots, authorize);
    verifier.any_time = true;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg
}

/// The SPIFFE ID of a verified peer from its certificate chain (leaf first).
pub fn peer_id(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    certs
        .first()
        .and_then(|c| crate::x509::spiffe_id_of(c.as_ref()).ok())
}
