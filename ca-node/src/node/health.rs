//! A running node's health: readiness (`/readyz`, `ca-node healthcheck`) and the watch on
//! its storage that stops it when its log or state can no longer be written.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::core::NodeCore;

/// Bytes free for this process in the file system of `dir`, if it can be read.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Below this much free space in the data dir's file system, readiness says so.
const LOW_DISK_BYTES: u64 = 64 << 20;

/// Watches the data dir's free space (`ca_node_data_dir_free_bytes`, every 10 s) and the
/// Raft core: when it has stopped for good (the log or the state could not be written:
/// a full disk, an I/O error) the node logs why, with the free space, stops serving and
/// reports the failure to whoever runs it ([`NodeHandle::failure`]; `ca-node` then waits
/// for room and starts again; everything it acknowledged is in its log or on the other
/// members).
pub(crate) fn watch_storage(
    core: Arc<NodeCore>,
    shutdown: watch::Sender<bool>,
    failed: watch::Sender<Option<String>>,
) -> JoinHandle<()> {
    let mut stop = shutdown.subscribe();
    tokio::spawn(async move {
        let mut tick = 0u64;
        loop {
            if tick.is_multiple_of(20) {
                if let Some(free) = free_bytes(&core.config.data_dir) {
                    core.metrics.data_dir_free.set(free as i64);
                }
            }
            tick += 1;
            if let Some(why) = core.raft.status().fatal {
                let free = free_bytes(&core.config.data_dir)
                    .map(|b| format!("{} MiB", b >> 20))
                    .unwrap_or_else(|| "unknown".into());
                let msg = format!(
                    "this node's Raft log or state cannot be written ({why}); {} has {free} free. The node stops serving: make room (or fix the disk), then start it again; everything it acknowledged is in its log or on the other members",
                    core.config.data_dir.display()
                );
                tracing::error!("{msg}");
                let _ = failed.send(Some(msg));
                let _ = shutdown.send(true);
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
        }
    })
}

pub(crate) fn readiness(core: &NodeCore) -> (bool, String) {
    let st = core.raft.status();
    let raft = match st.leader {
        Some(l) => format!("raft {} (leader {l}, term {})", st.role.as_str(), st.term),
        None => format!("raft {} (no leader)", st.role.as_str()),
    };
    let (ok, detail) = minting_readiness(core);
    let disk = match free_bytes(&core.config.data_dir) {
        Some(free) if free < LOW_DISK_BYTES => format!(
            "; the data dir's file system is nearly full ({} MiB free): writes will fail",
            free >> 20
        ),
        _ => String::new(),
    };
    (ok, format!("{detail}; {raft}{disk}"))
}

/// Readiness is the ability to mint: a node without a Raft quorum still mints (minting does
/// not go through the log), so the Raft role is reported but does not decide.
fn minting_readiness(core: &NodeCore) -> (bool, String) {
    let problems = core.ca.minting_problems();
    if problems.is_empty() {
        let id = core
            .ca
            .intermediate()
            .map(|i| i.record.id)
            .unwrap_or_default();
        (true, format!("ready: intermediate {id} active"))
    } else {
        (false, format!("not ready: {}", problems.join("; ")))
    }
}
