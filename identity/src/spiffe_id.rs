//! SPIFFE IDs and trust domains, parsed exactly as the SPIFFE-ID standard says.
//!
//! - scheme `spiffe`, lower case, followed by `://`;
//! - trust domain: 1..=255 characters of `[a-z0-9._-]` (no upper case, no port, no user info);
//! - path: empty, or `/`-separated segments of `[a-zA-Z0-9._-]`, none empty, none `.` or `..`,
//!   no trailing `/`;
//! - no query, no fragment; the whole ID at most 2048 bytes.

use std::fmt;
use std::str::FromStr;

use crate::Error;

const SCHEME_PREFIX: &str = "spiffe://";
/// Longest trust domain name the standard allows.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID (URI) the standard allows, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// A trust domain name such as `prod.example.org`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A SPIFFE ID such as `spiffe://prod.example.org/service/metald`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    td_len: usize,
}

fn bad(input: &str, why: impl Into<String>) -> Error {
    Error::InvalidSpiffeId {
        input: input.chars().take(120).collect(),
        reason: why.into(),
    }
}

fn check_trust_domain(input: &str, td: &str) -> Result<(), Error> {
    if td.is_empty() {
        return Err(bad(input, "the trust domain is empty"));
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(bad(
            input,
            format!("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} characters"),
        ));
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            'A'..='Z' => {
                return Err(bad(
                    input,
                    "the trust domain has upper-case letters; only lower case is allowed",
                ))
            }
            ':' => {
                return Err(bad(
                    input,
                    "the trust domain has a ':'; ports are not allowed in SPIFFE IDs",
                ))
            }
            '@' => return Err(bad(input, "user info ('@') is not allowed in SPIFFE IDs")),
            '?' => return Err(bad(input, "a query ('?') is not allowed in SPIFFE IDs")),
            '#' => return Err(bad(input, "a fragment ('#') is not allowed in SPIFFE IDs")),
            '%' => return Err(bad(input, "percent-encoding is not allowed in SPIFFE IDs")),
            other => {
                return Err(bad(
                    input,
                    format!(
                        "the trust domain has the character {other:?}; allowed are a-z 0-9 . - _"
                    ),
                ))
            }
        }
    }
    Ok(())
}

fn check_path(input: &str, path: &str) -> Result<(), Error> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(bad(input, "the path must start with '/'"));
    };
    for segment in rest.split('/') {
        match segment {
            "" => {
                return Err(bad(
                    input,
                    if path.ends_with('/') {
                        "the path ends with '/'; trailing slashes are not allowed"
                    } else {
                        "the path has an empty segment ('//')"
                    },
                ))
            }
            "." | ".." => {
                return Err(bad(
                    input,
                    "the path has a '.' or '..' segment; relative segments are not allowed",
                ))
            }
            _ => {}
        }
        for c in segment.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
                '?' => return Err(bad(input, "a query ('?') is not allowed in SPIFFE IDs")),
                '#' => return Err(bad(input, "a fragment ('#') is not allowed in SPIFFE IDs")),
                '%' => return Err(bad(input, "percent-encoding is not allowed in SPIFFE IDs")),
                other => {
                    return Err(bad(
                        input,
                        format!(
                            "the path has the character {other:?}; allowed are a-z A-Z 0-9 . - _ and '/' between segments"
                        ),
                    ))
                }
            }
        }
    }
    Ok(())
}

impl TrustDomain {
    /// Parses a trust domain name (`prod.example.org`) or its SPIFFE ID form
    /// (`spiffe://prod.example.org`).
    pub fn new(input: &str) -> Result<Self, Error> {
        if input.contains("://") {
            let id = SpiffeId::parse(input)?;
            if !id.path().is_empty() {
                return Err(bad(input, "a trust domain cannot have a path"));
            }
            return Ok(id.trust_domain());
        }
        check_trust_domain(input, input)?;
        Ok(Self(input.to_owned()))
    }

