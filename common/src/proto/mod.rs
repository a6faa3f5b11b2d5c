//! nixq's own protocol between a master (hook, copy-closure, status) and an
//! agent. This module is its specification; [`messages`] holds every
//! message, [`frame`] the framing and its codec. Nothing here does I/O but
//! the thin `read_frame` / `write_frame` helpers.
//!
//! # Connection
//!
//! QUIC with TLS 1.3 and mutual authentication, ALPN [`ALPN`] (`nixq/1`).
//! One connection per master process per agent, reused for every operation.
//! Every operation is one bidirectional stream opened by the master; the
//! stream's first frame is a [`Request`] that fixes what follows. Frames are
//! `u32` big-endian length ‖ bincode 2 body, each type with its own size
//! limit checked before the body is read ([`frame`]). Raw NAR bytes never go
//! in a frame: they follow an item frame on the same stream.
//!
//! # Streams
//!
//! | stream          | master → agent                                                        | agent → master                                                          | raw bytes |
//! |-----------------|-----------------------------------------------------------------------|-------------------------------------------------------------------------|-----------|
//! | Hello           | `Request::Hello(Hello)`                                               | [`HelloReply`]: `Welcome` or `VersionMismatch` (then the agent closes)  | — |
//! | Status          | `Request::Status`                                                     | [`StatusReply`]                                                         | — |
//! | QueryMissing    | `Request::QueryMissing(QueryMissing { claim })`, then [`PathBatch`]… until one has `last` | one [`QueryMissingReply::States`] per batch, in order       | — |
//! | QueryPathInfos  | `Request::QueryPathInfos(QueryPathInfos { paths, closure })`          | [`PathInfosReply::Infos`]… and `NotValid`…, then `Done`                  | — |
//! | WaitFor         | `Request::WaitFor(WaitFor { paths })`                                 | [`WaitReply::Settled`] once per path as each settles, then `Done`       | — |
//! | Upload          | `Request::Upload(Upload { compression })`, then the body: ([`UploadItem::Path`] ‖ NAR)…, [`UploadItem::End`]; then FIN | [`UploadReply::Result`]… in item order, then `Done` | each NAR: exactly `nar_size` bytes after its item; the whole body (items and NARs) is one zstd stream if `compression` says so |
//! | Download        | `Request::Download(Download { paths, compression })`                  | [`DownloadReply::Sending`], then the body: ([`DownloadItem::Path`] ‖ NAR or [`DownloadItem::NotValid`])… in request order, [`DownloadItem::End`] | as for Upload, in the other direction |
//! | Build           | `Request::Build(Build { drv_path, drv, settings })`                   | [`BuildEvent::Started`], [`BuildEvent::Log`]…, [`BuildEvent::Outcome`]   | — |
//!
//! Every stream is opened by the master, and every sequence ends with the
//! master finishing its side after its last frame and the agent finishing
//! its side after its last frame. Any agent reply type can instead be
//! `Refused(`[`Refusal`]`)`: the agent's first and only frame, after which it
//! finishes the stream and reads nothing more (`STOP_SENDING` with
//! [`ErrorCode::Refused`]).
//!
//! # Rules of the conversation
//!
//! * **Hello first.** The master opens the Hello stream first and opens no
//!   other stream before the `Welcome`; the agent refuses any other request
//!   that arrives earlier with [`Refusal::HelloFirst`]. The Welcome carries
//!   the agent's systems, features, slots, load and free space, so the hook
//!   learns in the round trip it pays anyway whether the machine is worth
//!   choosing.
//! * **Versions.** [`Hello`] carries the range the master speaks, the agent
//!   picks the highest common version ([`negotiate`]) or answers
//!   `VersionMismatch` with its own range and closes the connection with
//!   [`ErrorCode::VersionMismatch`]. Compatibility rule: the ALPN's major
//!   number (`nixq/1`) changes only if the framing or the Hello exchange
//!   changes; any change to a message's encoding bumps
//!   [`PROTOCOL_VERSION`], and a peer that still speaks an older version
//!   lists it in its range (`MIN_PROTOCOL_VERSION`) and uses that version's
//!   encoding on that connection. Variants are only ever appended.
//! * **Claims.** QueryMissing with `claim` claims every path it answers
//!   `Missing` for this connection; a second sender is told `InFlight` and
//!   waits for the path with WaitFor instead of sending it. A claim ends
//!   when its path is stored, when its upload fails, when the connection
//!   closes, or when the agent's claim lease runs out with no upload of it
//!   under way; a waiter then gets `Valid`, or `SendIt` and the claim. Each
//!   path crosses the wire once.
//! * **Uploads** carry paths in dependency order. A path is registered only
//!   after its hash and size match its item and all its references are
//!   valid (in the store, or stored earlier in the same upload, or — after a
//!   wait — from another connection's upload). The first failed item ends
//!   the upload ([`UploadOutcome::continues`]); nothing of a failed or
//!   interrupted item is left in the store.
//! * **Keeping paths alive.** Paths answered `Valid`, stored by an upload,
//!   or built by a Build stay GC roots on the agent until the connection
//!   closes, so a garbage collection on the slave during a job cannot remove
//!   them.
//! * **Disk space.** Below its free-space floor the agent refuses Upload and
//!   Build with [`Refusal::NoSpace`].
//! * **Builds** run when a slot is free; a full agent refuses with
//!   [`Refusal::Busy`] rather than queueing, so that the hook's choice of
//!   machine stays right. The master cancels a build by resetting its side of
//!   the stream ([`ErrorCode::Cancelled`]); the agent then stops the build.
//!   The agent enforces `timeout` and `max-silent-time` and answers
//!   `TimedOut`; the master enforces them too, with a margin, since a lost
//!   agent must not hang it.
//! * **Store directories.** Every store path in a message must be in the
//!   agent's store directory (given in the `Welcome`); the agent refuses
//!   others with [`Refusal::Invalid`].
//! * **Errors.** A peer that breaks these rules, or sends a frame that does
//!   not decode, gets its stream reset (or the connection closed) with
//!   [`ErrorCode::ProtocolViolation`].

