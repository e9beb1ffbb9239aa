//! The SPIFFE Workload API on a Unix socket.
//!
//! Every call must carry the metadata `workload.spiffe.io: true` (else `InvalidArgument`).
//! The caller is attested from its socket peer credentials
//! ([`crate::workload_attestor`]); a caller whose selectors match no entry gets
//! `PermissionDenied` ("no identity issued"). Streams send the full state for the caller
//! at once and again whenever it changes (rotation, bundle update, entry change).
//!
//! Every local user can reach the socket, so callers are bounded: connections (in all and
//! per user ID), streams per connection, header size, calls per second per user ID
//! (`ResourceExhausted` over it), and a connection with no call open is closed after the
//! idle timeout ([`WorkloadApiConfig`]).
//!
//! Bundle maps are keyed by the trust domain's SPIFFE ID (`spiffe://example.org`), as
//! SPIRE does; go-spiffe and py-spiffe both accept this form.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ca_identity::rate_limit::{refusal, RateLimiter};
use ca_identity::serve::ConnectionInfo;
use ca_identity::{Selector, SpiffeId, TrustDomain};
use ca_proto::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use ca_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use futures::Stream;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::cache::{CacheState, JwtCache};
use crate::config::WorkloadApiConfig;
use crate::h2_authority::AuthorityFix;
use crate::workload_attestor::{Peer, WorkloadAttestor};
use crate::Error;

/// The metadata key every Workload API call must carry with value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// How often streams re-check for expired SVIDs even without a cache change.
const RECHECK: Duration = Duration::from_secs(30);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The Workload API service.
#[derive(Clone)]
pub struct WorkloadApi {
    inner: Arc<Inner>,
}

struct Inner {
    trust_domain: TrustDomain,
    cache: watch::Receiver<Arc<CacheState>>,
    attestor: Arc<WorkloadAttestor>,
    jwt: Arc<JwtCache>,
    shutdown: watch::Receiver<bool>,
    /// Calls per user ID.
    calls: RateLimiter<u32>,
    idle_timeout: Duration,
    metrics: Arc<crate::metrics::AgentMetrics>,
}

/// User IDs whose call rate is remembered at once (the least recently seen go first).
const MAX_RATE_KEYS: usize = 4096;

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkloadApi({})", self.inner.trust_domain)
    }
}

enum Outcome<T> {
    /// The caller has no identity: end with PermissionDenied.
    Denied,
    /// Nothing to send yet (not synced, SVID not minted yet).
    NotReady,
    /// Send this (if it differs from the last message).
    Ready(T),
}

fn no_identity() -> Status {
    Status::permission_denied(
        "no identity issued: no registration entry matches this process's selectors",
    )
}

fn td_key(td: &TrustDomain) -> String {
    td.id().as_str().to_owned()
}

/// Converts JSON into a protobuf `Value`.
fn json_to_proto(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_proto).collect(),
        }),
        serde_json::Value::Object(m) => Kind::StructValue(json_map_to_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn json_map_to_struct(m: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_proto(v)))
            .collect(),
    }
}

