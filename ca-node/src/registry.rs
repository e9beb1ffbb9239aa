//! The files a node keeps in its data dir about its membership: [`MARKER_FILE`] (this data
//! dir's Raft ID and whether it was initialized or joined), [`NODE_SVID_FILE`] (the node's
//! current serving SVID and key, 0600, so a restarted node can talk to its peers before its
//! CA is ready) and [`BUNDLE_FILE`] (the bundle a joining node was given).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The data dir's membership marker (JSON).
pub const MARKER_FILE: &str = "cluster.json";
/// The node's current serving SVID and its key (PEM, 0600).
pub const NODE_SVID_FILE: &str = "node-svid.pem";
/// The trust bundle a joining node was given (PEM roots).
pub const BUNDLE_FILE: &str = "bootstrap-bundle.pem";

/// How a data dir became a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// It initialized a new cluster (`ca-node init`, or `run` on an empty data dir).
    Init,
    /// It joined an existing cluster (`ca-node join`).
    Join,
}

/// What [`MARKER_FILE`] records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The Raft ID this data dir belongs to (never changes).
    pub raft_id: u64,
    /// How it became a member.
    pub origin: Origin,
}

pub(crate) fn io_err(what: &str, p: &Path, e: std::io::Error) -> Error {
    Error::Config(format!("{what} {}: {e}", p.display()))
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename), mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_err("cannot write", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err("cannot rename to", path, e))
}

/// Reads the marker of `data_dir`, if any.
pub fn read_marker(data_dir: &Path) -> Result<Option<Marker>, Error> {
    let p = data_dir.join(MARKER_FILE);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Config(format!("{}: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot read", &p, e)),
    }
}

/// Writes the marker of `data_dir`.
pub fn write_marker(data_dir: &Path, m: &Marker) -> Result<(), Error> {
    write_private(
        &data_dir.join(MARKER_FILE),
        &serde_json::to_vec_pretty(m).expect("json"),
    )
}

/// A PKCS#8 private key, wiped from memory when dropped.
pub type SecretKey = zeroize::Zeroizing<Vec<u8>>;

/// Saves the node's serving SVID (chain, leaf first) and its PKCS#8 key.
pub fn save_node_svid(data_dir: &Path, chain: &[Vec<u8>], key_pkcs8: &[u8]) -> Result<(), Error> {
    let mut blocks: Vec<pem::Pem> = chain
        .iter()
        .map(|c| pem::Pem::new("CERTIFICATE", c.clone()))
        .collect();
    blocks.push(pem::Pem::new("PRIVATE KEY", key_pkcs8.to_vec()));
    let text = zeroize::Zeroizing::new(pem::encode_many(&blocks));
    write_private(&data_dir.join(NODE_SVID_FILE), text.as_bytes())
}

/// The saved serving SVID (chain, key), if there is one that has not expired.
pub fn load_node_svid(data_dir: &Path) -> Option<(Vec<Vec<u8>>, SecretKey)> {
    let text =
        zeroize::Zeroizing::new(std::fs::read_to_string(data_dir.join(NODE_SVID_FILE)).ok()?);
    let blocks = pem::parse_many(text.as_bytes()).ok()?;
    let chain: Vec<Vec<u8>> = blocks
        .iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.contents().to_vec())
        .collect();
    let key = blocks
        .iter()
        .find(|b| b.tag() == "PRIVATE KEY")?
        .contents()
        .to_vec()
        .into();
    let info = ca_identity::x509::cert_info(chain.first()?).ok()?;
    (info.not_after > ca_identity::unix_now()).then_some((chain, key))
}

/// Whether `data_dir` holds replicated state already (a node that ran before).
pub fn has_state(data_dir: &Path) -> bool {
    [ca_raft::STATE_DB_FILE, ca_raft::LOG_DB_FILE]
        .iter()
        .any(|f| data_dir.join(f).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_and_svid_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_marker(dir.path()).unwrap(), None);
        let m = Marker {
            raft_id: 7,
            origin: Origin::Join,
        };
        write_marker(dir.path(), &m).unwrap();
        assert_eq!(read_marker(dir.path()).unwrap(), Some(m));
        assert!(load_node_svid(dir.path()).is_none());
        assert!(!has_state(dir.path()));
    }
}
