//! The state machine: applies log entries to SQLite, each batch of entries together with
//! the ID of the last applied entry and the last membership (so a replay after
//! a crash is idempotent and openraft finds its applied state where the data is).
//!
//! One connection, on its own thread, writes: a whole applied batch is one job there
//! ([`crate::db`]), except that a few commands ([`APPLY_HERE_MAX`]) are applied on the
//! caller's thread, where the hand-offs to the thread and back would take about as long as
//! the apply itself. Two more connections, on their own threads, serve the reads, and a fourth
//! checkpoints the WAL beside the writer, every 50 ms in which something was applied
//! (`run_checkpoints`).
//!
//! Applied batches are not committed one by one. They accumulate in one open transaction
//! on the writer, each batch inside a savepoint (a batch that fails leaves nothing, the ones
//! before it stay), which is committed by the first of: an apply once the transaction is
//! [`COMMIT_AFTER`] old or holds [`COMMIT_AFTER_COMMANDS`] commands, any read (a read first
//! commits whatever is applied, so it sees every write that was answered), a snapshot build
//! or install, and the checkpoint timer. Nothing is lost by waiting: the Raft log holds
//! every applied entry (and is only purged below a snapshot, which commits first), and
//! after a crash openraft applies it again from the last committed batch.
//!
//! It also builds snapshots of itself (`VACUUM INTO`, a consistent copy of the database) and
//! installs received ones (their tables copied over its own in one transaction).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use tokio::sync::watch;

use crate::command::{Command, RejectCode, Response};
use crate::db::{lock, query_all, query_one, Db, DbOptions, Running};
use crate::records::*;
use crate::snapshot::{SnapshotDir, SnapshotFile};
use crate::types::{Entry, EntryPayload, LogId, SnapshotMeta, StoredMembership};
use crate::{Error, Result};

/// The most commands an apply runs on the caller's thread ([`Db::call_here`]) rather than on
/// the writer's. One command takes about 85 µs of the writer's time there, and the two
/// hand-offs about as much again, on the leader's path to answering the write; a larger batch
/// (at higher load) would hold up an async runtime worker for longer, and pays the
/// hand-offs once for all its commands.
pub const APPLY_HERE_MAX: usize = 4;

/// How long applied batches may wait in the writer's open transaction before the next apply
/// commits them (reads, snapshots and the checkpoint timer commit them earlier).
pub const COMMIT_AFTER: Duration = Duration::from_millis(5);

/// How many applied commands the writer's open transaction holds at most before an apply
/// commits it.
pub const COMMIT_AFTER_COMMANDS: usize = 1024;

/// The writer's open transaction of applied but uncommitted batches (see the module docs).
#[derive(Debug, Default)]
struct OpenWrites {
    /// When the open transaction began and how many commands it holds; `None` when nothing
    /// applied is waiting to be committed. Only jobs on the writer's connection change it.
    open: Mutex<Option<(Instant, usize)>>,
    /// Why committing applied batches failed, after which they are gone from the database:
    /// every later apply and read fails with it, so the node stops (openraft) rather than go
    /// on from a state behind what it answered. A restart applies the log again.
    failed: Mutex<Option<String>>,
}

impl OpenWrites {
    fn check(&self) -> Result<()> {
        match &*lock(&self.failed) {
            Some(why) => Err(Error::Io(why.clone())),
            None => Ok(()),
        }
    }

    /// Runs `sql` on the writer; when it fails, the open transaction is given up for good
    /// (see `failed`).
    fn control(&self, conn: &Connection, sql: &str) -> Result<()> {
        conn.execute_batch(sql).map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            *lock(&self.open) = None;
            let why = format!(
                "the state store could not commit applied log entries ({sql}: {e}); \
                 restart the node: it applies them again from its log"
            );
            let mut failed = lock(&self.failed);
            Error::Io(failed.get_or_insert(why).clone())
        })
    }

    /// Commits the writer's open transaction, if there is one.
    fn commit(&self, conn: &Connection) -> Result<()> {
        if !conn.is_autocommit() {
            self.control(conn, "COMMIT")?;
        }
        *lock(&self.open) = None;
        Ok(())
    }

    /// Commits, on `writer`, whatever applied batches are waiting; fails once a commit has
    /// failed (see `failed`).
    async fn commit_on(self: &Arc<Self>, writer: &Db) -> Result<()> {
        self.check()?;
        if lock(&self.open).is_none() {
            return Ok(());
        }
        let w = Arc::clone(self);
        writer.call_here(move |c| w.commit(c)).await
    }
}

