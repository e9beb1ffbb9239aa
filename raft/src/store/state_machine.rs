//! The state machine: applies log entries to SQLite, each batch of entries together with
//! the ID of the last applied entry and the last membership (so a replay after
//! a crash is idempotent and openraft finds its applied state where the data is).
//!
//! One connection, on its own thread, writes: a whole applied batch is one job there
//! (`crate::store::db`), except that a few commands ([`APPLY_HERE_MAX`]) are applied on the
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
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ca_state::index::{entry_changes, EntryChange, EntryIndex};
use ca_state::{query, schema, AgentRecord, AuthorityRecord, Command, EntryRecord};
use ca_state::{JoinTokenRecord, Response, RotationRequest};
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{broadcast, watch};

use crate::snapshot::SnapshotFile;
use crate::store::db::{lock, Db, DbOptions, Running};
use crate::store::snapshot_dir::SnapshotDir;
use crate::types::{Entry, EntryPayload, LogId, SnapshotMeta, StoredMembership};
use crate::{Error, Result};
use ca_state::schema::query_all;

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

/// Replication value ([`ca_state::schema`]) holding the last applied log ID (JSON).
const LAST_APPLIED: &str = "last_applied_log_id";
/// Replication value holding the last applied membership (JSON).
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
    /// The entries in memory, current with every apply ([`StateMachine::entries`]).
    entries: Arc<RwLock<EntryIndex>>,
    /// Index of the last applied change to the entries.
    entries_changed: watch::Sender<u64>,
    /// Agents whose credentials were withdrawn or replaced ([`Command::agents_withdrawn`]).
    agents_withdrawn: broadcast::Sender<String>,
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

/// Agent events a slow receiver of [`StateMachine::subscribe_agents_withdrawn`] may be
/// behind by before it lags.
const AGENT_EVENTS: usize = 4096;

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

/// The applied state as stored: last applied log ID and last membership.
pub(crate) type AppliedState = (Option<LogId>, StoredMembership);

fn read_applied(conn: &Connection) -> Result<AppliedState> {
    let mut last = None;
    let mut membership = StoredMembership::default();
    for (key, value) in schema::replication_values(conn)? {
        match key.as_str() {
            LAST_APPLIED => last = serde_json::from_str(&value).map_err(corrupt)?,
            LAST_MEMBERSHIP => membership = serde_json::from_str(&value).map_err(corrupt)?,
            _ => {}
        }
    }
    Ok((last, membership))
}

