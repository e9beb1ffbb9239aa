//! Attacks on the boundaries between ca-nodes, over real sockets and real mutual TLS
//! against a three-node cluster: a ca-node certificate alone grants nothing; a member
//! proposes only what the rules allow; the root signs only keys the journal holds; a
//! removed node and an SVID from a revoked intermediate are refused at once; a ca-node's
//! join token is never redeemed by an agent.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use async_trait::async_trait;
use ca_dev::DevCluster;
use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_kms::memory::MemoryKey;
use ca_kms::{KeyAlgorithm, SigningKey};
use ca_node::ca::x509::{ca_params, make_cert, svid_params, IssuerKey, RawPublicKey};
use ca_proto::admin::cluster_client::ClusterClient;
use ca_proto::admin::*;
use ca_proto::raft::raft_service_client::RaftServiceClient;
use ca_state::{
    AgentRecord, AuthorityKind, AuthorityRecord, AuthorityState, Command, EntryRecord,
    SelectorRecord,
};
use tonic::transport::Channel;
use tonic::Code;

async fn start_cluster(dir: &std::path::Path) -> DevCluster {
    DevCluster::start_with(dir, 3, |_, c| {
        c.http_listen = None;
        c.log_level = "warn".into();
    })
    .await
    .expect("the cluster starts")
}

fn td() -> ca_identity::TrustDomain {
    ca_identity::TrustDomain::new(TD).unwrap()
}

fn raft_client(addr: &str, roots: &[Vec<u8>], svid: &SvidResolver) -> RaftServiceClient<Channel> {
    let tls = ca_node::raft_tls::any_node_tls(svid, &LiveRoots::new(roots.to_vec()), td());
    RaftServiceClient::new(ca_node::raft_tls::tls_channel(addr, tls).unwrap())
}

/// Proposes `cmd` straight to the Raft service of the node at `addr`, as `svid`: what a
/// hostile holder of that certificate can do without any ca-node code.
async fn propose_raw(
    addr: &str,
    roots: &[Vec<u8>],
    svid: &SvidResolver,
    cmd: &Command,
) -> Result<ca_proto::raft::ProposeReply, tonic::Status> {
    raft_client(addr, roots, svid)
        .propose(ca_proto::raft::ProposeRequest {
            command: serde_json::to_vec(cmd).unwrap(),
        })
        .await
        .map(|r| r.into_inner())
}

fn leader_addr(env: &DevCluster) -> String {
    env.nodes[env.leader().expect("a leader")]
        .node_addr
        .to_string()
}

fn svid_of(chain: &[Vec<u8>], key_pkcs8: &[u8]) -> SvidResolver {
    let s = SvidResolver::default();
    s.set(chain, key_pkcs8).unwrap();
    s
}

/// A ca-kms key whose signatures are made by the member at `addr` through
/// `Cluster.SignIntermediate`, asked as `svid`: how a member obtains the root's signature.
#[derive(Debug)]
struct SignedByMember {
    client: Mutex<Option<ClusterClient<Channel>>>,
    root_id: String,
    root_spki: Vec<u8>,
}

#[async_trait]
impl SigningKey for SignedByMember {
    fn name(&self) -> &str {
        "member"
    }
    fn algorithm(&self) -> KeyAlgorithm {
        KeyAlgorithm::EcP256
    }
    fn public_key_spki(&self) -> &[u8] {
        &self.root_spki
    }
    async fn sign(&self, msg: &[u8]) -> ca_kms::Result<Vec<u8>> {
        let mut client = self.client.lock().unwrap().clone().unwrap();
        client
            .sign_intermediate(SignIntermediateRequest {
                root_id: self.root_id.clone(),
                tbs_certificate: msg.to_vec(),
            })
            .await
            .map(|r| r.into_inner().signature)
            .map_err(|s| ca_kms::Error::Backend(format!("{:?}: {}", s.code(), s.message())))
    }
}

