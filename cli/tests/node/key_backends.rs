//! The scenarios every hardware-style key backend must pass, run once per backend: a
//! PKCS#11 token (SoftHSM2) and AWS KMS (the emulator moto). Where the keys live, that
//! they cannot leave it, what the node mints with them through an agent, a restart, and
//! memory mode keeping the intermediate out of the backend. What only one backend can do
//! wrong (a removed token, a locked PIN; throttling, refused credentials) stays in
//! `hsm_node.rs` and `kms_node.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ca_kms::aws_kms::{AwsKmsManager, TAG_KEY_NAME, TAG_NODE_ID};
use ca_kms::KeyManager;
use ca_node::config::{IntermediateMode, KeyManagerConfig};
use ca_node::NodeConfig;
use ca_state::AuthorityKind;
use ca_test_support::moto;
use ca_test_support::pki::{openssl_verify, verify_signed_by};
use ca_test_support::softhsm::SoftHsm;

use crate::common::node_checks::*;
use crate::common::TD;

/// The workload path these scenarios mint for.
const SERVICE: &str = "key-backend";

/// A key backend under test, with a manager of its own (not the node's) to look inside.
enum Backend {
    /// Token `token` of a SoftHSM2 (held for the whole test: the process-wide PKCS#11 lock).
    Pkcs11 { hsm: SoftHsm, token: String },
    /// The shared KMS emulator, on node ID `node_id`'s aliases and tags.
    AwsKms { node_id: String },
}

impl Backend {
    async fn pkcs11(token: &str) -> Backend {
        let hsm = SoftHsm::new().await;
        hsm.init_token(token);
        Backend::Pkcs11 {
            hsm,
            token: token.into(),
        }
    }

    fn aws_kms(node_id: &str) -> Backend {
        Backend::AwsKms {
            node_id: node_id.into(),
        }
    }

    /// The `key_backend` its authorities record.
    fn name(&self) -> &'static str {
        match self {
            Backend::Pkcs11 { .. } => "pkcs11",
            Backend::AwsKms { .. } => "aws_kms",
        }
    }

    /// What its protection report must say of every CA key.
    fn protection_says(&self) -> &'static [&'static str] {
        match self {
            Backend::Pkcs11 { .. } => &["CKA_EXTRACTABLE=false", "CKA_NEVER_EXTRACTABLE=true"],
            Backend::AwsKms { .. } => {
                &["Origin=AWS_KMS", "KeyUsage=SIGN_VERIFY", "KeyState=Enabled"]
            }
        }
    }

    /// The dev node configuration under `dir` with every key in this backend.
    fn node_config(&self, dir: &Path) -> NodeConfig {
        let mut cfg = ca_dev::node_config(dir);
        match self {
            Backend::Pkcs11 { hsm, token } => {
                cfg.key_manager = KeyManagerConfig::Pkcs11(hsm.config(token, "n1-"));
            }
            Backend::AwsKms { node_id } => {
                cfg.node_id = node_id.clone();
                cfg.key_manager =
                    KeyManagerConfig::AwsKms(moto::fast_config(TD, node_id, &moto::shared().url()));
            }
        }
        cfg
    }

    async fn manager(&self) -> Arc<dyn KeyManager> {
        match self {
            Backend::Pkcs11 { hsm, token } => Arc::new(hsm.open(token, "n1-")),
            Backend::AwsKms { node_id } => Arc::new(
                AwsKmsManager::connect(moto::fast_config(TD, node_id, &moto::shared().url()))
                    .await
                    .unwrap(),
            ),
        }
    }

    /// The usable keys the backend holds for the node, sorted. In KMS, every key tagged
    /// with the node must be enabled (none left scheduled for deletion).
    async fn keys(&self) -> Vec<String> {
        let mut keys = match self {
            Backend::Pkcs11 { .. } => self.manager().await.list().await.unwrap(),
            Backend::AwsKms { node_id } => {
                let mut keys = Vec::new();
                for (name, state) in kms_keys_of(node_id).await {
                    assert_eq!(state, "Enabled", "{name}");
                    keys.push(name);
                }
                keys
            }
        };
        keys.sort();
        keys
    }
}

