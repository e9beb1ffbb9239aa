//! Real nodes with their CA keys in a PKCS#11 token (SoftHSM2, see
//! [`ca_test_support::softhsm`]): where each key lives, what the node mints with them, a
//! restart, per-role key managers, and the token going away under a running node.
//!
//! Every test holds a [`SoftHsm`] (the process-wide PKCS#11 lock) for its whole run.

use std::path::Path;
use std::time::{Duration, Instant};

use ca_kms::pkcs11::Pkcs11KeyManager;
use ca_kms::KeyManager;
use ca_node::config::{IntermediateMode, KeyManagerConfig};
use ca_node::NodeConfig;
use ca_state::AuthorityKind;
use ca_test_support::http::metric;
use ca_test_support::pki::verify_signed_by;
use ca_test_support::softhsm::SoftHsm;
use ca_test_support::{logs, moto};

use crate::common::node_checks::*;
use crate::common::TD;
use crate::key_backends::sorted;

fn pkcs11(hsm: &SoftHsm, token: &str, prefix: &str) -> KeyManagerConfig {
    KeyManagerConfig::Pkcs11(hsm.config(token, prefix))
}

/// The dev node configuration under `dir` with every key in token `token`.
fn hsm_config(dir: &Path, hsm: &SoftHsm, token: &str) -> NodeConfig {
    let mut cfg = ca_dev::node_config(dir);
    cfg.key_manager = pkcs11(hsm, token, "n1-");
    cfg
}

/// The workload path this file mints for.
const SERVICE: &str = "hsm";

/// The keys in the token, read by a manager of its own (not the node's).
async fn token_keys(hsm: &SoftHsm, token: &str, prefix: &str) -> (Pkcs11KeyManager, Vec<String>) {
    let km = hsm.open(token, prefix);
    let mut keys = km.list().await.unwrap();
    keys.sort();
    (km, keys)
}

/// `err` is the key manager refusing access, and says `what`.
fn assert_permission_denied(err: &ca_node::Error, what: &str) {
    assert!(
        matches!(
            err,
            ca_node::Error::KeyManager(ca_kms::Error::PermissionDenied(_))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(what), "{err}");
}

/// One key manager per role: the root in the token, the JWT key in KMS, the intermediate
/// in memory; the default key manager (software keys) holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_uses_its_own_key_manager() {
    let kms = moto::shared();
    let hsm = SoftHsm::new().await;
    hsm.init_token("ca-roles");
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = ca_dev::node_config(tmp.path());
    cfg.node_id = "roles-1".into();
    let soft_dir = cfg.data_dir.join("keys");
    cfg.key_manager = KeyManagerConfig::Soft {
        dir: Some(soft_dir.clone()),
    };
    cfg.root_key_manager = Some(pkcs11(&hsm, "ca-roles", "r-"));
    cfg.jwt_key_manager = Some(KeyManagerConfig::AwsKms(moto::fast_config(
        TD,
        "roles-1",
        &kms.url(),
    )));
    cfg.intermediate_mode = IntermediateMode::Memory;

    let node = ca_node::start(cfg.clone()).await.unwrap();
    let root = active(&node, AuthorityKind::Root).await;
    let int = active(&node, AuthorityKind::Intermediate).await;
    let jwt = active(&node, AuthorityKind::Jwt).await;
    assert_eq!(
        (
            root.key_backend.as_str(),
            int.key_backend.as_str(),
            jwt.key_backend.as_str()
        ),
        ("pkcs11", "memory", "aws_kms")
    );
    let (_, in_token) = token_keys(&hsm, "ca-roles", "r-").await;
    assert_eq!(in_token, vec![root.key_id.clone()]);
    let aws = ca_kms::aws_kms::AwsKmsManager::connect(moto::fast_config(TD, "roles-1", &kms.url()))
        .await
        .unwrap();
    assert_eq!(aws.list().await.unwrap(), vec![jwt.key_id.clone()]);
    let p = aws.protection(&jwt.key_id).await.unwrap();
    assert!(!p.extractable, "{}", p.detail);
    let soft = ca_kms::soft::SoftKeyManager::open(&soft_dir).unwrap();
    assert!(
        soft.list().await.unwrap().is_empty(),
        "nothing in soft keys"
    );

    let chain = mint_x509(&node, SERVICE).await.unwrap();
    verify_signed_by(&chain[0], &int.cert_der);
    verify_signed_by(&int.cert_der, &root.cert_der);
    check_jwt(&node, &mint_jwt(&node, SERVICE).await.unwrap());
    let text = metrics(&node).await;
    for s in [
        "ca_keymanager_sign_seconds_count{backend=\"pkcs11\",role=\"root\"}",
        "ca_keymanager_sign_seconds_count{backend=\"memory\",role=\"intermediate\"}",
        "ca_keymanager_sign_seconds_count{backend=\"aws_kms\",role=\"jwt\"}",
    ] {
        assert!(series(&text, s) >= 1.0, "{s}: {text}");
    }
    node.shutdown().await;

    // A restart finds the root in the token and the JWT key in KMS.
    let node = ca_node::start(cfg).await.unwrap();
    assert_eq!(roots(&node), vec![root.cert_der.clone()]);
    assert_eq!(active(&node, AuthorityKind::Jwt).await.id, jwt.id);
    check_jwt(&node, &mint_jwt(&node, SERVICE).await.unwrap());
    node.shutdown().await;
}

