//! The master's build-slot bookkeeping, shared with every hook on the host:
//! Nix's `current-load` lock files (nix-interfaces.md §4.2) and nixq's
//! "machine down" back-off file beside them.
//!
//! # Nix's conventions (§4.2), followed exactly so that nixq's hook and
//! Nix's own `build-remote` never overbook a machine between them
//!
//! * The directory is `<state dir>/current-load` (`/nix/var/nix/current-load`
//!   for a local store), created mode 0777; lock files are created mode 0600.
//! * `main-lock` is held (exclusive `flock`) while a hook looks at the slots
//!   and picks one, so that two hooks never pick the same free slot.
//! * Slot `n` of a machine is the file `<uri with every / replaced by _>-<n>`,
//!   for `n` in `0 .. max_jobs`; a slot is taken while some process holds an
//!   exclusive `flock` on it. A hook keeps its slot's lock for its whole life
//!   and sets the file's mtime when it takes it.
//!
//! # The back-off file (nixq only)
//!
//! [`DOWN_FILE`] remembers machines that could not be reached, so that every
//! later hook on the master skips them until their back-off expires instead
//! of each paying a connection timeout. One line per machine:
//! `<until, seconds since the epoch> <consecutive failures> <uri>`. It is read
//! and rewritten (atomically, by rename) under `main-lock`. The format and the
//! back-off rule are pure ([`DownState`], [`backoff`]); a damaged file is
//! read as far as it makes sense and rewritten whole.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nixq_common::store::lock::{flock_exclusive, funlock};

/// The lock every hook holds while it chooses a slot (§4.2 step 1).
pub const MAIN_LOCK: &str = "main-lock";

/// nixq's back-off state file in the current-load directory. Its name has no
/// `-<digits>` suffix, so it can never be taken for a slot of some machine.
pub const DOWN_FILE: &str = "nixq-machines-down";

/// First back-off after a machine could not be reached: long enough that a
/// burst of "try" requests (Nix asks once per derivation, many per second)
/// pays the connection timeout once, short enough that a restarted agent is
/// used again soon.
pub const BACKOFF_BASE: Duration = Duration::from_secs(10);

/// The longest back-off: a machine that has been down for hours is still
/// retried every few minutes.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10 * 60);

/// Entries whose back-off ended this long ago are forgotten, which bounds
/// the file for machines that were removed from the machines file.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// How long [`LoadDir::lock_main`] waits. Nix's hooks hold `main-lock` only
/// for the few milliseconds of a choice; a holder for this long is stuck,
/// and Nix's scheduler waits on our reply meanwhile (§2.5).
pub const MAIN_LOCK_WAIT: Duration = Duration::from_secs(30);

const FIRST_POLL: Duration = Duration::from_millis(2);
const MAX_POLL: Duration = Duration::from_millis(100);

/// A machine URI as Nix escapes it for lock-file names: every `/` becomes
/// `_` (§4.2; observed: `local?root=/data/b1` → `local?root=_data_b1`).
pub fn escape_uri(uri: &str) -> String {
    uri.replace('/', "_")
}

/// The file name of slot `slot` of the machine `uri`: `<escaped uri>-<slot>`.
pub fn slot_file_name(uri: &str, slot: u32) -> String {
    format!("{}-{slot}", escape_uri(uri))
}

/// The current-load directory of a local store: `$NIX_STATE_DIR/current-load`,
/// else `/nix/var/nix/current-load` (§4.2).
pub fn default_load_dir() -> PathBuf {
    crate::upload_lock::current_load_dir()
}

/// The current-load directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadDir {
    dir: PathBuf,
}

/// What the slot files of one machine say.
#[derive(Debug)]
pub struct SlotProbe {
    /// Slots held by other processes.
    pub load: u32,
    /// The first free slot, now locked by us; `None` if all are taken.
    pub free: Option<SlotLock>,
}

/// A slot of a machine, locked by this process until dropped.
#[derive(Debug)]
pub struct SlotLock {
    file: File,
    path: PathBuf,
    slot: u32,
}

