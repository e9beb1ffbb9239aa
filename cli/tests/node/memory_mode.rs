//! intermediate_mode = "memory": the intermediate's key exists only in RAM, signed by the
//! key-manager root; every restart makes a new one and retires the old; SVIDs chain to the
//! same root throughout; metrics label those signatures `memory`.

use ca_kms::KeyManager;
use ca_node::config::IntermediateMode;
use ca_state::{AuthorityKind, AuthorityState};

fn verify_signed_by(child_der: &[u8], issuer_der: &[u8]) {
    let (_, child) = x509_parser::parse_x509_certificate(child_der).unwrap();
    let (_, issuer) = x509_parser::parse_x509_certificate(issuer_der).unwrap();
    ca_identity::pubkey::verify_x509_signature(
        issuer.public_key().raw,
        child.tbs_certificate.as_ref(),
        &child.signature_value.data,
    )
    .expect("signature by the issuer");
}

async fn mint(node: &ca_node::NodeHandle) -> Vec<Vec<u8>> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let id = ca_identity::SpiffeId::parse("spiffe://dev.example.org/service/mem").unwrap();
    node.core
        .ca()
        .mint_x509_svid(&id, &key, 60, &[])
        .await
        .unwrap()
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_intermediate_never_reaches_the_key_manager_and_is_replaced_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ca_dev::node_config(dir.path());
    cfg.intermediate_mode = IntermediateMode::Memory;
    let keys_dir = cfg.data_dir.join("keys");

    let node = ca_node::start(cfg.clone()).await.unwrap();
    let first = node
        .core
        .ca()
        .intermediate()
        .expect("an active intermediate");
    assert_eq!(first.record.key_backend, "memory");
    let root = node.core.ca().bundle().unwrap().x509_authorities.clone();
    assert_eq!(root.len(), 1);

    // The soft key manager holds the root and the JWT key, never the intermediate.
    let soft = ca_kms::soft::SoftKeyManager::open(&keys_dir).unwrap();
    let stored = soft.list().await.unwrap();
    assert!(stored.iter().any(|k| k.starts_with("root-")), "{stored:?}");
    assert!(stored.iter().any(|k| k.starts_with("jwt-")), "{stored:?}");
    assert!(
        !stored.contains(&first.record.id),
        "memory-mode intermediate key must not be stored: {stored:?}"
    );

    let chain = mint(&node).await;
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], first.record.cert_der);
    verify_signed_by(&chain[0], &chain[1]);
    verify_signed_by(&chain[1], &root[0]);
    let leaf = ca_identity::x509::cert_info(&chain[0]).unwrap();
    assert!(leaf.not_after <= first.record.not_after);

    let text = node.core.metrics().render();
    assert!(
        metric(
            &text,
            "ca_keymanager_sign_seconds_count{backend=\"memory\",role=\"intermediate\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "ca_keymanager_sign_seconds_count{backend=\"soft\",role=\"root\"}"
        ) >= 2.0,
        "the root signed itself and the intermediate: {text}"
    );
    node.shutdown().await;

    // Restart: the key died with the process, so a new intermediate is made under the same
    // root and the old one is retired in the journal.
    let node = ca_node::start(cfg).await.unwrap();
    let second = node.core.ca().intermediate().unwrap();
    assert_ne!(second.record.id, first.record.id);
    assert_eq!(node.core.ca().bundle().unwrap().x509_authorities, root);
    let auths = node.core.state().authorities().await.unwrap();
    let old = auths.iter().find(|a| a.id == first.record.id).unwrap();
    assert_eq!(old.state, AuthorityState::Retired);
    let active: Vec<_> = auths
        .iter()
        .filter(|a| a.kind == AuthorityKind::Intermediate && a.state == AuthorityState::Active)
        .collect();
    assert_eq!(active.len(), 1, "exactly one active intermediate");
    let chain = mint(&node).await;
    verify_signed_by(&chain[0], &second.record.cert_der);
    verify_signed_by(&chain[1], &root[0]);
    node.shutdown().await;
}

#[test]
fn memory_mode_refuses_an_intermediate_key_manager() {
    let text = "node_id = \"n1\"\ntrust_domain = \"dev.example.org\"\ndata_dir = \"/tmp/x\"\nintermediate_mode = \"memory\"\n[intermediate_key_manager]\ntype = \"soft\"\n";
    let err = ca_node::NodeConfig::parse(text).unwrap_err().to_string();
    assert!(err.contains("intermediate_key_manager"), "{err}");
}