/// Key-manager mode: the token goes away under a running node. Minting fails with
/// Unavailable, /readyz says 503 and why, the metrics show it; when the token comes back
/// the node recovers by itself (the maintenance probe), without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_token_makes_the_node_unready_until_it_is_back() {
    let hsm = SoftHsm::new().await;
    hsm.init_token("ca-pull");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = hsm_config(tmp.path(), &hsm, "ca-pull");
    let node = ca_node::start(cfg).await.unwrap();
    assert_eq!(readyz(&node).await.0, 200);
    mint_x509(&node, SERVICE).await.unwrap();
    let errors = "ca_keymanager_errors_total{backend=\"pkcs11\",kind=\"unavailable\"}";
    let before = series(&metrics(&node).await, errors);

    hsm.remove_token("ca-pull");
    let removed = Instant::now();
    let n = &node;
    let err = wait_for(
        "minting fails with the token removed",
        Duration::from_secs(15),
        || async move { mint_x509(n, SERVICE).await.err() },
    )
    .await;
    eprintln!(
        "minting failed {:?} after the token was removed: {err}",
        removed.elapsed()
    );
    assert!(
        matches!(
            err,
            ca_node::Error::KeyManager(ca_kms::Error::Unavailable(_))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("ca-pull"), "{err}");
    let status: tonic::Status = mint_x509(&node, SERVICE).await.unwrap_err().into();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    let err = mint_jwt(&node, SERVICE).await.unwrap_err();
    assert!(
        matches!(
            err,
            ca_node::Error::KeyManager(ca_kms::Error::Unavailable(_))
        ),
        "{err:?}"
    );

    let (code, body) = readyz(&node).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("intermediate key manager (pkcs11)") && body.contains("ca-pull"),
        "{body}"
    );
    assert!(body.contains("JWT key manager (pkcs11)"), "{body}");
    let text = metrics(&node).await;
    assert_eq!(
        metric(&text, "ca_keymanager_up{role=\"intermediate\"}"),
        Some(0.0)
    );
    assert_eq!(metric(&text, "ca_keymanager_up{role=\"jwt\"}"), Some(0.0));
    assert!(series(&text, errors) > before, "{text}");

    // Back: the node notices by itself (no minting from here until it is ready).
    hsm.restore_token("ca-pull");
    let restored = Instant::now();
    wait_for(
        "/readyz 200 after the token is back",
        Duration::from_secs(20),
        || async move { (readyz(n).await.0 == 200).then_some(()) },
    )
    .await;
    let took = restored.elapsed();
    eprintln!("PKCS#11 token back: ready again after {took:?} (maintenance probe every 5s)");
    assert!(took < Duration::from_secs(15), "{took:?}");
    let text = metrics(&node).await;
    assert_eq!(
        metric(&text, "ca_keymanager_up{role=\"intermediate\"}"),
        Some(1.0)
    );
    let chain = mint_x509(&node, SERVICE).await.unwrap();
    verify_signed_by(&chain[0], &chain[1]);
    check_jwt(&node, &mint_jwt(&node, SERVICE).await.unwrap());
    node.shutdown().await;
}

