//! The node API refuses bad input through the real transport (mTLS gRPC on a loopback TCP
//! socket, against a node started with `ca_node::start`): every refusal has the right
//! status code, a message that says what is wrong, and leaves the stored state unchanged.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use base64::Engine as _;
use ca_proto::node::{
    attest_agent_request, attest_params, AttestAgentRequest, BatchNewX509SvidRequest,
    GetBundleRequest, NewJwtSvidRequest, NewX509SvidParams, RenewAgentRequest, SyncEntriesRequest,
    X509PopChain,
};
use ca_proto::types::Entry;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SigningKey as _,
    PKCS_ECDSA_P256_SHA256,
};
use tonic::Code;

/// A PKCS#10 request for a 1024-bit RSA key, correctly self-signed (made once with
/// `openssl req -new -newkey rsa:1024`): the key is too weak for the CA to certify.
const RSA_1024_CSR_B64: &str =
    "MIIBTjCBuAIBADAPMQ0wCwYDVQQDDAR3ZWFrMIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC8\
7dUCw1ua267/aXHEP6Wxrzm+R3NYJojo0tZUgNNT2eHW6lC7mO/ONSvUG0/F9c3/D8fMvCy7dx8D\
dkBCHhGUSLGZsO0/IougocNa5Zre4+bja54cnQnRoGsmRnwOx0dR/tSszV39ZDzmJHUplx6mjvSn\
IRb1xa4BiLXSvx0UswIDAQABoAAwDQYJKoZIhvcNAQELBQADgYEAMGpUGFwNcnQN3cPYAPiANL0c\
iBH7aHtDFBzlEY0DlWZLppXS9uiFuXETtdXk+JuF8lq2dZg8W0/tgnrTb3YRGzP/q1TbafT0h4PH\
6IacjUNc0Dh29RSqStPOpdr0g1uBVIn9hRJttcgoghFUxlX8NVGIjiwhMNeCiHHCLDTnPXE=";

fn rsa_1024_csr() -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(RSA_1024_CSR_B64)
        .expect("fixture")
}

fn csr_for(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).expect("key");
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.serialize_request(&key).expect("csr").der().to_vec()
}

fn good_csr() -> Vec<u8> {
    ca_agent::attest::new_key_and_csr().expect("csr").0
}

fn join_token(t: &str) -> Option<attest_params::Data> {
    Some(attest_params::Data::JoinToken(t.into()))
}

/// Creates an entry under `parent` straight through the core (the admin API's own rules).
async fn add_entry(node: &ca_node::NodeHandle, spiffe_id: &str, parent: &str) -> String {
    let e = entry(spiffe_id, parent, &["unix:uid:1000"]);
    let rec = node
        .core
        .validate_entry(
            &e,
            uuid::Uuid::new_v4().to_string(),
            ca_identity::unix_now(),
        )
        .expect("valid entry");
    ca_node::core::propose(
        node.core.proposer(),
        ca_state::Command::CreateEntry { entry: rec.clone() },
    )
    .await
    .expect("entry created");
    rec.id
}

// ---------------------------------------------------------------------------------------
// Join tokens

#[tokio::test]
async fn unknown_join_token_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let before = snapshot(node.core.state()).await;

    let r = attest_join_token(&node, "00000000-0000-0000-0000-000000000000").await;
    assert_status(
        r,
        Code::PermissionDenied,
        &["unknown join token", "ca-node token generate"],
    );

    assert_eq!(snapshot(node.core.state()).await, before);
    assert!(before.agents.is_empty());
    node.shutdown().await;
}

#[tokio::test]
async fn used_join_token_is_refused_and_the_first_agent_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let t = node.core.create_join_token("", 600).await.unwrap();

    let first = attest_join_token(&node, &t.token)
        .await
        .expect("first use succeeds");
    assert_eq!(first.spiffe_id, t.spiffe_id);
    let used = node
        .core
        .state()
        .join_token(&t.token)
        .await
        .unwrap()
        .unwrap();
    assert!(used.used_at.is_some());
    let before = snapshot(node.core.state()).await;
    assert_eq!(before.agents.len(), 1);

    let r = attest_join_token(&node, &t.token).await;
    assert_status(r, Code::PermissionDenied, &["join token already used"]);

    assert_eq!(snapshot(node.core.state()).await, before);
    // Same agent record (serial of the first SVID), token unchanged.
    let (serial, _) = first.serial_and_expiry();
    assert_eq!(before.agents[0].x509_svid_serial, serial);
    assert_eq!(
        node.core
            .state()
            .join_token(&t.token)
            .await
            .unwrap()
            .unwrap(),
        used
    );
    node.shutdown().await;
}

