//! Files that hold a secret (an HSM PIN, a join token): read only if they are regular files
//! that neither group nor others can access, like ssh does with private keys.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The contents of the secret file at `path`, described as `what` in errors (e.g. "PIN file
/// (pin_file)"). Refused, with what to do, when it is not a regular file or its mode gives
/// group or others any access.
pub fn read(path: &Path, what: &str) -> Result<String, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {what} {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{what} {shown} is not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {shown} is accessible by group or others (mode {mode:04o}); refusing it: chmod 600 it"
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {what} {shown}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_owner_only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "s3cret\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o700 | 0o001] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read(&f, "join token file").unwrap_err();
            assert!(
                e.contains("group or others") && e.contains("chmod 600"),
                "{mode:o}: {e}"
            );
        }
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read(&f, "join token file").unwrap(), "s3cret\n");
        let e = read(dir.path(), "join token file").unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let e = read(&dir.path().join("absent"), "join token file").unwrap_err();
        assert!(e.contains("cannot read join token file"), "{e}");
    }
}
