//! Download: paths from the agent's store to the master (`--from`, build
//! outputs).
//!
//! ```text
//! master → Request::Download(Download { paths, compression })
//! agent  → DownloadReply::Sending
//!          body (one zstd stream if compressed):
//!            (DownloadItem::Path(PathInfo) ‖ exactly nar_size bytes of NAR | DownloadItem::NotValid(path))…
//!            DownloadItem::End
//!          FIN
//! ```
//!
//! The paths become temp roots of this connection first, so they cannot be
//! collected while their NARs are read from disk
//! ([`nixq_common::transfer::send`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nixq_common::proto::{write_frame, Download, DownloadItem, DownloadReply};
use nixq_common::transfer::send::{send_body, SendOptions, SendProgress};

use super::{check_paths, OpError};
use crate::server::{refuse_reply, Ctx};
use crate::stats::add;

pub async fn serve(
    ctx: &Ctx,
    download: Download,
    send: &mut quinn::SendStream,
    _recv: quinn::RecvStream,
) -> Result<(), OpError> {
    if let Err(refusal) = check_paths(ctx, &download.paths) {
        refuse_reply(send, &DownloadReply::Refused(refusal)).await;
        return Ok(());
    }
    let store = &ctx.conn.store;
    store.root(&download.paths).await?;
    let infos = store.path_infos(&download.paths).await?;
    let items: Vec<DownloadItem> = download
        .paths
        .iter()
        .zip(infos)
        .map(|(path, info)| match info {
            Some(info) => DownloadItem::Path(info),
            None => DownloadItem::NotValid(path.clone()),
        })
        .collect();
    write_frame(send, &DownloadReply::Sending).await?;
    let sent_paths = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&sent_paths);
    let progress = move |p: SendProgress| {
        if let SendProgress::ItemWritten { .. } = p {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    };
    let with_nar = items
        .iter()
        .filter(|i| matches!(i, DownloadItem::Path(_)))
        .count() as u64;
    let result = send_body(
        send,
        items,
        &SendOptions::new(download.compression),
        progress,
    )
    .await;
    let stats = &ctx.shared.stats;
    match result {
        Ok(summary) => {
            add(&stats.paths_sent, with_nar);
            add(&stats.nar_bytes_sent, summary.nar_bytes);
            tracing::info!(
                paths = with_nar,
                nar_bytes = summary.nar_bytes,
                wire_bytes = summary.wire_bytes,
                "sent"
            );
            Ok(())
        }
        Err(e) => Err(OpError::Proto(nixq_common::proto::ProtoError::Io(
            std::io::Error::other(e.to_string()),
        ))),
    }
}
