//! [`DaemonClient`]: the tokio glue of the worker protocol. It writes
//! requests encoded by [`super::ops`], runs the stderr loop through the pure
//! decoder of [`super::stderr`], and reads each op's result field by field
//! with the checks of [`super::wire`] (results can hold 100,000-path lists,
//! so they are read as they stream in, never re-parsed).
//!
//! Streams are never buffered whole: NarFromPath copies the NAR to the
//! caller's writer as it arrives, finding its end with the NAR decoder;
//! AddToStoreNar reads the caller's NAR in [`FRAME_SIZE`] frames while it
//! watches the daemon's replies.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::ops::{
    encode_add_to_store_nar, encode_basic_derivation, encode_derived_paths, encode_set_options,
    BuildMode, BuildResult, BuildStatus, ClientSettings, DerivedPath, Missing, Op, ProtocolVersion,
    WORKER_MAGIC_1, WORKER_MAGIC_2,
};
use super::stderr::{self, Activity, ActivityResult, NixError, StderrMsg};
use super::wire::{
    check_count, check_len, check_padding, padding_len, utf8, Encoder, WireError, FRAME_SIZE,
    MAX_LIST_LEN, MAX_PATH_LEN, MAX_STRING_LEN,
};
use super::DaemonError;
use crate::drv::BasicDerivation;
use crate::hash::NarHash;
use crate::nar;
use crate::path_info::{topo_sort, PathInfo};
use crate::store_path::{StoreDir, StorePath};

/// The daemon socket of a multi-user Nix installation.
pub const DEFAULT_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// Requests sent ahead of their replies by [`DaemonClient::query_path_infos`]:
/// enough to hide the round trip, few enough to bound what is in flight.
const PIPELINE_DEPTH: usize = 1024;

/// How long [`DaemonClient::shutdown`] waits for a child daemon to exit after
/// its stdin closed, before killing it.
const CHILD_EXIT_GRACE: Duration = Duration::from_secs(5);

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;
type Logger = Box<dyn FnMut(LogEvent) + Send>;

/// What the daemon says about the client's trust (≥ 1.35, §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The daemon did not say (protocol < 1.35, or it sent 0).
    Unknown,
    Trusted,
    NotTrusted,
}

/// Log output of the daemon while an operation runs, delivered live to the
/// callback set with [`DaemonClient::on_log`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// A log message (ANSI escapes included as Nix sent them).
    Message(Vec<u8>),
    StartActivity(Activity),
    StopActivity {
        id: u64,
    },
    /// An activity result; build log lines are
    /// [`ActivityResult::build_log_line`].
    Result(ActivityResult),
}

/// How to open a connection: the version to announce and the store
/// directory of the daemon.
#[derive(Debug, Clone)]
pub struct Connector {
    announce: ProtocolVersion,
    store_dir: StoreDir,
}

impl Default for Connector {
    fn default() -> Self {
        Self {
            announce: ProtocolVersion::LATEST,
            store_dir: StoreDir::default(),
        }
    }
}

impl Connector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The version to announce (default [`ProtocolVersion::LATEST`]); the
    /// connection speaks the lower of it and the daemon's.
    pub fn announce(mut self, version: ProtocolVersion) -> Self {
        self.announce = version;
        self
    }

    /// The daemon's store directory (default `/nix/store`).
    pub fn store_dir(mut self, store_dir: StoreDir) -> Self {
        self.store_dir = store_dir;
        self
    }

    /// Connect to a daemon socket.
    pub async fn connect_socket(
        &self,
        path: impl AsRef<Path>,
    ) -> Result<DaemonClient, DaemonError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| DaemonError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (read, write) = stream.into_split();
        self.handshake(read, write).await
    }

    /// Start `cmd`, which must run `nix-daemon --stdio` (possibly wrapped,
    /// e.g. in `unshare`), and talk to it over its stdin and stdout.
    /// `NIX_REMOTE` is removed from its environment so that the child serves
    /// its local store instead of proxying to a socket (§5, §11). The child is
    /// killed when the client is dropped. Its stderr is left as `cmd` says.
    pub async fn spawn_stdio(&self, mut cmd: Command) -> Result<DaemonClient, DaemonError> {
        let command = format!("{:?}", cmd.as_std());
        cmd.env_remove("NIX_REMOTE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|source| DaemonError::Spawn { command, source })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(DaemonError::Protocol {
                op: "handshake",
                reason: "the child's stdin and stdout were not piped".to_owned(),
            });
        };
        let mut client = self.handshake(stdout, stdin).await?;
        client.child = Some(child);
        Ok(client)
    }

    /// Run the handshake (§5.1) over any byte stream.
    pub async fn handshake<R, W>(&self, reader: R, writer: W) -> Result<DaemonClient, DaemonError>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let mut client = DaemonClient {
            reader: WireReader::new(Box::new(reader)),
            writer: Box::new(writer),
            version: self.announce,
            daemon_nix_version: None,
            trust: Trust::Unknown,
            store_dir: self.store_dir.clone(),
            logger: Box::new(trace_log),
            poisoned: true,
            child: None,
        };
        client.run_handshake(self.announce).await?;
        client.poisoned = false;
        Ok(client)
    }
}

/// A connection to a Nix daemon. Methods take `&mut self`: the protocol runs
/// one operation at a time per connection.
pub struct DaemonClient {
    reader: WireReader,
    writer: BoxWrite,
    version: ProtocolVersion,
    daemon_nix_version: Option<String>,
    trust: Trust,
    store_dir: StoreDir,
    logger: Logger,
    /// Set while an operation runs and left set if it did not end cleanly
    /// (I/O or protocol error, or the future was dropped half-way).
    poisoned: bool,
    child: Option<Child>,
}

