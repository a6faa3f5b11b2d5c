//! Every message of nixq's protocol, one section per operation, in the order
//! of the stream table in [`super`]. The bincode encoding of these types *is*
//! the wire format: a variant's position is its tag on the wire and a field's
//! position is its place in the bytes. Append variants only at the end, and
//! bump [`super::PROTOCOL_VERSION`] for any other change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::drv::BasicDerivation;
use crate::hash::NarHash;
use crate::path_info::PathInfo;
use crate::store_path::StorePath;

/// How many store paths a sender puts in one [`PathBatch`], [`WaitFor`],
/// [`Download`] or [`QueryPathInfos`]. A default-store path is at most 255
/// bytes encoded, so a full batch stays near 1 MiB, far below
/// [`MAX_BATCH_LEN`], while a 100,000-path closure still needs only 25
/// frames. Receivers refuse larger batches.
pub const MAX_BATCH_PATHS: usize = 4096;

/// How many [`PathInfo`]s the agent puts in one [`PathInfosReply::Infos`]:
/// a path info is typically well under 1 KiB, so 256 of them fill a small
/// part of [`MAX_REPLY_LEN`] even with long reference lists.
pub const MAX_INFOS_PER_FRAME: usize = 256;

/// The largest [`BuildEvent::Log`] chunk: enough for any real log line (Nix
/// itself truncates nothing, but lines over 64 KiB are split), small enough
/// that a chatty builder interleaves fairly with other streams.
pub const MAX_LOG_CHUNK: usize = 64 * 1024;

/// Frame limits, checked on the length prefix before a body is read
/// (practice 2 of STYLE.md). Each says what its largest legitimate message is.
///
/// [`Request`]: a [`Build`] carries the derivation's environment, which for
/// structured-attrs derivations can reach several MiB (argv+env of a real
/// builder is bounded by the kernel at a few MiB; `__json` is not).
pub const MAX_REQUEST_LEN: usize = 16 << 20;
/// [`PathBatch`]: [`MAX_BATCH_PATHS`] paths with room for a long store dir.
pub const MAX_BATCH_LEN: usize = 4 << 20;
/// Replies that carry path infos ([`PathInfosReply`], [`BuildEvent`] with a
/// build's outputs): up to [`MAX_INFOS_PER_FRAME`] infos with their
/// references and signatures.
pub const MAX_REPLY_LEN: usize = 16 << 20;
/// Small replies: status, hello, per-path results, one state byte per path.
pub const MAX_SMALL_REPLY_LEN: usize = 1 << 20;
/// [`UploadItem`] / [`DownloadItem`]: one path info. 4 MiB holds some
/// 15,000 references, two orders of magnitude above real store paths.
pub const MAX_ITEM_LEN: usize = 4 << 20;

// ---------------------------------------------------------------------------
// The first frame of every stream.

/// What the master asks for; the first frame of every stream, which fixes
/// what the rest of the stream carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Hello(Hello),
    Status,
    QueryMissing(QueryMissing),
    QueryPathInfos(QueryPathInfos),
    WaitFor(WaitFor),
    Upload(Upload),
    Download(Download),
    Build(Box<Build>),
}

impl Request {
    /// The operation's name, for logs and spans.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::Status => "status",
            Self::QueryMissing(_) => "query-missing",
            Self::QueryPathInfos(_) => "query-path-infos",
            Self::WaitFor(_) => "wait-for",
            Self::Upload(_) => "upload",
            Self::Download(_) => "download",
            Self::Build(_) => "build",
        }
    }
}

/// Why the agent will not serve a request: its first and only frame on the
/// stream, inside each reply type's `Refused` variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// A request arrived before the connection's Hello was answered.
    HelloFirst,
    /// The agent is at its limit (builds: all `max_jobs` slots taken;
    /// others: concurrent operations). Try another machine or later.
    Busy { limit: u32 },
    /// Free space in the agent's store is below its floor.
    NoSpace { free_bytes: u64, floor_bytes: u64 },
    /// The agent is shutting down and accepts no new work.
    ShuttingDown,
    /// The request itself is unacceptable: a batch over
    /// [`MAX_BATCH_PATHS`], a path outside the agent's store directory, a
    /// system the agent does not build…
    Invalid { reason: String },
}

// ---------------------------------------------------------------------------
// Hello: the first stream of every connection.

/// The master's half of the version exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the master speaks.
    pub min_version: u32,
    /// Newest protocol version the master speaks.
    pub max_version: u32,
    /// The program and its version, e.g. `nixq-build-hook 0.1.0` (for the
    /// agent's logs).
    pub client: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HelloReply {
    Welcome(Box<Welcome>),
    /// No common version: the agent speaks `min_version ..= max_version`.
    /// The agent closes the connection after this frame.
    VersionMismatch {
        min_version: u32,
        max_version: u32,
    },
    Refused(Refusal),
}

