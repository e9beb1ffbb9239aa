//! The admin API refuses bad input over its real Unix socket: InvalidArgument, AlreadyExists
//! or NotFound as appropriate, a message that names the field and the rule, and nothing
//! stored (no command applied at all when validation refuses the request).

use crate::common::*;
use ca_proto::admin::{
    BanAgentRequest, CreateEntryRequest, CreateJoinTokenRequest, DeleteEntryRequest,
    EvictAgentRequest, GetAgentRequest, GetEntryRequest, ListEntriesRequest, UpdateEntryRequest,
};
use ca_proto::types::Entry;
use tonic::Code;

const PARENT: &str = "spiffe://dev.example.org/agent/host-1";
const GOOD_ID: &str = "spiffe://dev.example.org/service/api";

/// Checks one refusal: `code`, and a message containing every `|`-separated part of
/// `needles`; mismatches go to `failures` so a table reports all of them at once.
fn collect(
    failures: &mut Vec<String>,
    what: &str,
    r: Result<impl std::fmt::Debug, tonic::Status>,
    code: Code,
    needles: &str,
) {
    match r {
        Ok(v) => failures.push(format!("{what}: expected {code:?}, got success {v:?}")),
        Err(s) => {
            if s.code() != code {
                failures.push(format!(
                    "{what}: expected {code:?}, got {:?}: {}",
                    s.code(),
                    s.message()
                ));
            }
            for n in needles.split('|') {
                if !s.message().contains(n) {
                    failures.push(format!("{what}: message {:?} lacks {n:?}", s.message()));
                }
            }
        }
    }
}

#[tokio::test]
async fn malformed_spiffe_ids_are_refused_and_nothing_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let mut a = admin(&node.admin_socket).await;
    let applied = node.core.state().last_applied();
    let before = snapshot(node.core.state()).await;

    let too_long = format!("spiffe://{TD}/{}", "a".repeat(2100));
    let too_long_reason = "longer than 2048";
    let foreign = format!("not in this CA's trust domain|{TD}");
    let cases: Vec<(&str, &str)> = vec![
        ("", "it is empty"),
        ("http://dev.example.org/svc", "must start with 'spiffe://'"),
        ("SPIFFE://dev.example.org/svc", "lower-case 'spiffe://'"),
        ("spiffe://Dev.Example.org/svc", "upper-case"),
        ("spiffe:///svc", "trust domain is empty"),
        ("spiffe://dev.example.org//svc", "empty segment"),
        ("spiffe://dev.example.org/svc/", "trailing"),
        ("spiffe://dev.example.org/./svc", "'.' or '..'"),
        ("spiffe://dev.example.org/a/../svc", "'.' or '..'"),
        ("spiffe://dev.example.org/sv%41c", "percent-encoding"),
        ("spiffe://dev.example.org:8443/svc", "ports are not allowed"),
        ("spiffe://ops@dev.example.org/svc", "user info"),
        ("spiffe://dev.example.org/svc?x=1", "query"),
        ("spiffe://dev.example.org/svc#x", "fragment"),
        ("spiffe://dev.example.org/s v c", "' '"),
        (too_long.as_str(), too_long_reason),
        ("spiffe://other.example.org/svc", foreign.as_str()),
        ("spiffe://dev.example.org", "needs a path"),
        ("spiffe://dev.example.org/ca-node/x", "reserved"),
    ];
    let mut failures = Vec::new();
    for (id, needles) in &cases {
        // As the workload's ID.
        let r = a
            .create_entry(CreateEntryRequest {
                entry: Some(entry(id, PARENT, &["unix:uid:1000"])),
            })
            .await;
        let n = format!("spiffe_id|{needles}");
        collect(
            &mut failures,
            &format!("spiffe_id {id:.60}"),
            r,
            Code::InvalidArgument,
            &n,
        );
    }
    // The same rules for the parent ID (except the workload-only ones).
    for (id, needles) in cases.iter().take(cases.len() - 2) {
        let r = a
            .create_entry(CreateEntryRequest {
                entry: Some(entry(GOOD_ID, id, &["unix:uid:1000"])),
            })
            .await;
        let n = format!("parent_id|{needles}");
        collect(
            &mut failures,
            &format!("parent_id {id:.60}"),
            r,
            Code::InvalidArgument,
            &n,
        );
    }
    let r = a
        .create_entry(CreateEntryRequest {
            entry: Some(entry(GOOD_ID, GOOD_ID, &["unix:uid:1000"])),
        })
        .await;
    collect(
        &mut failures,
        "parent == spiffe_id",
        r,
        Code::InvalidArgument,
        "parent_id must differ from spiffe_id",
    );
    let r = a.create_entry(CreateEntryRequest { entry: None }).await;
    collect(
        &mut failures,
        "no entry",
        r,
        Code::InvalidArgument,
        "entry is required",
    );
    assert!(failures.is_empty(), "{failures:#?}");

    assert_eq!(
        node.core.state().last_applied(),
        applied,
        "a refused request applied a command"
    );
    assert_eq!(snapshot(node.core.state()).await, before);
    node.shutdown().await;
}

