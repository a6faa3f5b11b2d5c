//! The receiving half of the transfer engine: reads the body of an Upload
//! (agent side) or Download (master side) stream and imports its NARs into
//! the local store by restoring them straight into place under Nix's own
//! per-path lock and registering them in batches (nix-interfaces.md §2.10,
//! §8), the route that runs at network speed and also works while Nix holds
//! the locks (the build hook's outputs).
//!
//! # How the bytes flow
//!
//! ```text
//! async task:     stream ─read_buf (≤ READ_SIZE)─▶ Bytes
//!                   └─ zstd? ─▶ blocking thread: unzstd ─▶ Bytes ─┐ (bounded channels)
//! BodyReader:     item frames (copied only when split over chunks) │
//!                 NAR bytes as slices of the chunks (no copy) ◀─────┘
//!                   │ bounded channel of Bytes (RESTORE_QUEUE)
//!                   ▼
//! blocking thread: hash + strict decode + write under the target (Restorer)
//!                   ▼
//!                 Verified (hash and size match the item) ─▶ Importer::register ─▶ RegistrationBatcher
//! ```
//!
//! Memory per body is bounded by the channel depths times the chunk sizes,
//! whatever the size of the NARs; no NAR is ever buffered whole.
//!
//! # The import route, step by step
//!
//! 1. [`Importer::check_info`]: the item's path, references and deriver are
//!    in this store directory.
//! 2. Make the path a temp root of your daemon connection (the caller's
//!    job: this module has no daemon connection), then [`Importer::lock`]:
//!    take `<path>.lock` (or trust the caller who holds it,
//!    [`Locking::HeldByCaller`]) and look whether anything is at the path.
//!    If so, the caller asks its Nix whether the path is valid: if it is, it
//!    skips the NAR ([`BodyReader::skip`]); if not, [`LockedPath::clear`]
//!    removes the invalid leftover.
//! 3. [`LockedPath::restore`]: stream exactly `nar_size` bytes into the
//!    target, hashing them; the result is a [`Verified`] only if hash and size
//!    match, and [`Verified`] can be made nowhere else. Its two halves,
//!    [`LockedPath::start_restore`] and [`Restoring::finish`], let a caller
//!    read the next item while the restoring thread finishes this one.
//! 4. [`Importer::register`]: only a [`Verified`] can be registered. On
//!    success the lock file is deleted as Nix does; on failure the restored
//!    tree is removed. Its two halves, [`Importer::submit`] (in the
//!    batcher's queue) and [`Submitted::finish`] (registered), let a caller
//!    announce "on its way" to the uploads of paths that refer to this one
//!    at exactly the moment that is true.
//!
//! # Nothing left behind
//!
//! Until registration is submitted, a dropped [`Verified`] or an interrupted
//! restore removes everything restored (the [`Restorer`]'s and this module's
//! drop guards) before the lock is released. Cancelling the async side (a
//! stream reset, a lost connection, shutdown) closes the channel to the
//! restoring thread, which then sees a truncated NAR and cleans up by
//! itself. Once submitted to the batcher, the tree is never removed by a
//! drop: the registration may be under way, and a valid path must not lose
//! its files. The lock file goes with the lock, whatever the outcome.
//!
//! Much of that clean-up happens on blocking threads after the async side
//! has let go, so a process that exits must first wait for
//! [`Importer::idle`]: every import is counted from [`Importer::lock`] until
//! its files and lock are settled.

