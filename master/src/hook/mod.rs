//! `nixq-build-hook`: the master's Nix hands derivations to it, and it builds
//! them on nixq agents (nix-interfaces.md §2–§4, §8–§10).
//!
//! # Layout
//!
//! | module      | owns                                                                 | I/O? |
//! |-------------|----------------------------------------------------------------------|------|
//! | [`modern`]  | Nix 2.x: settings preamble, "try" requests, job details; reply lines | pure |
//! | [`classic`] | `NIX_BUILD_HOOK` protocols (0.10 fds 3/4 + files, 1.x lines); protocol detection | pure |
//! | [`choice`]  | eligible machines, Nix's accept/decline/postpone rule, the agent's verdict | pure |
//! | [`exit`]    | how the hook ended → 0 / 100 / 101 / 1, in one place                 | pure |
//! | [`outputs`] | missing outputs: download, restore without locks, register together | network, store |
//! | [`run`]     | the glue: protocol loop → choice (slots, back-off, agent) → upload → build → outputs | all |
//!
//! The slot files and the back-off state shared with other hooks are in
//! [`crate::slots`]; the upload reuses [`crate::copy::send_closure`] under
//! [`crate::upload_lock`].
//!
//! # Configuration
//!
//! Machines come from Nix's `builders` setting (modern protocol) or the
//! file named by `NIX_REMOTE_SYSTEMS` (classic protocols), in Nix's format
//! with `nixq://host[:port][?params]` URIs (see [`nixq_common::machines`]);
//! `?compress=zstd[:LEVEL]` compresses uploads and downloads for that
//! machine. The master's certificate is the machine's identity column, else
//! `NIXQ_IDENTITY`, else `/etc/nixq/master.pem`; the agents' CA is the CA
//! column, else `NIXQ_CA`, else `/etc/nixq/ca.crt`. `NIXQ_LOG` turns on
//! `tracing` diagnostics on stderr (for debugging only: before an accept,
//! Nix copies them to the user's terminal).

pub mod choice;
pub mod classic;
pub mod exit;
pub mod modern;
pub mod outputs;
pub mod run;
