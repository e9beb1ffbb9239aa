//! A durable three-node (or five-node) `ca-node` cluster of separate processes on loopback,
//! formed exactly as an operator forms one: node 1 runs `ca-node init`, the others
//! `ca-node join --peer <node 1> --token-file ... --bundle ...` with a ca-node join token
//! made on node 1 (`ca-node token generate --spiffe-id spiffe://TD/ca-node/<id>`). Every
//! node keeps its Raft log and state in SQLite (WAL, `synchronous=FULL`) under a temporary
//! directory. Each node's stdout/stderr goes to `node-<i>.log` there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use ca_proto::admin::admin_client::AdminClient;
use ca_proto::admin::{
    ClusterStatusRequest, ClusterStatusResponse, CreateJoinTokenRequest, GetBundleRequest,
    HealthRequest,
};
use tonic::transport::Channel;

use ca_test_support::process::Proc;

use crate::node::{free_port, ResolvedExe, SELF_EXEC_ENV, TRUST_DOMAIN};

/// How long forming the cluster may take.
const FORM_TIMEOUT: Duration = Duration::from_secs(120);

/// One node process of the cluster.
#[derive(Debug)]
pub struct ClusterNode {
    proc: Proc,
    /// Raft ID (1-based, as the index).
    pub raft_id: u64,
    /// Node API address.
    pub node_addr: SocketAddr,
    /// Admin socket.
    pub admin_socket: PathBuf,
    /// stdout + stderr.
    pub log_path: PathBuf,
}

impl ClusterNode {
    /// An admin API client on this node's socket.
    pub async fn admin(&self) -> anyhow::Result<AdminClient<Channel>> {
        crate::node::admin_client(&self.admin_socket).await
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }
}

/// The running cluster; every process is killed when dropped.
#[derive(Debug)]
pub struct CaCluster {
    /// The nodes, node 1 first.
    pub nodes: Vec<ClusterNode>,
    dir: tempfile::TempDir,
    /// Settings every node's configuration gets on top of the defaults.
    extra: toml::Table,
}

fn node_config(dir: &Path, i: u64, node_listen: SocketAddr, extra: &toml::Table) -> toml::Table {
    let s = |p: PathBuf| toml::Value::String(p.to_string_lossy().into_owned());
    let mut km = toml::Table::new();
    km.insert("type".into(), "soft".into());
    let mut cfg = toml::Table::new();
    cfg.insert("node_id".into(), format!("bench-{i}").into());
    cfg.insert("raft_id".into(), toml::Value::Integer(i as i64));
    cfg.insert("trust_domain".into(), TRUST_DOMAIN.into());
    cfg.insert("log_level".into(), "warn".into());
    cfg.insert("key_manager".into(), km.into());
    cfg.insert("data_dir".into(), s(dir.join(format!("node-{i}"))));
    cfg.insert(
        "admin_socket".into(),
        s(dir.join(format!("admin-{i}.sock"))),
    );
    cfg.insert("node_listen".into(), node_listen.to_string().into());
    for (k, v) in extra {
        cfg.insert(k.clone(), v.clone());
    }
    cfg
}

impl CaCluster {
    /// Starts `n` nodes with `exe` and waits until all are voters, agree on a leader, and are
    /// ready.
    pub async fn start(exe: &ResolvedExe, n: usize) -> anyhow::Result<Self> {
        Self::start_with(exe, n, toml::Table::new()).await
    }

    /// [`CaCluster::start`], every node's configuration with `extra`'s settings on top
    /// (top-level keys replace the defaults').
    pub async fn start_with(
        exe: &ResolvedExe,
        n: usize,
        extra: toml::Table,
    ) -> anyhow::Result<Self> {
        if n == 0 {
            bail!("a cluster needs at least one node");
        }
        let dir = tempfile::Builder::new()
            .prefix("ca-bench-cluster-")
            .tempdir()
            .context("creating a temporary directory")?;
        let mut cluster = CaCluster {
            nodes: Vec::new(),
            dir,
            extra,
        };
        let deadline = Instant::now() + FORM_TIMEOUT;
        let first = cluster.spawn(exe, 1, &[]).await?;
        cluster.nodes.push(first);
        cluster.wait_ready(0, deadline).await?;
        let bundle = {
            let mut a = cluster.nodes[0].admin().await?;
            a.get_bundle(GetBundleRequest {}).await?.into_inner().pem
        };
        let bundle_path = cluster.dir.path().join("bundle.pem");
        std::fs::write(&bundle_path, bundle)?;
        for i in 2..=n as u64 {
            cluster.join(exe, i, &bundle_path, deadline).await?;
        }
        cluster.wait_formed(deadline).await?;
        Ok(cluster)
    }

