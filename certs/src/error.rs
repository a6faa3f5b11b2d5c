//! The one error type of the certs library: every variant names the input
//! (a name, a file) and what was wrong with it.

use std::io;
use std::path::PathBuf;

/// What went wrong while making, reading or writing certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    /// A host name given for a certificate (agent or master) is not usable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    /// A `--dns` value is not a valid DNS name.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidDnsName { name: String, reason: &'static str },

    /// The requested validity period cannot be encoded or is empty.
    #[error("invalid validity period: {0}")]
    InvalidValidity(&'static str),

    /// rcgen refused to build or sign a certificate.
    #[error("cannot {action}: {source}")]
    Generate {
        action: &'static str,
        #[source]
        source: rcgen::Error,
    },

    /// A PEM input (a file, or text handed to the library) is unusable.
    #[error("{origin}: {problem}")]
    BadPem { origin: String, problem: String },

    /// The CA key does not belong to the CA certificate.
    #[error("{key_origin} is not the private key of the certificate in {cert_origin}")]
    KeyMismatch {
        cert_origin: String,
        key_origin: String,
    },

    /// A certificate given as the CA is not a CA certificate.
    #[error("{origin}: not a CA certificate (no basicConstraints CA:TRUE); give the ca.crt made by `nixq-certs init`")]
    NotCa { origin: String },

    /// The destination exists and overwriting was not asked for.
    #[error("refusing to overwrite {}: it already exists (--force replaces it)", path.display())]
    Exists { path: PathBuf },

    /// A file-system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A file is larger than any certificate or key file can be.
    #[error("{}: {size} bytes is too large for a certificate or key file (limit {limit})", path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },

    /// `bundle NAME` found no certificate for NAME, or found two.
    #[error("{0}")]
    Bundle(String),
}

impl CertsError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_pem(origin: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::BadPem {
            origin: origin.into(),
            problem: problem.into(),
        }
    }
}
