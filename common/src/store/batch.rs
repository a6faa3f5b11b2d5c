//! Batches validity registrations: many restored paths, one
//! `nix-store --register-validity` call.
//!
//! Every received path becomes valid only through here. Callers submit a
//! [`Registration`] once its NAR is restored and checked and every reference
//! is either valid already or submitted earlier; the batcher runs one
//! registration at a time, so a path and its references always land in the
//! same call or in calls that follow each other. A batch is whatever has
//! queued up while the previous call ran (up to [`MAX_BATCH`]), so a burst
//! of small paths costs a few calls instead of one per path, and a lone path
//! is not delayed.
//!
//! If a batch fails, its entries are retried one by one, so one bad entry
//! fails alone.
//!
//! The next call's `nix-store` is started as soon as a call ends (and when
//! the batcher starts), so its start-up overlaps the wait for the next
//! batch ([`Registrar`]); one left waiting for [`WARM_FOR`] is let go.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::register::{register_validity, Registrar, Registration};
use crate::store_path::StorePath;

/// Most paths in one `nix-store` call: bounds the stdin text (a few hundred
/// KiB) and the time a single failed batch takes to retry one by one.
pub const MAX_BATCH: usize = 2000;

/// Depth of the submission queue; submitters wait when it is full.
const QUEUE_DEPTH: usize = 4096;

type Reply = oneshot::Sender<Result<(), String>>;

/// Handle to the batching task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RegistrationBatcher {
    tx: mpsc::Sender<(Registration, Reply)>,
}

/// Why a submitted path was not registered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    #[error("registering {path} failed: {message}")]
    Failed { path: StorePath, message: String },
    #[error("the registration task has stopped")]
    Stopped,
}

impl RegistrationBatcher {
    /// Start the batching task on the current tokio runtime. `nix_store` is
    /// the program run for each batch; one is kept started ahead of the
    /// next batch (see the module doc).
    pub fn spawn(nix_store: String) -> Self {
        Self::start(nix_store, true)
    }

    /// Like [`RegistrationBatcher::spawn`] for a caller that submits one
    /// batch (a build's outputs): a `nix-store` is started ahead of it and
    /// waits for it however long that takes (the caller's lifetime bounds
    /// it), but none is started after it.
    pub fn spawn_for_one_batch(nix_store: String) -> Self {
        Self::start(nix_store, false)
    }

    fn start(nix_store: String, rewarm: bool) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run(nix_store, rx, rewarm));
        Self { tx }
    }

    /// Register one path; resolves when it is valid (or failed).
    pub async fn register(&self, reg: Registration) -> Result<(), BatchError> {
        self.enqueue(reg).await?.wait().await
    }

    /// Queue one path for registration; resolves as soon as it is in the
    /// queue (waiting only while the queue is full). The queue is served in
    /// order, one `nix-store` call at a time, so a path enqueued after this
    /// one is registered in the same call or a later one: once this
    /// returns, paths that refer to `reg` may be enqueued too. Dropping the
    /// returned [`Queued`] does not withdraw the registration.
    ///
    /// Cancel safe: if the future is dropped before it resolves, nothing
    /// was queued.
    pub async fn enqueue(&self, reg: Registration) -> Result<Queued, BatchError> {
        let path = reg.path.clone();
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((reg, reply))
            .await
            .map_err(|_| BatchError::Stopped)?;
        Ok(Queued { path, rx })
    }
}

/// A registration in the batcher's queue; [`Queued::wait`] for its result.
#[derive(Debug)]
pub struct Queued {
    path: StorePath,
    rx: oneshot::Receiver<Result<(), String>>,
}

impl Queued {
    /// The path being registered.
    pub fn path(&self) -> &StorePath {
        &self.path
    }

    /// Resolves when the path is valid (or its registration failed).
    pub async fn wait(self) -> Result<(), BatchError> {
        match self.rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(BatchError::Failed {
                path: self.path,
                message,
            }),
            Err(_) => Err(BatchError::Stopped),
        }
    }
}

/// How long a warm `nix-store` ([`Registrar`]) waits for the next batch
/// before it is let go: long enough for the next batch of a busy upload or
/// for a build's outputs, short enough not to hold the store's big lock
/// while the agent idles.
const WARM_FOR: Duration = Duration::from_secs(5);

