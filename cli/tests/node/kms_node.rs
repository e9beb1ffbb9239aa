//! Real nodes with their CA keys in AWS KMS (the emulator moto, and a fault-injecting proxy
//! in front of it; see [`ca_test_support::moto`] and [`ca_test_support::kms_proxy`]):
//! where each key lives, what the node mints with them, a restart, and KMS failing under a
//! running node (outage, throttling, refused credentials, a failure in the middle of
//! preparing an authority).
//!
//! The tests share one emulator; each uses its own node ID, hence its own aliases and tags.

use std::time::{Duration, Instant};

use ca_kms::aws_kms::{AwsKmsConfig, AwsKmsManager};
use ca_kms::KeyManager;
use ca_node::config::{IntermediateMode, KeyManagerConfig};
use ca_node::{NodeConfig, NodeHandle};
use ca_state::{AuthorityKind, AuthorityRecord};
use ca_test_support::http::metric;
use ca_test_support::kms_proxy::{Proxy, Rule};
use ca_test_support::pki::verify_signed_by;
use ca_test_support::{logs, moto};

use crate::common::node_checks::*;
use crate::common::TD;
use crate::key_backends::kms_keys_of;

fn kms_config(node_id: &str, endpoint: &str) -> AwsKmsConfig {
    moto::fast_config(TD, node_id, endpoint)
}

/// The dev node configuration under `dir` as node `node_id`, every key in KMS at `endpoint`.
fn node_config(dir: &std::path::Path, node_id: &str, endpoint: &str) -> NodeConfig {
    let mut cfg = ca_dev::node_config(dir);
    cfg.node_id = node_id.into();
    cfg.key_manager = KeyManagerConfig::AwsKms(kms_config(node_id, endpoint));
    cfg
}

/// A manager of its own (not the node's) on node `node_id`'s aliases, straight to moto.
async fn own_manager(node_id: &str) -> AwsKmsManager {
    AwsKmsManager::connect(kms_config(node_id, &moto::shared().url()))
        .await
        .unwrap()
}

/// The workload path this file mints for.
const SERVICE: &str = "kms";

/// This node's authorities of `kind` (any state).
async fn authorities(node: &NodeHandle, kind: AuthorityKind) -> Vec<AuthorityRecord> {
    let auths = node.core.state().authorities().await.unwrap();
    auths.into_iter().filter(|a| a.kind == kind).collect()
}

const KMS_UNAVAILABLE: &str =
    "ca_keymanager_errors_total{backend=\"aws_kms\",kind=\"unavailable\"}";

