//! The machines file: Nix's format (nix-interfaces.md §4.1) with nixq's
//! `nixq://` URIs, and the machine-choice rule of Nix's builtin hook (§4.2).
//!
//! This module owns the syntax of the `builders` setting and of the files it
//! includes, the typed [`MachineSpec`] a line becomes, and three pure
//! decisions: [`eligible`], [`choose`] and [`decide`]. It does no I/O of its
//! own: `@file` includes are read through an [`IncludeReader`], so the parser
//! is tested in memory and fuzzed; [`FsIncludes`] is the thin filesystem one.
//!
//! # Syntax
//!
//! Entries are separated by newlines or `;`. `#` starts a comment that runs
//! to the end of the line, hiding any later `;` entries on it (current Nix;
//! Nix 2.8 split on `;` first). An entry is either `@FILE`, whose content is
//! parsed the same way (recursively; a missing file is silently ignored, as
//! Nix does), or up to eight whitespace-separated columns, where `-` or a
//! missing column means the default:
//!
//! | # | column             | default            | nixq's reading                                  |
//! |---|--------------------|--------------------|-------------------------------------------------|
//! | 1 | URI                | required           | `nixq://host[:port][?params]`, see below        |
//! | 2 | systems            | the local system   | comma-separated                                 |
//! | 3 | identity           | the default        | the master's client cert + key PEM file         |
//! | 4 | max jobs           | 1                  | unsigned; 0 = never chosen                      |
//! | 5 | speed factor       | 1                  | float (Nix ≥ 2.20); 0 → 1; negative rejected    |
//! | 6 | supported features | none               | comma-separated                                 |
//! | 7 | mandatory features | none               | comma-separated                                 |
//! | 8 | agent CA           | the default        | base64 of a PEM file, or a path to one          |
//!
//! # URIs
//!
//! `nixq://HOST[:PORT][?KEY=VALUE[&KEY=VALUE]…]`. `HOST` is a DNS name, an
//! IPv4 address, or an IPv6 address in brackets (`nixq://[fd00::2]:7461`).
//! `PORT` defaults to [`DEFAULT_PORT`]. No user, no path. Parameters (each at
//! most once; an unknown one is an error, so that a typo is not ignored):
//!
//! | parameter               | meaning                                                       |
//! |-------------------------|---------------------------------------------------------------|
//! | `compress=none`         | send NARs to this machine uncompressed (fast LANs)            |
//! | `compress=zstd`         | zstd at level [`DEFAULT_ZSTD_LEVEL`]                          |
//! | `compress=zstd:LEVEL`   | zstd at `LEVEL`, 1 … 22                                       |
//! | `tls-name=NAME`         | the DNS name to expect in the agent's certificate (when HOST is an address the certificate does not name) |
//! | `connect-timeout=SECS`  | give up connecting after `SECS` seconds (1 … 3600)            |
//! | `max-load=LOAD`         | do not choose it while its agent reports a 1-minute load average above `LOAD` (a finite number > 0); it counts as busy, like a machine whose slots are taken |
//!
//! # Other URI schemes
//!
//! nixq's hook replaces Nix's builtin hook, so nobody would serve an
//! `ssh://`, `ssh-ng://` or bare-host entry of a file that nixq reads. By
//! default such an entry is an error naming its line
//! ([`ForeignUris::Reject`]): a builder that silently vanishes is worse than
//! a hook that refuses to start. Tools that only display a shared file (or a
//! deliberate mixed setup) may pass [`ForeignUris::Skip`] and get the skipped
//! entries back in [`Machines::skipped`].

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;

use crate::proto::Compression;

/// The UDP port an agent listens on when the URI names none. Unassigned by
/// IANA, far from the ports of Nix's neighbours (ssh 22, Hydra 3000,
/// nix-serve 5000), and easy to spot in a firewall rule: "7461".
pub const DEFAULT_PORT: u16 = 7461;

/// The URI scheme of nixq agents.
pub const SCHEME: &str = "nixq";

/// The zstd level of `compress=zstd` without a level: zstd's own default,
/// which compresses a typical store path several times faster than a gigabit
/// link carries it.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// The highest zstd level (`zstd::compression_level_range`'s upper end).
pub const MAX_ZSTD_LEVEL: i32 = 22;

/// How deep `@file` includes may nest. Nix has no limit and overflows its
/// stack on a cycle; real setups use one or two levels.
pub const MAX_INCLUDE_DEPTH: usize = 16;

/// How many `@file` includes one parse may read in total: without it a few
/// files that include each other twice per level (no cycle) expand
/// exponentially within the depth limit.
pub const MAX_INCLUDES: usize = 1024;

/// How many columns an entry has (§4.1).
pub const COLUMNS: usize = 8;

/// Where a parse error is, and what was expected there.
///
/// Displays as `FILE:LINE:COLUMN: expected EXPECTED, found 'FOUND'`; line and
/// column count from 1, the column in characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: expected {expected}, found '{found}'")]
pub struct MachinesError {
    /// The file (or `builders`, for the setting itself) holding the error.
    pub file: String,
    pub line: u32,
    pub column: u32,
    /// What would have been accepted, e.g. "an unsigned integer (max jobs)".
    pub expected: &'static str,
    /// The offending text, shortened to [`MAX_FOUND_CHARS`] characters.
    pub found: String,
}

/// The longest `found` text an error quotes: enough to recognise a token,
/// short enough that a garbage line does not flood the terminal.
pub const MAX_FOUND_CHARS: usize = 80;

/// An error in a URI on its own (`nixq-copy-closure --to URI`), before it is
/// placed in a file by [`MachinesError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad machine URI '{uri}' at byte {offset}: expected {expected}, found '{found}'")]
pub struct UriError {
    pub uri: String,
    /// Byte offset of the offending part within `uri`.
    pub offset: usize,
    pub expected: &'static str,
    pub found: String,
}

/// The host part of a [`MachineUri`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name (letters, digits, `-`, `_`, dot-separated labels).
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(name) => f.write_str(name),
            Self::Ip(IpAddr::V4(v4)) => write!(f, "{v4}"),
            Self::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
        }
    }
}

/// The `?key=value` parameters of a [`MachineUri`] (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct UriParams {
    /// `compress=`; `None` when absent (the tool's default applies).
    pub compress: Option<Compression>,
    /// `tls-name=`; the certificate name to verify instead of the host.
    pub tls_name: Option<String>,
    /// `connect-timeout=`.
    pub connect_timeout: Option<Duration>,
    /// `max-load=`; `None` when absent (no limit).
    pub max_load: Option<MaxLoad>,
}

/// A `max-load=` limit: finite and greater than zero, so that comparing a
/// load average with it is always meaningful.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct MaxLoad(f64);

impl MaxLoad {
    /// `None` unless `value` is finite and positive.
    pub fn new(value: f64) -> Option<Self> {
        (value.is_finite() && value > 0.0).then_some(Self(value))
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// Whether a load average is above the limit.
    pub fn exceeded_by(self, load_average: f64) -> bool {
        load_average > self.0
    }
}

// Never NaN (and never -0.0), so equality is reflexive and agrees with the
// bit pattern that `Hash` uses.
impl Eq for MaxLoad {}

impl std::hash::Hash for MaxLoad {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

/// A parsed `nixq://host[:port][?params]` URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MachineUri {
    /// The URI exactly as written: Nix's slot lock files are named after it
    /// (§4.2), so it must not be normalised.
    pub text: String,
    pub host: Host,
    pub port: u16,
    pub params: UriParams,
}

impl MachineUri {
    /// Parse a `nixq://` URI.
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        parse_uri(uri).map_err(|e| UriError {
            uri: uri.to_owned(),
            offset: e.offset,
            expected: e.expected,
            found: e.found,
        })
    }