async fn run(nix_store: String, mut rx: mpsc::Receiver<(Registration, Reply)>, rewarm: bool) {
    // Each call's start-up (15-20 ms) overlaps the wait for the next batch.
    let mut warm = Registrar::spawn(&nix_store).ok();
    loop {
        // A one-batch batcher (the hook's) keeps its process for as long as
        // the build takes: it lives no longer than the hook, which holds
        // the outputs' locks anyway.
        let patience = if rewarm { WARM_FOR } else { Duration::MAX };
        let first = match warm.take() {
            Some(registrar) => match tokio::time::timeout(patience, rx.recv()).await {
                Ok(Some(first)) => {
                    warm = Some(registrar);
                    first
                }
                Ok(None) => break,
                Err(_) => {
                    drop(registrar);
                    match rx.recv().await {
                        Some(first) => first,
                        None => break,
                    }
                }
            },
            None => match rx.recv().await {
                Some(first) => first,
                None => break,
            },
        };
        let mut batch = vec![first];
        // Whatever queued up while the previous call ran. Waiting a few
        // milliseconds for more (a linger) was measured and lost: small
        // uploads arrive slower than a call takes, so batches hardly grew
        // and every call started later (agent test `throughput`).
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        tracing::debug!(paths = batch.len(), "registering a batch");
        let (regs, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let order = references_first(&regs);
        let ordered: Vec<Registration> = order.iter().map(|&i| regs[i].clone()).collect();
        let results = register_batch(&nix_store, warm.take(), &ordered).await;
        let mut by_index: Vec<Option<Result<(), String>>> = vec![None; regs.len()];
        for (&i, result) in order.iter().zip(results) {
            by_index[i] = Some(result);
        }
        for (reply, result) in replies.into_iter().zip(by_index) {
            let _ = reply.send(result.unwrap_or_else(|| Err("lost in batch".to_owned())));
        }
        if rewarm {
            warm = Registrar::spawn(&nix_store).ok();
        }
    }
}

/// Indices of `regs` in an order where every path comes after those of its
/// references that are in the batch. Submission order already nearly has
/// this property; a reference cycle (impossible for valid store paths apart
/// from self-references) keeps submission order.
fn references_first(regs: &[Registration]) -> Vec<usize> {
    let index: HashMap<&StorePath, usize> =
        regs.iter().enumerate().map(|(i, r)| (&r.path, i)).collect();
    let mut state = vec![0u8; regs.len()]; // 0 new, 1 visiting, 2 done
    let mut order = Vec::with_capacity(regs.len());
    for root in 0..regs.len() {
        // Iterative depth-first search: (node, next reference to look at).
        let mut stack = vec![(root, 0usize)];
        while let Some((node, next)) = stack.pop() {
            if next == 0 {
                if state[node] != 0 {
                    continue;
                }
                state[node] = 1;
            }
            let refs = &regs[node].references;
            let child = refs[next.min(refs.len())..]
                .iter()
                .position(|r| index.get(r).is_some_and(|&c| state[c] == 0))
                .map(|off| next + off);
            match child {
                Some(c) => {
                    stack.push((node, c + 1));
                    stack.push((index[&refs[c]], 0));
                }
                None => {
                    state[node] = 2;
                    order.push(node);
                }
            }
        }
    }
    order
}

/// Registers `regs` with `warm` (or a `nix-store` started now); if that
/// fails, one by one.
async fn register_batch(
    nix_store: &str,
    warm: Option<Registrar>,
    regs: &[Registration],
) -> Vec<Result<(), String>> {
    let warm_was_used = warm.is_some();
    let mut result = match warm {
        Some(registrar) => registrar.register(regs).await,
        None => register_validity(nix_store, regs).await,
    };
    if result.is_err() && warm_was_used {
        // The warm process may have died while it waited (a signal, the
        // OOM killer): that says nothing about the entries. Once more with
        // a fresh one before blaming them one by one.
        result = register_validity(nix_store, regs).await;
    }
    let batch_err = match result {
        Ok(()) => return vec![Ok(()); regs.len()],
        Err(e) => e,
    };
    if regs.len() == 1 {
        return vec![Err(batch_err.to_string())];
    }
    let mut out = Vec::with_capacity(regs.len());
    let mut failed: HashSet<&StorePath> = HashSet::new();
    for reg in regs {
        if let Some(bad) = reg.references.iter().find(|r| failed.contains(r)) {
            out.push(Err(format!("its reference {bad} could not be registered")));
            failed.insert(&reg.path);
            continue;
        }
        match register_validity(nix_store, std::slice::from_ref(reg)).await {
            Ok(()) => out.push(Ok(())),
            Err(e) => {
                failed.insert(&reg.path);
                out.push(Err(e.to_string()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::NarHash;

    fn reg(name: &str, refs: &[&str]) -> Registration {
        let p = |n: &str| {
            StorePath::parse_any(&format!("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-{n}"))
                .expect("valid")
        };
        Registration {
            path: p(name),
            nar_hash: NarHash::of(name.as_bytes()),
            nar_size: 8,
            deriver: None,
            references: refs.iter().map(|r| p(r)).collect(),
        }
    }

    /// A stand-in for `nix-store` that fails without reading its input on
    /// its first run (a warm process that died while it waited), then
    /// reads its input and succeeds; every run is counted in `runs`.
    fn flaky_nix_store(dir: &std::path::Path) -> String {
        use std::os::unix::fs::PermissionsExt as _;
        let runs = dir.join("runs");
        let script = dir.join("nix-store");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho run >> {runs}\n\
                 if [ \"$(wc -l < {runs})\" -eq 1 ]; then exit 1; fi\n\
                 cat > /dev/null\n",
                runs = runs.display()
            ),
        )
        .expect("script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        script.display().to_string()
    }

    fn runs(dir: &std::path::Path) -> usize {
        std::fs::read_to_string(dir.join("runs"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// Waits (at most 10 s) until the stand-in has run `n` times.
    async fn wait_for_runs(dir: &std::path::Path, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while runs(dir) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "the stand-in nix-store ran {} times, not {n}",
                runs(dir)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_dead_warm_process_does_not_fail_the_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let batcher = RegistrationBatcher::spawn_for_one_batch(flaky_nix_store(dir.path()));
        // Let the warm process start and die.
        wait_for_runs(dir.path(), 1).await;
        batcher
            .register(reg("a", &[]))
            .await
            .expect("registered on the retry");
        assert_eq!(runs(dir.path()), 2, "one warm run, one fresh run");
    }

    #[tokio::test]
    async fn the_next_batch_finds_a_process_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = dir.path().join("ok");
        std::fs::write(
            &ok,
            "#!/bin/sh\necho run >> \"$(dirname \"$0\")/runs\"\ncat > /dev/null\n",
        )
        .expect("script");
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let batcher = RegistrationBatcher::spawn(ok.display().to_string());
        batcher.register(reg("a", &[])).await.expect("first");
        // The first batch used the process started with the batcher; the
        // second finds the one started right after the first batch.
        wait_for_runs(dir.path(), 2).await;
        batcher.register(reg("b", &["a"])).await.expect("second");
        // And one is started for a third batch.
        wait_for_runs(dir.path(), 3).await;
        assert_eq!(runs(dir.path()), 3);
    }

    #[test]
    fn references_come_first() {
        // c -> b -> a, d -> a, self-reference on b, e outside the batch.
        let regs = vec![
            reg("c", &["b", "e"]),
            reg("d", &["a"]),
            reg("b", &["a", "b"]),
            reg("a", &[]),
        ];
        let order = references_first(&regs);
        let pos = |name: &str| {
            order
                .iter()
                .position(|&i| regs[i].path.name() == name)
                .expect("present")
        };
        assert_eq!(order.len(), 4);
        assert!(pos("a") < pos("b") && pos("b") < pos("c") && pos("a") < pos("d"));
    }

    #[test]
    fn long_chain_does_not_recurse() {
        let names: Vec<String> = (0..20_000).map(|i| format!("p{i}")).collect();
        let regs: Vec<Registration> = (0..names.len())
            .rev()
            .map(|i| {
                let refs: Vec<&str> = if i > 0 {
                    vec![names[i - 1].as_str()]
                } else {
                    vec![]
                };
                reg(&names[i], &refs)
            })
            .collect();
        let order = references_first(&regs);
        assert_eq!(regs[order[0]].path.name(), "p0");
        assert_eq!(regs[order[order.len() - 1]].path.name(), "p19999");
    }
}
