//! Where the processes run and how the network between them is cut.
//!
//! - [`Mode::Netns`] (root, `ip netns` and `iptables` present): every host (a node, the
//!   agents' host) gets its own network namespace `chaos-<pid>-<seq>-<name>`, with a veth
//!   pair into a bridge in a hub namespace of its own; addresses `10.201.0.0/24`. Nothing is
//!   created in the caller's namespace. A partition is iptables DROP rules inside the
//!   namespaces; healing flushes them. Namespaces are deleted (their processes killed) on
//!   drop, and namespaces left by a test process that no longer exists are removed when the
//!   next network is made.
//! - [`Mode::Loopback`]: every host is 127.0.0.1 with its own ports. Processes can be killed,
//!   paused and restarted, but the network cannot be partitioned; [`Network::partition`]
//!   refuses, and the scenarios that need it say SKIPPED.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// How hosts are separated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A network namespace per host; partitions with iptables.
    Netns,
    /// Everything on 127.0.0.1; no partitions.
    Loopback,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Netns => "netns (a network namespace per host, partitions with iptables)",
            Mode::Loopback => "loopback (127.0.0.1, no partitions possible)",
        })
    }
}

const NS_PREFIX: &str = "chaos-";
const SUBNET: [u8; 3] = [10, 201, 0];
static SEQ: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

fn in_ns(ns: &str, args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Which mode this machine supports, and why. `CHAOS_NET=loopback` forces loopback;
/// `CHAOS_NET=netns` makes a missing prerequisite an error instead of a fallback. As root,
/// a missing `iptables` is an error too (install it, or choose loopback explicitly), and so
/// is any fallback to loopback under CI (`CI` set): CI must run the partitions, never skip
/// them silently.
pub fn detect() -> Result<(Mode, String)> {
    let (mode, why) = detect_inner()?;
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    let forced = std::env::var("CHAOS_NET").is_ok_and(|v| v == "loopback");
    if ci && mode == Mode::Loopback && !forced {
        bail!(
            "CI is set but the chaos tests would fall back to loopback mode ({why}), skipping the \
             partition scenarios: run them as root with `ip netns` and `iptables`, or set \
             CHAOS_NET=loopback to accept that explicitly"
        );
    }
    Ok((mode, why))
}

fn detect_inner() -> Result<(Mode, String)> {
    let forced = std::env::var("CHAOS_NET").unwrap_or_default();
    if forced == "loopback" {
        return Ok((Mode::Loopback, "CHAOS_NET=loopback".into()));
    }
    let root = nix::unistd::geteuid().is_root();
    if !root {
        if forced == "netns" {
            bail!("CHAOS_NET=netns needs root");
        }
        return Ok((
            Mode::Loopback,
            "not root: network namespaces need CAP_SYS_ADMIN".into(),
        ));
    }
    // Unique per call: tests of one binary detect the mode at the same time.
    let probe = format!(
        "{NS_PREFIX}{}-probe{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    if let Err(e) = ip(&["netns", "add", &probe]) {
        if forced == "netns" {
            bail!("CHAOS_NET=netns but `ip netns add` fails: {e}");
        }
        return Ok((
            Mode::Loopback,
            format!("`ip netns add` does not work here: {e}"),
        ));
    }
    let _ = ip(&["netns", "del", &probe]);
    if !have("iptables") {
        bail!(
            "running as root with network namespaces, but `iptables` is missing: install it \
             (Debian: apt-get install iptables) or set CHAOS_NET=loopback to run without partitions"
        );
    }
    Ok((
        Mode::Netns,
        "root, `ip netns` and `iptables` available".into(),
    ))
}

/// A place processes run in: a namespace and address, or loopback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// A short name (`n1`, `agents`).
    pub name: String,
    /// The network namespace, in netns mode.
    pub ns: Option<String>,
    /// The address processes on this host listen on.
    pub ip: IpAddr,
}

/// The hosts of one test and the links between them.
#[derive(Debug)]
pub struct Network {
    mode: Mode,
    prefix: String,
    hub: Option<String>,
    hosts: Vec<Host>,
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes namespace `ns` after killing what runs in it.
fn delete_ns(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for p in pids.split_whitespace() {
            if let Ok(p) = p.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = ip(&["netns", "del", ns]);
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
}

/// Removes namespaces left behind by test processes that are gone (killed before they
/// could clean up).
fn remove_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !pid_alive(pid) {
            delete_ns(name);
        }
    }
}

