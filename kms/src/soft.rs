//! The software key manager: PKCS#8 files (mode 0600) in a directory.
//!
//! **For development and tests only.** Keys are ordinary files; anyone who can read the
//! directory has the CA. A node using it says so loudly at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::memory::MemoryKey;
use crate::{
    validate_key_name, Error, KeyAlgorithm, KeyManager, KeyProtection, Result, SigningKey,
};

const BACKEND: &str = "soft";

/// Keys as files under one directory.
#[derive(Debug)]
pub struct SoftKeyManager {
    dir: PathBuf,
}

impl SoftKeyManager {
    /// Uses (and creates, mode 0700) `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::Config(format!(
                "cannot create key directory {}: {e}",
                dir.display()
            ))
        })?;
        set_mode(&dir, 0o700)?;
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::Config(format!("cannot set permissions on {}: {e}", p.display())))
}

/// Key files' contents, wiped from memory when dropped (as every private key buffer here).
type Secret = zeroize::Zeroizing<Vec<u8>>;

fn encode(alg: KeyAlgorithm, pkcs8: &[u8]) -> Secret {
    let mut out = Secret::new(Vec::with_capacity(16 + pkcs8.len()));
    out.extend_from_slice(format!("{alg}\n").as_bytes());
    out.extend_from_slice(pkcs8);
    out
}

fn decode(name: &str, bytes: &[u8]) -> Result<(KeyAlgorithm, Secret)> {
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| Error::Backend(format!("key file for {name:?} is corrupt")))?;
    let alg = match &bytes[..nl] {
        b"ec-p256" => KeyAlgorithm::EcP256,
        b"ec-p384" => KeyAlgorithm::EcP384,
        _ => {
            return Err(Error::Backend(format!(
                "key file for {name:?} has an unknown algorithm"
            )))
        }
    };
    Ok((alg, Secret::new(bytes[nl + 1..].to_vec())))
}

#[async_trait]
impl KeyManager for SoftKeyManager {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn is_production_grade(&self) -> bool {
        false
    }

    async fn generate(&self, name: &str, alg: KeyAlgorithm) -> Result<Arc<dyn SigningKey>> {
        validate_key_name(name)?;
        let path = self.path(name);
        let (key, pkcs8) = MemoryKey::generate(name, alg, BACKEND)?;
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, &*encode(alg, &pkcs8))
            .map_err(|e| Error::Backend(format!("cannot write {}: {e}", tmp.display())))?;
        set_mode(&tmp, 0o600)?;
        // hard_link fails if the target exists: no silent overwrite of a CA key.
        match std::fs::hard_link(&tmp, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::AlreadyExists(name.to_owned()));
            }
            Err(e) => return Err(Error::Backend(format!("cannot store key {name:?}: {e}"))),
        }
        let _ = std::fs::remove_file(&tmp);
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(Arc::new(key))
    }

    async fn get(&self, name: &str) -> Result<Arc<dyn SigningKey>> {
        validate_key_name(name)?;
        let bytes = match std::fs::read(self.path(name)) {
            Ok(b) => Secret::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(name.to_owned()))
            }
            Err(e) => return Err(Error::Backend(format!("cannot read key {name:?}: {e}"))),
        };
        let (alg, pkcs8) = decode(name, &bytes)?;
        Ok(Arc::new(MemoryKey::from_pkcs8(name, alg, &pkcs8, BACKEND)?))
    }

    async fn delete(&self, name: &str) -> Result<()> {
        validate_key_name(name)?;
        match std::fs::remove_file(self.path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::NotFound(name.to_owned()))
            }
            Err(e) => Err(Error::Backend(format!("cannot delete key {name:?}: {e}"))),
        }
    }

    async fn protection(&self, name: &str) -> Result<KeyProtection> {
        validate_key_name(name)?;
        let path = self.path(name);
        if !path.exists() {
            return Err(Error::NotFound(name.into()));
        }
        Ok(KeyProtection {
            extractable: true,
            detail: format!("PKCS#8 file {}", path.display()),
        })
    }

    async fn list(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::Backend(format!("cannot list {}: {e}", self.dir.display())))?;
        for ent in rd.flatten() {
            let f = ent.file_name().to_string_lossy().to_string();
            if let Some(n) = f.strip_suffix(".key") {
                names.push(n.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }
}
