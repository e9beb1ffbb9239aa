//! The key manager the node under test keeps its intermediate in (`--backend`), and that
//! backend's raw signing rate, measured in the same run through the same `ca_kms` code the
//! node uses.
//!
//! - `soft`: PKCS#8 files (the node's default). Its raw cost is the `ring` baseline
//!   ([`crate::baseline`]).
//! - `softhsm`: a private SoftHSM2 token made for the run (its own `softhsm2.conf` and token
//!   directory in a temporary directory, initialized with `softhsm2-util`, a PIN file of
//!   mode 0600). The node gets `[key_manager] type = "pkcs11"` and `SOFTHSM2_CONF`.
//! - `kms`: the AWS KMS emulator moto started on 127.0.0.1 (through `ca_test_support`), with
//!   dummy credentials and nothing from this machine's own AWS configuration, in this
//!   process's and the node's environment. The node gets `[key_manager] type = "aws_kms"`
//!   with the emulator's `endpoint_url`.
//!
//! [`Backend::prepare`] changes this process's environment (`SOFTHSM2_CONF`, `AWS_*`), so it
//! runs before any runtime or other thread is started.
//!
//! **Raw rate** ([`Backend::measure_raw`]): this process opens the same backend with
//! `ca_kms` (a PKCS#11 manager with the node's session pool size, or an AWS KMS client),
//! generates a key of the node's CA algorithm and signs a TBSCertificate the node issued in
//! this run with `in_flight` signatures outstanding at all times (tokio tasks on a runtime
//! with one worker per core, like the node's), for a fixed time after a warm-up. The run
//! does this twice while the node is up but idle: right before and right after the node's
//! measured phase, so that other work on the machine weighs on both sides alike. That is
//! the most the backend delivers through this code at that concurrency, with nothing else
//! (no TLS, no CSR checks, no database) on the machine.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use ca_kms::{KeyAlgorithm, KeyManager};
use serde::Serialize;
use x509_parser::prelude::FromDer as _;

use crate::procstat;

/// Label of the SoftHSM2 token made for a run.
pub const TOKEN_LABEL: &str = "ca-bench";
/// User PIN of that token (it lives in a temporary directory for one run).
const TOKEN_PIN: &str = "1234";
/// Security officer PIN of that token.
const TOKEN_SO_PIN: &str = "87654321";
/// Node ID the raw measurement's keys are named under (KMS alias prefix, PKCS#11 label
/// prefix), apart from the node's.
const RAW_OWNER: &str = "bench-raw";
/// Region given to the emulator's clients.
const KMS_REGION: &str = "us-east-1";

/// Which key manager the node keeps its CA keys in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// PKCS#8 files (`[key_manager] type = "soft"`).
    Soft,
    /// A SoftHSM2 token made for the run (`type = "pkcs11"`).
    Softhsm,
    /// The AWS KMS emulator moto on 127.0.0.1 (`type = "aws_kms"`).
    Kms,
}

impl BackendKind {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Soft => "soft",
            BackendKind::Softhsm => "softhsm",
            BackendKind::Kms => "kms",
        }
    }

    /// The target for SVIDs/s ÷ raw signatures/s, where there is one.
    pub fn target_ratio(self) -> Option<f64> {
        match self {
            BackendKind::Soft => None,
            BackendKind::Softhsm => Some(0.70),
            BackendKind::Kms => Some(0.85),
        }
    }

    /// Signatures the raw measurement keeps in flight unless told otherwise: as many as the
    /// node can have outstanding under the load, `calls_in_flight` × the CSRs of a call it
    /// signs at once (`batch`, at most [`ca_node::node_api::BATCH_MINT_CONCURRENCY`]); for
    /// PKCS#11 at most the session pool ([`ca_kms::pkcs11::DEFAULT_MAX_SESSIONS`]), which
    /// caps the node too.
    pub fn default_raw_in_flight(self, calls_in_flight: usize, batch: usize) -> usize {
        let per_call = batch.clamp(1, ca_node::node_api::BATCH_MINT_CONCURRENCY);
        let asked = calls_in_flight.max(1) * per_call;
        match self {
            BackendKind::Soft => 1,
            BackendKind::Softhsm => asked.min(ca_kms::pkcs11::DEFAULT_MAX_SESSIONS),
            BackendKind::Kms => asked,
        }
    }
}

