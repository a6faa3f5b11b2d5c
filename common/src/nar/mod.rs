//! NAR, the Nix ARchive: the strict streaming codec, and its bridges to disk.
//!
//! A NAR is a canonical serialisation of a file system tree: the bytes whose
//! SHA-256 is a store path's NAR hash (§6). Every token is a Nix wire string
//! (§1: u64 LE length, bytes, zero padding to 8):
//!
//! ```text
//! nar   = "nix-archive-1" node
//! node  = "(" "type" body ")"
//! body  = "regular" [ "executable" "" ] "contents" <u64 size, bytes, zero padding>
//!       | "symlink" "target" <target>
//!       | "directory" { entry }
//! entry = "entry" "(" "name" <name> "node" node ")"
//! ```
//!
//! # Restrictions, and who enforces them
//!
//! | rule (§6.3)                                                      | decoder | encoder |
//! |------------------------------------------------------------------|---------|---------|
//! | magic, tokens in grammar order, no unknown or repeated field     | yes     | by construction |
//! | `executable` value empty, padding zero                           | yes     | by construction |
//! | names: not empty, `.`, `..`; no `/`, NUL; ≤ 255 bytes            | yes     | yes     |
//! | names strictly increasing in byte order (no duplicates)          | yes     | yes     |
//! | symlink targets: not empty, no NUL, ≤ 4095 bytes                 | yes     | yes     |
//! | tags ≤ 32 bytes; nesting ≤ 64 levels                             | yes     | yes (depth) |
//! | nothing after the NAR when it fills its container                | [`Decoder::whole_container`] | — |
//!
//! Nix 2.8 itself accepts some of what the decoder rejects (unsorted
//! entries, trailing bytes, …); Nix only ever *writes* canonical NARs, so
//! being stricter costs nothing (§6.3).
//!
//! # Layout
//!
//! | module      | owns                                                   | I/O? |
//! |-------------|--------------------------------------------------------|------|
//! | [`wire`]    | tokens, limits, name and target rules                  | pure |
//! | [`decode`]  | [`Decoder`]: incremental, strict, zero-copy contents   | pure |
//! | [`encode`]  | [`Encoder`]: checked typestate writer over `io::Write` | writes to the given `Write` |
//! | [`dump`]    | [`dump_path`]: disk → NAR, canonical as `nix-store --dump` | reads the tree |
//! | [`restore`](mod@restore) | [`restore()`], [`Restorer`]: NAR → disk, hashing as it goes | writes under the target |

pub mod decode;
pub mod dump;
pub mod encode;
pub mod restore;
pub mod wire;

pub use decode::{Decoder, Event, Progress, Step};
pub use dump::{dump_path, DumpError};
pub use encode::{Directory, EncodeError, Encoder, Node};
pub use restore::{restore, restore_buffered, RestoreError, Restorer};

/// A NAR that breaks the grammar or a rule of §6.3: what is wrong, and
/// where (byte offset in the NAR, and path of the node inside it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NAR at byte {offset}, in '{path_in_nar}': {kind}")]
pub struct NarError {
    pub kind: NarErrorKind,
    /// Offset of the offending token (or of the end of the input).
    pub offset: u64,
    /// The node concerned, as `/dir/name` (`/` for the root). For an error
    /// about an entry's name, the directory holding it.
    pub path_in_nar: String,
}

