//! The PKCS#11 backend against a real SoftHSM2 token.
//!
//! SoftHSM2 must be installed (Debian package `softhsm2`): the module is taken from
//! `SOFTHSM2_MODULE` or the standard Debian locations, and the tests FAIL, never skip, when
//! it is not there.
//!
//! How the tests share one process: see [`ca_test_support::softhsm`]. Every test holds a
//! [`SoftHsm`] (its own configuration and token directory, and the process-wide lock) for
//! its whole run; a key manager opened on a new token initializes the module again to find
//! it: the same path that finds a token plugged in after start.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ca_kms::pkcs11::{Pkcs11Config, Pkcs11KeyManager};
use ca_kms::{Error, KeyAlgorithm, KeyManager};
use ca_test_support::softhsm::{raw_init, raw_slot, SoftHsm, PIN};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

async fn sign_verifies(key: &Arc<dyn ca_kms::SigningKey>, msg: &[u8]) {
    let sig = key.sign(msg).await.unwrap();
    ca_identity::pubkey::verify_x509_signature(key.public_key_spki(), msg, &sig).unwrap();
}

#[tokio::test]
async fn softhsm_backend_conforms() {
    let hsm = SoftHsm::new().await;
    hsm.init_token("conformance");
    let cfg = hsm.config("conformance", "ca-");
    crate::common::conformance(
        move || Arc::new(Pkcs11KeyManager::open(&cfg).unwrap()),
        &[
            KeyAlgorithm::EcP256,
            KeyAlgorithm::EcP384,
            KeyAlgorithm::Rsa2048,
            KeyAlgorithm::Rsa3072,
        ],
        false,
    )
    .await;
    let km = hsm.open("conformance", "ca-");
    assert_eq!(km.backend(), "pkcs11");
    assert!(km.is_production_grade());
}

#[tokio::test]
async fn keys_are_generated_in_the_token_and_never_extractable() {
    let hsm = SoftHsm::new().await;
    hsm.init_token("attrs");
    let km = hsm.open("attrs", "node1-");
    let other = hsm.open("attrs", "node2-");
    for (name, alg) in [("ec", KeyAlgorithm::EcP256), ("rsa", KeyAlgorithm::Rsa2048)] {
        km.generate(name, alg).await.unwrap();
        let prot = km.protection(name).await.unwrap();
        assert!(!prot.extractable, "{}", prot.detail);
        assert!(
            prot.detail.contains("CKA_EXTRACTABLE=false"),
            "{}",
            prot.detail
        );
        assert!(
            prot.detail.contains("CKA_SENSITIVE=true"),
            "{}",
            prot.detail
        );
        assert!(
            prot.detail.contains("CKA_NEVER_EXTRACTABLE=true"),
            "{}",
            prot.detail
        );

        // Read the objects directly, as any PKCS#11 tool would.
        let ctx = hsm.raw();
        let session = ctx.open_ro_session(raw_slot(&ctx, "attrs")).unwrap();
        let _ = session.login(UserType::User, Some(&AuthPin::from(PIN.to_string())));
        let label = format!("node1-{name}").into_bytes();
        let find = |class| {
            session
                .find_objects(&[Attribute::Class(class), Attribute::Label(label.clone())])
                .unwrap()
        };
        let private = find(ObjectClass::PRIVATE_KEY);
        let public = find(ObjectClass::PUBLIC_KEY);
        assert_eq!((private.len(), public.len()), (1, 1));
        let attrs = session
            .get_attributes(
                private[0],
                &[
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Sign,
                    AttributeType::Id,
                ],
            )
            .unwrap();
        let mut id = None;
        for a in &attrs {
            match a {
                Attribute::Token(b) | Attribute::Private(b) | Attribute::Sensitive(b) => {
                    assert!(*b, "{a:?}")
                }
                Attribute::NeverExtractable(b) | Attribute::Sign(b) => assert!(*b, "{a:?}"),
                Attribute::Extractable(b) => assert!(!*b, "{a:?}"),
                Attribute::Id(v) => id = Some(v.clone()),
                _ => {}
            }
        }
        assert_eq!(attrs.len(), 7, "{attrs:?}");
        let id = id.unwrap();
        assert!(!id.is_empty());
        let pub_id = session
            .get_attributes(public[0], &[AttributeType::Id])
            .unwrap();
        assert_eq!(pub_id, vec![Attribute::Id(id)]);
        // The private value cannot be read.
        let value = session
            .get_attributes(
                private[0],
                &[AttributeType::Value, AttributeType::PrivateExponent],
            )
            .unwrap();
        assert!(value.is_empty(), "private key material readable: {value:?}");
    }
    // Each manager sees the keys of its own prefix only.
    assert_eq!(km.list().await.unwrap(), vec!["ec", "rsa"]);
    assert!(other.list().await.unwrap().is_empty());
    assert!(matches!(other.get("ec").await, Err(Error::NotFound(_))));
    assert_eq!(km.object_label("ec"), "node1-ec");
}

