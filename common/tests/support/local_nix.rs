//! The machine's own Nix, for the real-Nix integration tests of
//! `nixq-common` and `nixq-agent` (each includes this file with `#[path]`).
//! Not every test file uses every item.
#![allow(dead_code)]

use std::process::{Command, Output};

use nixq_common::store_path::StorePath;

/// Settings for a root, single-user Nix with no network (§11).
pub(crate) const NIX_CONFIG: &str = "build-users-group =\nsandbox = false\nsubstituters =\n";

/// Panics, naming what is missing, unless every program of `tools` is on the
/// PATH and, with `root`, this process is root: a test that cannot run must
/// fail, never pass by skipping (CI=true or not). `tests` names the tests in
/// the message.
pub(crate) fn require(tests: &str, root: bool, tools: &[&str]) {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .collect();
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    assert!(
        missing.is_empty() && (is_root || !root),
        "{tests} need {}these tools: {missing:?} (Debian: apt-get install -y nix-bin util-linux)",
        if root && !is_root { "root and " } else { "" }
    );
}

/// Runs a Nix command on the machine's own store and returns its stdout;
/// panics with its stderr if it fails.
pub(crate) fn nix(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env_remove("NIX_REMOTE")
        .output()
        .expect("run nix");
    check(output, &format!("{program} {args:?}"))
}

/// The stdout of a finished command; panics with its status and stderr if
/// it failed. `what` names the command in the message.
pub(crate) fn check(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// A store path printed by Nix (surrounding white space ignored).
pub(crate) fn store_path(text: &str) -> StorePath {
    StorePath::parse_any(text.trim()).expect("store path")
}