#[tokio::test]
async fn expired_join_token_is_refused_and_stays_unused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let t = node.core.create_join_token("", 1).await.unwrap();
    // Wait until the token's expiry has passed (at most ~2 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ca_identity::unix_now() <= t.expires_at {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = snapshot(node.core.state()).await;

    let r = attest_join_token(&node, &t.token).await;
    assert_status(r, Code::PermissionDenied, &["join token expired"]);

    assert_eq!(snapshot(node.core.state()).await, before);
    assert!(before.agents.is_empty());
    let rec = node
        .core
        .state()
        .join_token(&t.token)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rec.used_at, None,
        "a refused attestation must not use the token"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn attestation_without_parameters_or_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let t = node.core.create_join_token("", 600).await.unwrap();
    let before = snapshot(node.core.state()).await;
    let mut c = node_client(node.node_addr, &roots_of(&node), None, ServerCheck::Verify);

    // Parameters without any attestation data.
    let r = attest_raw(&mut c, params(good_csr(), None), None).await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["no attestation data", "join_token", "x509pop"],
    );

    // A first message that is not the parameters.
    let r = attest_raw(
        &mut c,
        AttestAgentRequest {
            step: Some(attest_agent_request::Step::ChallengeResponse(vec![1, 2, 3])),
        },
        None,
    )
    .await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["first message must carry the attestation parameters"],
    );

    // An empty first message.
    let r = attest_raw(&mut c, AttestAgentRequest { step: None }, None).await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["first message must carry the attestation parameters"],
    );

    assert_eq!(snapshot(node.core.state()).await, before);
    assert_eq!(
        node.core
            .state()
            .join_token(&t.token)
            .await
            .unwrap()
            .unwrap()
            .used_at,
        None
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_bad_csr_does_not_consume_the_join_token() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let t = node.core.create_join_token("", 600).await.unwrap();
    let before = snapshot(node.core.state()).await;
    let mut c = node_client(node.node_addr, &roots_of(&node), None, ServerCheck::Verify);

    let r = attest_raw(&mut c, params(vec![], join_token(&t.token)), None).await;
    assert_status(r, Code::InvalidArgument, &["the CSR is empty"]);

    let r = attest_raw(
        &mut c,
        params(b"not a csr".to_vec(), join_token(&t.token)),
        None,
    )
    .await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["not a valid, correctly signed PKCS#10 request"],
    );

    // A CSR whose signature does not match its key: flip a bit in the signature.
    let mut tampered = good_csr();
    let last = tampered.len() - 3;
    tampered[last] ^= 0x01;
    let r = attest_raw(&mut c, params(tampered, join_token(&t.token)), None).await;
    assert_status(r, Code::InvalidArgument, &["correctly signed PKCS#10"]);

    assert_eq!(snapshot(node.core.state()).await, before);
    let rec = node
        .core
        .state()
        .join_token(&t.token)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rec.used_at, None,
        "a refused attestation must not use the token"
    );

    // The token still works with a good CSR.
    let svid = attest_join_token(&node, &t.token).await.expect("attests");
    assert_eq!(svid.spiffe_id, t.spiffe_id);
    node.shutdown().await;
}

#[tokio::test]
async fn a_banned_agent_cannot_attest_again_and_the_new_token_stays_unused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let id = format!("spiffe://{TD}/agent/host-1");
    new_agent(&node, &id).await;
    let mut a = admin(&node.admin_socket).await;
    a.ban_agent(ca_proto::admin::BanAgentRequest {
        spiffe_id: id.clone(),
    })
    .await
    .expect("ban");
    let t = node.core.create_join_token(&id, 600).await.unwrap();
    let before = snapshot(node.core.state()).await;

    let r = attest_join_token(&node, &t.token).await;
    assert_status(r, Code::PermissionDenied, &["banned", &id]);

    assert_eq!(snapshot(node.core.state()).await, before);
    assert!(before.agents[0].banned);
    let rec = node
        .core
        .state()
        .join_token(&t.token)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.used_at, None);
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// x509pop

/// A provisioning CA: (issuer, its PEM).
fn provisioning_ca(name: &str) -> (CertifiedIssuer<'static, KeyPair>, String) {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let ca = CertifiedIssuer::self_signed(p, key).unwrap();
    let pem = ca.pem();
    (ca, pem)
}

