//! `WatchEntries`: each agent's authorized entries and the trust bundle, pushed as they
//! change, served by any node from its own applied state (no Raft round trip).
//!
//! [`crate::watch_hub`] wakes a stream when something may have changed for its agent. Each
//! stream ([`serve`]) keeps the entries it has
//! sent (shared `Arc`s of the index's, so memory per stream is a map of its own entries)
//! and sends what differs: a full set first, in chunks of at most [`CHUNK_BYTES`], then
//! deltas. The cost of a change is proportional to the agents it affects, not to all
//! agents times all entries. A trust-bundle change (rotation, revocation) goes to every
//! stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ca_proto::node::WatchEntriesResponse;
use ca_state::EntryRecord;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use crate::convert::{bundle_to_proto, entry_to_proto};
use crate::core::NodeCore;
use crate::watch_hub::{Registration, Signals};
use crate::Error;

/// Largest encoded size of the entries in one message (gRPC's default limit is 4 MiB).
pub const CHUNK_BYTES: usize = 1 << 20;

/// How long a stream that resumes from a revision this node has not applied yet waits for
/// it before it sends a full set instead.
const CATCH_UP: Duration = Duration::from_secs(5);

/// What a stream needs to know of its caller.
pub(crate) struct Watcher {
    /// The agent's SPIFFE ID.
    pub agent: String,
    /// The serial of the SVID it called with.
    pub serial: String,
    /// When that SVID expires (Unix seconds): the stream ends then.
    pub not_after: i64,
    /// The revision the agent has (0: none).
    pub revision: u64,
}

type Sender = mpsc::Sender<Result<WatchEntriesResponse, Status>>;

/// Registers a stream of `agent` with the hub: refused with `RESOURCE_EXHAUSTED` when the
/// agent holds [`crate::watch_hub::MAX_STREAMS_PER_AGENT`] streams on this node already.
pub(crate) fn register(core: &NodeCore, agent: &str) -> Result<Registration, Error> {
    core.watch_hub.register(agent).ok_or_else(|| {
        Error::ResourceExhausted(format!(
            "agent {agent} holds {} WatchEntries streams on this node already; close one first",
            crate::watch_hub::MAX_STREAMS_PER_AGENT
        ))
    })
}

/// Serves one stream into `tx` until the agent goes away, its SVID expires or its
/// credentials are withdrawn.
pub(crate) async fn serve(core: Arc<NodeCore>, w: Watcher, registration: Registration, tx: Sender) {
    core.metrics.entry_watchers.inc();
    let r = run(&core, &w, &registration.signals, &tx).await;
    core.metrics.entry_watchers.dec();
    if let Err(e) = r {
        let _ = tx.send(Err(e.into())).await;
    }
}

async fn run(core: &NodeCore, w: &Watcher, signals: &Signals, tx: &Sender) -> Result<(), Error> {
    let sm = &core.sm;
    // Checked again now that the stream is registered: a withdrawal applied between the
    // caller check and the registration signalled nobody.
    check_caller(core, w).await?;
    let mut stopping = core.watch_hub.stopping();
    let mut trust = core.ca.subscribe_trust();
    trust.borrow_and_update();
    // A revision from a node ahead of this one: wait for it to be applied here.
    // Revisions are log indexes: a revision this node has not applied yet comes from a
    // node ahead of it; wait for it, briefly.
    if w.revision > sm.last_applied() {
        let mut applied = sm.subscribe();
        let _ = tokio::time::timeout(CATCH_UP, applied.wait_for(|r| *r >= w.revision)).await;
    }
    let applied = sm.last_applied();
    let (mut seen, resumed, set) = sm.entries_index(|i| {
        // The index holds every change up to `applied` (it is changed before the applied
        // index moves), so "nothing changed for the agent after its revision" is decided
        // here for any revision up to `applied`.
        let resumed = w.revision > 0
            && w.revision <= applied
            && i.changed_for(&w.agent, w.revision) == Some(false);
        (i.revision(), resumed, i.authorized(&w.agent))
    });
    let mut sent: HashMap<String, Arc<EntryRecord>> =
        set.iter().map(|e| (e.id.clone(), e.clone())).collect();
    let first = bundle_message(core, seen)?;
    if resumed {
        send(core, tx, vec![first], "bundle").await?;
    } else {
        send(core, tx, chunks(first, true, &set, Vec::new()), "full").await?;
    }
    let expires = tokio::time::Instant::now()
        + Duration::from_secs((w.not_after - ca_identity::unix_now()).max(0) as u64);
    loop {
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = tokio::time::sleep_until(expires) => return Ok(()),
            _ = async { let _ = stopping.wait_for(|s| *s).await; } => {
                return Err(Error::Unavailable("this node is shutting down; watch another".into()));
            }
            _ = signals.agent.notified() => check_caller(core, w).await?,
            r = trust.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                send(core, tx, vec![bundle_message(core, seen)?], "bundle").await?;
            }
            _ = signals.entries.notified() => {
                let (now, set) = sm.entries_index(|i| {
                    let set = match i.changed_for(&w.agent, seen) {
                        Some(false) => None,
                        _ => Some(i.authorized(&w.agent)),
                    };
                    (i.revision(), set)
                });
                seen = now;
                let Some(set) = set else { continue };
                let (changed, removed) = diff(&mut sent, set);
                if changed.is_empty() && removed.is_empty() {
                    continue;
                }
                let head = WatchEntriesResponse { revision: seen, ..Default::default() };
                send(core, tx, chunks(head, false, &changed, removed), "delta").await?;
            }
        }
    }
}