/// What is wrong with a NAR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NarErrorKind {
    #[error("it does not start with the NAR magic 'nix-archive-1'")]
    BadMagic,
    #[error("expected {expected}, found '{found}'")]
    UnexpectedTag {
        expected: &'static str,
        found: String,
    },
    #[error("{what} of {len} bytes is longer than the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("the value after 'executable' must be the empty string")]
    ExecutableNotEmpty,
    #[error("non-zero padding")]
    NonZeroPadding,
    #[error("{0}")]
    BadName(&'static str),
    #[error("entry '{name}' comes after '{previous}': entries must be sorted by bytes")]
    Unsorted { name: String, previous: String },
    #[error("duplicate entry '{name}'")]
    DuplicateName { name: String },
    #[error("{0}")]
    BadTarget(&'static str),
    #[error("directories are nested deeper than {} levels", wire::MAX_DEPTH)]
    TooDeep,
    #[error("the NAR ends too early")]
    Truncated,
    #[error("bytes follow the end of the NAR")]
    TrailingData,
}

/// Test helpers: a raw token builder for hostile NARs, and chunkings.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Decoder, Event, NarError, Step};

    /// Builds NAR bytes token by token, valid or not.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct Raw(pub(crate) Vec<u8>);

    impl Raw {
        pub(crate) fn new() -> Self {
            Self(Vec::new())
        }
        pub(crate) fn magic() -> Self {
            Self::new().s(super::wire::MAGIC)
        }
        pub(crate) fn u64(mut self, n: u64) -> Self {
            self.0.extend_from_slice(&n.to_le_bytes());
            self
        }
        pub(crate) fn s(mut self, s: &[u8]) -> Self {
            super::wire::put_str(&mut self.0, s);
            self
        }
        pub(crate) fn file(self, executable: bool, contents: &[u8]) -> Self {
            let raw = self.s(b"(").s(b"type").s(b"regular");
            let raw = if executable {
                raw.s(b"executable").s(b"")
            } else {
                raw
            };
            raw.s(b"contents").s(contents).s(b")")
        }
        pub(crate) fn symlink(self, target: &[u8]) -> Self {
            self.s(b"(")
                .s(b"type")
                .s(b"symlink")
                .s(b"target")
                .s(target)
                .s(b")")
        }
        pub(crate) fn dir_start(self) -> Self {
            self.s(b"(").s(b"type").s(b"directory")
        }
        pub(crate) fn dir_end(self) -> Self {
            self.s(b")")
        }
        pub(crate) fn entry(self, name: &str) -> Self {
            self.entry_bytes(name.as_bytes())
        }
        pub(crate) fn entry_bytes(self, name: &[u8]) -> Self {
            self.s(b"entry").s(b"(").s(b"name").s(name).s(b"node")
        }
        pub(crate) fn entry_end(self) -> Self {
            self.s(b")")
        }

        /// The NAR of a small tree with every kind of node:
        /// `/a` (empty executable), `/b/c` (symlink to `../a`),
        /// `/d` (the file `0123456789`).
        pub(crate) fn sample_tree() -> Vec<u8> {
            Self::magic()
                .dir_start()
                .entry("a")
                .file(true, b"")
                .entry_end()
                .entry("b")
                .dir_start()
                .entry("c")
                .symlink(b"../a")
                .entry_end()
                .dir_end()
                .entry_end()
                .entry("d")
                .file(false, b"0123456789")
                .entry_end()
                .dir_end()
                .0
        }
    }

    /// Ways to cut `nar` into chunks: whole, at every split point into
    /// two, byte by byte, and a few pseudo-random chunkings.
    pub(crate) fn chunkings(nar: &[u8]) -> Vec<Vec<&[u8]>> {
        let mut all = vec![vec![nar]];
        for split in 0..=nar.len() {
            all.push(vec![&nar[..split], &nar[split..]]);
        }
        all.push(nar.chunks(1).collect());
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ nar.len() as u64;
        for _ in 0..8 {
            let mut chunks = Vec::new();
            let mut rest = nar;
            while !rest.is_empty() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let len = (seed % 23) as usize;
                let (chunk, tail) = rest.split_at(len.min(rest.len()));
                chunks.push(chunk);
                rest = tail;
            }
            all.push(chunks);
        }
        all
    }

    /// Decodes `chunks` in order with a fresh decoder and describes the
    /// events, consecutive contents chunks merged. Returns the events and
    /// the bytes consumed; `whole` selects the whole-container mode and
    /// checks for truncation at the end.
    pub(crate) fn decode_all(
        chunks: &[&[u8]],
        whole: bool,
    ) -> Result<(Vec<String>, usize), NarError> {
        let mut decoder = if whole {
            Decoder::whole_container()
        } else {
            Decoder::new()
        };
        let mut events: Vec<String> = Vec::new();
        let mut consumed = 0;
        let mut in_contents = false;
        'chunks: for chunk in chunks {
            let mut pos = 0;
            loop {
                let progress = decoder.feed(&chunk[pos..])?;
                pos += progress.consumed;
                consumed += progress.consumed;
                let event = match progress.step {
                    Step::NeedMore => continue 'chunks,
                    // A whole container must stay empty after the NAR:
                    // keep feeding so trailing chunks are rejected.
                    Step::Done if whole => continue 'chunks,
                    Step::Done => break 'chunks,
                    Step::Event(event) => event,
                };
                let name = |name: Option<&[u8]>| {
                    name.map(|n| format!("{} ", String::from_utf8_lossy(n)))
                        .unwrap_or_default()
                };
                match event {
                    Event::Contents(data) => {
                        assert!(!data.is_empty());
                        let text = String::from_utf8_lossy(data);
                        match events.last_mut() {
                            Some(last) if in_contents => last.push_str(&text),
                            _ => events.push(format!("contents {text}")),
                        }
                        in_contents = true;
                        continue;
                    }
                    Event::Directory { name: None } => events.push("dir /".into()),
                    Event::Directory { name: Some(n) } => {
                        events.push(format!("dir {}", String::from_utf8_lossy(n)));
                    }
                    Event::File {
                        name: n,
                        executable,
                        size,
                    } => events.push(format!(
                        "file {}{} {size}",
                        name(n),
                        if executable { "x" } else { "-" }
                    )),
                    Event::FileEnd => events.push("file-end".into()),
                    Event::Symlink { name: n, target } => events.push(format!(
                        "symlink {}-> {}",
                        name(n),
                        String::from_utf8_lossy(target)
                    )),
                    Event::DirectoryEnd => events.push("dir-end".into()),
                }
                in_contents = false;
            }
        }
        if whole {
            // Also feeds an empty slice after Done, which must stay Done.
            decoder.consume(&[])?;
            decoder.finish()?;
        }
        Ok((events, consumed))
    }
}