#[tokio::test]
async fn malformed_selectors_are_refused_and_nothing_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let mut a = admin(&node.admin_socket).await;
    let applied = node.core.state().last_applied();

    let sel = |t: &str, v: &str| ca_proto::types::Selector {
        r#type: t.into(),
        value: v.into(),
    };
    let cases: Vec<(Vec<ca_proto::types::Selector>, &str)> = vec![
        (vec![], "at least one selector"),
        (
            vec![sel("k8s", "ns:default")],
            "k8s:ns|not a selector this CA's agents produce|unix:uid",
        ),
        (vec![sel("unix", "shoe:42")], "unix:shoe|not a selector"),
        (vec![sel("unix", "uid")], "expected TYPE:KEY:VALUE"),
        (vec![sel("unix", "uid:")], "the value is empty"),
        (vec![sel("", "uid:1000")], "the selector type is empty"),
        (vec![sel("unix", "uid:abc")], "uid must be a number|\"abc\""),
        (vec![sel("unix", "gid:-1")], "gid must be a number"),
        (vec![sel("unix", "uid:99999999999")], "uid must be a number"),
        (vec![sel("unix", "path:usr/bin/x")], "path must be absolute"),
        (
            vec![sel("unix", "sha256:abc")],
            "sha256 must be 64 hex characters",
        ),
        (vec![sel("unix", "user:a\nb")], "control characters"),
        // One bad selector among good ones is enough to refuse the entry.
        (
            vec![sel("unix", "uid:1000"), sel("unix", "uid:x")],
            "uid must be a number",
        ),
    ];
    let mut failures = Vec::new();
    for (selectors, needles) in &cases {
        let mut e = entry(GOOD_ID, PARENT, &[]);
        e.selectors = selectors.clone();
        let r = a.create_entry(CreateEntryRequest { entry: Some(e) }).await;
        let n = format!("selector|{needles}");
        collect(
            &mut failures,
            &format!("{selectors:?}"),
            r,
            Code::InvalidArgument,
            &n,
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(node.core.state().last_applied(), applied);
    assert!(node.core.state().entries().await.unwrap().is_empty());
    node.shutdown().await;
}

#[tokio::test]
async fn bad_ttls_dns_names_and_hints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let mut a = admin(&node.admin_socket).await;
    let applied = node.core.state().last_applied();
    let max_x509 = node.core.config().max_x509_svid_ttl();
    let max_jwt = node.core.config().max_jwt_svid_ttl();

    let with = |f: &dyn Fn(&mut Entry)| {
        let mut e = entry(GOOD_ID, PARENT, &["unix:uid:1000"]);
        f(&mut e);
        e
    };
    let cases: Vec<(Entry, String)> = vec![
        (with(&|e| e.x509_svid_ttl = -1), "x509_svid_ttl|-1s".into()),
        (
            with(&|e| e.x509_svid_ttl = max_x509 + 1),
            format!("x509_svid_ttl|{max_x509}s"),
        ),
        (
            with(&|e| e.x509_svid_ttl = i64::MAX),
            "x509_svid_ttl".into(),
        ),
        (with(&|e| e.jwt_svid_ttl = -5), "jwt_svid_ttl|-5s".into()),
        (
            with(&|e| e.jwt_svid_ttl = max_jwt + 1),
            format!("jwt_svid_ttl|{max_jwt}s"),
        ),
        (
            with(&|e| e.dns_names = vec!["bad_name!".into()]),
            "dns name|bad_name!".into(),
        ),
        (with(&|e| e.dns_names = vec!["".into()]), "dns name".into()),
        (
            with(&|e| e.dns_names = vec!["-a.example.org".into()]),
            "dns name".into(),
        ),
        (
            with(&|e| e.dns_names = vec![format!("{}.org", "a".repeat(64))]),
            "dns name".into(),
        ),
        (with(&|e| e.hint = "h".repeat(1025)), "hint|1024".into()),
    ];
    let mut failures = Vec::new();
    for (e, needles) in &cases {
        let r = a
            .create_entry(CreateEntryRequest {
                entry: Some(e.clone()),
            })
            .await;
        collect(&mut failures, needles, r, Code::InvalidArgument, needles);
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(node.core.state().last_applied(), applied);
    assert!(node.core.state().entries().await.unwrap().is_empty());

    // Control: the limits themselves are accepted.
    let ok = a
        .create_entry(CreateEntryRequest {
            entry: Some(with(&|e| {
                e.x509_svid_ttl = max_x509;
                e.jwt_svid_ttl = max_jwt;
                e.dns_names = vec!["api.example.org".into(), "*.api.example.org".into()];
                e.hint = "h".repeat(1024);
            })),
        })
        .await
        .expect("an entry at the limits is valid");
    assert_eq!(ok.into_inner().entry.unwrap().x509_svid_ttl, max_x509);
    node.shutdown().await;
}

#[tokio::test]
async fn duplicate_entries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let mut a = admin(&node.admin_socket).await;
    let first = a
        .create_entry(CreateEntryRequest {
            entry: Some(entry(GOOD_ID, PARENT, &["unix:uid:1000", "unix:gid:1000"])),
        })
        .await
        .expect("create")
        .into_inner()
        .entry
        .unwrap();
    let before = snapshot(node.core.state()).await;

    // Same entry, and the same selectors in another order (and repeated).
    for selectors in [
        &["unix:uid:1000", "unix:gid:1000"][..],
        &["unix:gid:1000", "unix:uid:1000", "unix:uid:1000"][..],
    ] {
        let r = a
            .create_entry(CreateEntryRequest {
                entry: Some(entry(GOOD_ID, PARENT, selectors)),
            })
            .await;
        assert_status(
            r,
            Code::AlreadyExists,
            &["same SPIFFE ID, parent ID and selectors exists", &first.id],
        );
    }
    assert_eq!(snapshot(node.core.state()).await, before);

    // Control: a different selector set is a different entry.
    a.create_entry(CreateEntryRequest {
        entry: Some(entry(GOOD_ID, PARENT, &["unix:uid:1000"])),
    })
    .await
    .expect("a different selector set is allowed");
    assert_eq!(node.core.state().entries().await.unwrap().len(), 2);
    node.shutdown().await;
}

