//! The command line: raw flags (clap), each overriding one key of the
//! configuration file ([`crate::config`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{ArgAction, Parser};
use nixq_common::telemetry::LogFormat;

use crate::config::{AgentConfig, ConfigError, DEFAULT_CONFIG_FILE};

/// nixq-agent: receives closures and runs builds for nixq masters over QUIC
/// with mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "nixq-agent", version, about, max_term_width = 100)]
pub struct Cli {
    /// Configuration file (TOML). A missing default file means defaults; a
    /// file named here must exist.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// UDP address to listen on (repeatable); replaces `listen` of the file.
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,
    /// The deployment CA (PEM): masters must present a certificate it signed.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This agent's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This agent's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Only masters with this certificate common name may connect
    /// (repeatable); replaces `allowed_masters`.
    #[arg(long = "allow-master", value_name = "NAME")]
    pub allow_master: Vec<String>,
    /// A system to advertise (repeatable; default: the local Nix's `system`
    /// and `extra-platforms`).
    #[arg(long = "system", value_name = "SYS")]
    pub system: Vec<String>,
    /// A feature to advertise (repeatable; default: the local Nix's
    /// `system-features`).
    #[arg(long = "feature", value_name = "F")]
    pub feature: Vec<String>,
    /// Builds that may run at once (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    pub max_builds: Option<usize>,
    /// The Nix daemon socket to use when it exists.
    #[arg(long, value_name = "PATH")]
    pub daemon_socket: Option<PathBuf>,
    /// Use private `nix-daemon --stdio` children instead of the socket.
    #[arg(long)]
    pub stdio: bool,
    /// Refuse uploads and builds below this many free bytes in the store.
    #[arg(long, value_name = "BYTES")]
    pub min_free_space: Option<u64>,
    /// Log format on stderr.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// More log output (-v debug, -vv trace); `NIXQ_LOG` / `RUST_LOG` win.
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
}

impl Cli {
    /// The tracing directive for `-v`s.
    pub fn log_directive(&self) -> &'static str {
        match self.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    }

    /// The configuration file with the flags applied.
    pub fn config(&self) -> Result<AgentConfig, ConfigError> {
        let (file, required) = match &self.config {
            Some(file) => (file.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        let mut config = AgentConfig::load(&file, required)?;
        self.apply(&mut config);
        Ok(config)
    }

    fn apply(&self, config: &mut AgentConfig) {
        if !self.listen.is_empty() {
            config.listen.clone_from(&self.listen);
        }
        if let Some(ca) = &self.ca {
            config.ca.clone_from(ca);
        }
        if let Some(cert) = &self.cert {
            config.cert.clone_from(cert);
        }
        if let Some(key) = &self.key {
            config.key.clone_from(key);
        }
        if !self.allow_master.is_empty() {
            config.allowed_masters = Some(self.allow_master.clone());
        }
        if !self.system.is_empty() {
            config.systems = Some(self.system.clone());
        }
        if !self.feature.is_empty() {
            config.features = Some(self.feature.clone());
        }
        if let Some(n) = self.max_builds {
            config.max_builds = Some(n);
        }
        if let Some(socket) = &self.daemon_socket {
            config.store.daemon_socket.clone_from(socket);
        }
        if self.stdio {
            config.store.force_stdio = true;
        }
        if let Some(bytes) = self.min_free_space {
            config.min_free_space = bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let cli = Cli::parse_from([
            "nixq-agent",
            "--listen",
            "127.0.0.1:9000",
            "--listen",
            "[::1]:9001",
            "--allow-master",
            "m1",
            "--stdio",
            "--max-builds",
            "3",
            "--min-free-space",
            "0",
            "--log-format",
            "json",
            "-vv",
        ]);
        let mut config = AgentConfig::default();
        cli.apply(&mut config);
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.allowed_masters, Some(vec!["m1".to_owned()]));
        assert!(config.store.force_stdio);
        assert_eq!(config.max_builds, Some(3));
        assert_eq!(config.min_free_space, 0);
        assert_eq!(cli.log_format, LogFormat::Json);
        assert_eq!(cli.log_directive(), "trace");
        // Nothing given: the file's values stay.
        let cli = Cli::parse_from(["nixq-agent"]);
        let mut config = AgentConfig::default();
        cli.apply(&mut config);
        assert_eq!(config, AgentConfig::default());
    }

    #[test]
    fn a_named_config_file_must_exist() {
        let cli = Cli::parse_from(["nixq-agent", "--config", "/nonexistent/agent.toml"]);
        let err = cli.config().expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/agent.toml"), "{err}");
    }
}
