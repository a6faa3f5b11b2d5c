//! The build's outputs back into the master's store while Nix holds their
//! locks (nix-interfaces.md §2.10, §8): only the wanted outputs that are not
//! valid locally, downloaded from the agent, each NAR restored at its store
//! path with hash and size checked while streaming, then all registered
//! together with the references the slave reported (no rescan here).
//!
//! Nix (the `nix-build` process, or the daemon worker) holds `<out>.lock`
//! for the whole hook run, so nothing here takes a path lock
//! ([`Locking::HeldByCaller`]), and nothing goes through the daemon socket:
//! registration is `nix-store --register-validity --hash-given` on the local
//! store ([`nixq_common::store`]). The registrations of one job are
//! submitted together to a fresh [`RegistrationBatcher`], which runs them as
//! one call (references first); see [`register_together`].

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use nixq_common::daemon::{DaemonClient, DaemonError};
use nixq_common::path_info::{topo_sort, PathInfo};
use nixq_common::proto::{Compression, DownloadItem, MAX_BATCH_PATHS};
use nixq_common::store::RegistrationBatcher;
use nixq_common::store_path::StorePath;
use nixq_common::transfer::receive::{BodyReader, Importer, ItemError, Locking, Verified};

use crate::agent_client::{AgentClient, ClientError};

/// Why the outputs could not be made valid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputsError {
    #[error("the agent did not report the wanted output {0} as built")]
    NotBuilt(String),
    #[error("the local Nix store: {0}")]
    LocalStore(#[source] DaemonError),
    #[error("downloading the outputs: {0}")]
    Agent(#[source] ClientError),
    #[error("the agent sent {got} where {expected} was due")]
    Unexpected { expected: StorePath, got: String },
    #[error(
        "cannot import the output {path}: {source}{}",
        crate::copy::sender_store_hint(source)
    )]
    Import {
        path: StorePath,
        #[source]
        source: ItemError,
    },
    #[error("the outputs reference each other in a cycle: {0}")]
    Cycle(String),
    #[error("after the import, these outputs are still not valid: {}", paths_text(.0))]
    StillInvalid(Vec<StorePath>),
}

