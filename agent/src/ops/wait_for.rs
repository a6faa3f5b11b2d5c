//! WaitFor: wait for paths another connection is uploading.
//!
//! ```text
//! master → Request::WaitFor(WaitFor { paths })
//! agent  → WaitReply::Settled { index, outcome: Valid | SendIt }…  (one per path, as each settles)
//!          WaitReply::Done
//! ```
//!
//! `Valid`: the path arrived (it is now a temp root of this connection).
//! `SendIt`: its sender gave up and the claim passed to this connection,
//! which should upload it.

use nixq_common::proto::{write_frame, WaitFor, WaitOutcome, WaitReply};
use nixq_common::store_path::StorePath;
use tokio::task::JoinSet;

use super::{check_paths, OpError};
use crate::claims::{ClaimReply, ClaimState};
use crate::server::{refuse_reply, Ctx};
use crate::stats::bump;

pub async fn serve(
    ctx: &Ctx,
    wait: WaitFor,
    send: &mut quinn::SendStream,
    _recv: quinn::RecvStream,
) -> Result<(), OpError> {
    if let Err(refusal) = check_paths(ctx, &wait.paths) {
        refuse_reply(send, &WaitReply::Refused(refusal)).await;
        return Ok(());
    }
    // Dropping the set (the stream was reset) stops the waits.
    let mut waits = JoinSet::new();
    for (index, path) in wait.paths.into_iter().enumerate() {
        let ctx = ctx.clone();
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        waits.spawn(async move { (index, wait_one(&ctx, &path).await) });
    }
    while let Some(joined) = waits.join_next().await {
        let Ok((index, outcome)) = joined else {
            continue;
        };
        write_frame(
            send,
            &WaitReply::Settled {
                index,
                outcome: outcome?,
            },
        )
        .await?;
    }
    write_frame(send, &WaitReply::Done).await?;
    Ok(())
}

/// Waits until `path` is valid, or its claim passes to this connection.
async fn wait_one(ctx: &Ctx, path: &StorePath) -> Result<WaitOutcome, OpError> {
    let conn = &ctx.conn;
    let mut counted = false;
    loop {
        if conn.holds(path) {
            return Ok(WaitOutcome::SendIt);
        }
        match ctx.shared.claims.claim(path, conn.id) {
            ClaimReply::Send(claim) => {
                if conn.store.is_valid(path).await? {
                    claim.complete();
                    conn.store.root(std::slice::from_ref(path)).await?;
                    conn.store.mark_valid(path);
                    return Ok(WaitOutcome::Valid);
                }
                conn.hold(claim);
                return Ok(WaitOutcome::SendIt);
            }
            ClaimReply::Wait { waiter, .. } => {
                if !counted {
                    bump(&ctx.shared.stats.claim_waits);
                    counted = true;
                }
                if waiter.settled().await == ClaimState::Completed {
                    conn.store.root(std::slice::from_ref(path)).await?;
                    conn.store.mark_valid(path);
                    return Ok(WaitOutcome::Valid);
                }
                // Abandoned: ask again; one of the waiters becomes the owner.
            }
        }
    }
}