impl SlotLock {
    pub fn slot(&self) -> u32 {
        self.slot
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the slot file's mtime to now, as Nix does when it takes a slot
    /// (§4.2 step 4); tools read it as "busy since".
    pub fn touch(&self) -> io::Result<()> {
        // SAFETY: the fd is open for the lifetime of `self.file`; a null
        // times pointer means "now" for both timestamps.
        let rc = unsafe { libc::futimens(self.file.as_raw_fd(), std::ptr::null()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// `main-lock`, held until dropped.
#[derive(Debug)]
pub struct MainLock {
    _file: File,
}

impl LoadDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Takes `main-lock`, creating the directory (mode 0777) if needed.
    /// Waits at most `max_wait`; a holder that long is stuck, and the error
    /// says so.
    pub fn lock_main(&self, max_wait: Duration) -> io::Result<MainLock> {
        let file = self.open(MAIN_LOCK)?;
        let deadline = Instant::now() + max_wait;
        let mut poll = FIRST_POLL;
        loop {
            if flock_exclusive(&file, false)? {
                return Ok(MainLock { _file: file });
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} has been locked by another process for {max_wait:?}",
                        self.dir.join(MAIN_LOCK).display()
                    ),
                ));
            }
            std::thread::sleep(poll);
            poll = (poll * 2).min(MAX_POLL);
        }
    }

    /// Looks at the slots `0 .. max_jobs` of machine `uri` (§4.2 step 2):
    /// counts those locked by others and keeps the first free one locked.
    /// Call it with [`MainLock`] held.
    pub fn probe(&self, uri: &str, max_jobs: u32) -> io::Result<SlotProbe> {
        let mut load = 0;
        let mut free = None;
        for slot in 0..max_jobs {
            let name = slot_file_name(uri, slot);
            let file = self.open(&name)?;
            if flock_exclusive(&file, false)? {
                if free.is_none() {
                    free = Some(SlotLock {
                        file,
                        path: self.dir.join(name),
                        slot,
                    });
                }
                // Other free slots are released as `file` drops.
            } else {
                load += 1;
            }
        }
        Ok(SlotProbe { load, free })
    }

    /// Opens the slot files `0 .. max_jobs` of each `(uri, max_jobs)` for
    /// [`SlotWatch::any_free`], without locking them.
    pub fn watch<'u>(
        &self,
        machines: impl IntoIterator<Item = (&'u str, u32)>,
    ) -> io::Result<SlotWatch> {
        let mut files = Vec::new();
        for (uri, max_jobs) in machines {
            for slot in 0..max_jobs {
                files.push(self.open(&slot_file_name(uri, slot))?);
            }
        }
        Ok(SlotWatch { files })
    }

    /// Reads the back-off file; a missing file is an empty state.
    pub fn read_down(&self) -> io::Result<DownState> {
        match std::fs::read_to_string(self.dir.join(DOWN_FILE)) {
            Ok(text) => Ok(DownState::parse(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(DownState::default()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the back-off file atomically (write a temporary file, then
    /// rename). Call it with [`MainLock`] held.
    pub fn write_down(&self, state: &DownState) -> io::Result<()> {
        self.ensure_dir()?;
        let target = self.dir.join(DOWN_FILE);
        let temp = self
            .dir
            .join(format!("{DOWN_FILE}.tmp-{}", std::process::id()));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&temp)?;
        file.write_all(state.render().as_bytes())?;
        drop(file);
        std::fs::rename(&temp, &target).inspect_err(|_| {
            let _ = std::fs::remove_file(&temp);
        })
    }

    /// Under `main-lock`: updates the back-off file with `change`.
    pub fn update_down(&self, change: impl FnOnce(&mut DownState)) -> io::Result<()> {
        let _main = self.lock_main(MAIN_LOCK_WAIT)?;
        let mut state = self.read_down()?;
        let before = state.clone();
        change(&mut state);
        if state != before {
            self.write_down(&state)?;
        }
        Ok(())
    }

    fn ensure_dir(&self) -> io::Result<()> {
        if !self.dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o777)
                .create(&self.dir)?;
            // The umask may have narrowed the mode; Nix wants 0777 so that
            // every user's Nix can take slots.
            let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o777));
        }
        Ok(())
    }

    fn open(&self, name: &str) -> io::Result<File> {
        self.ensure_dir()?;
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.dir.join(name))
    }
}

/// Slot files watched, without `main-lock`, for one to become free (a hook
/// that would answer `# postpone` waits a little for a slot, see
/// [`crate::hook::run`]). Taking a slot stays the business of
/// [`LoadDir::probe`] under `main-lock`: a free slot seen here is released
/// at once, and the caller chooses again.
#[derive(Debug)]
pub struct SlotWatch {
    files: Vec<File>,
}

