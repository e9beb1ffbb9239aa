//! The tables of the state, how records are encoded in them, and the applied log position.
//!
//! Lists (selectors, DNS names) are stored as JSON text. The `replication` table belongs to
//! the replication layer: values this crate never interprets (openraft's last applied log
//! ID and membership), written in the same transaction as the data they describe. The
//! index of the last applied log entry is also kept here as a number
//! ([`set_applied_index`]), so a backup can say what it holds without knowing the
//! replication layer's encoding.

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::records::*;
use crate::{Error, Result};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS replication (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
  id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, parent_id TEXT NOT NULL,
  selectors TEXT NOT NULL, x509_svid_ttl INTEGER NOT NULL, jwt_svid_ttl INTEGER NOT NULL,
  dns_names TEXT NOT NULL, admin INTEGER NOT NULL, hint TEXT NOT NULL,
  created_at INTEGER NOT NULL, revision INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS entries_parent ON entries(parent_id);
CREATE INDEX IF NOT EXISTS entries_spiffe ON entries(spiffe_id);
CREATE TABLE IF NOT EXISTS join_tokens (
  token TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, expires_at INTEGER NOT NULL, used_at INTEGER);
CREATE TABLE IF NOT EXISTS agents (
  spiffe_id TEXT PRIMARY KEY, attestation_type TEXT NOT NULL, serial TEXT NOT NULL,
  expires_at INTEGER NOT NULL, banned INTEGER NOT NULL, attested_at INTEGER NOT NULL,
  selectors TEXT NOT NULL, prev_serial TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS authorities (
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, node_id TEXT NOT NULL,
  key_backend TEXT NOT NULL, key_id TEXT NOT NULL, cert_der BLOB NOT NULL,
  public_key BLOB NOT NULL, not_before INTEGER NOT NULL, not_after INTEGER NOT NULL,
  seq INTEGER NOT NULL, updated INTEGER NOT NULL, key_destroyed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rotation_requests (
  kind TEXT NOT NULL, node_id TEXT NOT NULL, requested_at INTEGER NOT NULL,
  replaces TEXT NOT NULL, PRIMARY KEY (kind, node_id));
"#;

/// The tables a copy of the state must have ([`crate::backup::check_copy`]).
pub const TABLES: [&str; 7] = [
    "meta",
    "replication",
    "entries",
    "join_tokens",
    "agents",
    "authorities",
    "rotation_requests",
];

/// `meta` key of the index of the last applied log entry.
const APPLIED_INDEX: &str = "applied_index";

/// Creates the tables that do not exist yet.
pub fn create(conn: &Connection) -> Result<()> {
    Ok(conn.execute_batch(SCHEMA)?)
}

/// The index of the last applied log entry (0 if none).
pub fn applied_index(conn: &Connection) -> Result<u64> {
    let v: Option<i64> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?")?
        .query_row([APPLIED_INDEX], |r| r.get(0))
        .optional()?;
    Ok(v.unwrap_or(0).max(0) as u64)
}

/// Records `index` as the last applied log entry's (None: nothing applied).
pub fn set_applied_index(conn: &Connection, index: Option<u64>) -> Result<()> {
    match index {
        Some(i) => conn
            .prepare_cached(
                "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![APPLIED_INDEX, i as i64])?,
        None => conn
            .prepare_cached("DELETE FROM meta WHERE key = ?")?
            .execute([APPLIED_INDEX])?,
    };
    Ok(())
}

/// The replication layer's values, by key.
pub fn replication_values(conn: &Connection) -> Result<Vec<(String, String)>> {
    query_all(conn, "SELECT key, value FROM replication", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
}

/// Stores one of the replication layer's values.
pub fn set_replication_value(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO replication(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// Forgets the replication layer's values (a snapshot install or a restore replaces them).
pub fn clear_replication_values(conn: &Connection) -> Result<()> {
    conn.execute("DELETE FROM replication", [])?;
    Ok(())
}

/// Runs `sql` with `params` and decodes every row with `decode` (any error type SQLite errors
/// convert into: `ca-raft`'s log and snapshot code use it too).
pub fn query_all<T, E: From<rusqlite::Error>>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: impl Fn(&Row<'_>) -> Result<T, E>,
) -> Result<Vec<T>, E> {
    let mut q = conn.prepare_cached(sql)?;
    let mut rows = q.query(params)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(decode(r)?);
    }
    Ok(out)
}

/// Runs `sql` with `params` and decodes the first row, if any, with `decode`.
pub(crate) fn query_one<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: impl Fn(&Row<'_>) -> Result<T>,
) -> Result<Option<T>> {
    let mut q = conn.prepare_cached(sql)?;
    let mut rows = q.query(params)?;
    rows.next()?.map(decode).transpose()
}

pub(crate) fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt(e.to_string())
}

pub(crate) fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialize")
}

fn from_json<T: serde::de::DeserializeOwned>(r: &Row<'_>, col: &str) -> Result<T> {
    serde_json::from_str(r.get_ref(col)?.as_str()?).map_err(corrupt)
}

pub(crate) fn entry_from_row(r: &Row<'_>) -> Result<EntryRecord> {
    Ok(EntryRecord {
        id: r.get("id")?,
        spiffe_id: r.get("spiffe_id")?,
        parent_id: r.get("parent_id")?,
        selectors: from_json(r, "selectors")?,
        x509_svid_ttl: r.get("x509_svid_ttl")?,
        jwt_svid_ttl: r.get("jwt_svid_ttl")?,
        dns_names: from_json(r, "dns_names")?,
        admin: r.get::<_, i64>("admin")? != 0,
        hint: r.get("hint")?,
        created_at: r.get("created_at")?,
        revision: r.get("revision")?,
    })
}

pub(crate) fn agent_from_row(r: &Row<'_>) -> Result<AgentRecord> {
    Ok(AgentRecord {
        spiffe_id: r.get("spiffe_id")?,
        attestation_type: r.get("attestation_type")?,
        x509_svid_serial: r.get("serial")?,
        x509_svid_expires_at: r.get("expires_at")?,
        previous_x509_svid_serial: r.get("prev_serial")?,
        banned: r.get::<_, i64>("banned")? != 0,
        attested_at: r.get("attested_at")?,
        selectors: from_json(r, "selectors")?,
    })
}

pub(crate) fn join_token_from_row(r: &Row<'_>) -> Result<JoinTokenRecord> {
    Ok(JoinTokenRecord {
        token: r.get("token")?,
        spiffe_id: r.get("spiffe_id")?,
        expires_at: r.get("expires_at")?,
        used_at: r.get("used_at")?,
    })
}

pub(crate) fn authority_from_row(r: &Row<'_>) -> Result<AuthorityRecord> {
    let kind: String = r.get("kind")?;
    let state: String = r.get("state")?;
    Ok(AuthorityRecord {
        id: r.get("id")?,
        kind: AuthorityKind::parse(&kind)
            .ok_or_else(|| corrupt(format!("authority kind {kind}")))?,
        state: AuthorityState::parse(&state)
            .ok_or_else(|| corrupt(format!("authority state {state}")))?,
        node_id: r.get("node_id")?,
        key_backend: r.get("key_backend")?,
        key_id: r.get("key_id")?,
        cert_der: r.get("cert_der")?,
        public_key: r.get("public_key")?,
        not_before: r.get("not_before")?,
        not_after: r.get("not_after")?,
        key_destroyed: r.get::<_, i64>("key_destroyed")? != 0,
    })
}

pub(crate) fn rotation_request_from_row(r: &Row<'_>) -> Result<RotationRequest> {
    let kind: String = r.get("kind")?;
    Ok(RotationRequest {
        kind: AuthorityKind::parse(&kind)
            .ok_or_else(|| corrupt(format!("rotation request kind {kind}")))?,
        node_id: r.get("node_id")?,
        requested_at: r.get("requested_at")?,
        replaces: r.get("replaces")?,
    })
}

pub(crate) fn upsert_entry(tx: &Connection, e: &EntryRecord) -> Result<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO entries(id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, admin, hint, created_at, revision) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
    )?
    .execute(params![
        e.id,
        e.spiffe_id,
        e.parent_id,
        json(&e.selectors),
        e.x509_svid_ttl,
        e.jwt_svid_ttl,
        json(&e.dns_names),
        e.admin as i64,
        e.hint,
        e.created_at,
        e.revision,
    ])?;
    Ok(())
}

pub(crate) fn upsert_agent(tx: &Connection, a: &AgentRecord) -> Result<()> {
    tx.prepare_cached("INSERT OR REPLACE INTO agents(spiffe_id, attestation_type, serial, expires_at, banned, attested_at, selectors, prev_serial) VALUES (?,?,?,?,?,?,?,?)")?
        .execute(params![
            a.spiffe_id,
            a.attestation_type,
            a.x509_svid_serial,
            a.x509_svid_expires_at,
            a.banned as i64,
            a.attested_at,
            json(&a.selectors),
            a.previous_x509_svid_serial,
        ])?;
    Ok(())
}
