//! `nixq-certs bundle NAME`: one tar with everything one host needs.
//!
//! Unpacked with `tar -xf NAME.tar -C /etc`, it creates:
//!
//! | host   | file                             | mode | what                                   |
//! |--------|----------------------------------|------|----------------------------------------|
//! | agent  | `/etc/nixq/ca.crt`               | 0644 | the CA that signs masters' certificates |
//! | agent  | `/etc/nixq/agent.crt`            | 0644 | this agent's certificate               |
//! | agent  | `/etc/nixq/agent.key`            | 0600 | its private key                        |
//! | agent  | `/etc/nixq/agent.toml.example`   | 0644 | the TLS part of `agent.toml`           |
//! | master | `/etc/nixq/ca.crt`               | 0644 | the CA that signs agents' certificates  |
//! | master | `/etc/nixq/master.pem`           | 0600 | certificate then key, one file: the identity column of the machines file |
//! | master | `/etc/nixq/machines.example`     | 0644 | a machines-file line using them        |
//!
//! The master's identity is one combined PEM file because the machines file
//! has a single identity column; `nixq_common::tls` also accepts a
//! certificate-only file whose key sits beside it with the extension `.key`.
//!
//! No directory entries are written, so unpacking never changes the
//! permissions of an existing `/etc/nixq`. Building the tar is pure.

use std::io::Write;

use crate::issue::Leaf;
use crate::CertsError;

/// The UDP port an agent listens on when its configuration names none, and
/// the port of a `nixq://host` URI without one. Must equal
/// `nixq_common::machines::DEFAULT_PORT` (a test in `common/tests/tls.rs` checks);
/// it lives here too because this crate cannot depend on `common`.
pub const DEFAULT_AGENT_PORT: u16 = 7461;

/// Where the bundle's files land: `tar -xf NAME.tar -C /etc`.
const INSTALL_DIR: &str = "/etc/nixq";

/// Which kind of host a bundle is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRole {
    /// A build slave running `nixq-agent`.
    Agent,
    /// A machine whose Nix sends builds (`nixq-build-hook`, `nixq-copy-closure`).
    Master,
}

/// One file of a bundle.
#[derive(Clone, PartialEq, Eq)]
pub struct BundleFile {
    /// Path inside the tar, e.g. `nixq/agent.key`.
    pub path: String,
    /// Unix mode.
    pub mode: u32,
    /// Contents.
    pub contents: Vec<u8>,
}

impl std::fmt::Debug for BundleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleFile")
            .field("path", &self.path)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("len", &self.contents.len())
            .finish()
    }
}

/// The files for one host, in tar order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The files.
    pub files: Vec<BundleFile>,
}

impl Bundle {
    /// The bundle of agent `name`; `sans` are its certificate's SANs
    /// (`DNS:…`, `IP:…`), quoted in the example so the admin knows which
    /// host names masters may use.
    pub fn agent(name: &str, ca_pem: &str, leaf: &Leaf, sans: &[String]) -> Self {
        let example = agent_example(name, sans);
        Self {
            files: vec![
                file("nixq/ca.crt", 0o644, ca_pem.as_bytes().to_vec()),
                file("nixq/agent.crt", 0o644, leaf.cert_pem.as_bytes().to_vec()),
                file("nixq/agent.key", 0o600, leaf.key_pem.as_bytes().to_vec()),
                file("nixq/agent.toml.example", 0o644, example.into_bytes()),
            ],
        }
    }

    /// The bundle of master `name`.
    pub fn master(name: &str, ca_pem: &str, leaf: &Leaf) -> Self {
        let example = master_example(name);
        Self {
            files: vec![
                file("nixq/ca.crt", 0o644, ca_pem.as_bytes().to_vec()),
                file("nixq/master.pem", 0o600, leaf.combined_pem().into_bytes()),
                file("nixq/machines.example", 0o644, example.into_bytes()),
            ],
        }
    }

    /// The bundle as a tar archive (owner root, modification time `mtime`
    /// in seconds since 1970).
    pub fn to_tar(&self, mtime: u64) -> Result<Vec<u8>, CertsError> {
        let io_err = |e| CertsError::io("build", "the tar archive", e);
        let mut builder = tar::Builder::new(Vec::new());
        for f in &self.files {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(f.contents.len() as u64);
            header.set_mode(f.mode);
            header.set_mtime(mtime);
            header.set_uid(0);
            header.set_gid(0);
            header.set_username("root").map_err(io_err)?;
            header.set_groupname("root").map_err(io_err)?;
            builder
                .append_data(&mut header, &f.path, f.contents.as_slice())
                .map_err(io_err)?;
        }
        let mut out = builder.into_inner().map_err(io_err)?;
        out.flush().map_err(io_err)?;
        Ok(out)
    }
}

