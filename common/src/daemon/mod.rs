//! Client of the Nix daemon worker protocol (nix-interfaces.md §5): how
//! nixq queries, exports, imports and builds store paths on either side.
//!
//! | module     | owns                                                         | I/O? |
//! |------------|--------------------------------------------------------------|------|
//! | [`wire`]   | u64, padded strings, lists, framed streams; limits           | pure |
//! | [`ops`]    | op codes, version table, request encoding, result types      | pure |
//! | [`stderr`] | the `STDERR_*` message loop as a decoder                     | pure |
//! | [`client`] | [`DaemonClient`]: handshake and one method per operation     | tokio |
//!
//! The client reaches the daemon socket ([`DaemonClient::connect_socket`]) or
//! a private `nix-daemon --stdio` child ([`DaemonClient::spawn_stdio`]). One
//! connection runs one operation at a time; it is reused for as many as the
//! caller likes. A failure reported by Nix leaves it usable; an I/O or
//! protocol failure, or an operation cancelled half-way, poisons it.

pub mod client;
pub mod ops;
pub mod stderr;
pub mod wire;

use std::io;
use std::path::PathBuf;

pub use client::{Connector, DaemonClient, LogEvent, Trust, DEFAULT_SOCKET};
pub use ops::{
    BuildMode, BuildResult, BuildStatus, ClientSettings, DerivedPath, Missing, OutputsSpec,
    ProtocolVersion, Verbosity,
};

use crate::nar::NarError;
use crate::path_info::CycleError;
use crate::store_path::StorePath;
use wire::WireError;

/// Why a daemon operation failed. `op` names the worker-protocol operation
/// (or `handshake`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error("cannot start the Nix daemon ({command}): {source}")]
    Spawn { command: String, source: io::Error },
    #[error("cannot connect to the Nix daemon socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("{op}: connection to the Nix daemon failed: {source}")]
    Io { op: &'static str, source: io::Error },
    #[error("{op}: the Nix daemon closed the connection")]
    Closed { op: &'static str },
    #[error("{op}: malformed data from the Nix daemon: {source}")]
    Wire { op: &'static str, source: WireError },
    #[error("{op}: unexpected reply from the Nix daemon: {reason}")]
    Protocol { op: &'static str, reason: String },
    #[error(
        "handshake: the Nix daemon speaks worker protocol {daemon}; nixq needs {} or newer (Nix 2.3)",
        ProtocolVersion::MIN
    )]
    TooOld { daemon: String },
    /// Nix refused or failed the operation (`STDERR_ERROR`); the connection
    /// is still usable.
    #[error("{op}: {message}")]
    Nix {
        op: &'static str,
        /// Nix's message, ANSI escapes removed.
        message: String,
        traces: Vec<String>,
    },
    #[error("store path {path} is not valid in the daemon's store{}", needed_by_text(.needed_by))]
    PathNotValid {
        path: StorePath,
        /// A path of the closure that references it.
        needed_by: Option<StorePath>,
    },
    #[error("{op}: reading the data to upload failed: {source}")]
    Source { op: &'static str, source: io::Error },
    #[error("NarFromPath {path}: writing the NAR failed: {source}")]
    Sink { path: StorePath, source: io::Error },
    #[error("NarFromPath {path}: the daemon sent a bad NAR: {source}")]
    BadNar { path: StorePath, source: NarError },
    #[error("closure: {0}")]
    Cycle(#[from] CycleError),
    #[error("{op}: the connection to the Nix daemon is unusable after an earlier failure")]
    Poisoned { op: &'static str },
}

fn needed_by_text(needed_by: &Option<StorePath>) -> String {
    needed_by
        .as_ref()
        .map_or_else(String::new, |p| format!(" (referenced by {p})"))
}

impl DaemonError {
    /// Nix's own message, when Nix reported the failure.
    pub fn nix_message(&self) -> Option<&str> {
        match self {
            Self::Nix { message, .. } => Some(message),
            _ => None,
        }
    }

    /// Whether the connection can still be used after this error.
    pub fn keeps_connection(&self) -> bool {
        matches!(
            self,
            Self::Nix { .. } | Self::Source { .. } | Self::PathNotValid { .. } | Self::Cycle(_)
        )
    }
}
