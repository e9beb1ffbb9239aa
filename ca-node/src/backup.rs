//! Backups of the replicated state and disaster recovery.
//!
//! - [`save_copy`]: a consistent copy of `state.db` (`VACUUM INTO`, taken while the node
//!   runs), what `ca-node snapshot save` writes.
//! - [`restore`]: `ca-node snapshot restore` puts such a copy into an empty data dir as the
//!   state of a **new** cluster: the copy's Raft bookkeeping (last applied entry, old
//!   membership) is dropped, every node's intermediate and JWT key is retired (their keys
//!   may not exist where the restore happens; each node makes new ones, and retired JWT keys
//!   stay published until they expire), and the old members' ca-node identities are
//!   forgotten. Entries, agents, join tokens and the roots are kept. The restored node starts
//!   with `ca-node run` as a single-node cluster; others join it.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::Error;

fn db_err(what: &str, p: &Path, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{what} {}: {e}", p.display()))
}

fn path_str(p: &Path) -> Result<&str, Error> {
    p.to_str()
        .ok_or_else(|| Error::Config(format!("non-UTF-8 path {}", p.display())))
}

/// Runs blocking SQLite work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("state backup task: {e}")))?
}

fn connect(p: &Path, read_only: bool) -> Result<Connection, Error> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    };
    let c = Connection::open_with_flags(p, flags).map_err(|e| db_err("opening", p, e))?;
    c.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| db_err("opening", p, e))?;
    Ok(c)
}

/// The index of the last log entry applied to the state database at `p` (0 if none).
pub async fn applied_index(p: &Path) -> Result<u64, Error> {
    let p = p.to_owned();
    blocking(move || {
        let c = connect(&p, true)?;
        let v: Option<String> = c
            .query_row(
                "SELECT value FROM raft_meta WHERE key = 'last_applied_log_id'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| db_err("reading", &p, e))?;
        Ok(
            v.and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
                .and_then(|j| j.get("index").and_then(|i| i.as_u64()))
                .unwrap_or(0),
        )
    })
    .await
}

/// Writes a consistent copy of the state database `state` to `out` (which must not
/// exist) while the node runs.
pub async fn save_copy(state: &Path, out: &Path) -> Result<(), Error> {
    let (state, out) = (state.to_owned(), out.to_owned());
    blocking(move || {
        let c = connect(&state, true)?;
        c.execute("VACUUM INTO ?", [path_str(&out)?])
            .map_err(|e| db_err("copying", &state, e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| db_err("setting permissions on", &out, e))?;
        Ok(())
    })
    .await
}

/// Checks that `p` is an intact state database.
pub async fn check_copy(p: &Path) -> Result<(), Error> {
    let p = p.to_owned();
    blocking(move || {
        let not_backup = |e: &dyn std::fmt::Display| {
            Error::InvalidArgument(format!("{} is not a state backup: {e}", p.display()))
        };
        let c = connect(&p, true).map_err(|e| not_backup(&e))?;
        let check: String = c
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| not_backup(&e))?;
        if check != "ok" {
            return Err(Error::InvalidArgument(format!(
                "{} is damaged: {check}",
                p.display()
            )));
        }
        for table in [
            "entries",
            "agents",
            "join_tokens",
            "authorities",
            "raft_meta",
        ] {
            let n: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
                    [table],
                    |r| r.get(0),
                )
                .map_err(|e| db_err("reading", &p, e))?;
            if n == 0 {
                return Err(Error::InvalidArgument(format!(
                    "{} is not a state backup: it has no {table} table",
                    p.display()
                )));
            }
        }
        Ok(())
    })
    .await
}

/// Resets a restored copy at `state` to be the state of a new cluster (see the module docs).
async fn reset_for_new_cluster(state: &Path) -> Result<(u64, u64), Error> {
    let state = state.to_owned();
    blocking(move || {
        let mut c = connect(&state, false)?;
        let write = |e| db_err("writing", &state, e);
        // A rollback journal, so the file is complete by itself once closed.
        c.query_row("PRAGMA journal_mode = DELETE", [], |_| Ok(()))
            .map_err(write)?;
        c.pragma_update(None, "synchronous", "FULL").map_err(write)?;
        let tx = c.transaction().map_err(write)?;
        let version: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(updated), 0) FROM authorities",
                [],
                |r| r.get(0),
            )
            .map_err(|e| db_err("reading", &state, e))?;
        let retired = tx
            .execute(
                "UPDATE authorities SET state = 'retired', updated = ? WHERE kind IN ('intermediate', 'jwt') AND state IN ('active', 'prepared')",
                [version + 1],
            )
            .map_err(write)?;
        let forgotten = tx
            .execute(
                "DELETE FROM agents WHERE spiffe_id LIKE 'spiffe://%/ca-node/%'",
                [],
            )
            .map_err(write)?;
        for sql in [
            "DELETE FROM raft_meta",
            "DELETE FROM meta WHERE key = 'last_applied'",
        ] {
            tx.execute(sql, []).map_err(write)?;
        }
        tx.commit().map_err(write)?;
        Ok((retired as u64, forgotten as u64))
    })
    .await
}

/// What a restore did.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// The last log index the backup contained.
    pub applied_index: u64,
    /// Intermediates and JWT keys retired.
    pub retired_authorities: u64,
    /// ca-node identities forgotten.
    pub forgotten_nodes: u64,
}

/// Restores the backup `from` into the empty data dir `data_dir` (see the module docs).
pub async fn restore(from: &Path, data_dir: &Path) -> Result<Restored, Error> {
    if crate::cluster::has_state(data_dir) || crate::cluster::read_marker(data_dir)?.is_some() {
        return Err(Error::Config(format!(
            "data_dir {} already holds a node's state; restore into an empty data dir",
            data_dir.display()
        )));
    }
    check_copy(from).await?;
    let applied = applied_index(from).await?;
    std::fs::create_dir_all(data_dir).map_err(|e| db_err("creating", data_dir, e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| db_err("setting permissions on", data_dir, e))?;
    }
    let target = data_dir.join(ca_raft::STATE_DB_FILE);
    let tmp = data_dir.join("state.db.restoring");
    // A VACUUM INTO copy is a self-contained database file.
    std::fs::copy(from, &tmp).map_err(|e| db_err("copying to", &tmp, e))?;
    let (retired, forgotten) = reset_for_new_cluster(&tmp).await?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| db_err("syncing", &tmp, e))?;
    std::fs::rename(&tmp, &target).map_err(|e| db_err("renaming to", &target, e))?;
    Ok(Restored {
        applied_index: applied,
        retired_authorities: retired,
        forgotten_nodes: forgotten,
    })
}
