//! Where the nixq programs under test are.
//!
//! Cargo only builds a package's binaries for *that* package's integration
//! tests, so `cargo test -p nixq-e2e` does not build `nixq-agent` and friends.
//! Build them first (`cargo build --workspace --bins`, which `.ci/run` does)
//! or point `NIXQ_BIN_DIR` at a directory that holds them.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The path of nixq program `name` (e.g. `"nixq-agent"`): `$NIXQ_BIN_DIR/name`
/// if set, else next to the test binary's profile directory
/// (`target/<profile>/name`, the test itself being in `target/<profile>/deps/`).
pub fn nixq_bin(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("NIXQ_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe()
                .map_err(|e| Error::io("cannot locate the test binary", "/proc/self/exe", e))?;
            exe.parent()
                .and_then(|deps| deps.parent())
                .map(PathBuf::from)
                .ok_or_else(|| {
                    Error::Precondition(format!("{} has no profile directory", exe.display()))
                })?
        }
    };
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Precondition(format!(
            "{} does not exist: run `cargo build --workspace --bins` first, or set NIXQ_BIN_DIR",
            path.display()
        )))
    }
}
