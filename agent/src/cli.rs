//! The `agent` command line:
//!
//! - `agent run --config FILE`: run the agent until SIGINT/SIGTERM.
//! - `agent api fetch x509 [--socket-path P] [--write DIR]`: show (and write) this
//!   process's X.509-SVIDs.
//! - `agent api fetch jwt --audience A [--spiffe-id ID] [--socket-path P]`.
//! - `agent api validate jwt --audience A --svid TOKEN [--socket-path P]`.
//! - `agent healthcheck [--socket-path P]`: exit 0 when the agent answers.
//!
//! The socket defaults to `SPIFFE_ENDPOINT_SOCKET` (`unix:///path` or a path), else
//! `/run/spiffe-agent/agent.sock`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::workload_client::{connect, resolve_socket_path};
use crate::{AgentConfig, Error};

/// How long a client command waits for the agent's first answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// The SPIFFE agent.
#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    about = "SPIFFE agent: node attestation, SVID cache and the Workload API"
)]
pub struct Cli {
    /// How `run` writes its logs: text, or one JSON object per line.
    #[arg(long, global = true, default_value = "text", value_parser = ca_identity::logging::LOG_FORMATS)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// The TOML configuration file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Talk to a running agent through the Workload API.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Exit 0 if the agent answers on the Workload API socket.
    Healthcheck(SocketArg),
}

#[derive(Debug, Args)]
struct SocketArg {
    /// The Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET, else /run/spiffe-agent/agent.sock).
    #[arg(long, value_name = "PATH")]
    socket_path: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ApiCommand {
    /// Fetch SVIDs.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validate an SVID.
    #[command(subcommand)]
    Validate(ValidateCommand),
}

#[derive(Debug, Subcommand)]
enum FetchCommand {
    /// Fetch this process's X.509-SVIDs.
    X509 {
        #[command(flatten)]
        socket: SocketArg,
        /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
    /// Fetch a JWT-SVID.
    Jwt {
        #[command(flatten)]
        socket: SocketArg,
        /// Audience (repeat for several).
        #[arg(long, short = 'a', required = true)]
        audience: Vec<String>,
        /// Which of this process's SPIFFE IDs (default: all).
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ValidateCommand {
    /// Validate a JWT-SVID.
    Jwt {
        #[command(flatten)]
        socket: SocketArg,
        /// The audience the token must carry.
        #[arg(long, short = 'a')]
        audience: String,
        /// The token.
        #[arg(long)]
        svid: String,
    },
}

/// Parses the command line, runs the command, and returns the exit code.
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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Run { config } => run_agent(&config, &cli.log_format).await,
        Command::Api(ApiCommand::Fetch(FetchCommand::X509 { socket, write })) => {
            fetch_x509(socket.socket_path.as_deref(), write.as_deref()).await
        }
        Command::Api(ApiCommand::Fetch(FetchCommand::Jwt {
            socket,
            audience,
            spiffe_id,
        })) => fetch_jwt(socket.socket_path.as_deref(), audience, spiffe_id).await,
        Command::Api(ApiCommand::Validate(ValidateCommand::Jwt {
            socket,
            audience,
            svid,
        })) => validate_jwt(socket.socket_path.as_deref(), audience, svid).await,
        Command::Healthcheck(socket) => healthcheck(socket.socket_path.as_deref()).await,
    }
}

async fn run_agent(config_path: &Path, log_format: &str) -> Result<(), Error> {
    let config = AgentConfig::load(config_path)?;
    ca_identity::logging::init(&config.log_level, log_format);
    let mut agent = crate::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Io {
            context: "cannot install the SIGTERM handler".into(),
            source: e,
        })?;
    ca_identity::systemd::notify("READY=1\nSTATUS=Workload API listening");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        r = agent.wait() => {
            r?;
            return Err(Error::WorkloadApi("the Workload API server stopped unexpectedly".into()));
        }
    }
    ca_identity::systemd::notify("STOPPING=1");
    agent.shutdown().await
}

fn status_error(what: &str, s: tonic::Status) -> Error {
    let hint = match s.code() {
        tonic::Code::PermissionDenied => {
            " (register an entry whose selectors match this process, e.g. unix:uid:<your uid>)"
        }
        tonic::Code::Unavailable => " (is the agent running and connected to the CA?)",
        _ => "",
    };
    Error::WorkloadApi(format!("{what}: {}{hint}", s.message()))
}

async fn with_timeout<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(CLIENT_TIMEOUT, f).await.map_err(|_| {
        Error::WorkloadApi(format!(
            "{what}: no answer within {}s (the agent may still be syncing with the CA)",
            CLIENT_TIMEOUT.as_secs()
        ))
    })?
}

fn fmt_time(unix: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string());
    let left = unix - ca_identity::unix_now();
    let span = |s: i64| {
        if s >= 3600 {
            format!("{}h{}m", s / 3600, (s % 3600) / 60)
        } else {
            format!("{}m{}s", s / 60, s % 60)
        }
    };
    if left >= 0 {
        format!("{t} (in {})", span(left))
    } else {
        format!("{t} ({} ago)", span(-left))
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io("cannot create", path, e))?;
    f.write_all(data)
        .map_err(|e| Error::io("cannot write", path, e))
}

fn pem_certs(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
        .collect()
}