/// Rolls a batch's savepoint back unless the batch finished: a batch that fails or panics
/// midway leaves nothing in the open transaction.
struct BatchSavepoint<'a> {
    conn: &'a Connection,
    done: bool,
}

impl Drop for BatchSavepoint<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self
                .conn
                .execute_batch("ROLLBACK TO apply_batch; RELEASE apply_batch");
        }
    }
}

/// The commands `entries` carry (those of a batch counted one by one).
fn command_count(entries: &[Entry]) -> usize {
    entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(Command::Batch { commands }) => commands.len(),
            _ => 1,
        })
        .sum()
}

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
    /// The one writing connection: applies, checkpoints, installs.
    writer: Db,
    /// Connections for reads (and snapshot copies), so reads never wait behind an apply.
    readers: Db,
    /// The writer's applied but uncommitted batches.
    writes: Arc<OpenWrites>,
    applied: watch::Sender<u64>,
    /// Index of the last applied change to the CA journal or the rotation requests.
    ca_changed: watch::Sender<u64>,
    snapshots: Arc<SnapshotDir>,
    snapshot_activity: watch::Sender<SnapshotActivity>,
    /// The checkpointing task's connection, which ends with the task.
    checkpointer: Running,
}

/// Snapshots a state machine built and installed since it was opened, and how long the
/// last of each took ([`StateMachine::subscribe_snapshots`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SnapshotActivity {
    /// Snapshots built.
    pub built: u64,
    /// Snapshots installed (sent by a leader).
    pub installed: u64,
    /// How long the last build took.
    pub last_build: Duration,
    /// How long the last install took.
    pub last_install: Duration,
}

/// How often a connection of its own checkpoints the state's WAL (see [`run_checkpoints`]).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// The writer's own checkpoint threshold, in WAL pages (SQLite's default is 1000).
const WRITER_AUTOCHECKPOINT: i64 = 4096;

/// Checkpoints the WAL (`PASSIVE`: never waits for the writer or the readers) on `db` every
/// [`CHECKPOINT_EVERY`] in which something was applied (`applied` changed), until the state
/// machine is dropped (the sender of `applied` with it).
///
/// SQLite's automatic checkpoints run inside the commit that crosses the threshold, on the
/// writer: with the default threshold, about every 170 single-write applies copied 4 MiB and
/// made two fsyncs (`synchronous=NORMAL`), holding up that write and every one behind it.
/// These checkpoints do that copying beside the writer. They cannot restart the WAL while
/// the writer keeps appending, though, so the writer keeps a higher threshold,
/// [`WRITER_AUTOCHECKPOINT`]: when it is crossed, what is left to copy is small, and the
/// writer's checkpoint lets the WAL start over, which bounds its size.
async fn run_checkpoints(
    db: Db,
    writer: Db,
    writes: Arc<OpenWrites>,
    mut applied: watch::Receiver<u64>,
) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match applied.has_changed() {
            Err(_) => return,
            Ok(false) => continue,
            Ok(true) => {
                applied.borrow_and_update();
            }
        }
        // Applied batches still waiting for the next apply or read are committed here at
        // the latest.
        if let Err(e) = writes.commit_on(&writer).await {
            tracing::error!(error = %e, "committing applied log entries failed");
        }
        let res = db
            .call(|c| Ok(c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?))
            .await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "checkpointing the state's WAL failed; retrying");
        }
    }
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

fn read_applied(conn: &Connection) -> Result<AppliedState> {
    let mut last = None;
    let mut membership = StoredMembership::default();
    {
        let mut q = conn.prepare_cached("SELECT key, value FROM raft_meta")?;
        let mut rows = q.query([])?;
        while let Some(r) = rows.next()? {
            let value = r.get_ref(1)?.as_str()?;
            match r.get_ref(0)?.as_str()? {
                LAST_APPLIED => last = serde_json::from_str(value).map_err(corrupt)?,
                LAST_MEMBERSHIP => membership = serde_json::from_str(value).map_err(corrupt)?,
                _ => {}
            }
        }
    }
    if last.is_none() {
        // A store written before log IDs were recorded: only the index is known.
        let index: Option<i64> = conn
            .prepare_cached("SELECT value FROM meta WHERE key = 'last_applied'")?
            .query_row([], |r| r.get(0))
            .optional()?;
        if let Some(i) = index.filter(|i| *i > 0) {
            last = Some(LogId::new(openraft::CommittedLeaderId::new(0, 0), i as u64));
        }
    }
    Ok((last, membership))
}