/// A provisioned host certificate from `ca`: (DER, key).
fn host_cert(ca: &CertifiedIssuer<'static, KeyPair>, host: &str) -> (Vec<u8>, KeyPair) {
    let mut p = CertificateParams::new(vec![host.to_string()]).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host);
    p.distinguished_name = dn;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    (cert.der().to_vec(), key)
}

async fn x509pop_node(dir: &Path) -> (ca_node::NodeHandle, CertifiedIssuer<'static, KeyPair>) {
    let (ca, pem) = provisioning_ca("provisioning CA");
    let bundle = dir.join("provisioning-ca.pem");
    std::fs::write(&bundle, pem).unwrap();
    let node = start_node(dir, |c| c.x509pop_ca_bundle = Some(bundle)).await;
    (node, ca)
}

fn x509pop(chain: Vec<Vec<u8>>) -> Option<attest_params::Data> {
    Some(attest_params::Data::X509pop(X509PopChain {
        certificates: chain,
    }))
}

#[tokio::test]
async fn x509pop_with_a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _ca) = x509pop_node(dir.path()).await;
    let (rogue_ca, _) = provisioning_ca("rogue CA");
    let (cert, key) = host_cert(&rogue_ca, "host-1");
    let before = snapshot(node.core.state()).await;
    let mut c = node_client(node.node_addr, &roots_of(&node), None, ServerCheck::Verify);

    let sign = move |ch: &[u8]| key.sign(ch).unwrap();
    let r = attest_raw(&mut c, params(good_csr(), x509pop(vec![cert])), Some(&sign)).await;
    assert_status(
        r,
        Code::PermissionDenied,
        &["x509pop certificate does not chain to a provisioning CA"],
    );

    // A chain that carries the rogue CA itself as "intermediate" changes nothing.
    let (cert2, key2) = host_cert(&rogue_ca, "host-2");
    let sign2 = move |ch: &[u8]| key2.sign(ch).unwrap();
    let r = attest_raw(
        &mut c,
        params(good_csr(), x509pop(vec![cert2, rogue_ca.der().to_vec()])),
        Some(&sign2),
    )
    .await;
    assert_status(r, Code::PermissionDenied, &["does not chain"]);

    // Garbage instead of a certificate.
    let r = attest_raw(
        &mut c,
        params(good_csr(), x509pop(vec![b"garbage".to_vec()])),
        None,
    )
    .await;
    assert_status(r, Code::InvalidArgument, &["x509pop certificate"]);

    // No certificate at all.
    let r = attest_raw(&mut c, params(good_csr(), x509pop(vec![])), None).await;
    assert_status(r, Code::InvalidArgument, &["x509pop: no certificates"]);

    assert_eq!(snapshot(node.core.state()).await, before);
    assert!(before.agents.is_empty());
    node.shutdown().await;
}

#[tokio::test]
async fn x509pop_with_a_wrong_challenge_signature_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ca) = x509pop_node(dir.path()).await;
    let (cert, key) = host_cert(&ca, "host-1");
    let before = snapshot(node.core.state()).await;
    let mut c = node_client(node.node_addr, &roots_of(&node), None, ServerCheck::Verify);

    // Signed with another key.
    let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let wrong_key = move |ch: &[u8]| other.sign(ch).unwrap();
    let r = attest_raw(
        &mut c,
        params(good_csr(), x509pop(vec![cert.clone()])),
        Some(&wrong_key),
    )
    .await;
    assert_status(
        r,
        Code::PermissionDenied,
        &["challenge signature does not verify"],
    );

    // The right key over other bytes.
    let key_ref = &key;
    let wrong_msg = move |ch: &[u8]| {
        let mut m = ch.to_vec();
        m[0] ^= 0xff;
        key_ref.sign(&m).unwrap()
    };
    let r = attest_raw(
        &mut c,
        params(good_csr(), x509pop(vec![cert.clone()])),
        Some(&wrong_msg),
    )
    .await;
    assert_status(
        r,
        Code::PermissionDenied,
        &["challenge signature does not verify"],
    );

    // A bad CSR with a valid chain is refused before any challenge.
    let r = attest_raw(&mut c, params(vec![], x509pop(vec![cert.clone()])), None).await;
    assert_status(r, Code::InvalidArgument, &["the CSR is empty"]);

    assert_eq!(snapshot(node.core.state()).await, before);

    // Control: the right key over the challenge attests.
    let right = |ch: &[u8]| key.sign(ch).unwrap();
    let ok = attest_raw(
        &mut c,
        params(good_csr(), x509pop(vec![cert])),
        Some(&right),
    )
    .await
    .expect("x509pop with the provisioned key attests");
    assert!(
        ok.spiffe_id
            .starts_with(&format!("spiffe://{TD}/agent/x509pop/")),
        "{}",
        ok.spiffe_id
    );
    let agents = node.core.state().agents().await.unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].attestation_type, "x509pop");
    node.shutdown().await;
}