pub mod frame;
pub mod messages;

pub use frame::{decode, encode, read_frame, write_frame, Message};
pub use messages::*;

/// The QUIC ALPN protocol id: the major version of the framing.
pub const ALPN: &[u8] = b"nixq/1";

/// The message-encoding version this build speaks (newest). See the
/// compatibility rule above.
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest message-encoding version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The [`Hello`] this build sends.
pub fn hello(client: impl Into<String>) -> Hello {
    Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        client: client.into(),
    }
}

/// The version a connection uses: the highest one in both ranges.
pub fn negotiate(hello: &Hello) -> Result<u32, ProtoError> {
    let low = hello.min_version.max(MIN_PROTOCOL_VERSION);
    let high = hello.max_version.min(PROTOCOL_VERSION);
    if low <= high {
        Ok(high)
    } else {
        Err(ProtoError::VersionMismatch {
            ours: (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            theirs: (hello.min_version, hello.max_version),
        })
    }
}

/// Application error codes for QUIC `RESET_STREAM`, `STOP_SENDING` and
/// `CONNECTION_CLOSE` (quinn's `VarInt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// Connection closed normally (the master is done).
    Done = 0,
    /// The master cancels the operation (a build, a transfer).
    Cancelled = 1,
    /// The peer sent something the protocol does not allow.
    ProtocolViolation = 2,
    /// No common protocol version.
    VersionMismatch = 3,
    /// The agent refused the request (after its `Refused` frame).
    Refused = 4,
    /// The sender failed on its own side (its store, its disk) mid-stream.
    Internal = 5,
    /// The agent is shutting down.
    ShuttingDown = 6,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        self as u32
    }

    /// `None` for a code this version does not know.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => Self::Done,
            1 => Self::Cancelled,
            2 => Self::ProtocolViolation,
            3 => Self::VersionMismatch,
            4 => Self::Refused,
            5 => Self::Internal,
            6 => Self::ShuttingDown,
            _ => return None,
        })
    }
}

/// Why a frame could not be read or written, or the peers cannot talk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("{message} frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        message: &'static str,
        len: u64,
        limit: usize,
    },
    #[error("{message} frame has {extra} bytes after the message")]
    TrailingBytes { message: &'static str, extra: usize },
    #[error("unknown {message} tag {tag} (a newer peer's message?)")]
    UnknownMessage { message: &'static str, tag: u32 },
    #[error("malformed {message} frame: {reason}")]
    Malformed {
        message: &'static str,
        reason: String,
    },
    #[error("stream ended in the middle of a {message} frame")]
    Truncated { message: &'static str },
    #[error(
        "no common protocol version: we speak {}..={}, the peer {}..={}",
        ours.0, ours.1, theirs.0, theirs.1
    )]
    VersionMismatch {
        ours: (u32, u32),
        theirs: (u32, u32),
    },
    #[error("cannot encode {message}: {reason}")]
    Encode {
        message: &'static str,
        reason: String,
    },
    #[error("peer broke the protocol: {0}")]
    Violation(String),
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_path::StorePath;

    #[test]
    fn version_negotiation() {
        assert_eq!(
            negotiate(&hello("t")).expect("same build"),
            PROTOCOL_VERSION
        );
        let newer = Hello {
            min_version: 1,
            max_version: 9,
            client: "future".into(),
        };
        assert_eq!(negotiate(&newer).expect("overlap"), PROTOCOL_VERSION);
        let too_new = Hello {
            min_version: PROTOCOL_VERSION + 1,
            max_version: PROTOCOL_VERSION + 5,
            client: "future".into(),
        };
        let err = negotiate(&too_new).expect_err("no overlap");
        assert_eq!(
            err.to_string(),
            "no common protocol version: we speak 1..=1, the peer 2..=6"
        );
        let inverted = Hello {
            min_version: 3,
            max_version: 0,
            client: "odd".into(),
        };
        assert!(negotiate(&inverted).is_err());
    }

    #[test]
    fn error_codes_round_trip() {
        for code in 0..10u64 {
            if let Some(known) = ErrorCode::from_code(code) {
                assert_eq!(u64::from(known.code()), code);
            }
        }
        assert_eq!(ErrorCode::from_code(6), Some(ErrorCode::ShuttingDown));
        assert_eq!(ErrorCode::from_code(7), None);
    }

    #[test]
    fn path_batches() {
        let p =
            StorePath::parse_any("/nix/store/00000000000000000000000000000000-a").expect("valid");
        let paths = vec![p; MAX_BATCH_PATHS * 2 + 1];
        let batches: Vec<PathBatch> = PathBatch::split(&paths).collect();
        let sizes: Vec<(usize, bool)> = batches.iter().map(|b| (b.paths.len(), b.last)).collect();
        assert_eq!(
            sizes,
            [
                (MAX_BATCH_PATHS, false),
                (MAX_BATCH_PATHS, false),
                (1, true)
            ]
        );
        let exact: Vec<PathBatch> = PathBatch::split(&paths[..MAX_BATCH_PATHS]).collect();
        assert_eq!(exact.len(), 1);
        assert!(exact[0].last);
        let empty: Vec<PathBatch> = PathBatch::split(&[]).collect();
        assert_eq!(
            empty,
            [PathBatch {
                paths: vec![],
                last: true
            }]
        );
    }

    #[test]
    fn alpn_names_the_major_version() {
        assert_eq!(ALPN, b"nixq/1");
    }
}