/// What a node answered a proposal, as text.
fn reply_text(reply: ca_proto::raft::ProposeReply) -> String {
    match reply.result {
        Some(ca_proto::raft::propose_reply::Result::Response(b)) => {
            String::from_utf8_lossy(&b).into_owned()
        }
        other => format!("{other:?}"),
    }
}

fn root_of(auths: &[AuthorityRecord]) -> AuthorityRecord {
    auths
        .iter()
        .find(|a| a.kind == AuthorityKind::Root && a.state == AuthorityState::Active)
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_proposes_only_what_the_rules_allow() {
    let tmp = tempfile::tempdir().unwrap();
    let env = start_cluster(tmp.path()).await;
    let roots = roots_of(&env.nodes[0]);
    let leader = leader_addr(&env);
    let member = env.nodes[1].core.svid().clone(); // dev-2's own SVID
    let auths = env.nodes[0].core.state().authorities().await.unwrap();
    let dev1_int = auths
        .iter()
        .find(|a| {
            a.node_id == "dev-1"
                && a.kind == AuthorityKind::Intermediate
                && a.state == AuthorityState::Active
        })
        .unwrap()
        .clone();
    let dev2_int = env.nodes[1].core.ca().intermediate().unwrap().record;
    let entries_before = env.nodes[0].core.state().entries().await.unwrap().len();

    let entry = |spiffe_id: &str, selector: (&str, &str)| EntryRecord {
        id: uuid::Uuid::new_v4().to_string(),
        spiffe_id: spiffe_id.into(),
        parent_id: env.agent.spiffe_id().to_string(),
        selectors: vec![SelectorRecord {
            kind: selector.0.into(),
            value: selector.1.into(),
        }],
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        dns_names: vec![],
        admin: false,
        hint: String::new(),
        created_at: 1,
        revision: 0,
    };
    let (attacker_key, _) = MemoryKey::generate("evil", KeyAlgorithm::EcP256, "memory").unwrap();
    let self_signed = {
        let key: Arc<dyn SigningKey> = Arc::new(
            MemoryKey::generate("evil", KeyAlgorithm::EcP256, "memory")
                .unwrap()
                .0,
        );
        let t = ca_identity::unix_now();
        let params = ca_params(
            &format!("spiffe://{TD}"),
            "dev.example.org intermediate int-dev-2-evil",
            0,
            t - 60,
            t + 3600,
        )
        .unwrap();
        let public = RawPublicKey::from_spki(key.public_key_spki(), key.algorithm()).unwrap();
        let cert = make_cert(
            &params,
            &public,
            &IssuerKey {
                cert_der: None,
                key: key.clone(),
            },
        )
        .await
        .unwrap();
        (cert, key.public_key_spki().to_vec())
    };
    let intermediate = |id: &str, node: &str, cert: Vec<u8>, spki: Vec<u8>| AuthorityRecord {
        id: id.into(),
        kind: AuthorityKind::Intermediate,
        state: AuthorityState::Active,
        node_id: node.into(),
        key_backend: "memory".into(),
        key_id: id.into(),
        cert_der: cert,
        public_key: spki,
        not_before: 0,
        not_after: ca_identity::unix_now() + 3600,
        key_destroyed: false,
    };
    let hostile: Vec<(&str, Command, &str)> = vec![
        (
            "an entry on a reserved ca-node path",
            Command::CreateEntry {
                entry: entry("spiffe://dev.example.org/ca-node/dev-9", ("unix", "uid:0")),
            },
            "reserved",
        ),
        (
            "an entry in another trust domain",
            Command::CreateEntry {
                entry: entry("spiffe://evil.example.org/x", ("unix", "uid:0")),
            },
            "trust domain",
        ),
        (
            "an entry with a selector no attestor produces",
            Command::CreateEntry {
                entry: entry("spiffe://dev.example.org/x", ("k8s", "ns:default")),
            },
            "selector",
        ),
        (
            "an agent registered on a ca-node path",
            Command::RegisterAgent {
                agent: AgentRecord {
                    spiffe_id: "spiffe://dev.example.org/ca-node/dev-9".into(),
                    attestation_type: "x509pop".into(),
                    x509_svid_serial: "01".into(),
                    x509_svid_expires_at: i64::MAX,
                    previous_x509_svid_serial: String::new(),
                    banned: false,
                    attested_at: 0,
                    selectors: vec![],
                },
            },
            "reserved",
        ),
        (
            "another node's intermediate",
            Command::PutAuthority {
                authority: intermediate(
                    "int-dev-1-evil",
                    "dev-1",
                    Vec::new(),
                    attacker_key.public_key_spki().to_vec(),
                ),
            },
            "may not record authority",
        ),
        (
            "an intermediate the root did not sign",
            Command::PutAuthority {
                authority: intermediate(
                    "int-dev-2-evil",
                    "dev-2",
                    self_signed.0.clone(),
                    self_signed.1.clone(),
                ),
            },
            "not signed by",
        ),
        (
            "a certificate that does not match the recorded key",
            Command::PutAuthority {
                authority: intermediate(
                    "int-dev-2-evil2",
                    "dev-2",
                    self_signed.0.clone(),
                    attacker_key.public_key_spki().to_vec(),
                ),
            },
            "not a CA certificate for its public key",
        ),
        (
            "another node's authority replaced",
            Command::PutAuthority {
                authority: AuthorityRecord {
                    node_id: "dev-2".into(),
                    ..dev1_int.clone()
                },
            },
            "only its certificate",
        ),
        (
            "activating another node's retired authority",
            Command::SetAuthorityState {
                id: dev1_int.id.clone(),
                state: AuthorityState::Prepared,
                at: ca_identity::unix_now(),
            },
            "may not make authority",
        ),
        (
            "retiring its own intermediate on a clock 400 days ahead",
            Command::SetAuthorityState {
                id: dev2_int.id.clone(),
                state: AuthorityState::Retired,
                at: ca_identity::unix_now() + 400 * 86_400,
            },
            "max_clock_skew_secs",
        ),
        (
            "destroying the root's key on a clock 400 days ahead",
            Command::KeyDestroyed {
                id: root_of(&auths).id,
                at: ca_identity::unix_now() + 400 * 86_400,
            },
            "max_clock_skew_secs",
        ),
        (
            "destroying the active root's key",
            Command::KeyDestroyed {
                id: root_of(&auths).id,
                at: ca_identity::unix_now(),
            },
            "only a retired or revoked",
        ),
        (
            "a batch hiding one bad command after a good one",
            Command::Batch {
                commands: vec![
                    Command::CreateEntry {
                        entry: entry("spiffe://dev.example.org/fine", ("unix", "uid:7")),
                    },
                    Command::CreateEntry {
                        entry: entry("spiffe://dev.example.org/ca-node/dev-8", ("unix", "uid:0")),
                    },
                ],
            },
            "reserved",
        ),
    ];
    for (what, cmd, why) in &hostile {
        for n in &env.nodes {
            let err = propose_raw(&n.node_addr.to_string(), &roots, &member, cmd)
                .await
                .expect_err(what);
            assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
            assert!(err.message().contains(why), "{what}: {err:?}");
        }
    }
    // Nothing of it reached the state.
    assert_eq!(
        env.nodes[0].core.state().entries().await.unwrap().len(),
        entries_before
    );
    assert_eq!(
        env.nodes[0].core.state().authorities().await.unwrap(),
        auths,
        "the CA journal is as it was"
    );

    // The same member's well-formed proposal goes through (the refusals above are the rules,
    // not the path).
    let fine = entry("spiffe://dev.example.org/fine", ("unix", "uid:7"));
    let reply = propose_raw(
        &leader,
        &roots,
        &member,
        &Command::CreateEntry {
            entry: fine.clone(),
        },
    )
    .await
    .expect("a valid entry is accepted");
    assert!(
        matches!(
            reply.result,
            Some(ca_proto::raft::propose_reply::Result::Response(_))
        ),
        "{reply:?}"
    );
    env.nodes[0].core.read_barrier().await.unwrap();
    assert!(env.nodes[0]
        .core
        .state()
        .entries()
        .await
        .unwrap()
        .iter()
        .any(|e| e.id == fine.id));

    // Revocation is final, whoever proposes what: revoke dev-3's intermediate, then try
    // to bring it back as its own node would.
    let dev3 = &env.nodes[2];
    let dev3_int = dev3.core.ca().intermediate().unwrap().record;
    env.nodes[0]
        .core
        .ca()
        .revoke(&dev3_int.id, AuthorityKind::Intermediate)
        .await
        .unwrap();
    let back = Command::SetAuthorityState {
        id: dev3_int.id.clone(),
        state: AuthorityState::Active,
        at: ca_identity::unix_now(),
    };
    // Refused by the check or, if its view has not seen the revocation yet, by the state
    // machine: either way nothing changes.
    match propose_raw(&leader, &roots, dev3.core.svid(), &back).await {
        Err(s) => assert!(s.message().contains("revocation is final"), "{s:?}"),
        Ok(r) => {
            let text = reply_text(r);
            assert!(text.contains("revocation is final"), "{text}");
        }
    }
    let state = env.nodes[0]
        .core
        .state()
        .authorities()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.id == dev3_int.id)
        .unwrap()
        .state;
    assert_eq!(state, AuthorityState::Revoked);

    // Nobody retires the only active root (a node whose clock says it expired included):
    // the state machine refuses it whoever proposes it.
    let root = root_of(&auths);
    let reply = propose_raw(
        &leader,
        &roots,
        &member,
        &Command::SetAuthorityState {
            id: root.id.clone(),
            state: AuthorityState::Retired,
            at: ca_identity::unix_now(),
        },
    )
    .await
    .expect("the journal's own rules answer it");
    let text = reply_text(reply);
    assert!(text.contains("only active root"), "{text}");
    assert_eq!(
        root_of(&env.nodes[0].core.state().authorities().await.unwrap()).id,
        root.id
    );
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_root_signs_only_journal_keys_and_a_revoked_issuer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let env = start_cluster(tmp.path()).await;
    let roots = roots_of(&env.nodes[0]);
    let root_holder = env.nodes[0].node_addr.to_string(); // dev: node 1 holds the root key
    let member = env.nodes[1].core.svid().clone();
    let auths = env.nodes[0].core.state().authorities().await.unwrap();
    let root = root_of(&auths);

    // A member asks the root to certify an intermediate around a key of its own choosing.
    let (key, _) = MemoryKey::generate("evil", KeyAlgorithm::EcP256, "memory").unwrap();
    let key: Arc<dyn SigningKey> = Arc::new(key);
    let signer = Arc::new(SignedByMember {
        client: Mutex::new(Some(cluster_client(&root_holder, &roots, &member))),
        root_id: root.id.clone(),
        root_spki: root.public_key.clone(),
    });
    let issuer = IssuerKey {
        cert_der: Some(root.cert_der.clone()),
        key: signer,
    };
    let public = RawPublicKey::from_spki(key.public_key_spki(), key.algorithm()).unwrap();
    let t = ca_identity::unix_now();
    let params = ca_params(
        &format!("spiffe://{TD}"),
        "dev.example.org intermediate int-dev-2-evil",
        0,
        t - 60,
        t + 3600,
    )
    .unwrap();
    let err = make_cert(&params, &public, &issuer).await.unwrap_err();
    assert!(
        err.to_string().contains("PermissionDenied")
            && err
                .to_string()
                .contains("no prepared intermediate of node dev-2"),
        "{err}"
    );

    // Recorded first (in the journal, visible, revocable), the same key is certified.
    let id = "int-dev-2-evil";
    let rec = AuthorityRecord {
        id: id.into(),
        kind: AuthorityKind::Intermediate,
        state: AuthorityState::Prepared,
        node_id: "dev-2".into(),
        key_backend: "memory".into(),
        key_id: id.into(),
        cert_der: Vec::new(),
        public_key: key.public_key_spki().to_vec(),
        not_before: t - 60,
        not_after: t + 3600,
        key_destroyed: false,
    };
    propose_raw(
        &leader_addr(&env),
        &roots,
        &member,
        &Command::PutAuthority {
            authority: rec.clone(),
        },
    )
    .await
    .expect("a member records its own prepared key");
    let int_cert = make_cert(&params, &public, &issuer)
        .await
        .expect("a recorded key is certified");
    // Once: a second certificate for the same recorded key is refused.
    propose_raw(
        &leader_addr(&env),
        &roots,
        &member,
        &Command::PutAuthority {
            authority: AuthorityRecord {
                cert_der: int_cert.clone(),
                ..rec
            },
        },
    )
    .await
    .expect("its certificate is recorded");
    let err = make_cert(&params, &public, &issuer).await.unwrap_err();
    assert!(err.to_string().contains("certified already"), "{err}");

    // `ca show` lists it.
    let mut a = admin(&env.nodes[2].admin_socket).await;
    let shown = a
        .get_ca_status(GetCaStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        shown.authorities.iter().any(|x| x.id == id),
        "{:?}",
        shown.authorities
    );

    // A ca-node SVID for member dev-3 signed by dev-2's intermediate: admitted until the
    // intermediate is revoked, then refused by every node at once. (A member's own revoked
    // intermediate still admits it, so that it can get a new one.)
    let (leaf_key, leaf_pkcs8) =
        MemoryKey::generate("leaf", KeyAlgorithm::EcP256, "memory").unwrap();
    let leaf_public =
        RawPublicKey::from_spki(leaf_key.public_key_spki(), KeyAlgorithm::EcP256).unwrap();
    let leaf_under_int = |node: &str| {
        let params = svid_params(
            &format!("spiffe://{TD}/ca-node/{node}"),
            &[],
            t - 10,
            t + 600,
            false,
        )
        .unwrap();
        let issuer = IssuerKey {
            cert_der: Some(int_cert.clone()),
            key: key.clone(),
        };
        let public = leaf_public.clone();
        async move { make_cert(&params, &public, &issuer).await.unwrap() }
    };
    let leaf = leaf_under_int("dev-3").await;
    // And one for dev-2 itself, under its own intermediate.
    let own_leaf = leaf_under_int("dev-2").await;
    let own = svid_of(&[own_leaf, int_cert.clone()], &leaf_pkcs8);
    let forged = svid_of(&[leaf, int_cert], &leaf_pkcs8);
    for n in &env.nodes {
        raft_client(&n.node_addr.to_string(), &roots, &forged)
            .read_index(ca_proto::raft::ReadIndexRequest {})
            .await
            .expect("admitted before the revocation");
    }
    a.revoke_authority(RevokeAuthorityRequest {
        id: id.into(),
        kind: "intermediate".into(),
    })
    .await
    .expect("revoked");
    let revoked_at = Instant::now();
    for n in &env.nodes {
        loop {
            let r = raft_client(&n.node_addr.to_string(), &roots, &forged)
                .read_index(ca_proto::raft::ReadIndexRequest {})
                .await;
            match r {
                Err(s) if s.code() == Code::PermissionDenied => {
                    assert!(s.message().contains("revoked authority"), "{s:?}");
                    break;
                }
                other => assert!(
                    revoked_at.elapsed() < Duration::from_secs(1),
                    "{} still admits an SVID of a revoked intermediate: {other:?}",
                    n.core.config().node_id
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Its own node, holding an SVID of its own revoked intermediate, may only replace that
    // intermediate: no replication, no votes, no other proposals.
    let addr = leader_addr(&env);
    let err = raft_client(&addr, &roots, &own)
        .vote(ca_proto::raft::VoteRequest::default())
        .await
        .unwrap_err();
    assert!(err.message().contains("may only replace"), "{err:?}");
    let err = raft_client(&addr, &roots, &own)
        .append_entries(ca_proto::raft::AppendEntriesRequest::default())
        .await
        .unwrap_err();
    assert!(err.message().contains("may only replace"), "{err:?}");
    let err = propose_raw(
        &addr,
        &roots,
        &own,
        &Command::DeleteEntry { id: "x".into() },
    )
    .await
    .unwrap_err();
    assert!(err.message().contains("may only record"), "{err:?}");

    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_node_is_refused_within_a_second() {
    let tmp = tempfile::tempdir().unwrap();
    let env = start_cluster(tmp.path()).await;
    let roots = roots_of(&env.nodes[0]);
    // dev-3's SVID (valid for an hour), as it keeps it on disk.
    let (chain, key) = ca_node::registry::load_node_svid(&env.nodes[2].core.config().data_dir)
        .expect("dev-3 saved its SVID");
    let removed = svid_of(&chain, &key);
    // Admitted while a member.
    for n in &env.nodes[..2] {
        raft_client(&n.node_addr.to_string(), &roots, &removed)
            .read_index(ca_proto::raft::ReadIndexRequest {})
            .await
            .expect("a member is admitted");
    }

    let mut a = admin(&env.nodes[0].admin_socket).await;
    a.remove_member(RemoveMemberRequest { raft_id: 3 })
        .await
        .expect("removed");
    let done = Instant::now();
    let noop = Command::DeleteEntry { id: "x".into() };
    for n in &env.nodes[..2] {
        let addr = n.node_addr.to_string();
        loop {
            let read = raft_client(&addr, &roots, &removed)
                .read_index(ca_proto::raft::ReadIndexRequest {})
                .await;
            let proposed = propose_raw(&addr, &roots, &removed, &noop).await;
            let vote = raft_client(&addr, &roots, &removed)
                .vote(ca_proto::raft::VoteRequest::default())
                .await;
            let sign = cluster_client(&addr, &roots, &removed)
                .issued_counts(IssuedCountsRequest {})
                .await;
            let replicate = raft_client(&addr, &roots, &removed)
                .append_entries(ca_proto::raft::AppendEntriesRequest::default())
                .await;
            let all_refused = [
                read.err(),
                proposed.err(),
                vote.err(),
                sign.err(),
                replicate.err(),
            ]
            .iter()
            .all(|e| {
                e.as_ref().is_some_and(|s| {
                    s.code() == Code::PermissionDenied && s.message().contains("not a member")
                })
            });
            if all_refused {
                break;
            }
            assert!(
                done.elapsed() < Duration::from_secs(1),
                "{addr} still serves the removed node"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The node API (agents' side) never serves a ca-node identity.
    let svid = Svid {
        spiffe_id: format!("spiffe://{TD}/ca-node/dev-3"),
        chain,
        key_pkcs8: key.to_vec(),
    };
    let err = agent_client(&env.nodes[0], &svid)
        .sync_entries(ca_proto::node::SyncEntriesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Its intermediates and JWT keys are revoked: whatever its keys sign is refused.
    let auths = env.nodes[0].core.state().authorities().await.unwrap();
    assert!(auths
        .iter()
        .filter(|a| a.node_id == "dev-3")
        .all(|a| a.state == AuthorityState::Revoked));

    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ca_node_join_token_is_never_redeemed_by_an_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let env = start_cluster(tmp.path()).await;
    let token = env.nodes[0]
        .core
        .create_join_token(&format!("spiffe://{TD}/ca-node/dev-4"), 600)
        .await
        .unwrap()
        .token;
    for n in &env.nodes {
        let err = attest_join_token(n, &token).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("ca-node join"), "{err:?}");
    }
    // Not consumed: the ca-node it was made for can still use it.
    let rec = env.nodes[0]
        .core
        .state()
        .join_token(&token)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.used_at, None);
    // The ca-node token works for its node: `Cluster.Join`.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    cluster_client(
        &env.nodes[1].node_addr.to_string(),
        &roots_of(&env.nodes[0]),
        &SvidResolver::default(),
    )
    .join(JoinRequest {
        token,
        csr,
        node_id: "dev-4".into(),
    })
    .await
    .expect("the ca-node token joins its node");

    env.shutdown().await;
}