impl fmt::Debug for DaemonClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaemonClient")
            .field("version", &self.version)
            .field("daemon_nix_version", &self.daemon_nix_version)
            .field("trust", &self.trust)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl DaemonClient {
    /// Connect to the daemon socket at `path` with the default [`Connector`].
    pub async fn connect_socket(path: impl AsRef<Path>) -> Result<Self, DaemonError> {
        Connector::new().connect_socket(path).await
    }

    /// Spawn a `nix-daemon --stdio` child with the default [`Connector`]; see
    /// [`Connector::spawn_stdio`].
    pub async fn spawn_stdio(cmd: Command) -> Result<Self, DaemonError> {
        Connector::new().spawn_stdio(cmd).await
    }

    /// `nix-daemon --stdio`, to pass to [`DaemonClient::spawn_stdio`].
    pub fn stdio_command() -> Command {
        let mut cmd = Command::new("nix-daemon");
        cmd.arg("--stdio");
        cmd
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// The daemon's Nix version, e.g. `2.8.0` (≥ 1.33).
    pub fn daemon_nix_version(&self) -> Option<&str> {
        self.daemon_nix_version.as_deref()
    }

    pub fn trust(&self) -> Trust {
        self.trust
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// False once an I/O or protocol failure left the connection out of
    /// step; every later operation then fails with [`DaemonError::Poisoned`].
    pub fn is_usable(&self) -> bool {
        !self.poisoned
    }

    /// Where log messages, activities and build log lines go (live, in the
    /// order the daemon sent them). The default logs them with `tracing` at
    /// debug level.
    pub fn on_log(&mut self, logger: impl FnMut(LogEvent) + Send + 'static) {
        self.logger = Box::new(logger);
    }

    /// Close the connection and wait (a bounded time) for a child daemon to
    /// exit.
    pub async fn shutdown(mut self) -> Result<(), DaemonError> {
        let io = |source| DaemonError::Io {
            op: "shutdown",
            source,
        };
        self.writer.shutdown().await.map_err(io)?;
        drop(self.writer);
        if let Some(mut child) = self.child.take() {
            match tokio::time::timeout(CHILD_EXIT_GRACE, child.wait()).await {
                Ok(status) => {
                    status.map_err(io)?;
                }
                Err(_elapsed) => child.kill().await.map_err(io)?,
            }
        }
        Ok(())
    }

    async fn run_handshake(&mut self, announce: ProtocolVersion) -> Result<(), DaemonError> {
        const OP: &str = "handshake";
        let mut enc = Encoder::new();
        enc.u64(WORKER_MAGIC_1);
        self.send(OP, &enc).await?;
        let magic = self.reader.u64(OP).await?;
        if magic != WORKER_MAGIC_2 {
            return Err(DaemonError::Protocol {
                op: OP,
                reason: format!("expected the daemon's magic {WORKER_MAGIC_2:#x}, got {magic:#x}"),
            });
        }
        let word = self.reader.u64(OP).await?;
        let daemon = ProtocolVersion::from_wire(word).ok_or_else(|| DaemonError::TooOld {
            daemon: format!("{}.{}", word >> 8, word & 0xff),
        })?;
        let version = announce.min(daemon);
        if version < ProtocolVersion::MIN {
            return Err(DaemonError::TooOld {
                daemon: daemon.to_string(),
            });
        }
        self.version = version;
        let minor = version.minor();
        enc.clear();
        enc.u64(announce.to_wire());
        if minor >= 38 {
            enc.strs(std::iter::empty::<&str>());
            self.send(OP, &enc).await?;
            enc.clear();
            // The daemon's features; nixq announced none, so none are used.
            let _features = self
                .reader
                .strings(OP, "daemon features", 1024, 1024)
                .await?;
        }
        if minor >= 14 {
            enc.u64(0); // obsolete CPU affinity
        }
        if minor >= 11 {
            enc.u64(0); // obsolete reserveSpace
        }
        self.send(OP, &enc).await?;
        if minor >= 33 {
            let text = self.reader.string(OP, "daemon Nix version", 1024).await?;
            self.daemon_nix_version = Some(text);
        }
        if minor >= 35 {
            self.trust = match self.reader.u64(OP).await? {
                0 => Trust::Unknown,
                1 => Trust::Trusted,
                2 => Trust::NotTrusted,
                value => {
                    return Err(DaemonError::Wire {
                        op: OP,
                        source: WireError::BadValue {
                            what: "trust status",
                            value,
                        },
                    })
                }
            };
        }
        self.stderr_loop(OP).await
    }

    /// SetOptions (§5.5).
    pub async fn set_options(&mut self, settings: &ClientSettings) -> Result<(), DaemonError> {
        let op = self.begin(Op::SetOptions)?;
        let mut enc = Encoder::new();
        encode_set_options(&mut enc, settings);
        let result = self.request(op, &enc).await;
        self.settle(result)
    }

    /// IsValidPath.
    pub async fn is_valid_path(&mut self, path: &StorePath) -> Result<bool, DaemonError> {
        let op = self.begin(Op::IsValidPath)?;
        let result = async {
            let mut enc = Encoder::new();
            enc.u64(Op::IsValidPath.code()).str(path.as_str());
            self.request(op, &enc).await?;
            self.reader.bool(op).await
        }
        .await;
        self.settle(result)
    }

    /// QueryValidPaths: which of `paths` are valid (without substituting).
    pub async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, DaemonError> {
        let op = self.begin(Op::QueryValidPaths)?;
        let result = async {
            let mut enc = Encoder::new();
            enc.u64(Op::QueryValidPaths.code()).strs(paths.iter());
            if self.version.minor() >= 27 {
                enc.bool(false); // substitute
            }
            self.request(op, &enc).await?;
            self.reader.paths(op, &self.store_dir).await
        }
        .await;
        self.settle(result)
    }

    /// QueryPathInfo: `None` if the path is not valid.
    pub async fn query_path_info(
        &mut self,
        path: &StorePath,
    ) -> Result<Option<PathInfo>, DaemonError> {
        let mut infos = self.query_path_infos(std::slice::from_ref(path)).await?;
        Ok(infos.pop().flatten())
    }

    /// QueryPathInfo for many paths, pipelined on the one connection: the
    /// answers come in the order of `paths`.
    pub async fn query_path_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<PathInfo>>, DaemonError> {
        let infos = self
            .pipelined(Op::QueryPathInfo, paths, |reader, op, store_dir, path| {
                Box::pin(read_path_info(reader, op, store_dir, path))
            })
            .await?;
        Ok(infos.into_iter().map(Option::flatten).collect())
    }

    /// Sends `op` with each path of `paths` as its one argument, in batches
    /// of [`PIPELINE_DEPTH`] requests written while their replies are read
    /// with `read_reply`, so `n` requests cost `n / PIPELINE_DEPTH` round
    /// trips instead of `n`. Every reply is read even after Nix reported an
    /// error for one (its slot is `None`), so the connection stays in step;
    /// the first such error ends the operation after its batch.
    async fn pipelined<T>(
        &mut self,
        op_code: Op,
        paths: &[StorePath],
        read_reply: ReadReply<T>,
    ) -> Result<Vec<Option<T>>, DaemonError> {
        let op = self.begin(op_code)?;
        let version = self.version;
        let mut out = Vec::with_capacity(paths.len());
        let mut result = Ok(());
        for batch in paths.chunks(PIPELINE_DEPTH) {
            let Self {
                reader,
                writer,
                logger,
                store_dir,
                ..
            } = &mut *self;
            let write = async {
                let mut enc = Encoder::new();
                for path in batch {
                    enc.u64(op_code.code()).str(path.as_str());
                }
                write_all(writer, op, enc.as_bytes()).await
            };
            let read = async {
                let mut nix_error = None;
                for path in batch {
                    match stderr_loop(reader, logger, version, op, no_upload()).await? {
                        Ok(()) => out.push(Some(read_reply(reader, op, store_dir, path).await?)),
                        Err(err) => {
                            nix_error.get_or_insert(err);
                            out.push(None);
                        }
                    }
                }
                Ok::<_, DaemonError>(nix_error)
            };
            result = match tokio::try_join!(write, read) {
                Ok(((), None)) => Ok(()),
                Ok(((), Some(err))) => Err(nix_failure(op, err)),
                Err(e) => Err(e),
            };
            if result.is_err() {
                break;
            }
        }
        self.settle(result)?;
        Ok(out)
    }

    /// The closure of `roots`: every path they reference, directly or not,
    /// with its path info, references first ([`topo_sort`]). One connection,
    /// pipelined QueryPathInfo per breadth-first level; a path that is not
    /// valid is an error naming it and a path that refers to it.
    pub async fn query_closure(
        &mut self,
        roots: impl IntoIterator<Item = StorePath>,
    ) -> Result<Vec<PathInfo>, DaemonError> {
        let mut infos: BTreeMap<StorePath, PathInfo> = BTreeMap::new();
        let mut seen: BTreeSet<StorePath> = BTreeSet::new();
        let mut frontier: Vec<(StorePath, Option<StorePath>)> = roots
            .into_iter()
            .filter(|root| seen.insert(root.clone()))
            .map(|root| (root, None))
            .collect();
        while !frontier.is_empty() {
            let paths: Vec<StorePath> = frontier.iter().map(|(p, _)| p.clone()).collect();
            let answers = self.query_path_infos(&paths).await?;
            let mut next = Vec::new();
            for ((path, needed_by), info) in frontier.into_iter().zip(answers) {
                let Some(info) = info else {
                    return Err(DaemonError::PathNotValid { path, needed_by });
                };
                for reference in &info.references {
                    if seen.insert(reference.clone()) {
                        next.push((reference.clone(), Some(path.clone())));
                    }
                }
                infos.insert(path, info);
            }
            frontier = next;
        }
        Ok(topo_sort(infos.into_values())?)
    }

    /// NarFromPath: copy the NAR of `path` into `sink` as it arrives and
    /// return its size. The NAR decoder finds its end (the protocol does not
    /// frame it) and validates it on the way.
    pub async fn nar_from_path<W>(
        &mut self,
        path: &StorePath,
        sink: &mut W,
    ) -> Result<u64, DaemonError>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let op = self.begin(Op::NarFromPath)?;
        let result = async {
            let mut enc = Encoder::new();
            enc.u64(Op::NarFromPath.code()).str(path.as_str());
            self.request(op, &enc).await?;
            let mut decoder = nar::Decoder::new();
            loop {
                if self.reader.buf.is_empty() {
                    self.reader.read_more(op).await?;
                }
                let n =
                    decoder
                        .consume(&self.reader.buf)
                        .map_err(|source| DaemonError::BadNar {
                            path: path.clone(),
                            source,
                        })?;
                sink.write_all(&self.reader.buf[..n])
                    .await
                    .map_err(|source| DaemonError::Sink {
                        path: path.clone(),
                        source,
                    })?;
                self.reader.buf.advance(n);
                if decoder.is_done() {
                    break;
                }
                if n == 0 {
                    self.reader.read_more(op).await?;
                }
            }
            sink.flush().await.map_err(|source| DaemonError::Sink {
                path: path.clone(),
                source,
            })?;
            Ok(decoder.offset())
        }
        .await;
        self.settle(result)
    }

    /// AddToStoreNar: add `info.path` with the NAR read from `nar` (exactly
    /// one NAR; Nix checks its hash and size against `info`). Signatures are
    /// not checked (`dontCheckSigs`; a private `nix-daemon --stdio` trusts
    /// its client). Framed at ≥ 1.23, pulled with `STDERR_READ` below.
    pub async fn add_to_store_nar<R>(
        &mut self,
        info: &PathInfo,
        nar: &mut R,
        repair: bool,
    ) -> Result<(), DaemonError>
    where
        R: AsyncRead + Unpin + Send + ?Sized,
    {
        let op = self.begin(Op::AddToStoreNar)?;
        let result = self.add_to_store_nar_inner(op, info, nar, repair).await;
        self.settle(result)
    }

    async fn add_to_store_nar_inner<R>(
        &mut self,
        op: &'static str,
        info: &PathInfo,
        nar: &mut R,
        repair: bool,
    ) -> Result<(), DaemonError>
    where
        R: AsyncRead + Unpin + Send + ?Sized,
    {
        let mut enc = Encoder::new();
        encode_add_to_store_nar(&mut enc, info, repair);
        let version = self.version;
        if version.minor() < 23 {
            self.send(op, &enc).await?;
            let Self {
                reader,
                writer,
                logger,
                ..
            } = self;
            let mut source_error = None;
            let outcome = stderr_loop(
                reader,
                logger,
                version,
                op,
                Some(Upload {
                    writer,
                    source: nar,
                    error: &mut source_error,
                }),
            )
            .await?;
            return finish_upload(op, outcome, source_error);
        }
        let Self {
            reader,
            writer,
            logger,
            ..
        } = self;
        let write = async {
            write_all(writer, op, enc.as_bytes()).await?;
            let mut chunk = vec![0u8; FRAME_SIZE];
            let mut frame = Encoder::new();
            loop {
                let n = match nar.read(&mut chunk).await {
                    Ok(n) => n,
                    // Ending the stream early makes Nix fail the op cleanly
                    // ("reached end of FramedSource"), keeping the
                    // connection in step; the caller gets the source error.
                    Err(err) => {
                        write_all(writer, op, &0u64.to_le_bytes()).await?;
                        return Ok(Some(err));
                    }
                };
                frame.clear();
                frame.frame(&chunk[..n]);
                write_all(writer, op, frame.as_bytes()).await?;
                if n == 0 {
                    return Ok(None);
                }
            }
        };
        let read = stderr_loop(reader, logger, version, op, no_upload());
        let (source_error, outcome) = tokio::try_join!(write, read)?;
        finish_upload(op, outcome, source_error)
    }

    /// BuildDerivation (§5.6, §5.7): build `drv` (whose `.drv` need not be in
    /// the store) under the name `drv_path`. Build log lines arrive through
    /// [`DaemonClient::on_log`] while it runs.
    pub async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        mode: BuildMode,
    ) -> Result<BuildResult, DaemonError> {
        let op = self.begin(Op::BuildDerivation)?;
        let result = async {
            let mut enc = Encoder::new();
            enc.u64(Op::BuildDerivation.code()).str(drv_path.as_str());
            encode_basic_derivation(&mut enc, drv);
            enc.u64(mode as u64);
            self.request(op, &enc).await?;
            read_build_result(&mut self.reader, op, self.version, &self.store_dir).await
        }
        .await;
        self.settle(result)
    }

    /// BuildPathsWithResults (≥ 1.34): one result per requested path, keyed
    /// by its wire form. Older daemons get BuildPaths, which has no
    /// per-path result: on success every path is reported as
    /// [`BuildStatus::Built`] with no outputs, a failure is an error.
    pub async fn build_paths_with_results(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
    ) -> Result<Vec<(String, BuildResult)>, DaemonError> {
        if self.version.minor() < 34 {
            self.build_paths(paths, mode).await?;
            return Ok(paths
                .iter()
                .map(|p| (p.to_wire(self.version), synthesized_built()))
                .collect());
        }
        let op = self.begin(Op::BuildPathsWithResults)?;
        let result = async {
            let mut enc = Encoder::new();
            enc.u64(Op::BuildPathsWithResults.code());
            encode_derived_paths(&mut enc, paths, self.version);
            enc.u64(mode as u64);
            self.request(op, &enc).await?;
            let count = self.reader.count(op, "build results").await?;
            let mut out = Vec::with_capacity(count.min(paths.len()));
            for _ in 0..count {
                let key = self
                    .reader
                    .string(op, "derived path", MAX_STRING_LEN)
                    .await?;
                let result =
                    read_build_result(&mut self.reader, op, self.version, &self.store_dir).await?;
                out.push((key, result));
            }
            Ok(out)
        }
        .await;
        self.settle(result)
    }

    /// BuildPaths: build or substitute `paths`; a failure is an error.
    pub async fn build_paths(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
    ) -> Result<(), DaemonError> {
        let op = self.begin(Op::BuildPaths)?;
        let result = async {
            let mut enc = Encoder::new();
            enc.u64(Op::BuildPaths.code());
            encode_derived_paths(&mut enc, paths, self.version);
            enc.u64(mode as u64);
            self.request(op, &enc).await?;
            self.reader.u64(op).await.map(drop)
        }
        .await;
        self.settle(result)
    }

    /// AddTempRoot: keep `path` from the garbage collector for as long as
    /// this connection lives (the agent holds inputs alive this way).
    pub async fn add_temp_root(&mut self, path: &StorePath) -> Result<(), DaemonError> {
        let op = self.begin(Op::AddTempRoot)?;
        let result = async {
            let mut enc = Encoder::new();
            enc.u64(Op::AddTempRoot.code()).str(path.as_str());
            self.request(op, &enc).await?;
            self.reader.u64(op).await.map(drop)
        }
        .await;
        self.settle(result)
    }

    /// AddTempRoot for many paths, pipelined on the one connection like
    /// [`DaemonClient::query_path_infos`]: [`PIPELINE_DEPTH`] requests are
    /// written, then their replies read, so `n` roots cost `n /
    /// PIPELINE_DEPTH` round trips instead of `n`. Every path is a root when
    /// this returns `Ok`; after an error, some may be.
    pub async fn add_temp_roots(&mut self, paths: &[StorePath]) -> Result<(), DaemonError> {
        self.pipelined(Op::AddTempRoot, paths, |reader, op, _, _| {
            Box::pin(async move { reader.u64(op).await.map(drop) })
        })
        .await
        .map(drop)
    }

    /// QueryMissing: what building `paths` would build, substitute, or
    /// cannot do.
    pub async fn query_missing(&mut self, paths: &[DerivedPath]) -> Result<Missing, DaemonError> {
        let op = self.begin(Op::QueryMissing)?;
        let result = async {
            let mut enc = Encoder::new();
            enc.u64(Op::QueryMissing.code());
            encode_derived_paths(&mut enc, paths, self.version);
            self.request(op, &enc).await?;
            let dir = &self.store_dir;
            Ok(Missing {
                will_build: self.reader.paths(op, dir).await?,
                will_substitute: self.reader.paths(op, dir).await?,
                unknown: self.reader.paths(op, dir).await?,
                download_size: self.reader.u64(op).await?,
                nar_size: self.reader.u64(op).await?,
            })
        }
        .await;
        self.settle(result)
    }

    /// Start an operation on a connection that is in step.
    fn begin(&mut self, op: Op) -> Result<&'static str, DaemonError> {
        if self.poisoned {
            return Err(DaemonError::Poisoned { op: op.name() });
        }
        self.poisoned = true;
        Ok(op.name())
    }

    /// End an operation: the connection is in step again after success or
    /// after a failure that Nix reported.
    fn settle<T>(&mut self, result: Result<T, DaemonError>) -> Result<T, DaemonError> {
        if matches!(
            result,
            Ok(_) | Err(DaemonError::Nix { .. } | DaemonError::Source { .. })
        ) {
            self.poisoned = false;
        }
        result
    }

    async fn send(&mut self, op: &'static str, enc: &Encoder) -> Result<(), DaemonError> {
        write_all(&mut self.writer, op, enc.as_bytes()).await
    }

    /// Send a request and run the stderr loop until its result.
    async fn request(&mut self, op: &'static str, enc: &Encoder) -> Result<(), DaemonError> {
        self.send(op, enc).await?;
        self.stderr_loop(op).await
    }

    async fn stderr_loop(&mut self, op: &'static str) -> Result<(), DaemonError> {
        let outcome = stderr_loop(
            &mut self.reader,
            &mut self.logger,
            self.version,
            op,
            no_upload(),
        )
        .await?;
        outcome.map_err(|err| nix_failure(op, err))
    }
}