#[tokio::test]
async fn wrong_pin_is_permission_denied() {
    let hsm = SoftHsm::new().await;
    hsm.init_token("pinned");
    let mut cfg = hsm.config("pinned", "ca-");
    cfg.pin_file = Some(hsm.pin_file("999999"));
    let err = Pkcs11KeyManager::open(&cfg).unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    assert!(
        err.to_string().contains("PIN incorrect for token 'pinned'"),
        "{err}"
    );
    // The right PIN from an environment variable works.
    let var = format!("CA_KMS_TEST_PIN_{}", std::process::id());
    std::env::set_var(&var, PIN);
    cfg.pin_file = None;
    cfg.pin_env = Some(var.clone());
    let km = Pkcs11KeyManager::open(&cfg).unwrap();
    km.generate("k", KeyAlgorithm::EcP256).await.unwrap();
    std::env::remove_var(&var);
}

#[tokio::test]
async fn missing_token_is_a_clear_error_listing_the_labels() {
    let hsm = SoftHsm::new().await;
    hsm.init_token("alpha");
    hsm.init_token("beta");
    let err = Pkcs11KeyManager::open(&hsm.config("gamma", "ca-")).unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("no token labelled 'gamma'"), "{msg}");
    assert!(msg.contains("'alpha'") && msg.contains("'beta'"), "{msg}");
}

#[tokio::test]
async fn config_is_checked() {
    let hsm = SoftHsm::new().await;
    let good = hsm.config("t", "ca-");
    good.validate().unwrap();
    let config_err = |cfg: &Pkcs11Config| match Pkcs11KeyManager::open(cfg) {
        Err(Error::Config(m)) => m,
        other => panic!("expected a config error, got {other:?}"),
    };

    let mut both = good.clone();
    both.pin_env = Some("X".into());
    assert!(config_err(&both).contains("exactly one"));
    let mut none = good.clone();
    none.pin_file = None;
    assert!(config_err(&none).contains("no token PIN source"));

    let mut open_file = good.clone();
    let p = hsm.pin_file("1234");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    open_file.pin_file = Some(p.clone());
    let m = config_err(&open_file);
    assert!(m.contains("group or others") && m.contains("0644"), "{m}");

    std::fs::write(&p, "\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(config_err(&open_file).contains("is empty"));
    let mut missing_file = good.clone();
    missing_file.pin_file = Some(hsm.dir().join("nope"));
    assert!(config_err(&missing_file).contains("cannot read PIN file"));

    let mut env = good.clone();
    env.pin_file = None;
    env.pin_env = Some("CA_KMS_TEST_SURELY_UNSET_VARIABLE".into());
    assert!(config_err(&env).contains("is not set"));

    let mut module = good.clone();
    module.module = hsm.dir().join("libnothing.so");
    assert!(config_err(&module).contains("not found"));

    // From TOML: unknown fields are refused, the PIN is never a field.
    let parsed: Pkcs11Config = toml::from_str(
        r#"
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "ca"
        pin_file = "/etc/ca/pin"
        key_label_prefix = "ca-"
        "#,
    )
    .unwrap();
    assert_eq!(parsed.pin_file, Some(PathBuf::from("/etc/ca/pin")));
    assert_eq!(parsed.pin_env, None);
    assert!(toml::from_str::<Pkcs11Config>(
        r#"
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "ca"
        pin = "1234"
        key_label_prefix = "ca-"
        "#,
    )
    .is_err());
}

#[tokio::test]
async fn recovers_when_logged_out_behind_its_back() {
    let hsm = SoftHsm::new().await;
    hsm.init_token("logout");
    let km = hsm.open("logout", "ca-");
    let key = km.generate("k", KeyAlgorithm::EcP256).await.unwrap();
    sign_verifies(&key, b"before").await;

    let ctx = hsm.raw();
    let session = ctx.open_ro_session(raw_slot(&ctx, "logout")).unwrap();
    session.logout().unwrap(); // logs every session of the process out of the token
    drop(session);

    sign_verifies(&key, b"after logout").await;
    assert!(km.stats().relogins >= 1, "{:?}", km.stats());
    // Private objects are invisible while logged out: not a false NotFound, nor an empty list.
    hsm.logout("logout");
    assert_eq!(km.list().await.unwrap(), vec!["k"]);
    hsm.logout("logout");
    km.get("k").await.unwrap();
    hsm.logout("logout");
    assert!(!km.protection("k").await.unwrap().extractable);
}

#[tokio::test]
async fn locked_pin_is_permission_denied_then_recovers() {
    // SoftHSM2 never answers CKR_PIN_LOCKED; the fault module in front of it does, when told.
    let hsm = SoftHsm::new().await;
    hsm.init_token("locked");
    let cfg = hsm.fault_config("locked", "ca-");
    hsm.set_pin_locked(true);
    let err = Pkcs11KeyManager::open(&cfg).unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    assert!(
        err.to_string().contains("PIN locked for token 'locked'"),
        "{err}"
    );

    // Unlocked by its security officer: the same configuration works through the module.
    hsm.set_pin_locked(false);
    let km = Pkcs11KeyManager::open(&cfg).unwrap();
    let key = km.generate("k", KeyAlgorithm::EcP256).await.unwrap();
    sign_verifies(&key, b"unlocked").await;

    // Locked while in use: logged out behind its back, the manager cannot log in again, and
    // says why instead of failing some other way.
    hsm.set_pin_locked(true);
    hsm.logout("locked");
    let err = key.sign(b"while locked").await.unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
    assert!(
        err.to_string().contains("PIN locked for token 'locked'"),
        "{err}"
    );

    // Unlocked again: signing recovers without reopening the manager.
    hsm.set_pin_locked(false);
    sign_verifies(&key, b"unlocked again").await;
    assert!(km.stats().relogins >= 1, "{:?}", km.stats());
}

#[tokio::test]
async fn recovers_when_its_sessions_are_closed() {
    let hsm = SoftHsm::new().await;
    hsm.init_token("closed");
    let km = hsm.open("closed", "ca-");
    let key = km.generate("k", KeyAlgorithm::EcP384).await.unwrap();
    sign_verifies(&key, b"before").await;

    // Another user of the module resets it: every session handle the pool holds is now
    // invalid (CKR_SESSION_HANDLE_INVALID), the token logged out, object handles renumbered.
    let ctx = hsm.raw();
    ctx.clone().finalize().unwrap();
    raw_init(&ctx);

    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            sign_verifies(&key, &i.to_be_bytes()).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(km.stats().sessions_dropped >= 1, "{:?}", km.stats());
    assert_eq!(km.list().await.unwrap(), vec!["k"]);
}

#[tokio::test]
async fn recovers_when_the_module_is_finalized() {
    let hsm = SoftHsm::new().await;
    hsm.init_token("restart");
    let km = hsm.open("restart", "ca-");
    let key = km.generate("k", KeyAlgorithm::Rsa2048).await.unwrap();
    sign_verifies(&key, b"before").await;

    // The module is finalized under the pool (CKR_CRYPTOKI_NOT_INITIALIZED on every call):
    // the manager initializes it again, logs in and finds its key, while 16 tasks sign.
    let restarts = km.stats().module_restarts;
    hsm.raw().finalize().unwrap();
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            sign_verifies(&key, &i.to_be_bytes()).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(km.stats().module_restarts > restarts, "{:?}", km.stats());
    // And a key generated before is still found by a manager opened after.
    let again = hsm.open("restart", "ca-");
    assert_eq!(
        again.get("k").await.unwrap().public_key_spki(),
        key.public_key_spki()
    );
}

#[tokio::test]
async fn removed_token_is_unavailable_then_recovers() {
    let hsm = SoftHsm::new().await;
    hsm.init_token("removable");
    let km = hsm.open("removable", "ca-");
    let key = km.generate("k", KeyAlgorithm::EcP256).await.unwrap();
    sign_verifies(&key, b"before").await;

    // "Unplug" it: its directory goes away.
    hsm.remove_token("removable");

    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match key.sign(b"while removed").await {
            Err(e) => break e,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Ok(_) => panic!("signing still works with the token removed"),
        }
    };
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("removable"), "{err}");
    eprintln!("while removed: {err}");

    // "Plug it back in": signing works again, without a new manager.
    hsm.restore_token("removable");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match key.sign(b"after").await {
            Ok(sig) => {
                ca_identity::pubkey::verify_x509_signature(key.public_key_spki(), b"after", &sig)
                    .unwrap();
                break;
            }
            Err(e) if Instant::now() < deadline => {
                assert!(matches!(e, Error::Unavailable(_)), "{e}");
                tokio::time::sleep(Duration::from_millis(300)).await
            }
            Err(e) => panic!("no recovery after the token came back: {e}"),
        }
    }
}

