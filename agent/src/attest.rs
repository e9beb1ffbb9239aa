//! The agent's own identity: node attestation (join token or x509pop) and renewal of the
//! agent SVID at half its lifetime with a fresh key.
//!
//! The agent's key is generated here (P-256) and only a CSR goes to the node. For x509pop
//! the node sends a challenge, which the agent signs with the provisioned key in X.509
//! signature form (ECDSA DER with SHA-256 for P-256 or SHA-384 for P-384; RSA PKCS#1 v1.5
//! with SHA-256).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ca_identity::TrustBundle;
use ca_proto::node::{
    attest_agent_request, attest_agent_response, attest_params, AttestAgentRequest, AttestParams,
    X509PopChain,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair as _, RsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P384_SHA384_ASN1_SIGNING, RSA_PKCS1_SHA256,
};
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::config::{AttestationMethod, X509PopConfig};
use crate::node_client::{bundle_from_proto, describe, Backoff, NodeClient};
use crate::persist::{AgentSvid, Store};
use crate::Error;

/// A fresh P-256 key and a CSR for it: (CSR DER, key).
pub fn new_key_and_csr() -> Result<(Vec<u8>, KeyPair), Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    Ok((csr.der().to_vec(), key))
}

/// The provisioned private key of x509pop.
pub enum PopKey {
    /// ECDSA P-256 or P-384.
    Ec(EcdsaKeyPair),
    /// RSA.
    Rsa(RsaKeyPair),
}

impl std::fmt::Debug for PopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PopKey::Ec(_) => "PopKey::Ec",
            PopKey::Rsa(_) => "PopKey::Rsa",
        })
    }
}

fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        vec![n as u8]
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        let mut out = vec![0x80 | bytes.len() as u8];
        out.extend(bytes);
        out
    }
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(content.len()));
    out.extend_from_slice(content);
    out
}

/// Wraps a SEC1 `ECPrivateKey` in PKCS#8 for the given curve OID (DER TLV).
fn sec1_to_pkcs8(sec1: &[u8], curve_oid: &[u8]) -> Vec<u8> {
    const EC_PUBLIC_KEY: [u8; 9] = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    let mut alg = EC_PUBLIC_KEY.to_vec();
    alg.extend_from_slice(curve_oid);
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend(der_tlv(0x30, &alg));
    body.extend(der_tlv(0x04, sec1));
    der_tlv(0x30, &body)
}

const OID_P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

impl PopKey {
    /// Reads a PEM private key: PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) or PKCS#1
    /// (`RSA PRIVATE KEY`).
    pub fn from_pem(text: &str) -> Result<Self, Error> {
        let items = pem::parse_many(text).map_err(|e| Error::Config(e.to_string()))?;
        let rng = SystemRandom::new();
        for item in items {
            let der = item.contents();
            match item.tag() {
                "PRIVATE KEY" => {
                    for alg in [
                        &ECDSA_P256_SHA256_ASN1_SIGNING,
                        &ECDSA_P384_SHA384_ASN1_SIGNING,
                    ] {
                        if let Ok(k) = EcdsaKeyPair::from_pkcs8(alg, der, &rng) {
                            return Ok(PopKey::Ec(k));
                        }
                    }
                    return RsaKeyPair::from_pkcs8(der).map(PopKey::Rsa).map_err(|e| {
                        Error::Config(format!(
                            "unsupported PKCS#8 key ({e}); use EC P-256, EC P-384 or RSA"
                        ))
                    });
                }
                "EC PRIVATE KEY" => {
                    for (oid, alg) in [
                        (&OID_P256[..], &ECDSA_P256_SHA256_ASN1_SIGNING),
                        (&OID_P384[..], &ECDSA_P384_SHA384_ASN1_SIGNING),
                    ] {
                        if let Ok(k) = EcdsaKeyPair::from_pkcs8(alg, &sec1_to_pkcs8(der, oid), &rng)
                        {
                            return Ok(PopKey::Ec(k));
                        }
                    }
                    return Err(Error::Config(
                        "unsupported EC key; use P-256 or P-384 (with its public key included)"
                            .into(),
                    ));
                }
                "RSA PRIVATE KEY" => {
                    return RsaKeyPair::from_der(der)
                        .map(PopKey::Rsa)
                        .map_err(|e| Error::Config(format!("unusable RSA key: {e}")));
                }
                _ => {}
            }
        }
        Err(Error::Config(
            "no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block in the key file".into(),
        ))
    }

