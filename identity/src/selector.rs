//! Selectors: `type:value` facts about a workload (`unix:uid:1001`) or an agent.
//!
//! Entries carry selectors; a workload matches an entry when every selector of the entry is
//! among the workload's selectors. Only the types our agent can produce are accepted, so a
//! typo or an unsupported plugin is refused at registration instead of never matching.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// One selector, e.g. type `unix`, value `uid:1001`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// The attestor that produces it: `unix`, `systemd`, `join_token`, `x509pop`.
    pub kind: String,
    /// What it says, e.g. `uid:1001`.
    pub value: String,
}

/// The selector types workloads can be registered with, and what each key means.
pub const WORKLOAD_SELECTORS: &[(&str, &str, &str)] = &[
    ("unix", "uid", "numeric user ID of the process"),
    ("unix", "user", "user name of the process"),
    ("unix", "gid", "numeric group ID of the process"),
    ("unix", "group", "group name of the process"),
    ("unix", "path", "absolute path of the process binary"),
    ("unix", "sha256", "hex SHA-256 of the process binary"),
    (
        "systemd",
        "id",
        "systemd unit of the process, e.g. metald.service",
    ),
];

fn bad(input: &str, why: impl Into<String>) -> Error {
    Error::InvalidSelector {
        input: input.chars().take(200).collect(),
        reason: why.into(),
    }
}

