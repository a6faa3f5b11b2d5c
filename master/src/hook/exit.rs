//! The hook's exit status, decided in one place (nix-interfaces.md §2.7,
//! §9): what Nix ≤ 2.28 and Lix read from it, and what Hydra retries.
//!
//! | how the hook ended                                   | status |
//! |------------------------------------------------------|--------|
//! | every wanted output valid locally                    | 0      |
//! | nothing accepted (Nix ended the conversation)        | 0      |
//! | classic protocol: Nix said `cancel`                  | 0      |
//! | the builder failed on the slave (permanent)          | 100    |
//! | `timeout` / `max-silent-time` hit (remote or local)  | 101    |
//! | anything else: agent unreachable or lost, transfer error, signal, protocol error | 1 |
//!
//! Exit 0 with an output missing would make Nix 2.8 abort the whole run
//! ("some outputs are unexpectedly invalid"), so [`Outcome::Built`] is only
//! produced after the outputs were checked valid.

use std::process::ExitCode;

/// Success, or nothing to do.
pub const EXIT_OK: u8 = 0;
/// The builder failed: PermanentFailure in Nix.
pub const EXIT_BUILDER_FAILED: u8 = 100;
/// Timed out: TimedOut in Nix.
pub const EXIT_TIMED_OUT: u8 = 101;
/// Anything that may pass on retry: MiscFailure in Nix.
pub const EXIT_TRANSIENT: u8 = 1;

/// How a hook process ended, short of an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every wanted output is valid in the local store.
    Built,
    /// Nix stopped asking before we accepted anything (EOF, another tag,
    /// or a classic decline/postpone).
    NoJob,
    /// Classic protocol: Nix cancelled after our accept.
    Cancelled,
    /// The builder failed on the slave.
    BuilderFailed { msg: String },
    /// The build ran out of `timeout` or `max-silent-time`.
    TimedOut { msg: String },
    /// The remote build failed in a way that may pass on retry.
    Transient { msg: String },
    /// SIGINT/SIGTERM: the remote build was cancelled.
    Interrupted,
}

/// The status for an outcome.
pub fn outcome_code(outcome: &Outcome) -> u8 {
    match outcome {
        Outcome::Built | Outcome::NoJob | Outcome::Cancelled => EXIT_OK,
        Outcome::BuilderFailed { .. } => EXIT_BUILDER_FAILED,
        Outcome::TimedOut { .. } => EXIT_TIMED_OUT,
        Outcome::Transient { .. } | Outcome::Interrupted => EXIT_TRANSIENT,
    }
}

/// The status for a run: every error is transient (1); a broken
/// conversation with Nix is fatal for Nix anyway.
pub fn exit_code<E>(result: &Result<Outcome, E>) -> ExitCode {
    ExitCode::from(match result {
        Ok(outcome) => outcome_code(outcome),
        Err(_) => EXIT_TRANSIENT,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_nix() {
        assert_eq!(outcome_code(&Outcome::Built), 0);
        assert_eq!(outcome_code(&Outcome::NoJob), 0);
        assert_eq!(outcome_code(&Outcome::Cancelled), 0);
        assert_eq!(
            outcome_code(&Outcome::BuilderFailed { msg: String::new() }),
            100
        );
        assert_eq!(outcome_code(&Outcome::TimedOut { msg: String::new() }), 101);
        assert_eq!(outcome_code(&Outcome::Transient { msg: String::new() }), 1);
        assert_eq!(outcome_code(&Outcome::Interrupted), 1);
    }
}