/// Every KMS key tagged with node `node_id`: its key name (tag) and state.
pub async fn kms_keys_of(node_id: &str) -> Vec<(String, String)> {
    let km = AwsKmsManager::connect(moto::fast_config(TD, node_id, &moto::shared().url()))
        .await
        .unwrap();
    let c = km.client();
    let mut out = Vec::new();
    let keys = c.list_keys().limit(1000).send().await.unwrap();
    for k in keys.keys() {
        let id = k.key_id().unwrap();
        let tags: BTreeMap<String, String> = c
            .list_resource_tags()
            .key_id(id)
            .send()
            .await
            .unwrap()
            .tags()
            .iter()
            .map(|t| (t.tag_key().to_owned(), t.tag_value().to_owned()))
            .collect();
        if tags.get(TAG_NODE_ID).map(String::as_str) != Some(node_id) {
            continue;
        }
        let md = c.describe_key().key_id(id).send().await.unwrap();
        let state = md
            .key_metadata
            .unwrap()
            .key_state()
            .unwrap()
            .as_str()
            .to_owned();
        out.push((tags[TAG_KEY_NAME].clone(), state));
    }
    out.sort();
    out
}

/// `v`, sorted.
pub fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Root, intermediate and JWT keys are generated in the backend, not extractable, and the
/// journal holds their public keys; an agent's workload gets an X.509-SVID through the node
/// API that chains to the root (openssl too) and a JWT-SVID verifies; every signature went
/// to the backend; a restart finds the same root and intermediate there, and makes no key.
async fn keys_live_in_the_backend_and_survive_a_restart(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = backend.node_config(&tmp.path().canonicalize().unwrap());
    let env = ca_dev::DevEnv::start_with(cfg.clone(), |_| {})
        .await
        .expect("node and agent start on the backend");
    let node = &env.node;
    let root = active(node, AuthorityKind::Root).await;
    let int = active(node, AuthorityKind::Intermediate).await;
    let jwt = active(node, AuthorityKind::Jwt).await;
    for a in [&root, &int, &jwt] {
        assert_eq!(a.key_backend, backend.name(), "{a:?}");
    }

    // The backend holds exactly these three keys, none of them extractable, and the public
    // key in the journal is the backend's.
    let keys = backend.keys().await;
    assert_eq!(
        keys,
        sorted(vec![
            root.key_id.clone(),
            int.key_id.clone(),
            jwt.key_id.clone()
        ])
    );
    let km = backend.manager().await;
    for a in [&root, &int, &jwt] {
        let p = km.protection(&a.key_id).await.unwrap();
        assert!(!p.extractable, "{}: {}", a.key_id, p.detail);
        for needle in backend.protection_says() {
            assert!(p.detail.contains(needle), "{}", p.detail);
        }
        let spki = km.get(&a.key_id).await.unwrap().public_key_spki().to_vec();
        assert_eq!(spki, a.public_key, "{}", a.id);
    }

    // An agent's workload gets an X.509-SVID through the node API, chained to the root.
    let uid = nix::unistd::getuid().as_raw();
    let id = format!("spiffe://{TD}/service/{SERVICE}-workload");
    env.register(&id, &[format!("unix:uid:{uid}")])
        .await
        .unwrap();
    env.wait_for_svid(&id, Duration::from_secs(20))
        .await
        .unwrap();
    let cache = env.agent.cache().current();
    let svid = cache
        .svids
        .values()
        .find(|s| s.spiffe_id.as_str() == id)
        .unwrap();
    assert_eq!(svid.chain.len(), 2);
    assert_eq!(svid.chain[1], int.cert_der);
    verify_signed_by(&svid.chain[0], &svid.chain[1]);
    verify_signed_by(&svid.chain[1], &root.cert_der);
    verify_signed_by(&root.cert_der, &root.cert_der);
    assert_eq!(roots(node), vec![root.cert_der.clone()]);
    openssl_verify(&roots(node), &svid.chain);
    check_jwt(node, &mint_jwt(node, SERVICE).await.unwrap());

    // Every signature went to the backend.
    let text = metrics(node).await;
    for (role, min) in [("root", 2.0), ("intermediate", 2.0), ("jwt", 1.0)] {
        let s = format!(
            "ca_keymanager_sign_seconds_count{{backend=\"{}\",role=\"{role}\"}}",
            backend.name()
        );
        assert!(series(&text, &s) >= min, "{s}: {text}");
        assert_eq!(
            series(&text, &format!("ca_keymanager_up{{role=\"{role}\"}}")),
            1.0
        );
    }
    assert!(!text.contains("backend=\"soft\""), "{text}");
    env.shutdown().await;

    // Restart: the same root and intermediate, their keys found in the backend again.
    let node = ca_node::start(cfg).await.expect("restart");
    assert_eq!(roots(&node), vec![root.cert_der.clone()]);
    assert_eq!(node.core.ca().intermediate().unwrap().record.id, int.id);
    let chain = mint_x509(&node, SERVICE).await.unwrap();
    verify_signed_by(&chain[0], &int.cert_der);
    check_jwt(&node, &mint_jwt(&node, SERVICE).await.unwrap());
    assert_eq!(backend.keys().await, keys, "no new keys at restart");
    node.shutdown().await;
}