fn trace_log(event: LogEvent) {
    match event {
        LogEvent::Message(text) => {
            tracing::debug!(target: "nix", "{}", stderr::strip_ansi(&String::from_utf8_lossy(&text)));
        }
        LogEvent::Result(result) => match result.build_log_line() {
            Some(line) => {
                tracing::debug!(target: "nix::build", "{}", String::from_utf8_lossy(line))
            }
            None => tracing::trace!(target: "nix", ?result),
        },
        other => tracing::trace!(target: "nix", ?other),
    }
}

fn nix_failure(op: &'static str, err: NixError) -> DaemonError {
    DaemonError::Nix {
        op,
        message: err.message,
        traces: err.traces,
    }
}

fn synthesized_built() -> BuildResult {
    BuildResult {
        status: BuildStatus::Built,
        error_msg: String::new(),
        times_built: 0,
        is_non_deterministic: false,
        start_time: 0,
        stop_time: 0,
        cpu_user: None,
        cpu_system: None,
        built_outputs: BTreeMap::new(),
    }
}

fn finish_upload(
    op: &'static str,
    outcome: Result<(), NixError>,
    source_error: Option<io::Error>,
) -> Result<(), DaemonError> {
    if let Some(source) = source_error {
        return Err(DaemonError::Source { op, source });
    }
    outcome.map_err(|err| nix_failure(op, err))
}

