//! Reading a certificate back: what `nixq-certs show` prints.
//!
//! Pure: [`CertInfo::from_pem`] takes bytes, and [`CertInfo::render`] takes
//! "now" as an argument.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::time::ASN1Time;

use crate::pem::certificates_der;
use crate::CertsError;

/// What a certificate is for, as nixq sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A CA certificate (basicConstraints CA:TRUE).
    Ca,
    /// Server auth only: an agent.
    Agent,
    /// Client auth only: a master.
    Master,
    /// Anything else (both EKUs, none, or other purposes): not made by nixq-certs.
    Other,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ca => "CA",
            Self::Agent => "agent (TLS server)",
            Self::Master => "master (TLS client)",
            Self::Other => "other (not a nixq role)",
        })
    }
}

/// The facts of one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject, as `CN=…`.
    pub subject: String,
    /// Issuer, as `CN=…`.
    pub issuer: String,
    /// The first CN of the subject, if any.
    pub common_name: Option<String>,
    /// Subject alternative names as `DNS:name` / `IP:addr`.
    pub sans: Vec<String>,
    /// Extended key usages by name (`serverAuth`, `clientAuth`, …).
    pub ekus: Vec<String>,
    /// The role those extensions give it.
    pub role: Role,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number, colon-separated hex.
    pub serial: String,
    /// SHA-256 of the DER certificate, colon-separated upper-case hex (the
    /// form `openssl x509 -fingerprint -sha256` prints).
    pub sha256: String,
}

impl CertInfo {
    /// The facts of the first certificate of a PEM text.
    pub fn from_pem(pem: &[u8], origin: &str) -> Result<Self, CertsError> {
        let ders = certificates_der(pem, origin)?;
        let Some(der) = ders.first() else {
            return Err(CertsError::bad_pem(origin, "no certificate"));
        };
        Self::from_der(der, origin)
    }

    /// The facts of one DER certificate.
    pub fn from_der(der: &[u8], origin: &str) -> Result<Self, CertsError> {
        let bad = |problem: String| CertsError::bad_pem(origin, problem);
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| bad(format!("not a valid X.509 certificate: {e}")))?;

        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);

        let mut sans = Vec::new();
        let san_ext = cert
            .subject_alternative_name()
            .map_err(|e| bad(format!("bad subjectAltName extension: {e}")))?;
        for name in san_ext.iter().flat_map(|ext| &ext.value.general_names) {
            sans.push(match name {
                GeneralName::DNSName(d) => format!("DNS:{d}"),
                GeneralName::IPAddress(bytes) => format!("IP:{}", ip_text(bytes)),
                other => format!("{other:?}"),
            });
        }

        let eku_ext = cert
            .extended_key_usage()
            .map_err(|e| bad(format!("bad extendedKeyUsage extension: {e}")))?;
        let mut ekus = Vec::new();
        let (mut server, mut client, mut others) = (false, false, false);
        if let Some(ext) = eku_ext {
            let eku = ext.value;
            let named = [
                (eku.any, "any"),
                (eku.server_auth, "serverAuth"),
                (eku.client_auth, "clientAuth"),
                (eku.code_signing, "codeSigning"),
                (eku.email_protection, "emailProtection"),
                (eku.time_stamping, "timeStamping"),
                (eku.ocsp_signing, "OCSPSigning"),
            ];
            ekus.extend(
                named
                    .iter()
                    .filter(|(set, _)| *set)
                    .map(|(_, n)| (*n).to_owned()),
            );
            ekus.extend(eku.other.iter().map(|oid| oid.to_id_string()));
            server = eku.server_auth;
            client = eku.client_auth;
            others = eku.any || ekus.len() > usize::from(server) + usize::from(client);
        }
        let role = match (cert.is_ca(), server, client, others) {
            (true, ..) => Role::Ca,
            (false, true, false, false) => Role::Agent,
            (false, false, true, false) => Role::Master,
            _ => Role::Other,
        };

        let validity = cert.validity();
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            common_name,
            sans,
            ekus,
            role,
            not_before: to_system_time(validity.not_before),
            not_after: to_system_time(validity.not_after),
            serial: colon_hex(cert.raw_serial()),
            sha256: colon_hex(&Sha256::digest(der)),
        })
    }

    /// Whether `now` lies within the validity period.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// The human report `nixq-certs show` prints.
    pub fn render(&self, now: SystemTime) -> String {
        let mut out = String::new();
        let none = || "(none)".to_owned();
        let sans = if self.sans.is_empty() {
            none()
        } else {
            self.sans.join(", ")
        };
        let ekus = if self.ekus.is_empty() {
            none()
        } else {
            self.ekus.join(", ")
        };
        let status = if now < self.not_before {
            format!("NOT YET VALID (starts in {})", human(self.not_before, now))
        } else if now > self.not_after {
            format!("EXPIRED {} ago", human(now, self.not_after))
        } else {
            format!("valid, expires in {}", human(self.not_after, now))
        };
        // Writing into a String cannot fail.
        let _ = writeln!(out, "subject:     {}", self.subject);
        let _ = writeln!(out, "issuer:      {}", self.issuer);
        let _ = writeln!(out, "role:        {}", self.role);
        let _ = writeln!(out, "key usage:   {ekus}");
        let _ = writeln!(out, "SANs:        {sans}");
        let _ = writeln!(out, "not before:  {}", utc_text(self.not_before));
        let _ = writeln!(out, "not after:   {}", utc_text(self.not_after));
        let _ = writeln!(out, "status:      {status}");
        let _ = writeln!(out, "serial:      {}", self.serial);
        let _ = writeln!(out, "SHA-256:     {}", self.sha256);
        out
    }
}

