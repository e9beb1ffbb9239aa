//! The node port: one TLS listener for agents, joining nodes and members, its limits, and
//! the services on it (the node API, the Raft transport, the cluster service). Callers
//! with a client certificate and callers without one are served apart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ca_proto::node::node_server::NodeServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster;
use crate::core::NodeCore;
use crate::metrics::OpenConnection;
use crate::node_api::NodeApi;

/// At most this many connections on the node port at once (fewer if `RLIMIT_NOFILE` is
/// lower; 512 descriptors are kept for everything else). An agent holds one.
pub const MAX_NODE_CONNECTIONS: usize = 16_384;
/// Concurrent HTTP/2 streams per node-port connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// Largest request header block on the node port.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// How long a TLS handshake on the node port may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once from one source address (many agents behind one
/// NAT address reconnecting together stay well below it).
pub const HANDSHAKES_PER_ADDRESS: usize = 256;
/// Concurrent streams on a connection without a client certificate.
pub const ANONYMOUS_STREAMS_PER_CONNECTION: u32 = 4;
/// Longest call (until the response starts) on a connection without a client certificate.
pub const ANONYMOUS_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Header list size on a connection without a client certificate.
pub const ANONYMOUS_HEADER_LIST_BYTES: u32 = 16 * 1024;

fn refuse_anonymous(core: &NodeCore, peer: SocketAddr, why: &str) {
    core.metrics
        .rate_limited
        .with_label_values(&["unauthenticated_connections"])
        .inc();
    tracing::debug!(%peer, "{why}; closing the connection");
}

/// A node-port connection, TLS done, holding its connection permits.
type NodePortConnection =
    ca_identity::serve::Permitted<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// Serves `routes` with `builder`'s limits (plus the node port's keepalive) on the
/// connections arriving on `incoming`, until `stop` changes; logs if the server fails.
fn serve_node_port(
    builder: tonic::transport::Server,
    routes: tonic::service::Routes,
    incoming: tokio::sync::mpsc::Receiver<std::io::Result<NodePortConnection>>,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
) -> JoinHandle<()> {
    let mut builder = builder
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)));
    tokio::spawn(async move {
        let r = builder
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(incoming),
                async move {
                    let _ = stop.changed().await;
                },
            )
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, server = what, "node API server stopped");
        }
    })
}

/// Serves the node port on `listener` until `stop` changes: the accept loop (connection
/// limits, TLS, sorting callers by whether they presented a certificate) and one server
/// for each kind of caller.
pub(crate) fn serve(
    core: &Arc<NodeCore>,
    listener: TcpListener,
    stop: &watch::Sender<bool>,
) -> Vec<JoinHandle<()>> {
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
    let (anon_tx, anon_rx) = tokio::sync::mpsc::channel(128);
    let accept = spawn_accept(core.clone(), listener, conn_tx, anon_tx, stop.subscribe());
    let node_api = NodeServer::new(NodeApi::new(core.clone()));
    let raft_api = core.raft.grpc_service(Arc::new(core.gate.clone()));
    let cluster_api = cluster::ClusterService::new(core.clone()).into_server();
    // Callers without a client certificate reach only what they can use (attestation,
    // join; every other call needs an SVID and is refused there anyway), each call bounded.
    let anonymous = tonic::service::Routes::new(node_api.clone())
        .add_service(cluster_api.clone())
        // The Raft service only to refuse such callers with a clear UNAUTHENTICATED.
        .add_service(raft_api.clone());
    let anonymous = serve_node_port(
        tonic::transport::Server::builder()
            .timeout(ANONYMOUS_CALL_TIMEOUT)
            .max_concurrent_streams(Some(ANONYMOUS_STREAMS_PER_CONNECTION))
            .http2_max_header_list_size(Some(ANONYMOUS_HEADER_LIST_BYTES)),
        anonymous,
        anon_rx,
        stop.subscribe(),
        "node API server (no client certificate)",
    );
    let authenticated = tonic::service::Routes::new(node_api)
        .add_service(raft_api)
        .add_service(cluster_api);
    let authenticated = serve_node_port(
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES)),
        authenticated,
        conn_rx,
        stop.subscribe(),
        "node API server",
    );
    vec![accept, anonymous, authenticated]
}

type Incoming = tokio::sync::mpsc::Sender<std::io::Result<NodePortConnection>>;

/// Accepts node-port connections: over a limit a connection is closed at once
/// (unauthenticated callers hold nothing); handshakes in progress are bounded per source
/// address and in time; a connection with a client certificate goes to `authenticated`,
/// one without to `anonymous` with its share of the limits for such callers.
fn spawn_accept(
    core: Arc<NodeCore>,
    listener: TcpListener,
    authenticated: Incoming,
    anonymous: Incoming,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let tls = ca_identity::tls::server_config(core.svid.clone(), core.roots.clone(), false);
    let conn_limit = ca_identity::serve::ConnectionLimit::new(
        ca_identity::connection_cap(MAX_NODE_CONNECTIONS, ca_identity::nofile_limit(), 512),
        "node API",
    );
    let limits = &core.config.limits;
    let anon_limit = ca_identity::serve::ConnectionLimit::new(
        limits.unauthenticated_connections,
        "node API (no client certificate)",
    );
    let per_address =
        ca_identity::serve::KeyedLimit::new(limits.unauthenticated_connections_per_address);
    let handshaking = ca_identity::serve::KeyedLimit::new(HANDSHAKES_PER_ADDRESS);
    let anon_max_age = Duration::from_secs(limits.unauthenticated_max_age_secs);
    let accept_errors = Arc::new(ca_identity::LogThrottle::default());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        ca_identity::serve::accept_backoff("node API", &e, &accept_errors).await;
                        continue;
                    }
                },
            };
            let Some(permit) = conn_limit.try_admit() else {
                continue;
            };
            let Some(handshake) = handshaking.admit(peer.ip()) else {
                refuse_anonymous(
                    &core,
                    peer,
                    "too many TLS handshakes in progress from this address",
                );
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let (tx, anon_tx, anon_limit) =
                (authenticated.clone(), anonymous.clone(), anon_limit.clone());
            let per_address = per_address.clone();
            let core = core.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                };
                drop(handshake);
                let conn = tls.get_ref().1;
                let has_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty());
                if !has_cert {
                    // Attesting agents and joining nodes: served apart, with few streams,
                    // short calls and a maximum age, and a share per source address (an
                    // agent with its SVID never counts here).
                    let Some(slot) = per_address.admit(peer.ip()) else {
                        return refuse_anonymous(
                            &core,
                            peer,
                            "too many connections without a client certificate from this address",
                        );
                    };
                    let Some(anon) = anon_limit.try_admit() else {
                        return refuse_anonymous(&core, peer, "the node's limit of connections without a client certificate is reached");
                    };
                    let open = OpenConnection::new(
                        core.metrics
                            .connections_open
                            .with_label_values(&["unauthenticated"]),
                    );
                    let conn = ca_identity::serve::Permitted::new(tls, (permit, anon, slot, open))
                        .with_max_age(anon_max_age);
                    let _ = anon_tx.send(Ok::<_, std::io::Error>(conn)).await;
                    return;
                }
                let open = OpenConnection::new(
                    core.metrics
                        .connections_open
                        .with_label_values(&["authenticated"]),
                );
                let conn = ca_identity::serve::Permitted::new(tls, (permit, open));
                let _ = tx.send(Ok::<_, std::io::Error>(conn)).await;
            });
        }
    })
}
