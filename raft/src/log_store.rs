//! The Raft log store: log entries, the vote and the last purged log ID in their own SQLite
//! database (`raft-log.db` beside `state.db`), apart from the state machine.
//!
//! One connection on its own thread ([`crate::db`]) does all the work, in the order it is
//! asked. Every write is one transaction in WAL mode with `synchronous=FULL`, so it is on
//! disk when the commit returns; only then is openraft told that appended entries are
//! flushed. An append is queued and `append` returns at once (openraft replicates meanwhile);
//! appends that queue up while the thread syncs are written together (group commit); reads
//! queued after an append see it. Entries are stored as JSON, keyed by index.

// openraft's StorageError is what its storage traits return; boxing it is not ours to do.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, StorageIOError};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::db::{Db, DbOptions};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::Result;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS store (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"#;

const VOTE: &str = "vote";
const LAST_PURGED: &str = "last_purged_log_id";

/// The durable Raft log of one node. Cloning is cheap (clones share the database thread);
/// a clone is also the log reader openraft's replication tasks use.
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Db,
    pending: Arc<Mutex<PendingAppends>>,
}

/// Appends waiting for the log thread: written together, in one transaction and one fsync
/// (group commit). The leader appends every client write on its own; under load, the
/// appends that arrive while the thread is syncing one batch make up the next.
#[derive(Default)]
struct PendingAppends {
    rows: Vec<(i64, String)>,
    callbacks: Vec<LogFlushed<TypeConfig>>,
    /// A flush job is queued and has not yet taken `rows`.
    flush_queued: bool,
}

impl Debug for PendingAppends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAppends")
            .field("rows", &self.rows.len())
            .field("flush_queued", &self.flush_queued)
            .finish()
    }
}

/// The log thread's flush job: takes every pending append, writes them in one
/// transaction, then tells each appender the outcome.
fn flush_pending(conn: &mut Connection, pending: &Mutex<PendingAppends>) {
    let (rows, callbacks) = {
        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
        p.flush_queued = false;
        (
            std::mem::take(&mut p.rows),
            std::mem::take(&mut p.callbacks),
        )
    };
    let res = insert_entries(conn, &rows).map_err(|e| e.to_string());
    for cb in callbacks {
        cb.log_io_completed(res.clone().map_err(std::io::Error::other));
    }
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::error(e.to_string())).into()
}