    /// The name the agent's certificate must carry: `tls-name` if given,
    /// else the host (an address for an IP host).
    pub fn server_name(&self) -> String {
        match (&self.params.tls_name, &self.host) {
            (Some(name), _) => name.clone(),
            (None, Host::Name(name)) => name.clone(),
            (None, Host::Ip(ip)) => ip.to_string(),
        }
    }
}

impl fmt::Display for MachineUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A speed factor: finite and greater than zero, so that `load / speed` is
/// always defined.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct SpeedFactor(f64);

impl SpeedFactor {
    /// The default, and what `0` in the file means.
    pub const ONE: Self = Self(1.0);

    /// `None` unless `value` is finite and positive.
    pub fn new(value: f64) -> Option<Self> {
        (value.is_finite() && value > 0.0).then_some(Self(value))
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for SpeedFactor {
    fn default() -> Self {
        Self::ONE
    }
}

/// Column 8: the CA that signed the agent's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentCa {
    /// The PEM text, given inline as base64 (like Nix's host-key column).
    Pem(String),
    /// A path to a PEM file.
    File(PathBuf),
}

/// Where an entry was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub line: u32,
}

/// One machine of the machines file.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineSpec {
    pub uri: MachineUri,
    /// Column 2, never empty (defaults to the local system).
    pub systems: Vec<String>,
    /// Column 3: the master's client certificate and key (one PEM file) for
    /// this machine; `None` = the tool's default.
    pub identity: Option<PathBuf>,
    /// Column 4; 0 = never chosen (but still counts as eligible, §4.2).
    pub max_jobs: u32,
    pub speed_factor: SpeedFactor,
    pub supported_features: BTreeSet<String>,
    pub mandatory_features: BTreeSet<String>,
    /// Column 8; `None` = the tool's default CA.
    pub agent_ca: Option<AgentCa>,
    pub origin: Origin,
}

/// What to do with entries whose URI is not `nixq://` (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForeignUris {
    /// Fail with an error naming the entry.
    #[default]
    Reject,
    /// Leave them out and list them in [`Machines::skipped`].
    Skip,
}

/// What a parse needs besides the text.
#[derive(Debug, Clone, Copy)]
pub struct ParseOptions<'a> {
    /// The default of column 2: Nix's `system` setting on the master.
    pub local_system: &'a str,
    pub foreign_uris: ForeignUris,
}

/// An entry left out under [`ForeignUris::Skip`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub origin: Origin,
    pub uri: String,
}

/// The result of a parse: machines in file order (includes expanded in
/// place).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Machines {
    pub machines: Vec<MachineSpec>,
    pub skipped: Vec<Skipped>,
}

/// A file read for an `@file` include.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Included {
    /// A name that identifies the file for cycle detection and errors (the
    /// resolved path).
    pub id: String,
    pub text: String,
}

/// Reads `@file` includes for the parser.
pub trait IncludeReader {
    /// Read the include `name` (as written after `@`) found in the source
    /// `from` (the id of the including file, or `builders`). `Ok(None)`
    /// means the file does not exist: the include is ignored, as Nix does.
    fn read(&mut self, name: &str, from: &str) -> io::Result<Option<Included>>;
}

impl<F> IncludeReader for F
where
    F: FnMut(&str, &str) -> io::Result<Option<Included>>,
{
    fn read(&mut self, name: &str, from: &str) -> io::Result<Option<Included>> {
        self(name, from)
    }
}

/// Reads includes from the filesystem. A relative include is resolved
/// against the directory of the including file (Nix resolves it against the
/// process's working directory, which for a hook is not under the admin's
/// control); from the `builders` setting itself it stays relative.
#[derive(Debug, Clone, Copy, Default)]
pub struct FsIncludes;

impl IncludeReader for FsIncludes {
    fn read(&mut self, name: &str, from: &str) -> io::Result<Option<Included>> {
        let name = Path::new(name);
        let from = Path::new(from);
        let path = match from.parent() {
            Some(dir) if name.is_relative() && from.is_absolute() => dir.join(name),
            _ => name.to_path_buf(),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let id = std::fs::canonicalize(&path).unwrap_or(path);
        Ok(Some(Included {
            id: id.to_string_lossy().into_owned(),
            text,
        }))
    }
}

/// Parse a machines list: the value of the `builders` setting (`source` =
/// "builders") or a file's content (`source` = its path). Includes are read
/// through `reader`.
pub fn parse(
    source: &str,
    text: &str,
    options: &ParseOptions<'_>,
    reader: &mut dyn IncludeReader,
) -> Result<Machines, MachinesError> {
    let mut parser = Parser {
        options,
        reader,
        stack: vec![source.to_owned()],
        includes_read: 0,
        out: Machines::default(),
    };
    parser.source(source, text)?;
    Ok(parser.out)
}

/// Whether `machine` can take a job for `system` that requires `required`
/// features (§4.2): it lists the system (any machine matches `builtin`),
/// supports every required feature (supported ∪ mandatory), and every one of
/// its mandatory features is required. Max jobs is not looked at: a machine
/// with 0 slots is eligible but never free, as in Nix.
pub fn eligible(machine: &MachineSpec, system: &str, required: &BTreeSet<String>) -> bool {
    (system == "builtin" || machine.systems.iter().any(|s| s == system))
        && required.iter().all(|f| {
            machine.supported_features.contains(f) || machine.mandatory_features.contains(f)
        })
        && machine.mandatory_features.is_subset(required)
}

/// Nix's `canBuildLocally` (§4.2 step 5): the master is willing, the system
/// is its own or one of its extra platforms, and it has every required
/// feature.
pub fn can_build_locally(
    am_willing: bool,
    local_systems: &[String],
    local_features: &BTreeSet<String>,
    system: &str,
    required: &BTreeSet<String>,
) -> bool {
    am_willing && local_systems.iter().any(|s| s == system) && required.is_subset(local_features)
}

/// An eligible machine as the choice rule sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The caller's handle for the machine (e.g. its index in the file).
    pub index: usize,
    /// Slots in use: locked slot files, or the agent's reported running
    /// builds if larger.
    pub load: u32,
    pub max_jobs: u32,
    pub speed_factor: SpeedFactor,
}

/// Nix's choice rule (§4.2 step 3) among `candidates`, given in machines-file
/// order: only those with a free slot (`load < max_jobs`); the smallest
/// `load / speed_factor` (as a float, like current Nix), then the larger
/// speed factor, then the smaller load, then the earlier one. Returns the
/// chosen candidate's `index`.
pub fn choose(candidates: &[Candidate]) -> Option<usize> {
    let mut best: Option<&Candidate> = None;
    for c in candidates.iter().filter(|c| c.load < c.max_jobs) {
        let better = match best {
            None => true,
            Some(b) => {
                let (score, best_score) = (score(c), score(b));
                score < best_score
                    || (score == best_score
                        && (c.speed_factor > b.speed_factor
                            || (c.speed_factor == b.speed_factor && c.load < b.load)))
            }
        };
        if better {
            best = Some(c);
        }
    }
    best.map(|c| c.index)
}