async fn write_all(
    writer: &mut BoxWrite,
    op: &'static str,
    bytes: &[u8],
) -> Result<(), DaemonError> {
    let io = |source| DaemonError::Io { op, source };
    writer.write_all(bytes).await.map_err(io)?;
    writer.flush().await.map_err(io)
}

/// An upload pulled by the daemon with `STDERR_READ` (1.21 – 1.22).
struct Upload<'a, R: ?Sized> {
    writer: &'a mut BoxWrite,
    source: &'a mut R,
    /// The first error reading `source`; the daemon then gets an empty
    /// answer, fails the op and stays in step.
    error: &'a mut Option<io::Error>,
}

/// No upload: the daemon must not ask for data.
fn no_upload<'a>() -> Option<Upload<'a, tokio::io::Empty>> {
    None
}

/// Run the stderr loop (§5.2) until `STDERR_LAST` (`Ok(Ok(()))`) or
/// `STDERR_ERROR` (`Ok(Err(_))`); `Err` only for failures that leave the
/// connection out of step.
async fn stderr_loop<R>(
    reader: &mut WireReader,
    logger: &mut Logger,
    version: ProtocolVersion,
    op: &'static str,
    mut upload: Option<Upload<'_, R>>,
) -> Result<Result<(), NixError>, DaemonError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    loop {
        match reader.stderr_msg(op, version).await? {
            StderrMsg::Last => return Ok(Ok(())),
            StderrMsg::Error(err) => return Ok(Err(err)),
            StderrMsg::Next(text) => logger(LogEvent::Message(text)),
            StderrMsg::StartActivity(act) => logger(LogEvent::StartActivity(act)),
            StderrMsg::StopActivity { id } => logger(LogEvent::StopActivity { id }),
            StderrMsg::Result(res) => logger(LogEvent::Result(res)),
            StderrMsg::Read(wanted) => {
                let Some(up) = upload.as_mut() else {
                    return Err(DaemonError::Protocol {
                        op,
                        reason: "the daemon asked for upload data (STDERR_READ) unexpectedly"
                            .to_owned(),
                    });
                };
                let mut chunk = vec![
                    0u8;
                    usize::try_from(wanted)
                        .unwrap_or(FRAME_SIZE)
                        .min(FRAME_SIZE)
                ];
                let n = if up.error.is_some() {
                    0
                } else {
                    match up.source.read(&mut chunk).await {
                        Ok(n) => n,
                        Err(err) => {
                            *up.error = Some(err);
                            0
                        }
                    }
                };
                let mut enc = Encoder::new();
                enc.bytes(&chunk[..n]);
                write_all(up.writer, op, enc.as_bytes()).await?;
            }
            StderrMsg::Write(_) => return Err(DaemonError::Protocol {
                op,
                reason:
                    "the daemon sent sink data (STDERR_WRITE), which this operation does not use"
                        .to_owned(),
            }),
        }
    }
}

