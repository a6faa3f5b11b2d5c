//! NAR → disk: decoder events become files, directories and symlinks under
//! a target path, hashed and counted on the way.
//!
//! Safety rules, so that a hostile NAR cannot touch anything but the target:
//! - the target must not exist; it is created as the root node with
//!   `O_CREAT | O_EXCL` / `mkdir` / `symlink`, which never follow a symlink;
//! - every other node is created relative to the descriptor of its parent
//!   directory (`openat`, `mkdirat`, `symlinkat`), which this restorer
//!   created itself and opened with `O_NOFOLLOW | O_DIRECTORY`; names are
//!   single components (the decoder rejects `/`, `.`, `..`, NUL), so no
//!   path resolution happens at all, and nothing is ever created through a
//!   symlink;
//! - an error, or dropping the [`Restorer`] before [`Restorer::commit`],
//!   removes everything restored so far (without following symlinks).
//!
//! Permissions: regular files are left `0o444`, or `0o555` when executable,
//! which is what Nix's canonicalisation gives store files (so the store
//! layer has nothing to fix for files); directories are left `0o755`, so a
//! partial restore can always be removed, and symlinks are symlinks.
//! Registering the result in a store must still canonicalise directories
//! (`0o555`) and timestamps (mtime 1), as Nix does after its own restore.

use std::ffi::{CStr, CString};
use std::fs::{self, File, Permissions};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread;

use super::decode::{Decoder, Event, Step};
use super::NarError;
use crate::hash::{NarHash, NarHasher};

/// Read size of [`restore`]: large enough that system calls and decoder
/// calls cost nothing next to hashing and writing the bytes.
const READ_BUFFER_SIZE: usize = 1 << 20;

