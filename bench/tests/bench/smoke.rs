//! The issuance benchmark still runs end to end: a second of tiny load against a real node
//! process, every certificate verified, and a report that adds up.

use std::process::Command;

#[test]
fn issuance_load_runs_and_reports() {
    let out = Command::new(env!("CARGO_BIN_EXE_issuance-load"))
        .args([
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--entries",
            "3",
            "--batch",
            "2",
            "--concurrency",
            "2",
            "--connections",
            "2",
            "--csr-pool",
            "8",
            "--verify-every",
            "1",
            "--baseline-secs",
            "0.2",
            "--intermediate-mode",
            "memory",
            "--json",
        ])
        .output()
        .expect("run issuance-load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "issuance-load failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let m = &r["measured"];
    let issued = m["svids_issued"].as_u64().unwrap();
    assert!(issued > 0, "{r:#}");
    assert_eq!(m["errors"].as_u64(), Some(0), "{r:#}");
    assert_eq!(m["verified"].as_u64(), Some(issued), "{r:#}");
    assert_eq!(
        m["server_metrics"]["svids_ok"].as_f64(),
        Some(issued as f64),
        "{r:#}"
    );
    assert!(m["server_cpu_us_per_svid"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(m["latency"]["p99_us"].as_f64().unwrap() > 0.0, "{r:#}");
    assert_eq!(r["node"]["intermediate_mode"].as_str(), Some("memory"));
    assert_eq!(r["node"]["key_manager"].as_str(), Some("soft"));
    let b = &r["baseline"];
    assert!(b["sign_ops"].as_u64().unwrap() > 0 && b["verify_ops"].as_u64().unwrap() > 0);
    assert!(r["ratio_to_raw"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(r["backend"].is_null(), "{r:#}");
}

/// A short run against a backend (with `extra` arguments); returns the JSON report after
/// the checks every run must pass, including the raw signing rate measured beside it in two
/// rounds, before and after the load.
fn backend_run(backend: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_issuance-load"))
        .args(["--backend", backend])
        .args(extra)
        .args(["--duration", "1", "--warmup", "0.3", "--entries", "2"])
        .args(["--batch", "4", "--concurrency", "4", "--csr-pool", "8"])
        .args(["--verify-every", "1", "--baseline-secs", "0.1"])
        .args(["--raw-secs", "0.5", "--raw-in-flight", "4", "--json"])
        .output()
        .expect("run issuance-load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "issuance-load failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let m = &r["measured"];
    let issued = m["svids_issued"].as_u64().unwrap();
    assert!(issued > 0, "{r:#}");
    assert_eq!(m["errors"].as_u64(), Some(0), "{r:#}");
    assert_eq!(m["verified"].as_u64(), Some(issued), "{r:#}");
    let b = &r["backend"];
    assert_eq!(b["backend"].as_str(), Some(backend), "{r:#}");
    assert_eq!(b["raw"]["in_flight"].as_u64(), Some(4), "{r:#}");
    assert_eq!(b["raw"]["key_algorithm"].as_str(), Some("ec-p256"), "{r:#}");
    assert!(b["raw"]["signs"].as_u64().unwrap() > 0, "{r:#}");
    assert!(b["raw"]["signs_per_s"].as_f64().unwrap() > 0.0, "{r:#}");
    let ratio = b["ratio"].as_f64().unwrap();
    let want = m["svids_per_s_wall"].as_f64().unwrap() / b["raw"]["signs_per_s"].as_f64().unwrap();
    assert!((ratio - want).abs() < 1e-9, "{r:#}");
    assert!(
        m["node_sign_in_flight"]["samples"].as_u64().unwrap() > 0,
        "{r:#}"
    );
    let rounds = b["raw_rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "before and after the load: {r:#}");
    let mut signs = 0;
    for round in rounds {
        assert_eq!(round["in_flight"].as_u64(), Some(4), "{r:#}");
        assert!(round["signs"].as_u64().unwrap() > 0, "{r:#}");
        signs += round["signs"].as_u64().unwrap();
    }
    assert_eq!(b["raw"]["signs"].as_u64(), Some(signs), "{r:#}");
    assert!(b["cpu_us_per_svid_all"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(
        b["cpu_us_per_raw_sign_all"].as_f64().unwrap() > 0.0,
        "{r:#}"
    );
    r
}

#[test]
fn softhsm_backend_runs_next_to_its_raw_rate() {
    let r = backend_run("softhsm", &[]);
    assert_eq!(r["node"]["key_manager"].as_str(), Some("pkcs11"), "{r:#}");
    assert_eq!(r["backend"]["raw"]["key_manager"].as_str(), Some("pkcs11"));
    assert_eq!(r["backend"]["target_ratio"].as_f64(), Some(0.70));
}

#[test]
fn kms_backend_runs_next_to_its_raw_rate() {
    let r = backend_run("kms", &[]);
    assert_eq!(r["node"]["key_manager"].as_str(), Some("aws_kms"), "{r:#}");
    assert_eq!(r["backend"]["raw"]["key_manager"].as_str(), Some("aws_kms"));
    assert_eq!(r["backend"]["target_ratio"].as_f64(), Some(0.85));
    assert!(
        r["measured"]["emulator_cpu_us_per_svid"].as_f64().unwrap() > 0.0,
        "{r:#}"
    );
    assert!(
        r["backend"]["raw"]["emulator_cpu_us_per_sign"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

/// `--kms-latency-ms`: the node and the raw measurement both go through the proxy that
/// delays every Sign, and the report says so.
#[test]
fn kms_backend_runs_behind_a_sign_delaying_proxy() {
    let r = backend_run("kms", &["--kms-latency-ms", "5"]);
    let d = r["backend"]["description"].as_str().unwrap();
    assert!(d.contains("delays each Sign by 5 ms"), "{r:#}");
    assert!(
        r["backend"]["raw"]["latency_p50_us"].as_f64().unwrap() >= 5000.0,
        "{r:#}"
    );
}

/// The raw measurement's default in-flight count matches what the node can have
/// outstanding: every CSR of every call in flight for KMS (the node signs up to
/// `BATCH_MINT_CONCURRENCY` CSRs of a call at once), the session pool for PKCS#11.
#[test]
fn raw_in_flight_defaults_follow_the_node() {
    use ca_bench::backend::BackendKind;
    let per_call = ca_node::node_api::BATCH_MINT_CONCURRENCY;
    let pool = ca_kms::pkcs11::DEFAULT_MAX_SESSIONS;
    assert_eq!(BackendKind::Kms.default_raw_in_flight(8, 10), 80);
    assert_eq!(
        BackendKind::Kms.default_raw_in_flight(2, 1000),
        2 * per_call
    );
    assert_eq!(
        BackendKind::Softhsm.default_raw_in_flight(8, 10),
        pool.min(80)
    );
    assert_eq!(BackendKind::Softhsm.default_raw_in_flight(1, 1), 1);
    assert_eq!(BackendKind::Soft.default_raw_in_flight(8, 10), 1);
}

#[test]
fn a_bad_node_config_overlay_is_refused_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("overlay.toml");
    std::fs::write(&p, "data_dir = \"/elsewhere\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_issuance-load"))
        .arg("--node-config")
        .arg(&p)
        .output()
        .expect("run issuance-load");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("data_dir"), "{stderr}");
}