/// ValidPathInfo without the path, after QueryPathInfo's valid flag (§5.4).
/// Reads one reply of a [`DaemonClient::pipelined`] operation. A plain
/// function returning a boxed `Send` future, not an async closure: the
/// client's futures must stay `Send` for every lifetime, as `tokio::spawn`
/// requires of the agent's tasks that hold them.
type ReadReply<T> = for<'r> fn(
    &'r mut WireReader,
    &'static str,
    &'r StoreDir,
    &'r StorePath,
)
    -> Pin<Box<dyn Future<Output = Result<T, DaemonError>> + Send + 'r>>;

async fn read_path_info(
    reader: &mut WireReader,
    op: &'static str,
    store_dir: &StoreDir,
    path: &StorePath,
) -> Result<Option<PathInfo>, DaemonError> {
    if !reader.bool(op).await? {
        return Ok(None);
    }
    let deriver = reader.string(op, "deriver", MAX_PATH_LEN).await?;
    let deriver = match deriver.as_str() {
        "" => None,
        text => Some(parse_path(op, store_dir, text)?),
    };
    let hash_text = reader.string(op, "narHash", 256).await?;
    let nar_hash = NarHash::parse(&hash_text).map_err(|err| DaemonError::Wire {
        op,
        source: WireError::Invalid {
            what: "narHash",
            reason: err.to_string(),
        },
    })?;
    let references = reader.paths(op, store_dir).await?;
    let registration_time = reader.u64(op).await?;
    let nar_size = reader.u64(op).await?;
    let ultimate = reader.bool(op).await?;
    let sigs = reader
        .strings(op, "signatures", MAX_LIST_LEN, MAX_STRING_LEN)
        .await?;
    let ca = reader.string(op, "content address", MAX_STRING_LEN).await?;
    Ok(Some(PathInfo {
        path: path.clone(),
        deriver,
        nar_hash,
        nar_size,
        references,
        registration_time,
        ultimate,
        sigs,
        ca: (!ca.is_empty()).then_some(ca),
    }))
}

