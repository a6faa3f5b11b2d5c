//! Store paths: `/nix/store/<32 nix-base32 chars>-<name>`, and nix-base32.
//!
//! A [`StorePath`] keeps the full path text (store directory included): every
//! interface nixq speaks (Nix's worker protocol, `nix-store`, its own wire
//! protocol) carries full paths, and the hash part of a store path depends on
//! the store directory anyway, so a path never moves between directories.
//!
//! Name rules are those of Nix 2.8 (`checkName` in `libstore/path.cc`): 1 to
//! 211 characters from `A-Za-z0-9+-._?=`, not starting with `.`.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The default store directory, `/nix/store`.
pub const DEFAULT_STORE_DIR: &str = "/nix/store";

/// Length of the hash part of a store path's base name (160 bits in nix-base32).
pub const HASH_PART_LEN: usize = 32;

/// Longest name Nix accepts (`libstore/path.cc`: 211 characters).
pub const MAX_NAME_LEN: usize = 211;

/// The nix-base32 alphabet: digits and lowercase letters without `e o u t`.
const NIX32_ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("'{path}' is not in the store directory '{store_dir}'")]
    NotInStore { path: String, store_dir: String },
    #[error("'{0}' is not an absolute path")]
    NotAbsolute(String),
    #[error("store path '{path}': base name is too short (need {HASH_PART_LEN} hash characters, '-' and a name)")]
    TooShort { path: String },
    #[error("store path '{path}': invalid character {ch:?} in the hash part (nix-base32 has no e, o, u, t)")]
    BadHashChar { path: String, ch: char },
    #[error("store path '{path}': expected '-' after the hash part")]
    MissingDash { path: String },
    #[error("store path '{path}': {reason}")]
    BadName { path: String, reason: &'static str },
    #[error("store directory '{0}' must be an absolute path without a trailing '/'")]
    BadStoreDir(String),
}

/// A store directory, such as `/nix/store`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        Self(DEFAULT_STORE_DIR.to_owned())
    }
}

impl StoreDir {
    /// A store directory: absolute, no trailing slash, not the root.
    pub fn new(dir: impl Into<String>) -> Result<Self, StorePathError> {
        let dir = dir.into();
        if !dir.starts_with('/') || dir.ends_with('/') || dir.contains('\0') || dir.contains("//") {
            return Err(StorePathError::BadStoreDir(dir));
        }
        Ok(Self(dir))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parse a full store path that must lie directly in this directory.
    pub fn parse(&self, path: &str) -> Result<StorePath, StorePathError> {
        let Some(base) = path
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
        else {
            return Err(StorePathError::NotInStore {
                path: path.to_owned(),
                store_dir: self.0.clone(),
            });
        };
        validate_base_name(path, base)?;
        Ok(StorePath {
            full: path.to_owned(),
            base_start: self.0.len() + 1,
        })
    }

    /// Parse a path that may point inside a store path
    /// (`/nix/store/…-foo/bin/foo` → `/nix/store/…-foo`).
    pub fn parse_prefix(&self, path: &str) -> Result<StorePath, StorePathError> {
        let rest = path
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                path: path.to_owned(),
                store_dir: self.0.clone(),
            })?;
        let base_len = rest.find('/').unwrap_or(rest.len());
        self.parse(&path[..self.0.len() + 1 + base_len])
    }

    /// The store path with this base name.
    pub fn join(&self, base_name: &str) -> Result<StorePath, StorePathError> {
        self.parse(&format!("{}/{}", self.0, base_name))
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A valid store path, held as its full text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    full: String,
    /// Index of the first character of the base name in `full`.
    base_start: usize,
}

impl StorePath {
    /// Parse a full store path in any absolute store directory.
    pub fn parse_any(path: &str) -> Result<Self, StorePathError> {
        if !path.starts_with('/') {
            return Err(StorePathError::NotAbsolute(path.to_owned()));
        }
        // `path` starts with '/', so rfind finds at least that one.
        let slash = path.rfind('/').unwrap_or(0);
        let dir = if slash == 0 { "/" } else { &path[..slash] };
        if slash == 0 {
            return Err(StorePathError::BadStoreDir(dir.to_owned()));
        }
        StoreDir::new(dir)?.parse(path)
    }