fn file(path: &str, mode: u32, contents: Vec<u8>) -> BundleFile {
    BundleFile {
        path: path.to_owned(),
        mode,
        contents,
    }
}

fn agent_example(name: &str, sans: &[String]) -> String {
    let hosts: Vec<&str> = sans
        .iter()
        .map(|s| {
            s.strip_prefix("DNS:")
                .or_else(|| s.strip_prefix("IP:"))
                .unwrap_or(s)
        })
        .collect();
    let first_host = hosts.first().copied().unwrap_or(name);
    format!(
        "\
# TLS settings of nixq-agent \"{name}\", made by `nixq-certs bundle`.
# Unpack the bundle with `tar -xf {name}.tar -C /etc`, then merge these
# lines into {INSTALL_DIR}/agent.toml.
#
# Masters must reach this agent by a name its certificate holds:
#   {hosts}
# e.g. the machines-file URI nixq://{first_host}:{DEFAULT_AGENT_PORT}

# UDP address and port to listen on.
listen = [\"[::]:{DEFAULT_AGENT_PORT}\"]

# The deployment CA: only masters whose certificate it signed may connect.
ca = \"{INSTALL_DIR}/ca.crt\"
# This agent's certificate and private key (keep the key mode 0600).
cert = \"{INSTALL_DIR}/agent.crt\"
key = \"{INSTALL_DIR}/agent.key\"

# Optional: accept only these masters (the CN of their certificates).
# allowed_masters = [\"master1\"]
",
        hosts = hosts.join(", "),
    )
}

fn master_example(name: &str) -> String {
    format!(
        "\
# Machines-file lines for master \"{name}\", made by `nixq-certs bundle`.
# Unpack the bundle with `tar -xf {name}.tar -C /etc`, then add one line per
# agent to the machines file (see `builders` in nix.conf).
#
# Columns: URI, systems, identity (this master's certificate and key in one
# PEM file), max jobs, speed factor, supported features, mandatory features,
# agent CA. The URI host must be a name in the agent's certificate (check with
# `nixq-certs show agents/AGENT.crt`); the port defaults to {DEFAULT_AGENT_PORT}.
nixq://AGENT-HOST:{DEFAULT_AGENT_PORT} x86_64-linux {INSTALL_DIR}/master.pem 4 1 - - {INSTALL_DIR}/ca.crt
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn leaf() -> Leaf {
        Leaf {
            cert_pem: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n".into(),
        }
    }

    fn entries(tar_bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut archive = tar::Archive::new(tar_bytes);
        let mut out = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").display().to_string();
            let mode = entry.header().mode().expect("mode");
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read");
            out.push((path, mode, data));
        }
        out
    }

    #[test]
    fn agent_bundle_has_key_0600_and_example() {
        let sans = ["DNS:s1.lan".to_owned(), "IP:10.0.0.1".to_owned()];
        let tar = Bundle::agent("s1", "CA", &leaf(), &sans)
            .to_tar(0)
            .expect("tar");
        let e = entries(&tar);
        let names: Vec<_> = e.iter().map(|(p, m, _)| (p.as_str(), *m)).collect();
        assert_eq!(
            names,
            [
                ("nixq/ca.crt", 0o644),
                ("nixq/agent.crt", 0o644),
                ("nixq/agent.key", 0o600),
                ("nixq/agent.toml.example", 0o644)
            ]
        );
        let example = String::from_utf8(e[3].2.clone()).expect("utf8");
        assert!(example.contains("nixq://s1.lan:7461"), "{example}");
        assert!(
            example.contains("key = \"/etc/nixq/agent.key\""),
            "{example}"
        );
        assert_eq!(e[2].2, leaf().key_pem.as_bytes());
    }

    #[test]
    fn master_bundle_has_combined_identity() {
        let tar = Bundle::master("m1", "CA", &leaf()).to_tar(0).expect("tar");
        let e = entries(&tar);
        assert_eq!(e[1].0, "nixq/master.pem");
        assert_eq!(e[1].1, 0o600);
        assert_eq!(e[1].2, leaf().combined_pem().as_bytes());
        let example = String::from_utf8(e[2].2.clone()).expect("utf8");
        let line = example
            .lines()
            .find(|l| l.starts_with("nixq://"))
            .expect("machine line");
        assert_eq!(line.split_whitespace().count(), 8, "{line}");
    }
}
