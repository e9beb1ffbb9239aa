//! Client load during faults: writers creating entries through the admin sockets of the
//! nodes they are pointed at (every outcome recorded in a [`Ledger`]), and workloads
//! fetching X.509-SVIDs from an agent's Workload API with the `spiffe` crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use ca_proto::admin::CreateEntryRequest;
use ca_proto::types;
use tokio::task::JoinHandle;

use crate::cluster::{admin_call, entries_at, Cluster, TD};

/// The parent ID of every entry the writers create (no agent has it: nothing is minted).
pub fn writer_parent(test: &str) -> String {
    writer_parent_in(TD, test)
}

/// The parent ID of every entry the writers of `test` create in trust domain `td`.
pub fn writer_parent_in(td: &str, test: &str) -> String {
    format!("spiffe://{td}/chaos-writer/{test}")
}

/// What came back for one write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged with this entry ID: it must never be lost.
    Acked(String),
    /// An error or no answer: it may or may not have been applied.
    Failed(String),
}

/// One write attempt.
#[derive(Clone, Debug)]
pub struct WriteRecord {
    /// The entry's SPIFFE ID (unique per write).
    pub key: String,
    /// The node (index) whose admin socket took it.
    pub node: usize,
    /// When it was sent.
    pub sent: Instant,
    /// When the answer (or the failure) came.
    pub done: Instant,
    /// What came back.
    pub outcome: Outcome,
}

/// Every write attempt, in completion order.
#[derive(Debug, Default)]
pub struct Ledger {
    records: Mutex<Vec<WriteRecord>>,
}

impl Ledger {
    /// A copy of the records.
    pub fn records(&self) -> Vec<WriteRecord> {
        self.records.lock().expect("ledger").clone()
    }

    /// How many acknowledged writes so far.
    pub fn acked(&self) -> usize {
        self.records
            .lock()
            .expect("ledger")
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Acked(_)))
            .count()
    }

    /// The longest time a write took to be acknowledged.
    pub fn slowest_ack(&self) -> Duration {
        self.records
            .lock()
            .expect("ledger")
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Acked(_)))
            .map(|r| r.done - r.sent)
            .max()
            .unwrap_or_default()
    }

    /// The first acknowledgement of a write sent at or after `t`: when it came.
    pub fn first_ack_sent_after(&self, t: Instant) -> Option<Instant> {
        self.records
            .lock()
            .expect("ledger")
            .iter()
            .filter(|r| r.sent >= t && matches!(r.outcome, Outcome::Acked(_)))
            .map(|r| r.done)
            .min()
    }
}

/// The admin sockets writers may use: the harness takes a node out before it faults it.
#[derive(Debug, Default)]
pub struct Targets {
    sockets: Mutex<Vec<(usize, PathBuf)>>,
}

impl Targets {
    /// Targets every node of `c` that is up.
    pub fn all_up(c: &Cluster) -> Arc<Self> {
        let t = Arc::new(Self::default());
        for i in c.up() {
            t.add(i, c.nodes[i].admin_socket());
        }
        t
    }

    /// Adds node `i`.
    pub fn add(&self, i: usize, sock: PathBuf) {
        let mut s = self.sockets.lock().expect("targets");
        if !s.iter().any(|(j, _)| *j == i) {
            s.push((i, sock));
            s.sort();
        }
    }

    /// Removes node `i`.
    pub fn remove(&self, i: usize) {
        self.sockets
            .lock()
            .expect("targets")
            .retain(|(j, _)| *j != i);
    }

    fn pick(&self, n: u64) -> Option<(usize, PathBuf)> {
        let s = self.sockets.lock().expect("targets");
        if s.is_empty() {
            return None;
        }
        Some(s[(n % s.len() as u64) as usize].clone())
    }
}

/// Writers creating entries until stopped.
#[derive(Debug)]
pub struct Writers {
    /// Where writes go.
    pub targets: Arc<Targets>,
    /// What happened.
    pub ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    parent: String,
    test: String,
    td: String,
    seq: Arc<AtomicU64>,
}

