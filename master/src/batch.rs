//! Cutting the paths to upload into batches, one Upload stream each. Pure.
//!
//! The paths come in dependency order (every path after the paths it
//! references), and batches are contiguous runs of that order handed to the
//! parallel streams in order, so a path's references are always in its own
//! batch or an earlier one; the agent waits for a reference still arriving on
//! another stream. Batches are sized so that small paths share a stream
//! (5,000 tiny paths must not cost 5,000 stream round trips) and large
//! closures still spread over every stream.

use std::collections::BTreeSet;
use std::ops::Range;

use nixq_common::path_info::PathInfo;
use nixq_common::store_path::StorePath;

/// What a path costs beyond its NAR bytes: its item frame, its registration
/// and its result, worth about as much as 4 KiB of NAR on a LAN. Counting
/// it keeps batches of tiny paths from growing to thousands of paths.
pub const PER_PATH_COST: u64 = 4096;

/// The smallest batch worth a stream of its own: below 1 MiB the round trip
/// at the end of a stream (waiting for the last result) outweighs the
/// parallelism gained.
pub const MIN_BATCH_COST: u64 = 1 << 20;

/// The largest batch: a failed or interrupted batch is retried whole, so
/// batches should not be too large either.
pub const MAX_BATCH_COST: u64 = 256 << 20;

/// Batches per stream aimed for: more than one, so that the streams finish
/// at about the same time when batch sizes vary.
pub const BATCHES_PER_JOB: u64 = 4;

/// The most paths in one batch, whatever their size: bounds how many results
/// the agent holds for one stream and how much one failure costs.
pub const MAX_BATCH_PATHS: usize = 2048;

/// How big batches are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Close a batch once its cost (NAR bytes + [`PER_PATH_COST`] per path)
    /// reaches this.
    pub target_cost: u64,
    pub max_paths: usize,
}

impl BatchLimits {
    /// Limits for sending `infos` over `jobs` parallel streams.
    pub fn for_transfer(infos: &[PathInfo], jobs: usize) -> Self {
        let total: u64 = infos.iter().map(cost).sum();
        let wanted = (jobs.max(1) as u64).saturating_mul(BATCHES_PER_JOB);
        Self {
            target_cost: (total / wanted).clamp(MIN_BATCH_COST, MAX_BATCH_COST),
            max_paths: MAX_BATCH_PATHS,
        }
    }
}

fn cost(info: &PathInfo) -> u64 {
    info.nar_size.saturating_add(PER_PATH_COST)
}

/// Cuts `infos` (in dependency order) into contiguous batches within
/// `limits`. A path larger than the target is a batch of its own.
pub fn batches(infos: &[PathInfo], limits: BatchLimits) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut batch_cost = 0u64;
    for (i, info) in infos.iter().enumerate() {
        batch_cost = batch_cost.saturating_add(cost(info));
        if batch_cost >= limits.target_cost || i + 1 - start >= limits.max_paths {
            out.push(start..i + 1);
            start = i + 1;
            batch_cost = 0;
        }
    }
    if start < infos.len() {
        out.push(start..infos.len());
    }
    out
}

/// A path of a list that comes before one of its references in the list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path} comes before its reference {reference}")]
pub struct OrderError {
    pub path: StorePath,
    pub reference: StorePath,
}

