//! Worker-protocol primitives (nix-interfaces.md §1), pure: encoding into a
//! byte buffer, and decoding from a byte slice that may hold only part of a
//! message.
//!
//! * integer: u64 little-endian; a boolean is an integer (0 false, else true);
//! * string: u64 length, the bytes, zero padding to a multiple of 8 (a reader
//!   rejects non-zero padding, as Nix does);
//! * list / set: u64 count, then the elements; map: count, then key, value;
//! * framed stream (≥ 1.23): frames `u64 len` + `len` bytes without padding,
//!   ended by a frame of length 0.
//!
//! Every length read from the peer is checked against a limit before any
//! byte of the value is buffered or allocated. The async reader in
//! `client.rs` uses the same checks ([`check_len`], [`check_padding`]).

use std::fmt;

/// Longest string accepted from the daemon when nothing more specific
/// applies: error messages carry the last `log-lines` lines of a build log
/// and realisation JSON is small, so 16 MiB is generous without letting a
/// bad length prefix make us buffer gigabytes.
pub const MAX_STRING_LEN: u64 = 16 << 20;

/// Longest store path accepted: a full path can be no longer than `PATH_MAX`.
pub const MAX_PATH_LEN: u64 = 4096;

/// Most elements accepted in one list or map. Closures of 100,000 paths are
/// real; 2^24 leaves room while bounding what a broken count can ask for.
pub const MAX_LIST_LEN: u64 = 1 << 24;

/// Size of the frames nixq writes in a framed stream (§1). Frame boundaries
/// carry no meaning; 64 KiB keeps the per-frame header overhead at 0.01 %
/// and matches the socket and pipe buffers it is written into.
pub const FRAME_SIZE: usize = 64 << 10;

/// A value from the peer that breaks the encoding rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("{what}: length {len} exceeds the limit of {limit} bytes")]
    TooLong {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("{what}: {count} elements exceed the limit of {limit}")]
    TooMany {
        what: &'static str,
        count: u64,
        limit: u64,
    },
    #[error("{what}: non-zero padding after a string")]
    NonZeroPadding { what: &'static str },
    #[error("{what}: not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{what}: unexpected value {value}")]
    BadValue { what: &'static str, value: u64 },
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

/// Why a slice did not decode: it ends too early (read more and try again),
/// or it is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Incomplete,
    Invalid(WireError),
}

impl From<WireError> for DecodeError {
    fn from(err: WireError) -> Self {
        Self::Invalid(err)
    }
}

/// Zero bytes that follow a string of `len` bytes.
pub const fn padding_len(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// A length prefix read from the peer, checked before anything is allocated.
pub fn check_len(what: &'static str, len: u64, limit: u64) -> Result<usize, WireError> {
    if len > limit {
        return Err(WireError::TooLong { what, len, limit });
    }
    usize::try_from(len).map_err(|_| WireError::TooLong { what, len, limit })
}

/// An element count read from the peer.
pub fn check_count(what: &'static str, count: u64, limit: u64) -> Result<usize, WireError> {
    if count > limit {
        return Err(WireError::TooMany { what, count, limit });
    }
    usize::try_from(count).map_err(|_| WireError::TooMany { what, count, limit })
}

/// The padding bytes after a string must all be zero.
pub fn check_padding(what: &'static str, padding: &[u8]) -> Result<(), WireError> {
    if padding.iter().any(|b| *b != 0) {
        return Err(WireError::NonZeroPadding { what });
    }
    Ok(())
}

/// Bytes of a string as text.
pub fn utf8(what: &'static str, bytes: Vec<u8>) -> Result<String, WireError> {
    String::from_utf8(bytes).map_err(|_| WireError::NotUtf8 { what })
}

/// Appends worker-protocol values to a byte buffer.
#[derive(Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn bool(&mut self, value: bool) -> &mut Self {
        self.u64(u64::from(value))
    }

    /// A length-prefixed, zero-padded string.
    pub fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.u64(value.len() as u64);
        self.buf.extend_from_slice(value);
        let pad = padding_len(value.len() as u64);
        self.buf.extend_from_slice(&[0u8; 8][..pad]);
        self
    }

    pub fn str(&mut self, value: &str) -> &mut Self {
        self.bytes(value.as_bytes())
    }

    /// A string list or set; a set must be given in sorted order.
    pub fn strs<I, S>(&mut self, values: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: ExactSizeIterator,
        S: AsRef<str>,
    {
        let values = values.into_iter();
        self.u64(values.len() as u64);
        for value in values {
            self.str(value.as_ref());
        }
        self
    }

    /// A map of strings, in the iterator's order.
    pub fn str_map<'a, I>(&mut self, entries: I) -> &mut Self
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
        I::IntoIter: ExactSizeIterator,
    {
        let entries = entries.into_iter();
        self.u64(entries.len() as u64);
        for (key, value) in entries {
            self.str(key).str(value);
        }
        self
    }

    /// One frame of a framed stream: length, then the bytes, no padding. An
    /// empty `chunk` is the end-of-stream frame.
    pub fn frame(&mut self, chunk: &[u8]) -> &mut Self {
        self.u64(chunk.len() as u64);
        self.buf.extend_from_slice(chunk);
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn clear(&mut self) {
        self.buf.clear();
    }
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Encoder({} bytes)", self.buf.len())
    }
}

