//! The daemon's stderr message loop (nix-interfaces.md §5.2) as a pure
//! decoder: bytes in, one typed [`StderrMsg`] out, or "need more".
//!
//! After every request the daemon sends tagged messages until `STDERR_LAST`
//! (the op's result follows) or `STDERR_ERROR` (no result follows). Log
//! lines, activities and their results arrive in between; build log lines are
//! `STDERR_RESULT` of type [`RESULT_BUILD_LOG_LINE`].

use super::ops::ProtocolVersion;
use super::wire::{check_count, DecodeError, Reader, WireError, MAX_STRING_LEN};

/// `STDERR_NEXT`, "gmlo": a log message.
pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
/// `STDERR_READ`, "atad": the daemon pulls up to n bytes of an upload.
pub const STDERR_READ: u64 = 0x6461_7461;
/// `STDERR_WRITE`: data for the client's sink.
pub const STDERR_WRITE: u64 = 0x6461_7416;
/// `STDERR_LAST`, "stla": the op's result follows.
pub const STDERR_LAST: u64 = 0x616c_7473;
/// `STDERR_ERROR`, "ptxc": the op failed; no result follows.
pub const STDERR_ERROR: u64 = 0x6378_7470;
/// `STDERR_START_ACTIVITY`, "TRTS".
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
/// `STDERR_STOP_ACTIVITY`, "POTS".
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
/// `STDERR_RESULT`, "TLSR".
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Activity type of a derivation build (`actBuild`); its fields are
/// `[drv path, machine, round, total rounds]`.
pub const ACTIVITY_BUILD: u64 = 105;
/// Result type of one line of builder output (`resBuildLogLine`); field
/// `[line]`, without the newline.
pub const RESULT_BUILD_LOG_LINE: u64 = 101;
/// Result type of a build phase change (`resSetPhase`); field `[phase]`.
pub const RESULT_SET_PHASE: u64 = 104;
/// Result type of a post-build-hook output line (`resPostBuildLogLine`).
pub const RESULT_POST_BUILD_LOG_LINE: u64 = 107;

/// Most fields in one activity or result. Nix sends at most four.
const MAX_FIELDS: u64 = 1024;
/// Most trace entries in one structured error.
const MAX_TRACES: u64 = 1024;

/// One message of the stderr loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StderrMsg {
    /// A log message (`STDERR_NEXT`), raw bytes (may hold ANSI escapes).
    Next(Vec<u8>),
    /// The daemon asks for at most this many bytes of the upload.
    Read(u64),
    /// Data for the client's sink.
    Write(Vec<u8>),
    /// End of the loop; the op's result follows.
    Last,
    /// The op failed.
    Error(NixError),
    StartActivity(Activity),
    StopActivity {
        id: u64,
    },
    Result(ActivityResult),
}

/// An error reported by Nix (`STDERR_ERROR`), ANSI escapes removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixError {
    pub message: String,
    /// Verbosity level (≥ 1.26).
    pub level: Option<u64>,
    /// Exit status Nix suggests (< 1.26 only).
    pub exit_status: Option<u64>,
    /// Trace lines (≥ 1.26), outermost first.
    pub traces: Vec<String>,
}

/// `STDERR_START_ACTIVITY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub id: u64,
    pub level: u64,
    /// Activity type (`ACTIVITY_*`, §5.2).
    pub kind: u64,
    pub text: Vec<u8>,
    pub fields: Vec<Field>,
    pub parent: u64,
}

/// `STDERR_RESULT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityResult {
    pub activity: u64,
    /// Result type (`RESULT_*`, §5.2).
    pub kind: u64,
    pub fields: Vec<Field>,
}

impl ActivityResult {
    /// The line of builder output this result carries, if it is one.
    pub fn build_log_line(&self) -> Option<&[u8]> {
        match (self.kind, self.fields.first()) {
            (RESULT_BUILD_LOG_LINE | RESULT_POST_BUILD_LOG_LINE, Some(Field::Str(line))) => {
                Some(line)
            }
            _ => None,
        }
    }
}

/// A field of an activity or result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    Str(Vec<u8>),
}

/// Decode one message from the front of `buf`. `Ok(None)`: `buf` holds only
/// part of a message; call again with more bytes. `Ok(Some((msg, n)))`: the
/// message took the first `n` bytes.
pub fn decode(
    buf: &[u8],
    version: ProtocolVersion,
) -> Result<Option<(StderrMsg, usize)>, WireError> {
    let mut r = Reader::new(buf);
    match decode_msg(&mut r, version) {
        Ok(msg) => Ok(Some((msg, r.position()))),
        Err(DecodeError::Incomplete) => Ok(None),
        Err(DecodeError::Invalid(err)) => Err(err),
    }
}

