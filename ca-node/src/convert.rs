//! Conversions between stored records and protobuf messages.

use ca_identity::TrustBundle;
use ca_proto::types;
use ca_state::{AgentRecord, EntryRecord, SelectorRecord};

/// Entry record -> proto.
pub fn entry_to_proto(e: &EntryRecord) -> types::Entry {
    types::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.clone(),
        parent_id: e.parent_id.clone(),
        selectors: e.selectors.iter().map(selector_to_proto).collect(),
        x509_svid_ttl: e.x509_svid_ttl,
        jwt_svid_ttl: e.jwt_svid_ttl,
        dns_names: e.dns_names.clone(),
        admin: e.admin,
        hint: e.hint.clone(),
        created_at: e.created_at,
        revision: e.revision,
    }
}

/// Selector record -> proto.
pub fn selector_to_proto(s: &SelectorRecord) -> types::Selector {
    types::Selector {
        r#type: s.kind.clone(),
        value: s.value.clone(),
    }
}

/// Agent record -> proto.
pub fn agent_to_proto(a: &AgentRecord) -> types::Agent {
    types::Agent {
        spiffe_id: a.spiffe_id.clone(),
        attestation_type: a.attestation_type.clone(),
        x509_svid_serial: a.x509_svid_serial.clone(),
        x509_svid_expires_at: a.x509_svid_expires_at,
        banned: a.banned,
        attested_at: a.attested_at,
        selectors: a.selectors.iter().map(selector_to_proto).collect(),
    }
}

/// Trust bundle -> proto.
pub fn bundle_to_proto(b: &TrustBundle) -> types::Bundle {
    types::Bundle {
        trust_domain: b.trust_domain.to_string(),
        x509_authorities: b.x509_authorities.clone(),
        jwt_authorities: b
            .jwt_authorities
            .iter()
            .map(|k| types::JwtKey {
                key_id: k.key_id.clone(),
                public_key: k.public_key.clone(),
                expires_at: k.expires_at,
            })
            .collect(),
        sequence_number: b.sequence_number,
        refresh_hint: b.refresh_hint,
    }
}
