//! The Raft log store: log entries, the vote and the last purged log ID in their own SQLite
//! database (`raft-log.db` beside `state.db`), apart from the state machine.
//!
//! Every write is one transaction in WAL mode with `synchronous=FULL`, so it is on disk when
//! the commit returns; only then is openraft told that appended entries are flushed. Entries
//! are stored as JSON, keyed by index.

// openraft's StorageError is what its storage traits return; boxing it is not ours to do.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::str::FromStr;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, StorageIOError};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::Result;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS store (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"#;

const VOTE: &str = "vote";
const LAST_PURGED: &str = "last_purged_log_id";

/// The durable Raft log of one node. Cloning is cheap (clones share the database); a clone
/// is also the log reader openraft's replication tasks use.
#[derive(Clone, Debug)]
pub struct LogStore {
    pool: SqlitePool,
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

impl LogStore {
    /// Opens (creating if needed) the log database at `path`.
    pub async fn open(path: &Path) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // Local file connections do not go stale; a ping per acquire costs a round
            // trip to the connection's thread on every append.
            .test_before_acquire(false)
            .connect_with(opts)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }

    async fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> std::result::Result<Option<T>, sqlx::Error> {
        let v: Option<String> = sqlx::query_scalar("SELECT value FROM store WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        match v {
            None => Ok(None),
            Some(v) => serde_json::from_str(&v)
                .map(Some)
                .map_err(|e| sqlx::Error::Decode(Box::new(e))),
        }
    }

    async fn put_meta<T: serde::Serialize>(
        &self,
        key: &str,
        value: &T,
    ) -> std::result::Result<(), sqlx::Error> {
        let v = serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        sqlx::query(
            "INSERT INTO store(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(v)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The last purged log ID.
    pub async fn last_purged(&self) -> Result<Option<LogId>> {
        Ok(self.get_meta(LAST_PURGED).await?)
    }
}

fn decode_entry(text: &str) -> std::result::Result<Entry, StorageError> {
    serde_json::from_str(text).map_err(read_logs_err)
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
        let rows = sqlx::query("SELECT entry FROM log WHERE idx >= ? AND idx <= ? ORDER BY idx")
            .bind(lo)
            .bind(hi)
            .fetch_all(&self.pool)
            .await
            .map_err(read_logs_err)?;
        rows.iter()
            .map(|r| decode_entry(r.get::<&str, _>("entry")))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> std::result::Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(LAST_PURGED).await.map_err(read_logs_err)?;
        let last: Option<String> =
            sqlx::query_scalar("SELECT entry FROM log ORDER BY idx DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await
                .map_err(read_logs_err)?;
        let last_log_id = match last {
            Some(t) => Some(decode_entry(&t)?.log_id),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> std::result::Result<(), StorageError> {
        // Committed (fsync'ed) when this returns.
        self.put_meta(VOTE, vote)
            .await
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> std::result::Result<Option<Vote>, StorageError> {
        self.get_meta(VOTE)
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
        let res: std::result::Result<(), sqlx::Error> = async {
            // One statement for the whole batch: every statement is a round trip to the
            // connection's thread.
            let mut rows = Vec::new();
            for e in entries {
                let text =
                    serde_json::to_string(&e).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
                rows.push((e.log_id.index as i64, text));
            }
            let insert = |chunk: &[(i64, String)]| {
                let mut q = sqlx::QueryBuilder::new("INSERT OR REPLACE INTO log(idx, entry) ");
                q.push_values(chunk, |mut b, (idx, text)| {
                    b.push_bind(*idx).push_bind(text.clone());
                });
                q
            };
            // openraft sends at most max_payload_entries (300) per batch: one statement,
            // atomic on its own (2 parameters per row, far below SQLite's 32766).
            const ROWS_PER_STATEMENT: usize = 1000;
            if rows.len() <= ROWS_PER_STATEMENT {
                // WAL + synchronous=FULL: durable once the statement returns.
                return insert(&rows).build().execute(&self.pool).await.map(|_| ());
            }
            let mut tx = self.pool.begin().await?;
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                insert(chunk).build().execute(&mut *tx).await?;
            }
            // WAL + synchronous=FULL: durable once the commit returns.
            tx.commit().await
        }
        .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_logs_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> std::result::Result<(), StorageError> {
        sqlx::query("DELETE FROM log WHERE idx >= ?")
            .bind(log_id.index as i64)
            .execute(&self.pool)
            .await
            .map_err(write_logs_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> std::result::Result<(), StorageError> {
        let res: std::result::Result<(), sqlx::Error> = async {
            let mut tx = self.pool.begin().await?;
            let v = serde_json::to_string(&log_id).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            sqlx::query(
                "INSERT INTO store(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )
            .bind(LAST_PURGED)
            .bind(v)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM log WHERE idx <= ?")
                .bind(log_id.index as i64)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
        .await;
        res.map_err(write_logs_err)
    }
}