#[tokio::test]
async fn x509pop_is_refused_when_not_configured() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let (ca, _) = provisioning_ca("provisioning CA");
    let (cert, key) = host_cert(&ca, "host-1");
    let before = snapshot(node.core.state()).await;
    let mut c = node_client(node.node_addr, &roots_of(&node), None, ServerCheck::Verify);
    let sign = move |ch: &[u8]| key.sign(ch).unwrap();
    let r = attest_raw(&mut c, params(good_csr(), x509pop(vec![cert])), Some(&sign)).await;
    assert_status(
        r,
        Code::PermissionDenied,
        &["x509pop attestation is not enabled", "x509pop_ca_bundle"],
    );
    assert_eq!(snapshot(node.core.state()).await, before);
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Calls that need an attested agent

#[tokio::test]
async fn calls_without_a_valid_agent_certificate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let before = snapshot(node.core.state()).await;

    // No client certificate: GetBundle works, everything else is Unauthenticated.
    let mut c = node_client(node.node_addr, &roots_of(&node), None, ServerCheck::Verify);
    let b = c.get_bundle(GetBundleRequest {}).await.expect("bundle");
    assert!(b.into_inner().bundle.is_some());
    let need = &["needs the agent's X.509-SVID", "attest first"];
    assert_status(
        c.sync_entries(SyncEntriesRequest {}).await,
        Code::Unauthenticated,
        need,
    );
    assert_status(
        c.renew_agent(RenewAgentRequest { csr: good_csr() }).await,
        Code::Unauthenticated,
        need,
    );
    assert_status(
        c.batch_new_x509_svid(BatchNewX509SvidRequest { params: vec![] })
            .await,
        Code::Unauthenticated,
        need,
    );
    assert_status(
        c.new_jwt_svid(NewJwtSvidRequest {
            entry_id: "x".into(),
            audience: vec!["a".into()],
        })
        .await,
        Code::Unauthenticated,
        need,
    );

    // A certificate for a SPIFFE ID of this trust domain from a CA the node does not trust:
    // the handshake fails, so no call reaches a handler.
    let rogue = ca_agent::testing::TestCa::new(TD);
    let (chain, key) = rogue.issue(&format!("spiffe://{TD}/agent/forged"), 600);
    let forged = Svid {
        spiffe_id: format!("spiffe://{TD}/agent/forged"),
        chain,
        key_pkcs8: key,
    };
    let mut c = node_client(
        node.node_addr,
        &roots_of(&node),
        Some(&forged),
        ServerCheck::Verify,
    );
    let r = c.sync_entries(SyncEntriesRequest {}).await;
    let s = r.expect_err("a forged agent SVID must be refused");
    assert!(
        matches!(s.code(), Code::Unknown | Code::Unavailable),
        "a handshake refusal, not a handler's: {s:?}"
    );
    assert!(
        format!("{s:?}").contains("UnknownCA"),
        "the refusal should say the certificate's issuer is unknown: {s:?}"
    );

    assert_eq!(snapshot(node.core.state()).await, before);
    node.shutdown().await;
}

/// One agent with one entry; returns (agent SVID, entry ID).
async fn agent_with_entry(node: &ca_node::NodeHandle, name: &str) -> (Svid, String) {
    let id = format!("spiffe://{TD}/agent/{name}");
    let svid = new_agent(node, &id).await;
    let entry_id = add_entry(node, &format!("spiffe://{TD}/workload/{name}"), &id).await;
    (svid, entry_id)
}

/// Every agent call of `svid` fails with `code` and a message containing `needles`.
async fn assert_every_call_refused(
    node: &ca_node::NodeHandle,
    svid: &Svid,
    entry_id: &str,
    code: Code,
    needles: &[&str],
) {
    let mut c = agent_client(node, svid);
    assert_status(
        c.renew_agent(RenewAgentRequest { csr: good_csr() }).await,
        code,
        needles,
    );
    assert_status(c.sync_entries(SyncEntriesRequest {}).await, code, needles);
    assert_status(
        c.batch_new_x509_svid(BatchNewX509SvidRequest {
            params: vec![NewX509SvidParams {
                entry_id: entry_id.into(),
                csr: good_csr(),
            }],
        })
        .await,
        code,
        needles,
    );
    assert_status(
        c.new_jwt_svid(NewJwtSvidRequest {
            entry_id: entry_id.into(),
            audience: vec!["svc".into()],
        })
        .await,
        code,
        needles,
    );
}

