//! The `ca-node` binary as users run it: `run --config` refuses bad configurations with a
//! message naming the problem; admin commands against a running node process refuse bad
//! input with an actionable message and a non-zero exit; `healthcheck` tells a ready node
//! from a missing one.

use std::path::Path;

use crate::common::*;

/// `ca-node run --config` with `extra` appended to an otherwise valid config: must exit
/// non-zero (without starting) and say each of `needles` on stderr.
#[track_caller]
fn refused_config(dir: &Path, extra: &str, needles: &[&str]) {
    let (cfg, sock) = write_config(dir, "127.0.0.1:0", extra);
    let out = run_cli(&["run", "--config", cfg.to_str().unwrap()]);
    assert!(!out.success, "{extra:?} was accepted: {out:?}");
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "{extra:?}: stderr lacks {n:?}: {}",
            out.stderr
        );
    }
    assert!(!sock.exists(), "{extra:?}: the node started anyway");
}

#[test]
fn run_refuses_invalid_configurations() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    refused_config(d, "bogus_key = 1\n", &["unknown field", "bogus_key"]);
    refused_config(d, "[ttl]\nroot_ttl = 5\n", &["unknown field", "root_ttl"]);
    refused_config(
        d,
        "[ttl]\nx509_svid = 86400\n",
        &[
            "ttl.x509_svid",
            "does not fit into what is left of an intermediate",
            "14400",
        ],
    );
    refused_config(
        d,
        "[ttl]\nagent_svid = 50000\n",
        &[
            "ttl.agent_svid",
            "does not fit into what is left of an intermediate",
        ],
    );
    refused_config(
        d,
        "[ttl]\njwt_svid = 86400\n",
        &["ttl.jwt_svid", "ttl.jwt_key"],
    );
    refused_config(d, "[ttl]\nx509_svid = 0\n", &["ttl.x509_svid", "positive"]);
    refused_config(
        d,
        "intermediate_mode = \"disk\"\n",
        &["intermediate_mode", "unknown variant"],
    );
    refused_config(
        d,
        "x509pop_ca_bundle = \"/nonexistent/provisioning-ca.pem\"\n",
        &["x509pop_ca_bundle", "/nonexistent/provisioning-ca.pem"],
    );
    // The bad trust domain replaces the valid one: write that config by hand.
    let cfg = d.join("bad-td.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"n1\"\ntrust_domain = \"Dev.Example.org\"\ndata_dir = {:?}\nadmin_socket = {:?}\n",
            d.join("data"),
            d.join("admin.sock")
        ),
    )
    .unwrap();
    let out = run_cli(&["run", "--config", cfg.to_str().unwrap()]);
    assert!(!out.success);
    assert!(
        out.stderr.contains("trust_domain") && out.stderr.contains("upper-case"),
        "{}",
        out.stderr
    );
    let cfg = d.join("bad-node-id.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"Node 1\"\ntrust_domain = \"{TD}\"\ndata_dir = {:?}\nadmin_socket = {:?}\n",
            d.join("data"),
            d.join("admin.sock")
        ),
    )
    .unwrap();
    let out = run_cli(&["run", "--config", cfg.to_str().unwrap()]);
    assert!(!out.success);
    assert!(out.stderr.contains("node_id"), "{}", out.stderr);

    // A missing file.
    let missing = d.join("no-such-config.toml");
    let out = run_cli(&["run", "--config", missing.to_str().unwrap()]);
    assert!(!out.success);
    assert!(
        out.stderr.contains("cannot read") && out.stderr.contains("no-such-config.toml"),
        "{}",
        out.stderr
    );
    // Not TOML at all.
    let cfg = d.join("garbage.toml");
    std::fs::write(&cfg, "this is = = not toml").unwrap();
    let out = run_cli(&["run", "--config", cfg.to_str().unwrap()]);
    assert!(!out.success);
    assert!(out.stderr.contains("garbage.toml"), "{}", out.stderr);
    // Nothing was created for any of them.
    assert!(
        !d.join("data").exists(),
        "a refused config created the data_dir"
    );
}

/// Runs an admin command against `sock`.
fn cli(sock: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--socket-path", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    run_cli(&all)
}

