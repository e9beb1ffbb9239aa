//! A cluster of real `ca-node` processes (formed as an operator would: `ca-node init` on the
//! first, `ca-node token generate` + `ca-node join` for the others) and `agent` processes,
//! each on its own [`Host`], driven through the nodes' admin sockets.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use ca_proto::admin::admin_client::AdminClient;
use ca_proto::admin::*;
use ca_proto::types;
use nix::sys::signal::Signal;
use tonic::transport::Channel;

use crate::net::{Host, Mode, Network};
use crate::report::say;
use ca_test_support::process::Proc;

/// The trust domain of every test cluster.
pub const TD: &str = "chaos.example.org";
/// Node API port in netns mode (every host has its own address).
const NODE_PORT: u16 = 7001;
/// The port of each node's `/metrics` listener (netns mode; any free port on loopback).
const NODE_HTTP_PORT: u16 = 9090;
/// How long a node may take to become ready or join.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The two programs under test.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `ca-node`.
    pub ca_node: PathBuf,
    /// `agent`.
    pub agent: PathBuf,
}

/// An admin API client.
pub type Admin = AdminClient<Channel>;

/// Connects to the admin socket `sock` and makes one call, all within `timeout`.
pub async fn admin_call<T, F, Fut>(sock: &Path, timeout: Duration, f: F) -> Result<T>
where
    F: FnOnce(Admin) -> Fut,
    Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    tokio::time::timeout(timeout, async {
        let ch = ca_node_cli::uds_channel(sock)
            .await
            .map_err(anyhow::Error::msg)?;
        let r = f(AdminClient::new(ch))
            .await
            .map_err(|s| anyhow!("{}: {:?}: {}", sock.display(), s.code(), s.message().trim()))?;
        Ok(r.into_inner())
    })
    .await
    .map_err(|_| anyhow!("{}: no answer within {timeout:?}", sock.display()))?
}

fn quoted(p: &Path) -> String {
    serde_json::to_string(&p.display().to_string()).expect("json string")
}

/// Where a node is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Running.
    Up,
    /// SIGSTOPped.
    Paused,
    /// Not running (killed, stopped, or not started).
    Down,
}

/// One ca-node: its files, address and process.
#[derive(Debug)]
pub struct Node {
    /// The node ID (`n1`, ...).
    pub node_id: String,
    /// Its current Raft ID (a wiped node rejoins under a new one).
    pub raft_id: u64,
    /// Where it runs.
    pub host: Host,
    /// Its node API address, `ip:port`.
    pub addr: String,
    /// Its `/metrics` and health address, `ip:port`.
    pub http_addr: String,
    /// Config text appended to its generated config (e.g. a `[rotation]` section), from
    /// its next start on.
    pub extra_config: String,
    /// Its directory (config, log, admin socket, data).
    pub dir: PathBuf,
    /// Extra environment for its process (e.g. a faked clock), from its next start on.
    pub env: Vec<(String, String)>,
    proc: Option<Proc>,
    state: NodeState,
    starts: u32,
}

impl Node {
    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }
    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("node.toml")
    }
    /// The log file (all runs, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }
    /// Its state.
    pub fn state(&self) -> NodeState {
        self.state
    }
    /// Its SPIFFE ID.
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{TD}/ca-node/{}", self.node_id)
    }

    fn write_config(&self) -> Result<()> {
        let text = format!(
            "node_id = \"{}\"\ntrust_domain = \"{TD}\"\ndata_dir = {}\nnode_listen = \"{}\"\nhttp_listen = \"{}\"\nadmin_socket = {}\nraft_id = {}\nlog_level = \"info,openraft=warn\"\n\n[ttl]\nx509_svid = 300\nagent_svid = 600\njoin_token = 600\n{}",
            self.node_id,
            quoted(&self.data_dir()),
            self.addr,
            self.http_addr,
            quoted(&self.admin_socket()),
            self.raft_id,
            self.extra_config,
        );
        std::fs::write(self.config_path(), text)?;
        Ok(())
    }
}

