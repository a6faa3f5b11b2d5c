//! The modern build-hook protocol of Nix 2.x (nix-interfaces.md §2.3–§2.6),
//! as a pure decoder over bytes and pure reply formatting. No I/O: the glue
//! in [`super::run`] reads stdin into a buffer, calls [`ModernDecoder::decode`],
//! and writes what [`Reply::to_line`] returns to stderr.
//!
//! # What Nix writes on the hook's stdin (encoding of §1)
//!
//! ```text
//! preamble:  { u64 1, str name, str value }*  u64 0        every setting, sorted (§2.3)
//! request:   str "try", u64 amWilling, str neededSystem,    repeated until we accept;
//!            str drvPath, list<str> requiredFeatures         any other tag or EOF = exit (§2.4)
//! after `# accept`:
//!            list<str> inputs, list<str> wantedOutputs       then EOF (§2.6)
//! ```
//!
//! `wantedOutputs` are output names since Nix 2.4 and output paths before
//! ([`WantedOutputs`]).
//!
//! # What the hook answers on stderr (§2.5, §2.6)
//!
//! One line per "try": `# accept` followed at once by the machine name line,
//! `# decline`, `# postpone`, or `# decline-permanently`.
//!
//! # Limits
//!
//! Every length is checked before anything is buffered ([`MAX_SETTINGS`],
//! [`MAX_NAME_LEN`], [`MAX_VALUE_LEN`], [`MAX_PATH_LEN`], [`MAX_LIST_LEN`],
//! [`MAX_FEATURES`]); lists are decoded one element at a time, so a large
//! input closure is not re-scanned as more of it arrives.

use std::collections::BTreeSet;

use nixq_common::store_path::{StorePath, StorePathError};

/// Settings in the preamble: Nix 2.8 sends 91, current Nix about 200.
pub const MAX_SETTINGS: u64 = 4096;
/// A setting's name (the longest today is about 40 bytes).
pub const MAX_NAME_LEN: u64 = 1024;
/// A setting's value: `builders` may inline a whole machines list, and
/// `access-tokens`/`nix-path` can be long; 1 MiB is far beyond any of them.
pub const MAX_VALUE_LEN: u64 = 1 << 20;
/// A store path, output name or feature: a default store path is at most
/// 255 bytes; a long custom store dir still fits.
pub const MAX_PATH_LEN: u64 = 4096;
/// Elements of the inputs list: the largest real closures have some 100,000
/// paths; this bounds memory at a few hundred MiB for a hostile peer.
pub const MAX_LIST_LEN: u64 = 1 << 20;
/// Required features of one derivation (real ones have one or two).
pub const MAX_FEATURES: u64 = 1024;
/// A request tag; only `try` means anything.
const MAX_TAG_LEN: u64 = 64;

/// Nix's verbosity levels (§2.2: `argv[1]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Verbosity(pub u8);

impl Verbosity {
    pub const ERROR: Self = Self(0);
    pub const WARN: Self = Self(1);
    pub const NOTICE: Self = Self(2);
    pub const INFO: Self = Self(3);
    pub const TALKATIVE: Self = Self(4);
    pub const CHATTY: Self = Self(5);
    pub const DEBUG: Self = Self(6);
    pub const VOMIT: Self = Self(7);
}

/// The settings the hook takes from the preamble (§2.3); all others are
/// ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The machines list or `@file` (§4.1); `@/etc/nix/machines` by default.
    pub builders: String,
    /// The master's own system.
    pub system: String,
    pub extra_platforms: Vec<String>,
    /// The master's `system-features`.
    pub system_features: BTreeSet<String>,
    /// Seconds; 0 = none.
    pub max_silent_time: u64,
    /// Seconds; 0 = none.
    pub timeout: u64,
    pub builders_use_substitutes: bool,
    /// `cores`: 0 = all of the builder's.
    pub build_cores: u32,
}