fn entry_count(sock: &Path) -> usize {
    let out = cli(sock, &["entry", "show", "--output", "json"]);
    assert!(out.success, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    v.as_array().expect("array").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_against_a_running_node_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, sock) = write_config(tmp.path(), "127.0.0.1:0", "");
    let _node = NodeProcess::start(&cfg, &sock, &tmp.path().join("node.log")).await;
    let parent_s = format!("spiffe://{TD}/agent/host-1");
    let parent = parent_s.as_str();
    let svc_s = format!("spiffe://{TD}/svc");
    let svc = svc_s.as_str();

    // healthcheck: ready.
    let out = cli(&sock, &["healthcheck"]);
    assert!(out.success, "{out:?}");
    assert!(out.stdout.contains("Server is healthy"), "{}", out.stdout);

    // Bad SPIFFE IDs: non-zero exit, a message naming the field and the rule.
    for (id, why) in [
        ("bad", "must start with 'spiffe://'"),
        ("spiffe://Dev.example.org/x", "upper-case"),
        (
            "spiffe://other.example.org/x",
            "not in this CA's trust domain",
        ),
        ("spiffe://dev.example.org/a//b", "empty segment"),
    ] {
        let out = cli(
            &sock,
            &[
                "entry",
                "create",
                "--spiffe-id",
                id,
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1000",
            ],
        );
        assert!(!out.success, "{id}: {out:?}");
        assert!(
            out.stderr.contains("spiffe_id") && out.stderr.contains(why),
            "{id}: {}",
            out.stderr
        );
        assert!(out.stderr.starts_with("Error: "), "{}", out.stderr);
    }
    // Bad selectors are refused by the CLI with the supported list.
    let out = cli(
        &sock,
        &[
            "entry",
            "create",
            "--spiffe-id",
            svc,
            "--parent-id",
            parent,
            "--selector",
            "unix:uid:abc",
        ],
    );
    assert!(!out.success);
    assert!(
        out.stderr.contains("uid must be a number"),
        "{}",
        out.stderr
    );
    let out = cli(
        &sock,
        &[
            "entry",
            "create",
            "--spiffe-id",
            svc,
            "--parent-id",
            parent,
            "--selector",
            "docker:label:x",
        ],
    );
    assert!(!out.success);
    assert!(
        out.stderr.contains("not a selector") && out.stderr.contains("unix:uid"),
        "{}",
        out.stderr
    );
    // Missing flags.
    let out = cli(&sock, &["entry", "create", "--spiffe-id", svc]);
    assert!(!out.success);
    assert!(out.stderr.contains("--parent-id"), "{}", out.stderr);
    // TTL beyond the limit.
    let out = cli(
        &sock,
        &[
            "entry",
            "create",
            "--spiffe-id",
            svc,
            "--parent-id",
            parent,
            "--selector",
            "unix:uid:1000",
            "--x509-svid-ttl",
            "999999",
        ],
    );
    assert!(!out.success);
    assert!(out.stderr.contains("x509_svid_ttl"), "{}", out.stderr);
    assert_eq!(entry_count(&sock), 0, "a refused command stored an entry");

    // Missing entries and bad tokens.
    let out = cli(&sock, &["entry", "delete", "--entry-id", "nope"]);
    assert!(!out.success);
    assert!(
        out.stderr.contains("no entry with ID nope"),
        "{}",
        out.stderr
    );
    let out = cli(
        &sock,
        &["entry", "update", "--entry-id", "nope", "--hint", "x"],
    );
    assert!(!out.success);
    assert!(
        out.stderr.contains("no entry with ID nope"),
        "{}",
        out.stderr
    );
    let out = cli(&sock, &["token", "generate", "--ttl=-5"]);
    assert!(!out.success);
    assert!(
        out.stderr.contains("ttl must be positive"),
        "{}",
        out.stderr
    );
    let out = cli(
        &sock,
        &[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://other.example.org/a",
        ],
    );
    assert!(!out.success);
    assert!(out.stderr.contains("spiffe_id"), "{}", out.stderr);
    let out = cli(&sock, &["agent", "ban", "--spiffe-id", parent]);
    assert!(!out.success);
    assert!(out.stderr.contains("no agent"), "{}", out.stderr);

    // Control: a valid entry is created, shown, and a duplicate refused.
    let args: [&str; 10] = [
        "entry",
        "create",
        "--spiffe-id",
        svc,
        "--parent-id",
        parent,
        "--selector",
        "unix:uid:1000",
        "--output",
        "json",
    ];
    let out = cli(&sock, &args);
    assert!(out.success, "{out:?}");
    let created: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let id = created[0]["id"].as_str().expect("id").to_owned();
    assert_eq!(entry_count(&sock), 1);
    let out = cli(&sock, &args);
    assert!(!out.success);
    assert!(
        out.stderr.contains("exists") && out.stderr.contains(&id),
        "{}",
        out.stderr
    );
    assert_eq!(entry_count(&sock), 1);
}