fn score(c: &Candidate) -> f64 {
    f64::from(c.load) / c.speed_factor.get()
}

/// The facts the hook's answer to a "try" depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionInput {
    /// Whether the machines list has any machine at all.
    pub machines_configured: bool,
    /// Whether some machine is [`eligible`] (free slot or not).
    pub any_eligible: bool,
    /// What [`choose`] returned.
    pub chosen: Option<usize>,
    /// What [`can_build_locally`] returned.
    pub can_build_locally: bool,
}

/// The hook's answer to a "try" (§2.5, §4.2 step 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `# accept` on this machine.
    Accept(usize),
    /// `# postpone`: machines of the right kind exist but all are busy, and
    /// the master cannot build it itself.
    Postpone,
    /// `# decline`. `warn`: nobody can build it (Nix then prints "Failed to
    /// find a machine for remote build!").
    Decline { warn: bool },
    /// `# decline-permanently`: no machines are configured at all.
    DeclinePermanently,
}

/// The hook's answer, as Nix's builtin hook gives it.
pub fn decide(input: DecisionInput) -> Decision {
    if !input.machines_configured {
        return Decision::DeclinePermanently;
    }
    match input.chosen {
        Some(index) => Decision::Accept(index),
        None if input.any_eligible && !input.can_build_locally => Decision::Postpone,
        None => Decision::Decline {
            warn: !input.can_build_locally,
        },
    }
}

// ---------------------------------------------------------------------------
// The parser.

/// An error inside one token: byte offset in the token, what was expected.
#[derive(Debug)]
struct FieldError {
    offset: usize,
    expected: &'static str,
    found: String,
}

impl FieldError {
    fn new(offset: usize, expected: &'static str, found: &str) -> Self {
        Self {
            offset,
            expected,
            found: found.to_owned(),
        }
    }
}

struct Parser<'a> {
    options: &'a ParseOptions<'a>,
    reader: &'a mut dyn IncludeReader,
    /// Ids of the sources being parsed, outermost first.
    stack: Vec<String>,
    includes_read: usize,
    out: Machines,
}

/// Where a token is: its source, line and byte offset in that line.
struct Pos<'t> {
    file: &'t str,
    line_text: &'t str,
    line: usize,
    byte: usize,
}

impl Pos<'_> {
    fn error(&self, extra_bytes: usize, expected: &'static str, found: &str) -> MachinesError {
        let byte = (self.byte + extra_bytes).min(self.line_text.len());
        // The offset may land inside a multi-byte character only if a caller
        // miscounted; floor it to a boundary rather than panic.
        let byte = (0..=byte)
            .rev()
            .find(|&b| self.line_text.is_char_boundary(b))
            .unwrap_or(0);
        MachinesError {
            file: self.file.to_owned(),
            line: saturate(self.line),
            column: saturate(self.line_text[..byte].chars().count() + 1),
            expected,
            found: shorten(found),
        }
    }

    fn origin(&self) -> Origin {
        Origin {
            file: self.file.to_owned(),
            line: saturate(self.line),
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_FOUND_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Column separators: Nix tokenizes with " \t\n\r".
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r')
}

/// The whitespace-separated tokens of `entry` with their byte offsets.
fn tokens(entry: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut rest = entry;
    let mut base = 0;
    std::iter::from_fn(move || {
        let start = rest.find(|c| !is_blank(c))?;
        let after = &rest[start..];
        let len = after.find(is_blank).unwrap_or(after.len());
        let token = (base + start, &after[..len]);
        base += start + len;
        rest = &after[len..];
        Some(token)
    })
}

impl Parser<'_> {
    fn source(&mut self, file: &str, text: &str) -> Result<(), MachinesError> {
        for (index, line_text) in text.split('\n').enumerate() {
            let content = line_text.split('#').next().unwrap_or_default();
            let mut piece_start = 0;
            for piece in content.split(';') {
                let start = piece_start;
                piece_start += piece.len() + 1;
                let Some(lead) = piece.find(|c| !is_blank(c)) else {
                    continue;
                };
                let entry = piece.trim_matches(is_blank);
                let pos = Pos {
                    file,
                    line_text,
                    line: index + 1,
                    byte: start + lead,
                };
                match entry.strip_prefix('@') {
                    Some(name) => self.include(name.trim_matches(is_blank), &pos)?,
                    None => self.entry(entry, &pos)?,
                }
            }
        }
        Ok(())
    }

    fn include(&mut self, name: &str, pos: &Pos<'_>) -> Result<(), MachinesError> {
        if name.is_empty() {
            return Err(pos.error(1, "a file name after '@'", "@"));
        }
        if self.stack.len() > MAX_INCLUDE_DEPTH {
            return Err(pos.error(0, "includes nested at most 16 deep", name));
        }
        if self.includes_read >= MAX_INCLUDES {
            return Err(pos.error(0, "at most 1024 includes in total", name));
        }
        self.includes_read += 1;
        let from = self.stack.last().cloned().unwrap_or_default();
        let included = match self.reader.read(name, &from) {
            Ok(Some(included)) => included,
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(pos.error(0, "a readable machines file", &format!("@{name}: {e}")))
            }
        };
        if self.stack.contains(&included.id) {
            return Err(pos.error(
                0,
                "a file that does not include itself",
                &format!("@{name}"),
            ));
        }
        self.stack.push(included.id.clone());
        let result = self.source(&included.id, &included.text);
        self.stack.pop();
        result
    }

    fn entry(&mut self, entry: &str, pos: &Pos<'_>) -> Result<(), MachinesError> {
        let mut columns: [Option<(usize, &str)>; COLUMNS] = [None; COLUMNS];
        for (i, (offset, token)) in tokens(entry).enumerate() {
            let Some(slot) = columns.get_mut(i) else {
                return Err(pos.error(offset, "at most 8 columns", token));
            };
            *slot = (token != "-").then_some((offset, token));
        }
        let fail = |(offset, _): (usize, &str), e: FieldError| {
            pos.error(offset + e.offset, e.expected, &e.found)
        };
        let field = |i: usize| columns.get(i).copied().flatten();

        let Some(uri_col) = field(0) else {
            // Only `-` in the URI column: tokens() yields at least one.
            return Err(pos.error(0, "a nixq:// URI", "-"));
        };
        let uri_text = uri_col.1;
        if !is_nixq(uri_text) {
            return match self.options.foreign_uris {
                ForeignUris::Skip => {
                    self.out.skipped.push(Skipped {
                        origin: pos.origin(),
                        uri: uri_text.to_owned(),
                    });
                    Ok(())
                }
                ForeignUris::Reject => Err(pos.error(
                    uri_col.0,
                    "a nixq:// URI (nixq's hook serves only nixq agents)",
                    uri_text,
                )),
            };
        }
        let uri = parse_uri(uri_text).map_err(|e| fail(uri_col, e))?;

        let systems = match field(1) {
            None => vec![self.options.local_system.to_owned()],
            Some(col) => {
                let list = comma_list(col.1).map_err(|e| fail(col, e))?;
                if list.is_empty() {
                    return Err(fail(col, FieldError::new(0, "a system name", col.1)));
                }
                list
            }
        };
        let identity = field(2).map(|(_, t)| PathBuf::from(t));
        let max_jobs = match field(3) {
            None => 1,
            Some(col) => parse_u32(col.1).ok_or_else(|| {
                fail(
                    col,
                    FieldError::new(0, "an unsigned integer (max jobs)", col.1),
                )
            })?,
        };
        let speed_factor = match field(4) {
            None => SpeedFactor::ONE,
            Some(col) => parse_speed(col.1).map_err(|e| fail(col, e))?,
        };
        let supported_features = match field(5) {
            None => BTreeSet::new(),
            Some(col) => comma_list(col.1)
                .map_err(|e| fail(col, e))?
                .into_iter()
                .collect(),
        };
        let mandatory_features = match field(6) {
            None => BTreeSet::new(),
            Some(col) => comma_list(col.1)
                .map_err(|e| fail(col, e))?
                .into_iter()
                .collect(),
        };
        let agent_ca = match field(7) {
            None => None,
            Some(col) => Some(parse_agent_ca(col.1).map_err(|e| fail(col, e))?),
        };
        self.out.machines.push(MachineSpec {
            uri,
            systems,
            identity,
            max_jobs,
            speed_factor,
            supported_features,
            mandatory_features,
            agent_ca,
            origin: pos.origin(),
        });
        Ok(())
    }
}

