//! The agent's configuration: a TOML file (default `/etc/nixq/agent.toml`)
//! whose every key has a default, overridden by command-line flags.
//!
//! `packaging/examples/agent.toml` is parsed by a test below, so the shipped
//! example cannot drift from this struct.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default configuration file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/nixq/agent.toml";

/// Default UDP port of the agent, the one `nixq://host` means without a port.
pub use nixq_common::machines::DEFAULT_PORT;

/// The agent's settings after defaults are applied.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// UDP addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// The deployment CA (PEM): masters must present a certificate it signed.
    pub ca: PathBuf,
    /// This agent's certificate (PEM), issued by `nixq-certs issue agent`.
    pub cert: PathBuf,
    /// This agent's private key (PEM).
    pub key: PathBuf,
    /// If set, only masters whose certificate common name is listed may connect.
    pub allowed_masters: Option<Vec<String>>,
    /// Systems to advertise (default: the local Nix's `system` and `extra-platforms`).
    pub systems: Option<Vec<String>>,
    /// Features to advertise (default: the local Nix's `system-features`).
    pub features: Option<Vec<String>>,
    /// Builds that may run at once (default: the number of CPUs).
    pub max_builds: Option<usize>,
    /// How to reach the local store.
    pub store: StoreAccess,
    /// Refuse uploads and builds when the store's file system has less free
    /// space than this, in bytes, rather than fill the disk.
    pub min_free_space: u64,
    pub limits: Limits,
}

/// How the agent talks to its local Nix.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreAccess {
    /// The daemon socket; used when it exists, unless `stdio` is forced.
    pub daemon_socket: PathBuf,
    /// Always use a private `nix-daemon --stdio` child (root only), even if
    /// a daemon socket exists.
    pub force_stdio: bool,
    /// The `nix-daemon` program for the private child.
    pub nix_daemon: String,
    /// The `nix-store` program (for `--register-validity`).
    pub nix_store: String,
    /// The store directory.
    pub store_dir: String,
}

/// Resource limits; each default says why it has its value.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent master connections. One connection serves a whole master
    /// process, so a farm of a few dozen masters fits well within 64.
    pub max_connections: usize,
    /// Concurrent streams per connection: the transfer engine uses a few
    /// dozen parallel uploads, plus one stream per running build.
    pub max_streams_per_connection: u32,
    /// Largest control message, in bytes. Not enforced yet beyond the
    /// protocol's own per-message limits (`nixq_common::proto::MAX_*_LEN`,
    /// 16 MiB at most), which every frame is checked against; kept so
    /// existing configurations stay valid.
    pub max_message_size: u32,
    /// A connection with no traffic (keep-alives included) for this many
    /// seconds is closed.
    pub idle_timeout_secs: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 0], DEFAULT_PORT))],
            ca: PathBuf::from("/etc/nixq/ca.crt"),
            cert: PathBuf::from("/etc/nixq/agent.crt"),
            key: PathBuf::from("/etc/nixq/agent.key"),
            allowed_masters: None,
            systems: None,
            features: None,
            max_builds: None,
            store: StoreAccess::default(),
            // 1 GiB: enough headroom for Nix's own database and log writes.
            min_free_space: 1 << 30,
            limits: Limits::default(),
        }
    }
}

impl Default for StoreAccess {
    fn default() -> Self {
        Self {
            daemon_socket: PathBuf::from("/nix/var/nix/daemon-socket/socket"),
            force_stdio: false,
            nix_daemon: "nix-daemon".to_owned(),
            nix_store: "nix-store".to_owned(),
            store_dir: nixq_common::store_path::DEFAULT_STORE_DIR.to_owned(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_streams_per_connection: 256,
            max_message_size: 64 << 20,
            idle_timeout_secs: 30,
        }
    }
}

impl Limits {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", file.display())]
    Parse { file: PathBuf, message: String },
}

impl AgentConfig {
    /// Read `file`; a missing file is an error only if `required`.
    pub fn load(file: &Path, required: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Self::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    file: file.to_owned(),
                    source,
                })
            }
        };
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            file: file.to_owned(),
            message,
        })
    }

    /// Parse TOML text; the error names the line and the key.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../packaging/examples/agent.toml");
        let cfg = AgentConfig::parse(text).expect("example parses");
        assert_eq!(cfg.limits, Limits::default());
        assert!(!cfg.listen.is_empty());
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(
            AgentConfig::parse("").expect("parses"),
            AgentConfig::default()
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = AgentConfig::parse("listn = []\n").expect_err("unknown key");
        assert!(err.contains("listn"), "{err}");
        let err = AgentConfig::parse("[limits]\nmax_connections = -1\n").expect_err("bad value");
        assert!(
            err.contains("max_connections") || err.contains("line 2"),
            "{err}"
        );
    }
}
