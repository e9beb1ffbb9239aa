//! Unix sockets the CA serves on (the agent's Workload API, a node's admin API). Whoever
//! can write to a socket's directory, or to a directory above it, can replace the socket
//! with their own and answer the callers. [`bind`] creates a missing directory with the
//! mode asked for ([`prepare_dir`]), refuses one that someone else could tamper with
//! ([`check_dir`]), never takes over a socket a live process answers on, and sets the
//! socket's mode:
//!
//! - the socket's own directory must be owned by this process's user or root and writable
//!   by nobody else (no group or other write bit);
//! - every directory above it must be owned by this user or root, and may be writable by
//!   others only with the sticky bit (as `/tmp` is: others cannot rename what is ours).

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Why a socket directory is refused, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsafe(pub String);

const STICKY: u32 = 0o1000;

/// Listens on `path` for the service named `what` (in messages): prepares its directory
/// ([`prepare_dir`] with `dir_mode`), removes a stale socket file, refuses to take over a
/// socket another process still answers on or a file that is not a socket, and gives the
/// socket `socket_mode`.
pub async fn bind(
    path: &Path,
    dir_mode: u32,
    socket_mode: u32,
    what: &str,
) -> Result<UnixListener, Unsafe> {
    prepare_dir(path, dir_mode)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(Unsafe(format!(
                    "{} is in use by a running process (another {what}?); stop it or choose another socket path",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(|e| {
                Unsafe(format!(
                    "cannot remove the stale socket {}: {e}",
                    path.display()
                ))
            })?;
        }
        Ok(_) => {
            return Err(Unsafe(format!(
                "{} exists and is not a socket; remove it or choose another socket path",
                path.display()
            )))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| Unsafe(format!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode)).map_err(|e| {
        Unsafe(format!(
            "cannot set the permissions of {}: {e}",
            path.display()
        ))
    })?;
    Ok(listener)
}

/// The directory `socket` is in (the current one for a bare file name).
fn dir_of(socket: &Path) -> Result<PathBuf, Unsafe> {
    match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => Ok(d.to_path_buf()),
        _ => std::env::current_dir()
            .map_err(|e| Unsafe(format!("cannot read the current directory: {e}"))),
    }
}

/// Creates `socket`'s directory (with `mode`, parents too) if it is missing, then checks
/// that no other user can replace the socket ([`check_dir`]).
pub fn prepare_dir(socket: &Path, mode: u32) -> Result<(), Unsafe> {
    let dir = dir_of(socket)?;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&dir)
            .map_err(|e| {
                Unsafe(format!(
                    "cannot create the socket directory {}: {e}; create it (owned by the service's user, mode {mode:o}) or choose another path",
                    dir.display()
                ))
            })?;
        // The process umask may have cleared bits the mode asked for.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).map_err(|e| {
            Unsafe(format!(
                "cannot set the mode of the socket directory {}: {e}",
                dir.display()
            ))
        })?;
    }
    check_dir(&dir, nix::unistd::geteuid().as_raw())
}

/// Checks a socket a client is about to trust with its requests (the admin socket, for
/// `ca-node` commands): a socket, owned by the client's `uid` or root (a root client also
/// accepts the owner of the socket's directory, the service's user), in a directory that
/// passes [`check_dir`] for that owner. Otherwise someone else could be answering.
pub fn check_socket(path: &Path, uid: u32) -> Result<(), Unsafe> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| Unsafe(format!("cannot read {}: {e}", path.display())))?;
    if !meta.file_type().is_socket() {
        return Err(Unsafe(format!("{} is not a socket", path.display())));
    }
    let owner = meta.uid();
    let dir = dir_of(path)?;
    let dir_owner = std::fs::metadata(&dir)
        .map_err(|e| Unsafe(format!("cannot read {}: {e}", dir.display())))?
        .uid();
    let trusted = owner == uid || owner == 0 || (uid == 0 && owner == dir_owner);
    if !trusted {
        return Err(Unsafe(format!(
            "{} is owned by user ID {owner}, not by you ({uid}) or root: it may not be the service's; run the command as the service's user",
            path.display()
        )));
    }
    check_dir(&dir, owner)
}

