//! The classic hook protocols enabled by `NIX_BUILD_HOOK` (nix-interfaces.md
//! §3, and the original manual text in `shared/seeds/003_…txt`), and the
//! detection of which protocol the calling Nix speaks. Pure: argv, reply
//! lines and the three files are parsed and formatted here; the glue in
//! [`super::run`] does the reading and writing.
//!
//! # Nix 0.10 – 0.12 (§3.1): one process per derivation
//!
//! ```text
//! argv:  hook <canBuildMore 0|1> <thisSystem> <drv system> <drvPath>
//! fd 3:  hook → Nix, one line: accept | decline | postpone
//! fd 4:  Nix → hook, after accept, one line: okay | cancel
//! cwd:   after okay, the files `inputs` (input closure plus the .drv
//!        closure, one path per line), `outputs` (one path per line) and
//!        `references` (the inputs' reference graph in `--register-validity`
//!        format without hashes: path, deriver, count, references)
//! stdout, stderr: the build log
//! ```
//!
//! Machines come from the file named by `NIX_REMOTE_SYSTEMS`, the load
//! directory from `NIX_CURRENT_LOAD`.
//!
//! # Nix 1.0 – 1.11 (§3.3): the line protocol
//!
//! `hook <thisSystem> <maxSilentTime> <printBuildTrace> <buildTimeout>`; one
//! process answers request lines `<amWilling> <system> <drvPath>
//! <feature,…>` on stdin with `# accept` / `# decline` / `# postpone` on
//! stderr; after an accept Nix writes two lines (inputs, then the missing
//! output paths, space-separated) and closes stdin; the builder log goes to
//! fd 4.
//!
//! # Detection ([`detect`])
//!
//! Nix 2.x passes its verbosity as the last argument (a small number), and
//! Nix ≥ 2.17 may put words from the `build-hook` list before it. The classic
//! protocols come with four (0.10–0.12) or four/five numeric-looking
//! arguments (1.x) and `NIX_BUILD_HOOK` in the environment; 0.10 starts with
//! `0`/`1` and ends with a store path, 1.x starts with a system name.

use std::collections::BTreeSet;

use nixq_common::store_path::{StorePath, StorePathError};

use super::modern::{TryRequest, Verbosity};

/// Which protocol the calling Nix speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// Nix 2.x: settings preamble and "try" requests on stdin (§2).
    Modern { verbosity: Verbosity },
    /// Nix 0.10 – 0.12: fds 3 and 4, files in the cwd (§3.1).
    Classic(ClassicArgs),
    /// Nix 1.x: the line protocol (§3.3).
    Line(LineArgs),
}

/// The four arguments of the classic protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassicArgs {
    /// Nix can run more local builds (`--max-jobs` not reached).
    pub can_build_more: bool,
    pub this_system: String,
    pub drv_system: String,
    pub drv_path: StorePath,
}

/// The arguments of the 1.x line protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineArgs {
    pub this_system: String,
    /// Seconds; 0 = none.
    pub max_silent_time: u64,
    pub print_build_trace: bool,
    /// Seconds; 0 = none.
    pub build_timeout: u64,
}

/// The arguments fit no protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot tell which hook protocol the caller speaks from the arguments {args:?}{}: {reason}",
        if *.build_hook_env { " (NIX_BUILD_HOOK is set)" } else { "" })]
pub struct DetectError {
    pub args: Vec<String>,
    pub build_hook_env: bool,
    pub reason: &'static str,
}

/// Reads the protocol from the arguments after `argv[0]` and whether
/// `NIX_BUILD_HOOK` is set.
pub fn detect(args: &[String], build_hook_env: bool) -> Result<Protocol, DetectError> {
    let error = |reason| DetectError {
        args: args.to_vec(),
        build_hook_env,
        reason,
    };
    let flag = |s: &str| match s {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    };
    match args {
        [can, this_system, drv_system, drv_path] if build_hook_env && flag(can).is_some() => {
            let drv_path = StorePath::parse_any(drv_path)
                .map_err(|_| error("the fourth argument is not a store path"))?;
            Ok(Protocol::Classic(ClassicArgs {
                can_build_more: flag(can).unwrap_or(false),
                this_system: this_system.clone(),
                drv_system: drv_system.clone(),
                drv_path,
            }))
        }
        [this_system, silent, trace, timeout] if build_hook_env => {
            let (Ok(max_silent_time), Some(print_build_trace), Ok(build_timeout)) =
                (silent.parse(), flag(trace), timeout.parse())
            else {
                return Err(error(
                    "expected <system> <maxSilentTime> <printBuildTrace> <buildTimeout>",
                ));
            };
            Ok(Protocol::Line(LineArgs {
                this_system: this_system.clone(),
                max_silent_time,
                print_build_trace,
                build_timeout,
            }))
        }
        [.., last] => match last.parse::<u8>() {
            Ok(level) => Ok(Protocol::Modern {
                verbosity: Verbosity(level),
            }),
            Err(_) => Err(error("the last argument is not Nix's verbosity")),
        },
        [] => Err(error(
            "no arguments; this program is run by Nix as its build hook",
        )),
    }
}

