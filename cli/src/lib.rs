//! The `ca-node` command line. Server commands (`run`, `dev`) start a node; every other
//! command talks to the local node's admin Unix socket.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use ca_node::config::DEFAULT_ADMIN_SOCKET;
use ca_node::node::wait_for_signal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ca_proto::admin::admin_client::AdminClient;
use ca_proto::admin::*;
use ca_proto::types;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
#[command(name = "ca-node", version, about = "SPIFFE certificate authority node")]
struct Cli {
    /// The local node's admin socket.
    #[arg(long, global = true, env = "CA_NODE_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    socket_path: PathBuf,
    /// How `run`, `init`, `join` and `dev` write their logs: text, or one JSON object per line.
    #[arg(long, global = true, default_value = "text", value_parser = ca_identity::logging::LOG_FORMATS)]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a node from a configuration file.
    Run {
        /// The TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Create a new cluster: this node alone, which creates the root. Then runs the node
    /// (restart it later with `run`).
    Init {
        /// The TOML configuration.
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        then: AfterBootstrap,
    },
    /// Join an existing cluster with a join token created on a member for
    /// spiffe://TD/ca-node/<this node id>; then runs the node (restart it with `run`).
    Join {
        /// The TOML configuration (its data_dir must be empty).
        #[arg(long)]
        config: PathBuf,
        /// A member's node API address, host:port.
        #[arg(long)]
        peer: String,
        /// The join token (`ca-node token generate --spiffe-id spiffe://TD/ca-node/<id>`).
        #[arg(long, env = "CA_NODE_JOIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file holding the join token (instead of --token).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The trust bundle (PEM roots, `ca-node bundle show` on a member).
        #[arg(long)]
        bundle: PathBuf,
        /// Stay a learner (receives the log, does not vote); promote later.
        #[arg(long)]
        learner: bool,
        /// Seconds to keep trying to be added and promoted.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[command(flatten)]
        then: AfterBootstrap,
    },
    /// Start a local development environment (three nodes + an agent, software keys) and
    /// print SPIFFE_ENDPOINT_SOCKET=unix:///... ; runs until interrupted.
    Dev {
        /// Where sockets and data go.
        #[arg(long, default_value = ".spiffe-ca-dev")]
        dir: PathBuf,
        /// How many nodes (1, 3 or 5).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// The Raft cluster: status and membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Backups of the replicated state.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCmd),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// The CA journal.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Replace a node's intermediate CA now (default: this node's): a new one is signed by
    /// the root and activated cluster-wide through the replicated log; SVIDs it signed stay
    /// valid (workloads trust the root), agents pick up new SVIDs as they renew.
    RotateIntermediate(RotateTarget),
    /// Replace a node's JWT signing key (default: this node's): the new key is published in
    /// the JWT bundle at once and signs after rotation.propagation_window; the old one stays
    /// published until it expires.
    RotateJwtKey(RotateTarget),
    /// Replace the root: a new root is created and published in the trust bundle at once;
    /// after rotation.propagation_window intermediates are signed by it; the old root
    /// leaves the bundle once everything under it has expired.
    RotateRoot(WaitFor),
    /// Revoke an intermediate CA cluster-wide: no node signs with it again, agents replace
    /// every SVID it signed at once, and its node gets a new one.
    RevokeIntermediate {
        /// The intermediate's ID (`ca-node ca show`).
        id: String,
        #[command(flatten)]
        wait: WaitFor,
    },
    /// Revoke a JWT signing key cluster-wide: it leaves the JWT bundle, agents drop the
    /// JWT-SVIDs it signed, its node activates a new key at once.
    RevokeJwtKey {
        /// The JWT key's ID (`ca-node ca show`).
        id: String,
        #[command(flatten)]
        wait: WaitFor,
    },
    /// Exit 0 if the local node is ready.
    Healthcheck,
}

#[derive(Args, Debug, Default)]
struct EntryFields {
    /// The SPIFFE ID workloads get, e.g. spiffe://prod.example.org/service/metald.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// The agent (or entry) it is nested under.
    #[arg(long)]
    parent_id: Option<String>,
    /// TYPE:KEY:VALUE, repeatable, e.g. unix:uid:1001.
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// X.509-SVID TTL in seconds (0: the node default).
    #[arg(long)]
    x509_svid_ttl: Option<i64>,
    /// JWT-SVID TTL in seconds (0: the node default).
    #[arg(long)]
    jwt_svid_ttl: Option<i64>,
    /// DNS SAN, repeatable.
    #[arg(long = "dns")]
    dns: Vec<String>,
    /// Mark as admin.
    #[arg(long)]
    admin: bool,
    /// Hint passed to workloads.
    #[arg(long)]
    hint: Option<String>,
}

#[derive(Copy, Clone, Debug, ValueEnum, Default)]
enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum EntryCmd {
    /// Create an entry, or with --data every entry of a JSON file.
    Create {
        #[command(flatten)]
        f: EntryFields,
        /// A JSON file of entries to create (SPIRE's `{"entries": [...]}` shape, or this
        /// CLI's `entry show --output json` list); `-` reads standard input.
        #[arg(long, conflicts_with_all = ["spiffe_id", "parent_id", "selectors"])]
        data: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show entries (all, or filtered).
    Show {
        /// One entry by ID.
        #[arg(long)]
        entry_id: Option<String>,
        /// Filter by SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Filter by parent ID.
        #[arg(long)]
        parent_id: Option<String>,
        /// Only entries that have every given selector (TYPE:KEY:VALUE), repeatable.
        #[arg(long = "selector")]
        selectors: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Update an entry: given fields replace the stored ones.
    Update {
        /// Which entry.
        #[arg(long)]
        entry_id: String,
        #[command(flatten)]
        f: EntryFields,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete an entry.
    Delete {
        /// Which entry.
        #[arg(long)]
        entry_id: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Generate a single-use join token.
    Generate {
        /// SPIFFE ID the agent gets (default spiffe://TD/agent/join_token/<token>).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Lifetime in seconds (default: the node's `ttl.join_token`).
        #[arg(long)]
        ttl: Option<i64>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCmd {
    /// List attested agents.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show one agent.
    Show {
        /// Its SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Forget an agent: it must attest again.
    Evict {
        /// Its SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
    /// Ban an agent: refused until evicted.
    Ban {
        /// Its SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
}

#[derive(Copy, Clone, Debug, ValueEnum, Default)]
enum BundleFormat {
    #[default]
    Pem,
    Spiffe,
}

#[derive(Subcommand, Debug)]
enum BundleCmd {
    /// Print the trust bundle.
    Show {
        /// pem (X.509 roots) or spiffe (SPIFFE bundle JWKS).
        #[arg(long, value_enum, default_value_t)]
        format: BundleFormat,
        /// Output format: json prints the SPIFFE bundle (JWKS), as `--format spiffe` (and
        /// SPIRE's `bundle show -output json`) does.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Members, roles, leader, replication.
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Add a node as a learner (`ca-node join` does this by itself).
    Add {
        /// Its Raft ID (unique, never reused).
        #[arg(long)]
        raft_id: u64,
        /// Its node ID.
        #[arg(long)]
        node_id: String,
        /// Its node API address, host:port.
        #[arg(long)]
        addr: String,
    },
    /// Make a learner a voter.
    Promote {
        /// Its Raft ID.
        #[arg(long)]
        raft_id: u64,
    },
    /// Remove a member (it must join again, under a new Raft ID, with a new token).
    Remove {
        /// Its Raft ID.
        #[arg(long)]
        raft_id: u64,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Write a consistent copy of the replicated state (an SQLite database).
    Save {
        /// Where to write it (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Copy this node's state even if it cannot confirm it is current.
        #[arg(long)]
        allow_stale: bool,
    },
    /// Disaster recovery: put a saved copy into the empty data dir of the node configured
    /// in --config, as the state of a new cluster; then `ca-node run` it and join others.
    Restore {
        /// The saved copy.
        #[arg(long)]
        file: PathBuf,
        /// The configuration of the node to restore into.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Args, Debug)]
struct RotateTarget {
    /// The node whose authority to rotate (default: this node).
    #[arg(long = "node", conflicts_with = "all")]
    node: Option<String>,
    /// Every node's.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    wait: WaitFor,
}

/// `--wait`: return only once the cluster's journal shows the new authorities active.
#[derive(clap::Args, Debug, Clone, Copy)]
struct WaitFor {
    /// Return once every replaced authority has an active successor (a line per node as it
    /// happens), or fail after --timeout.
    #[arg(long)]
    wait: bool,
    /// Seconds --wait waits (a JWT key or root activates after rotation.propagation_window).
    #[arg(long, default_value_t = 900, requires = "wait")]
    timeout: u64,
}

/// Waits until, for each `(node, replaced)` of `kind`, `replaced` is no longer active and
/// the node (the cluster, for roots) has another active authority of `kind`; prints a line
/// per node as that happens, and what it waits for.
async fn wait_replaced(
    c: &mut AdminClient<Channel>,
    kind: &str,
    pending: Vec<(String, String)>,
    wait: WaitFor,
) -> Result<(), String> {
    let start = std::time::Instant::now();
    let mut pending = pending;
    let mut told = std::collections::BTreeSet::new();
    loop {
        let auths = c
            .get_ca_status(GetCaStatusRequest {})
            .await
            .map_err(status_msg)?
            .into_inner()
            .authorities;
        pending.retain(|(node, replaced)| {
            let on = if node.is_empty() {
                "the cluster".to_string()
            } else {
                format!("node {node}")
            };
            let mine = |a: &&Authority| a.kind == kind && (kind == "root" || &a.node_id == node);
            let still_active = auths
                .iter()
                .any(|a| &a.id == replaced && a.state == "active");
            let successor = auths
                .iter()
                .filter(mine)
                .find(|a| a.state == "active" && &a.id != replaced);
            match successor {
                Some(s) if !still_active => {
                    println!(
                        "{on}: {kind} {} active (replaced {replaced}) after {} s",
                        s.id,
                        start.elapsed().as_secs()
                    );
                    false
                }
                _ => {
                    if let Some(p) = auths.iter().filter(mine).find(|a| a.state == "prepared") {
                        if told.insert(p.id.clone()) {
                            println!(
                                "{on}: {kind} {} prepared, published; waiting for its activation",
                                p.id
                            );
                        }
                    }
                    true
                }
            }
        });
        if pending.is_empty() {
            return Ok(());
        }
        if start.elapsed().as_secs() >= wait.timeout {
            let who: Vec<String> = pending
                .iter()
                .map(|(n, r)| format!("{} ({r})", if n.is_empty() { "root" } else { n }))
                .collect();
            return Err(format!(
                "timed out after {} s: no active successor yet for {}; a node that is down acts when it is back (`ca-node cluster status`, `ca-node ca show`)",
                wait.timeout,
                who.join(", ")
            ));
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn rotate(
    cli: &Cli,
    kind: &str,
    target: Option<&RotateTarget>,
    root_wait: WaitFor,
) -> Result<(), String> {
    let mut c = admin(cli).await?;
    let r = c
        .rotate_authority(RotateAuthorityRequest {
            kind: kind.into(),
            node_id: target.and_then(|t| t.node.clone()).unwrap_or_default(),
            all: target.is_some_and(|t| t.all),
        })
        .await
        .map_err(status_msg)?
        .into_inner();
    for q in &r.requests {
        let on = if q.node_id.is_empty() {
            "the cluster".to_string()
        } else {
            format!("node {}", q.node_id)
        };
        match kind {
            "intermediate" => println!(
                "Rotation of {on}'s intermediate {} requested: the node signs a new one with the root and activates it as soon as it sees the request (a node that is down does it when it is back).",
                q.replaces
            ),
            "jwt" => println!(
                "Rotation of {on}'s JWT key {} requested: the new key is published in the JWT bundle now and signs after {}s.",
                q.replaces, r.propagation_window
            ),
            _ => println!(
                "Rotation of the root {} requested: the new root is published in the trust bundle now; intermediates are signed by it after {}s; {} leaves the bundle once everything under it has expired.",
                q.replaces, r.propagation_window, q.replaces
            ),
        }
    }
    let wait = target.map(|t| t.wait).unwrap_or(root_wait);
    if !wait.wait {
        println!("Follow it with `ca-node ca show`, or pass --wait.");
        return Ok(());
    }
    let pending = r
        .requests
        .iter()
        .map(|q| (q.node_id.clone(), q.replaces.clone()))
        .collect();
    wait_replaced(&mut c, kind, pending, wait).await
}

async fn revoke(cli: &Cli, kind: &str, id: &str, wait: WaitFor) -> Result<(), String> {
    let mut c = admin(cli).await?;
    let r = c
        .revoke_authority(RevokeAuthorityRequest {
            id: id.into(),
            kind: kind.into(),
        })
        .await
        .map_err(status_msg)?
        .into_inner();
    let a = r.authority.unwrap_or_default();
    println!(
        "Revoked {} {} (node {}): no node signs with or publishes it from now on; agents replace every SVID it signed at their next sync, and node {} gets a new one.",
        a.kind, a.id, a.node_id, a.node_id
    );
    if !wait.wait {
        return Ok(());
    }
    wait_replaced(&mut c, kind, vec![(a.node_id.clone(), a.id.clone())], wait).await
}

#[derive(Subcommand, Debug)]
enum CaCmd {
    /// Every authority in the CA journal.
    Show {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// A tonic channel over a Unix socket.
pub async fn uds_channel(path: &Path) -> Result<Channel, String> {
    let p = path.to_path_buf();
    if !p.exists() {
        return Err(format!(
            "cannot connect to {}: no such socket; is the node running? Set --socket-path or CA_NODE_ADMIN_SOCKET",
            p.display()
        ));
    }
    // Whoever answers on it gets this command's requests (and is believed): only a socket
    // no other user could have put there.
    ca_identity::unix_socket::check_socket(&p, nix::unistd::geteuid().as_raw())
        .map_err(|e| format!("refusing the admin socket: {e}"))?;
    Endpoint::try_from("http://[::]:50051")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .map_err(|e| {
            format!(
                "cannot connect to {}: {e}; is the node running? (the socket exists but nothing answers on it)",
                path.display()
            )
        })
}

fn status_msg(s: tonic::Status) -> String {
    let hint = match s.code() {
        tonic::Code::Unavailable => " (is the node running?)",
        _ => "",
    };
    format!("{}{hint}", s.message())
}

/// Entries from a JSON file: SPIRE's `{"entries": [...]}` (its `spiffe_id` and
/// `parent_id` as strings or as `{"trust_domain", "path"}`, selectors as `{"type",
/// "value"}`) or a list as `entry show --output json` prints it (selectors as
/// `"type:value"`). Each entry's problem is reported with its position.
fn entries_from_file(path: &Path) -> Result<Vec<types::Entry>, String> {
    let text = if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| format!("cannot read entries from standard input: {e}"))?;
        s
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let list = match &v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => match o.get("entries") {
            Some(serde_json::Value::Array(a)) => a,
            _ => {
                return Err(format!(
                    "{}: expected {{\"entries\": [...]}} or a list of entries",
                    path.display()
                ))
            }
        },
        _ => {
            return Err(format!(
                "{}: expected {{\"entries\": [...]}} or a list of entries",
                path.display()
            ))
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            entry_from_json(e).map_err(|why| format!("{}: entry {}: {why}", path.display(), i + 1))
        })
        .collect()
}

fn entry_from_json(v: &serde_json::Value) -> Result<types::Entry, String> {
    let id = |key: &str| -> Result<String, String> {
        match v.get(key) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(serde_json::Value::Object(o)) => {
                let td = o
                    .get("trust_domain")
                    .and_then(|t| t.as_str())
                    .unwrap_or_default();
                let path = o.get("path").and_then(|p| p.as_str()).unwrap_or_default();
                Ok(format!("spiffe://{td}{path}"))
            }
            _ => Err(format!("needs \"{key}\"")),
        }
    };
    let int = |key: &str| v.get(key).and_then(|t| t.as_i64()).unwrap_or(0);
    let strings = |key: &str| -> Vec<String> {
        v.get(key)
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut selectors = Vec::new();
    for s in v
        .get("selectors")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
    {
        let (kind, value) = match s {
            serde_json::Value::String(text) => text
                .split_once(':')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("selector {text:?}: use TYPE:KEY:VALUE"))?,
            serde_json::Value::Object(o) => (
                o.get("type")
                    .and_then(|t| t.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                o.get("value")
                    .and_then(|t| t.as_str())
                    .unwrap_or_default()
                    .to_owned(),
            ),
            other => return Err(format!("selector {other}: use {{\"type\", \"value\"}}")),
        };
        selectors.push(types::Selector {
            r#type: kind,
            value,
        });
    }
    if selectors.is_empty() {
        return Err("needs at least one selector".into());
    }
    Ok(types::Entry {
        spiffe_id: id("spiffe_id")?,
        parent_id: id("parent_id")?,
        selectors,
        x509_svid_ttl: int("x509_svid_ttl"),
        jwt_svid_ttl: int("jwt_svid_ttl"),
        dns_names: strings("dns_names"),
        admin: v.get("admin").and_then(|a| a.as_bool()).unwrap_or(false),
        hint: v
            .get("hint")
            .and_then(|h| h.as_str())
            .unwrap_or_default()
            .to_owned(),
        ..Default::default()
    })
}

fn fields_to_entry(f: &EntryFields, base: types::Entry) -> Result<types::Entry, String> {
    let mut e = base;
    if let Some(s) = &f.spiffe_id {
        e.spiffe_id = s.clone();
    }
    if let Some(s) = &f.parent_id {
        e.parent_id = s.clone();
    }
    if !f.selectors.is_empty() {
        e.selectors = f
            .selectors
            .iter()
            .map(|s| {
                ca_identity::Selector::parse(s)
                    .map(|sel| types::Selector {
                        r#type: sel.kind,
                        value: sel.value,
                    })
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(t) = f.x509_svid_ttl {
        e.x509_svid_ttl = t;
    }
    if let Some(t) = f.jwt_svid_ttl {
        e.jwt_svid_ttl = t;
    }
    if !f.dns.is_empty() {
        e.dns_names = f.dns.clone();
    }
    if f.admin {
        e.admin = true;
    }
    if let Some(h) = &f.hint {
        e.hint = h.clone();
    }
    Ok(e)
}

fn print_entries(entries: &[types::Entry], output: Output) {
    match output {
        Output::Json => {
            let v: Vec<serde_json::Value> = entries
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "id": e.id, "spiffe_id": e.spiffe_id, "parent_id": e.parent_id,
                        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
                        "x509_svid_ttl": e.x509_svid_ttl, "jwt_svid_ttl": e.jwt_svid_ttl,
                        "dns_names": e.dns_names, "admin": e.admin, "hint": e.hint,
                        "created_at": e.created_at, "revision": e.revision,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        }
        Output::Text => {
            println!(
                "Found {} entr{}",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" }
            );
            for e in entries {
                println!("Entry ID         : {}", e.id);
                println!("SPIFFE ID        : {}", e.spiffe_id);
                println!("Parent ID        : {}", e.parent_id);
                println!("Revision         : {}", e.revision);
                println!(
                    "X509-SVID TTL    : {}",
                    if e.x509_svid_ttl == 0 {
                        "default".into()
                    } else {
                        e.x509_svid_ttl.to_string()
                    }
                );
                println!(
                    "JWT-SVID TTL     : {}",
                    if e.jwt_svid_ttl == 0 {
                        "default".into()
                    } else {
                        e.jwt_svid_ttl.to_string()
                    }
                );
                for s in &e.selectors {
                    println!("Selector         : {}:{}", s.r#type, s.value);
                }
                for d in &e.dns_names {
                    println!("DNS name         : {d}");
                }
                if e.admin {
                    println!("Admin            : true");
                }
                if !e.hint.is_empty() {
                    println!("Hint             : {}", e.hint);
                }
                println!();
            }
        }
    }
}

fn agent_json(a: &types::Agent) -> serde_json::Value {
    serde_json::json!({
        "spiffe_id": a.spiffe_id, "attestation_type": a.attestation_type,
        "x509_svid_expires_at": a.x509_svid_expires_at, "x509_svid_serial": a.x509_svid_serial,
        "banned": a.banned,
    })
}

fn print_agent(a: &types::Agent) {
    println!("SPIFFE ID         : {}", a.spiffe_id);
    println!("Attestation type  : {}", a.attestation_type);
    println!("Expiration time   : {}", fmt_time(a.x509_svid_expires_at));
    println!("Serial number     : {}", a.x509_svid_serial);
    println!("Banned            : {}", a.banned);
    println!();
}

fn fmt_time(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

fn print_cluster_status(r: &ClusterStatusResponse, output: Output) {
    match output {
        Output::Json => {
            let v = serde_json::json!({
                "raft_id": r.raft_id, "node_id": r.node_id, "role": r.role,
                "leader_id": (r.leader_id != 0).then_some(r.leader_id), "term": r.term,
                "last_log_index": r.last_log_index, "last_applied_index": r.last_applied_index,
                "snapshot_index": r.snapshot_index, "joint": r.joint,
                "millis_since_quorum_ack": (r.millis_since_quorum_ack >= 0).then_some(r.millis_since_quorum_ack),
                "members": r.members.iter().map(|m| serde_json::json!({
                    "raft_id": m.raft_id, "node_id": m.node_id, "addr": m.addr, "voter": m.voter,
                    "matched_index": m.has_replication.then_some(m.matched_index),
                    "lag": m.has_replication.then_some(m.lag),
                })).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        }
        Output::Text => {
            println!(
                "This node: raft id {} ({}), {}, term {}",
                r.raft_id, r.node_id, r.role, r.term
            );
            println!(
                "Leader: {}",
                if r.leader_id == 0 {
                    "unknown".to_string()
                } else {
                    r.leader_id.to_string()
                }
            );
            println!(
                "Log: last index {}, applied {}, snapshot {}{}",
                r.last_log_index,
                r.last_applied_index,
                r.snapshot_index,
                if r.joint {
                    " (membership change in progress)"
                } else {
                    ""
                }
            );
            println!(
                "{:<8} {:<16} {:<24} {:<8} {:>8} {:>6}",
                "RAFT ID", "NODE", "ADDRESS", "ROLE", "MATCHED", "LAG"
            );
            for m in &r.members {
                let (matched, lag) = if m.has_replication {
                    (m.matched_index.to_string(), m.lag.to_string())
                } else {
                    ("-".into(), "-".into())
                };
                println!(
                    "{:<8} {:<16} {:<24} {:<8} {:>8} {:>6}",
                    m.raft_id,
                    m.node_id,
                    m.addr,
                    if m.voter { "voter" } else { "learner" },
                    matched,
                    lag
                );
            }
        }
    }
}

/// The largest admin API answer the CLI accepts. The CLI lists in pages of
/// [`LIST_PAGE_SIZE`]; other callers (the benchmark's check of 100 000s of entries) may ask
/// for everything in one answer, which exceeds gRPC's default 4 MiB.
pub const ADMIN_MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Entries or agents per page when the CLI lists them.
const LIST_PAGE_SIZE: i32 = 1000;

/// Every item of a paged admin listing: `page(token)` fetches one page (items and the next
/// page's token, empty after the last), starting with an empty token.
async fn all_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, String>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await.map_err(status_msg)?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

/// Free space in the data dir's file system after which a node stopped by a storage
/// failure starts again by itself.
pub const ROOM_TO_RESTART: u64 = 16 << 20;

/// What `init` and `join` do once the node is a member.
#[derive(Args, Debug)]
struct AfterBootstrap {
    /// Return once done (the node is a member and ready) instead of serving on: for
    /// systemd, which then runs `ca-node run` with the same config.
    #[arg(long)]
    no_serve: bool,
}

impl AfterBootstrap {
    /// Serves `node` until a signal, or with `--no-serve` stops it once it is ready.
    async fn serve(&self, node: ca_node::NodeHandle, config: &Path) -> Result<(), String> {
        if self.no_serve {
            return stop_when_ready(node).await;
        }
        run_until_signal(node, config).await
    }
}

/// `init`/`join --no-serve`: waits until the node is ready (its CA can mint), then stops it
/// cleanly.
async fn stop_when_ready(node: ca_node::NodeHandle) -> Result<(), String> {
    let ready = tokio::select! {
        r = node.wait_ready(std::time::Duration::from_secs(120)) => r,
        _ = wait_for_signal() => Err("interrupted".into()),
    };
    node.shutdown().await;
    match ready {
        Ok(()) => {
            println!("Stopped (--no-serve): start the node with `ca-node run` (systemctl start ca-node).");
            Ok(())
        }
        Err(why) => Err(format!(
            "the node is a member but was not ready within 120 s ({why}); start it with `ca-node run` and watch `ca-node healthcheck`"
        )),
    }
}

/// Keeps `node` running until SIGINT/SIGTERM, then stops it. If it fails for good instead
/// (its Raft log or state cannot be written: a full disk), it stops serving, waits until
/// its data dir has [`ROOM_TO_RESTART`] free, then starts again as `ca-node run --config
/// CONFIG` in this same process (exec), recovering from its log like any restart; a
/// signal while it waits ends it with the failure.
async fn run_until_signal(node: ca_node::NodeHandle, config: &Path) -> Result<(), String> {
    let failed = node.failure();
    ca_identity::systemd::notify("READY=1\nSTATUS=serving");
    let why = tokio::select! {
        _ = wait_for_signal() => {
            tracing::info!("shutting down");
            ca_identity::systemd::notify("STOPPING=1");
            node.shutdown().await;
            return Ok(());
        }
        why = failed => why,
    };
    let data_dir = node.core.config().data_dir.clone();
    node.shutdown().await;
    tracing::error!(data_dir = %data_dir.display(), "stopped: waiting for {} MiB free to start again", ROOM_TO_RESTART >> 20);
    let room = async {
        loop {
            if ca_node::node::free_bytes(&data_dir).is_some_and(|b| b >= ROOM_TO_RESTART) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        _ = wait_for_signal() => return Err(why),
        _ = room => {}
    }
    tracing::warn!("the data dir has room again: starting again from the log");
    let exe = std::env::current_exe().map_err(|e| format!("{why}; cannot restart: {e}"))?;
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(config)
        .exec();
    Err(format!("{why}; cannot restart: {err}"))
}

async fn admin(cli: &Cli) -> Result<AdminClient<Channel>, String> {
    Ok(AdminClient::new(uds_channel(&cli.socket_path).await?)
        .max_decoding_message_size(ADMIN_MAX_MESSAGE_BYTES))
}

async fn run_cli(cli: Cli) -> Result<(), String> {
    match &cli.cmd {
        Cmd::Run { config } => {
            let cfg = ca_node::NodeConfig::load(config).map_err(|e| e.to_string())?;
            ca_identity::logging::init(&cfg.log_level, &cli.log_format);
            let node = ca_node::start(cfg).await.map_err(|e| e.to_string())?;
            run_until_signal(node, config).await
        }
        Cmd::Init { config, then } => {
            let cfg = ca_node::NodeConfig::load(config).map_err(|e| e.to_string())?;
            ca_identity::logging::init(&cfg.log_level, &cli.log_format);
            let node = ca_node::node::start_with(cfg, ca_node::node::Bootstrap::Init)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "Initialized a new cluster: this node (raft id {}) is its only member. Create join tokens with `ca-node token generate --spiffe-id spiffe://{}/ca-node/<node id>`.",
                node.core.config().raft_id, node.core.config().trust_domain
            );
            then.serve(node, config).await
        }
        Cmd::Join {
            config,
            peer,
            token,
            token_file,
            bundle,
            learner,
            timeout,
            then,
        } => {
            let cfg = ca_node::NodeConfig::load(config).map_err(|e| e.to_string())?;
            ca_identity::logging::init(&cfg.log_level, &cli.log_format);
            let token = match (token, token_file) {
                (Some(t), None) => t.trim().to_owned(),
                (None, Some(f)) => ca_identity::private_file::read(f, "--token-file")?
                    .trim()
                    .to_owned(),
                _ => return Err(
                    "join needs exactly one of --token (or CA_NODE_JOIN_TOKEN) and --token-file"
                        .into(),
                ),
            };
            let bundle_pem = std::fs::read_to_string(bundle)
                .map_err(|e| format!("cannot read {}: {e}", bundle.display()))?;
            let joining = ca_node::bootstrap::join(
                cfg,
                ca_node::bootstrap::JoinOptions {
                    peer: peer.clone(),
                    token,
                    bundle_pem,
                    promote: !learner,
                    timeout: std::time::Duration::from_secs(*timeout),
                },
            );
            // SIGINT/SIGTERM during the join stop it cleanly (the data dir is crash-safe
            // either way): the token may be consumed already, so the message says what next.
            let node = tokio::select! {
                r = joining => r.map_err(|e| e.to_string())?,
                _ = wait_for_signal() => return Err(
                    "interrupted during the join: start the node with `ca-node run` if it was already added (`ca-node cluster status` on a member shows it), or run the join again with a new token".into()
                ),
            };
            println!(
                "Joined the cluster as raft id {} ({}).",
                node.core.config().raft_id,
                if *learner { "learner" } else { "voter" }
            );
            then.serve(node, config).await
        }
        Cmd::Dev { dir, nodes } => {
            ca_identity::logging::init("info", &cli.log_format);
            ca_dev::run(dir, *nodes).await.map_err(|e| e.to_string())
        }
        Cmd::Cluster(cmd) => {
            let mut c = admin(&cli).await?;
            match cmd {
                ClusterCmd::Status { output } => {
                    let r = c
                        .cluster_status(ClusterStatusRequest {})
                        .await
                        .map_err(status_msg)?
                        .into_inner();
                    print_cluster_status(&r, *output);
                }
                ClusterCmd::Add {
                    raft_id,
                    node_id,
                    addr,
                } => {
                    let r = c
                        .add_member(AddMemberRequest {
                            raft_id: *raft_id,
                            node_id: node_id.clone(),
                            addr: addr.clone(),
                        })
                        .await
                        .map_err(status_msg)?
                        .into_inner();
                    println!(
                        "Added raft id {raft_id} as a learner (log index {})",
                        r.log_index
                    );
                }
                ClusterCmd::Promote { raft_id } => {
                    let r = c
                        .promote_member(PromoteMemberRequest { raft_id: *raft_id })
                        .await
                        .map_err(status_msg)?
                        .into_inner();
                    println!(
                        "Promoted raft id {raft_id} to voter (log index {})",
                        r.log_index
                    );
                }
                ClusterCmd::Remove { raft_id } => {
                    let r = c
                        .remove_member(RemoveMemberRequest { raft_id: *raft_id })
                        .await
                        .map_err(status_msg)?
                        .into_inner();
                    println!("Removed raft id {raft_id} (log index {})", r.log_index);
                }
            }
            Ok(())
        }
        Cmd::Snapshot(SnapshotCmd::Save { out, allow_stale }) => {
            if out.exists() {
                return Err(format!("{} exists already", out.display()));
            }
            let mut c = admin(&cli).await?;
            let mut stream = c
                .save_snapshot(SaveSnapshotRequest {
                    allow_stale: *allow_stale,
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            let mut data = Vec::new();
            let mut applied = 0;
            while let Some(chunk) = stream.message().await.map_err(status_msg)? {
                if chunk.applied_index > 0 {
                    applied = chunk.applied_index;
                }
                data.extend_from_slice(&chunk.data);
            }
            ca_node::registry::write_private(out, &data).map_err(|e| e.to_string())?;
            println!(
                "Saved the state up to log index {applied} to {} ({} bytes)",
                out.display(),
                data.len()
            );
            Ok(())
        }
        Cmd::Snapshot(SnapshotCmd::Restore { file, config }) => {
            let cfg = ca_node::NodeConfig::load(config).map_err(|e| e.to_string())?;
            let r = ca_node::backup::restore(file, &cfg.data_dir)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "Restored the state up to log index {} into {} as a new cluster ({} intermediate/JWT keys retired, {} old ca-node identities forgotten).",
                r.applied_index,
                cfg.data_dir.display(),
                r.retired_authorities,
                r.forgotten_nodes
            );
            println!(
                "Start it with `ca-node run --config {}`; with software keys, copy the old root's key file into its key directory first. Other nodes join it with new tokens.",
                config.display()
            );
            Ok(())
        }
        Cmd::Entry(cmd) => {
            let mut c = admin(&cli).await?;
            match cmd {
                EntryCmd::Create {
                    f,
                    data: Some(path),
                    output,
                } => {
                    let entries = entries_from_file(path)?
                        .into_iter()
                        .map(|e| fields_to_entry(f, e))
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut created = Vec::new();
                    let mut failed = Vec::new();
                    let max = ca_node::admin_api::MAX_BATCH_ENTRIES;
                    for (k, batch) in entries.chunks(max).enumerate() {
                        let r = c
                            .batch_create_entries(BatchCreateEntriesRequest {
                                entries: batch.to_vec(),
                            })
                            .await
                            .map_err(status_msg)?
                            .into_inner();
                        for (j, (e, res)) in batch.iter().zip(r.results).enumerate() {
                            if res.code == 0 {
                                created.extend(res.entry);
                            } else {
                                let code = tonic::Code::from_i32(res.code);
                                failed.push(format!(
                                    "entry {} ({}): {}",
                                    k * max + j + 1,
                                    e.spiffe_id,
                                    status_msg(tonic::Status::new(code, res.message))
                                ));
                            }
                        }
                    }
                    print_entries(&created, *output);
                    if !failed.is_empty() {
                        return Err(format!(
                            "{} of {} entries not created (the others were):\n  {}",
                            failed.len(),
                            failed.len() + created.len(),
                            failed.join("\n  ")
                        ));
                    }
                }
                EntryCmd::Create {
                    f,
                    data: None,
                    output,
                } => {
                    if f.spiffe_id.is_none() || f.parent_id.is_none() || f.selectors.is_empty() {
                        return Err("entry create needs --spiffe-id, --parent-id and at least one --selector".into());
                    }
                    let e = fields_to_entry(f, types::Entry::default())?;
                    let r = c
                        .create_entry(CreateEntryRequest { entry: Some(e) })
                        .await
                        .map_err(status_msg)?;
                    print_entries(
                        &r.into_inner().entry.into_iter().collect::<Vec<_>>(),
                        *output,
                    );
                }
                EntryCmd::Show {
                    entry_id,
                    spiffe_id,
                    parent_id,
                    selectors,
                    output,
                } => {
                    let want: Vec<(String, String)> = selectors
                        .iter()
                        .map(|s| {
                            ca_identity::Selector::parse(s)
                                .map(|sel| (sel.kind, sel.value))
                                .map_err(|e| format!("--selector {s:?}: {e}"))
                        })
                        .collect::<Result<_, _>>()?;
                    let entries = if let Some(id) = entry_id {
                        vec![c
                            .get_entry(GetEntryRequest { id: id.clone() })
                            .await
                            .map_err(status_msg)?
                            .into_inner()
                            .entry
                            .unwrap_or_default()]
                    } else {
                        let (spiffe_id, parent_id) = (
                            spiffe_id.clone().unwrap_or_default(),
                            parent_id.clone().unwrap_or_default(),
                        );
                        all_pages(|page_token| {
                            let mut c = c.clone();
                            let req = ListEntriesRequest {
                                spiffe_id: spiffe_id.clone(),
                                parent_id: parent_id.clone(),
                                page_size: LIST_PAGE_SIZE,
                                page_token,
                            };
                            async move {
                                let page = c.list_entries(req).await?.into_inner();
                                Ok((page.entries, page.next_page_token))
                            }
                        })
                        .await?
                    };
                    let entries: Vec<types::Entry> = entries
                        .into_iter()
                        .filter(|e| {
                            want.iter().all(|(k, v)| {
                                e.selectors.iter().any(|s| &s.r#type == k && &s.value == v)
                            })
                        })
                        .collect();
                    print_entries(&entries, *output);
                }
                EntryCmd::Update {
                    entry_id,
                    f,
                    output,
                } => {
                    let cur = c
                        .get_entry(GetEntryRequest {
                            id: entry_id.clone(),
                        })
                        .await
                        .map_err(status_msg)?
                        .into_inner()
                        .entry
                        .unwrap_or_default();
                    let e = fields_to_entry(f, cur)?;
                    let r = c
                        .update_entry(UpdateEntryRequest { entry: Some(e) })
                        .await
                        .map_err(status_msg)?;
                    print_entries(
                        &r.into_inner().entry.into_iter().collect::<Vec<_>>(),
                        *output,
                    );
                }
                EntryCmd::Delete { entry_id } => {
                    c.delete_entry(DeleteEntryRequest {
                        id: entry_id.clone(),
                    })
                    .await
                    .map_err(status_msg)?;
                    println!("Deleted entry {entry_id}");
                }
            }
            Ok(())
        }
        Cmd::Token(TokenCmd::Generate {
            spiffe_id,
            ttl,
            output,
        }) => {
            let mut c = admin(&cli).await?;
            let r = c
                .create_join_token(CreateJoinTokenRequest {
                    spiffe_id: spiffe_id.clone().unwrap_or_default(),
                    ttl_seconds: ttl.unwrap_or(0), // 0: the node's configured default
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            if let Output::Json = output {
                let v = serde_json::json!({
                    "token": r.token, "spiffe_id": r.spiffe_id, "expires_at": r.expires_at,
                });
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
                return Ok(());
            }
            println!("Token: {}", r.token);
            println!("SPIFFE ID: {}", r.spiffe_id);
            println!("Expires: {}", fmt_time(r.expires_at));
            Ok(())
        }
        Cmd::Agent(cmd) => {
            let mut c = admin(&cli).await?;
            match cmd {
                AgentCmd::List { output } => {
                    let agents = all_pages(|page_token| {
                        let mut c = c.clone();
                        async move {
                            let page = c
                                .list_agents(ListAgentsRequest {
                                    page_size: LIST_PAGE_SIZE,
                                    page_token,
                                })
                                .await?
                                .into_inner();
                            Ok((page.agents, page.next_page_token))
                        }
                    })
                    .await?;
                    if let Output::Json = output {
                        let v: Vec<_> = agents.iter().map(agent_json).collect();
                        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
                        return Ok(());
                    }
                    println!(
                        "Found {} attested agent{}:\n",
                        agents.len(),
                        if agents.len() == 1 { "" } else { "s" }
                    );
                    agents.iter().for_each(print_agent);
                }
                AgentCmd::Show { spiffe_id, output } => {
                    let a = c
                        .get_agent(GetAgentRequest {
                            spiffe_id: spiffe_id.clone(),
                        })
                        .await
                        .map_err(status_msg)?
                        .into_inner();
                    let a = a.agent.unwrap_or_default();
                    match output {
                        Output::Json => println!(
                            "{}",
                            serde_json::to_string_pretty(&agent_json(&a)).expect("json")
                        ),
                        Output::Text => print_agent(&a),
                    }
                }
                AgentCmd::Evict { spiffe_id } => {
                    c.evict_agent(EvictAgentRequest {
                        spiffe_id: spiffe_id.clone(),
                    })
                    .await
                    .map_err(status_msg)?;
                    println!("Agent evicted successfully");
                }
                AgentCmd::Ban { spiffe_id } => {
                    c.ban_agent(BanAgentRequest {
                        spiffe_id: spiffe_id.clone(),
                    })
                    .await
                    .map_err(status_msg)?;
                    println!("Agent banned successfully");
                }
            }
            Ok(())
        }
        Cmd::Bundle(BundleCmd::Show { format, output }) => {
            let mut c = admin(&cli).await?;
            let r = c
                .get_bundle(GetBundleRequest {})
                .await
                .map_err(status_msg)?
                .into_inner();
            match (output, format) {
                (Output::Json, _) | (_, BundleFormat::Spiffe) => {
                    println!("{}", r.spiffe_bundle_json)
                }
                (_, BundleFormat::Pem) => print!("{}", r.pem),
            }
            Ok(())
        }
        Cmd::Ca(CaCmd::Show { output }) => {
            let mut c = admin(&cli).await?;
            let r = c
                .get_ca_status(GetCaStatusRequest {})
                .await
                .map_err(status_msg)?
                .into_inner();
            if let Output::Json = output {
                let v = serde_json::json!({
                    "trust_domain": r.trust_domain, "node_id": r.node_id,
                    "authorities": r.authorities.iter().map(|a| serde_json::json!({
                        "id": a.id, "kind": a.kind, "state": a.state,
                        "node_id": (!a.node_id.is_empty()).then_some(&a.node_id),
                        "key_id": a.key_id, "key_backend": a.key_backend,
                        "not_before": a.not_before, "not_after": a.not_after,
                        "approx_valid_svids": (a.approx_valid_svids >= 0).then_some(a.approx_valid_svids),
                    })).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
                return Ok(());
            }
            println!(
                "Trust domain: {}   (this node: {})",
                r.trust_domain, r.node_id
            );
            println!(
                "{:<30} {:<13} {:<9} {:<8} {:<30} {:<8} {:<21} ~VALID SVIDS",
                "ID", "KIND", "STATE", "NODE", "KEY ID", "BACKEND", "NOT AFTER"
            );
            for a in &r.authorities {
                let count = if a.approx_valid_svids < 0 {
                    "? (node unreachable)".to_string()
                } else {
                    a.approx_valid_svids.to_string()
                };
                println!(
                    "{:<30} {:<13} {:<9} {:<8} {:<30} {:<8} {:<21} {}",
                    a.id,
                    a.kind,
                    a.state,
                    if a.node_id.is_empty() {
                        "-"
                    } else {
                        &a.node_id
                    },
                    a.key_id,
                    a.key_backend,
                    fmt_time(a.not_after),
                    count
                );
            }
            println!(
                "~VALID SVIDS is approximate: each node counts the unexpired SVIDs it signed in memory since it started (for a root: its unexpired intermediates)."
            );
            Ok(())
        }
        Cmd::RotateIntermediate(t) => rotate(&cli, "intermediate", Some(t), t.wait).await,
        Cmd::RotateJwtKey(t) => rotate(&cli, "jwt", Some(t), t.wait).await,
        Cmd::RotateRoot(w) => rotate(&cli, "root", None, *w).await,
        Cmd::RevokeIntermediate { id, wait } => revoke(&cli, "intermediate", id, *wait).await,
        Cmd::RevokeJwtKey { id, wait } => revoke(&cli, "jwt", id, *wait).await,
        Cmd::Healthcheck => {
            let mut c = admin(&cli).await?;
            let r = c
                .health(HealthRequest {})
                .await
                .map_err(status_msg)?
                .into_inner();
            if r.ready {
                println!("Server is healthy: {}", r.detail);
                Ok(())
            } else {
                Err(format!("Server is unhealthy: {}", r.detail))
            }
        }
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    if let Some(hint) = ca_identity::spire_flags::hint_for_this_process() {
        eprintln!("error: {hint}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    // No core dumps and no ptrace by other processes of the same user: this process holds
    // private keys (and join tokens) in memory.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("warning: cannot disable core dumps (PR_SET_DUMPABLE): {e}");
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run_cli(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
