//! Status: the agent's load and counters.
//!
//! ```text
//! master → Request::Status
//! agent  → StatusReply::Status(AgentStatus)
//! ```

use nixq_common::proto::{write_frame, StatusReply};

use super::OpError;
use crate::server::Ctx;

pub async fn serve(ctx: &Ctx, send: &mut quinn::SendStream) -> Result<(), OpError> {
    write_frame(send, &StatusReply::Status(ctx.shared.status())).await?;
    Ok(())
}
