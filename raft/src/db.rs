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
//! The threads end when the last clone of the [`Db`] is dropped.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, Row};
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
        for i in 0..opts.connections.max(1) {
            let mut conn = open_connection(path, &opts)?;
            if let Some(init) = init.take() {
                init(&mut conn)?;
            }
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("{}-{i}", opts.name))
                .spawn(move || loop {
                    // The lock is held only while waiting for the next job, so the threads
                    // take turns at the queue and run their jobs in parallel.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else {
                        return; // every Db clone dropped
                    };
                    // A panicking job drops its reply channel (its caller gets an error);
                    // the connection stays usable: an open transaction rolls back when
                    // its guard unwinds.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn)));
                })
                .map_err(|e| Error::Io(format!("starting the {} thread: {e}", opts.name)))?;
        }
        Ok(Self { jobs: tx })
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
}

/// Runs `sql` with `params` and decodes every row with `decode`.
pub(crate) fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: impl Fn(&Row<'_>) -> Result<T>,
) -> Result<Vec<T>> {
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
