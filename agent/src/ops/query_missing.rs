//! QueryMissing: which paths of a closure the agent lacks, claiming them
//! for this connection if asked.
//!
//! ```text
//! master → Request::QueryMissing(QueryMissing { claim })
//!          PathBatch { paths, last: false }… PathBatch { paths, last: true }
//! agent  → QueryMissingReply::States([Valid | Missing | InFlight; one per path])  per batch, in order
//! ```
//!
//! Every queried path becomes a temp root of this connection before its
//! validity is asked, all in a few pipelined round trips
//! ([`crate::store::ConnStore::valid_and_root`]): `Valid` paths stay valid
//! while the connection lives, and `Missing` ones are safe from the
//! collector before their upload starts. With `claim`, each `Missing` path
//! is claimed for this connection (until it is uploaded, the upload fails,
//! the lease runs out, or the connection closes); a path claimed by another
//! connection is `InFlight`.

use nixq_common::proto::{
    read_frame, write_frame, PathBatch, PathState, QueryMissing, QueryMissingReply,
};
use nixq_common::store_path::StorePath;

use super::{check_paths, OpError};
use crate::server::{refuse_reply, Ctx};

pub async fn serve(
    ctx: &Ctx,
    query: QueryMissing,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), OpError> {
    let mut first = true;
    loop {
        let batch: PathBatch = read_frame(&mut recv)
            .await?
            .ok_or_else(|| OpError::Violation("the stream ended before the last batch".into()))?;
        if let Err(refusal) = check_paths(ctx, &batch.paths) {
            if first {
                refuse_reply(send, &QueryMissingReply::Refused(refusal)).await;
                return Ok(());
            }
            return Err(OpError::Violation(format!("{refusal:?}")));
        }
        first = false;
        let states = states(ctx, &batch.paths, query.claim).await?;
        write_frame(send, &QueryMissingReply::States(states.clone())).await?;
        if batch.last {
            return Ok(());
        }
    }
}

async fn states(ctx: &Ctx, paths: &[StorePath], claim: bool) -> Result<Vec<PathState>, OpError> {
    let conn = &ctx.conn;
    let claims = &ctx.shared.claims;
    let valid = conn.store.valid_and_root(paths).await?;
    let states = paths
        .iter()
        .map(|path| {
            if valid.contains(path) {
                return PathState::Valid;
            }
            if conn.holds(path) {
                return PathState::Missing;
            }
            if !claim {
                return match claims.owner(path) {
                    Some(owner) if owner != conn.id => PathState::InFlight,
                    _ => PathState::Missing,
                };
            }
            // No waiters here: a channel per in-flight path of a
            // 100,000-path query would cost tens of MiB.
            match claims.try_claim(path, conn.id) {
                Ok(claim) => {
                    conn.hold(claim);
                    PathState::Missing
                }
                // Being uploaded by this very connection on another stream.
                Err(owner) if owner == conn.id => PathState::Missing,
                Err(_) => PathState::InFlight,
            }
        })
        .collect();
    Ok(states)
}
