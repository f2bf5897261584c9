//! Files replaced in one step, with the mode they are meant to have: the
//! sidecar's key, certificate, trust bundle and policy cache, the control
//! plane's CA state, bundle and admin token.
//!
//! The new contents go to a temp file of their own next to the target
//! (`.<name>.tmp-<pid>-<n>`), created with `O_EXCL` and the final mode, so
//! no other file's temp name, and no stale temp file left by a crash, can
//! lend it a wider mode; then it is synced, renamed over the target, and the
//! directory is synced so the rename survives a crash too. A reader sees
//! the old file or the new one, never a mix.
//!
//! The mode is given at creation, so the umask still narrows it (as for any
//! file the process creates); a key asked for as 0600 is never readable by
//! anyone else. Not here: directory modes, checks of existing files' modes.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes the temp files of one process.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `contents`, the new file created with `mode`
/// (e.g. `0o600` for a key).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let (tmp, mut file) = create_temp(dir, &name.to_string_lossy(), mode)?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    drop(file);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

/// A new temp file in `dir` for the file `name`, opened for writing with
/// `mode`. A file already at the name (left by an earlier process with the
/// same pid) is removed and the name tried again.
fn create_temp(dir: &Path, name: &str, mode: u32) -> io::Result<(PathBuf, File)> {
    let tmp = temp_name(dir, name, NEXT_TEMP.fetch_add(1, Ordering::Relaxed));
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
    };
    match open() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(&tmp)?;
            open().map(|f| (tmp.clone(), f))
        }
        result => result.map(|f| (tmp.clone(), f)),
    }
}

fn temp_name(dir: &Path, name: &str, n: u64) -> PathBuf {
    dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pylon-fs-{tag}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_the_file_whole_and_leaves_no_temp_file() {
        let dir = scratch("replace");
        let path = dir.join("policy-cache.yaml");
        write_atomic(&path, b"one", 0o644).unwrap();
        write_atomic(&path, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(entries(&dir), ["policy-cache.yaml"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_is_private_even_over_a_readable_file() {
        let dir = scratch("key");
        let key = dir.join("identity.key");
        std::fs::write(&key, b"old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&key, b"secret", 0o600).unwrap();
        assert_eq!(mode_of(&key), 0o600);
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_readable_temp_files_lend_the_key_no_mode() {
        let dir = scratch("stale");
        let key = dir.join("identity.key");
        // Temp files a crashed process with this pid might have left, under
        // the names the next writes would use.
        let next = NEXT_TEMP.load(Ordering::Relaxed);
        for n in next..next + 64 {
            let stale = temp_name(&dir, "identity.key", n);
            std::fs::write(&stale, b"stale").unwrap();
            std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        write_atomic(&key, b"secret", 0o600).unwrap();
        assert_eq!(mode_of(&key), 0o600);
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_with_one_stem_do_not_share_a_temp_file() {
        let dir = scratch("stem");
        let (key, cert) = (dir.join("ca.json"), dir.join("ca.pem"));
        write_atomic(&key, b"key", 0o600).unwrap();
        write_atomic(&cert, b"cert", 0o644).unwrap();
        assert_eq!(mode_of(&key), 0o600);
        assert_eq!(std::fs::read(&key).unwrap(), b"key");
        assert_eq!(entries(&dir), ["ca.json", "ca.pem"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = scratch("missing");
        let path = dir.join("absent").join("file");
        assert_eq!(
            write_atomic(&path, b"x", 0o600).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(write_atomic(Path::new("/"), b"x", 0o600).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
