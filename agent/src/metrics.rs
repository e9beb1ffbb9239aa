//! The agent's Prometheus metrics, served at `/metrics` on its health address. Names are
//! the contract with the dashboards and alerts in `ops/` (the README's metrics table).
//! Counters start at zero for their known label values.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Workload API methods (the gRPC method names), as labels.
const METHODS: [&str; 5] = [
    "FetchX509SVID",
    "FetchX509Bundles",
    "FetchJWTSVID",
    "FetchJWTBundles",
    "ValidateJWTSVID",
];
/// The methods that answer with a stream that stays open.
const STREAMING: [&str; 3] = ["FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles"];

/// The agent's metrics; cheap to clone.
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Registry,
    /// Workload API calls, by method and gRPC code (as the call was answered or its
    /// stream started).
    pub workload_requests: IntCounterVec,
    /// Workload API streams open, by method.
    pub streams_open: IntGaugeVec,
    /// X.509-SVIDs minted for workloads (new or renewed), by result.
    pub svid_rotations: IntCounterVec,
    /// Entry syncs with a node, by result.
    pub syncs: IntCounterVec,
    /// Node calls that succeeded on another node than the one tried first.
    pub failovers: IntCounter,
    /// Trust bundle changes received (and pushed to every watching workload).
    pub bundle_updates: IntCounter,
    /// When the last entry sync succeeded (Unix seconds).
    pub last_sync: IntGauge,
    /// 1 while a `WatchEntries` stream is open and its first update applied (watch mode).
    pub entry_watch_connected: IntGauge,
    /// Why the last entry sync failed, if it did (not exported: `/readyz` says it).
    pub last_sync_error: Arc<std::sync::Mutex<Option<String>>>,
    svids_cached: IntGauge,
    earliest_expiry: IntGauge,
    own_svid_expiry: IntGauge,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentMetrics")
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Registers every metric in a fresh registry, with the process collector and
    /// `ca_agent_build_info`.
    pub fn new() -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("register process collector");
        let add = |c: Box<dyn prometheus::core::Collector>| registry.register(c).expect("register");
        let counters = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
            add(Box::new(c.clone()));
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric");
            add(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric");
            add(Box::new(g.clone()));
            g
        };
        let build = IntGaugeVec::new(
            Opts::new(
                "ca_agent_build_info",
                "1, labelled with the running build's version",
            ),
            &["version"],
        )
        .expect("metric");
        add(Box::new(build.clone()));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let streams_open = IntGaugeVec::new(
            Opts::new(
                "ca_agent_workload_api_streams_open",
                "Workload API streams open, by method",
            ),
            &["method"],
        )
        .expect("metric");
        add(Box::new(streams_open.clone()));
        let m = Self {
            workload_requests: counters(
                "ca_agent_workload_api_requests_total",
                "Workload API calls, by method and gRPC code",
                &["method", "code"],
            ),
            streams_open,
            svid_rotations: counters(
                "ca_agent_svid_rotations_total",
                "X.509-SVIDs minted for workloads (new or renewed), by result",
                &["result"],
            ),
            syncs: counters(
                "ca_agent_syncs_total",
                "Entry syncs with a CA node, by result",
                &["result"],
            ),
            failovers: counter(
                "ca_agent_node_failovers_total",
                "Node calls answered by another node than the one tried first",
            ),
            bundle_updates: counter(
                "ca_agent_bundle_updates_total",
                "Trust bundle changes received and pushed to watching workloads",
            ),
            last_sync: gauge(
                "ca_agent_last_sync_success_timestamp_seconds",
                "When the agent was last known in sync with a node (Unix seconds): a poll answered, or, in watch mode, every second while its stream is open",
            ),
            entry_watch_connected: gauge(
                "ca_agent_entry_watch_connected",
                "1 while the agent's WatchEntries stream to a node is open and current (sync = watch)",
            ),
            svids_cached: gauge("ca_agent_svids_cached", "X.509-SVIDs cached for workloads"),
            earliest_expiry: gauge(
                "ca_agent_svid_earliest_expiry_timestamp_seconds",
                "Expiry of the cached workload X.509-SVID that expires first (Unix seconds)",
            ),
            own_svid_expiry: gauge(
                "ca_agent_own_svid_expiry_timestamp_seconds",
                "Expiry of the agent's own SVID (Unix seconds)",
            ),
            last_sync_error: Arc::default(),
            registry,
        };
        for method in METHODS {
            m.workload_requests.with_label_values(&[method, "ok"]);
        }
        for method in STREAMING {
            m.streams_open.with_label_values(&[method]);
        }
        for result in ["ok", "error"] {
            m.svid_rotations.with_label_values(&[result]);
            m.syncs.with_label_values(&[result]);
        }
        m
    }

    /// The text exposition format, with the cache gauges set to `now`.
    pub fn render(&self, now: CacheGauges) -> String {
        self.svids_cached.set(now.svids_cached as i64);
        self.earliest_expiry.set(now.earliest_expiry);
        self.own_svid_expiry.set(now.own_svid_expiry);
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encode metrics");
        String::from_utf8(buf).expect("utf8 metrics")
    }
}

/// The cache gauges, read at scrape time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheGauges {
    /// X509-SVIDs cached.
    pub svids_cached: usize,
    /// The earliest `not_after` among them (Unix seconds; 0 if none).
    pub earliest_expiry: i64,
    /// The agent's own SVID's `not_after`.
    pub own_svid_expiry: i64,
}

/// Counts Workload API calls by method and code, and keeps streams counted open while
/// their response streams.
#[derive(Clone, Debug)]
pub struct MetricsLayer(pub Arc<AgentMetrics>);

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Metered<S>;
    fn layer(&self, inner: S) -> Metered<S> {
        Metered {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service [`MetricsLayer`] makes.
#[derive(Clone, Debug)]
pub struct Metered<S> {
    inner: S,
    metrics: Arc<AgentMetrics>,
}

/// Decrements a stream gauge when dropped.
struct OpenStream(IntGauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Known names only, so a caller cannot make up label values.
        let path = req.uri().path();
        let method = METHODS
            .into_iter()
            .find(|m| path.rsplit('/').next() == Some(*m))
            .unwrap_or("unknown");
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // A refused call is answered with its status in the headers; a call that
            // goes ahead has it in the trailers.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or("ok", |c| code_name(tonic::Code::from(c)));
            metrics
                .workload_requests
                .with_label_values(&[method, code])
                .inc();
            if code == "ok" && STREAMING.contains(&method) {
                let open = metrics.streams_open.with_label_values(&[method]);
                open.inc();
                return Ok(resp.map(|body| ca_identity::serve::guard_body(body, OpenStream(open))));
            }
            Ok(resp)
        })
    }
}

/// The snake-case name of a gRPC code, as a label.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}
