//! Prometheus metrics of a node. Names are the contract with the dashboards and alerts in
//! `ops/` (the README's metrics table lists them). Every labelled counter starts at zero for
//! its known label values, so `increase()` sees the first event and an alert on the first
//! error can fire.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use ca_raft::{ClusterStatus, Role};

use ca_state::{AuthorityKind, AuthorityRecord, AuthorityState};

/// Results of an SVID request, a proposal or an attestation.
const RESULTS: [&str; 2] = ["ok", "error"];
/// Authority kinds, as labels.
const KINDS: [AuthorityKind; 3] = [
    AuthorityKind::Root,
    AuthorityKind::Intermediate,
    AuthorityKind::Jwt,
];
/// Rotation events, as labels.
pub const EVENTS: [&str; 5] = ["prepared", "activated", "retired", "revoked", "failed"];
/// Node API methods, as labels.
const NODE_API_METHODS: [&str; 6] = [
    "AttestAgent",
    "RenewAgent",
    "SyncEntries",
    "BatchNewX509Svid",
    "NewJwtSvid",
    "GetBundle",
];
/// Key-manager error kinds (`ca_kms::Error::kind`).
const KM_ERROR_KINDS: [&str; 7] = [
    "not_found",
    "already_exists",
    "unsupported",
    "unavailable",
    "permission_denied",
    "config",
    "backend",
];

/// The node's metrics, cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// X.509-SVIDs issued to workloads, by result.
    pub x509_svids: IntCounterVec,
    /// Time to mint one X.509-SVID (CSR check + signing).
    pub x509_svid_seconds: HistogramVec,
    /// JWT-SVIDs issued, by result.
    pub jwt_svids: IntCounterVec,
    /// Agent attestations, by method and result.
    pub attestations: IntCounterVec,
    /// Key-manager sign latency (the key-manager call only), by backend and role.
    pub km_sign_seconds: HistogramVec,
    /// 1 when the last operation on a role's key manager worked, else 0; by role.
    pub keymanager_up: IntGaugeVec,
    /// Key-manager errors, by backend and kind.
    pub km_errors: IntCounterVec,
    /// Key-manager operations in flight.
    pub km_in_flight: IntGauge,
    /// Rotation steps this node took, by authority kind and event.
    pub authority_events: IntCounterVec,
    authority_state: IntGaugeVec,
    authority_not_before: IntGaugeVec,
    authority_expiry: IntGaugeVec,
    authority_next_step: IntGaugeVec,
    authority_successor: IntGaugeVec,
    /// Node API requests, by method and gRPC code.
    pub node_api_requests: IntCounterVec,
    /// Time to answer an agent's `SyncEntries`.
    pub sync_seconds: Histogram,
    /// Open `WatchEntries` streams.
    pub entry_watchers: IntGauge,
    /// `WatchEntries` messages sent, by kind (`full`, `delta`, `bundle`).
    pub entry_watch_messages: IntCounterVec,
    /// Entries sent on `WatchEntries` streams.
    pub entry_watch_entries: IntCounter,
    /// Node API calls refused by a rate limit or a connection bound, by limit.
    pub rate_limited: IntCounterVec,
    /// This node's proposals, by result (`ok`, `rejected` by the rules, `error`).
    pub proposals: IntCounterVec,
    /// Time from proposing to the answer (applied), for this node's proposals.
    pub proposal_seconds: Histogram,
    raft_role: IntGaugeVec,
    raft_leader: IntGauge,
    raft_term: IntGauge,
    raft_leader_changes: IntCounter,
    raft_last_log_index: IntGauge,
    raft_applied_index: IntGauge,
    raft_snapshot_index: IntGauge,
    raft_snapshots: IntCounterVec,
    raft_snapshot_seconds: HistogramVec,
    /// Node-port connections open, by kind (`authenticated`: agents and members calling the
    /// node API and the Raft transport; `unauthenticated`: attesting agents and joining
    /// nodes).
    pub connections_open: IntGaugeVec,
    raft_members: IntGauge,
    raft_lag: IntGaugeVec,
    raft_quorum_ack_age: Gauge,
    /// Each other member's clock minus this node's, seconds, by peer node ID.
    pub clock_offset: GaugeVec,
    /// Bytes free for the node in its data dir's file system.
    pub data_dir_free: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5,
];