/// One `BatchNewX509Svid` call over the node API has the KMS signatures of its CSRs in
/// flight together, not one after another: with every `Sign` held 500 ms by the proxy, the
/// node's `ca_keymanager_in_flight` gauge reaches the number of good CSRs in the call. The
/// results keep the request order, a bad CSR in the middle fails on its own, and every
/// SVID verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_has_its_kms_signatures_in_flight_together() {
    use ca_proto::node::{BatchNewX509SvidRequest, NewX509SvidParams};
    const GOOD: usize = 6;
    let kms = moto::shared();
    let proxy = Proxy::start(kms.port()).await;
    let tmp = tempfile::tempdir().unwrap();
    let node = ca_node::start(node_config(tmp.path(), "kms-batch", &proxy.url()))
        .await
        .unwrap();
    let agent_id = format!("spiffe://{TD}/agent/batch");
    let svid = crate::common::new_agent(&node, &agent_id).await;
    let entry = node
        .core
        .validate_entry(
            &crate::common::entry(
                &format!("spiffe://{TD}/workload/batch"),
                &agent_id,
                &["unix:uid:1000"],
            ),
            uuid::Uuid::new_v4().to_string(),
            ca_identity::unix_now(),
        )
        .unwrap();
    ca_node::core::propose(
        node.core.proposer(),
        ca_state::Command::CreateEntry {
            entry: entry.clone(),
        },
    )
    .await
    .unwrap();
    // GOOD good CSRs with an empty one in the middle.
    let params: Vec<NewX509SvidParams> = (0..=GOOD)
        .map(|i| NewX509SvidParams {
            entry_id: entry.id.clone(),
            csr: if i == GOOD / 2 {
                vec![]
            } else {
                ca_agent::attest::new_key_and_csr().unwrap().0
            },
        })
        .collect();

    let mut client = crate::common::agent_client(&node, &svid);
    proxy.rule(Rule::slow("Sign", None, Duration::from_millis(500)));
    let started = Instant::now();
    let call = tokio::spawn(async move {
        client
            .batch_new_x509_svid(BatchNewX509SvidRequest { params })
            .await
    });
    let mut most = 0.0f64;
    while !call.is_finished() {
        most = most.max(series(&metrics(&node).await, "ca_keymanager_in_flight"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let results = call
        .await
        .unwrap()
        .expect("the batch answers")
        .into_inner()
        .results;
    eprintln!("batch of {} answered in {:?}", GOOD + 1, started.elapsed());
    proxy.clear_rules();
    assert!(
        most >= GOOD as f64,
        "at most {most} key-manager operations were in flight during a batch of {GOOD} good CSRs"
    );
    assert_eq!(results.len(), GOOD + 1);
    let int = active(&node, AuthorityKind::Intermediate).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.entry_id, entry.id);
        if i == GOOD / 2 {
            assert!(r.svid_chain.is_empty(), "item {i}");
            assert!(
                r.error.contains("the CSR is empty"),
                "item {i}: {}",
                r.error
            );
        } else {
            assert!(r.error.is_empty(), "item {i}: {}", r.error);
            assert_eq!(r.svid_chain[1], int.cert_der, "item {i}");
            verify_signed_by(&r.svid_chain[0], &int.cert_der);
        }
    }
    node.shutdown().await;
}

/// KMS goes away (the endpoint stops answering) under a node with its intermediate in KMS:
/// minting fails with Unavailable, /readyz is 503 and says why, the metrics show it; when
/// KMS is back the node recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_makes_the_node_unready_until_kms_is_back() {
    let kms = moto::shared();
    let proxy = Proxy::start(kms.port()).await;
    let tmp = tempfile::tempdir().unwrap();
    let node = ca_node::start(node_config(tmp.path(), "kms-out", &proxy.url()))
        .await
        .unwrap();
    assert_eq!(readyz(&node).await.0, 200);
    let before = series(&metrics(&node).await, KMS_UNAVAILABLE);

    proxy.stop();
    let t = Instant::now();
    let err = mint_x509(&node, SERVICE).await.unwrap_err();
    eprintln!(
        "minting with KMS down failed after {:?}: {err}",
        t.elapsed()
    );
    assert!(
        matches!(
            err,
            ca_node::Error::KeyManager(ca_kms::Error::Unavailable(_))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("Sign"), "{err}");
    let status: tonic::Status = err.into();
    assert_eq!(status.code(), tonic::Code::Unavailable);
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
        body.contains("intermediate key manager (aws_kms)")
            && body.contains("JWT key manager (aws_kms)")
            && body.contains("cannot reach the KMS endpoint"),
        "{body}"
    );
    let text = metrics(&node).await;
    assert_eq!(
        metric(&text, "ca_keymanager_up{role=\"intermediate\"}"),
        Some(0.0)
    );
    assert!(series(&text, KMS_UNAVAILABLE) >= before + 2.0, "{text}");

    proxy.restart().await;
    let back = Instant::now();
    let n = &node;
    wait_for(
        "/readyz 200 after KMS is back",
        Duration::from_secs(20),
        || async move { (readyz(n).await.0 == 200).then_some(()) },
    )
    .await;
    let took = back.elapsed();
    eprintln!("KMS back: ready again after {took:?} (maintenance probe every 5s)");
    assert!(took < Duration::from_secs(12), "{took:?}");
    let text = metrics(&node).await;
    assert_eq!(
        metric(&text, "ca_keymanager_up{role=\"intermediate\"}"),
        Some(1.0)
    );
    verify_signed_by(
        &mint_x509(&node, SERVICE).await.unwrap()[0],
        &node.core.ca().intermediate().unwrap().record.cert_der,
    );
    check_jwt(&node, &mint_jwt(&node, SERVICE).await.unwrap());
    node.shutdown().await;
}

