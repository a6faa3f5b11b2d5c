//! The sending half of the transfer engine: writes the body of an Upload
//! (master → agent) or a Download (agent → master) stream, as
//! [`crate::proto`] specifies it:
//!
//! ```text
//! body = ( item-frame [ NAR: exactly nar_size bytes ] )… end-frame
//!        the whole of it one zstd stream if the stream's Compression says so
//! ```
//!
//! # How the bytes flow
//!
//! ```text
//! blocking thread:  items → frame / dump_path → Verifier (hash + size) → [zstd] → ChunkWriter
//!                                                                                   │ bounded channel of
//!                                                                                   ▼ CHUNK_SIZE Bytes
//! async task:                                             ChunkSink::write_chunk (quinn SendStream)
//! ```
//!
//! NARs are dumped straight from the store's files ([`crate::nar::dump_path`])
//! on a blocking thread: store paths are world-readable, and reading them
//! directly spares every transfer from queueing behind one daemon
//! connection. The async side only moves large [`Bytes`] chunks into the
//! stream, so a thousand tiny paths cost a few writes, not thousands.
//! Memory per body is bounded by [`CHANNEL_DEPTH`] × [`CHUNK_SIZE`] plus
//! zstd's window.
//!
//! # Corruption of the local store
//!
//! The NAR of every path is counted as it is dumped: one that grows past
//! its recorded `nar_size` is cut off at that size, and one whose size
//! differs from its [`PathInfo`] ends the body with
//! [`SendError::CorruptSize`]. The receiver hashes every NAR anyway, so the
//! sender hashes only when [`SendOptions::verify_hash`] asks for it (a
//! mismatch then ends the body with [`SendError::CorruptHash`]): hashing
//! costs a quarter of the sender's CPU at full speed. A sender told of a
//! hash mismatch by the receiver can find out whether its own store is to
//! blame with [`check_local_nar`]. On *any* error the caller must reset the
//! stream (`SendStream::reset` with [`crate::proto::ErrorCode::Internal`]),
//! never finish it, so that the receiver throws away the item it was
//! reading.

use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::hash::{NarHash, NarHasher};
use crate::nar::{dump_path, DumpError};
use crate::path_info::PathInfo;
use crate::proto::frame::{write_frame_blocking, Message};
use crate::proto::{Compression, DownloadItem, ProtoError, UploadItem};
use crate::store_path::StorePath;

/// Size of the chunks handed to the stream. quinn copies each write into
/// its send buffer and a chunk costs one task wake-up and one lock of the
/// connection state, so chunks must be large; 512 KiB is past the point
/// where per-chunk costs stop showing up (at 500 MB/s, 1,000 chunks per
/// second) and still far below the 8 MiB stream window.
pub const CHUNK_SIZE: usize = 512 * 1024;

/// Chunks queued between the dumping thread and the stream: enough to keep
/// the stream busy while the thread opens the next file (4 MiB), small
/// enough that `--jobs` parallel bodies stay within a few tens of MiB.
pub const CHANNEL_DEPTH: usize = 8;

/// How often (in NAR bytes) the progress callback hears about bytes dumped.
const PROGRESS_GRAIN: u64 = 1 << 20;

/// A frame that can appear in a body: the item type of the stream.
pub trait BodyItem: Message + Send + 'static {
    /// The path info whose NAR follows this item, if one does.
    fn nar_info(&self) -> Option<&PathInfo>;
    /// The frame that ends the body.
    fn end() -> Self;
}

impl BodyItem for UploadItem {
    fn nar_info(&self) -> Option<&PathInfo> {
        match self {
            Self::Path(info) => Some(info),
            Self::End => None,
        }
    }

    fn end() -> Self {
        Self::End
    }
}

impl BodyItem for DownloadItem {
    fn nar_info(&self) -> Option<&PathInfo> {
        match self {
            Self::Path(info) => Some(info),
            Self::NotValid(_) | Self::End => None,
        }
    }

    fn end() -> Self {
        Self::End
    }
}

/// How a body is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOptions {
    /// As announced in the stream's request (Upload) or chosen by the
    /// master (Download).
    pub compression: Compression,
    /// Where the store's files really are, for a store whose logical
    /// directory is not where it is mounted (a chroot store such as
    /// `nix --store /tmp/root`): a path `/nix/store/x` is read from
    /// `store_root/nix/store/x`. `None` = read the store path itself.
    pub store_root: Option<PathBuf>,
    /// Hash every NAR as it is dumped and end the body with
    /// [`SendError::CorruptHash`] if it does not match its path info.
    /// Off by default: the receiver checks the hash anyway.
    pub verify_hash: bool,
}

