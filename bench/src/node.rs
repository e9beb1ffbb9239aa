//! The `ca-node` under test, run as a separate process (`ca-node run --config FILE`) on a
//! generated configuration in a temporary directory.
//!
//! Which executable runs it ([`NodeExe`]): an explicit path, the `ca-node` binary next to
//! this benchmark's own executable (same target directory, e.g. after
//! `cargo build --release -p ca-bench -p ca-node-cli`), or — when there is none — this
//! benchmark's executable itself re-run in "be ca-node" mode ([`SELF_EXEC_ENV`]), which
//! calls the same `ca_node_cli::main` the `ca-node` binary consists of. Either way the node
//! is its own process, so its CPU time is its own.

use ca_test_support::process::Proc;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use ca_proto::admin::admin_client::AdminClient;
use ca_proto::admin::HealthRequest;
use tonic::transport::Channel;

/// Set (to `1`) in the environment of a self-executed node: the benchmark binary then runs
/// `ca_node_cli::main` instead of the benchmark.
pub const SELF_EXEC_ENV: &str = "CA_BENCH_EXEC_CA_NODE";

/// The trust domain of the benchmark node.
pub const TRUST_DOMAIN: &str = "bench.example.org";

/// Top-level configuration keys the benchmark sets itself; a config overlay may not.
pub const MANAGED_KEYS: &[&str] = &["data_dir", "node_listen", "admin_socket", "http_listen"];

/// How long the node may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Which executable runs the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeExe {
    /// `ca-node` beside this executable if present, else [`NodeExe::SelfExec`].
    Auto,
    /// This executable, re-run as `ca-node` (see [`SELF_EXEC_ENV`]).
    SelfExec,
    /// This `ca-node` binary.
    Path(PathBuf),
}

impl std::str::FromStr for NodeExe {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => NodeExe::Auto,
            "self" => NodeExe::SelfExec,
            "" => return Err("empty path".into()),
            p => NodeExe::Path(PathBuf::from(p)),
        })
    }
}

/// The program and its leading arguments/environment, resolved.
#[derive(Clone, Debug)]
pub struct ResolvedExe {
    /// The program.
    pub program: PathBuf,
    /// Whether it is this executable in "be ca-node" mode.
    pub self_exec: bool,
}

impl ResolvedExe {
    /// A person-readable description.
    pub fn describe(&self) -> String {
        if self.self_exec {
            format!(
                "{} (this benchmark, re-run as ca-node: the same ca_node_cli::main)",
                self.program.display()
            )
        } else {
            self.program.display().to_string()
        }
    }
}

impl NodeExe {
    /// Resolves to a program to run.
    pub fn resolve(&self) -> anyhow::Result<ResolvedExe> {
        let me = std::env::current_exe().context("locating this executable")?;
        match self {
            NodeExe::Path(p) => {
                if !p.is_file() {
                    bail!("--ca-node {}: no such file", p.display());
                }
                Ok(ResolvedExe {
                    program: p.clone(),
                    self_exec: false,
                })
            }
            NodeExe::SelfExec => Ok(ResolvedExe {
                program: me,
                self_exec: true,
            }),
            NodeExe::Auto => {
                let sibling = me.with_file_name(format!("ca-node{}", std::env::consts::EXE_SUFFIX));
                if sibling.is_file() {
                    Ok(ResolvedExe {
                        program: sibling,
                        self_exec: false,
                    })
                } else {
                    NodeExe::SelfExec.resolve()
                }
            }
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// The executable.
    pub exe: NodeExe,
    /// `intermediate_mode` (`key_manager` or `memory`); None keeps the config's.
    pub intermediate_mode: Option<String>,
    /// TOML whose top-level keys replace the generated configuration's (e.g. a
    /// `[key_manager]` table for another backend, `[ttl]`, `log_level`); it may not set
    /// [`MANAGED_KEYS`].
    pub overlay: Option<toml::Table>,
    /// `TOKIO_WORKER_THREADS` for the node (its runtime's worker count); None: the default.
    pub worker_threads: Option<usize>,
    /// Keep the temporary directory (config, state, log) after the run.
    pub keep_dir: bool,
    /// Environment variables for the node (None: removed), e.g. where its key manager is.
    pub env: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)>,
}

/// The configuration the benchmark gives the node.
pub fn build_config(
    dir: &Path,
    node_listen: SocketAddr,
    http_listen: SocketAddr,
    settings: &NodeSettings,
) -> anyhow::Result<toml::Table> {
    let mut km = toml::Table::new();
    km.insert("type".into(), "soft".into());
    let mut cfg = toml::Table::new();
    cfg.insert("node_id".into(), "bench-1".into());
    cfg.insert("trust_domain".into(), TRUST_DOMAIN.into());
    cfg.insert("log_level".into(), "warn".into());
    cfg.insert("intermediate_mode".into(), "key_manager".into());
    cfg.insert("key_manager".into(), km.into());
    // The load is one agent asking for as many SVIDs as the node can sign: the per-agent
    // signing limit would measure itself (an overlay may set `[limits]` back).
    let mut limits = toml::Table::new();
    limits.insert("signings_per_second".into(), 0.0.into());
    cfg.insert("limits".into(), limits.into());
    if let Some(overlay) = &settings.overlay {
        for (k, v) in overlay {
            if MANAGED_KEYS.contains(&k.as_str()) {
                bail!("the node config overlay may not set {k}: the benchmark manages it");
            }
            cfg.insert(k.clone(), v.clone());
        }
    }
    if let Some(m) = &settings.intermediate_mode {
        cfg.insert("intermediate_mode".into(), m.clone().into());
    }
    let s = |p: PathBuf| toml::Value::String(p.to_string_lossy().into_owned());
    cfg.insert("data_dir".into(), s(dir.join("node")));
    cfg.insert("admin_socket".into(), s(dir.join("admin.sock")));
    cfg.insert("node_listen".into(), node_listen.to_string().into());
    cfg.insert("http_listen".into(), http_listen.to_string().into());
    // Refuse what the node would refuse, before starting it.
    ca_node::NodeConfig::parse(&toml::to_string(&cfg)?)
        .map_err(|e| anyhow!("the generated node configuration is invalid: {e}"))?;
    Ok(cfg)
}

/// A loopback address nothing listens on right now.
pub(crate) fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from((
        [127, 0, 0, 1],
        ca_test_support::free_port(),
    )))
}