    /// The public key bits (uncompressed EC point or RSAPublicKey DER).
    pub fn public_key_bits(&self) -> &[u8] {
        match self {
            PopKey::Ec(k) => k.public_key().as_ref(),
            PopKey::Rsa(k) => k.public_key().as_ref(),
        }
    }

    /// Signs in X.509 signature form.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        let rng = SystemRandom::new();
        match self {
            PopKey::Ec(k) => k
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| Error::Crypto("ECDSA signing failed".into())),
            PopKey::Rsa(k) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .map_err(|_| Error::Crypto("RSA signing failed".into()))?;
                Ok(sig)
            }
        }
    }
}

/// The provisioned certificate chain and key of x509pop, checked to belong together.
#[derive(Debug)]
pub struct PopCredentials {
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The leaf's private key.
    pub key: PopKey,
}

impl PopCredentials {
    /// Loads and cross-checks the files of `[x509pop]`.
    pub fn load(cfg: &X509PopConfig) -> Result<Self, Error> {
        let read = |what: &str, p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| Error::Config(format!("x509pop.{what} {}: {e}", p.display())))
        };
        let chain = ca_identity::bundle::certs_from_pem(&read("cert_path", &cfg.cert_path)?)
            .map_err(|e| {
                Error::Config(format!(
                    "x509pop.cert_path {}: {e}",
                    cfg.cert_path.display()
                ))
            })?;
        let key = PopKey::from_pem(&read("key_path", &cfg.key_path)?).map_err(|e| {
            Error::Config(format!("x509pop.key_path {}: {e}", cfg.key_path.display()))
        })?;
        let leaf = ca_identity::x509::cert_info(&chain[0])?;
        let spki = ca_identity::pubkey::parse_spki(&leaf.spki_der)?;
        if spki.raw != key.public_key_bits() {
            return Err(Error::Config(format!(
                "x509pop.key_path {} is not the private key of the first certificate in {}",
                cfg.key_path.display(),
                cfg.cert_path.display()
            )));
        }
        Ok(Self { chain, key })
    }
}

/// Attests this agent to the nodes; returns its SVID and the trust bundle.
/// `insecure` accepts any node certificate (`insecure_bootstrap` first contact).
pub async fn attest(
    node: &NodeClient,
    method: &AttestationMethod,
    insecure: bool,
) -> Result<(AgentSvid, TrustBundle), Error> {
    let (csr, key) = new_key_and_csr()?;
    let pop = match method {
        AttestationMethod::X509Pop(cfg) => Some(Arc::new(PopCredentials::load(cfg)?)),
        AttestationMethod::JoinToken(_) => None,
    };
    let data = match (method, &pop) {
        (AttestationMethod::JoinToken(t), _) => attest_params::Data::JoinToken(t.clone()),
        (AttestationMethod::X509Pop(_), Some(p)) => attest_params::Data::X509pop(X509PopChain {
            certificates: p.chain.clone(),
        }),
        (AttestationMethod::X509Pop(_), None) => unreachable!("loaded above"),
    };
    let first = AttestAgentRequest {
        step: Some(attest_agent_request::Step::Params(AttestParams {
            csr,
            data: Some(data),
        })),
    };
    let result = node
        .call("AttestAgent", insecure, |mut c| {
            let first = first.clone();
            let pop = pop.clone();
            async move {
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                tx.send(first)
                    .await
                    .map_err(|_| Status::internal("request stream closed"))?;
                let mut responses = c.attest_agent(ReceiverStream::new(rx)).await?.into_inner();
                loop {
                    let msg = responses.message().await?.ok_or_else(|| {
                        Status::unavailable(
                            "the node closed the attestation stream without a result",
                        )
                    })?;
                    match msg.step {
                        Some(attest_agent_response::Step::Challenge(ch)) => {
                            let pop = pop.as_ref().ok_or_else(|| {
                                Status::internal(
                                    "the node sent a challenge to a join-token attestation",
                                )
                            })?;
                            let sig = pop
                                .key
                                .sign(&ch)
                                .map_err(|e| Status::internal(e.to_string()))?;
                            tx.send(AttestAgentRequest {
                                step: Some(attest_agent_request::Step::ChallengeResponse(sig)),
                            })
                            .await
                            .map_err(|_| Status::internal("request stream closed"))?;
                        }
                        Some(attest_agent_response::Step::Result(r)) => return Ok(r),
                        None => {
                            return Err(Status::internal(
                                "the node sent an empty attestation message",
                            ))
                        }
                    }
                }
            }
        })
        .await
        .map_err(|s| {
            Error::Attestation(match s.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => format!(
                    "no CA node reachable: {}; check server_addresses and that the nodes run",
                    s.message()
                ),
                code => format!("the CA refused this agent ({code:?}): {}", s.message()),
            })
        })?;
    let bundle = result
        .bundle
        .ok_or_else(|| Error::Attestation("the node returned no trust bundle".into()))
        .and_then(bundle_from_proto)?;
    let svid = AgentSvid::new(result.svid_chain, key.serialize_der())?;
    if svid.spiffe_id.as_str() != result.spiffe_id && !result.spiffe_id.is_empty() {
        return Err(Error::Attestation(format!(
            "the node said the agent is {} but the SVID names {}",
            result.spiffe_id, svid.spiffe_id
        )));
    }
    Ok((svid, bundle))
}

