//! What the agent keeps in `data_dir` across restarts: its own SVID chain
//! (`agent_svid.pem`), the SVID's private key (`agent_svid.key`, PKCS#8 PEM, mode 0600) and
//! the trust bundle (`bundle.pb`, the node API's `Bundle` message; `bundle.pem` beside it
//! for people). Every write goes to a temporary file that is then renamed over the old
//! one, so a crash never leaves a half-written file.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ca_identity::{SpiffeId, TrustBundle};
use prost::Message;

use crate::node_client::{bundle_from_proto, bundle_to_proto};
use crate::Error;

const SVID_FILE: &str = "agent_svid.pem";
const KEY_FILE: &str = "agent_svid.key";
const BUNDLE_FILE: &str = "bundle.pb";
const BUNDLE_PEM_FILE: &str = "bundle.pem";

/// The agent's own X.509-SVID and key.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentSvid {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key of the leaf (wiped from memory when dropped).
    pub key_pkcs8: zeroize::Zeroizing<Vec<u8>>,
    /// Leaf notBefore, Unix seconds.
    pub not_before: i64,
    /// Leaf notAfter, Unix seconds.
    pub not_after: i64,
}

impl std::fmt::Debug for AgentSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl AgentSvid {
    /// Builds from a chain and key, reading the ID and validity from the leaf.
    pub fn new(chain: Vec<Vec<u8>>, key_pkcs8: Vec<u8>) -> Result<Self, Error> {
        let leaf = chain
            .first()
            .ok_or_else(|| Error::Persist("an SVID chain is empty".into()))?;
        let info = ca_identity::x509::cert_info(leaf)?;
        let spiffe_id = ca_identity::x509::spiffe_id_of(leaf)?;
        Ok(Self {
            spiffe_id,
            chain,
            key_pkcs8: key_pkcs8.into(),
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// When to renew: half-way through the validity.
    pub fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) / 2
    }
}

/// Whether the PKCS#8 key is the private key of the leaf certificate.
fn key_matches_leaf(svid: &AgentSvid) -> bool {
    let Ok(key) = rcgen::KeyPair::try_from(svid.key_pkcs8.as_slice()) else {
        return false;
    };
    let Ok(info) = ca_identity::x509::cert_info(&svid.chain[0]) else {
        return false;
    };
    ca_identity::pubkey::parse_spki(&info.spki_der)
        .map(|p| p.raw == key.public_key_raw())
        .unwrap_or(false)
}

/// What was found in the data directory.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The agent SVID and key.
    pub svid: AgentSvid,
    /// The last trust bundle seen.
    pub bundle: TrustBundle,
}

