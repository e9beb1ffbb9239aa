//! The key-manager conformance suite shared by every backend's test file.
#![allow(dead_code)]

use std::sync::Arc;

use ca_kms::{Error, KeyAlgorithm, KeyManager};

/// Runs the suite. `open` must return a fresh manager over the same store each call (a
/// "restart"); `algs` are the algorithms the backend must support (P-256 always first).
/// Keys are named `conf-<alg>`; `expect_extractable` is what the backend must report.
pub async fn conformance(
    open: impl Fn() -> Arc<dyn KeyManager>,
    algs: &[KeyAlgorithm],
    expect_extractable: bool,
) {
    assert_eq!(algs.first(), Some(&KeyAlgorithm::EcP256));
    let km = open();
    for &alg in algs {
        let name = format!("conf-{alg}");
        let name = name.as_str();
        let key = km.generate(name, alg).await.unwrap();
        assert_eq!(key.algorithm(), alg);
        // Public key is SPKI, and an independent verifier accepts the signature.
        let msg = b"to be signed by the CA";
        let sig = key.sign(msg).await.unwrap();
        ca_identity::pubkey::verify_x509_signature(key.public_key_spki(), msg, &sig).unwrap();
        assert!(
            ca_identity::pubkey::verify_x509_signature(key.public_key_spki(), b"other", &sig)
                .is_err()
        );
        // The backend itself reports whether the private key can leave it.
        let prot = km.protection(name).await.unwrap();
        assert_eq!(prot.extractable, expect_extractable, "{}", prot.detail);
        // Generating the same name again is refused, not overwritten.
        assert!(matches!(
            km.generate(name, alg).await,
            Err(Error::AlreadyExists(_))
        ));
        // Found again after a "restart" (a fresh manager over the same store).
        let again = open().get(name).await.unwrap();
        assert_eq!(again.public_key_spki(), key.public_key_spki());
        let sig2 = again.sign(msg).await.unwrap();
        ca_identity::pubkey::verify_x509_signature(key.public_key_spki(), msg, &sig2).unwrap();
    }
    // Concurrent signing from many tasks.
    let key = km.get("conf-ec-p256").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let msg = i.to_be_bytes();
            let sig = key.sign(&msg).await.unwrap();
            ca_identity::pubkey::verify_x509_signature(key.public_key_spki(), &msg, &sig).unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let names = km.list().await.unwrap();
    assert!(names.contains(&"conf-ec-p256".to_string()));
    // Errors map to clear kinds.
    assert!(matches!(km.get("missing").await, Err(Error::NotFound(_))));
    assert!(matches!(km.get("bad/name").await, Err(Error::Config(_))));
    let last = format!("conf-{}", algs[algs.len() - 1]);
    km.delete(&last).await.unwrap();
    assert!(matches!(km.get(&last).await, Err(Error::NotFound(_))));
}
