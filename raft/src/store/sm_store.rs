//! [`StateMachine`] as openraft's state machine storage: entries applied through
//! [`StateMachine::apply_entries`], snapshots built from and installed into its database.

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{AnyError, ErrorSubject, ErrorVerb, OptionalSend, StorageIOError};

use crate::snapshot::SnapshotFile;
use crate::store::state_machine::StateMachine;
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use ca_state::Response;

fn sm_err(verb: ErrorVerb, e: crate::Error) -> StorageError {
    StorageIOError::new(
        ErrorSubject::StateMachine,
        verb,
        AnyError::error(e.to_string()),
    )
    .into()
}

fn snap_err(meta: Option<&SnapshotMeta>, verb: ErrorVerb, e: crate::Error) -> StorageError {
    StorageIOError::new(
        ErrorSubject::Snapshot(meta.map(|m| m.signature())),
        verb,
        AnyError::error(e.to_string()),
    )
    .into()
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let start = std::time::Instant::now();
        let (meta, file) = StateMachine::build_snapshot(self)
            .await
            .map_err(|e| snap_err(None, ErrorVerb::Write, e))?;
        self.note_snapshot(false, start.elapsed());
        tracing::info!(snapshot = %meta, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        StateMachine::applied_state(self)
            .await
            .map_err(|e| sm_err(ErrorVerb::Read, e))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let last = entries.last().map(|e| e.log_id);
        self.apply_entries(entries).await.map_err(|e| match last {
            Some(l) => StorageIOError::apply(l, AnyError::error(e.to_string())).into(),
            None => sm_err(ErrorVerb::Write, e),
        })
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        Ok(Box::new(
            StateMachine::begin_receiving_snapshot(self)
                .await
                .map_err(|e| snap_err(None, ErrorVerb::Write, e))?,
        ))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError> {
        let start = std::time::Instant::now();
        StateMachine::install_snapshot(self, meta, *snapshot)
            .await
            .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        self.note_snapshot(true, start.elapsed());
        tracing::info!(snapshot = %meta, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let cur = self
            .current_snapshot()
            .await
            .map_err(|e| snap_err(None, ErrorVerb::Read, e))?;
        Ok(cur.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}
