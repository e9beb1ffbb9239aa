//! The CA journal: roots, intermediates and JWT keys, each `prepared`, `active`, `retired`
//! or `revoked`. Revocation is final; an expired authority is never activated; the last
//! active root is never retired; a key is destroyed only when nothing it signed can still
//! be valid. Each change records the log index it was applied at (`updated`): the trust
//! bundle's sequence number.

use rusqlite::{params, Connection};

use super::{change, not_found_unless_changed, rejected};
use crate::command::{RejectCode, Response};
use crate::records::{AuthorityKind, AuthorityRecord, AuthorityState};
use crate::schema::query_one;
use crate::Result;

pub(super) fn put(tx: &Connection, a: &AuthorityRecord, index: u64) -> Result<Response> {
    if life(tx, &a.id)?.is_some_and(|l| l.state == AuthorityState::Revoked) {
        return Ok(revoked_is_final(&a.id));
    }
    change(
        tx,
        "INSERT INTO authorities(id, kind, state, node_id, key_backend, key_id, cert_der, public_key, not_before, not_after, seq, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)
         ON CONFLICT(id) DO UPDATE SET kind=excluded.kind, state=excluded.state, node_id=excluded.node_id, key_backend=excluded.key_backend, key_id=excluded.key_id, cert_der=excluded.cert_der, public_key=excluded.public_key, not_before=excluded.not_before, not_after=excluded.not_after, updated=excluded.updated",
        params![
            a.id,
            a.kind.as_str(),
            a.state.as_str(),
            a.node_id,
            a.key_backend,
            a.key_id,
            a.cert_der,
            a.public_key,
            a.not_before,
            a.not_after,
            index as i64,
            index as i64,
        ],
    )?;
    Ok(Response::Ok)
}

pub(super) fn set_state(
    tx: &Connection,
    id: &str,
    state: AuthorityState,
    at: i64,
    index: u64,
) -> Result<Response> {
    let Some(a) = life(tx, id)? else {
        return Ok(no_authority(id));
    };
    if state != AuthorityState::Revoked && a.state == AuthorityState::Revoked {
        return Ok(revoked_is_final(id));
    }
    if state == AuthorityState::Active && a.not_after <= at {
        return Ok(rejected(
            RejectCode::FailedPrecondition,
            format!(
                "authority {id} expired at {} and cannot be activated at {at}",
                a.not_after
            ),
        ));
    }
    if state == AuthorityState::Retired
        && a.kind == AuthorityKind::Root
        && a.state == AuthorityState::Active
        && active_roots(tx)? <= 1
    {
        return Ok(rejected(
            RejectCode::FailedPrecondition,
            format!("root {id} is the only active root; activate its successor before retiring it (or revoke it)"),
        ));
    }
    let n = change(
        tx,
        "UPDATE authorities SET state = ?, updated = ? WHERE id = ?",
        params![state.as_str(), index as i64, id],
    )?;
    Ok(not_found_unless_changed(n, || format!("no authority {id}")))
}

pub(super) fn key_destroyed(tx: &Connection, id: &str, at: i64) -> Result<Response> {
    let Some(a) = life(tx, id)? else {
        return Ok(no_authority(id));
    };
    let due = match a.state {
        AuthorityState::Revoked => true,
        AuthorityState::Retired => a.not_after < at,
        AuthorityState::Prepared | AuthorityState::Active => false,
    };
    if !due {
        return Ok(rejected(
            RejectCode::FailedPrecondition,
            format!(
                "the key of authority {id} may not be destroyed at {at}: it is {} and valid until {}; only a revoked authority's key, or a retired one's after it expired, is destroyed",
                a.state.as_str(),
                a.not_after
            ),
        ));
    }
    change(
        tx,
        "UPDATE authorities SET key_destroyed = 1 WHERE id = ?",
        [id],
    )?;
    Ok(Response::Ok)
}

fn no_authority(id: &str) -> Response {
    rejected(RejectCode::NotFound, format!("no authority {id}"))
}

fn revoked_is_final(id: &str) -> Response {
    rejected(
        RejectCode::FailedPrecondition,
        format!("authority {id} is revoked; revocation is final"),
    )
}

/// What the lifecycle rules of an authority need to know.
struct Life {
    kind: AuthorityKind,
    state: AuthorityState,
    not_after: i64,
}

fn life(conn: &Connection, id: &str) -> Result<Option<Life>> {
    let row: Option<(String, String, i64)> = query_one(
        conn,
        "SELECT kind, state, not_after FROM authorities WHERE id = ?",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    Ok(row.and_then(|(kind, state, not_after)| {
        Some(Life {
            kind: AuthorityKind::parse(&kind)?,
            state: AuthorityState::parse(&state)?,
            not_after,
        })
    }))
}

fn active_roots(conn: &Connection) -> Result<i64> {
    Ok(query_one(
        conn,
        "SELECT COUNT(*) FROM authorities WHERE kind = 'root' AND state = 'active'",
        [],
        |r| Ok(r.get(0)?),
    )?
    .unwrap_or(0))
}
