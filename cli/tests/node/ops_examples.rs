//! The example configurations in `ops/` stay in step with the config schema.

use std::path::Path;

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/config");
    let mut seen = 0;
    let mut agents = 0;
    for f in std::fs::read_dir(&dir).unwrap() {
        let path = f.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("agent-")
        {
            let cfg: ca_agent::config::AgentConfig =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(cfg.server_addresses.len(), 3, "{}", path.display());
            agents += 1;
            continue;
        }
        // Schema (unknown keys, types, variants): always.
        let cfg: ca_node::NodeConfig =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Full validation where it does not depend on this machine (a PKCS#11 module file).
        let needs_module = cfg
            .role_key_managers()
            .iter()
            .any(|k| matches!(k, ca_node::config::KeyManagerConfig::Pkcs11(_)));
        if !needs_module {
            cfg.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        seen += 1;
    }
    assert_eq!(agents, 2, "the agent examples (join token, x509pop)");
    assert!(
        seen >= 3,
        "expected the example configs in {}",
        dir.display()
    );
    let policy: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("../aws/ca-node-kms-policy.json")).unwrap(),
    )
    .unwrap();
    let actions = policy.to_string();
    for a in [
        "kms:CreateKey",
        "kms:CreateAlias",
        "kms:DescribeKey",
        "kms:GetPublicKey",
        "kms:Sign",
        "kms:ListAliases",
        "kms:ScheduleKeyDeletion",
        "kms:DeleteAlias",
        "kms:TagResource",
    ] {
        assert!(actions.contains(a), "the IAM policy lacks {a}");
    }
}
