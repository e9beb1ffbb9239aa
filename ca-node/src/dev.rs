//! `ca-node dev`: a working local environment in one command. A node on software keys and
//! an agent, both in this process but talking over real sockets (mTLS gRPC on loopback,
//! the Workload API on a Unix socket); an entry `spiffe://dev.example.org/service/demo` for
//! the invoking uid. Prints `SPIFFE_ENDPOINT_SOCKET=unix:///...` once a workload can fetch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ca_proto::types;

use crate::config::{KeyManagerConfig, NodeConfig, TtlConfig};
use crate::Error;

/// The dev trust domain.
pub const DEV_TRUST_DOMAIN: &str = "dev.example.org";

fn abs(p: &Path) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(p)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", p.display())))?;
    p.canonicalize()
        .map_err(|e| Error::Config(format!("{}: {e}", p.display())))
}

/// Runs the dev environment until SIGINT/SIGTERM.
pub async fn run(dir: &Path) -> Result<(), Error> {
    let dir = abs(dir)?;
    let node_cfg = NodeConfig {
        node_id: "dev-1".into(),
        trust_domain: DEV_TRUST_DOMAIN.into(),
        data_dir: dir.join("node-1"),
        node_listen: "127.0.0.1:0".parse().expect("literal"),
        admin_socket: dir.join("admin.sock"),
        http_listen: Some("127.0.0.1:0".parse().expect("literal")),
        key_manager: KeyManagerConfig::Soft { dir: None },
        intermediate_mode: Default::default(),
        ttl: TtlConfig {
            x509_svid: 300,
            ..TtlConfig::default()
        },
        x509pop_ca_bundle: None,
        log_level: "info".into(),
    };
    let node = crate::start(node_cfg).await?;
    let bundle_path = dir.join("bundle.pem");
    std::fs::write(&bundle_path, node.core.ca.bundle()?.x509_pem())
        .map_err(|e| Error::Internal(format!("writing {}: {e}", bundle_path.display())))?;
    let token = node.core.create_join_token("", 600).await?;
    let agent_cfg = ca_agent::AgentConfig {
        trust_domain: DEV_TRUST_DOMAIN.into(),
        server_addresses: vec![node.node_addr.to_string()],
        data_dir: dir.join("agent"),
        socket_path: dir.join("agent.sock"),
        trust_bundle_path: Some(bundle_path),
        join_token: Some(token.token),
        sync_interval_secs: 1,
        ..Default::default()
    };
    let agent = ca_agent::start(agent_cfg)
        .await
        .map_err(|e| Error::Unavailable(format!("the dev agent failed to start: {e}")))?;
    let agent_id = agent.spiffe_id().to_string();
    let uid = nix::unistd::getuid().as_raw();
    let entry = types::Entry {
        spiffe_id: format!("spiffe://{DEV_TRUST_DOMAIN}/service/demo"),
        parent_id: agent_id.clone(),
        selectors: vec![types::Selector {
            r#type: "unix".into(),
            value: format!("uid:{uid}"),
        }],
        ..Default::default()
    };
    let rec = node.core.validate_entry(
        &entry,
        uuid::Uuid::new_v4().to_string(),
        ca_identity::unix_now(),
    )?;
    match crate::core::propose(
        node.core.proposer.as_ref(),
        ca_raft::Command::CreateEntry { entry: rec },
    )
    .await
    {
        Ok(_) | Err(Error::AlreadyExists(_)) => {}
        Err(e) => return Err(e),
    }
    // Wait until the agent holds an SVID for the entry, so the printed socket works at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ready = agent
            .cache()
            .current()
            .svids
            .values()
            .any(|s| s.spiffe_id.as_str().ends_with("/service/demo"));
        if ready {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Unavailable(
                "the dev agent did not get an SVID for the demo entry within 30s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "SPIFFE_ENDPOINT_SOCKET=unix://{}",
        agent.socket_path().display()
    );
    println!("CA_NODE_ADMIN_SOCKET={}", node.admin_socket.display());
    if let Some(h) = node.http_addr {
        println!("METRICS=http://{h}/metrics");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(agent = %agent_id, "dev environment ready; Ctrl-C to stop");
    crate::cli::wait_for_signal().await;
    let _ = agent.shutdown().await;
    node.shutdown().await;
    Ok(())
}