/// Checks `dir` (the socket's own directory) and its ancestors for a process running as
/// `uid`.
pub fn check_dir(dir: &Path, uid: u32) -> Result<(), Unsafe> {
    let dir = dir.canonicalize().map_err(|e| {
        Unsafe(format!(
            "cannot resolve the socket directory {}: {e}",
            dir.display()
        ))
    })?;
    let owned = |p: &PathBuf, m: &std::fs::Metadata| -> Result<(), Unsafe> {
        if m.uid() != uid && m.uid() != 0 {
            return Err(Unsafe(format!(
                "{} is owned by user ID {}, not by this service's user ({uid}) or root: that user could replace the socket; use a directory of your own (e.g. under /run)",
                p.display(),
                m.uid()
            )));
        }
        Ok(())
    };
    let meta = std::fs::metadata(&dir)
        .map_err(|e| Unsafe(format!("cannot read {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(Unsafe(format!("{} is not a directory", dir.display())));
    }
    owned(&dir, &meta)?;
    if meta.mode() & 0o022 != 0 {
        return Err(Unsafe(format!(
            "the socket directory {} (mode {:o}) is writable by group or others, who could replace the socket: chmod go-w {}",
            dir.display(),
            meta.mode() & 0o7777,
            dir.display()
        )));
    }
    for up in dir.ancestors().skip(1) {
        let up = up.to_path_buf();
        let m = std::fs::metadata(&up)
            .map_err(|e| Unsafe(format!("cannot read {}: {e}", up.display())))?;
        owned(&up, &m)?;
        if m.mode() & 0o002 != 0 && m.mode() & STICKY == 0 {
            return Err(Unsafe(format!(
                "{} (mode {:o}) is writable by everyone without the sticky bit: anyone could replace the socket's directory; use another path",
                up.display(),
                m.mode() & 0o7777
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn creates_a_missing_directory_with_its_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("a/b/agent.sock");
        prepare_dir(&sock, 0o755).unwrap();
        let m = std::fs::metadata(tmp.path().join("a/b")).unwrap().mode() & 0o7777;
        assert_eq!(m, 0o755);
        prepare_dir(&tmp.path().join("private/admin.sock"), 0o700).unwrap();
        let m = std::fs::metadata(tmp.path().join("private"))
            .unwrap()
            .mode()
            & 0o7777;
        assert_eq!(m, 0o700);
    }

    #[test]
    fn refuses_directories_others_could_write() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let dir = tmp.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        mode(&dir, 0o775);
        let err = check_dir(&dir, uid).unwrap_err().0;
        assert!(err.contains("writable by group or others"), "{err}");
        assert!(err.contains("chmod go-w"), "{err}");
        mode(&dir, 0o755);
        check_dir(&dir, uid).unwrap();
        // An ancestor everyone may write, without the sticky bit.
        mode(tmp.path(), 0o777);
        let err = check_dir(&dir, uid).unwrap_err().0;
        assert!(err.contains("without the sticky bit"), "{err}");
        // With it (like /tmp), fine.
        mode(tmp.path(), 0o1777);
        check_dir(&dir, uid).unwrap();
        mode(tmp.path(), 0o700);
        // A directory owned by another user.
        if uid == 0 {
            let other = nix::unistd::Uid::from_raw(4242);
            nix::unistd::chown(&dir, Some(other), None).unwrap();
            let err = check_dir(&dir, 0).unwrap_err().0;
            assert!(err.contains("owned by user ID 4242"), "{err}");
            nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        } else {
            let err = check_dir(&dir, uid + 4242).unwrap_err().0;
            assert!(err.contains(&format!("owned by user ID {uid}")), "{err}");
        }
        // Not a directory.
        let file = tmp.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(check_dir(&file, uid)
            .unwrap_err()
            .0
            .contains("not a directory"));
    }

    /// A client refuses a socket someone else could have put there.
    #[tokio::test]
    async fn clients_check_the_socket_they_trust() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let sock = tmp.path().join("d/admin.sock");
        let _listener = bind(&sock, 0o700, 0o600, "test").await.unwrap();
        check_socket(&sock, uid).unwrap();
        mode(&tmp.path().join("d"), 0o777);
        let err = check_socket(&sock, uid).unwrap_err().0;
        assert!(err.contains("writable by group or others"), "{err}");
        mode(&tmp.path().join("d"), 0o700);
        let file = tmp.path().join("d/plain");
        std::fs::write(&file, "").unwrap();
        assert!(check_socket(&file, uid)
            .unwrap_err()
            .0
            .contains("not a socket"));
        if uid != 0 {
            let err = check_socket(&sock, uid + 4242).unwrap_err().0;
            assert!(err.contains("not by you"), "{err}");
        }
    }
}
