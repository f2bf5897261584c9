//! Secrets on disk stay private to the sidecar: the files it reads (a key,
//! a bootstrap token) must not be readable by anyone else, and the
//! directories it keeps state in (keys, certificates, the policy cache)
//! are made 0700. The files it writes there go through
//! `pylon_proto::fs::write_atomic` with mode 0600.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// The mode of the files the sidecar keeps in its state directory.
pub const PRIVATE_FILE: u32 = 0o600;
/// The mode of the state directory.
const PRIVATE_DIR: u32 = 0o700;

/// `Err` (saying what to do) when the file at `path` (called `what`) can be
/// read by its group or by others. A missing file is not this check's
/// business: whoever reads it says so.
pub fn check_private(path: &Path, what: &str) -> Result<(), String> {
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{what} {}: {e}", path.display())),
    };
    if mode & 0o044 != 0 {
        return Err(format!(
            "{what} {} is readable by others (mode {:04o}): a secret must be readable by its owner alone (chmod 600 {})",
            path.display(),
            mode & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

/// Whether the file at `path` can be read by its group or by others.
pub fn readable_by_others(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
}

/// Creates `dir` (and its parents) when absent, then makes it 0700. A
/// directory the sidecar does not own (a volume mounted by someone else)
/// keeps its mode, with a warning: the files in it are 0600 anyway.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != PRIVATE_DIR
        && let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR))
    {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{mode:04o}"),
            error = %e,
            "cannot make the state directory private (0700); its files stay 0600"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pylon-secrets-{tag}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_secret_readable_by_others_is_refused() {
        let dir = scratch("check");
        let key = dir.join("id.key");
        std::fs::write(&key, "k").unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, false), (0o604, false)] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let result = check_private(&key, "identity.files.key");
            assert_eq!(result.is_ok(), ok, "{mode:o}: {result:?}");
            assert_eq!(readable_by_others(&key), !ok);
        }
        let e = check_private(&key, "identity.files.key").unwrap_err();
        assert!(e.contains("readable by others (mode 0604)"), "{e}");
        assert!(check_private(&dir.join("absent"), "token").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_directories_are_made_private() {
        let dir = scratch("dir");
        let state = dir.join("a").join("state");
        private_dir(&state).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
