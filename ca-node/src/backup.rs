//! Backups of the replicated state and disaster recovery, over [`ca_state::backup`].
//!
//! - [`save_copy`]: a consistent copy of `state.db`, taken while the node runs, what
//!   `ca-node snapshot save` writes.
//! - [`restore`]: `ca-node snapshot restore` puts such a copy into an empty data dir as the
//!   state of a **new** cluster ([`ca_state::backup::reset_for_new_cluster`]). The restored
//!   node starts with `ca-node run` as a single-node cluster; others join it.

use std::path::Path;

use crate::Error;

fn db_err(what: &str, p: &Path, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{what} {}: {e}", p.display()))
}

fn from_state(e: ca_state::Error) -> Error {
    match e {
        ca_state::Error::NotState(m) => Error::InvalidArgument(m),
        other => Error::Internal(other.to_string()),
    }
}

/// Runs blocking SQLite work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ca_state::Result<T> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("state backup task: {e}")))?
        .map_err(from_state)
}

/// The index of the last log entry applied to the state database at `p` (0 if none).
pub async fn applied_index(p: &Path) -> Result<u64, Error> {
    let p = p.to_owned();
    blocking(move || ca_state::backup::applied_index(&p)).await
}

/// Writes a consistent copy of the state database `state` to `out` (which must not
/// exist) while the node runs.
pub async fn save_copy(state: &Path, out: &Path) -> Result<(), Error> {
    let (state, out) = (state.to_owned(), out.to_owned());
    blocking(move || ca_state::backup::save_copy(&state, &out)).await
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
    if crate::registry::has_state(data_dir) || crate::registry::read_marker(data_dir)?.is_some() {
        return Err(Error::Config(format!(
            "data_dir {} already holds a node's state; restore into an empty data dir",
            data_dir.display()
        )));
    }
    let checked = from.to_owned();
    let applied = blocking(move || {
        ca_state::backup::check_copy(&checked)?;
        ca_state::backup::applied_index(&checked)
    })
    .await?;
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
    let reset = {
        let tmp = tmp.clone();
        blocking(move || ca_state::backup::reset_for_new_cluster(&tmp)).await?
    };
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| db_err("syncing", &tmp, e))?;
    std::fs::rename(&tmp, &target).map_err(|e| db_err("renaming to", &target, e))?;
    Ok(Restored {
        applied_index: applied,
        retired_authorities: reset.retired_authorities,
        forgotten_nodes: reset.forgotten_nodes,
    })
}