use std::io::{self, BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::hash::{NarHash, NarHasher};
use crate::nar::{Decoder, RestoreError, Restorer};
use crate::path_info::PathInfo;
use crate::proto::frame::{decode, decode_slice, Message};
use crate::proto::{Compression, ProtoError, UploadOutcome};
use crate::store::batch::Queued;
use crate::store::{BatchError, PathLock, Registration, RegistrationBatcher};
use crate::store_path::{StoreDir, StorePath};

/// The most bytes one read from the stream takes. quinn hands over every
/// packet that has arrived in one read, so at full speed reads are this
/// large and the per-chunk costs (a channel hop, a decoder call) vanish
/// next to hashing and writing; at low speed chunks are small and latency
/// stays low.
pub const READ_SIZE: usize = 256 * 1024;

/// Chunks queued towards the thread that restores one NAR: with
/// [`READ_SIZE`] chunks, 2 MiB per body, enough to keep the thread busy
/// while the next read arrives.
pub const RESTORE_QUEUE: usize = 8;

/// Chunks queued between the stream, the zstd thread and the reader.
const ZSTD_QUEUE: usize = 4;

/// Size of the decompressed chunks the zstd thread hands out.
const ZSTD_OUT_SIZE: usize = 256 * 1024;

/// The body of a stream broke: not one item's fault, and the stream cannot
/// be read further.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    #[error("reading the stream failed: {0}")]
    Read(#[source] io::Error),
    #[error("the body is not a valid zstd stream: {0}")]
    Decompress(#[source] io::Error),
    #[error(transparent)]
    Frame(#[from] ProtoError),
    #[error("the stream ended {0}")]
    Truncated(&'static str),
}

/// Why one path was not imported. Those with an [`UploadOutcome`] are the
/// sender's fault or the receiver's store's, and are reported per item;
/// [`ItemError::Body`] means the stream itself broke.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ItemError {
    #[error("NAR hash mismatch: expected {}, got {}", expected.to_nix32_prefixed(), got.to_nix32_prefixed())]
    HashMismatch { expected: NarHash, got: NarHash },
    #[error("NAR size mismatch: expected {expected} bytes, got {got}")]
    SizeMismatch { expected: u64, got: u64 },
    #[error("bad NAR: {0}")]
    BadNar(String),
    #[error("unacceptable path info: {0}")]
    BadPathInfo(String),
    #[error("the local store: {0}")]
    Store(String),
    #[error("registration failed: {0}")]
    Register(String),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("the restore was interrupted")]
    Interrupted,
}

impl ItemError {
    /// The per-item outcome to report, or `None` when the stream broke and
    /// no report can be made ([`ItemError::Body`], [`ItemError::Interrupted`]).
    pub fn outcome(&self) -> Option<UploadOutcome> {
        Some(match self {
            Self::HashMismatch { expected, got } => UploadOutcome::HashMismatch {
                expected: *expected,
                got: *got,
            },
            Self::SizeMismatch { expected, got } => UploadOutcome::SizeMismatch {
                expected: *expected,
                got: *got,
            },
            Self::BadNar(reason) => UploadOutcome::BadNar {
                reason: reason.clone(),
            },
            Self::BadPathInfo(reason) => UploadOutcome::BadPathInfo {
                reason: reason.clone(),
            },
            Self::Store(reason) | Self::Register(reason) => UploadOutcome::ImportFailed {
                reason: reason.clone(),
            },
            Self::Body(_) | Self::Interrupted => return None,
        })
    }
}

// ---------------------------------------------------------------------------
// The body: item frames and NAR bytes.

/// Reads a body: item frames ([`BodyReader::read_item`]) and the raw NAR
/// bytes after them ([`BodyReader::next_chunk`], [`BodyReader::skip`]),
/// decompressing on a blocking thread if the body is zstd.
///
/// Dropping it stops reading; for a quinn stream that sends `STOP_SENDING`.
pub struct BodyReader {
    source: Source,
    /// Unread bytes of the last chunk.
    current: Bytes,
    /// A frame that spans chunks, gathered here.
    staging: BytesMut,
    /// Bytes of body consumed so far (uncompressed).
    consumed: u64,
}

enum Source {
    Plain {
        reader: Box<dyn AsyncRead + Send + Unpin>,
        buf: BytesMut,
        eof: bool,
    },
    Zstd {
        rx: mpsc::Receiver<Result<Bytes, BodyError>>,
        /// Reads the stream into the zstd thread; aborted on drop.
        _pump: AbortOnDrop,
    },
}

impl std::fmt::Debug for BodyReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyReader")
            .field("zstd", &matches!(self.source, Source::Zstd { .. }))
            .field("consumed", &self.consumed)
            .finish_non_exhaustive()
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl BodyReader {
    /// A reader of the body that follows the request (or reply) frame on
    /// `reader`, compressed as `compression` says. Needs a tokio runtime.
    pub fn new<R>(reader: R, compression: Compression) -> Self
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        let source = match compression {
            Compression::None => Source::Plain {
                reader: Box::new(reader),
                buf: BytesMut::new(),
                eof: false,
            },
            Compression::Zstd { .. } => {
                let (raw_tx, raw_rx) = mpsc::channel(ZSTD_QUEUE);
                let (tx, rx) = mpsc::channel(ZSTD_QUEUE);
                let pump = tokio::spawn(pump(reader, raw_tx));
                // Ends by itself when either channel closes.
                drop(tokio::task::spawn_blocking(move || unzstd(raw_rx, &tx)));
                Source::Zstd {
                    rx,
                    _pump: AbortOnDrop(pump),
                }
            }
        };
        Self {
            source,
            current: Bytes::new(),
            staging: BytesMut::new(),
            consumed: 0,
        }
    }

    /// Uncompressed bytes of the body consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The next chunk from the source; `None` at the end of the body.
    async fn fill(&mut self) -> Result<Option<Bytes>, BodyError> {
        match &mut self.source {
            Source::Plain { reader, buf, eof } => {
                if *eof {
                    return Ok(None);
                }
                if buf.capacity() - buf.len() < READ_SIZE / 4 {
                    buf.reserve(READ_SIZE);
                }
                let n = reader.read_buf(buf).await.map_err(BodyError::Read)?;
                if n == 0 {
                    *eof = true;
                    return Ok(None);
                }
                Ok(Some(buf.split().freeze()))
            }
            Source::Zstd { rx, .. } => rx.recv().await.transpose(),
        }
    }

    /// Reads the next `M` frame. `Ok(None)` if the body ended cleanly
    /// before it; a body that ends inside a frame is an error.
    pub async fn read_item<M: Message>(&mut self) -> Result<Option<M>, BodyError> {
        loop {
            if self.staging.is_empty() {
                if let Some((message, used)) = decode_slice::<M>(&self.current)? {
                    self.current.advance(used);
                    self.consumed += used as u64;
                    return Ok(Some(message));
                }
                // An incomplete frame: gather it (its length is already
                // checked against M's limit, so this stays bounded).
                self.staging.extend_from_slice(&self.current);
                self.current = Bytes::new();
            } else {
                let before = self.staging.len();
                if let Some(message) = decode::<M>(&mut self.staging)? {
                    self.consumed += (before - self.staging.len()) as u64;
                    // What followed the frame is body again.
                    self.current = self.staging.split().freeze();
                    return Ok(Some(message));
                }
            }
            match self.fill().await? {
                Some(chunk) => self.staging.extend_from_slice(&chunk),
                None if self.staging.is_empty() => return Ok(None),
                None => return Err(BodyError::Truncated("inside an item frame")),
            }
        }
    }

    /// The next bytes of the body, at most `max` (which must not be 0),
    /// without copying. The end of the body is an error: a NAR is due.
    pub async fn next_chunk(&mut self, max: u64) -> Result<Bytes, BodyError> {
        if self.current.is_empty() {
            // Bytes gathered after a frame are in `current` already (see
            // read_item), so staging is empty here.
            self.current = self
                .fill()
                .await?
                .ok_or(BodyError::Truncated("inside a NAR"))?;
        }
        let take = usize::try_from(max)
            .unwrap_or(usize::MAX)
            .min(self.current.len());
        self.consumed += take as u64;
        Ok(self.current.split_to(take))
    }

    /// Reads and drops `n` bytes (the NAR of a path that is valid already).
    pub async fn skip(&mut self, mut n: u64) -> Result<(), BodyError> {
        while n > 0 {
            n -= self.next_chunk(n).await?.len() as u64;
        }
        Ok(())
    }
}

/// Copies the compressed stream into the zstd thread's channel.
async fn pump<R: AsyncRead + Unpin>(mut reader: R, tx: mpsc::Sender<Result<Bytes, BodyError>>) {
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() - buf.len() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        let item = match reader.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => Ok(buf.split().freeze()),
            Err(e) => Err(BodyError::Read(e)),
        };
        let failed = item.is_err();
        if tx.send(item).await.is_err() || failed {
            return;
        }
    }
}

