//! Prometheus metrics of a node. Names are the contract with `ops/` dashboards and alerts.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

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
    /// Expiry of each active authority, Unix seconds, by kind.
    pub authority_expiry: IntGaugeVec,
    /// Node API requests, by method and gRPC code.
    pub node_api_requests: IntCounterVec,
    /// Node API calls refused by a rate limit or a connection bound, by limit.
    pub rate_limited: IntCounterVec,
    /// Replication links from other ca-nodes, by result (`served`: accepted and served
    /// until they closed; `refused`: the caller was not a ca-node).
    pub raft_links: IntCounterVec,
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

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let hist = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
            .expect("metric");
            registry.register(Box::new(h.clone())).expect("register");
            h
        };
        let x509_svids = counter(
            "ca_x509_svids_issued_total",
            "X.509-SVIDs issued, by result",
            &["result"],
        );
        let x509_svid_seconds = hist(
            "ca_x509_svid_issue_seconds",
            "Time to mint one X.509-SVID",
            &["kind"],
        );
        let jwt_svids = counter(
            "ca_jwt_svids_issued_total",
            "JWT-SVIDs issued, by result",
            &["result"],
        );
        let attestations = counter(
            "ca_agent_attestations_total",
            "Agent attestations, by method and result",
            &["method", "result"],
        );
        let km_sign_seconds = hist(
            "ca_keymanager_sign_seconds",
            "Key-manager sign latency, by backend and role (root, intermediate, jwt)",
            &["backend", "role"],
        );
        let km_errors = counter(
            "ca_keymanager_errors_total",
            "Key-manager errors, by kind",
            &["backend", "kind"],
        );
        let node_api_requests = counter(
            "ca_node_api_requests_total",
            "Node API requests, by method and code",
            &["method", "code"],
        );
        let rate_limited = counter(
            "ca_node_api_rate_limited_total",
            "Node API calls and connections refused by a limit (attestation, signing, unauthenticated_connections)",
            &["limit"],
        );
        for limit in ["attestation", "signing", "unauthenticated_connections"] {
            rate_limited.with_label_values(&[limit]);
        }
        let raft_links = counter(
            "ca_raft_links_total",
            "Replication links from other ca-nodes, by result (served, refused)",
            &["result"],
        );
        let clock_offset = GaugeVec::new(
            Opts::new(
                "ca_node_clock_offset_seconds",
                "Each other member's clock minus this node's, by peer",
            ),
            &["peer"],
        )
        .expect("metric");
        registry
            .register(Box::new(clock_offset.clone()))
            .expect("register");
        let data_dir_free = IntGauge::new(
            "ca_node_data_dir_free_bytes",
            "Bytes free for the node in its data dir's file system",
        )
        .expect("metric");
        registry
            .register(Box::new(data_dir_free.clone()))
            .expect("register");
        let km_in_flight = IntGauge::new(
            "ca_keymanager_in_flight",
            "Key-manager operations in flight",
        )
        .expect("metric");
        registry
            .register(Box::new(km_in_flight.clone()))
            .expect("register");
        let keymanager_up = IntGaugeVec::new(
            Opts::new(
                "ca_keymanager_up",
                "1 when the last operation on a role's key manager worked, else 0",
            ),
            &["role"],
        )
        .expect("metric");
        registry
            .register(Box::new(keymanager_up.clone()))
            .expect("register");
        let authority_expiry = IntGaugeVec::new(
            Opts::new(
                "ca_authority_expiry_timestamp_seconds",
                "Expiry of each active authority",
            ),
            &["kind", "id"],
        )
        .expect("metric");
        registry
            .register(Box::new(authority_expiry.clone()))
            .expect("register");
        Self {
            registry,
            x509_svids,
            x509_svid_seconds,
            jwt_svids,
            attestations,
            km_sign_seconds,
            keymanager_up,
            km_errors,
            km_in_flight,
            authority_expiry,
            node_api_requests,
            rate_limited,
            raft_links,
            clock_offset,
            data_dir_free,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encode metrics");
        String::from_utf8(buf).expect("utf8 metrics")
    }
}