/// An admin API client over the Unix socket at `socket`.
pub(crate) async fn admin_client(socket: &Path) -> anyhow::Result<AdminClient<Channel>> {
    let ch = ca_node_cli::uds_channel(socket)
        .await
        .map_err(|e| anyhow!(e))?;
    Ok(AdminClient::new(ch))
}

/// A running node process; killed when dropped.
#[derive(Debug)]
pub struct NodeProcess {
    proc: Proc,
    dir: tempfile::TempDir,
    keep_dir: bool,
    /// The executable used.
    pub exe: ResolvedExe,
    /// The effective configuration.
    pub config: toml::Table,
    /// The node API address.
    pub node_addr: SocketAddr,
    /// The metrics/health address.
    pub http_addr: SocketAddr,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// The node's stderr log.
    pub log_path: PathBuf,
}

impl NodeProcess {
    /// Starts the node and waits until its admin API says it is ready. Ports are picked
    /// free on loopback just before the start; a lost race is retried with new ports.
    pub async fn start(settings: &NodeSettings) -> anyhow::Result<Self> {
        let exe = settings.exe.resolve()?;
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(settings, &exe).await {
                Ok(n) => return Ok(n),
                Err((e, port_clash)) => {
                    if !port_clash {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("the node did not start")))
    }

    async fn try_start(
        settings: &NodeSettings,
        exe: &ResolvedExe,
    ) -> Result<Self, (anyhow::Error, bool)> {
        let fail = |e: anyhow::Error| (e, false);
        let dir = tempfile::Builder::new()
            .prefix("ca-bench-")
            .tempdir()
            .context("creating a temporary directory")
            .map_err(fail)?;
        let node_addr = free_port().map_err(fail)?;
        let http_addr = free_port().map_err(fail)?;
        let config = build_config(dir.path(), node_addr, http_addr, settings).map_err(fail)?;
        let config_path = dir.path().join("node.toml");
        std::fs::write(
            &config_path,
            toml::to_string(&config).map_err(|e| fail(e.into()))?,
        )
        .context("writing the node configuration")
        .map_err(fail)?;
        let log_path = dir.path().join("node.log");
        let mut cmd = std::process::Command::new(&exe.program);
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .env_remove(SELF_EXEC_ENV);
        if exe.self_exec {
            cmd.env(SELF_EXEC_ENV, "1");
        }
        for (k, v) in &settings.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        match settings.worker_threads {
            Some(n) => {
                cmd.env("TOKIO_WORKER_THREADS", n.to_string());
            }
            None => {
                cmd.env_remove("TOKIO_WORKER_THREADS");
            }
        }
        let proc = Proc::spawn("ca-node", cmd, &log_path).map_err(fail)?;
        let mut node = NodeProcess {
            proc,
            keep_dir: settings.keep_dir,
            exe: exe.clone(),
            config,
            node_addr,
            http_addr,
            admin_socket: dir.path().join("admin.sock"),
            log_path,
            dir,
        };
        match node.wait_ready().await {
            Ok(()) => Ok(node),
            Err(e) => {
                let tail = node.log_tail(20);
                let clash = tail.contains("cannot listen on");
                node.proc.kill_hard();
                Err((
                    e.context(format!("node log ({}):\n{tail}", node.log_path.display())),
                    clash,
                ))
            }
        }
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("not started");
        loop {
            if let Some(status) = self.proc.exited() {
                bail!("the node exited during start-up ({status})");
            }
            if self.admin_socket.exists() {
                match self.admin().await {
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
                    "the node was not ready within {}s: {last}",
                    READY_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node's process ID.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The temporary directory (config, state, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// CPU time the node has used so far: (user, system).
    pub fn cpu(&self) -> anyhow::Result<(Duration, Duration)> {
        crate::procstat::process_cpu_split(self.proc.pid()).with_context(|| {
            format!(
                "reading the node's CPU time from /proc/{}/stat (is this Linux?)",
                self.proc.pid()
            )
        })
    }

    /// An admin API client over the node's Unix socket.
    pub async fn admin(&self) -> anyhow::Result<AdminClient<Channel>> {
        admin_client(&self.admin_socket).await
    }

    /// Scrapes the node's `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<crate::metrics::Scrape> {
        crate::metrics::scrape(self.http_addr).await
    }

    /// The node's `key_manager.type`.
    pub fn key_manager(&self) -> String {
        self.config
            .get("key_manager")
            .and_then(|k| k.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("?")
            .to_owned()
    }

    /// The node's `ca_key_algorithm` (root and intermediate keys).
    pub fn ca_key_algorithm(&self) -> anyhow::Result<ca_kms::KeyAlgorithm> {
        let cfg = ca_node::NodeConfig::parse(&toml::to_string(&self.config)?)
            .map_err(|e| anyhow!("the node configuration: {e}"))?;
        Ok(cfg.ca_key_algorithm)
    }

    /// The node's `intermediate_mode`.
    pub fn intermediate_mode(&self) -> String {
        self.config
            .get("intermediate_mode")
            .and_then(|t| t.as_str())
            .unwrap_or("key_manager")
            .to_owned()
    }

    /// The last `n` lines of the node's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    /// Stops the node with SIGTERM (SIGKILL after 10 s). Returns the directory when it is
    /// to be kept.
    pub async fn stop(self) -> anyhow::Result<Option<PathBuf>> {
        let NodeProcess {
            mut proc,
            dir,
            keep_dir,
            ..
        } = self;
        tokio::task::spawn_blocking(move || proc.terminate(Duration::from_secs(10)))
            .await
            .context("stopping the node")?;
        if keep_dir {
            Ok(Some(dir.keep()))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> NodeSettings {
        NodeSettings {
            exe: NodeExe::Auto,
            intermediate_mode: None,
            overlay: None,
            worker_threads: None,
            keep_dir: false,
            env: vec![],
        }
    }

    #[test]
    fn config_is_valid_and_overlays_replace_keys() {
        let dir = Path::new("/tmp/x");
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let cfg = build_config(dir, a, a, &settings()).unwrap();
        assert_eq!(cfg["key_manager"]["type"].as_str(), Some("soft"));

        let mut s = settings();
        s.overlay = Some(toml::from_str("log_level = \"info\"\n[ttl]\nx509_svid = 600\n").unwrap());
        s.intermediate_mode = Some("memory".into());
        let cfg = build_config(dir, a, a, &s).unwrap();
        assert_eq!(cfg["intermediate_mode"].as_str(), Some("memory"));
        assert_eq!(cfg["ttl"]["x509_svid"].as_integer(), Some(600));

        s.overlay = Some(toml::from_str("data_dir = \"/elsewhere\"\n").unwrap());
        let err = build_config(dir, a, a, &s).unwrap_err().to_string();
        assert!(err.contains("data_dir"), "{err}");

        s.overlay = Some(toml::from_str("[key_manager]\ntype = \"nope\"\n").unwrap());
        let err = build_config(dir, a, a, &s).unwrap_err().to_string();
        assert!(err.contains("invalid"), "{err}");
    }

    #[test]
    fn exe_parsing() {
        assert_eq!("auto".parse::<NodeExe>().unwrap(), NodeExe::Auto);
        assert_eq!("self".parse::<NodeExe>().unwrap(), NodeExe::SelfExec);
        assert_eq!(
            "/x/ca-node".parse::<NodeExe>().unwrap(),
            NodeExe::Path("/x/ca-node".into())
        );
    }
}