#[tokio::test]
async fn a_banned_agent_is_refused_on_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let (svid, entry_id) = agent_with_entry(&node, "host-1").await;

    // Control: before the ban every call works.
    let mut c = agent_client(&node, &svid);
    let entries = c
        .sync_entries(SyncEntriesRequest {})
        .await
        .expect("sync")
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 1);

    let mut a = admin(&node.admin_socket).await;
    a.ban_agent(ca_proto::admin::BanAgentRequest {
        spiffe_id: svid.spiffe_id.clone(),
    })
    .await
    .expect("ban");
    let before = snapshot(node.core.state()).await;

    assert_every_call_refused(
        &node,
        &svid,
        &entry_id,
        Code::PermissionDenied,
        &[&svid.spiffe_id, "is banned"],
    )
    .await;

    // Nothing changed; in particular RenewAgent recorded no new SVID.
    assert_eq!(snapshot(node.core.state()).await, before);
    let (serial, _) = svid.serial_and_expiry();
    let rec = node
        .core
        .state()
        .agent(&svid.spiffe_id)
        .await
        .unwrap()
        .unwrap();
    assert!(rec.banned);
    assert_eq!(rec.x509_svid_serial, serial);
    node.shutdown().await;
}

#[tokio::test]
async fn an_evicted_agent_is_refused_on_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let (svid, entry_id) = agent_with_entry(&node, "host-1").await;
    let (other, _) = agent_with_entry(&node, "host-2").await;

    let mut a = admin(&node.admin_socket).await;
    a.evict_agent(ca_proto::admin::EvictAgentRequest {
        spiffe_id: svid.spiffe_id.clone(),
    })
    .await
    .expect("evict");
    let before = snapshot(node.core.state()).await;
    assert_eq!(before.agents.len(), 1);

    assert_every_call_refused(
        &node,
        &svid,
        &entry_id,
        Code::PermissionDenied,
        &[&svid.spiffe_id, "not attested", "attest again"],
    )
    .await;

    // No call brought the evicted agent back.
    assert_eq!(snapshot(node.core.state()).await, before);
    assert!(node
        .core
        .state()
        .agent(&svid.spiffe_id)
        .await
        .unwrap()
        .is_none());
    // The other agent is unaffected.
    let mut c = agent_client(&node, &other);
    c.sync_entries(SyncEntriesRequest {})
        .await
        .expect("the other agent still syncs");
    node.shutdown().await;
}

#[tokio::test]
async fn an_expired_agent_svid_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The shortest agent SVID the configuration allows.
    let node = start_node(dir.path(), |c| c.ttl.agent_svid = 1).await;
    assert!(
        ca_node::NodeConfig::parse(&format!(
            "node_id = \"n\"\ntrust_domain = \"{TD}\"\ndata_dir = \"d\"\n[ttl]\nagent_svid = 0\n"
        ))
        .is_err(),
        "0 must be below the minimum"
    );
    let (svid, entry_id) = agent_with_entry(&node, "host-1").await;
    let (_, not_after) = svid.serial_and_expiry();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ca_identity::unix_now() <= not_after {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = snapshot(node.core.state()).await;

    // Only the node's verdict on the client certificate is under test: the client accepts
    // any server certificate (the node's own serving SVID has the same short lifetime).
    let mut c = node_client(
        node.node_addr,
        &roots_of(&node),
        Some(&svid),
        ServerCheck::AcceptAny,
    );
    for r in [
        c.sync_entries(SyncEntriesRequest {}).await.map(|_| ()),
        c.renew_agent(RenewAgentRequest { csr: good_csr() })
            .await
            .map(|_| ()),
        c.batch_new_x509_svid(BatchNewX509SvidRequest {
            params: vec![NewX509SvidParams {
                entry_id: entry_id.clone(),
                csr: good_csr(),
            }],
        })
        .await
        .map(|_| ()),
    ] {
        // Refused in the handshake: the node's TLS alert names the reason.
        let s = r.expect_err("an expired agent SVID must be refused");
        assert!(
            matches!(s.code(), Code::Unknown | Code::Unavailable),
            "a handshake refusal, not a handler's: {s:?}"
        );
        assert!(
            format!("{s:?}").contains("CertificateExpired"),
            "the refusal should say the certificate expired: {s:?}"
        );
    }

    assert_eq!(snapshot(node.core.state()).await, before);
    node.shutdown().await;
}

