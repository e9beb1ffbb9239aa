//! Trust bundles: the X.509 roots and the JWT signing keys of a trust domain, rendered as
//! PEM, as concatenated DER (Workload API), as a JWKS of JWT keys (Workload API), and as a
//! SPIFFE bundle document (JWKS with `x509-svid` and `jwt-svid` keys).

use base64::engine::general_purpose::{STANDARD as B64STD, URL_SAFE_NO_PAD as B64};
use base64::Engine;
use serde_json::{json, Map, Value};

use crate::jwt::JwtKeys;
use crate::pubkey::{parse_spki, KeyKind};
use crate::x509::cert_info;
use crate::{Error, TrustDomain};

/// A JWT signing public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtAuthority {
    /// The `kid` tokens name it by.
    pub key_id: String,
    /// SubjectPublicKeyInfo DER.
    pub public_key: Vec<u8>,
    /// When it stops being published (Unix seconds).
    pub expires_at: i64,
}

/// The trust bundle of one trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    /// Whose bundle.
    pub trust_domain: TrustDomain,
    /// Root certificates, DER.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT signing keys.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// Bumped on every change.
    pub sequence_number: i64,
    /// Seconds between re-fetches a consumer should use.
    pub refresh_hint: i64,
}

fn jwk_public(spki: &[u8]) -> Result<Map<String, Value>, Error> {
    let info = parse_spki(spki)?;
    let mut m = Map::new();
    match info.kind {
        KeyKind::EcP256 | KeyKind::EcP384 => {
            let (crv, n) = if info.kind == KeyKind::EcP256 {
                ("P-256", 32)
            } else {
                ("P-384", 48)
            };
            if info.raw.len() != 1 + 2 * n || info.raw[0] != 4 {
                return Err(Error::UnsupportedKey("EC point is not uncompressed".into()));
            }
            m.insert("kty".into(), "EC".into());
            m.insert("crv".into(), crv.into());
            m.insert("x".into(), B64.encode(&info.raw[1..1 + n]).into());
            m.insert("y".into(), B64.encode(&info.raw[1 + n..]).into());
        }
        KeyKind::Rsa { .. } => {
            let (n, e) = info.rsa_components.expect("RSA has components");
            m.insert("kty".into(), "RSA".into());
            m.insert("n".into(), B64.encode(n).into());
            m.insert("e".into(), B64.encode(e).into());
        }
    }
    Ok(m)
}

impl TrustBundle {
    /// The roots as one PEM document.
    pub fn x509_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
            .collect()
    }

    /// The roots as concatenated DER, as the Workload API carries them.
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The JWT keys by `kid`, for [`crate::jwt::validate`].
    pub fn jwt_keys(&self) -> JwtKeys {
        self.jwt_authorities
            .iter()
            .map(|k| (k.key_id.clone(), k.public_key.clone()))
            .collect()
    }

    fn jwt_jwks(&self, with_use: bool) -> Result<Vec<Value>, Error> {
        self.jwt_authorities
            .iter()
            .map(|k| {
                let mut m = jwk_public(&k.public_key)?;
                m.insert("kid".into(), k.key_id.clone().into());
                if with_use {
                    m.insert("use".into(), "jwt-svid".into());
                }
                Ok(Value::Object(m))
            })
            .collect()
    }

    /// The JWT keys as a JWKS document, as the Workload API's FetchJWTBundles carries them.
    pub fn jwt_jwks_json(&self) -> Result<String, Error> {
        Ok(json!({ "keys": self.jwt_jwks(true)? }).to_string())
    }

    /// The SPIFFE bundle document (a JWKS with `x509-svid` and `jwt-svid` keys).
    pub fn to_spiffe_json(&self) -> Result<String, Error> {
        let mut keys = Vec::new();
        for der in &self.x509_authorities {
            let info = cert_info(der)?;
            let mut m = jwk_public(&info.spki_der)?;
            m.insert("use".into(), "x509-svid".into());
            m.insert("x5c".into(), json!([B64STD.encode(der)]));
            keys.push(Value::Object(m));
        }
        keys.extend(self.jwt_jwks(true)?);
        let doc = json!({
            "keys": keys,
            "spiffe_sequence": self.sequence_number,
            "spiffe_refresh_hint": self.refresh_hint,
        });
        serde_json::to_string_pretty(&doc).map_err(|e| Error::InvalidBundle(e.to_string()))
    }
}

/// Reads PEM certificates (e.g. a bootstrap bundle file) into DER.
pub fn certs_from_pem(pem_text: &str) -> Result<Vec<Vec<u8>>, Error> {
    let items = pem::parse_many(pem_text).map_err(|e| Error::InvalidBundle(e.to_string()))?;
    let certs: Vec<Vec<u8>> = items
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect();
    if certs.is_empty() {
        return Err(Error::InvalidBundle(
            "no CERTIFICATE blocks in the PEM text".into(),
        ));
    }
    Ok(certs)
}