/// The agent's description of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both sides speak from now on: the highest common one.
    pub version: u32,
    /// e.g. `nixq-agent 0.1.0`.
    pub agent_version: String,
    /// The agent's store directory; the master must use the same one, since
    /// store paths are absolute.
    pub store_dir: String,
    /// Systems it builds for (`system` and `extra-platforms` of its Nix).
    pub systems: Vec<String>,
    /// Its Nix's `system-features`.
    pub features: Vec<String>,
    pub status: AgentStatus,
}

// ---------------------------------------------------------------------------
// Status.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StatusReply {
    Status(AgentStatus),
    Refused(Refusal),
}

/// The agent's load and counters, as of the reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub max_jobs: u32,
    pub running_builds: u32,
    /// The 1-minute load average of the slave.
    pub load_average: f64,
    /// Free bytes on the file system of the store.
    pub free_store_bytes: u64,
    /// Below this many free bytes the agent refuses uploads and builds.
    pub free_space_floor: u64,
    pub uptime_secs: u64,
    pub counters: Counters,
}

/// Totals since the agent started. Tests read them to prove that each path
/// crossed the wire once and that builds never exceeded `max_jobs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub connections: u64,
    /// Paths received and registered.
    pub paths_received: u64,
    /// NAR bytes of those paths (uncompressed).
    pub nar_bytes_received: u64,
    /// Uploaded paths that were already valid (bytes wasted on the wire).
    pub paths_received_already_valid: u64,
    /// Uploads rejected: bad hash, size, NAR, references…
    pub uploads_rejected: u64,
    /// Paths a sender waited for instead of sending (claims honoured).
    pub claim_waits: u64,
    pub paths_sent: u64,
    pub nar_bytes_sent: u64,
    pub builds_started: u64,
    pub builds_succeeded: u64,
    pub builds_failed: u64,
    /// The most builds that ever ran at once.
    pub peak_running_builds: u32,
}

// ---------------------------------------------------------------------------
// QueryMissing: which paths of a closure the agent lacks.

/// Header of a QueryMissing stream; [`PathBatch`] frames follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryMissing {
    /// Claim every path answered [`PathState::Missing`] for this connection:
    /// other senders are then told [`PathState::InFlight`] until this
    /// connection uploads the path, gives it up, or closes.
    pub claim: bool,
}

/// A run of store paths; the stream's last batch has `last` set. Used after
/// [`QueryMissing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathBatch {
    pub paths: Vec<StorePath>,
    pub last: bool,
}

impl PathBatch {
    /// Split `paths` into batches of at most [`MAX_BATCH_PATHS`], the last
    /// one marked; an empty list gives one empty last batch.
    pub fn split(paths: &[StorePath]) -> impl Iterator<Item = Self> + '_ {
        let count = paths.len().div_ceil(MAX_BATCH_PATHS).max(1);
        (0..count).map(move |i| {
            let start = i * MAX_BATCH_PATHS;
            let end = paths.len().min(start + MAX_BATCH_PATHS);
            Self {
                paths: paths.get(start..end).unwrap_or_default().to_vec(),
                last: i + 1 == count,
            }
        })
    }
}

/// The answer to one [`PathBatch`], in the same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryMissingReply {
    /// One state per path of the batch, same length and order.
    States(Vec<PathState>),
    Refused(Refusal),
}

/// Where a path stands on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathState {
    /// Valid in the agent's store (and now kept alive for this connection).
    Valid,
    /// Not there. With `claim`, it is now claimed by this connection: send it.
    Missing,
    /// Being received from another connection: do not send; [`WaitFor`] it.
    InFlight,
}

