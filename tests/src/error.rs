//! The harness's error type: every variant names the host, the command or the
//! file involved, so a failing end-to-end test says what broke without a rerun.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Anything that can go wrong while building, using or tearing down a [`Farm`](crate::Farm).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The machine cannot run these tests (not root, a tool missing).
    #[error("end-to-end precondition not met: {0}")]
    Precondition(String),

    /// A host name the harness cannot use.
    #[error("invalid host name {name:?}: {why}")]
    InvalidHostName { name: String, why: &'static str },

    /// A file-system operation on the harness's own files.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A process could not be started at all.
    #[error("[{host}] cannot start `{command}`: {source}")]
    Spawn {
        host: String,
        command: String,
        #[source]
        source: std::io::Error,
    },

    /// A command ran and exited unsuccessfully.
    #[error(
        "[{host}] `{command}` failed ({status})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    )]
    CommandFailed {
        host: String,
        command: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },

    /// A command did not finish in time and was killed (with its process group).
    #[error(
        "[{host}] `{command}` timed out after {timeout:?} and was killed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    )]
    Timeout {
        host: String,
        command: String,
        timeout: Duration,
        stdout: String,
        stderr: String,
    },

    /// A command succeeded but printed something the harness cannot use.
    #[error("[{host}] unexpected output of `{command}`: {why}")]
    BadOutput {
        host: String,
        command: String,
        why: String,
    },

    /// Waiting for a condition (a log line, a process exit) took too long.
    #[error("timed out after {timeout:?} waiting for {what}")]
    WaitTimeout { what: String, timeout: Duration },
}

impl Error {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// Result of harness operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