/// The zstd thread: decompresses what the pump sends until the compressed
/// stream ends (then the zstd stream must be complete) or the reader is gone.
fn unzstd(
    raw: mpsc::Receiver<Result<Bytes, BodyError>>,
    tx: &mpsc::Sender<Result<Bytes, BodyError>>,
) {
    let input = ChannelReader {
        rx: raw,
        current: Bytes::new(),
        failure: None,
    };
    let mut decoder = match zstd::stream::read::Decoder::with_buffer(input) {
        Ok(decoder) => decoder,
        Err(e) => {
            let _ = tx.blocking_send(Err(BodyError::Decompress(e)));
            return;
        }
    };
    let mut out = BytesMut::new();
    loop {
        if out.capacity() < ZSTD_OUT_SIZE {
            out.reserve(ZSTD_OUT_SIZE);
        }
        out.resize(ZSTD_OUT_SIZE, 0);
        let item = match decoder.read(&mut out) {
            Ok(0) => return,
            Ok(n) => Ok(out.split_to(n).freeze()),
            Err(e) => Err(decoder
                .get_mut()
                .failure
                .take()
                .unwrap_or(BodyError::Decompress(e))),
        };
        out.clear();
        let failed = item.is_err();
        if tx.blocking_send(item).is_err() || failed {
            return;
        }
    }
}

/// A blocking [`BufRead`] over the chunks the pump sends.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, BodyError>>,
    current: Bytes,
    /// The pump's error, kept to report it rather than zstd's view of it.
    failure: Option<BodyError>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => {
                    let text = e.to_string();
                    self.failure = Some(e);
                    return Err(io::Error::other(text));
                }
                None => break,
            }
        }
        Ok(&self.current)
    }

    fn consume(&mut self, amt: usize) {
        self.current.advance(amt.min(self.current.len()));
    }
}

// ---------------------------------------------------------------------------
// The import route.

/// Whether [`Importer::lock`] takes Nix's per-path lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locking {
    /// Take `<path>.lock` (the agent; the master's `--from`).
    Take,
    /// The caller's Nix already holds it (the hook's outputs, §2.10): taking
    /// it again would deadlock.
    HeldByCaller,
}

/// Imports received NARs into the local store: restores them in place and
/// registers them in batches. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Importer {
    store_dir: StoreDir,
    batcher: RegistrationBatcher,
    in_flight: Arc<InFlight>,
}