/// Memory mode, the root's token goes away: the node keeps minting X.509-SVIDs with its
/// in-memory intermediate and stays ready; when the intermediate is due for rotation the
/// root is needed, which fails, and the node says so (log, root metrics) while still
/// minting; once the token is back it rotates by itself under the same root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_mode_keeps_minting_while_the_root_token_is_gone() {
    let logs = logs::capture();
    let hsm = SoftHsm::new().await;
    hsm.init_token("ca-root");
    hsm.init_token("ca-jwt");
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = ca_dev::node_config(tmp.path());
    cfg.root_key_manager = Some(pkcs11(&hsm, "ca-root", "r-"));
    cfg.key_manager = pkcs11(&hsm, "ca-jwt", "j-");
    cfg.intermediate_mode = IntermediateMode::Memory;
    // Rotation is due 10 s after the intermediate is made (the maintenance tick then tries
    // it); it is valid for 20 s.
    cfg.ttl.intermediate = 20;
    // Replaced at half-life (prepared at a quarter), as these timings assume.
    cfg.rotation.prepare_fraction = 0.25;
    cfg.rotation.activate_fraction = 0.5;
    cfg.ttl.x509_svid = 4;
    cfg.ttl.agent_svid = 4;
    let node = ca_node::start(cfg).await.unwrap();
    let root = active(&node, AuthorityKind::Root).await;
    let first = active(&node, AuthorityKind::Intermediate).await;
    assert_eq!(first.key_backend, "memory");
    let errors = "ca_keymanager_errors_total{backend=\"pkcs11\",kind=\"unavailable\"}";
    let before = series(&metrics(&node).await, errors);

    hsm.remove_token("ca-root");
    // Until the rotation attempt fails: minting works and the node is ready throughout.
    let (n, first_cert) = (&node, &first.cert_der);
    let noticed = wait_for(
        "the failed rotation shows in the root's metrics",
        Duration::from_secs(20),
        || async move {
            let chain = mint_x509(n, SERVICE)
                .await
                .expect("minting with the root gone");
            assert_eq!(&chain[1], first_cert);
            let (code, body) = readyz(n).await;
            assert_eq!(code, 200, "{body}");
            let text = metrics(n).await;
            (metric(&text, "ca_keymanager_up{role=\"root\"}") == Some(0.0)).then_some(text)
        },
    )
    .await;
    assert!(series(&noticed, errors) > before, "{noticed}");
    assert!(ca_identity::unix_now() < first.not_after);
    let (code, body) = readyz(&node).await;
    assert_eq!(code, 200, "still ready on the old intermediate: {body}");
    verify_signed_by(
        &mint_x509(&node, SERVICE).await.unwrap()[0],
        &first.cert_der,
    );
    let said = logs.lines_with(&["'ca-root'"]);
    assert!(!said.is_empty(), "no log says why:\n{}", logs.text());
    eprintln!("the node says: {}", said[0]);

    hsm.restore_token("ca-root");
    let restored = Instant::now();
    let first_id = &first.id;
    let second = wait_for(
        "a new intermediate once the root is back",
        Duration::from_secs(15),
        || async move {
            let i = n.core.ca().intermediate()?;
            (&i.record.id != first_id).then_some(i.record)
        },
    )
    .await;
    eprintln!("root token back: rotated after {:?}", restored.elapsed());
    verify_signed_by(&second.cert_der, &root.cert_der);
    assert_eq!(roots(&node), vec![root.cert_der.clone()]);
    let text = metrics(&node).await;
    assert_eq!(metric(&text, "ca_keymanager_up{role=\"root\"}"), Some(1.0));
    assert_eq!(readyz(&node).await.0, 200);
    let chain = mint_x509(&node, SERVICE).await.unwrap();
    verify_signed_by(&chain[0], &second.cert_der);
    // The JWT key's token (same module, re-initialized meanwhile) kept working.
    check_jwt(&node, &mint_jwt(&node, SERVICE).await.unwrap());
    node.shutdown().await;
}

