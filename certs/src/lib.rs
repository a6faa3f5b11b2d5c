//! nixq-certs: the deployment CA and the agent and master certificates.
//!
//! nixq authenticates both ends of every connection with certificates from
//! one CA per deployment (DESIGN.md, "Transport and security"): agents
//! present a server certificate, masters a client certificate. This crate
//! makes them, in memory for tests of other crates and on disk for the
//! `nixq-certs` command.
//!
//! # Layout
//!
//! | module      | owns                                                              | I/O?  |
//! |-------------|-------------------------------------------------------------------|-------|
//! | [`issue`]   | [`Ca`], [`Leaf`], [`Validity`]: generating and signing; name rules | pure  |
//! | [`inspect`] | [`CertInfo`]: subject, SANs, role, validity, fingerprint (`show`) | pure  |
//! | [`bundle`]  | [`Bundle`]: the per-host tar and its example configs              | pure  |
//! | [`pem`]     | certificates out of PEM text                                      | pure  |
//! | [`files`]   | [`PkiDir`] layout; 0600 keys, no silent overwrite                 | files |
//! | [`pki`]     | the commands `init`, `issue`, `bundle` over a [`PkiDir`]          | files |
//!
//! # Using it from tests
//!
//! ```
//! use nixq_certs::{Ca, Validity};
//! let ca = Ca::generate("test CA", Validity::days_from_now(1)?)?;
//! let agent = ca.issue_agent("s1", &[], &["127.0.0.1".parse()?], Validity::days_from_now(1)?)?;
//! let master = ca.issue_master("m1", Validity::days_from_now(1)?)?;
//! assert!(agent.cert_pem.contains("BEGIN CERTIFICATE") && master.key_pem.contains("PRIVATE KEY"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bundle;
mod error;
pub mod files;
pub mod inspect;
pub mod issue;
pub mod pem;
pub mod pki;

pub use bundle::{Bundle, HostRole, DEFAULT_AGENT_PORT};
pub use error::CertsError;
pub use files::{Overwrite, PkiDir};
pub use inspect::{CertInfo, Role};
pub use issue::{check_dns_name, check_name, Ca, Leaf, Validity};
