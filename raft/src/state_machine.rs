//! The state machine: applies log entries to SQLite, one transaction per batch of entries,
//! together with the ID of the last applied entry and the last membership (so a replay after
//! a crash is idempotent and openraft finds its applied state where the data is).
//!
//! It also builds snapshots of itself (`VACUUM INTO`, a consistent copy of the database) and
//! installs received ones (their tables copied over its own in one transaction).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Row, Sqlite, SqlitePool, Transaction};
use tokio::sync::watch;

use crate::command::{Command, RejectCode, Response};
use crate::records::*;
use crate::snapshot::{SnapshotDir, SnapshotFile};
use crate::types::{Entry, EntryPayload, LogId, SnapshotMeta, StoredMembership};
use crate::{Error, Result};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS raft_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
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
  selectors TEXT NOT NULL, prev_serial TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS authorities (
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, node_id TEXT NOT NULL,
  key_backend TEXT NOT NULL, key_id TEXT NOT NULL, cert_der BLOB NOT NULL,
  public_key BLOB NOT NULL, not_before INTEGER NOT NULL, not_after INTEGER NOT NULL,
  seq INTEGER NOT NULL, updated INTEGER NOT NULL DEFAULT 0,
  key_destroyed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rotation_requests (
  kind TEXT NOT NULL, node_id TEXT NOT NULL, requested_at INTEGER NOT NULL,
  replaces TEXT NOT NULL, PRIMARY KEY (kind, node_id));
"#;

/// `raft_meta` key of the last applied log ID (JSON).
const LAST_APPLIED: &str = "last_applied_log_id";
/// `raft_meta` key of the last applied membership (JSON).
const LAST_MEMBERSHIP: &str = "last_membership";

/// The durable state of one replica, and the only code that changes it.
///
/// Cloning is cheap: clones share the database and the snapshot folder.
#[derive(Clone, Debug)]
pub struct StateMachine {
    pool: SqlitePool,
    applied: watch::Sender<u64>,
    snapshots: Arc<SnapshotDir>,
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt(e.to_string())
}

fn rejected(code: RejectCode, message: impl Into<String>) -> Response {
    Response::Rejected {
        code,
        message: message.into(),
    }
}

/// The applied state as stored: last applied log ID and last membership.
pub(crate) type AppliedState = (Option<LogId>, StoredMembership);

async fn read_applied(conn: &mut sqlx::SqliteConnection) -> Result<AppliedState> {
    let rows = sqlx::query("SELECT key, value FROM raft_meta")
        .fetch_all(&mut *conn)
        .await?;
    let mut last = None;
    let mut membership = StoredMembership::default();
    for r in rows {
        let key: String = r.get("key");
        let value: String = r.get("value");
        match key.as_str() {
            LAST_APPLIED => last = serde_json::from_str(&value).map_err(corrupt)?,
            LAST_MEMBERSHIP => membership = serde_json::from_str(&value).map_err(corrupt)?,
            _ => {}
        }
    }
    if last.is_none() {
        // A store written before log IDs were recorded: only the index is known.
        let index: Option<i64> =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'last_applied'")
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(i) = index.filter(|i| *i > 0) {
            last = Some(LogId::new(openraft::CommittedLeaderId::new(0, 0), i as u64));
        }
    }
    Ok((last, membership))
}

async fn write_applied(
    conn: &mut sqlx::SqliteConnection,
    last: &LogId,
    membership: Option<&StoredMembership>,
) -> Result<()> {
    // One statement (the legacy `meta.last_applied` row is only read when this is absent).
    let sql = if membership.is_some() {
        "INSERT INTO raft_meta(key, value) VALUES(?, ?), (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
    } else {
        "INSERT INTO raft_meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
    };
    let mut q = sqlx::query(sql).bind(LAST_APPLIED).bind(json(last));
    if let Some(m) = membership {
        q = q.bind(LAST_MEMBERSHIP).bind(json(m));
    }
    q.execute(&mut *conn).await?;
    Ok(())
}

impl StateMachine {
    /// Opens (creating if needed) the store at `path`: WAL with `synchronous=NORMAL`.
    /// Applied entries need not be on disk when applied: the Raft log (`synchronous=FULL`)
    /// holds them, and after a power loss the store is consistent at an earlier applied
    /// index, from which openraft applies the log again. WAL checkpoints sync the WAL first,
    /// and every snapshot build ends with a checkpoint, so everything a snapshot (and a log
    /// purge) covers is on disk. Snapshots live in a folder beside it
    /// (`state.snapshots/` for `state.db`).
    pub async fn open(path: &Path) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // Local file connections do not go stale; a ping per acquire costs a round
            // trip to the connection's thread on every query.
            .test_before_acquire(false)
            .connect_with(opts)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        let (last, _) = read_applied(&mut *pool.acquire().await?).await?;
        let snapshots = SnapshotDir::open(&snapshot_dir(path))
            .await
            .map_err(|e| Error::Snapshot(format!("opening the snapshot folder: {e}")))?;
        let (tx, _) = watch::channel(last.map(|l| l.index).unwrap_or(0));
        Ok(Self {
            pool,
            applied: tx,
            snapshots: Arc::new(snapshots),
        })
    }

    /// Index of the last applied log entry (0 before any).
    pub fn last_applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Notifies on every applied batch of entries (the value is the last applied index).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// The last applied log ID and the last applied membership, as stored.
    pub async fn applied_state(&self) -> Result<(Option<LogId>, StoredMembership)> {
        read_applied(&mut *self.pool.acquire().await?).await
    }

    /// Applies `cmd` at log `index` (single-node use, see [`crate::LocalProposer`]). An index
    /// at or below the last applied one is skipped (replay), returning `Response::Ok`.
    pub async fn apply(&self, index: u64, cmd: &Command) -> Result<Response> {
        let entry = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(0, 0), index),
            payload: EntryPayload::Normal(cmd.clone()),
        };
        let mut out = self.apply_entries(vec![entry]).await?;
        Ok(out.pop().unwrap_or(Response::Ok))
    }

    /// Applies log entries in order, in one transaction that also records the last applied
    /// log ID and membership. Entries at or below the last applied index are skipped
    /// (replay) and answered `Response::Ok`; blank and membership entries are answered
    /// `Response::Ok` too. One response per entry.
    pub async fn apply_entries(&self, entries: Vec<Entry>) -> Result<Vec<Response>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // IMMEDIATE: the write lock is taken (waiting on the busy handler if needed) before
        // the first read, so a checkpoint or another connection can never make the later
        // write fail with SQLITE_BUSY, which would stop the Raft core.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let (last, _) = read_applied(&mut tx).await?;
        let mut next_index = last.map(|l| l.index + 1).unwrap_or(0);
        let mut applied: Option<LogId> = None;
        let mut membership: Option<StoredMembership> = None;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let index = e.log_id.index;
            if index < next_index {
                out.push(Response::Ok);
                continue;
            }
            let resp = match e.payload {
                EntryPayload::Blank => Response::Ok,
                EntryPayload::Normal(cmd) => apply_in(&mut tx, &cmd, index).await?,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(e.log_id), m));
                    Response::Ok
                }
            };
            out.push(resp);
            next_index = index + 1;
            applied = Some(e.log_id);
        }
        if let Some(last) = &applied {
            write_applied(&mut tx, last, membership.as_ref()).await?;
        }
        tx.commit().await?;
        if let Some(last) = applied {
            self.applied.send_replace(last.index);
        }
        Ok(out)
    }

    // ---- snapshots ----

    /// Builds a snapshot of the current state (a consistent copy of the database) and makes
    /// it the current snapshot.
    pub(crate) async fn build_snapshot(&self) -> Result<(SnapshotMeta, SnapshotFile)> {
        let tmp = self.snapshots.temp_path("build");
        let res = self.build_snapshot_at(&tmp).await;
        if res.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        res
    }

    async fn build_snapshot_at(&self, tmp: &Path) -> Result<(SnapshotMeta, SnapshotFile)> {
        let tmp_str = tmp
            .to_str()
            .ok_or_else(|| Error::Snapshot(format!("non-UTF-8 path {}", tmp.display())))?;
        sqlx::query("VACUUM INTO ?")
            .bind(tmp_str)
            .execute(&self.pool)
            .await?;
        // Everything the copy holds on disk here too before the log below it may be purged:
        // a FULL checkpoint syncs the WAL and the database (writers wait for it on the busy
        // handler: the apply path begins IMMEDIATE).
        sqlx::query("PRAGMA wal_checkpoint(FULL)")
            .execute(&self.pool)
            .await?;
        // What the copy holds, read from the copy itself.
        let (last, membership) = {
            let opts = SqliteConnectOptions::from_str(&format!("sqlite://{tmp_str}"))?
                .read_only(true)
                .immutable(true);
            let mut conn = sqlx::SqliteConnection::connect_with(&opts).await?;
            let st = read_applied(&mut conn).await?;
            conn.close().await?;
            st
        };
        let snapshot_id = match &last {
            Some(l) => format!(
                "{}-{}-{}-{}",
                l.leader_id.term,
                l.leader_id.node_id,
                l.index,
                uuid::Uuid::new_v4().simple()
            ),
            None => format!("empty-{}", uuid::Uuid::new_v4().simple()),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id,
        };
        let mut f = SnapshotFile::open(tmp).await.map_err(snap_err)?;
        f.sync().await.map_err(snap_err)?;
        drop(f);
        self.snapshots
            .set_current(&meta, tmp)
            .await
            .map_err(snap_err)
    }

    /// The current snapshot, if one was built or installed.
    pub(crate) async fn current_snapshot(&self) -> Result<Option<(SnapshotMeta, SnapshotFile)>> {
        self.snapshots.current().await.map_err(snap_err)
    }

    /// A new file to receive a snapshot into.
    pub(crate) async fn begin_receiving_snapshot(&self) -> Result<SnapshotFile> {
        SnapshotFile::create(&self.snapshots.temp_path("recv"))
            .await
            .map_err(snap_err)
    }

    /// Replaces the whole state with the snapshot in `file`, atomically, and makes it the
    /// current snapshot. The applied state becomes `meta`'s.
    pub(crate) async fn install_snapshot(
        &self,
        meta: &SnapshotMeta,
        mut file: SnapshotFile,
    ) -> Result<()> {
        file.sync().await.map_err(snap_err)?;
        let path = file.path().to_owned();
        drop(file);
        let res = self.install_from(meta, &path).await;
        if let Err(e) = res {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
        self.snapshots
            .set_current(meta, &path)
            .await
            .map_err(snap_err)?;
        if let Some(l) = &meta.last_log_id {
            self.applied.send_replace(l.index);
        }
        Ok(())
    }

    async fn install_from(&self, meta: &SnapshotMeta, path: &Path) -> Result<()> {
        let path_str = path
            .to_str()
            .ok_or_else(|| Error::Snapshot(format!("non-UTF-8 path {}", path.display())))?;
        let mut conn = self.pool.acquire().await?;
        // The installed state is on disk when the install returns: openraft then purges
        // the log it replaces.
        sqlx::query("PRAGMA synchronous = FULL")
            .execute(&mut *conn)
            .await?;
        sqlx::query("ATTACH DATABASE ? AS snap")
            .bind(path_str)
            .execute(&mut *conn)
            .await?;
        let res = copy_from_attached(&mut conn, meta).await;
        let detached = sqlx::query("DETACH DATABASE snap")
            .execute(&mut *conn)
            .await;
        let normal = sqlx::query("PRAGMA synchronous = NORMAL")
            .execute(&mut *conn)
            .await;
        if res.is_err() || detached.is_err() || normal.is_err() {
            // Do not hand a connection in an unknown state back to the pool.
            conn.close_on_drop();
        }
        res?;
        detached?;
        Ok(())
    }

    // ---- reads ----

    /// One entry.
    pub async fn entry(&self, id: &str) -> Result<Option<EntryRecord>> {
        let row = sqlx::query("SELECT * FROM entries WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| entry_from_row(&r)).transpose()
    }

    /// All entries, ordered by SPIFFE ID.
    pub async fn entries(&self) -> Result<Vec<EntryRecord>> {
        let rows = sqlx::query("SELECT * FROM entries ORDER BY spiffe_id, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// Entries directly under `parent_id`.
    pub async fn entries_by_parent(&self, parent_id: &str) -> Result<Vec<EntryRecord>> {
        let rows = sqlx::query("SELECT * FROM entries WHERE parent_id = ? ORDER BY id")
            .bind(parent_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// Entries an agent is authorized for: those whose parent is the agent, and, transitively,
    /// those whose parent is the SPIFFE ID of an authorized entry.
    pub async fn authorized_entries(&self, agent_id: &str) -> Result<Vec<EntryRecord>> {
        // One recursive query (not one per parent): this runs on every SVID request. UNION
        // (not UNION ALL) drops repeats, so cycles of entries end the recursion.
        let rows = sqlx::query(
            "WITH RECURSIVE parents(id) AS (
                 SELECT ?1
                 UNION
                 SELECT e.spiffe_id FROM entries e JOIN parents p ON e.parent_id = p.id
             )
             SELECT * FROM entries WHERE parent_id IN (SELECT id FROM parents) ORDER BY id",
        )
        .bind(agent_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// One join token.
    pub async fn join_token(&self, token: &str) -> Result<Option<JoinTokenRecord>> {
        let row = sqlx::query("SELECT * FROM join_tokens WHERE token = ?")
            .bind(token)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| JoinTokenRecord {
            token: r.get("token"),
            spiffe_id: r.get("spiffe_id"),
            expires_at: r.get("expires_at"),
            used_at: r.get("used_at"),
        }))
    }

    /// One agent.
    pub async fn agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>> {
        let row = sqlx::query("SELECT * FROM agents WHERE spiffe_id = ?")
            .bind(spiffe_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| agent_from_row(&r)).transpose()
    }

    /// All agents.
    pub async fn agents(&self) -> Result<Vec<AgentRecord>> {
        let rows = sqlx::query("SELECT * FROM agents ORDER BY spiffe_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(agent_from_row).collect()
    }

    /// The log index of the last change to the CA journal: the trust bundle's sequence number.
    pub async fn authorities_version(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(updated), 0) FROM authorities")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Rotation requests (at most one per kind and node).
    pub async fn rotation_requests(&self) -> Result<Vec<RotationRequest>> {
        let rows = sqlx::query("SELECT * FROM rotation_requests ORDER BY kind, node_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.get("kind");
                Ok(RotationRequest {
                    kind: AuthorityKind::parse(&kind)
                        .ok_or_else(|| corrupt(format!("rotation request kind {kind}")))?,
                    node_id: r.get("node_id"),
                    requested_at: r.get("requested_at"),
                    replaces: r.get("replaces"),
                })
            })
            .collect()
    }

    /// The CA journal, oldest first.
    pub async fn authorities(&self) -> Result<Vec<AuthorityRecord>> {
        let rows = sqlx::query("SELECT * FROM authorities ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(authority_from_row).collect()
    }
}

fn snapshot_dir(state_path: &Path) -> PathBuf {
    state_path.with_extension("snapshots")
}

fn snap_err(e: std::io::Error) -> Error {
    Error::Snapshot(e.to_string())
}

/// Replaces every table of `main` with the same table of the attached `snap` database (the
/// columns both have), then records `meta` as the applied state. One transaction.
async fn copy_from_attached(conn: &mut sqlx::SqliteConnection, meta: &SnapshotMeta) -> Result<()> {
    let check: String = sqlx::query_scalar("PRAGMA snap.quick_check")
        .fetch_one(&mut *conn)
        .await?;
    if check != "ok" {
        return Err(Error::Snapshot(format!(
            "received snapshot is damaged: {check}"
        )));
    }
    let mut tx = conn.begin().await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM main.sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(&mut *tx)
    .await?;
    for t in &tables {
        let cols: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info(?, 'main') ORDER BY cid")
                .bind(t)
                .fetch_all(&mut *tx)
                .await?;
        let snap_cols: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info(?, 'snap') ORDER BY cid")
                .bind(t)
                .fetch_all(&mut *tx)
                .await?;
        sqlx::query(&format!("DELETE FROM main.{}", ident(t)))
            .execute(&mut *tx)
            .await?;
        let common: Vec<String> = cols
            .iter()
            .filter(|c| snap_cols.contains(c))
            .map(|c| ident(c))
            .collect();
        if !common.is_empty() {
            let list = common.join(", ");
            sqlx::query(&format!(
                "INSERT INTO main.{t} ({list}) SELECT {list} FROM snap.{t}",
                t = ident(t)
            ))
            .execute(&mut *tx)
            .await?;
        }
    }
    // The snapshot's metadata is the authority on what it holds.
    sqlx::query("DELETE FROM raft_meta")
        .execute(&mut *tx)
        .await?;
    match &meta.last_log_id {
        Some(last) => write_applied(&mut tx, last, Some(&meta.last_membership)).await?,
        None => {
            sqlx::query("DELETE FROM meta WHERE key = 'last_applied'")
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Quotes an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialize")
}

fn entry_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<EntryRecord> {
    Ok(EntryRecord {
        id: r.get("id"),
        spiffe_id: r.get("spiffe_id"),
        parent_id: r.get("parent_id"),
        selectors: serde_json::from_str(r.get("selectors")).map_err(corrupt)?,
        x509_svid_ttl: r.get("x509_svid_ttl"),
        jwt_svid_ttl: r.get("jwt_svid_ttl"),
        dns_names: serde_json::from_str(r.get("dns_names")).map_err(corrupt)?,
        admin: r.get::<i64, _>("admin") != 0,
        hint: r.get("hint"),
        created_at: r.get("created_at"),
        revision: r.get("revision"),
    })
}

fn agent_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<AgentRecord> {
    Ok(AgentRecord {
        spiffe_id: r.get("spiffe_id"),
        attestation_type: r.get("attestation_type"),
        x509_svid_serial: r.get("serial"),
        x509_svid_expires_at: r.get("expires_at"),
        previous_x509_svid_serial: r.get("prev_serial"),
        banned: r.get::<i64, _>("banned") != 0,
        attested_at: r.get("attested_at"),
        selectors: serde_json::from_str(r.get("selectors")).map_err(corrupt)?,
    })
}

fn authority_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<AuthorityRecord> {
    let kind: String = r.get("kind");
    let state: String = r.get("state");
    Ok(AuthorityRecord {
        id: r.get("id"),
        kind: AuthorityKind::parse(&kind)
            .ok_or_else(|| corrupt(format!("authority kind {kind}")))?,
        state: AuthorityState::parse(&state)
            .ok_or_else(|| corrupt(format!("authority state {state}")))?,
        node_id: r.get("node_id"),
        key_backend: r.get("key_backend"),
        key_id: r.get("key_id"),
        cert_der: r.get("cert_der"),
        public_key: r.get("public_key"),
        not_before: r.get("not_before"),
        not_after: r.get("not_after"),
        key_destroyed: r.get::<i64, _>("key_destroyed") != 0,
    })
}

async fn upsert_entry(tx: &mut Transaction<'_, Sqlite>, e: &EntryRecord) -> Result<()> {
    sqlx::query(
        "INSERT OR REPLACE INTO entries(id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, admin, hint, created_at, revision) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
    )
    .bind(&e.id)
    .bind(&e.spiffe_id)
    .bind(&e.parent_id)
    .bind(json(&e.selectors))
    .bind(e.x509_svid_ttl)
    .bind(e.jwt_svid_ttl)
    .bind(json(&e.dns_names))
    .bind(e.admin as i64)
    .bind(&e.hint)
    .bind(e.created_at)
    .bind(e.revision)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn get_agent(tx: &mut Transaction<'_, Sqlite>, id: &str) -> Result<Option<AgentRecord>> {
    let row = sqlx::query("SELECT * FROM agents WHERE spiffe_id = ?")
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|r| agent_from_row(&r)).transpose()
}

async fn upsert_agent(tx: &mut Transaction<'_, Sqlite>, a: &AgentRecord) -> Result<()> {
    sqlx::query("INSERT OR REPLACE INTO agents(spiffe_id, attestation_type, serial, expires_at, banned, attested_at, selectors, prev_serial) VALUES (?,?,?,?,?,?,?,?)")
        .bind(&a.spiffe_id)
        .bind(&a.attestation_type)
        .bind(&a.x509_svid_serial)
        .bind(a.x509_svid_expires_at)
        .bind(a.banned as i64)
        .bind(a.attested_at)
        .bind(json(&a.selectors))
        .bind(&a.previous_x509_svid_serial)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The refusal for `entry` if another entry has the same SPIFFE ID, parent and selectors.
async fn duplicate_of(
    tx: &mut Transaction<'_, Sqlite>,
    entry: &EntryRecord,
) -> Result<Option<Response>> {
    let same = sqlx::query(
        "SELECT id FROM entries WHERE spiffe_id = ? AND parent_id = ? AND selectors = ? AND id <> ?",
    )
    .bind(&entry.spiffe_id)
    .bind(&entry.parent_id)
    .bind(json(&entry.selectors))
    .bind(&entry.id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(same.map(|row| duplicate(row.get("id"))))
}

fn duplicate(id: &str) -> Response {
    rejected(
        RejectCode::AlreadyExists,
        format!("an entry with the same SPIFFE ID, parent ID and selectors exists: {id}"),
    )
}

async fn apply_in(tx: &mut Transaction<'_, Sqlite>, cmd: &Command, index: u64) -> Result<Response> {
    Ok(match cmd {
        Command::CreateEntry { entry } => {
            // The same ID, or the same SPIFFE ID, parent and selectors: one lookup.
            let clash: Option<String> = sqlx::query_scalar(
                "SELECT id FROM entries WHERE id = ?1 OR (spiffe_id = ?2 AND parent_id = ?3 AND selectors = ?4) ORDER BY id = ?1 DESC LIMIT 1",
            )
            .bind(&entry.id)
            .bind(&entry.spiffe_id)
            .bind(&entry.parent_id)
            .bind(json(&entry.selectors))
            .fetch_optional(&mut **tx)
            .await?;
            match clash {
                Some(id) if id == entry.id => {
                    return Ok(rejected(
                        RejectCode::AlreadyExists,
                        format!("entry {} exists", entry.id),
                    ))
                }
                Some(id) => return Ok(duplicate(&id)),
                None => {}
            }
            upsert_entry(tx, entry).await?;
            Response::Entry(entry.clone())
        }
        Command::UpdateEntry { entry } => {
            let row = sqlx::query("SELECT revision, created_at FROM entries WHERE id = ?")
                .bind(&entry.id)
                .fetch_optional(&mut **tx)
                .await?;
            let Some(row) = row else {
                return Ok(rejected(
                    RejectCode::NotFound,
                    format!("no entry with ID {}", entry.id),
                ));
            };
            if let Some(r) = duplicate_of(tx, entry).await? {
                return Ok(r);
            }
            let mut e = entry.clone();
            e.revision = row.get::<i64, _>("revision") + 1;
            e.created_at = row.get("created_at");
            upsert_entry(tx, &e).await?;
            Response::Entry(e)
        }
        Command::DeleteEntry { id } => {
            let n = sqlx::query("DELETE FROM entries WHERE id = ?")
                .bind(id)
                .execute(&mut **tx)
                .await?
                .rows_affected();
            if n == 0 {
                rejected(RejectCode::NotFound, format!("no entry with ID {id}"))
            } else {
                Response::Ok
            }
        }
        Command::CreateJoinToken { token } => {
            let res = sqlx::query("INSERT OR IGNORE INTO join_tokens(token, spiffe_id, expires_at, used_at) VALUES (?,?,?,NULL)")
                .bind(&token.token)
                .bind(&token.spiffe_id)
                .bind(token.expires_at)
                .execute(&mut **tx)
                .await?;
            if res.rows_affected() == 0 {
                rejected(RejectCode::AlreadyExists, "that join token exists")
            } else {
                Response::Ok
            }
        }
        Command::AttestWithJoinToken { token, now, agent } => {
            let row = sqlx::query("SELECT expires_at, used_at FROM join_tokens WHERE token = ?")
                .bind(token)
                .fetch_optional(&mut **tx)
                .await?;
            let Some(row) = row else {
                return Ok(rejected(RejectCode::NotFound, "unknown join token"));
            };
            if row.get::<Option<i64>, _>("used_at").is_some() {
                return Ok(rejected(
                    RejectCode::FailedPrecondition,
                    "join token already used; generate a new one with `ca-node token generate`",
                ));
            }
            if row.get::<i64, _>("expires_at") <= *now {
                return Ok(rejected(
                    RejectCode::FailedPrecondition,
                    "join token expired; generate a new one with `ca-node token generate`",
                ));
            }
            if let Some(existing) = get_agent(tx, &agent.spiffe_id).await? {
                if existing.banned {
                    return Ok(rejected(
                        RejectCode::PermissionDenied,
                        format!("agent {} is banned", agent.spiffe_id),
                    ));
                }
            }
            sqlx::query("UPDATE join_tokens SET used_at = ? WHERE token = ?")
                .bind(now)
                .bind(token)
                .execute(&mut **tx)
                .await?;
            upsert_agent(tx, agent).await?;
            Response::Agent(agent.clone())
        }
        Command::RegisterAgent { agent } => {
            if let Some(existing) = get_agent(tx, &agent.spiffe_id).await? {
                if existing.banned {
                    return Ok(rejected(
                        RejectCode::PermissionDenied,
                        format!("agent {} is banned", agent.spiffe_id),
                    ));
                }
            }
            upsert_agent(tx, agent).await?;
            Response::Agent(agent.clone())
        }
        Command::RenewAgent {
            spiffe_id,
            serial,
            expires_at,
            caller_serial,
        } => {
            let Some(mut a) = get_agent(tx, spiffe_id).await? else {
                return Ok(rejected(
                    RejectCode::NotFound,
                    format!("agent {spiffe_id} is not attested (evicted?)"),
                ));
            };
            if a.banned {
                return Ok(rejected(
                    RejectCode::PermissionDenied,
                    format!("agent {spiffe_id} is banned"),
                ));
            }
            if !caller_serial.is_empty()
                && *caller_serial != a.x509_svid_serial
                && *caller_serial != a.previous_x509_svid_serial
            {
                return Ok(rejected(
                    RejectCode::PermissionDenied,
                    format!("agent {spiffe_id} renewed with an SVID that is no longer its own (serial {caller_serial}); it was replaced by a newer attestation"),
                ));
            }
            a.previous_x509_svid_serial = std::mem::take(&mut a.x509_svid_serial);
            a.x509_svid_serial = serial.clone();
            a.x509_svid_expires_at = *expires_at;
            upsert_agent(tx, &a).await?;
            Response::Agent(a)
        }
        Command::EvictAgent { spiffe_id } => {
            let n = sqlx::query("DELETE FROM agents WHERE spiffe_id = ?")
                .bind(spiffe_id)
                .execute(&mut **tx)
                .await?
                .rows_affected();
            if n == 0 {
                rejected(RejectCode::NotFound, format!("no agent {spiffe_id}"))
            } else {
                Response::Ok
            }
        }
        Command::BanAgent { spiffe_id } => {
            let Some(mut a) = get_agent(tx, spiffe_id).await? else {
                return Ok(rejected(
                    RejectCode::NotFound,
                    format!("no agent {spiffe_id}"),
                ));
            };
            a.banned = true;
            upsert_agent(tx, &a).await?;
            Response::Agent(a)
        }
        Command::PutAuthority { authority: a } => {
            sqlx::query("INSERT INTO authorities(id, kind, state, node_id, key_backend, key_id, cert_der, public_key, not_before, not_after, seq, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)
                 ON CONFLICT(id) DO UPDATE SET kind=excluded.kind, state=excluded.state, node_id=excluded.node_id, key_backend=excluded.key_backend, key_id=excluded.key_id, cert_der=excluded.cert_der, public_key=excluded.public_key, not_before=excluded.not_before, not_after=excluded.not_after, updated=excluded.updated")
                .bind(&a.id)
                .bind(a.kind.as_str())
                .bind(a.state.as_str())
                .bind(&a.node_id)
                .bind(&a.key_backend)
                .bind(&a.key_id)
                .bind(&a.cert_der)
                .bind(&a.public_key)
                .bind(a.not_before)
                .bind(a.not_after)
                .bind(index as i64)
                .bind(index as i64)
                .execute(&mut **tx)
                .await?;
            Response::Ok
        }
        Command::KeyDestroyed { id } => {
            let n = sqlx::query("UPDATE authorities SET key_destroyed = 1 WHERE id = ?")
                .bind(id)
                .execute(&mut **tx)
                .await?
                .rows_affected();
            if n == 0 {
                rejected(RejectCode::NotFound, format!("no authority {id}"))
            } else {
                Response::Ok
            }
        }
        Command::RequestRotation { request: r } => {
            sqlx::query("INSERT OR REPLACE INTO rotation_requests(kind, node_id, requested_at, replaces) VALUES (?,?,?,?)")
                .bind(r.kind.as_str())
                .bind(&r.node_id)
                .bind(r.requested_at)
                .bind(&r.replaces)
                .execute(&mut **tx)
                .await?;
            Response::Ok
        }
        Command::SetAuthorityState { id, state } => {
            let n = sqlx::query("UPDATE authorities SET state = ?, updated = ? WHERE id = ?")
                .bind(state.as_str())
                .bind(index as i64)
                .bind(id)
                .execute(&mut **tx)
                .await?
                .rows_affected();
            if n == 0 {
                rejected(RejectCode::NotFound, format!("no authority {id}"))
            } else {
                Response::Ok
            }
        }
    })
}
