//! `ca-node dev`: a working local environment in one command. A node on software keys and
//! an agent, both in this process but talking over real sockets (mTLS gRPC on loopback,
//! the Workload API on a Unix socket); an entry `spiffe://dev.example.org/service/demo` for
//! the invoking uid. Prints `SPIFFE_ENDPOINT_SOCKET=unix:///...` once a workload can fetch.
//!
//! [`DevEnv`] is the same environment as a library value, so integration tests and the
//! benchmarks start exactly what users start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ca_proto::types;

use crate::config::NodeConfig;
use crate::{Error, NodeHandle};

/// The dev trust domain.
pub const DEV_TRUST_DOMAIN: &str = "dev.example.org";
/// The SPIFFE ID registered for the invoking uid.
pub const DEMO_ID: &str = "spiffe://dev.example.org/service/demo";

fn abs(p: &Path) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(p)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", p.display())))?;
    p.canonicalize()
        .map_err(|e| Error::Config(format!("{}: {e}", p.display())))
}

/// The node configuration `ca-node dev` uses under `dir` (software keys, loopback ports
/// chosen by the OS, 5-minute X.509-SVIDs).
pub fn node_config(dir: &Path) -> NodeConfig {
    let mut cfg = NodeConfig::with_defaults("dev-1", DEV_TRUST_DOMAIN, dir.join("node-1"));
    cfg.node_listen = "127.0.0.1:0".parse().expect("literal");
    cfg.admin_socket = dir.join("admin.sock");
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("literal"));
    cfg.ttl.x509_svid = 300;
    cfg
}

/// A running dev environment: one node and one agent attested with a join token.
#[derive(Debug)]
pub struct DevEnv {
    /// The node.
    pub node: NodeHandle,
    /// The agent.
    pub agent: ca_agent::AgentHandle,
    /// The (absolute) directory holding sockets and data.
    pub dir: PathBuf,
}

impl DevEnv {
    /// Starts the dev environment under `dir` with the default configuration.
    pub async fn start(dir: &Path) -> Result<Self, Error> {
        let dir = abs(dir)?;
        Self::start_with(node_config(&dir), |_| {}).await
    }

    /// Starts a node from `node_cfg`, then an agent beside it (data and socket under the
    /// node's parent directory) attested with a fresh join token; `tweak` may change the
    /// agent's configuration before it starts. A restarted agent whose SVID is persisted
    /// keeps its identity (the token is then unused).
    pub async fn start_with(
        node_cfg: NodeConfig,
        tweak: impl FnOnce(&mut ca_agent::AgentConfig),
    ) -> Result<Self, Error> {
        let dir = match node_cfg.data_dir.parent() {
            Some(p) => abs(p)?,
            None => return Err(Error::Config("the node's data_dir has no parent".into())),
        };
        let trust_domain = node_cfg.trust_domain.clone();
        let node = crate::start(node_cfg).await?;
        let bundle_path = dir.join("bundle.pem");
        std::fs::write(&bundle_path, node.core.ca.bundle()?.x509_pem())
            .map_err(|e| Error::Internal(format!("writing {}: {e}", bundle_path.display())))?;
        let token = node.core.create_join_token("", 600).await?;
        let mut agent_cfg = ca_agent::AgentConfig {
            trust_domain,
            server_addresses: vec![node.node_addr.to_string()],
            data_dir: dir.join("agent"),
            socket_path: dir.join("agent.sock"),
            trust_bundle_path: Some(bundle_path),
            join_token: Some(token.token),
            sync_interval_secs: 1,
            ..Default::default()
        };
        tweak(&mut agent_cfg);
        let agent = match ca_agent::start(agent_cfg).await {
            Ok(a) => a,
            Err(e) => {
                node.shutdown().await;
                return Err(Error::Unavailable(format!(
                    "the dev agent failed to start: {e}"
                )));
            }
        };
        Ok(Self { node, agent, dir })
    }

    /// Registers (idempotently) an entry `spiffe_id` under this agent for `selectors`
    /// (`type:value` strings, e.g. `unix:uid:1000`).
    pub async fn register(&self, spiffe_id: &str, selectors: &[String]) -> Result<(), Error> {
        let selectors = selectors
            .iter()
            .map(|s| {
                let (t, v) = s.split_once(':').ok_or_else(|| {
                    Error::InvalidArgument(format!("selector {s:?} is not type:value"))
                })?;
                Ok(types::Selector {
                    r#type: t.into(),
                    value: v.into(),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let entry = types::Entry {
            spiffe_id: spiffe_id.into(),
            parent_id: self.agent.spiffe_id().to_string(),
            selectors,
            ..Default::default()
        };
        let rec = self.node.core.validate_entry(
            &entry,
            uuid::Uuid::new_v4().to_string(),
            ca_identity::unix_now(),
        )?;
        match crate::core::propose(
            self.node.core.proposer.as_ref(),
            ca_raft::Command::CreateEntry { entry: rec },
        )
        .await
        {
            Ok(_) | Err(Error::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Registers [`DEMO_ID`] for the invoking uid.
    pub async fn register_demo(&self) -> Result<(), Error> {
        let uid = nix::unistd::getuid().as_raw();
        self.register(DEMO_ID, &[format!("unix:uid:{uid}")]).await
    }

    /// Waits until the agent holds an X.509-SVID for `spiffe_id`.
    pub async fn wait_for_svid(&self, spiffe_id: &str, timeout: Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ready = self
                .agent
                .cache()
                .current()
                .svids
                .values()
                .any(|s| s.spiffe_id.as_str() == spiffe_id);
            if ready {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Unavailable(format!(
                    "the agent did not get an SVID for {spiffe_id} within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The Workload API endpoint as `unix:///...`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.agent.socket_path().display())
    }

    /// Stops the agent, then the node.
    pub async fn shutdown(self) {
        let _ = self.agent.shutdown().await;
        self.node.shutdown().await;
    }
}

/// Runs the dev environment until SIGINT/SIGTERM.
pub async fn run(dir: &Path) -> Result<(), Error> {
    let env = DevEnv::start(dir).await?;
    env.register_demo().await?;
    // Wait until the agent holds the SVID, so the printed socket works at once.
    env.wait_for_svid(DEMO_ID, Duration::from_secs(30)).await?;
    println!("SPIFFE_ENDPOINT_SOCKET={}", env.endpoint());
    println!("CA_NODE_ADMIN_SOCKET={}", env.node.admin_socket.display());
    if let Some(h) = env.node.http_addr {
        println!("METRICS=http://{h}/metrics");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(agent = %env.agent.spiffe_id(), "dev environment ready; Ctrl-C to stop");
    crate::cli::wait_for_signal().await;
    env.shutdown().await;
    Ok(())
}
