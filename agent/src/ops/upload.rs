//! Upload: paths from the master into the agent's store.
//!
//! ```text
//! master → Request::Upload(Upload { compression })
//!          body (one zstd stream if compressed):
//!            (UploadItem::Path(PathInfo) ‖ exactly nar_size bytes of NAR)…  UploadItem::End
//!          FIN
//! agent  → UploadReply::Result { index, outcome }…  (item order; may lag behind the items)
//!          UploadReply::Done
//! ```
//!
//! Each item goes through [`nixq_common::transfer::receive`]: claim (the
//! connection's, or taken on the spot), temp root, lock, restore with hash
//! and size checked, then registration once every reference is valid or on
//! its way (submitted by this or another upload, [`ClaimState::Submitted`]).
//! Restoring the next item does not wait for the previous registration: the
//! results trail behind in order. The first failed item ends the upload: its
//! result, then `Done`, and the agent reads no more.
//!
//! [`ClaimState::Submitted`]: crate::claims::ClaimState::Submitted

use nixq_common::path_info::PathInfo;
use nixq_common::proto::{write_frame, Upload, UploadItem, UploadOutcome, UploadReply};
use nixq_common::store_path::StorePath;
use nixq_common::transfer::receive::{BodyReader, ItemError, Locking, Restoring};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::OpError;
use crate::claims::{Claim, ClaimReply};
use crate::server::{refuse_reply, Ctx};
use crate::stats::{add, bump};

/// Items whose result is not written yet, per upload. Each holds a path
/// lock (a file descriptor) until registered. While one
/// `nix-store --register-validity` call runs (tens of milliseconds), the
/// reader must be able to restore the next batch's worth of small paths, or
/// registration calls shrink to a few paths each and their start-up cost
/// dominates: 1024 lets a batch reach a thousand paths.
/// The agent raises its descriptor limit at startup to cover this.
const MAX_PENDING: usize = 1024;

/// An item's result, known or being registered.
enum Pending {
    Ready(u32, UploadOutcome),
    Registering(u32, JoinHandle<UploadOutcome>),
}

pub async fn serve(
    ctx: &Ctx,
    upload: Upload,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), OpError> {
    if let Some((free_bytes, floor_bytes)) = ctx.shared.below_floor() {
        bump(&ctx.shared.stats.uploads_rejected);
        refuse_reply(
            send,
            &UploadReply::Refused(nixq_common::proto::Refusal::NoSpace {
                free_bytes,
                floor_bytes,
            }),
        )
        .await;
        return Ok(());
    }
    let body = BodyReader::new(recv, upload.compression);
    let (tx, rx) = mpsc::channel(MAX_PENDING);
    // The reader owns the body, so that its buffers (and a zstd decoder's
    // window) go as soon as the last item is read, not when the last
    // result is written.
    let reader = read_items(ctx, body, tx);
    let writer = write_results(ctx, send, rx);
    tokio::pin!(reader, writer);
    let mut reading = true;
    loop {
        tokio::select! {
            read = &mut reader, if reading => {
                reading = false;
                read?;
            }
            // The writer is done after `Done`: on a failed item that may be
            // before the reader is; dropping the reader then stops it
            // (and cleans up the item it was restoring).
            written = &mut writer => return written,
        }
    }
}