/// Attests (warning loudly about `insecure`) and stores the resulting SVID and bundle.
pub async fn attest_and_store(
    method: &AttestationMethod,
    node: &NodeClient,
    store: &Store,
    insecure: bool,
) -> Result<(AgentSvid, TrustBundle), Error> {
    if insecure {
        tracing::warn!(
            "INSECURE BOOTSTRAP: accepting ANY CA node certificate for attestation; an attacker \
             on the network could impersonate the CA. Set trust_bundle_path in production."
        );
    }
    let (svid, bundle) = attest(node, method, insecure).await?;
    store.save_svid(&svid)?;
    store.save_bundle(&bundle)?;
    tracing::info!(spiffe_id = %svid.spiffe_id, expires_at = svid.not_after, "node attestation succeeded");
    Ok((svid, bundle))
}

/// Renews the agent SVID once with a new key.
pub async fn renew(node: &NodeClient) -> Result<AgentSvid, Status> {
    let (csr, key) = new_key_and_csr().map_err(|e| Status::internal(e.to_string()))?;
    let resp = node
        .call("RenewAgent", false, |mut c| {
            let csr = csr.clone();
            async move {
                c.renew_agent(ca_proto::node::RenewAgentRequest { csr })
                    .await
            }
        })
        .await?
        .into_inner();
    AgentSvid::new(resp.svid_chain, key.serialize_der())
        .map_err(|e| Status::internal(format!("unusable renewed SVID: {e}")))
}

/// Installs an agent SVID: TLS client certificate, persisted copy, published value.
pub fn install(
    node: &NodeClient,
    store: &Store,
    svid: &AgentSvid,
    published: &watch::Sender<AgentSvid>,
) -> Result<(), Error> {
    node.svid().set(&svid.chain, &svid.key_pkcs8)?;
    node.reset_connections();
    store.save_svid(svid)?;
    published.send_replace(svid.clone());
    Ok(())
}

/// How long to wait before renewing `svid`: until half its lifetime, but never less than
/// a short floor (half the remaining time, 1 to 5 seconds), so a CA that backdates
/// short-lived SVIDs cannot make the agent renew in a tight loop.
pub fn renewal_delay(svid: &AgentSvid, now: i64) -> Duration {
    let floor = ((svid.not_after - now) / 2).clamp(1, 5);
    Duration::from_secs((svid.renew_at() - now).max(floor) as u64)
}

/// Whether `svid` was signed by one of the revoked intermediates `tainted` (subject key
/// identifiers).
fn signed_by_revoked(svid: &AgentSvid, tainted: &[Vec<u8>]) -> bool {
    !tainted.is_empty()
        && svid
            .chain
            .first()
            .and_then(|leaf| ca_identity::x509::cert_info(leaf).ok())
            .and_then(|i| i.authority_key_id)
            .is_some_and(|aki| tainted.contains(&aki))
}