/// With the shortest agent SVID lifetime the configuration accepts, the node's own serving
/// certificate (minted with the same lifetime) must still be valid whenever an agent connects.
#[tokio::test]
async fn the_node_serving_certificate_stays_valid_with_a_short_agent_svid_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |c| c.ttl.agent_svid = 1).await;
    let roots = roots_of(&node);
    let end = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < end {
        let mut c = node_client(node.node_addr, &roots, None, ServerCheck::Verify);
        c.get_bundle(GetBundleRequest {})
            .await
            .expect("the node's certificate is valid");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// BatchNewX509Svid and NewJwtSvid

#[tokio::test]
async fn batch_new_x509_svid_refuses_each_bad_item_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let (svid, mine) = agent_with_entry(&node, "host-1").await;
    let (_, theirs) = agent_with_entry(&node, "host-2").await;
    let before = snapshot(node.core.state()).await;
    let mut c = agent_client(&node, &svid);

    // (entry ID, CSR, `|`-separated parts of the expected error; empty: must succeed)
    let not_authorized = format!("does not exist or is not authorized|{}", svid.spiffe_id);
    let items: Vec<(String, Vec<u8>, &str)> = vec![
        (mine.clone(), good_csr(), ""),
        (theirs.clone(), good_csr(), not_authorized.as_str()),
        (
            "no-such-entry".into(),
            good_csr(),
            "\"no-such-entry\"|does not exist",
        ),
        (String::new(), good_csr(), "does not exist"),
        (mine.clone(), vec![], "the CSR is empty"),
        (
            mine.clone(),
            b"\x30\x03\x02\x01\x00".to_vec(),
            "not a valid, correctly signed PKCS#10 request",
        ),
        (mine.clone(), csr_for(&rcgen::PKCS_ED25519), "CSR key|P-256"),
        (mine.clone(), rsa_1024_csr(), "1024 bits|at least 2048"),
        (mine.clone(), csr_for(&rcgen::PKCS_ECDSA_P384_SHA384), ""),
    ];
    let resp = c
        .batch_new_x509_svid(BatchNewX509SvidRequest {
            params: items
                .iter()
                .map(|(id, csr, _)| NewX509SvidParams {
                    entry_id: id.clone(),
                    csr: csr.clone(),
                })
                .collect(),
        })
        .await
        .expect("a batch answers per item")
        .into_inner();
    assert_eq!(resp.results.len(), items.len());
    let mut failures = Vec::new();
    for (i, ((id, _, needles), r)) in items.iter().zip(&resp.results).enumerate() {
        assert_eq!(&r.entry_id, id, "item {i}: results keep the request order");
        if needles.is_empty() {
            if !r.error.is_empty() || r.svid_chain.is_empty() {
                failures.push(format!("item {i}: expected an SVID, got {:?}", r.error));
            } else {
                let got = ca_identity::x509::spiffe_id_of(&r.svid_chain[0]).unwrap();
                assert_eq!(got.as_str(), format!("spiffe://{TD}/workload/host-1"));
            }
        } else {
            if !r.svid_chain.is_empty() {
                failures.push(format!("item {i}: got an SVID, expected {needles:?}"));
            }
            for n in needles.split('|') {
                if !r.error.contains(n) {
                    failures.push(format!("item {i}: error {:?} lacks {n:?}", r.error));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    assert_eq!(snapshot(node.core.state()).await, before);
    node.shutdown().await;
}

#[tokio::test]
async fn new_jwt_svid_refuses_unauthorized_entries_and_empty_audiences() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let (svid, mine) = agent_with_entry(&node, "host-1").await;
    let (_, theirs) = agent_with_entry(&node, "host-2").await;
    let before = snapshot(node.core.state()).await;
    let mut c = agent_client(&node, &svid);

    let jwt = |entry_id: &str, audience: &[&str]| NewJwtSvidRequest {
        entry_id: entry_id.into(),
        audience: audience.iter().map(|s| s.to_string()).collect(),
    };
    assert_status(
        c.new_jwt_svid(jwt(&theirs, &["svc"])).await,
        Code::PermissionDenied,
        &["does not exist or is not authorized"],
    );
    assert_status(
        c.new_jwt_svid(jwt("missing", &["svc"])).await,
        Code::PermissionDenied,
        &["\"missing\""],
    );
    assert_status(
        c.new_jwt_svid(jwt(&mine, &[])).await,
        Code::InvalidArgument,
        &["audience"],
    );
    assert_status(
        c.new_jwt_svid(jwt(&mine, &["svc", ""])).await,
        Code::InvalidArgument,
        &["an audience is empty"],
    );
    let many: Vec<String> = (0..17).map(|i| format!("svc{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_status(
        c.new_jwt_svid(jwt(&mine, &many)).await,
        Code::InvalidArgument,
        &["17 audiences requested; at most 16"],
    );
    // Control.
    let ok = c
        .new_jwt_svid(jwt(&mine, &["svc"]))
        .await
        .expect("authorized");
    assert!(!ok.into_inner().token.is_empty());

    assert_eq!(snapshot(node.core.state()).await, before);
    node.shutdown().await;
}

#[tokio::test]
async fn sync_returns_only_authorized_entries() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let (svid, mine) = agent_with_entry(&node, "host-1").await;
    let (_, theirs) = agent_with_entry(&node, "host-2").await;
    let mut c = agent_client(&node, &svid);
    let entries: Vec<Entry> = c
        .sync_entries(SyncEntriesRequest {})
        .await
        .expect("sync")
        .into_inner()
        .entries;
    let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, vec![mine.as_str()]);
    assert!(!ids.contains(&theirs.as_str()));
    node.shutdown().await;
}

/// An evicted agent's SVID must not regain access when another host attests with the same
/// SPIFFE ID: the node stores the serial of each agent's current SVID and should accept
/// only that one.
#[tokio::test]
async fn a_replaced_agent_svid_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let id = format!("spiffe://{TD}/agent/host-1");
    let old = new_agent(&node, &id).await;
    let mut a = admin(&node.admin_socket).await;
    a.evict_agent(ca_proto::admin::EvictAgentRequest {
        spiffe_id: id.clone(),
    })
    .await
    .expect("evict");
    // A new host gets the same ID.
    let new = new_agent(&node, &id).await;
    assert_ne!(old.serial_and_expiry().0, new.serial_and_expiry().0);
    agent_client(&node, &new)
        .sync_entries(SyncEntriesRequest {})
        .await
        .expect("the current SVID works");
    let before = snapshot(node.core.state()).await;
    let r = agent_client(&node, &old)
        .renew_agent(RenewAgentRequest { csr: good_csr() })
        .await;
    assert_status(r, Code::PermissionDenied, &[]);
    assert_eq!(snapshot(node.core.state()).await, before);
    node.shutdown().await;
}

/// A correctly self-signed CSR for a 1024-bit RSA key must be refused because the key is too
/// small, and the message should say so (the node has a dedicated check and message).
#[tokio::test]
async fn a_weak_rsa_key_is_refused_for_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let (svid, mine) = agent_with_entry(&node, "host-1").await;
    let resp = agent_client(&node, &svid)
        .batch_new_x509_svid(BatchNewX509SvidRequest {
            params: vec![NewX509SvidParams {
                entry_id: mine,
                csr: rsa_1024_csr(),
            }],
        })
        .await
        .expect("batch")
        .into_inner();
    let r = &resp.results[0];
    assert!(r.svid_chain.is_empty());
    assert!(
        r.error.contains("1024") && r.error.contains("2048"),
        "{:?}",
        r.error
    );
    node.shutdown().await;
}

