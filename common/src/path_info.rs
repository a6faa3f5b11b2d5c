//! What the store knows about a valid path ([`PathInfo`], Nix's
//! `ValidPathInfo`, nix-interfaces.md §5.4) and the dependency order of a
//! closure ([`topo_sort`]): every path after all the paths it references, as
//! a store can only register a path whose references are valid.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::hash::NarHash;
use crate::store_path::StorePath;

/// Metadata of one valid store path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathInfo {
    pub path: StorePath,
    /// The derivation that built it, if known.
    pub deriver: Option<StorePath>,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// May include `path` itself.
    pub references: BTreeSet<StorePath>,
    /// Seconds since the epoch.
    pub registration_time: u64,
    /// Built locally / of trusted origin.
    pub ultimate: bool,
    /// `keyname:base64signature`.
    pub sigs: Vec<String>,
    /// Content address (`text:sha256:…`, `fixed:r:sha256:…`), if any.
    pub ca: Option<String>,
}

/// A closure whose references form a cycle (other than a path referring to
/// itself), which no Nix store can hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reference cycle between store paths: {}", cycle_text(.cycle))]
pub struct CycleError {
    /// The paths of the cycle, each referring to the next, the last to the
    /// first.
    pub cycle: Vec<StorePath>,
}

fn cycle_text(cycle: &[StorePath]) -> String {
    let names: Vec<&str> = cycle.iter().map(StorePath::as_str).collect();
    names.join(" -> ")
}

/// Order `infos` so that every path comes after the paths it references.
/// References to paths outside the set are ignored (they are assumed
/// present); self-references are allowed. The order is deterministic:
/// depth-first over the paths in sorted order, references in sorted order.
pub fn topo_sort(infos: impl IntoIterator<Item = PathInfo>) -> Result<Vec<PathInfo>, CycleError> {
    let mut by_path: BTreeMap<StorePath, PathInfo> = infos
        .into_iter()
        .map(|info| (info.path.clone(), info))
        .collect();
    let order = topo_order(&by_path)?;
    Ok(order
        .into_iter()
        .filter_map(|path| by_path.remove(&path))
        .collect())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// On the current depth-first path.
    Visiting,
    Done,
}

fn topo_order(by_path: &BTreeMap<StorePath, PathInfo>) -> Result<Vec<StorePath>, CycleError> {
    let mut marks: BTreeMap<&StorePath, Mark> = BTreeMap::new();
    let mut order = Vec::with_capacity(by_path.len());
    for root in by_path.keys() {
        if marks.contains_key(root) {
            continue;
        }
        // An explicit stack instead of recursion: closures can be deep.
        let mut stack: Vec<(&StorePath, std::collections::btree_set::Iter<'_, StorePath>)> =
            Vec::new();
        marks.insert(root, Mark::Visiting);
        stack.push((root, by_path[root].references.iter()));
        while let Some((path, refs)) = stack.last_mut() {
            let path = *path;
            let next = refs.find(|r| *r != path && by_path.contains_key(*r));
            match next {
                Some(reference) => match marks.get(reference) {
                    Some(Mark::Done) => {}
                    Some(Mark::Visiting) => {
                        let start = stack.iter().position(|(p, _)| *p == reference).unwrap_or(0);
                        return Err(CycleError {
                            cycle: stack[start..].iter().map(|(p, _)| (*p).clone()).collect(),
                        });
                    }
                    None => {
                        marks.insert(reference, Mark::Visiting);
                        stack.push((reference, by_path[reference].references.iter()));
                    }
                },
                None => {
                    marks.insert(path, Mark::Done);
                    order.push(path.clone());
                    stack.pop();
                }
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(c: char, name: &str) -> StorePath {
        StorePath::parse_any(&format!("/nix/store/{}-{name}", c.to_string().repeat(32)))
            .expect("path")
    }

    fn info(p: &StorePath, refs: &[&StorePath]) -> PathInfo {
        PathInfo {
            path: p.clone(),
            deriver: None,
            nar_hash: NarHash::of(p.as_str().as_bytes()),
            nar_size: 8,
            references: refs.iter().map(|r| (*r).clone()).collect(),
            registration_time: 0,
            ultimate: false,
            sigs: Vec::new(),
            ca: None,
        }
    }

    fn names(infos: &[PathInfo]) -> Vec<&str> {
        infos.iter().map(|i| i.path.name()).collect()
    }

    #[test]
    fn references_come_first() {
        let (a, b, c, d, x) = (
            path('a', "a"),
            path('b', "b"),
            path('c', "c"),
            path('d', "d"),
            path('x', "outside"),
        );
        // a -> b -> c, a -> d -> c, c -> c (self), b -> x (not in the set).
        let infos = vec![
            info(&a, &[&b, &d, &a]),
            info(&b, &[&c, &x]),
            info(&c, &[&c]),
            info(&d, &[&c]),
        ];
        let sorted = topo_sort(infos.clone()).expect("acyclic");
        assert_eq!(names(&sorted), ["c", "b", "d", "a"]);
        // Deterministic whatever the input order.
        let mut reversed = infos;
        reversed.reverse();
        assert_eq!(
            names(&topo_sort(reversed).expect("acyclic")),
            ["c", "b", "d", "a"]
        );
        assert!(topo_sort(Vec::new()).expect("empty").is_empty());
    }

    #[test]
    fn cycles_are_named() {
        let (a, b, c) = (path('a', "a"), path('b', "b"), path('c', "c"));
        let err =
            topo_sort(vec![info(&a, &[&b]), info(&b, &[&c]), info(&c, &[&a])]).expect_err("cycle");
        assert_eq!(err.cycle, vec![a.clone(), b.clone(), c.clone()]);
        assert!(err.to_string().contains("-> /nix/store/"));
    }

    #[test]
    fn deep_chains_do_not_overflow() {
        let paths: Vec<StorePath> = (0u32..20_000)
            .map(|i| {
                StorePath::parse_any(&format!(
                    "/nix/store/{}-p{i}",
                    crate::store_path::nix32::encode(&NarHash::of(&i.to_le_bytes()).0[..20])
                ))
                .expect("path")
            })
            .collect();
        let infos: Vec<PathInfo> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| match i.checked_sub(1) {
                Some(prev) => info(p, &[&paths[prev]]),
                None => info(p, &[]),
            })
            .collect();
        let sorted = topo_sort(infos).expect("acyclic");
        assert_eq!(sorted[0].path, paths[0]);
        assert_eq!(sorted[19_999].path, paths[19_999]);
    }

    #[test]
    fn serde_round_trip() {
        let a = path('a', "a");
        let i = info(&a, &[&a]);
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&i, cfg).expect("encode");
        let (back, _): (PathInfo, usize) =
            bincode::serde::decode_from_slice(&bytes, cfg).expect("decode");
        assert_eq!(back, i);
    }
}
