//! The Raft log store: log entries, the vote and the last purged log ID in their own SQLite
//! database (`raft-log.db` beside `state.db`), apart from the state machine.
//!
//! One connection on its own thread (`crate::store::db`) does all the work, in the order it is
//! asked; it holds the database's locks for as long as it is open (exclusive locking mode),
//! so no other process can open the log meanwhile. Every write is one transaction in WAL
//! mode with `synchronous=FULL`, so it is on disk when the commit returns; only then is
//! openraft told that appended entries are flushed. An append is queued and `append` returns
//! at once; appends that queue up while the thread syncs are written together (group
//! commit). Entries are stored as JSON, keyed by index.
//!
//! The newest entries are also kept in memory ([`Tail`]), and reads they cover are answered
//! from there: the replication of new entries to the followers reads them without a trip to
//! the database thread (openraft requires appended entries to be readable when `append`
//! returns, not durable). Reads of older entries (a follower catching up) go to the
//! database, queued behind any pending flush, so they see every append too.

// openraft's StorageError is what its storage traits return; boxing it is not ours to do.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, StorageIOError};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::store::db::{lock, Db, DbOptions};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::Result;
use ca_state::schema::query_all;

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
    tail: Arc<Mutex<Tail>>,
}

/// Most entries [`Tail`] holds.
const TAIL_MAX_ENTRIES: usize = 4096;
/// Most bytes (of their JSON form) the entries [`Tail`] holds may take.
const TAIL_MAX_BYTES: usize = 32 << 20;