async fn fetch_x509(socket: Option<&Path>, write: Option<&Path>) -> Result<(), Error> {
    let path = resolve_socket_path(socket)?;
    let resp = with_timeout("fetch x509", async {
        let mut client = connect(&path).await?;
        let mut stream = client
            .fetch_x509svid(ca_proto::workload::X509svidRequest {})
            .await
            .map_err(|s| status_error("fetch x509", s))?
            .into_inner();
        stream
            .message()
            .await
            .map_err(|s| status_error("fetch x509", s))?
            .ok_or_else(|| Error::WorkloadApi("fetch x509: the agent closed the stream".into()))
    })
    .await?;
    if let Some(dir) = write {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    }
    println!("Received {} svid(s)", resp.svids.len());
    for (i, svid) in resp.svids.iter().enumerate() {
        let chain = ca_identity::x509::split_concatenated_der(&svid.x509_svid)?;
        let bundle = ca_identity::x509::split_concatenated_der(&svid.bundle)?;
        let leaf = ca_identity::x509::cert_info(&chain[0])?;
        println!();
        println!("SPIFFE ID:\t\t{}", svid.spiffe_id);
        if !svid.hint.is_empty() {
            println!("Hint:\t\t\t{}", svid.hint);
        }
        println!("SVID Valid After:\t{}", fmt_time(leaf.not_before));
        println!("SVID Valid Until:\t{}", fmt_time(leaf.not_after));
        println!("Serial:\t\t\t{}", leaf.serial_hex);
        for (n, c) in chain.iter().enumerate().skip(1) {
            let info = ca_identity::x509::cert_info(c)?;
            println!(
                "Intermediate #{n} Valid Until:\t{}",
                fmt_time(info.not_after)
            );
        }
        println!("CA bundle:\t\t{} root(s)", bundle.len());
        if let Some(dir) = write {
            let svid_path = dir.join(format!("svid.{i}.pem"));
            let key_path = dir.join(format!("svid.{i}.key"));
            let bundle_path = dir.join(format!("bundle.{i}.pem"));
            write_file(&svid_path, pem_certs(&chain).as_bytes(), 0o644)?;
            let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", svid.x509_svid_key.clone()));
            write_file(&key_path, key_pem.as_bytes(), 0o600)?;
            write_file(&bundle_path, pem_certs(&bundle).as_bytes(), 0o644)?;
            println!("Writing SVID #{i} to file {}.", svid_path.display());
            println!("Writing key #{i} to file {}.", key_path.display());
            println!("Writing bundle #{i} to file {}.", bundle_path.display());
        }
    }
    Ok(())
}

async fn fetch_jwt(
    socket: Option<&Path>,
    audience: Vec<String>,
    spiffe_id: Option<String>,
) -> Result<(), Error> {
    let path = resolve_socket_path(socket)?;
    let resp = with_timeout("fetch jwt", async {
        let mut client = connect(&path).await?;
        client
            .fetch_jwtsvid(ca_proto::workload::JwtsvidRequest {
                audience,
                spiffe_id: spiffe_id.unwrap_or_default(),
            })
            .await
            .map_err(|s| status_error("fetch jwt", s))
    })
    .await?
    .into_inner();
    for s in resp.svids {
        println!("token({}):", s.spiffe_id);
        println!("\t{}", s.svid);
        println!("SPIFFE ID: {}", s.spiffe_id);
    }
    Ok(())
}

async fn validate_jwt(socket: Option<&Path>, audience: String, svid: String) -> Result<(), Error> {
    let path = resolve_socket_path(socket)?;
    let resp = with_timeout("validate jwt", async {
        let mut client = connect(&path).await?;
        client
            .validate_jwtsvid(ca_proto::workload::ValidateJwtsvidRequest { audience, svid })
            .await
            .map_err(|s| status_error("validate jwt", s))
    })
    .await?
    .into_inner();
    println!("SVID is valid.");
    println!("SPIFFE ID : {}", resp.spiffe_id);
    if let Some(claims) = resp.claims {
        let json: serde_json::Map<String, serde_json::Value> = claims
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), proto_to_json(v)))
            .collect();
        println!("Claims    : {}", serde_json::Value::Object(json));
    }
    Ok(())
}

fn proto_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9e15 {
                (*n as i64).into()
            } else {
                (*n).into()
            }
        }
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::ListValue(l)) => l.values.iter().map(proto_to_json).collect(),
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), proto_to_json(v)))
                .collect(),
        ),
    }
}

async fn healthcheck(socket: Option<&Path>) -> Result<(), Error> {
    let path = resolve_socket_path(socket)?;
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        let mut client = connect(&path).await?;
        // Any answer, including "no identity issued" for this process, shows the agent works.
        match client
            .fetch_x509_bundles(ca_proto::workload::X509BundlesRequest {})
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) => {
                Err(Error::WorkloadApi(format!(
                    "the agent at {} did not answer: {}",
                    path.display(),
                    s.message()
                )))
            }
            Err(_) => Ok(()),
        }
    })
    .await
    .map_err(|_| {
        Error::WorkloadApi(format!(
            "the agent at {} did not answer within 5s",
            path.display()
        ))
    })?;
    answered?;
    println!("Agent is healthy.");
    Ok(())
}
