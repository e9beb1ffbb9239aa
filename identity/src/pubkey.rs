//! Public keys as SubjectPublicKeyInfo (SPKI) DER: which algorithm, verification, ECDSA
//! signature format conversion.

use ring::signature::{self, UnparsedPublicKey};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::Error;

/// The key algorithms the CA issues and accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA over NIST P-256 (signatures with SHA-256).
    EcP256,
    /// ECDSA over NIST P-384 (signatures with SHA-384).
    EcP384,
    /// RSA (PKCS#1 v1.5 signatures with SHA-256).
    Rsa {
        /// Modulus length in bits.
        bits: usize,
    },
}

impl KeyKind {
    /// The JWS `alg` for signatures by this key.
    pub fn jws_alg(self) -> &'static str {
        match self {
            KeyKind::EcP256 => "ES256",
            KeyKind::EcP384 => "ES384",
            KeyKind::Rsa { .. } => "RS256",
        }
    }
}

/// A parsed SubjectPublicKeyInfo.
#[derive(Clone, Debug)]
pub struct PublicKeyInfo {
    /// The algorithm.
    pub kind: KeyKind,
    /// The subjectPublicKey bits: an uncompressed EC point, or an RSAPublicKey DER.
    pub raw: Vec<u8>,
    /// For RSA: modulus and exponent, big-endian without leading zeros.
    pub rsa_components: Option<(Vec<u8>, Vec<u8>)>,
}

const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

/// Parses SPKI DER into what verification and JWKs need.
pub fn parse_spki(spki_der: &[u8]) -> Result<PublicKeyInfo, Error> {
    let (_, spki) = SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| Error::UnsupportedKey(format!("not a SubjectPublicKeyInfo: {e}")))?;
    let raw = spki.subject_public_key.data.to_vec();
    match spki.parsed() {
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            let kind = match curve.as_str() {
                OID_P256 => KeyKind::EcP256,
                OID_P384 => KeyKind::EcP384,
                other => {
                    return Err(Error::UnsupportedKey(format!(
                        "EC curve {other}; supported are P-256 and P-384"
                    )))
                }
            };
            Ok(PublicKeyInfo {
                kind,
                raw,
                rsa_components: None,
            })
        }
        Ok(PublicKey::RSA(rsa)) => {
            let strip = |b: &[u8]| {
                let i = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                b[i..].to_vec()
            };
            let n = strip(rsa.modulus);
            let e = strip(rsa.exponent);
            Ok(PublicKeyInfo {
                kind: KeyKind::Rsa { bits: n.len() * 8 },
                raw,
                rsa_components: Some((n, e)),
            })
        }
        Ok(_) | Err(_) => Err(Error::UnsupportedKey(
            "only EC P-256, EC P-384 and RSA keys are supported".into(),
        )),
    }
}

/// Verifies an X.509-style signature (ECDSA as DER, RSA PKCS#1 v1.5) over `msg`.
pub fn verify_x509_signature(spki_der: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), Error> {
    let info = parse_spki(spki_der)?;
    let alg: &dyn signature::VerificationAlgorithm = match info.kind {
        KeyKind::EcP256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyKind::EcP384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyKind::Rsa { .. } => &signature::RSA_PKCS1_2048_8192_SHA256,
    };
    UnparsedPublicKey::new(alg, &info.raw)
        .verify(msg, sig)
        .map_err(|_| Error::UnsupportedKey("signature does not verify".into()))
}

/// Verifies a JWS signature (ECDSA as fixed `r||s`, RSA PKCS#1 v1.5) over `msg`.
pub fn verify_jws_signature(info: &PublicKeyInfo, msg: &[u8], sig: &[u8]) -> bool {
    let alg: &dyn signature::VerificationAlgorithm = match info.kind {
        KeyKind::EcP256 => &signature::ECDSA_P256_SHA256_FIXED,
        KeyKind::EcP384 => &signature::ECDSA_P384_SHA384_FIXED,
        KeyKind::Rsa { .. } => &signature::RSA_PKCS1_2048_8192_SHA256,
    };
    UnparsedPublicKey::new(alg, &info.raw)
        .verify(msg, sig)
        .is_ok()
}

/// Converts an ECDSA signature from DER (`SEQUENCE { r INTEGER, s INTEGER }`) to the fixed
/// `r||s` form JWS uses, each half `field_len` bytes.
pub fn ecdsa_der_to_fixed(der: &[u8], field_len: usize) -> Result<Vec<u8>, Error> {
    fn read_len(b: &[u8], i: &mut usize) -> Option<usize> {
        let first = *b.get(*i)?;
        *i += 1;
        if first < 0x80 {
            return Some(first as usize);
        }
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 2 {
            return None;
        }
        let mut len = 0usize;
        for _ in 0..n {
            len = (len << 8) | *b.get(*i)? as usize;
            *i += 1;
        }
        Some(len)
    }
    fn read_int<'a>(b: &'a [u8], i: &mut usize) -> Option<&'a [u8]> {
        if *b.get(*i)? != 0x02 {
            return None;
        }
        *i += 1;
        let len = read_len(b, i)?;
        let v = b.get(*i..*i + len)?;
        *i += len;
        Some(v)
    }
    let parse = || -> Option<Vec<u8>> {
        let mut i = 0;
        if *der.first()? != 0x30 {
            return None;
        }
        i += 1;
        let _ = read_len(der, &mut i)?;
        let r = read_int(der, &mut i)?;
        let s = read_int(der, &mut i)?;
        let mut out = vec![0u8; field_len * 2];
        for (half, v) in [r, s].iter().enumerate() {
            let v = &v[v.iter().position(|x| *x != 0).unwrap_or(v.len())..];
            if v.len() > field_len {
                return None;
            }
            let start = half * field_len + field_len - v.len();
            out[start..start + v.len()].copy_from_slice(v);
        }
        Some(out)
    };
    parse().ok_or_else(|| Error::UnsupportedKey("malformed ECDSA DER signature".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

    #[test]
    fn der_signature_converts_to_fixed_and_verifies() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let info = PublicKeyInfo {
            kind: KeyKind::EcP256,
            raw: kp.public_key().as_ref().to_vec(),
            rsa_components: None,
        };
        for i in 0..64u8 {
            let msg = [i; 33];
            let der = kp.sign(&rng, &msg).unwrap();
            let fixed = ecdsa_der_to_fixed(der.as_ref(), 32).unwrap();
            assert_eq!(fixed.len(), 64);
            assert!(verify_jws_signature(&info, &msg, &fixed));
            assert!(!verify_jws_signature(&info, b"other", &fixed));
        }
        assert!(ecdsa_der_to_fixed(b"\x30\x02\x01", 32).is_err());
    }
}