fn paths_text(paths: &[StorePath]) -> String {
    paths
        .iter()
        .map(StorePath::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What [`fetch_outputs`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputsReport {
    /// Outputs downloaded and registered.
    pub fetched: Vec<StorePath>,
    /// NAR bytes downloaded.
    pub bytes: u64,
    /// Wanted outputs that were valid already.
    pub already_valid: usize,
}

/// The path infos of the `wanted` outputs among what the agent `built`
/// (output name → info).
pub fn wanted_infos(
    built: &BTreeMap<String, PathInfo>,
    wanted: &[StorePath],
) -> Result<Vec<PathInfo>, OutputsError> {
    let by_path: BTreeMap<&StorePath, &PathInfo> =
        built.values().map(|info| (&info.path, info)).collect();
    wanted
        .iter()
        .map(|path| {
            by_path
                .get(path)
                .map(|info| (*info).clone())
                .ok_or_else(|| OutputsError::NotBuilt(path.to_string()))
        })
        .collect()
}

/// Makes every path of `wanted` valid in the local store: those not valid
/// yet are downloaded from `client` and registered in one call through
/// `batcher` (a fresh one, started early so that its `nix-store` is ready
/// when the outputs are).
pub async fn fetch_outputs(
    client: &AgentClient,
    built: &BTreeMap<String, PathInfo>,
    wanted: &[StorePath],
    daemon: &mut DaemonClient,
    compression: Compression,
    batcher: RegistrationBatcher,
) -> Result<OutputsReport, OutputsError> {
    let infos = wanted_infos(built, wanted)?;
    let wanted_set: BTreeSet<StorePath> = wanted.iter().cloned().collect();
    let valid = daemon
        .query_valid_paths(&wanted_set)
        .await
        .map_err(OutputsError::LocalStore)?;
    let missing = topo_sort(infos.into_iter().filter(|i| !valid.contains(&i.path)))
        .map_err(|e| OutputsError::Cycle(e.to_string()))?;
    let mut report = OutputsReport {
        already_valid: valid.len(),
        ..OutputsReport::default()
    };
    if !missing.is_empty() {
        let importer = Importer::new(daemon.store_dir().clone(), batcher);
        let verified = download(client, &missing, daemon, compression, &importer).await?;
        report.bytes = verified.iter().map(|v| v.info().nar_size).sum();
        report.fetched = verified.iter().map(|v| v.info().path.clone()).collect();
        register_together(&importer, verified).await?;
    }
    let now_valid = daemon
        .query_valid_paths(&wanted_set)
        .await
        .map_err(OutputsError::LocalStore)?;
    let still: Vec<StorePath> = wanted_set.difference(&now_valid).cloned().collect();
    if !still.is_empty() {
        return Err(OutputsError::StillInvalid(still));
    }
    Ok(report)
}

/// Downloads `missing` (dependency order) and restores each at its store
/// path; returns them verified, not yet registered (dropping them removes
/// the files).
async fn download(
    client: &AgentClient,
    missing: &[PathInfo],
    daemon: &mut DaemonClient,
    compression: Compression,
    importer: &Importer,
) -> Result<Vec<Verified>, OutputsError> {
    let mut verified = Vec::with_capacity(missing.len());
    for chunk in missing.chunks(MAX_BATCH_PATHS) {
        let paths: Vec<StorePath> = chunk.iter().map(|i| i.path.clone()).collect();
        let recv = client
            .download(paths, compression)
            .await
            .map_err(OutputsError::Agent)?;
        let mut body = BodyReader::new(recv, compression);
        for expected in chunk {
            let import_error = |source| OutputsError::Import {
                path: expected.path.clone(),
                source,
            };
            let item = body
                .read_item::<DownloadItem>()
                .await
                .map_err(|e| import_error(e.into()))?;
            let info = match item {
                Some(DownloadItem::Path(info)) if info.path == expected.path => info,
                other => {
                    return Err(OutputsError::Unexpected {
                        expected: expected.path.clone(),
                        got: format!("{other:?}"),
                    })
                }
            };
            importer.check_info(&info).map_err(import_error)?;
            let mut locked = importer
                .lock(&info.path, Locking::HeldByCaller)
                .await
                .map_err(import_error)?;
            if locked.is_occupied() {
                // Nix deletes invalid outputs before it asks the hook; a
                // path here now was made valid meanwhile, or is debris.
                let valid = daemon
                    .is_valid_path(&info.path)
                    .await
                    .map_err(OutputsError::LocalStore)?;
                if valid {
                    body.skip(info.nar_size)
                        .await
                        .map_err(|e| import_error(e.into()))?;
                    continue;
                }
                locked.clear().await.map_err(import_error)?;
            }
            let done = locked
                .restore(&info, &mut body)
                .await
                .map_err(import_error)?;
            verified.push(done);
        }
    }
    Ok(verified)
}

/// Registers `verified` (dependency order) through `importer`: every
/// registration is submitted before any is awaited, so the batcher finds
/// them all queued and makes them valid in one `nix-store` call (with a
/// current-thread runtime, certainly; elsewhere, in calls that follow each
/// other in submission order, which is equally correct).
pub async fn register_together(
    importer: &Importer,
    verified: Vec<Verified>,
) -> Result<(), OutputsError> {
    type Registered = Result<(), (StorePath, ItemError)>;
    let futures: Vec<Pin<Box<dyn Future<Output = Registered> + Send>>> = verified
        .into_iter()
        .map(|v| {
            let path = v.info().path.clone();
            let importer = importer.clone();
            Box::pin(async move { importer.register(v).await.map_err(|e| (path, e)) })
                as Pin<Box<dyn Future<Output = Registered> + Send>>
        })
        .collect();
    for result in join_all(futures).await {
        result.map_err(|(path, source)| OutputsError::Import { path, source })?;
    }
    Ok(())
}

/// Polls every future in order on each wake-up until all are done; returns
/// their results in order. (The one combinator this module needs.)
async fn join_all<T>(mut futures: Vec<Pin<Box<dyn Future<Output = T> + Send>>>) -> Vec<T> {
    let mut results: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx: &mut Context<'_>| {
        let mut pending = false;
        for (future, slot) in futures.iter_mut().zip(results.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            match future.as_mut().poll(cx) {
                Poll::Ready(value) => *slot = Some(value),
                Poll::Pending => pending = true,
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use nixq_common::hash::NarHash;

    use super::*;

    fn info(name: &str, refs: &[&StorePath]) -> PathInfo {
        PathInfo {
            path: StorePath::parse_any(&format!(
                "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-{name}"
            ))
            .expect("path"),
            deriver: None,
            nar_hash: NarHash::of(name.as_bytes()),
            nar_size: 120,
            references: refs.iter().map(|r| (*r).clone()).collect(),
            registration_time: 0,
            ultimate: false,
            sigs: vec![],
            ca: None,
        }
    }

    #[test]
    fn wanted_outputs_are_looked_up_by_path() {
        let out = info("x", &[]);
        let doc = info("x-doc", &[&out.path]);
        let built: BTreeMap<String, PathInfo> = [
            ("out".to_owned(), out.clone()),
            ("doc".to_owned(), doc.clone()),
        ]
        .into();
        let got = wanted_infos(&built, &[doc.path.clone(), out.path.clone()]).expect("found");
        assert_eq!(got, vec![doc.clone(), out]);
        let other = info("y", &[]);
        assert!(matches!(
            wanted_infos(&built, &[other.path]),
            Err(OutputsError::NotBuilt(_))
        ));
    }

    #[tokio::test]
    async fn join_all_keeps_order_and_polls_everything_first() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let futures: Vec<Pin<Box<dyn Future<Output = usize> + Send>>> = (0..5usize)
            .map(|i| {
                let tx = tx.clone();
                Box::pin(async move {
                    let _ = tx.send(i);
                    tokio::task::yield_now().await;
                    i * 10
                }) as Pin<Box<dyn Future<Output = usize> + Send>>
            })
            .collect();
        drop(tx);
        assert_eq!(join_all(futures).await, [0, 10, 20, 30, 40]);
        let mut order = Vec::new();
        while let Ok(i) = rx.try_recv() {
            order.push(i);
        }
        assert_eq!(order, [0, 1, 2, 3, 4]);
    }
}