fn write_applied(
    conn: &Connection,
    last: &LogId,
    membership: Option<&StoredMembership>,
) -> Result<()> {
    // The legacy `meta.last_applied` row is only read when this is absent.
    let mut q = conn.prepare_cached(
        "INSERT INTO raft_meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?;
    q.execute(params![LAST_APPLIED, json(last)])?;
    if let Some(m) = membership {
        q.execute(params![LAST_MEMBERSHIP, json(m)])?;
    }
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
        let opts = |name, connections| DbOptions {
            name,
            connections,
            synchronous: "NORMAL",
            exclusive: false,
        };
        let writer = Db::open(path, opts("state-write", 1), |c| {
            c.execute_batch(SCHEMA)?;
            c.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT)
        })
        .await?;
        let readers = Db::open(path, opts("state-read", 2), |_| Ok(())).await?;
        let checkpointer = Db::open(path, opts("state-ckpt", 1), |_| Ok(())).await?;
        let (last, _) = writer.call(|c| read_applied(c)).await?;
        let snapshots = SnapshotDir::open(&snapshot_dir(path))
            .await
            .map_err(|e| Error::Snapshot(format!("opening the snapshot folder: {e}")))?;
        let last = last.map(|l| l.index).unwrap_or(0);
        let (applied, applied_rx) = watch::channel(last);
        let writes = Arc::new(OpenWrites::default());
        let checkpointer_running = checkpointer.running();
        tokio::spawn(run_checkpoints(
            checkpointer,
            writer.clone(),
            Arc::clone(&writes),
            applied_rx,
        ));
        Ok(Self {
            writer,
            readers,
            writes,
            applied,
            ca_changed: watch::channel(last).0,
            snapshots: Arc::new(snapshots),
            snapshot_activity: watch::channel(SnapshotActivity::default()).0,
            checkpointer: checkpointer_running,
        })
    }

    /// Closes the store: returns once every database connection has closed, so nothing
    /// writes the database file any more. Only returns after every clone of this state
    /// machine is gone (the checkpointing task ends at its next tick after that).
    pub async fn close(self) {
        let running = [
            self.writer.running(),
            self.readers.running(),
            self.checkpointer.clone(),
        ];
        drop(self);
        for r in running {
            r.ended().await;
        }
    }

    /// Index of the last applied log entry (0 before any).
    pub fn last_applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Notifies on every applied batch of entries (the value is the last applied index).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Notifies when an applied command changed the CA journal or the rotation requests, or
    /// a snapshot was installed (the value is that log index). Other commands (entries,
    /// agents, tokens) do not wake it.
    pub fn subscribe_ca(&self) -> watch::Receiver<u64> {
        self.ca_changed.subscribe()
    }

    /// Notifies when a snapshot was built or installed.
    pub fn subscribe_snapshots(&self) -> watch::Receiver<SnapshotActivity> {
        self.snapshot_activity.subscribe()
    }

    /// Records a snapshot built (or, with `installed`, installed) in `took`.
    pub(crate) fn note_snapshot(&self, installed: bool, took: Duration) {
        self.snapshot_activity.send_modify(|a| {
            if installed {
                a.installed += 1;
                a.last_install = took;
            } else {
                a.built += 1;
                a.last_build = took;
            }
        });
    }

    /// The last applied log ID and the last applied membership, as stored.
    pub async fn applied_state(&self) -> Result<(Option<LogId>, StoredMembership)> {
        self.writer.call(|c| read_applied(c)).await
    }

    /// Applies `cmd` at log `index` (single-node use, see [`crate::LocalProposer`]). An index
    /// at or below the last applied one is skipped (replay), returning `Response::Ok`.
    pub async fn apply(&self, index: u64, cmd: &Command) -> Result<Response> {
        let entry = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(0, 0), index),
            payload: EntryPayload::Normal(cmd.clone()),
        };
        let mut out = self.apply_entries(vec![entry]).await?;
        self.commit_applied().await?;
        Ok(out.pop().unwrap_or(Response::Ok))
    }

    /// Applies log entries in order, in one savepoint of the writer's open transaction that
    /// also records the last applied log ID and membership (committed in a group, see the
    /// module docs). Entries at or below the last applied index are skipped
    /// (replay) and answered `Response::Ok`; blank and membership entries are answered
    /// `Response::Ok` too. One response per entry.
    pub async fn apply_entries(&self, entries: Vec<Entry>) -> Result<Vec<Response>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let ca_change = entries
            .iter()
            .rev()
            .find(|e| matches!(&e.payload, EntryPayload::Normal(c) if c.changes_ca_journal()))
            .map(|e| e.log_id.index);
        let here = command_count(&entries) <= APPLY_HERE_MAX;
        let writes = Arc::clone(&self.writes);
        let job = move |conn: &mut Connection| apply_batch(conn, entries, &writes);
        let (out, applied) = if here {
            self.writer.call_here(job).await?
        } else {
            self.writer.call(job).await?
        };
        if let Some(last) = applied {
            self.applied.send_replace(last.index);
        }
        if let Some(i) = ca_change {
            self.ca_changed.send_replace(i);
        }
        Ok(out)
    }

    /// Commits every applied batch still waiting in the writer's open transaction, so that
    /// other connections (readers, snapshot copies, backups) see them. Cheap when there is
    /// none.
    pub async fn commit_applied(&self) -> Result<()> {
        self.writes.commit_on(&self.writer).await
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
            .ok_or_else(|| Error::Snapshot(format!("non-UTF-8 path {}", tmp.display())))?
            .to_owned();
        // A consistent copy, read on a reader (after what is applied is committed): applies
        // go on meanwhile. What the copy holds is read from the copy itself.
        let (last, membership) = self
            .read(move |conn| {
                conn.execute("VACUUM INTO ?", [&tmp_str])?;
                let copy = Connection::open_with_flags(
                    format!("file:{tmp_str}?immutable=1"),
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_URI,
                )?;
                read_applied(&copy)
            })
            .await?;
        // Everything the copy holds on disk here too before the log below it may be purged:
        // a FULL checkpoint syncs the WAL and the database. On the writer: applies wait.
        // A checkpoint cannot run inside a transaction: what was applied since the copy is
        // committed first.
        let writes = Arc::clone(&self.writes);
        self.writer
            .call(move |conn| {
                writes.commit(conn)?;
                conn.query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(()))?;
                Ok(())
            })
            .await?;
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
            self.ca_changed.send_replace(l.index);
        }
        Ok(())
    }

    async fn install_from(&self, meta: &SnapshotMeta, path: &Path) -> Result<()> {
        let path_str = path
            .to_str()
            .ok_or_else(|| Error::Snapshot(format!("non-UTF-8 path {}", path.display())))?
            .to_owned();
        let meta = meta.clone();
        let writes = Arc::clone(&self.writes);
        self.writer
            .call(move |conn| {
                // ATTACH needs no open transaction; what it replaces is committed first.
                writes.commit(conn)?;
                // The installed state is on disk when the install returns: openraft then
                // purges the log it replaces.
                conn.pragma_update(None, "synchronous", "FULL")?;
                let res = conn
                    .execute("ATTACH DATABASE ? AS snap", [&path_str])
                    .map_err(Error::from)
                    .and_then(|_| {
                        let res = copy_from_attached(conn, &meta);
                        let detached = conn.execute("DETACH DATABASE snap", []);
                        res.and(detached.map(|_| ()).map_err(Error::from))
                    });
                let normal = conn.pragma_update(None, "synchronous", "NORMAL");
                res?;
                normal?;
                Ok(())
            })
            .await
    }

    // ---- reads ----

    /// Runs `f` on a reader connection.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        // Every write answered so far is visible to the reader.
        self.commit_applied().await?;
        self.readers.call(move |c| f(c)).await
    }

    /// One entry.
    pub async fn entry(&self, id: &str) -> Result<Option<EntryRecord>> {
        let id = id.to_owned();
        self.read(move |c| {
            query_one(
                c,
                "SELECT * FROM entries WHERE id = ?",
                [id],
                entry_from_row,
            )
        })
        .await
    }

    /// All entries, ordered by SPIFFE ID.
    pub async fn entries(&self) -> Result<Vec<EntryRecord>> {
        self.entries_page("", "", None, None).await
    }

    /// One page of entries, ordered by SPIFFE ID then ID: those with the given SPIFFE ID and
    /// parent ID (empty: any) that come after `after` (a SPIFFE ID and ID), at most `limit`
    /// (None: all).
    pub async fn entries_page(
        &self,
        spiffe_id: &str,
        parent_id: &str,
        after: Option<(String, String)>,
        limit: Option<usize>,
    ) -> Result<Vec<EntryRecord>> {
        let (spiffe_id, parent_id) = (spiffe_id.to_owned(), parent_id.to_owned());
        let (after_spiffe, after_id) = after.unwrap_or_default();
        let limit = limit.map(|l| l.min(i64::MAX as usize) as i64).unwrap_or(-1);
        self.read(move |c| {
            query_all(
                c,
                "SELECT * FROM entries
                 WHERE (?1 = '' OR spiffe_id = ?1) AND (?2 = '' OR parent_id = ?2)
                   AND (spiffe_id, id) > (?3, ?4)
                 ORDER BY spiffe_id, id LIMIT ?5",
                params![spiffe_id, parent_id, after_spiffe, after_id, limit],
                entry_from_row,
            )
        })
        .await
    }

    /// One page of agents, ordered by SPIFFE ID: those after `after`, at most `limit`
    /// (None: all).
    pub async fn agents_page(
        &self,
        after: Option<String>,
        limit: Option<usize>,
    ) -> Result<Vec<AgentRecord>> {
        let after = after.unwrap_or_default();
        let limit = limit.map(|l| l.min(i64::MAX as usize) as i64).unwrap_or(-1);
        self.read(move |c| {
            query_all(
                c,
                "SELECT * FROM agents WHERE spiffe_id > ? ORDER BY spiffe_id LIMIT ?",
                params![after, limit],
                agent_from_row,
            )
        })
        .await
    }

    /// Entries directly under `parent_id`.
    pub async fn entries_by_parent(&self, parent_id: &str) -> Result<Vec<EntryRecord>> {
        let parent_id = parent_id.to_owned();
        self.read(move |c| {
            query_all(
                c,
                "SELECT * FROM entries WHERE parent_id = ? ORDER BY id",
                [parent_id],
                entry_from_row,
            )
        })
        .await
    }

    /// Entries an agent is authorized for: those whose parent is the agent, and, transitively,
    /// those whose parent is the SPIFFE ID of an authorized entry.
    pub async fn authorized_entries(&self, agent_id: &str) -> Result<Vec<EntryRecord>> {
        let agent_id = agent_id.to_owned();
        // One recursive query (not one per parent): this runs on every SVID request. UNION
        // (not UNION ALL) drops repeats, so cycles of entries end the recursion.
        self.read(move |c| {
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
        })
        .await
    }

    /// One join token.
    pub async fn join_token(&self, token: &str) -> Result<Option<JoinTokenRecord>> {
        let token = token.to_owned();
        self.read(move |c| {
            query_one(
                c,
                "SELECT * FROM join_tokens WHERE token = ?",
                [token],
                |r| {
                    Ok(JoinTokenRecord {
                        token: r.get("token")?,
                        spiffe_id: r.get("spiffe_id")?,
                        expires_at: r.get("expires_at")?,
                        used_at: r.get("used_at")?,
                    })
                },
            )
        })
        .await
    }

    /// One agent.
    pub async fn agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>> {
        let spiffe_id = spiffe_id.to_owned();
        self.read(move |c| get_agent(c, &spiffe_id)).await
    }

    /// All agents.
    pub async fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.agents_page(None, None).await
    }

    /// The log index of the last change to the CA journal: the trust bundle's sequence number.
    pub async fn authorities_version(&self) -> Result<i64> {
        self.read(|c| {
            Ok(
                c.prepare_cached("SELECT COALESCE(MAX(updated), 0) FROM authorities")?
                    .query_row([], |r| r.get(0))?,
            )
        })
        .await
    }

    /// Rotation requests (at most one per kind and node).
    pub async fn rotation_requests(&self) -> Result<Vec<RotationRequest>> {
        self.read(|c| {
            query_all(
                c,
                "SELECT * FROM rotation_requests ORDER BY kind, node_id",
                [],
                |r| {
                    let kind: String = r.get("kind")?;
                    Ok(RotationRequest {
                        kind: AuthorityKind::parse(&kind)
                            .ok_or_else(|| corrupt(format!("rotation request kind {kind}")))?,
                        node_id: r.get("node_id")?,
                        requested_at: r.get("requested_at")?,
                        replaces: r.get("replaces")?,
                    })
                },
            )
        })
        .await
    }

    /// The CA journal, oldest first.
    pub async fn authorities(&self) -> Result<Vec<AuthorityRecord>> {
        self.read(|c| {
            query_all(
                c,
                "SELECT * FROM authorities ORDER BY seq",
                [],
                authority_from_row,
            )
        })
        .await
    }
}