impl Default for Settings {
    /// Nix's defaults, for settings the preamble does not carry (an older
    /// or newer Nix).
    fn default() -> Self {
        Self {
            builders: "@/etc/nix/machines".to_owned(),
            system: crate::target::local_system(),
            extra_platforms: Vec::new(),
            system_features: BTreeSet::new(),
            max_silent_time: 0,
            timeout: 0,
            builders_use_substitutes: false,
            build_cores: 0,
        }
    }
}

impl Settings {
    /// Takes one setting of the preamble.
    pub fn apply(&mut self, name: &str, value: &str) -> Result<(), ModernError> {
        let number = |what: &'static str| {
            value
                .trim()
                .parse::<u64>()
                .map_err(|_| ModernError::BadSetting {
                    name: what,
                    value: value.to_owned(),
                })
        };
        match name {
            "builders" => self.builders = value.to_owned(),
            "system" => self.system = value.to_owned(),
            "extra-platforms" => {
                self.extra_platforms = value.split_whitespace().map(str::to_owned).collect();
            }
            "system-features" => {
                self.system_features = value.split_whitespace().map(str::to_owned).collect();
            }
            "max-silent-time" => self.max_silent_time = number("max-silent-time")?,
            "timeout" => self.timeout = number("timeout")?,
            "cores" | "build-cores" => {
                self.build_cores = u32::try_from(number("cores")?).unwrap_or(u32::MAX);
            }
            "builders-use-substitutes" => {
                self.builders_use_substitutes = match value {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(ModernError::BadSetting {
                            name: "builders-use-substitutes",
                            value: value.to_owned(),
                        })
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The systems the master builds itself: `system` and `extra-platforms`.
    pub fn local_systems(&self) -> Vec<String> {
        std::iter::once(self.system.clone())
            .chain(self.extra_platforms.iter().cloned())
            .collect()
    }
}

/// One "try" request (§2.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryRequest {
    /// Nix has a free local slot.
    pub am_willing: bool,
    pub needed_system: String,
    pub drv_path: StorePath,
    pub required_features: BTreeSet<String>,
}

/// The second list after `# accept` (§2.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WantedOutputs {
    /// Output names (Nix ≥ 2.4).
    Names(Vec<String>),
    /// Output paths (Nix ≤ 2.3, and the classic protocols).
    Paths(Vec<StorePath>),
}

/// What Nix sends after `# accept`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The input closure (sorted, no `.drv` files).
    pub inputs: Vec<StorePath>,
    pub wanted: WantedOutputs,
}

/// A complete message from Nix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The preamble ended.
    Settings(Box<Settings>),
    Try(TryRequest),
    /// Another tag than `try`, or EOF between requests: Nix is done with us.
    Exit,
    /// The inputs and wanted outputs after an accept.
    Job(Job),
}