    /// The full path, e.g. `/nix/store/…-hello-2.12`.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    pub fn as_path(&self) -> &Path {
        Path::new(&self.full)
    }

    /// `…-hello-2.12`.
    pub fn base_name(&self) -> &str {
        &self.full[self.base_start..]
    }

    /// The 32 nix-base32 characters of the hash part.
    pub fn hash_part(&self) -> &str {
        &self.base_name()[..HASH_PART_LEN]
    }

    /// The name after the hash part and its dash.
    pub fn name(&self) -> &str {
        &self.base_name()[HASH_PART_LEN + 1..]
    }

    /// The store directory this path lies in.
    pub fn store_dir(&self) -> &str {
        &self.full[..self.base_start - 1]
    }

    /// Whether this is a derivation (`.drv`).
    pub fn is_derivation(&self) -> bool {
        self.full.ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.full)
    }
}

impl AsRef<str> for StorePath {
    fn as_ref(&self) -> &str {
        &self.full
    }
}

impl AsRef<Path> for StorePath {
    fn as_ref(&self) -> &Path {
        self.as_path()
    }
}

impl std::str::FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_any(s)
    }
}

impl Serialize for StorePath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.full)
    }
}

impl<'de> Deserialize<'de> for StorePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse_any(&text).map_err(serde::de::Error::custom)
    }
}

fn validate_base_name(path: &str, base: &str) -> Result<(), StorePathError> {
    let bad_name = |reason| StorePathError::BadName {
        path: path.to_owned(),
        reason,
    };
    if base.len() < HASH_PART_LEN + 2 {
        return Err(StorePathError::TooShort {
            path: path.to_owned(),
        });
    }
    // Check the hash characters before slicing: a multi-byte character there
    // would otherwise make the slice below panic.
    if let Some(ch) = base
        .chars()
        .take(HASH_PART_LEN)
        .find(|c| !c.is_ascii() || !NIX32_ALPHABET.contains(&(*c as u8)))
    {
        return Err(StorePathError::BadHashChar {
            path: path.to_owned(),
            ch,
        });
    }
    if base.as_bytes()[HASH_PART_LEN] != b'-' {
        return Err(StorePathError::MissingDash {
            path: path.to_owned(),
        });
    }
    let name = &base[HASH_PART_LEN + 1..];
    if name.len() > MAX_NAME_LEN {
        return Err(bad_name("name is longer than 211 characters"));
    }
    if name.starts_with('.') {
        return Err(bad_name("name starts with a period"));
    }
    if let Some(_bad) = name.bytes().find(|b| !is_name_byte(*b)) {
        return Err(bad_name(
            "name contains a character outside A-Z a-z 0-9 + - . _ ? =",
        ));
    }
    Ok(())
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+-._?=".contains(&b)
}

/// nix-base32 as Nix prints hashes (`libutil/hash.cc`): the bytes are read
/// from the last 5-bit group to the first, so the text is not RFC 4648.
pub mod nix32 {
    use super::NIX32_ALPHABET;