impl SendOptions {
    pub fn new(compression: Compression) -> Self {
        Self {
            compression,
            store_root: None,
            verify_hash: false,
        }
    }

    /// Where the files of `path` are read from.
    pub fn location(&self, path: &StorePath) -> PathBuf {
        match &self.store_root {
            Some(root) => root.join(path.as_str().trim_start_matches('/')),
            None => path.as_path().to_path_buf(),
        }
    }
}

/// What the progress callback hears, from the dumping thread, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendProgress {
    /// This many more NAR bytes (uncompressed) went into the body.
    NarBytes(u64),
    /// The `index`-th item (from 0) and its NAR, if any, are in the body.
    ItemWritten { index: usize },
}

/// What a finished body held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendSummary {
    /// Items written, not counting the end frame.
    pub items: u64,
    /// NAR bytes (uncompressed).
    pub nar_bytes: u64,
    /// Bytes handed to the stream (compressed, frames included).
    pub wire_bytes: u64,
}

/// Why a body could not be sent. On any of them the caller resets the
/// stream (see the module doc).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    #[error("the local store is corrupt: the NAR of {path} hashes to {got}, but its path info says {expected}")]
    CorruptHash {
        path: StorePath,
        expected: NarHash,
        got: NarHash,
    },
    #[error("the local store is corrupt: the NAR of {path} is {got} bytes, but its path info says {expected}")]
    CorruptSize {
        path: StorePath,
        expected: u64,
        /// The size found; for a NAR that grew past `expected`, a lower
        /// bound (dumping stopped there).
        got: u64,
    },
    #[error("cannot read {path} from the local store: {source}")]
    Dump {
        path: StorePath,
        #[source]
        source: DumpError,
    },
    #[error("cannot write an item of the body: {0}")]
    Frame(#[source] ProtoError),
    #[error("zstd compression failed: {0}")]
    Compress(#[source] io::Error),
    /// The stream refused the bytes: the peer stopped reading or the
    /// connection is gone.
    #[error("writing to the stream failed: {0}")]
    Write(#[source] io::Error),
    #[error("the dumping thread panicked or was cancelled")]
    Thread,
}

impl SendError {
    /// Whether the error is the sender's store being corrupt (what it has on
    /// disk does not match what it has registered).
    pub fn is_local_corruption(&self) -> bool {
        matches!(self, Self::CorruptHash { .. } | Self::CorruptSize { .. })
    }
}

/// Where the chunks of a body go: a quinn stream without a copy, or any
/// tokio writer through [`WriteSink`].
pub trait ChunkSink: Send {
    fn write_chunk(&mut self, chunk: Bytes) -> impl Future<Output = io::Result<()>> + Send;
}

impl ChunkSink for quinn::SendStream {
    async fn write_chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        Self::write_chunk(self, chunk)
            .await
            .map_err(io::Error::from)
    }
}

/// A [`ChunkSink`] over any tokio writer (a duplex pipe in tests, a file).
#[derive(Debug)]
pub struct WriteSink<W>(pub W);

impl<W: AsyncWrite + Unpin + Send> ChunkSink for WriteSink<W> {
    async fn write_chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        self.0.write_all(&chunk).await
    }
}

/// Writes the body made of `items` (each [`BodyItem::nar_info`] followed by
/// its NAR from the store), then the end frame, to `sink`. Does not finish
/// or flush the stream: the caller finishes it on success and resets it on
/// error. `progress` is called from the dumping thread.
///
/// Dropping the future stops the dumping thread at its next chunk.
pub async fn send_body<S, I, P>(
    sink: &mut S,
    items: I,
    options: &SendOptions,
    progress: P,
) -> Result<SendSummary, SendError>
where
    S: ChunkSink + ?Sized,
    I: IntoIterator,
    I::IntoIter: Send + 'static,
    I::Item: BodyItem,
    P: FnMut(SendProgress) + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let items = items.into_iter();
    let options = options.clone();
    let producer = tokio::task::spawn_blocking(move || {
        produce(items, &options, ChunkWriter::new(tx), progress)
    });
    let mut wire_bytes = 0u64;
    let mut write_error = None;
    while let Some(chunk) = rx.recv().await {
        wire_bytes += chunk.len() as u64;
        if let Err(e) = sink.write_chunk(chunk).await {
            write_error = Some(e);
            break;
        }
    }
    // The producer's next chunk now fails, so it ends promptly.
    drop(rx);
    let produced = producer.await.map_err(|_| SendError::Thread)?;
    match (produced, write_error) {
        // Corruption explains a failed write too (we stopped mid-item); say so.
        (Err(e), _) if e.is_local_corruption() => Err(e),
        (_, Some(e)) => Err(SendError::Write(e)),
        (Err(e), None) => Err(e),
        (Ok((items, nar_bytes)), None) => Ok(SendSummary {
            items,
            nar_bytes,
            wire_bytes,
        }),
    }
}

