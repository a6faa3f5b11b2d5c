//! Making certificates: the deployment CA and the two kinds of leaf.
//!
//! | role   | basic constraints | key usage                 | extended key usage | subject / SANs                       |
//! |--------|-------------------|---------------------------|--------------------|--------------------------------------|
//! | CA     | CA, path length 0 | keyCertSign, cRLSign      | none               | CN = the given CA name               |
//! | agent  | not a CA          | digitalSignature          | serverAuth only    | CN = name; SANs = `--dns`, `--ip`    |
//! | master | not a CA          | digitalSignature          | clientAuth only    | CN = name; SAN DNS = name            |
//!
//! The EKUs are what keep the roles apart: rustls/webpki accept a server
//! certificate only with serverAuth and a client certificate only with
//! clientAuth, so an agent's certificate cannot act as a master and vice
//! versa. The agent restricts masters by the CN.
//!
//! Keys are ECDSA P-256: fast handshakes and supported by every rustls
//! provider. Everything here is in memory; files are [`crate::files`]'s job.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::time::ASN1Time;

use crate::pem::certificates_der;
use crate::CertsError;

/// How far back `not_before` is set from "now": hosts whose clocks lag the
/// issuing machine's by up to this much still accept a fresh certificate.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60 * 60);

/// One day, the unit of `--days`.
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The longest host name a certificate CN may carry: X.520 caps
/// `commonName` at 64 characters.
const MAX_NAME_LEN: usize = 64;

/// The longest DNS name (RFC 1035 §2.3.4, textual form without the root dot).
const MAX_DNS_NAME_LEN: usize = 253;

/// The longest DNS label (RFC 1035 §2.3.4).
const MAX_DNS_LABEL_LEN: usize = 63;

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Validity {
    /// Valid from now (less [`CLOCK_SKEW_ALLOWANCE`]) for `days` days.
    pub fn days_from_now(days: u32) -> Result<Self, CertsError> {
        if days == 0 {
            return Err(CertsError::InvalidValidity(
                "the number of days must be at least 1",
            ));
        }
        let now = SystemTime::now();
        let not_after = now
            .checked_add(DAY * days)
            .ok_or(CertsError::InvalidValidity(
                "the number of days is too large",
            ))?;
        let not_before = now.checked_sub(CLOCK_SKEW_ALLOWANCE).unwrap_or(now);
        Self::between(not_before, not_after)
    }

    /// Valid exactly from `not_before` to `not_after`. Either may lie in the
    /// past, which is how tests make an already-expired certificate.
    pub fn between(not_before: SystemTime, not_after: SystemTime) -> Result<Self, CertsError> {
        if not_after <= not_before {
            return Err(CertsError::InvalidValidity(
                "not_after must be later than not_before",
            ));
        }
        Ok(Self {
            not_before,
            not_after,
        })
    }

    /// Start of the period.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the period.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    fn apply(&self, params: &mut CertificateParams) -> Result<(), CertsError> {
        params.not_before = to_asn1(self.not_before)?.to_datetime();
        params.not_after = to_asn1(self.not_after)?.to_datetime();
        Ok(())
    }
}

fn to_asn1(t: SystemTime) -> Result<ASN1Time, CertsError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CertsError::InvalidValidity("dates before 1970 are not supported"))?
        .as_secs();
    let secs = i64::try_from(secs)
        .map_err(|_| CertsError::InvalidValidity("date too far in the future"))?;
    ASN1Time::from_timestamp(secs)
        .map_err(|_| CertsError::InvalidValidity("date cannot be represented in a certificate"))
}

/// A leaf certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Leaf {
    /// The certificate (one `CERTIFICATE` block).
    pub cert_pem: String,
    /// The PKCS#8 private key (one `PRIVATE KEY` block). Secret.
    pub key_pem: String,
}

impl Leaf {
    /// Certificate then key in one PEM text: the master's identity file
    /// (`master.pem`) that the machines file names.
    pub fn combined_pem(&self) -> String {
        let mut out = String::with_capacity(self.cert_pem.len() + self.key_pem.len() + 1);
        out.push_str(&self.cert_pem);
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&self.key_pem);
        out
    }
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<secret>")
            .finish()
    }
}

/// The deployment CA: its certificate, its key, and the ability to sign.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<secret>")
            .finish()
    }
}