/// Renews the agent SVID at half its lifetime, and at once when the intermediate that
/// signed it is revoked (learned through the entry sync in `cache`), until `shutdown`;
/// retries with backoff.
pub async fn run_renewal(
    node: Arc<NodeClient>,
    store: Store,
    published: watch::Sender<AgentSvid>,
    mut cache: watch::Receiver<Arc<crate::cache::CacheState>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut retry_in: Option<Duration> = None;
    loop {
        let current = published.borrow().clone();
        let tainted = signed_by_revoked(&current, &cache.borrow().tainted_x509_authority_key_ids);
        let delay = match retry_in {
            Some(d) => d,
            None if tainted => {
                tracing::warn!(
                    "the intermediate that signed the agent SVID was revoked; renewing it now"
                );
                Duration::ZERO
            }
            None => renewal_delay(&current, ca_identity::unix_now()),
        };
        let mut cache_changed = false;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            r = cache.changed(), if !tainted && retry_in.is_none() => {
                if r.is_ok() {
                    cache_changed = true;
                } else {
                    tokio::time::sleep(delay).await; // the cache is gone: plain timer
                }
            }
            _ = shutdown.changed() => return,
        }
        if cache_changed {
            continue; // re-check whether the agent SVID is tainted now
        }
        match renew(&node).await {
            Ok(svid) => {
                match install(&node, &store, &svid, &published) {
                    Ok(()) => tracing::info!(spiffe_id = %svid.spiffe_id,
                        expires_at = svid.not_after, "agent SVID renewed"),
                    Err(e) => tracing::error!("cannot install the renewed agent SVID: {e}"),
                }
                backoff.reset();
                retry_in = None;
            }
            Err(status) => {
                let msg = describe("agent SVID renewal", &status);
                let now = ca_identity::unix_now();
                if current.not_after <= now {
                    tracing::error!(
                        "{msg}; the agent SVID expired at {}: the agent can no longer reach the CA. \
                         Stop the agent, delete the data_dir, and start it with a new join token",
                        current.not_after
                    );
                } else if status.code() == tonic::Code::PermissionDenied {
                    tracing::error!("{msg}");
                } else {
                    tracing::warn!("{msg}; retrying");
                }
                retry_in = Some(backoff.next_delay());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_half_life_with_a_floor() {
        let ca = crate::testing::TestCa::new("example.org");
        let (chain, key) = ca.issue("spiffe://example.org/agent/x", 3600);
        let svid = AgentSvid::new(chain, key).unwrap();
        let now = ca_identity::unix_now();
        let d = renewal_delay(&svid, now).as_secs() as i64;
        assert!((1790..=1800).contains(&d), "{d}");
        // Past half-life: soon, but not immediately.
        assert_eq!(renewal_delay(&svid, now + 3000), Duration::from_secs(5));
        assert_eq!(renewal_delay(&svid, now + 3598), Duration::from_secs(1));
        assert_eq!(renewal_delay(&svid, now + 9999), Duration::from_secs(1));
    }

    #[test]
    fn der_lengths() {
        assert_eq!(der_len(5), vec![5]);
        assert_eq!(der_len(0x80), vec![0x81, 0x80]);
        assert_eq!(der_len(0x1234), vec![0x82, 0x12, 0x34]);
    }

    #[test]
    fn pop_key_signs_verifiably_and_must_match_the_cert() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["node-1".to_string()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        let cert = params.self_signed(&key).unwrap();
        let cert_path = dir.path().join("node.pem");
        let key_path = dir.path().join("node.key");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let cfg = X509PopConfig {
            cert_path: cert_path.clone(),
            key_path: key_path.clone(),
        };
        let creds = PopCredentials::load(&cfg).unwrap();
        let sig = creds.key.sign(b"challenge").unwrap();
        let spki = ca_identity::x509::cert_info(&creds.chain[0])
            .unwrap()
            .spki_der;
        ca_identity::pubkey::verify_x509_signature(&spki, b"challenge", &sig).unwrap();
        // A key that is not the certificate's is refused.
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(&key_path, other.serialize_pem()).unwrap();
        let err = PopCredentials::load(&cfg).unwrap_err().to_string();
        assert!(err.contains("is not the private key"), "{err}");
    }

    #[test]
    fn csr_is_a_pkcs10_for_a_p256_key() {
        let (csr, key) = new_key_and_csr().unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_der(&csr.into()).unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(parsed.public_key.der_bytes(), key.der_bytes());
    }
}
