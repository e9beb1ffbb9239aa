//! Mutually authenticated TLS between ca-nodes.
//!
//! The Raft transport and the [`crate::cluster`] service are served on the node API's TLS
//! port. Client side: [`TlsConnector`] makes channels that present this node's own SVID (`spiffe://TD/ca-node/<id>`) and accept only the peer whose
//! SPIFFE ID is exactly `spiffe://TD/ca-node/<its node id>`, verified against the live trust
//! bundle. Server side: [`ca_node_caller`] reads the `spiffe://TD/ca-node/*` ID of a client
//! certificate (verified at the handshake against the same bundle); whether that node may
//! use the Raft transport or the cluster service is [`crate::peer_gate`]'s decision.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ca_identity::serve::ConnectionInfo;
use ca_identity::tls::{Authorizer, LiveRoots, SvidResolver};
use ca_identity::{SpiffeId, TrustDomain};
use ca_raft::BoxError;
use ca_raft::{Connector, NodeId, NodeInfo};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// How long a TCP connection + TLS handshake to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The SPIFFE ID of ca-node `node_id` in `td`.
pub fn ca_node_id(td: &TrustDomain, node_id: &str) -> Result<SpiffeId, crate::Error> {
    Ok(td.id_with_path(&format!("{}{node_id}", crate::config::CA_NODE_PATH))?)
}

/// The node ID in a `spiffe://TD/ca-node/<id>` SPIFFE ID of `td`, if it is one.
pub fn node_id_of(td: &TrustDomain, id: &SpiffeId) -> Option<String> {
    if !id.is_member_of(td) {
        return None;
    }
    crate::config::node_id_in(id).map(str::to_owned)
}

/// A lazy gRPC channel to `addr` over TLS with `tls` (reconnects as needed).
pub fn tls_channel(addr: &str, tls: Arc<rustls::ClientConfig>) -> Result<Channel, BoxError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true);
    let addr = addr.to_owned();
    let connector = tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
        let tls = tls.clone();
        let addr = addr.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(tls_connect(&addr, tls).await?)) }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// A TCP connection to `addr` and a TLS handshake with `tls` on it, each within its time.
async fn tls_connect(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    // Peers are authenticated by SPIFFE ID, not by name; the name only fills SNI.
    let name = ServerName::try_from("ca-node").expect("valid name");
    tokio::time::timeout(
        CONNECT_TIMEOUT * 3,
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// A client TLS config presenting `svid` and accepting only the server `expected`.
pub fn client_tls(
    svid: &SvidResolver,
    roots: &LiveRoots,
    expected: SpiffeId,
) -> Arc<rustls::ClientConfig> {
    let authorize: Authorizer = Arc::new(move |id: &SpiffeId| *id == expected);
    Arc::new(ca_identity::tls::client_config(
        svid.clone(),
        roots.clone(),
        authorize,
    ))
}

/// A client TLS config presenting `svid` (if set) and accepting any ca-node of `td`.
pub fn any_node_tls(
    svid: &SvidResolver,
    roots: &LiveRoots,
    td: TrustDomain,
) -> Arc<rustls::ClientConfig> {
    let authorize: Authorizer = Arc::new(move |id: &SpiffeId| node_id_of(&td, id).is_some());
    Arc::new(ca_identity::tls::client_config(
        svid.clone(),
        roots.clone(),
        authorize,
    ))
}

/// Makes Raft channels to other members: mutually authenticated TLS, this node's SVID as
/// client certificate, the peer verified as `spiffe://TD/ca-node/<its node id>`.
#[derive(Clone, Debug)]
pub struct TlsConnector {
    svid: SvidResolver,
    roots: LiveRoots,
    td: TrustDomain,
}

impl TlsConnector {
    /// A connector presenting `svid` and trusting `roots` (both live: renewals and root
    /// changes apply to new connections).
    pub fn new(svid: SvidResolver, roots: LiveRoots, td: TrustDomain) -> Self {
        Self { svid, roots, td }
    }
}

#[async_trait]
impl Connector for TlsConnector {
    async fn connect(&self, _id: NodeId, node: &NodeInfo) -> Result<Channel, BoxError> {
        let expected = ca_node_id(&self.td, &node.node_id)?;
        tls_channel(&node.addr, client_tls(&self.svid, &self.roots, expected))
    }
}

/// The TLS connection a node-port request came on.
fn tls_info(ext: &tonic::Extensions) -> Option<&TlsConnectInfo<TcpConnectInfo>> {
    ext.get::<ConnectionInfo<TlsConnectInfo<TcpConnectInfo>>>()
        .map(|c| &c.transport)
}

/// The client certificate chain (leaf first) a node-port request came with, verified at
/// the handshake against the trust bundle.
pub(crate) fn peer_certs(
    ext: &tonic::Extensions,
) -> Option<std::sync::Arc<Vec<CertificateDer<'static>>>> {
    tls_info(ext).and_then(|i| i.peer_certs())
}

/// The network address a node-port request came from.
pub(crate) fn remote_addr(ext: &tonic::Extensions) -> Option<std::net::SocketAddr> {
    tls_info(ext).and_then(|i| i.get_ref().remote_addr())
}

/// The node ID of the ca-node calling, from its client certificate (verified at the
/// handshake against the trust bundle); refused unless it is `spiffe://TD/ca-node/<id>`.
pub fn ca_node_caller<T>(td: &TrustDomain, req: &Request<T>) -> Result<String, Status> {
    let certs = peer_certs(req.extensions());
    node_of_certs(td, certs.as_deref().map(|c| c.as_slice()))
}

/// The node ID in a verified client certificate chain (leaf first), if it is a ca-node's.
pub(crate) fn node_of_certs(
    td: &TrustDomain,
    certs: Option<&[CertificateDer<'_>]>,
) -> Result<String, Status> {
    let certs = certs.ok_or_else(|| {
        Status::unauthenticated("only ca-nodes may call this: present a ca-node SVID")
    })?;
    let id = ca_identity::tls::peer_id(certs)
        .ok_or_else(|| Status::unauthenticated("the client certificate has no SPIFFE ID"))?;
    node_id_of(td, &id).ok_or_else(|| {
        Status::permission_denied(format!(
            "{id} is not a ca-node of {td}; only spiffe://{td}/ca-node/* may call this"
        ))
    })
}

/// The serial (hex) of the caller's client certificate.
pub fn caller_serial<T>(req: &Request<T>) -> Option<String> {
    let certs = peer_certs(req.extensions())?;
    let leaf = certs.first()?;
    ca_identity::x509::cert_info(leaf.as_ref())
        .ok()
        .map(|i| i.serial_hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ca_node_ids_of_the_trust_domain_are_nodes() {
        let td = TrustDomain::new("example.org").unwrap();
        let p = |s: &str| SpiffeId::parse(s).unwrap();
        assert_eq!(
            node_id_of(&td, &p("spiffe://example.org/ca-node/n-2")),
            Some("n-2".into())
        );
        for s in [
            "spiffe://example.org/agent/ca-node/x",
            "spiffe://example.org/ca-node",
            "spiffe://example.org/ca-node/a/b",
            "spiffe://other.org/ca-node/n-2",
            "spiffe://example.org/service/x",
        ] {
            assert_eq!(node_id_of(&td, &p(s)), None, "{s}");
        }
    }

    #[test]
    fn callers_without_a_certificate_are_refused() {
        let td = TrustDomain::new("example.org").unwrap();
        let err = ca_node_caller(&td, &Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
}
