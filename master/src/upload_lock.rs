//! The per-machine closure-send lock: Nix's convention (nix-interfaces.md
//! §4.2 step 7), so that two copies from one master to one machine (nixq's
//! or Nix's own hook) do not send the same closure at once.
//!
//! An exclusive `flock` on `<state dir>/current-load/<uri, every / as _>.upload-lock`,
//! waiting at most [`MAX_WAIT`]; then, as Nix does, the copy goes ahead
//! without it. A directory that cannot be created or written costs a
//! warning, not the copy: the agent's path claims still keep each path from
//! crossing the wire twice.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixq_common::store::lock::flock_exclusive;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

/// How long to wait for another sender's lock: Nix's 15 minutes, after
/// which it reports "somebody is hogging the upload lock" and goes on.
pub const MAX_WAIT: Duration = Duration::from_secs(15 * 60);

/// Nix's state directory unless `NIX_STATE_DIR` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/nix/var/nix";

/// File names longer than this are shortened: most file systems allow 255
/// bytes per name.
const MAX_NAME_LEN: usize = 255;

/// First polling interval while the lock is held by someone else, doubling
/// to [`MAX_POLL`]: a short copy by another process ends within
/// milliseconds, a long one is not hurt by a quarter-second delay.
const FIRST_POLL: Duration = Duration::from_millis(5);
const MAX_POLL: Duration = Duration::from_millis(250);

/// The current-load directory: `$NIX_STATE_DIR/current-load`.
pub fn current_load_dir() -> PathBuf {
    let state = std::env::var_os("NIX_STATE_DIR")
        .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from);
    state.join("current-load")
}

/// The lock file's name for the machine `uri` (written exactly as in the
/// machines file): every `/` replaced by `_`, then `.upload-lock`. A name
/// too long for the file system becomes, as in Lix, the first 48
/// characters, `-`, and 16 characters of the URI's hex SHA-256.
pub fn lock_file_name(uri: &str) -> String {
    let escaped = uri.replace('/', "_");
    let name = format!("{escaped}.upload-lock");
    if name.len() <= MAX_NAME_LEN {
        return name;
    }
    let prefix: String = escaped.chars().take(48).collect();
    let digest = Sha256::digest(uri.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}.upload-lock")
}

/// A held (or, after a warning, skipped) upload lock; released on drop.
#[derive(Debug)]
pub struct UploadLock {
    /// `None` when the lock could not be taken and the copy goes on
    /// without it.
    file: Option<File>,
    /// Why there is no lock, for a warning.
    pub warning: Option<String>,
}

impl UploadLock {
    pub fn is_held(&self) -> bool {
        self.file.is_some()
    }
}

/// Takes the upload lock for `uri` in `dir`, waiting at most `max_wait`.
/// Never fails: a problem gives an unheld lock with a warning.
pub async fn acquire(dir: &Path, uri: &str, max_wait: Duration) -> UploadLock {
    let path = dir.join(lock_file_name(uri));
    let file = match open(dir, &path) {
        Ok(file) => file,
        Err(e) => {
            return UploadLock {
                file: None,
                warning: Some(format!(
                    "cannot use the upload lock {}: {e}; copying without it",
                    path.display()
                )),
            }
        }
    };
    let deadline = Instant::now() + max_wait;
    let mut poll = FIRST_POLL;
    loop {
        match flock_exclusive(&file, false) {
            Ok(true) => {
                return UploadLock {
                    file: Some(file),
                    warning: None,
                }
            }
            Ok(false) => {}
            Err(e) => {
                return UploadLock {
                    file: None,
                    warning: Some(format!(
                        "cannot lock {}: {e}; copying without it",
                        path.display()
                    )),
                }
            }
        }
        if Instant::now() >= deadline {
            return UploadLock {
                file: None,
                warning: Some(format!(
                    "somebody is hogging the upload lock {}; continuing",
                    path.display()
                )),
            };
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(MAX_POLL);
    }
}

/// Opens (creating) the lock file, creating the directory mode 0777 as Nix
/// does so that every user's hooks share it.
fn open(dir: &Path, path: &Path) -> io::Result<File> {
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o777)
            .create(dir)?;
        // The umask trimmed the mode; Nix's directory is world-writable.
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_nix() {
        assert_eq!(
            lock_file_name("nixq://s1:7461"),
            "nixq:__s1:7461.upload-lock"
        );
        assert_eq!(
            lock_file_name("local?root=/data/b1"),
            "local?root=_data_b1.upload-lock"
        );
        let long = format!("nixq://{}", "h".repeat(300));
        let name = lock_file_name(&long);
        assert!(name.len() <= MAX_NAME_LEN);
        assert!(name.starts_with("nixq:__hhh"));
        assert!(name.ends_with(".upload-lock"));
        assert_ne!(name, lock_file_name(&format!("{long}x")));
    }

    #[tokio::test]
    async fn second_holder_waits_then_gives_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let load = dir.path().join("current-load");
        let first = acquire(&load, "nixq://a", MAX_WAIT).await;
        assert!(first.is_held(), "{:?}", first.warning);
        let mode = std::fs::metadata(&load).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o777);
        let second = acquire(&load, "nixq://a", Duration::from_millis(30)).await;
        assert!(!second.is_held());
        assert!(second
            .warning
            .as_deref()
            .is_some_and(|w| w.contains("hogging")));
        // Another machine's lock is independent.
        assert!(acquire(&load, "nixq://b", Duration::ZERO).await.is_held());
        drop(first);
        assert!(acquire(&load, "nixq://a", Duration::ZERO).await.is_held());
    }

    #[tokio::test]
    async fn unwritable_directory_is_a_warning() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"").expect("file");
        let lock = acquire(&file.join("current-load"), "nixq://a", MAX_WAIT).await;
        assert!(!lock.is_held());
        assert!(lock.warning.is_some());
    }
}