/// Reads and writes the agent's state in one directory.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// A store in `dir` (created 0700 on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ensure_dir(&self) -> Result<(), Error> {
        if !self.dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(|e| Error::io("cannot create data_dir", &self.dir, e))?;
        }
        Ok(())
    }

    fn write_atomic(&self, name: &str, data: &[u8], mode: u32) -> Result<(), Error> {
        self.ensure_dir()?;
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| Error::io("cannot create", &tmp, e))?;
        // The umask may have narrowed it further, never widened; make it exact.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("cannot set permissions of", &tmp, e))?;
        f.write_all(data)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io("cannot write", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| Error::io("cannot replace", &path, e))
    }

    /// Saves the agent SVID chain and its key (0600).
    pub fn save_svid(&self, svid: &AgentSvid) -> Result<(), Error> {
        let key_pem = zeroize::Zeroizing::new(pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            svid.key_pkcs8.to_vec(),
        )));
        self.write_atomic(KEY_FILE, key_pem.as_bytes(), 0o600)?;
        let chain_pem: String = svid
            .chain
            .iter()
            .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
            .collect();
        self.write_atomic(SVID_FILE, chain_pem.as_bytes(), 0o644)
    }

    /// Saves the trust bundle.
    pub fn save_bundle(&self, bundle: &TrustBundle) -> Result<(), Error> {
        self.write_atomic(BUNDLE_FILE, &bundle_to_proto(bundle).encode_to_vec(), 0o644)?;
        self.write_atomic(BUNDLE_PEM_FILE, bundle.x509_pem().as_bytes(), 0o644)
    }

    /// Loads stored state; `Ok(None)` when nothing was stored yet.
    pub fn load(&self) -> Result<Option<Stored>, Error> {
        let svid_path = self.dir.join(SVID_FILE);
        if !svid_path.exists() {
            return Ok(None);
        }
        let corrupt = |what: &str, p: &Path, why: String| {
            Error::Persist(format!(
                "stored {what} {} is unusable ({why}); delete the data_dir contents and attest again",
                p.display()
            ))
        };
        let chain_pem = std::fs::read_to_string(&svid_path)
            .map_err(|e| Error::io("cannot read", &svid_path, e))?;
        let chain = ca_identity::bundle::certs_from_pem(&chain_pem)
            .map_err(|e| corrupt("SVID", &svid_path, e.to_string()))?;
        let key_path = self.dir.join(KEY_FILE);
        let key_pem = zeroize::Zeroizing::new(
            std::fs::read_to_string(&key_path)
                .map_err(|e| Error::io("cannot read", &key_path, e))?,
        );
        let key = pem::parse(&key_pem).map_err(|e| corrupt("key", &key_path, e.to_string()))?;
        let bundle_path = self.dir.join(BUNDLE_FILE);
        let raw =
            std::fs::read(&bundle_path).map_err(|e| Error::io("cannot read", &bundle_path, e))?;
        let proto = ca_proto::types::Bundle::decode(raw.as_slice())
            .map_err(|e| corrupt("bundle", &bundle_path, e.to_string()))?;
        let bundle =
            bundle_from_proto(proto).map_err(|e| corrupt("bundle", &bundle_path, e.to_string()))?;
        let svid = AgentSvid::new(chain, key.into_contents())
            .map_err(|e| corrupt("SVID", &svid_path, e.to_string()))?;
        if !key_matches_leaf(&svid) {
            return Err(corrupt(
                "key",
                &key_path,
                format!("it is not the key of {}", svid_path.display()),
            ));
        }
        Ok(Some(Stored { svid, bundle }))
    }

    /// Removes the stored SVID and key (e.g. once it expired).
    pub fn forget_svid(&self) {
        let _ = std::fs::remove_file(self.dir.join(SVID_FILE));
        let _ = std::fs::remove_file(self.dir.join(KEY_FILE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn round_trip_with_private_key_mode() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("data"));
        assert!(store.load().unwrap().is_none());
        let ca = testing::TestCa::new("example.org");
        let (chain, key) = ca.issue("spiffe://example.org/agent/join_token/abc", 3600);
        let svid = AgentSvid::new(chain, key).unwrap();
        let bundle = ca.bundle();
        store.save_svid(&svid).unwrap();
        store.save_bundle(&bundle).unwrap();
        let loaded = store.load().unwrap().unwrap();
        assert_eq!(loaded.svid, svid);
        assert_eq!(loaded.bundle, bundle);
        let mode = std::fs::metadata(dir.path().join("data").join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(dir.path().join("data"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700);
        // Overwrite works (rename over an existing file).
        store.save_svid(&svid).unwrap();
        store.forget_svid();
        assert!(store.load().unwrap().is_none());
    }

    #[test]
    fn a_key_that_is_not_the_svids_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let ca = testing::TestCa::new("example.org");
        let (chain, _) = ca.issue("spiffe://example.org/agent/a", 3600);
        let (_, other_key) = ca.issue("spiffe://example.org/agent/b", 3600);
        store
            .save_svid(&AgentSvid::new(chain, other_key).unwrap())
            .unwrap();
        store.save_bundle(&ca.bundle()).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("is not the key of"), "{err}");
    }

    #[test]
    fn corrupt_files_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        std::fs::write(dir.path().join(SVID_FILE), "junk").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("attest again"), "{err}");
    }
}
