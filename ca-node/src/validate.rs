//! What the admin API and every member check before an entry reaches the log: SPIFFE IDs
//! in this trust domain, selectors, TTLs within what the authorities allow, DNS names.

use ca_identity::{Selector, SpiffeId};
use ca_proto::types;
use ca_state::{EntryRecord, SelectorRecord};

use crate::config::NodeConfig;
use crate::Error;

fn valid_dns_name(d: &str) -> bool {
    let d = d.strip_prefix("*.").unwrap_or(d);
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Parses a SPIFFE ID that must be in this trust domain; `what` names the field.
pub fn parse_local_id(config: &NodeConfig, what: &str, s: &str) -> Result<SpiffeId, Error> {
    let id = SpiffeId::parse(s).map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
    if !id.is_member_of(&config.trust_domain()) {
        return Err(Error::InvalidArgument(format!(
            "{what}: {id} is not in this CA's trust domain {}",
            config.trust_domain
        )));
    }
    Ok(id)
}

/// Validates an entry from the admin API and turns it into a record.
pub fn validate_entry(
    config: &NodeConfig,
    e: &types::Entry,
    id: String,
    created_at: i64,
) -> Result<EntryRecord, Error> {
    let spiffe_id = parse_local_id(config, "spiffe_id", &e.spiffe_id)?;
    if spiffe_id.path().is_empty() {
        return Err(Error::InvalidArgument(
            "spiffe_id: a workload SPIFFE ID needs a path, e.g. spiffe://TD/service/name".into(),
        ));
    }
    if crate::config::is_reserved_path(&spiffe_id) {
        return Err(Error::InvalidArgument(
            "spiffe_id: the /ca-node/ path is reserved for CA nodes".into(),
        ));
    }
    let parent = parse_local_id(config, "parent_id", &e.parent_id)?;
    if parent == spiffe_id {
        return Err(Error::InvalidArgument(
            "parent_id must differ from spiffe_id".into(),
        ));
    }
    if e.selectors.is_empty() {
        return Err(Error::InvalidArgument(
            "an entry needs at least one selector, e.g. unix:uid:1001".into(),
        ));
    }
    let mut selectors = Vec::new();
    for s in &e.selectors {
        let sel = Selector::new(s.r#type.clone(), s.value.clone());
        sel.validate()?;
        selectors.push(SelectorRecord {
            kind: sel.kind,
            value: sel.value,
        });
    }
    selectors.sort();
    selectors.dedup();
    let max_x509 = config.max_x509_svid_ttl();
    if e.x509_svid_ttl < 0 || e.x509_svid_ttl > max_x509 {
        return Err(Error::InvalidArgument(format!(
            "x509_svid_ttl {}s: must be between 0 (default, {}s) and {max_x509}s (half the intermediate CA lifetime; an SVID never outlives its issuer)",
            e.x509_svid_ttl, config.ttl.x509_svid
        )));
    }
    let max_jwt = config.max_jwt_svid_ttl();
    if e.jwt_svid_ttl < 0 || e.jwt_svid_ttl > max_jwt {
        return Err(Error::InvalidArgument(format!(
            "jwt_svid_ttl {}s: must be between 0 (default, {}s) and {max_jwt}s (half the JWT key lifetime)",
            e.jwt_svid_ttl, config.ttl.jwt_svid
        )));
    }
    for d in &e.dns_names {
        if !valid_dns_name(d) {
            return Err(Error::InvalidArgument(format!(
                "dns name {d:?} is not a valid DNS name"
            )));
        }
    }
    if e.hint.len() > 1024 {
        return Err(Error::InvalidArgument(
            "hint is longer than 1024 bytes".into(),
        ));
    }
    Ok(EntryRecord {
        id,
        spiffe_id: spiffe_id.to_string(),
        parent_id: parent.to_string(),
        selectors,
        x509_svid_ttl: e.x509_svid_ttl,
        jwt_svid_ttl: e.jwt_svid_ttl,
        dns_names: e.dns_names.clone(),
        admin: e.admin,
        hint: e.hint.clone(),
        created_at,
        revision: 0,
    })
}
