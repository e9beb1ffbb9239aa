//! Test harness shared by the workspace's integration tests: real key-manager backends and
//! the faults they are tested against. Used as a dev-dependency only (never published).
//!
//! - [`softhsm`]: a SoftHSM2 PKCS#11 module with a private configuration and token directory
//!   per test ([`softhsm::SoftHsm`]), tokens initialized with `softhsm2-util`, one
//!   process-wide lock (PKCS#11 state and `SOFTHSM2_CONF` are per process), and a token
//!   "unplugged" and "plugged back in" by moving its directory away and back, and a locked
//!   user PIN (which SoftHSM2 cannot produce) from a forwarding PKCS#11 module in front of
//!   it (`pkcs11-fault/pkcs11_fault.c`, built by this crate's build script).
//! - [`moto`]: the AWS KMS emulator moto started on `127.0.0.1` on a [`free_port`] (killed on
//!   drop; a clear install hint when python3 or moto is missing), one shared per test
//!   binary ([`moto::shared`]) with dummy credentials and nothing from the machine's own
//!   AWS configuration, and a KMS configuration with short timeouts for tests.
//! - [`kms_proxy`]: an HTTP proxy in front of the emulator that answers chosen KMS actions
//!   itself: throttling N times, failing always, refused credentials, slow answers, after
//!   letting the first requests through; and an outage (stop listening, drop every
//!   connection, listen again on the same port).
//! - [`mtls`]: two workloads (alice, bob) talking mutual TLS with the SVIDs and bundle
//!   the Workload API gives them, every exchange counted.
//! - [`http`]: a tiny HTTP/1.1 GET for a node's `/readyz` and `/metrics`, and the value of
//!   one metric series.
//! - [`logs`]: this process's `tracing` output captured in memory, to check what was logged.
//! - [`layering`]: the module graph of a crate and its cycles; the workspace's own test
//!   fails on any cycle.
//! - [`process`]: child processes (a `ca-node`, an agent) with their output in a log file,
//!   signalled, stopped gracefully or killed, and killed on drop.
//! - [`pki`]: certificate chain checks (signatures; `openssl verify` as an independent
//!   validator).
//!
//! # Requirements
//! The tests that use this fail, they never skip, when a tool is missing: SoftHSM2 (Debian
//! package `softhsm2`; the module is taken from `SOFTHSM2_MODULE` or the standard Debian
//! locations), python3 with `moto[server]` 5.2.1, and for some tests the `openssl` CLI.
//!
//! # Example
//! ```no_run
//! # async fn example() {
//! use ca_test_support::{kms_proxy::{Proxy, Rule}, moto, softhsm::SoftHsm};
//!
//! // SoftHSM2: hold the returned value for the whole test (it holds the process-wide lock).
//! let hsm = SoftHsm::new().await;
//! hsm.init_token("ca");
//! let pkcs11 = hsm.config("ca", "node1-"); // a `Pkcs11Config` with a PIN file
//! hsm.remove_token("ca"); // signing now fails with `Unavailable` ...
//! hsm.restore_token("ca"); // ... and works again
//!
//! // AWS KMS: the shared emulator, a proxy in front of it, a config pointing at the proxy.
//! let kms = moto::shared();
//! let proxy = Proxy::start(kms.port()).await;
//! let cfg = moto::fast_config("example.org", "node-1", &proxy.url());
//! proxy.rule(Rule::throttle("Sign", 2)); // the next two Sign requests are throttled
//! proxy.stop(); // outage
//! proxy.restart().await; // back, same address
//! # let _ = (pkcs11, cfg);
//! # }
//! ```

pub mod fuzz;
pub mod http;
pub mod kms_proxy;
pub mod layering;
pub mod logs;
pub mod moto;
pub mod mtls;
pub mod pki;
pub mod process;
pub mod softhsm;

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}