fn is_nixq(uri: &str) -> bool {
    uri.strip_prefix(SCHEME)
        .is_some_and(|rest| rest.starts_with("://"))
}

/// A comma-separated list; empty elements are dropped (Nix's
/// `tokenizeString`). Elements must be printable ASCII.
fn comma_list(text: &str) -> Result<Vec<String>, FieldError> {
    if let Some((offset, c)) = text.char_indices().find(|(_, c)| !c.is_ascii_graphic()) {
        return Err(FieldError::new(
            offset,
            "a comma-separated list of printable ASCII names",
            &c.to_string(),
        ));
    }
    Ok(text
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Digits only (no sign), fitting in a u32.
fn parse_u32(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Nix ≥ 2.20: a float; 0 means 1; negative is an error.
fn parse_speed(text: &str) -> Result<SpeedFactor, FieldError> {
    let numeric = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'));
    let value = numeric
        .then(|| text.parse::<f64>().ok())
        .flatten()
        .filter(|v| v.is_finite())
        .ok_or_else(|| FieldError::new(0, "a number (speed factor)", text))?;
    if value < 0.0 {
        return Err(FieldError::new(
            0,
            "a speed factor that is not negative",
            text,
        ));
    }
    Ok(SpeedFactor::new(value).unwrap_or(SpeedFactor::ONE))
}

/// base64 of "-----": how every base64-encoded PEM file begins.
const BASE64_PEM_START: &str = "LS0tLS";

/// Column 8: inline base64 PEM if it looks like one, else a file path.
fn parse_agent_ca(text: &str) -> Result<AgentCa, FieldError> {
    if !text.starts_with(BASE64_PEM_START) {
        return Ok(AgentCa::File(PathBuf::from(text)));
    }
    let pem = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|pem| pem.starts_with("-----BEGIN "))
        .ok_or_else(|| {
            FieldError::new(0, "base64 of a PEM file, or a file path (agent CA)", text)
        })?;
    Ok(AgentCa::Pem(pem))
}

fn parse_uri(uri: &str) -> Result<MachineUri, FieldError> {
    let prefix = "nixq://";
    let Some(rest) = uri.strip_prefix(prefix) else {
        return Err(FieldError::new(0, "a URI starting with nixq://", uri));
    };
    let base = prefix.len();
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    if let Some(i) = authority.find(['/', '@', '#']) {
        return Err(FieldError::new(
            base + i,
            "host[:port] with no user and no path",
            &authority[i..],
        ));
    }
    let (host, port_text, port_at) = split_authority(authority).map_err(|mut e| {
        e.offset += base;
        e
    })?;
    let port = match port_text {
        None => DEFAULT_PORT,
        Some(text) => parse_u32(text)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
            .ok_or_else(|| FieldError::new(base + port_at, "a port number (1-65535)", text))?,
    };
    let params = match query {
        None => UriParams::default(),
        Some(q) => parse_params(q, base + authority.len() + 1)?,
    };
    Ok(MachineUri {
        text: uri.to_owned(),
        host,
        port,
        params,
    })
}

/// Split `host[:port]` / `[v6][:port]`; returns the host, the port text and
/// its offset.
fn split_authority(authority: &str) -> Result<(Host, Option<&str>, usize), FieldError> {
    if let Some(inner) = authority.strip_prefix('[') {
        let Some(close) = inner.find(']') else {
            return Err(FieldError::new(
                0,
                "']' closing the IPv6 address",
                authority,
            ));
        };
        let v6: Ipv6Addr = inner[..close]
            .parse()
            .map_err(|_| FieldError::new(1, "an IPv6 address", &inner[..close]))?;
        let after = &inner[close + 1..];
        let port_at = close + 3;
        return match after.strip_prefix(':') {
            _ if after.is_empty() => Ok((Host::Ip(IpAddr::V6(v6)), None, 0)),
            Some(port) => Ok((Host::Ip(IpAddr::V6(v6)), Some(port), port_at)),
            None => Err(FieldError::new(
                port_at - 1,
                "':' and a port after ']'",
                after,
            )),
        };
    }
    let (host_text, port) = match authority.split_once(':') {
        Some((h, p)) => (h, Some((p, h.len() + 1))),
        None => (authority, None),
    };
    if let Some((p, at)) = port {
        if p.contains(':') {
            return Err(FieldError::new(
                at,
                "a port (an IPv6 address must be written in brackets)",
                p,
            ));
        }
    }
    let host = parse_host(host_text)?;
    Ok(match port {
        Some((p, at)) => (host, Some(p), at),
        None => (host, None, 0),
    })
}

/// A DNS name or an IPv4 address.
fn parse_host(text: &str) -> Result<Host, FieldError> {
    if let Ok(v4) = text.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(v4)));
    }
    validate_dns_name(text)?;
    Ok(Host::Name(text.to_owned()))
}

/// RFC 1123 host names (plus `_`, which some internal zones use): labels of
/// 1–63 letters, digits, `-`, `_`, not starting or ending with `-`; 253
/// characters at most.
fn validate_dns_name(text: &str) -> Result<(), FieldError> {
    const EXPECTED: &str = "a host name or IP address";
    if text.is_empty() || text.len() > 253 {
        return Err(FieldError::new(0, EXPECTED, text));
    }
    let mut offset = 0;
    for label in text.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(FieldError::new(offset, EXPECTED, label));
        }
        offset += label.len() + 1;
    }
    Ok(())
}

