//! Connection limits shared by the servers that face untrusted callers (the node API on
//! the network, the Workload API on a local socket).
//!
//! [`ConnectionLimit`] hands out one [`Permitted`] connection per permit: a connection
//! over the limit is closed as soon as it is accepted (logged at most once a second), so
//! idle or silent callers cannot exhaust file descriptors or memory. [`accept_backoff`]
//! turns an accept error (EMFILE, ENFILE, ...) into a logged pause instead of a busy loop.
//!
//! Each [`Permitted`] connection counts the calls it carries ([`CallTracker`], handed to
//! requests in [`ConnectionInfo`] and held by [`TrackCallsLayer`] until the response ends),
//! so a connection with no call open can be closed after an idle period
//! ([`Permitted::with_idle_timeout`]), as gRPC's `MAX_CONNECTION_IDLE` does.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// How long to pause after a failed accept.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Logs a failed accept (at most once a second per `what`) and pauses.
pub async fn accept_backoff(what: &str, e: &io::Error, log: &crate::LogThrottle) {
    if log.ready() {
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
    log: Arc<crate::LogThrottle>,
}

impl ConnectionLimit {
    /// A limit of `max` connections for the server named `what` (in logs).
    pub fn new(max: usize, what: &'static str) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            what,
            log: Arc::default(),
        }
    }

    /// A permit for one more connection, or `None` (logged) when `max` are open.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                if self.log.ready() {
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

/// The calls open on one connection; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct CallTracker(Arc<CallCounts>);

#[derive(Debug, Default)]
struct CallCounts {
    open: AtomicUsize,
    /// Bumped whenever a call starts or ends, so an idle timer restarts from the last one.
    changes: AtomicU64,
}

/// One call in progress on its connection, counted until dropped.
#[derive(Debug)]
pub struct CallGuard(CallTracker);

impl CallTracker {
    /// Counts one more call until the guard is dropped.
    pub fn begin(&self) -> CallGuard {
        self.0.open.fetch_add(1, Ordering::SeqCst);
        self.0.changes.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.clone())
    }

    /// Calls open now.
    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::SeqCst)
    }

    fn changes(&self) -> u64 {
        self.0.changes.load(Ordering::SeqCst)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0 .0.open.fetch_sub(1, Ordering::SeqCst);
        self.0 .0.changes.fetch_add(1, Ordering::SeqCst);
    }
}

/// What a request learns about its [`Permitted`] connection (in its extensions): the
/// transport's own info (`UdsConnectInfo`, `TlsConnectInfo`, ...) and the call tracker.
#[derive(Clone, Debug)]
pub struct ConnectionInfo<I> {
    /// The transport's connection info.
    pub transport: I,
    /// The connection's calls.
    pub calls: CallTracker,
}

/// A tower layer that counts every request as a call on its connection (found through
/// [`ConnectionInfo<I>`]) until its response body is finished or dropped.
#[derive(Debug)]
pub struct TrackCallsLayer<I>(std::marker::PhantomData<fn() -> I>);

impl<I> TrackCallsLayer<I> {
    /// The layer, for connections whose transport info is `I`.
    pub fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<I> Default for TrackCallsLayer<I> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I> Clone for TrackCallsLayer<I> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<S, I> tower::Layer<S> for TrackCallsLayer<I> {
    type Service = TrackCalls<S, I>;
    fn layer(&self, inner: S) -> TrackCalls<S, I> {
        TrackCalls {
            inner,
            _info: std::marker::PhantomData,
        }
    }
}

/// The service [`TrackCallsLayer`] makes.
#[derive(Debug)]
pub struct TrackCalls<S, I> {
    inner: S,
    _info: std::marker::PhantomData<fn() -> I>,
}

impl<S: Clone, I> Clone for TrackCalls<S, I> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            _info: std::marker::PhantomData,
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, I, B> tower::Service<http::Request<B>> for TrackCalls<S, I>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    I: Clone + Send + Sync + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = <S as tower::Service<http::Request<B>>>::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<ConnectionInfo<I>>()
            .map(|c| c.calls.begin());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match guard {
                Some(guard) => resp.map(|body| guard_body(body, guard)),
                None => resp,
            })
        })
    }
}

