//! Running `docs/DEPLOYING.md` as written, on hosts of a [`Network`].
//!
//! - [`Guide`]: the guide's command blocks, each marked in the Markdown source with
//!   `<!-- run: NAME on HOST... -->` on the line before its fence.
//! - [`Site`]: the hosts of one deployment. Each host has a folder of its own standing for
//!   its file system (`usr/bin`, `etc`, `var/lib`, `run`) and its own SoftHSM2 token
//!   folder; `/tmp` and `/backup` are one folder shared by every host (it stands for the
//!   guide's `scp` steps). [`Site::run`] runs a block on a host with `sh -e`, after the
//!   substitutions listed in the guide's last section: paths moved into the host's folder,
//!   per-host values (`N=`, `HOST=`), users dropped, and `systemctl` lines carried out by
//!   the site itself: it runs the installed unit's `ExecStart` on the host with a
//!   `NOTIFY_SOCKET` of its own and waits for `READY=1`, as systemd does for `Type=notify`.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::net::{Host, Network};
use ca_test_support::process::Proc;

/// One marked command block of the guide.
#[derive(Clone, Debug)]
pub struct Block {
    /// Its name in the marker.
    pub name: String,
    /// The hosts the marker names.
    pub hosts: Vec<String>,
    /// The commands, as written.
    pub script: String,
}

/// The marked blocks of a guide, by name.
#[derive(Debug)]
pub struct Guide {
    blocks: BTreeMap<String, Block>,
}

impl Guide {
    /// Reads the marked blocks of the Markdown file `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        Self::parse(&text)
    }

    /// Reads the marked blocks of Markdown `text`: a line `<!-- run: NAME on H1 H2 -->`,
    /// then a fenced block right after it.
    pub fn parse(text: &str) -> Result<Self> {
        let mut blocks = BTreeMap::new();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let Some(marker) = line
                .trim()
                .strip_prefix("<!-- run:")
                .and_then(|m| m.strip_suffix("-->"))
            else {
                continue;
            };
            let (name, hosts) = marker
                .trim()
                .split_once(" on ")
                .ok_or_else(|| anyhow!("marker {line:?}: expected `NAME on HOST...`"))?;
            let fence = lines.next().unwrap_or_default();
            if !fence.starts_with("```") {
                bail!("marker {line:?} is not followed by a fenced block");
            }
            let mut script = String::new();
            for l in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                script.push_str(l);
                script.push('\n');
            }
            let block = Block {
                name: name.trim().to_owned(),
                hosts: hosts.split_whitespace().map(str::to_owned).collect(),
                script,
            };
            if blocks.insert(block.name.clone(), block).is_some() {
                bail!("two blocks named {name:?}");
            }
        }
        Ok(Self { blocks })
    }

    /// The block `name`.
    ///
    /// # Panics
    /// If the guide has no such block (the guide and its test disagree).
    pub fn block(&self, name: &str) -> &Block {
        self.blocks
            .get(name)
            .unwrap_or_else(|| panic!("the guide has no block marked `run: {name}`"))
    }

    /// Every block's name.
    pub fn names(&self) -> Vec<String> {
        self.blocks.keys().cloned().collect()
    }
}

/// Paths of a real host moved into a host's own folder.
const HOST_PATHS: &[&str] = &[
    "/usr/bin/ca-node",
    "/usr/bin/agent",
    "/etc/spiffe-ca",
    "/etc/spiffe-agent",
    "/etc/systemd/system",
    "/var/lib/spiffe-ca",
    "/var/lib/spiffe-agent",
    "/run/spiffe-ca",
    "/run/spiffe-agent",
];
/// Paths moved into the folder every host shares.
const SHARED_PATHS: &[&str] = &["/tmp", "/backup"];
/// Marks a config file whose paths were moved.
const MOVED: &str = "# (paths moved by the deployment test)";