/// Applies `entries` (see [`StateMachine::apply_entries`]) in the writer's open transaction
/// (opening one if needed), inside a savepoint of their own, and commits the transaction when
/// it is old or big enough (see the module docs). Returns the responses and the last log ID
/// applied (None if all were replays).
fn apply_batch(
    conn: &mut Connection,
    entries: Vec<Entry>,
    writes: &OpenWrites,
) -> Result<(Vec<Response>, Option<LogId>)> {
    writes.check()?;
    if conn.is_autocommit() {
        // IMMEDIATE: the write lock is taken before the first read, so nothing can make
        // the later write fail with SQLITE_BUSY, which would stop the Raft core.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        *lock(&writes.open) = Some((Instant::now(), 0));
    }
    let commands = command_count(&entries);
    writes.control(conn, "SAVEPOINT apply_batch")?;
    let mut savepoint = BatchSavepoint { conn, done: false };
    let res = apply_in_savepoint(savepoint.conn, entries);
    match res {
        Ok(done) => {
            savepoint.done = true;
            drop(savepoint);
            writes.control(conn, "RELEASE apply_batch")?;
            let due = {
                let mut open = lock(&writes.open);
                let (since, n) = open.get_or_insert((Instant::now(), 0));
                *n += commands;
                since.elapsed() >= COMMIT_AFTER || *n >= COMMIT_AFTER_COMMANDS
            };
            if due {
                writes.commit(conn)?;
            }
            Ok(done)
        }
        Err(e) => {
            // Rolled back to before this batch; what was applied before it stays, and is
            // committed now.
            drop(savepoint);
            writes.commit(conn)?;
            Err(e)
        }
    }
}

