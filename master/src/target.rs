//! Which agent a command talks to, and with what credentials: a `HOST`
//! argument or the machines file, the `--identity` / `--ca` flags, the
//! machines entry's columns, and the defaults, resolved before any network
//! I/O.
//!
//! Precedence, for the identity and the CA alike: the command-line flag,
//! then the machines entry's column (3 or 8), then the default file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nixq_common::machines::{
    self, AgentCa, ForeignUris, FsIncludes, Host, MachineSpec, MachineUri, MachinesError,
    ParseOptions, UriError,
};
use nixq_common::net::DEFAULT_CONNECT_TIMEOUT;

use crate::agent_client::AgentTarget;

/// Nix's default `builders` file.
pub const DEFAULT_MACHINES: &str = "/etc/nix/machines";
/// The master's certificate and key, as `nixq-certs bundle` installs them.
pub const DEFAULT_IDENTITY: &str = "/etc/nixq/master.pem";
/// The deployment CA, as `nixq-certs bundle` installs it.
pub const DEFAULT_CA: &str = "/etc/nixq/ca.crt";

/// Why a target could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error("cannot read the machines file {path}: {source}")]
    ReadMachines {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Machines(#[from] MachinesError),
    #[error(transparent)]
    Uri(#[from] UriError),
    #[error("'{host}' is neither a nixq:// URI nor a machine of {machines}")]
    UnknownHost { host: String, machines: String },
}

impl TargetError {
    /// A mistake on the command line (as opposed to a broken file).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Uri(_) | Self::UnknownHost { .. })
    }
}

/// Where the machines come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachinesSource {
    /// A file; `explicit` if the user named it (then it must exist).
    File { path: PathBuf, explicit: bool },
    /// A `builders` value given inline (`nixq-status --builders`).
    Builders(String),
}

impl MachinesSource {
    /// `--machines FILE`, or the default file.
    pub fn file_or_default(path: Option<PathBuf>) -> Self {
        match path {
            Some(path) => Self::File {
                path,
                explicit: true,
            },
            None => Self::File {
                path: PathBuf::from(DEFAULT_MACHINES),
                explicit: false,
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::File { path, .. } => path.display().to_string(),
            Self::Builders(_) => "--builders".to_owned(),
        }
    }
}

/// The credentials given on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub identity: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

/// Nix's name for this machine's platform, the default of column 2.
pub fn local_system() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

/// Reads and parses the machines. Entries with other URI schemes (ssh://
/// builders of a shared file) are skipped: these tools only look for nixq
/// agents. A missing default file is an empty list.
pub fn load_machines(source: &MachinesSource) -> Result<Vec<MachineSpec>, TargetError> {
    let system = local_system();
    let options = ParseOptions {
        local_system: &system,
        foreign_uris: ForeignUris::Skip,
    };
    let parsed = match source {
        MachinesSource::Builders(text) => {
            machines::parse("builders", text, &options, &mut FsIncludes)?
        }
        MachinesSource::File { path, explicit } => {
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                    return Ok(Vec::new())
                }
                Err(source) => {
                    return Err(TargetError::ReadMachines {
                        path: path.clone(),
                        source,
                    })
                }
            };
            let name = path.display().to_string();
            machines::parse(&name, &text, &options, &mut FsIncludes)?
        }
    };
    Ok(parsed.machines)
}

/// The agent `host` names: a `nixq://` URI (completed by the machines entry
/// with the same URI, if any), or the host name or URI of a machines entry.
/// The machines are read only when needed; a broken default file does not
/// stand in the way of an explicit URI.
pub fn resolve(
    host: &str,
    source: &MachinesSource,
    credentials: &Credentials,
) -> Result<AgentTarget, TargetError> {
    if host.starts_with(&format!("{}://", machines::SCHEME)) {
        let uri = MachineUri::parse(host)?;
        let explicit = matches!(source, MachinesSource::File { explicit: true, .. });
        let listed = match load_machines(source) {
            Ok(list) => list,
            Err(e) if explicit => return Err(e),
            Err(e) => {
                tracing::debug!("ignoring the machines file: {e}");
                Vec::new()
            }
        };
        let spec = listed.into_iter().find(|m| m.uri.text == uri.text);
        return Ok(target_of(uri, spec.as_ref(), credentials));
    }
    let listed = load_machines(source)?;
    let spec = listed
        .iter()
        .find(|m| m.uri.text == host || host_matches(&m.uri.host, host))
        .ok_or_else(|| TargetError::UnknownHost {
            host: host.to_owned(),
            machines: source.describe(),
        })?;
    Ok(target_of(spec.uri.clone(), Some(spec), credentials))
}

