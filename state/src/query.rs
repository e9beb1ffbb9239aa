//! Reads of the state, on any connection to it (the node runs them on its reader
//! connections, after what was applied is committed).

use rusqlite::{params, Connection};

use crate::records::*;
use crate::schema::{
    agent_from_row, authority_from_row, entry_from_row, join_token_from_row, query_all, query_one,
    rotation_request_from_row,
};
use crate::Result;

/// One entry.
pub fn entry(c: &Connection, id: &str) -> Result<Option<EntryRecord>> {
    query_one(
        c,
        "SELECT * FROM entries WHERE id = ?",
        [id],
        entry_from_row,
    )
}

/// Every entry, in no particular order (what the entry index is built from).
pub fn entries(c: &Connection) -> Result<Vec<EntryRecord>> {
    query_all(c, "SELECT * FROM entries", [], entry_from_row)
}

/// One page of entries, ordered by SPIFFE ID then ID: those with the given SPIFFE ID and
/// parent ID (empty: any) that come after `after` (a SPIFFE ID and ID), at most `limit`
/// (None: all).
pub fn entries_page(
    c: &Connection,
    spiffe_id: &str,
    parent_id: &str,
    after: Option<(&str, &str)>,
    limit: Option<usize>,
) -> Result<Vec<EntryRecord>> {
    let (after_spiffe, after_id) = after.unwrap_or_default();
    query_all(
        c,
        "SELECT * FROM entries
         WHERE (?1 = '' OR spiffe_id = ?1) AND (?2 = '' OR parent_id = ?2)
           AND (spiffe_id, id) > (?3, ?4)
         ORDER BY spiffe_id, id LIMIT ?5",
        params![
            spiffe_id,
            parent_id,
            after_spiffe,
            after_id,
            sql_limit(limit)
        ],
        entry_from_row,
    )
}

/// Entries directly under `parent_id`.
pub fn entries_by_parent(c: &Connection, parent_id: &str) -> Result<Vec<EntryRecord>> {
    query_all(
        c,
        "SELECT * FROM entries WHERE parent_id = ? ORDER BY id",
        [parent_id],
        entry_from_row,
    )
}

/// Entries an agent is authorized for: those whose parent is the agent, and, transitively,
/// those whose parent is the SPIFFE ID of an authorized entry. Ordered by ID.
pub fn authorized_entries(c: &Connection, agent_id: &str) -> Result<Vec<EntryRecord>> {
    // One recursive query (not one per parent): this runs on every SVID request. UNION
    // (not UNION ALL) drops repeats, so cycles of entries end the recursion.
    query_all(
        c,
        "WITH RECURSIVE parents(id) AS (
             SELECT ?1
             UNION
             SELECT e.spiffe_id FROM entries e JOIN parents p ON e.parent_id = p.id
         )
         SELECT * FROM entries WHERE parent_id IN (SELECT id FROM parents) ORDER BY id",
        [agent_id],
        entry_from_row,
    )
}

/// One join token.
pub fn join_token(c: &Connection, token: &str) -> Result<Option<JoinTokenRecord>> {
    query_one(
        c,
        "SELECT * FROM join_tokens WHERE token = ?",
        [token],
        join_token_from_row,
    )
}

/// One agent.
pub fn agent(c: &Connection, spiffe_id: &str) -> Result<Option<AgentRecord>> {
    query_one(
        c,
        "SELECT * FROM agents WHERE spiffe_id = ?",
        [spiffe_id],
        agent_from_row,
    )
}

/// One page of agents, ordered by SPIFFE ID: those after `after`, at most `limit`
/// (None: all).
pub fn agents_page(
    c: &Connection,
    after: Option<&str>,
    limit: Option<usize>,
) -> Result<Vec<AgentRecord>> {
    query_all(
        c,
        "SELECT * FROM agents WHERE spiffe_id > ? ORDER BY spiffe_id LIMIT ?",
        params![after.unwrap_or_default(), sql_limit(limit)],
        agent_from_row,
    )
}

/// The log index of the last change to the CA journal: the trust bundle's sequence number.
pub fn authorities_version(c: &Connection) -> Result<i64> {
    Ok(
        c.prepare_cached("SELECT COALESCE(MAX(updated), 0) FROM authorities")?
            .query_row([], |r| r.get(0))?,
    )
}

/// The CA journal, oldest first.
pub fn authorities(c: &Connection) -> Result<Vec<AuthorityRecord>> {
    query_all(
        c,
        "SELECT * FROM authorities ORDER BY seq",
        [],
        authority_from_row,
    )
}

/// Rotation requests (at most one per kind and node).
pub fn rotation_requests(c: &Connection) -> Result<Vec<RotationRequest>> {
    query_all(
        c,
        "SELECT * FROM rotation_requests ORDER BY kind, node_id",
        [],
        rotation_request_from_row,
    )
}

/// A page size as SQLite's `LIMIT` (-1: no limit).
fn sql_limit(limit: Option<usize>) -> i64 {
    limit.map(|l| l.min(i64::MAX as usize) as i64).unwrap_or(-1)
}