/// The blocking side: the whole body into `chunks`. Returns the number of
/// items and of NAR bytes.
fn produce<I, T, P>(
    items: I,
    options: &SendOptions,
    mut chunks: ChunkWriter,
    mut progress: P,
) -> Result<(u64, u64), SendError>
where
    I: Iterator<Item = T>,
    T: BodyItem,
    P: FnMut(SendProgress),
{
    let counts = match options.compression {
        Compression::None => {
            let counts = write_body(&mut chunks, items, options, &mut progress)?;
            chunks.finish().map_err(SendError::Write)?;
            counts
        }
        Compression::Zstd { level } => {
            let mut encoder =
                zstd::stream::write::Encoder::new(chunks, level).map_err(SendError::Compress)?;
            let counts = write_body(&mut encoder, items, options, &mut progress)?;
            let chunks = encoder.finish().map_err(write_or_compress)?;
            chunks.finish().map_err(SendError::Write)?;
            counts
        }
    };
    Ok(counts)
}

/// A failure while zstd writes: the channel closing is a write failure,
/// anything else is zstd's.
fn write_or_compress(e: io::Error) -> SendError {
    if e.kind() == io::ErrorKind::BrokenPipe {
        SendError::Write(e)
    } else {
        SendError::Compress(e)
    }
}

fn write_body<W, I, T, P>(
    out: &mut W,
    items: I,
    options: &SendOptions,
    progress: &mut P,
) -> Result<(u64, u64), SendError>
where
    W: Write,
    I: Iterator<Item = T>,
    T: BodyItem,
    P: FnMut(SendProgress),
{
    let mut count = 0u64;
    let mut nar_bytes = 0u64;
    for (index, item) in items.enumerate() {
        write_frame_blocking(out, &item).map_err(frame_error)?;
        if let Some(info) = item.nar_info() {
            nar_bytes += write_nar(
                out,
                info,
                &options.location(&info.path),
                options.verify_hash,
                progress,
            )?;
        }
        count += 1;
        progress(SendProgress::ItemWritten { index });
    }
    write_frame_blocking(out, &T::end()).map_err(frame_error)?;
    Ok((count, nar_bytes))
}

fn frame_error(e: ProtoError) -> SendError {
    match e {
        ProtoError::Io(e) => write_or_compress(e),
        other => SendError::Frame(other),
    }
}

/// Dumps the NAR of `info` from `location` and checks its size and SHA-256
/// against `info`, without sending it anywhere: what a sender runs when the
/// receiver reports a hash mismatch, to tell a corrupt local store
/// ([`SendError::CorruptHash`], [`SendError::CorruptSize`]) from anything
/// else (`Ok`). Blocking; reads the whole path.
pub fn check_local_nar(info: &PathInfo, location: &Path) -> Result<(), SendError> {
    write_nar(&mut io::sink(), info, location, true, &mut |_| {}).map(drop)
}

/// Dumps the NAR of `info` from `location` into `out`, checking its size
/// (and with `verify_hash` its hash) against `info` as it goes; returns its
/// size.
fn write_nar<W: Write, P: FnMut(SendProgress)>(
    out: &mut W,
    info: &PathInfo,
    location: &Path,
    verify_hash: bool,
    progress: &mut P,
) -> Result<u64, SendError> {
    let mut verifier = Verifier {
        out,
        hasher: verify_hash.then(NarHasher::new),
        size: 0,
        limit: info.nar_size,
        overflowed: false,
        unreported: 0,
        progress,
    };
    let dumped = dump_path(location, &mut verifier);
    let Verifier {
        hasher,
        size,
        overflowed,
        unreported,
        progress,
        ..
    } = verifier;
    if unreported > 0 {
        progress(SendProgress::NarBytes(unreported));
    }
    if overflowed {
        return Err(SendError::CorruptSize {
            path: info.path.clone(),
            expected: info.nar_size,
            got: info.nar_size + 1,
        });
    }
    match dumped {
        Ok(_) => {}
        Err(DumpError::Write(e)) => return Err(write_or_compress(e)),
        Err(source) => {
            return Err(SendError::Dump {
                path: info.path.clone(),
                source,
            })
        }
    }
    if size != info.nar_size {
        return Err(SendError::CorruptSize {
            path: info.path.clone(),
            expected: info.nar_size,
            got: size,
        });
    }
    if let Some(hasher) = hasher {
        let (hash, _) = hasher.finish();
        if hash != info.nar_hash {
            return Err(SendError::CorruptHash {
                path: info.path.clone(),
                expected: info.nar_hash,
                got: hash,
            });
        }
    }
    Ok(size)
}