/// Registers metrics in a registry; each helper makes one kind.
struct Reg<'a>(&'a Registry);

impl Reg<'_> {
    fn add<M: prometheus::core::Collector + Clone + 'static>(&self, m: M) -> M {
        self.0.register(Box::new(m.clone())).expect("register");
        m
    }
    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("metric"))
    }
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("metric"))
    }
    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("metric"))
    }
    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("metric"))
    }
    fn hists(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        self.add(HistogramVec::new(opts, labels).expect("metric"))
    }
    fn hist(&self, name: &str, help: &str) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        self.add(Histogram::with_opts(opts).expect("metric"))
    }
}

/// Registers the process collector (CPU, memory, file descriptors) and `<prefix>_build_info`
/// in `registry`; shared with the agent.
pub fn register_process_and_build(registry: &Registry, prefix: &str) {
    #[cfg(target_os = "linux")]
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("register process collector");
    let info = IntGaugeVec::new(
        Opts::new(
            format!("{prefix}_build_info"),
            "1, labelled with the version of the running build",
        ),
        &["version"],
    )
    .expect("metric");
    registry.register(Box::new(info.clone())).expect("register");
    info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
}

/// Renders `registry` in the text exposition format.
pub fn render_registry(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("encode metrics");
    String::from_utf8(buf).expect("utf8 metrics")
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        register_process_and_build(&registry, "ca_node");
        let r = Reg(&registry);
        let m = Self {
            x509_svids: r.counters(
                "ca_x509_svids_issued_total",
                "X.509-SVIDs issued, by result",
                &["result"],
            ),
            x509_svid_seconds: r.hists(
                "ca_x509_svid_issue_seconds",
                "Time to mint one X.509-SVID",
                &["kind"],
            ),
            jwt_svids: r.counters(
                "ca_jwt_svids_issued_total",
                "JWT-SVIDs issued, by result",
                &["result"],
            ),
            attestations: r.counters(
                "ca_agent_attestations_total",
                "Agent attestations, by method and result",
                &["method", "result"],
            ),
            km_sign_seconds: r.hists(
                "ca_keymanager_sign_seconds",
                "Key-manager sign latency, by backend and role (root, intermediate, jwt)",
                &["backend", "role"],
            ),
            keymanager_up: r.gauges(
                "ca_keymanager_up",
                "1 when the last operation on a role's key manager worked, else 0",
                &["role"],
            ),
            km_errors: r.counters(
                "ca_keymanager_errors_total",
                "Key-manager errors, by backend and kind",
                &["backend", "kind"],
            ),
            km_in_flight: r.gauge("ca_keymanager_in_flight", "Key-manager operations in flight"),
            authority_events: r.counters(
                "ca_authority_events_total",
                "Rotation steps this node took (prepared, activated, retired, revoked, failed), by authority kind",
                &["kind", "event"],
            ),
            authority_state: r.gauges(
                "ca_authority_state",
                "State of each unexpired authority this node owns, and of the roots: 0 prepared, 1 active, 2 retired, 3 revoked",
                &["kind", "id", "node"],
            ),
            authority_not_before: r.gauges(
                "ca_authority_not_before_timestamp_seconds",
                "Start of each unexpired authority's validity (Unix seconds)",
                &["kind", "id", "node", "state"],
            ),
            authority_expiry: r.gauges(
                "ca_authority_expiry_timestamp_seconds",
                "Expiry of each unexpired authority (Unix seconds)",
                &["kind", "id", "node", "state"],
            ),
            authority_next_step: r.gauges(
                "ca_authority_next_step_timestamp_seconds",
                "When the next scheduled rotation step (prepare, activate) of each kind is due (Unix seconds)",
                &["kind", "node", "step"],
            ),
            authority_successor: r.gauges(
                "ca_authority_successor_prepared",
                "1 when a successor of the active authority is prepared, by kind",
                &["kind", "node"],
            ),
            node_api_requests: r.counters(
                "ca_node_api_requests_total",
                "Node API requests, by method and code",
                &["method", "code"],
            ),
            sync_seconds: r.hist(
                "ca_node_api_sync_seconds",
                "Time to answer an agent's SyncEntries",
            ),
            entry_watchers: r.gauge(
                "ca_node_entry_watchers",
                "Open WatchEntries streams (agents pushed their entries by this node)",
            ),
            entry_watch_messages: r.counters(
                "ca_node_entry_watch_messages_total",
                "WatchEntries messages sent, by kind (full: a chunk of a full set, delta, bundle)",
                &["kind"],
            ),
            entry_watch_entries: r.counter(
                "ca_node_entry_watch_entries_total",
                "Entries sent on WatchEntries streams (full sets and deltas)",
            ),
            rate_limited: r.counters(
                "ca_node_api_rate_limited_total",
                "Node API calls and connections refused by a limit (attestation, signing, unauthenticated_connections)",
                &["limit"],
            ),
            proposals: r.counters(
                "ca_raft_proposals_total",
                "This node's proposals, by result (ok, rejected, error)",
                &["result"],
            ),
            proposal_seconds: r.hist(
                "ca_raft_proposal_seconds",
                "Time from proposing to the answer, this node's proposals",
            ),
            raft_role: r.gauges(
                "ca_raft_role",
                "1 for this node's Raft role (leader, follower, candidate, learner, shutdown)",
                &["role"],
            ),
            raft_leader: r.gauge("ca_raft_leader", "1 while this node is the Raft leader"),
            raft_term: r.gauge("ca_raft_term", "Current Raft term"),
            raft_leader_changes: r.counter(
                "ca_raft_leader_changes_total",
                "Times this node saw the leader change",
            ),
            raft_last_log_index: r.gauge(
                "ca_raft_last_log_index",
                "Index of the last entry in this node's log",
            ),
            raft_applied_index: r.gauge(
                "ca_raft_applied_index",
                "Index of the last entry applied to this node's state",
            ),
            raft_snapshot_index: r.gauge(
                "ca_raft_snapshot_index",
                "Last entry covered by this node's current snapshot",
            ),
            raft_snapshots: r.counters(
                "ca_raft_snapshots_total",
                "Snapshots this node built or installed, by event (built, installed)",
                &["event"],
            ),
            raft_snapshot_seconds: r.add(
                HistogramVec::new(
                    HistogramOpts::new(
                        "ca_raft_snapshot_seconds",
                        "Time to build or install a snapshot, by event",
                    )
                    .buckets(vec![0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0]),
                    &["event"],
                )
                .expect("metric"),
            ),
            connections_open: r.gauges(
                "ca_node_api_connections_open",
                "Node-port connections open, by kind (authenticated, unauthenticated)",
                &["kind"],
            ),
            raft_members: r.gauge("ca_raft_members", "Voters in the membership"),
            raft_lag: r.gauges(
                "ca_raft_replication_lag_entries",
                "Leader only: how many entries each member's log is behind the leader's",
                &["peer"],
            ),
            raft_quorum_ack_age: r.add(
                Gauge::new(
                    "ca_raft_quorum_ack_age_seconds",
                    "Leader only: time since a quorum last acknowledged this leader (0 on others)",
                )
                .expect("metric"),
            ),
            clock_offset: r.add(
                GaugeVec::new(
                    Opts::new(
                        "ca_node_clock_offset_seconds",
                        "Each other member's clock minus this node's, by peer",
                    ),
                    &["peer"],
                )
                .expect("metric"),
            ),
            data_dir_free: r.gauge(
                "ca_node_data_dir_free_bytes",
                "Bytes free for the node in its data dir's file system",
            ),
            registry,
        };
        for result in RESULTS {
            m.x509_svids.with_label_values(&[result]);
            m.jwt_svids.with_label_values(&[result]);
            for method in ["join_token", "x509pop"] {
                m.attestations.with_label_values(&[method, result]);
            }
            m.proposals.with_label_values(&[result]);
        }
        m.proposals.with_label_values(&["rejected"]);
        for kind in KINDS {
            for event in EVENTS {
                m.authority_events
                    .with_label_values(&[kind.as_str(), event]);
            }
        }
        for method in NODE_API_METHODS {
            m.node_api_requests.with_label_values(&[method, "ok"]);
        }
        for limit in ["attestation", "signing", "unauthenticated_connections"] {
            m.rate_limited.with_label_values(&[limit]);
        }
        for event in ["built", "installed"] {
            m.raft_snapshots.with_label_values(&[event]);
            m.raft_snapshot_seconds.with_label_values(&[event]);
        }
        for kind in ["authenticated", "unauthenticated"] {
            m.connections_open.with_label_values(&[kind]);
        }
        m
    }

    /// Starts counting key-manager errors of `backend` at zero (called for each configured
    /// key manager).
    pub fn init_key_manager(&self, backend: &str) {
        for kind in KM_ERROR_KINDS {
            self.km_errors.with_label_values(&[backend, kind]);
        }
    }

    /// Counts a rotation step of an authority of `kind`.
    pub fn authority_event(&self, kind: AuthorityKind, event: &str) {
        self.authority_events
            .with_label_values(&[kind.as_str(), event])
            .inc();
    }

    /// Replaces the per-authority gauges from the journal `auths` at `now`: the roots and
    /// node `me`'s intermediates and JWT keys that are unexpired, and for each kind the
    /// next scheduled step and whether a successor is prepared.
    pub fn set_authorities(
        &self,
        auths: &[AuthorityRecord],
        me: &str,
        schedule: &ca_authority::Rotation,
        now: i64,
    ) {
        for g in [
            &self.authority_state,
            &self.authority_not_before,
            &self.authority_expiry,
            &self.authority_next_step,
            &self.authority_successor,
        ] {
            g.reset();
        }
        let mine = |a: &AuthorityRecord| a.kind == AuthorityKind::Root || a.node_id == me;
        for a in auths.iter().filter(|a| mine(a) && a.not_after > now) {
            let state = a.state.as_str();
            let code = match a.state {
                AuthorityState::Prepared => 0,
                AuthorityState::Active => 1,
                AuthorityState::Retired => 2,
                AuthorityState::Revoked => 3,
            };
            let who = [a.kind.as_str(), a.id.as_str(), a.node_id.as_str()];
            self.authority_state.with_label_values(&who).set(code);
            let with_state = [who[0], who[1], who[2], state];
            self.authority_not_before
                .with_label_values(&with_state)
                .set(a.not_before);
            self.authority_expiry
                .with_label_values(&with_state)
                .set(a.not_after);
        }
        for kind in KINDS {
            let of = |state| {
                auths
                    .iter()
                    .filter(|a| a.kind == kind && mine(a) && a.state == state && a.not_after > now)
                    .max_by_key(|a| a.not_before)
            };
            let Some(active) = of(AuthorityState::Active) else {
                continue;
            };
            let prepared = of(AuthorityState::Prepared).is_some();
            let node = active.node_id.as_str();
            let (step, fraction) = if prepared {
                ("activate", schedule.activate_fraction)
            } else {
                ("prepare", schedule.prepare_fraction)
            };
            let start = ca_authority::issued_at(active);
            let due = start + ((active.not_after - start) as f64 * fraction) as i64;
            self.authority_next_step
                .with_label_values(&[kind.as_str(), node, step])
                .set(due);
            self.authority_successor
                .with_label_values(&[kind.as_str(), node])
                .set(i64::from(prepared));
        }
    }

    /// Updates the Raft gauges from `now`; `before` is the previous status, if any (for the
    /// leader and snapshot counters).
    pub fn set_raft(&self, before: Option<&ClusterStatus>, now: &ClusterStatus) {
        let role = now.role.as_str();
        for r in [
            Role::Leader,
            Role::Follower,
            Role::Candidate,
            Role::Learner,
            Role::Shutdown,
        ] {
            self.raft_role
                .with_label_values(&[r.as_str()])
                .set(i64::from(r == now.role));
        }
        self.raft_leader.set(i64::from(role == "leader"));
        self.raft_term.set(now.term as i64);
        self.raft_last_log_index
            .set(now.last_log_index.unwrap_or(0) as i64);
        self.raft_applied_index
            .set(now.last_applied.map_or(0, |l| l.index) as i64);
        self.raft_snapshot_index
            .set(now.snapshot.map_or(0, |l| l.index) as i64);
        self.raft_members
            .set(now.members.values().filter(|m| m.voter).count() as i64);
        if let Some(b) = before {
            if now.leader.is_some() && b.leader != now.leader {
                self.raft_leader_changes.inc();
            }
        }
        self.raft_lag.reset();
        for (id, r) in &now.replication {
            self.raft_lag
                .with_label_values(&[&id.to_string()])
                .set(r.lag as i64);
        }
        self.raft_quorum_ack_age.set(
            now.millis_since_quorum_ack
                .map_or(0.0, |ms| ms as f64 / 1000.0),
        );
    }

    /// Counts the snapshots of `now` not in `before`, with the durations of the last ones.
    pub fn set_snapshots(
        &self,
        before: &ca_raft::SnapshotActivity,
        now: &ca_raft::SnapshotActivity,
    ) {
        for (event, was, is, took) in [
            ("built", before.built, now.built, now.last_build),
            (
                "installed",
                before.installed,
                now.installed,
                now.last_install,
            ),
        ] {
            if is > was {
                self.raft_snapshots
                    .with_label_values(&[event])
                    .inc_by(is - was);
                self.raft_snapshot_seconds
                    .with_label_values(&[event])
                    .observe(took.as_secs_f64());
            }
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        render_registry(&self.registry)
    }
}