/// The realisation JSON of a built output (≥ 1.28, §5.7).
#[derive(Deserialize)]
struct Realisation {
    #[serde(rename = "outPath")]
    out_path: String,
}

/// BuildResult (§5.7).
async fn read_build_result(
    reader: &mut WireReader,
    op: &'static str,
    version: ProtocolVersion,
    store_dir: &StoreDir,
) -> Result<BuildResult, DaemonError> {
    let minor = version.minor();
    let wire = |source| DaemonError::Wire { op, source };
    let status = BuildStatus::from_wire(reader.u64(op).await?).map_err(wire)?;
    let error_msg = reader
        .string(op, "build error message", MAX_STRING_LEN)
        .await?;
    let mut result = BuildResult {
        error_msg,
        ..synthesized_built()
    };
    result.status = status;
    if minor >= 29 {
        result.times_built = reader.u64(op).await?;
        result.is_non_deterministic = reader.bool(op).await?;
        // Signed on the wire as two's complement (§1).
        result.start_time = reader.u64(op).await? as i64;
        result.stop_time = reader.u64(op).await? as i64;
    }
    if minor >= 37 {
        result.cpu_user = reader.optional_micros(op).await?;
        result.cpu_system = reader.optional_micros(op).await?;
    }
    if minor >= 28 {
        let count = reader.count(op, "built outputs").await?;
        for _ in 0..count {
            let id = reader.string(op, "realisation id", MAX_STRING_LEN).await?;
            let json = reader.string(op, "realisation", MAX_STRING_LEN).await?;
            let Some((_, name)) = id.rsplit_once('!') else {
                return Err(wire(WireError::Invalid {
                    what: "realisation id",
                    reason: format!("'{id}' has no '!<output>'"),
                }));
            };
            let realisation: Realisation = serde_json::from_str(&json).map_err(|err| {
                wire(WireError::Invalid {
                    what: "realisation",
                    reason: err.to_string(),
                })
            })?;
            // 2.8 sends the base name; accept a full path too.
            let path = if realisation.out_path.starts_with('/') {
                parse_path(op, store_dir, &realisation.out_path)?
            } else {
                store_dir
                    .join(&realisation.out_path)
                    .map_err(|err| path_error(op, &err))?
            };
            result.built_outputs.insert(name.to_owned(), path);
        }
    }
    Ok(result)
}

fn parse_path(
    op: &'static str,
    store_dir: &StoreDir,
    text: &str,
) -> Result<StorePath, DaemonError> {
    store_dir.parse(text).map_err(|err| path_error(op, &err))
}

fn path_error(op: &'static str, err: &crate::store_path::StorePathError) -> DaemonError {
    DaemonError::Wire {
        op,
        source: WireError::Invalid {
            what: "store path",
            reason: err.to_string(),
        },
    }
}

/// Buffered reader of worker-protocol values from the daemon.
struct WireReader {
    inner: BoxRead,
    buf: BytesMut,
}

/// Read granularity: one socket or pipe buffer's worth.
const READ_CHUNK: usize = 64 << 10;

impl WireReader {
    fn new(inner: BoxRead) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// Read whatever the daemon has sent next into the buffer.
    async fn read_more(&mut self, op: &'static str) -> Result<(), DaemonError> {
        self.buf.reserve(READ_CHUNK);
        match self.inner.read_buf(&mut self.buf).await {
            Ok(0) => Err(DaemonError::Closed { op }),
            Ok(_) => Ok(()),
            Err(source) => Err(DaemonError::Io { op, source }),
        }
    }

    async fn fill(&mut self, n: usize, op: &'static str) -> Result<(), DaemonError> {
        while self.buf.len() < n {
            self.read_more(op).await?;
        }
        Ok(())
    }

    async fn stderr_msg(
        &mut self,
        op: &'static str,
        version: ProtocolVersion,
    ) -> Result<StderrMsg, DaemonError> {
        loop {
            match stderr::decode(&self.buf, version) {
                Ok(Some((msg, n))) => {
                    self.buf.advance(n);
                    return Ok(msg);
                }
                Ok(None) => self.read_more(op).await?,
                Err(source) => return Err(DaemonError::Wire { op, source }),
            }
        }
    }

