//! Zero-downtime rotation on a three-node cluster over real sockets (`DevCluster`):
//! - two workloads (alice, bob) get their X.509-SVIDs and bundle from the agent through the
//!   Workload API (the Rust `spiffe` crate's `X509Source`, an independent client) and talk
//!   mutual TLS (rustls; each side verifies the chain against the bundle with webpki and
//!   the peer's SPIFFE ID) without pause through five forced intermediate rotations, one
//!   scheduled rotation, a JWT key rotation and a root rotation: every handshake is
//!   counted and none may fail;
//! - a revoked intermediate: every SVID it signed is replaced on the agent (and pushed to
//!   workloads) within a bound measured and printed, and no node signs with it again,
//!   including its own node, which was down during the revoke and comes back;
//! - rotation while a node is down or the root's key manager is unavailable waits, says
//!   why, and never leaves a node without an active intermediate;
//! - bad admin and CLI input is refused with a clear message and changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use ca_dev::DevCluster;
use ca_node::NodeConfig;
use ca_proto::admin::*;
use ca_state::{AuthorityKind, AuthorityRecord, AuthorityState};
use ca_test_support::mtls::{aki, alice, bob, PickId, Traffic};
use spiffe::{JwtSvid, WorkloadApiClient, X509Source};
use tonic::Code;

const ALICE: &str = "spiffe://dev.example.org/service/alice";
const BOB: &str = "spiffe://dev.example.org/service/bob";

fn td() -> spiffe::TrustDomain {
    spiffe::TrustDomain::new(TD).unwrap()
}

/// Waits until `f` gives `Some`, checking every 100 ms; panics after `timeout`.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn uid_selector() -> String {
    format!("unix:uid:{}", nix::unistd::getuid().as_raw())
}

fn ski(cert: &[u8]) -> Vec<u8> {
    ca_identity::x509::cert_info(cert)
        .unwrap()
        .subject_key_id
        .unwrap()
}

/// Every node's active intermediate, by node ID.
fn active_intermediates(nodes: &[ca_node::NodeHandle]) -> BTreeMap<String, String> {
    nodes
        .iter()
        .map(|n| {
            (
                n.core.config().node_id.clone(),
                n.core
                    .ca()
                    .intermediate()
                    .map(|i| i.record.id)
                    .unwrap_or_default(),
            )
        })
        .collect()
}

async fn journal(node: &ca_node::NodeHandle) -> Vec<AuthorityRecord> {
    node.core.state().authorities().await.unwrap()
}

fn short_lived(_: usize, c: &mut NodeConfig) {
    c.http_listen = None;
    // Intermediates and JWT keys live 30 s: prepared at 15 s, activated at 25 s (the
    // default fractions 1/2 and 5/6), so SVIDs may live 5 s.
    c.ttl.root = 3600;
    c.ttl.intermediate = 30;
    c.ttl.jwt_key = 30;
    c.ttl.x509_svid = 5;
    c.ttl.agent_svid = 5;
    c.ttl.jwt_svid = 5;
    c.rotation.propagation_window = 2;
}

async fn rotate(node: &ca_node::NodeHandle, kind: &str, all: bool) -> RotateAuthorityResponse {
    admin(&node.admin_socket)
        .await
        .rotate_authority(RotateAuthorityRequest {
            kind: kind.into(),
            node_id: String::new(),
            all,
        })
        .await
        .unwrap_or_else(|e| panic!("rotate {kind}: {e}"))
        .into_inner()
}