#[test]
fn healthcheck_without_a_node_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("missing.sock");
    let out = cli(&sock, &["healthcheck"]);
    assert!(!out.success);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("missing.sock")
            && out.stderr.contains("is the node running?")
            && out.stderr.contains("CA_NODE_ADMIN_SOCKET"),
        "{}",
        out.stderr
    );
    // A socket file nobody listens on (a node that died).
    let stale = tmp.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = cli(&stale, &["healthcheck"]);
    assert!(!out.success);
    assert!(out.stderr.contains("stale.sock"), "{}", out.stderr);
    // A socket in a directory every user may write: someone else could be answering on it,
    // so the command sends nothing.
    let open_dir = tmp.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(
        &open_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let planted = open_dir.join("admin.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&planted).unwrap();
    let out = cli(&planted, &["healthcheck"]);
    assert!(!out.success);
    assert!(
        out.stderr.contains("refusing the admin socket")
            && out.stderr.contains("writable by group or others"),
        "{}",
        out.stderr
    );
}

/// `ca-node token generate` without `--ttl` should use the node's configured
/// `ttl.join_token`, the documented default join token lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_generate_uses_the_configured_default_ttl() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, sock) = write_config(tmp.path(), "127.0.0.1:0", "[ttl]\njoin_token = 120\n");
    let _node = NodeProcess::start(&cfg, &sock, &tmp.path().join("node.log")).await;
    let out = cli(&sock, &["token", "generate"]);
    assert!(out.success, "{out:?}");
    let expires = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Expires: "))
        .expect("an Expires line");
    let t = time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let ttl = t.unix_timestamp() - ca_identity::unix_now();
    assert!(
        (110..=120).contains(&ttl),
        "token lifetime {ttl}s, configured 120s"
    );
}

/// A socket file nobody listens on (a node that died or was killed) should get the same
/// hint as a missing one.
#[test]
fn healthcheck_against_a_stale_socket_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let stale = tmp.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = cli(&stale, &["healthcheck"]);
    assert!(!out.success);
    assert!(
        out.stderr.contains("is the node running?"),
        "{}",
        out.stderr
    );
}

/// `--wait` on rotations and revocations returns once the successor is active (a line as it
/// happens), and fails clearly when the wait runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_revocation_wait_for_their_successor() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, sock) = write_config(
        tmp.path(),
        "127.0.0.1:0",
        "[rotation]\npropagation_window = 2\n",
    );
    let _node = NodeProcess::start(&cfg, &sock, &tmp.path().join("node.log")).await;
    let active = |kind: &str| -> String {
        let out = cli(&sock, &["ca", "show"]);
        assert!(out.success, "{out:?}");
        out.stdout
            .lines()
            .find(|l| l.contains(kind) && l.contains("active"))
            .unwrap_or_else(|| panic!("no active {kind} in:\n{}", out.stdout))
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };

    let before = active("intermediate");
    let out = cli(&sock, &["rotate-intermediate", "--wait", "--timeout", "60"]);
    assert!(out.success, "{out:?}");
    assert!(
        out.stdout.contains(&format!("active (replaced {before})")),
        "{}",
        out.stdout
    );
    let rotated = active("intermediate");
    assert_ne!(rotated, before);

    // A JWT key activates after the propagation window: --wait says so, then returns.
    let jwt = active("jwt");
    let out = cli(&sock, &["rotate-jwt-key", "--wait", "--timeout", "60"]);
    assert!(out.success, "{out:?}");
    assert!(out.stdout.contains("prepared, published"), "{}", out.stdout);
    assert!(
        out.stdout.contains(&format!("active (replaced {jwt})")),
        "{}",
        out.stdout
    );

    let out = cli(
        &sock,
        &["revoke-intermediate", &rotated, "--wait", "--timeout", "60"],
    );
    assert!(out.success, "{out:?}");
    assert!(
        out.stdout.contains(&format!("active (replaced {rotated})")),
        "{}",
        out.stdout
    );

    // --timeout without --wait is refused by the parser; a wait that runs out fails with
    // what it was waiting for.
    let out = cli(&sock, &["rotate-root", "--timeout", "5"]);
    assert!(!out.success);
    let out = cli(&sock, &["rotate-root", "--wait", "--timeout", "1"]);
    assert!(!out.success, "{out:?}");
    assert!(
        out.stderr.contains("timed out after 1 s") && out.stderr.contains("root"),
        "{}",
        out.stderr
    );

    // Read commands answer JSON for scripts.
    let json = |args: &[&str]| -> serde_json::Value {
        let out = cli(&sock, args);
        assert!(out.success, "{args:?}: {out:?}");
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", out.stdout))
    };
    let ca = json(&["ca", "show", "--output", "json"]);
    let auths = ca["authorities"].as_array().unwrap();
    assert!(
        auths
            .iter()
            .any(|a| a["id"] == rotated.as_str() && a["state"] == "revoked"),
        "{ca}"
    );
    let token = json(&["token", "generate", "--output", "json"]);
    assert!(
        token["token"].as_str().is_some_and(|t| !t.is_empty()),
        "{token}"
    );
    assert!(json(&["agent", "list", "--output", "json"]).is_array());
    let status = json(&["cluster", "status", "--output", "json"]);
    assert_eq!(status["members"].as_array().unwrap().len(), 1, "{status}");
}