    async fn u64(&mut self, op: &'static str) -> Result<u64, DaemonError> {
        self.fill(8, op).await?;
        Ok(self.buf.get_u64_le())
    }

    async fn bool(&mut self, op: &'static str) -> Result<bool, DaemonError> {
        Ok(self.u64(op).await? != 0)
    }

    async fn count(&mut self, op: &'static str, what: &'static str) -> Result<usize, DaemonError> {
        let count = self.u64(op).await?;
        check_count(what, count, MAX_LIST_LEN).map_err(|source| DaemonError::Wire { op, source })
    }

    async fn bytes(
        &mut self,
        op: &'static str,
        what: &'static str,
        limit: u64,
    ) -> Result<Vec<u8>, DaemonError> {
        let wire = |source| DaemonError::Wire { op, source };
        let len = self.u64(op).await?;
        let len = check_len(what, len, limit).map_err(wire)?;
        let pad = padding_len(len as u64);
        self.fill(len + pad, op).await?;
        let value = self.buf.split_to(len).to_vec();
        check_padding(what, &self.buf[..pad]).map_err(wire)?;
        self.buf.advance(pad);
        Ok(value)
    }

    async fn string(
        &mut self,
        op: &'static str,
        what: &'static str,
        limit: u64,
    ) -> Result<String, DaemonError> {
        let bytes = self.bytes(op, what, limit).await?;
        utf8(what, bytes).map_err(|source| DaemonError::Wire { op, source })
    }

