//! Building certificates with rcgen and signing them through the async `KeyManager`.
//!
//! rcgen's signer is synchronous; an HSM or KMS is not. So a certificate is made in three
//! steps: rcgen serializes the TBSCertificate and hands it to a capturing signer (which
//! records it and returns a placeholder), the real key signs the captured TBS
//! asynchronously, and the final DER is assembled from TBS, algorithm and signature.

use std::sync::{Arc, Mutex};

use ca_kms::{KeyAlgorithm, SigningKey};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use time::OffsetDateTime;

use crate::Error;

/// rcgen's name for a key algorithm.
pub fn rcgen_alg(alg: KeyAlgorithm) -> &'static SignatureAlgorithm {
    match alg {
        KeyAlgorithm::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyAlgorithm::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => &rcgen::PKCS_RSA_SHA256,
    }
}

/// A public key as rcgen wants it (raw subjectPublicKey bits + algorithm).
#[derive(Clone, Debug)]
pub struct RawPublicKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl RawPublicKey {
    /// From SPKI DER of a key of algorithm `alg`.
    pub fn from_spki(spki: &[u8], alg: KeyAlgorithm) -> Result<Self, Error> {
        let info =
            ca_identity::pubkey::parse_spki(spki).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Self {
            raw: info.raw,
            alg: rcgen_alg(alg),
        })
    }
}

impl PublicKeyData for RawPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// Records what rcgen asks to sign; returns a placeholder signature.
struct CapturingSigner {
    public: RawPublicKey,
    captured: Mutex<Option<Vec<u8>>>,
}

impl PublicKeyData for CapturingSigner {
    fn der_bytes(&self) -> &[u8] {
        &self.public.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.public.alg
    }
}

impl rcgen::SigningKey for CapturingSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        *self.captured.lock().expect("capture lock") = Some(msg.to_vec());
        Ok(vec![0])
    }
}

/// The issuer of a certificate: its certificate parameters (subject, key IDs) and its key.
#[derive(Clone, Debug)]
pub struct IssuerKey {
    /// The issuing certificate's DER (None for self-signed creation).
    pub cert_der: Option<Vec<u8>>,
    /// The key.
    pub key: Arc<dyn SigningKey>,
}

fn der_len(len: usize) -> Vec<u8> {
    if len < 0x80 {
        vec![len as u8]
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len() - 1);
        let mut v = vec![0x80 | (bytes.len() - skip) as u8];
        v.extend_from_slice(&bytes[skip..]);
        v
    }
}

/// Splits a DER TLV at the start of `b`: (whole element, rest).
fn tlv(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let first_len = *b.get(1)?;
    let (hdr, len) = if first_len < 0x80 {
        (2, first_len as usize)
    } else {
        let n = (first_len & 0x7f) as usize;
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (2 + n, len)
    };
    let end = hdr.checked_add(len)?;
    if end > b.len() {
        return None;
    }
    Some(b.split_at(end))
}

/// The signatureAlgorithm element of an rcgen-made certificate: the element after the TBS.
fn signature_algorithm_of(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (outer, _) = tlv(cert_der)?;
    // skip outer tag+len
    let inner = {
        let l = outer[1];
        let hdr = if l < 0x80 { 2 } else { 2 + (l & 0x7f) as usize };
        &outer[hdr..]
    };
    let (_tbs, rest) = tlv(inner)?;
    let (alg, _) = tlv(rest)?;
    Some(alg.to_vec())
}

/// Makes a certificate for `subject_key` with `params`, issued by `issuer` (or self-signed
/// when `issuer.cert_der` is None and `subject_key` is the issuer's key).
pub async fn make_cert(
    params: &CertificateParams,
    subject_key: &impl PublicKeyData,
    issuer: &IssuerKey,
) -> Result<Vec<u8>, Error> {
    let signer = CapturingSigner {
        public: RawPublicKey::from_spki(issuer.key.public_key_spki(), issuer.key.algorithm())?,
        captured: Mutex::new(None),
    };
    let placeholder = match &issuer.cert_der {
        Some(der) => {
            let iss = Issuer::from_ca_cert_der(&der.clone().into(), &signer)
                .map_err(|e| Error::Internal(format!("issuer certificate: {e}")))?;
            params.signed_by(subject_key, &iss)
        }
        None => params.self_signed(&signer),
    }
    .map_err(|e| Error::Internal(format!("building certificate: {e}")))?;
    let tbs = signer
        .captured
        .lock()
        .expect("capture lock")
        .take()
        .ok_or_else(|| Error::Internal("rcgen did not sign".into()))?;
    let alg = signature_algorithm_of(placeholder.der())
        .ok_or_else(|| Error::Internal("cannot read signature algorithm".into()))?;
    let sig = issuer.key.sign(&tbs).await?;
    let mut bitstring = vec![0x03];
    bitstring.extend(der_len(sig.len() + 1));
    bitstring.push(0);
    bitstring.extend_from_slice(&sig);
    let body_len = tbs.len() + alg.len() + bitstring.len();
    let mut out = vec![0x30];
    out.extend(der_len(body_len));
    out.extend_from_slice(&tbs);
    out.extend_from_slice(&alg);
    out.extend_from_slice(&bitstring);
    Ok(out)
}

/// A random positive 128-bit serial number.
pub fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f;
    if b[0] == 0 {
        b[0] = 1;
    }
    SerialNumber::from_slice(&b)
}

fn ts(unix: i64) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|e| Error::Internal(e.to_string()))
}

fn uri(id: &str) -> Result<SanType, Error> {
    Ok(SanType::URI(id.try_into().map_err(|e| {
        Error::Internal(format!("URI SAN {id}: {e}"))
    })?))
}

/// Parameters of a CA (root or intermediate) certificate: cA=true, keyCertSign+cRLSign,
/// URI SAN of the trust domain, path length 1 for roots and 0 for intermediates.
pub fn ca_params(
    trust_domain_id: &str,
    common_name: &str,
    path_len: u8,
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "SPIFFE");
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![uri(trust_domain_id)?];
    p.serial_number = Some(random_serial());
    p.not_before = ts(not_before)?;
    p.not_after = ts(not_after)?;
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::Sha256;
    Ok(p)
}

/// Parameters of a leaf X.509-SVID per the X509-SVID standard: exactly one URI SAN (the
/// SPIFFE ID) plus optional DNS SANs, cA=false, critical keyUsage digitalSignature (plus
/// keyEncipherment/keyAgreement), EKU serverAuth+clientAuth, a random serial.
///
/// Key usage: digitalSignature always (X509-SVID); plus keyAgreement for EC keys and
/// keyEncipherment for RSA keys (RFC 5480 forbids keyEncipherment on EC keys).
pub fn svid_params(
    spiffe_id: &str,
    dns_names: &[String],
    not_before: i64,
    not_after: i64,
    rsa_key: bool,
) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "SPIFFE");
    if let Some(first) = dns_names.first() {
        dn.push(DnType::CommonName, first.as_str());
    }
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        if rsa_key {
            KeyUsagePurpose::KeyEncipherment
        } else {
            KeyUsagePurpose::KeyAgreement
        },
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let mut sans = vec![uri(spiffe_id)?];
    for d in dns_names {
        sans.push(SanType::DnsName(d.as_str().try_into().map_err(|e| {
            Error::InvalidArgument(format!("DNS name {d:?}: {e}"))
        })?));
    }
    p.subject_alt_names = sans;
    p.serial_number = Some(random_serial());
    p.not_before = ts(not_before)?;
    p.not_after = ts(not_after)?;
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::Sha256;
    Ok(p)
}
