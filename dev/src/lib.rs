//! `ca-node dev`: a working local environment in one command. Three nodes on software keys
//! forming a Raft cluster (the first initializes it, the others join it with join tokens,
//! exactly as `ca-node init` / `ca-node join` do) and an agent configured with all three
//! addresses, all in this process but talking over real sockets (mTLS gRPC on loopback, the
//! Workload API on a Unix socket); an entry `spiffe://dev.example.org/service/demo` for the
//! invoking uid. Prints `SPIFFE_ENDPOINT_SOCKET=unix:///...` once a workload can fetch.
//!
//! [`DevCluster`] is that environment as a library value; [`DevEnv`] is the single-node
//! variant (`ca-node dev --nodes 1`), which the integration tests and the benchmarks use.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ca_proto::types;

use ca_node::config::NodeConfig;
use ca_node::core::NodeCore;
use ca_node::{Error, NodeHandle};

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
        let node = ca_node::start(node_cfg).await?;
        let agent = match start_dev_agent(&dir, std::slice::from_ref(&node), tweak).await {
            Ok(a) => a,
            Err(e) => {
                node.shutdown().await;
                return Err(e);
            }
        };
        Ok(Self { node, agent, dir })
    }

    /// Registers (idempotently) an entry `spiffe_id` under this agent for `selectors`
    /// (`type:value` strings, e.g. `unix:uid:1000`).
    pub async fn register(&self, spiffe_id: &str, selectors: &[String]) -> Result<(), Error> {
        register_with(
            &self.node.core,
            self.agent.spiffe_id().as_str(),
            spiffe_id,
            selectors,
        )
        .await
    }

    /// Registers [`DEMO_ID`] for the invoking uid.
    pub async fn register_demo(&self) -> Result<(), Error> {
        let uid = nix::unistd::getuid().as_raw();
        self.register(DEMO_ID, &[format!("unix:uid:{uid}")]).await
    }

    /// Waits until the agent holds an X.509-SVID for `spiffe_id`.
    pub async fn wait_for_svid(&self, spiffe_id: &str, timeout: Duration) -> Result<(), Error> {
        wait_for_agent_svid(&self.agent, spiffe_id, timeout).await
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

/// Registers (idempotently) an entry `spiffe_id` under `parent_id` for `selectors`
/// (`type:value` strings), through `core` (forwarded to the leader in a cluster).
pub async fn register_with(
    core: &NodeCore,
    parent_id: &str,
    spiffe_id: &str,
    selectors: &[String],
) -> Result<(), Error> {
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
        parent_id: parent_id.into(),
        selectors,
        ..Default::default()
    };
    let rec = core.validate_entry(
        &entry,
        uuid::Uuid::new_v4().to_string(),
        ca_identity::unix_now(),
    )?;
    match ca_node::core::propose(
        core.proposer(),
        ca_state::Command::CreateEntry { entry: rec },
    )
    .await
    {
        Ok(_) | Err(Error::AlreadyExists(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Waits until `agent` holds an X.509-SVID for `spiffe_id`.
pub async fn wait_for_agent_svid(
    agent: &ca_agent::AgentHandle,
    spiffe_id: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ready = agent
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

/// File under a dev cluster's directory recording its nodes' ports (reused on restart:
/// the membership stores each node's address).
const PORTS_FILE: &str = "ports.json";

fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Config(format!("no free loopback port: {e}")))
}

fn cluster_ports(dir: &Path, n: usize) -> Result<Vec<u16>, Error> {
    let p = dir.join(PORTS_FILE);
    if let Ok(text) = std::fs::read_to_string(&p) {
        if let Ok(ports) = serde_json::from_str::<Vec<u16>>(&text) {
            if ports.len() == n {
                return Ok(ports);
            }
        }
    }
    let ports = (0..n).map(|_| free_port()).collect::<Result<Vec<_>, _>>()?;
    std::fs::write(&p, serde_json::to_vec(&ports).expect("json"))
        .map_err(|e| Error::Config(format!("writing {}: {e}", p.display())))?;
    Ok(ports)
}

/// The configuration of node `i` (1-based) of a dev cluster under `dir`: node ID `dev-<i>`,
/// Raft ID `i`, data in `node-<i>/`, admin socket `admin.sock` (node 1) or
/// `admin-<i>.sock`, node API on loopback port `port`.
pub fn cluster_node_config(dir: &Path, i: usize, port: u16) -> NodeConfig {
    let mut cfg = NodeConfig::with_defaults(
        &format!("dev-{i}"),
        DEV_TRUST_DOMAIN,
        dir.join(format!("node-{i}")),
    );
    cfg.raft_id = i as u64;
    cfg.node_listen = SocketAddr::from(([127, 0, 0, 1], port));
    cfg.admin_socket = if i == 1 {
        dir.join("admin.sock")
    } else {
        dir.join(format!("admin-{i}.sock"))
    };
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("literal"));
    cfg.ttl.x509_svid = 300;
    cfg
}

/// A running dev cluster: nodes forming one Raft cluster, and an agent that knows them all.
#[derive(Debug)]
pub struct DevCluster {
    /// The nodes, node 1 first.
    pub nodes: Vec<NodeHandle>,
    /// The agent.
    pub agent: ca_agent::AgentHandle,
    /// The (absolute) directory holding sockets and data.
    pub dir: PathBuf,
}

impl DevCluster {
    /// Starts (or restarts) a cluster of `n` nodes under `dir` and its agent.
    pub async fn start(dir: &Path, n: usize) -> Result<Self, Error> {
        Self::start_with(dir, n, |_, _| {}).await
    }

    /// As [`DevCluster::start`], after `tweak` changed each node's configuration (called
    /// with the node's 1-based index).
    pub async fn start_with(
        dir: &Path,
        n: usize,
        tweak: impl Fn(usize, &mut NodeConfig),
    ) -> Result<Self, Error> {
        Self::start_with_agent(dir, n, tweak, |_| {}).await
    }

    /// As [`DevCluster::start_with`], after `agent_tweak` changed the agent's configuration
    /// (which lists every node's address, node 1 first, and syncs every second).
    pub async fn start_with_agent(
        dir: &Path,
        n: usize,
        tweak: impl Fn(usize, &mut NodeConfig),
        agent_tweak: impl FnOnce(&mut ca_agent::AgentConfig),
    ) -> Result<Self, Error> {
        if n == 0 {
            return Err(Error::Config("a cluster needs at least one node".into()));
        }
        let dir = abs(dir)?;
        let ports = cluster_ports(&dir, n)?;
        let configs: Vec<NodeConfig> = (1..=n)
            .map(|i| {
                let mut c = cluster_node_config(&dir, i, ports[i - 1]);
                tweak(i, &mut c);
                c
            })
            .collect();
        let restart = ca_node::registry::has_state(&configs[0].data_dir);
        let mut nodes = Vec::with_capacity(n);
        let started = async {
            if restart {
                // Members wait for each other's quorum: start them together.
                let all = futures::future::join_all(configs.iter().cloned().map(|c| async move {
                    if ca_node::registry::has_state(&c.data_dir) {
                        ca_node::start(c).await.map(Some)
                    } else {
                        Ok(None)
                    }
                }))
                .await;
                let mut missing = Vec::new();
                for (i, r) in all.into_iter().enumerate() {
                    match r? {
                        Some(h) => nodes.push(h),
                        None => missing.push(i),
                    }
                }
                for i in missing {
                    let h = join_dev_node(&nodes[0], configs[i].clone()).await?;
                    nodes.push(h);
                }
            } else {
                nodes.push(
                    ca_node::node::start_with(configs[0].clone(), ca_node::node::Bootstrap::Init)
                        .await?,
                );
                for c in &configs[1..] {
                    let h = join_dev_node(&nodes[0], c.clone()).await?;
                    nodes.push(h);
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = started {
            for h in nodes {
                h.shutdown().await;
            }
            return Err(e);
        }
        let agent = match start_dev_agent(&dir, &nodes, agent_tweak).await {
            Ok(a) => a,
            Err(e) => {
                for h in nodes {
                    h.shutdown().await;
                }
                return Err(e);
            }
        };
        Ok(Self { nodes, agent, dir })
    }

    /// Registers (idempotently) an entry `spiffe_id` under this agent for `selectors`.
    pub async fn register(&self, spiffe_id: &str, selectors: &[String]) -> Result<(), Error> {
        register_with(
            &self.nodes[0].core,
            self.agent.spiffe_id().as_str(),
            spiffe_id,
            selectors,
        )
        .await
    }

    /// Registers [`DEMO_ID`] for the invoking uid.
    pub async fn register_demo(&self) -> Result<(), Error> {
        let uid = nix::unistd::getuid().as_raw();
        self.register(DEMO_ID, &[format!("unix:uid:{uid}")]).await
    }

    /// Waits until the agent holds an X.509-SVID for `spiffe_id`.
    pub async fn wait_for_svid(&self, spiffe_id: &str, timeout: Duration) -> Result<(), Error> {
        wait_for_agent_svid(&self.agent, spiffe_id, timeout).await
    }

    /// The Workload API endpoint as `unix:///...`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.agent.socket_path().display())
    }

    /// The index (into `nodes`) of the node the others follow, if there is one.
    pub fn leader(&self) -> Option<usize> {
        let id = self
            .nodes
            .iter()
            .find_map(|n| n.core.raft().status().leader)?;
        self.nodes
            .iter()
            .position(|n| n.core.config().raft_id == id)
    }

    /// Stops the agent, then the nodes.
    pub async fn shutdown(self) {
        let _ = self.agent.shutdown().await;
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

/// Joins `cfg`'s node to the cluster `first` belongs to, as `ca-node join` does.
async fn join_dev_node(first: &NodeHandle, cfg: NodeConfig) -> Result<NodeHandle, Error> {
    let id = format!("spiffe://{}/ca-node/{}", cfg.trust_domain, cfg.node_id);
    let token = first.core.create_join_token(&id, 600).await?;
    ca_node::bootstrap::join(
        cfg,
        ca_node::bootstrap::JoinOptions {
            peer: first.core.advertise_addr().to_string(),
            token: token.token,
            bundle_pem: first.core.ca().bundle()?.x509_pem(),
            promote: true,
            timeout: Duration::from_secs(60),
        },
    )
    .await
}

async fn start_dev_agent(
    dir: &Path,
    nodes: &[NodeHandle],
    tweak: impl FnOnce(&mut ca_agent::AgentConfig),
) -> Result<ca_agent::AgentHandle, Error> {
    let first = &nodes[0];
    let bundle_path = dir.join("bundle.pem");
    std::fs::write(&bundle_path, first.core.ca().bundle()?.x509_pem())
        .map_err(|e| Error::Internal(format!("writing {}: {e}", bundle_path.display())))?;
    let token = first.core.create_join_token("", 600).await?;
    let mut agent_cfg = ca_agent::AgentConfig {
        trust_domain: first.core.config().trust_domain.clone(),
        server_addresses: nodes.iter().map(|n| n.node_addr.to_string()).collect(),
        data_dir: dir.join("agent"),
        socket_path: dir.join("agent.sock"),
        trust_bundle_path: Some(bundle_path),
        join_token: Some(token.token),
        sync_interval_secs: 1,
        ..Default::default()
    };
    tweak(&mut agent_cfg);
    ca_agent::start(agent_cfg)
        .await
        .map_err(|e| Error::Unavailable(format!("the dev agent failed to start: {e}")))
}

fn print_ready(endpoint: &str, nodes: &[&NodeHandle]) {
    println!("SPIFFE_ENDPOINT_SOCKET={endpoint}");
    println!("CA_NODE_ADMIN_SOCKET={}", nodes[0].admin_socket.display());
    if let Some(h) = nodes[0].http_addr {
        println!("METRICS=http://{h}/metrics");
    }
    if nodes.len() > 1 {
        for n in nodes {
            println!(
                "# node {} (raft id {}): node API {}, admin socket {}{}",
                n.core.config().node_id,
                n.core.config().raft_id,
                n.node_addr,
                n.admin_socket.display(),
                n.http_addr
                    .map(|h| format!(", metrics http://{h}/metrics"))
                    .unwrap_or_default()
            );
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

/// Runs the dev environment (`nodes` nodes: 1 is the single-node [`DevEnv`], otherwise a
/// [`DevCluster`]) until SIGINT/SIGTERM.
pub async fn run(dir: &Path, nodes: usize) -> Result<(), Error> {
    if nodes == 1 {
        let env = DevEnv::start(dir).await?;
        env.register_demo().await?;
        // Wait until the agent holds the SVID, so the printed socket works at once.
        env.wait_for_svid(DEMO_ID, Duration::from_secs(30)).await?;
        print_ready(&env.endpoint(), &[&env.node]);
        tracing::info!(agent = %env.agent.spiffe_id(), "dev environment ready; Ctrl-C to stop");
        ca_node::node::wait_for_signal().await;
        env.shutdown().await;
        return Ok(());
    }
    if nodes.is_multiple_of(2) || nodes > 7 {
        return Err(Error::Config(format!(
            "--nodes {nodes}: use 1, 3 or 5 (an odd number; a Raft cluster of an even size tolerates no more failures than one node fewer)"
        )));
    }
    let env = DevCluster::start(dir, nodes).await?;
    env.register_demo().await?;
    env.wait_for_svid(DEMO_ID, Duration::from_secs(30)).await?;
    print_ready(&env.endpoint(), &env.nodes.iter().collect::<Vec<_>>());
    tracing::info!(agent = %env.agent.spiffe_id(), nodes, "dev cluster ready; Ctrl-C to stop");
    ca_node::node::wait_for_signal().await;
    env.shutdown().await;
    Ok(())
}
