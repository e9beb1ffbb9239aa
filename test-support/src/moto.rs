//! The AWS KMS emulator moto (`pip install 'moto[server]'`), started on 127.0.0.1 on a free
//! port by the test binary. A missing python3 or moto fails the test with an install hint.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ca_kms::aws_kms::AwsKmsConfig;

/// Runs moto's server in a thread of a Python process that exits when its stdin closes, so it
/// also goes away when the test binary ends without dropping the guard (a static).
const MOTO_LAUNCHER: &str = r#"
import os, sys
try:
    from moto.server import ThreadedMotoServer
except Exception as e:
    sys.stderr.write("cannot import moto: %s\n" % e)
    sys.exit(3)
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
srv.start()
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()
os._exit(0)
"#;

/// What to install when the emulator does not start.
pub const INSTALL_HINT: &str = "the AWS KMS tests need python3 with moto's server: \
     `python3 -m pip install 'moto[server]==5.2.1'` (ops/scripts/test-all.sh installs it)";

/// A moto server process; killed on drop.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    _stdin: ChildStdin,
    port: u16,
    _log: tempfile::NamedTempFile,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Starts one with extra environment variables (e.g. `INITIAL_NO_AUTH_ACTION_COUNT=0`
    /// to make it check credentials) and waits until it accepts connections.
    pub fn start(env: &[(&str, &str)]) -> Moto {
        let port = crate::free_port();
        let log = tempfile::NamedTempFile::new().expect("temporary log file");
        let mut cmd = Command::new("python3");
        cmd.arg("-c")
            .arg(MOTO_LAUNCHER)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log.reopen().expect("log file")));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("cannot run python3 ({e}): {INSTALL_HINT}"),
        };
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        if line.trim() != "ready" {
            let _ = child.kill();
            let status = child.wait().ok();
            let mut err = String::new();
            let _ = log.reopen().map(|mut f| f.read_to_string(&mut err)).ok();
            panic!(
                "the KMS emulator did not start (exit {status:?}): {}\n{INSTALL_HINT}",
                err.trim()
            );
        }
        // It answers once it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto does not answer on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto {
            child,
            _stdin: stdin,
            port,
            _log: log,
        }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process ID (e.g. to read the emulator's CPU time from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its endpoint URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Dummy credentials through the standard chain, and nothing from this machine's own AWS
/// configuration (profiles, files, instance metadata). [`shared`] calls it first.
pub fn isolate_aws_environment() {
    let none = std::env::temp_dir().join("ca-kms-aws-test-no-such-file");
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::remove_var("AWS_SESSION_TOKEN");
    std::env::remove_var("AWS_PROFILE");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::set_var("AWS_CONFIG_FILE", &none);
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", &none);
}

/// The emulator shared by the tests of this binary (each test uses its own node ID, hence
/// its own alias prefix). Sets the AWS environment ([`isolate_aws_environment`]) before it
/// starts, so call it before building any AWS client.
pub fn shared() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        isolate_aws_environment();
        Moto::start(&[])
    })
}

/// A KMS configuration for node `node_id` of `trust_domain` (its usual alias prefix and
/// tags) against `endpoint`, region `us-east-1`, with short timeouts and backoffs: 3 s per
/// attempt, 10 s per operation, backoff 20 to 200 ms.
pub fn fast_config(trust_domain: &str, node_id: &str, endpoint: &str) -> AwsKmsConfig {
    let mut c = AwsKmsConfig::for_node(trust_domain, node_id);
    c.region = Some("us-east-1".into());
    c.endpoint_url = Some(endpoint.to_owned());
    c.attempt_timeout_ms = 3_000;
    c.operation_timeout_ms = 10_000;
    c.initial_backoff_ms = 20;
    c.max_backoff_ms = 200;
    c
}
