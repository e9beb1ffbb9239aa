//! The key-manager conformance suite, run against every backend available here.
//! Today: the soft backend. The PKCS#11 and AWS KMS backends will run the same checks.

use std::sync::Arc;

use ca_kms::soft::SoftKeyManager;
use ca_kms::{Error, KeyAlgorithm, KeyManager};

async fn conformance(open: impl Fn() -> Arc<dyn KeyManager>) {
    let km = open();
    for (name, alg) in [
        ("conf-p256", KeyAlgorithm::EcP256),
        ("conf-p384", KeyAlgorithm::EcP384),
    ] {
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
    let key = km.get("conf-p256").await.unwrap();
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
    assert!(names.contains(&"conf-p256".to_string()));
    // Errors map to clear kinds.
    assert!(matches!(km.get("missing").await, Err(Error::NotFound(_))));
    assert!(matches!(km.get("bad/name").await, Err(Error::Config(_))));
    km.delete("conf-p384").await.unwrap();
    assert!(matches!(km.get("conf-p384").await, Err(Error::NotFound(_))));
}

#[tokio::test]
async fn soft_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    conformance(move || Arc::new(SoftKeyManager::open(&path).unwrap())).await;
    // Key files are private to the owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("conf-p256.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "key file must not be readable by group or others"
    );
}

#[tokio::test]
async fn soft_backend_refuses_rsa_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let km = SoftKeyManager::open(dir.path()).unwrap();
    let err = km.generate("r", KeyAlgorithm::Rsa2048).await.unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
}
