//! The cluster write benchmark still runs end to end: three real `ca-node` processes formed
//! with `init`/`join`, three real etcd members, a second of writes at two concurrency levels,
//! and every acknowledged write found again afterwards (the binary checks that and fails
//! otherwise). Needs the `etcd` binary (Debian's `etcd-server`), which the test script
//! installs.

use std::process::Command;

#[test]
fn cluster_write_load_runs_and_every_ack_is_stored() {
    let out = Command::new(env!("CARGO_BIN_EXE_cluster-write-load"))
        .args([
            "--concurrency",
            "1,4",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--json",
        ])
        .output()
        .expect("run cluster-write-load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cluster-write-load failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(r["nodes"].as_u64(), Some(3), "{r:#}");
    assert!(
        r["etcd_version"].as_str().unwrap().contains("etcd Version"),
        "{r:#}"
    );
    let levels = r["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2, "{r:#}");
    for l in levels {
        for who in ["ca", "etcd"] {
            let m = &l[who];
            assert!(m["writes"].as_u64().unwrap() > 0, "{who}: {r:#}");
            assert_eq!(m["errors"].as_u64(), Some(0), "{who}: {r:#}");
            assert!(m["p99_ms"].as_f64().unwrap() >= m["p50_ms"].as_f64().unwrap());
        }
    }
    // Both systems' stored writes matched their acknowledgements (else the run fails).
    let v = r["verified"].as_array().unwrap();
    assert!(
        v[0].as_u64().unwrap()
            >= levels
                .iter()
                .map(|l| l["ca"]["writes"].as_u64().unwrap())
                .sum::<u64>()
    );
    assert!(
        v[1].as_u64().unwrap()
            >= levels
                .iter()
                .map(|l| l["etcd"]["writes"].as_u64().unwrap())
                .sum::<u64>()
    );
}