fn decode_msg(r: &mut Reader<'_>, version: ProtocolVersion) -> Result<StderrMsg, DecodeError> {
    let tag = r.u64()?;
    Ok(match tag {
        STDERR_NEXT => StderrMsg::Next(r.bytes("log message", MAX_STRING_LEN)?.to_vec()),
        STDERR_READ => StderrMsg::Read(r.u64()?),
        STDERR_WRITE => StderrMsg::Write(r.bytes("sink data", MAX_STRING_LEN)?.to_vec()),
        STDERR_LAST => StderrMsg::Last,
        STDERR_ERROR if version.minor() >= 26 => StderrMsg::Error(structured_error(r)?),
        STDERR_ERROR => {
            let message = r.bytes("error message", MAX_STRING_LEN)?;
            StderrMsg::Error(NixError {
                message: strip_ansi(&String::from_utf8_lossy(message)),
                level: None,
                exit_status: Some(r.u64()?),
                traces: Vec::new(),
            })
        }
        STDERR_START_ACTIVITY => StderrMsg::StartActivity(Activity {
            id: r.u64()?,
            level: r.u64()?,
            kind: r.u64()?,
            text: r.bytes("activity text", MAX_STRING_LEN)?.to_vec(),
            fields: fields(r)?,
            parent: r.u64()?,
        }),
        STDERR_STOP_ACTIVITY => StderrMsg::StopActivity { id: r.u64()? },
        STDERR_RESULT => StderrMsg::Result(ActivityResult {
            activity: r.u64()?,
            kind: r.u64()?,
            fields: fields(r)?,
        }),
        other => {
            return Err(WireError::BadValue {
                what: "stderr message tag",
                value: other,
            }
            .into())
        }
    })
}

/// ≥ 1.26: str "Error", u64 level, str name, str message, u64 0 (no
/// position), u64 n, n × (u64 0, str trace).
fn structured_error(r: &mut Reader<'_>) -> Result<NixError, DecodeError> {
    let _type = r.bytes("error type", MAX_STRING_LEN)?;
    let level = r.u64()?;
    let _name = r.bytes("error name", MAX_STRING_LEN)?;
    let message = r.bytes("error message", MAX_STRING_LEN)?;
    no_position(r)?;
    let count = check_count("error traces", r.u64()?, MAX_TRACES)?;
    let mut traces = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        no_position(r)?;
        let trace = r.bytes("error trace", MAX_STRING_LEN)?;
        traces.push(strip_ansi(&String::from_utf8_lossy(trace)));
    }
    Ok(NixError {
        message: strip_ansi(&String::from_utf8_lossy(message)),
        level: Some(level),
        exit_status: None,
        traces,
    })
}

/// Nix always sends "no position" (0) here; anything else is not understood.
fn no_position(r: &mut Reader<'_>) -> Result<(), DecodeError> {
    match r.u64()? {
        0 => Ok(()),
        value => Err(WireError::BadValue {
            what: "error position flag",
            value,
        }
        .into()),
    }
}

fn fields(r: &mut Reader<'_>) -> Result<Vec<Field>, DecodeError> {
    let count = check_count("activity fields", r.u64()?, MAX_FIELDS)?;
    let mut out = Vec::with_capacity(count.min(8));
    for _ in 0..count {
        out.push(match r.u64()? {
            0 => Field::Int(r.u64()?),
            1 => Field::Str(r.bytes("activity field", MAX_STRING_LEN)?.to_vec()),
            value => {
                return Err(WireError::BadValue {
                    what: "activity field kind",
                    value,
                }
                .into())
            }
        });
    }
    Ok(out)
}