/// Key-manager mode with the root in its own token: while that token is gone, a due
/// rotation finds the root unusable before making the new intermediate's key, so no key is
/// made (none leaked, no create-and-delete churn every retry); the node keeps minting with
/// the current intermediate meanwhile, and rotates once the root is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rotation_leaves_no_key_in_the_token() {
    let logs = logs::capture();
    let hsm = SoftHsm::new().await;
    hsm.init_token("ca-root2");
    hsm.init_token("ca-int");
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = ca_dev::node_config(tmp.path());
    cfg.root_key_manager = Some(pkcs11(&hsm, "ca-root2", "r-"));
    cfg.key_manager = pkcs11(&hsm, "ca-int", "i-");
    // Rotation is due 10 s after the intermediate is made; it is valid for 20 s.
    cfg.ttl.intermediate = 20;
    // Replaced at half-life (prepared at a quarter), as these timings assume.
    cfg.rotation.prepare_fraction = 0.25;
    cfg.rotation.activate_fraction = 0.5;
    cfg.ttl.x509_svid = 4;
    cfg.ttl.agent_svid = 4;
    let node = ca_node::start(cfg).await.unwrap();
    let root = active(&node, AuthorityKind::Root).await;
    let first = active(&node, AuthorityKind::Intermediate).await;
    let jwt = active(&node, AuthorityKind::Jwt).await;
    let (_, keys) = token_keys(&hsm, "ca-int", "i-").await;
    assert_eq!(keys, sorted(vec![first.key_id.clone(), jwt.key_id.clone()]));

    hsm.remove_token("ca-root2");
    let (n, first_cert) = (&node, &first.cert_der);
    wait_for(
        "a failed rotation shows in the root's metrics",
        Duration::from_secs(20),
        || async move {
            let chain = mint_x509(n, SERVICE)
                .await
                .expect("minting with the root gone");
            assert_eq!(&chain[1], first_cert);
            assert_eq!(readyz(n).await.0, 200);
            let text = metrics(n).await;
            (metric(&text, "ca_keymanager_up{role=\"root\"}") == Some(0.0)).then_some(())
        },
    )
    .await;
    // The attempts did not make a key in the intermediate token.
    let generated = logs.lines_with(&[
        "generated key in PKCS#11 token",
        "int-dev-1-",
        "token=ca-int",
    ]);
    assert_eq!(
        generated.len(),
        1,
        "only the first intermediate's key may have been made: {generated:#?}"
    );
    let (_, during) = token_keys(&hsm, "ca-int", "i-").await;
    assert_eq!(during, keys, "a key left behind by the failed rotation");

    hsm.restore_token("ca-root2");
    let first_id = &first.id;
    let second = wait_for(
        "a new intermediate once the root is back",
        Duration::from_secs(15),
        || async move {
            let i = n.core.ca().intermediate()?;
            (&i.record.id != first_id).then_some(i.record)
        },
    )
    .await;
    verify_signed_by(&second.cert_der, &root.cert_der);
    let (_, after) = token_keys(&hsm, "ca-int", "i-").await;
    let journal: Vec<String> = node
        .core
        .state()
        .authorities()
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.kind != AuthorityKind::Root && !a.key_destroyed)
        .map(|a| a.key_id)
        .collect();
    assert_eq!(
        after,
        sorted(journal),
        "the token holds the journal's keys only"
    );
    assert!(after.contains(&second.key_id), "{after:?}");
    node.shutdown().await;
}

