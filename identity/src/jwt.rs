//! JWT-SVIDs per the JWT-SVID standard: JWS compact serialization, `alg` ES256 (or ES384,
//! RS256), `kid` and `typ` in the header; `sub` (a SPIFFE ID), `aud`, `exp` and `iat` claims.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde_json::{json, Map, Value};

use crate::pubkey::{parse_spki, verify_jws_signature, KeyKind};
use crate::{Error, SpiffeId};

/// The signing input (`base64url(header).base64url(claims)`) of a new JWT-SVID; sign it and
/// pass the signature to [`assemble`].
pub fn signing_input(
    alg: KeyKind,
    kid: &str,
    sub: &SpiffeId,
    audience: &[String],
    iat: i64,
    exp: i64,
) -> String {
    let header = json!({ "alg": alg.jws_alg(), "kid": kid, "typ": "JWT" });
    let aud: Value = if audience.len() == 1 {
        Value::String(audience[0].clone())
    } else {
        Value::Array(audience.iter().cloned().map(Value::String).collect())
    };
    let claims = json!({ "sub": sub.as_str(), "aud": aud, "exp": exp, "iat": iat });
    format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    )
}

/// Appends the JWS signature (fixed `r||s` for ECDSA) to the signing input.
pub fn assemble(signing_input: &str, jws_signature: &[u8]) -> String {
    format!("{signing_input}.{}", B64.encode(jws_signature))
}

/// A JWT-SVID that passed validation.
#[derive(Clone, Debug)]
pub struct ValidatedJwt {
    /// Its `sub`.
    pub spiffe_id: SpiffeId,
    /// All its claims.
    pub claims: Map<String, Value>,
    /// Its `exp`.
    pub expires_at: i64,
}

/// A JSON object (JWT header or claims).
pub type JsonObject = Map<String, Value>;

/// The JWT signing keys of a trust domain: key ID -> SPKI DER.
pub type JwtKeys = BTreeMap<String, Vec<u8>>;

fn bad(why: impl Into<String>) -> Error {
    Error::InvalidJwtSvid(why.into())
}

/// Reads header and claims without verifying anything (to find `kid` and `sub`).
pub fn decode_unverified(token: &str) -> Result<(JsonObject, JsonObject), Error> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(bad(
            "not a JWS compact serialization (three dot-separated parts)",
        ));
    }
    let obj = |s: &str, what: &str| -> Result<Map<String, Value>, Error> {
        let bytes = B64
            .decode(s)
            .map_err(|_| bad(format!("the {what} is not base64url")))?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(bad(format!("the {what} is not a JSON object"))),
        }
    };
    Ok((obj(parts[0], "header")?, obj(parts[1], "claims")?))
}

/// Validates a JWT-SVID: signature by one of `keys` (found by `kid`), `alg` matching that
/// key, `typ` JWT or JOSE if present, `sub` a SPIFFE ID in `trust_domain`, `aud` containing
/// `audience`, and `exp` in the future (`now`, Unix seconds).
pub fn validate(
    token: &str,
    trust_domain: &str,
    keys: &JwtKeys,
    audience: &str,
    now: i64,
) -> Result<ValidatedJwt, Error> {
    let (header, claims) = decode_unverified(token)?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if alg.is_empty() || alg.eq_ignore_ascii_case("none") {
        return Err(bad("the header has no signature algorithm (alg)"));
    }
    if let Some(typ) = header.get("typ") {
        if !matches!(typ.as_str(), Some("JWT" | "JOSE")) {
            return Err(bad("the header's typ must be JWT or JOSE"));
        }
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("the header has no key ID (kid)"))?;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("the token has no sub claim"))?;
    let spiffe_id = SpiffeId::parse(sub).map_err(|e| bad(format!("sub: {e}")))?;
    if spiffe_id.trust_domain_name() != trust_domain {
        return Err(bad(format!(
            "sub {spiffe_id} is not in trust domain {trust_domain}"
        )));
    }
    let spki = keys.get(kid).ok_or_else(|| {
        bad(format!(
            "key ID {kid:?} is not in the JWT bundle of {trust_domain}"
        ))
    })?;
    let info = parse_spki(spki)?;
    if info.kind.jws_alg() != alg {
        return Err(bad(format!(
            "alg {alg} does not match key {kid} ({})",
            info.kind.jws_alg()
        )));
    }
    let (signing_input, sig_b64) = token.rsplit_once('.').expect("three parts checked");
    let sig = B64
        .decode(sig_b64)
        .map_err(|_| bad("the signature is not base64url"))?;
    if !verify_jws_signature(&info, signing_input.as_bytes(), &sig) {
        return Err(bad("the signature does not verify"));
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| bad("the token has no exp claim"))?;
    if exp <= now {
        return Err(bad(format!("the token expired {}s ago", now - exp)));
    }
    let auds: Vec<&str> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => return Err(bad("the token has no aud claim")),
    };
    if !auds.contains(&audience) {
        return Err(bad(format!(
            "audience {audience:?} is not among the token's audiences {auds:?}"
        )));
    }
    Ok(ValidatedJwt {
        spiffe_id,
        claims,
        expires_at: exp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pubkey::ecdsa_der_to_fixed;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

    fn spki_p256(raw_point: &[u8]) -> Vec<u8> {
        // SEQUENCE { SEQUENCE { ecPublicKey, prime256v1 }, BIT STRING point }
        let mut v = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        v.extend_from_slice(raw_point);
        v
    }

    fn token(kp: &EcdsaKeyPair, kid: &str, sub: &str, aud: &[&str], exp: i64) -> String {
        let rng = SystemRandom::new();
        let aud: Vec<String> = aud.iter().map(|s| s.to_string()).collect();
        let input = signing_input(
            KeyKind::EcP256,
            kid,
            &SpiffeId::parse(sub).unwrap(),
            &aud,
            1,
            exp,
        );
        let der = kp.sign(&rng, input.as_bytes()).unwrap();
        assemble(&input, &ecdsa_der_to_fixed(der.as_ref(), 32).unwrap())
    }

    #[test]
    fn round_trip_and_rejections() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let mut keys = JwtKeys::new();
        keys.insert("k1".into(), spki_p256(kp.public_key().as_ref()));
        let sub = "spiffe://example.org/service/metald";
        let ok = token(&kp, "k1", sub, &["billaged"], 2000);
        let v = validate(&ok, "example.org", &keys, "billaged", 1000).unwrap();
        assert_eq!(v.spiffe_id.as_str(), sub);
        assert_eq!(v.expires_at, 2000);

        let err = |t: &str, aud: &str, now: i64| {
            validate(t, "example.org", &keys, aud, now)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&ok, "other", 1000).contains("audience"));
        assert!(err(&ok, "billaged", 2000).contains("expired"));
        assert!(err(&token(&kp, "k2", sub, &["a"], 2000), "a", 1).contains("not in the JWT bundle"));
        assert!(err(
            &token(&kp, "k1", "spiffe://other.org/x", &["a"], 2000),
            "a",
            1
        )
        .contains("not in trust domain"));
        let mut tampered = ok.clone();
        tampered.insert(ok.find('.').unwrap() + 2, 'x');
        assert!(validate(&tampered, "example.org", &keys, "billaged", 1000).is_err());
        assert!(err("a.b", "a", 1).contains("three"));
    }
}