/// The newest log entries, in memory: always a contiguous run that ends at the last entry of
/// the log (or empty), bounded by [`TAIL_MAX_ENTRIES`] and [`TAIL_MAX_BYTES`]. Every append,
/// truncate and purge updates it before it reaches the database thread.
#[derive(Default)]
struct Tail {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail")
            .field("first", &self.first_index())
            .field("last", &self.last_index())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Tail {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    /// Adds `entry`, the new last entry of the log. An entry that does not follow the last one
    /// held (the log was replaced by a snapshot) starts the run afresh.
    fn push(&mut self, entry: Entry, size: usize) {
        if self
            .last_index()
            .is_some_and(|last| last.checked_add(1) != Some(entry.log_id.index))
        {
            self.entries.clear();
            self.bytes = 0;
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.entries.len() > 1
            && (self.entries.len() > TAIL_MAX_ENTRIES || self.bytes > TAIL_MAX_BYTES)
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    /// Drops the entries from `index` on (openraft's truncate).
    fn truncate(&mut self, index: u64) {
        while self.last_index().is_some_and(|last| last >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops the entries up to `index` inclusive (openraft's purge).
    fn purge(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            self.pop_front();
        }
    }

    /// The entries `lo..=hi` that exist, if the run covers every one of them that the log
    /// holds; `None` sends the read to the database.
    fn get(&self, lo: u64, hi: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        if lo < first {
            return None;
        }
        let skip = usize::try_from(lo - first).ok()?;
        let take = usize::try_from(hi.saturating_sub(lo).saturating_add(1)).unwrap_or(usize::MAX);
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take(take)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
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
    /// What an append or flush is answered once a flush has failed. From then on nothing
    /// more is written and every append fails, so that later entries never follow a failed
    /// batch (a hole in the log).
    failed: Option<String>,
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
    let (rows, callbacks, failed) = {
        let mut p = lock(pending);
        p.flush_queued = false;
        (
            std::mem::take(&mut p.rows),
            std::mem::take(&mut p.callbacks),
            p.failed.clone(),
        )
    };
    let res = match failed {
        Some(refusal) => Err(refusal),
        None => insert_entries(conn, &rows).map_err(|e| e.to_string()),
    };
    if let Err(why) = &res {
        lock(pending)
            .failed
            .get_or_insert_with(|| format!("an earlier log write failed: {why}"));
    }
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
                exclusive: true,
            },
            |conn| conn.execute_batch(SCHEMA),
        )
        .await?;
        Ok(Self {
            db,
            pending: Arc::default(),
            tail: Arc::default(),
        })
    }

    /// Closes the log: returns once its database connection has closed, so nothing writes
    /// the file any more. Only returns after every clone of this log store is gone.
    pub async fn close(self) {
        self.db.close().await;
    }

    /// Whether the log holds nothing at all: no entry, no vote, nothing purged (a new log,
    /// or one whose file was lost or truncated to nothing).
    pub async fn is_blank(&self) -> Result<bool> {
        self.db
            .call(|conn| {
                let n: i64 = conn.query_row(
                    "SELECT (SELECT COUNT(*) FROM log) + (SELECT COUNT(*) FROM store)",
                    [],
                    |r| r.get(0),
                )?;
                Ok(n == 0)
            })
            .await
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
        if let Some(entries) = lock(&self.tail).get(lo as u64, hi as u64) {
            return Ok(entries);
        }
        self.db
            .call(move |conn| {
                query_all(
                    conn,
                    "SELECT entry FROM log WHERE idx >= ? AND idx <= ? ORDER BY idx",
                    params![lo, hi],
                    |r| decode_entry(r.get_ref(0)?.as_str()?),
                )
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
        if let Some(refusal) = lock(&self.pending).failed.clone() {
            return Err(write_logs_err(refusal));
        }
        // Encoded before the tail is locked (its readers are the replication tasks), and
        // all of them before any is added: an entry that cannot be encoded leaves no trace.
        let encoded = entries
            .into_iter()
            .map(|e| Ok((serde_json::to_string(&e).map_err(write_logs_err)?, e)))
            .collect::<std::result::Result<Vec<_>, StorageError>>()?;
        let mut rows = Vec::with_capacity(encoded.len());
        {
            let mut tail = lock(&self.tail);
            for (text, e) in encoded {
                let index = e.log_id.index as i64;
                tail.push(e, text.len());
                rows.push((index, text));
            }
        }
        // Queued, not awaited. The entries join the pending batch; a flush job is queued
        // unless one is queued that has not taken the batch yet. Either way a flush job
        // that writes them is ahead of any job queued after this call, so later reads of
        // this one thread see them. openraft calls append, truncate and purge one at a
        // time, so a truncate never overtakes an append queued before it. openraft hears
        // the entries are on disk when that flush's commit has returned.
        let queue_flush = {
            let mut p = lock(&self.pending);
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
        lock(&self.tail).truncate(log_id.index);
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
        lock(&self.tail).purge(log_id.index);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::EntryPayload;
    use openraft::CommittedLeaderId;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(v: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    fn tail_of(range: std::ops::RangeInclusive<u64>) -> Tail {
        let mut t = Tail::default();
        for i in range {
            t.push(entry(1, i), 10);
        }
        t
    }

    #[test]
    fn tail_answers_only_what_it_covers() {
        let t = tail_of(5..=9);
        assert_eq!(indexes(t.get(5, 9)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(
            indexes(t.get(7, 100)),
            Some(vec![7, 8, 9]),
            "the log ends at 9"
        );
        assert_eq!(
            indexes(t.get(10, 20)),
            Some(vec![]),
            "nothing after the last entry"
        );
        assert_eq!(
            indexes(t.get(4, 9)),
            None,
            "4 is older than the tail: the database"
        );
        assert_eq!(
            indexes(Tail::default().get(0, 10)),
            None,
            "empty: the database"
        );
    }

    #[test]
    fn tail_follows_truncate_purge_and_gaps() {
        let mut t = tail_of(1..=6);
        t.truncate(4);
        assert_eq!(indexes(t.get(1, 10)), Some(vec![1, 2, 3]));
        t.push(entry(2, 4), 10);
        assert_eq!(t.get(4, 4).unwrap()[0].log_id.leader_id.term, 2);
        t.purge(2);
        assert_eq!(indexes(t.get(3, 10)), Some(vec![3, 4]));
        assert_eq!(indexes(t.get(2, 10)), None);
        assert_eq!(t.bytes, 20);
        // An entry that does not follow the last (the log replaced by a snapshot).
        t.push(entry(3, 50), 10);
        assert_eq!(indexes(t.get(3, 60)), None);
        assert_eq!(indexes(t.get(50, 60)), Some(vec![50]));
        assert_eq!(t.bytes, 10);
        t.truncate(0);
        assert_eq!((t.first_index(), t.bytes), (None, 0));
    }

    #[test]
    fn a_failed_flush_stops_every_later_write() {
        let pending = Mutex::new(PendingAppends::default());
        // No `log` table: the insert fails.
        let mut broken = Connection::open_in_memory().unwrap();
        lock(&pending).rows.push((1, "{}".into()));
        flush_pending(&mut broken, &pending);
        assert!(lock(&pending).failed.is_some(), "the failure is kept");

        let mut healthy = Connection::open_in_memory().unwrap();
        healthy.execute_batch(SCHEMA).unwrap();
        lock(&pending).rows.push((2, "{}".into()));
        flush_pending(&mut healthy, &pending);
        let rows: i64 = healthy
            .query_row("SELECT count(*) FROM log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0, "entry 2 must not be written after entry 1 failed");
        assert!(lock(&pending).rows.is_empty());
    }

    #[test]
    fn tail_is_bounded() {
        let mut t = tail_of(1..=(TAIL_MAX_ENTRIES as u64 + 10));
        assert_eq!(t.entries.len(), TAIL_MAX_ENTRIES);
        assert_eq!(t.first_index(), Some(11));
        t.push(entry(1, TAIL_MAX_ENTRIES as u64 + 11), TAIL_MAX_BYTES);
        assert_eq!(
            t.entries.len(),
            1,
            "one entry over the byte bound is still held"
        );
        assert_eq!(t.bytes, TAIL_MAX_BYTES);
    }
}
