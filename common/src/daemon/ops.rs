//! Operation codes, the protocol version table and the request/result types
//! of the worker protocol (nix-interfaces.md §5.1, §5.3 – §5.8). Requests are
//! encoded here, purely; results are read by `client.rs`.
//!
//! | minor | what nixq gates on it |
//! |-------|------------------------|
//! | 1.21  | oldest accepted (Nix 2.1 – 2.3): AddToStoreNar pulled with `STDERR_READ` |
//! | 1.23  | AddToStoreNar as a framed stream |
//! | 1.26  | structured `STDERR_ERROR` |
//! | 1.27  | `substitute` flag of QueryValidPaths |
//! | 1.28  | `builtOutputs` in BuildResult |
//! | 1.29  | `timesBuilt`, `isNonDeterministic`, start/stop time in BuildResult |
//! | 1.30  | DerivedPath `drv!*` |
//! | 1.33  | the daemon sends its Nix version |
//! | 1.34  | BuildPathsWithResults (Nix 2.8 – 2.14) |
//! | 1.35  | the daemon sends the client's trust status |
//! | 1.37  | CPU times in BuildResult |
//! | 1.38  | feature negotiation (nixq announces no features) |

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::wire::{Encoder, WireError};
use crate::drv::BasicDerivation;
use crate::path_info::PathInfo;
use crate::store_path::StorePath;

/// First handshake word, client → daemon: "cxin".
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
/// Second handshake word, daemon → client: "oixd".
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;

/// A worker-protocol version, `major << 8 | minor`; the major is always 1.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion(u16);

impl ProtocolVersion {
    /// Oldest version nixq speaks: 1.21, Nix 2.3 (§5.8).
    pub const MIN: Self = Self::from_minor(21);
    /// Newest version nixq speaks and announces by default: 1.38, with an
    /// empty feature list (§5.8).
    pub const LATEST: Self = Self::from_minor(38);

    pub const fn from_minor(minor: u8) -> Self {
        Self(0x100 | minor as u16)
    }

    /// A version word from the wire; `None` unless the major is 1 and the
    /// value fits.
    pub fn from_wire(value: u64) -> Option<Self> {
        (value >> 8 == 1).then_some(Self(value as u16))
    }

    pub const fn to_wire(self) -> u64 {
        self.0 as u64
    }

    pub const fn minor(self) -> u8 {
        (self.0 & 0xff) as u8
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "1.{}", self.minor())
    }
}

impl fmt::Debug for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProtocolVersion(1.{})", self.minor())
    }
}

/// Operation codes (§5.3) of the operations nixq uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Op {
    IsValidPath = 1,
    BuildPaths = 9,
    AddTempRoot = 11,
    SetOptions = 19,
    QueryPathInfo = 26,
    QueryValidPaths = 31,
    BuildDerivation = 36,
    NarFromPath = 38,
    AddToStoreNar = 39,
    QueryMissing = 40,
    BuildPathsWithResults = 46,
}

impl Op {
    pub const fn code(self) -> u64 {
        self as u64
    }

    /// The name Nix's source uses, for error messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::IsValidPath => "IsValidPath",
            Self::BuildPaths => "BuildPaths",
            Self::AddTempRoot => "AddTempRoot",
            Self::SetOptions => "SetOptions",
            Self::QueryPathInfo => "QueryPathInfo",
            Self::QueryValidPaths => "QueryValidPaths",
            Self::BuildDerivation => "BuildDerivation",
            Self::NarFromPath => "NarFromPath",
            Self::AddToStoreNar => "AddToStoreNar",
            Self::QueryMissing => "QueryMissing",
            Self::BuildPathsWithResults => "BuildPathsWithResults",
        }
    }
}

/// Build mode of BuildPaths and BuildDerivation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BuildMode {
    #[default]
    Normal = 0,
    /// Needs a trusted client.
    Repair = 1,
    Check = 2,
}

/// Verbosity levels of Nix (`lvlError` … `lvlVomit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub enum Verbosity {
    #[default]
    Error = 0,
    Warn = 1,
    Notice = 2,
    Info = 3,
    Talkative = 4,
    Chatty = 5,
    Debug = 6,
    Vomit = 7,
}

