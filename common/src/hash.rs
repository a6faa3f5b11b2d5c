//! SHA-256 NAR hashes and the text forms Nix uses for them.
//!
//! Nix writes a NAR hash as lowercase base16 without prefix in the worker
//! protocol (§5.4), as `sha256:<nix-base32>` in `nix-store -q --hash`, and
//! accepts `sha256:<base16|nix-base32|base64>` and SRI `sha256-<base64>` when
//! reading.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::store_path::nix32;

/// A SHA-256 digest of a NAR.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NarHash(pub [u8; 32]);

/// Why a hash text was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{text}' is not a SHA-256 hash ({reason})")]
pub struct HashParseError {
    pub text: String,
    pub reason: &'static str,
}

impl NarHash {
    /// Hash a byte slice at once (tests and small data; streams use [`NarHasher`]).
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Lowercase base16, 64 characters: the worker-protocol form.
    pub fn to_base16(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }

    /// `sha256:<nix-base32>`: what `nix-store -q --hash` prints.
    pub fn to_nix32_prefixed(&self) -> String {
        format!("sha256:{}", nix32::encode(&self.0))
    }

    /// SRI form `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }

    /// Parse any form Nix accepts for a SHA-256 NAR hash: bare base16,
    /// `sha256:` followed by base16, nix-base32 or base64, or SRI.
    pub fn parse(text: &str) -> Result<Self, HashParseError> {
        let err = |reason| HashParseError {
            text: text.to_owned(),
            reason,
        };
        let body = if let Some(rest) = text.strip_prefix("sha256:") {
            rest
        } else if let Some(rest) = text.strip_prefix("sha256-") {
            return decode_base64(rest).ok_or_else(|| err("bad SRI base64"));
        } else if text.contains(':') || text.contains('-') {
            return Err(err("only sha256 is supported"));
        } else {
            text
        };
        match body.len() {
            64 => data_encoding::HEXLOWER_PERMISSIVE
                .decode(body.as_bytes())
                .ok()
                .and_then(|v| v.try_into().ok())
                .map(Self)
                .ok_or_else(|| err("bad base16")),
            52 => nix32::decode(body, 32)
                .and_then(|v| v.try_into().ok())
                .map(Self)
                .ok_or_else(|| err("bad nix-base32")),
            44 => decode_base64(body).ok_or_else(|| err("bad base64")),
            _ => Err(err("wrong length")),
        }
    }
}

fn decode_base64(text: &str) -> Option<NarHash> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    Some(NarHash(bytes.try_into().ok()?))
}

impl fmt::Display for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32_prefixed())
    }
}

impl fmt::Debug for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NarHash({})", self.to_nix32_prefixed())
    }
}

impl std::str::FromStr for NarHash {
    type Err = HashParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Hashes and counts a byte stream as it passes: SHA-256 plus size.
#[derive(Clone, Default)]
pub struct NarHasher {
    sha: Sha256,
    size: u64,
}

impl NarHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.size += bytes.len() as u64;
    }

    /// Bytes seen so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn finish(self) -> (NarHash, u64) {
        (NarHash(self.sha.finalize().into()), self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_round_trip() {
        let h = NarHash::of(b"");
        assert_eq!(
            h.to_base16(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            h.to_nix32_prefixed(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        for text in [
            h.to_base16(),
            format!("sha256:{}", h.to_base16()),
            h.to_nix32_prefixed(),
            h.to_sri(),
            format!("sha256:{}", &h.to_sri()[7..]),
        ] {
            assert_eq!(NarHash::parse(&text).expect(&text), h, "{text}");
        }
    }

    #[test]
    fn rejects_bad_text() {
        for bad in [
            "",
            "sha256:",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha512-abc",
            "zz".repeat(32).as_str(),
            "sha256:eeee",
        ] {
            assert!(NarHash::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hasher_counts() {
        let mut hasher = NarHasher::new();
        hasher.update(b"ab");
        hasher.update(b"c");
        let (h, n) = hasher.finish();
        assert_eq!(n, 3);
        assert_eq!(h, NarHash::of(b"abc"));
    }
}
