//! End-to-end tests of nixq (one test binary; `autotests = false`).
//!
//! `harness`: self-tests of the harness itself, with Nix alone. They prove that
//! hosts reach each other and nothing else, that each host has its own store,
//! that generated closures build, and that a farm leaves nothing behind, even
//! when the test panics. The agent, copy-closure and hook tests build on them.
//!
//! `copy`: `nixq-copy-closure` against real `nixq-agent`s (see its module doc).
//!
//! `hook`: `nixq-build-hook` under real `nix-build` with agents on slaves
//! (see its module doc).
//!
//! Run as root with Nix installed: `cargo test -p nixq-e2e`. These tests fail
//! (never skip) when that is not possible; see `nixq_e2e::precondition`.

mod copy;
mod harness;
mod hook;
mod status;
