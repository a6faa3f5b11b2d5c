//! Nix's per-path locks: `flock(LOCK_EX)` on `<store path>.lock` (§8).
//!
//! Taking the same lock as Nix means nixq never writes a path that a Nix
//! process on the same machine is building or importing, and vice versa.
//! The algorithm is Nix's (`libstore/pathlocks.cc`): open or create the lock
//! file (mode 0600, close-on-exec), lock it, and if it is not empty a previous
//! holder deleted it while we waited ("stale"): open it again.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// Stale lock files are retried this many times before giving up; in
/// practice one retry is enough, the bound only rules out a livelock.
const MAX_STALE_RETRIES: u32 = 1000;

/// An exclusive lock on one store path. Released on drop; the lock file is
/// deleted only by [`PathLock::release_and_delete`].
#[derive(Debug)]
pub struct PathLock {
    file: File,
    lock_path: PathBuf,
}

impl PathLock {
    /// The lock file of a store path: `<path>.lock`.
    pub fn lock_path_of(store_path: &Path) -> PathBuf {
        let mut p = store_path.as_os_str().to_owned();
        p.push(".lock");
        PathBuf::from(p)
    }

    /// Block until the lock is ours. Call from a blocking thread.
    pub fn acquire(store_path: &Path) -> io::Result<Self> {
        Self::lock(store_path, true)?.ok_or_else(|| io::Error::other("lock not acquired"))
    }

    /// Take the lock if nobody holds it; `None` if somebody does.
    pub fn try_acquire(store_path: &Path) -> io::Result<Option<Self>> {
        Self::lock(store_path, false)
    }

    fn lock(store_path: &Path, wait: bool) -> io::Result<Option<Self>> {
        let lock_path = Self::lock_path_of(store_path);
        for _ in 0..MAX_STALE_RETRIES {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&lock_path)?;
            if !flock_exclusive(&file, wait)? {
                return Ok(None);
            }
            if file.metadata()?.len() == 0 {
                return Ok(Some(Self { file, lock_path }));
            }
            // A previous holder deleted this file and marked it stale.
        }
        Err(io::Error::other(format!(
            "lock file {} stayed stale after {MAX_STALE_RETRIES} attempts",
            lock_path.display()
        )))
    }

    /// Release the lock and delete the lock file the way Nix does after a
    /// successful build or import: unlink it, then mark the still-open file
    /// stale so that a process already waiting on it retries.
    pub fn release_and_delete(mut self) -> io::Result<()> {
        std::fs::remove_file(&self.lock_path)?;
        self.file.write_all(b"d")?;
        Ok(())
    }
}

/// An exclusive `flock` on `file`. With `wait`, blocks until it is granted;
/// without, `Ok(false)` means another open file description holds it.
/// Interrupted calls are retried.
pub fn flock_exclusive(file: &File, wait: bool) -> io::Result<bool> {
    let op = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock on a descriptor owned by `file`, which outlives the
        // call; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) if !wait => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}

/// Releases an `flock` held through `file` (closing it does the same).
pub fn funlock(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_and_stale_aware() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p");
        let held = PathLock::acquire(&path).expect("lock");
        assert!(PathLock::try_acquire(&path).expect("try").is_none());
        held.release_and_delete().expect("release");
        assert!(!PathLock::lock_path_of(&path).exists());
        let again = PathLock::try_acquire(&path).expect("try").expect("free");
        drop(again);
        // Dropping without delete leaves an empty, reusable lock file.
        assert!(PathLock::lock_path_of(&path).exists());
        assert!(PathLock::try_acquire(&path).expect("try").is_some());
    }

    #[test]
    fn waiter_skips_a_stale_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p");
        let held = PathLock::acquire(&path).expect("lock");
        let p2 = path.clone();
        let waiter = std::thread::spawn(move || PathLock::acquire(&p2).map(|_| ()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        held.release_and_delete().expect("release");
        waiter
            .join()
            .expect("thread")
            .expect("acquired after stale retry");
    }
}