#[tokio::test]
async fn update_delete_and_get_of_a_missing_entry_are_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let mut a = admin(&node.admin_socket).await;
    let kept = a
        .create_entry(CreateEntryRequest {
            entry: Some(entry(GOOD_ID, PARENT, &["unix:uid:1000"])),
        })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    let before = snapshot(node.core.state()).await;
    let missing = "3f1d1c1e-0000-4000-8000-000000000000";

    let mut e = entry(GOOD_ID, PARENT, &["unix:uid:2000"]);
    e.id = missing.into();
    assert_status(
        a.update_entry(UpdateEntryRequest { entry: Some(e) }).await,
        Code::NotFound,
        &["no entry with ID", missing],
    );
    assert_status(
        a.delete_entry(DeleteEntryRequest { id: missing.into() })
            .await,
        Code::NotFound,
        &["no entry with ID", missing],
    );
    assert_status(
        a.get_entry(GetEntryRequest { id: missing.into() }).await,
        Code::NotFound,
        &["no entry with ID", missing],
    );
    // Without an ID.
    let e = entry(GOOD_ID, PARENT, &["unix:uid:2000"]);
    assert_status(
        a.update_entry(UpdateEntryRequest { entry: Some(e) }).await,
        Code::InvalidArgument,
        &["entry ID is required"],
    );
    assert_status(
        a.update_entry(UpdateEntryRequest { entry: None }).await,
        Code::InvalidArgument,
        &["entry is required"],
    );
    let r = a
        .delete_entry(DeleteEntryRequest { id: String::new() })
        .await;
    assert!(
        matches!(&r, Err(s) if s.code() == Code::NotFound || s.code() == Code::InvalidArgument),
        "{r:?}"
    );

    // An invalid update of an existing entry changes nothing.
    let mut bad = kept.clone();
    bad.selectors[0].value = "uid:abc".into();
    assert_status(
        a.update_entry(UpdateEntryRequest { entry: Some(bad) })
            .await,
        Code::InvalidArgument,
        &["selector", "uid must be a number"],
    );
    let mut bad = kept.clone();
    bad.spiffe_id = "spiffe://other.example.org/x".into();
    assert_status(
        a.update_entry(UpdateEntryRequest { entry: Some(bad) })
            .await,
        Code::InvalidArgument,
        &["spiffe_id", "trust domain"],
    );

    assert_eq!(snapshot(node.core.state()).await, before);
    let stored = node.core.state().entry(&kept.id).await.unwrap().unwrap();
    assert_eq!(stored.revision, kept.revision);
    assert_eq!(stored.selectors[0].value, "uid:1000");
    node.shutdown().await;
}

