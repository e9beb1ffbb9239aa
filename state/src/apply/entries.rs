//! Registration entries: unique by ID, and by SPIFFE ID, parent and selectors together.

use rusqlite::{params, Connection};

use super::{change, not_found_unless_changed, rejected};
use crate::command::{RejectCode, Response};
use crate::records::EntryRecord;
use crate::schema::{entry_from_row, json, query_one, upsert_entry};
use crate::Result;

pub(super) fn create(tx: &Connection, entry: &EntryRecord) -> Result<Response> {
    // The same ID, or the same SPIFFE ID, parent and selectors: one lookup.
    let clash = query_one(
        tx,
        "SELECT * FROM entries WHERE id = ?1 OR (spiffe_id = ?2 AND parent_id = ?3 AND selectors = ?4) ORDER BY id = ?1 DESC LIMIT 1",
        params![entry.id, entry.spiffe_id, entry.parent_id, json(&entry.selectors)],
        entry_from_row,
    )?;
    match clash {
        // A retried create (the ID is new for every request): the same answer.
        Some(existing) if existing == *entry => Ok(Response::Entry(existing)),
        Some(existing) if existing.id == entry.id => Ok(rejected(
            RejectCode::AlreadyExists,
            format!("entry {} exists", entry.id),
        )),
        Some(existing) => Ok(duplicate(&existing.id)),
        None => {
            upsert_entry(tx, entry)?;
            Ok(Response::Entry(entry.clone()))
        }
    }
}

pub(super) fn update(tx: &Connection, entry: &EntryRecord) -> Result<Response> {
    let current = query_one(
        tx,
        "SELECT revision, created_at FROM entries WHERE id = ?",
        [&entry.id],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
    )?;
    let Some((revision, created_at)) = current else {
        return Ok(rejected(
            RejectCode::NotFound,
            format!("no entry with ID {}", entry.id),
        ));
    };
    if let Some(r) = duplicate_of(tx, entry)? {
        return Ok(r);
    }
    let mut e = entry.clone();
    e.revision = revision + 1;
    e.created_at = created_at;
    upsert_entry(tx, &e)?;
    Ok(Response::Entry(e))
}

pub(super) fn delete(tx: &Connection, id: &str) -> Result<Response> {
    let n = change(tx, "DELETE FROM entries WHERE id = ?", [id])?;
    Ok(not_found_unless_changed(n, || {
        format!("no entry with ID {id}")
    }))
}

/// The refusal for `entry` if another entry has the same SPIFFE ID, parent and selectors.
fn duplicate_of(tx: &Connection, entry: &EntryRecord) -> Result<Option<Response>> {
    let same: Option<String> = query_one(
        tx,
        "SELECT id FROM entries WHERE spiffe_id = ? AND parent_id = ? AND selectors = ? AND id <> ?",
        params![entry.spiffe_id, entry.parent_id, json(&entry.selectors), entry.id],
        |r| Ok(r.get(0)?),
    )?;
    Ok(same.map(|id| duplicate(&id)))
}

fn duplicate(id: &str) -> Response {
    rejected(
        RejectCode::AlreadyExists,
        format!("an entry with the same SPIFFE ID, parent ID and selectors exists: {id}"),
    )
}