#[tokio::test]
async fn an_oversized_batch_is_refused_before_any_signing() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let agent = new_agent(&node, "").await;
    let mut c = agent_client(&node, &agent);
    let max = ca_node::config::MAX_BATCH_CSRS;
    let params = vec![
        NewX509SvidParams {
            entry_id: "x".into(),
            csr: good_csr(),
        };
        max + 1
    ];
    assert_status(
        c.batch_new_x509_svid(BatchNewX509SvidRequest { params })
            .await,
        Code::InvalidArgument,
        &["at most 500 per call"],
    );
    // At the limit the call is answered item by item (here: no such entry).
    let params = vec![
        NewX509SvidParams {
            entry_id: "x".into(),
            csr: good_csr(),
        };
        max
    ];
    let r = c
        .batch_new_x509_svid(BatchNewX509SvidRequest { params })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), max);
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Limits: what a caller without a client certificate can hold, and rate limits

/// A TLS connection to the node port without a client certificate that sends nothing after
/// its handshake.
async fn silent_anonymous_connection(
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let provider = ca_identity::tls::provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAnyServer(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// Whether the node closes `conn` within `limit` (reads until EOF or an error; the node
/// may first send its HTTP/2 settings).
async fn closed_within(
    conn: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    limit: Duration,
) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn silent_connections_without_a_certificate_are_bounded_per_address_and_in_age() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |c| {
        c.limits.unauthenticated_connections_per_address = 8;
        c.limits.unauthenticated_max_age_secs = 3;
    })
    .await;
    let agent = new_agent(&node, "").await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let conn = silent_anonymous_connection(node.node_addr).await;
        held.push(conn.expect("within the address's share"));
    }
    // Over the address's share: closed at once, before or after the TLS handshake.
    for _ in 0..12 {
        if let Ok(mut extra) = silent_anonymous_connection(node.node_addr).await {
            assert!(
                closed_within(&mut extra, Duration::from_secs(2)).await,
                "a 9th silent connection from one address must be closed"
            );
        }
    }
    // An agent with its SVID is not affected by the anonymous ones.
    agent_client(&node, &agent)
        .sync_entries(SyncEntriesRequest {})
        .await
        .expect("an authenticated agent is served while anonymous slots are full");
    // The 8 held ones are closed at their maximum age although they never misbehave.
    for c in &mut held {
        assert!(
            closed_within(c, Duration::from_secs(10)).await,
            "a silent connection without a certificate must be closed at its maximum age"
        );
    }
    // With the slots free again, anonymous callers are served.
    node_client(node.node_addr, &roots_of(&node), None, ServerCheck::Verify)
        .get_bundle(GetBundleRequest {})
        .await
        .expect("served once the slots are free");
    let m = node.core.metrics().render();
    assert!(
        m.contains("ca_node_api_rate_limited_total{limit=\"unauthenticated_connections\"} 12"),
        "{m}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn attestation_is_rate_limited_per_source_address_without_consuming_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |c| {
        c.limits.attestations_per_second = 0.5;
        c.limits.attestation_burst = 3;
    })
    .await;
    let t = node.core.create_join_token("", 600).await.unwrap();
    // An attacker guessing tokens spends the address's budget.
    for i in 0..3 {
        let r = attest_join_token(&node, &format!("guess-{i}")).await;
        assert_status(r, Code::PermissionDenied, &[]);
    }
    let before = snapshot(node.core.state()).await;
    let r = attest_join_token(&node, &t.token).await;
    assert_status(
        r,
        Code::ResourceExhausted,
        &[
            "rate limit",
            "attestations per second",
            "address 127.0.0.1",
            "retry in",
        ],
    );
    assert_eq!(
        snapshot(node.core.state()).await,
        before,
        "no agent was created"
    );
    let m = node.core.metrics().render();
    assert!(
        m.contains("ca_node_api_rate_limited_total{limit=\"attestation\"} 1"),
        "{m}"
    );
    // Refused before anything was read: once the address's budget refills (0.5/s), the
    // same token still attests.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    attest_join_token(&node, &t.token)
        .await
        .expect("the refused attempt did not consume the token");
    node.shutdown().await;
}