/// Creates entry `key` under `parent` through the admin socket `sock` (node `node`) and
/// records the outcome in `ledger`.
async fn write_one(
    ledger: &Ledger,
    parent: &str,
    key: String,
    k: u64,
    node: usize,
    sock: &std::path::Path,
) -> Outcome {
    let entry = types::Entry {
        spiffe_id: key.clone(),
        parent_id: parent.to_owned(),
        selectors: vec![types::Selector {
            r#type: "unix".into(),
            value: format!("uid:{}", 20000 + k % 1000),
        }],
        ..Default::default()
    };
    let sent = Instant::now();
    let r = admin_call(sock, WRITE_TIMEOUT, |mut a| async move {
        a.create_entry(CreateEntryRequest { entry: Some(entry) })
            .await
    })
    .await;
    let outcome = match r {
        Ok(resp) => match resp.entry {
            Some(e) if e.spiffe_id == key => Outcome::Acked(e.id),
            other => Outcome::Failed(format!("odd answer {other:?}")),
        },
        Err(e) => Outcome::Failed(e.to_string()),
    };
    ledger.records.lock().expect("ledger").push(WriteRecord {
        key,
        node,
        sent,
        done: Instant::now(),
        outcome: outcome.clone(),
    });
    outcome
}

/// How long a writer waits for one answer (the node gives up after 10 s itself).
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);

impl Writers {
    /// Starts `n` writers for test `test`, each writing one entry at a time, pausing
    /// `pace` between writes; writer `w` writes through target `w mod (number of targets)`.
    pub fn start(test: &str, n: usize, targets: Arc<Targets>, pace: Duration) -> Self {
        Self::start_in(TD, test, n, targets, pace)
    }