/// Records the applied position beside the data: openraft's log ID and membership, and the
/// index for readers of the state that do not know openraft (backups).
fn write_applied(
    conn: &Connection,
    last: &LogId,
    membership: Option<&StoredMembership>,
) -> Result<()> {
    schema::set_replication_value(conn, LAST_APPLIED, &json(last))?;
    if let Some(m) = membership {
        schema::set_replication_value(conn, LAST_MEMBERSHIP, &json(m))?;
    }
    schema::set_applied_index(conn, Some(last.index))?;
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
            c.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT)
        })
        .await?;
        let readers = Db::open(path, opts("state-read", 2), |_| Ok(())).await?;
        let checkpointer = Db::open(path, opts("state-ckpt", 1), |_| Ok(())).await?;
        let (last, entries) = writer
            .call(|c| {
                schema::create(c)?;
                let (last, _) = read_applied(c)?;
                Ok::<_, Error>((last, query::entries(c)?))
            })
            .await?;
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
            entries: Arc::new(RwLock::new(EntryIndex::new(entries, last))),
            entries_changed: watch::channel(last).0,
            agents_withdrawn: broadcast::channel(AGENT_EVENTS).0,
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
        let AppliedBatch {
            responses: out,
            last: applied,
            entry_changes: changes,
            agents_withdrawn,
        } = if here {
            self.writer.call_here(job).await?
        } else {
            self.writer.call(job).await?
        };
        if let Some(&(last_change, _)) = changes.last() {
            let mut index = self.entries.write().unwrap_or_else(|e| e.into_inner());
            for (at, c) in &changes {
                index.apply(*at, c);
            }
            drop(index);
            self.entries_changed.send_replace(last_change);
        }
        for id in agents_withdrawn {
            let _ = self.agents_withdrawn.send(id);
        }
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
        let at = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        let entries = self.read(query::entries).await?;
        *self.entries.write().unwrap_or_else(|e| e.into_inner()) = EntryIndex::new(entries, at);
        self.entries_changed.send_replace(at);
        // The whole state changed: every agent's credentials are to be checked again.
        let _ = self.agents_withdrawn.send(String::new());
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
    async fn read<T: Send + 'static, E: Into<Error>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T> {
        // Every write answered so far is visible to the reader.
        self.commit_applied().await?;
        self.readers.call(move |c| f(c).map_err(Into::into)).await
    }

    /// One entry.
    pub async fn entry(&self, id: &str) -> Result<Option<EntryRecord>> {
        let id = id.to_owned();
        self.read(move |c| query::entry(c, &id)).await
    }

    /// All entries, ordered by SPIFFE ID.
    pub async fn entries(&self) -> Result<Vec<EntryRecord>> {
        self.entries_page("", "", None, None).await
    }

    /// One page of entries ([`query::entries_page`]).
    pub async fn entries_page(
        &self,
        spiffe_id: &str,
        parent_id: &str,
        after: Option<(String, String)>,
        limit: Option<usize>,
    ) -> Result<Vec<EntryRecord>> {
        let (spiffe_id, parent_id) = (spiffe_id.to_owned(), parent_id.to_owned());
        self.read(move |c| {
            let after = after.as_ref().map(|(s, i)| (s.as_str(), i.as_str()));
            query::entries_page(c, &spiffe_id, &parent_id, after, limit)
        })
        .await
    }

    /// One page of agents ([`query::agents_page`]).
    pub async fn agents_page(
        &self,
        after: Option<String>,
        limit: Option<usize>,
    ) -> Result<Vec<AgentRecord>> {
        self.read(move |c| query::agents_page(c, after.as_deref(), limit))
            .await
    }

    /// Entries directly under `parent_id`.
    pub async fn entries_by_parent(&self, parent_id: &str) -> Result<Vec<EntryRecord>> {
        let parent_id = parent_id.to_owned();
        self.read(move |c| query::entries_by_parent(c, &parent_id))
            .await
    }

    /// Reads the entries in memory, current with every apply (never waits on the database).
    /// `f` must not block: appliers wait for it.
    pub fn entries_index<T>(&self, f: impl FnOnce(&EntryIndex) -> T) -> T {
        f(&self.entries.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Changes to the log index of the last applied change to the entries (and to the
    /// installed snapshot's index when one replaces the state).
    pub fn subscribe_entries(&self) -> watch::Receiver<u64> {
        self.entries_changed.subscribe()
    }

    /// Agents whose credentials were withdrawn or replaced as they are applied (eviction,
    /// ban, a new attestation under the ID); an empty ID after a snapshot replaced the whole
    /// state. A receiver that lags, or gets the empty ID, must check every agent it cares
    /// about again.
    pub fn subscribe_agents_withdrawn(&self) -> broadcast::Receiver<String> {
        self.agents_withdrawn.subscribe()
    }

    /// The entries an agent is authorized for, from the index in memory.
    pub fn authorized(&self, agent_id: &str) -> Vec<Arc<EntryRecord>> {
        self.entries_index(|i| i.authorized(agent_id))
    }

    /// Entries an agent is authorized for, read from the database
    /// ([`query::authorized_entries`]; the index answers the same, see [`Self::authorized`]).
    pub async fn authorized_entries(&self, agent_id: &str) -> Result<Vec<EntryRecord>> {
        let agent_id = agent_id.to_owned();
        self.read(move |c| query::authorized_entries(c, &agent_id))
            .await
    }

    /// One join token.
    pub async fn join_token(&self, token: &str) -> Result<Option<JoinTokenRecord>> {
        let token = token.to_owned();
        self.read(move |c| query::join_token(c, &token)).await
    }

    /// One agent.
    pub async fn agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>> {
        let spiffe_id = spiffe_id.to_owned();
        self.read(move |c| query::agent(c, &spiffe_id)).await
    }

    /// All agents.
    pub async fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.agents_page(None, None).await
    }

    /// The log index of the last change to the CA journal: the trust bundle's sequence number.
    pub async fn authorities_version(&self) -> Result<i64> {
        self.read(query::authorities_version).await
    }

    /// Rotation requests (at most one per kind and node).
    pub async fn rotation_requests(&self) -> Result<Vec<RotationRequest>> {
        self.read(query::rotation_requests).await
    }

    /// The CA journal, oldest first.
    pub async fn authorities(&self) -> Result<Vec<AuthorityRecord>> {
        self.read(query::authorities).await
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
) -> Result<AppliedBatch> {
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

/// What applying a batch gave.
struct AppliedBatch {
    /// One response per log entry.
    responses: Vec<Response>,
    /// The last log ID applied (None if all were replays).
    last: Option<LogId>,
    /// The entry changes, per log index.
    entry_changes: Vec<(u64, Vec<EntryChange>)>,
    /// Agents whose credentials were withdrawn or replaced.
    agents_withdrawn: Vec<String>,
}

fn apply_in_savepoint(tx: &Connection, entries: Vec<Entry>) -> Result<AppliedBatch> {
    let (last, _) = read_applied(tx)?;
    let mut next_index = last.map(|l| l.index + 1).unwrap_or(0);
    let mut applied: Option<LogId> = None;
    let mut membership: Option<StoredMembership> = None;
    let mut out = Vec::with_capacity(entries.len());
    let mut changes = Vec::new();
    let mut agents_withdrawn = Vec::new();
    for e in entries {
        let index = e.log_id.index;
        if index < next_index {
            out.push(Response::Ok);
            continue;
        }
        let resp = match e.payload {
            EntryPayload::Blank => Response::Ok,
            EntryPayload::Normal(cmd) => {
                let resp = ca_state::apply(tx, &cmd, index)?;
                let changed = entry_changes(&cmd, &resp);
                if !changed.is_empty() {
                    changes.push((index, changed));
                }
                agents_withdrawn.extend(cmd.agents_withdrawn().into_iter().map(str::to_owned));
                resp
            }
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
    Ok(AppliedBatch {
        responses: out,
        last: applied,
        entry_changes: changes,
        agents_withdrawn,
    })
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
    schema::clear_replication_values(&tx)?;
    match &meta.last_log_id {
        Some(last) => write_applied(&tx, last, Some(&meta.last_membership))?,
        None => schema::set_applied_index(&tx, None)?,
    }
    tx.commit()?;
    Ok(())
}

/// Quotes an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("log IDs and memberships serialize")
}
