//! The plain-HTTP server for `/metrics`, `/healthz` and `/readyz` (nodes and agents): any
//! caller that reaches the address may connect, so connections are capped and a request's
//! headers must arrive within [`HEADER_READ_TIMEOUT`] (an idle keep-alive connection is
//! closed after the same time). HTTP/1.1 only: what Prometheus and probes speak.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use crate::serve::{accept_backoff, ConnectionLimit};

/// How long a request's headers (or the next request on a kept-alive connection) may take.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once on a probe listener.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves `app` on `listener` until `shutdown` completes; `what` names it in logs.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    what: &'static str,
    shutdown: impl Future<Output = ()>,
) {
    let limit = ConnectionLimit::new(MAX_CONNECTIONS, what);
    let errors = Arc::new(crate::LogThrottle::default());
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_backoff(what, &e, &errors).await;
                    continue;
                }
            },
        };
        let Some(permit) = limit.try_admit() else {
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            if let Err(e) = http.serve_connection(TokioIo::new(tcp), service).await {
                tracing::debug!(server = what, error = %e, "HTTP connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start() -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(serve(l, app, "test probe", async move {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    /// Reads until EOF or error; true if that happened within `limit`.
    async fn closed_within(c: &mut tokio::net::TcpStream, limit: Duration) -> bool {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(limit, async {
            while let Ok(n) = c.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }

    async fn get(addr: std::net::SocketAddr) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_request_whose_headers_never_finish_is_closed() {
        let (addr, _stop) = start().await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let limit = HEADER_READ_TIMEOUT + Duration::from_secs(3);
        assert!(closed_within(&mut slow, limit).await, "half a header block");
        assert!(closed_within(&mut idle, limit).await, "nothing sent");
        assert!(get(addr).await.ends_with("ok"));
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_at_once_and_slots_come_back() {
        let (addr, _stop) = start().await;
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept them all before the extra one.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut extra, Duration::from_secs(2)).await);
        drop(held);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(get(addr).await.ends_with("ok"));
    }
}
