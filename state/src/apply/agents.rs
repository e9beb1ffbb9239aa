//! Attested agents (and ca-nodes): registered, renewed with their own current SVID only,
//! evicted, or banned for good.

use rusqlite::Connection;

use super::{change, not_found_unless_changed, rejected};
use crate::command::{RejectCode, Response};
use crate::query::agent;
use crate::records::AgentRecord;
use crate::schema::upsert_agent;
use crate::Result;

/// The refusal for an agent that is banned, if it is.
pub(super) fn refuse_banned(tx: &Connection, spiffe_id: &str) -> Result<Option<Response>> {
    Ok(agent(tx, spiffe_id)?
        .filter(|a| a.banned)
        .map(|_| banned(spiffe_id)))
}

fn banned(spiffe_id: &str) -> Response {
    rejected(
        RejectCode::PermissionDenied,
        format!("agent {spiffe_id} is banned"),
    )
}

pub(super) fn register(tx: &Connection, a: &AgentRecord) -> Result<Response> {
    if let Some(refused) = refuse_banned(tx, &a.spiffe_id)? {
        return Ok(refused);
    }
    upsert_agent(tx, a)?;
    Ok(Response::Agent(a.clone()))
}

pub(super) fn renew(
    tx: &Connection,
    spiffe_id: &str,
    serial: &str,
    expires_at: i64,
    caller_serial: &str,
) -> Result<Response> {
    let Some(mut a) = agent(tx, spiffe_id)? else {
        return Ok(rejected(
            RejectCode::NotFound,
            format!("agent {spiffe_id} is not attested (evicted?)"),
        ));
    };
    if a.banned {
        return Ok(banned(spiffe_id));
    }
    if !caller_serial.is_empty()
        && caller_serial != a.x509_svid_serial
        && caller_serial != a.previous_x509_svid_serial
    {
        return Ok(rejected(
            RejectCode::PermissionDenied,
            format!("agent {spiffe_id} renewed with an SVID that is no longer its own (serial {caller_serial}); it was replaced by a newer attestation"),
        ));
    }
    a.previous_x509_svid_serial = std::mem::take(&mut a.x509_svid_serial);
    a.x509_svid_serial = serial.to_owned();
    a.x509_svid_expires_at = expires_at;
    upsert_agent(tx, &a)?;
    Ok(Response::Agent(a))
}

pub(super) fn evict(tx: &Connection, spiffe_id: &str) -> Result<Response> {
    let n = change(tx, "DELETE FROM agents WHERE spiffe_id = ?", [spiffe_id])?;
    Ok(not_found_unless_changed(n, || {
        format!("no agent {spiffe_id}")
    }))
}

pub(super) fn ban(tx: &Connection, spiffe_id: &str) -> Result<Response> {
    let Some(mut a) = agent(tx, spiffe_id)? else {
        return Ok(rejected(
            RejectCode::NotFound,
            format!("no agent {spiffe_id}"),
        ));
    };
    a.banned = true;
    upsert_agent(tx, &a)?;
    Ok(Response::Agent(a))
}
