//! Reading PEM text: the certificates of a PEM buffer, in order.
//!
//! Pure: callers pass the bytes and an `origin` (usually a file name) that
//! every error message names.

use x509_parser::pem::Pem;

use crate::CertsError;

/// The PEM label of an X.509 certificate.
const CERTIFICATE_LABEL: &str = "CERTIFICATE";

/// The DER bytes of every `CERTIFICATE` block of `pem`, in file order.
///
/// Other blocks (private keys, parameters) are skipped, so a combined
/// cert+key file works. A malformed block is an error; no certificate at all
/// is an error that says which kinds of block were found instead.
pub fn certificates_der(pem: &[u8], origin: &str) -> Result<Vec<Vec<u8>>, CertsError> {
    let mut certs = Vec::new();
    let mut other_labels = Vec::new();
    for block in Pem::iter_from_buffer(pem) {
        let block =
            block.map_err(|e| CertsError::bad_pem(origin, format!("malformed PEM: {e}")))?;
        if block.label == CERTIFICATE_LABEL {
            certs.push(block.contents);
        } else {
            other_labels.push(block.label);
        }
    }
    if certs.is_empty() {
        let problem = if other_labels.is_empty() {
            "no PEM certificate found (expected a \"-----BEGIN CERTIFICATE-----\" block)".to_owned()
        } else {
            format!(
                "no PEM certificate found, only: {} (is this a key file?)",
                other_labels.join(", ")
            )
        };
        return Err(CertsError::bad_pem(origin, problem));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_only_file_is_named_as_such() {
        let pem = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let err = certificates_der(pem, "x.key").expect_err("no certificate");
        let msg = err.to_string();
        assert!(msg.starts_with("x.key: "), "{msg}");
        assert!(msg.contains("PRIVATE KEY"), "{msg}");
    }

    #[test]
    fn empty_and_garbage_inputs_are_errors() {
        assert!(certificates_der(b"", "e").is_err());
        assert!(certificates_der(b"hello world\n", "g").is_err());
        let truncated = b"-----BEGIN CERTIFICATE-----\nAAAA\n";
        let msg = certificates_der(truncated, "t")
            .expect_err("truncated")
            .to_string();
        assert!(msg.contains("malformed"), "{msg}");
    }
}