/// Brings `sent` to `now`; returns the entries added or changed and the IDs gone.
fn diff(
    sent: &mut HashMap<String, Arc<EntryRecord>>,
    now: Vec<Arc<EntryRecord>>,
) -> (Vec<Arc<EntryRecord>>, Vec<String>) {
    let mut changed = Vec::new();
    let mut next = HashMap::with_capacity(now.len());
    for e in now {
        match sent.remove(&e.id) {
            Some(old) if Arc::ptr_eq(&old, &e) || *old == *e => {}
            _ => changed.push(e.clone()),
        }
        next.insert(e.id.clone(), e);
    }
    let mut removed: Vec<String> = sent.drain().map(|(id, _)| id).collect();
    removed.sort();
    *sent = next;
    (changed, removed)
}

/// The caller is still the agent it was when the stream opened: attested, not banned, and
/// calling with its current (or just renewed) SVID.
async fn check_caller(core: &NodeCore, w: &Watcher) -> Result<(), Error> {
    core.agent_in_standing(&w.agent, &w.serial).await.map(drop)
}

/// A message with the current bundle and tainted authorities, at `revision`.
fn bundle_message(core: &NodeCore, revision: u64) -> Result<WatchEntriesResponse, Error> {
    let tainted = core.ca.tainted();
    Ok(WatchEntriesResponse {
        revision,
        bundle: Some(bundle_to_proto(core.ca.bundle()?.as_ref())),
        tainted_x509_authority_key_ids: tainted.x509_authority_key_ids,
        tainted_jwt_key_ids: tainted.jwt_key_ids,
        ..Default::default()
    })
}

/// `head` carrying `entries` and `removed`, split into messages of at most [`CHUNK_BYTES`]
/// of entries each, made one at a time as they are sent; `full` marks the first as the
/// start of a full set. Every message but the last has `more` set; the IDs removed ride in
/// the last.
struct Chunks<'a> {
    head: Option<WatchEntriesResponse>,
    revision: u64,
    entries: std::iter::Peekable<std::slice::Iter<'a, Arc<EntryRecord>>>,
    removed: Option<Vec<String>>,
}

fn chunks(
    head: WatchEntriesResponse,
    full: bool,
    entries: &[Arc<EntryRecord>],
    removed: Vec<String>,
) -> Chunks<'_> {
    Chunks {
        revision: head.revision,
        head: Some(WatchEntriesResponse { full, ..head }),
        entries: entries.iter().peekable(),
        removed: Some(removed),
    }
}