/// `--log-format json`: every line a node writes is one JSON object a log shipper can read,
/// with no colour codes; an unknown format is refused with the choices.
#[test]
fn json_logs_are_one_object_per_line() {
    let out = run_cli(&["--log-format", "yaml", "healthcheck"]);
    assert!(!out.success);
    assert!(
        out.stderr.contains("text") && out.stderr.contains("json"),
        "{}",
        out.stderr
    );

    let tmp = tempfile::tempdir().unwrap();
    let (cfg, _sock) = write_config(tmp.path(), "127.0.0.1:0", "");
    let log = tmp.path().join("node.log");
    let mut child = std::process::Command::new(bin())
        .args([
            "--log-format",
            "json",
            "run",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("ca-node started") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("ca-node started"), "{text}");
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
        assert!(!line.contains('\u{1b}'), "colour codes in {line}");
    }
}

/// SPIRE habits: `entry create --data FILE` in SPIRE's JSON shape (and this CLI's own),
/// `entry show --selector`, and SPIRE's single-dash flags answered with the flag to use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_habits_batch_entries_selector_filter_and_flag_hints() {
    let out = run_cli(&["entry", "create", "-spiffeID", "spiffe://x/y"]);
    assert!(!out.success);
    assert!(out.stderr.contains("use `--spiffe-id`"), "{}", out.stderr);

    let tmp = tempfile::tempdir().unwrap();
    let (cfg, sock) = write_config(tmp.path(), "127.0.0.1:0", "");
    let _node = NodeProcess::start(&cfg, &sock, &tmp.path().join("node.log")).await;
    let parent = format!("spiffe://{TD}/agent/host-1");
    let data = tmp.path().join("entries.json");
    std::fs::write(
        &data,
        serde_json::json!({"entries": [
            {"spiffe_id": format!("spiffe://{TD}/billing"), "parent_id": parent,
             "selectors": [{"type": "unix", "value": "uid:1001"}], "x509_svid_ttl": 600},
            {"spiffe_id": {"trust_domain": TD, "path": "/web"}, "parent_id": parent,
             "selectors": [{"type": "unix", "value": "uid:1002"}, {"type": "unix", "value": "gid:50"}],
             "dns_names": ["web.internal"]},
            {"spiffe_id": "spiffe://Bad.Example/x", "parent_id": parent,
             "selectors": [{"type": "unix", "value": "uid:1"}]},
        ]})
        .to_string(),
    )
    .unwrap();
    let out = cli(
        &sock,
        &["entry", "create", "--data", data.to_str().unwrap()],
    );
    assert!(!out.success, "{out:?}");
    assert!(
        out.stderr.contains("1 of 3 entries not created") && out.stderr.contains("entry 3"),
        "{}",
        out.stderr
    );
    assert_eq!(entry_count(&sock), 2, "the valid ones were created");

    // What `entry show --output json` prints is accepted back (as a new registration it
    // is refused: the same entries exist).
    let shown = cli(&sock, &["entry", "show", "--output", "json"]);
    let again = tmp.path().join("again.json");
    std::fs::write(&again, &shown.stdout).unwrap();
    let out = cli(
        &sock,
        &["entry", "create", "--data", again.to_str().unwrap()],
    );
    assert!(!out.success);
    assert!(
        out.stderr.contains("2 of 2 entries not created"),
        "{}",
        out.stderr
    );
    assert_eq!(entry_count(&sock), 2);
    let garbage = tmp.path().join("garbage.json");
    std::fs::write(&garbage, "{\"entries\": 3}").unwrap();
    let out = cli(
        &sock,
        &["entry", "create", "--data", garbage.to_str().unwrap()],
    );
    assert!(
        !out.success && out.stderr.contains("expected"),
        "{}",
        out.stderr
    );

    // --selector keeps the entries that have every selector given.
    let show = |sels: &[&str]| -> Vec<String> {
        let mut args = vec!["entry", "show", "--output", "json"];
        for s in sels {
            args.extend(["--selector", s]);
        }
        let out = cli(&sock, &args);
        assert!(out.success, "{out:?}");
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["spiffe_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(show(&["unix:uid:1002"]), vec![format!("spiffe://{TD}/web")]);
    assert_eq!(show(&["unix:uid:1002", "unix:gid:50"]).len(), 1);
    assert!(show(&["unix:uid:1001", "unix:gid:50"]).is_empty());
    let out = cli(&sock, &["entry", "show", "--selector", "nocolon"]);
    assert!(
        !out.success && out.stderr.contains("--selector"),
        "{}",
        out.stderr
    );
}
