//! The checks `serve` makes on its data directory before it reads a byte
//! of it: the directory is created readable by its owner only (0700); a
//! secret in it (the CA state with its keys, the admin token, the store
//! with token hashes and the deny list) that another user could read is
//! refused, as is a store with no CA state beside it (a new CA there would
//! split the mesh's trust).
//!
//! Not here: writing the files ([`pylon_proto::fs::write_atomic`] gives
//! new ones their mode), what they hold.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::ca::DataFiles;

/// The store file in a data directory.
pub const STORE_FILE: &str = "store.redb";

/// Creates `dir` (0700, with any missing parent) unless it exists, then
/// checks what it holds. `operator_ca`: the operator gave a CA to start
/// with, which may stand in for a missing CA state.
pub fn prepare(dir: &Path, files: &DataFiles, operator_ca: bool) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create the data directory {}: {e}", dir.display()))?;
    let store = dir.join(STORE_FILE);
    for (path, what) in [
        (&files.state, "the CA state (its private keys)"),
        (&files.admin_token, "the admin token"),
        (&store, "the store (token hashes, the deny list)"),
    ] {
        check_private(path, what)?;
    }
    if store.exists() && !files.state.exists() && !files.has_legacy_ca() && !operator_ca {
        anyhow::bail!(
            "{} is missing, but {} holds a store ({}): refusing to make a new CA, which \
             no sidecar of this mesh would trust. Restore ca.json from a backup of the data \
             directory, or start with --ca-cert/--ca-key to give the CA explicitly",
            files.state.display(),
            dir.display(),
            store.display()
        );
    }
    Ok(())
}

/// Refuses a file that a group or others may read or write.
pub fn check_private(path: &Path, what: &str) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{} ({what}) has mode {mode:04o}: other users may read it. Refusing to start; \
             make it private with `chmod 600 {}` (and check who may have read it)",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pylon-data-dir-{tag}-{}-{}",
            std::process::id(),
            fastrand_u32()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn fastrand_u32() -> u32 {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 4];
        ring::rand::SystemRandom::new().fill(&mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_directory_is_private_and_an_empty_one_passes() {
        let root = scratch("new");
        let dir = root.join("a").join("data");
        prepare(&dir, &DataFiles::in_dir(&dir), false).unwrap();
        assert_eq!(mode(&dir), 0o700);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_readable_secret_is_refused_with_the_fix() {
        let dir = scratch("readable");
        let files = DataFiles::in_dir(&dir);
        std::fs::write(&files.state, "{}").unwrap();
        for (m, refused) in [
            (0o600, false),
            (0o400, false),
            (0o640, true),
            (0o604, true),
            (0o620, true),
        ] {
            std::fs::set_permissions(&files.state, std::fs::Permissions::from_mode(m)).unwrap();
            let result = prepare(&dir, &files, false);
            assert_eq!(result.is_err(), refused, "{m:o}: {result:?}");
            if let Err(e) = result {
                let e = e.to_string();
                assert!(e.contains("chmod 600") && e.contains("ca.json"), "{e}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_without_its_ca_state_is_refused() {
        let dir = scratch("no-ca");
        let files = DataFiles::in_dir(&dir);
        std::fs::write(dir.join(STORE_FILE), "").unwrap();
        std::fs::set_permissions(dir.join(STORE_FILE), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let e = prepare(&dir, &files, false).unwrap_err().to_string();
        assert!(
            e.contains("ca.json is missing") && e.contains("backup"),
            "{e}"
        );
        prepare(&dir, &files, true).unwrap();
        std::fs::write(&files.state, "{}").unwrap();
        std::fs::set_permissions(&files.state, std::fs::Permissions::from_mode(0o600)).unwrap();
        prepare(&dir, &files, false).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