    async fn strings(
        &mut self,
        op: &'static str,
        what: &'static str,
        max_count: u64,
        limit: u64,
    ) -> Result<Vec<String>, DaemonError> {
        let count = self.u64(op).await?;
        let count = check_count(what, count, max_count)
            .map_err(|source| DaemonError::Wire { op, source })?;
        let mut out = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            out.push(self.string(op, what, limit).await?);
        }
        Ok(out)
    }

    async fn paths(
        &mut self,
        op: &'static str,
        store_dir: &StoreDir,
    ) -> Result<BTreeSet<StorePath>, DaemonError> {
        let count = self.count(op, "store paths").await?;
        let mut out = BTreeSet::new();
        for _ in 0..count {
            let text = self.string(op, "store path", MAX_PATH_LEN).await?;
            out.insert(parse_path(op, store_dir, &text)?);
        }
        Ok(out)
    }

    /// ≥ 1.37 CPU time: u64 0, or u64 1 + microseconds.
    async fn optional_micros(&mut self, op: &'static str) -> Result<Option<Duration>, DaemonError> {
        Ok(match self.u64(op).await? {
            0 => None,
            _ => Some(Duration::from_micros(self.u64(op).await?)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::stderr::{STDERR_ERROR, STDERR_LAST, STDERR_NEXT};

    /// A Nix 2.8 daemon's side of a completed handshake (§5.1: protocol
    /// 1.34, its version string, STDERR_LAST), for replies to follow.
    fn nix_2_8_handshake() -> Encoder {
        let mut replies = Encoder::new();
        replies
            .u64(WORKER_MAGIC_2)
            .u64(0x122)
            .str("2.8.0")
            .u64(STDERR_LAST);
        replies
    }

    /// A scripted daemon: `replies` are queued before the client starts and
    /// the reply direction is closed after them; what the client wrote can be
    /// read from the returned stream.
    async fn scripted(
        announce: ProtocolVersion,
        replies: &Encoder,
    ) -> (Result<DaemonClient, DaemonError>, tokio::io::DuplexStream) {
        let (client_side, mut daemon_side) = tokio::io::duplex(1 << 20);
        daemon_side
            .write_all(replies.as_bytes())
            .await
            .expect("queue replies");
        // End of script: a client that wants more sees the daemon close.
        daemon_side
            .shutdown()
            .await
            .expect("close the reply direction");
        let (read, write) = tokio::io::split(client_side);
        let client = Connector::new()
            .announce(announce)
            .handshake(read, write)
            .await;
        (client, daemon_side)
    }

    async fn written(daemon_side: &mut tokio::io::DuplexStream, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        daemon_side
            .read_exact(&mut buf)
            .await
            .expect("client bytes");
        buf
    }

    fn words(words: &[u64]) -> Vec<u8> {
        let mut enc = Encoder::new();
        for w in words {
            enc.u64(*w);
        }
        enc.into_bytes()
    }

    #[tokio::test]
    async fn handshake_with_a_2_8_daemon() {
        // §5.1: Nix 2.8 answers 1.34, its version string, then STDERR_LAST.
        let mut replies = Encoder::new();
        replies
            .u64(WORKER_MAGIC_2)
            .u64(0x122)
            .str("2.8.0")
            .u64(STDERR_NEXT)
            .str("hello")
            .u64(STDERR_LAST);
        let (client, mut daemon) = scripted(ProtocolVersion::LATEST, &replies).await;
        let client = client.expect("handshake");
        assert_eq!(client.version(), ProtocolVersion::from_minor(34));
        assert_eq!(client.daemon_nix_version(), Some("2.8.0"));
        assert_eq!(client.trust(), Trust::Unknown);
        // Magic, the announced 1.38 (not the negotiated version), CPU
        // affinity 0, reserveSpace 0; no features below 1.38.
        assert_eq!(
            written(&mut daemon, 32).await,
            words(&[WORKER_MAGIC_1, 0x126, 0, 0])
        );
    }

    #[tokio::test]
    async fn handshake_at_1_38_exchanges_features_and_trust() {
        let mut replies = Encoder::new();
        replies
            .u64(WORKER_MAGIC_2)
            .u64(0x126)
            .strs(["some-feature"])
            .str("2.30.0")
            .u64(1)
            .u64(STDERR_LAST);
        let (client, mut daemon) = scripted(ProtocolVersion::LATEST, &replies).await;
        let client = client.expect("handshake");
        assert_eq!(client.version(), ProtocolVersion::LATEST);
        assert_eq!(client.trust(), Trust::Trusted);
        assert_eq!(
            written(&mut daemon, 40).await,
            words(&[WORKER_MAGIC_1, 0x126, 0, 0, 0])
        );
    }

    #[tokio::test]
    async fn handshake_refuses_old_daemons_and_bad_magic() {
        let mut replies = Encoder::new();
        replies.u64(WORKER_MAGIC_2).u64(0x114);
        let (client, _daemon) = scripted(ProtocolVersion::LATEST, &replies).await;
        let err = client.expect_err("1.20 is too old");
        assert!(matches!(err, DaemonError::TooOld { .. }), "{err}");
        assert!(err.to_string().contains("1.20"), "{err}");

        let mut replies = Encoder::new();
        replies.u64(0x1234);
        let (client, _daemon) = scripted(ProtocolVersion::LATEST, &replies).await;
        assert!(matches!(client, Err(DaemonError::Protocol { .. })));

        let mut replies = Encoder::new();
        replies.u64(WORKER_MAGIC_2).u64(0x122).str("2.8.0");
        let (client, _daemon) = scripted(ProtocolVersion::LATEST, &replies).await;
        assert!(matches!(client, Err(DaemonError::Closed { .. })));
    }

    #[tokio::test]
    async fn nix_errors_keep_the_connection_bad_replies_poison_it() {
        let path =
            StorePath::parse_any("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x").expect("path");
        let mut replies = nix_2_8_handshake();
        // IsValidPath: a structured error.
        replies
            .u64(STDERR_ERROR)
            .str("Error")
            .u64(0)
            .str("Error")
            .str("\x1b[31;1merror:\x1b[0m boom")
            .u64(0)
            .u64(0);
        // QueryPathInfo: valid, but a narHash that is not one.
        replies.u64(STDERR_LAST).u64(1).str("").str("not-a-hash");
        let (client, _daemon) = scripted(ProtocolVersion::LATEST, &replies).await;
        let mut client = client.expect("handshake");
        let err = client.is_valid_path(&path).await.expect_err("Nix error");
        assert_eq!(err.nix_message(), Some("error: boom"));
        assert!(client.is_usable());
        let err = client.query_path_info(&path).await.expect_err("bad hash");
        assert!(matches!(err, DaemonError::Wire { .. }), "{err}");
        assert!(!client.is_usable());
        let err = client.is_valid_path(&path).await.expect_err("poisoned");
        assert!(
            matches!(err, DaemonError::Poisoned { op: "IsValidPath" }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn path_info_and_build_result_decode() {
        let path =
            StorePath::parse_any("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x").expect("path");
        let hash = NarHash::of(b"nar");
        let mut replies = nix_2_8_handshake();
        replies
            .u64(STDERR_LAST)
            .u64(1)
            .str("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv")
            .str(&hash.to_base16())
            .strs([path.as_str()])
            .u64(1_700_000_000)
            .u64(128)
            .u64(1)
            .strs(["cache:sig"])
            .str("");
        // BuildDerivation at 1.34.
        replies
            .u64(STDERR_LAST)
            .u64(0)
            .str("")
            .u64(1)
            .u64(0)
            .u64(10)
            .u64(12)
            .u64(1)
            .str("sha256:00!out")
            .str(r#"{"dependentRealisations":{},"id":"sha256:00!out","outPath":"7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x","signatures":[]}"#);
        let (client, _daemon) = scripted(ProtocolVersion::LATEST, &replies).await;
        let mut client = client.expect("handshake");
        let info = client
            .query_path_info(&path)
            .await
            .expect("QueryPathInfo")
            .expect("valid");
        assert_eq!(info.nar_hash, hash);
        assert_eq!(info.references, BTreeSet::from([path.clone()]));
        assert!(info.ultimate);
        assert_eq!(info.sigs, vec!["cache:sig".to_owned()]);
        assert_eq!(info.ca, None);
        let drv = BasicDerivation {
            outputs: BTreeMap::new(),
            input_srcs: BTreeSet::new(),
            platform: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            args: Vec::new(),
            env: BTreeMap::new(),
        };
        let result = client
            .build_derivation(&path, &drv, BuildMode::Normal)
            .await
            .expect("BuildDerivation");
        assert_eq!(result.status, BuildStatus::Built);
        assert_eq!((result.start_time, result.stop_time), (10, 12));
        assert_eq!(result.built_outputs.get("out"), Some(&path));
    }

    #[tokio::test]
    async fn temp_roots_are_pipelined_and_stay_in_step_after_an_error() {
        let paths: Vec<StorePath> = ["a", "b", "c"]
            .iter()
            .map(|n| {
                StorePath::parse_any(&format!("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-{n}"))
                    .expect("path")
            })
            .collect();
        let mut replies = nix_2_8_handshake();
        // Three AddTempRoot replies, the second a Nix error; then one more
        // for a lone root on the same connection.
        replies.u64(STDERR_LAST).u64(1);
        replies
            .u64(STDERR_ERROR)
            .str("Error")
            .u64(0)
            .str("Error")
            .str("boom")
            .u64(0)
            .u64(0);
        replies.u64(STDERR_LAST).u64(1);
        replies.u64(STDERR_LAST).u64(1);
        let (client, mut daemon) = scripted(ProtocolVersion::LATEST, &replies).await;
        let mut client = client.expect("handshake");
        let err = client
            .add_temp_roots(&paths)
            .await
            .expect_err("the Nix error");
        assert_eq!(err.nix_message(), Some("boom"));
        assert!(client.is_usable());
        client
            .add_temp_roots(&paths[..1])
            .await
            .expect("in step after the error");
        // Handshake (4 words), then every request in order.
        let _ = written(&mut daemon, 32).await;
        let mut expected = Encoder::new();
        for path in paths.iter().chain(&paths[..1]) {
            expected.u64(Op::AddTempRoot.code()).str(path.as_str());
        }
        let expected = expected.into_bytes();
        assert_eq!(written(&mut daemon, expected.len()).await, expected);
    }
}