/// Reads items until `End` or the first failed one, importing each.
async fn read_items(
    ctx: &Ctx,
    mut body: BodyReader,
    results: mpsc::Sender<Pending>,
) -> Result<(), OpError> {
    let mut index = 0u32;
    // Where the reader's time goes, for the log line at the end.
    let mut importing = std::time::Duration::ZERO;
    let mut backpressure = std::time::Duration::ZERO;
    let started = std::time::Instant::now();
    let summary = |index: u32, importing, backpressure| {
        tracing::debug!(
            items = index,
            elapsed = ?started.elapsed(),
            ?importing,
            ?backpressure,
            "upload body read"
        );
    };
    loop {
        let item = body
            .read_item::<UploadItem>()
            .await
            .map_err(|e| OpError::Violation(format!("upload body: {e}")))?;
        let info = match item {
            Some(UploadItem::Path(info)) => info,
            Some(UploadItem::End) => {
                summary(index, importing, backpressure);
                return Ok(());
            }
            None => {
                return Err(OpError::Violation(
                    "the upload body ended without an End item".into(),
                ))
            }
        };
        let span = tracing::debug_span!("path", store_path = %info.path);
        let t = std::time::Instant::now();
        let imported = tracing::Instrument::instrument(import(ctx, &mut body, info), span).await;
        importing += t.elapsed();
        let pending = match imported {
            Ok(Imported::AlreadyValid) => Pending::Ready(index, UploadOutcome::AlreadyValid),
            Ok(Imported::Registering(handle)) => Pending::Registering(index, handle),
            Err(Failed::Item(outcome)) => {
                bump(&ctx.shared.stats.uploads_rejected);
                tracing::info!(index, ?outcome, "upload item rejected");
                // The writer ends the upload with this result.
                let _ = results.send(Pending::Ready(index, outcome)).await;
                return Ok(());
            }
            Err(Failed::Stream(e)) => return Err(e),
        };
        let t = std::time::Instant::now();
        let sent = results.send(pending).await;
        backpressure += t.elapsed();
        if sent.is_err() {
            // The writer has ended the upload already.
            return Ok(());
        }
        index = index.saturating_add(1);
    }
}

/// Writes the results in item order, then `Done`.
async fn write_results(
    ctx: &Ctx,
    send: &mut quinn::SendStream,
    mut pending: mpsc::Receiver<Pending>,
) -> Result<(), OpError> {
    while let Some(next) = pending.recv().await {
        let (index, outcome) = match next {
            Pending::Ready(index, outcome) => (index, outcome),
            Pending::Registering(index, handle) => {
                let outcome = handle
                    .await
                    .unwrap_or_else(|e| UploadOutcome::ImportFailed {
                        reason: format!("the registration task failed: {e}"),
                    });
                if !outcome.continues() {
                    bump(&ctx.shared.stats.uploads_rejected);
                    tracing::info!(index, ?outcome, "upload item not registered");
                }
                (index, outcome)
            }
        };
        let ends = !outcome.continues();
        write_frame(send, &UploadReply::Result { index, outcome }).await?;
        if ends {
            break;
        }
    }
    write_frame(send, &UploadReply::Done).await?;
    Ok(())
}

enum Imported {
    AlreadyValid,
    Registering(JoinHandle<UploadOutcome>),
}

enum Failed {
    /// Report this outcome for the item and end the upload.
    Item(UploadOutcome),
    /// The stream broke.
    Stream(OpError),
}

impl From<ItemError> for Failed {
    fn from(e: ItemError) -> Self {
        match e.outcome() {
            Some(outcome) => Self::Item(outcome),
            None => Self::Stream(OpError::Violation(e.to_string())),
        }
    }
}

fn import_failed(e: impl std::fmt::Display) -> Failed {
    Failed::Item(UploadOutcome::ImportFailed {
        reason: e.to_string(),
    })
}

/// Imports one item: its NAR is consumed from `body` whatever happens,
/// unless the item fails (which ends the upload).
async fn import(ctx: &Ctx, body: &mut BodyReader, info: PathInfo) -> Result<Imported, Failed> {
    let shared = &ctx.shared;
    let conn = &ctx.conn;
    shared.importer.check_info(&info)?;
    if let Some((free_bytes, floor_bytes)) = shared.below_floor() {
        return Err(Failed::Item(UploadOutcome::NoSpace {
            free_bytes,
            floor_bytes,
        }));
    }
    let claim = match conn.take_claim(&info.path) {
        Some(claim) => claim,
        None => match shared.claims.claim(&info.path, conn.id) {
            ClaimReply::Send(claim) => claim,
            ClaimReply::Wait { .. } => return Err(Failed::Item(UploadOutcome::ClaimedByOther)),
        },
    };
    // Safe from the collector from before the first byte lands; both are
    // round trips, so they overlap.
    let (rooted, locked) = tokio::join!(
        conn.store.root(std::slice::from_ref(&info.path)),
        shared.importer.lock(&info.path, Locking::Take),
    );
    rooted.map_err(import_failed)?;
    let mut locked = locked?;
    if locked.is_occupied() {
        if conn
            .store
            .is_valid(&info.path)
            .await
            .map_err(import_failed)?
        {
            drop(locked);
            body.skip(info.nar_size)
                .await
                .map_err(|e| Failed::Stream(OpError::Violation(e.to_string())))?;
            claim.complete();
            conn.store.mark_valid(&info.path);
            bump(&shared.stats.paths_received_already_valid);
            return Ok(Imported::AlreadyValid);
        }
        tracing::info!("removing an invalid leftover");
        locked.clear().await?;
    }
    // The next item is read while this one's thread finishes.
    let restoring = locked.start_restore(&info, body).await?;
    let ctx = ctx.clone();
    Ok(Imported::Registering(tokio::spawn(register(
        ctx, restoring, claim,
    ))))
}

