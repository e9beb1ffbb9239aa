//! The registration entries in memory, indexed for the question every agent asks: which
//! entries am I authorized for? Kept current by the replication layer, which hands it each
//! applied entry change ([`entry_changes`]) in log order; never recomputed per call.
//!
//! An agent is authorized for the entries whose parent is its SPIFFE ID and, transitively,
//! for the entries whose parent is the SPIFFE ID of an entry it is authorized for (the same
//! rule as [`crate::query::authorized_entries`]). A change to an entry can change the
//! authorized set of every ID above its old and new parent; [`EntryIndex::apply`] records
//! those IDs per revision, so that a watcher can tell whether anything changed for it
//! ([`EntryIndex::changed_for`]) without recomputing its set.
//!
//! Memory: each entry once (an `Arc`), its ID in two sets (under its parent, under its
//! SPIFFE ID), and the recent history of affected IDs (at most [`HISTORY_IDS`] IDs).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use crate::command::{Command, Response};
use crate::records::EntryRecord;

/// How many affected IDs the history keeps at most (oldest revisions dropped first); a
/// watcher further behind is sent its full set.
pub const HISTORY_IDS: usize = 1 << 20;

/// One applied change to an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryChange {
    /// Created or updated: the entry as stored.
    Put(EntryRecord),
    /// Deleted.
    Delete(String),
}

/// The entry changes a successfully applied command made, given its response (a refused
/// command made none).
pub fn entry_changes(cmd: &Command, resp: &Response) -> Vec<EntryChange> {
    let mut out = Vec::new();
    collect_changes(cmd, resp, &mut out);
    out
}

fn collect_changes(cmd: &Command, resp: &Response, out: &mut Vec<EntryChange>) {
    match (cmd, resp) {
        (Command::Batch { commands }, Response::Batch(resps)) => {
            for (c, r) in commands.iter().zip(resps) {
                collect_changes(c, r, out);
            }
        }
        (Command::CreateEntry { .. } | Command::UpdateEntry { .. }, Response::Entry(e)) => {
            out.push(EntryChange::Put(e.clone()));
        }
        (Command::DeleteEntry { id }, Response::Ok) => out.push(EntryChange::Delete(id.clone())),
        _ => {}
    }
}

/// The entries, indexed by ID, by parent and by SPIFFE ID, at a revision (the log index of
/// the last change applied to them).
#[derive(Debug, Default)]
pub struct EntryIndex {
    entries: HashMap<String, Arc<EntryRecord>>,
    children: HashMap<String, BTreeSet<String>>,
    by_spiffe_id: HashMap<String, BTreeSet<String>>,
    revision: u64,
    /// Per revision, the IDs whose authorized set may have changed, oldest first.
    history: VecDeque<(u64, BTreeSet<String>)>,
    history_ids: usize,
    history_limit: usize,
    /// For each ID in the history, the last revision that affected it (so that
    /// [`EntryIndex::changed_for`] is one lookup, not a scan of the history).
    last_affected: HashMap<String, u64>,
    /// Revisions after this one are all in `history`.
    history_from: u64,
}

impl EntryIndex {
    /// An index of `entries` at `revision` (no history: watchers behind it get full sets).
    pub fn new(entries: impl IntoIterator<Item = EntryRecord>, revision: u64) -> Self {
        let mut index = EntryIndex {
            revision,
            history_from: revision,
            history_limit: HISTORY_IDS,
            ..Default::default()
        };
        for e in entries {
            index.insert(Arc::new(e));
        }
        index
    }

    /// Keeps at most `ids` affected IDs in the history instead of [`HISTORY_IDS`].
    pub fn with_history_limit(mut self, ids: usize) -> Self {
        self.history_limit = ids;
        self
    }