/// The answer on fd 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassicReply {
    Accept,
    Decline,
    Postpone,
}

impl ClassicReply {
    pub fn to_line(self) -> &'static str {
        match self {
            Self::Accept => "accept\n",
            Self::Decline => "decline\n",
            Self::Postpone => "postpone\n",
        }
    }
}

/// Nix's word on fd 4 after an accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Go {
    /// Proceed: the files are written and Nix holds the output locks.
    Okay,
    /// Someone else built it meanwhile: exit.
    Cancel,
}

/// A malformed classic message or file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClassicError {
    #[error("expected 'okay' or 'cancel' on fd 4, got '{0}'")]
    BadGo(String),
    #[error("{file}, line {line}: '{text}' is not a store path: {source}")]
    BadPath {
        file: &'static str,
        line: usize,
        text: String,
        #[source]
        source: StorePathError,
    },
    #[error("{file}, line {line}: expected {expected}")]
    Malformed {
        file: &'static str,
        line: usize,
        expected: &'static str,
    },
    #[error("bad request line '{line}': expected {expected}")]
    BadRequest {
        line: String,
        expected: &'static str,
    },
}

/// Parses the line read from fd 4 (without or with its newline).
pub fn parse_go(line: &str) -> Result<Go, ClassicError> {
    match line.trim_end_matches(['\n', '\r']) {
        "okay" => Ok(Go::Okay),
        "cancel" => Ok(Go::Cancel),
        other => Err(ClassicError::BadGo(other.to_owned())),
    }
}

/// The `inputs` or `outputs` file: one store path per line; empty lines are
/// ignored.
pub fn parse_path_list(file: &'static str, text: &str) -> Result<Vec<StorePath>, ClassicError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            StorePath::parse_any(l.trim()).map_err(|source| ClassicError::BadPath {
                file,
                line: i + 1,
                text: l.to_owned(),
                source,
            })
        })
        .collect()
}

/// One block of the `references` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceEntry {
    pub path: StorePath,
    pub deriver: Option<StorePath>,
    pub references: Vec<StorePath>,
}

/// The `references` file: per path, lines `path`, `deriver` (empty for
/// none), the number of references, then one reference per line (the
/// `nix-store --register-validity` format without hashes).
pub fn parse_references(text: &str) -> Result<Vec<ReferenceEntry>, ClassicError> {
    const FILE: &str = "references";
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let path_at = |line: usize, text: &str| {
        StorePath::parse_any(text).map_err(|source| ClassicError::BadPath {
            file: FILE,
            line,
            text: text.to_owned(),
            source,
        })
    };
    let mut entries = Vec::new();
    while let Some((n, first)) = lines.next() {
        if first.is_empty() && entries.is_empty() && text.trim().is_empty() {
            break;
        }
        let path = path_at(n, first)?;
        let eof = |line| ClassicError::Malformed {
            file: FILE,
            line,
            expected: "a deriver line, a reference count and the references",
        };
        let (n, deriver) = lines.next().ok_or_else(|| eof(n + 1))?;
        let deriver = if deriver.is_empty() {
            None
        } else {
            Some(path_at(n, deriver)?)
        };
        let (n, count) = lines.next().ok_or_else(|| eof(n + 1))?;
        let count: usize = count.trim().parse().map_err(|_| ClassicError::Malformed {
            file: FILE,
            line: n,
            expected: "a reference count",
        })?;
        let mut references = Vec::with_capacity(count.min(4096));
        let mut last = n;
        for _ in 0..count {
            let (n, r) = lines.next().ok_or_else(|| eof(last + 1))?;
            references.push(path_at(n, r)?);
            last = n;
        }
        entries.push(ReferenceEntry {
            path,
            deriver,
            references,
        });
    }
    Ok(entries)
}

/// A 1.x request line: `<amWilling> <system> <drvPath> <feature,feature,…>`
/// (the features word may be missing or empty).
pub fn parse_line_request(line: &str) -> Result<TryRequest, ClassicError> {
    let bad = |expected| ClassicError::BadRequest {
        line: line.to_owned(),
        expected,
    };
    let mut words = line.split_whitespace();
    let am_willing = match words.next() {
        Some("0") => false,
        Some("1") => true,
        _ => return Err(bad("amWilling 0 or 1 first")),
    };
    let needed_system = words.next().ok_or_else(|| bad("a system"))?.to_owned();
    let drv = words.next().ok_or_else(|| bad("a derivation path"))?;
    let drv_path = StorePath::parse_any(drv).map_err(|_| bad("a derivation store path"))?;
    let required_features: BTreeSet<String> = words
        .next()
        .unwrap_or("")
        .split(',')
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .collect();
    if words.next().is_some() {
        return Err(bad("at most four words"));
    }
    Ok(TryRequest {
        am_willing,
        needed_system,
        drv_path,
        required_features,
    })
}

