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

/// Clock skew tolerated for `nbf` and `iat` (a token from a node whose clock runs this
/// much ahead is still accepted); `exp` is enforced exactly.
pub const LEEWAY_SECS: i64 = 60;
/// The longest token accepted (a JWT-SVID minted here is well under 1 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Most audiences one JWT-SVID may name.
pub const MAX_AUDIENCES: usize = 16;
/// The longest audience value, in bytes.
pub const MAX_AUDIENCE_LEN: usize = 256;

/// Checks the audiences a JWT-SVID is asked for: one to [`MAX_AUDIENCES`] values, each
/// non-empty, at most [`MAX_AUDIENCE_LEN`] bytes and free of control characters.
pub fn check_audience(audience: &[String]) -> Result<(), Error> {
    let bad = |why: String| Err(Error::InvalidAudience(why));
    if audience.is_empty() {
        return bad("a JWT-SVID needs at least one audience".into());
    }
    if audience.len() > MAX_AUDIENCES {
        return bad(format!(
            "{} audiences requested; at most {MAX_AUDIENCES} are allowed",
            audience.len()
        ));
    }
    for a in audience {
        if a.is_empty() {
            return bad(
                "an audience is empty; every audience must name the token's receiver".into(),
            );
        }
        if a.len() > MAX_AUDIENCE_LEN {
            return bad(format!(
                "an audience is {} bytes long; at most {MAX_AUDIENCE_LEN} are allowed",
                a.len()
            ));
        }
        if a.chars().any(char::is_control) {
            return bad(format!("the audience {a:?} has control characters"));
        }
    }
    Ok(())
}

fn bad(why: impl Into<String>) -> Error {
    Error::InvalidJwtSvid(why.into())
}

/// Reads header and claims without verifying anything (to find `kid` and `sub`).
pub fn decode_unverified(token: &str) -> Result<(JsonObject, JsonObject), Error> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(bad(format!(
            "the token is {} bytes; at most {MAX_TOKEN_LEN} are accepted",
            token.len()
        )));
    }
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
    if let Some(crit) = header.get("crit") {
        return Err(bad(format!(
            "the header marks extensions as critical (crit {crit}); none is understood here"
        )));
    }
    let alg = match header.get("alg") {
        Some(Value::String(a)) if !a.is_empty() && !a.eq_ignore_ascii_case("none") => a.as_str(),
        Some(Value::String(_)) | None => {
            return Err(bad("the header has no signature algorithm (alg)"))
        }
        Some(other) => return Err(bad(format!("the header's alg {other} is not a string"))),
    };
    if let Some(typ) = header.get("typ") {
        if !matches!(typ.as_str(), Some("JWT" | "JOSE")) {
            return Err(bad("the header's typ must be JWT or JOSE"));
        }
    }
    let kid = match header.get("kid") {
        Some(Value::String(k)) => k.as_str(),
        None => return Err(bad("the header has no key ID (kid)")),
        Some(other) => return Err(bad(format!("the header's kid {other} is not a string"))),
    };
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("the token has no sub claim"))?;
    let spiffe_id = SpiffeId::parse(sub).map_err(|e| bad(format!("sub: {e}")))?;
    if spiffe_id.path().is_empty() {
        return Err(bad(format!(
            "sub {spiffe_id} has no path: a JWT-SVID names a workload, not a trust domain"
        )));
    }
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
    let exp = numeric_date(&claims, "exp")?.ok_or_else(|| bad("the token has no exp claim"))?;
    let now_f = now as f64;
    if exp <= now_f {
        return Err(bad(format!(
            "the token expired {}s ago",
            (now_f - exp) as i64
        )));
    }
    if let Some(nbf) = numeric_date(&claims, "nbf")? {
        if nbf > now_f + LEEWAY_SECS as f64 {
            return Err(bad(format!(
                "the token is not valid before {} ({} s from now)",
                nbf as i64,
                (nbf - now_f) as i64
            )));
        }
    }
    if let Some(iat) = numeric_date(&claims, "iat")? {
        if iat > now_f + LEEWAY_SECS as f64 {
            return Err(bad(format!(
                "the token says it was issued {} s in the future",
                (iat - now_f) as i64
            )));
        }
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
        // Saturates for dates beyond i64 seconds.
        expires_at: exp as i64,
    })
}