/// Memory mode with the root in the backend: the intermediate's key is never there, and a
/// restart makes a new intermediate under the same root.
async fn memory_mode_keeps_the_intermediate_out_of_the_backend(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = backend.node_config(tmp.path());
    cfg.intermediate_mode = IntermediateMode::Memory;

    let node = ca_node::start(cfg.clone()).await.unwrap();
    let root = active(&node, AuthorityKind::Root).await;
    let first = active(&node, AuthorityKind::Intermediate).await;
    let jwt = active(&node, AuthorityKind::Jwt).await;
    assert_eq!(root.key_backend, backend.name());
    assert_eq!(jwt.key_backend, backend.name());
    assert_eq!(first.key_backend, "memory");
    let keys = backend.keys().await;
    assert_eq!(keys, sorted(vec![root.key_id.clone(), jwt.key_id.clone()]));
    let chain = mint_x509(&node, SERVICE).await.unwrap();
    verify_signed_by(&chain[0], &first.cert_der);
    verify_signed_by(&first.cert_der, &root.cert_der);
    node.shutdown().await;

    let node = ca_node::start(cfg).await.unwrap();
    let second = active(&node, AuthorityKind::Intermediate).await;
    assert_ne!(second.id, first.id, "a new intermediate after the restart");
    assert_eq!(second.key_backend, "memory");
    assert_eq!(roots(&node), vec![root.cert_der.clone()], "the same root");
    let chain = mint_x509(&node, SERVICE).await.unwrap();
    verify_signed_by(&chain[0], &second.cert_der);
    verify_signed_by(&second.cert_der, &root.cert_der);
    assert_eq!(
        backend.keys().await,
        keys,
        "still only the root and JWT keys"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_keys_live_in_the_token_and_survive_a_restart() {
    keys_live_in_the_backend_and_survive_a_restart(Backend::pkcs11("ca").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_keys_live_in_kms_and_survive_a_restart() {
    keys_live_in_the_backend_and_survive_a_restart(Backend::aws_kms("kms-a")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_memory_mode_keeps_the_intermediate_out_of_the_token() {
    memory_mode_keeps_the_intermediate_out_of_the_backend(Backend::pkcs11("ca-mem").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_memory_mode_keeps_the_intermediate_out_of_kms() {
    memory_mode_keeps_the_intermediate_out_of_the_backend(Backend::aws_kms("kms-b")).await;
}