#[tokio::test]
async fn openssl_verifies_the_signatures() {
    let hsm = SoftHsm::new().await;
    hsm.init_token("openssl");
    let km = hsm.open("openssl", "ca-");
    for (alg, digest) in [
        (KeyAlgorithm::EcP256, "-sha256"),
        (KeyAlgorithm::EcP384, "-sha384"),
        (KeyAlgorithm::Rsa2048, "-sha256"),
    ] {
        let key = km.generate(&format!("k-{alg}"), alg).await.unwrap();
        let msg = format!("message signed by {alg}");
        let sig = key.sign(msg.as_bytes()).await.unwrap();
        let d = hsm.dir();
        std::fs::write(d.join("spki.der"), key.public_key_spki()).unwrap();
        std::fs::write(d.join("msg"), &msg).unwrap();
        std::fs::write(d.join("sig"), &sig).unwrap();
        let out = Command::new("openssl")
            .current_dir(d)
            .args(["dgst", digest, "-keyform", "DER", "-verify", "spki.der"])
            .args(["-signature", "sig", "msg"])
            .output()
            .expect("openssl CLI (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl rejects the {alg} signature: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(d.join("msg"), "another message").unwrap();
        let out = Command::new("openssl")
            .current_dir(d)
            .args(["dgst", digest, "-keyform", "DER", "-verify", "spki.der"])
            .args(["-signature", "sig", "msg"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "openssl accepts a wrong message");
    }
}