/// Waits for the restore's verdict, then registers the path once its
/// references are valid or on their way.
///
/// The claim turns [`Submitted`] only once the registration is in the
/// batcher's queue, after this path's own references: an upload of a path
/// that refers to this one (on any connection) may queue its registration
/// from then on, and the queue's order puts it in the same
/// `nix-store --register-validity` call as this path or a later one. Marked
/// any earlier, the dependent could be registered first and fail with
/// "path … is not valid".
///
/// [`Submitted`]: crate::claims::ClaimState::Submitted
async fn register(ctx: Ctx, restoring: Restoring, claim: Claim<StorePath>) -> UploadOutcome {
    let failed = |e: ItemError| {
        e.outcome().unwrap_or(UploadOutcome::ImportFailed {
            reason: e.to_string(),
        })
    };
    let verified = match restoring.finish().await {
        Ok(verified) => verified,
        Err(e) => return failed(e),
    };
    let path = verified.info().path.clone();
    let nar_size = verified.info().nar_size;
    let references: Vec<StorePath> = verified
        .info()
        .references
        .iter()
        .filter(|r| **r != path)
        .cloned()
        .collect();
    for reference in &references {
        let waited = tokio::select! {
            waited = wait_reference(&ctx, reference) => waited,
            // A reference held by a claim that nobody will upload any more
            // (its connection is being torn down) must not keep the
            // shutdown waiting.
            () = ctx.shared.shutdown_signal() => Err(UploadOutcome::ImportFailed {
                reason: "the agent is shutting down".to_owned(),
            }),
        };
        if let Err(outcome) = waited {
            // Dropping `verified` removes the tree; dropping the claim
            // abandons it.
            return outcome;
        }
    }
    let submitted = match ctx.shared.importer.submit(verified).await {
        Ok(submitted) => submitted,
        Err(e) => return failed(e),
    };
    claim.submitted();
    match submitted.finish().await {
        Ok(()) => {
            claim.complete();
            ctx.conn.store.mark_valid(&path);
            let stats = &ctx.shared.stats;
            bump(&stats.paths_received);
            add(&stats.nar_bytes_received, nar_size);
            tracing::debug!(%path, "stored");
            UploadOutcome::Stored
        }
        Err(e) => failed(e),
    }
}

/// Waits until `reference` is valid or submitted for registration (by any
/// connection); fails if it is neither and nobody is sending it.
async fn wait_reference(ctx: &Ctx, reference: &StorePath) -> Result<(), UploadOutcome> {
    let conn = &ctx.conn;
    if conn.store.is_known_valid(reference) {
        return Ok(());
    }
    let not_valid = || UploadOutcome::ReferenceNotValid {
        reference: reference.clone(),
    };
    if let Some((_, waiter)) = ctx.shared.claims.holder(reference) {
        return if waiter.submitted().await {
            Ok(())
        } else {
            Err(not_valid())
        };
    }
    match conn.store.is_valid(reference).await {
        Ok(true) => {
            // Keep it alive for this job like any path seen valid.
            conn.store
                .root(std::slice::from_ref(reference))
                .await
                .map_err(|e| UploadOutcome::ImportFailed {
                    reason: e.to_string(),
                })?;
            conn.store.mark_valid(reference);
            Ok(())
        }
        Ok(false) => Err(not_valid()),
        Err(e) => Err(UploadOutcome::ImportFailed {
            reason: e.to_string(),
        }),
    }
}