    /// As [`Writers::start`], for a cluster of trust domain `td`.
    pub fn start_in(td: &str, test: &str, n: usize, targets: Arc<Targets>, pace: Duration) -> Self {
        let ledger = Arc::new(Ledger::default());
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(0));
        let parent = writer_parent_in(td, test);
        let tasks = (0..n)
            .map(|w| {
                let (ledger, stop, seq, targets, parent) = (
                    ledger.clone(),
                    stop.clone(),
                    seq.clone(),
                    targets.clone(),
                    parent.clone(),
                );
                let (test, td) = (test.to_owned(), td.to_owned());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let k = seq.fetch_add(1, Ordering::Relaxed);
                        // Each writer sticks to one node (while the targets stay the same), so
                        // a node that does not answer holds up only its own writers.
                        let Some((node, sock)) = targets.pick(w as u64) else {
                            tokio::time::sleep(pace).await;
                            continue;
                        };
                        let key = format!("spiffe://{td}/chaos/{test}/w{w}-{k}");
                        let outcome = write_one(&ledger, &parent, key, k, node, &sock).await;
                        let failed = matches!(outcome, Outcome::Failed(_));
                        // After a failure, do not spin on a dead socket.
                        tokio::time::sleep(if failed {
                            pace.max(Duration::from_millis(50))
                        } else {
                            pace
                        })
                        .await;
                    }
                })
            })
            .collect();
        Self {
            targets,
            ledger,
            stop,
            tasks,
            parent,
            test: test.to_owned(),
            td: td.to_owned(),
            seq,
        }
    }

    /// How long after `t` (a fault) writes were acknowledged again, measured with probes
    /// independent of the writers (which may be held up by a request to a faulty node):
    /// from `t` on, every 50 ms a new write goes to the next target, each in its own task;
    /// the answer is when the first write sent at or after `t` was acknowledged (by a probe
    /// or a writer). Probes are recorded in the ledger like every other write.
    pub async fn unavailable_after(&self, t: Instant, timeout: Duration) -> Result<Duration> {
        let mut n = 0u64;
        loop {
            if let Some(done) = self.ledger.first_ack_sent_after(t) {
                return Ok(done - t);
            }
            if t.elapsed() > timeout {
                anyhow::bail!("no write acknowledged within {timeout:?} of the fault");
            }
            if let Some((node, sock)) = self.targets.pick(n) {
                let k = self.seq.fetch_add(1, Ordering::Relaxed);
                let key = format!("spiffe://{}/chaos/{}/probe-{k}", self.td, self.test);
                let (ledger, parent) = (self.ledger.clone(), self.parent.clone());
                tokio::spawn(async move {
                    write_one(&ledger, &parent, key, k, node, &sock).await;
                });
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `n` more writes than now were acknowledged (or `timeout`).
    pub async fn wait_acks(&self, n: usize, timeout: Duration) -> Result<()> {
        let want = self.ledger.acked() + n;
        let deadline = Instant::now() + timeout;
        while self.ledger.acked() < want {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "only {} of {want} writes acknowledged within {timeout:?}",
                    self.ledger.acked()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops the writers and waits for their last writes (and probes) to finish.
    pub async fn stop(self) -> Arc<Ledger> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        // Probes still in flight give up within the write timeout.
        let deadline = Instant::now() + WRITE_TIMEOUT + Duration::from_secs(1);
        while Arc::strong_count(&self.ledger) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.ledger
    }
}

/// What every node holds after the faults, against what the clients were told.
#[derive(Debug, Default)]
pub struct WriteCheck {
    /// Writes attempted.
    pub attempted: usize,
    /// Writes acknowledged.
    pub acked: usize,
    /// Writes whose outcome the client does not know (error or no answer).
    pub unknown: usize,
    /// Of those, how many were applied all the same (the acknowledgement was lost).
    pub unknown_applied: usize,
    /// Entries per node (node ID → count).
    pub per_node: BTreeMap<String, usize>,
    /// Acknowledged writes missing on some node: must be empty.
    pub lost: Vec<String>,
    /// Entries no client ever sent, or stored under another ID than acknowledged: must be
    /// empty.
    pub phantom: Vec<String>,
    /// Nodes whose set differs from the first node's: must be empty.
    pub diverged: Vec<String>,
}

impl WriteCheck {
    /// Panics unless every invariant holds (nothing lost, nothing nobody wrote, all nodes
    /// alike) and all `nodes` nodes were read.
    pub fn assert_invariants(&self, nodes: usize) {
        assert!(
            self.lost.is_empty(),
            "acknowledged writes lost: {:?}",
            self.lost
        );
        assert!(
            self.phantom.is_empty(),
            "entries nobody wrote: {:?}",
            self.phantom
        );
        assert!(
            self.diverged.is_empty(),
            "nodes differ: {:?}",
            self.diverged
        );
        assert_eq!(self.per_node.len(), nodes);
    }
}

/// Reads the writers' entries from every node that is up and checks them against `ledger`.
pub async fn check_writes(c: &Cluster, test: &str, ledger: &Ledger) -> Result<WriteCheck> {
    let nodes: Vec<(String, PathBuf)> = c
        .up()
        .into_iter()
        .map(|i| (c.nodes[i].node_id.clone(), c.nodes[i].admin_socket()))
        .collect();
    check_writes_at(&nodes, &writer_parent(test), ledger).await
}

/// Reads the entries under `parent` (the writers') from every node in `nodes` (node ID,
/// admin socket) and checks them against `ledger`.
pub async fn check_writes_at(
    nodes: &[(String, PathBuf)],
    parent: &str,
    ledger: &Ledger,
) -> Result<WriteCheck> {
    let records = ledger.records();
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let mut unknown: BTreeSet<String> = BTreeSet::new();
    for r in &records {
        match &r.outcome {
            Outcome::Acked(id) => {
                acked.insert(r.key.clone(), id.clone());
            }
            Outcome::Failed(_) => {
                unknown.insert(r.key.clone());
            }
        }
    }
    let mut check = WriteCheck {
        attempted: records.len(),
        acked: acked.len(),
        unknown: unknown.len(),
        ..Default::default()
    };
    let mut first: Option<(String, BTreeMap<String, String>)> = None;
    for (node, sock) in nodes {
        let entries = entries_at(sock, parent).await?;
        let node = node.clone();
        let held: BTreeMap<String, String> =
            entries.into_iter().map(|e| (e.spiffe_id, e.id)).collect();
        check.per_node.insert(node.clone(), held.len());
        for (key, id) in &acked {
            if held.get(key) != Some(id) {
                check.lost.push(format!(
                    "{key} (acknowledged as {id}) on {node}: {:?}",
                    held.get(key)
                ));
            }
        }
        for key in held.keys() {
            if !acked.contains_key(key) && !unknown.contains(key) {
                check.phantom.push(format!("{key} on {node}"));
            }
        }
        match &first {
            None => {
                check.unknown_applied = held.keys().filter(|k| unknown.contains(*k)).count();
                first = Some((node, held));
            }
            Some((n0, h0)) => {
                if *h0 != held {
                    check.diverged.push(format!(
                        "{node} holds {} entries, {n0} {}",
                        held.len(),
                        h0.len()
                    ));
                }
            }
        }
    }
    Ok(check)
}

/// Tally of workload fetches.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Successful fetches (the expected SPIFFE ID came back).
    pub ok: u64,
    /// Failed fetches: when, and why.
    pub failures: Vec<(Instant, String)>,
    /// Slowest successful fetch.
    pub max_latency: Duration,
}

/// A workload fetching its X.509-SVID over and over through the Workload API.
#[derive(Debug)]
pub struct Fetcher {
    stats: Arc<Mutex<FetchStats>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// How long one fetch may take before it counts as failed.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One fetch of the X.509-SVID through `endpoint` (`unix:///...`), expecting `spiffe_id`.
pub async fn fetch_once(endpoint: &str, spiffe_id: &str) -> Result<()> {
    let r = tokio::time::timeout(FETCH_TIMEOUT, async {
        let client = spiffe::WorkloadApiClient::connect_to(endpoint).await?;
        let svid = client.fetch_x509_svid().await?;
        anyhow::Ok(svid.spiffe_id().to_string())
    })
    .await;
    match r {
        Ok(Ok(id)) if id == spiffe_id => Ok(()),
        Ok(Ok(id)) => anyhow::bail!("got {id}, expected {spiffe_id}"),
        Ok(Err(e)) => Err(e),
        Err(_) => anyhow::bail!("no SVID within {FETCH_TIMEOUT:?}"),
    }
}

/// Waits until a fetch through `endpoint` returns `spiffe_id`.
pub async fn wait_fetch(endpoint: &str, spiffe_id: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match fetch_once(endpoint, spiffe_id).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                anyhow::bail!("no SVID for {spiffe_id} through {endpoint} within {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

impl Fetcher {
    /// Starts fetching through `endpoint` every `period`.
    pub fn start(endpoint: String, spiffe_id: String, period: Duration) -> Self {
        let stats = Arc::new(Mutex::new(FetchStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stats.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !st.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = fetch_once(&endpoint, &spiffe_id).await;
                let took = t.elapsed();
                {
                    let mut s = s.lock().expect("stats");
                    match r {
                        Ok(()) => {
                            s.ok += 1;
                            s.max_latency = s.max_latency.max(took);
                        }
                        Err(e) => s.failures.push((t, format!("{e:#}"))),
                    }
                }
                tokio::time::sleep(period).await;
            }
        });
        Self { stats, stop, task }
    }

    /// (successes, failures) so far.
    pub fn counts(&self) -> (u64, usize) {
        let s = self.stats.lock().expect("stats");
        (s.ok, s.failures.len())
    }

    /// Stops and returns the tally.
    pub async fn stop(self) -> FetchStats {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        std::mem::take(&mut *self.stats.lock().expect("stats"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_stick_to_their_target_and_move_when_it_goes() {
        let t = Targets::default();
        assert!(t.pick(0).is_none());
        for i in 0..3 {
            t.add(i, PathBuf::from(format!("/s{i}")));
        }
        assert_eq!(t.pick(4).unwrap().0, 1);
        t.remove(1);
        assert_eq!(t.pick(4).unwrap().0, 0);
        assert_eq!(t.pick(5).unwrap().0, 2);
    }

    #[test]
    fn the_first_ack_after_a_fault_ignores_earlier_writes() {
        let l = Ledger::default();
        let t0 = Instant::now();
        let rec = |sent: Instant, done: Instant, ok: bool| WriteRecord {
            key: "k".into(),
            node: 0,
            sent,
            done,
            outcome: if ok {
                Outcome::Acked("id".into())
            } else {
                Outcome::Failed("x".into())
            },
        };
        let s = Duration::from_secs(1);
        l.records.lock().unwrap().extend([
            rec(t0, t0 + 5 * s, true),
            rec(t0 + s, t0 + 2 * s, false),
            rec(t0 + s, t0 + 3 * s, true),
        ]);
        assert_eq!(l.first_ack_sent_after(t0 + s), Some(t0 + 3 * s));
        assert_eq!(l.acked(), 2);
        assert_eq!(l.slowest_ack(), 5 * s);
    }
}
