//! Mutual TLS between master and agent: rustls configurations built from PEM
//! files, and the peer's name after the handshake.
//!
//! DESIGN.md, "Transport and security": the agent presents a server
//! certificate, the master a client certificate, both signed by the
//! deployment's CA (made by `nixq-certs`), and both sides verify.
//!
//! - **TLS 1.3 only**, as QUIC requires (RFC 9001 §4.2), with the *ring*
//!   provider named explicitly: nothing depends on a process-wide default.
//! - **ALPN [`ALPN`]** on both sides, so a non-nixq QUIC peer is refused in
//!   the handshake.
//! - **Roles by extended key usage.** webpki accepts a server certificate
//!   only with serverAuth and a client certificate only with clientAuth, and
//!   `nixq-certs` gives agents only the first and masters only the second:
//!   a stolen agent key cannot act as a master, nor a master key as an agent.
//! - **The master checks the agent's name**: the host of the `nixq://host`
//!   URI must be a SAN of the agent's certificate (DNS name or IP address).
//!   The agent may restrict masters by the CN of their certificate
//!   ([`peer_common_name`]).
//! - **No session resumption and no 0-RTT**: every connection checks the
//!   peer's certificate (expiry included) in a full handshake, and no
//!   request can be replayed. Connections are long-lived (one per master
//!   process and agent), so a full handshake is a negligible cost.
//!
//! # Identity files
//!
//! A host's identity is its certificate and private key, in PEM. They may be
//! one file (certificate blocks, then a `PRIVATE KEY` block: the
//! `master.pem` of a `nixq-certs bundle`, and what the machines file's
//! identity column names) or two: when the certificate file holds no key and
//! no key file is named, the key is read from the file beside it with the
//! extension `.key` (`agent.crt` → `agent.key`, `master.pem` → `master.key`).
//!
//! Every error names the file and what was wrong with it.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The ALPN protocol of nixq's wire protocol, version 1. A new
/// incompatible protocol gets a new ALPN, so old and new peers refuse each
/// other in the handshake with a clear "no application protocol" alert.
pub const ALPN: &[u8] = b"nixq/1";

/// No certificate, key or CA file is anywhere near this large; the cap
/// keeps a wrong path (a disk image, `/dev/zero`) from being read into memory.
pub const MAX_PEM_FILE: u64 = 1024 * 1024;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// Which file this was ("CA certificate", "certificate", "private key").
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file is larger than any PEM file nixq uses.
    #[error("{what} {}: larger than {MAX_PEM_FILE} bytes, not a PEM file", path.display())]
    TooLarge { what: &'static str, path: PathBuf },
    /// A PEM text is malformed.
    #[error("{what} {origin}: malformed PEM: {problem}")]
    Pem {
        what: &'static str,
        origin: String,
        problem: String,
    },
    /// No `CERTIFICATE` block where one was needed.
    #[error(
        "{what} {origin}: no certificate found (expected a \"-----BEGIN CERTIFICATE-----\" block)"
    )]
    NoCertificate { what: &'static str, origin: String },
    /// The identity has a certificate but no private key anywhere.
    #[error("{origin}: no private key in this file, and no key file {} beside it", beside.display())]
    NoKey { origin: String, beside: PathBuf },
    /// A key file holds no private key.
    #[error("private key {origin}: no private key found (expected a \"-----BEGIN PRIVATE KEY-----\" block)")]
    NoKeyInFile { origin: String },
    /// A CA certificate was not accepted as a trust anchor.
    #[error("CA certificate {origin}: unusable as a trust anchor: {source}")]
    BadCa {
        origin: String,
        #[source]
        source: rustls::Error,
    },
    /// The key does not belong to the certificate, or is of an unsupported kind.
    #[error("identity {origin}: the certificate and private key do not go together: {source}")]
    BadIdentity {
        origin: String,
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the configuration (a bug, not a user error).
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// A certificate chain and its private key: who this host is.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    origin: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("origin", &self.origin)
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads an identity: the certificate chain from `cert`, the key from
    /// `key` if given, else from `cert` itself, else from `cert` with the
    /// extension `.key` (see the module doc).
    pub fn load(cert: &Path, key: Option<&Path>) -> Result<Self, TlsError> {
        let cert_pem = read_pem_file(cert, "certificate")?;
        let cert_origin = cert.display().to_string();
        let chain = certificates(&cert_pem, "certificate", &cert_origin)?;
        let (key, origin) = match key {
            Some(key_path) => {
                let key_pem = read_pem_file(key_path, "private key")?;
                let key_origin = key_path.display().to_string();
                let der =
                    private_key(&key_pem, &key_origin)?.ok_or_else(|| TlsError::NoKeyInFile {
                        origin: key_origin.clone(),
                    })?;
                (der, format!("{cert_origin} + {key_origin}"))
            }
            None => match private_key(&cert_pem, &cert_origin)? {
                Some(der) => (der, cert_origin),
                None => {
                    let beside = cert.with_extension("key");
                    if beside == cert {
                        return Err(TlsError::NoKey {
                            origin: cert_origin,
                            beside,
                        });
                    }
                    let key_pem = match read_pem_file(&beside, "private key") {
                        Err(TlsError::Read { source, .. })
                            if source.kind() == io::ErrorKind::NotFound =>
                        {
                            return Err(TlsError::NoKey {
                                origin: cert_origin,
                                beside,
                            })
                        }
                        other => other?,
                    };
                    let key_origin = beside.display().to_string();
                    let der = private_key(&key_pem, &key_origin)?.ok_or_else(|| {
                        TlsError::NoKeyInFile {
                            origin: key_origin.clone(),
                        }
                    })?;
                    (der, format!("{cert_origin} + {key_origin}"))
                }
            },
        };
        Ok(Self { chain, key, origin })
    }

    /// An identity from PEM text (certificate chain, then key); `origin`
    /// names it in errors.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], origin: &str) -> Result<Self, TlsError> {
        let chain = certificates(cert_pem, "certificate", origin)?;
        let key = private_key(key_pem, origin)?.ok_or_else(|| TlsError::NoKeyInFile {
            origin: origin.to_owned(),
        })?;
        Ok(Self {
            chain,
            key,
            origin: origin.to_owned(),
        })
    }

    /// Where this identity came from (file names), for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The CN of the identity's own certificate, if it has one.
    pub fn common_name(&self) -> Option<String> {
        self.chain.first().and_then(common_name_of)
    }
}