/// The settings sent with SetOptions (§5.5). Trusted clients (a private
/// `nix-daemon --stdio` always is one) may override any setting through
/// `overrides`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    /// Log messages (`STDERR_NEXT`) above this level are not sent.
    pub verbosity: Verbosity,
    pub max_build_jobs: u64,
    /// Seconds; 0 = no limit.
    pub max_silent_time: u64,
    /// Builder output goes to the daemon's log as errors too (Nix's
    /// `verbose-build`); build log lines reach the client either way, as
    /// `STDERR_RESULT` 101.
    pub verbose_build: bool,
    /// 0 = all cores.
    pub build_cores: u64,
    pub use_substitutes: bool,
    /// Other settings by name, e.g. `sandbox` = `false`.
    pub overrides: BTreeMap<String, String>,
}

impl Default for ClientSettings {
    /// Nix's own defaults for the fixed fields, except that substitution is
    /// off: nixq moves paths itself and must not reach out to caches unasked.
    fn default() -> Self {
        Self {
            keep_failed: false,
            keep_going: false,
            try_fallback: false,
            verbosity: Verbosity::Error,
            max_build_jobs: 1,
            max_silent_time: 0,
            verbose_build: true,
            build_cores: 0,
            use_substitutes: false,
            overrides: BTreeMap::new(),
        }
    }
}

/// What to build: a store path as is, or outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DerivedPath {
    Opaque(StorePath),
    Built {
        drv: StorePath,
        outputs: OutputsSpec,
    },
}

/// Which outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OutputsSpec {
    All,
    /// Non-empty.
    Names(BTreeSet<String>),
}

impl DerivedPath {
    /// The wire string (§5.7): `drv!out,doc`, `drv!*` (≥ 1.30) or the bare
    /// `.drv` path for all outputs before 1.30.
    pub fn to_wire(&self, version: ProtocolVersion) -> String {
        match self {
            Self::Opaque(path) => path.to_string(),
            Self::Built {
                drv,
                outputs: OutputsSpec::All,
            } if version.minor() < 30 => drv.to_string(),
            Self::Built {
                drv,
                outputs: OutputsSpec::All,
            } => format!("{drv}!*"),
            Self::Built {
                drv,
                outputs: OutputsSpec::Names(names),
            } => {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                format!("{drv}!{}", names.join(","))
            }
        }
    }
}

/// Status of a BuildResult (§5.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildStatus {
    Built = 0,
    Substituted = 1,
    AlreadyValid = 2,
    PermanentFailure = 3,
    InputRejected = 4,
    OutputRejected = 5,
    TransientFailure = 6,
    CachedFailure = 7,
    TimedOut = 8,
    MiscFailure = 9,
    DependencyFailed = 10,
    LogLimitExceeded = 11,
    NotDeterministic = 12,
    ResolvesToAlreadyValid = 13,
    NoSubstituters = 14,
}

impl BuildStatus {
    pub fn from_wire(value: u64) -> Result<Self, WireError> {
        use BuildStatus::*;
        const ALL: [BuildStatus; 15] = [
            Built,
            Substituted,
            AlreadyValid,
            PermanentFailure,
            InputRejected,
            OutputRejected,
            TransientFailure,
            CachedFailure,
            TimedOut,
            MiscFailure,
            DependencyFailed,
            LogLimitExceeded,
            NotDeterministic,
            ResolvesToAlreadyValid,
            NoSubstituters,
        ];
        usize::try_from(value)
            .ok()
            .and_then(|i| ALL.get(i).copied())
            .ok_or(WireError::BadValue {
                what: "build status",
                value,
            })
    }

    /// Built, substituted or already there.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            Self::Built | Self::Substituted | Self::AlreadyValid | Self::ResolvesToAlreadyValid
        )
    }
}

/// The result of building one derivation (§5.7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildResult {
    pub status: BuildStatus,
    /// Nix's message, ANSI escapes included as sent; empty on success.
    pub error_msg: String,
    /// ≥ 1.29, else 0 / false.
    pub times_built: u64,
    pub is_non_deterministic: bool,
    /// Seconds since the epoch (≥ 1.29, else 0).
    pub start_time: i64,
    pub stop_time: i64,
    /// ≥ 1.37.
    pub cpu_user: Option<Duration>,
    pub cpu_system: Option<Duration>,
    /// Output name → its store path (≥ 1.28; empty before).
    pub built_outputs: BTreeMap<String, StorePath>,
}

/// QueryMissing's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Missing {
    pub will_build: BTreeSet<StorePath>,
    pub will_substitute: BTreeSet<StorePath>,
    pub unknown: BTreeSet<StorePath>,
    pub download_size: u64,
    pub nar_size: u64,
}

