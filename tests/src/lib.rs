//! End-to-end test harness of nixq: several hosts on one machine, each with
//! its own network and its own Nix store, running real Nix and real nixq
//! programs.
//!
//! # Layout
//!
//! | module           | owns                                                              |
//! |------------------|-------------------------------------------------------------------|
//! | [`farm`]         | [`Farm`] (hosts on a private bridge, teardown) and [`Host`] (run, spawn, files) |
//! | `enter`          | how a command enters a host: `setns` + private mount namespace + bind mounts |
//! | [`process`]      | checked commands with timeouts; [`Proc`], the kill-on-drop guard with a log |
//! | [`netns`]        | `ip netns` plumbing, emptying namespaces, sweeping stale ones      |
//! | [`nix`]          | each host's `nix.conf` and store; `nix-build`/`nix-store` helpers on [`Host`] |
//! | [`hook_farm`]    | remote-build farms: a master whose Nix runs `nixq-build-hook`, slaves with agents |
//! | [`nixq`]         | nixq deployments: PKI, agents, copy-closure runs, an in-test master |
//! | [`closures`]     | generated Nix expressions: DAGs of `/bin/sh` derivations           |
//! | [`precondition`] | root + Nix or a loud failure (never a silent skip)                |
//! | [`bins`]         | where the nixq binaries under test are                            |
//!
//! # A host
//!
//! A host is a network namespace `nixq-<pid>-<farm>-<name>` with `lo` and an
//! `eth0` at `10.213.0.<i>/24` on a bridge in the farm's own switch
//! namespace, plus a directory whose `nix/` is mounted over `/nix` and whose
//! `etc/nix/` over `/etc/nix` in every command run on the host. Nothing is
//! routed out of the namespaces and nothing is mounted in the machine's own
//! mount namespace. See [`farm`] for the API and `enter` for the mechanism.

pub mod bench;
pub mod bins;
pub mod closures;
mod enter;
pub mod error;
pub mod farm;
pub mod hook_farm;
pub mod netns;
pub mod nix;
pub mod nixq;
pub mod precondition;
pub mod process;

pub use bins::nixq_bin;
pub use closures::{closure_expr, ClosureSpec, Fill};
pub use error::{Error, Result};
pub use farm::{Farm, Host, HostOptions};
pub use precondition::{check_root_and_nix, require_root_and_nix};
pub use process::{Proc, Stdin};