/// One count of an open-connections gauge, held while the connection is open.
#[derive(Debug)]
pub struct OpenConnection(IntGauge);

impl OpenConnection {
    /// Counts one more in `gauge` until dropped.
    pub fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// This node's proposals, timed and counted (`ca_raft_proposals_total`,
/// `ca_raft_proposal_seconds`), and the rotation steps among them counted in
/// `ca_authority_events_total` once the journal accepted them.
#[derive(Debug)]
pub struct MeteredProposer {
    inner: std::sync::Arc<dyn ca_raft::Proposer>,
    sm: ca_raft::StateMachine,
    metrics: Metrics,
}

impl MeteredProposer {
    /// Proposals through `inner`, counted in `metrics`; `sm` names the kind of an
    /// authority whose state changes.
    pub fn new(
        inner: std::sync::Arc<dyn ca_raft::Proposer>,
        sm: ca_raft::StateMachine,
        metrics: Metrics,
    ) -> Self {
        Self { inner, sm, metrics }
    }

    /// The rotation event `cmd` is, if it is one: an authority recorded prepared (with its
    /// certificate, or a JWT key) or active, or one whose state changed (its kind is read
    /// from the journal once the change is accepted). Taken before the command is handed
    /// on, so that a proposal is not copied to be looked at afterwards.
    fn event_of(cmd: &ca_state::Command) -> Option<(EventOf, &'static str)> {
        let name = |s: AuthorityState| match s {
            AuthorityState::Prepared => "prepared",
            AuthorityState::Active => "activated",
            AuthorityState::Retired => "retired",
            AuthorityState::Revoked => "revoked",
        };
        match cmd {
            ca_state::Command::PutAuthority { authority: a }
                if !a.cert_der.is_empty() || a.kind == AuthorityKind::Jwt =>
            {
                Some((EventOf::Kind(a.kind), name(a.state)))
            }
            ca_state::Command::SetAuthorityState { id, state, .. } => {
                Some((EventOf::Authority(id.clone()), name(*state)))
            }
            _ => None,
        }
    }
}

/// Whose rotation event a proposal is: a kind known from the command, or an authority
/// whose kind the journal holds.
enum EventOf {
    Kind(AuthorityKind),
    Authority(String),
}

#[async_trait::async_trait]
impl ca_raft::Proposer for MeteredProposer {
    async fn propose(&self, cmd: ca_state::Command) -> ca_raft::Result<ca_state::Response> {
        let event = Self::event_of(&cmd);
        let start = std::time::Instant::now();
        let r = self.inner.propose(cmd).await;
        self.metrics
            .proposal_seconds
            .observe(start.elapsed().as_secs_f64());
        let result = match &r {
            Ok(ca_state::Response::Rejected { .. }) => "rejected",
            Ok(_) => "ok",
            Err(_) => "error",
        };
        self.metrics.proposals.with_label_values(&[result]).inc();
        if let (Some((kind, event)), "ok") = (event, result) {
            let kind = match kind {
                EventOf::Kind(kind) => Some(kind),
                EventOf::Authority(id) => self
                    .sm
                    .authorities()
                    .await
                    .ok()
                    .and_then(|auths| auths.into_iter().find(|a| a.id == id))
                    .map(|a| a.kind),
            };
            if let Some(kind) = kind {
                self.metrics.authority_event(kind, event);
            }
        }
        r
    }
}