enum State {
    Soft,
    SoftHsm {
        _dir: tempfile::TempDir,
        conf: PathBuf,
        module: PathBuf,
        pin_file: PathBuf,
    },
    Kms {
        moto: ca_test_support::moto::Moto,
        /// With `--kms-latency-ms`: a proxy delaying every `Sign` (a network round trip).
        proxy: Option<(ca_test_support::kms_proxy::Proxy, Duration)>,
    },
}

/// A prepared backend: the token or emulator exists until this is dropped.
pub struct Backend {
    kind: BackendKind,
    state: State,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            State::Soft => write!(f, "Backend(soft)"),
            State::SoftHsm { conf, .. } => write!(f, "Backend(softhsm, {})", conf.display()),
            State::Kms { moto, .. } => write!(f, "Backend(kms, {})", moto.url()),
        }
    }
}

/// The SoftHSM2 PKCS#11 module: `SOFTHSM2_MODULE`, or the usual Debian locations.
pub fn softhsm_module() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SOFTHSM2_MODULE") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("SOFTHSM2_MODULE={} is not a file", p.display());
        }
        return Ok(p);
    }
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .ok_or_else(|| {
        anyhow!(
            "the SoftHSM2 PKCS#11 module was not found: install the Debian package softhsm2 \
             or set SOFTHSM2_MODULE to the path of libsofthsm2.so"
        )
    })
}

