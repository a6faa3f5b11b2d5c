//! Exit codes of `nixq-copy-closure` and `nixq-status`, mapped from errors in
//! one place (the contract in the lead's CLI document).

use nixq_common::proto::UploadOutcome;

use crate::agent_client::ClientError;
use crate::copy::CopyError;

/// Success.
pub const OK: u8 = 0;
/// Anything not listed below.
pub const FAILURE: u8 = 1;
/// A usage error (clap's own code for bad flags).
pub const USAGE: u8 = 2;
/// The agent cannot be reached (or was lost).
pub const UNREACHABLE: u8 = 3;
/// A certificate was refused, by either side.
pub const CERT_REFUSED: u8 = 4;
/// A path is not valid locally (`--to`) or on the agent (`--from`).
pub const NOT_VALID: u8 = 5;
/// A NAR hash or size mismatch (reported by the agent, or found in our own
/// store while sending).
pub const HASH_MISMATCH: u8 = 6;

/// The exit code of a failed copy.
pub fn copy_exit_code(error: &CopyError) -> u8 {
    match error {
        CopyError::Target(e) if e.is_usage() => USAGE,
        CopyError::NotAStorePath { .. } => USAGE,
        CopyError::NotValidLocally { .. } | CopyError::NotValidOnAgent { .. } => NOT_VALID,
        CopyError::Agent(e) => client_exit_code(e),
        CopyError::Rejected { outcome, .. } => match **outcome {
            UploadOutcome::HashMismatch { .. }
            | UploadOutcome::SizeMismatch { .. }
            | UploadOutcome::BadNar { .. } => HASH_MISMATCH,
            UploadOutcome::ReferenceNotValid { .. } => NOT_VALID,
            _ => FAILURE,
        },
        CopyError::Import { source, .. } => match source.outcome() {
            Some(
                UploadOutcome::HashMismatch { .. }
                | UploadOutcome::SizeMismatch { .. }
                | UploadOutcome::BadNar { .. },
            ) => HASH_MISMATCH,
            _ => FAILURE,
        },
        _ => FAILURE,
    }
}

/// The exit code of a failure to talk to an agent.
pub fn client_exit_code(error: &ClientError) -> u8 {
    match error {
        e if e.is_tls_refusal() => CERT_REFUSED,
        e if e.is_unreachable() => UNREACHABLE,
        ClientError::Send(e) if e.is_local_corruption() => HASH_MISMATCH,
        _ => FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use nixq_common::hash::NarHash;
    use nixq_common::net::ConnectError;
    use nixq_common::store_path::StorePath;
    use nixq_common::transfer::send::SendError;

    use super::*;
    use crate::target::TargetError;

    fn path() -> StorePath {
        StorePath::parse_any("/nix/store/00000000000000000000000000000000-a").expect("path")
    }

    fn connect(source: ConnectError) -> CopyError {
        CopyError::Agent(ClientError::Connect {
            uri: "nixq://h".into(),
            source,
        })
    }

    #[test]
    fn codes_follow_the_contract() {
        let addr: SocketAddr = "127.0.0.1:7461".parse().expect("addr");
        assert_eq!(
            copy_exit_code(&connect(ConnectError::TimedOut {
                addr,
                after: Duration::from_secs(1)
            })),
            UNREACHABLE
        );
        assert_eq!(
            copy_exit_code(&connect(ConnectError::RefusedByPeer {
                addr,
                alert: rustls::AlertDescription::UnknownCA
            })),
            CERT_REFUSED
        );
        assert_eq!(
            copy_exit_code(&connect(ConnectError::PeerRejected {
                addr,
                alert: rustls::AlertDescription::BadCertificate,
                reason: "expired".into()
            })),
            CERT_REFUSED
        );
        assert_eq!(
            copy_exit_code(&CopyError::NotValidLocally {
                path: path(),
                needed_by: None
            }),
            NOT_VALID
        );
        assert_eq!(
            copy_exit_code(&CopyError::NotValidOnAgent {
                uri: "nixq://h".into(),
                paths: vec![path()]
            }),
            NOT_VALID
        );
        let mismatch = UploadOutcome::HashMismatch {
            expected: NarHash::of(b"a"),
            got: NarHash::of(b"b"),
        };
        let rejected = CopyError::Rejected {
            uri: "nixq://h".into(),
            path: path(),
            outcome: Box::new(mismatch),
        };
        assert_eq!(copy_exit_code(&rejected), HASH_MISMATCH);
        assert!(
            rejected.to_string().contains("NAR hash mismatch"),
            "{rejected}"
        );
        let corrupt = CopyError::Agent(ClientError::Send(SendError::CorruptSize {
            path: path(),
            expected: 8,
            got: 16,
        }));
        assert_eq!(copy_exit_code(&corrupt), HASH_MISMATCH);
        assert_eq!(
            copy_exit_code(&CopyError::Target(TargetError::UnknownHost {
                host: "x".into(),
                machines: "/etc/nix/machines".into()
            })),
            USAGE
        );
        assert_eq!(copy_exit_code(&CopyError::NotRoot), FAILURE);
    }
}
