//! Workload attestation: facts about a caller of the Workload API, read from its Unix
//! socket peer credentials and from `/proc`, expressed as selectors:
//!
//! - `unix:uid:<n>`, `unix:gid:<n>` from the peer credentials;
//! - `unix:user:<name>`, `unix:group:<name>` from the user and group databases;
//! - `unix:path:<binary>` from `/proc/PID/exe`, `unix:sha256:<hex>` of that binary (hashes
//!   cached by path, inode, mtime and size);
//! - `systemd:id:<unit>`: the system manager's unit of the process, from `/proc/PID/cgroup`.
//!
//! The caller is pinned ([`Peer`]): a pidfd taken by the kernel when it connected (so a PID
//! recycled by another process is noticed) and the binary it ran when accepted. Attestation is
//! refused when the process has since executed another binary (a process must not
//! connect and then lend its connection to a sibling after exec'ing a trusted binary),
//! when it exited during attestation, and when it runs in a child PID namespace (a
//! container, whose file system paths its owner controls) unless that is allowed.
//!
//! A fact that cannot be read (no access, a name not in the database, a process already
//! gone at accept) means fewer selectors, never an error.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ca_identity::Selector;
use nix::unistd::{Gid, Group, Uid, User};

/// What identifies one version of a binary on disk.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct BinaryKey {
    path: PathBuf,
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    size: u64,
}

/// Most binary hashes remembered.
const MAX_HASHES: usize = 1024;

/// Produces selectors for a process.
#[derive(Debug)]
pub struct WorkloadAttestor {
    proc_root: PathBuf,
    hashes: Mutex<HashMap<BinaryKey, String>>,
    allow_other_pid_namespaces: bool,
    /// How many PID namespaces deep the agent itself runs (`NSpid` entries).
    own_pid_depth: Option<usize>,
}

/// The process at the other end of a Workload API connection, pinned when the connection
/// was accepted (see the module docs).
#[derive(Debug)]
pub struct Peer {
    /// User ID from the socket's peer credentials.
    pub uid: u32,
    /// Group ID from the socket's peer credentials.
    pub gid: u32,
    /// Process ID from the peer credentials (`None`: not visible from here).
    pub pid: Option<i32>,
    pidfd: Option<OwnedFd>,
    /// Device and inode of the binary it ran when accepted.
    exe: Option<(u64, u64)>,
}

impl Peer {
    /// Whether the pinned process has exited (a pidfd turns readable then). Without a
    /// pidfd the process is treated as gone.
    fn exited(&self) -> bool {
        let Some(fd) = &self.pidfd else {
            return true;
        };
        let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        rustix::event::poll(&mut fds, Some(&zero)).map_or(true, |n| n > 0)
    }
}

/// Why a caller gets no identity at all (rather than fewer selectors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How many PID namespaces deep a process runs, from the `NSpid:` line of its
/// `/proc/PID/status` (one PID per namespace level, outermost first).
pub fn pid_namespace_depth(status: &str) -> Option<usize> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|pids| pids.split_whitespace().count())
        .filter(|n| *n > 0)
}

impl Default for WorkloadAttestor {
    fn default() -> Self {
        Self::new()
    }
}

/// The systemd unit of a process from the text of its `/proc/PID/cgroup` (the unified
/// hierarchy's `0::` line, or the v1 `name=systemd` line when there is no unified one):
/// the first component below the root slices, if it is a `.service` or `.scope`. Only
/// the system manager creates those; anything deeper lies in a unit's delegated subtree
/// (a user's `user@UID.service`, a container scope), where its owner may name cgroups
/// like system units, so deeper names are never reported.
pub fn systemd_unit_from_cgroup(text: &str) -> Option<String> {
    let path_of = |line: &str| -> Option<String> { line.splitn(3, ':').nth(2).map(str::to_owned) };
    let path = text
        .lines()
        .find(|l| l.starts_with("0::"))
        .and_then(path_of)
        .or_else(|| {
            text.lines()
                .find(|l| l.split(':').nth(1) == Some("name=systemd"))
                .and_then(path_of)
        })?;
    path.trim()
        .split('/')
        .filter(|c| !c.is_empty())
        .find(|c| !c.ends_with(".slice"))
        .filter(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

fn sha256_hex(mut r: impl Read) -> std::io::Result<String> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish()))
}

impl WorkloadAttestor {
    /// An attestor reading `/proc`.
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    /// An attestor reading another proc tree (tests).
    pub fn with_proc_root(root: impl Into<PathBuf>) -> Self {
        let proc_root = root.into();
        let own_pid_depth = std::fs::read_to_string(proc_root.join("self/status"))
            .ok()
            .and_then(|t| pid_namespace_depth(&t));
        Self {
            proc_root,
            hashes: Mutex::new(HashMap::new()),
            allow_other_pid_namespaces: false,
            own_pid_depth,
        }
    }

