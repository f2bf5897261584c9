//! The policy file source: load at start, then watch and reload on change.
//!
//! The file is polled (metadata every tick, full content on a change of
//! mtime, size or inode, and every few seconds regardless), which follows
//! atomic renames and Kubernetes ConfigMap symlink swaps alike and needs no
//! platform notification API. A reload happens only when the content hash
//! differs from the installed version, and only once the file has stopped
//! changing (so a file rewritten in place is not read half-written).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{PolicyStore, content_version};

/// How often the file's metadata is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Every this many ticks the content is read even if metadata looks unchanged
/// (coarse mtimes, same-size rewrites).
const FULL_READ_EVERY: u32 = 25;
/// How long a changed file must stay unchanged before it is read.
const SETTLE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

async fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = tokio::fs::metadata(path).await.ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// What one look at the file found.
enum Reload {
    /// Read whole; its content version (installed or rejected).
    Read(String),
    /// Not the size its metadata said: being written.
    Changing,
    Unreadable,
}

/// Reads the file and applies it if its content changed.
async fn reload(
    path: &Path,
    store: &PolicyStore,
    installed: Option<&str>,
    expected_len: u64,
    max_bytes: usize,
) -> Reload {
    let bytes = match read_bounded(path, max_bytes).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the policy file; keeping the current policy");
            return Reload::Unreadable;
        }
    };
    if bytes.len() as u64 != expected_len {
        return Reload::Changing;
    }
    let version = content_version(&bytes);
    if installed == Some(version.as_str()) {
        return Reload::Read(version);
    }
    let Ok(text) = String::from_utf8(bytes) else {
        tracing::error!(path = %path.display(), "the policy file is not UTF-8; keeping the current policy");
        return Reload::Read(version);
    };
    match store.apply(&text, version.clone()) {
        Ok(()) => tracing::info!(path = %path.display(), %version, "policy installed"),
        Err(errors) => {
            tracing::error!(
                path = %path.display(),
                %version,
                count = errors.len(),
                "policy rejected; keeping the current policy"
            );
            for e in &errors {
                tracing::error!("  {e}");
            }
        }
    }
    Reload::Read(version)
}

async fn read_bounded(path: &Path, max_bytes: usize) -> std::io::Result<Vec<u8>> {
    let len = tokio::fs::metadata(path).await?.len();
    if len > max_bytes as u64 {
        return Err(std::io::Error::other(format!(
            "{len} bytes is more than policy.maxBytes ({max_bytes})"
        )));
    }
    tokio::fs::read(path).await
}

/// Loads `path` now, then keeps it in force: runs until the task is dropped.
pub async fn watch(path: PathBuf, store: Arc<PolicyStore>, max_bytes: usize) {
    let mut seen_stamp = None;
    let mut seen_version = None;
    let mut tick = 0u32;
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The first tick completes at once: the file is loaded at start.
        interval.tick().await;
        tick = tick.wrapping_add(1);
        let now = stamp(&path).await;
        let periodic = tick == 1 || tick.is_multiple_of(FULL_READ_EVERY);
        if now == seen_stamp && !periodic {
            continue;
        }
        let Some(expected) = now else {
            if seen_stamp.is_some() || tick == 1 {
                tracing::warn!(path = %path.display(), "no policy file; keeping the current policy");
            }
            seen_stamp = None;
            continue;
        };
        // A file written in place (truncate, then write) can be caught
        // half-written, and an empty or truncated policy may well be valid:
        // read only a file that has stopped changing, and only if what was
        // read is what was there.
        if tick != 1 {
            tokio::time::sleep(SETTLE).await;
            if stamp(&path).await != now {
                continue;
            }
        }
        match reload(
            &path,
            &store,
            seen_version.as_deref(),
            expected.len,
            max_bytes,
        )
        .await
        {
            Reload::Read(version) => {
                seen_stamp = now;
                seen_version = Some(version);
            }
            // Try again at the next tick.
            Reload::Changing | Reload::Unreadable => seen_stamp = None,
        }
    }
}