fn jwt_kid(token: &str) -> String {
    use base64::Engine as _;
    let h = token.split('.').next().unwrap();
    let h = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&h).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workloads_keep_talking_through_every_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let env = DevCluster::start_with(tmp.path(), 3, short_lived)
        .await
        .expect("the cluster starts");
    for id in [ALICE, BOB] {
        env.register(id, &[uid_selector()]).await.unwrap();
        env.wait_for_svid(id, DEADLINE).await.unwrap();
    }
    let endpoint = env.endpoint();
    let source = |id: &'static str| {
        let endpoint = endpoint.clone();
        async move {
            Arc::new(
                X509Source::builder()
                    .endpoint(&endpoint)
                    .picker(PickId(id.to_string()))
                    .build()
                    .await
                    .expect("X509Source"),
            )
        }
    };
    let (alice_src, bob_src) = (source(ALICE).await, source(BOB).await);
    let traffic = Arc::new(Traffic::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(bob(
        listener,
        bob_src.clone(),
        traffic.clone(),
        ALICE.to_string(),
    ));
    let client = tokio::spawn(alice(
        addr,
        alice_src.clone(),
        traffic.clone(),
        BOB.to_string(),
    ));
    let t = &traffic;
    wait_for("first handshakes", DEADLINE, || async move {
        (t.ok.load(Ordering::SeqCst) >= 5).then_some(())
    })
    .await;
    let n0 = &env.nodes[0];

    // Five forced rotations of every node's intermediate.
    for round in 1..=5 {
        let before = active_intermediates(&env.nodes);
        let r = rotate(n0, "intermediate", true).await;
        assert_eq!(r.requests.len(), 3, "{r:?}");
        let nodes = &env.nodes;
        let after = wait_for("every node activated a new intermediate", DEADLINE, || {
            let before = before.clone();
            async move {
                let now = active_intermediates(nodes);
                now.iter()
                    .all(|(n, id)| !id.is_empty() && before[n] != *id)
                    .then_some(now)
            }
        })
        .await;
        eprintln!("forced rotation {round}: {before:?} -> {after:?}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let forced_ok = traffic.ok.load(Ordering::SeqCst);

    // A JWT key rotation: every JWT-SVID the workload gets validates against the JWT
    // bundle it fetched *before* the token (published before use), and a token of the
    // old key keeps validating (the old key stays published).
    let jwt_client = WorkloadApiClient::connect_to(&endpoint).await.unwrap();
    let alice_id = spiffe::SpiffeId::new(ALICE).unwrap();
    let first = jwt_client
        .fetch_jwt_svid(&["billing"], Some(&alice_id))
        .await
        .unwrap();
    let old_kids: BTreeSet<String> = journal(n0)
        .await
        .iter()
        .filter(|a| a.kind == AuthorityKind::Jwt && a.state == AuthorityState::Active)
        .map(|a| a.id.clone())
        .collect();
    assert!(old_kids.contains(&jwt_kid(first.token())));
    rotate(n0, "jwt", true).await;
    let rotated_at = Instant::now();
    let mut tokens = 0;
    let new_token = loop {
        let before = jwt_client.fetch_jwt_bundles().await.unwrap();
        let t = jwt_client
            .fetch_jwt_svid(&["billing"], Some(&alice_id))
            .await
            .unwrap();
        tokens += 1;
        JwtSvid::parse_and_validate(t.token(), &before, &["billing"]).unwrap_or_else(|e| {
            panic!(
                "a JWT-SVID (kid {}) does not validate against the JWT bundle fetched just before it: {e}",
                jwt_kid(t.token())
            )
        });
        if !old_kids.contains(&jwt_kid(t.token())) {
            break t;
        }
        assert!(
            rotated_at.elapsed() < DEADLINE,
            "no JWT-SVID from a new key within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The old key is still published. Its first token still validates unless it has
    // expired by now (a 5 s JWT-SVID TTL; on a loaded machine the new key can take longer).
    let now_bundles = jwt_client.fetch_jwt_bundles().await.unwrap();
    let old_kid = jwt_kid(first.token());
    assert!(
        now_bundles
            .get(&td())
            .and_then(|b| b.find_jwt_authority(&old_kid).cloned())
            .is_some(),
        "the old JWT key {old_kid} left the JWT bundle right after the rotation"
    );
    match JwtSvid::parse_and_validate(first.token(), &now_bundles, &["billing"]) {
        Ok(_) => {}
        Err(e) if format!("{e:?}").contains("ExpiredSignature") => {
            eprintln!("(the old key's first token expired meanwhile; its key is still published)")
        }
        Err(e) => panic!("a token of the old key no longer validates after the rotation: {e}"),
    }
    eprintln!(
        "JWT key rotation: first token from new key {} after {:?} ({tokens} tokens checked against the bundle fetched before each)",
        jwt_kid(new_token.token()),
        rotated_at.elapsed()
    );

    // A scheduled rotation (no request): intermediates live 30 s, the next one activates at
    // 25 s.
    let before = active_intermediates(&env.nodes);
    let nodes = &env.nodes;
    let (node, id) = wait_for(
        "a scheduled intermediate rotation",
        Duration::from_secs(40),
        || {
            let before = before.clone();
            async move {
                active_intermediates(nodes)
                    .into_iter()
                    .find(|(n, id)| !id.is_empty() && before[n] != *id)
            }
        },
    )
    .await;
    eprintln!("scheduled rotation: node {node} activated {id}");

    // A root rotation.
    let old_root = journal(n0)
        .await
        .into_iter()
        .find(|a| a.kind == AuthorityKind::Root && a.state == AuthorityState::Active)
        .unwrap();
    rotate(n0, "root", false).await;
    let old_id = &old_root.id;
    let new_root = wait_for("a prepared root", DEADLINE, || async move {
        journal(n0)
            .await
            .into_iter()
            .find(|a| a.kind == AuthorityKind::Root && &a.id != old_id)
    })
    .await;
    // Published to the workloads before anything is signed by it.
    let (src, new_der) = (&alice_src, &new_root.cert_der);
    let published = wait_for(
        "the new root reaches the workloads",
        DEADLINE,
        || async move {
            let b = src.try_bundle_for_trust_domain(&td())?;
            b.authorities()
                .iter()
                .any(|c| c.as_bytes() == new_der.as_slice())
                .then(Instant::now)
        },
    )
    .await;
    let new_ski = ski(&new_root.cert_der);
    let nodes = &env.nodes;
    let nski = &new_ski;
    wait_for(
        "every node's intermediate signed by the new root",
        DEADLINE,
        || async move {
            nodes
                .iter()
                .all(|n| {
                    n.core
                        .ca()
                        .intermediate()
                        .is_some_and(|i| &aki(&i.record.cert_der) == nski)
                })
                .then_some(())
        },
    )
    .await;
    let auths = journal(n0).await;
    let first_under_new = auths
        .iter()
        .filter(|a| a.kind == AuthorityKind::Intermediate && aki(&a.cert_der) == new_ski)
        .map(ca_node::ca::issued_at)
        .min()
        .unwrap();
    assert!(
        first_under_new - ca_node::ca::issued_at(&new_root) >= 2,
        "an intermediate was signed by the new root before the propagation window ended"
    );
    eprintln!(
        "root rotation: {} published to workloads, intermediates re-signed {}s after it was made",
        new_root.id,
        first_under_new - ca_node::ca::issued_at(&new_root)
    );
    // The old root leaves the bundles once everything it signed has expired (≤ 30 s).
    let gone = wait_for(
        "the old root leaves the workloads' bundle",
        Duration::from_secs(60),
        || async move {
            let b = src.try_bundle_for_trust_domain(&td())?;
            (b.authorities().len() == 1 && b.authorities()[0].as_bytes() == new_der.as_slice())
                .then(Instant::now)
        },
    )
    .await;
    assert!(n0
        .core
        .ca()
        .bundle()
        .unwrap()
        .x509_authorities
        .iter()
        .all(|r| r != &old_root.cert_der));
    eprintln!(
        "root rotation: old root left the bundle {:?} after the new one reached the workloads",
        gone - published
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    traffic.stop.store(true, Ordering::SeqCst);
    let _ = client.await;
    server.abort();
    let ok = traffic.ok.load(Ordering::SeqCst);
    let failures = traffic.failures.lock().unwrap().clone();
    let issuers = traffic.issuers_seen.lock().unwrap().len();
    eprintln!(
        "HANDSHAKES: {ok} succeeded, {} failed (through 5 forced intermediate rotations: {forced_ok} by then; a scheduled rotation, a JWT key rotation, a root rotation); peers presented SVIDs from {issuers} different intermediates",
        failures.len()
    );
    assert!(failures.is_empty(), "failed handshakes: {failures:#?}");
    assert!(ok > 200, "too few handshakes to mean anything: {ok}");
    assert!(
        issuers >= 4,
        "workloads did not pick up SVIDs from the new intermediates ({issuers} seen)"
    );
    alice_src.shutdown().await;
    bob_src.shutdown().await;
    env.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Revocation

/// A node stops signing with its intermediate as soon as it sees the revocation, not at
/// the upkeep round that replaces it (which first makes a new intermediate): from 100 ms
/// after the revoke call, every mint on it is refused or signed by another intermediate,
/// and a new one takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_intermediate_signs_nothing_once_the_revocation_is_seen() {
    let tmp = tempfile::tempdir().unwrap();
    let node = ca_node::start(ca_dev::node_config(tmp.path()))
        .await
        .unwrap();
    let revoked = node.core.ca().intermediate().unwrap().record;
    let mint = || async {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let id = ca_identity::SpiffeId::parse(ALICE).unwrap();
        node.core.ca().mint_x509_svid(&id, &key, 60, &[]).await
    };
    let mut a = admin(&node.admin_socket).await;
    a.revoke_authority(RevokeAuthorityRequest {
        id: revoked.id.clone(),
        kind: "intermediate".into(),
    })
    .await
    .expect("revoke");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut refused, mut by_new) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while by_new < 3 {
        match mint().await {
            Ok(chain) => {
                assert_ne!(
                    chain[1], revoked.cert_der,
                    "signed by the revoked intermediate"
                );
                by_new += 1;
            }
            Err(e) => {
                assert!(e.to_string().contains("replacing a revoked one"), "{e}");
                refused += 1;
            }
        }
        assert!(Instant::now() < deadline, "no new intermediate within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("after the revocation: {refused} mints refused, then a new intermediate");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_intermediate_is_replaced_everywhere_and_never_used_again() {
    const ENTRIES: usize = 5;
    let tmp = tempfile::tempdir().unwrap();
    // Default settings (1 h X.509-SVIDs, 24 h intermediates, agent sync every 5 s): nothing
    // would be re-minted within the test but for the revocation.
    let defaults = NodeConfig::with_defaults("x", TD, tmp.path().into());
    let env = DevCluster::start_with_agent(
        tmp.path(),
        3,
        |_, c| {
            c.http_listen = None;
            c.ttl = defaults.ttl.clone();
        },
        |a| a.sync_interval_secs = ca_agent::AgentConfig::default().sync_interval_secs,
    )
    .await
    .expect("the cluster starts");
    let mut env = env;
    let ids: Vec<String> = (0..ENTRIES)
        .map(|i| format!("spiffe://dev.example.org/service/revoke-{i}"))
        .collect();
    for id in &ids {
        env.register(id, &[uid_selector()]).await.unwrap();
    }
    for id in &ids {
        env.wait_for_svid(id, DEADLINE).await.unwrap();
    }
    // The intermediate that signed the workload SVIDs, and its node.
    let state = env.agent.cache().current();
    let signer_aki = aki(&state.svids.values().next().unwrap().chain[0]);
    assert!(state.svids.values().all(|s| aki(&s.chain[0]) == signer_aki));
    let victim = journal(&env.nodes[0])
        .await
        .into_iter()
        .find(|a| a.kind == AuthorityKind::Intermediate && ski(&a.cert_der) == signer_aki)
        .unwrap();
    let owner = env
        .nodes
        .iter()
        .position(|n| n.core.config().node_id == victim.node_id)
        .unwrap();
    eprintln!(
        "the SVIDs were signed by {} of node {}",
        victim.id, victim.node_id
    );

    // A workload watching its stream.
    let client = WorkloadApiClient::connect_to(&env.endpoint())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    use futures::StreamExt as _;
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.svids().len(), ENTRIES);

    // Its node is cut off (stopped) while the revocation happens.
    let owner_cfg = env.nodes[owner].core.config().clone();
    let owner_node = env.nodes.remove(owner);
    owner_node.shutdown().await;
    // The remaining two elect a leader (if the owner led) before the clock starts.
    let nodes = &env.nodes;
    wait_for(
        "a leader among the remaining nodes",
        DEADLINE,
        || async move {
            let l = nodes[0].core.raft().status().leader?;
            nodes
                .iter()
                .any(|n| n.core.config().raft_id == l)
                .then_some(())
        },
    )
    .await;
    let other = &env.nodes[0];
    let mut a = admin(&other.admin_socket).await;
    let t0 = Instant::now();
    a.revoke_authority(RevokeAuthorityRequest {
        id: victim.id.clone(),
        kind: "intermediate".into(),
    })
    .await
    .expect("revoke");
    let revoke_rpc = t0.elapsed();
    // Every SVID the agent holds, and its own, replaced.
    let agent = &env.agent;
    let sa = &signer_aki;
    let on_agent = wait_for(
        "every SVID signed by the revoked intermediate replaced on the agent",
        Duration::from_secs(60),
        || async move {
            let s = agent.cache().current();
            let done =
                s.svids.len() == ENTRIES && s.svids.values().all(|v| &aki(&v.chain[0]) != sa);
            done.then(|| t0.elapsed())
        },
    )
    .await;
    let pushed = loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("a stream message within 60s")
            .unwrap()
            .unwrap();
        let clean = msg
            .svids()
            .iter()
            .all(|s| aki(s.cert_chain()[0].as_bytes()) != signer_aki);
        if clean && msg.svids().len() == ENTRIES {
            break t0.elapsed();
        }
    };
    let agent_svid = wait_for(
        "the agent's own SVID replaced",
        Duration::from_secs(60),
        || async move { (&aki(&agent.svid().chain[0]) != sa).then(|| t0.elapsed()) },
    )
    .await;
    eprintln!(
        "REVOKE: {ENTRIES} workload SVIDs replaced on the agent {on_agent:?} after the revoke call (which took {revoke_rpc:?}); the workload's stream had them after {pushed:?}; agent SVID after {agent_svid:?} (agent sync interval 5 s, default settings)"
    );
    assert!(
        on_agent < Duration::from_secs(30),
        "replacement took {on_agent:?} (bound: 30 s)"
    );

    // No running node signs with it.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let wid = ca_identity::SpiffeId::parse(&ids[0]).unwrap();
    for n in &env.nodes {
        let chain = n
            .core
            .ca()
            .mint_x509_svid(&wid, &key, 60, &[])
            .await
            .unwrap();
        assert_ne!(chain[1], victim.cert_der);
    }
    // Its node comes back: it learns the revocation from the log, replaces its
    // intermediate, never signs with the revoked one, and destroys its key.
    let back = ca_node::start(owner_cfg).await.expect("the node restarts");
    let b = &back;
    let int = wait_for("the returning node's CA", DEADLINE, || async move {
        b.core.ca().intermediate()
    })
    .await;
    assert_ne!(int.record.id, victim.id);
    let chain = back
        .core
        .ca()
        .mint_x509_svid(&wid, &key, 60, &[])
        .await
        .unwrap();
    assert_ne!(chain[1], victim.cert_der);
    assert!(!back.core.ca().bundle().unwrap().x509_authorities.is_empty());
    let vid = &victim.id;
    let destroyed = wait_for("the revoked key destroyed", DEADLINE, || async move {
        journal(b)
            .await
            .into_iter()
            .find(|a| &a.id == vid && a.key_destroyed)
    })
    .await;
    assert_eq!(destroyed.state, AuthorityState::Revoked);
    // Revoking it again, or anything unknown, is refused.
    let err = a
        .revoke_authority(RevokeAuthorityRequest {
            id: victim.id.clone(),
            kind: "intermediate".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("revoked already"), "{err}");

    // Again with every node up (no fail-over: the agent learns it at its next regular
    // sync, every 5 s).
    let second_aki = aki(&agent.cache().current().svids.values().next().unwrap().chain[0]);
    let second = journal(&back)
        .await
        .into_iter()
        .find(|a| a.kind == AuthorityKind::Intermediate && ski(&a.cert_der) == second_aki)
        .unwrap();
    let t1 = Instant::now();
    a.revoke_authority(RevokeAuthorityRequest {
        id: second.id.clone(),
        kind: "intermediate".into(),
    })
    .await
    .expect("revoke");
    let sa2 = &second_aki;
    let again = wait_for(
        "replaced after the second revoke",
        Duration::from_secs(60),
        || async move {
            let s = agent.cache().current();
            (s.svids.len() == ENTRIES && s.svids.values().all(|v| &aki(&v.chain[0]) != sa2))
                .then(|| t1.elapsed())
        },
    )
    .await;
    eprintln!(
        "REVOKE (all nodes up): {ENTRIES} workload SVIDs signed by {} replaced on the agent {again:?} after the revoke",
        second.id
    );
    assert!(
        again < Duration::from_secs(30),
        "replacement took {again:?}"
    );
    back.shutdown().await;
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_jwt_key_leaves_the_bundle_and_tokens_are_reissued() {
    let tmp = tempfile::tempdir().unwrap();
    let env = DevCluster::start_with(tmp.path(), 3, |_, c| c.http_listen = None)
        .await
        .expect("the cluster starts");
    env.register(ALICE, &[uid_selector()]).await.unwrap();
    env.wait_for_svid(ALICE, DEADLINE).await.unwrap();
    let client = WorkloadApiClient::connect_to(&env.endpoint())
        .await
        .unwrap();
    let alice_id = spiffe::SpiffeId::new(ALICE).unwrap();
    let token = client
        .fetch_jwt_svid(&["orders"], Some(&alice_id))
        .await
        .unwrap();
    let kid = jwt_kid(token.token());
    let mut a = admin(&env.nodes[1].admin_socket).await;
    let t0 = Instant::now();
    a.revoke_authority(RevokeAuthorityRequest {
        id: kid.clone(),
        kind: "jwt".into(),
    })
    .await
    .expect("revoke the JWT key");
    let (client, aid, k, tok) = (&client, &alice_id, &kid, &token);
    let (fresh, took) = wait_for("a JWT-SVID from another key", DEADLINE, || async move {
        let t = client.fetch_jwt_svid(&["orders"], Some(aid)).await.ok()?;
        (&jwt_kid(t.token()) != k).then(|| (t, t0.elapsed()))
    })
    .await;
    let bundles = wait_for(
        "the revoked key out of the JWT bundle",
        DEADLINE,
        || async move {
            let b = client.fetch_jwt_bundles().await.ok()?;
            JwtSvid::parse_and_validate(tok.token(), &b, &["orders"])
                .is_err()
                .then_some(b)
        },
    )
    .await;
    JwtSvid::parse_and_validate(fresh.token(), &bundles, &["orders"])
        .expect("the new token validates");
    for n in &env.nodes {
        assert!(n
            .core
            .ca()
            .bundle()
            .unwrap()
            .jwt_authorities
            .iter()
            .all(|k| k.key_id != kid));
        // The revoked key stopped signing when the revocation was seen; its node may still
        // be making the replacement.
        let k = &kid;
        let new_key = wait_for(
            "a JWT key other than the revoked one",
            DEADLINE,
            || async move { n.core.ca().jwt_key().filter(|j| &j.record.id != k) },
        )
        .await;
        assert_ne!(new_key.record.id, kid);
    }
    eprintln!("JWT REVOKE: a token from another key {took:?} after the revoke");
    env.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Rotation while a node is down or the root's key manager is unavailable

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_waits_for_a_down_node_and_an_unavailable_root() {
    let logs = ca_test_support::logs::capture();
    let tmp = tempfile::tempdir().unwrap();
    let mut env = DevCluster::start_with(tmp.path(), 3, |_, c| c.http_listen = None)
        .await
        .expect("the cluster starts");

    // Node 3 is down when every intermediate is rotated: 1 and 2 rotate at once, 3 keeps its
    // active intermediate in the journal and rotates when it is back.
    let before = active_intermediates(&env.nodes);
    let cfg3 = env.nodes[2].core.config().clone();
    let n3 = env.nodes.remove(2);
    n3.shutdown().await;
    let r = rotate(&env.nodes[0], "intermediate", true).await;
    assert_eq!(r.requests.len(), 3, "{r:?}");
    let (nodes, b) = (&env.nodes, &before);
    wait_for("nodes 1 and 2 rotate", DEADLINE, || async move {
        active_intermediates(nodes)
            .iter()
            .all(|(n, id)| b[n] != *id)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let auths = journal(&env.nodes[0]).await;
    assert!(
        auths
            .iter()
            .any(|a| a.id == before["dev-3"] && a.state == AuthorityState::Active),
        "node 3's intermediate stays active while it is down"
    );
    let n3 = ca_node::start(cfg3).await.expect("node 3 restarts");
    let (n3r, old3) = (&n3, &before["dev-3"]);
    let n3_int = wait_for("node 3 rotates once it is back", DEADLINE, || async move {
        let i = n3r.core.ca().intermediate()?;
        (&i.record.id != old3).then_some(i.record.id)
    })
    .await;
    eprintln!("node 3 rotated to {n3_int} when it came back");
    env.nodes.push(n3);

    // The root's key (held by node 1 only) becomes unavailable: node 2's requested rotation
    // waits, says why, keeps its intermediate active and minting, and happens once the key
    // is back.
    let keys = tmp.path().join("node-1").join("keys");
    let away = tmp.path().join("node-1").join("keys.away");
    let root = journal(&env.nodes[0])
        .await
        .into_iter()
        .find(|a| a.kind == AuthorityKind::Root && a.state == AuthorityState::Active)
        .unwrap();
    std::fs::create_dir_all(&away).unwrap();
    std::fs::rename(keys.join(&root.key_id), away.join(&root.key_id))
        .or_else(|_| {
            // The soft key file may carry an extension.
            let f = std::fs::read_dir(&keys)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .contains(&root.key_id)
                })
                .expect("the root key file");
            std::fs::rename(&f, away.join(f.file_name().unwrap()))
        })
        .unwrap();
    let n2_before = env.nodes[1].core.ca().intermediate().unwrap().record.id;
    let mut a = admin(&env.nodes[0].admin_socket).await;
    a.rotate_authority(RotateAuthorityRequest {
        kind: "intermediate".into(),
        node_id: "dev-2".into(),
        all: false,
    })
    .await
    .expect("rotation requested");
    let nb = &n2_before;
    let said = wait_for(
        "a log line saying why the rotation waits",
        DEADLINE,
        || async move {
            logs.lines_with(&["cannot replace the intermediate yet", nb])
                .into_iter()
                .next()
        },
    )
    .await;
    eprintln!("node 2 says: {said}");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let wid = ca_identity::SpiffeId::parse(ALICE).unwrap();
    for _ in 0..3 {
        let cur = env.nodes[1].core.ca().intermediate().unwrap();
        assert_eq!(cur.record.id, n2_before, "no rotation without the root");
        assert!(journal(&env.nodes[0])
            .await
            .iter()
            .any(|a| a.id == n2_before && a.state == AuthorityState::Active));
        env.nodes[1]
            .core
            .ca()
            .mint_x509_svid(&wid, &key, 60, &[])
            .await
            .expect("node 2 keeps minting");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for e in std::fs::read_dir(&away).unwrap() {
        let p = e.unwrap().path();
        std::fs::rename(&p, keys.join(p.file_name().unwrap())).unwrap();
    }
    let restored = Instant::now();
    let n2 = &env.nodes[1];
    let rotated = wait_for(
        "node 2 rotates once the root is back",
        DEADLINE,
        || async move {
            let i = n2.core.ca().intermediate()?;
            (&i.record.id != nb).then_some(i.record.id)
        },
    )
    .await;
    eprintln!(
        "node 2 rotated to {rotated} {:?} after the root key was back",
        restored.elapsed()
    );
    env.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Bad input

async fn ca_state(
    node: &ca_node::NodeHandle,
) -> (Vec<AuthorityRecord>, Vec<ca_state::RotationRequest>) {
    (
        node.core.state().authorities().await.unwrap(),
        node.core.state().rotation_requests().await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rotation_and_revocation_input_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let node = start_node(tmp.path(), |c| c.rotation.propagation_window = 3600).await;
    let mut a = admin(&node.admin_socket).await;
    let auths = journal(&node).await;
    let root = auths
        .iter()
        .find(|a| a.kind == AuthorityKind::Root)
        .unwrap();
    let int = auths
        .iter()
        .find(|a| a.kind == AuthorityKind::Intermediate)
        .unwrap();
    let jwt = auths.iter().find(|a| a.kind == AuthorityKind::Jwt).unwrap();
    let before = ca_state(&node).await;

    let revoke = |id: &str, kind: &str| RevokeAuthorityRequest {
        id: id.into(),
        kind: kind.into(),
    };
    for (req, code, says) in [
        (
            revoke("int-nope", "intermediate"),
            Code::NotFound,
            "no authority \"int-nope\"",
        ),
        (
            revoke("", "intermediate"),
            Code::InvalidArgument,
            "give the ID",
        ),
        (
            revoke(&root.id, "intermediate"),
            Code::FailedPrecondition,
            "only active root",
        ),
        (
            revoke(&root.id, "root"),
            Code::InvalidArgument,
            "only intermediate and jwt",
        ),
        (
            revoke(&int.id, "jwt"),
            Code::InvalidArgument,
            "revoke-intermediate",
        ),
        (
            revoke(&jwt.id, "intermediate"),
            Code::InvalidArgument,
            "revoke-jwt-key",
        ),
        (
            revoke(&int.id, "bogus"),
            Code::InvalidArgument,
            "only intermediate and jwt",
        ),
    ] {
        let err = a.revoke_authority(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err}");
        assert!(err.message().contains(says), "{req:?}: {}", err.message());
        assert_eq!(
            ca_state(&node).await,
            before,
            "{req:?} changed the CA state"
        );
    }
    let rot = |kind: &str, node_id: &str, all: bool| RotateAuthorityRequest {
        kind: kind.into(),
        node_id: node_id.into(),
        all,
    };
    for (req, code, says) in [
        (
            rot("intermediate", "node-9", false),
            Code::NotFound,
            "no node \"node-9\"",
        ),
        (rot("jwt", "node-9", false), Code::NotFound, "no node"),
        (
            rot("intermediate", "dev-1", true),
            Code::InvalidArgument,
            "not both",
        ),
        (
            rot("root", "dev-1", false),
            Code::InvalidArgument,
            "takes no --node",
        ),
        (
            rot("root", "", true),
            Code::InvalidArgument,
            "takes no --node",
        ),
        (
            rot("hsm", "", false),
            Code::InvalidArgument,
            "use intermediate, jwt or root",
        ),
    ] {
        let err = a.rotate_authority(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err}");
        assert!(err.message().contains(says), "{req:?}: {}", err.message());
        assert_eq!(
            ca_state(&node).await,
            before,
            "{req:?} changed the CA state"
        );
    }
    // A second root rotation while the first one is in its propagation window.
    a.rotate_authority(rot("root", "", false)).await.unwrap();
    let nd = &node;
    let prepared = wait_for("a prepared root", DEADLINE, || async move {
        journal(nd)
            .await
            .into_iter()
            .find(|a| a.kind == AuthorityKind::Root && a.state == AuthorityState::Prepared)
    })
    .await;
    assert_eq!(node.core.ca().bundle().unwrap().x509_authorities.len(), 2);
    let during = ca_state(&node).await;
    let err = a
        .rotate_authority(rot("root", "", false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains(&prepared.id), "{}", err.message());
    assert_eq!(ca_state(&node).await, during);

    // The same through the binary.
    let sock = node.admin_socket.to_str().unwrap();
    for (args, says) in [
        (
            vec!["revoke-intermediate", "int-nope"],
            "no authority \"int-nope\"",
        ),
        (vec!["revoke-jwt-key", &root.id], "only active root"),
        (
            vec!["rotate-intermediate", "--node", "node-9"],
            "no node \"node-9\"",
        ),
        (
            vec!["rotate-intermediate", "--node", "dev-1", "--all"],
            "cannot be used with",
        ),
        (vec!["rotate-root"], "already in progress"),
    ] {
        let mut full = vec!["--socket-path", sock];
        full.extend(args.iter().copied());
        let out = run_cli(&full);
        assert!(!out.success, "{args:?} succeeded: {}", out.stdout);
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
    assert_eq!(ca_state(&node).await, during);
    let out = run_cli(&["--socket-path", sock, "ca", "show"]);
    assert!(out.success, "{}", out.stderr);
    assert!(out.stdout.contains("~VALID SVIDS"), "{}", out.stdout);
    assert!(out.stdout.contains(&prepared.id) && out.stdout.contains("prepared"));
    assert!(out.stdout.contains("approximate"), "{}", out.stdout);
    eprintln!("{}", out.stdout);
    node.shutdown().await;
}