/// Updating an entry into a copy of another must be refused like creating the copy is.
#[tokio::test]
async fn an_update_cannot_turn_an_entry_into_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let mut a = admin(&node.admin_socket).await;
    let create = |sel: &'static str| CreateEntryRequest {
        entry: Some(entry(GOOD_ID, PARENT, &[sel])),
    };
    let first = a
        .create_entry(create("unix:uid:1000"))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    let second = a
        .create_entry(create("unix:uid:2000"))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    let before = snapshot(node.core.state()).await;
    let mut copy = second.clone();
    copy.selectors = first.selectors.clone();
    assert_status(
        a.update_entry(UpdateEntryRequest { entry: Some(copy) })
            .await,
        Code::AlreadyExists,
        &["same SPIFFE ID, parent ID and selectors exists", &first.id],
    );
    assert_eq!(snapshot(node.core.state()).await, before);
    node.shutdown().await;
}

#[tokio::test]
async fn bad_join_token_requests_are_refused_and_nothing_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let mut a = admin(&node.admin_socket).await;
    let applied = node.core.state().last_applied();

    let req = |id: &str, ttl: i64| CreateJoinTokenRequest {
        spiffe_id: id.into(),
        ttl_seconds: ttl,
    };
    let cases: Vec<(CreateJoinTokenRequest, &str)> = vec![
        (
            req("not-an-id", 60),
            "spiffe_id|must start with 'spiffe://'",
        ),
        (
            req("spiffe://Dev.example.org/agent/x", 60),
            "spiffe_id|upper-case",
        ),
        (
            req("spiffe://other.example.org/agent/x", 60),
            "spiffe_id|not in this CA's trust domain",
        ),
        (
            req("spiffe://dev.example.org", 60),
            "spiffe_id|needs a path",
        ),
        (
            req("spiffe://dev.example.org/ca-node/dev-1", 60),
            "spiffe_id|/ca-node/",
        ),
        (
            req("spiffe://dev.example.org/agent//x", 60),
            "spiffe_id|empty segment",
        ),
        (req("", -1), "ttl must be positive"),
        (req("", i64::MIN), "ttl must be positive"),
        (req("", 365 * 24 * 3600 + 1), "ttl|1 second to 1 year"),
        (req("", i64::MAX), "ttl|1 year"),
    ];
    let mut failures = Vec::new();
    for (r, needles) in cases {
        let what = format!("{:?}/{}", r.spiffe_id, r.ttl_seconds);
        collect(
            &mut failures,
            &what,
            a.create_join_token(r).await,
            Code::InvalidArgument,
            needles,
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(
        node.core.state().last_applied(),
        applied,
        "a refused join token request applied a command"
    );

    // A ttl of 0 means "the configured default" (proto3 cannot tell 0 from unset).
    let t = a
        .create_join_token(req("", 0))
        .await
        .expect("ttl 0 is the default")
        .into_inner();
    let ttl = t.expires_at - ca_identity::unix_now();
    let default = node.core.config().ttl.join_token;
    assert!(
        (default - 5..=default).contains(&ttl),
        "{ttl} vs default {default}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn agent_commands_for_a_missing_agent_are_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let mut a = admin(&node.admin_socket).await;
    let before = snapshot(node.core.state()).await;
    let id = "spiffe://dev.example.org/agent/nobody";
    assert_status(
        a.get_agent(GetAgentRequest {
            spiffe_id: id.into(),
        })
        .await,
        Code::NotFound,
        &[id],
    );
    assert_status(
        a.evict_agent(EvictAgentRequest {
            spiffe_id: id.into(),
        })
        .await,
        Code::NotFound,
        &["no agent", id],
    );
    assert_status(
        a.ban_agent(BanAgentRequest {
            spiffe_id: id.into(),
        })
        .await,
        Code::NotFound,
        &["no agent", id],
    );
    assert_eq!(snapshot(node.core.state()).await, before);
    assert!(
        before.agents.is_empty(),
        "ban must not create an agent record"
    );
    let listed = a
        .list_entries(ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(listed.is_empty());
    node.shutdown().await;
}

/// The admin methods in `admin.proto` (name, whether it streams its answer).
fn admin_methods() -> Vec<(String, bool)> {
    let proto = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto/admin.proto"),
    )
    .unwrap();
    let service = proto
        .split("service Admin {")
        .nth(1)
        .and_then(|s| s.split('}').next())
        .expect("service Admin in admin.proto");
    service
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| {
            let name = l.split('(').next().unwrap().trim().to_owned();
            (name, l.contains("returns (stream "))
        })
        .collect()
}

/// Every admin method refuses a caller that is neither the node's user nor root, whatever
/// the socket's file mode lets through (its first guard, opened here so that only the check
/// of the caller's uid stands). The methods are read from `admin.proto`, so a method added
/// later is covered at once; the caller is an independent gRPC client (Python grpcio) that
/// drops to uid 65534 before it connects. Nothing is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_method_refuses_another_user() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: calling the admin API as another user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let applied = node.core.state().last_applied();
    let mut p = node.admin_socket.parent().unwrap().to_path_buf();
    while p.starts_with(dir.path()) {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.pop();
    }
    std::fs::set_permissions(&node.admin_socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let methods = admin_methods();
    assert!(methods.len() >= 20, "{methods:?}");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/admin_as_other_user.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg("65534")
        .arg(&node.admin_socket)
        .args(methods.iter().map(|(m, stream)| {
            if *stream {
                format!("{m}:stream")
            } else {
                m.clone()
            }
        }))
        .output()
        .expect("python3 (with grpcio, installed with the `spiffe` package)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut failures = Vec::new();
    for (m, _) in &methods {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(m.as_str()))
            .unwrap_or("");
        if !line.contains("PERMISSION_DENIED")
            || !line.contains("uid 65534 may not use the admin API")
        {
            failures.push(format!("{m}: {line:?}"));
        }
    }
    assert!(failures.is_empty(), "not refused:\n{}", failures.join("\n"));
    assert_eq!(
        node.core.state().last_applied(),
        applied,
        "something was applied"
    );
}

/// A batch of entries: each answered on its own, in order (created, refused by validation,
/// refused by the state machine as a duplicate of an earlier one in the same batch); only
/// the valid, new ones stored. A batch over the limit is refused whole, nothing applied.
#[tokio::test]
async fn a_batch_of_entries_is_answered_entry_by_entry() {
    use ca_proto::admin::BatchCreateEntriesRequest;
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let mut a = admin(&node.admin_socket).await;
    let applied = node.core.state().last_applied();
    let too_many: Vec<Entry> = (0..=ca_node::admin_api::MAX_BATCH_ENTRIES)
        .map(|i| {
            entry(
                &format!("spiffe://{TD}/many/{i}"),
                PARENT,
                &["unix:uid:1000"],
            )
        })
        .collect();
    let e = a
        .batch_create_entries(BatchCreateEntriesRequest { entries: too_many })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("at most 1000"), "{}", e.message());
    assert_eq!(node.core.state().last_applied(), applied, "nothing applied");

    let first = entry(GOOD_ID, PARENT, &["unix:uid:1000"]);
    let r = a
        .batch_create_entries(BatchCreateEntriesRequest {
            entries: vec![
                first.clone(),
                entry("spiffe://Bad.Example/x", PARENT, &["unix:uid:1"]),
                entry(
                    &format!("spiffe://{TD}/service/db"),
                    PARENT,
                    &["unix:uid:1001"],
                ),
                first,
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<Code> = r.iter().map(|x| Code::from_i32(x.code)).collect();
    assert_eq!(
        codes,
        [
            Code::Ok,
            Code::InvalidArgument,
            Code::Ok,
            Code::AlreadyExists
        ],
        "{r:?}"
    );
    assert!(r[1].message.contains("spiffe_id"), "{:?}", r[1].message);
    assert_eq!(r[0].entry.as_ref().unwrap().spiffe_id, GOOD_ID);
    let stored = a
        .list_entries(ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(stored.len(), 2, "{stored:?}");
}
