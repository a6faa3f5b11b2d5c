//! What the machine must offer before any farm is built, and the policy when
//! it does not: **fail, never skip**. A skipped end-to-end test looks exactly
//! like a passing one in `cargo test`'s summary, so a machine that cannot run
//! these tests makes them panic with a message that says what is missing.
//! With `CI=true` the message says so too: CI must provide root and Nix
//! (`.ci/run` installs them). To leave these tests out deliberately, run
//! `cargo test --workspace --exclude nixq-e2e`.

use std::path::Path;

use crate::error::{Error, Result};

/// Programs that must be on `PATH`: `ip` (namespaces, veths, bridge) and Nix's
/// classic CLI. Entering a host uses syscalls, not `unshare`/`nsenter`.
const REQUIRED_PROGRAMS: &[&str] = &["ip", "nix-store", "nix-build", "nix-instantiate"];

/// Checks that the tests can run here: root, the programs above, `/bin/sh`
/// (every builder and `Host::sh`), a `/nix` directory to mount over, and the
/// absolute-path tools the generated builders use.
pub fn check_root_and_nix() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Precondition(
            "must run as root (network and mount namespaces, /nix bind mounts)".into(),
        ));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for program in REQUIRED_PROGRAMS {
        if !std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program))) {
            return Err(Error::Precondition(format!(
                "`{program}` not found on PATH (install nix-bin and iproute2)"
            )));
        }
    }
    for file in std::iter::once("/bin/sh").chain(crate::closures::BUILDER_TOOLS.iter().copied()) {
        if !is_executable(Path::new(file)) {
            return Err(Error::Precondition(format!("{file} is missing")));
        }
    }
    if !Path::new("/nix").is_dir() {
        return Err(Error::Precondition(
            "/nix does not exist (it is the mount point of every host's store; install nix-bin)"
                .into(),
        ));
    }
    Ok(())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// [`check_root_and_nix`], panicking (failing the test) when it fails; see
/// the module documentation for why this never skips.
pub fn require_root_and_nix() {
    if let Err(e) = check_root_and_nix() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        if ci {
            panic!("{e}\nCI=true: the CI machine must provide root and Nix (see .ci/run)");
        }
        panic!(
            "{e}\nend-to-end tests fail rather than skip; run them as root with Nix 2.x \
             installed, or leave them out with `cargo test --workspace --exclude nixq-e2e`"
        );
    }
}