// ---------------------------------------------------------------------------
// QueryPathInfos: path infos on the agent (for `--from` and outputs).

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryPathInfos {
    /// At most [`MAX_BATCH_PATHS`].
    pub paths: Vec<StorePath>,
    /// Answer for the whole closure of `paths`, not just `paths`.
    pub closure: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PathInfosReply {
    /// Path infos in dependency order (every path after the paths it
    /// references), at most [`MAX_INFOS_PER_FRAME`] per frame.
    Infos(Vec<PathInfo>),
    /// Requested paths that are not valid on the agent.
    NotValid(Vec<StorePath>),
    /// The last frame.
    Done,
    Refused(Refusal),
}

// ---------------------------------------------------------------------------
// WaitFor: wait for paths another sender is uploading.

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitFor {
    /// Paths answered [`PathState::InFlight`]; at most [`MAX_BATCH_PATHS`].
    pub paths: Vec<StorePath>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitReply {
    /// `paths[index]` is settled; one per path, in the order they settle.
    Settled {
        index: u32,
        outcome: WaitOutcome,
    },
    /// Every path has settled; the last frame.
    Done,
    Refused(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitOutcome {
    /// It arrived and is valid.
    Valid,
    /// Its sender gave up; the claim passed to this connection: send it.
    SendIt,
}

// ---------------------------------------------------------------------------
// Upload: paths from the master into the agent's store.

/// Header of an Upload stream. The rest of what the master sends (the body,
/// compressed as a whole if asked) is a run of [`UploadItem::Path`] frames,
/// each followed by exactly `nar_size` bytes of NAR, and a final
/// [`UploadItem::End`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    pub compression: Compression,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadItem {
    /// The path's info; its NAR follows. Items come in dependency order.
    Path(PathInfo),
    End,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadReply {
    /// The fate of the `index`-th item (from 0); results may lag behind the
    /// items (the agent registers in batches) but come in item order.
    Result {
        index: u32,
        outcome: UploadOutcome,
    },
    /// The last frame: every item up to here has a result; the rest were not
    /// stored.
    Done,
    Refused(Refusal),
}

/// What became of one uploaded path. Anything but `Stored` and
/// `AlreadyValid` ends the upload: the agent sends it, then
/// [`UploadReply::Done`], and reads no further.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadOutcome {
    /// Hash and size checked, registered, valid.
    Stored,
    /// It was valid already; the NAR was read and dropped.
    AlreadyValid,
    HashMismatch {
        expected: NarHash,
        got: NarHash,
    },
    SizeMismatch {
        expected: u64,
        got: u64,
    },
    /// A reference is neither valid on the agent nor earlier in this
    /// upload nor in flight.
    ReferenceNotValid {
        reference: StorePath,
    },
    /// Another connection holds the claim on this path.
    ClaimedByOther,
    NoSpace {
        free_bytes: u64,
        floor_bytes: u64,
    },
    /// The NAR broke the format (the decoder's message).
    BadNar {
        reason: String,
    },
    /// The path info is unacceptable (wrong store dir, bad content address…).
    BadPathInfo {
        reason: String,
    },
    /// The agent's store failed to register it.
    ImportFailed {
        reason: String,
    },
}

impl UploadOutcome {
    /// Whether the upload goes on after this outcome.
    pub fn continues(&self) -> bool {
        matches!(self, Self::Stored | Self::AlreadyValid)
    }
}

// ---------------------------------------------------------------------------
// Download: paths from the agent's store to the master.

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Download {
    /// In the order the master wants them; at most [`MAX_BATCH_PATHS`].
    pub paths: Vec<StorePath>,
    /// How the agent compresses the body.
    pub compression: Compression,
}

/// The agent's first frame; if `Sending`, the body follows (compressed as
/// a whole if asked): one [`DownloadItem`] per requested path, in request
/// order, then [`DownloadItem::End`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownloadReply {
    Sending,
    Refused(Refusal),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownloadItem {
    /// The path's info; exactly `nar_size` bytes of NAR follow.
    Path(PathInfo),
    /// The path is not valid on the agent.
    NotValid(StorePath),
    End,
}

// ---------------------------------------------------------------------------
// Build: build a derivation on the agent.

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub drv_path: StorePath,
    /// What the daemon's BuildDerivation takes (§5.6); its `input_srcs` (the
    /// input closure) must be valid on the agent.
    pub drv: BasicDerivation,
    pub settings: BuildSettings,
}

/// The master's settings that the remote build honours (§2.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSettings {
    /// `timeout`: seconds of wall time; 0 = none.
    pub timeout_secs: u64,
    /// `max-silent-time`: seconds without output; 0 = none.
    pub max_silent_secs: u64,
    /// `cores`: 0 = all of the slave's.
    pub build_cores: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BuildEvent {
    /// The build has a slot and started.
    Started,
    /// Builder output, at most [`MAX_LOG_CHUNK`] bytes, as it came.
    Log(Vec<u8>),
    /// The last frame.
    Outcome(BuildOutcome),
    Refused(Refusal),
}

/// How a build ended; the hook maps it to its exit status (0, 100, 101, 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildOutcome {
    /// Every output is valid on the agent (kept alive for this connection).
    Built { outputs: BTreeMap<String, PathInfo> },
    /// The builder failed: permanent (exit 100).
    BuilderFailed { msg: String },
    /// `timeout` or `max-silent-time` hit (exit 101).
    TimedOut { msg: String },
    /// Anything else that may pass on retry (exit 1).
    Transient { msg: String },
}

// ---------------------------------------------------------------------------
// Shared pieces.

/// How the body of an Upload or Download stream is compressed: `None`, or
/// one zstd frame sequence covering the whole body (items and NARs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Compression {
    None,
    /// `level` matters only to the compressing side.
    Zstd {
        level: i32,
    },
}