/// A 1.x line of space-separated store paths (inputs or outputs).
pub fn parse_path_words(file: &'static str, line: &str) -> Result<Vec<StorePath>, ClassicError> {
    line.split_whitespace()
        .map(|w| {
            StorePath::parse_any(w).map_err(|source| ClassicError::BadPath {
                file,
                line: 1,
                text: w.to_owned(),
                source,
            })
        })
        .collect()
}

/// The 1.x reply line on stderr.
pub fn line_reply(reply: ClassicReply) -> &'static str {
    match reply {
        ClassicReply::Accept => "# accept\n",
        ClassicReply::Decline => "# decline\n",
        ClassicReply::Postpone => "# postpone\n",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-top.drv";
    const A: &str = "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-a";
    const B: &str = "/nix/store/1mdqa9w1p6cmli6976v4wi0sw9r4p5pr-b";

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn detects_each_protocol() {
        assert_eq!(
            detect(&args(&["3"]), false),
            Ok(Protocol::Modern {
                verbosity: Verbosity::INFO
            })
        );
        // Nix ≥ 2.17: words of the build-hook list come first.
        assert_eq!(
            detect(&args(&["--some-word", "4"]), false),
            Ok(Protocol::Modern {
                verbosity: Verbosity::TALKATIVE
            })
        );
        let classic = detect(&args(&["1", "x86_64-linux", "i686-linux", DRV]), true);
        assert_eq!(
            classic,
            Ok(Protocol::Classic(ClassicArgs {
                can_build_more: true,
                this_system: "x86_64-linux".into(),
                drv_system: "i686-linux".into(),
                drv_path: StorePath::parse_any(DRV).expect("path"),
            }))
        );
        assert_eq!(
            detect(&args(&["x86_64-linux", "3600", "0", "7200"]), true),
            Ok(Protocol::Line(LineArgs {
                this_system: "x86_64-linux".into(),
                max_silent_time: 3600,
                print_build_trace: false,
                build_timeout: 7200,
            }))
        );
        // Without NIX_BUILD_HOOK four arguments are not classic.
        assert!(detect(&args(&["1", "x86_64-linux", "i686-linux", DRV]), false).is_err());
        assert!(detect(&args(&["1", "a", "b", "/tmp/not-store"]), true).is_err());
        assert!(detect(&args(&["x86_64-linux", "soon", "0", "1"]), true).is_err());
        let err = detect(&[], false).expect_err("no args");
        assert!(err.to_string().contains("build hook"), "{err}");
    }

    #[test]
    fn replies_and_go() {
        assert_eq!(ClassicReply::Accept.to_line(), "accept\n");
        assert_eq!(ClassicReply::Decline.to_line(), "decline\n");
        assert_eq!(ClassicReply::Postpone.to_line(), "postpone\n");
        assert_eq!(line_reply(ClassicReply::Postpone), "# postpone\n");
        assert_eq!(parse_go("okay\n"), Ok(Go::Okay));
        assert_eq!(parse_go("cancel"), Ok(Go::Cancel));
        assert_eq!(parse_go("ok\n"), Err(ClassicError::BadGo("ok".into())));
    }

    #[test]
    fn files_parse() {
        let p = |s: &str| StorePath::parse_any(s).expect("path");
        assert_eq!(
            parse_path_list("inputs", &format!("{A}\n\n{B}\n")),
            Ok(vec![p(A), p(B)])
        );
        assert!(matches!(
            parse_path_list("outputs", "/tmp/x\n"),
            Err(ClassicError::BadPath {
                file: "outputs",
                line: 1,
                ..
            })
        ));
        let refs = format!("{A}\n\n0\n{B}\n{DRV}\n2\n{A}\n{B}\n");
        assert_eq!(
            parse_references(&refs),
            Ok(vec![
                ReferenceEntry {
                    path: p(A),
                    deriver: None,
                    references: vec![]
                },
                ReferenceEntry {
                    path: p(B),
                    deriver: Some(p(DRV)),
                    references: vec![p(A), p(B)]
                },
            ])
        );
        assert_eq!(parse_references(""), Ok(vec![]));
        assert!(matches!(
            parse_references(&format!("{A}\n\n2\n{B}\n")),
            Err(ClassicError::Malformed { line: 5, .. })
        ));
        assert!(matches!(
            parse_references(&format!("{A}\n\nmany\n")),
            Err(ClassicError::Malformed { line: 3, .. })
        ));
    }

    #[test]
    fn line_protocol_requests() {
        let req =
            parse_line_request(&format!("0 x86_64-linux {DRV} kvm,big-parallel")).expect("ok");
        assert!(!req.am_willing);
        assert_eq!(req.needed_system, "x86_64-linux");
        assert_eq!(
            req.required_features,
            ["big-parallel", "kvm"].map(String::from).into()
        );
        let req = parse_line_request(&format!("1 i686-linux {DRV}")).expect("ok");
        assert!(req.am_willing && req.required_features.is_empty());
        assert!(parse_line_request("2 x y").is_err());
        assert!(parse_line_request(&format!("1 s {DRV} f extra")).is_err());
        assert_eq!(
            parse_path_words("inputs", &format!(" {A}  {B} "))
                .expect("ok")
                .len(),
            2
        );
    }
}