/// Throttling: requests KMS throttles are retried with backoff and minting succeeds, with
/// no error counted and the node ready; throttling that does not stop fails minting with
/// Unavailable (naming the throttling), and the node recovers by itself when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_absorbed_by_retries() {
    let kms = moto::shared();
    let proxy = Proxy::start(kms.port()).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = node_config(tmp.path(), "kms-thr", &proxy.url());
    let KeyManagerConfig::AwsKms(k) = &mut cfg.key_manager else {
        unreachable!()
    };
    k.max_attempts = 10;
    let node = ca_node::start(cfg).await.unwrap();
    let before = series(&metrics(&node).await, KMS_UNAVAILABLE);

    // 8 throttled answers among 8 concurrent mints: each can be throttled at most 8 times,
    // fewer than its 10 attempts.
    let signs = proxy.count("Sign");
    proxy.rule(Rule::throttle("Sign", 8));
    let mut set = tokio::task::JoinSet::new();
    let node = std::sync::Arc::new(node);
    for _ in 0..8 {
        let n = node.clone();
        set.spawn(async move { mint_x509(&n, SERVICE).await });
    }
    while let Some(r) = set.join_next().await {
        let chain = r.unwrap().expect("minting through throttling");
        verify_signed_by(&chain[0], &chain[1]);
    }
    proxy.rule(Rule::throttle("Sign", 3));
    check_jwt(&node, &mint_jwt(&node, SERVICE).await.unwrap());
    assert_eq!(
        proxy.count("Sign") - signs,
        9 + 8 + 3,
        "every throttled Sign was retried"
    );
    let text = metrics(&node).await;
    assert_eq!(series(&text, KMS_UNAVAILABLE), before, "{text}");
    assert_eq!(
        metric(&text, "ca_keymanager_up{role=\"intermediate\"}"),
        Some(1.0)
    );
    assert_eq!(readyz(&node).await.0, 200);

    // Throttling that does not stop.
    proxy.rule(Rule::throttle("Sign", u32::MAX));
    let err = mint_x509(&node, SERVICE).await.unwrap_err();
    assert!(
        matches!(
            err,
            ca_node::Error::KeyManager(ca_kms::Error::Unavailable(_))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("ThrottlingException"), "{err}");
    let (code, body) = readyz(&node).await;
    assert_eq!(code, 503);
    assert!(body.contains("ThrottlingException"), "{body}");
    assert!(series(&metrics(&node).await, KMS_UNAVAILABLE) > before);
    proxy.clear_rules();
    let calm = Instant::now();
    let n = &*node;
    wait_for(
        "/readyz 200 after the throttling stops",
        Duration::from_secs(20),
        || async move { (readyz(n).await.0 == 200).then_some(()) },
    )
    .await;
    eprintln!("throttling stopped: ready again after {:?}", calm.elapsed());
    mint_x509(&node, SERVICE).await.unwrap();
    std::sync::Arc::try_unwrap(node).unwrap().shutdown().await;
}