fn ip_text(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(bytes);
            IpAddr::from(a).to_string()
        }
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(bytes);
            IpAddr::from(a).to_string()
        }
        _ => format!("<{} bytes>", bytes.len()),
    }
}

fn to_system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

fn utc_text(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    match ASN1Time::from_timestamp(secs) {
        Ok(t) => {
            let dt = t.to_datetime();
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                dt.year(),
                u8::from(dt.month()),
                dt.day(),
                dt.hour(),
                dt.minute(),
                dt.second()
            )
        }
        Err(_) => format!("{secs} seconds since 1970"),
    }
}

/// `later - earlier` in days, hours or minutes, whichever reads best.
fn human(later: SystemTime, earlier: SystemTime) -> String {
    let secs = later.duration_since(earlier).unwrap_or_default().as_secs();
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3_600 => format!("{} hours", s / 3_600),
        s => format!("{} minutes", s / 60),
    }
}

fn colon_hex(bytes: &[u8]) -> String {
    let hex = data_encoding::HEXUPPER.encode(bytes);
    let mut out = String::with_capacity(hex.len() * 3 / 2);
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.extend(pair.iter().map(|&b| char::from(b)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::{Ca, Validity};

    #[test]
    fn render_reports_status_and_fingerprint() {
        let ca = Ca::generate("CA", Validity::days_from_now(30).expect("v")).expect("ca");
        let info = CertInfo::from_pem(ca.cert_pem().as_bytes(), "ca").expect("info");
        let now = SystemTime::now();
        let text = info.render(now);
        assert!(text.contains("role:        CA"), "{text}");
        assert!(text.contains("valid, expires in 29 days"), "{text}");
        assert_eq!(info.sha256.len(), 32 * 3 - 1);

        let later = now + Duration::from_secs(40 * 86_400);
        let expired = info.render(later);
        assert!(
            expired.contains("status:      EXPIRED 10 days ago"),
            "{expired}"
        );
        let earlier = now - Duration::from_secs(3 * 86_400);
        assert!(info.render(earlier).contains("NOT YET VALID"));
    }

    #[test]
    fn fingerprint_is_sha256_of_der() {
        let ca = Ca::generate("CA", Validity::days_from_now(1).expect("v")).expect("ca");
        let ders = certificates_der(ca.cert_pem().as_bytes(), "ca").expect("der");
        let info = CertInfo::from_der(&ders[0], "ca").expect("info");
        assert_eq!(
            info.sha256.replace(':', ""),
            data_encoding::HEXUPPER.encode(&Sha256::digest(&ders[0]))
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(colon_hex(&[0x01, 0xab]), "01:AB");
        assert_eq!(ip_text(&[10, 0, 0, 1]), "10.0.0.1");
        assert_eq!(
            utc_text(UNIX_EPOCH + Duration::from_secs(86_400)),
            "1970-01-02 00:00:00 UTC"
        );
        assert!(CertInfo::from_der(b"\x30\x03junk", "j").is_err());
    }
}