/// Checks that every path of `infos` comes after every reference of it that
/// is also in `infos` (self-references aside).
pub fn check_dependency_order(infos: &[PathInfo]) -> Result<(), OrderError> {
    let all: BTreeSet<&StorePath> = infos.iter().map(|i| &i.path).collect();
    let mut seen: BTreeSet<&StorePath> = BTreeSet::new();
    for info in infos {
        for reference in &info.references {
            if reference != &info.path && all.contains(reference) && !seen.contains(reference) {
                return Err(OrderError {
                    path: info.path.clone(),
                    reference: reference.clone(),
                });
            }
        }
        seen.insert(&info.path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use nixq_common::hash::NarHash;
    use nixq_common::path_info::topo_sort;

    use super::*;

    fn path(i: usize) -> StorePath {
        StorePath::parse_any(&format!("/nix/store/{i:032}-p{i}")).expect("valid path")
    }

    fn info(i: usize, size: u64, refs: &[usize]) -> PathInfo {
        PathInfo {
            path: path(i),
            deriver: None,
            nar_hash: NarHash::of(&[]),
            nar_size: size,
            references: refs.iter().map(|r| path(*r)).collect(),
            registration_time: 0,
            ultimate: false,
            sigs: Vec::new(),
            ca: None,
        }
    }

    fn covers(batches: &[Range<usize>], len: usize) -> bool {
        let mut next = 0;
        for b in batches {
            if b.start != next || b.is_empty() {
                return false;
            }
            next = b.end;
        }
        next == len
    }

    #[test]
    fn small_paths_share_batches() {
        // 5,000 paths of 4 KiB, each referring to the previous one.
        let infos: Vec<PathInfo> = (0..5000)
            .map(|i: usize| {
                let refs = if i == 0 { vec![] } else { vec![i - 1] };
                info(i, 4096, &refs)
            })
            .collect();
        let limits = BatchLimits::for_transfer(&infos, 4);
        let cut = batches(&infos, limits);
        assert!(covers(&cut, infos.len()));
        // 40 MB total / 16 = 2.5 MB per batch: about 16 batches, not 5,000.
        assert!((12..=20).contains(&cut.len()), "{} batches", cut.len());
    }

    #[test]
    fn large_closures_spread_over_jobs() {
        let infos: Vec<PathInfo> = (0..200).map(|i| info(i, 5 << 20, &[])).collect();
        let cut = batches(&infos, BatchLimits::for_transfer(&infos, 4));
        assert!(covers(&cut, infos.len()));
        assert!(
            cut.len() >= 4 * BATCHES_PER_JOB as usize - 1,
            "{}",
            cut.len()
        );
    }

    #[test]
    fn huge_path_is_alone_and_limits_hold() {
        let infos = vec![
            info(0, 10, &[]),
            info(1, 1 << 40, &[0]),
            info(2, 10, &[1]),
            info(3, 10, &[2]),
        ];
        let cut = batches(&infos, BatchLimits::for_transfer(&infos, 4));
        assert_eq!(cut, [0..2, 2..4]);
        let many: Vec<PathInfo> = (0..5000).map(|i| info(i, 0, &[])).collect();
        let limits = BatchLimits {
            target_cost: u64::MAX,
            max_paths: 2048,
        };
        assert_eq!(batches(&many, limits), [0..2048, 2048..4096, 4096..5000]);
        assert!(batches(&[], limits).is_empty());
        assert_eq!(
            BatchLimits::for_transfer(&[], 0).target_cost,
            MIN_BATCH_COST
        );
    }

    #[test]
    fn references_never_in_a_later_batch() {
        // A wide and deep graph, put in dependency order by topo_sort.
        let infos: Vec<PathInfo> = (0..3000)
            .map(|i: usize| {
                let refs: Vec<usize> = [i / 2, i / 3, i.saturating_sub(7)]
                    .into_iter()
                    .filter(|r| *r != i)
                    .collect();
                info(i, (i as u64 * 7919) % 300_000, &refs)
            })
            .rev()
            .collect();
        let ordered = topo_sort(infos).expect("acyclic");
        check_dependency_order(&ordered).expect("ordered");
        let cut = batches(&ordered, BatchLimits::for_transfer(&ordered, 3));
        assert!(covers(&cut, ordered.len()));
        let batch_of = |p: &StorePath| {
            let at = ordered.iter().position(|i| &i.path == p).expect("present");
            cut.iter().position(|b| b.contains(&at)).expect("covered")
        };
        for info in &ordered {
            for r in &info.references {
                assert!(batch_of(r) <= batch_of(&info.path));
            }
        }
    }

    #[test]
    fn order_check_names_the_culprit() {
        let bad = vec![info(1, 1, &[0, 1]), info(0, 1, &[])];
        let err = check_dependency_order(&bad).expect_err("out of order");
        assert_eq!(err.reference, path(0));
        assert!(check_dependency_order(&[info(1, 1, &[1, 9])]).is_ok());
    }
}