/// Remove terminal escape sequences (CSI `ESC [ … final`, OSC `ESC ] … BEL`
/// or `ESC ] … ESC \`, and two-byte `ESC x`): Nix colours its messages (§5.2).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if ('\x40'..='\x7e').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\x07' {
                        break;
                    }
                    if c == '\x1b' && chars.peek() == Some(&'\\') {
                        chars.next();
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::wire::Encoder;

    const V134: ProtocolVersion = ProtocolVersion::from_minor(34);
    const V121: ProtocolVersion = ProtocolVersion::from_minor(21);

    fn decode_all(bytes: &[u8], version: ProtocolVersion) -> StderrMsg {
        // Every strict prefix is incomplete, the whole is one message.
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut], version), Ok(None), "cut at {cut}");
        }
        let mut with_tail = bytes.to_vec();
        with_tail.extend_from_slice(b"trailing");
        let (msg, n) = decode(&with_tail, version)
            .expect("valid")
            .expect("complete");
        assert_eq!(n, bytes.len());
        msg
    }

    #[test]
    fn last_and_next() {
        // §5.2 observed bytes of STDERR_LAST.
        assert_eq!(
            decode_all(&[0x73, 0x74, 0x6c, 0x61, 0, 0, 0, 0], V134),
            StderrMsg::Last
        );
        let mut e = Encoder::new();
        e.u64(STDERR_NEXT).str("hello");
        assert_eq!(
            decode_all(e.as_bytes(), V134),
            StderrMsg::Next(b"hello".to_vec())
        );
    }

    #[test]
    fn activity_and_log_line() {
        let mut e = Encoder::new();
        e.u64(STDERR_START_ACTIVITY)
            .u64(7)
            .u64(3)
            .u64(ACTIVITY_BUILD)
            .str("building '/nix/store/x.drv'")
            .u64(2)
            .u64(1)
            .str("/nix/store/x.drv")
            .u64(0)
            .u64(1)
            .u64(0);
        let StderrMsg::StartActivity(act) = decode_all(e.as_bytes(), V134) else {
            panic!("not an activity");
        };
        assert_eq!(act.kind, ACTIVITY_BUILD);
        assert_eq!(
            act.fields,
            vec![Field::Str(b"/nix/store/x.drv".to_vec()), Field::Int(1)]
        );
        let mut e = Encoder::new();
        e.u64(STDERR_RESULT)
            .u64(7)
            .u64(RESULT_BUILD_LOG_LINE)
            .u64(1)
            .u64(1)
            .str("dep-log-line");
        let StderrMsg::Result(res) = decode_all(e.as_bytes(), V134) else {
            panic!("not a result");
        };
        assert_eq!(res.build_log_line(), Some(&b"dep-log-line"[..]));
        let mut e = Encoder::new();
        e.u64(STDERR_STOP_ACTIVITY).u64(7);
        assert_eq!(
            decode_all(e.as_bytes(), V134),
            StderrMsg::StopActivity { id: 7 }
        );
    }

    #[test]
    fn errors_in_both_formats() {
        let mut e = Encoder::new();
        e.u64(STDERR_ERROR)
            .str("Error")
            .u64(0)
            .str("Error")
            .str("\x1b[31;1merror:\x1b[0m hash mismatch importing path")
            .u64(0)
            .u64(1)
            .u64(0)
            .str("while \x1b]8;;http://x\x07adding\x1b]8;;\x1b\\ it");
        let StderrMsg::Error(err) = decode_all(e.as_bytes(), V134) else {
            panic!("not an error");
        };
        assert_eq!(err.message, "error: hash mismatch importing path");
        assert_eq!(err.traces, vec!["while adding it".to_owned()]);
        assert_eq!(err.level, Some(0));

        let mut e = Encoder::new();
        e.u64(STDERR_ERROR).str("old style").u64(1);
        let StderrMsg::Error(err) = decode_all(e.as_bytes(), V121) else {
            panic!("not an error");
        };
        assert_eq!(err.message, "old style");
        assert_eq!(err.exit_status, Some(1));
    }

    #[test]
    fn rejects_hostile_messages() {
        let mut e = Encoder::new();
        e.u64(0xdead_beef);
        assert!(decode(e.as_bytes(), V134).is_err());
        let mut e = Encoder::new();
        e.u64(STDERR_RESULT).u64(1).u64(101).u64(1).u64(9);
        assert!(decode(e.as_bytes(), V134).is_err());
        let mut e = Encoder::new();
        e.u64(STDERR_RESULT).u64(1).u64(101).u64(u64::MAX);
        assert!(decode(e.as_bytes(), V134).is_err());
        let mut e = Encoder::new();
        e.u64(STDERR_NEXT).u64(u64::MAX);
        assert!(decode(e.as_bytes(), V134).is_err());
        let mut e = Encoder::new();
        e.u64(STDERR_ERROR)
            .str("Error")
            .u64(0)
            .str("Error")
            .str("m")
            .u64(1);
        assert!(decode(e.as_bytes(), V134).is_err());
    }
}
