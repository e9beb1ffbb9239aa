//! A three-node cluster in process, over real sockets: nodes 2 and 3 join node 1 with join
//! tokens exactly as `ca-node join` does, every node signs its own intermediate with the
//! root (held by node 1 only: software keys), writes are forwarded to the leader, admin
//! reads are linearizable, a ca-node join token is used at most once when presented to
//! every member at once, the Raft and cluster services refuse anything but a member, and
//! state backups restore into a new cluster.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use ca_dev::DevCluster;
use ca_identity::tls::{LiveRoots, SvidResolver};
use ca_proto::admin::*;
use ca_proto::raft::raft_service_client::RaftServiceClient;
use ca_state::{AuthorityKind, AuthorityState};
use tonic::Code;

fn quiet(_: usize, c: &mut ca_node::NodeConfig) {
    c.http_listen = None;
    c.log_level = "warn".into();
}

async fn start_cluster(dir: &std::path::Path) -> DevCluster {
    DevCluster::start_with(dir, 3, quiet)
        .await
        .expect("the cluster starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_forward_and_sign_their_own_intermediates() {
    let tmp = tempfile::tempdir().unwrap();
    let env = start_cluster(tmp.path()).await;

    // Three voters, one leader, every node agreeing.
    let st = env.nodes[0].core.raft().status();
    assert_eq!(st.members.len(), 3, "{st:?}");
    assert!(st.members.values().all(|m| m.voter), "{st:?}");
    let leader = env.leader().expect("a leader");
    for n in &env.nodes {
        assert_eq!(
            n.core.raft().status().leader,
            Some(env.nodes[leader].core.config().raft_id)
        );
    }

    // Every node has its own active intermediate, signed by the one root (nodes 2 and 3
    // had node 1 sign theirs: only node 1's key directory holds the root key).
    let auths = env.nodes[2].core.state().authorities().await.unwrap();
    let roots: Vec<_> = auths
        .iter()
        .filter(|a| a.kind == AuthorityKind::Root)
        .collect();
    assert_eq!(roots.len(), 1);
    let owners: BTreeSet<String> = auths
        .iter()
        .filter(|a| a.kind == AuthorityKind::Intermediate && a.state == AuthorityState::Active)
        .map(|a| a.node_id.clone())
        .collect();
    assert_eq!(
        owners,
        ["dev-1", "dev-2", "dev-3"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    // Exactly one active intermediate and one active JWT key per node (a joining node's
    // first CA round and its maintenance loop once raced and made two JWT keys).
    for kind in [AuthorityKind::Intermediate, AuthorityKind::Jwt] {
        for node in ["dev-1", "dev-2", "dev-3"] {
            let active = auths
                .iter()
                .filter(|a| {
                    a.kind == kind && a.state == AuthorityState::Active && a.node_id == node
                })
                .count();
            assert_eq!(
                active, 1,
                "{node}: {active} active {kind:?} authorities: {auths:#?}"
            );
        }
    }
    for n in &env.nodes {
        let int = n.core.ca().intermediate().expect("an intermediate");
        let info = ca_identity::x509::cert_info(&int.record.cert_der).unwrap();
        let root = ca_identity::x509::cert_info(&roots[0].cert_der).unwrap();
        assert_eq!(info.authority_key_id, root.subject_key_id);
    }
    for k in ["dev-2", "dev-3"] {
        let dir = tmp.path().join(format!("node-{}", &k[4..])).join("keys");
        let files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            files.iter().all(|f| !f.contains("root")),
            "{k} holds no root key: {files:?}"
        );
    }

    // A write through a follower's admin socket is forwarded to the leader, and a read on
    // any other node sees it at once (read barrier).
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let other = (0..3).find(|i| *i != leader && *i != follower).unwrap();
    let mut a = admin(&env.nodes[follower].admin_socket).await;
    let created = a
        .create_entry(CreateEntryRequest {
            entry: Some(entry(
                "spiffe://dev.example.org/service/forwarded",
                env.agent.spiffe_id().as_str(),
                &["unix:uid:4242"],
            )),
        })
        .await
        .expect("created through a follower")
        .into_inner()
        .entry
        .unwrap();
    let mut b = admin(&env.nodes[other].admin_socket).await;
    let got = b
        .get_entry(GetEntryRequest {
            id: created.id.clone(),
        })
        .await
        .expect("visible on another node")
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(got, created);

    // The agent, configured with all three addresses, gets SVIDs.
    env.register_demo().await.unwrap();
    env.wait_for_svid(ca_dev::DEMO_ID, DEADLINE)
        .await
        .expect("the agent gets the demo SVID");

    // Cluster status through the admin API.
    let s = a
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.members.len(), 3);
    assert_eq!(s.leader_id, env.nodes[leader].core.config().raft_id);

    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_join_token_is_used_once_and_only_ca_nodes_reach_raft() {
    let tmp = tempfile::tempdir().unwrap();
    let env = start_cluster(tmp.path()).await;
    let roots = roots_of(&env.nodes[0]);
    let none = SvidResolver::default();

    // The same token presented to all three members at once: exactly one Join succeeds.
    let token = env.nodes[1]
        .core
        .create_join_token("spiffe://dev.example.org/ca-node/dev-4", 600)
        .await
        .unwrap()
        .token;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let calls = env.nodes.iter().map(|n| {
        let mut c = cluster_client(&n.node_addr.to_string(), &roots, &none);
        let req = JoinRequest {
            token: token.clone(),
            csr: csr.clone(),
            node_id: "dev-4".into(),
        };
        async move { c.join(req).await }
    });
    let results = futures::future::join_all(calls).await;
    let ok: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert_eq!(ok.len(), 1, "{results:?}");
    for r in results.iter().filter(|r| r.is_err()) {
        assert_eq!(
            r.as_ref().unwrap_err().code(),
            Code::PermissionDenied,
            "{r:?}"
        );
    }
    let chain = ok[0].as_ref().unwrap().get_ref().svid_chain.clone();
    assert_eq!(
        ca_identity::x509::spiffe_id_of(&chain[0]).unwrap().as_str(),
        "spiffe://dev.example.org/ca-node/dev-4"
    );

    // A token for an agent, or for a member's own node ID, does not make a ca-node.
    let agent_token = env.nodes[0].core.create_join_token("", 600).await.unwrap();
    let err = cluster_client(&env.nodes[0].node_addr.to_string(), &roots, &none)
        .join(JoinRequest {
            token: agent_token.token,
            csr: csr.clone(),
            node_id: "dev-5".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = env.nodes[0]
        .core
        .create_join_token("spiffe://dev.example.org/ca-node/dev-2", 600)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already a member"), "{err}");

    // The Raft service and the members-only cluster calls: an agent's SVID is refused, so
    // is a caller without a certificate, and so is the new ca-node SVID while its node is
    // not a member (it only may ask to be added); a member's SVID gets through.
    let agent = new_agent(&env.nodes[0], "spiffe://dev.example.org/agent/intruder").await;
    let agent_svid = SvidResolver::default();
    agent_svid.set(&agent.chain, &agent.key_pkcs8).unwrap();
    let node_svid = SvidResolver::default();
    node_svid.set(&chain, &key.serialize_der()).unwrap();
    let td = ca_identity::TrustDomain::new(TD).unwrap();
    let member_svid = env.nodes[1].core.svid().clone();
    for (who, svid, code) in [
        ("no certificate", &none, Some(Code::Unauthenticated)),
        ("an agent", &agent_svid, Some(Code::PermissionDenied)),
        (
            "a ca-node that is no member",
            &node_svid,
            Some(Code::PermissionDenied),
        ),
        ("a member", &member_svid, None),
    ] {
        let tls = ca_node::raft_tls::any_node_tls(svid, &LiveRoots::new(roots.clone()), td.clone());
        let ch = ca_node::raft_tls::tls_channel(&env.nodes[0].node_addr.to_string(), tls).unwrap();
        let mut raft = RaftServiceClient::new(ch);
        let r = raft.read_index(ca_proto::raft::ReadIndexRequest {}).await;
        match code {
            Some(c) => assert_eq!(r.unwrap_err().code(), c, "{who}"),
            None => assert!(r.is_ok(), "{who}: {r:?}"),
        }
        // Replication: only a member gets an answer (to a stale vote: it changes nothing).
        let stale = ca_proto::raft::AppendEntriesRequest {
            vote: Some(ca_proto::raft::Vote {
                term: 0,
                node_id: 9,
                committed: false,
            }),
            ..Default::default()
        };
        let reply = raft.append_entries(stale).await;
        match code {
            Some(c) => assert_eq!(reply.unwrap_err().code(), c, "{who}"),
            None => assert!(
                matches!(
                    reply.unwrap().into_inner().result,
                    Some(ca_proto::raft::append_entries_reply::Result::HigherVote(_))
                ),
                "{who}"
            ),
        }
        let r = cluster_client(&env.nodes[0].node_addr.to_string(), &roots, svid)
            .sign_intermediate(SignIntermediateRequest {
                root_id: "x".into(),
                tbs_certificate: vec![1, 2, 3],
            })
            .await
            .unwrap_err();
        match code {
            Some(c) => assert_eq!(r.code(), c, "{who}"),
            // A ca-node gets as far as the root lookup.
            None => assert_eq!(r.code(), Code::NotFound, "{who}: {r:?}"),
        }
    }

    // A member refuses to sign anything but an intermediate for the caller.
    let root = env.nodes[0]
        .core
        .state()
        .authorities()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.kind == AuthorityKind::Root)
        .unwrap();
    let leaf_tbs = {
        // The TBS of dev-3's own intermediate, asked for by member dev-2: refused.
        let int = env.nodes[2].core.ca().intermediate().unwrap();
        let cert = x509_parser::parse_x509_certificate(&int.record.cert_der)
            .unwrap()
            .1;
        cert.tbs_certificate.as_ref().to_vec()
    };
    let err = cluster_client(&env.nodes[0].node_addr.to_string(), &roots, &member_svid)
        .sign_intermediate(SignIntermediateRequest {
            root_id: root.id.clone(),
            tbs_certificate: leaf_tbs,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("not an intermediate of node dev-2"),
        "{err:?}"
    );

    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remove_then_rejoin_and_restore_a_backup_as_a_new_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let env = start_cluster(tmp.path()).await;
    let mut a = admin(&env.nodes[0].admin_socket).await;
    a.create_entry(CreateEntryRequest {
        entry: Some(entry(
            "spiffe://dev.example.org/service/kept",
            env.agent.spiffe_id().as_str(),
            &["unix:uid:1234"],
        )),
    })
    .await
    .unwrap();

    // Remove node 3: out of the membership, its identity evicted, its authorities revoked.
    a.remove_member(RemoveMemberRequest { raft_id: 3 })
        .await
        .expect("removed");
    let st = env.nodes[0].core.raft().status();
    assert_eq!(st.members.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    let auths = env.nodes[0].core.state().authorities().await.unwrap();
    assert!(auths
        .iter()
        .filter(|a| a.node_id == "dev-3")
        .all(|a| a.state == AuthorityState::Revoked));
    assert!(env.nodes[0]
        .core
        .state()
        .agent("spiffe://dev.example.org/ca-node/dev-3")
        .await
        .unwrap()
        .is_none());

    // Wipe it and join again under a new raft id.
    let mut nodes = env.nodes;
    let old = nodes.pop().unwrap();
    let old_cfg = old.core.config().clone();
    old.shutdown().await;
    std::fs::remove_dir_all(&old_cfg.data_dir).unwrap();
    let mut cfg = old_cfg.clone();
    cfg.raft_id = 33;
    let token = nodes[0]
        .core
        .create_join_token("spiffe://dev.example.org/ca-node/dev-3", 600)
        .await
        .unwrap();
    let rejoined = ca_node::bootstrap::join(
        cfg,
        ca_node::bootstrap::JoinOptions {
            peer: nodes[1].core.advertise_addr().to_string(),
            token: token.token,
            bundle_pem: nodes[0].core.ca().bundle().unwrap().x509_pem(),
            promote: true,
            timeout: Duration::from_secs(60),
        },
    )
    .await
    .expect("the wiped node joins again");
    assert!(rejoined.core.ca().intermediate().is_some());
    let st = nodes[0].core.raft().status();
    assert_eq!(
        st.members.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 33]
    );
    assert!(st.members.values().all(|m| m.voter));
    // It caught up with everything written before it joined.
    assert!(rejoined
        .core
        .state()
        .entries()
        .await
        .unwrap()
        .iter()
        .any(|e| e.spiffe_id == "spiffe://dev.example.org/service/kept"));

    // A backup taken through the admin API restores into an empty data dir as the state of
    // a new single-node cluster with the same root and entries.
    let mut stream = a
        .save_snapshot(SaveSnapshotRequest { allow_stale: false })
        .await
        .unwrap()
        .into_inner();
    let mut data = Vec::new();
    let mut applied = 0;
    while let Some(c) = stream.message().await.unwrap() {
        applied = applied.max(c.applied_index);
        data.extend_from_slice(&c.data);
    }
    assert!(applied > 0);
    let backup = tmp.path().join("backup.db");
    std::fs::write(&backup, &data).unwrap();
    let root_before = roots_of(&nodes[0]);
    let root_key_dir = nodes[0].core.config().data_dir.join("keys");
    let _ = env.agent.shutdown().await;
    rejoined.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }

    let dr = tempfile::tempdir().unwrap();
    let mut cfg = node_config(dr.path());
    cfg.data_dir = dr.path().join("restored");
    let r = ca_node::backup::restore(&backup, &cfg.data_dir)
        .await
        .expect("restored");
    assert_eq!(r.applied_index, applied);
    assert!(r.retired_authorities >= 6, "{r:?}");
    // Software keys: the root's key file goes with the backup.
    let keys = cfg.data_dir.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for e in std::fs::read_dir(&root_key_dir).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().contains("root") {
            std::fs::copy(e.path(), keys.join(e.file_name())).unwrap();
        }
    }
    let node = ca_node::start(cfg).await.expect("the restored node starts");
    assert_eq!(roots_of(&node), root_before);
    let st = node.core.raft().status();
    assert_eq!(st.members.len(), 1);
    assert!(node
        .core
        .state()
        .entries()
        .await
        .unwrap()
        .iter()
        .any(|e| e.spiffe_id == "spiffe://dev.example.org/service/kept"));
    assert!(node.core.ca().intermediate().is_some());
    node.shutdown().await;
    // Restoring into a data dir that holds a node is refused.
    let err = ca_node::backup::restore(&backup, &dr.path().join("restored"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already holds"), "{err}");
}