/// An agent process.
#[derive(Debug)]
pub struct Agent {
    /// A name (also its directory).
    pub name: String,
    /// Its SPIFFE ID (from the join token).
    pub spiffe_id: String,
    /// The Workload API socket.
    pub socket: PathBuf,
    /// Its health and `/metrics` address (loopback of the agents' host).
    pub health_addr: String,
    /// Its process.
    pub proc: Proc,
}

impl Agent {
    /// The Workload API endpoint, `unix:///...`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

/// The test's cluster, its agents and its network. Dropping it kills every process and
/// removes the namespaces; if the test is panicking, the tails of all logs are printed first.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes, in the order they were added (`nodes[0]` initialized the cluster and holds
    /// the root key: software keys).
    pub nodes: Vec<Node>,
    /// Agents started with [`Cluster::start_agent`].
    pub agents: Vec<Agent>,
    /// Processes started by tests for their own purposes (killed on drop like the rest).
    pub extra: Vec<Proc>,
    /// The programs.
    pub bins: Binaries,
    /// The test's directory.
    pub dir: PathBuf,
    /// The hosts and links.
    pub net: Network,
    agent_host: Option<Host>,
    bundle: PathBuf,
    name: String,
    started: Instant,
    _tmp: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Forms a cluster of `n` nodes named `n1..nN` for the test `name`, in the network mode
    /// this machine supports.
    pub async fn start(name: &str, n: usize, bins: Binaries, mode: Mode) -> Result<Self> {
        Self::start_configured(name, n, bins, mode, "").await
    }

    /// Like [`Cluster::start`], every node's config ending with `extra_config`.
    pub async fn start_configured(
        name: &str,
        n: usize,
        bins: Binaries,
        mode: Mode,
        extra_config: &str,
    ) -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("chaos-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let keep = std::env::var_os("CHAOS_KEEP").is_some();
        let mut c = Self {
            nodes: Vec::new(),
            agents: Vec::new(),
            extra: Vec::new(),
            bins,
            bundle: dir.join("bundle.pem"),
            dir,
            net: Network::new(mode)?,
            agent_host: None,
            name: name.into(),
            started: Instant::now(),
            _tmp: if keep {
                let _ = tmp.keep();
                None
            } else {
                Some(tmp)
            },
        };
        say(&format!(
            "[{name}] forming a {n}-node cluster in {}",
            c.dir.display()
        ));
        for i in 1..=n {
            let id = format!("n{i}");
            let k = c.add_node(&id, &id, i as u64)?;
            c.nodes[k].extra_config = extra_config.into();
        }
        // n1 initializes the cluster.
        c.spawn_node(0, &["init"])?;
        c.wait_ready(0, START_TIMEOUT).await?;
        let pem = admin_call(
            &c.nodes[0].admin_socket(),
            Duration::from_secs(10),
            |mut a| async move { a.get_bundle(GetBundleRequest {}).await },
        )
        .await?
        .pem;
        std::fs::write(&c.bundle, pem)?;
        for i in 1..n {
            c.join(i, 0).await?;
        }
        c.wait_converged(Duration::from_secs(30)).await?;
        say(&format!(
            "[{name}] cluster formed in {} ms",
            c.started.elapsed().as_millis()
        ));
        Ok(c)
    }

    /// Adds a node definition (not started) named `name` (its host and directory) with node
    /// ID `node_id` and Raft ID `raft_id`, on a host of its own. Returns its index.
    pub fn add_node(&mut self, name: &str, node_id: &str, raft_id: u64) -> Result<usize> {
        let host = self.net.add_host(name)?;
        let port = self.net.port(&host, NODE_PORT)?;
        let http_port = self.net.port(&host, NODE_HTTP_PORT)?;
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        self.nodes.push(Node {
            node_id: node_id.into(),
            raft_id,
            addr: format!("{}:{port}", host.ip),
            http_addr: format!("{}:{http_port}", host.ip),
            extra_config: String::new(),
            host,
            dir,
            env: Vec::new(),
            proc: None,
            state: NodeState::Down,
            starts: 0,
        });
        Ok(self.nodes.len() - 1)
    }