impl Backend {
    /// Makes the backend ready: a fresh SoftHSM2 token, or the KMS emulator started on
    /// 127.0.0.1. Sets this process's environment for it (`SOFTHSM2_CONF`, dummy `AWS_*`
    /// credentials), so call it before starting any runtime or thread.
    pub fn prepare(kind: BackendKind) -> anyhow::Result<Self> {
        let state = match kind {
            BackendKind::Soft => State::Soft,
            BackendKind::Softhsm => {
                let module = softhsm_module()?;
                let dir = tempfile::Builder::new()
                    .prefix("ca-bench-softhsm-")
                    .tempdir()
                    .context("creating a temporary directory for the SoftHSM2 token")?;
                let tokens = dir.path().join("tokens");
                std::fs::create_dir(&tokens)?;
                let conf = dir.path().join("softhsm2.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                        tokens.display()
                    ),
                )?;
                let out = Command::new("softhsm2-util")
                    .env("SOFTHSM2_CONF", &conf)
                    .args(["--init-token", "--free", "--label", TOKEN_LABEL])
                    .args(["--so-pin", TOKEN_SO_PIN, "--pin", TOKEN_PIN])
                    .output()
                    .context("running softhsm2-util (Debian package softhsm2)")?;
                if !out.status.success() {
                    bail!(
                        "softhsm2-util --init-token failed: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let pin_file = dir.path().join("pin");
                std::fs::write(&pin_file, format!("{TOKEN_PIN}\n"))?;
                std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600))?;
                std::env::set_var("SOFTHSM2_CONF", &conf);
                State::SoftHsm {
                    _dir: dir,
                    conf,
                    module,
                    pin_file,
                }
            }
            BackendKind::Kms => {
                ca_test_support::moto::isolate_aws_environment();
                std::env::set_var("AWS_REGION", KMS_REGION);
                // The harness panics with an install hint when python3 or moto is missing.
                let moto = std::panic::catch_unwind(|| ca_test_support::moto::Moto::start(&[]))
                    .map_err(|p| {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        anyhow!("the KMS emulator did not start: {msg}")
                    })?;
                State::Kms { moto, proxy: None }
            }
        };
        Ok(Self { kind, state })
    }

    /// KMS: puts a proxy on 127.0.0.1 in front of the emulator that holds every `Sign`
    /// request for `delay` before forwarding it, as the network round trip to a real KMS
    /// would; the node and the raw measurement both go through it. Call it inside the
    /// runtime that lives for the whole run (the proxy runs on it).
    pub async fn add_sign_latency(&mut self, delay: Duration) -> anyhow::Result<()> {
        let State::Kms { moto, proxy } = &mut self.state else {
            bail!("--kms-latency-ms needs --backend kms");
        };
        let p = ca_test_support::kms_proxy::Proxy::start(moto.port()).await;
        p.rule(ca_test_support::kms_proxy::Rule::slow("Sign", None, delay));
        *proxy = Some((p, delay));
        Ok(())
    }

    /// The KMS endpoint the node and the raw measurement use.
    fn kms_url(&self) -> Option<String> {
        match &self.state {
            State::Kms {
                proxy: Some((p, _)),
                ..
            } => Some(p.url()),
            State::Kms { moto, .. } => Some(moto.url()),
            _ => None,
        }
    }

    /// Which backend.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// The emulator's process (KMS), whose CPU time is reported apart from the node's.
    pub fn emulator_pid(&self) -> Option<u32> {
        match &self.state {
            State::Kms { moto, .. } => Some(moto.pid()),
            _ => None,
        }
    }

    /// Where the backend is, for the report.
    pub fn describe(&self) -> String {
        match &self.state {
            State::Soft => "PKCS#8 files in the node's data directory".into(),
            State::SoftHsm { module, .. } => format!(
                "SoftHSM2 token '{TOKEN_LABEL}' made for this run (module {})",
                module.display()
            ),
            State::Kms {
                moto,
                proxy: Some((p, d)),
            } => format!(
                "moto (AWS KMS emulator) at {}, behind a proxy at {} that delays each Sign by {} ms",
                moto.url(),
                p.url(),
                d.as_millis()
            ),
            State::Kms { moto, .. } => format!("moto (AWS KMS emulator) at {}", moto.url()),
        }
    }

    /// The `[key_manager]` table the node gets, None for `soft` (the generated default).
    pub fn key_manager_table(&self) -> Option<toml::Table> {
        let mut km = toml::Table::new();
        match &self.state {
            State::Soft => return None,
            State::SoftHsm {
                module, pin_file, ..
            } => {
                let s = |p: &Path| toml::Value::String(p.to_string_lossy().into_owned());
                km.insert("type".into(), "pkcs11".into());
                km.insert("module".into(), s(module));
                km.insert("token_label".into(), TOKEN_LABEL.into());
                km.insert("pin_file".into(), s(pin_file));
                km.insert("key_label_prefix".into(), "bench-node/".into());
            }
            State::Kms { .. } => {
                km.insert("type".into(), "aws_kms".into());
                km.insert("region".into(), KMS_REGION.into());
                km.insert(
                    "endpoint_url".into(),
                    self.kms_url().unwrap_or_default().into(),
                );
            }
        }
        Some(km)
    }

    /// Environment variables the node process gets (None: removed).
    pub fn node_env(&self) -> Vec<(OsString, Option<OsString>)> {
        let set = |k: &str, v: &dyn AsRef<std::ffi::OsStr>| {
            (OsString::from(k), Some(v.as_ref().to_os_string()))
        };
        match &self.state {
            State::Soft => vec![],
            State::SoftHsm { conf, .. } => vec![set("SOFTHSM2_CONF", conf)],
            State::Kms { .. } => {
                let none = std::env::temp_dir().join("ca-bench-no-such-aws-file");
                vec![
                    set("AWS_ACCESS_KEY_ID", &"testing"),
                    set("AWS_SECRET_ACCESS_KEY", &"testing"),
                    set("AWS_REGION", &KMS_REGION),
                    set("AWS_EC2_METADATA_DISABLED", &"true"),
                    set("AWS_CONFIG_FILE", &none),
                    set("AWS_SHARED_CREDENTIALS_FILE", &none),
                    (OsString::from("AWS_SESSION_TOKEN"), None),
                    (OsString::from("AWS_PROFILE"), None),
                ]
            }
        }
    }

    /// Opens the backend in this process, as the node does, with keys under names of
    /// their own.
    async fn open(&self) -> anyhow::Result<Arc<dyn KeyManager>> {
        Ok(match &self.state {
            State::Soft => bail!("the soft backend's raw cost is the ring baseline"),
            State::SoftHsm {
                module, pin_file, ..
            } => {
                let cfg = ca_kms::pkcs11::Pkcs11Config {
                    module: module.clone(),
                    token_label: TOKEN_LABEL.into(),
                    pin_file: Some(pin_file.clone()),
                    pin_env: None,
                    key_label_prefix: format!("{RAW_OWNER}/"),
                };
                let km = tokio::task::spawn_blocking(move || {
                    ca_kms::pkcs11::Pkcs11KeyManager::open(&cfg)
                })
                .await??;
                Arc::new(km)
            }
            State::Kms { .. } => {
                let mut cfg =
                    ca_kms::aws_kms::AwsKmsConfig::for_node(crate::node::TRUST_DOMAIN, RAW_OWNER);
                cfg.region = Some(KMS_REGION.into());
                cfg.endpoint_url = self.kms_url();
                Arc::new(ca_kms::aws_kms::AwsKmsManager::connect(cfg).await?)
            }
        })
    }

    /// Measures the backend's raw signing rate (see the module's doc) on a runtime of its
    /// own in a thread of its own. Blocking.
    pub fn measure_raw(
        &self,
        key_name: &str,
        alg: KeyAlgorithm,
        msg: Vec<u8>,
        in_flight: usize,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<RawSigning> {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(cores)
                    .enable_all()
                    .build()?;
                rt.block_on(self.raw(key_name, alg, msg, in_flight.max(1), warmup, duration))
            })
            .join()
            .map_err(|_| anyhow!("the raw measurement's thread panicked"))?
        })
    }

    async fn raw(
        &self,
        key_name: &str,
        alg: KeyAlgorithm,
        msg: Vec<u8>,
        in_flight: usize,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<RawSigning> {
        let km = self.open().await?;
        let key = km
            .generate(key_name, alg)
            .await
            .with_context(|| format!("generating a {alg} key in the {} backend", km.backend()))?;
        let msg: Arc<[u8]> = msg.into();
        let result = async {
            let public = key.public_key_spki().to_vec();
            let sig = key.sign(&msg).await?;
            check_signature(alg, &public, &msg, &sig)?;
            if !warmup.is_zero() {
                sign_for(&key, &msg, in_flight, warmup).await?;
            }
            let (c0, e0) = (procstat::own_cpu()?, self.emulator_cpu());
            let r = sign_for(&key, &msg, in_flight, duration).await?;
            let (c1, e1) = (procstat::own_cpu()?, self.emulator_cpu());
            Ok::<_, anyhow::Error>(RawSigning::new(
                RawRound {
                    backend: self.kind,
                    key_manager: km.backend().to_owned(),
                    key_algorithm: alg.to_string(),
                    message_bytes: msg.len(),
                    in_flight,
                },
                r,
                c1.saturating_sub(c0),
                match (e0, e1) {
                    (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                    _ => None,
                },
            ))
        }
        .await;
        // Best effort: KMS schedules the deletion, a token destroys the pair.
        let _ = km.delete(key_name).await;
        result
    }

    /// CPU time of the emulator process so far, if there is one.
    pub fn emulator_cpu(&self) -> Option<Duration> {
        self.emulator_pid()
            .and_then(|p| procstat::process_cpu(p).ok())
    }
}

/// What one raw measurement's signatures went through.
#[derive(Clone, Debug, Serialize)]
pub struct RawRound {
    /// `--backend`.
    pub backend: BackendKind,
    /// The `ca_kms` backend that signed (`pkcs11`, `aws_kms`).
    pub key_manager: String,
    /// The key's algorithm (the node's `ca_key_algorithm`).
    pub key_algorithm: String,
    /// Bytes of the signed message (a TBSCertificate of the run).
    pub message_bytes: usize,
    /// Signatures kept in flight.
    pub in_flight: usize,
}

struct SignRun {
    signs: u64,
    wall: Duration,
    latencies_us: Vec<f64>,
}

/// Signs `msg` with `in_flight` signatures outstanding until `budget` has passed (no new
/// signature starts later; outstanding ones finish). Any failure fails the run.
async fn sign_for(
    key: &Arc<dyn ca_kms::SigningKey>,
    msg: &Arc<[u8]>,
    in_flight: usize,
    budget: Duration,
) -> anyhow::Result<SignRun> {
    let start = Instant::now();
    let deadline = start + budget;
    let mut tasks = Vec::with_capacity(in_flight);
    for _ in 0..in_flight {
        let key = key.clone();
        let msg = msg.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                key.sign(&msg).await?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok::<_, ca_kms::Error>(lat)
        }));
    }
    let mut latencies_us = Vec::new();
    for t in tasks {
        latencies_us.extend(t.await.context("a signing task failed")??);
    }
    Ok(SignRun {
        signs: latencies_us.len() as u64,
        wall: start.elapsed(),
        latencies_us,
    })
}