impl Importer {
    /// An importer into `store_dir` (which must be the real, local store:
    /// paths are written at their store path) registering through `batcher`.
    pub fn new(store_dir: StoreDir, batcher: RegistrationBatcher) -> Self {
        Self {
            store_dir,
            batcher,
            in_flight: Arc::new(InFlight::default()),
        }
    }

    /// Imports under way: from [`Importer::lock`] until everything they
    /// leave behind is settled (registered, or removed with its lock file),
    /// whichever thread that happens on.
    pub fn in_flight(&self) -> usize {
        self.in_flight.count.load(Ordering::Acquire)
    }

    /// Resolves once no import is under way ([`Importer::in_flight`] is 0).
    /// A process that is about to exit waits for this (with a time limit)
    /// after cancelling its imports: their clean-up runs on blocking threads
    /// and in drops, which an exiting process would cut short, leaving
    /// partial paths behind.
    pub async fn idle(&self) {
        loop {
            let notified = self.in_flight.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a wake-up in between is kept.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// Checks that an item's path info is acceptable in this store: its
    /// path, references and deriver are in the store directory, and its
    /// NAR is not empty (the smallest NAR is well over 8 bytes).
    pub fn check_info(&self, info: &PathInfo) -> Result<(), ItemError> {
        let dir = self.store_dir.as_str();
        let outside = std::iter::once(&info.path)
            .chain(&info.references)
            .chain(&info.deriver)
            .find(|p| p.store_dir() != dir);
        if let Some(path) = outside {
            return Err(ItemError::BadPathInfo(format!(
                "{path} is not in the store directory {dir}"
            )));
        }
        if info.nar_size < 8 {
            return Err(ItemError::BadPathInfo(format!(
                "a NAR size of {} bytes is impossible",
                info.nar_size
            )));
        }
        Ok(())
    }

    /// Takes the path's lock (unless the caller holds it) and looks whether
    /// anything is at the path. An uncontended lock is taken right here (an
    /// `open` and a non-blocking `flock`: cheaper than a thread hand-off,
    /// which matters for thousands of small paths); a lock somebody holds is
    /// waited for on a blocking thread.
    pub async fn lock(&self, path: &StorePath, locking: Locking) -> Result<LockedPath, ItemError> {
        let ticket = Ticket::new(&self.in_flight);
        let target = path.as_path().to_path_buf();
        let lock_error =
            |e: io::Error| ItemError::Store(format!("cannot lock {}: {e}", target.display()));
        let lock = match locking {
            Locking::HeldByCaller => None,
            Locking::Take => match PathLock::try_acquire(&target).map_err(lock_error)? {
                Some(lock) => Some(lock),
                None => {
                    tracing::debug!(%path, "waiting for the lock held by another process");
                    let blocking_target = target.clone();
                    let acquired =
                        tokio::task::spawn_blocking(move || PathLock::acquire(&blocking_target))
                            .await
                            .map_err(|_| ItemError::Interrupted)?;
                    Some(acquired.map_err(lock_error)?)
                }
            },
        };
        let occupied = match std::fs::symlink_metadata(&target) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => {
                return Err(ItemError::Store(format!(
                    "cannot examine {}: {e}",
                    target.display()
                )))
            }
        };
        Ok(LockedPath {
            path: path.clone(),
            hold: Hold {
                _lock: lock.map(|lock| NixLock(Some(lock))),
                _ticket: ticket,
            },
            occupied,
        })
    }

    /// Registers a verified path (batched with whatever else is being
    /// registered): [`Importer::submit`], then [`Submitted::finish`].
    pub async fn register(&self, verified: Verified) -> Result<(), ItemError> {
        self.submit(verified).await?.finish().await
    }

    /// Queues a verified path for registration and returns once it is in
    /// the batcher's queue: a path that refers to this one may be submitted
    /// from then on (the queue is served in order, see
    /// [`RegistrationBatcher::enqueue`]). [`Submitted::finish`] waits for
    /// the result.
    ///
    /// Cancel safe: dropped before it resolves, nothing was queued and the
    /// tree is removed.
    pub async fn submit(&self, verified: Verified) -> Result<Submitted, ItemError> {
        let Verified { info, mut tree } = verified;
        let registration = Registration {
            path: info.path.clone(),
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            deriver: info.deriver.clone(),
            references: info.references.iter().cloned().collect(),
        };
        match self.batcher.enqueue(registration).await {
            Ok(queued) => {
                // From here on the batcher may make the path valid: a drop
                // must not remove its files.
                tree.keep = true;
                Ok(Submitted { tree, queued })
            }
            Err(e) => {
                // The drop removes the tree, then releases the lock.
                let _ = tokio::task::spawn_blocking(move || drop(tree)).await;
                Err(ItemError::Register(e.to_string()))
            }
        }
    }
}

/// A verified path in the registration queue; see [`Importer::submit`].
/// Dropping it leaves the registration to go on unobserved; its files are
/// kept either way, since it may become valid.
#[derive(Debug)]
pub struct Submitted {
    tree: RestoredTree,
    queued: Queued,
}

impl Submitted {
    pub fn path(&self) -> &StorePath {
        self.queued.path()
    }