impl SlotWatch {
    /// Whether some watched slot is free now. Each check holds the slot's
    /// lock for the length of two system calls; a hook choosing at that
    /// very moment sees it as taken, as it would a moment earlier.
    pub fn any_free(&self) -> io::Result<bool> {
        for file in &self.files {
            if flock_exclusive(file, false)? {
                funlock(file)?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Releases a `flock` taken by [`try_flock`].
/// Seconds since the epoch, the clock of [`DownState`].
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The back-off after `failures` consecutive failures (at least 1):
/// [`BACKOFF_BASE`] doubled per further failure, at most [`BACKOFF_MAX`].
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_BASE
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX)
}

/// One machine that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownEntry {
    /// Skip the machine until this time (seconds since the epoch).
    pub until: u64,
    /// Consecutive failures so far.
    pub failures: u32,
}

/// The content of [`DOWN_FILE`]: machines that failed, by URI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownState {
    entries: BTreeMap<String, DownEntry>,
}

impl DownState {
    /// Reads the file's text. Lines that do not have the expected shape are
    /// dropped (the file is advisory; the next write repairs it).
    pub fn parse(text: &str) -> Self {
        let mut entries = BTreeMap::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(until), Some(failures), Some(uri), None) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                continue;
            };
            let (Ok(until), Ok(failures)) = (until.parse(), failures.parse()) else {
                continue;
            };
            entries.insert(uri.to_owned(), DownEntry { until, failures });
        }
        Self { entries }
    }

    /// The file's text: one line per machine, sorted by URI.
    pub fn render(&self) -> String {
        self.entries
            .iter()
            .map(|(uri, e)| format!("{} {} {uri}\n", e.until, e.failures))
            .collect()
    }

    pub fn entry(&self, uri: &str) -> Option<DownEntry> {
        self.entries.get(uri).copied()
    }

    /// Whether `uri` is in its back-off period at `now`.
    pub fn is_down(&self, uri: &str, now: u64) -> bool {
        self.entries.get(uri).is_some_and(|e| now < e.until)
    }

    /// Records a failure to reach `uri` at `now`; returns the back-off it
    /// now serves. Also forgets entries that ended long ago.
    pub fn record_failure(&mut self, uri: &str, now: u64) -> Duration {
        let forget = FORGET_AFTER.as_secs();
        self.entries
            .retain(|_, e| e.until.saturating_add(forget) > now);
        let failures = self
            .entries
            .get(uri)
            .map_or(1, |e| e.failures.saturating_add(1));
        let wait = backoff(failures);
        self.entries.insert(
            uri.to_owned(),
            DownEntry {
                until: now.saturating_add(wait.as_secs()),
                failures,
            },
        );
        wait
    }

    /// Records that `uri` was reached: it is no longer down. Returns whether
    /// it was listed.
    pub fn record_success(&mut self, uri: &str) -> bool {
        self.entries.remove(uri).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_nix() {
        assert_eq!(
            slot_file_name("local?root=/data/b1", 0),
            "local?root=_data_b1-0"
        );
        assert_eq!(slot_file_name("nixq://s1:7461", 3), "nixq:__s1:7461-3");
        assert_eq!(escape_uri("nixq://[fd00::2]/x"), "nixq:__[fd00::2]_x");
    }

    #[test]
    fn slots_count_load_and_keep_the_first_free_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = LoadDir::new(tmp.path().join("current-load"));
        let main = dir.lock_main(Duration::ZERO).expect("main lock");
        let mode = std::fs::metadata(dir.path())
            .expect("dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o777);
        // Another "process" (another open file description) holds main-lock.
        assert!(dir.lock_main(Duration::from_millis(10)).is_err());
        drop(main);

        let first = dir.probe("nixq://a", 3).expect("probe");
        assert_eq!(first.load, 0);
        let slot0 = first.free.expect("a free slot");
        assert_eq!(slot0.slot(), 0);
        slot0.touch().expect("touch");
        let file_mode = std::fs::metadata(slot0.path())
            .expect("slot")
            .permissions()
            .mode();
        assert_eq!(file_mode & 0o777, 0o600);

        let second = dir.probe("nixq://a", 3).expect("probe");
        assert_eq!(second.load, 1);
        let slot1 = second.free.expect("a free slot");
        assert_eq!(slot1.slot(), 1);
        let third = dir.probe("nixq://a", 3).expect("probe");
        let slot2 = third.free.expect("the last slot");
        let full = dir.probe("nixq://a", 3).expect("probe");
        assert_eq!(full.load, 3);
        assert!(full.free.is_none());
        // Other machines are independent; max jobs 0 is never free.
        assert!(dir.probe("nixq://b", 1).expect("probe").free.is_some());
        assert!(dir.probe("nixq://b", 0).expect("probe").free.is_none());

        drop(slot1);
        let again = dir.probe("nixq://a", 3).expect("probe");
        assert_eq!(again.load, 2);
        assert_eq!(again.free.map(|s| s.slot()), Some(1));
        drop((slot0, slot2));
    }

    #[test]
    fn a_watch_sees_a_slot_become_free_without_taking_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = LoadDir::new(tmp.path().join("current-load"));
        let slot0 = dir
            .probe("nixq://a", 2)
            .expect("probe")
            .free
            .expect("slot 0");
        let slot1 = dir
            .probe("nixq://a", 2)
            .expect("probe")
            .free
            .expect("slot 1");
        let watch = dir.watch([("nixq://a", 2)]).expect("watch");
        assert!(!watch.any_free().expect("poll"));
        drop(slot1);
        assert!(watch.any_free().expect("poll"));
        // The watch released it again: a choice can take it.
        let taken = dir
            .probe("nixq://a", 2)
            .expect("probe")
            .free
            .expect("slot 1");
        assert_eq!(taken.slot(), 1);
        assert!(!watch.any_free().expect("poll"));
        drop((slot0, taken));
        // Nothing watched, nothing free.
        assert!(!dir.watch([]).expect("watch").any_free().expect("poll"));
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        assert_eq!(backoff(0), BACKOFF_BASE);
        assert_eq!(backoff(1), BACKOFF_BASE);
        assert_eq!(backoff(2), BACKOFF_BASE * 2);
        assert_eq!(backoff(4), BACKOFF_BASE * 8);
        assert_eq!(backoff(100), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn down_state_round_trips_and_expires() {
        let mut state = DownState::default();
        let now = 1_000_000;
        assert_eq!(state.record_failure("nixq://a", now), BACKOFF_BASE);
        assert!(state.is_down("nixq://a", now));
        assert!(state.is_down("nixq://a", now + 9));
        assert!(!state.is_down("nixq://a", now + 10));
        assert!(!state.is_down("nixq://b", now));
        // A second failure after the back-off doubles it.
        assert_eq!(state.record_failure("nixq://a", now + 10), BACKOFF_BASE * 2);
        assert_eq!(state.entry("nixq://a").map(|e| e.failures), Some(2));

        let text = state.render();
        assert_eq!(text, format!("{} 2 nixq://a\n", now + 30));
        assert_eq!(DownState::parse(&text), state);

        assert!(state.record_success("nixq://a"));
        assert!(!state.record_success("nixq://a"));
        assert_eq!(state.render(), "");
    }

    #[test]
    fn damaged_lines_are_dropped_and_old_entries_forgotten() {
        let state =
            DownState::parse("garbage\n12 x nixq://a\n5 1 nixq://b extra\n\n7 3 nixq://c\n");
        assert_eq!(state.render(), "7 3 nixq://c\n");
        let mut state = state;
        state.record_failure("nixq://d", 7 + FORGET_AFTER.as_secs() + 1);
        assert!(state.entry("nixq://c").is_none());
        assert!(state.entry("nixq://d").is_some());
    }

    #[test]
    fn down_file_is_shared_through_the_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = LoadDir::new(tmp.path().join("current-load"));
        assert_eq!(dir.read_down().expect("read"), DownState::default());
        dir.update_down(|s| {
            s.record_failure("nixq://a", 100);
        })
        .expect("update");
        let other = LoadDir::new(tmp.path().join("current-load"));
        assert!(other.read_down().expect("read").is_down("nixq://a", 105));
        other
            .update_down(|s| {
                s.record_success("nixq://a");
            })
            .expect("update");
        assert!(!dir.read_down().expect("read").is_down("nixq://a", 105));
    }
}