/// Counts (and optionally hashes) the NAR on its way to the body, and
/// refuses to let it grow past its recorded size: the receiver reads
/// exactly `nar_size` bytes and would take the excess for the next frame.
struct Verifier<'a, W, P> {
    out: &'a mut W,
    hasher: Option<NarHasher>,
    /// NAR bytes written so far.
    size: u64,
    limit: u64,
    overflowed: bool,
    unreported: u64,
    progress: &'a mut P,
}

impl<W: Write, P: FnMut(SendProgress)> Write for Verifier<'_, W, P> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit - self.size;
        if buf.len() as u64 > room {
            self.overflowed = true;
            return Err(io::Error::other(
                "the NAR is larger than its path info says",
            ));
        }
        let n = self.out.write(buf)?;
        self.size += n as u64;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buf[..n]);
        }
        self.unreported += n as u64;
        if self.unreported >= PROGRESS_GRAIN {
            (self.progress)(SendProgress::NarBytes(self.unreported));
            self.unreported = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Gathers the body into [`CHUNK_SIZE`] chunks and hands them to the async
/// side; blocks while the channel is full (back-pressure from the stream).
struct ChunkWriter {
    buf: BytesMut,
    tx: mpsc::Sender<Bytes>,
}

impl ChunkWriter {
    fn new(tx: mpsc::Sender<Bytes>) -> Self {
        Self {
            buf: BytesMut::with_capacity(CHUNK_SIZE),
            tx,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK_SIZE);
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the stream writer stopped"))
    }

    /// Sends what is left.
    fn finish(mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            self.send()
        }
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK_SIZE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK_SIZE {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::proto::frame::read_frame_blocking;

    /// A store under a temporary root with a few paths, and their infos
    /// (hash and size computed with our own dump, checked against Nix's
    /// elsewhere).
    struct TestStore {
        root: tempfile::TempDir,
        infos: Vec<PathInfo>,
    }

    fn store_path(c: char, name: &str) -> StorePath {
        StorePath::parse_any(&format!("/nix/store/{}-{name}", c.to_string().repeat(32)))
            .expect("valid store path")
    }

    fn make_store() -> TestStore {
        let root = tempfile::tempdir().expect("tempdir");
        let store = root.path().join("nix/store");
        std::fs::create_dir_all(&store).expect("store dir");
        let a = store_path('a', "small");
        let b = store_path('b', "tree");
        let c = store_path('c', "big");
        std::fs::write(store.join(a.base_name()), b"hello").expect("write a");
        let tree = store.join(b.base_name());
        std::fs::create_dir_all(tree.join("bin")).expect("mkdir");
        std::fs::write(tree.join("bin/run"), b"#!/bin/sh\necho hi\n").expect("write");
        std::fs::set_permissions(tree.join("bin/run"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::os::unix::fs::symlink("bin/run", tree.join("link")).expect("symlink");
        std::fs::write(tree.join("empty"), b"").expect("write");
        // Several chunks, partly compressible.
        let big: Vec<u8> = (0..3 * CHUNK_SIZE + 12345)
            .map(|i| {
                if i % 3 == 0 {
                    (i * 7919 % 251) as u8
                } else {
                    b'x'
                }
            })
            .collect();
        std::fs::write(store.join(c.base_name()), &big).expect("write c");
        let infos = [(a, vec![]), (b, vec![]), (c, vec![])]
            .into_iter()
            .map(|(path, refs)| {
                let location = root.path().join(path.as_str().trim_start_matches('/'));
                let mut nar = Vec::new();
                dump_path(&location, &mut nar).expect("dump");
                PathInfo {
                    path,
                    deriver: None,
                    nar_hash: NarHash::of(&nar),
                    nar_size: nar.len() as u64,
                    references: refs.into_iter().collect::<BTreeSet<_>>(),
                    registration_time: 0,
                    ultimate: false,
                    sigs: Vec::new(),
                    ca: None,
                }
            })
            .collect();
        TestStore { root, infos }
    }

    fn options(store: &TestStore, compression: Compression) -> SendOptions {
        SendOptions {
            compression,
            store_root: Some(store.root.path().to_path_buf()),
            verify_hash: true,
        }
    }

    /// A minimal reader of a body, independent of the receive half: items,
    /// each NAR read as exactly `nar_size` bytes and hashed.
    fn read_body(bytes: &[u8], compression: Compression) -> Vec<(PathInfo, NarHash)> {
        let mut reader: Box<dyn Read> = match compression {
            Compression::None => Box::new(bytes),
            Compression::Zstd { .. } => {
                Box::new(zstd::stream::read::Decoder::new(bytes).expect("zstd"))
            }
        };
        let mut out = Vec::new();
        loop {
            let item: UploadItem = read_frame_blocking(&mut reader)
                .expect("frame")
                .expect("not eof");
            match item {
                UploadItem::Path(info) => {
                    let mut nar = Vec::new();
                    (&mut reader)
                        .take(info.nar_size)
                        .read_to_end(&mut nar)
                        .expect("nar");
                    assert_eq!(nar.len() as u64, info.nar_size);
                    let hash = NarHash::of(&nar);
                    out.push((info, hash));
                }
                UploadItem::End => break,
            }
        }
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).expect("rest");
        assert!(rest.is_empty(), "{} bytes after End", rest.len());
        out
    }

    async fn send_to_vec(
        items: Vec<UploadItem>,
        options: &SendOptions,
    ) -> (Result<SendSummary, SendError>, Vec<u8>, Vec<SendProgress>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&events);
        let mut sink = WriteSink(Vec::new());
        let result = send_body(&mut sink, items, options, move |p| {
            seen.lock().expect("lock").push(p);
        })
        .await;
        let events = events.lock().expect("lock").clone();
        (result, sink.0, events)
    }

    #[tokio::test]
    async fn body_round_trips_plain_and_zstd() {
        let store = make_store();
        for compression in [Compression::None, Compression::Zstd { level: 3 }] {
            let items: Vec<UploadItem> =
                store.infos.iter().cloned().map(UploadItem::Path).collect();
            let (result, bytes, events) = send_to_vec(items, &options(&store, compression)).await;
            let summary = result.expect("sent");
            let total: u64 = store.infos.iter().map(|i| i.nar_size).sum();
            assert_eq!(summary.items, 3);
            assert_eq!(summary.nar_bytes, total);
            assert_eq!(summary.wire_bytes, bytes.len() as u64);
            if compression == Compression::None {
                assert!(summary.wire_bytes > total);
            } else {
                assert!(summary.wire_bytes < total, "compressible data compressed");
            }
            let got = read_body(&bytes, compression);
            assert_eq!(got.len(), 3);
            for ((info, hash), expected) in got.iter().zip(&store.infos) {
                assert_eq!(info, expected);
                assert_eq!(*hash, expected.nar_hash);
            }
            let reported: u64 = events
                .iter()
                .filter_map(|e| match e {
                    SendProgress::NarBytes(n) => Some(*n),
                    SendProgress::ItemWritten { .. } => None,
                })
                .sum();
            assert_eq!(reported, total);
            let written: Vec<usize> = events
                .iter()
                .filter_map(|e| match e {
                    SendProgress::ItemWritten { index } => Some(*index),
                    SendProgress::NarBytes(_) => None,
                })
                .collect();
            assert_eq!(written, [0, 1, 2]);
        }
    }

    #[tokio::test]
    async fn empty_body_is_just_end() {
        let store = make_store();
        let (result, bytes, _) = send_to_vec(Vec::new(), &options(&store, Compression::None)).await;
        assert_eq!(result.expect("sent").items, 0);
        assert!(read_body(&bytes, Compression::None).is_empty());
    }

    #[tokio::test]
    async fn download_items_carry_not_valid() {
        let store = make_store();
        let missing = store_path('z', "gone");
        let items = vec![
            DownloadItem::NotValid(missing.clone()),
            DownloadItem::Path(store.infos[0].clone()),
        ];
        let mut sink = WriteSink(Vec::new());
        let summary = send_body(
            &mut sink,
            items,
            &options(&store, Compression::None),
            |_| {},
        )
        .await
        .expect("sent");
        assert_eq!(summary.items, 2);
        let mut reader = &sink.0[..];
        let first: DownloadItem = read_frame_blocking(&mut reader).expect("f").expect("some");
        assert_eq!(first, DownloadItem::NotValid(missing));
        let second: DownloadItem = read_frame_blocking(&mut reader).expect("f").expect("some");
        assert_eq!(second, DownloadItem::Path(store.infos[0].clone()));
    }

    #[tokio::test]
    async fn corrupt_store_is_reported_not_sent() {
        let store = make_store();
        // Same size, different hash.
        let mut wrong_hash = store.infos[2].clone();
        wrong_hash.nar_hash = NarHash::of(b"something else");
        // Recorded smaller than on disk: must stop at the recorded size.
        let mut too_small = store.infos[2].clone();
        too_small.nar_size -= 8;
        // Recorded larger than on disk.
        let mut too_large = store.infos[0].clone();
        too_large.nar_size += 8;
        for (info, want_hash) in [(wrong_hash, true), (too_small, false), (too_large, false)] {
            let items = vec![
                UploadItem::Path(store.infos[0].clone()),
                UploadItem::Path(info),
            ];
            let (result, bytes, _) = send_to_vec(items, &options(&store, Compression::None)).await;
            let err = result.expect_err("corruption detected");
            assert!(err.is_local_corruption(), "{err}");
            assert_eq!(
                matches!(err, SendError::CorruptHash { .. }),
                want_hash,
                "{err}"
            );
            assert!(err.to_string().contains("local store is corrupt"), "{err}");
            // Never more NAR bytes than recorded, and no End frame.
            assert!(
                bytes.len() as u64 <= 2 * 4096 + store.infos[0].nar_size + store.infos[2].nar_size
            );
        }
    }

    #[tokio::test]
    async fn unverified_hash_is_sent_and_checked_on_demand() {
        let store = make_store();
        let mut wrong_hash = store.infos[2].clone();
        wrong_hash.nar_hash = NarHash::of(b"something else");
        let options = SendOptions {
            verify_hash: false,
            ..options(&store, Compression::None)
        };
        let items = vec![UploadItem::Path(wrong_hash.clone())];
        let (result, bytes, _) = send_to_vec(items, &options).await;
        result.expect("sizes match, so the body goes out whole");
        let got = read_body(&bytes, Compression::None);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, store.infos[2].nar_hash);
        // What a sender runs after the receiver's hash mismatch.
        let location = options.location(&wrong_hash.path);
        let err = check_local_nar(&wrong_hash, &location).expect_err("corrupt");
        assert!(matches!(err, SendError::CorruptHash { .. }), "{err}");
        check_local_nar(&store.infos[2], &location).expect("the real info matches");
        // Sizes are checked even without hashing.
        let mut too_large = store.infos[0].clone();
        too_large.nar_size += 8;
        let (result, _, _) = send_to_vec(vec![UploadItem::Path(too_large)], &options).await;
        assert!(matches!(result, Err(SendError::CorruptSize { .. })));
    }

    #[tokio::test]
    async fn missing_file_names_the_path() {
        let store = make_store();
        let mut info = store.infos[0].clone();
        info.path = store_path('d', "absent");
        let (result, _, _) = send_to_vec(
            vec![UploadItem::Path(info)],
            &options(&store, Compression::None),
        )
        .await;
        let err = result.expect_err("absent");
        assert!(matches!(err, SendError::Dump { .. }), "{err}");
        assert!(err.to_string().contains("dddddddd"), "{err}");
    }

    #[tokio::test]
    async fn stopped_stream_is_a_write_error() {
        let store = make_store();
        let (writer, reader) = tokio::io::duplex(1024);
        drop(reader);
        let mut sink = WriteSink(writer);
        let items: Vec<UploadItem> = store.infos.iter().cloned().map(UploadItem::Path).collect();
        let err = send_body(
            &mut sink,
            items,
            &options(&store, Compression::None),
            |_| {},
        )
        .await
        .expect_err("reader gone");
        assert!(matches!(err, SendError::Write(_)), "{err}");
    }

    #[test]
    fn chunk_writer_bounds_chunks() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut writer = ChunkWriter::new(tx);
        writer
            .write_all(&vec![7u8; 2 * CHUNK_SIZE + 10])
            .expect("write");
        writer.finish().expect("finish");
        let mut sizes = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            sizes.push(chunk.len());
        }
        assert_eq!(sizes, [CHUNK_SIZE, CHUNK_SIZE, 10]);
    }
}
