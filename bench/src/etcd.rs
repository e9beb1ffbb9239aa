//! The baseline of the cluster write benchmark: a three-member etcd cluster (the `etcd`
//! binary, e.g. Debian's `etcd-server` 3.4) of separate processes on loopback, each with its
//! own data directory (etcd fsyncs its WAL before acknowledging, as the CA's SQLite log does),
//! and a gRPC client of etcd's own v3 API (`KV.Put`, `Maintenance.Status`; the subset in
//! `proto/etcd_kv.proto`).
//!
//! [`PeerTransport::Tls`] has the members replicate over mutually authenticated TLS, as the
//! CA's nodes always do (a CA made for the run, a P-256 certificate per member,
//! `--peer-client-cert-auth`); [`PeerTransport::Plain`] is etcd's default, plain HTTP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use tonic::transport::{Channel, Endpoint};

use crate::node::free_port;

/// etcd's v3 API, the subset used here.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;
use pb::maintenance_client::MaintenanceClient;

/// How etcd's members talk to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerTransport {
    /// Mutually authenticated TLS between members, like the CA's Raft traffic.
    Tls,
    /// Plain HTTP between members (etcd's default).
    Plain,
}

/// PEM files of one member's peer TLS: its certificate and key, and the CA of all members.
struct PeerTlsFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// Makes a CA and one peer certificate per member (IP 127.0.0.1, server and client auth) in
/// `dir`.
fn make_peer_tls(dir: &Path, n: usize) -> anyhow::Result<Vec<PeerTlsFiles>> {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let ca_path = dir.join("peer-ca.pem");
    std::fs::write(&ca_path, ca_pem)?;
    let issuer = Issuer::new(ca, ca_key);
    (0..n)
        .map(|i| {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(vec!["localhost".to_owned()])?;
            p.subject_alt_names
                .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &issuer)?;
            let files = PeerTlsFiles {
                cert: dir.join(format!("peer-{i}.pem")),
                key: dir.join(format!("peer-{i}-key.pem")),
                ca: ca_path.clone(),
            };
            std::fs::write(&files.cert, cert.pem())?;
            std::fs::write(&files.key, key.serialize_pem())?;
            Ok(files)
        })
        .collect()
}

/// How long the cluster may take to form.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// The `etcd` binary: `ETCD_BIN` if set, else `etcd` on the PATH, else Debian's location.
pub fn find_etcd(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if p.exists() {
            return Ok(p.to_owned());
        }
        bail!("--etcd {}: no such file", p.display());
    }
    if let Some(p) = std::env::var_os("ETCD_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let c = d.join("etcd");
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    bail!("no etcd binary: install Debian's etcd-server (apt-get install etcd-server), put etcd on the PATH, or pass --etcd PATH")
}

/// One etcd member.
#[derive(Debug)]
pub struct EtcdMember {
    child: tokio::process::Child,
    /// Its client URL's address.
    pub client_addr: SocketAddr,
    /// stdout + stderr.
    pub log_path: PathBuf,
}

impl EtcdMember {
    /// Its process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// A running etcd cluster; every process is killed when dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The members.
    pub members: Vec<EtcdMember>,
    /// `etcd --version`'s first line.
    pub version: String,
    /// How the members talk to each other.
    pub peers: PeerTransport,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members of `etcd` and waits until they agree on a leader.
    pub async fn start(etcd: &Path, n: usize, peers: PeerTransport) -> anyhow::Result<Self> {
        let version = std::process::Command::new(etcd)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", etcd.display()))?;
        let version = String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("etcd (unknown version)")
            .to_owned();
        let dir = tempfile::Builder::new()
            .prefix("ca-bench-etcd-")
            .tempdir()
            .context("creating a temporary directory")?;
        let ports: Vec<(SocketAddr, SocketAddr)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let scheme = match peers {
            PeerTransport::Tls => "https",
            PeerTransport::Plain => "http",
        };
        let tls = match peers {
            PeerTransport::Tls => make_peer_tls(dir.path(), n)?,
            PeerTransport::Plain => Vec::new(),
        };
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}={scheme}://{peer}"))
            .collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log_path = dir.path().join(format!("etcd-{i}.log"));
            let log = std::fs::File::create(&log_path)?;
            let mut cmd = tokio::process::Command::new(etcd);
            if let Some(t) = tls.get(i) {
                cmd.arg("--peer-cert-file")
                    .arg(&t.cert)
                    .arg("--peer-key-file")
                    .arg(&t.key)
                    .arg("--peer-trusted-ca-file")
                    .arg(&t.ca)
                    .arg("--peer-client-cert-auth");
            }
            let child = cmd
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(dir.path().join(format!("m{i}")))
                .arg("--listen-client-urls")
                .arg(format!("http://{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("{scheme}://{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("{scheme}://{peer}"))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-token")
                .arg("ca-bench")
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--logger")
                .arg("zap")
                .arg("--log-level")
                .arg("warn")
                .env_remove("ETCDCTL_API")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", etcd.display()))?;
            members.push(EtcdMember {
                child,
                client_addr: *client,
                log_path,
            });
        }
        let cluster = EtcdCluster {
            members,
            version,
            peers,
            _dir: dir,
        };
        cluster.wait_leader().await?;
        Ok(cluster)
    }

    async fn wait_leader(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            if self.leader().await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.members[0].log_path).unwrap_or_default();
                bail!("etcd did not elect a leader in time; member 0's log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A gRPC channel to member `idx`.
    pub async fn channel(&self, idx: usize) -> anyhow::Result<Channel> {
        Ok(
            Endpoint::from_shared(format!("http://{}", self.members[idx].client_addr))?
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await?,
        )
    }

    /// The index of the leader (every member agreeing).
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let mut ids = Vec::new();
        let mut leader = None;
        for i in 0..self.members.len() {
            let mut m = MaintenanceClient::new(self.channel(i).await?);
            let st = m.status(pb::StatusRequest {}).await?.into_inner();
            let me = st.header.map(|h| h.member_id).unwrap_or_default();
            ids.push(me);
            match leader {
                None if st.leader != 0 => leader = Some(st.leader),
                Some(l) if l != st.leader => bail!("members disagree on the leader"),
                _ => {}
            }
        }
        let leader = leader.ok_or_else(|| anyhow!("no leader yet"))?;
        ids.iter()
            .position(|id| *id == leader)
            .ok_or_else(|| anyhow!("the leader is not a member"))
    }

    /// A KV client on `channel`.
    pub fn kv(channel: Channel) -> KvClient<Channel> {
        KvClient::new(channel)
    }

    /// Stops the members.
    pub async fn stop(mut self) {
        for m in &mut self.members {
            let _ = m.child.kill().await;
        }
    }
}