/// Memory mode, the root's KMS endpoint goes away (the JWT key is behind another endpoint):
/// the node keeps minting X.509-SVIDs and stays ready; the rotation that needs the root
/// fails and the node says so (log, root metrics) while still minting; once the root's KMS
/// is back it rotates by itself under the same root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_mode_keeps_minting_while_the_root_kms_is_down() {
    let logs = logs::capture();
    let kms = moto::shared();
    let root_proxy = Proxy::start(kms.port()).await;
    let other_proxy = Proxy::start(kms.port()).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = node_config(tmp.path(), "kms-mem", &other_proxy.url());
    cfg.root_key_manager = Some(KeyManagerConfig::AwsKms(kms_config(
        "kms-mem",
        &root_proxy.url(),
    )));
    cfg.intermediate_mode = IntermediateMode::Memory;
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
    let before = series(&metrics(&node).await, KMS_UNAVAILABLE);

    root_proxy.stop();
    let (n, first_cert) = (&node, &first.cert_der);
    let noticed = wait_for(
        "the failed rotation shows in the root's metrics",
        Duration::from_secs(20),
        || async move {
            let chain = mint_x509(n, SERVICE)
                .await
                .expect("minting with the root's KMS down");
            assert_eq!(&chain[1], first_cert);
            let (code, body) = readyz(n).await;
            assert_eq!(code, 200, "{body}");
            let text = metrics(n).await;
            (metric(&text, "ca_keymanager_up{role=\"root\"}") == Some(0.0)).then_some(text)
        },
    )
    .await;
    assert!(series(&noticed, KMS_UNAVAILABLE) > before, "{noticed}");
    assert_eq!(
        readyz(&node).await.0,
        200,
        "still ready on the old intermediate"
    );
    check_jwt(&node, &mint_jwt(&node, SERVICE).await.unwrap());
    // The root probe (every maintenance tick) or the failed rotation says why.
    let mut said = logs.lines_with(&["spiffe-ca/dev_example_org/kms-mem/root"]);
    said.extend(logs.lines_with(&["the root's key manager is not usable"]));
    assert!(!said.is_empty(), "no log says why:\n{}", logs.text());
    eprintln!("the node says: {}", said[0]);

    root_proxy.restart().await;
    let back = Instant::now();
    let first_id = &first.id;
    let second = wait_for(
        "a new intermediate once the root's KMS is back",
        Duration::from_secs(15),
        || async move {
            let i = n.core.ca().intermediate()?;
            (&i.record.id != first_id).then_some(i.record)
        },
    )
    .await;
    eprintln!("root's KMS back: rotated after {:?}", back.elapsed());
    verify_signed_by(&second.cert_der, &root.cert_der);
    assert_eq!(roots(&node), vec![root.cert_der.clone()]);
    assert_eq!(
        metric(&metrics(&node).await, "ca_keymanager_up{role=\"root\"}"),
        Some(1.0)
    );
    verify_signed_by(
        &mint_x509(&node, SERVICE).await.unwrap()[0],
        &second.cert_der,
    );
    node.shutdown().await;
}

/// KMS down when the node starts: it starts NOT READY (not an error), and becomes ready by
/// itself once KMS answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_down_at_start_starts_not_ready_then_recovers() {
    let kms = moto::shared();
    let proxy = Proxy::start(kms.port()).await;
    proxy.stop();
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let node = ca_node::start(node_config(tmp.path(), "kms-late", &proxy.url()))
        .await
        .expect("an unavailable KMS at start is not fatal");
    eprintln!("started without KMS in {:?}", started.elapsed());
    let (code, body) = readyz(&node).await;
    assert_eq!(code, 503);
    assert!(body.contains("no active intermediate CA"), "{body}");
    assert!(mint_x509(&node, SERVICE).await.is_err());
    assert_eq!(
        metric(&metrics(&node).await, "ca_keymanager_up{role=\"root\"}"),
        Some(0.0)
    );

    // The start's attempt and the maintenance loop's first (immediate) one have failed.
    let n = &node;
    wait_for(
        "two failed attempts",
        Duration::from_secs(10),
        || async move { (series(&metrics(n).await, KMS_UNAVAILABLE) >= 2.0).then_some(()) },
    )
    .await;
    proxy.restart().await;
    let back = Instant::now();
    wait_for(
        "/readyz 200 once KMS answers",
        Duration::from_secs(20),
        || async move { (readyz(n).await.0 == 200).then_some(()) },
    )
    .await;
    let took = back.elapsed();
    eprintln!("KMS up after a start without it: ready after {took:?}");
    assert!(took < Duration::from_secs(12), "{took:?}");
    assert_eq!(authorities(&node, AuthorityKind::Root).await.len(), 1);
    verify_signed_by(
        &mint_x509(&node, SERVICE).await.unwrap()[0],
        &node.core.ca().intermediate().unwrap().record.cert_der,
    );
    node.shutdown().await;
}

