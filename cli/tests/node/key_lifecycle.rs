//! Intermediates and JWT keys are replaced at half-life, the old ones retired, and their
//! keys destroyed in the key manager once they have expired (nothing they signed can still
//! be valid), with the journal recording it. Short lifetimes make this take seconds.

use std::time::Duration;

use ca_kms::KeyManager;
use ca_state::{AuthorityKind, AuthorityState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_keys_are_destroyed_after_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ca_dev::node_config(dir.path());
    cfg.ttl.intermediate = 6;
    // Replaced at half-life (prepared at a quarter), as these timings assume.
    cfg.rotation.prepare_fraction = 0.25;
    cfg.rotation.activate_fraction = 0.5;
    cfg.ttl.x509_svid = 3;
    cfg.ttl.agent_svid = 3;
    cfg.ttl.jwt_key = 6;
    cfg.ttl.jwt_svid = 3;
    let keys_dir = cfg.data_dir.join("keys");
    let node = ca_node::start(cfg).await.unwrap();
    let first_int = node.core.ca().intermediate().unwrap().record;
    let soft = ca_kms::soft::SoftKeyManager::open(&keys_dir).unwrap();
    assert!(soft.list().await.unwrap().contains(&first_int.key_id));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (int, jwt) = loop {
        let auths = node.core.state().authorities().await.unwrap();
        let done = |kind| {
            auths
                .iter()
                .find(|a| a.kind == kind && a.state == AuthorityState::Retired && a.key_destroyed)
                .cloned()
        };
        if let (Some(i), Some(j)) = (done(AuthorityKind::Intermediate), done(AuthorityKind::Jwt)) {
            break (i, j);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retired intermediate and JWT key with destroyed keys after 30s: {auths:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(int.id, first_int.id, "the first intermediate goes first");
    let now = ca_identity::unix_now();
    assert!(
        int.not_after < now && jwt.not_after < now,
        "destroyed only after expiry"
    );
    let stored = soft.list().await.unwrap();
    assert!(!stored.contains(&int.key_id), "{stored:?}");
    assert!(!stored.contains(&jwt.key_id), "{stored:?}");
    // The node kept an active intermediate and JWT key the whole time, and still mints.
    let cur = node.core.ca().intermediate().unwrap();
    assert_eq!(cur.record.state, AuthorityState::Active);
    assert!(stored.contains(&cur.record.key_id));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let id = ca_identity::SpiffeId::parse("spiffe://dev.example.org/x").unwrap();
    node.core
        .ca()
        .mint_x509_svid(&id, &key, 3, &[])
        .await
        .unwrap();
    node.shutdown().await;
}