fn read_logs_err(e: impl std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_logs_err(e: impl std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

fn get_meta<T: serde::de::DeserializeOwned>(conn: &Connection, key: &str) -> Result<Option<T>> {
    let v: Option<String> = conn
        .prepare_cached("SELECT value FROM store WHERE key = ?")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    v.map(|v| serde_json::from_str(&v).map_err(|e| crate::Error::Corrupt(format!("{key}: {e}"))))
        .transpose()
}

fn put_meta<T: serde::Serialize>(conn: &Connection, key: &str, value: &T) -> Result<()> {
    let v = serde_json::to_string(value).map_err(|e| crate::Error::Corrupt(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO store(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, v])?;
    Ok(())
}

/// Writes `rows` (index, JSON) in one transaction; durable when it returns.
fn insert_entries(conn: &mut Connection, rows: &[(i64, String)]) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut insert =
            tx.prepare_cached("INSERT OR REPLACE INTO log(idx, entry) VALUES (?, ?)")?;
        for (idx, text) in rows {
            insert.execute(params![idx, text])?;
        }
    }
    // WAL + synchronous=FULL: durable once the commit returns.
    tx.commit()?;
    Ok(())
}

impl LogStore {
    /// Opens (creating if needed) the log database at `path`.
    pub async fn open(path: &Path) -> Result<Self> {
        let db = Db::open(
            path,
            DbOptions {
                name: "raft-log",
                connections: 1,
                synchronous: "FULL",
            },
            |conn| conn.execute_batch(SCHEMA),
        )
        .await?;
        Ok(Self {
            db,
            pending: Arc::default(),
        })
    }

    /// The last purged log ID.
    pub async fn last_purged(&self) -> Result<Option<LogId>> {
        self.db.call(|conn| get_meta(conn, LAST_PURGED)).await
    }
}

fn decode_entry(text: &str) -> Result<Entry> {
    serde_json::from_str(text).map_err(|e| crate::Error::Corrupt(format!("log entry: {e}")))
}

fn bound_to_i64(b: Bound<&u64>, start: bool) -> i64 {
    let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
    match (b, start) {
        (Bound::Included(v), true) => clamp(*v),
        (Bound::Excluded(v), true) => clamp(v.saturating_add(1)),
        (Bound::Unbounded, true) => 0,
        (Bound::Included(v), false) => clamp(*v),
        (Bound::Excluded(v), false) => clamp(*v) - 1,
        (Bound::Unbounded, false) => i64::MAX,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> std::result::Result<Vec<Entry>, StorageError> {
        let lo = bound_to_i64(range.start_bound(), true);
        let hi = bound_to_i64(range.end_bound(), false);
        if hi < lo {
            return Ok(Vec::new());
        }
        self.db
            .call(move |conn| {
                let mut q = conn.prepare_cached(
                    "SELECT entry FROM log WHERE idx >= ? AND idx <= ? ORDER BY idx",
                )?;
                let mut rows = q.query(params![lo, hi])?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    out.push(decode_entry(r.get_ref(0)?.as_str()?)?);
                }
                Ok(out)
            })
            .await
            .map_err(read_logs_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> std::result::Result<LogState<TypeConfig>, StorageError> {
        self.db
            .call(|conn| {
                let last_purged: Option<LogId> = get_meta(conn, LAST_PURGED)?;
                let last: Option<String> = conn
                    .prepare_cached("SELECT entry FROM log ORDER BY idx DESC LIMIT 1")?
                    .query_row([], |r| r.get(0))
                    .optional()?;
                let last_log_id = match last {
                    Some(t) => Some(decode_entry(&t)?.log_id),
                    None => last_purged,
                };
                Ok(LogState {
                    last_purged_log_id: last_purged,
                    last_log_id,
                })
            })
            .await
            .map_err(read_logs_err)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> std::result::Result<(), StorageError> {
        // Committed (fsync'ed) when this returns.
        let vote = *vote;
        self.db
            .call(move |conn| put_meta(conn, VOTE, &vote))
            .await
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> std::result::Result<Option<Vote>, StorageError> {
        self.db
            .call(|conn| get_meta(conn, VOTE))
            .await
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> std::result::Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            let text = serde_json::to_string(&e).map_err(write_logs_err)?;
            rows.push((e.log_id.index as i64, text));
        }
        // Queued, not awaited. The entries join the pending batch; a flush job is queued
        // unless one is queued that has not taken the batch yet. Either way a flush job
        // that writes them is ahead of any job queued after this call, so later reads of
        // this one thread see them. openraft calls append, truncate and purge one at a
        // time, so a truncate never overtakes an append queued before it. openraft hears
        // the entries are on disk when that flush's commit has returned.
        let queue_flush = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.rows.extend(rows);
            p.callbacks.push(callback);
            !std::mem::replace(&mut p.flush_queued, true)
        };
        if queue_flush {
            let pending = Arc::clone(&self.pending);
            self.db
                .submit(move |conn| flush_pending(conn, &pending))
                .map_err(write_logs_err)?;
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> std::result::Result<(), StorageError> {
        self.db
            .call(move |conn| {
                conn.prepare_cached("DELETE FROM log WHERE idx >= ?")?
                    .execute([log_id.index as i64])?;
                Ok(())
            })
            .await
            .map_err(write_logs_err)
    }

    async fn purge(&mut self, log_id: LogId) -> std::result::Result<(), StorageError> {
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                put_meta(&tx, LAST_PURGED, &log_id)?;
                tx.prepare_cached("DELETE FROM log WHERE idx <= ?")?
                    .execute([log_id.index as i64])?;
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(write_logs_err)
    }
}