fn apply_in_savepoint(
    tx: &Connection,
    entries: Vec<Entry>,
) -> Result<(Vec<Response>, Option<LogId>)> {
    let (last, _) = read_applied(tx)?;
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
            EntryPayload::Normal(cmd) => apply_in(tx, &cmd, index)?,
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
        write_applied(tx, last, membership.as_ref())?;
    }
    Ok((out, applied))
}

fn snapshot_dir(state_path: &Path) -> PathBuf {
    state_path.with_extension("snapshots")
}

fn snap_err(e: std::io::Error) -> Error {
    Error::Snapshot(e.to_string())
}

/// Replaces every table of `main` with the same table of the attached `snap` database (the
/// columns both have), then records `meta` as the applied state. One transaction.
fn copy_from_attached(conn: &mut Connection, meta: &SnapshotMeta) -> Result<()> {
    let check: String = conn.query_row("PRAGMA snap.quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(Error::Snapshot(format!(
            "received snapshot is damaged: {check}"
        )));
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let names = |sql: &str, arg: Option<&str>| -> Result<Vec<String>> {
        match arg {
            Some(a) => query_all(&tx, sql, [a], |r| Ok(r.get(0)?)),
            None => query_all(&tx, sql, [], |r| Ok(r.get(0)?)),
        }
    };
    let tables = names(
        "SELECT name FROM main.sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        None,
    )?;
    for t in &tables {
        let cols = names(
            "SELECT name FROM pragma_table_info(?, 'main') ORDER BY cid",
            Some(t),
        )?;
        let snap_cols = names(
            "SELECT name FROM pragma_table_info(?, 'snap') ORDER BY cid",
            Some(t),
        )?;
        tx.execute(&format!("DELETE FROM main.{}", ident(t)), [])?;
        let common: Vec<String> = cols
            .iter()
            .filter(|c| snap_cols.contains(c))
            .map(|c| ident(c))
            .collect();
        if !common.is_empty() {
            let list = common.join(", ");
            tx.execute(
                &format!(
                    "INSERT INTO main.{t} ({list}) SELECT {list} FROM snap.{t}",
                    t = ident(t)
                ),
                [],
            )?;
        }
    }
    // The snapshot's metadata is the authority on what it holds.
    tx.execute("DELETE FROM raft_meta", [])?;
    match &meta.last_log_id {
        Some(last) => write_applied(&tx, last, Some(&meta.last_membership))?,
        None => {
            tx.execute("DELETE FROM meta WHERE key = 'last_applied'", [])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Quotes an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialize")
}

fn from_json<T: serde::de::DeserializeOwned>(r: &Row<'_>, col: &str) -> Result<T> {
    serde_json::from_str(r.get_ref(col)?.as_str()?).map_err(corrupt)
}

fn entry_from_row(r: &Row<'_>) -> Result<EntryRecord> {
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

fn agent_from_row(r: &Row<'_>) -> Result<AgentRecord> {
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

fn authority_from_row(r: &Row<'_>) -> Result<AuthorityRecord> {
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

fn upsert_entry(tx: &Connection, e: &EntryRecord) -> Result<()> {
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

fn get_agent(conn: &Connection, id: &str) -> Result<Option<AgentRecord>> {
    query_one(
        conn,
        "SELECT * FROM agents WHERE spiffe_id = ?",
        [id],
        agent_from_row,
    )
}

/// The state of authority `id`, if it exists.
/// What the lifecycle rules of an authority need to know.
struct Life {
    kind: AuthorityKind,
    state: AuthorityState,
    not_after: i64,
}

fn authority_life(conn: &Connection, id: &str) -> Result<Option<Life>> {
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

fn authority_state(conn: &Connection, id: &str) -> Result<Option<AuthorityState>> {
    let state: Option<String> = query_one(
        conn,
        "SELECT state FROM authorities WHERE id = ?",
        [id],
        |r| Ok(r.get(0)?),
    )?;
    Ok(state.and_then(|s| AuthorityState::parse(&s)))
}

/// The attestation type of a ca-node's identity, issued by `ca-node join`.
pub const CA_NODE_JOIN: &str = "ca_node_join";

/// Whether `spiffe_id` is a ca-node's, `spiffe://TD/ca-node/<node id>`.
pub fn is_ca_node_id(spiffe_id: &str) -> bool {
    spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, path)| path.starts_with("ca-node/"))
}

fn upsert_agent(tx: &Connection, a: &AgentRecord) -> Result<()> {
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

/// Runs a one-statement change; the number of rows it changed.
fn change(tx: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<usize> {
    Ok(tx.prepare_cached(sql)?.execute(params)?)
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

fn not_found_unless_changed(n: usize, message: impl FnOnce() -> String) -> Response {
    if n == 0 {
        rejected(RejectCode::NotFound, message())
    } else {
        Response::Ok
    }
}

fn apply_in(tx: &Connection, cmd: &Command, index: u64) -> Result<Response> {
    Ok(match cmd {
        Command::Batch { commands } => Response::Batch(
            commands
                .iter()
                .map(|c| {
                    if c.batchable() {
                        apply_in(tx, c, index)
                    } else {
                        Ok(rejected(
                            RejectCode::FailedPrecondition,
                            "this command cannot be part of a batch",
                        ))
                    }
                })
                .collect::<Result<_>>()?,
        ),
        Command::CreateEntry { entry } => {
            // The same ID, or the same SPIFFE ID, parent and selectors: one lookup.
            let clash = query_one(
                tx,
                "SELECT * FROM entries WHERE id = ?1 OR (spiffe_id = ?2 AND parent_id = ?3 AND selectors = ?4) ORDER BY id = ?1 DESC LIMIT 1",
                params![entry.id, entry.spiffe_id, entry.parent_id, json(&entry.selectors)],
                entry_from_row,
            )?;
            match clash {
                // A retried create (the ID is new for every request): the same answer.
                Some(existing) if existing == *entry => return Ok(Response::Entry(existing)),
                Some(existing) if existing.id == entry.id => {
                    return Ok(rejected(
                        RejectCode::AlreadyExists,
                        format!("entry {} exists", entry.id),
                    ))
                }
                Some(existing) => return Ok(duplicate(&existing.id)),
                None => {}
            }
            upsert_entry(tx, entry)?;
            Response::Entry(entry.clone())
        }
        Command::UpdateEntry { entry } => {
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
            Response::Entry(e)
        }
        Command::DeleteEntry { id } => {
            let n = change(tx, "DELETE FROM entries WHERE id = ?", [id])?;
            not_found_unless_changed(n, || format!("no entry with ID {id}"))
        }
        Command::CreateJoinToken { token } => {
            let n = change(
                tx,
                "INSERT OR IGNORE INTO join_tokens(token, spiffe_id, expires_at, used_at) VALUES (?,?,?,NULL)",
                params![token.token, token.spiffe_id, token.expires_at],
            )?;
            if n == 0 {
                rejected(RejectCode::AlreadyExists, "that join token exists")
            } else {
                Response::Ok
            }
        }
        Command::AttestWithJoinToken { token, now, agent } => {
            let row = query_one(
                tx,
                "SELECT expires_at, used_at, spiffe_id FROM join_tokens WHERE token = ?",
                [token],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )?;
            let Some((expires_at, used_at, token_id)) = row else {
                return Ok(rejected(RejectCode::NotFound, "unknown join token"));
            };
            if used_at.is_some() {
                return Ok(rejected(
                    RejectCode::FailedPrecondition,
                    "join token already used; generate a new one with `ca-node token generate`",
                ));
            }
            if expires_at <= *now {
                return Ok(rejected(
                    RejectCode::FailedPrecondition,
                    "join token expired; generate a new one with `ca-node token generate`",
                ));
            }
            // Two kinds of token: one for a ca-node (`spiffe://TD/ca-node/<id>`, redeemed
            // only by `ca-node join`) and one for an agent; neither is redeemed as the other.
            let node_token = is_ca_node_id(&token_id);
            if node_token != (agent.attestation_type == CA_NODE_JOIN) {
                return Ok(rejected(
                    RejectCode::PermissionDenied,
                    if node_token {
                        "this join token is for a ca-node (`ca-node join`), not for an agent"
                    } else {
                        "this join token is for an agent, not for a ca-node"
                    },
                ));
            }
            if agent.spiffe_id != token_id {
                return Ok(rejected(
                    RejectCode::PermissionDenied,
                    format!(
                        "this join token is for {token_id}, not for {}",
                        agent.spiffe_id
                    ),
                ));
            }
            if let Some(existing) = get_agent(tx, &agent.spiffe_id)? {
                if existing.banned {
                    return Ok(rejected(
                        RejectCode::PermissionDenied,
                        format!("agent {} is banned", agent.spiffe_id),
                    ));
                }
            }
            change(
                tx,
                "UPDATE join_tokens SET used_at = ? WHERE token = ?",
                params![now, token],
            )?;
            upsert_agent(tx, agent)?;
            Response::Agent(agent.clone())
        }
        Command::RegisterAgent { agent } => {
            if let Some(existing) = get_agent(tx, &agent.spiffe_id)? {
                if existing.banned {
                    return Ok(rejected(
                        RejectCode::PermissionDenied,
                        format!("agent {} is banned", agent.spiffe_id),
                    ));
                }
            }
            upsert_agent(tx, agent)?;
            Response::Agent(agent.clone())
        }
        Command::RenewAgent {
            spiffe_id,
            serial,
            expires_at,
            caller_serial,
        } => {
            let Some(mut a) = get_agent(tx, spiffe_id)? else {
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
            upsert_agent(tx, &a)?;
            Response::Agent(a)
        }
        Command::EvictAgent { spiffe_id } => {
            let n = change(tx, "DELETE FROM agents WHERE spiffe_id = ?", [spiffe_id])?;
            not_found_unless_changed(n, || format!("no agent {spiffe_id}"))
        }
        Command::BanAgent { spiffe_id } => {
            let Some(mut a) = get_agent(tx, spiffe_id)? else {
                return Ok(rejected(
                    RejectCode::NotFound,
                    format!("no agent {spiffe_id}"),
                ));
            };
            a.banned = true;
            upsert_agent(tx, &a)?;
            Response::Agent(a)
        }
        Command::PutAuthority { authority: a } => {
            if authority_state(tx, &a.id)? == Some(AuthorityState::Revoked) {
                return Ok(rejected(
                    RejectCode::FailedPrecondition,
                    format!("authority {} is revoked; revocation is final", a.id),
                ));
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
            Response::Ok
        }
        Command::KeyDestroyed { id, at } => {
            let Some(a) = authority_life(tx, id)? else {
                return Ok(rejected(RejectCode::NotFound, format!("no authority {id}")));
            };
            let due = match a.state {
                AuthorityState::Revoked => true,
                AuthorityState::Retired => a.not_after < *at,
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
            Response::Ok
        }
        Command::RequestRotation { request: r } => {
            change(
                tx,
                "INSERT OR REPLACE INTO rotation_requests(kind, node_id, requested_at, replaces) VALUES (?,?,?,?)",
                params![r.kind.as_str(), r.node_id, r.requested_at, r.replaces],
            )?;
            Response::Ok
        }
        Command::SetAuthorityState { id, state, at } => {
            let Some(a) = authority_life(tx, id)? else {
                return Ok(rejected(RejectCode::NotFound, format!("no authority {id}")));
            };
            if *state != AuthorityState::Revoked && a.state == AuthorityState::Revoked {
                return Ok(rejected(
                    RejectCode::FailedPrecondition,
                    format!("authority {id} is revoked; revocation is final"),
                ));
            }
            if *state == AuthorityState::Active && a.not_after <= *at {
                return Ok(rejected(
                    RejectCode::FailedPrecondition,
                    format!(
                        "authority {id} expired at {} and cannot be activated at {at}",
                        a.not_after
                    ),
                ));
            }
            if *state == AuthorityState::Retired
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
            not_found_unless_changed(n, || format!("no authority {id}"))
        }
    })
}