impl WorkloadApi {
    /// A service answering from `cache` for `trust_domain`, attesting callers with
    /// `attestor`, minting JWT-SVIDs through `jwt` and bounding callers by `limits`.
    /// Streams end when `shutdown` turns true.
    pub fn new(
        trust_domain: TrustDomain,
        cache: watch::Receiver<Arc<CacheState>>,
        attestor: Arc<WorkloadAttestor>,
        jwt: Arc<JwtCache>,
        shutdown: watch::Receiver<bool>,
        limits: &WorkloadApiConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                trust_domain,
                cache,
                attestor,
                jwt,
                shutdown,
                calls: RateLimiter::new(limits.rate(), MAX_RATE_KEYS),
                idle_timeout: Duration::from_secs(limits.idle_timeout_secs),
                metrics: Default::default(),
            }),
        }
    }

    /// Counts calls and open streams in `metrics` (a private set otherwise). Call before
    /// serving.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::AgentMetrics>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.metrics = metrics;
        }
        self
    }

    /// The tonic service.
    pub fn into_service(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self)
    }

    async fn caller<T>(&self, req: &Request<T>) -> Result<Vec<Selector>, Status> {
        match req.metadata().get(SECURITY_HEADER) {
            Some(v) if v.as_bytes() == b"true" => {}
            _ => {
                return Err(Status::invalid_argument(format!(
                    "security header missing from request: every Workload API call must carry the metadata \"{SECURITY_HEADER}: true\""
                )))
            }
        }
        let peer = req
            .extensions()
            .get::<ConnectionInfo<Arc<Peer>>>()
            .map(|i| i.transport.clone())
            .ok_or_else(|| {
                Status::permission_denied("cannot read the caller's Unix socket credentials")
            })?;
        // Before attestation, which reads /proc and may hash a binary.
        if let Err(retry) = self.inner.calls.check(&peer.uid, 1) {
            if self.inner.calls.log_refusal() {
                tracing::warn!(uid = peer.uid, pid = ?peer.pid, "Workload API call refused: rate limit of this user ID reached");
            }
            return Err(Status::resource_exhausted(refusal(
                "Workload API calls",
                self.inner.calls.rate(),
                &format!("user ID {}", peer.uid),
                retry,
            )));
        }
        let attestor = self.inner.attestor.clone();
        let pid = peer.pid;
        let sels = tokio::task::spawn_blocking(move || attestor.attest(&peer))
            .await
            .map_err(|e| Status::internal(format!("workload attestation failed: {e}")))?
            .map_err(|refused| {
                tracing::info!(?pid, reason = %refused, "Workload API caller refused");
                Status::permission_denied(format!("workload attestation refused: {refused}"))
            })?;
        tracing::debug!(?pid, selectors = ?sels.iter().map(ToString::to_string).collect::<Vec<_>>(), "workload attested");
        Ok(sels)
    }

    fn state(&self) -> Arc<CacheState> {
        self.inner.cache.borrow().clone()
    }

    /// Fails now if the cache is synced and nothing matches.
    fn check_identity(&self, sels: &[Selector]) -> Result<(), Status> {
        let st = self.state();
        if st.synced && st.matching_entries(sels).is_empty() {
            return Err(no_identity());
        }
        Ok(())
    }

    fn x509_outcome(&self, st: &CacheState, sels: &[Selector]) -> Outcome<X509svidResponse> {
        if !st.synced {
            return Outcome::NotReady;
        }
        if st.matching_entries(sels).is_empty() {
            return Outcome::Denied;
        }
        let Some(bundle) = &st.bundle else {
            return Outcome::NotReady;
        };
        let roots = bundle.x509_der_concat();
        let svids: Vec<X509svid> = st
            .svids_for(sels, ca_identity::unix_now())
            .into_iter()
            .map(|s| X509svid {
                spiffe_id: s.spiffe_id.to_string(),
                x509_svid: s.chain.concat(),
                x509_svid_key: s.key_pkcs8.to_vec(),
                bundle: roots.clone(),
                hint: s.hint.clone(),
            })
            .collect();
        if svids.is_empty() {
            return Outcome::NotReady;
        }
        Outcome::Ready(X509svidResponse {
            svids,
            crl: Vec::new(),
            federated_bundles: Default::default(),
        })
    }

    fn x509_bundles_outcome(
        &self,
        st: &CacheState,
        sels: &[Selector],
    ) -> Outcome<X509BundlesResponse> {
        if !st.synced {
            return Outcome::NotReady;
        }
        if st.matching_entries(sels).is_empty() {
            return Outcome::Denied;
        }
        let Some(bundle) = &st.bundle else {
            return Outcome::NotReady;
        };
        Outcome::Ready(X509BundlesResponse {
            crl: Vec::new(),
            bundles: [(td_key(&bundle.trust_domain), bundle.x509_der_concat())].into(),
        })
    }

    fn jwt_bundles_outcome(
        &self,
        st: &CacheState,
        sels: &[Selector],
    ) -> Outcome<JwtBundlesResponse> {
        if !st.synced {
            return Outcome::NotReady;
        }
        if st.matching_entries(sels).is_empty() {
            return Outcome::Denied;
        }
        let Some(bundle) = &st.bundle else {
            return Outcome::NotReady;
        };
        match bundle.jwt_jwks_json() {
            Ok(jwks) => Outcome::Ready(JwtBundlesResponse {
                bundles: [(td_key(&bundle.trust_domain), jwks.into_bytes())].into(),
            }),
            Err(e) => {
                tracing::warn!("cannot render the JWT bundle: {e}");
                Outcome::NotReady
            }
        }
    }

    /// A stream that sends `build`'s answer now and whenever it changes.
    fn watch<T>(
        &self,
        sels: Vec<Selector>,
        build: fn(&Self, &CacheState, &[Selector]) -> Outcome<T>,
    ) -> BoxStream<T>
    where
        T: PartialEq + Clone + Send + Sync + 'static,
    {
        let (tx, rx) = mpsc::channel::<Result<T, Status>>(4);
        let this = self.clone();
        tokio::spawn(async move {
            let mut cache = this.inner.cache.clone();
            let mut shutdown = this.inner.shutdown.clone();
            let mut last: Option<T> = None;
            loop {
                let st = cache.borrow_and_update().clone();
                match build(&this, &st, &sels) {
                    Outcome::Denied => {
                        let _ = tx.send(Err(no_identity())).await;
                        return;
                    }
                    Outcome::NotReady => {}
                    Outcome::Ready(msg) => {
                        if last.as_ref() != Some(&msg) {
                            if tx.send(Ok(msg.clone())).await.is_err() {
                                return;
                            }
                            last = Some(msg);
                        }
                    }
                }
                if *shutdown.borrow() {
                    return;
                }
                tokio::select! {
                    r = cache.changed() => if r.is_err() { return },
                    _ = shutdown.changed() => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(RECHECK) => {}
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let sels = self.caller(&request).await?;
        let req = request.into_inner();
        ca_identity::jwt::check_audience(&req.audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let st = self.state();
        let mut entries = st.matching_entries(&sels);
        if entries.is_empty() {
            return Err(no_identity());
        }
        if !req.spiffe_id.is_empty() {
            let want = SpiffeId::parse(&req.spiffe_id)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            entries.retain(|e| e.spiffe_id == want);
            if entries.is_empty() {
                return Err(Status::permission_denied(format!(
                    "no identity issued for {want}: it is not one of this process's identities"
                )));
            }
        }
        // One token per SPIFFE ID (several entries may name the same one).
        entries.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id).then(a.id.cmp(&b.id)));
        entries.dedup_by(|a, b| a.spiffe_id == b.spiffe_id);
        let mut svids = Vec::with_capacity(entries.len());
        for e in entries {
            let token = self.inner.jwt.get(e, &req.audience).await.map_err(|s| {
                Status::new(
                    if s.code() == tonic::Code::PermissionDenied {
                        tonic::Code::PermissionDenied
                    } else {
                        tonic::Code::Unavailable
                    },
                    format!(
                        "cannot mint a JWT-SVID for {}: {}",
                        e.spiffe_id,
                        s.message()
                    ),
                )
            })?;
            svids.push(Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: token,
                hint: e.hint.clone(),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let sels = self.caller(&request).await?;
        self.check_identity(&sels)?;
        Ok(Response::new(self.watch(sels, Self::jwt_bundles_outcome)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let sels = self.caller(&request).await?;
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        self.check_identity(&sels)?;
        let st = self.state();
        let bundle = st.bundle.as_ref().ok_or_else(|| {
            Status::unavailable("the agent has no trust bundle yet; retry shortly")
        })?;
        let v = ca_identity::jwt::validate(
            &req.svid,
            bundle.trust_domain.as_str(),
            &bundle.jwt_keys(),
            &req.audience,
            ca_identity::unix_now(),
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(json_map_to_struct(&v.claims)),
        }))
    }

    type FetchX509SVIDStream = BoxStream<X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let sels = self.caller(&request).await?;
        self.check_identity(&sels)?;
        Ok(Response::new(self.watch(sels, Self::x509_outcome)))
    }

    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let sels = self.caller(&request).await?;
        self.check_identity(&sels)?;
        Ok(Response::new(self.watch(sels, Self::x509_bundles_outcome)))
    }
}

/// At most this many Workload API connections at once (fewer if `RLIMIT_NOFILE` is lower:
/// each takes two descriptors, and 256 are kept for everything else).
pub const MAX_CONNECTIONS: usize = 1024;
/// At most this many Workload API connections at once from one user ID, so that one local
/// user cannot take every connection.
pub const MAX_CONNECTIONS_PER_UID: usize = 128;
/// Concurrent streams (calls) per Workload API connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Largest request header block a workload may send.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Binds the Workload API socket: creates its directory (0755) if missing, refuses a
/// directory another user could write to (`ca_identity::unix_socket`), removes a stale
/// socket file, refuses to take over a socket another process still answers on, and makes
/// the socket connectable by every local user (0777).
pub async fn bind(socket_path: &Path) -> Result<UnixListener, Error> {
    ca_identity::unix_socket::bind(socket_path, 0o755, 0o777, "agent")
        .await
        .map_err(|e| Error::Config(format!("socket_path: {e}")))
}

/// Serves the Workload API on `listener` until `shutdown` completes. Connections go
/// through [`AuthorityFix`] so clients that send the socket path as `:authority` work.
pub async fn serve(
    listener: UnixListener,
    api: WorkloadApi,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    use ca_identity::serve::{
        accept_backoff, ConnectionLimit, KeyedLimit, Permitted, TrackCallsLayer,
    };
    // Two descriptors per connection (the socket and the caller's pidfd).
    let spare_fds = ca_identity::nofile_limit().saturating_sub(256);
    let limit = ConnectionLimit::new(
        ca_identity::connection_cap(MAX_CONNECTIONS, spare_fds / 2, 0),
        "Workload API",
    );
    let errors = Arc::new(ca_identity::LogThrottle::default());
    let per_uid = KeyedLimit::<u32>::new(MAX_CONNECTIONS_PER_UID);
    let idle = api.inner.idle_timeout;
    let metrics = api.inner.metrics.clone();
    let attestor = api.inner.attestor.clone();
    // Over a limit a connection is closed at once; an accept error pauses accepts.
    let incoming = futures::stream::unfold(listener, move |listener| {
        let (limit, errors, per_uid) = (limit.clone(), errors.clone(), per_uid.clone());
        let attestor = attestor.clone();
        async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        let Ok(cred) = conn.peer_cred() else {
                            continue;
                        };
                        let uid = cred.uid();
                        let Some(slot) = per_uid.admit(uid) else {
                            tracing::debug!(
                                uid,
                                max = per_uid.max(),
                                "Workload API: this user has too many connections open; closing the new one"
                            );
                            continue;
                        };
                        if let Some(permit) = limit.try_admit() {
                            let pidfd = nix::sys::socket::getsockopt(
                                &conn,
                                nix::sys::socket::sockopt::PeerPidfd,
                            )
                            .ok();
                            let peer = Arc::new(attestor.peer_with_pidfd(
                                pidfd,
                                cred.pid(),
                                uid,
                                cred.gid(),
                            ));
                            let conn = PeerStream { conn, peer };
                            let conn = Permitted::new(AuthorityFix::new(conn), (permit, slot))
                                .with_idle_timeout(idle);
                            return Some((Ok::<_, std::io::Error>(conn), listener));
                        }
                    }
                    Err(e) => accept_backoff("Workload API", &e, &errors).await,
                }
            }
        }
    });
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(TrackCallsLayer::<Arc<Peer>>::new())
        .layer(crate::metrics::MetricsLayer(metrics))
        .add_service(api.into_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::WorkloadApi(format!("the Workload API server failed: {e}")))
}

/// A Workload API connection and the process that opened it, pinned at accept.
struct PeerStream {
    conn: tokio::net::UnixStream,
    peer: Arc<Peer>,
}

impl tokio::io::AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.conn).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.conn).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.conn).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.conn).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = Arc<Peer>;
    fn connect_info(&self) -> Arc<Peer> {
        self.peer.clone()
    }
}