fn parse_params(query: &str, base: usize) -> Result<UriParams, FieldError> {
    let mut params = UriParams::default();
    let mut offset = base;
    for pair in query.split('&') {
        let at = offset;
        offset += pair.len() + 1;
        let Some((key, value)) = pair.split_once('=') else {
            return Err(FieldError::new(at, "a key=value parameter", pair));
        };
        let value_at = at + key.len() + 1;
        let duplicate = || FieldError::new(at, "each parameter at most once", key);
        match key {
            "compress" => {
                let c = parse_compress(value).ok_or_else(|| {
                    FieldError::new(value_at, "none, zstd or zstd:LEVEL (1-22)", value)
                })?;
                if params.compress.replace(c).is_some() {
                    return Err(duplicate());
                }
            }
            "tls-name" => {
                validate_dns_name(value).map_err(|mut e| {
                    e.offset += value_at;
                    e
                })?;
                if params.tls_name.replace(value.to_owned()).is_some() {
                    return Err(duplicate());
                }
            }
            "connect-timeout" => {
                let secs = parse_u32(value)
                    .filter(|s| (1..=3600).contains(s))
                    .ok_or_else(|| FieldError::new(value_at, "seconds (1-3600)", value))?;
                let timeout = Duration::from_secs(u64::from(secs));
                if params.connect_timeout.replace(timeout).is_some() {
                    return Err(duplicate());
                }
            }
            "max-load" => {
                let limit = value
                    .parse::<f64>()
                    .ok()
                    .and_then(MaxLoad::new)
                    .ok_or_else(|| {
                        FieldError::new(value_at, "a load average (a number > 0)", value)
                    })?;
                if params.max_load.replace(limit).is_some() {
                    return Err(duplicate());
                }
            }
            _ => {
                return Err(FieldError::new(
                    at,
                    "a known parameter (compress, tls-name, connect-timeout, max-load)",
                    key,
                ))
            }
        }
    }
    Ok(params)
}