    /// The same attestor, serving callers in child PID namespaces too (see
    /// `workload_api.allow_other_pid_namespaces`).
    pub fn allow_other_pid_namespaces(mut self, allow: bool) -> Self {
        self.allow_other_pid_namespaces = allow;
        self
    }

    /// Pins the process with these peer credentials, as the connection is accepted: a
    /// pidfd and the binary it runs now. Cheap (no hashing).
    pub fn peer(&self, pid: Option<i32>, uid: u32, gid: u32) -> Peer {
        self.peer_with_pidfd(None, pid, uid, gid)
    }

    /// [`WorkloadAttestor::peer`] with the pidfd the kernel took when the caller connected
    /// (`SO_PEERPIDFD`), if the socket gave one: it is the connecting process even if that
    /// exited and its PID was reused before the accept. Without one, a pidfd is opened now.
    pub fn peer_with_pidfd(
        &self,
        pidfd: Option<OwnedFd>,
        pid: Option<i32>,
        uid: u32,
        gid: u32,
    ) -> Peer {
        let pid = pid.filter(|p| *p > 0);
        let pidfd = pidfd.or_else(|| {
            let p = rustix::process::Pid::from_raw(pid?)?;
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        let exe = pid.and_then(|p| {
            std::fs::metadata(self.proc_root.join(p.to_string()).join("exe"))
                .ok()
                .map(|m| (m.dev(), m.ino()))
        });
        Peer {
            uid,
            gid,
            pid,
            pidfd,
            exe,
        }
    }

    /// Selectors of a pinned caller, or why it gets none. Blocking (reads and may hash the
    /// binary): call from a blocking-capable thread.
    pub fn attest(&self, peer: &Peer) -> Result<Vec<Selector>, Refused> {
        let (uid, gid) = (peer.uid, peer.gid);
        let mut out = vec![
            Selector::new("unix", format!("uid:{uid}")),
            Selector::new("unix", format!("gid:{gid}")),
        ];
        if let Ok(Some(u)) = User::from_uid(Uid::from_raw(uid)) {
            out.push(Selector::new("unix", format!("user:{}", u.name)));
        }
        if let Ok(Some(g)) = Group::from_gid(Gid::from_raw(gid)) {
            out.push(Selector::new("unix", format!("group:{}", g.name)));
        }
        let Some(pid) = peer.pid else {
            return Ok(out);
        };
        if peer.exited() {
            // Gone before it was pinned, or since: /proc/PID may be another process now.
            if peer.pidfd.is_some() {
                return Err(Refused(
                    "the calling process exited while it was being attested".into(),
                ));
            }
            return Ok(out);
        }
        let dir = self.proc_root.join(pid.to_string());
        if !self.allow_other_pid_namespaces {
            let depth = std::fs::read_to_string(dir.join("status"))
                .ok()
                .and_then(|t| pid_namespace_depth(&t));
            if let (Some(theirs), Some(ours)) = (depth, self.own_pid_depth) {
                if theirs > ours {
                    return Err(Refused(format!(
                        "process {pid} runs in another PID namespace (a container?): its binary path cannot be trusted from here; run an agent inside it, or set workload_api.allow_other_pid_namespaces = true in the agent's config"
                    )));
                }
            }
        }
        self.binary_selectors(&dir, peer.exe, &mut out)?;
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup")) {
            if let Some(unit) = systemd_unit_from_cgroup(&text) {
                out.push(Selector::new("systemd", format!("id:{unit}")));
            }
        }
        // Still the same process: nothing read above came from a recycled PID.
        if peer.exited() {
            return Err(Refused(
                "the calling process exited while it was being attested".into(),
            ));
        }
        Ok(out)
    }

    fn binary_selectors(
        &self,
        proc_dir: &Path,
        pinned: Option<(u64, u64)>,
        out: &mut Vec<Selector>,
    ) -> Result<(), Refused> {
        let exe = proc_dir.join("exe");
        // Open through /proc so the hash is of what the process runs, even if the path
        // was swapped in between.
        let Ok(file) = std::fs::File::open(&exe) else {
            return Ok(());
        };
        let Ok(meta) = file.metadata() else {
            return Ok(());
        };
        if pinned.is_some_and(|p| p != (meta.dev(), meta.ino())) {
            return Err(Refused(
                "the calling process has executed another binary since it connected; connect from the process that needs the identity".into(),
            ));
        }
        let Ok(target) = std::fs::read_link(&exe) else {
            return Ok(());
        };
        let path = target.to_string_lossy().into_owned();
        if path.ends_with(" (deleted)") || !path.starts_with('/') {
            // The binary was replaced or removed since the process started: its path no
            // longer names what runs, so claim neither path nor hash.
            return Ok(());
        }
        out.push(Selector::new("unix", format!("path:{path}")));
        let key = BinaryKey {
            path: target,
            dev: meta.dev(),
            ino: meta.ino(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            size: meta.size(),
        };
        if let Some(h) = self.hashes.lock().expect("hash lock").get(&key) {
            out.push(Selector::new("unix", format!("sha256:{h}")));
            return Ok(());
        }
        if let Ok(h) = sha256_hex(file) {
            let mut map = self.hashes.lock().expect("hash lock");
            if map.len() >= MAX_HASHES {
                map.clear();
            }
            map.insert(key, h.clone());
            out.push(Selector::new("unix", format!("sha256:{h}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_parsing() {
        for (text, want) in [
            ("0::/system.slice/metald.service\n", Some("metald.service")),
            (
                "0::/system.slice/foo.slice/nested.service\n",
                Some("nested.service"),
            ),
            // A user's delegated subtree: only the user manager's own unit is reported,
            // never a cgroup the user named like a system unit.
            (
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.scope\n",
                Some("user@1000.service"),
            ),
            (
                "0::/user.slice/user-1000.slice/user@1000.service/metald.service\n",
                Some("user@1000.service"),
            ),
            (
                "0::/user.slice/user-1000.slice/session-3.scope\n",
                Some("session-3.scope"),
            ),
            (
                "0::/system.slice/docker-abc.scope/init\n",
                Some("docker-abc.scope"),
            ),
            (
                "0::/system.slice/docker-abc.scope/metald.service\n",
                Some("docker-abc.scope"),
            ),
            ("0::/custom/metald.service\n", None),
            ("0::/system.slice\n", None),
            ("0::/\n", None),
            ("0::/init.scope\n", Some("init.scope")),
            (
                "12:cpu,cpuacct:/x\n1:name=systemd:/system.slice/old.service\n",
                Some("old.service"),
            ),
            (
                "1:name=systemd:/system.slice/old.service\n0::/system.slice/new.service\n",
                Some("new.service"),
            ),
            ("", None),
            ("garbage", None),
        ] {
            assert_eq!(systemd_unit_from_cgroup(text).as_deref(), want, "{text:?}");
        }
    }

    #[test]
    fn attests_this_test_process() {
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let pid = std::process::id() as i32;
        let a = WorkloadAttestor::new();
        let sels = a.attest(&a.peer(Some(pid), uid, gid)).unwrap();
        let has = |s: String| sels.iter().any(|x| x.to_string() == s);
        assert!(has(format!("unix:uid:{uid}")), "{sels:?}");
        assert!(has(format!("unix:gid:{gid}")), "{sels:?}");
        if let Ok(Some(u)) = User::from_uid(Uid::from_raw(uid)) {
            assert!(has(format!("unix:user:{}", u.name)), "{sels:?}");
        }
        let exe = std::env::current_exe().unwrap();
        assert!(
            has(format!("unix:path:{}", exe.display())),
            "{sels:?} lacks {}",
            exe.display()
        );
        let want = sha256_hex(std::fs::File::open(&exe).unwrap()).unwrap();
        assert!(has(format!("unix:sha256:{want}")), "{sels:?}");
        // Every produced selector passes the registration-side validation.
        for s in &sels {
            s.validate().unwrap_or_else(|e| panic!("{s}: {e}"));
        }
        // Second time: from the hash cache, same answer.
        assert_eq!(a.attest(&a.peer(Some(pid), uid, gid)).unwrap(), sels);
        assert_eq!(a.hashes.lock().unwrap().len(), 1);
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        if let Some(unit) = systemd_unit_from_cgroup(&cgroup) {
            assert!(has(format!("systemd:id:{unit}")), "{sels:?}");
        }
    }

    #[test]
    fn gone_process_gives_fewer_selectors() {
        let dir = tempfile::tempdir().unwrap();
        let a = WorkloadAttestor::with_proc_root(dir.path());
        let sels = a.attest(&a.peer(Some(999_999), 12345, 54321)).unwrap();
        assert!(sels.iter().all(|s| !s.value.starts_with("path:")));
        assert!(sels.contains(&Selector::new("unix", "uid:12345")));
        let sels = a.attest(&a.peer(None, 1, 1)).unwrap();
        assert!(sels.len() >= 2);
    }

    /// The pidfd the kernel took at connect (`SO_PEERPIDFD`) pins the caller: here the
    /// test process itself, at the other end of a socket pair.
    #[test]
    fn the_kernels_peer_pidfd_pins_the_caller() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let pidfd = nix::sys::socket::getsockopt(&a, nix::sys::socket::sockopt::PeerPidfd)
            .expect("SO_PEERPIDFD (Linux 6.5 or later)");
        let cred =
            nix::sys::socket::getsockopt(&a, nix::sys::socket::sockopt::PeerCredentials).unwrap();
        let at = WorkloadAttestor::new();
        let peer = at.peer_with_pidfd(Some(pidfd), Some(cred.pid()), cred.uid(), cred.gid());
        assert!(!peer.exited());
        let sels = at.attest(&peer).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert!(
            sels.iter()
                .any(|s| s.value == format!("path:{}", exe.display())),
            "{sels:?}"
        );
    }

    #[test]
    fn nspid_depth() {
        assert_eq!(pid_namespace_depth("Name:\tx\nNSpid:\t42\n"), Some(1));
        assert_eq!(pid_namespace_depth("NSpid:\t4242\t1\n"), Some(2));
        assert_eq!(pid_namespace_depth("Name:\tx\n"), None);
        assert_eq!(pid_namespace_depth("NSpid:\n"), None);
    }

    /// A child that waits for a line on stdin, then executes `/bin/sleep`.
    fn exec_on_line() -> std::process::Child {
        std::process::Command::new("/bin/sh")
            .args(["-c", "read line; exec /bin/sleep 30"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn exe_of(pid: u32) -> String {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// A process pinned while it ran one binary is refused once it has executed another
    /// (it could lend its connection to a sibling after exec'ing a trusted binary), and
    /// one pinned after the exec gets the new binary's path. A process that exited is
    /// refused (its PID may belong to another process by now).
    #[test]
    fn exec_after_connect_and_exit_are_refused() {
        use std::io::Write;
        let a = WorkloadAttestor::new();
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let mut child = exec_on_line();
        let pid = child.id();
        let before = a.peer(Some(pid as i32), uid, gid);
        let sh = a.attest(&before).unwrap();
        assert!(
            sh.iter()
                .any(|s| s.value.starts_with("path:") && !s.value.ends_with("/sleep")),
            "{sh:?}"
        );
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !exe_of(pid).ends_with("/sleep") {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never exec'd"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let err = a.attest(&before).unwrap_err();
        assert!(err.0.contains("executed another binary"), "{err}");
        let after = a.peer(Some(pid as i32), uid, gid);
        let sleep = a.attest(&after).unwrap();
        assert!(
            sleep
                .iter()
                .any(|s| s.value == format!("path:{}", exe_of(pid))),
            "{sleep:?}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let err = a.attest(&after).unwrap_err();
        assert!(err.0.contains("exited"), "{err}");
    }

    /// A caller in a child PID namespace (here: `unshare --pid`, as a container runtime
    /// does) is refused unless allowed; allowed, it gets its selectors. Needs root or
    /// unprivileged user namespaces, as the test command provides.
    #[test]
    fn callers_in_a_child_pid_namespace_are_refused_unless_allowed() {
        let mut child = std::process::Command::new("unshare")
            .args([
                "--user",
                "--map-root-user",
                "--pid",
                "--fork",
                "/bin/sleep",
                "30",
            ])
            .spawn()
            .expect("unshare (util-linux) runs");
        // The sleep is unshare's child, in the new namespace.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let inner = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
                    .unwrap_or_default();
            if let Some(p) = children.split_whitespace().next() {
                if exe_of(p.parse().unwrap()).ends_with("/sleep") {
                    break p.parse::<i32>().unwrap();
                }
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "unshare failed: user and PID namespaces are needed for this test"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "no child in the namespace"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let status = std::fs::read_to_string(format!("/proc/{inner}/status")).unwrap();
        assert!(pid_namespace_depth(&status).unwrap() >= 2, "{status}");
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let strict = WorkloadAttestor::new();
        let err = strict
            .attest(&strict.peer(Some(inner), uid, gid))
            .unwrap_err();
        assert!(err.0.contains("another PID namespace"), "{err}");
        assert!(err.0.contains("allow_other_pid_namespaces"), "{err}");
        let lax = WorkloadAttestor::new().allow_other_pid_namespaces(true);
        let sels = lax.attest(&lax.peer(Some(inner), uid, gid)).unwrap();
        assert!(
            sels.iter().any(|s| s.value.starts_with("path:")),
            "{sels:?}"
        );
        // The test's own process is in the agent's namespace.
        let me = std::process::id() as i32;
        strict.attest(&strict.peer(Some(me), uid, gid)).unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(inner),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn hashes_known_bytes() {
        assert_eq!(
            sha256_hex(&b"abc"[..]).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
