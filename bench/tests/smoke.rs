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