/// Why a restore failed. Whatever was restored has been removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error("restore target '{0}' already exists")]
    TargetExists(PathBuf),
    #[error("cannot {op} '{path}': {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("reading the NAR failed: {0}")]
    Read(#[source] io::Error),
    #[error("restore events out of order: {0}")]
    OutOfOrder(&'static str),
    #[error("the NAR is not complete")]
    Incomplete,
}

/// Restores the NAR read from `reader`, which must hold exactly one NAR
/// and nothing after it, at `target` (which must not exist). Returns the
/// NAR's SHA-256 and size. On error nothing is left at `target`.
///
/// Past the first [`PIPELINE_THRESHOLD`] bytes, hashing runs on a second
/// thread while this one decodes and writes, which roughly doubles the
/// throughput of big restores (SHA-256 and writing cost about the same).
pub fn restore(mut reader: impl Read, target: &Path) -> Result<(NarHash, u64), RestoreError> {
    let mut restorer = Restorer::new(target)?;
    let mut decoder = Decoder::whole_container();
    let mut hasher = NarHasher::new();
    let mut buf = vec![0; READ_BUFFER_SIZE];
    let mut at_end = false;
    // Small NARs: hash and write in turn, no thread.
    while hasher.size() < PIPELINE_THRESHOLD {
        let n = read_some(&mut reader, &mut buf)?;
        if n == 0 {
            at_end = true;
            break;
        }
        hasher.update(&buf[..n]);
        restorer.apply(&mut decoder, &buf[..n])?;
    }
    if !at_end {
        hasher = restore_pipelined(&mut reader, &mut restorer, &mut decoder, hasher, buf)?;
    }
    decoder.finish()?;
    restorer.commit()?;
    Ok(hasher.finish())
}

/// Bytes [`restore`] handles on one thread before it moves hashing to a
/// second one: below this, starting a thread costs more than it saves.
pub const PIPELINE_THRESHOLD: u64 = 4 << 20;

/// Read buffers in flight between the reading and the hashing thread.
const PIPELINE_BUFFERS: usize = 4;

fn read_some(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, RestoreError> {
    loop {
        match reader.read(buf) {
            Ok(n) => return Ok(n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(RestoreError::Read(err)),
        }
    }
}

/// The rest of [`restore`]: this thread reads, decodes and writes; a
/// scoped thread hashes the same buffers, which come back for reuse.
fn restore_pipelined(
    reader: &mut impl Read,
    restorer: &mut Restorer,
    decoder: &mut Decoder,
    hasher: NarHasher,
    first: Vec<u8>,
) -> Result<NarHasher, RestoreError> {
    let (to_hasher, chunks) = mpsc::sync_channel::<(Arc<Vec<u8>>, usize)>(PIPELINE_BUFFERS - 2);
    let (give_back, returned) = mpsc::channel::<Arc<Vec<u8>>>();
    thread::scope(|scope| {
        let hashing = scope.spawn(move || {
            let mut hasher = hasher;
            for (buf, n) in chunks {
                hasher.update(&buf[..n]);
                // The receiver is gone only when the restore is over.
                let _ = give_back.send(buf);
            }
            hasher
        });
        // `to_hasher` is dropped when this returns, which ends the hasher.
        let fed = feed_pipeline(reader, restorer, decoder, to_hasher, &returned, first);
        let hasher = hashing
            .join()
            .map_err(|_| RestoreError::Read(io::Error::other("the NAR hashing thread panicked")))?;
        fed.map(|()| hasher)
    })
}

fn feed_pipeline(
    reader: &mut impl Read,
    restorer: &mut Restorer,
    decoder: &mut Decoder,
    to_hasher: mpsc::SyncSender<(Arc<Vec<u8>>, usize)>,
    returned: &mpsc::Receiver<Arc<Vec<u8>>>,
    first: Vec<u8>,
) -> Result<(), RestoreError> {
    let hasher_gone = || RestoreError::Read(io::Error::other("the NAR hashing thread stopped"));
    let mut spare = Some(first);
    let mut allocated = 1;
    loop {
        let mut buf = match spare.take() {
            Some(buf) => buf,
            None => {
                let back = match returned.try_recv() {
                    Ok(back) => Some(back),
                    Err(_) if allocated < PIPELINE_BUFFERS => None,
                    Err(_) => Some(returned.recv().map_err(|_| hasher_gone())?),
                };
                // Our own reference was dropped at the end of the last
                // round, so the hasher's was the only one left.
                match back.map(Arc::try_unwrap) {
                    Some(Ok(buf)) => buf,
                    _ => {
                        allocated += 1;
                        vec![0; READ_BUFFER_SIZE]
                    }
                }
            }
        };
        let n = read_some(reader, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let buf = Arc::new(buf);
        to_hasher
            .send((Arc::clone(&buf), n))
            .map_err(|_| hasher_gone())?;
        restorer.apply(decoder, &buf[..n])?;
    }
}

/// Restores the NAR at the front of `reader` at `target` and stops exactly
/// at its end: the bytes after it stay in `reader`. Returns the NAR's
/// SHA-256 and size. On error nothing is left at `target`.
pub fn restore_buffered(
    reader: &mut impl BufRead,
    target: &Path,
) -> Result<(NarHash, u64), RestoreError> {
    let mut restorer = Restorer::new(target)?;
    let mut decoder = Decoder::new();
    let mut hasher = NarHasher::new();
    while !decoder.is_done() {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(RestoreError::Read(err)),
        };
        if buf.is_empty() {
            decoder.finish()?;
        }
        let used = restorer.apply(&mut decoder, buf)?;
        hasher.update(&buf[..used]);
        reader.consume(used);
    }
    restorer.commit()?;
    Ok(hasher.finish())
}

/// Writes decoder events to disk under one target path.
///
/// Feed it with [`Restorer::apply`] (bytes through a [`Decoder`]) or
/// [`Restorer::event`] (events you decoded yourself), check what you need
/// (typically the NAR hash against the expected one), then
/// [`Restorer::commit`]. Dropping it uncommitted removes the target.
#[derive(Debug)]
pub struct Restorer {
    target: PathBuf,
    /// Whether the target was created (and so must be removed on failure).
    created: bool,
    committed: bool,
    /// The root node is complete.
    complete: bool,
    /// Descriptors of the open directories, outermost first.
    dirs: Vec<OwnedFd>,
    /// On-disk path of the innermost open directory, for error messages.
    dir_path: PathBuf,
    /// The regular file being written, and its path.
    file: Option<(File, PathBuf)>,
}

impl Restorer {
    /// A restorer for `target`, which must not exist yet (not even as a
    /// dangling symlink); its parent must exist.
    pub fn new(target: &Path) -> Result<Self, RestoreError> {
        match fs::symlink_metadata(target) {
            Ok(_) => return Err(RestoreError::TargetExists(target.to_owned())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RestoreError::Io {
                    op: "examine",
                    path: target.to_owned(),
                    source,
                })
            }
        }
        Ok(Self {
            target: target.to_owned(),
            created: false,
            committed: false,
            complete: false,
            dirs: Vec::new(),
            dir_path: target.to_owned(),
            file: None,
        })
    }

    /// Feeds `buf` to `decoder` and applies every event; returns the bytes
    /// consumed, which is all of `buf` unless the NAR ends inside it.
    pub fn apply(&mut self, decoder: &mut Decoder, buf: &[u8]) -> Result<usize, RestoreError> {
        let mut pos = 0;
        loop {
            let progress = decoder.feed(&buf[pos..])?;
            pos += progress.consumed;
            match progress.step {
                Step::NeedMore | Step::Done => return Ok(pos),
                Step::Event(event) => self.event(event)?,
            }
        }
    }

    /// Applies one event.
    pub fn event(&mut self, event: Event<'_>) -> Result<(), RestoreError> {
        if self.complete {
            return Err(RestoreError::OutOfOrder("event after the root node"));
        }
        match event {
            Event::Directory { name } => {
                let (parent, path, c_path) = self.place(name)?;
                mkdir_at(parent, &c_path, 0o755).map_err(io_error("create directory", &path))?;
                self.created = true;
                let fd = open_at(
                    parent,
                    &c_path,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0,
                )
                .map_err(io_error("open directory", &path))?;
                self.dirs.push(fd);
                self.dir_path = path;
            }
            Event::File {
                name, executable, ..
            } => {
                let (parent, path, c_path) = self.place(name)?;
                let mode = if executable { 0o555 } else { 0o444 };
                let flags = libc::O_WRONLY
                    | libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_NOFOLLOW
                    | libc::O_CLOEXEC;
                let fd = open_at(parent, &c_path, flags, mode)
                    .map_err(io_error("create file", &path))?;
                self.created = true;
                let file = File::from(fd);
                // The creation mode went through the umask; set it exactly.
                file.set_permissions(Permissions::from_mode(mode))
                    .map_err(io_error("set permissions of", &path))?;
                self.file = Some((file, path));
            }
            Event::Contents(data) => {
                let Some((file, path)) = &mut self.file else {
                    return Err(RestoreError::OutOfOrder("contents outside a file"));
                };
                file.write_all(data).map_err(io_error("write", path))?;
            }
            Event::FileEnd => {
                if self.file.take().is_none() {
                    return Err(RestoreError::OutOfOrder("file end outside a file"));
                }
                self.complete = self.dirs.is_empty();
            }
            Event::Symlink { name, target } => {
                let (parent, path, c_path) = self.place(name)?;
                let c_target = c_string(target).map_err(io_error("create symlink", &path))?;
                symlink_at(&c_target, parent, &c_path)
                    .map_err(io_error("create symlink", &path))?;
                self.created = true;
                self.complete = self.dirs.is_empty();
            }
            Event::DirectoryEnd => {
                if self.dirs.pop().is_none() {
                    return Err(RestoreError::OutOfOrder(
                        "directory end outside a directory",
                    ));
                }
                self.dir_path.pop();
                self.complete = self.dirs.is_empty();
            }
        }
        Ok(())
    }

    /// Where a new node goes: the parent directory's descriptor
    /// (`AT_FDCWD` for the root, created at the target path), its on-disk
    /// path, and
    /// the name or path to pass to the `*at` call.
    fn place(&self, name: Option<&[u8]>) -> Result<(DirFd, PathBuf, CString), RestoreError> {
        if self.file.is_some() {
            return Err(RestoreError::OutOfOrder("node inside a file"));
        }
        match (name, self.dirs.last()) {
            (None, None) if !self.created => {
                let c_path = c_string(self.target.as_os_str().as_bytes())
                    .map_err(io_error("create", &self.target))?;
                Ok((libc::AT_FDCWD, self.target.clone(), c_path))
            }
            (Some(name), Some(dir)) => {
                let path = self.dir_path.join(std::ffi::OsStr::from_bytes(name));
                // Defence in depth: the decoder already guarantees this.
                if super::wire::name_problem(name).is_some() {
                    return Err(RestoreError::OutOfOrder("invalid entry name"));
                }
                let c_name = c_string(name).map_err(io_error("create", &path))?;
                Ok((dir.as_raw_fd(), path, c_name))
            }
            _ => Err(RestoreError::OutOfOrder(
                "node name does not match its place",
            )),
        }
    }

    /// Declares the restore complete and keeps the result.
    pub fn commit(mut self) -> Result<(), RestoreError> {
        if !self.complete {
            return Err(RestoreError::Incomplete);
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Restorer {
    fn drop(&mut self) {
        if self.committed || !self.created {
            return;
        }
        self.file = None;
        self.dirs.clear();
        // Best effort: there is nobody to report a failure to. Neither call
        // follows symlinks.
        let removed = match fs::symlink_metadata(&self.target) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(&self.target),
            Ok(_) => fs::remove_file(&self.target),
            Err(err) => Err(err),
        };
        if let Err(err) = removed {
            tracing::warn!(target = %self.target.display(), %err, "cannot remove a partial NAR restore");
        }
    }
}

fn io_error<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> RestoreError + 'p {
    move |source| RestoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a name"))
}

/// A directory descriptor for the `*at` calls: one of `Restorer::dirs`
/// (which stay open while it is used) or `AT_FDCWD`.
type DirFd = libc::c_int;

fn open_at(dir: DirFd, path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: `path` is a valid NUL-terminated string; `dir` is AT_FDCWD
    // or a descriptor owned by the restorer, open during the call.
    let fd = unsafe { libc::openat(dir, path.as_ptr(), flags, libc::c_uint::from(mode)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mkdir_at(dir: DirFd, path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: as in `open_at`.
    if unsafe { libc::mkdirat(dir, path.as_ptr(), mode) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn symlink_at(target: &CStr, dir: DirFd, path: &CStr) -> io::Result<()> {
    // SAFETY: as in `open_at`; `target` is a valid NUL-terminated string.
    if unsafe { libc::symlinkat(target.as_ptr(), dir, path.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;
    use std::os::unix::fs::symlink;

    use super::super::dump_path;
    use super::super::testing::Raw;
    use super::*;

    fn sample_tree(root: &Path) {
        fs::create_dir(root).expect("mkdir");
        fs::write(root.join("file"), b"hello").expect("write");
        fs::write(root.join("run"), b"#!/bin/sh\n").expect("write");
        fs::set_permissions(root.join("run"), Permissions::from_mode(0o755)).expect("chmod");
        fs::create_dir_all(root.join("sub/empty")).expect("mkdir");
        fs::write(root.join("sub/big"), vec![7u8; 3 << 20]).expect("write");
        symlink("../file", root.join("sub/link")).expect("symlink");
        symlink("/does/not/exist", root.join("dangling")).expect("symlink");
    }

    #[test]
    fn round_trip_with_hash() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        sample_tree(&src);
        let mut nar = Vec::new();
        dump_path(&src, &mut nar).expect("dump");

        let dst = tmp.path().join("dst");
        let (hash, size) = restore(&nar[..], &dst).expect("restore");
        assert_eq!((hash, size), (NarHash::of(&nar), nar.len() as u64));
        let mut again = Vec::new();
        dump_path(&dst, &mut again).expect("dump again");
        assert_eq!(again, nar);
        let mode = |p: &str| {
            fs::symlink_metadata(dst.join(p))
                .expect("stat")
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("file"), 0o444);
        assert_eq!(mode("run"), 0o555);
        assert_eq!(
            fs::read_link(dst.join("sub/link")).expect("link"),
            Path::new("../file")
        );
    }

    /// Big enough for the hashing thread, read in odd-sized pieces so the
    /// buffers are recycled many times; then cut short, which must fail
    /// cleanly from inside the pipeline.
    #[test]
    fn pipelined_restore() {
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(300_007);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data: Vec<u8> = (0..(9u32 << 20) + 5).map(|i| (i % 253) as u8).collect();
        let nar = Raw::magic()
            .dir_start()
            .entry("a")
            .file(false, &data)
            .entry_end()
            .entry("b")
            .file(true, &data[..1 << 20])
            .entry_end()
            .dir_end()
            .0;
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("t");
        let (hash, size) = restore(Dribble(&nar), &target).expect("restore");
        assert_eq!((hash, size), (NarHash::of(&nar), nar.len() as u64));
        assert!(fs::read(target.join("a")).expect("read") == data);

        let other = tmp.path().join("cut");
        let err = restore(Dribble(&nar[..nar.len() - 1]), &other).expect_err("truncated");
        assert!(matches!(err, RestoreError::Nar(_)), "{err}");
        assert!(fs::symlink_metadata(&other).is_err());
        let mut corrupt = nar.clone();
        let last = corrupt.len() - 1;
        corrupt[last] = 1;
        restore(Dribble(&corrupt), &other).expect_err("bad padding");
        assert!(fs::symlink_metadata(&other).is_err());
    }

    #[test]
    fn buffered_restore_stops_at_the_end() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut stream = Raw::magic().file(true, b"#!x").0;
        let nar_len = stream.len();
        stream.extend_from_slice(b"rest");
        let mut reader = BufReader::with_capacity(7, &stream[..]);
        let (hash, size) = restore_buffered(&mut reader, &tmp.path().join("f")).expect("restore");
        assert_eq!(
            (hash, size),
            (NarHash::of(&stream[..nar_len]), nar_len as u64)
        );
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).expect("read");
        assert_eq!(rest, b"rest");
        assert_eq!(fs::read(tmp.path().join("f")).expect("read"), b"#!x");
    }

    #[test]
    fn root_symlink_and_existing_target() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("l");
        restore(&Raw::magic().symlink(b"x").0[..], &target).expect("restore");
        assert_eq!(fs::read_link(&target).expect("link"), Path::new("x"));
        let err = restore(&Raw::magic().symlink(b"y").0[..], &target).expect_err("exists");
        assert!(matches!(err, RestoreError::TargetExists(_)), "{err}");
    }

    #[test]
    fn failures_leave_nothing_behind() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("t");
        let valid = Raw::magic()
            .dir_start()
            .entry("a")
            .file(false, b"aaaa")
            .entry_end()
            .entry("b")
            .dir_start()
            .entry("c")
            .symlink(b"/etc/passwd")
            .entry_end()
            .dir_end()
            .entry_end()
            .dir_end()
            .0;
        for cut in 0..valid.len() {
            let err = restore(&valid[..cut], &target).expect_err("truncated");
            assert!(matches!(err, RestoreError::Nar(_)), "{err}");
            assert!(
                fs::symlink_metadata(&target).is_err(),
                "left behind at cut {cut}"
            );
        }
        let hostile = [
            Raw::magic()
                .dir_start()
                .entry("..")
                .file(false, b"x")
                .entry_end()
                .dir_end()
                .0,
            Raw::magic()
                .dir_start()
                .entry("a")
                .symlink(b"/")
                .entry_end()
                .entry("a")
                .dir_start()
                .entry("x")
                .file(false, b"pwned")
                .0,
            {
                let mut nar = valid.clone();
                nar.push(0);
                nar
            },
        ];
        for nar in hostile {
            restore(&nar[..], &target).expect_err("hostile");
            assert!(fs::symlink_metadata(&target).is_err());
        }
        assert_eq!(fs::read_dir(tmp.path()).expect("ls").count(), 0);
    }

    #[test]
    fn uncommitted_restorer_cleans_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("t");
        let nar = Raw::magic()
            .dir_start()
            .entry("a")
            .file(false, b"x")
            .entry_end()
            .dir_end()
            .0;
        let mut restorer = Restorer::new(&target).expect("new");
        let mut decoder = Decoder::whole_container();
        assert_eq!(
            restorer.apply(&mut decoder, &nar).expect("apply"),
            nar.len()
        );
        assert!(target.join("a").exists());
        drop(restorer);
        assert!(fs::symlink_metadata(&target).is_err());
    }
}