/// Verifies one signature of the raw key (so the rate is of signatures that verify).
fn check_signature(alg: KeyAlgorithm, spki: &[u8], msg: &[u8], sig: &[u8]) -> anyhow::Result<()> {
    use ring::signature as rs;
    let params: &dyn rs::VerificationAlgorithm = match alg {
        KeyAlgorithm::EcP256 => &rs::ECDSA_P256_SHA256_ASN1,
        KeyAlgorithm::EcP384 => &rs::ECDSA_P384_SHA384_ASN1,
        KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 => &rs::RSA_PKCS1_2048_8192_SHA256,
    };
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki)
        .map_err(|e| anyhow!("the raw key's public key: {e}"))?;
    rs::UnparsedPublicKey::new(params, spki.subject_public_key.data.as_ref())
        .verify(msg, sig)
        .map_err(|_| anyhow!("a signature of the raw key does not verify"))
}

/// The backend's raw signing rate, measured in this process.
#[derive(Clone, Debug, Serialize)]
pub struct RawSigning {
    /// What was signed through what.
    #[serde(flatten)]
    pub what: RawRound,
    /// Signatures made in the measured time.
    pub signs: u64,
    /// Measured wall time, s.
    pub wall_s: f64,
    /// Signatures per second (wall).
    pub signs_per_s: f64,
    /// Mean latency of one signature, µs.
    pub latency_mean_us: f64,
    /// Median latency, µs.
    pub latency_p50_us: f64,
    /// 99th percentile latency, µs.
    pub latency_p99_us: f64,
    /// CPU of this process per signature (for PKCS#11 the token's work is in it), µs.
    pub process_cpu_us_per_sign: f64,
    /// CPU of the emulator process per signature (KMS), µs.
    pub emulator_cpu_us_per_sign: Option<f64>,
    #[serde(skip)]
    latencies_us: Vec<f64>,
    #[serde(skip)]
    process_cpu: Duration,
    #[serde(skip)]
    emulator_cpu: Option<Duration>,
}