fn host_matches(uri_host: &Host, host: &str) -> bool {
    match uri_host {
        Host::Name(name) => name == host,
        Host::Ip(ip) => ip.to_string() == host || uri_host.to_string() == host,
    }
}

/// The target for a machine: credentials by precedence (module doc).
pub fn target_of(
    uri: MachineUri,
    spec: Option<&MachineSpec>,
    credentials: &Credentials,
) -> AgentTarget {
    let identity = credentials
        .identity
        .clone()
        .or_else(|| spec.and_then(|s| s.identity.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_IDENTITY));
    let ca = match (&credentials.ca, spec.and_then(|s| s.agent_ca.clone())) {
        (Some(path), _) => AgentCa::File(path.clone()),
        (None, Some(column)) => column,
        (None, None) => AgentCa::File(Path::new(DEFAULT_CA).to_path_buf()),
    };
    let connect_timeout = uri
        .params
        .connect_timeout
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    AgentTarget {
        uri,
        identity,
        ca,
        connect_timeout,
    }
}

/// A target with the connect timeout capped at `limit` (for status).
pub fn with_timeout(mut target: AgentTarget, limit: Duration) -> AgentTarget {
    target.connect_timeout = target.connect_timeout.min(limit);
    target
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_machines(text: &str) -> (tempfile::TempDir, MachinesSource) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("machines");
        std::fs::write(&path, text).expect("write");
        (
            dir,
            MachinesSource::File {
                path,
                explicit: true,
            },
        )
    }

    #[test]
    fn uri_alone_uses_defaults() {
        let source = MachinesSource::File {
            path: PathBuf::from("/nonexistent/machines"),
            explicit: false,
        };
        let target = resolve(
            "nixq://10.0.0.2:9000?connect-timeout=3",
            &source,
            &Credentials::default(),
        )
        .expect("resolved");
        assert_eq!(target.uri.port, 9000);
        assert_eq!(target.identity, PathBuf::from(DEFAULT_IDENTITY));
        assert_eq!(target.ca, AgentCa::File(PathBuf::from(DEFAULT_CA)));
        assert_eq!(target.connect_timeout, Duration::from_secs(3));
    }

    #[test]
    fn machine_entry_gives_credentials_and_flags_win() {
        let (_dir, source) = write_machines(
            "ssh://old x86_64-linux\nnixq://s1?compress=zstd:5 x86_64-linux /keys/m.pem 2 1 kvm - /keys/ca.pem\n",
        );
        let by_name = resolve("s1", &source, &Credentials::default()).expect("by name");
        assert_eq!(by_name.identity, PathBuf::from("/keys/m.pem"));
        assert_eq!(by_name.ca, AgentCa::File(PathBuf::from("/keys/ca.pem")));
        assert_eq!(by_name.uri.text, "nixq://s1?compress=zstd:5");
        let by_uri = resolve(
            "nixq://s1?compress=zstd:5",
            &source,
            &Credentials::default(),
        )
        .expect("by uri");
        assert_eq!(by_uri, by_name);
        let flags = Credentials {
            identity: Some(PathBuf::from("/other.pem")),
            ca: Some(PathBuf::from("/other-ca.pem")),
        };
        let overridden = resolve("s1", &source, &flags).expect("flags");
        assert_eq!(overridden.identity, PathBuf::from("/other.pem"));
        assert_eq!(overridden.ca, AgentCa::File(PathBuf::from("/other-ca.pem")));
    }

    #[test]
    fn unknown_host_and_bad_uri_are_usage_errors() {
        let (_dir, source) = write_machines("nixq://s1\n");
        let err = resolve("s2", &source, &Credentials::default()).expect_err("unknown");
        assert!(err.is_usage());
        assert!(err.to_string().contains("'s2' is neither"), "{err}");
        let err =
            resolve("nixq://s1?bogus=1", &source, &Credentials::default()).expect_err("bad uri");
        assert!(err.is_usage(), "{err}");
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let source = MachinesSource::File {
            path: PathBuf::from("/nonexistent/machines"),
            explicit: true,
        };
        let err = resolve("s1", &source, &Credentials::default()).expect_err("missing");
        assert!(!err.is_usage());
        assert!(err.to_string().contains("/nonexistent/machines"), "{err}");
        assert!(
            load_machines(&MachinesSource::Builders("nixq://a; nixq://b".into()))
                .expect("inline")
                .len()
                == 2
        );
    }
}
