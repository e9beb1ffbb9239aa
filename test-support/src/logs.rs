//! The log lines of this test process, captured in memory so a test can check what a node
//! said (e.g. why a key manager is down).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// The captured log text of this process since [`capture`] was first called.
#[derive(Clone, Debug, Default)]
pub struct Logs {
    buf: Arc<Mutex<Vec<u8>>>,
}

impl Logs {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().expect("log buffer")).into_owned()
    }

    /// The lines logged so far that contain every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.lock().expect("log buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once per process) a global `tracing` subscriber writing plain text into memory:
/// `info` and above from the workspace's crates, `warn` and above from the others. Returns
/// the buffer. Fails the test if another global subscriber was installed first.
pub fn capture() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "warn,ca_node=info,ca_kms=info,ca_agent=info",
            ))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init()
            .expect("no other global tracing subscriber in this test binary");
        logs
    })
}