/// Replaces each `from` path in `text` with `to`, where it starts a path: at the start, or
/// after a space, quote, `=`, `>`, `(` or `:`, and followed by the end, `/` or a character
/// that cannot continue a name.
fn move_paths(text: &str, moves: &[(&str, PathBuf)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let b = text.as_bytes();
    'outer: while i < text.len() {
        let starts = i == 0 || b" \t\n\"'=>(:".contains(&b[i - 1]);
        if starts {
            for (from, to) in moves {
                if text[i..].starts_with(from) {
                    let end = i + from.len();
                    let ends = end == text.len()
                        || !(b[end].is_ascii_alphanumeric() || b"-_.".contains(&b[end]));
                    if ends {
                        out.push_str(&to.display().to_string());
                        i = end;
                        continue 'outer;
                    }
                }
            }
        }
        let c = text[i..].chars().next().expect("in bounds");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// One host of the site.
#[derive(Debug)]
pub struct SiteHost {
    /// Its name (`ca-1`).
    pub name: String,
    /// Its place in the network.
    pub host: Host,
    /// Its folder (its `/`).
    pub root: PathBuf,
    /// The services the site runs on it in place of systemd, by unit name.
    services: BTreeMap<String, Proc>,
}

impl SiteHost {
    /// `path` (as on a real host, e.g. `/run/spiffe-ca/admin.sock`) in this host's folder.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn softhsm_conf(&self) -> PathBuf {
        self.root.join("softhsm2.conf")
    }
}

/// The hosts of one deployment and what runs on them.
#[derive(Debug)]
pub struct Site {
    /// The network the hosts are in.
    pub net: Network,
    hosts: Vec<SiteHost>,
    /// The folder every host shares (`/tmp`, `/backup`).
    pub shared: PathBuf,
    /// Where the guide's commands run from: the binaries and `ops/`.
    pub stage: PathBuf,
    dir: PathBuf,
}

impl Site {
    /// A site in `dir` with one host per name, each with its folder, `/etc/hosts` entries
    /// `<name>.internal` for every host, and a SoftHSM2 configuration of its own. `stage`
    /// holds what the guide's commands expect in their working directory.
    pub fn new(dir: &Path, mut net: Network, names: &[&str], stage: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        // Workloads run as other users and must reach the agents' sockets.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let shared = dir.join("shared");
        for p in SHARED_PATHS {
            std::fs::create_dir_all(shared.join(p.trim_start_matches('/')))?;
        }
        let mut hosts = Vec::new();
        for name in names {
            let host = net.add_host(name)?;
            let root = dir.join(name);
            hosts.push(SiteHost {
                name: (*name).to_owned(),
                host,
                root,
                services: BTreeMap::new(),
            });
        }
        let table: String = hosts
            .iter()
            .map(|h| format!("{} {}.internal {}\n", h.host.ip, h.name, h.name))
            .collect();
        for h in &hosts {
            net.set_hosts_file(&h.host, &format!("127.0.0.1 localhost\n{table}"))?;
        }
        let mut site = Self {
            net,
            hosts,
            shared,
            stage: stage.to_owned(),
            dir: dir.to_owned(),
        };
        for name in names {
            site.fresh_disk(name)?;
        }
        Ok(site)
    }

    /// The host `name`.
    ///
    /// # Panics
    /// If there is none.
    pub fn host(&self, name: &str) -> &SiteHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    fn host_mut(&mut self, name: &str) -> &mut SiteHost {
        self.hosts
            .iter_mut()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Gives host `name` an empty disk, as a new machine has: its folder (and SoftHSM2
    /// tokens) deleted and made again with what a Debian host has (`/usr/bin`,
    /// `/etc/systemd/system`, SoftHSM2 installed). Its services must be stopped.
    pub fn fresh_disk(&mut self, name: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let h = self.host(name);
        if !h.services.is_empty() {
            bail!("{name}: stop its services before replacing its disk");
        }
        let root = h.root.clone();
        if root.exists() {
            std::fs::remove_dir_all(&root)?;
        }
        for d in [
            "usr/bin",
            "etc/systemd/system",
            "var/lib",
            "run",
            "softhsm/tokens",
        ] {
            std::fs::create_dir_all(root.join(d))?;
        }
        for d in ["", "usr", "usr/bin", "run", "var", "var/lib"] {
            std::fs::set_permissions(root.join(d), std::fs::Permissions::from_mode(0o755))?;
        }
        let h = self.host(name);
        std::fs::write(
            h.softhsm_conf(),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                root.join("softhsm/tokens").display()
            ),
        )?;
        Ok(())
    }

    fn moves(&self, h: &SiteHost) -> Vec<(&'static str, PathBuf)> {
        let mut m: Vec<(&'static str, PathBuf)> =
            HOST_PATHS.iter().map(|p| (*p, h.path(p))).collect();
        m.extend(
            SHARED_PATHS
                .iter()
                .map(|p| (*p, self.shared.join(p.trim_start_matches('/')))),
        );
        m
    }

    /// Runs block `block` on host `on` as the guide's last section describes, with the
    /// per-host values `values` (`("N", "2")` replaces the block's `N=...` line's value).
    /// Returns what the commands printed.
    pub fn run(&mut self, block: &Block, on: &str, values: &[(&str, &str)]) -> Result<String> {
        Ok(self.run_at_once(block, &[(on, values)])?.remove(0))
    }

    /// Runs block `block` on several hosts at the same moment (each with its values), as
    /// an operator with a terminal per host does: the commands up to each `systemctl` line
    /// run concurrently on every host, then the `systemctl` lines one host after the other.
    /// Returns what the commands printed on each host.
    pub fn run_at_once(
        &mut self,
        block: &Block,
        hosts: &[(&str, &[(&str, &str)])],
    ) -> Result<Vec<String>> {
        let mut plans = Vec::new();
        for (on, values) in hosts {
            if !block.hosts.iter().any(|h| h == on) {
                bail!("block {} is not marked for {on}", block.name);
            }
            plans.push(plan(&self.adapt(block, on, values)));
        }
        // Every host runs the same block: step k of each host at the same time.
        let mut plans: Vec<_> = plans.into_iter().map(Vec::into_iter).collect();
        let mut out = vec![String::new(); hosts.len()];
        loop {
            let column: Vec<Step> = plans.iter_mut().filter_map(Iterator::next).collect();
            if column.len() != hosts.len() {
                break;
            }
            if let Step::Systemctl(_) = &column[0] {
                for ((on, _), step) in hosts.iter().zip(&column) {
                    if let Step::Systemctl(rest) = step {
                        self.systemctl(on, rest).with_context(|| {
                            format!("block {} on {on}: systemctl {rest}", block.name)
                        })?;
                    }
                }
                continue;
            }
            let this = &*self;
            let results: Vec<Result<String>> = std::thread::scope(|scope| {
                let running: Vec<_> = hosts
                    .iter()
                    .zip(&column)
                    .map(|((on, _), step)| {
                        scope.spawn(move || match step {
                            Step::Shell(script) => this.shell(on, script, &block.name),
                            Step::Systemctl(_) => Ok(String::new()),
                        })
                    })
                    .collect();
                running
                    .into_iter()
                    .map(|t| {
                        t.join()
                            .unwrap_or_else(|_| Err(anyhow!("a shell thread panicked")))
                    })
                    .collect()
            });
            for (o, r) in out.iter_mut().zip(results) {
                *o += &r?;
            }
        }
        for (on, _) in hosts {
            self.move_config_paths(on)?;
        }
        Ok(out)
    }

    /// The block's text with this host's substitutions.
    fn adapt(&self, block: &Block, on: &str, values: &[(&str, &str)]) -> String {
        let h = self.host(on);
        let mut lines = Vec::new();
        for line in block.script.lines() {
            let t = line.trim_start();
            if t.starts_with("useradd ") {
                continue;
            }
            let mut l = line.replace("sudo -u spiffe-ca ", "");
            for owner in [
                "-o root -g spiffe-ca ",
                "-o spiffe-ca -g spiffe-ca ",
                "-o spiffe-ca ",
                "-g spiffe-ca ",
            ] {
                l = l.replace(owner, "");
            }
            for (var, value) in values {
                if let Some(rest) = l.trim_start().strip_prefix(&format!("{var}=")) {
                    let comment = rest.find('#').map(|i| &rest[i..]).unwrap_or("");
                    l = format!("{var}={value}  {comment}");
                }
            }
            lines.push(l);
        }
        move_paths(&lines.join("\n"), &self.moves(h))
    }

    fn env(&self, h: &SiteHost) -> Vec<(String, String)> {
        let path = std::env::var("PATH").unwrap_or_default();
        vec![
            (
                "PATH".into(),
                format!("{}:{path}", h.path("/usr/bin").display()),
            ),
            (
                "CA_NODE_ADMIN_SOCKET".into(),
                h.path("/run/spiffe-ca/admin.sock").display().to_string(),
            ),
            (
                "SOFTHSM2_CONF".into(),
                h.softhsm_conf().display().to_string(),
            ),
            ("NO_COLOR".into(), "1".into()),
        ]
    }

    fn shell(&self, on: &str, script: &str, block: &str) -> Result<String> {
        let h = self.host(on);
        let out = self
            .net
            .command(&h.host, Path::new("/bin/sh"))
            .arg("-ec")
            .arg(script)
            .envs(self.env(h))
            .current_dir(&self.stage)
            .stdin(Stdio::null())
            .output()
            .context("running sh")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("--- {block} on {on}:\n{script}--- output:\n{text}");
        if !out.status.success() {
            bail!(
                "block {block} on {on} failed ({}):\n{script}\n{text}",
                out.status
            );
        }
        Ok(text)
    }

    /// Moves the paths in the config files installed on host `on` (once per file).
    fn move_config_paths(&self, on: &str) -> Result<()> {
        let h = self.host(on);
        let moves = self.moves(h);
        for dir in ["/etc/spiffe-ca", "/etc/spiffe-agent"] {
            let Ok(rd) = std::fs::read_dir(h.path(dir)) else {
                continue;
            };
            for f in rd {
                let p = f?.path();
                if p.extension().and_then(|e| e.to_str()) != Some("toml") {
                    continue;
                }
                let text = std::fs::read_to_string(&p)?;
                if text.contains(MOVED) {
                    continue;
                }
                std::fs::write(&p, format!("{}\n{MOVED}\n", move_paths(&text, &moves)))?;
            }
        }
        Ok(())
    }

    /// Carries out `systemctl <rest>` on host `on`.
    fn systemctl(&mut self, on: &str, rest: &str) -> Result<()> {
        let words: Vec<&str> = rest.split_whitespace().collect();
        match words.as_slice() {
            ["enable", "--now", unit] | ["start", unit] => self.start(on, unit),
            ["stop", unit] => self.stop(on, unit),
            ["restart", unit] => {
                self.stop(on, unit)?;
                self.start(on, unit)
            }
            _ => bail!("systemctl {rest}: not a command the site carries out"),
        }
    }

    /// The installed unit's `key=` values.
    fn unit(&self, on: &str, unit: &str) -> Result<BTreeMap<String, String>> {
        let h = self.host(on);
        let path = h.path(&format!("/etc/systemd/system/{unit}.service"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{unit}.service is not installed on {on}"))?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect())
    }

    /// Starts `unit` on host `on` as systemd would, and waits for its `READY=1`.
    pub fn start(&mut self, on: &str, unit: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if self.host(on).services.contains_key(unit) {
            return Ok(());
        }
        let u = self.unit(on, unit)?;
        let h = self.host(on);
        let moves = self.moves(h);
        for (key, base, mode_key) in [
            ("StateDirectory", "/var/lib", "StateDirectoryMode"),
            ("RuntimeDirectory", "/run", "RuntimeDirectoryMode"),
        ] {
            if let Some(d) = u.get(key) {
                let p = h.path(&format!("{base}/{d}"));
                std::fs::create_dir_all(&p)?;
                let mode = u
                    .get(mode_key)
                    .and_then(|m| u32::from_str_radix(m, 8).ok())
                    .unwrap_or(0o755);
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
            }
        }
        let exec = move_paths(
            u.get("ExecStart")
                .ok_or_else(|| anyhow!("{unit}.service has no ExecStart"))?,
            &moves,
        );
        let mut words = exec.split_whitespace();
        let program = words.next().ok_or_else(|| anyhow!("empty ExecStart"))?;
        let notify_path = self.dir.join(format!("notify-{on}-{unit}.sock"));
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)?;
        notify.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut cmd = self.net.command(&h.host, Path::new(program));
        cmd.args(words)
            .envs(self.env(h))
            .env("NOTIFY_SOCKET", &notify_path)
            .current_dir(&h.root);
        let log = h.root.join(format!("{unit}.log"));
        let mut proc = Proc::spawn(&format!("{on}/{unit}"), cmd, &log)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut buf = [0u8; 512];
        loop {
            if let Ok(n) = notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    break;
                }
            }
            if let Some(st) = proc.exited() {
                bail!(
                    "{on}: {unit} exited ({st}) before it was ready:\n{}",
                    proc.log_tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{on}: {unit} sent no READY=1 within 120 s:\n{}",
                    proc.log_tail(30)
                );
            }
        }
        eprintln!("--- {on}: {unit} is ready (pid {})", proc.pid());
        self.host_mut(on).services.insert(unit.to_owned(), proc);
        Ok(())
    }

    /// Stops `unit` on host `on` (SIGTERM, as systemd does, then SIGKILL after the unit's
    /// stop timeout).
    pub fn stop(&mut self, on: &str, unit: &str) -> Result<()> {
        let Some(mut proc) = self.host_mut(on).services.remove(unit) else {
            return Ok(());
        };
        if proc.terminate(Duration::from_secs(30)).is_none() {
            bail!("{on}: {unit} did not stop within 30 s");
        }
        Ok(())
    }

    /// Kills `unit` on host `on` at once (a crash, a dead disk).
    pub fn kill(&mut self, on: &str, unit: &str) {
        if let Some(mut proc) = self.host_mut(on).services.remove(unit) {
            proc.kill_hard();
        }
    }

    /// The log of `unit` on host `on`, last `n` lines.
    pub fn log_tail(&self, on: &str, unit: &str, n: usize) -> String {
        ca_test_support::process::log_tail(&self.host(on).root.join(format!("{unit}.log")), n)
    }
}

/// One step of a block on a host.
#[derive(Debug)]
enum Step {
    /// Commands for `sh -e`.
    Shell(String),
    /// What follows `systemctl` on a line.
    Systemctl(String),
}

/// Cuts `script` at its `systemctl` lines. Assignments at the top of the block (`N=`,
/// `HOST=`) are repeated at the start of every shell step, so they hold for the whole block.
fn plan(script: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut prelude = String::new();
    let mut segment = String::new();
    let mut top = true;
    for line in script.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("systemctl ") {
            if !segment.trim().is_empty() {
                steps.push(Step::Shell(format!("{prelude}{segment}")));
            }
            segment.clear();
            steps.push(Step::Systemctl(rest.to_owned()));
            top = false;
            continue;
        }
        if top && is_assignment(t) {
            prelude.push_str(line);
            prelude.push('\n');
            continue;
        }
        if !t.is_empty() && !t.starts_with('#') {
            top = false;
        }
        segment.push_str(line);
        segment.push('\n');
    }
    if !segment.trim().is_empty() {
        steps.push(Step::Shell(format!("{prelude}{segment}")));
    }
    steps
}

fn is_assignment(line: &str) -> bool {
    line.split_once('=').is_some_and(|(var, _)| {
        !var.is_empty() && var.chars().all(|c| c.is_ascii_uppercase() || c == '_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_move_where_they_start_and_only_there() {
        let moves = [
            ("/etc/spiffe-ca", PathBuf::from("/h/etc/spiffe-ca")),
            ("/tmp", PathBuf::from("/s/tmp")),
        ];
        assert_eq!(
            move_paths(
                "install /tmp/roots.pem /etc/spiffe-ca/x >/tmp/a data_dir = \"/etc/spiffe-ca\"",
                &moves
            ),
            "install /s/tmp/roots.pem /h/etc/spiffe-ca/x >/s/tmp/a data_dir = \"/h/etc/spiffe-ca\""
        );
        // Not a path start, or a longer name.
        assert_eq!(
            move_paths("/x/tmp /tmpfoo /etc/spiffe-cab", &moves),
            "/x/tmp /tmpfoo /etc/spiffe-cab"
        );
    }

    #[test]
    fn blocks_are_cut_at_systemctl_and_keep_their_assignments() {
        let steps = plan("N=2  # x\nHOST=a\necho $N\nsystemctl restart ca-node\necho $HOST\n");
        let text: Vec<String> = steps
            .iter()
            .map(|s| match s {
                Step::Shell(t) => format!("sh:{t}"),
                Step::Systemctl(t) => format!("ctl:{t}"),
            })
            .collect();
        assert_eq!(
            text,
            [
                "sh:N=2  # x\nHOST=a\necho $N\n",
                "ctl:restart ca-node",
                "sh:N=2  # x\nHOST=a\necho $HOST\n"
            ]
        );
    }

    #[test]
    fn marked_blocks_are_read_with_their_hosts() {
        let g = Guide::parse(
            "text\n<!-- run: one on a b -->\n```sh\necho 1\necho 2\n```\n<!-- run: two on c -->\n```\nx\n```\n",
        )
        .unwrap();
        assert_eq!(g.names(), ["one", "two"]);
        assert_eq!(g.block("one").hosts, ["a", "b"]);
        assert_eq!(g.block("one").script, "echo 1\necho 2\n");
        assert!(Guide::parse("<!-- run: x on a -->\ntext\n").is_err());
        assert!(Guide::parse("<!-- run: x -->\n```\n```\n").is_err());
    }
}