    /// Waits until the path is registered. On success the lock file is
    /// deleted as Nix does after an import; on failure the restored tree is
    /// removed.
    pub async fn finish(self) -> Result<(), ItemError> {
        let Self { mut tree, queued } = self;
        match queued.wait().await {
            Ok(()) => {
                // Unlocks and deletes the lock file; the tree is kept.
                drop(tree);
                Ok(())
            }
            Err(BatchError::Failed { message, .. }) => {
                tree.keep = false;
                // The drop removes the tree, then releases the lock.
                let _ = tokio::task::spawn_blocking(move || drop(tree)).await;
                Err(ItemError::Register(message))
            }
            Err(e @ BatchError::Stopped) => Err(ItemError::Register(e.to_string())),
        }
    }
}

/// Counts imports under way; see [`Importer::in_flight`].
#[derive(Debug, Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

/// One import under way: counted in [`InFlight`] until dropped.
#[derive(Debug)]
struct Ticket(Arc<InFlight>);

impl Ticket {
    fn new(in_flight: &Arc<InFlight>) -> Self {
        in_flight.count.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(in_flight))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Nix's lock on a path being imported. Dropping it unlocks and deletes the
/// lock file the way Nix does (unlink, then mark the open file stale so a
/// waiter retries, §8): whatever the import's fate, no `<path>.lock` is left
/// behind, not even for a path whose NAR never arrived.
#[derive(Debug)]
struct NixLock(Option<PathLock>);

impl Drop for NixLock {
    fn drop(&mut self) {
        if let Some(lock) = self.0.take() {
            if let Err(e) = lock.release_and_delete() {
                tracing::debug!(%e, "cannot delete a lock file");
            }
        }
    }
}

/// What an import holds until it is settled, dropped in this order: Nix's
/// lock (if taken here), then the in-flight count.
#[derive(Debug)]
struct Hold {
    _lock: Option<NixLock>,
    _ticket: Ticket,
}

/// A store path locked for import (or whose lock the caller holds).
#[derive(Debug)]
pub struct LockedPath {
    path: StorePath,
    hold: Hold,
    occupied: bool,
}

impl LockedPath {
    pub fn path(&self) -> &StorePath {
        &self.path
    }

    /// Whether something is at the path. The caller asks its Nix whether
    /// the path is valid: if so, it skips the NAR and drops this (releasing
    /// the lock), if not it calls [`LockedPath::clear`].
    pub fn is_occupied(&self) -> bool {
        self.occupied
    }

    /// Removes what is at the path: an invalid leftover (a killed import, a
    /// failed build). Only call this for a path the store says is invalid.
    pub async fn clear(&mut self) -> Result<(), ItemError> {
        if !self.occupied {
            return Ok(());
        }
        let target = self.path.as_path().to_path_buf();
        tokio::task::spawn_blocking(move || remove_tree(&target))
            .await
            .map_err(|_| ItemError::Interrupted)?
            .map_err(|e| {
                ItemError::Store(format!(
                    "cannot remove the invalid leftover {}: {e}",
                    self.path
                ))
            })?;
        self.occupied = false;
        Ok(())
    }

    /// Streams exactly `info.nar_size` bytes of `body` into the path on a
    /// blocking thread, hashing them, and checks hash and size against
    /// `info`. On any error nothing is left at the path.
    pub async fn restore(
        self,
        info: &PathInfo,
        body: &mut BodyReader,
    ) -> Result<Verified, ItemError> {
        self.start_restore(info, body).await?.finish().await
    }

    /// [`LockedPath::restore`] in two steps: this consumes the NAR's bytes
    /// from `body` and returns as soon as the last one is handed to the
    /// restoring thread, so the caller can read the next item while the
    /// thread finishes; [`Restoring::finish`] gives the verdict. A NAR that
    /// fails before its end (bad format) fails here, with `body` left inside
    /// the NAR (the stream cannot go on).
    pub async fn start_restore(
        self,
        info: &PathInfo,
        body: &mut BodyReader,
    ) -> Result<Restoring, ItemError> {
        if self.path != info.path {
            return Err(ItemError::BadPathInfo(format!(
                "restoring {} under the lock of {}",
                info.path, self.path
            )));
        }
        if self.occupied {
            return Err(ItemError::Store(format!(
                "{} is occupied; clear it first",
                self.path
            )));
        }
        let (tx, rx) = mpsc::channel(RESTORE_QUEUE);
        let expected = (info.nar_hash, info.nar_size);
        let target = self.path.as_path().to_path_buf();
        let hold = self.hold;
        let job = tokio::task::spawn_blocking(move || restore_job(&target, expected, rx, hold));
        let mut left = info.nar_size;
        while left > 0 {
            match body.next_chunk(left).await {
                Ok(chunk) => {
                    left -= chunk.len() as u64;
                    if tx.send(chunk).await.is_err() {
                        // The job failed before the end of the NAR: its
                        // result says why.
                        drop(tx);
                        job.await.map_err(|_| ItemError::Interrupted)??;
                        return Err(ItemError::Interrupted);
                    }
                }
                Err(e) => {
                    // The job sees the channel close and cleans up.
                    drop(tx);
                    let _ = job.await;
                    return Err(e.into());
                }
            }
        }
        Ok(Restoring {
            info: info.clone(),
            job,
        })
    }
}

/// A NAR whose bytes were all handed to its restoring thread; see
/// [`LockedPath::start_restore`]. Dropping it lets the thread finish and
/// remove what it restored.
#[derive(Debug)]
pub struct Restoring {
    info: PathInfo,
    job: JoinHandle<Result<RestoredTree, ItemError>>,
}

impl Restoring {
    pub fn info(&self) -> &PathInfo {
        &self.info
    }