impl Network {
    /// A new, empty network in `mode`.
    pub fn new(mode: Mode) -> Result<Self> {
        let prefix = format!(
            "{NS_PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut net = Self {
            mode,
            prefix,
            hub: None,
            hosts: Vec::new(),
        };
        if mode == Mode::Netns {
            remove_stale_namespaces();
            let hub = format!("{}-hub", net.prefix);
            ip(&["netns", "add", &hub])?;
            net.hub = Some(hub.clone());
            in_ns(&hub, &["ip", "link", "add", "br0", "type", "bridge"])?;
            in_ns(&hub, &["ip", "link", "set", "br0", "up"])?;
        }
        Ok(net)
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The hosts made so far.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Adds a host: in netns mode a namespace linked to the hub, address `10.201.0.<k>`.
    pub fn add_host(&mut self, name: &str) -> Result<Host> {
        let k = self.hosts.len() + 1;
        if k > 250 {
            bail!("too many hosts");
        }
        let host = match self.mode {
            Mode::Loopback => Host {
                name: name.into(),
                ns: None,
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            },
            Mode::Netns => {
                let hub = self.hub.clone().expect("netns mode has a hub");
                let ns = format!("{}-{name}", self.prefix);
                ip(&["netns", "add", &ns])?;
                let addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], k as u8);
                let port = format!("p{k}");
                // Both ends are created directly inside their namespaces: no name is ever
                // used in the caller's namespace.
                ip(&[
                    "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                    "netns", &hub,
                ])?;
                in_ns(
                    &ns,
                    &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"],
                )?;
                in_ns(&ns, &["ip", "link", "set", "eth0", "up"])?;
                in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
                in_ns(&hub, &["ip", "link", "set", &port, "master", "br0"])?;
                in_ns(&hub, &["ip", "link", "set", &port, "up"])?;
                Host {
                    name: name.into(),
                    ns: Some(ns),
                    ip: IpAddr::V4(addr),
                }
            }
        };
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// A command that runs `program` on `host`.
    pub fn command(&self, host: &Host, program: &Path) -> Command {
        match &host.ns {
            Some(ns) => {
                // `ip netns exec` execs the program in place: the child's PID is the
                // program's, so signals reach it directly.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Gives `host` its own `/etc/hosts` (netns mode): `ip netns exec` mounts
    /// `/etc/netns/<namespace>/hosts` over `/etc/hosts` for what it runs. Removed with the
    /// namespace.
    pub fn set_hosts_file(&self, host: &Host, text: &str) -> Result<()> {
        let Some(ns) = &host.ns else {
            bail!("a hosts file of its own needs the netns mode");
        };
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        std::fs::write(dir.join("hosts"), text)?;
        Ok(())
    }

    /// A TCP connection to `addr` made from `host` (inside its namespace in netns mode),
    /// e.g. to a listener on that host's loopback.
    pub fn connect(&self, host: &Host, addr: std::net::SocketAddr) -> Result<std::net::TcpStream> {
        let Some(ns) = host.ns.clone() else {
            return Ok(std::net::TcpStream::connect(addr)?);
        };
        // A socket stays in the namespace it was made in: make it on a thread that enters
        // the host's namespace, then use it from anywhere.
        std::thread::spawn(move || -> Result<std::net::TcpStream> {
            let f = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(std::net::TcpStream::connect(addr)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?
    }

    /// A free TCP port for a listener on `host` (any port in netns mode: each host has its
    /// own address).
    pub fn port(&self, host: &Host, hint: u16) -> Result<u16> {
        match self.mode {
            Mode::Netns => Ok(hint),
            Mode::Loopback => Ok(std::net::TcpListener::bind((host.ip, 0))?
                .local_addr()?
                .port()),
        }
    }

    /// Cuts every link between hosts in different `groups` (hosts in no group keep all
    /// their links). Replaces any earlier partition.
    pub fn partition(&self, groups: &[Vec<Host>]) -> Result<()> {
        if self.mode != Mode::Netns {
            bail!("partitions need the netns mode");
        }
        self.heal()?;
        for (gi, g) in groups.iter().enumerate() {
            for (gj, other) in groups.iter().enumerate() {
                if gi == gj {
                    continue;
                }
                for a in g {
                    let ns = a.ns.as_deref().expect("netns host");
                    for b in other {
                        let peer = b.ip.to_string();
                        in_ns(ns, &["iptables", "-A", "INPUT", "-s", &peer, "-j", "DROP"])?;
                        in_ns(ns, &["iptables", "-A", "OUTPUT", "-d", &peer, "-j", "DROP"])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> Result<()> {
        if self.mode != Mode::Netns {
            return Ok(());
        }
        for h in &self.hosts {
            if let Some(ns) = &h.ns {
                in_ns(ns, &["iptables", "-F"])?;
            }
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for h in &self.hosts {
            if let Some(ns) = &h.ns {
                delete_ns(ns);
            }
        }
        if let Some(hub) = &self.hub {
            delete_ns(hub);
        }
    }
}
