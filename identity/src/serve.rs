//! Connection limits shared by the servers that face untrusted callers (the node API on
//! the network, the Workload API on a local socket).
//!
//! [`ConnectionLimit`] hands out one [`Permitted`] connection per permit: a connection
//! over the limit is closed as soon as it is accepted (logged at most once a second), so
//! idle or silent callers cannot exhaust file descriptors or memory. [`accept_backoff`]
//! turns an accept error (EMFILE, ENFILE, ...) into a logged pause instead of a busy loop.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
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

/// Per-key limits of concurrent connections (per source address, per user ID): at most
/// `max` open per key; a key with none open takes no memory.
#[derive(Clone, Debug)]
pub struct KeyedLimit<K: Eq + Hash> {
    open: Arc<Mutex<HashMap<K, usize>>>,
    max: usize,
}

/// One connection of key `K`, counted until it is dropped.
#[derive(Debug)]
pub struct KeySlot<K: Eq + Hash> {
    open: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: Eq + Hash + Clone> KeyedLimit<K> {
    /// At most `max` connections per key.
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::default(),
            max,
        }
    }

    /// A slot for one more connection of `key`, or `None` when it has `max` open.
    pub fn admit(&self, key: K) -> Option<KeySlot<K>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key.clone()).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(KeySlot {
            open: self.open.clone(),
            key,
        })
    }

    /// The most connections one key may hold.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl<K: Eq + Hash> Drop for KeySlot<K> {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// A connection that holds its permits (any guards: a [`ConnectionLimit`] permit, a
/// [`KeySlot`]) until it is dropped, and optionally ends at a deadline.
pub struct Permitted<T> {
    inner: T,
    _guard: Box<dyn Any + Send + Sync>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T: std::fmt::Debug> std::fmt::Debug for Permitted<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permitted")
            .field("inner", &self.inner)
            .field("deadline", &self.deadline.as_ref().map(|d| d.deadline()))
            .finish_non_exhaustive()
    }
}

impl<T> Permitted<T> {
    /// `inner`, holding `guard` (its permits) until dropped.
    pub fn new(inner: T, guard: impl Any + Send + Sync) -> Self {
        Self {
            inner,
            _guard: Box::new(guard),
            deadline: None,
        }
    }

    /// The same connection, failing every read and write after `max_age`: the server
    /// closes it whatever the caller does (a bound on what an unauthenticated caller holds).
    pub fn with_max_age(mut self, max_age: Duration) -> Self {
        self.deadline = Some(Box::pin(tokio::time::sleep(max_age)));
        self
    }

    /// The connection.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
}

fn max_age_reached() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the connection reached its maximum age",
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for Permitted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(max_age_reached()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Permitted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(max_age_reached()));
        }
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
        if self.expired(cx) {
            return Poll::Ready(Err(max_age_reached()));
        }
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

    #[test]
    fn a_key_holds_at_most_its_share_and_costs_nothing_when_closed() {
        let limit = KeyedLimit::new(2);
        let a1 = limit.admit("a").unwrap();
        let _a2 = limit.admit("a").unwrap();
        assert!(limit.admit("a").is_none());
        let _b = limit.admit("b").unwrap();
        drop(a1);
        let _a3 = limit.admit("a").unwrap();
        drop((_a2, _a3, _b));
        assert!(limit.open.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_connection_past_its_max_age_fails_reads_and_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = Permitted::new(a, ()).with_max_age(Duration::from_millis(50));
        b.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 1];
        a.read_exact(&mut buf).await.unwrap();
        // A silent peer: the read ends at the deadline instead of waiting forever.
        let err = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
            .await
            .expect("the deadline wakes the reader")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(a.write_all(b"y").await.is_err());
    }
}