/// Nix broke the protocol (or something else is on our stdin).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModernError {
    #[error("{what} of {len} bytes exceeds the limit of {limit}")]
    TooLong {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("{what} has {count} elements, more than the limit of {limit}")]
    TooMany {
        what: &'static str,
        count: u64,
        limit: u64,
    },
    #[error("non-zero padding after {what}")]
    BadPadding { what: &'static str },
    #[error("{what} is not UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("unexpected marker {0} in the settings preamble (expected 0 or 1)")]
    BadMarker(u64),
    #[error("bad value '{value}' for the setting {name}")]
    BadSetting { name: &'static str, value: String },
    #[error("{what} '{text}' is not a store path: {source}")]
    BadPath {
        what: &'static str,
        text: String,
        #[source]
        source: StorePathError,
    },
    #[error("stdin ended {0}")]
    Truncated(&'static str),
    #[error("Nix sent job details before the hook accepted")]
    NotAccepted,
    #[error("Nix sent more after the job details")]
    TrailingData,
}

/// Where the decoder is in the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Preamble,
    /// Between requests.
    Idle,
    /// After accept: the inputs list, `remaining` once its count is known.
    Inputs {
        remaining: Option<u64>,
    },
    /// The wanted outputs list.
    Wanted {
        remaining: Option<u64>,
    },
    /// The job was returned; only EOF may follow.
    Finished,
}

/// The pure decoder of what Nix writes on the hook's stdin. Feed it the
/// unconsumed bytes; it says how many it used and returns an [`Event`] when
/// one is complete. `Ok((None, n))` means "need more".
#[derive(Debug)]
pub struct ModernDecoder {
    state: State,
    settings: Settings,
    settings_seen: u64,
    inputs: Vec<StorePath>,
    wanted: Vec<String>,
}

impl Default for ModernDecoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a parse step stopped.
enum Stop {
    NeedMore,
    Invalid(ModernError),
}

impl From<ModernError> for Stop {
    fn from(e: ModernError) -> Self {
        Self::Invalid(e)
    }
}

/// A read position over the buffer.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn u64(&mut self) -> Result<u64, Stop> {
        let end = self.pos.checked_add(8).ok_or(Stop::NeedMore)?;
        let bytes = self.buf.get(self.pos..end).ok_or(Stop::NeedMore)?;
        let mut le = [0u8; 8];
        le.copy_from_slice(bytes);
        self.pos = end;
        Ok(u64::from_le_bytes(le))
    }

    /// A padded byte string of at most `limit` bytes (§1).
    fn bytes(&mut self, what: &'static str, limit: u64) -> Result<&'a [u8], Stop> {
        let len = self.u64()?;
        if len > limit {
            return Err(ModernError::TooLong { what, len, limit }.into());
        }
        // `len` ≤ limit ≤ 1 MiB, so these cannot overflow.
        let len = len as usize;
        let padded = len.div_ceil(8) * 8;
        let end = self.pos + padded;
        let all = self.buf.get(self.pos..end).ok_or(Stop::NeedMore)?;
        let (data, padding) = all.split_at(len);
        if padding.iter().any(|b| *b != 0) {
            return Err(ModernError::BadPadding { what }.into());
        }
        self.pos = end;
        Ok(data)
    }

    fn string(&mut self, what: &'static str, limit: u64) -> Result<&'a str, Stop> {
        let bytes = self.bytes(what, limit)?;
        std::str::from_utf8(bytes).map_err(|_| ModernError::NotUtf8 { what }.into())
    }

    fn store_path(&mut self, what: &'static str) -> Result<StorePath, Stop> {
        let text = self.string(what, MAX_PATH_LEN)?;
        StorePath::parse_any(text).map_err(|source| {
            ModernError::BadPath {
                what,
                text: text.to_owned(),
                source,
            }
            .into()
        })
    }

    fn count(&mut self, what: &'static str, limit: u64) -> Result<u64, Stop> {
        let count = self.u64()?;
        if count > limit {
            return Err(ModernError::TooMany { what, count, limit }.into());
        }
        Ok(count)
    }
}

impl ModernDecoder {
    pub fn new() -> Self {
        Self {
            state: State::Preamble,
            settings: Settings::default(),
            settings_seen: 0,
            inputs: Vec::new(),
            wanted: Vec::new(),
        }
    }

    /// The hook answered `# accept`: the job details come next.
    pub fn accepted(&mut self) -> Result<(), ModernError> {
        if self.state != State::Idle {
            return Err(ModernError::NotAccepted);
        }
        self.state = State::Inputs { remaining: None };
        Ok(())
    }

    /// Decodes from `buf` (the bytes not consumed yet). Returns the event
    /// completed, if any, and how many bytes of `buf` were used; the caller
    /// drops those and calls again with more bytes when no event came.
    pub fn decode(&mut self, buf: &[u8]) -> Result<(Option<Event>, usize), ModernError> {
        let mut used = 0;
        loop {
            let mut cur = Cursor::new(&buf[used..]);
            match self.step(&mut cur) {
                Ok(Some(event)) => return Ok((Some(event), used + cur.pos)),
                Ok(None) => used += cur.pos,
                Err(Stop::NeedMore) => return Ok((None, used)),
                Err(Stop::Invalid(e)) => return Err(e),
            }
        }
    }

    /// Stdin reached EOF with `rest` bytes unconsumed: an exit between
    /// requests or after the job, a truncation anywhere else.
    pub fn eof(&self, rest: usize) -> Result<Event, ModernError> {
        match (&self.state, rest) {
            (State::Idle | State::Finished, 0) => Ok(Event::Exit),
            (State::Finished, _) => Err(ModernError::TrailingData),
            (State::Preamble, _) => Err(ModernError::Truncated("in the settings preamble")),
            (State::Idle, _) => Err(ModernError::Truncated("inside a request")),
            (State::Inputs { .. } | State::Wanted { .. }, _) => {
                Err(ModernError::Truncated("inside the job details"))
            }
        }
    }

    /// One item: a setting, a request, a list element or a list count.
    /// `Ok(None)`: consumed something, no event yet.
    fn step(&mut self, cur: &mut Cursor<'_>) -> Result<Option<Event>, Stop> {
        match &mut self.state {
            State::Preamble => {
                match cur.u64()? {
                    0 => {
                        self.state = State::Idle;
                        return Ok(Some(Event::Settings(Box::new(self.settings.clone()))));
                    }
                    1 => {}
                    other => return Err(ModernError::BadMarker(other).into()),
                }
                if self.settings_seen >= MAX_SETTINGS {
                    return Err(ModernError::TooMany {
                        what: "the settings preamble",
                        count: self.settings_seen + 1,
                        limit: MAX_SETTINGS,
                    }
                    .into());
                }
                let name = cur.string("a setting name", MAX_NAME_LEN)?;
                let value = cur.string("a setting value", MAX_VALUE_LEN)?;
                self.settings.apply(name, value)?;
                self.settings_seen += 1;
                Ok(None)
            }
            State::Idle => {
                let tag = match cur.bytes("a request tag", MAX_TAG_LEN) {
                    Ok(tag) => tag,
                    // A long tag is not "try": Nix wants us gone.
                    Err(Stop::Invalid(ModernError::TooLong { .. })) => {
                        return Ok(Some(Event::Exit))
                    }
                    Err(e) => return Err(e),
                };
                if tag != b"try" {
                    return Ok(Some(Event::Exit));
                }
                let am_willing = cur.u64()? != 0;
                let needed_system = cur.string("the needed system", MAX_PATH_LEN)?.to_owned();
                let drv_path = cur.store_path("the derivation path")?;
                let count = cur.count("the required features", MAX_FEATURES)?;
                let mut required_features = BTreeSet::new();
                for _ in 0..count {
                    required_features
                        .insert(cur.string("a required feature", MAX_PATH_LEN)?.to_owned());
                }
                Ok(Some(Event::Try(TryRequest {
                    am_willing,
                    needed_system,
                    drv_path,
                    required_features,
                })))
            }
            State::Inputs { remaining } => match remaining {
                None => {
                    *remaining = Some(cur.count("the inputs", MAX_LIST_LEN)?);
                    Ok(None)
                }
                Some(0) => {
                    self.state = State::Wanted { remaining: None };
                    Ok(None)
                }
                Some(n) => {
                    let path = cur.store_path("an input")?;
                    *n -= 1;
                    self.inputs.push(path);
                    Ok(None)
                }
            },
            State::Wanted { remaining } => match remaining {
                None => {
                    *remaining = Some(cur.count("the wanted outputs", MAX_LIST_LEN)?);
                    Ok(None)
                }
                Some(0) => {
                    self.state = State::Finished;
                    let inputs = std::mem::take(&mut self.inputs);
                    let wanted = wanted_outputs(std::mem::take(&mut self.wanted))?;
                    Ok(Some(Event::Job(Job { inputs, wanted })))
                }
                Some(n) => {
                    let item = cur.string("a wanted output", MAX_PATH_LEN)?.to_owned();
                    *n -= 1;
                    self.wanted.push(item);
                    Ok(None)
                }
            },
            State::Finished => {
                if cur.buf.is_empty() {
                    Err(Stop::NeedMore)
                } else {
                    Err(ModernError::TrailingData.into())
                }
            }
        }
    }
}

/// Names (Nix ≥ 2.4) or paths (≤ 2.3): paths start with `/`, names never do.
fn wanted_outputs(items: Vec<String>) -> Result<WantedOutputs, ModernError> {
    if !items.is_empty() && items.iter().all(|i| i.starts_with('/')) {
        let paths = items
            .iter()
            .map(|text| {
                StorePath::parse_any(text).map_err(|source| ModernError::BadPath {
                    what: "a wanted output",
                    text: text.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(WantedOutputs::Paths(paths))
    } else {
        Ok(WantedOutputs::Names(items))
    }
}

/// The hook's answer to a "try" (§2.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `# accept`, then the machine name line (display only, §2.6).
    Accept {
        machine: String,
    },
    Decline,
    Postpone,
    DeclinePermanently,
}

impl Reply {
    /// The exact bytes to write on stderr. A newline in the machine name
    /// would end the line early and desynchronise Nix; it becomes a space.
    pub fn to_line(&self) -> String {
        match self {
            Self::Accept { machine } => {
                let name: String = machine
                    .chars()
                    .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
                    .collect();
                format!("# accept\n{name}\n")
            }
            Self::Decline => "# decline\n".to_owned(),
            Self::Postpone => "# postpone\n".to_owned(),
            Self::DeclinePermanently => "# decline-permanently\n".to_owned(),
        }
    }
}

/// An `@nix` log line (§2.8) that Nix prints at `level` (filtered by its own
/// verbosity). The only way to show the user a message after `# accept`.
pub fn nix_msg_line(level: Verbosity, msg: &str) -> String {
    let json = serde_json::json!({ "action": "msg", "level": level.0, "msg": msg });
    format!("@nix {json}\n")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Encoders for the test side of the wire (what Nix writes).
    pub(crate) mod wire {
        pub(crate) fn u64(out: &mut Vec<u8>, n: u64) {
            out.extend_from_slice(&n.to_le_bytes());
        }

        pub(crate) fn str(out: &mut Vec<u8>, s: &str) {
            u64(out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
            out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
        }

        pub(crate) fn list(out: &mut Vec<u8>, items: &[&str]) {
            u64(out, items.len() as u64);
            for i in items {
                str(out, i);
            }
        }

        pub(crate) fn preamble(settings: &[(&str, &str)]) -> Vec<u8> {
            let mut out = Vec::new();
            for (name, value) in settings {
                u64(&mut out, 1);
                str(&mut out, name);
                str(&mut out, value);
            }
            u64(&mut out, 0);
            out
        }

        pub(crate) fn try_request(
            am_willing: bool,
            system: &str,
            drv: &str,
            features: &[&str],
        ) -> Vec<u8> {
            let mut out = Vec::new();
            str(&mut out, "try");
            u64(&mut out, u64::from(am_willing));
            str(&mut out, system);
            str(&mut out, drv);
            list(&mut out, features);
            out
        }
    }

    const DRV: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-probe-top-s1.drv";
    const IN1: &str = "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-probe-dep-s1";
    const IN2: &str = "/nix/store/1mdqa9w1p6cmli6976v4wi0sw9r4p5pr-probe-src-s1";

    /// A whole conversation: preamble, two tries, job details.
    fn conversation() -> (Vec<u8>, [usize; 4]) {
        let mut bytes = wire::preamble(&[
            ("accept-flake-config", "false"),
            ("builders", "@/tmp/machines"),
            ("builders-use-substitutes", "true"),
            ("cores", "4"),
            ("extra-platforms", "i686-linux  aarch64-linux"),
            ("max-silent-time", "7"),
            ("system", "x86_64-linux"),
            ("system-features", "benchmark big-parallel kvm nixos-test"),
            ("timeout", "30"),
        ]);
        let preamble_end = bytes.len();
        bytes.extend(wire::try_request(true, "x86_64-linux", DRV, &[]));
        let first_try = bytes.len();
        bytes.extend(wire::try_request(
            false,
            "builtin",
            DRV,
            &["big-parallel", "kvm"],
        ));
        let second_try = bytes.len();
        wire::list(&mut bytes, &[IN1, IN2]);
        wire::list(&mut bytes, &["doc", "out"]);
        let end = bytes.len();
        (bytes, [preamble_end, first_try, second_try, end])
    }

    fn expected_settings() -> Settings {
        Settings {
            builders: "@/tmp/machines".into(),
            system: "x86_64-linux".into(),
            extra_platforms: vec!["i686-linux".into(), "aarch64-linux".into()],
            system_features: ["benchmark", "big-parallel", "kvm", "nixos-test"]
                .map(String::from)
                .into(),
            max_silent_time: 7,
            timeout: 30,
            builders_use_substitutes: true,
            build_cores: 4,
        }
    }

    /// Feeds `bytes` in pieces cut at `cuts`, as a reader would, accepting
    /// after the second try; returns the events.
    fn run(bytes: &[u8], cuts: &[usize]) -> Vec<Event> {
        let mut decoder = ModernDecoder::new();
        let mut events = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut tries = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            buf.extend_from_slice(&bytes[fed..cut]);
            fed = cut;
            loop {
                let (event, used) = decoder.decode(&buf).expect("valid");
                buf.drain(..used);
                let Some(event) = event else { break };
                if matches!(event, Event::Try(_)) {
                    tries += 1;
                    if tries == 2 {
                        decoder.accepted().expect("idle");
                    }
                }
                events.push(event);
            }
        }
        events.push(decoder.eof(buf.len()).expect("clean end"));
        events
    }

    fn expected_events() -> Vec<Event> {
        let drv = StorePath::parse_any(DRV).expect("path");
        vec![
            Event::Settings(Box::new(expected_settings())),
            Event::Try(TryRequest {
                am_willing: true,
                needed_system: "x86_64-linux".into(),
                drv_path: drv.clone(),
                required_features: BTreeSet::new(),
            }),
            Event::Try(TryRequest {
                am_willing: false,
                needed_system: "builtin".into(),
                drv_path: drv,
                required_features: ["big-parallel", "kvm"].map(String::from).into(),
            }),
            Event::Job(Job {
                inputs: vec![
                    StorePath::parse_any(IN1).expect("path"),
                    StorePath::parse_any(IN2).expect("path"),
                ],
                wanted: WantedOutputs::Names(vec!["doc".into(), "out".into()]),
            }),
            Event::Exit,
        ]
    }

    #[test]
    fn whole_conversation_at_once() {
        let (bytes, _) = conversation();
        assert_eq!(run(&bytes, &[]), expected_events());
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let (bytes, _) = conversation();
        for cut in 0..=bytes.len() {
            assert_eq!(run(&bytes, &[cut]), expected_events(), "cut at {cut}");
        }
    }

    #[test]
    fn byte_by_byte() {
        let (bytes, _) = conversation();
        let cuts: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(run(&bytes, &cuts), expected_events());
    }

    #[test]
    fn observed_try_bytes_of_nix_2_8() {
        // §2.4, the probed bytes: "try", amWilling 1, system, drv, 0 features.
        let mut bytes = wire::preamble(&[]);
        bytes.extend(wire::try_request(true, "x86_64-linux", DRV, &[]));
        assert_eq!(&bytes[8..24], b"\x03\0\0\0\0\0\0\0try\0\0\0\0\0");
        let mut d = ModernDecoder::new();
        let (e, used) = d.decode(&bytes).expect("valid");
        assert!(matches!(e, Some(Event::Settings(_))));
        assert_eq!(used, 8);
        let (e, used) = d.decode(&bytes[8..]).expect("valid");
        assert!(matches!(e, Some(Event::Try(ref t)) if t.am_willing));
        assert_eq!(used, bytes.len() - 8);
    }

    #[test]
    fn eof_and_other_tags_mean_exit() {
        let mut d = ModernDecoder::new();
        assert_eq!(
            d.eof(0),
            Err(ModernError::Truncated("in the settings preamble"))
        );
        let bytes = wire::preamble(&[]);
        d.decode(&bytes).expect("valid");
        assert_eq!(d.eof(0), Ok(Event::Exit));
        assert_eq!(d.eof(3), Err(ModernError::Truncated("inside a request")));
        let mut other = Vec::new();
        wire::str(&mut other, "exit");
        assert_eq!(d.decode(&other).expect("valid"), (Some(Event::Exit), 16));
        let mut long = Vec::new();
        wire::u64(&mut long, 1 << 40);
        assert_eq!(d.decode(&long).expect("valid").0, Some(Event::Exit));
    }

    #[test]
    fn old_nix_sends_output_paths() {
        let mut d = ModernDecoder::new();
        d.decode(&wire::preamble(&[])).expect("valid");
        d.accepted().expect("idle");
        let mut bytes = Vec::new();
        wire::list(&mut bytes, &[IN1]);
        wire::list(&mut bytes, &[IN2]);
        let (event, used) = d.decode(&bytes).expect("valid");
        assert_eq!(used, bytes.len());
        let Some(Event::Job(job)) = event else {
            panic!("no job: {event:?}")
        };
        assert_eq!(
            job.wanted,
            WantedOutputs::Paths(vec![StorePath::parse_any(IN2).expect("path")])
        );
        assert_eq!(d.eof(0), Ok(Event::Exit));
        assert_eq!(d.eof(1), Err(ModernError::TrailingData));
        assert_eq!(d.decode(b"x"), Err(ModernError::TrailingData));
    }

    #[test]
    fn hostile_input_is_rejected_before_buffering() {
        let d = || {
            let mut d = ModernDecoder::new();
            d.decode(&wire::preamble(&[])).expect("valid");
            d
        };
        // A setting value over the limit: refused from the length alone.
        let mut bytes = Vec::new();
        wire::u64(&mut bytes, 1);
        wire::str(&mut bytes, "builders");
        wire::u64(&mut bytes, MAX_VALUE_LEN + 1);
        assert!(matches!(
            ModernDecoder::new().decode(&bytes),
            Err(ModernError::TooLong { .. })
        ));
        // A bad preamble marker.
        assert_eq!(
            ModernDecoder::new().decode(&2u64.to_le_bytes()),
            Err(ModernError::BadMarker(2))
        );
        // Non-zero padding.
        let mut bytes = wire::try_request(true, "x86_64-linux", DRV, &[]);
        bytes[15] = 1;
        assert_eq!(
            d().decode(&bytes),
            Err(ModernError::BadPadding {
                what: "a request tag"
            })
        );
        // Not a store path.
        let bytes = wire::try_request(true, "x86_64-linux", "/tmp/x.drv", &[]);
        assert!(matches!(
            d().decode(&bytes),
            Err(ModernError::BadPath { .. })
        ));
        // Too many inputs.
        let mut d2 = d();
        d2.accepted().expect("idle");
        assert!(matches!(
            d2.decode(&(MAX_LIST_LEN + 1).to_le_bytes()),
            Err(ModernError::TooMany { .. })
        ));
        // A bad number in a setting.
        let bytes = wire::preamble(&[("timeout", "soon")]);
        assert!(matches!(
            ModernDecoder::new().decode(&bytes),
            Err(ModernError::BadSetting {
                name: "timeout",
                ..
            })
        ));
        // Accepting twice, or before the preamble.
        assert_eq!(
            ModernDecoder::new().accepted(),
            Err(ModernError::NotAccepted)
        );
    }

    #[test]
    fn replies_are_exact() {
        assert_eq!(Reply::Decline.to_line(), "# decline\n");
        assert_eq!(Reply::Postpone.to_line(), "# postpone\n");
        assert_eq!(
            Reply::DeclinePermanently.to_line(),
            "# decline-permanently\n"
        );
        assert_eq!(
            Reply::Accept {
                machine: "nixq://s1\nx".into()
            }
            .to_line(),
            "# accept\nnixq://s1 x\n"
        );
        assert_eq!(
            nix_msg_line(Verbosity::ERROR, "a \"quoted\" line"),
            "@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"a \\\"quoted\\\" line\"}\n"
        );
    }
}
