//! NAR tokens, limits and the rules on names and symlink targets (§6.1, §6.3).
//!
//! Every token of a NAR is a Nix wire string (§1): a little-endian `u64`
//! length, the bytes, then zero padding up to a multiple of 8. This module
//! holds what the decoder and the encoder must agree on, so that nixq never
//! writes a NAR it would itself refuse to read.

/// The first token of every NAR.
pub const MAGIC: &[u8] = b"nix-archive-1";

pub(crate) const OPEN: &[u8] = b"(";
pub(crate) const CLOSE: &[u8] = b")";
pub(crate) const TYPE: &[u8] = b"type";
pub(crate) const REGULAR: &[u8] = b"regular";
pub(crate) const SYMLINK: &[u8] = b"symlink";
pub(crate) const DIRECTORY: &[u8] = b"directory";
pub(crate) const EXECUTABLE: &[u8] = b"executable";
pub(crate) const CONTENTS: &[u8] = b"contents";
pub(crate) const TARGET: &[u8] = b"target";
pub(crate) const ENTRY: &[u8] = b"entry";
pub(crate) const NAME: &[u8] = b"name";
pub(crate) const NODE: &[u8] = b"node";

/// Longest grammar token (tags such as `directory`, and the magic). Current
/// Nix refuses longer tags too (§6.3); the longest real one is 13 bytes.
pub const MAX_TAG_LEN: u64 = 32;

/// Longest entry name: `NAME_MAX` on Linux, and current Nix's limit (§6.3).
pub const MAX_NAME_LEN: u64 = 255;

/// Longest symlink target: `PATH_MAX` (4096) minus the terminating NUL, and
/// current Nix's limit (§6.3).
pub const MAX_TARGET_LEN: u64 = 4095;

/// Deepest nesting: an entry may be at most this many directory levels below
/// the root, as in current Nix (§6.3). It bounds the decoder's name stack
/// (64 × 255 bytes) and the restorer's open directory descriptors.
pub const MAX_DEPTH: usize = 64;

/// Zero bytes that follow `len` bytes of a wire string.
pub const fn padding_len(len: u64) -> usize {
    // The value is at most 7, so the cast cannot truncate.
    ((8 - len % 8) % 8) as usize
}

/// Why an entry name is not acceptable in a NAR (`None` when it is).
///
/// Names are single path components: not empty, not `.` or `..`, without
/// `/` or NUL, at most [`MAX_NAME_LEN`] bytes (§6.3).
pub fn name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("entry name is empty")
    } else if name == b"." || name == b".." {
        Some("entry name is '.' or '..'")
    } else if name.len() as u64 > MAX_NAME_LEN {
        Some("entry name is longer than 255 bytes")
    } else if name.contains(&b'/') {
        Some("entry name contains '/'")
    } else if name.contains(&0) {
        Some("entry name contains a NUL byte")
    } else {
        None
    }
}

/// Why a symlink target is not acceptable in a NAR (`None` when it is):
/// empty, containing NUL, or longer than [`MAX_TARGET_LEN`] (§6.3).
pub fn target_problem(target: &[u8]) -> Option<&'static str> {
    if target.is_empty() {
        Some("symlink target is empty")
    } else if target.len() as u64 > MAX_TARGET_LEN {
        Some("symlink target is longer than 4095 bytes")
    } else if target.contains(&0) {
        Some("symlink target contains a NUL byte")
    } else {
        None
    }
}

/// Appends one wire string (length, bytes, zero padding) to `out`. For
/// the tests' raw NAR builder; the encoder has its own buffered writer.
#[cfg(test)]
pub(crate) fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.extend_from_slice(&[0; 8][..padding_len(s.len() as u64)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding() {
        assert_eq!(padding_len(0), 0);
        assert_eq!(padding_len(1), 7);
        assert_eq!(padding_len(7), 1);
        assert_eq!(padding_len(8), 0);
        assert_eq!(padding_len(13), 3);
    }

    #[test]
    fn put_str_matches_section_1_example() {
        let mut out = Vec::new();
        put_str(&mut out, b"try");
        assert_eq!(out, b"\x03\0\0\0\0\0\0\0try\0\0\0\0\0");
        out.clear();
        put_str(&mut out, b"");
        assert_eq!(out, [0; 8]);
    }

    #[test]
    fn names() {
        for good in [&b"a"[..], b"...", b".a", b"a b", &[0xff; 255]] {
            assert_eq!(name_problem(good), None, "{good:?}");
        }
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0", &[b'a'; 256]] {
            assert!(name_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn targets() {
        assert_eq!(target_problem(b"/nix/store/x"), None);
        assert_eq!(target_problem(&[b'a'; 4095]), None);
        assert!(target_problem(b"").is_some());
        assert!(target_problem(b"a\0b").is_some());
        assert!(target_problem(&[b'a'; 4096]).is_some());
    }
}