/// SetOptions' arguments (§5.5).
pub fn encode_set_options(enc: &mut Encoder, settings: &ClientSettings) {
    enc.u64(Op::SetOptions.code())
        .bool(settings.keep_failed)
        .bool(settings.keep_going)
        .bool(settings.try_fallback)
        .u64(settings.verbosity as u64)
        .u64(settings.max_build_jobs)
        .u64(settings.max_silent_time)
        .u64(1) // obsolete useBuildHook
        .u64(if settings.verbose_build {
            Verbosity::Error as u64
        } else {
            Verbosity::Vomit as u64
        })
        .u64(0) // obsolete log type
        .u64(0) // obsolete print build trace
        .u64(settings.build_cores)
        .bool(settings.use_substitutes)
        .str_map(
            settings
                .overrides
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
}

/// AddToStoreNar's fields before the NAR (§5.3, §5.4). `dontCheckSigs` is
/// set: a trusted client vouches for the paths it adds.
pub fn encode_add_to_store_nar(enc: &mut Encoder, info: &PathInfo, repair: bool) {
    enc.u64(Op::AddToStoreNar.code())
        .str(info.path.as_str())
        .str(info.deriver.as_ref().map_or("", StorePath::as_str))
        .str(&info.nar_hash.to_base16())
        .strs(info.references.iter())
        .u64(info.registration_time)
        .u64(info.nar_size)
        .bool(info.ultimate)
        .strs(info.sigs.iter())
        .str(info.ca.as_deref().unwrap_or(""))
        .bool(repair)
        .bool(true); // dontCheckSigs
}

/// A BasicDerivation (§5.6).
pub fn encode_basic_derivation(enc: &mut Encoder, drv: &BasicDerivation) {
    enc.u64(drv.outputs.len() as u64);
    for (name, out) in &drv.outputs {
        enc.str(name)
            .str(out.path.as_ref().map_or("", StorePath::as_str))
            .str(&out.hash_algo)
            .str(&out.hash);
    }
    enc.strs(drv.input_srcs.iter())
        .str(&drv.platform)
        .str(&drv.builder)
        .strs(drv.args.iter())
        .str_map(drv.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
}

/// A list of DerivedPaths.
pub fn encode_derived_paths(enc: &mut Encoder, paths: &[DerivedPath], version: ProtocolVersion) {
    enc.strs(paths.iter().map(|p| p.to_wire(version)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let v = ProtocolVersion::from_wire(0x122).expect("1.34");
        assert_eq!(v.minor(), 34);
        assert_eq!(v.to_string(), "1.34");
        assert!(ProtocolVersion::from_wire(0x222).is_none());
        assert!(ProtocolVersion::from_wire(0x22).is_none());
        assert!(ProtocolVersion::MIN < v && v < ProtocolVersion::LATEST);
    }

    #[test]
    fn derived_paths_follow_the_version() {
        let drv = StorePath::parse_any("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv")
            .expect("path");
        let all = DerivedPath::Built {
            drv: drv.clone(),
            outputs: OutputsSpec::All,
        };
        assert_eq!(
            all.to_wire(ProtocolVersion::from_minor(34)),
            format!("{drv}!*")
        );
        assert_eq!(
            all.to_wire(ProtocolVersion::from_minor(29)),
            drv.to_string()
        );
        let some = DerivedPath::Built {
            drv: drv.clone(),
            outputs: OutputsSpec::Names(["out".into(), "doc".into()].into()),
        };
        assert_eq!(
            some.to_wire(ProtocolVersion::from_minor(34)),
            format!("{drv}!doc,out")
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(BuildStatus::from_wire(3), Ok(BuildStatus::PermanentFailure));
        assert_eq!(BuildStatus::from_wire(14), Ok(BuildStatus::NoSubstituters));
        assert!(BuildStatus::from_wire(15).is_err());
        assert!(BuildStatus::from_wire(u64::MAX).is_err());
    }

    #[test]
    fn set_options_layout() {
        let mut settings = ClientSettings::default();
        settings.overrides.insert("sandbox".into(), "false".into());
        let mut enc = Encoder::new();
        encode_set_options(&mut enc, &settings);
        let bytes = enc.into_bytes();
        // op + 12 fixed words + count + key + value.
        assert_eq!(bytes.len(), 8 * 14 + 16 + 16);
        assert_eq!(bytes[..8], 19u64.to_le_bytes());
    }
}
