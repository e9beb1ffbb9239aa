//! SoftHSM2 for tests: a private configuration and token directory per test.
//!
//! How tests share one process: a PKCS#11 module's state is global to the process, and
//! SoftHSM2 reads `SOFTHSM2_CONF` from the environment at `C_Initialize`. So every test
//! holds one process-wide lock for its whole run (a [`SoftHsm`] holds it from
//! [`SoftHsm::new`] until it is dropped), and makes its own configuration and token
//! directory in a temporary directory, pointing `SOFTHSM2_CONF` at it while it holds the
//! lock (no other test touches the module or the environment meanwhile). The module still
//! has the previous test's tokens loaded; a key manager does not find the new token's
//! label, initializes the module again (which rereads `SOFTHSM2_CONF`) and finds it: the
//! same path that finds a token plugged in after start.
//!
//! A token is "unplugged" by moving its directory out of the token directory
//! ([`SoftHsm::remove_token`]) and "plugged back in" by moving it back
//! ([`SoftHsm::restore_token`]).
//!
//! A locked user PIN is the one fault here SoftHSM2 cannot produce (its `C_Login` answers
//! `CKR_PIN_INCORRECT` however often a wrong PIN is tried). [`SoftHsm::fault_config`] puts a
//! small PKCS#11 module in front of SoftHSM2 (`pkcs11-fault/pkcs11_fault.c`, built by this
//! crate's build script) that forwards every call, and answers `C_Login` with
//! `CKR_PIN_LOCKED` while [`SoftHsm::set_pin_locked`] says so.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use ca_kms::pkcs11::{Pkcs11Config, Pkcs11KeyManager};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::slot::Slot;

/// The security officer PIN of every token made here.
pub const SO_PIN: &str = "87654321";
/// The user PIN of every token made here.
pub const PIN: &str = "1234";

/// Read by the fault-injecting module at every `C_Login`.
const FAULT_LOGIN_ENV: &str = "CA_PKCS11_FAULT_LOGIN";

/// Held by every test using SoftHSM2 for its whole run (see the module's doc).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The SoftHSM2 PKCS#11 module: `SOFTHSM2_MODULE`, or the standard Debian locations.
/// Panics with an install hint when there is none (tests fail, they do not skip).
pub fn module() -> PathBuf {
    if let Some(p) = std::env::var_os("SOFTHSM2_MODULE") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "SOFTHSM2_MODULE={} is not a file: point it at libsofthsm2.so",
            p.display()
        );
        return p;
    }
    for c in [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ] {
        if Path::new(c).is_file() {
            return PathBuf::from(c);
        }
    }
    panic!(
        "SoftHSM2 PKCS#11 module not found: install the Debian package softhsm2 \
         (apt-get install softhsm2) or set SOFTHSM2_MODULE to the path of libsofthsm2.so. \
         These tests do not skip."
    );
}

/// A private SoftHSM2 configuration and token directory, and the process-wide lock.
pub struct SoftHsm {
    dir: tempfile::TempDir,
    conf: PathBuf,
    tokens: PathBuf,
    module: PathBuf,
    /// Token label -> its directory under `tokens`.
    token_dirs: Mutex<BTreeMap<String, PathBuf>>,
    // Last: released after the directory is gone.
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl std::fmt::Debug for SoftHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SoftHsm({})", self.conf.display())
    }
}

impl SoftHsm {
    /// Waits for the process-wide lock, makes a configuration and an empty token
    /// directory, and points `SOFTHSM2_CONF` at it. Keep it for the whole test.
    pub async fn new() -> SoftHsm {
        let serial = SERIAL.lock().await;
        let module = module();
        let dir = tempfile::tempdir().expect("temporary directory");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("token directory");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .expect("writing softhsm2.conf");
        std::env::set_var("SOFTHSM2_CONF", &conf);
        std::env::remove_var(FAULT_LOGIN_ENV);
        SoftHsm {
            dir,
            conf,
            tokens,
            module,
            token_dirs: Mutex::default(),
            _serial: serial,
        }
    }

    /// The temporary directory holding everything (for a test's own files too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The SoftHSM2 configuration file.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The token directory.
    pub fn tokens_dir(&self) -> &Path {
        &self.tokens
    }

    /// The PKCS#11 module.
    pub fn module(&self) -> &Path {
        &self.module
    }