    /// Waits for the thread: the path is [`Verified`] if its hash and size
    /// matched.
    pub async fn finish(self) -> Result<Verified, ItemError> {
        let tree = self.job.await.map_err(|_| ItemError::Interrupted)??;
        Ok(Verified {
            info: self.info,
            tree,
        })
    }
}

/// A NAR restored at its store path whose hash and size matched its path
/// info; only [`LockedPath::restore`] makes one, and only
/// [`Importer::register`] consumes it. Dropping it removes the tree.
#[derive(Debug)]
pub struct Verified {
    info: PathInfo,
    tree: RestoredTree,
}

impl Verified {
    pub fn info(&self) -> &PathInfo {
        &self.info
    }
}

/// The files of a restored path and its hold (lock and in-flight count).
/// Unless `keep`, dropping it removes the files, before the lock is
/// released (the fields drop after `Drop::drop`).
#[derive(Debug)]
struct RestoredTree {
    path: PathBuf,
    _hold: Hold,
    keep: bool,
}

impl Drop for RestoredTree {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = remove_tree(&self.path) {
            tracing::warn!(path = %self.path.display(), %e, "cannot remove an unregistered restored path");
        }
    }
}

/// Removes a file, symlink or directory tree without following symlinks.
/// Nothing there is fine.
fn remove_tree(path: &Path) -> io::Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            make_writable(path);
            std::fs::remove_dir_all(path)
        }
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Gives the owner write permission on every directory under `dir` (store
/// directories are `0555`; root needs no permission, anyone else does).
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let mode = meta.permissions().mode();
        if mode & 0o700 != 0o700 {
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode | 0o700));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
}

/// The blocking side of [`LockedPath::restore`]: decode, write and hash
/// the chunks until exactly `size` bytes have come, then check.
fn restore_job(
    target: &Path,
    (expected_hash, expected_size): (NarHash, u64),
    mut rx: mpsc::Receiver<Bytes>,
    hold: Hold,
) -> Result<RestoredTree, ItemError> {
    // `hold` is a parameter, so it drops after `restorer`, whose drop
    // removes a partial tree: the lock and the in-flight count outlive
    // the clean-up.
    let mut restorer = Restorer::new(target).map_err(restore_error)?;
    let mut decoder = Decoder::new();
    let mut hasher = NarHasher::new();
    // Where the NAR ended, if it ended before `expected_size`.
    let mut nar_end: Option<u64> = None;
    while hasher.size() < expected_size {
        let Some(chunk) = rx.blocking_recv() else {
            // The sender stopped feeding: interrupted (the stream's error,
            // if any, is reported by the async side).
            return Err(ItemError::Interrupted);
        };
        let offset = hasher.size();
        hasher.update(&chunk);
        if nar_end.is_none() {
            let used = restorer
                .apply(&mut decoder, &chunk)
                .map_err(restore_error)?;
            if decoder.is_done() && (used < chunk.len() || hasher.size() < expected_size) {
                nar_end = Some(offset + used as u64);
            }
        }
    }
    drop(rx);
    let (got_hash, got_size) = hasher.finish();
    if let Some(end) = nar_end {
        return Err(ItemError::SizeMismatch {
            expected: expected_size,
            got: end,
        });
    }
    if !decoder.is_done() {
        return Err(ItemError::BadNar(format!(
            "the NAR goes on past its declared size of {expected_size} bytes"
        )));
    }
    debug_assert_eq!(got_size, expected_size);
    if got_hash != expected_hash {
        return Err(ItemError::HashMismatch {
            expected: expected_hash,
            got: got_hash,
        });
    }
    restorer.commit().map_err(restore_error)?;
    Ok(RestoredTree {
        path: target.to_path_buf(),
        _hold: hold,
        keep: false,
    })
}