/// The deployment CA: the only issuer whose certificates a peer may present.
#[derive(Clone, Debug)]
pub struct TrustedCa {
    roots: Arc<RootCertStore>,
    origin: String,
}

impl TrustedCa {
    /// Reads the CA certificate(s) from a PEM file. Several certificates are
    /// all trusted (useful while a CA is being replaced).
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let pem = read_pem_file(path, "CA certificate")?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// The CA from PEM text (e.g. the machines file's CA column); `origin`
    /// names it in errors.
    pub fn from_pem(pem: &[u8], origin: &str) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for der in certificates(pem, "CA certificate", origin)? {
            roots.add(der).map_err(|source| TlsError::BadCa {
                origin: origin.to_owned(),
                source,
            })?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            origin: origin.to_owned(),
        })
    }

    /// Where this CA came from, for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// The crypto provider of every nixq TLS configuration: *ring*, named
/// explicitly so no process-wide default is needed or consulted.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's TLS configuration: present `identity`, require a client
/// certificate signed by `ca` with the clientAuth usage, speak [`ALPN`].
pub fn server_config(ca: &TrustedCa, identity: Identity) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(ca.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier for {}: {e}", ca.origin)))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)
        .map_err(|source| TlsError::BadIdentity {
            origin: identity.origin,
            source,
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption (see the module doc): no tickets, no session cache.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// The master's TLS configuration: present `identity`, accept only a server
/// certificate signed by `ca` with the serverAuth usage, for the server name
/// given when connecting, speaking [`ALPN`].
pub fn client_config(ca: &TrustedCa, identity: Identity) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(ca.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(format!("server verifier for {}: {e}", ca.origin)))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(identity.chain, identity.key)
        .map_err(|source| TlsError::BadIdentity {
            origin: identity.origin,
            source,
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_early_data = false;
    Ok(Arc::new(config))
}

/// Why the peer's name could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerNameError {
    /// The peer presented no certificate (impossible on a nixq server
    /// endpoint, which requires one).
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The certificate has no usable CN.
    #[error("the peer's certificate has no common name (CN)")]
    NoCommonName,
}

/// The CN of the certificate the peer of `conn` presented (a master's name,
/// as issued by `nixq-certs issue master NAME`). The certificate was already
/// verified by the handshake; this only reads it.
pub fn peer_common_name(conn: &quinn::Connection) -> Result<String, PeerNameError> {
    let identity = conn.peer_identity().ok_or(PeerNameError::NoCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| PeerNameError::NoCertificate)?;
    let leaf = chain.first().ok_or(PeerNameError::NoCertificate)?;
    common_name_of(leaf).ok_or(PeerNameError::NoCommonName)
}

/// The first CN of a DER certificate's subject, if it parses and has one.
pub fn common_name_of(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Reads a PEM file of at most [`MAX_PEM_FILE`] bytes.
fn read_pem_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let read_err = |source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(TlsError::TooLarge {
            what,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

fn pem_error(what: &'static str, origin: &str, e: pem::Error) -> TlsError {
    TlsError::Pem {
        what,
        origin: origin.to_owned(),
        problem: e.to_string(),
    }
}

/// Every `CERTIFICATE` block, in order; at least one.
fn certificates(
    pem: &[u8],
    what: &'static str,
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, origin, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            origin: origin.to_owned(),
        });
    }
    Ok(chain)
}

/// The first private key block (PKCS#8, PKCS#1 or SEC1), if any.
fn private_key(pem: &[u8], origin: &str) -> Result<Option<PrivateKeyDer<'static>>, TlsError> {
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(key) => Ok(Some(key)),
        Err(pem::Error::NoItemsFound) => Ok(None),
        Err(e) => Err(pem_error("private key", origin, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixq_certs::{Ca, Validity};

    fn pki() -> (Ca, nixq_certs::Leaf, nixq_certs::Leaf) {
        let v = || Validity::days_from_now(1).expect("validity");
        let ca = Ca::generate("unit CA", v()).expect("ca");
        let agent = ca.issue_agent("s1", &[], &[], v()).expect("agent");
        let master = ca.issue_master("m1", v()).expect("master");
        (ca, agent, master)
    }

    #[test]
    fn identity_from_combined_file_from_sibling_key_and_from_two_files() {
        let (_, agent, master) = pki();
        let dir = tempfile::tempdir().expect("tempdir");

        let combined = dir.path().join("master.pem");
        std::fs::write(&combined, master.combined_pem()).expect("write");
        let id = Identity::load(&combined, None).expect("combined");
        assert_eq!(id.common_name().as_deref(), Some("m1"));

        let crt = dir.path().join("agent.crt");
        std::fs::write(&crt, &agent.cert_pem).expect("write");
        std::fs::write(dir.path().join("agent.key"), &agent.key_pem).expect("write");
        let id = Identity::load(&crt, None).expect("sibling key");
        assert_eq!(id.common_name().as_deref(), Some("s1"));
        assert!(id.origin().ends_with("agent.key"), "{}", id.origin());

        let other_key = dir.path().join("elsewhere.pem");
        std::fs::write(&other_key, &agent.key_pem).expect("write");
        Identity::load(&crt, Some(&other_key)).expect("explicit key");
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let (_, agent, master) = pki();
        let dir = tempfile::tempdir().expect("tempdir");

        let missing = dir.path().join("missing.crt");
        let err = Identity::load(&missing, None).expect_err("missing");
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.crt"), "{err}");

        let lonely = dir.path().join("lonely.crt");
        std::fs::write(&lonely, &agent.cert_pem).expect("write");
        let err = Identity::load(&lonely, None).expect_err("no key");
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
        assert!(err.to_string().contains("lonely.key"), "{err}");

        let key_only = dir.path().join("key-only.pem");
        std::fs::write(&key_only, &agent.key_pem).expect("write");
        let err = Identity::load(&key_only, None).expect_err("no cert");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("key-only.pem"), "{err}");

        let not_key = dir.path().join("not-a-key.pem");
        std::fs::write(&not_key, &agent.cert_pem).expect("write");
        let err = Identity::load(&lonely, Some(&not_key)).expect_err("no key in key file");
        assert!(matches!(err, TlsError::NoKeyInFile { .. }), "{err}");

        let broken = dir.path().join("broken.crt");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let err = TrustedCa::load(&broken).expect_err("malformed");
        assert!(matches!(err, TlsError::Pem { .. }), "{err}");
        assert!(err.to_string().contains("broken.crt"), "{err}");

        let huge = dir.path().join("huge.crt");
        std::fs::write(&huge, vec![b'-'; MAX_PEM_FILE as usize + 1]).expect("write");
        assert!(matches!(
            TrustedCa::load(&huge),
            Err(TlsError::TooLarge { .. })
        ));

        // A key that belongs to another certificate is refused when the
        // configuration is built, naming the files.
        let (ca, ..) = pki();
        let ca = TrustedCa::from_pem(ca.cert_pem().as_bytes(), "ca.crt").expect("ca");
        let mixed = Identity::from_pem(
            agent.cert_pem.as_bytes(),
            master.key_pem.as_bytes(),
            "mixed",
        )
        .expect("parses");
        let err = server_config(&ca, mixed).expect_err("mismatch");
        assert!(matches!(err, TlsError::BadIdentity { .. }), "{err}");
        assert!(err.to_string().contains("mixed"), "{err}");
    }

    #[test]
    fn configs_are_tls13_with_alpn_and_no_resumption() {
        let (ca, agent, master) = pki();
        let ca = TrustedCa::from_pem(ca.cert_pem().as_bytes(), "ca").expect("ca");
        let server = server_config(
            &ca,
            Identity::from_pem(agent.cert_pem.as_bytes(), agent.key_pem.as_bytes(), "a")
                .expect("id"),
        )
        .expect("server config");
        assert_eq!(server.alpn_protocols, [ALPN.to_vec()]);
        assert_eq!(server.send_tls13_tickets, 0);
        let client = client_config(
            &ca,
            Identity::from_pem(master.cert_pem.as_bytes(), master.key_pem.as_bytes(), "m")
                .expect("id"),
        )
        .expect("client config");
        assert_eq!(client.alpn_protocols, [ALPN.to_vec()]);
        assert!(client
            .crypto_provider()
            .cipher_suites
            .iter()
            .any(|s| s.version() == &rustls::version::TLS13));
    }
}