/// A NumericDate claim (RFC 7519: seconds since the epoch, possibly non-integer), if present.
fn numeric_date(claims: &JsonObject, name: &str) -> Result<Option<f64>, Error> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(v) if v.is_finite() => Ok(Some(v)),
            _ => Err(bad(format!(
                "the {name} claim {n} is not a usable NumericDate"
            ))),
        },
        Some(other) => Err(bad(format!(
            "the {name} claim {other} is not a NumericDate (a number of seconds)"
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
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
        let Signer { kp, keys } = signer();
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

    pub(crate) struct Signer {
        kp: EcdsaKeyPair,
        pub(crate) keys: JwtKeys,
    }

    pub(crate) fn signer() -> Signer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let mut keys = JwtKeys::new();
        keys.insert("k1".into(), spki_p256(kp.public_key().as_ref()));
        Signer { kp, keys }
    }

    impl Signer {
        /// A token with exactly this header and these claims, correctly signed by `k1`.
        pub(crate) fn sign(&self, header: &Value, claims: &Value) -> String {
            let input = format!(
                "{}.{}",
                B64.encode(header.to_string()),
                B64.encode(claims.to_string())
            );
            let der = self
                .kp
                .sign(&SystemRandom::new(), input.as_bytes())
                .unwrap();
            assemble(&input, &ecdsa_der_to_fixed(der.as_ref(), 32).unwrap())
        }

        fn check(&self, token: &str, now: i64) -> Result<ValidatedJwt, Error> {
            validate(token, "example.org", &self.keys, "aud", now)
        }

        fn refused(&self, header: &Value, claims: &Value, now: i64) -> String {
            match self.check(&self.sign(header, claims), now) {
                Ok(v) => panic!("accepted {header} {claims}: {v:?}"),
                Err(e) => e.to_string(),
            }
        }
    }

    pub(crate) fn header() -> Value {
        json!({ "alg": "ES256", "kid": "k1", "typ": "JWT" })
    }

    pub(crate) fn claims() -> Value {
        json!({ "sub": "spiffe://example.org/w", "aud": "aud", "exp": 2000, "iat": 1000 })
    }

    fn with(mut v: Value, key: &str, val: Value) -> Value {
        v[key] = val;
        v
    }

    #[test]
    fn the_test_signer_makes_tokens_that_pass() {
        let s = signer();
        s.check(&s.sign(&header(), &claims()), 1000).unwrap();
        let c = with(claims(), "nbf", json!(1000));
        s.check(&s.sign(&header(), &c), 1000).unwrap();
    }

    #[test]
    fn refuses_a_token_not_yet_valid() {
        let s = signer();
        let c = with(claims(), "nbf", json!(1500));
        let e = s.refused(&header(), &c, 1000);
        assert!(e.contains("not valid before") && e.contains("500 s"), "{e}");
        // Within the leeway for clock skew it passes; just past it, not.
        s.check(&s.sign(&header(), &c), 1500 - LEEWAY_SECS).unwrap();
        let e = s.refused(&header(), &c, 1500 - LEEWAY_SECS - 1);
        assert!(e.contains("not valid before"), "{e}");
        // A NumericDate that is not a number is refused, not ignored.
        let e = s.refused(&header(), &with(claims(), "nbf", json!("1500")), 1000);
        assert!(e.contains("nbf") && e.contains("NumericDate"), "{e}");
    }

    #[test]
    fn refuses_a_token_issued_in_the_future() {
        let s = signer();
        let c = with(claims(), "iat", json!(1000 + LEEWAY_SECS + 1));
        let e = s.refused(&header(), &c, 1000);
        assert!(e.contains("issued") && e.contains("in the future"), "{e}");
        let c = with(claims(), "iat", json!(1000 + LEEWAY_SECS));
        s.check(&s.sign(&header(), &c), 1000).unwrap();
        let e = s.refused(&header(), &with(claims(), "iat", json!([1])), 1000);
        assert!(e.contains("iat") && e.contains("NumericDate"), "{e}");
    }

    #[test]
    fn refuses_critical_header_extensions() {
        let s = signer();
        let h = with(header(), "crit", json!(["exp"]));
        let e = s.refused(&h, &claims(), 1000);
        assert!(e.contains("crit") && e.contains("\"exp\""), "{e}");
        // Whatever its form: an empty list or a non-list is not understood either.
        for crit in [json!([]), json!("b64"), json!(null)] {
            let e = s.refused(&with(header(), "crit", crit), &claims(), 1000);
            assert!(e.contains("crit"), "{e}");
        }
    }

    #[test]
    fn refuses_a_sub_without_a_path() {
        let s = signer();
        let c = with(claims(), "sub", json!("spiffe://example.org"));
        let e = s.refused(&header(), &c, 1000);
        assert!(e.contains("no path") && e.contains("workload"), "{e}");
    }

    #[test]
    fn numeric_dates_as_floats_strings_and_extremes() {
        let s = signer();
        // RFC 7519: a NumericDate may be non-integer.
        s.check(
            &s.sign(&header(), &with(claims(), "exp", json!(2000.5))),
            1000,
        )
        .unwrap();
        let e = s.refused(&header(), &with(claims(), "exp", json!("2000")), 1000);
        assert!(e.contains("exp") && e.contains("NumericDate"), "{e}");
        let e = s.refused(&header(), &with(claims(), "exp", json!(-1e300)), 1000);
        assert!(e.contains("expired"), "{e}");
        let e = s.refused(&header(), &with(claims(), "exp", json!(i64::MIN)), 1000);
        assert!(e.contains("expired"), "{e}");
        s.check(
            &s.sign(&header(), &with(claims(), "exp", json!(u64::MAX))),
            1000,
        )
        .unwrap();
        let e = s.refused(&header(), &with(claims(), "nbf", json!(1e300)), 1000);
        assert!(e.contains("not valid before"), "{e}");
        let c = with(
            with(claims(), "exp", json!(u64::MAX)),
            "iat",
            json!(u64::MAX),
        );
        let e = s.refused(&header(), &c, i64::MAX);
        assert!(e.contains("in the future"), "{e}");
    }

    #[test]
    fn audience_lists_are_bounded() {
        let many: Vec<String> = (0..=MAX_AUDIENCES).map(|i| format!("a{i}")).collect();
        for (aud, want) in [
            (vec![], "at least one audience"),
            (vec!["ok".to_string(), String::new()], "is empty"),
            (vec!["x".repeat(MAX_AUDIENCE_LEN + 1)], "at most 256"),
            (vec!["a\nb".to_string()], "control characters"),
            (many, "at most 16"),
        ] {
            let err = check_audience(&aud).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
        let most: Vec<String> = (0..MAX_AUDIENCES).map(|i| format!("a{i}")).collect();
        check_audience(&most).unwrap();
        check_audience(&["x".repeat(MAX_AUDIENCE_LEN)]).unwrap();
    }

    #[test]
    fn refuses_oversized_and_malformed_tokens_without_panicking() {
        let s = signer();
        let big = with(claims(), "pad", json!("x".repeat(MAX_TOKEN_LEN)));
        let e = s.refused(&header(), &big, 1000);
        assert!(e.contains("16384"), "{e}");
        let e = s.check(&"a".repeat(10 * 1024 * 1024), 1000).unwrap_err();
        assert!(e.to_string().contains("16384"), "{e}");
        for (h, c) in [
            (json!(["alg"]), claims()),
            (json!("ES256"), claims()),
            (header(), json!(7)),
            (header(), json!(null)),
            (header(), json!([claims()])),
        ] {
            let e = s.refused(&h, &c, 1000);
            assert!(e.contains("not a JSON object"), "{e}");
        }
        for (h, what) in [
            (with(header(), "alg", json!(1)), "alg"),
            (with(header(), "kid", json!(1)), "kid"),
            (with(header(), "alg", json!("none")), "alg"),
            (with(header(), "alg", json!("HS256")), "HS256"),
        ] {
            let e = s.refused(&h, &claims(), 1000);
            assert!(e.contains(what), "{what}: {e}");
        }
        for bad in ["", ".", "..", "...", "a.b.c", "\u{0}.\u{0}.\u{0}", "é.é.é"] {
            assert!(s.check(bad, 1000).is_err(), "{bad:?}");
        }
    }
}
