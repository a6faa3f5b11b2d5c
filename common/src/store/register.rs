//! `nix-store --register-validity --hash-given`: make restored paths valid in
//! one call, fed on stdin (§2.10).
//!
//! This is the one way to make paths valid that works on every Nix version
//! while Nix holds the paths' locks (the build hook's outputs), and the
//! fastest way to register a batch of restored paths on the agent. With
//! `--hash-given` Nix trusts the hash: callers pass only [`Registration`]s,
//! which are built from NARs whose hash and size were checked.

use std::fmt::Write as _;
use std::process::Stdio;

use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use crate::hash::NarHash;
use crate::store_path::StorePath;

/// One path to register, with metadata that was checked against its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub path: StorePath,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub deriver: Option<StorePath>,
    pub references: Vec<StorePath>,
}

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} --register-validity failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The stdin text of `--register-validity --hash-given`: per path, lines
/// `path`, `sha256:<nix32>`, `narSize`, `deriver` (empty for none), the
/// number of references, then the references. No blank line anywhere: Nix
/// would read it as the next path.
pub fn registration_text(entries: &[Registration]) -> String {
    let mut text = String::new();
    for e in entries {
        // Writing to a String cannot fail.
        let _ = writeln!(text, "{}", e.path);
        let _ = writeln!(text, "{}", e.nar_hash.to_nix32_prefixed());
        let _ = writeln!(text, "{}", e.nar_size);
        let _ = writeln!(
            text,
            "{}",
            e.deriver.as_ref().map(StorePath::as_str).unwrap_or("")
        );
        let _ = writeln!(text, "{}", e.references.len());
        for r in &e.references {
            let _ = writeln!(text, "{r}");
        }
    }
    text
}

/// Register `entries` in one `nix-store` call. `nix_store` is the program
/// (normally `nix-store`); the environment must point at the local store
/// (`NIX_REMOTE` empty), which [`local_store_command`] ensures.
pub async fn register_validity(
    nix_store: &str,
    entries: &[Registration],
) -> Result<(), RegisterError> {
    if entries.is_empty() {
        return Ok(());
    }
    Registrar::spawn(nix_store)?.register(entries).await
}

/// A `nix-store --register-validity --hash-given` started ahead of time: it
/// loads, reads its configuration and opens the database (15–20 ms, most of
/// a small registration's cost), then waits for its input, so that the
/// registration itself costs a few milliseconds when the paths are ready.
/// Dropped unused, it reads an empty input and exits having done nothing.
/// It holds the store's big lock shared while it waits, as every Nix
/// process does: keep it waiting for seconds, not hours.
#[derive(Debug)]
pub struct Registrar {
    program: String,
    child: tokio::process::Child,
}

impl Registrar {
    /// Starts the program on the local store.
    pub fn spawn(nix_store: &str) -> Result<Self, RegisterError> {
        let child = local_store_command(nix_store)
            .args(["--register-validity", "--hash-given"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| RegisterError::Spawn {
                program: nix_store.to_owned(),
                source,
            })?;
        Ok(Self {
            program: nix_store.to_owned(),
            child,
        })
    }

    /// Registers `entries` in one transaction and waits for the program to
    /// exit.
    pub async fn register(mut self, entries: &[Registration]) -> Result<(), RegisterError> {
        let text = registration_text(entries);
        if let Some(mut stdin) = self.child.stdin.take() {
            // A write error means nix-store died early; its status says why.
            let _ = stdin.write_all(text.as_bytes()).await;
        }
        let output =
            self.child
                .wait_with_output()
                .await
                .map_err(|source| RegisterError::Spawn {
                    program: self.program.clone(),
                    source,
                })?;
        if output.status.success() {
            return Ok(());
        }
        Err(RegisterError::Failed {
            program: self.program,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// A `nix-store` (or other Nix CLI) command that operates on the local store
/// directly, never through the daemon socket: through the socket, paths whose
/// locks Nix holds would deadlock (§2.10).
pub fn local_store_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("NIX_REMOTE", "");
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_no_blank_lines_between_blocks() {
        let p = |s: &str| StorePath::parse_any(s).expect("valid");
        let a = p("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a");
        let b = p("/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-b");
        let entries = [
            Registration {
                path: a.clone(),
                nar_hash: NarHash::of(b"a"),
                nar_size: 120,
                deriver: None,
                references: vec![],
            },
            Registration {
                path: b.clone(),
                nar_hash: NarHash::of(b"b"),
                nar_size: 128,
                deriver: Some(p("/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-b.drv")),
                references: vec![a.clone(), b.clone()],
            },
        ];
        let text = registration_text(&entries);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5 + 7);
        assert_eq!(lines[0], a.as_str());
        assert!(lines[1].starts_with("sha256:"));
        assert_eq!(lines[3], "");
        assert_eq!(lines[4], "0");
        assert_eq!(lines[5], b.as_str());
        assert_eq!(lines[9], "2");
        assert!(text.ends_with('\n') && !text.ends_with("\n\n"));
    }
}