impl Ca {
    /// A new self-signed CA named `common_name`, with a fresh key.
    ///
    /// The CA may sign leaves only (path length 0): nixq has no use for
    /// intermediate CAs, and forbidding them limits what a leaked leaf key
    /// could ever do.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, CertsError> {
        check_ca_name(common_name)?;
        let key = KeyPair::generate().map_err(|source| CertsError::Generate {
            action: "generate the CA key",
            source,
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity.apply(&mut params)?;
        let cert = params
            .self_signed(&key)
            .map_err(|source| CertsError::Generate {
                action: "self-sign the CA certificate",
                source,
            })?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem,
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA from its certificate and key (the contents of `ca.crt` and
    /// `ca.key`). Checks that the certificate is a CA and the key is its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertsError> {
        Self::from_pem_named(cert_pem, "CA certificate", key_pem, "CA key")
    }

    /// As [`Ca::from_pem`], with the origins (file names) that errors name.
    pub fn from_pem_named(
        cert_pem: &str,
        cert_origin: &str,
        key_pem: &str,
        key_origin: &str,
    ) -> Result<Self, CertsError> {
        let ders = certificates_der(cert_pem.as_bytes(), cert_origin)?;
        let [der] = ders.as_slice() else {
            return Err(CertsError::bad_pem(
                cert_origin,
                format!("expected exactly one certificate, found {}", ders.len()),
            ));
        };
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
            CertsError::bad_pem(cert_origin, format!("not a valid X.509 certificate: {e}"))
        })?;
        if !cert.is_ca() {
            return Err(CertsError::NotCa {
                origin: cert_origin.to_owned(),
            });
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            CertsError::bad_pem(key_origin, format!("not a usable PEM private key: {e}"))
        })?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertsError::KeyMismatch {
                cert_origin: cert_origin.to_owned(),
                key_origin: key_origin.to_owned(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).map_err(|source| {
            CertsError::Generate {
                action: "use the CA certificate as an issuer",
                source,
            }
        })?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate, PEM (what every host gets as `ca.crt`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM. Secret: stays on the machine that issues.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A server certificate for the agent `name`.
    ///
    /// The master checks the agent's certificate against the host part of
    /// the `nixq://host` URI, so the SANs must cover every name and address
    /// masters use for it. With no `dns` and no `ips`, the SAN is the DNS
    /// name `name` itself.
    pub fn issue_agent(
        &self,
        name: &str,
        dns: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<Leaf, CertsError> {
        check_name(name)?;
        let mut sans = Vec::with_capacity(dns.len() + ips.len());
        for d in dns {
            check_dns_name(d)?;
            sans.push(SanType::DnsName(ia5(d)?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        if sans.is_empty() {
            sans.push(SanType::DnsName(ia5(name)?));
        }
        self.issue_leaf(name, sans, ExtendedKeyUsagePurpose::ServerAuth, validity)
    }

    /// A client certificate for the master `name` (the CN agents restrict by).
    pub fn issue_master(&self, name: &str, validity: Validity) -> Result<Leaf, CertsError> {
        check_name(name)?;
        let sans = vec![SanType::DnsName(ia5(name)?)];
        self.issue_leaf(name, sans, ExtendedKeyUsagePurpose::ClientAuth, validity)
    }

    fn issue_leaf(
        &self,
        name: &str,
        sans: Vec<SanType>,
        eku: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<Leaf, CertsError> {
        // Every leaf gets a fresh key. rcgen derives the serial number from
        // a hash of that key, so serials never repeat.
        let key = KeyPair::generate().map_err(|source| CertsError::Generate {
            action: "generate a key",
            source,
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        validity.apply(&mut params)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CertsError::Generate {
                action: "sign the certificate",
                source,
            })?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn common_name_dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String, CertsError> {
    rcgen::string::Ia5String::try_from(s).map_err(|_| CertsError::InvalidDnsName {
        name: s.to_owned(),
        reason: "not ASCII",
    })
}

/// Checks a host name used as a certificate CN and as a file name
/// (`agents/NAME.crt`): a DNS name of at most 64 characters, so it is safe
/// in a path, fits a CN, and can also be a SAN.
pub fn check_name(name: &str) -> Result<(), CertsError> {
    if name.len() > MAX_NAME_LEN {
        return Err(CertsError::InvalidName {
            name: name.to_owned(),
            reason: "longer than 64 characters",
        });
    }
    check_dns_name(name).map_err(|e| match e {
        CertsError::InvalidDnsName { reason, .. } => CertsError::InvalidName {
            name: name.to_owned(),
            reason,
        },
        other => other,
    })
}

/// Checks a DNS name: dot-separated labels of ASCII letters, digits and
/// hyphens, no label empty, longer than 63 or starting or ending with a
/// hyphen (RFC 1035 §2.3.1 with RFC 1123's leading digits). No wildcards:
/// a certificate names one agent.
pub fn check_dns_name(name: &str) -> Result<(), CertsError> {
    let fail = |reason| {
        Err(CertsError::InvalidDnsName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("empty");
    }
    if name.len() > MAX_DNS_NAME_LEN {
        return fail("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return fail("empty label (leading, trailing or double dot)");
        }
        if label.len() > MAX_DNS_LABEL_LEN {
            return fail("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return fail("only ASCII letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return fail("a label starts or ends with '-'");
        }
    }
    Ok(())
}

/// The CA's own name: free text for humans (`nixq-certs show` prints it),
/// printable ASCII, at most 64 characters.
fn check_ca_name(name: &str) -> Result<(), CertsError> {
    let fail = |reason| {
        Err(CertsError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.trim().is_empty() {
        return fail("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("longer than 64 characters");
    }
    if !name.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return fail("only printable ASCII is allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::{CertInfo, Role};

    fn days(n: u32) -> Validity {
        Validity::days_from_now(n).expect("validity")
    }

    #[test]
    fn names_follow_dns_rules() {
        for ok in ["s1", "build-01", "a.b.example", "0day", &"a".repeat(63)] {
            check_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            ".",
            "a..b",
            "-a",
            "a-",
            "a_b",
            "../x",
            "a/b",
            "é",
            "a b",
            ".hidden",
            &"a".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_dns_name("*.example.org").is_err());
    }

    #[test]
    fn validity_rejects_empty_periods() {
        let now = SystemTime::now();
        assert!(Validity::between(now, now).is_err());
        assert!(Validity::days_from_now(0).is_err());
        let v = days(2);
        assert!(v.not_before() < now && v.not_after() > now);
    }

    #[test]
    fn ca_and_leaves_carry_their_roles() {
        let ca = Ca::generate("test CA", days(10)).expect("ca");
        let agent = ca
            .issue_agent(
                "s1",
                &["s1.example".to_owned()],
                &["10.0.0.1".parse().expect("ip")],
                days(1),
            )
            .expect("agent");
        let master = ca.issue_master("m1", days(1)).expect("master");

        let now = SystemTime::now();
        let ca_info = CertInfo::from_pem(ca.cert_pem().as_bytes(), "ca").expect("ca info");
        assert_eq!(ca_info.role, Role::Ca);
        assert_eq!(ca_info.subject, "CN=test CA");

        let a = CertInfo::from_pem(agent.cert_pem.as_bytes(), "agent").expect("agent info");
        assert_eq!(a.role, Role::Agent);
        assert_eq!(a.subject, "CN=s1");
        assert_eq!(a.issuer, "CN=test CA");
        assert_eq!(a.sans, ["DNS:s1.example", "IP:10.0.0.1"]);
        assert!(a.is_valid_at(now));

        let m = CertInfo::from_pem(master.cert_pem.as_bytes(), "master").expect("master info");
        assert_eq!(m.role, Role::Master);
        assert_eq!(m.common_name.as_deref(), Some("m1"));
        assert_eq!(m.sans, ["DNS:m1"]);
    }

    #[test]
    fn agent_without_sans_gets_its_name() {
        let ca = Ca::generate("c", days(1)).expect("ca");
        let a = ca.issue_agent("s2", &[], &[], days(1)).expect("agent");
        let info = CertInfo::from_pem(a.cert_pem.as_bytes(), "a").expect("info");
        assert_eq!(info.sans, ["DNS:s2"]);
    }

    #[test]
    fn expired_certificates_can_be_made() {
        let ca = Ca::generate("c", days(1)).expect("ca");
        let now = SystemTime::now();
        let past = Validity::between(now - DAY * 3, now - DAY).expect("validity");
        let m = ca.issue_master("old", past).expect("master");
        let info = CertInfo::from_pem(m.cert_pem.as_bytes(), "m").expect("info");
        assert!(!info.is_valid_at(now));
    }

    #[test]
    fn ca_round_trips_through_pem_and_still_signs() {
        let ca = Ca::generate("round trip", days(1)).expect("ca");
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem()).expect("reload");
        let leaf = again.issue_master("m", days(1)).expect("issue");
        let info = CertInfo::from_pem(leaf.cert_pem.as_bytes(), "m").expect("info");
        assert_eq!(info.issuer, "CN=round trip");
    }

    #[test]
    fn ca_from_pem_rejects_wrong_key_and_non_ca() {
        let ca = Ca::generate("one", days(1)).expect("ca");
        let other = Ca::generate("two", days(1)).expect("ca");
        let err = Ca::from_pem_named(ca.cert_pem(), "ca.crt", other.key_pem(), "ca.key")
            .expect_err("mismatch");
        assert!(matches!(err, CertsError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("ca.key"));

        let leaf = ca.issue_master("m", days(1)).expect("leaf");
        let err = Ca::from_pem(&leaf.cert_pem, &leaf.key_pem).expect_err("not a CA");
        assert!(matches!(err, CertsError::NotCa { .. }), "{err}");

        let err = Ca::from_pem(ca.cert_pem(), "garbage").expect_err("bad key");
        assert!(matches!(err, CertsError::BadPem { .. }), "{err}");
    }

    #[test]
    fn combined_pem_holds_cert_then_key_and_debug_hides_key() {
        let ca = Ca::generate("c", days(1)).expect("ca");
        let m = ca.issue_master("m", days(1)).expect("m");
        let both = m.combined_pem();
        let cert_at = both.find("BEGIN CERTIFICATE").expect("cert");
        let key_at = both.find("BEGIN PRIVATE KEY").expect("key");
        assert!(cert_at < key_at);
        assert!(!format!("{m:?}").contains("PRIVATE KEY"));
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    }
}