    /// Adds node `i` as an operator does: a ca-node join token made on node 1, then
    /// `ca-node join` through node 1 with the bundle at `bundle_path`; returns once it is
    /// ready.
    async fn join(
        &mut self,
        exe: &ResolvedExe,
        i: u64,
        bundle_path: &Path,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        let token = {
            let mut a = self.nodes[0].admin().await?;
            a.create_join_token(CreateJoinTokenRequest {
                spiffe_id: format!("spiffe://{TRUST_DOMAIN}/ca-node/bench-{i}"),
                ttl_seconds: 600,
            })
            .await?
            .into_inner()
            .token
        };
        let token_path = self.dir.path().join(format!("token-{i}"));
        std::fs::write(&token_path, token)?;
        std::fs::set_permissions(
            &token_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        let peer = self.nodes[0].node_addr.to_string();
        let args = [
            "--peer".to_string(),
            peer,
            "--token-file".into(),
            token_path.to_string_lossy().into_owned(),
            "--bundle".into(),
            bundle_path.to_string_lossy().into_owned(),
        ];
        let node = self.spawn(exe, i, &args).await?;
        self.nodes.push(node);
        self.wait_ready(self.nodes.len() - 1, deadline).await
    }

    /// Joins one more node with an empty data dir (as a wiped node joins again) and waits
    /// until it is a voter and has applied everything the leader had applied when it
    /// started; returns how long that took, and its status then.
    pub async fn add_empty_node(
        &mut self,
        exe: &ResolvedExe,
    ) -> anyhow::Result<(Duration, ClusterStatusResponse)> {
        let i = self.nodes.len() as u64 + 1;
        let pem = {
            let mut a = self.nodes[0].admin().await?;
            a.get_bundle(GetBundleRequest {}).await?.into_inner().pem
        };
        let bundle_path = self.dir.path().join(format!("bundle-{i}.pem"));
        std::fs::write(&bundle_path, pem)?;
        let target = self.status(0).await?.last_applied_index;
        let t = Instant::now();
        let deadline = t + FORM_TIMEOUT;
        self.join(exe, i, &bundle_path, deadline).await?;
        let idx = self.nodes.len() - 1;
        loop {
            let st = self.status(idx).await?;
            let voter = st.members.iter().any(|m| m.raft_id == i && m.voter);
            if voter && st.last_applied_index >= target {
                return Ok((t.elapsed(), st));
            }
            if Instant::now() > deadline {
                bail!("node {i} did not catch up in time: {st:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn spawn(
        &self,
        exe: &ResolvedExe,
        i: u64,
        join_args: &[String],
    ) -> anyhow::Result<ClusterNode> {
        let node_addr = free_port()?;
        let cfg = node_config(self.dir.path(), i, node_addr, &self.extra);
        let config_path = self.dir.path().join(format!("node-{i}.toml"));
        std::fs::write(&config_path, toml::to_string(&cfg)?)?;
        let log_path = self.dir.path().join(format!("node-{i}.log"));
        let mut cmd = std::process::Command::new(&exe.program);
        cmd.arg(if join_args.is_empty() { "init" } else { "join" })
            .arg("--config")
            .arg(&config_path)
            .args(join_args)
            .env_remove("RUST_LOG")
            .env_remove(SELF_EXEC_ENV)
            .env_remove("TOKIO_WORKER_THREADS");
        if exe.self_exec {
            cmd.env(SELF_EXEC_ENV, "1");
        }
        let proc = Proc::spawn(&format!("ca-node {i}"), cmd, &log_path)?;
        Ok(ClusterNode {
            proc,
            raft_id: i,
            node_addr,
            admin_socket: self.dir.path().join(format!("admin-{i}.sock")),
            log_path,
        })
    }

    async fn wait_ready(&mut self, idx: usize, deadline: Instant) -> anyhow::Result<()> {
        let mut last = String::from("not started");
        loop {
            let node = &mut self.nodes[idx];
            if let Some(status) = node.proc.exited() {
                bail!(
                    "node {} exited during start-up ({status}); its log:\n{}",
                    node.raft_id,
                    node.log_tail(20)
                );
            }
            if node.admin_socket.exists() {
                match node.admin().await {
                    Ok(mut c) => match c.health(HealthRequest {}).await {
                        Ok(r) if r.get_ref().ready => return Ok(()),
                        Ok(r) => last = r.into_inner().detail,
                        Err(s) => last = s.message().to_owned(),
                    },
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} was not ready in time: {last}; its log:\n{}",
                    node.raft_id,
                    node.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_formed(&self, deadline: Instant) -> anyhow::Result<()> {
        let n = self.nodes.len();
        loop {
            let st = self.status(0).await?;
            let voters = st.members.iter().filter(|m| m.voter).count();
            if voters == n && st.leader_id != 0 && !st.joint {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster did not form in time: {st:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Node `idx`'s view of the cluster.
    pub async fn status(&self, idx: usize) -> anyhow::Result<ClusterStatusResponse> {
        let mut a = self.nodes[idx].admin().await?;
        Ok(a.cluster_status(ClusterStatusRequest {})
            .await?
            .into_inner())
    }

    /// The index of the current leader.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let st = self.status(0).await?;
        self.nodes
            .iter()
            .position(|n| n.raft_id == st.leader_id)
            .ok_or_else(|| anyhow!("no known leader: {st:?}"))
    }

    /// Where the nodes keep their data (for the report).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops every node (SIGTERM, then kill after 10 s).
    pub async fn stop(self) {
        let mut nodes = self.nodes;
        let _ = tokio::task::spawn_blocking(move || {
            // All asked to stop first, so they stop together; then each waited for.
            for n in &mut nodes {
                let _ = n.proc.signal(nix::sys::signal::Signal::SIGTERM);
            }
            for n in &mut nodes {
                if n.proc.wait_exit(Duration::from_secs(10)).is_none() {
                    n.proc.kill_hard();
                }
            }
        })
        .await;
    }
}