impl Iterator for Chunks<'_> {
    type Item = WatchEntriesResponse;

    fn next(&mut self) -> Option<WatchEntriesResponse> {
        let mut m = match self.head.take() {
            Some(head) => head,
            None if self.entries.peek().is_some() => WatchEntriesResponse {
                revision: self.revision,
                ..Default::default()
            },
            None => return None,
        };
        let mut bytes = 0;
        while let Some(e) = self.entries.peek() {
            let p = entry_to_proto(e);
            let len = p.encoded_len();
            if bytes > 0 && bytes + len > CHUNK_BYTES {
                m.more = true;
                return Some(m);
            }
            self.entries.next();
            bytes += len;
            m.entries.push(p);
        }
        m.removed_entry_ids = self.removed.take().unwrap_or_default();
        Some(m)
    }
}

/// How long one message may wait for the agent to read (its stream's buffer full): an agent
/// that stops reading has its stream ended rather than held open.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

async fn send(
    core: &NodeCore,
    tx: &Sender,
    messages: impl IntoIterator<Item = WatchEntriesResponse>,
    kind: &str,
) -> Result<(), Error> {
    for m in messages {
        core.metrics
            .entry_watch_messages
            .with_label_values(&[kind])
            .inc();
        core.metrics
            .entry_watch_entries
            .inc_by(m.entries.len() as u64);
        match tokio::time::timeout(SEND_TIMEOUT, tx.send(Ok(m))).await {
            Ok(Ok(())) => {}
            // The agent went away; the stream ends quietly.
            Ok(Err(_)) => return Ok(()),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "the agent read nothing for {} s; reconnect",
                    SEND_TIMEOUT.as_secs()
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, hint: &str) -> Arc<EntryRecord> {
        Arc::new(EntryRecord {
            id: id.into(),
            spiffe_id: format!("spiffe://td/{id}"),
            parent_id: "spiffe://td/agent".into(),
            selectors: Vec::new(),
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            dns_names: Vec::new(),
            admin: false,
            hint: hint.into(),
            created_at: 0,
            revision: 0,
        })
    }

    #[test]
    fn diff_sends_only_what_changed() {
        let (a, b, c) = (entry("a", ""), entry("b", ""), entry("c", ""));
        let mut sent: HashMap<String, Arc<EntryRecord>> = [&a, &b]
            .iter()
            .map(|e| (e.id.clone(), (*e).clone()))
            .collect();
        let b2 = entry("b", "changed");
        let (changed, removed) = diff(&mut sent, vec![a.clone(), b2.clone(), c.clone()]);
        assert_eq!(changed, vec![b2.clone(), c.clone()]);
        assert!(removed.is_empty());
        // An equal record in a new Arc (a rebuilt index) is not a change.
        let (changed, removed) = diff(&mut sent, vec![entry("a", ""), b2.clone()]);
        assert!(changed.is_empty());
        assert_eq!(removed, ["c"]);
        assert_eq!(sent.len(), 2);
    }

    #[test]
    fn chunks_stay_under_the_limit_and_carry_everything_once() {
        let big = "x".repeat(100_000);
        let entries: Vec<_> = (0..25).map(|i| entry(&format!("e{i:02}"), &big)).collect();
        let head = WatchEntriesResponse {
            revision: 9,
            ..Default::default()
        };
        let msgs: Vec<_> = chunks(head, true, &entries, vec!["gone".into()]).collect();
        assert!(msgs.len() >= 3, "{}", msgs.len());
        assert!(msgs[0].full && msgs[1..].iter().all(|m| !m.full));
        assert!(msgs[..msgs.len() - 1].iter().all(|m| m.more));
        assert!(!msgs.last().unwrap().more);
        assert!(msgs.iter().all(|m| m.revision == 9));
        let ids: Vec<String> = msgs
            .iter()
            .flat_map(|m| m.entries.iter().map(|e| e.id.clone()))
            .collect();
        assert_eq!(
            ids,
            entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
        );
        for m in &msgs {
            assert!(m.entries.iter().map(|e| e.encoded_len()).sum::<usize>() <= CHUNK_BYTES);
        }
        assert_eq!(msgs.last().unwrap().removed_entry_ids, ["gone"]);
        // Nothing to send still makes one message (a full set of nothing).
        let one: Vec<_> = chunks(WatchEntriesResponse::default(), true, &[], Vec::new()).collect();
        assert_eq!(one.len(), 1);
        assert!(one[0].full && !one[0].more);
    }
}
