//! Checks on a running in-process node shared by the key-manager node tests
//! (`hsm_node.rs`, `kms_node.rs`): its roots, a JWT-SVID against its bundle, its active
//! authority of a kind, `/readyz` and `/metrics`, minting straight from its CA, and polling
//! until something holds.

use std::time::{Duration, Instant};

use ca_node::NodeHandle;
use ca_state::{AuthorityKind, AuthorityRecord, AuthorityState};
use ca_test_support::http::{get, metric};

use super::TD;

/// The node's current X.509 roots.
pub fn roots(node: &NodeHandle) -> Vec<Vec<u8>> {
    node.core.ca().bundle().unwrap().x509_authorities.clone()
}

/// The JWT-SVID (audience `aud-1`) verifies against the node's JWT bundle.
pub fn check_jwt(node: &NodeHandle, token: &str) {
    let bundle = node.core.ca().bundle().unwrap();
    if let Err(e) = ca_identity::jwt::validate(
        token,
        TD,
        &bundle.jwt_keys(),
        "aud-1",
        ca_identity::unix_now(),
    ) {
        panic!("the JWT-SVID does not verify: {e}");
    }
}

/// The one active authority of `kind` in the node's journal.
pub async fn active(node: &NodeHandle, kind: AuthorityKind) -> AuthorityRecord {
    let auths = node.core.state().authorities().await.unwrap();
    let mut found: Vec<_> = auths
        .into_iter()
        .filter(|a| a.kind == kind && a.state == AuthorityState::Active)
        .collect();
    assert_eq!(found.len(), 1, "one active {kind:?}: {found:#?}");
    found.remove(0)
}

/// `GET /readyz`: status and body.
pub async fn readyz(node: &NodeHandle) -> (u16, String) {
    get(node.http_addr.expect("http_listen"), "/readyz")
        .await
        .expect("GET /readyz")
}

/// `GET /metrics` (must answer 200).
pub async fn metrics(node: &NodeHandle) -> String {
    let (status, body) = get(node.http_addr.expect("http_listen"), "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200);
    body
}

/// The value of series `s` in a metrics page, 0 if absent.
pub fn series(text: &str, s: &str) -> f64 {
    metric(text, s).unwrap_or(0.0)
}

/// Polls `f` every 100 ms until it returns `Some`, or panics with `what` after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Mints an X509-SVID for `spiffe://TD/service/<service>` with a new P-256 key, straight
/// from the node's CA.
pub async fn mint_x509(node: &NodeHandle, service: &str) -> Result<Vec<Vec<u8>>, ca_node::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let id = ca_identity::SpiffeId::parse(&format!("spiffe://{TD}/service/{service}")).unwrap();
    node.core
        .ca()
        .mint_x509_svid(&id, &key, 60, &[])
        .await
        .map_err(ca_node::Error::from)
}

/// Mints a JWT-SVID for `spiffe://TD/service/<service>` (audience `aud-1`), straight from
/// the node's CA.
pub async fn mint_jwt(node: &NodeHandle, service: &str) -> Result<String, ca_node::Error> {
    let id = ca_identity::SpiffeId::parse(&format!("spiffe://{TD}/service/{service}")).unwrap();
    let (token, _) = node
        .core
        .ca()
        .mint_jwt_svid(&id, &["aud-1".to_string()], 60)
        .await?;
    Ok(token)
}
