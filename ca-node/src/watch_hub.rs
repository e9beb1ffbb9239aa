//! The open `WatchEntries` streams by agent, and the task that wakes them: after each
//! applied entry change it asks the entry index which IDs' authorized sets may have changed
//! and wakes only the streams of those agents; after an eviction, a ban or a new attestation
//! it wakes that agent's streams to check the caller again; when the node stops it ends
//! them all. What a stream does when woken is `entry_watch`'s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ca_raft::StateMachine;
use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;

/// Streams one agent may hold open at once (on this node): a restarted agent's old stream
/// may linger for a moment beside its new one; more is refused.
pub const MAX_STREAMS_PER_AGENT: usize = 4;

/// What wakes one stream.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    /// Its agent's authorized set may have changed.
    pub(crate) entries: Notify,
    /// Its agent was evicted, banned or attested again: check the caller.
    pub(crate) agent: Notify,
}

type Registered = HashMap<String, Vec<(u64, Arc<Signals>)>>;

/// The open streams by agent, and the task that wakes them.
#[derive(Debug)]
pub struct WatchHub {
    streams: Mutex<Registered>,
    next_id: AtomicU64,
    /// True once the node stops: every stream ends (its agent moves to another node).
    stopping: watch::Sender<bool>,
}

impl Default for WatchHub {
    fn default() -> Self {
        Self {
            streams: Mutex::default(),
            next_id: AtomicU64::default(),
            stopping: watch::channel(false).0,
        }
    }
}

/// A stream's registration; unregisters when dropped.
pub(crate) struct Registration {
    hub: Arc<WatchHub>,
    agent: String,
    id: u64,
    /// What wakes the stream.
    pub(crate) signals: Arc<Signals>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut streams = self.hub.lock();
        if let Some(v) = streams.get_mut(&self.agent) {
            v.retain(|(id, _)| *id != self.id);
            if v.is_empty() {
                streams.remove(&self.agent);
            }
        }
    }
}

impl WatchHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registered> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a stream of `agent`; `None` if it holds [`MAX_STREAMS_PER_AGENT`] already.
    pub(crate) fn register(self: &Arc<Self>, agent: &str) -> Option<Registration> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let signals = Arc::new(Signals::default());
        let mut streams = self.lock();
        let mine = streams.entry(agent.to_owned()).or_default();
        if mine.len() >= MAX_STREAMS_PER_AGENT {
            return None;
        }
        mine.push((id, signals.clone()));
        Some(Registration {
            hub: self.clone(),
            agent: agent.to_owned(),
            id,
            signals,
        })
    }

    /// True once the node stops (every stream ends then).
    pub(crate) fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    fn wake(&self, agents: Option<&[&str]>, which: fn(&Signals) -> &Notify) {
        let streams = self.lock();
        let wake = |v: &Vec<(u64, Arc<Signals>)>| {
            for (_, s) in v {
                which(s).notify_one();
            }
        };
        match agents {
            Some(ids) => ids.iter().filter_map(|id| streams.get(*id)).for_each(wake),
            None => streams.values().for_each(wake),
        }
    }

    /// Wakes the streams of the agents each applied change affects, until `stop` changes.
    pub fn spawn(
        self: &Arc<Self>,
        sm: &StateMachine,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let hub = self.clone();
        let sm = sm.clone();
        tokio::spawn(async move {
            let mut entries = sm.subscribe_entries();
            let mut agents = sm.subscribe_agents_withdrawn();
            let mut seen = sm.entries_index(|i| i.revision());
            loop {
                tokio::select! {
                    _ = stop.changed() => {
                        hub.stopping.send_replace(true);
                        return;
                    }
                    r = entries.changed() => {
                        if r.is_err() {
                            return;
                        }
                        let (now, affected) = sm.entries_index(|i| {
                            let affected = i.affected_since(seen).map(|ids| {
                                ids.into_iter().map(str::to_owned).collect::<Vec<_>>()
                            });
                            (i.revision(), affected)
                        });
                        seen = now;
                        match affected {
                            Some(ids) => {
                                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                                hub.wake(Some(&ids), |s| &s.entries);
                            }
                            None => hub.wake(None, |s| &s.entries),
                        }
                    }
                    r = agents.recv() => match r {
                        Ok(id) if id.is_empty() => hub.wake(None, |s| &s.agent),
                        Ok(id) => hub.wake(Some(&[id.as_str()]), |s| &s.agent),
                        Err(broadcast::error::RecvError::Lagged(_)) => hub.wake(None, |s| &s.agent),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        })
    }
}