/// Reads worker-protocol values from a slice that may end early.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Incomplete);
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let bytes = self.take(8)?;
        let mut le = [0u8; 8];
        le.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(le))
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        Ok(self.u64()? != 0)
    }

    /// A string's bytes, borrowed; its length is checked against `limit`
    /// before anything else is looked at.
    pub fn bytes(&mut self, what: &'static str, limit: u64) -> Result<&'a [u8], DecodeError> {
        let len = check_len(what, self.u64()?, limit)?;
        let pad = padding_len(len as u64);
        if self.remaining() < len + pad {
            return Err(DecodeError::Incomplete);
        }
        let value = self.take(len)?;
        check_padding(what, self.take(pad)?)?;
        Ok(value)
    }

    pub fn string(&mut self, what: &'static str, limit: u64) -> Result<String, DecodeError> {
        let bytes = self.bytes(what, limit)?;
        Ok(utf8(what, bytes.to_vec())?)
    }

    pub fn strings(
        &mut self,
        what: &'static str,
        max_count: u64,
        limit: u64,
    ) -> Result<Vec<String>, DecodeError> {
        let count = check_count(what, self.u64()?, max_count)?;
        // Each element takes at least 8 bytes: a count larger than what is
        // buffered cannot be complete yet, and allocation follows the bytes.
        let mut out = Vec::with_capacity(count.min(self.remaining() / 8));
        for _ in 0..count {
            out.push(self.string(what, limit)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_reference() {
        // §1: the string "try".
        let mut enc = Encoder::new();
        enc.str("try");
        assert_eq!(
            enc.as_bytes(),
            [3, 0, 0, 0, 0, 0, 0, 0, b't', b'r', b'y', 0, 0, 0, 0, 0]
        );
        enc.clear();
        enc.str("");
        assert_eq!(enc.as_bytes(), [0u8; 8]);
        enc.clear();
        enc.str("12345678");
        assert_eq!(enc.as_bytes().len(), 16);
        enc.clear();
        enc.frame(b"abc").frame(b"");
        assert_eq!(
            enc.as_bytes(),
            [3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn round_trips() {
        let mut enc = Encoder::new();
        enc.u64(0x6e69_7863)
            .bool(true)
            .strs(["a", "bcdefghij", ""])
            .str_map([("k", "v")]);
        let bytes = enc.into_bytes();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u64(), Ok(0x6e69_7863));
        assert_eq!(r.bool(), Ok(true));
        assert_eq!(
            r.strings("list", 10, 100),
            Ok(vec!["a".into(), "bcdefghij".into(), String::new()])
        );
        assert_eq!(r.u64(), Ok(1));
        assert_eq!(r.string("k", 10).as_deref(), Ok("k"));
        assert_eq!(r.string("v", 10).as_deref(), Ok("v"));
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let mut enc = Encoder::new();
        enc.strs(["hello", "world!!!!"]);
        let bytes = enc.into_bytes();
        for cut in 0..bytes.len() {
            let mut r = Reader::new(&bytes[..cut]);
            assert_eq!(
                r.strings("list", 10, 100),
                Err(DecodeError::Incomplete),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn rejects_bad_input_before_buffering() {
        // Non-zero padding.
        let bytes = [1, 0, 0, 0, 0, 0, 0, 0, b'x', 0, 0, 0, 0, 0, 0, 1];
        assert!(matches!(
            Reader::new(&bytes).string("s", 10),
            Err(DecodeError::Invalid(WireError::NonZeroPadding { .. }))
        ));
        // A length over the limit is refused from the prefix alone.
        let long = (1u64 << 40).to_le_bytes();
        assert!(matches!(
            Reader::new(&long).string("s", MAX_STRING_LEN),
            Err(DecodeError::Invalid(WireError::TooLong { .. }))
        ));
        let many = u64::MAX.to_le_bytes();
        assert!(matches!(
            Reader::new(&many).strings("l", MAX_LIST_LEN, 10),
            Err(DecodeError::Invalid(WireError::TooMany { .. }))
        ));
        let bad_utf8 = [1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            Reader::new(&bad_utf8).string("s", 10),
            Err(DecodeError::Invalid(WireError::NotUtf8 { .. }))
        ));
    }
}