#[tokio::test]
async fn signing_is_rate_limited_per_agent() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |c| {
        c.limits.signings_per_second = 0.01;
        c.limits.signing_burst = ca_node::config::MAX_BATCH_CSRS as u32;
    })
    .await;
    let (greedy, entry) = agent_with_entry(&node, "greedy").await;
    let (other, other_entry) = agent_with_entry(&node, "other").await;
    let mut c = agent_client(&node, &greedy);
    // One full batch (every item costs, even those that fail) spends the whole budget.
    let params = vec![
        NewX509SvidParams {
            entry_id: "no-such-entry".into(),
            csr: vec![],
        };
        ca_node::config::MAX_BATCH_CSRS
    ];
    c.batch_new_x509_svid(BatchNewX509SvidRequest { params })
        .await
        .expect("within the budget");
    let jwt = NewJwtSvidRequest {
        entry_id: entry.clone(),
        audience: vec!["a".into()],
    };
    assert_status(
        c.new_jwt_svid(jwt).await,
        Code::ResourceExhausted,
        &["rate limit", "signatures per second", "/agent/greedy"],
    );
    assert_status(
        c.batch_new_x509_svid(BatchNewX509SvidRequest {
            params: vec![NewX509SvidParams {
                entry_id: entry,
                csr: good_csr(),
            }],
        })
        .await,
        Code::ResourceExhausted,
        &["rate limit"],
    );
    // Another agent has its own budget.
    agent_client(&node, &other)
        .new_jwt_svid(NewJwtSvidRequest {
            entry_id: other_entry,
            audience: vec!["a".into()],
        })
        .await
        .expect("another agent is not limited by the first");
    node.shutdown().await;
}