impl RawSigning {
    fn new(
        what: RawRound,
        r: SignRun,
        process_cpu: Duration,
        emulator_cpu: Option<Duration>,
    ) -> Self {
        let mut lat = r.latencies_us;
        lat.sort_by(f64::total_cmp);
        let wall = r.wall.as_secs_f64();
        let per = |d: Duration| d.as_secs_f64() * 1e6 / r.signs.max(1) as f64;
        Self {
            what,
            signs: r.signs,
            wall_s: wall,
            signs_per_s: if wall > 0.0 {
                r.signs as f64 / wall
            } else {
                0.0
            },
            latency_mean_us: if lat.is_empty() {
                0.0
            } else {
                lat.iter().sum::<f64>() / lat.len() as f64
            },
            latency_p50_us: crate::load::percentile(&lat, 0.5),
            latency_p99_us: crate::load::percentile(&lat, 0.99),
            process_cpu_us_per_sign: per(process_cpu),
            emulator_cpu_us_per_sign: emulator_cpu.map(per),
            latencies_us: lat,
            process_cpu,
            emulator_cpu,
        }
    }

    /// Rounds taken together: every signature over the total measured time.
    pub fn combine(rounds: &[RawSigning]) -> Option<RawSigning> {
        let first = rounds.first()?;
        let sum = |f: &dyn Fn(&RawSigning) -> Option<Duration>| -> Option<Duration> {
            rounds.iter().map(f).sum()
        };
        Some(RawSigning::new(
            first.what.clone(),
            SignRun {
                signs: rounds.iter().map(|r| r.signs).sum(),
                wall: Duration::from_secs_f64(rounds.iter().map(|r| r.wall_s).sum()),
                latencies_us: rounds
                    .iter()
                    .flat_map(|r| r.latencies_us.iter().copied())
                    .collect(),
            },
            sum(&|r| Some(r.process_cpu)).unwrap_or_default(),
            sum(&|r| r.emulator_cpu),
        ))
    }
}