    /// Length of the nix-base32 text of `n` bytes.
    pub const fn encoded_len(n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (n * 8 - 1) / 5 + 1
        }
    }

    pub fn encode(bytes: &[u8]) -> String {
        let len = encoded_len(bytes.len());
        let mut out = String::with_capacity(len);
        for n in (0..len).rev() {
            let b = n * 5;
            let (i, j) = (b / 8, b % 8);
            let low = bytes[i] >> j;
            let high = match bytes.get(i + 1) {
                Some(next) if j > 0 => next << (8 - j),
                _ => 0,
            };
            out.push(NIX32_ALPHABET[((low | high) & 0x1f) as usize] as char);
        }
        out
    }

    /// Decode nix-base32 text into `len` bytes; `None` if the text has the
    /// wrong length, a character outside the alphabet, or bits beyond `len`.
    pub fn decode(text: &str, len: usize) -> Option<Vec<u8>> {
        if text.len() != encoded_len(len) {
            return None;
        }
        let mut out = vec![0u8; len];
        for (n, c) in text.bytes().rev().enumerate() {
            let digit = NIX32_ALPHABET.iter().position(|a| *a == c)? as u16;
            let b = n * 5;
            let (i, j) = (b / 8, b % 8);
            let shifted = digit << j;
            out[i] |= shifted as u8;
            let carry = (shifted >> 8) as u8;
            if i + 1 < len {
                out[i + 1] |= carry;
            } else if carry != 0 {
                return None;
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1";

    #[test]
    fn parses_and_splits() {
        let p = StoreDir::default().parse(P).expect("valid");
        assert_eq!(p.hash_part(), "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz");
        assert_eq!(p.name(), "hello-2.12.1");
        assert_eq!(p.store_dir(), "/nix/store");
        assert_eq!(p.as_str(), P);
        assert!(!p.is_derivation());
        assert_eq!(StorePath::parse_any(P).expect("valid"), p);
    }

    #[test]
    fn other_store_dir() {
        let dir = StoreDir::new("/data/store").expect("dir");
        let p = dir
            .parse("/data/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv")
            .expect("valid");
        assert!(p.is_derivation());
        assert!(matches!(
            StoreDir::default().parse(p.as_str()),
            Err(StorePathError::NotInStore { .. })
        ));
        assert!(StoreDir::new("relative").is_err());
        assert!(StoreDir::new("/nix/store/").is_err());
    }

    #[test]
    fn rejects_bad_paths() {
        let dir = StoreDir::default();
        for bad in [
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-",
            "/nix/store/eh7qgvs4kgzsn8a6rb273saxyqh4jxlz-x",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlzxx",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-.hidden",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a b",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a/b",
            "/nix/store/é7qgvs4kgzsn8a6rb273saxyqh4jxl-x",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-é",
            "/nix/store/../etc/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x",
            "/nix/storex/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x",
            "relative",
            "",
        ] {
            assert!(dir.parse(bad).is_err(), "{bad} must be rejected");
        }
        let long = format!(
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-{}",
            "a".repeat(212)
        );
        assert!(dir.parse(&long).is_err());
        let ok = format!(
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-{}",
            "a".repeat(211)
        );
        assert!(dir.parse(&ok).is_ok());
        assert!(dir
            .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-+-._?=")
            .is_ok());
    }

    #[test]
    fn parse_prefix_finds_the_store_path() {
        let dir = StoreDir::default();
        let inner = format!("{P}/bin/hello");
        assert_eq!(dir.parse_prefix(&inner).expect("valid").as_str(), P);
        assert_eq!(dir.parse_prefix(P).expect("valid").as_str(), P);
    }

    #[test]
    fn nix32_known_vector() {
        // sha256("") as `nix-hash --type sha256 --to-base32` prints it.
        let empty = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ];
        let text = nix32::encode(&empty);
        assert_eq!(text, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(nix32::decode(&text, 32).expect("decodes"), empty);
    }

    #[test]
    fn nix32_round_trips_and_rejects() {
        for len in [0usize, 1, 2, 5, 20, 32, 64] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = nix32::encode(&bytes);
            assert_eq!(text.len(), nix32::encoded_len(len));
            assert_eq!(nix32::decode(&text, len).expect("round trip"), bytes);
        }
        assert!(nix32::decode("e".repeat(52).as_str(), 32).is_none());
        assert!(nix32::decode("0".repeat(51).as_str(), 32).is_none());
        // 52 characters carry 260 bits; the top 4 must be zero for 32 bytes.
        assert!(nix32::decode(&format!("z{}", "0".repeat(51)), 32).is_none());
    }

    #[test]
    fn serde_round_trip_validates() {
        let p = StorePath::parse_any(P).expect("valid");
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&p, cfg).expect("encode");
        let (back, _): (StorePath, usize) =
            bincode::serde::decode_from_slice(&bytes, cfg).expect("decode");
        assert_eq!(back, p);
        let bad = bincode::serde::encode_to_vec("/nix/store/bad", cfg).expect("encode");
        assert!(bincode::serde::decode_from_slice::<StorePath, _>(&bad, cfg).is_err());
    }
}