    fn spawn_node(&mut self, i: usize, args: &[&str]) -> Result<()> {
        let node = &mut self.nodes[i];
        node.write_config()?;
        let _ = std::fs::remove_file(node.admin_socket());
        node.starts += 1;
        let log = node.log_path();
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            writeln!(
                f,
                "===== start {} ({}) at +{} ms: ca-node {}",
                node.starts,
                node.raft_id,
                self.started.elapsed().as_millis(),
                args.join(" ")
            )?;
        }
        let mut cmd = self.net.command(&node.host, &self.bins.ca_node);
        cmd.args(args)
            .arg("--config")
            .arg(node.config_path())
            .env("NO_COLOR", "1")
            .envs(node.env.iter().map(|(k, v)| (k, v)));
        node.proc = Some(Proc::spawn(&node.node_id, cmd, &log)?);
        node.state = NodeState::Up;
        Ok(())
    }

    /// Joins node `i` (defined, not running, empty data dir) through member `via`: a join
    /// token for its ca-node ID created on `via`, then `ca-node join`. Waits until it is a
    /// voter and ready.
    pub async fn join(&mut self, i: usize, via: usize) -> Result<()> {
        let token = self.ca_node_token(via, &self.nodes[i].spiffe_id()).await?;
        let token_file = self.nodes[i].dir.join("join-token");
        std::fs::write(&token_file, &token)?;
        std::fs::set_permissions(
            &token_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        self.spawn_join(i, via, &token_file)?;
        self.wait_ready(i, START_TIMEOUT).await?;
        self.wait_voter(i, START_TIMEOUT).await
    }

    /// Starts `ca-node join` for node `i` through member `via` with the token in
    /// `token_file`, without waiting.
    pub fn spawn_join(&mut self, i: usize, via: usize, token_file: &Path) -> Result<()> {
        let peer = self.nodes[via].addr.clone();
        let bundle = self.bundle.clone();
        self.spawn_node(
            i,
            &[
                "join",
                "--peer",
                &peer,
                "--token-file",
                token_file.to_str().expect("utf-8 path"),
                "--bundle",
                bundle.to_str().expect("utf-8 path"),
                "--timeout",
                "60",
            ],
        )
    }

    /// Whether node `i`'s process has exited (then it is marked down).
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let s = self.nodes[i].proc.as_mut().and_then(|p| p.exited());
        if s.is_some() {
            self.nodes[i].state = NodeState::Down;
        }
        s
    }

    /// A join token for `spiffe_id` created on node `via`.
    pub async fn ca_node_token(&self, via: usize, spiffe_id: &str) -> Result<String> {
        let id = spiffe_id.to_owned();
        Ok(admin_call(
            &self.nodes[via].admin_socket(),
            Duration::from_secs(15),
            |mut a| async move {
                a.create_join_token(CreateJoinTokenRequest {
                    spiffe_id: id,
                    ttl_seconds: 600,
                })
                .await
            },
        )
        .await?
        .token)
    }

    /// The trust bundle file (PEM roots).
    pub fn bundle_path(&self) -> &Path {
        &self.bundle
    }

    /// Waits until node `i` answers its admin socket as ready (its CA active).
    pub async fn wait_ready(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            let exited = self.nodes[i].proc.as_mut().and_then(|p| p.exited());
            if let Some(s) = exited {
                self.nodes[i].state = NodeState::Down;
                bail!(
                    "node {} exited ({s}) before it was ready; log:\n{}",
                    self.nodes[i].node_id,
                    ca_test_support::process::log_tail(&self.nodes[i].log_path(), 30)
                );
            }
            match admin_call(
                &self.nodes[i].admin_socket(),
                Duration::from_secs(2),
                |mut a| async move { a.health(HealthRequest {}).await },
            )
            .await
            {
                Ok(h) if h.ready => return Ok(()),
                Ok(h) => last = h.detail,
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} not ready within {timeout:?}: {last}; log:\n{}",
                    self.nodes[i].node_id,
                    ca_test_support::process::log_tail(&self.nodes[i].log_path(), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `i` sees itself as a voter outside a joint configuration.
    pub async fn wait_voter(&self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(st) = self.status(i).await {
                if !st.joint
                    && st
                        .members
                        .iter()
                        .any(|m| m.raft_id == self.nodes[i].raft_id && m.voter)
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} is not a voter after {timeout:?}",
                    self.nodes[i].node_id
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Node `i`'s view of the cluster (1 s timeout).
    pub async fn status(&self, i: usize) -> Result<ClusterStatusResponse> {
        admin_call(
            &self.nodes[i].admin_socket(),
            Duration::from_secs(1),
            |mut a| async move { a.cluster_status(ClusterStatusRequest {}).await },
        )
        .await
    }

    /// Indices of the nodes that are up (not paused, not down).
    pub fn up(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].state == NodeState::Up)
            .collect()
    }

    /// The index of the node with Raft ID `raft_id`.
    pub fn by_raft_id(&self, raft_id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.raft_id == raft_id)
    }

    /// The leader as seen by the nodes in `among`: a node that says it leads, whose
    /// leadership (same term) a majority of the current voters reports.
    pub async fn leader_among(&self, among: &[usize]) -> Option<usize> {
        let views = futures::future::join_all(among.iter().map(|i| self.status(*i))).await;
        let views: Vec<ClusterStatusResponse> = views.into_iter().filter_map(|v| v.ok()).collect();
        for v in &views {
            if v.role != "leader" {
                continue;
            }
            let voters = v.members.iter().filter(|m| m.voter).count();
            let backing = views
                .iter()
                .filter(|o| o.leader_id == v.raft_id && o.term == v.term)
                .count();
            if backing * 2 > voters {
                return self.by_raft_id(v.raft_id);
            }
        }
        None
    }

    /// Waits for a leader among `among` other than `not`; returns it and how long it took.
    pub async fn wait_leader(
        &self,
        among: &[usize],
        not: Option<usize>,
        timeout: Duration,
    ) -> Result<(usize, Duration)> {
        let start = Instant::now();
        loop {
            if let Some(l) = self.leader_among(among).await {
                if Some(l) != not {
                    return Ok((l, start.elapsed()));
                }
            }
            if start.elapsed() > timeout {
                bail!("no leader among {among:?} (other than {not:?}) within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every node that is up agrees on one leader and has applied everything
    /// the leader has in its log.
    pub async fn wait_converged(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let mut last;
        loop {
            let up = self.up();
            let views = futures::future::join_all(up.iter().map(|i| self.status(*i))).await;
            match views.into_iter().collect::<Result<Vec<_>>>() {
                Ok(views) => {
                    let leader = views[0].leader_id;
                    let top = views.iter().map(|v| v.last_log_index).max().unwrap_or(0);
                    let ok = leader != 0
                        && views
                            .iter()
                            .all(|v| v.leader_id == leader && v.last_applied_index == top);
                    if ok {
                        return Ok(start.elapsed());
                    }
                    last = views
                        .iter()
                        .map(|v| {
                            format!(
                                "{}: {} leader {} log {} applied {}",
                                v.node_id,
                                v.role,
                                v.leader_id,
                                v.last_log_index,
                                v.last_applied_index
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                }
                Err(e) => last = e.to_string(),
            }
            if start.elapsed() > timeout {
                bail!("the cluster did not converge within {timeout:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `i` follows the leader among the nodes that are up and has applied
    /// everything that leader had logged when the wait began (works while writes go on).
    pub async fn wait_caught_up(&self, i: usize, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let up = self.up();
        let mut last = String::from("no leader yet");
        // What the node must have applied: the leader's log as first seen.
        let mut target = None;
        loop {
            // The leader is looked up again each time: right after a partition heals, the
            // leader of a moment ago may lose the next election.
            if let Some(l) = self.leader_among(&up).await {
                let leader_raft_id = self.nodes[l].raft_id;
                match (self.status(l).await, self.status(i).await) {
                    (Ok(leader), Ok(st)) => {
                        let want = *target.get_or_insert(leader.last_log_index);
                        if st.leader_id == leader_raft_id && st.last_applied_index >= want {
                            return Ok(start.elapsed());
                        }
                        last = format!(
                            "{} follows {}, applied {} of {want} (leader: {leader_raft_id})",
                            st.node_id, st.leader_id, st.last_applied_index
                        )
                    }
                    (Err(e), _) | (_, Err(e)) => last = e.to_string(),
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "node {} did not catch up within {timeout:?}: {last}",
                    self.nodes[i].node_id
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].proc.as_mut() {
            p.kill_hard();
        }
        self.nodes[i].state = NodeState::Down;
    }

    /// SIGTERM node `i` and wait for it to exit.
    pub fn stop(&mut self, i: usize) -> Result<()> {
        if let Some(p) = self.nodes[i].proc.as_mut() {
            let s = p.terminate(Duration::from_secs(15));
            if !s.is_some_and(|s| s.success()) {
                bail!(
                    "node {} did not stop cleanly on SIGTERM ({s:?})",
                    self.nodes[i].node_id
                );
            }
        }
        self.nodes[i].state = NodeState::Down;
        Ok(())
    }

    /// SIGSTOP node `i`.
    pub fn pause(&mut self, i: usize) -> Result<()> {
        self.nodes[i]
            .proc
            .as_mut()
            .ok_or_else(|| anyhow!("node not running"))?
            .signal(Signal::SIGSTOP)?;
        self.nodes[i].state = NodeState::Paused;
        Ok(())
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: usize) -> Result<()> {
        self.nodes[i]
            .proc
            .as_mut()
            .ok_or_else(|| anyhow!("node not running"))?
            .signal(Signal::SIGCONT)?;
        self.nodes[i].state = NodeState::Up;
        Ok(())
    }

    /// Starts node `i` again with `ca-node run` (its data dir intact) and waits until it is
    /// ready.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.spawn_run(i)?;
        self.wait_ready(i, START_TIMEOUT).await
    }

    /// Starts node `i` again with `ca-node run` (its data dir intact), without waiting.
    pub fn spawn_run(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].state != NodeState::Down {
            bail!("node {} is still running", self.nodes[i].node_id);
        }
        self.spawn_node(i, &["run"])
    }

    /// Node `i`'s health as its admin API reports it: (ready, detail).
    pub async fn health(&self, i: usize) -> Result<(bool, String)> {
        let h = admin_call(
            &self.nodes[i].admin_socket(),
            Duration::from_secs(2),
            |mut a| async move { a.health(HealthRequest {}).await },
        )
        .await?;
        Ok((h.ready, h.detail))
    }

    /// Removes the member with Raft ID `raft_id` through node `via` (`ca-node cluster
    /// remove`).
    pub async fn remove_member(&self, via: usize, raft_id: u64) -> Result<()> {
        admin_call(
            &self.nodes[via].admin_socket(),
            Duration::from_secs(30),
            |mut a| async move { a.remove_member(RemoveMemberRequest { raft_id }).await },
        )
        .await?;
        Ok(())
    }

    /// The operator's procedure for a node whose disk was lost: node `i` (down) is removed
    /// from the membership through `via`, its data dir deleted, and it joins again under
    /// Raft ID `new_raft_id` with a new token. Returns the time from removal to voter.
    pub async fn wipe_and_rejoin(
        &mut self,
        i: usize,
        via: usize,
        new_raft_id: u64,
    ) -> Result<Duration> {
        if self.nodes[i].state != NodeState::Down {
            bail!("wipe a node that is down");
        }
        let start = Instant::now();
        self.remove_member(via, self.nodes[i].raft_id).await?;
        std::fs::remove_dir_all(self.nodes[i].data_dir())?;
        self.nodes[i].raft_id = new_raft_id;
        self.join(i, via).await?;
        Ok(start.elapsed())
    }

    fn agent_host(&mut self) -> Result<Host> {
        if self.agent_host.is_none() {
            self.agent_host = Some(self.net.add_host("agents")?);
        }
        Ok(self.agent_host.clone().expect("set"))
    }

    /// Starts an agent process named `name` (not waiting for it) with `token`, talking to
    /// `servers`.
    pub fn spawn_agent(
        &mut self,
        name: &str,
        spiffe_id: &str,
        token: &str,
        servers: &[String],
    ) -> Result<Agent> {
        let host = self.agent_host()?;
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("agent.sock");
        let health_addr = format!(
            "127.0.0.1:{}",
            std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        );
        let servers: Vec<String> = servers
            .iter()
            .map(|s| serde_json::to_string(s).expect("json"))
            .collect();
        let text = format!(
            "trust_domain = \"{TD}\"\nserver_addresses = [{}]\ndata_dir = {}\nsocket_path = {}\ntrust_bundle_path = {}\njoin_token = \"{token}\"\nhealth_addr = \"{health_addr}\"\nsync_interval_secs = 1\nlog_level = \"info\"\n",
            servers.join(", "),
            quoted(&dir.join("data")),
            quoted(&socket),
            quoted(&self.bundle),
        );
        let config = dir.join("agent.toml");
        std::fs::write(&config, text)?;
        let mut cmd = self.net.command(&host, &self.bins.agent);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1");
        let proc = Proc::spawn(name, cmd, &dir.join("agent.log"))?;
        Ok(Agent {
            name: name.into(),
            spiffe_id: spiffe_id.into(),
            socket,
            health_addr,
            proc,
        })
    }

    /// Starts `program` with `args` on the agents' host (where the agents' loopback
    /// listeners can be reached), logging to `<dir>/<name>.log`; it is killed with the
    /// cluster. Returns the host's address (reachable from the test and from the nodes).
    pub fn spawn_beside_agents(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
    ) -> Result<std::net::IpAddr> {
        let host = self.agent_host()?;
        let mut cmd = self.net.command(&host, program);
        cmd.args(args);
        let log = self.dir.join(format!("{name}.log"));
        self.extra.push(Proc::spawn(name, cmd, &log)?);
        Ok(host.ip)
    }

    /// A TCP connection to `127.0.0.1:port` on the agents' host (see
    /// [`Cluster::spawn_beside_agents`]).
    pub fn connect_beside_agents(&mut self, port: u16) -> Result<std::net::TcpStream> {
        let host = self.agent_host()?;
        self.net.connect(&host, ([127, 0, 0, 1], port).into())
    }

    /// Starts an agent `spiffe://TD/agent/<name>` configured with every node's address,
    /// attested with a join token from node `via`; waits until its Workload API listens.
    /// Returns its index in `agents`.
    pub async fn start_agent(&mut self, name: &str, via: usize) -> Result<usize> {
        let spiffe_id = format!("spiffe://{TD}/agent/{name}");
        let token = self.ca_node_token(via, &spiffe_id).await?;
        let servers: Vec<String> = self.nodes.iter().map(|n| n.addr.clone()).collect();
        let mut agent = self.spawn_agent(name, &spiffe_id, &token, &servers)?;
        match wait_agent(&mut agent, Duration::from_secs(60)).await {
            Ok(true) => {}
            Ok(false) => bail!("agent {name} exited; log:\n{}", agent.proc.log_tail(30)),
            Err(e) => bail!("{e}; log:\n{}", agent.proc.log_tail(30)),
        }
        self.agents.push(agent);
        Ok(self.agents.len() - 1)
    }

    /// Registers a workload entry `spiffe://TD/workload/<name>` under agent `agent` for
    /// this test process's uid, through node `via`. Returns its SPIFFE ID.
    pub async fn register_workload(&self, agent: usize, name: &str, via: usize) -> Result<String> {
        let id = format!("spiffe://{TD}/workload/{name}");
        let entry = types::Entry {
            spiffe_id: id.clone(),
            parent_id: self.agents[agent].spiffe_id.clone(),
            selectors: vec![types::Selector {
                r#type: "unix".into(),
                value: format!("uid:{}", nix::unistd::geteuid().as_raw()),
            }],
            ..Default::default()
        };
        admin_call(
            &self.nodes[via].admin_socket(),
            Duration::from_secs(15),
            |mut a| async move {
                a.create_entry(CreateEntryRequest { entry: Some(entry) })
                    .await
            },
        )
        .await?;
        Ok(id)
    }

    /// Entries under `parent_id` as node `i` has them ([`entries_at`]).
    pub async fn entries(&self, i: usize, parent_id: &str) -> Result<Vec<types::Entry>> {
        entries_at(&self.nodes[i].admin_socket(), parent_id).await
    }

    /// Attested agents as node `i` has them.
    pub async fn agents_on(&self, i: usize) -> Result<Vec<types::Agent>> {
        Ok(admin_call(
            &self.nodes[i].admin_socket(),
            Duration::from_secs(15),
            |mut a| async move { a.list_agents(ListAgentsRequest::default()).await },
        )
        .await?
        .agents)
    }

    /// Milliseconds since the cluster was created (for logs).
    pub fn elapsed_ms(&self) -> u128 {
        self.started.elapsed().as_millis()
    }
}

/// Waits until `agent` listens on its socket (`Ok(true)`) or exits (`Ok(false)`).
pub async fn wait_agent(agent: &mut Agent, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if agent.proc.exited().is_some() {
            return Ok(false);
        }
        if tokio::net::UnixStream::connect(&agent.socket).await.is_ok() {
            return Ok(true);
        }
        if Instant::now() > deadline {
            bail!(
                "agent {} neither listens nor exited within {timeout:?}",
                agent.name
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut out = format!(
                "[{}] the test failed; logs in {}",
                self.name,
                self.dir.display()
            );
            for n in &self.nodes {
                out.push_str(&format!(
                    "\n----- {} (raft id {}, {:?}) {}\n{}",
                    n.node_id,
                    n.raft_id,
                    n.state,
                    n.log_path().display(),
                    ca_test_support::process::log_tail(&n.log_path(), 40)
                ));
            }
            for a in &self.agents {
                out.push_str(&format!(
                    "\n----- agent {} {}\n{}",
                    a.name,
                    a.proc.log().display(),
                    a.proc.log_tail(20)
                ));
            }
            say(&out);
            // Keep the directory for a look.
            if let Some(t) = self._tmp.take() {
                let _ = t.keep();
            }
        }
        // Processes before the namespaces they run in (fields drop after this).
        for n in &mut self.nodes {
            if let Some(p) = n.proc.as_mut() {
                p.kill_hard();
            }
        }
        for a in &mut self.agents {
            a.proc.kill_hard();
        }
        for p in &mut self.extra {
            p.kill_hard();
        }
    }
}

/// Entries under `parent_id` as the node behind admin socket `sock` has them (a
/// linearizable read answered from that node's own state once it has applied the cluster's
/// commit index).
pub async fn entries_at(sock: &std::path::Path, parent_id: &str) -> Result<Vec<types::Entry>> {
    let parent = parent_id.to_owned();
    Ok(
        admin_call(sock, Duration::from_secs(15), |mut a| async move {
            a.list_entries(ca_proto::admin::ListEntriesRequest {
                parent_id: parent,
                ..Default::default()
            })
            .await
        })
        .await?
        .entries,
    )
}