fn restore_error(e: RestoreError) -> ItemError {
    match e {
        RestoreError::Nar(nar) => ItemError::BadNar(nar.to_string()),
        RestoreError::Incomplete => ItemError::BadNar("the NAR is not complete".to_owned()),
        other => ItemError::Store(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::proto::frame::encode_to_vec;
    use crate::proto::UploadItem;

    fn nar_of_file(contents: &[u8]) -> Vec<u8> {
        // Built token by token to stay independent of the encoder's API.
        let mut out = Vec::new();
        let mut s = |b: &[u8]| crate::nar::wire::put_str(&mut out, b);
        s(b"nix-archive-1");
        s(b"(");
        s(b"type");
        s(b"regular");
        s(b"contents");
        s(contents);
        s(b")");
        out
    }

    fn store_path(name: &str) -> StorePath {
        StorePath::parse_any(&format!(
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-{name}"
        ))
        .expect("valid")
    }

    fn info_for(nar: &[u8], name: &str) -> PathInfo {
        PathInfo {
            path: store_path(name),
            deriver: None,
            nar_hash: NarHash::of(nar),
            nar_size: nar.len() as u64,
            references: BTreeSet::new(),
            registration_time: 0,
            ultimate: false,
            sigs: vec![],
            ca: None,
        }
    }

    fn body(items: &[(PathInfo, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (info, nar) in items {
            out.extend(encode_to_vec(&UploadItem::Path(info.clone())).expect("encode"));
            out.extend(nar);
        }
        out.extend(encode_to_vec(&UploadItem::End).expect("encode"));
        out
    }

    /// An AsyncRead that yields `data` in pieces of `step` bytes.
    fn trickle(data: Vec<u8>, step: usize) -> impl AsyncRead + Send + Unpin + 'static {
        let (mut w, r) = tokio::io::duplex(step.max(1));
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            for piece in data.chunks(step.max(1)) {
                if w.write_all(piece).await.is_err() {
                    return;
                }
            }
        });
        r
    }

    async fn read_all(mut reader: BodyReader) -> Vec<(PathInfo, Vec<u8>)> {
        let mut got = Vec::new();
        while let Some(item) = reader.read_item::<UploadItem>().await.expect("item") {
            let UploadItem::Path(info) = item else {
                break;
            };
            let mut nar = Vec::new();
            let mut left = info.nar_size;
            while left > 0 {
                let chunk = reader.next_chunk(left).await.expect("chunk");
                left -= chunk.len() as u64;
                nar.extend_from_slice(&chunk);
            }
            got.push((info, nar));
        }
        got
    }

    fn sample() -> Vec<(PathInfo, Vec<u8>)> {
        (0..5)
            .map(|i| {
                let nar = nar_of_file(&vec![b'a' + i as u8; 1000 * i + 3]);
                (info_for(&nar, &format!("p{i}")), nar)
            })
            .collect()
    }

    #[tokio::test]
    async fn body_items_and_nars_in_any_chunking() {
        let items = sample();
        let raw = body(&items);
        for step in [1, 7, 64, 4096, 1 << 20] {
            let reader = BodyReader::new(trickle(raw.clone(), step), Compression::None);
            assert_eq!(read_all(reader).await, items, "step {step}");
        }
    }

    #[tokio::test]
    async fn zstd_body() {
        let items = sample();
        let raw = body(&items);
        let compressed = zstd::encode_all(&raw[..], 3).expect("compress");
        for step in [5, 1 << 20] {
            let reader = BodyReader::new(
                trickle(compressed.clone(), step),
                Compression::Zstd { level: 3 },
            );
            assert_eq!(read_all(reader).await, items, "step {step}");
        }
        let mut reader = BodyReader::new(trickle(raw, 1 << 20), Compression::Zstd { level: 3 });
        let err = reader
            .read_item::<UploadItem>()
            .await
            .expect_err("not zstd");
        assert!(matches!(err, BodyError::Decompress(_)), "{err}");
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error_and_clean_end_is_none() {
        let raw = body(&sample());
        let mut reader = BodyReader::new(trickle(raw[..3].to_vec(), 1), Compression::None);
        assert!(reader.read_item::<UploadItem>().await.is_err());
        let mut reader = BodyReader::new(trickle(Vec::new(), 1), Compression::None);
        assert!(reader
            .read_item::<UploadItem>()
            .await
            .expect("clean")
            .is_none());
    }

    async fn restore_into(
        dir: &Path,
        info: &PathInfo,
        nar: Vec<u8>,
        step: usize,
    ) -> (Result<Verified, ItemError>, PathBuf) {
        // Restore under `dir` instead of /nix/store: build the lock by hand.
        let target = dir.join(info.path.base_name());
        let mut reader = BodyReader::new(trickle(nar, step), Compression::None);
        let (tx, rx) = mpsc::channel(RESTORE_QUEUE);
        let expected = (info.nar_hash, info.nar_size);
        let t = target.clone();
        let hold = unlocked_hold(&Arc::new(InFlight::default()));
        let job = tokio::task::spawn_blocking(move || restore_job(&t, expected, rx, hold));
        let mut left = info.nar_size;
        while left > 0 {
            let chunk = reader.next_chunk(left).await.expect("chunk");
            left -= chunk.len() as u64;
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        drop(tx);
        let result = job.await.expect("job").map(|tree| Verified {
            info: info.clone(),
            tree,
        });
        (result, target)
    }

    #[tokio::test]
    async fn restore_checks_hash_and_size_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nar = nar_of_file(b"hello world");
        let info = info_for(&nar, "good");
        let (ok, target) = restore_into(dir.path(), &info, nar.clone(), 3).await;
        let verified = ok.expect("verified");
        assert_eq!(std::fs::read(&target).expect("restored"), b"hello world");
        drop(verified);
        assert!(
            !target.exists(),
            "an unregistered Verified removes its tree"
        );

        // A flipped byte in the contents: hash mismatch, nothing left.
        let mut bad = nar.clone();
        let at = bad
            .windows(5)
            .position(|w| w == b"hello")
            .expect("contents in the NAR");
        bad[at] ^= 1;
        let (err, target) = restore_into(dir.path(), &info, bad, 1 << 20).await;
        assert!(
            matches!(err, Err(ItemError::HashMismatch { .. })),
            "{err:?}"
        );
        assert!(!target.exists());

        // Declared size larger than the NAR: size mismatch.
        let mut long = info.clone();
        let mut padded = nar.clone();
        padded.extend_from_slice(&[0; 8]);
        long.nar_size = padded.len() as u64;
        long.nar_hash = NarHash::of(&padded);
        let (err, target) = restore_into(dir.path(), &long, padded, 5).await;
        match err {
            Err(ItemError::SizeMismatch { expected, got }) => {
                assert_eq!((expected, got), (long.nar_size, nar.len() as u64));
            }
            other => panic!("expected a size mismatch, got {other:?}"),
        }
        assert!(!target.exists());

        // Declared size smaller than the NAR: the NAR is cut off.
        let mut short = info.clone();
        short.nar_size -= 8;
        let (err, target) =
            restore_into(dir.path(), &short, nar[..nar.len() - 8].to_vec(), 5).await;
        assert!(matches!(err, Err(ItemError::BadNar(_))), "{err:?}");
        assert!(!target.exists());
    }

    fn unlocked_hold(in_flight: &Arc<InFlight>) -> Hold {
        Hold {
            _lock: None,
            _ticket: Ticket::new(in_flight),
        }
    }

    #[tokio::test]
    async fn interrupted_restore_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nar = nar_of_file(&vec![7u8; 100_000]);
        let info = info_for(&nar, "cut");
        let target = dir.path().join(info.path.base_name());
        let lock_file = PathLock::lock_path_of(&target);
        let (tx, rx) = mpsc::channel(RESTORE_QUEUE);
        let t = target.clone();
        let expected = (info.nar_hash, info.nar_size);
        let in_flight = Arc::new(InFlight::default());
        let hold = Hold {
            _lock: Some(NixLock(Some(PathLock::acquire(&target).expect("lock")))),
            _ticket: Ticket::new(&in_flight),
        };
        assert!(lock_file.exists());
        let job = tokio::task::spawn_blocking(move || restore_job(&t, expected, rx, hold));
        tx.send(Bytes::copy_from_slice(&nar[..50_000]))
            .await
            .expect("send");
        assert_eq!(in_flight.count.load(Ordering::Acquire), 1);
        drop(tx);
        let result = job.await.expect("job");
        assert!(matches!(result, Err(ItemError::Interrupted)), "{result:?}");
        assert!(!target.exists());
        assert!(
            !lock_file.exists(),
            "the lock file of a failed import is deleted"
        );
        assert_eq!(in_flight.count.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn idle_waits_for_every_ticket() {
        let importer = Importer::new(
            StoreDir::new("/nix/store".to_owned()).expect("store dir"),
            RegistrationBatcher::spawn("false".to_owned()),
        );
        let first = unlocked_hold(&importer.in_flight);
        let second = unlocked_hold(&importer.in_flight);
        assert_eq!(importer.in_flight(), 2);
        let idle = tokio::spawn({
            let importer = importer.clone();
            async move { importer.idle().await }
        });
        drop(first);
        tokio::task::yield_now().await;
        assert!(!idle.is_finished());
        // Dropped on another thread, as the restoring threads do.
        std::thread::spawn(move || drop(second))
            .join()
            .expect("thread");
        tokio::time::timeout(std::time::Duration::from_secs(5), idle)
            .await
            .expect("idle after the last ticket")
            .expect("task");
        importer.idle().await;
    }

    #[test]
    fn outcomes() {
        let e = ItemError::SizeMismatch {
            expected: 1,
            got: 2,
        };
        assert_eq!(
            e.outcome(),
            Some(UploadOutcome::SizeMismatch {
                expected: 1,
                got: 2
            })
        );
        assert_eq!(ItemError::Interrupted.outcome(), None);
    }
}
