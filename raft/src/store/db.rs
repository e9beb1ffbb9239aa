//! SQLite connections owned by their own threads.
//!
//! A [`Db`] is one or more threads, each with its own synchronous `rusqlite` connection to
//! the same database file, taking jobs from one queue. A job is a closure that runs with a
//! connection and whose result comes back through a oneshot channel: however many
//! statements a job runs (a whole batch of log entries, a whole applied batch in one
//! transaction), it costs the async caller one hand-off to the thread and one back. (An
//! async driver pays that hand-off per statement and per row, which made thread switching
//! the largest cost of a replicated write.)
//!
//! A job short enough not to hold up an async runtime worker can also run on the caller's
//! own thread ([`Db::call_here`]), which saves the two hand-offs when they would cost more
//! than the job.
//!
//! The threads end, and their connections close, when the last clone of the [`Db`] is
//! dropped; [`Db::close`] also waits for that.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::{Error, Result};

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// How a [`Db`]'s connections are opened.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DbOptions {
    /// Thread name prefix (shown by `top -H`, profilers, panics).
    pub name: &'static str,
    /// How many connections (threads) take jobs.
    pub connections: usize,
    /// `PRAGMA synchronous`: `"FULL"` or `"NORMAL"`.
    pub synchronous: &'static str,
    /// `PRAGMA locking_mode=EXCLUSIVE`: the one connection keeps its file locks instead of
    /// taking and dropping them (several `fcntl` calls) around every transaction, and keeps
    /// the WAL index in its own memory. Only for a database with a single connection and
    /// no other reader: anyone else gets "database is locked".
    pub exclusive: bool,
}

/// Connections to one SQLite database, each on its own thread; see the module docs.
#[derive(Clone, Debug)]
pub(crate) struct Db {
    jobs: mpsc::Sender<Job>,
    /// The first connection, which its thread locks while it runs a job.
    first: Arc<Mutex<Connection>>,
    /// Each thread holds one permit until its connection has closed.
    running: Running,
}

/// Waits for the threads of a [`Db`] to end ([`Running::ended`]).
#[derive(Clone, Debug)]
pub(crate) struct Running {
    permits: Arc<tokio::sync::Semaphore>,
    threads: u32,
}

impl Running {
    /// Returns once every thread has ended and closed its connection (so the database
    /// file is no longer written by them): only after every clone of the [`Db`] is gone.
    pub(crate) async fn ended(self) {
        // Never closed, so this fails only if never acquirable; either way, done waiting.
        let _ = self.permits.acquire_many(self.threads).await;
    }
}

/// How long a connection waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

fn open_connection(path: &Path, opts: &DbOptions) -> Result<Connection> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    if opts.exclusive {
        // Before the first access in WAL mode, so that SQLite never maps the shared WAL index.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    }
    // WAL: readers never wait for the writer; a commit appends to the WAL.
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Io(format!(
            "{}: journal mode {mode}, not WAL",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", opts.synchronous)?;
    // Pages kept in the connection's own cache (negative: KiB), up to 32 MiB. SQLite's
    // default, 2 MiB, holds too little of a busy index: every write would read its pages
    // back from the OS.
    conn.pragma_update(None, "cache_size", -32768)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl Db {
    /// Opens `opts.connections` connections to `path` (the first one creates the file) and
    /// runs `init` on the first before any job (schema creation), off the async runtime.
    pub(crate) async fn open(
        path: &Path,
        opts: DbOptions,
        init: impl FnOnce(&mut Connection) -> rusqlite::Result<()> + Send + 'static,
    ) -> Result<Self> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(&path, opts, init))
            .await
            .map_err(|e| Error::Io(format!("opening {}: {e}", opts.name)))?
    }

    fn open_blocking(
        path: &Path,
        opts: DbOptions,
        init: impl FnOnce(&mut Connection) -> rusqlite::Result<()>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut init = Some(init);
        let mut first = None;
        let threads = opts.connections.max(1);
        let running = Running {
            permits: Arc::new(tokio::sync::Semaphore::new(threads)),
            threads: u32::try_from(threads)
                .map_err(|_| Error::Io(format!("{}: too many connections", opts.name)))?,
        };
        for i in 0..threads {
            let mut conn = open_connection(path, &opts)?;
            if let Some(init) = init.take() {
                init(&mut conn)?;
            }
            let conn = Arc::new(Mutex::new(conn));
            first.get_or_insert_with(|| Arc::clone(&conn));
            let rx = Arc::clone(&rx);
            let permit = Arc::clone(&running.permits)
                .try_acquire_owned()
                .map_err(|e| Error::Io(format!("{}: {e}", opts.name)))?;
            std::thread::Builder::new()
                .name(format!("{}-{i}", opts.name))
                .spawn(move || {
                    run_jobs(&rx, &conn);
                    // The first connection is also held by the Db, all of whose clones are
                    // gone by now (the queue closed): this drop closes the connection.
                    drop(conn);
                    drop(permit);
                })
                .map_err(|e| Error::Io(format!("starting the {} thread: {e}", opts.name)))?;
        }
        Ok(Self {
            jobs: tx,
            first: first.expect("at least one connection"),
            running,
        })
    }

    /// A handle that waits for this database's threads to end ([`Running::ended`]).
    pub(crate) fn running(&self) -> Running {
        self.running.clone()
    }

    /// Drops this handle and waits for the threads to end and close their connections:
    /// only returns once no other clone of this [`Db`] remains.
    pub(crate) async fn close(self) {
        let running = self.running();
        drop(self);
        running.ended().await;
    }

    /// Queues `f` to run with a connection on its thread, without waiting for it. Jobs of a
    /// one-connection [`Db`] run in the order they were queued, so a later [`Db::call`]
    /// sees what `f` wrote.
    pub(crate) fn submit(&self, f: impl FnOnce(&mut Connection) + Send + 'static) -> Result<()> {
        self.jobs
            .send(Box::new(f))
            .map_err(|_| Error::Io("the database thread has stopped".into()))
    }

    /// Runs `f` with a connection on its thread and returns what it returns.
    pub(crate) async fn call<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }))
            .map_err(|_| Error::Io("the database thread has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Io("the database thread stopped during a call".into()))?
    }

    /// Runs `f` with the first connection on the calling thread, blocking it, if that
    /// connection is not running a job; otherwise as [`Db::call`]. Only for a one-connection
    /// [`Db`] whose jobs all come through [`Db::call`] or this (so none queued earlier is
    /// overtaken), and only for jobs of well under a millisecond: it holds up an async
    /// runtime worker meanwhile.
    pub(crate) async fn call_here<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
    {
        let f = match self.first.try_lock() {
            Ok(mut conn) => return f(&mut conn),
            // A job that panicked here left the connection usable (see the thread loop).
            Err(TryLockError::Poisoned(p)) => return f(&mut p.into_inner()),
            Err(TryLockError::WouldBlock) => f,
        };
        self.call(f).await
    }
}

