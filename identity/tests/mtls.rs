//! SPIFFE mTLS with the shared configs: the server sees the client's SPIFFE ID, also on a
//! second connection after the client's SVID changed (no session resumption), and a peer
//! outside the bundle or with an unauthorized ID is refused.

use std::sync::Arc;

use ca_identity::tls::{
    client_config, peer_id, server_config, Authorizer, LiveRoots, SvidResolver,
};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Ca {
    cert: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

fn new_ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.subject_alt_names = vec![SanType::URI("spiffe://td".try_into().unwrap())];
    let cert = p.self_signed(&key).unwrap();
    Ca {
        cert: cert.der().to_vec(),
        issuer: Issuer::new(p, key),
    }
}

fn svid(ca: &Ca, id: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (vec![cert.der().to_vec()], key.serialize_der())
}

async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Result<Option<String>, String> {
    let (a, b) = tokio::io::duplex(1 << 16);
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let connector = tokio_rustls::TlsConnector::from(client);
    let srv = tokio::spawn(async move {
        let mut s = acceptor.accept(a).await.map_err(|e| e.to_string())?;
        let id = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(peer_id)
            .map(|i| i.to_string());
        let mut buf = [0u8; 1];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(id)
    });
    let cli = async move {
        let mut c = connector
            .connect(ServerName::try_from("ca-node").unwrap(), b)
            .await
            .map_err(|e| e.to_string())?;
        c.write_all(b"x").await.map_err(|e| e.to_string())?;
        c.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(c)
    };
    let c = cli.await;
    let s = srv.await.unwrap();
    c.and(s)
}

#[tokio::test]
async fn mutual_spiffe_authentication() {
    let ca = new_ca();
    let roots = LiveRoots::new(vec![ca.cert.clone()]);
    let server_svid = SvidResolver::default();
    let (chain, key) = svid(&ca, "spiffe://td/ca-node/n1");
    server_svid.set(&chain, &key).unwrap();
    let server = Arc::new(server_config(server_svid, roots.clone(), false));

    let only_nodes: Authorizer = Arc::new(|id| id.path().starts_with("/ca-node/"));
    let client_svid = SvidResolver::default();
    let client = Arc::new(client_config(
        client_svid.clone(),
        roots.clone(),
        only_nodes.clone(),
    ));

    // No client SVID yet: the handshake works, the server sees no identity.
    assert_eq!(
        handshake(server.clone(), client.clone()).await.unwrap(),
        None
    );
    // With an SVID (same client config, like an agent right after attestation): identified.
    let (chain, key) = svid(&ca, "spiffe://td/agent/a1");
    client_svid.set(&chain, &key).unwrap();
    assert_eq!(
        handshake(server.clone(), client.clone())
            .await
            .unwrap()
            .as_deref(),
        Some("spiffe://td/agent/a1")
    );

    // A server whose ID the client does not authorize is refused.
    let no_one: Authorizer = Arc::new(|_| false);
    let picky = Arc::new(client_config(
        SvidResolver::default(),
        roots.clone(),
        no_one,
    ));
    assert!(handshake(server.clone(), picky).await.is_err());

    // A client certificate from another CA is refused by the server.
    let other = new_ca();
    let stranger = SvidResolver::default();
    let (chain, key) = svid(&other, "spiffe://td/agent/evil");
    stranger.set(&chain, &key).unwrap();
    let roots_both = LiveRoots::new(vec![ca.cert.clone(), other.cert.clone()]);
    let c = Arc::new(client_config(stranger, roots_both, only_nodes));
    assert!(handshake(server, c).await.is_err());
}