/// A wrong PIN is fatal at start, with a message naming the token; in process and from
/// the `ca-node` binary with a TOML configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pin_at_start_is_a_clear_fatal_error() {
    let hsm = SoftHsm::new().await;
    hsm.init_token("ca-pin");
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = hsm_config(tmp.path(), &hsm, "ca-pin");
    let mut p11 = hsm.config("ca-pin", "n1-");
    p11.pin_file = Some(hsm.pin_file("999999"));
    cfg.key_manager = KeyManagerConfig::Pkcs11(p11.clone());
    let err = ca_node::start(cfg).await.unwrap_err();
    assert_permission_denied(&err, "PIN incorrect for token 'ca-pin'");

    let dir = tmp.path().join("proc");
    std::fs::create_dir(&dir).unwrap();
    let toml = format!(
        "node_id = \"pin-1\"\ntrust_domain = \"{TD}\"\ndata_dir = {:?}\nnode_listen = \"127.0.0.1:0\"\nadmin_socket = {:?}\n\n[key_manager]\ntype = \"pkcs11\"\nmodule = {:?}\ntoken_label = \"ca-pin\"\npin_file = {:?}\nkey_label_prefix = \"n1-\"\n",
        dir.join("data"),
        dir.join("admin.sock"),
        p11.module,
        p11.pin_file.unwrap(),
    );
    let conf = dir.join("node.toml");
    std::fs::write(&conf, toml).unwrap();
    let started = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ca-node"))
        .arg("run")
        .arg("--config")
        .arg(&conf)
        .env("SOFTHSM2_CONF", hsm.conf())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("ca-node exits by itself")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Error: key manager refused access: PIN incorrect for token 'ca-pin'"),
        "{stderr}"
    );
    eprintln!(
        "ca-node exited after {:?}: {}",
        started.elapsed(),
        stderr.trim()
    );
}

/// A locked user PIN (through the fault module in front of SoftHSM2, which cannot lock one
/// itself): minting fails with a permission error naming the token, the node reports
/// not-ready and says why, and it recovers by itself once the PIN is unlocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_pin_makes_the_node_unready_until_it_is_unlocked() {
    let hsm = SoftHsm::new().await;
    hsm.init_token("ca-lock");
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = hsm_config(tmp.path(), &hsm, "ca-lock");
    cfg.key_manager = KeyManagerConfig::Pkcs11(hsm.fault_config("ca-lock", "n1-"));
    let node = ca_node::start(cfg).await.unwrap();
    mint_x509(&node, SERVICE).await.unwrap();
    let errors = "ca_keymanager_errors_total{backend=\"pkcs11\",kind=\"permission_denied\"}";
    let before = series(&metrics(&node).await, errors);

    // Locked, and the token's sessions logged out (as when the PIN is locked from outside).
    hsm.set_pin_locked(true);
    hsm.logout("ca-lock");
    let err = mint_x509(&node, SERVICE).await.unwrap_err();
    assert_permission_denied(&err, "PIN locked for token 'ca-lock'");
    let n = &node;
    let body = wait_for(
        "/readyz 503 with the PIN locked",
        Duration::from_secs(20),
        || async move {
            let (code, body) = readyz(n).await;
            (code == 503).then_some(body)
        },
    )
    .await;
    assert!(body.contains("PIN locked for token 'ca-lock'"), "{body}");
    assert!(series(&metrics(&node).await, errors) > before);

    hsm.set_pin_locked(false);
    wait_for(
        "/readyz 200 after the PIN is unlocked",
        Duration::from_secs(20),
        || async move { (readyz(n).await.0 == 200).then_some(()) },
    )
    .await;
    let chain = mint_x509(&node, SERVICE).await.unwrap();
    verify_signed_by(&chain[0], &chain[1]);
    node.shutdown().await;
}