    /// The name, e.g. `prod.example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://prod.example.org`.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            uri: format!("{SCHEME_PREFIX}{}", self.0),
            td_len: self.0.len(),
        }
    }

    /// A SPIFFE ID in this trust domain with the given path (which must start with `/`).
    pub fn id_with_path(&self, path: &str) -> Result<SpiffeId, Error> {
        SpiffeId::parse(&format!("{SCHEME_PREFIX}{}{path}", self.0))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl SpiffeId {
    /// Parses a SPIFFE ID, with an error that says exactly which rule it breaks.
    pub fn parse(input: &str) -> Result<Self, Error> {
        if input.is_empty() {
            return Err(bad(input, "it is empty"));
        }
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(bad(
                input,
                format!("it is longer than {MAX_SPIFFE_ID_LEN} bytes"),
            ));
        }
        let Some(rest) = input.strip_prefix(SCHEME_PREFIX) else {
            let lower = input.to_ascii_lowercase();
            return Err(bad(
                input,
                if lower.starts_with(SCHEME_PREFIX) {
                    "the scheme must be lower-case 'spiffe://'"
                } else {
                    "it must start with 'spiffe://'"
                },
            ));
        };
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(input, td)?;
        check_path(input, path)?;
        Ok(Self {
            uri: input.to_owned(),
            td_len: td.len(),
        })
    }

    /// The trust domain of this ID.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The trust domain name, without allocating.
    pub fn trust_domain_name(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len()..SCHEME_PREFIX.len() + self.td_len]
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len() + self.td_len..]
    }

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// Whether this ID is in `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for ok in [
            "spiffe://prod.example.org",
            "spiffe://prod.example.org/service/metald",
            "spiffe://prod.example.org/service/metald/customer/cust-123",
            "spiffe://dev.example.org/service/builderd/tenant/acme_corp",
            "spiffe://a/B.c-d_E",
            "spiffe://1.2.3.4/x",
        ] {
            let id = SpiffeId::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(id.as_str(), ok);
        }
        let id = SpiffeId::parse("spiffe://prod.example.org/service/metald").unwrap();
        assert_eq!(id.trust_domain_name(), "prod.example.org");
        assert_eq!(id.path(), "/service/metald");
    }

    #[test]
    fn rejects_invalid_ids_with_a_reason() {
        let cases = [
            ("", "empty"),
            ("http://example.org/x", "must start with 'spiffe://'"),
            ("SPIFFE://example.org/x", "lower-case"),
            ("spiffe://", "trust domain is empty"),
            ("spiffe:///path", "trust domain is empty"),
            ("spiffe://Example.org/x", "upper-case"),
            ("spiffe://example.org:8080/x", "ports"),
            ("spiffe://user@example.org/x", "user info"),
            ("spiffe://example.org/", "trailing"),
            ("spiffe://example.org/a//b", "empty segment"),
            ("spiffe://example.org/a/./b", "relative"),
            ("spiffe://example.org/a/../b", "relative"),
            ("spiffe://example.org/a?b=c", "query"),
            ("spiffe://example.org/a#frag", "fragment"),
            ("spiffe://example.org/a%20b", "percent"),
            ("spiffe://example.org/a b", "character ' '"),
            ("spiffe://exa mple.org", "character ' '"),
        ];
        for (input, expect) in cases {
            let err = SpiffeId::parse(input).expect_err(input).to_string();
            assert!(err.contains(expect), "{input:?}: {err:?} lacks {expect:?}");
        }
    }

    #[test]
    fn enforces_length_limits() {
        let td = "a".repeat(256);
        assert!(SpiffeId::parse(&format!("spiffe://{td}")).is_err());
        let td = "a".repeat(255);
        assert!(SpiffeId::parse(&format!("spiffe://{td}")).is_ok());
        let long_path = format!("spiffe://example.org/{}", "a".repeat(2048));
        let err = SpiffeId::parse(&long_path).unwrap_err().to_string();
        assert!(err.contains("2048"), "{err}");
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(
            TrustDomain::new("example.org").unwrap().as_str(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::new("spiffe://example.org").unwrap().as_str(),
            "example.org"
        );
        assert!(TrustDomain::new("spiffe://example.org/x").is_err());
        assert!(TrustDomain::new("Example.org").is_err());
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(td.id().as_str(), "spiffe://example.org");
        assert_eq!(
            td.id_with_path("/agent/x").unwrap().as_str(),
            "spiffe://example.org/agent/x"
        );
    }

    /// A cheap property test: random byte strings never panic the parser, and whatever it
    /// accepts re-parses to the same value and only uses allowed characters.
    #[test]
    fn parser_is_total_on_random_input() {
        let alphabet: Vec<char> = "spifE:/.-_aZ09?#%@ \u{e9}".chars().collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 40) as usize;
            let mut s = String::from(if seed & 1 == 0 { "spiffe://" } else { "" });
            let mut r = seed;
            for _ in 0..len {
                r = r
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push(alphabet[(r >> 33) as usize % alphabet.len()]);
            }
            if let Ok(id) = SpiffeId::parse(&s) {
                assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id);
                assert!(!id.path().ends_with('/'));
                assert!(id
                    .as_str()
                    .chars()
                    .skip(9)
                    .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c)));
            }
        }
    }
}