/// `body`, holding `guard` until it ends or is dropped (a call counted open for as long as
/// its response streams).
pub fn guard_body<G: Send + Unpin + 'static>(
    body: tonic::body::Body,
    guard: G,
) -> tonic::body::Body {
    tonic::body::Body::new(GuardedBody {
        inner: body,
        _guard: guard,
    })
}

/// A response body that keeps its guard until it ends or is dropped.
struct GuardedBody<G> {
    inner: tonic::body::Body,
    _guard: G,
}

impl<G: Send + Unpin + 'static> http_body::Body for GuardedBody<G> {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Closes a connection that has had no call open for `timeout`.
struct IdleClose {
    calls: CallTracker,
    timeout: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The tracker's change count when the timer was last set (`None`: never set).
    armed_at: Option<u64>,
}

impl IdleClose {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.calls.open() > 0 {
            return false;
        }
        let changes = self.calls.changes();
        if self.armed_at != Some(changes) {
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + self.timeout);
            self.armed_at = Some(changes);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }
}

/// A connection that holds its permits (any guards: a [`ConnectionLimit`] permit, a
/// [`KeySlot`]) until it is dropped, optionally ends at a deadline, and optionally closes
/// when idle.
pub struct Permitted<T> {
    inner: T,
    _guard: Box<dyn Any + Send + Sync>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    calls: CallTracker,
    idle: Option<IdleClose>,
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
            calls: CallTracker::default(),
            idle: None,
        }
    }

    /// The same connection, closed once no call has been open on it for `timeout`
    /// (calls are counted by [`TrackCallsLayer`]; a connection that never makes a call is
    /// closed `timeout` after it was accepted).
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle = Some(IdleClose {
            calls: self.calls.clone(),
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
            armed_at: None,
        });
        self
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
            || self.idle.as_mut().is_some_and(|i| i.expired(cx))
    }
}

fn max_age_reached() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the server closed the connection (its maximum age or idle time was reached)",
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
    type ConnectInfo = ConnectionInfo<T::ConnectInfo>;
    fn connect_info(&self) -> Self::ConnectInfo {
        ConnectionInfo {
            transport: self.inner.connect_info(),
            calls: self.calls.clone(),
        }
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

    /// The idle timer runs only while no call is open, and restarts when the last one
    /// ends: a connection is closed `timeout` after its last call, never during one.
    #[tokio::test]
    async fn an_idle_connection_closes_only_when_no_call_is_open() {
        use tokio::io::AsyncReadExt;
        let (a, _b) = tokio::io::duplex(64);
        let mut a = Permitted::new(a, ()).with_idle_timeout(Duration::from_millis(100));
        let calls = a.calls.clone();
        let call = calls.begin();
        let mut buf = [0u8; 1];
        let busy = tokio::time::timeout(Duration::from_millis(400), a.read(&mut buf)).await;
        assert!(busy.is_err(), "closed while a call was open: {busy:?}");
        drop(call);
        assert_eq!(calls.open(), 0);
        let err = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
            .await
            .expect("the idle timer wakes the reader")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    /// The layer counts a request as a call until its response body is dropped (a body
    /// that is already finished ends the call at once).
    #[tokio::test]
    async fn the_layer_counts_a_call_until_its_body_is_dropped() {
        use tower::{Layer, Service, ServiceExt};
        let calls = CallTracker::default();
        let svc = tower::service_fn(|req: http::Request<()>| async move {
            let body = if req.uri().path() == "/empty" {
                tonic::body::Body::empty()
            } else {
                tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from_static(
                    b"message",
                )))
            };
            Ok::<_, std::convert::Infallible>(http::Response::new(body))
        });
        let mut svc = TrackCallsLayer::<u8>::new().layer(svc);
        let mut req = http::Request::new(());
        req.extensions_mut().insert(ConnectionInfo {
            transport: 7u8,
            calls: calls.clone(),
        });
        let resp = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(calls.open(), 1);
        drop(resp);
        assert_eq!(calls.open(), 0);
        let mut req = http::Request::builder().uri("/empty").body(()).unwrap();
        req.extensions_mut().insert(ConnectionInfo {
            transport: 7u8,
            calls: calls.clone(),
        });
        let _finished = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(calls.open(), 0);
        // A request without connection info is served, uncounted.
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await;
        assert!(resp.is_ok());
    }
}