fn supported() -> String {
    WORKLOAD_SELECTORS
        .iter()
        .map(|(t, k, _)| format!("{t}:{k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Selector {
    /// Builds a selector without validation (for selectors the agent itself derives).
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// Parses and validates `type:key:value` as written on a command line.
    pub fn parse(input: &str) -> Result<Self, Error> {
        let Some((kind, value)) = input.split_once(':') else {
            return Err(bad(
                input,
                format!(
                    "expected TYPE:KEY:VALUE, for example unix:uid:1001 (supported: {})",
                    supported()
                ),
            ));
        };
        let sel = Self::new(kind, value);
        sel.validate().map_err(|e| match e {
            Error::InvalidSelector { reason, .. } => bad(input, reason),
            other => other,
        })?;
        Ok(sel)
    }

    /// Checks a selector that came from an API request.
    pub fn validate(&self) -> Result<(), Error> {
        let input = self.to_string();
        if self.kind.is_empty() {
            return Err(bad(&input, "the selector type is empty"));
        }
        if self.value.chars().any(|c| c.is_control()) {
            return Err(bad(&input, "the value has control characters"));
        }
        let Some((key, val)) = self.value.split_once(':') else {
            return Err(bad(
                &input,
                format!("expected TYPE:KEY:VALUE (supported: {})", supported()),
            ));
        };
        if !WORKLOAD_SELECTORS
            .iter()
            .any(|(t, k, _)| *t == self.kind && *k == key)
        {
            return Err(bad(
                &input,
                format!(
                    "'{}:{key}' is not a selector this CA's agents produce (supported: {})",
                    self.kind,
                    supported()
                ),
            ));
        }
        if val.is_empty() {
            return Err(bad(&input, "the value is empty"));
        }
        let problem = match (self.kind.as_str(), key) {
            ("unix", "uid" | "gid") => match val.parse::<u32>() {
                Err(_) => Some(format!("{key} must be a number, got {val:?}")),
                Ok(n) if n.to_string() != val => Some(format!(
                    "{key} must be written as the agent reports it: {}:{key}:{n}",
                    self.kind
                )),
                Ok(_) => None,
            },
            ("unix", "path") => path_problem(val),
            ("unix", "sha256")
                if val.len() != 64 || !val.chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                Some("sha256 must be 64 hex characters".to_string())
            }
            ("unix", "sha256") if val.chars().any(|c| c.is_ascii_uppercase()) => Some(format!(
                "sha256 must be lower-case hex, as the agent reports it: unix:sha256:{}",
                val.to_ascii_lowercase()
            )),
            ("systemd", "id") if val.contains('/') => Some(format!(
                "a systemd unit name has no '/', got {val:?} (write the unit, e.g. metald.service)"
            )),
            ("systemd", "id") if !(val.ends_with(".service") || val.ends_with(".scope")) => {
                Some(format!(
                    "the agent reports .service and .scope units only: write {val}.service (or .scope)"
                ))
            }
            _ => None,
        };
        if let Some(p) = problem {
            return Err(bad(&input, p));
        }
        Ok(())
    }
}

/// Why a `unix:path` value can never match what the agent reports (the resolved absolute
/// path of the binary), if it cannot.
fn path_problem(val: &str) -> Option<String> {
    if !val.starts_with('/') {
        return Some("path must be absolute (start with '/')".to_string());
    }
    if val == "/" {
        return Some("path '/' names no file: write the binary's absolute path".to_string());
    }
    let normal = std::path::Path::new(val)
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect::<std::path::PathBuf>();
    if val
        .split('/')
        .skip(1)
        .any(|c| c == "." || c == ".." || c.is_empty())
    {
        if val.split('/').any(|c| c == "..") {
            return Some(format!(
                "path must not contain '..': the agent reports the binary's resolved path, so {val:?} never matches"
            ));
        }
        return Some(format!(
            "path must be normalized (no '.', empty or trailing components): write {}",
            normal.display()
        ));
    }
    None
}

/// Whether a workload with `have` selectors matches an entry requiring `need`.
/// An entry with no selectors matches nothing.
pub fn matches(need: &[Selector], have: &[Selector]) -> bool {
    !need.is_empty() && need.iter().all(|n| have.contains(n))
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl FromStr for Selector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_selectors() {
        for ok in [
            "unix:uid:1001",
            "unix:user:unkey-metald",
            "unix:gid:0",
            "unix:group:wheel",
            "unix:path:/usr/bin/metald",
            "systemd:id:metald.service",
            &format!("unix:sha256:{}", "a".repeat(64)),
        ] {
            let s = Selector::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(s.to_string(), ok);
        }
        let s = Selector::parse("unix:uid:1001").unwrap();
        assert_eq!((s.kind.as_str(), s.value.as_str()), ("unix", "uid:1001"));
    }

    #[test]
    fn rejects_bad_selectors_with_a_reason() {
        let upper = format!("unix:sha256:{}", "A".repeat(64));
        for (input, expect) in [
            ("unix", "expected TYPE:KEY:VALUE"),
            ("unix:uid", "expected TYPE:KEY:VALUE"),
            ("unix:uid:", "value is empty"),
            ("unix:uid:abc", "must be a number"),
            ("unix:path:usr/bin/x", "absolute"),
            ("unix:sha256:xyz", "64 hex"),
            (
                upper.as_str(),
                "lower-case hex, as the agent reports it: unix:sha256:aaaa",
            ),
            ("unix:uid:007", "unix:uid:7"),
            ("unix:gid:+5", "unix:gid:5"),
            ("unix:path:/usr/bin/../sbin/x", "must not contain '..'"),
            ("unix:path:/usr//bin/x", "write /usr/bin/x"),
            ("unix:path:/usr/./bin/x", "write /usr/bin/x"),
            ("unix:path:/usr/bin/", "normalized"),
            ("unix:path:/", "names no file"),
            ("systemd:id:metald", "write metald.service"),
            ("systemd:id:system.slice/metald.service", "has no '/'"),
            ("k8s:ns:default", "not a selector this CA's agents produce"),
            ("unix:pid:12", "not a selector"),
            (":uid:1", "type is empty"),
        ] {
            let err = Selector::parse(input).expect_err(input).to_string();
            assert!(err.contains(expect), "{input:?}: {err:?} lacks {expect:?}");
        }
    }

    #[test]
    fn subset_matching() {
        let have = vec![
            Selector::parse("unix:uid:1001").unwrap(),
            Selector::parse("unix:user:metald").unwrap(),
        ];
        assert!(matches(&[Selector::parse("unix:uid:1001").unwrap()], &have));
        assert!(!matches(
            &[
                Selector::parse("unix:uid:1001").unwrap(),
                Selector::parse("unix:gid:5").unwrap()
            ],
            &have
        ));
        assert!(!matches(&[], &have));
    }
}