fn parse_compress(value: &str) -> Option<Compression> {
    match value {
        "none" => Some(Compression::None),
        "zstd" => Some(Compression::Zstd {
            level: DEFAULT_ZSTD_LEVEL,
        }),
        _ => {
            let level = value.strip_prefix("zstd:")?;
            let level = i32::try_from(parse_u32(level)?).ok()?;
            (1..=MAX_ZSTD_LEVEL)
                .contains(&level)
                .then_some(Compression::Zstd { level })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const LOCAL: &str = "x86_64-linux";

    fn options() -> ParseOptions<'static> {
        ParseOptions {
            local_system: LOCAL,
            foreign_uris: ForeignUris::Reject,
        }
    }

    /// An in-memory file system for includes; the id is the name.
    fn files(map: &[(&str, &str)]) -> impl FnMut(&str, &str) -> io::Result<Option<Included>> {
        let map: BTreeMap<String, String> = map
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name: &str, _from: &str| {
            Ok(map.get(name).map(|text| Included {
                id: name.to_owned(),
                text: text.clone(),
            }))
        }
    }

    fn no_files() -> impl FnMut(&str, &str) -> io::Result<Option<Included>> {
        files(&[])
    }

    fn parse_ok(text: &str) -> Vec<MachineSpec> {
        parse("machines", text, &options(), &mut no_files())
            .expect("parses")
            .machines
    }

    fn parse_err(text: &str) -> MachinesError {
        parse("machines", text, &options(), &mut no_files()).expect_err("is rejected")
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn hosts(machines: &[MachineSpec]) -> Vec<String> {
        machines.iter().map(|m| m.uri.host.to_string()).collect()
    }

    #[test]
    fn all_eight_columns() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let b64 = base64::engine::general_purpose::STANDARD.encode(pem);
        let line = format!(
            "nixq://b1.example:9000?compress=zstd:5 x86_64-linux,aarch64-linux /etc/nixq/master.pem 4 2.5 kvm,big-parallel perf {b64}"
        );
        let m = &parse_ok(&line)[0];
        assert_eq!(m.uri.host, Host::Name("b1.example".into()));
        assert_eq!(m.uri.port, 9000);
        assert_eq!(m.uri.params.compress, Some(Compression::Zstd { level: 5 }));
        assert_eq!(m.systems, ["x86_64-linux", "aarch64-linux"]);
        assert_eq!(m.identity, Some(PathBuf::from("/etc/nixq/master.pem")));
        assert_eq!(m.max_jobs, 4);
        assert_eq!(m.speed_factor.get(), 2.5);
        assert_eq!(m.supported_features, set(&["kvm", "big-parallel"]));
        assert_eq!(m.mandatory_features, set(&["perf"]));
        assert_eq!(m.agent_ca, Some(AgentCa::Pem(pem.into())));
        assert_eq!(
            m.origin,
            Origin {
                file: "machines".into(),
                line: 1
            }
        );
    }

    #[test]
    fn dashes_and_missing_columns_are_defaults() {
        for text in ["nixq://h", "nixq://h - - - - - - -", "nixq://h\t-  -"] {
            let m = &parse_ok(text)[0];
            assert_eq!(m.uri.port, DEFAULT_PORT);
            assert_eq!(m.uri.params, UriParams::default());
            assert_eq!(m.systems, [LOCAL]);
            assert_eq!(m.identity, None);
            assert_eq!(m.max_jobs, 1);
            assert_eq!(m.speed_factor, SpeedFactor::ONE);
            assert!(m.supported_features.is_empty() && m.mandatory_features.is_empty());
            assert_eq!(m.agent_ca, None);
        }
        // A `-` in the middle, values after it.
        let m = &parse_ok("nixq://h - - 3")[0];
        assert_eq!(
            (m.systems.as_slice(), m.max_jobs),
            ([LOCAL.to_owned()].as_slice(), 3)
        );
    }

    #[test]
    fn separators_and_comments() {
        let text = "# a farm\nnixq://a ; nixq://b\n\n  nixq://c # the third\r\n;;\nnixq://d # c ; nixq://hidden\n";
        let machines = parse_ok(text);
        assert_eq!(hosts(&machines), ["a", "b", "c", "d"]);
        let lines: Vec<u32> = machines.iter().map(|m| m.origin.line).collect();
        assert_eq!(lines, [2, 2, 4, 6]);
        assert!(parse_ok("").is_empty());
        assert!(parse_ok(" ;\n# only comments\n").is_empty());
    }

    #[test]
    fn includes_expand_in_place_and_missing_ones_are_ignored() {
        let mut reader = files(&[
            ("/etc/nix/machines", "nixq://b\n@/etc/nix/more\n"),
            ("/etc/nix/more", "nixq://c"),
        ]);
        let out = parse(
            "builders",
            "nixq://a; @/etc/nix/machines ;@/nonexistent;  @ /etc/nix/more",
            &options(),
            &mut reader,
        )
        .expect("parses");
        assert_eq!(hosts(&out.machines), ["a", "b", "c", "c"]);
        let origins: Vec<(&str, u32)> = out
            .machines
            .iter()
            .map(|m| (m.origin.file.as_str(), m.origin.line))
            .collect();
        assert_eq!(
            origins,
            [
                ("builders", 1),
                ("/etc/nix/machines", 1),
                ("/etc/nix/more", 1),
                ("/etc/nix/more", 1)
            ]
        );
    }

    #[test]
    fn include_errors_name_the_file_and_line() {
        let mut reader = files(&[("inc", "nixq://ok\nnixq://h - - abc")]);
        let err = parse("builders", "@inc", &options(), &mut reader).expect_err("bad");
        assert_eq!(
            err.to_string(),
            "inc:2:14: expected an unsigned integer (max jobs), found 'abc'"
        );
    }

    #[test]
    fn include_cycles_and_depth_are_bounded() {
        let mut reader = files(&[("a", "@b"), ("b", "nixq://x\n@a")]);
        let err = parse("builders", "@a", &options(), &mut reader).expect_err("cycle");
        assert_eq!(err.file, "b");
        assert_eq!(err.line, 2);
        assert_eq!(err.expected, "a file that does not include itself");

        // A chain deeper than the limit: f0 → f1 → … (no cycle).
        let chain: Vec<(String, String)> = (0..40)
            .map(|i| (format!("f{i}"), format!("@f{}", i + 1)))
            .collect();
        let chain: Vec<(&str, &str)> = chain
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let err = parse("builders", "@f0", &options(), &mut files(&chain)).expect_err("deep");
        assert_eq!(err.expected, "includes nested at most 16 deep");

        // Fan-out without a cycle: 2^12 expansions are cut at MAX_INCLUDES.
        let fan: Vec<(String, String)> = (0..12)
            .map(|i| (format!("g{i}"), format!("@g{0}\n@g{0}", i + 1)))
            .collect();
        let fan: Vec<(&str, &str)> = fan.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let err = parse("builders", "@g0", &options(), &mut files(&fan)).expect_err("fan-out");
        assert_eq!(err.expected, "at most 1024 includes in total");
    }

    #[test]
    fn unreadable_include_is_an_error() {
        let mut reader = |_: &str, _: &str| -> io::Result<Option<Included>> {
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        };
        let err = parse("builders", "  @/root/m", &options(), &mut reader).expect_err("io");
        assert_eq!((err.line, err.column), (1, 3));
        assert_eq!(err.expected, "a readable machines file");
        assert!(
            err.found.starts_with("@/root/m: permission denied"),
            "{err}"
        );
    }

    #[test]
    fn fs_includes_resolve_relative_to_the_including_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = dir.path().join("machines");
        std::fs::write(&main, "nixq://a\n@extra\n@missing").expect("write");
        std::fs::write(dir.path().join("extra"), "nixq://b").expect("write");
        let main = main.to_str().expect("utf-8 temp path");
        let out =
            parse("builders", &format!("@{main}"), &options(), &mut FsIncludes).expect("parses");
        assert_eq!(hosts(&out.machines), ["a", "b"]);
    }

    #[test]
    fn nix_2_8_error_examples() {
        // §4.1: 2.8 rejected these with "failed to convert column #3 / #4".
        let err = parse_err("nixq://h x86_64-linux - abc");
        assert_eq!(
            err.to_string(),
            "machines:1:25: expected an unsigned integer (max jobs), found 'abc'"
        );
        // A float speed factor is fine since Nix 2.20.
        assert_eq!(
            parse_ok("nixq://h x86_64-linux - 1 1.5")[0]
                .speed_factor
                .get(),
            1.5
        );
        // Column 8 must decode (2.8: "is not valid base64 string").
        let err = parse_err("nixq://h - - - - - - LS0tLS1!!!");
        assert_eq!(err.column, 22);
        assert_eq!(
            err.expected,
            "base64 of a PEM file, or a file path (agent CA)"
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_ok("nixq://h - - 0")[0].max_jobs, 0);
        assert_eq!(parse_ok("nixq://h - - 4294967295")[0].max_jobs, u32::MAX);
        for bad in ["-1", "+1", "1.0", "4294967296", "1e3", "٣"] {
            let err = parse_err(&format!("nixq://h - - {bad}"));
            assert_eq!(err.expected, "an unsigned integer (max jobs)", "{bad}");
        }
        assert_eq!(
            parse_ok("nixq://h - - - 0")[0].speed_factor,
            SpeedFactor::ONE
        );
        assert_eq!(
            parse_ok("nixq://h - - - 0.0")[0].speed_factor,
            SpeedFactor::ONE
        );
        assert_eq!(parse_ok("nixq://h - - - 3")[0].speed_factor.get(), 3.0);
        assert_eq!(parse_ok("nixq://h - - - 2e1")[0].speed_factor.get(), 20.0);
        assert_eq!(
            parse_err("nixq://h - - - -2").expected,
            "a speed factor that is not negative"
        );
        for bad in ["inf", "NaN", "1e999", "fast", "1,5", ""] {
            if bad.is_empty() {
                continue;
            }
            assert_eq!(
                parse_err(&format!("nixq://h - - - {bad}")).expected,
                "a number (speed factor)",
                "{bad}"
            );
        }
    }

    #[test]
    fn agent_ca_forms() {
        assert_eq!(
            parse_ok("nixq://h - - - - - - /etc/nixq/ca.pem")[0].agent_ca,
            Some(AgentCa::File("/etc/nixq/ca.pem".into()))
        );
        assert_eq!(
            parse_ok("nixq://h - - - - - - ca.pem")[0].agent_ca,
            Some(AgentCa::File("ca.pem".into()))
        );
        // Valid base64, but not of a PEM file.
        let not_pem = base64::engine::general_purpose::STANDARD.encode("-----hello");
        assert!(not_pem.starts_with(BASE64_PEM_START));
        parse_err(&format!("nixq://h - - - - - - {not_pem}"));
    }

    #[test]
    fn too_many_columns() {
        let err = parse_err("nixq://h - - - - - - - extra");
        assert_eq!(
            err.to_string(),
            "machines:1:24: expected at most 8 columns, found 'extra'"
        );
    }

    #[test]
    fn feature_lists() {
        let m = &parse_ok("nixq://h a,,b - - - kvm,,kvm, ,")[0];
        assert_eq!(m.systems, ["a", "b"]);
        assert_eq!(m.supported_features, set(&["kvm"]));
        // The lone "," is an empty list of mandatory features.
        assert!(m.mandatory_features.is_empty());
        assert_eq!(parse_err("nixq://h ,").expected, "a system name");
        assert_eq!(
            parse_err("nixq://h - - - - kvm,é").column,
            22,
            "the column counts characters"
        );
    }

    #[test]
    fn uris() {
        let uri = MachineUri::parse("nixq://[fd00::2]:7000?tls-name=s1.farm&connect-timeout=5")
            .expect("parses");
        assert_eq!(uri.host, Host::Ip("fd00::2".parse().expect("v6")));
        assert_eq!(uri.port, 7000);
        assert_eq!(uri.server_name(), "s1.farm");
        assert_eq!(uri.params.connect_timeout, Some(Duration::from_secs(5)));
        assert_eq!(uri.params.max_load, None);
        let limited = MachineUri::parse("nixq://h?max-load=1.5&compress=none").expect("parses");
        assert_eq!(limited.params.max_load, MaxLoad::new(1.5));
        assert_eq!(limited.params.max_load.map(MaxLoad::get), Some(1.5));
        assert_eq!(limited.params.compress, Some(Compression::None));
        assert_eq!(
            MachineUri::parse("nixq://h?max-load=8")
                .expect("parses")
                .params
                .max_load
                .map(MaxLoad::get),
            Some(8.0)
        );
        let limit = MaxLoad::new(2.0).expect("valid");
        assert!(limit.exceeded_by(2.01) && !limit.exceeded_by(2.0));
        assert!(MaxLoad::new(0.0).is_none() && MaxLoad::new(f64::NAN).is_none());
        assert_eq!(
            uri.to_string(),
            "nixq://[fd00::2]:7000?tls-name=s1.farm&connect-timeout=5"
        );

        let uri = MachineUri::parse("nixq://[::1]").expect("parses");
        assert_eq!(
            (uri.host.to_string(), uri.port),
            ("[::1]".to_owned(), DEFAULT_PORT)
        );
        assert_eq!(uri.server_name(), "::1");
        let uri = MachineUri::parse("nixq://10.0.0.2:1?compress=none").expect("parses");
        assert_eq!(uri.host, Host::Ip("10.0.0.2".parse().expect("v4")));
        assert_eq!(uri.params.compress, Some(Compression::None));
        assert_eq!(
            MachineUri::parse("nixq://h?compress=zstd")
                .expect("parses")
                .params
                .compress,
            Some(Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL
            })
        );

        let cases: &[(&str, usize, &str)] = &[
            ("nixq://", 7, "a host name or IP address"),
            ("nixq://:7461", 7, "a host name or IP address"),
            ("nixq://h:0", 9, "a port number (1-65535)"),
            ("nixq://h:65536", 9, "a port number (1-65535)"),
            ("nixq://h:", 9, "a port number (1-65535)"),
            ("nixq://h:x", 9, "a port number (1-65535)"),
            (
                "nixq://fd00::2",
                12,
                "a port (an IPv6 address must be written in brackets)",
            ),
            ("nixq://[fd00::2", 7, "']' closing the IPv6 address"),
            ("nixq://[zz::1]", 8, "an IPv6 address"),
            ("nixq://[::1]x", 12, "':' and a port after ']'"),
            ("nixq://root@h", 11, "host[:port] with no user and no path"),
            ("nixq://h/store", 8, "host[:port] with no user and no path"),
            ("nixq://a..b", 9, "a host name or IP address"),
            ("nixq://-a", 7, "a host name or IP address"),
            (
                "nixq://h?compress=gzip",
                18,
                "none, zstd or zstd:LEVEL (1-22)",
            ),
            (
                "nixq://h?compress=zstd:0",
                18,
                "none, zstd or zstd:LEVEL (1-22)",
            ),
            (
                "nixq://h?compress=zstd:23",
                18,
                "none, zstd or zstd:LEVEL (1-22)",
            ),
            (
                "nixq://h?compress=none&compress=zstd",
                23,
                "each parameter at most once",
            ),
            (
                "nixq://h?level=3",
                9,
                "a known parameter (compress, tls-name, connect-timeout, max-load)",
            ),
            ("nixq://h?compress", 9, "a key=value parameter"),
            ("nixq://h?connect-timeout=0", 25, "seconds (1-3600)"),
            ("nixq://h?max-load=0", 18, "a load average (a number > 0)"),
            ("nixq://h?max-load=-1", 18, "a load average (a number > 0)"),
            ("nixq://h?max-load=inf", 18, "a load average (a number > 0)"),
            ("nixq://h?max-load=NaN", 18, "a load average (a number > 0)"),
            ("nixq://h?max-load=", 18, "a load average (a number > 0)"),
            ("nixq://h?max-load=two", 18, "a load average (a number > 0)"),
            (
                "nixq://h?max-load=2&max-load=3",
                20,
                "each parameter at most once",
            ),
            (
                "nixq://h?tls-name=a_b.c&tls-name=x",
                24,
                "each parameter at most once",
            ),
            ("nixq://h?tls-name=bad!", 18, "a host name or IP address"),
        ];
        for (uri, offset, expected) in cases {
            let err = MachineUri::parse(uri).expect_err(uri);
            assert_eq!(
                (err.offset, err.expected),
                (*offset, *expected),
                "{uri}: {err}"
            );
        }
    }

    #[test]
    fn uri_errors_have_file_columns() {
        let err = parse_err("\n  nixq://h:99999 x86_64-linux");
        assert_eq!(
            err.to_string(),
            "machines:2:12: expected a port number (1-65535), found '99999'"
        );
    }

    #[test]
    fn foreign_uris_are_rejected_or_skipped() {
        for uri in ["ssh://b1", "ssh-ng://root@b1", "b1", "nixq:/h", "NIXQ://h"] {
            let err = parse_err(&format!("nixq://ok; {uri} x86_64-linux"));
            assert_eq!(
                (err.column, err.expected),
                (12, "a nixq:// URI (nixq's hook serves only nixq agents)"),
                "{uri}"
            );
        }
        let skip = ParseOptions {
            foreign_uris: ForeignUris::Skip,
            ..options()
        };
        let out = parse("m", "ssh://a\nnixq://b\nc 4", &skip, &mut no_files()).expect("parses");
        assert_eq!(hosts(&out.machines), ["b"]);
        let skipped: Vec<(&str, u32)> = out
            .skipped
            .iter()
            .map(|s| (s.uri.as_str(), s.origin.line))
            .collect();
        assert_eq!(skipped, [("ssh://a", 1), ("c", 3)]);
        // `-` for the URI is not a URI either.
        assert_eq!(parse_err("- x86_64-linux").expected, "a nixq:// URI");
    }

    #[test]
    fn found_is_shortened() {
        let long = "x".repeat(500);
        let err = parse_err(&format!("nixq://h - - {long}"));
        assert_eq!(err.found.chars().count(), MAX_FOUND_CHARS + 1);
    }

    fn machine(text: &str) -> MachineSpec {
        parse_ok(text).remove(0)
    }

    #[test]
    fn eligibility() {
        let plain = machine("nixq://a x86_64-linux,i686-linux");
        let kvm = machine("nixq://b x86_64-linux - 1 1 kvm,big-parallel");
        let perf = machine("nixq://c x86_64-linux - 1 1 kvm perf");
        let none = set(&[]);
        assert!(eligible(&plain, "x86_64-linux", &none));
        assert!(eligible(&plain, "i686-linux", &none));
        assert!(!eligible(&plain, "aarch64-linux", &none));
        assert!(eligible(&plain, "builtin", &none));
        assert!(!eligible(&plain, "x86_64-linux", &set(&["kvm"])));
        assert!(eligible(&kvm, "x86_64-linux", &set(&["kvm"])));
        assert!(eligible(
            &kvm,
            "x86_64-linux",
            &set(&["kvm", "big-parallel"])
        ));
        assert!(!eligible(&kvm, "x86_64-linux", &set(&["kvm", "perf"])));
        // Mandatory features: only jobs that ask for them; they count as supported.
        assert!(!eligible(&perf, "x86_64-linux", &none));
        assert!(!eligible(&perf, "x86_64-linux", &set(&["kvm"])));
        assert!(eligible(&perf, "x86_64-linux", &set(&["perf"])));
        assert!(eligible(&perf, "x86_64-linux", &set(&["perf", "kvm"])));
        // Max jobs 0 is still eligible (it just never has a free slot).
        assert!(eligible(&machine("nixq://d - - 0"), LOCAL, &none));
    }

    #[test]
    fn local_builds() {
        let systems = vec!["x86_64-linux".to_owned(), "i686-linux".to_owned()];
        let features = set(&["kvm"]);
        assert!(can_build_locally(
            true,
            &systems,
            &features,
            "i686-linux",
            &set(&["kvm"])
        ));
        assert!(!can_build_locally(
            false,
            &systems,
            &features,
            "i686-linux",
            &set(&[])
        ));
        assert!(!can_build_locally(
            true,
            &systems,
            &features,
            "aarch64-linux",
            &set(&[])
        ));
        assert!(!can_build_locally(
            true,
            &systems,
            &features,
            "x86_64-linux",
            &set(&["perf"])
        ));
    }

    fn cand(index: usize, load: u32, max_jobs: u32, speed: f64) -> Candidate {
        Candidate {
            index,
            load,
            max_jobs,
            speed_factor: SpeedFactor::new(speed).expect("positive"),
        }
    }

    #[test]
    fn choice_rule() {
        // §4.2: two idle machines with speed 1 and 2 → the speed-2 one.
        assert_eq!(choose(&[cand(0, 0, 1, 1.0), cand(1, 0, 1, 2.0)]), Some(1));
        // Least load / speed: 1/1 = 1 beats 3/2 = 1.5 (2.8's integer division would tie).
        assert_eq!(choose(&[cand(0, 3, 8, 2.0), cand(1, 1, 8, 1.0)]), Some(1));
        // Equal ratio and speed: the smaller load… (2/2 vs 2/2 same load → earlier)
        assert_eq!(choose(&[cand(0, 2, 8, 2.0), cand(1, 2, 8, 2.0)]), Some(0));
        // Equal ratio (0) and speed: earlier wins.
        assert_eq!(choose(&[cand(7, 0, 1, 1.0), cand(3, 0, 1, 1.0)]), Some(7));
        // Full machines are skipped; max jobs 0 is never chosen.
        assert_eq!(
            choose(&[cand(0, 1, 1, 9.0), cand(1, 0, 0, 9.0), cand(2, 5, 6, 1.0)]),
            Some(2)
        );
        assert_eq!(choose(&[cand(0, 1, 1, 1.0)]), None);
        assert_eq!(choose(&[]), None);
    }

    /// A small deterministic generator for the property tests (no external
    /// crate: xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn choice_matches_a_sort_by_the_rule() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..5000 {
            let n = rng.below(6) as usize;
            let cands: Vec<Candidate> = (0..n)
                .map(|i| {
                    let speed = [0.5, 1.0, 1.5, 2.0, 3.0][rng.below(5) as usize];
                    cand(i, rng.below(4) as u32, rng.below(4) as u32, speed)
                })
                .collect();
            // Reference: the free candidate minimal by (ratio, -speed, load, position).
            let expected = cands
                .iter()
                .filter(|c| c.load < c.max_jobs)
                .min_by(|a, b| {
                    score(a)
                        .total_cmp(&score(b))
                        .then(b.speed_factor.get().total_cmp(&a.speed_factor.get()))
                        .then(a.load.cmp(&b.load))
                        .then(a.index.cmp(&b.index))
                })
                .map(|c| c.index);
            assert_eq!(choose(&cands), expected, "{cands:?}");
        }
    }

    #[test]
    fn decisions() {
        let input = |machines_configured, any_eligible, chosen, can_build_locally| DecisionInput {
            machines_configured,
            any_eligible,
            chosen,
            can_build_locally,
        };
        assert_eq!(
            decide(input(false, false, None, false)),
            Decision::DeclinePermanently
        );
        assert_eq!(
            decide(input(true, true, Some(2), false)),
            Decision::Accept(2)
        );
        assert_eq!(
            decide(input(true, true, Some(2), true)),
            Decision::Accept(2)
        );
        assert_eq!(decide(input(true, true, None, false)), Decision::Postpone);
        assert_eq!(
            decide(input(true, true, None, true)),
            Decision::Decline { warn: false }
        );
        assert_eq!(
            decide(input(true, false, None, false)),
            Decision::Decline { warn: true }
        );
        assert_eq!(
            decide(input(true, false, None, true)),
            Decision::Decline { warn: false }
        );
        // `builders = ""` parses to no machines: decline permanently.
        assert!(parse_ok("").is_empty());
    }

    /// Render random specs with random spacing, separators, comments and
    /// dashes; parsing gives back exactly the specs.
    #[test]
    fn rendered_specs_parse_back() {
        let mut rng = Rng(42);
        let names = ["kvm", "big-parallel", "perf", "nixos-test", "benchmark"];
        let blanks = [" ", "\t", "  ", " \t "];
        for _ in 0..2000 {
            let mut text = String::new();
            let mut expected = Vec::new();
            for line in 1..=(1 + rng.below(4)) {
                let host = format!("b{}.farm", rng.below(100));
                let port = 1 + rng.below(65535) as u16;
                let uri = if rng.below(2) == 0 {
                    format!("nixq://{host}")
                } else {
                    format!("nixq://{host}:{port}")
                };
                let systems: Vec<String> = (0..rng.below(3))
                    .map(|i| ["x86_64-linux", "aarch64-linux", "i686-linux"][i as usize].to_owned())
                    .collect();
                let max_jobs = rng.below(10) as u32;
                let speed = rng.below(40) as f64 / 4.0;
                let pick = |rng: &mut Rng| -> BTreeSet<String> {
                    names
                        .iter()
                        .filter(|_| rng.below(3) == 0)
                        .map(|s| (*s).to_owned())
                        .collect()
                };
                let supported = pick(&mut rng);
                let mandatory = pick(&mut rng);
                let join = |s: &BTreeSet<String>| {
                    if s.is_empty() {
                        "-".to_owned()
                    } else {
                        s.iter().cloned().collect::<Vec<_>>().join(",")
                    }
                };
                let cols = [
                    uri.clone(),
                    if systems.is_empty() {
                        "-".into()
                    } else {
                        systems.join(",")
                    },
                    "-".into(),
                    max_jobs.to_string(),
                    speed.to_string(),
                    join(&supported),
                    join(&mandatory),
                    "-".into(),
                ];
                let keep = 1 + rng.below(8) as usize;
                for (i, col) in cols.iter().take(keep).enumerate() {
                    if i > 0 {
                        text.push_str(blanks[rng.below(4) as usize]);
                    }
                    text.push_str(col);
                }
                text.push_str(["\n", ";", " # comment\n", "\r\n"][rng.below(4) as usize]);
                let _ = line;
                expected.push((
                    uri,
                    if keep < 2 || systems.is_empty() {
                        vec![LOCAL.to_owned()]
                    } else {
                        systems
                    },
                    if keep < 4 { 1 } else { max_jobs },
                    if keep < 5 || speed == 0.0 { 1.0 } else { speed },
                    if keep < 6 { BTreeSet::new() } else { supported },
                    if keep < 7 { BTreeSet::new() } else { mandatory },
                ));
            }
            let got: Vec<_> = parse_ok(&text)
                .into_iter()
                .map(|m| {
                    (
                        m.uri.text,
                        m.systems,
                        m.max_jobs,
                        m.speed_factor.get(),
                        m.supported_features,
                        m.mandatory_features,
                    )
                })
                .collect();
            assert_eq!(got, expected, "{text:?}");
        }
    }

    /// Random bytes from a machines-ish alphabet never panic, and every error
    /// points inside the text.
    #[test]
    fn garbage_never_panics() {
        let alphabet: Vec<char> = "nixq:/[]@;#,-. \t\n\r?=&0123456789abcdefé:zstd"
            .chars()
            .collect();
        let mut rng = Rng(7);
        for _ in 0..20_000 {
            let len = rng.below(60) as usize;
            let mut text: String = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
                .collect();
            if rng.below(2) == 0 {
                text.insert_str(0, "nixq://");
            }
            let mut reader = files(&[("a", "nixq://x;@a"), ("b", "nixq://y 1")]);
            if let Err(err) = parse("m", &text, &options(), &mut reader) {
                let lines: Vec<&str> = text.split('\n').collect();
                if err.file == "m" {
                    let line = lines[err.line as usize - 1];
                    assert!(
                        err.column as usize <= line.chars().count() + 1,
                        "{err} in {text:?}"
                    );
                }
            }
        }
    }
}
