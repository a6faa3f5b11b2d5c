//! Hello, the first stream of every connection.
//!
//! ```text
//! master → Request::Hello(Hello { min_version, max_version, client })
//! agent  → HelloReply::Welcome(Welcome { version, agent_version, store_dir, systems, features, status })
//!        | HelloReply::VersionMismatch { min_version, max_version }, then the connection is
//!          closed with ErrorCode::VersionMismatch
//! ```

use std::time::Duration;

use nixq_common::proto::{
    negotiate, write_frame, ErrorCode, Hello, HelloReply, Welcome, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use quinn::VarInt;

use super::OpError;
use crate::server::Ctx;

/// How long the VersionMismatch frame gets to reach the master before the
/// connection is closed.
const MISMATCH_LINGER: Duration = Duration::from_secs(1);

/// The agent's name and version, as the Welcome reports it.
pub fn agent_version() -> String {
    format!("nixq-agent {}", env!("CARGO_PKG_VERSION"))
}

pub async fn serve(ctx: &Ctx, hello: &Hello, send: &mut quinn::SendStream) -> Result<(), OpError> {
    let shared = &ctx.shared;
    match negotiate(hello) {
        Ok(version) => {
            tracing::info!(client = %hello.client, version, "welcome");
            let welcome = Welcome {
                version,
                agent_version: agent_version(),
                store_dir: shared.store_dir.as_str().to_owned(),
                systems: shared.platform.systems.clone(),
                features: shared.platform.features.clone(),
                status: shared.status(),
            };
            // Before the frame leaves: the master may open its next stream
            // as soon as it reads the Welcome.
            ctx.conn.set_welcomed();
            write_frame(send, &HelloReply::Welcome(Box::new(welcome))).await?;
            Ok(())
        }
        Err(e) => {
            tracing::warn!(client = %hello.client, "{e}");
            let reply = HelloReply::VersionMismatch {
                min_version: MIN_PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
            };
            write_frame(send, &reply).await?;
            let _ = send.finish();
            let _ = tokio::time::timeout(MISMATCH_LINGER, send.stopped()).await;
            ctx.conn.quic.close(
                VarInt::from_u32(ErrorCode::VersionMismatch.code()),
                b"no common protocol version",
            );
            Ok(())
        }
    }
}
