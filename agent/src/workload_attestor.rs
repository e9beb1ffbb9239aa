//! Workload attestation: facts about a caller of the Workload API, read from its Unix
//! socket peer credentials and from `/proc`, expressed as selectors:
//!
//! - `unix:uid:<n>`, `unix:gid:<n>` from the peer credentials;
//! - `unix:user:<name>`, `unix:group:<name>` from the user and group databases;
//! - `unix:path:<binary>` from `/proc/PID/exe`, `unix:sha256:<hex>` of that binary (hashes
//!   cached by path, inode, mtime and size);
//! - `systemd:id:<unit>` from the unified (`0::`) line of `/proc/PID/cgroup`.
//!
//! A fact that cannot be read (the process already exited, a name not in the database)
//! means fewer selectors, never an error.

use std::collections::HashMap;
use std::io::Read;
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
}

impl Default for WorkloadAttestor {
    fn default() -> Self {
        Self::new()
    }
}

/// The systemd unit of a process from the text of its `/proc/PID/cgroup`: the last path
/// component ending in `.service` or `.scope` of the unified hierarchy's `0::` line (or of
/// the v1 `name=systemd` line when there is no unified one).
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
        .rev()
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
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
        Self {
            proc_root: root.into(),
            hashes: Mutex::new(HashMap::new()),
        }
    }

    /// Selectors of a caller with these peer credentials. Blocking (reads and may hash the
    /// binary): call from a blocking-capable thread.
    pub fn attest(&self, pid: Option<i32>, uid: u32, gid: u32) -> Vec<Selector> {
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
        if let Some(pid) = pid.filter(|p| *p > 0) {
            let dir = self.proc_root.join(pid.to_string());
            self.binary_selectors(&dir, &mut out);
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup")) {
                if let Some(unit) = systemd_unit_from_cgroup(&text) {
                    out.push(Selector::new("systemd", format!("id:{unit}")));
                }
            }
        }
        out
    }

    fn binary_selectors(&self, proc_dir: &Path, out: &mut Vec<Selector>) {
        let exe = proc_dir.join("exe");
        let Ok(target) = std::fs::read_link(&exe) else {
            return;
        };
        let path = target.to_string_lossy().into_owned();
        if path.ends_with(" (deleted)") || !path.starts_with('/') {
            // The binary was replaced or removed since the process started: its path no
            // longer names what runs, so claim neither path nor hash.
            return;
        }
        out.push(Selector::new("unix", format!("path:{path}")));
        // Open through /proc so the hash is of what the process runs, even if the path
        // was swapped in between.
        let Ok(file) = std::fs::File::open(&exe) else {
            return;
        };
        let Ok(meta) = file.metadata() else {
            return;
        };
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
            return;
        }
        if let Ok(h) = sha256_hex(file) {
            let mut map = self.hashes.lock().expect("hash lock");
            if map.len() >= MAX_HASHES {
                map.clear();
            }
            map.insert(key, h.clone());
            out.push(Selector::new("unix", format!("sha256:{h}")));
        }
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
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.scope\n",
                Some("app-foo.scope"),
            ),
            (
                "0::/system.slice/docker-abc.scope/init\n",
                Some("docker-abc.scope"),
            ),
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
        let sels = a.attest(Some(pid), uid, gid);
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
        assert_eq!(a.attest(Some(pid), uid, gid), sels);
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
        let sels = a.attest(Some(999_999), 12345, 54321);
        assert!(sels.iter().all(|s| !s.value.starts_with("path:")));
        assert!(sels.contains(&Selector::new("unix", "uid:12345")));
        let sels = a.attest(None, 1, 1);
        assert!(sels.len() >= 2);
    }

    #[test]
    fn hashes_known_bytes() {
        assert_eq!(
            sha256_hex(&b"abc"[..]).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