    fn token_entries(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.tokens)
            .expect("reading the token directory")
            .map(|e| e.expect("token directory entry").path())
            .collect();
        v.sort();
        v
    }

    /// Initializes a token labelled `label` in a free slot with [`SO_PIN`] and [`PIN`].
    pub fn init_token(&self, label: &str) {
        let before = self.token_entries();
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", SO_PIN, "--pin", PIN])
            .output()
            .unwrap_or_else(|e| panic!("cannot run softhsm2-util (Debian package softhsm2): {e}"));
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let new: Vec<PathBuf> = self
            .token_entries()
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        let [token_dir] = new.as_slice() else {
            panic!("softhsm2-util made {new:?} for token {label}, expected one directory");
        };
        self.token_dirs
            .lock()
            .expect("token map")
            .insert(label.to_owned(), token_dir.clone());
    }

    /// A PIN file (mode 0600) holding `pin`.
    pub fn pin_file(&self, pin: &str) -> PathBuf {
        let p = self.dir.path().join(format!("pin-{pin}"));
        std::fs::write(&p, format!("{pin}\n")).expect("writing the PIN file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
            .expect("PIN file permissions");
        p
    }

    /// A key-manager configuration for token `label` (with the right PIN in a file) and key
    /// label prefix `prefix`.
    pub fn config(&self, label: &str, prefix: &str) -> Pkcs11Config {
        Pkcs11Config {
            module: self.module.clone(),
            token_label: label.into(),
            pin_file: Some(self.pin_file(PIN)),
            pin_env: None,
            key_label_prefix: prefix.into(),
        }
    }

    /// Like [`SoftHsm::config`], with the fault-injecting module (see the module docs) in
    /// front of SoftHSM2.
    pub fn fault_config(&self, label: &str, prefix: &str) -> Pkcs11Config {
        std::env::set_var("CA_PKCS11_FAULT_TARGET", &self.module);
        Pkcs11Config {
            module: PathBuf::from(env!("CA_PKCS11_FAULT_MODULE")),
            ..self.config(label, prefix)
        }
    }

    /// Whether the fault-injecting module's `C_Login` answers `CKR_PIN_LOCKED` (a token
    /// whose user PIN its security officer has not unlocked yet) or forwards to SoftHSM2.
    pub fn set_pin_locked(&self, locked: bool) {
        if locked {
            std::env::set_var(FAULT_LOGIN_ENV, "pin-locked");
        } else {
            std::env::remove_var(FAULT_LOGIN_ENV);
        }
    }

    /// A key manager on token `label` with key label prefix `prefix`.
    pub fn open(&self, label: &str, prefix: &str) -> Pkcs11KeyManager {
        Pkcs11KeyManager::open(&self.config(label, prefix)).expect("opening the PKCS#11 token")
    }

    /// Logs the user out of token `label` behind the managers' backs (a logout through any
    /// session logs out every session of the process).
    pub fn logout(&self, label: &str) {
        let ctx = self.raw();
        let session = ctx
            .open_ro_session(raw_slot(&ctx, label))
            .expect("a session on the token");
        session.logout().expect("logging out");
    }

    /// Another user of the same module in this process, going behind the managers' backs.
    pub fn raw(&self) -> Pkcs11 {
        let ctx = Pkcs11::new(&self.module).expect("loading the PKCS#11 module");
        raw_init(&ctx);
        ctx
    }

    /// "Unplugs" token `label` (made by [`SoftHsm::init_token`]): its directory is moved out
    /// of the token directory. The module notices on a later call.
    pub fn remove_token(&self, label: &str) {
        let from = self.token_dir(label);
        let to = self.unplugged(label);
        std::fs::rename(&from, &to).unwrap_or_else(|e| {
            panic!(
                "removing token {label}: {} -> {}: {e}",
                from.display(),
                to.display()
            )
        });
    }

    /// "Plugs" token `label` back in after [`SoftHsm::remove_token`].
    pub fn restore_token(&self, label: &str) {
        let from = self.unplugged(label);
        let to = self.token_dir(label);
        std::fs::rename(&from, &to).unwrap_or_else(|e| {
            panic!(
                "restoring token {label}: {} -> {}: {e}",
                from.display(),
                to.display()
            )
        });
    }

    fn token_dir(&self, label: &str) -> PathBuf {
        self.token_dirs
            .lock()
            .expect("token map")
            .get(label)
            .cloned()
            .unwrap_or_else(|| panic!("no token {label} was initialized here"))
    }

    fn unplugged(&self, label: &str) -> PathBuf {
        self.dir.path().join(format!("unplugged-{label}"))
    }
}

/// `C_Initialize` on `ctx`, accepting a module initialized already.
pub fn raw_init(ctx: &Pkcs11) {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
}

/// The slot of the token labelled `label`.
pub fn raw_slot(ctx: &Pkcs11, label: &str) -> Slot {
    ctx.get_slots_with_token()
        .expect("C_GetSlotList")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|t| t.label() == label)
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no token {label}"))
}
