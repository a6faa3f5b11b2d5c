//! The PKI directory as a whole: what `init`, `issue` and `bundle` do to
//! files, on top of [`crate::issue`] (making certificates) and
//! [`crate::files`] (writing them safely).
//!
//! Each command checks every destination before it writes any, so a refused
//! overwrite leaves nothing half-done.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::bundle::{Bundle, HostRole};
use crate::files::{
    check_writable, create_dir, read_pem_file, write_file, Overwrite, PkiDir, KEY_MODE, PUBLIC_MODE,
};
use crate::inspect::CertInfo;
use crate::issue::{check_name, Ca, Leaf, Validity};
use crate::CertsError;

/// Files written by a command, for its report to the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// The certificate (or archive) written.
    pub cert: PathBuf,
    /// The private key written, if any.
    pub key: Option<PathBuf>,
}

/// `init`: a new CA in `DIR/ca.crt` and `DIR/ca.key`.
pub fn init(
    pki: &PkiDir,
    common_name: &str,
    validity: Validity,
    overwrite: Overwrite,
) -> Result<Written, CertsError> {
    let (crt, key) = (pki.ca_cert(), pki.ca_key());
    check_writable(&crt, overwrite)?;
    check_writable(&key, overwrite)?;
    let ca = Ca::generate(common_name, validity)?;
    create_dir(pki.root())?;
    write_pair(&crt, ca.cert_pem(), &key, ca.key_pem(), overwrite)?;
    Ok(Written {
        cert: crt,
        key: Some(key),
    })
}

/// The CA of `DIR`, from `ca.crt` and `ca.key`.
pub fn load_ca(pki: &PkiDir) -> Result<Ca, CertsError> {
    let (crt, key) = (pki.ca_cert(), pki.ca_key());
    let cert_pem = read_pem_file(&crt).map_err(no_ca_hint)?;
    let key_pem = read_pem_file(&key)?;
    Ca::from_pem_named(
        &cert_pem,
        &crt.display().to_string(),
        &key_pem,
        &key.display().to_string(),
    )
}

fn no_ca_hint(e: CertsError) -> CertsError {
    match e {
        CertsError::Io { source, path, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            CertsError::Io {
                action: "read the CA certificate (run `nixq-certs init` first, or pass --dir)",
                path,
                source,
            }
        }
        other => other,
    }
}

/// `issue agent NAME`: `DIR/agents/NAME.crt` and `.key`.
pub fn issue_agent(
    pki: &PkiDir,
    name: &str,
    dns: &[String],
    ips: &[IpAddr],
    validity: Validity,
    overwrite: Overwrite,
) -> Result<Written, CertsError> {
    check_name(name)?;
    let (crt, key) = pki.agent(name);
    check_writable(&crt, overwrite)?;
    check_writable(&key, overwrite)?;
    let ca = load_ca(pki)?;
    let leaf = ca.issue_agent(name, dns, ips, validity)?;
    create_dir(&pki.agents())?;
    write_leaf(&crt, &key, &leaf, overwrite)
}

/// `issue master NAME`: `DIR/masters/NAME.crt` and `.key`.
pub fn issue_master(
    pki: &PkiDir,
    name: &str,
    validity: Validity,
    overwrite: Overwrite,
) -> Result<Written, CertsError> {
    check_name(name)?;
    let (crt, key) = pki.master(name);
    check_writable(&crt, overwrite)?;
    check_writable(&key, overwrite)?;
    let ca = load_ca(pki)?;
    let leaf = ca.issue_master(name, validity)?;
    create_dir(&pki.masters())?;
    write_leaf(&crt, &key, &leaf, overwrite)
}

fn write_leaf(
    crt: &Path,
    key: &Path,
    leaf: &Leaf,
    overwrite: Overwrite,
) -> Result<Written, CertsError> {
    write_pair(crt, &leaf.cert_pem, key, &leaf.key_pem, overwrite)?;
    Ok(Written {
        cert: crt.to_owned(),
        key: Some(key.to_owned()),
    })
}

/// Key first, then certificate; if the certificate cannot be written, a key
/// this call created is removed again.
fn write_pair(
    crt: &Path,
    cert_pem: &str,
    key: &Path,
    key_pem: &str,
    overwrite: Overwrite,
) -> Result<(), CertsError> {
    write_file(key, key_pem.as_bytes(), KEY_MODE, overwrite)?;
    write_file(crt, cert_pem.as_bytes(), PUBLIC_MODE, overwrite).inspect_err(|_| {
        if overwrite == Overwrite::Refuse {
            let _ = std::fs::remove_file(key);
        }
    })
}

/// Which role `name` has in `DIR`: the one with a certificate, or `role`
/// when given (needed only if NAME is both an agent and a master).
pub fn find_role(pki: &PkiDir, name: &str, role: Option<HostRole>) -> Result<HostRole, CertsError> {
    check_name(name)?;
    if let Some(role) = role {
        return Ok(role);
    }
    let agent = pki.agent(name).0.exists();
    let master = pki.master(name).0.exists();
    match (agent, master) {
        (true, false) => Ok(HostRole::Agent),
        (false, true) => Ok(HostRole::Master),
        (true, true) => Err(CertsError::Bundle(format!(
            "{name} is both an agent and a master in {}; say which with --role",
            pki.root().display()
        ))),
        (false, false) => Err(CertsError::Bundle(format!(
            "no certificate for {name}: neither {} nor {} exists (issue one with `nixq-certs issue agent|master {name}`)",
            pki.agent(name).0.display(),
            pki.master(name).0.display()
        ))),
    }
}

/// `bundle NAME`: the tar for host `name` written to `out` (mode 0600: it
/// holds a private key).
pub fn bundle(
    pki: &PkiDir,
    name: &str,
    role: HostRole,
    out: &Path,
    overwrite: Overwrite,
    mtime: u64,
) -> Result<Written, CertsError> {
    check_writable(out, overwrite)?;
    let ca_pem = read_pem_file(&pki.ca_cert()).map_err(no_ca_hint)?;
    let (crt, key) = match role {
        HostRole::Agent => pki.agent(name),
        HostRole::Master => pki.master(name),
    };
    let leaf = Leaf {
        cert_pem: read_pem_file(&crt)?,
        key_pem: read_pem_file(&key)?,
    };
    let info = CertInfo::from_pem(leaf.cert_pem.as_bytes(), &crt.display().to_string())?;
    let bundle = match role {
        HostRole::Agent => Bundle::agent(name, &ca_pem, &leaf, &info.sans),
        HostRole::Master => Bundle::master(name, &ca_pem, &leaf),
    };
    let tar = bundle.to_tar(mtime)?;
    write_file(out, &tar, KEY_MODE, overwrite)?;
    Ok(Written {
        cert: out.to_owned(),
        key: None,
    })
}