    /// The revision: the log index of the last change applied.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Applies `changes`, made by the command at log index `revision` (higher than any
    /// before), and records which IDs they affect.
    pub fn apply(&mut self, revision: u64, changes: &[EntryChange]) {
        if changes.is_empty() {
            return;
        }
        let mut affected = BTreeSet::new();
        for change in changes {
            let id = match change {
                EntryChange::Put(e) => &e.id,
                EntryChange::Delete(id) => id,
            };
            if let Some(old) = self.remove(id) {
                self.ancestors_into(&old.parent_id, &mut affected);
            }
            if let EntryChange::Put(e) = change {
                self.insert(Arc::new(e.clone()));
                self.ancestors_into(&e.parent_id, &mut affected);
            }
        }
        self.revision = revision;
        self.history_ids += affected.len();
        for id in &affected {
            self.last_affected.insert(id.clone(), revision);
        }
        self.history.push_back((revision, affected));
        while self.history_ids > self.history_limit {
            let Some((rev, ids)) = self.history.pop_front() else {
                break;
            };
            self.history_ids -= ids.len();
            self.history_from = rev;
            for id in ids {
                if self.last_affected.get(&id) == Some(&rev) {
                    self.last_affected.remove(&id);
                }
            }
        }
    }

    /// Whether the authorized set of `id` may have changed after revision `since`: `None`
    /// when the history no longer reaches back that far (send a full set).
    pub fn changed_for(&self, id: &str, since: u64) -> Option<bool> {
        if since < self.history_from {
            return None;
        }
        Some(self.last_affected.get(id).is_some_and(|rev| *rev > since))
    }

    /// The IDs whose authorized sets may have changed after revision `since`, or `None` when
    /// the history no longer reaches back that far.
    pub fn affected_since(&self, since: u64) -> Option<BTreeSet<&str>> {
        if since < self.history_from {
            return None;
        }
        let mut out = BTreeSet::new();
        for (rev, ids) in self.history.iter().rev() {
            if *rev <= since {
                break;
            }
            out.extend(ids.iter().map(String::as_str));
        }
        Some(out)
    }

