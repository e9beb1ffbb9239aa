//! HTTP endpoints on a loopback address: `/healthz` (the process runs), `/metrics`
//! ([`crate::metrics`]) and `/readyz` (the agent has a valid SVID, a trust bundle, and has
//! synced its entries recently: within three sync intervals, at least 10 s; otherwise it
//! says since when it could not, and why).

use std::time::Duration;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::cache::CacheState;
use crate::metrics::AgentMetrics;
use crate::persist::AgentSvid;
use crate::Error;

#[derive(Clone)]
struct Health {
    cache: watch::Receiver<Arc<CacheState>>,
    svid: watch::Receiver<AgentSvid>,
    metrics: Arc<AgentMetrics>,
    stale_after: Duration,
}

/// How long without a successful sync before `/readyz` says so, for `sync_interval`.
pub fn stale_after(sync_interval: Duration) -> Duration {
    (sync_interval * 3).max(Duration::from_secs(10))
}

async fn metrics(State(h): State<Health>) -> String {
    let (svids_cached, earliest_expiry) = {
        let cache = h.cache.borrow();
        let earliest = cache.svids.values().map(|s| s.not_after).min();
        (cache.svids.len(), earliest.unwrap_or(0))
    };
    h.metrics.render(crate::metrics::CacheGauges {
        svids_cached,
        earliest_expiry,
        own_svid_expiry: h.svid.borrow().not_after,
    })
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(h): State<Health>) -> (StatusCode, String) {
    let now = ca_identity::unix_now();
    let svid = h.svid.borrow().clone();
    let st = h.cache.borrow().clone();
    let mut problems = Vec::new();
    if svid.not_after <= now {
        problems.push(format!("the agent SVID expired at {}", svid.not_after));
    }
    if st.bundle.is_none() {
        problems.push("no trust bundle yet".to_owned());
    }
    if !st.synced {
        problems.push("entries not synced with a CA node yet".to_owned());
    } else {
        let last = h.metrics.last_sync.get();
        let age = now.saturating_sub(last);
        if age > h.stale_after.as_secs() as i64 {
            let why = h
                .metrics
                .last_sync_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_else(|| "no sync attempt finished".into());
            problems.push(format!(
                "no successful sync with a CA node for {age} s (serving cached SVIDs): {why}"
            ));
        }
    }
    if problems.is_empty() {
        (
            StatusCode::OK,
            format!(
                "ready: {} ({} entries, {} SVIDs)\n",
                svid.spiffe_id,
                st.entries.len(),
                st.svids.len()
            ),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
    }
}

/// Binds `addr` and serves the health endpoints until `shutdown` turns true; returns the
/// bound address (useful with port 0).
pub async fn spawn(
    addr: SocketAddr,
    cache: watch::Receiver<Arc<CacheState>>,
    svid: watch::Receiver<AgentSvid>,
    metrics: Arc<AgentMetrics>,
    stale_after: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Io {
            context: format!("cannot listen on health_addr {addr}"),
            source: e,
        })?;
    let bound = listener.local_addr().map_err(|e| Error::Io {
        context: "cannot read the health listener address".into(),
        source: e,
    })?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(self::metrics))
        .with_state(Health {
            cache,
            svid,
            metrics,
            stale_after,
        });
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        ca_identity::http_probe::serve(listener, app, "agent health", stop).await;
    });
    Ok((bound, task))
}
