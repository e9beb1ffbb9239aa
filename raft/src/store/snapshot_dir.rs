//! The snapshot folder of a state machine (`state.snapshots/` beside `state.db`):
//! - `current.json`: the metadata of the current snapshot and the name of its file,
//!   replaced atomically (write, fsync, rename, fsync the folder);
//! - `snap-<id>.db`: the current snapshot's data;
//! - `build-*.db`, `recv-*.db`: snapshots being built or received (removed at open).
//!
//! Installing a received snapshot copies its tables into the state database in one
//! transaction (see [`crate::StateMachine`]), so the state is replaced atomically; the file
//! then becomes the current snapshot.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::snapshot::SnapshotFile;
use crate::types::SnapshotMeta;

/// What `current.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Current {
    meta: SnapshotMeta,
    file: String,
}

/// The snapshot folder of one state machine.
#[derive(Debug)]
pub(crate) struct SnapshotDir {
    dir: PathBuf,
    current: Mutex<Option<Current>>,
}

const CURRENT: &str = "current.json";

impl SnapshotDir {
    /// Opens (creating) the folder, loads the current snapshot's metadata and removes files
    /// left over by an interrupted build or transfer.
    pub(crate) async fn open(dir: &Path) -> io::Result<Self> {
        tokio::fs::create_dir_all(dir).await?;
        let current: Option<Current> = match tokio::fs::read(dir.join(CURRENT)).await {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(io::Error::other)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let keep = current.as_ref().map(|c| c.file.clone());
        let mut rd = tokio::fs::read_dir(dir).await?;
        while let Some(e) = rd.next_entry().await? {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".db") && Some(&name) != keep.as_ref() {
                let _ = tokio::fs::remove_file(e.path()).await;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            current: Mutex::new(current),
        })
    }

    /// A fresh path for a snapshot being built or received (`kind` is `build` or `recv`).
    pub(crate) fn temp_path(&self, kind: &str) -> PathBuf {
        self.dir
            .join(format!("{kind}-{}.db", uuid::Uuid::new_v4().simple()))
    }

    /// The current snapshot, opened for reading.
    pub(crate) async fn current(&self) -> io::Result<Option<(SnapshotMeta, SnapshotFile)>> {
        let cur = self.current.lock().await;
        match &*cur {
            None => Ok(None),
            Some(c) => {
                let f = SnapshotFile::open(&self.dir.join(&c.file)).await?;
                Ok(Some((c.meta.clone(), f)))
            }
        }
    }

    /// Makes the (synced) file at `path` the current snapshot with `meta`, durably, and
    /// removes the previous one. A snapshot older than the current one (a build that raced
    /// with an install) is dropped instead. Returns the current snapshot, opened.
    pub(crate) async fn set_current(
        &self,
        meta: &SnapshotMeta,
        path: &Path,
    ) -> io::Result<(SnapshotMeta, SnapshotFile)> {
        let mut cur = self.current.lock().await;
        if let Some(c) = cur.as_ref() {
            if meta.last_log_id < c.meta.last_log_id {
                let _ = tokio::fs::remove_file(path).await;
                let f = SnapshotFile::open(&self.dir.join(&c.file)).await?;
                return Ok((c.meta.clone(), f));
            }
        }
        let name = format!("snap-{}.db", sanitize(&meta.snapshot_id));
        let dest = self.dir.join(&name);
        tokio::fs::rename(path, &dest).await?;
        let next = Current {
            meta: meta.clone(),
            file: name,
        };
        let tmp = self.dir.join("current.json.tmp");
        {
            use tokio::io::AsyncWriteExt;
            let mut f = tokio::fs::File::create(&tmp).await?;
            f.write_all(&serde_json::to_vec(&next).map_err(io::Error::other)?)
                .await?;
            f.sync_all().await?;
        }
        tokio::fs::rename(&tmp, self.dir.join(CURRENT)).await?;
        sync_dir(&self.dir).await?;
        if let Some(old) = cur.replace(next) {
            if old.file != cur.as_ref().map(|c| c.file.clone()).unwrap_or_default() {
                let _ = tokio::fs::remove_file(self.dir.join(old.file)).await;
            }
        }
        Ok((meta.clone(), SnapshotFile::open(&dest).await?))
    }
}

/// Snapshot IDs become file names: keep only safe characters.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Makes renames in `dir` durable.
pub(crate) async fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(io::Error::other)?
}