/// Runs jobs from the queue `rx` with `conn` until every [`Db`] clone is dropped.
fn run_jobs(rx: &Mutex<mpsc::Receiver<Job>>, conn: &Mutex<Connection>) {
    loop {
        // The lock is held only while waiting for the next job, so the threads take turns
        // at the queue and run their jobs in parallel.
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else {
            return; // every Db clone dropped
        };
        // A panicking job drops its reply channel (its caller gets an error); the
        // connection stays usable: what the job left half-done rolls back as its guard (a
        // transaction, or an applied batch's savepoint) unwinds.
        let mut conn = lock(conn);
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn)));
    }
}

/// Locks `m`, also when a panic elsewhere poisoned it: what it guards here stays whole (a
/// connection whose job panicked rolled its half-done work back as it unwound; the log
/// store's pending appends are changed only in single steps).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn one_connection(dir: &Path) -> Db {
        let opts = DbOptions {
            name: "test-db",
            connections: 1,
            synchronous: "NORMAL",
            exclusive: false,
        };
        Db::open(&dir.join("t.db"), opts, |c| {
            c.execute_batch("CREATE TABLE t (x INTEGER)")
        })
        .await
        .expect("open")
    }

    fn rows(c: &mut Connection) -> Result<(i64, Option<String>)> {
        let n = c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?;
        Ok((n, std::thread::current().name().map(str::to_owned)))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn call_here_runs_on_the_callers_thread_when_the_connection_is_free() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = one_connection(dir.path()).await;
        let (n, thread) = db.call_here(rows).await.expect("call_here");
        assert_eq!(n, 0);
        assert_ne!(thread.as_deref(), Some("test-db-0"));
        let (_, thread) = db.call(rows).await.expect("call");
        assert_eq!(thread.as_deref(), Some("test-db-0"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn call_here_waits_behind_a_running_job_and_sees_what_it_wrote() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = one_connection(dir.path()).await;
        let (started_tx, started_rx) = oneshot::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        db.submit(move |c| {
            let _ = started_tx.send(());
            let _ = go_rx.recv();
            c.execute("INSERT INTO t VALUES (1)", []).expect("insert");
        })
        .expect("submit");
        started_rx.await.expect("the job started");
        let here = tokio::spawn({
            let db = db.clone();
            async move { db.call_here(rows).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!here.is_finished(), "call_here overtook the running job");
        go_tx.send(()).expect("release the job");
        let (n, thread) = here.await.expect("join").expect("call_here");
        assert_eq!(n, 1, "call_here ran before the job it queued behind");
        assert_eq!(thread.as_deref(), Some("test-db-0"));
    }
}
