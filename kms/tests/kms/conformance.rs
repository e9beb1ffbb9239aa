//! The key-manager conformance suite, run against every backend available here.
//! The suite itself is in `common/`; each backend has its own test file that runs it.

use std::sync::Arc;

use ca_kms::soft::SoftKeyManager;
use ca_kms::{Error, KeyAlgorithm, KeyManager};

use crate::common::conformance;

#[tokio::test]
async fn soft_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    conformance(
        move || Arc::new(SoftKeyManager::open(&path).unwrap()),
        &[KeyAlgorithm::EcP256, KeyAlgorithm::EcP384],
        true,
    )
    .await;
    // Key files are private to the owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("conf-ec-p256.key"))
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
