//! Connection limits shared by the servers that face untrusted callers (the node API on
//! the network, the Workload API on a local socket).
//!
//! [`ConnectionLimit`] hands out one [`Permitted`] connection per permit: a connection
//! over the limit is closed as soon as it is accepted (logged at most once a second), so
//! idle or silent callers cannot exhaust file descriptors or memory. [`accept_backoff`]
//! turns an accept error (EMFILE, ENFILE, ...) into a logged pause instead of a busy loop.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// How long to pause after a failed accept.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Logs a failed accept (at most once a second per `what`) and pauses.
pub async fn accept_backoff(what: &str, e: &io::Error, last_log: &AtomicI64) {
    let now = crate::unix_now();
    if last_log.swap(now, Ordering::Relaxed) != now {
        tracing::warn!(server = what, error = %e, "accepting a connection failed (out of file descriptors?); pausing accepts");
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// At most `max` connections open at once; see the module docs.
#[derive(Clone, Debug)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
    what: &'static str,
    last_log: Arc<AtomicI64>,
}

impl ConnectionLimit {
    /// A limit of `max` connections for the server named `what` (in logs).
    pub fn new(max: usize, what: &'static str) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            what,
            last_log: Arc::default(),
        }
    }

    /// A permit for one more connection, or `None` (logged) when `max` are open.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let now = crate::unix_now();
                if self.last_log.swap(now, Ordering::Relaxed) != now {
                    tracing::warn!(
                        server = self.what,
                        max = self.max,
                        "connection limit reached: closing new connections until some close"
                    );
                }
                None
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// A connection that holds its permit until it is dropped.
#[derive(Debug)]
pub struct Permitted<T> {
    inner: T,
    _permit: OwnedSemaphorePermit,
}

impl<T> Permitted<T> {
    /// `inner`, counted against the limit `permit` came from.
    pub fn new(inner: T, permit: OwnedSemaphorePermit) -> Self {
        Self {
            inner,
            _permit: permit,
        }
    }

    /// The connection.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Permitted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Permitted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: Connected> Connected for Permitted<T> {
    type ConnectInfo = T::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_come_back_when_connections_close() {
        let limit = ConnectionLimit::new(2, "test");
        let a = limit.try_admit().unwrap();
        let b = Permitted::new((), limit.try_admit().unwrap());
        assert!(limit.try_admit().is_none(), "over the limit");
        assert_eq!(limit.open(), 2);
        drop(b);
        assert!(limit.try_admit().is_some());
        drop(a);
        assert_eq!(limit.open(), 0);
    }
}
