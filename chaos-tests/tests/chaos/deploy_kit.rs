//! The deployment kit in `ops/deploy/`: the systemd units pass `systemd-analyze verify`
//! (with their `ExecStart` pointed at the binaries this build made), without a warning.

use std::path::Path;

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deploy/systemd");
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["verify".to_string(), "--man=no".into()];
    for (unit, program, built) in [
        (
            "ca-node.service",
            "/usr/bin/ca-node",
            env!("CARGO_BIN_EXE_chaos-ca-node"),
        ),
        (
            "agent.service",
            "/usr/bin/agent",
            env!("CARGO_BIN_EXE_chaos-agent"),
        ),
    ] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        assert!(
            text.contains(&format!("ExecStart={program} run --config ")),
            "{unit}"
        );
        for needed in [
            "Type=notify",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "Restart=on-failure",
            "LimitNOFILE=",
            "RuntimeDirectory=",
            "StateDirectory=",
            "CapabilityBoundingSet=",
        ] {
            assert!(text.contains(needed), "{unit} lacks {needed}");
        }
        let path = tmp.path().join(unit);
        std::fs::write(
            &path,
            text.replace(
                &format!("ExecStart={program} "),
                &format!("ExecStart={built} "),
            ),
        )
        .unwrap();
        args.push(path.display().to_string());
    }
    let out = std::process::Command::new("systemd-analyze")
        .args(&args)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect(
            "systemd-analyze (Debian package systemd) must be installed: this test does not skip",
        );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    assert!(
        text.trim().is_empty(),
        "systemd-analyze verify warned:\n{text}"
    );
}