    /// The entries `agent_id` is authorized for, by ID.
    pub fn authorized(&self, agent_id: &str) -> Vec<Arc<EntryRecord>> {
        let mut out: Vec<Arc<EntryRecord>> = Vec::new();
        let mut seen_parents: BTreeSet<&str> = BTreeSet::new();
        let mut parents: Vec<&str> = vec![agent_id];
        let mut ids: BTreeSet<&str> = BTreeSet::new();
        while let Some(p) = parents.pop() {
            if !seen_parents.insert(p) {
                continue;
            }
            for id in self.children.get(p).into_iter().flatten() {
                if ids.insert(id) {
                    let e = &self.entries[id];
                    parents.push(&e.spiffe_id);
                    out.push(e.clone());
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Entry `entry_id`, if `agent_id` is authorized for it (walks up from the entry, not
    /// down from the agent).
    pub fn authorized_entry(&self, agent_id: &str, entry_id: &str) -> Option<Arc<EntryRecord>> {
        let e = self.entries.get(entry_id)?;
        let mut above = BTreeSet::new();
        self.ancestors_into(&e.parent_id, &mut above);
        above.contains(agent_id).then(|| e.clone())
    }

    /// One entry.
    pub fn get(&self, id: &str) -> Option<Arc<EntryRecord>> {
        self.entries.get(id).cloned()
    }

    /// Adds `parent` and every ID above it (the parents of the entries whose SPIFFE ID it
    /// is, and so on) to `out`.
    fn ancestors_into(&self, parent: &str, out: &mut BTreeSet<String>) {
        let mut todo = vec![parent.to_owned()];
        while let Some(p) = todo.pop() {
            if out.contains(&p) {
                continue;
            }
            for id in self.by_spiffe_id.get(&p).into_iter().flatten() {
                todo.push(self.entries[id].parent_id.clone());
            }
            out.insert(p);
        }
    }

    fn insert(&mut self, e: Arc<EntryRecord>) {
        self.children
            .entry(e.parent_id.clone())
            .or_default()
            .insert(e.id.clone());
        self.by_spiffe_id
            .entry(e.spiffe_id.clone())
            .or_default()
            .insert(e.id.clone());
        self.entries.insert(e.id.clone(), e);
    }

    fn remove(&mut self, id: &str) -> Option<Arc<EntryRecord>> {
        let old = self.entries.remove(id)?;
        for (map, key) in [
            (&mut self.children, &old.parent_id),
            (&mut self.by_spiffe_id, &old.spiffe_id),
        ] {
            if let Some(set) = map.get_mut(key) {
                set.remove(id);
                if set.is_empty() {
                    map.remove(key);
                }
            }
        }
        Some(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, spiffe_id: &str, parent_id: &str) -> EntryRecord {
        EntryRecord {
            id: id.into(),
            spiffe_id: spiffe_id.into(),
            parent_id: parent_id.into(),
            selectors: Vec::new(),
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            dns_names: Vec::new(),
            admin: false,
            hint: String::new(),
            created_at: 0,
            revision: 0,
        }
    }

    fn ids(v: &[Arc<EntryRecord>]) -> Vec<&str> {
        v.iter().map(|e| e.id.as_str()).collect()
    }

    const A: &str = "spiffe://td/agent/a";
    const B: &str = "spiffe://td/agent/b";

    #[test]
    fn authorized_is_transitive_and_ends_on_cycles() {
        let index = EntryIndex::new(
            [
                entry("1", "spiffe://td/node-group", A),
                entry("2", "spiffe://td/web", "spiffe://td/node-group"),
                entry("3", "spiffe://td/db", B),
                // A cycle: each is the other's parent, under A through 1.
                entry("4", "spiffe://td/x", "spiffe://td/web"),
                entry("5", "spiffe://td/web", "spiffe://td/x"),
            ],
            7,
        );
        assert_eq!(ids(&index.authorized(A)), ["1", "2", "4", "5"]);
        assert_eq!(ids(&index.authorized(B)), ["3"]);
        assert!(index.authorized("spiffe://td/agent/c").is_empty());
        assert!(index.authorized_entry(A, "4").is_some());
        assert!(index.authorized_entry(B, "4").is_none());
        assert!(index.authorized_entry(A, "missing").is_none());
        assert_eq!(index.revision(), 7);
    }

    #[test]
    fn a_change_affects_every_id_above_its_old_and_new_parents() {
        let mut index = EntryIndex::new(
            [
                entry("1", "spiffe://td/group", A),
                entry("2", "spiffe://td/web", "spiffe://td/group"),
            ],
            1,
        );
        // Moving 2 from under the group (under A) to under B changes both agents' sets.
        index.apply(2, &[EntryChange::Put(entry("2", "spiffe://td/web", B))]);
        assert_eq!(index.changed_for(A, 1), Some(true));
        assert_eq!(index.changed_for(B, 1), Some(true));
        assert_eq!(index.changed_for(A, 2), Some(false), "nothing after 2");
        assert_eq!(index.changed_for("spiffe://td/agent/c", 1), Some(false));
        assert_eq!(ids(&index.authorized(A)), ["1"]);
        assert_eq!(ids(&index.authorized(B)), ["2"]);
        // Deleting 1 changes A's set; B's is untouched.
        index.apply(3, &[EntryChange::Delete("1".into())]);
        assert_eq!(index.changed_for(A, 2), Some(true));
        assert_eq!(index.changed_for(B, 2), Some(false));
        let since_1 = index.affected_since(1).unwrap();
        assert!(since_1.contains(A) && since_1.contains(B));
        assert!(index.authorized(A).is_empty());
        assert_eq!(index.len(), 1);
        // Before the index's start, the history cannot tell.
        assert_eq!(index.changed_for(A, 0), None);
        assert!(index.affected_since(0).is_none());
    }

    #[test]
    fn entries_under_a_new_entry_become_authorized_without_changing() {
        let mut index = EntryIndex::new([entry("2", "spiffe://td/web", "spiffe://td/group")], 1);
        assert!(index.authorized(A).is_empty());
        index.apply(5, &[EntryChange::Put(entry("1", "spiffe://td/group", A))]);
        assert_eq!(index.changed_for(A, 1), Some(true));
        assert_eq!(ids(&index.authorized(A)), ["1", "2"]);
    }

    #[test]
    fn history_is_bounded() {
        let mut index = EntryIndex::new([], 0).with_history_limit(100);
        let n = 110;
        for i in 0..n as u64 {
            index.apply(
                i + 1,
                &[EntryChange::Put(entry(
                    &i.to_string(),
                    "spiffe://td/w",
                    &format!("spiffe://td/p{i}"),
                ))],
            );
        }
        assert!(index.history_ids <= 100);
        assert!(
            index.last_affected.len() <= 100,
            "the lookup map is pruned with it"
        );
        assert_eq!(index.changed_for(A, 1), None, "too far back");
        assert_eq!(index.changed_for(A, n as u64 - 1), Some(false));
    }

    #[test]
    fn refused_and_batched_commands() {
        let e = entry("1", "spiffe://td/w", A);
        let refused = Response::Rejected {
            code: crate::RejectCode::AlreadyExists,
            message: String::new(),
        };
        assert!(entry_changes(&Command::CreateEntry { entry: e.clone() }, &refused).is_empty());
        let batch = Command::Batch {
            commands: vec![
                Command::CreateEntry { entry: e.clone() },
                Command::DeleteEntry { id: "9".into() },
                Command::DeleteEntry { id: "8".into() },
            ],
        };
        let resps = Response::Batch(vec![Response::Entry(e.clone()), Response::Ok, refused]);
        assert_eq!(
            entry_changes(&batch, &resps),
            [EntryChange::Put(e), EntryChange::Delete("9".into())]
        );
    }

    /// Random creates, updates (moves) and deletes over a few SPIFFE IDs and parents,
    /// applied to SQLite by the rules and to the index by their changes: every agent's
    /// authorized set is the same from both, and `changed_for` never misses a change.
    #[test]
    fn agrees_with_the_sql_query_on_random_changes() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        crate::schema::create(&conn).unwrap();
        let mut index = EntryIndex::new([], 0);
        let names: Vec<String> = (0..6).map(|i| format!("spiffe://td/w{i}")).collect();
        let agents = [A, B, "spiffe://td/agent/c"];
        let parents: Vec<&str> = agents
            .iter()
            .copied()
            .chain(names.iter().map(String::as_str))
            .collect();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut before: Vec<Vec<Arc<EntryRecord>>> =
            agents.iter().map(|a| index.authorized(a)).collect();
        for step in 1..=2000u64 {
            let id = format!("e{}", next(40));
            let cmd = match next(3) {
                0 => Command::DeleteEntry { id },
                k => {
                    let e = entry(&id, &names[next(names.len())], parents[next(parents.len())]);
                    if k == 1 {
                        Command::CreateEntry { entry: e }
                    } else {
                        Command::UpdateEntry { entry: e }
                    }
                }
            };
            let resp = crate::apply(&conn, &cmd, step).unwrap();
            index.apply(step, &entry_changes(&cmd, &resp));
            for (i, a) in agents.iter().enumerate() {
                let from_sql = crate::query::authorized_entries(&conn, a).unwrap();
                let from_index: Vec<EntryRecord> =
                    index.authorized(a).iter().map(|e| (**e).clone()).collect();
                assert_eq!(from_index, from_sql, "step {step}, {cmd:?}, agent {a}");
                let now = index.authorized(a);
                if now != before[i] {
                    assert_eq!(
                        index.changed_for(a, step - 1),
                        Some(true),
                        "step {step}: {cmd:?}"
                    );
                }
                before[i] = now;
            }
        }
    }
}