/// Credentials KMS refuses are fatal at start, with a message naming the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_at_start_are_fatal() {
    let kms = moto::shared();
    let proxy = Proxy::start(kms.port()).await;
    proxy.rule(Rule::refuse_credentials("*", None));
    let tmp = tempfile::tempdir().unwrap();
    let err = ca_node::start(node_config(tmp.path(), "kms-creds", &proxy.url()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ca_node::Error::KeyManager(ca_kms::Error::PermissionDenied(_))
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("refused") && msg.contains("UnrecognizedClientException"),
        "{msg}"
    );
    assert!(kms_keys_of("kms-creds").await.is_empty());
}

/// A key made for an authority whose preparation then failed is deleted, not leaked: the
/// public key read after CreateKey/CreateAlias fails (the root's first attempt), then the
/// root's signature over a new intermediate fails (that intermediate's key). The node
/// retries and ends with exactly one live key per authority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_failed_preparations_are_deleted() {
    let kms = moto::shared();
    let proxy = Proxy::start(kms.port()).await;
    proxy.rule(Rule::error(
        "GetPublicKey",
        Some(1),
        400,
        "KMSInvalidStateException",
        "injected: the key is not ready",
    ));
    proxy.rule(
        Rule::error(
            "Sign",
            Some(1),
            400,
            "KMSInvalidStateException",
            "injected: the key is not ready",
        )
        .after(1),
    );
    let tmp = tempfile::tempdir().unwrap();
    let node = ca_node::start(node_config(tmp.path(), "kms-leak", &proxy.url()))
        .await
        .expect("an unavailable KMS at start is not fatal");
    let n = &node;
    wait_for(
        "ready after the injected failures",
        Duration::from_secs(20),
        || async move { (readyz(n).await.0 == 200).then_some(()) },
    )
    .await;
    // At least: root (refused), root again, intermediate (its certificate then refused),
    // intermediate again, JWT key; the root is also looked up before each intermediate is
    // made and by the maintenance probe, so the exact count depends on timing.
    assert!(
        proxy.count("GetPublicKey") >= 5,
        "{}",
        proxy.count("GetPublicKey")
    );

    let root = active(&node, AuthorityKind::Root).await;
    let int = active(&node, AuthorityKind::Intermediate).await;
    let jwt = active(&node, AuthorityKind::Jwt).await;
    for kind in [
        AuthorityKind::Root,
        AuthorityKind::Intermediate,
        AuthorityKind::Jwt,
    ] {
        // A certification that failed leaves its key's record retired and uncertified.
        let certified = authorities(&node, kind)
            .await
            .into_iter()
            .filter(|a| kind == AuthorityKind::Jwt || !a.cert_der.is_empty())
            .count();
        assert_eq!(certified, 1, "{kind:?}");
    }
    let keys = kms_keys_of("kms-leak").await;
    let live: Vec<&str> = keys
        .iter()
        .filter(|(_, s)| s == "Enabled")
        .map(|(n, _)| n.as_str())
        .collect();
    let mut want = vec![
        root.key_id.as_str(),
        int.key_id.as_str(),
        jwt.key_id.as_str(),
    ];
    want.sort();
    assert_eq!(live, want, "{keys:?}");
    let pending: Vec<&str> = keys
        .iter()
        .filter(|(_, s)| s == "PendingDeletion")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(pending.len(), 2, "{keys:?}");
    assert!(pending.iter().any(|n| n.starts_with("root-")), "{keys:?}");
    assert!(pending.iter().any(|n| n.starts_with("int-")), "{keys:?}");
    assert_eq!(keys.len(), 5, "{keys:?}");
    let mut aliases = own_manager("kms-leak").await.list().await.unwrap();
    aliases.sort();
    assert_eq!(aliases, want, "only the live keys have aliases");
    node.shutdown().await;
}
