//! One module per stream of the protocol ([`nixq_common::proto`]), each with
//! its message sequence in its doc comment. Each reads the rest of its
//! stream, talks to the store, and writes its replies; [`serve`] dispatches.

pub mod build;
pub mod download;
pub mod hello;
pub mod query_missing;
pub mod query_path_infos;
pub mod status;
pub mod upload;
pub mod wait_for;

use nixq_common::daemon::DaemonError;
use nixq_common::proto::{ErrorCode, ProtoError, Refusal, Request, MAX_BATCH_PATHS};
use nixq_common::store_path::StorePath;

use crate::server::Ctx;

/// Why an operation ended its stream abnormally (reset, not finished).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The master broke the protocol.
    #[error("protocol violation: {0}")]
    Violation(String),
    /// A frame could not be read or written (stream reset, bad frame).
    #[error("{0}")]
    Proto(#[from] ProtoError),
    /// The local Nix failed.
    #[error("the local Nix daemon: {0}")]
    Daemon(#[from] DaemonError),
}

impl OpError {
    /// The code the stream is reset with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Violation(_) => ErrorCode::ProtocolViolation,
            Self::Proto(ProtoError::Io(_)) | Self::Daemon(_) => ErrorCode::Internal,
            Self::Proto(_) => ErrorCode::ProtocolViolation,
        }
    }
}

/// Serves `request` on its stream. `recv` is what follows the request.
pub async fn serve(
    ctx: &Ctx,
    request: Request,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), OpError> {
    match request {
        Request::Hello(hello) => hello::serve(ctx, &hello, send).await,
        Request::Status => status::serve(ctx, send).await,
        Request::QueryMissing(q) => query_missing::serve(ctx, q, send, recv).await,
        Request::QueryPathInfos(q) => query_path_infos::serve(ctx, q, send, recv).await,
        Request::WaitFor(w) => wait_for::serve(ctx, w, send, recv).await,
        Request::Upload(u) => upload::serve(ctx, u, send, recv).await,
        Request::Download(d) => download::serve(ctx, d, send, recv).await,
        Request::Build(b) => build::serve(ctx, *b, send, recv).await,
    }
}

/// Why a list of paths in a request is unacceptable: too many, or outside
/// the agent's store directory.
pub fn check_paths(ctx: &Ctx, paths: &[StorePath]) -> Result<(), Refusal> {
    if paths.len() > MAX_BATCH_PATHS {
        return Err(Refusal::Invalid {
            reason: format!(
                "{} paths in one request; the limit is {MAX_BATCH_PATHS}",
                paths.len()
            ),
        });
    }
    let dir = ctx.shared.store_dir.as_str();
    match paths.iter().find(|p| p.store_dir() != dir) {
        Some(p) => Err(Refusal::Invalid {
            reason: format!("{p} is not in the agent's store directory {dir}"),
        }),
        None => Ok(()),
    }
}
