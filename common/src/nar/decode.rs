//! The strict, incremental, sans-IO NAR decoder (§6.1, §6.3).
//!
//! [`Decoder::feed`] takes whatever bytes the caller has (any split of the
//! stream, down to single bytes) and answers with how many it consumed and
//! one [`Step`]: more input needed, an [`Event`], or the end of the NAR. It
//! never consumes a byte past the NAR's final `)`, so a caller reading a NAR
//! embedded in a longer stream (the daemon's `NarFromPath` reply, an export
//! stream) knows exactly where the NAR ends. [`Decoder::consume`] is the
//! validate-and-skip form of the same machine.
//!
//! File contents are handed out as slices of the caller's input, never
//! copied or buffered. Only grammar tokens are buffered, and each token's
//! length is checked against its limit before a byte of it is stored, so the
//! decoder's memory is bounded (a few KiB plus the name stack, at most
//! 65 × 255 bytes) whatever the input.

use std::cmp::Ordering;

use super::wire::{self, padding_len, MAX_DEPTH, MAX_NAME_LEN, MAX_TAG_LEN, MAX_TARGET_LEN};
use super::{NarError, NarErrorKind};

/// One thing the decoder found in the NAR.
///
/// Node events carry the node's entry name in its parent directory, `None`
/// for the root node. Names and targets are validated before they are
/// handed out: names are single path components (§6.3), in strictly
/// increasing byte order within a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A directory starts; its entries follow, then [`Event::DirectoryEnd`].
    Directory { name: Option<&'a [u8]> },
    /// A regular file starts: [`Event::Contents`] chunks totalling `size`
    /// bytes follow (none when `size` is 0), then [`Event::FileEnd`].
    File {
        name: Option<&'a [u8]>,
        executable: bool,
        size: u64,
    },
    /// The next chunk of the current file's contents; never empty.
    Contents(&'a [u8]),
    /// The current file's contents (and their padding) are complete.
    FileEnd,
    /// A symbolic link.
    Symlink {
        name: Option<&'a [u8]>,
        target: &'a [u8],
    },
    /// The current directory has no more entries.
    DirectoryEnd,
}

/// What [`Decoder::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    /// Every byte given was consumed; call again with more input.
    NeedMore,
    /// One event; call again with the input after the consumed bytes.
    Event(Event<'a>),
    /// The NAR is complete. Bytes after it were not consumed.
    Done,
}

/// The answer of [`Decoder::feed`]: bytes consumed from the front of the
/// input, and what they yielded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress<'a> {
    pub consumed: usize,
    pub step: Step<'a>,
}

/// Where the decoder is in the grammar: the token it expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Magic,
    /// `(` opening a node.
    NodeOpen,
    /// `type`.
    NodeType,
    /// `regular`, `symlink` or `directory`.
    TypeValue,
    /// `executable` or `contents`.
    RegularField,
    /// The empty string after `executable`.
    ExecutableValue,
    /// `contents` after `executable ""`.
    ContentsTag,
    /// The u64 size of the contents.
    ContentsSize,
    /// Contents bytes, `remaining` of them still to come.
    Contents,
    /// The zero padding after the contents.
    ContentsPadding,
    /// `target`.
    TargetTag,
    /// The symlink target.
    TargetValue,
    /// `)` closing a regular or symlink node.
    NodeClose,
    /// `entry` or the `)` closing the directory.
    DirectoryField,
    /// `(` opening an entry.
    EntryOpen,
    /// `name`.
    EntryNameTag,
    /// The entry name.
    EntryName,
    /// `node`.
    EntryNodeTag,
    /// `)` closing an entry.
    EntryClose,
    Done,
    Failed,
}

/// An event found by [`Decoder::run`], before it borrows anything.
enum Found {
    NeedMore,
    Done,
    Directory,
    File,
    /// Offset and length of a contents chunk in the input.
    Contents(usize, usize),
    FileEnd,
    Symlink,
    DirectoryEnd,
}

/// The strict incremental NAR decoder. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    /// Reject bytes after the NAR (the NAR fills its container).
    whole_container: bool,
    /// Bytes consumed so far: the offset of the next input byte in the NAR.
    offset: u64,
    /// The token being assembled: length prefix, payload, padding. A
    /// string token's payload is `tok[8..]` once complete.
    tok: Vec<u8>,
    /// Bytes `tok` must hold before the token is complete; 0 when no token
    /// is in progress.
    tok_want: usize,
    /// Whether `tok_want` already accounts for the string's length prefix.
    tok_sized: bool,
    /// NAR offset of the token being assembled, for errors.
    tok_start: u64,
    /// Whether the current regular file is executable.
    executable: bool,
    /// Size of the current regular file.
    size: u64,
    /// Contents bytes of the current file still to come.
    remaining: u64,
    /// Names of the most recent entry of each open directory, outermost
    /// first, concatenated; `levels[i]` is where level `i`'s name starts
    /// and an empty name means "no entry yet". Together they are the path
    /// of the current node, and the reference for the order check.
    names: Vec<u8>,
    levels: Vec<usize>,
    /// The error that stopped the decoder, returned again by later calls.
    failure: Option<NarError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder for a NAR embedded in a longer stream: it stops at the
    /// NAR's end and leaves the bytes after it to the caller.
    pub fn new() -> Self {
        Self {
            state: State::Magic,
            whole_container: false,
            offset: 0,
            tok: Vec::with_capacity(8 + MAX_TARGET_LEN as usize + 8),
            tok_want: 0,
            tok_sized: false,
            tok_start: 0,
            executable: false,
            size: 0,
            remaining: 0,
            names: Vec::new(),
            levels: Vec::new(),
            failure: None,
        }
    }

    /// A decoder for a NAR that fills its container (a file, a framed
    /// upload): any byte after the NAR is an error
    /// ([`NarErrorKind::TrailingData`]). Call [`Decoder::finish`] at the
    /// container's end to catch truncation.
    pub fn whole_container() -> Self {
        Self {
            whole_container: true,
            ..Self::new()
        }
    }

    /// Whether the NAR's final `)` has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes consumed so far; once done, the NAR's size.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Validates and skips through as much of `buf` as possible and returns
    /// the number of bytes consumed. That is all of `buf` unless the NAR
    /// ends inside it: the decoder never consumes past the NAR's end.
    pub fn consume(&mut self, buf: &[u8]) -> Result<usize, NarError> {
        let mut pos = 0;
        loop {
            let progress = self.feed(&buf[pos..])?;
            pos += progress.consumed;
            match progress.step {
                Step::Event(_) => {}
                Step::NeedMore | Step::Done => return Ok(pos),
            }
        }
    }

    /// Checks that the NAR is complete, for a caller that reached the end
    /// of its input: a NAR that has not ended is truncated.
    pub fn finish(&self) -> Result<(), NarError> {
        match self.state {
            State::Done => Ok(()),
            State::Failed => Err(self
                .failure
                .clone()
                .unwrap_or_else(|| self.error(NarErrorKind::Truncated, self.offset, false))),
            _ => Err(self.error(NarErrorKind::Truncated, self.offset, false)),
        }
    }

    /// Feeds input to the decoder: it consumes bytes from the front of
    /// `input` up to the next event (or all of it, or up to the NAR's end)
    /// and says what it found. Call again with `&input[consumed..]`.
    ///
    /// After an error the decoder is spent and returns that error again.
    pub fn feed<'a>(&'a mut self, input: &'a [u8]) -> Result<Progress<'a>, NarError> {
        let mut pos = 0;
        let found = match self.run(input, &mut pos) {
            Ok(found) => found,
            Err(err) => {
                self.state = State::Failed;
                self.failure = Some(err.clone());
                return Err(err);
            }
        };
        self.offset += pos as u64;
        Ok(Progress {
            consumed: pos,
            step: self.step(found, input),
        })
    }

    /// Turns what [`Decoder::run`] found into a [`Step`] borrowing the
    /// decoder's buffers or the input.
    fn step<'a>(&'a self, found: Found, input: &'a [u8]) -> Step<'a> {
        let event = match found {
            Found::NeedMore => return Step::NeedMore,
            Found::Done => return Step::Done,
            Found::Directory => Event::Directory {
                // The directory's own level is already pushed.
                name: self.entry_name(self.levels.len().saturating_sub(2)),
            },
            Found::File => Event::File {
                name: self.current_name(),
                executable: self.executable,
                size: self.size,
            },
            Found::Contents(start, len) => Event::Contents(&input[start..start + len]),
            Found::FileEnd => Event::FileEnd,
            Found::Symlink => Event::Symlink {
                name: self.current_name(),
                target: &self.tok[8..],
            },
            Found::DirectoryEnd => Event::DirectoryEnd,
        };
        Step::Event(event)
    }

    /// The entry name of a regular or symlink node (`None` for the root).
    fn current_name(&self) -> Option<&[u8]> {
        self.levels
            .len()
            .checked_sub(1)
            .and_then(|top| self.entry_name(top))
    }

    /// The name of the latest entry of directory level `level`.
    fn entry_name(&self, level: usize) -> Option<&[u8]> {
        let start = *self.levels.get(level)?;
        let end = self
            .levels
            .get(level + 1)
            .copied()
            .unwrap_or(self.names.len());
        let name = &self.names[start..end];
        (!name.is_empty()).then_some(name)
    }

    /// Advances through `input` from `*pos` until an event, the end of the
    /// input or the end of the NAR.
    fn run(&mut self, input: &[u8], pos: &mut usize) -> Result<Found, NarError> {
        loop {
            match self.state {
                State::Failed => {
                    return Err(self.failure.clone().unwrap_or_else(|| {
                        self.error(NarErrorKind::Truncated, self.offset, false)
                    }))
                }
                State::Done => {
                    if self.whole_container && *pos < input.len() {
                        let at = self.offset + *pos as u64;
                        return Err(self.error(NarErrorKind::TrailingData, at, false));
                    }
                    return Ok(Found::Done);
                }
                State::Contents => {
                    if self.remaining == 0 {
                        self.state = State::ContentsPadding;
                        continue;
                    }
                    let available = input.len() - *pos;
                    if available == 0 {
                        return Ok(Found::NeedMore);
                    }
                    // Bounded by `available`, so the cast cannot truncate.
                    let len = self.remaining.min(available as u64) as usize;
                    let start = *pos;
                    *pos += len;
                    self.remaining -= len as u64;
                    return Ok(Found::Contents(start, len));
                }
                State::ContentsPadding => {
                    if !self.fill_raw(input, pos, padding_len(self.size)) {
                        return Ok(Found::NeedMore);
                    }
                    if self.tok.iter().any(|&b| b != 0) {
                        let at = self.tok_start;
                        return Err(self.error(NarErrorKind::NonZeroPadding, at, false));
                    }
                    self.tok_want = 0;
                    self.state = State::NodeClose;
                    return Ok(Found::FileEnd);
                }
                State::ContentsSize => {
                    if !self.fill_raw(input, pos, 8) {
                        return Ok(Found::NeedMore);
                    }
                    let mut size = [0; 8];
                    size.copy_from_slice(&self.tok);
                    self.tok_want = 0;
                    self.size = u64::from_le_bytes(size);
                    self.remaining = self.size;
                    self.state = State::Contents;
                    return Ok(Found::File);
                }
                _ => {
                    if !self.fill_str(input, pos)? {
                        return Ok(Found::NeedMore);
                    }
                    self.tok_want = 0;
                    if let Some(found) = self.on_token()? {
                        return Ok(found);
                    }
                }
            }
        }
    }

    /// Longest string token accepted in the current state.
    fn limit(&self) -> u64 {
        match self.state {
            State::Magic => wire::MAGIC.len() as u64,
            State::ExecutableValue => 0,
            State::EntryName => MAX_NAME_LEN,
            State::TargetValue => MAX_TARGET_LEN,
            _ => MAX_TAG_LEN,
        }
    }

    /// The error for a string token of `len` bytes, over [`Self::limit`].
    fn too_long(&self, len: u64) -> NarErrorKind {
        match self.state {
            State::Magic => NarErrorKind::BadMagic,
            State::ExecutableValue => NarErrorKind::ExecutableNotEmpty,
            State::EntryName => NarErrorKind::TooLong {
                what: "entry name",
                len,
                max: MAX_NAME_LEN,
            },
            State::TargetValue => NarErrorKind::TooLong {
                what: "symlink target",
                len,
                max: MAX_TARGET_LEN,
            },
            _ => NarErrorKind::TooLong {
                what: "tag",
                len,
                max: MAX_TAG_LEN,
            },
        }
    }

    /// Starts a token at `*pos` unless one is in progress.
    fn start_token(&mut self, pos: usize, want: usize) {
        if self.tok_want == 0 {
            self.tok.clear();
            self.tok_want = want;
            self.tok_sized = false;
            self.tok_start = self.offset + pos as u64;
        }
    }

    /// Copies input into `tok` until it holds `tok_want` bytes; true when
    /// it does.
    fn fill(&mut self, input: &[u8], pos: &mut usize) -> bool {
        let missing = self.tok_want - self.tok.len();
        let take = missing.min(input.len() - *pos);
        self.tok.extend_from_slice(&input[*pos..*pos + take]);
        *pos += take;
        take == missing
    }

    /// Assembles `len` raw bytes (a u64, padding) in `tok`.
    fn fill_raw(&mut self, input: &[u8], pos: &mut usize, len: usize) -> bool {
        if len == 0 {
            self.tok.clear();
            return true;
        }
        self.start_token(*pos, len);
        self.fill(input, pos)
    }

    /// Assembles one string token; when complete, its payload is `tok[8..]`.
    /// The length is checked against the state's limit before any of the
    /// payload is stored, and the padding must be zero.
    fn fill_str(&mut self, input: &[u8], pos: &mut usize) -> Result<bool, NarError> {
        self.start_token(*pos, 8);
        if !self.fill(input, pos) {
            return Ok(false);
        }
        if !self.tok_sized {
            let mut len = [0; 8];
            len.copy_from_slice(&self.tok[..8]);
            let len = u64::from_le_bytes(len);
            if len > self.limit() {
                return Err(self.error(self.too_long(len), self.tok_start, false));
            }
            // `len` is at most MAX_TARGET_LEN, so these casts cannot truncate.
            self.tok_want = 8 + len as usize + padding_len(len);
            self.tok_sized = true;
            if !self.fill(input, pos) {
                return Ok(false);
            }
        }
        let mut len = [0; 8];
        len.copy_from_slice(&self.tok[..8]);
        let len = 8 + u64::from_le_bytes(len) as usize;
        if self.tok[len..].iter().any(|&b| b != 0) {
            return Err(self.error(NarErrorKind::NonZeroPadding, self.tok_start, false));
        }
        self.tok.truncate(len);
        Ok(true)
    }

    /// Acts on the complete string token `tok[8..]`.
    fn on_token(&mut self) -> Result<Option<Found>, NarError> {
        let tok = &self.tok[8..];
        let expected = |what: &'static str, decoder: &Self| {
            decoder.error(
                NarErrorKind::UnexpectedTag {
                    expected: what,
                    found: String::from_utf8_lossy(&decoder.tok[8..]).into_owned(),
                },
                decoder.tok_start,
                false,
            )
        };
        match self.state {
            State::Magic => {
                if tok != wire::MAGIC {
                    return Err(self.error(NarErrorKind::BadMagic, self.tok_start, false));
                }
                self.state = State::NodeOpen;
            }
            State::NodeOpen | State::EntryOpen => {
                if tok != wire::OPEN {
                    return Err(expected("'('", self));
                }
                self.state = if self.state == State::NodeOpen {
                    State::NodeType
                } else {
                    State::EntryNameTag
                };
            }
            State::NodeType => {
                if tok != wire::TYPE {
                    return Err(expected("'type'", self));
                }
                self.state = State::TypeValue;
            }
            State::TypeValue => {
                if tok == wire::REGULAR {
                    self.executable = false;
                    self.state = State::RegularField;
                } else if tok == wire::SYMLINK {
                    self.state = State::TargetTag;
                } else if tok == wire::DIRECTORY {
                    self.levels.push(self.names.len());
                    self.state = State::DirectoryField;
                    return Ok(Some(Found::Directory));
                } else {
                    return Err(expected("'regular', 'symlink' or 'directory'", self));
                }
            }
            State::RegularField => {
                if tok == wire::EXECUTABLE {
                    self.state = State::ExecutableValue;
                } else if tok == wire::CONTENTS {
                    self.state = State::ContentsSize;
                } else {
                    return Err(expected("'executable' or 'contents'", self));
                }
            }
            State::ExecutableValue => {
                // The limit of 0 bytes has already rejected anything else.
                self.executable = true;
                self.state = State::ContentsTag;
            }
            State::ContentsTag => {
                if tok != wire::CONTENTS {
                    return Err(expected("'contents'", self));
                }
                self.state = State::ContentsSize;
            }
            State::TargetTag => {
                if tok != wire::TARGET {
                    return Err(expected("'target'", self));
                }
                self.state = State::TargetValue;
            }
            State::TargetValue => {
                if let Some(problem) = wire::target_problem(tok) {
                    return Err(self.error(
                        NarErrorKind::BadTarget(problem),
                        self.tok_start,
                        false,
                    ));
                }
                self.state = State::NodeClose;
                return Ok(Some(Found::Symlink));
            }
            State::NodeClose => {
                if tok != wire::CLOSE {
                    return Err(expected("')'", self));
                }
                self.close_node();
            }
            State::DirectoryField => {
                if tok == wire::ENTRY {
                    if self.levels.len() > MAX_DEPTH {
                        return Err(self.error(NarErrorKind::TooDeep, self.tok_start, false));
                    }
                    self.state = State::EntryOpen;
                } else if tok == wire::CLOSE {
                    if let Some(start) = self.levels.pop() {
                        self.names.truncate(start);
                    }
                    self.close_node();
                    return Ok(Some(Found::DirectoryEnd));
                } else {
                    return Err(expected("'entry' or ')'", self));
                }
            }
            State::EntryNameTag => {
                if tok != wire::NAME {
                    return Err(expected("'name'", self));
                }
                self.state = State::EntryName;
            }
            State::EntryName => {
                self.set_entry_name()?;
                self.state = State::EntryNodeTag;
            }
            State::EntryNodeTag => {
                if tok != wire::NODE {
                    return Err(expected("'node'", self));
                }
                self.state = State::NodeOpen;
            }
            State::EntryClose => {
                if tok != wire::CLOSE {
                    return Err(expected("')'", self));
                }
                self.state = State::DirectoryField;
            }
            State::ContentsSize
            | State::Contents
            | State::ContentsPadding
            | State::Done
            | State::Failed => {
                unreachable!("state {:?} does not read string tokens", self.state)
            }
        }
        Ok(None)
    }

    /// After a node's `)`: the NAR is done if it was the root, else the
    /// entry holding it must close.
    fn close_node(&mut self) {
        self.state = if self.levels.is_empty() {
            State::Done
        } else {
            State::EntryClose
        };
    }

    /// Validates the entry name in `tok[8..]` and makes it the latest
    /// entry of the current directory.
    fn set_entry_name(&mut self) -> Result<(), NarError> {
        let name = &self.tok[8..];
        if let Some(problem) = wire::name_problem(name) {
            return Err(self.error(NarErrorKind::BadName(problem), self.tok_start, true));
        }
        let Some(&start) = self.levels.last() else {
            unreachable!("an entry name is only read inside a directory")
        };
        let previous = &self.names[start..];
        if !previous.is_empty() {
            let kind = match name.cmp(previous) {
                Ordering::Greater => None,
                Ordering::Equal => Some(NarErrorKind::DuplicateName {
                    name: String::from_utf8_lossy(name).into_owned(),
                }),
                Ordering::Less => Some(NarErrorKind::Unsorted {
                    name: String::from_utf8_lossy(name).into_owned(),
                    previous: String::from_utf8_lossy(previous).into_owned(),
                }),
            };
            if let Some(kind) = kind {
                return Err(self.error(kind, self.tok_start, true));
            }
        }
        self.names.truncate(start);
        self.names.extend_from_slice(&self.tok[8..]);
        Ok(())
    }

    /// An error at NAR offset `at`, located at the current node, or at its
    /// directory when `in_directory` (for errors about an entry's name).
    fn error(&self, kind: NarErrorKind, at: u64, in_directory: bool) -> NarError {
        let levels = if in_directory {
            self.levels.len().saturating_sub(1)
        } else {
            self.levels.len()
        };
        let mut path = String::new();
        for level in 0..levels {
            if let Some(name) = self.entry_name(level) {
                path.push('/');
                path.push_str(&String::from_utf8_lossy(name));
            }
        }
        if path.is_empty() {
            path.push('/');
        }
        NarError {
            kind,
            offset: at,
            path_in_nar: path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{chunkings, decode_all, Raw};
    use super::*;

    /// Decodes `nar` in every chunking and returns the events of the whole
    /// NAR (contents chunks merged), checking that all chunkings agree.
    fn events(nar: &[u8]) -> Result<Vec<String>, NarError> {
        let mut first: Option<Result<Vec<String>, NarError>> = None;
        for chunks in chunkings(nar) {
            let got = decode_all(&chunks, true).map(|(events, _)| events);
            match &first {
                None => first = Some(got),
                Some(expected) => match (expected, &got) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b),
                    (Err(a), Err(b)) => assert_eq!(a.kind, b.kind, "{a} vs {b}"),
                    _ => panic!("chunking changed the outcome: {expected:?} vs {got:?}"),
                },
            }
        }
        first.unwrap_or_else(|| panic!("no chunking"))
    }

    fn kind(nar: &[u8]) -> NarErrorKind {
        match events(nar) {
            Ok(events) => panic!("accepted: {events:?}"),
            Err(err) => err.kind,
        }
    }

    #[test]
    fn section_6_1_example_file() {
        let nar = Raw::magic().file(false, b"dep-fdh1\n").0;
        assert_eq!(nar.len(), 128);
        assert_eq!(
            events(&nar).expect("valid"),
            ["file - 9", "contents dep-fdh1\n", "file-end"]
        );
    }

    #[test]
    fn tree_events() {
        let nar = Raw::sample_tree();
        assert_eq!(
            events(&nar).expect("valid"),
            [
                "dir /",
                "file a x 0",
                "file-end",
                "dir b",
                "symlink c -> ../a",
                "dir-end",
                "file d - 10",
                "contents 0123456789",
                "file-end",
                "dir-end",
            ]
        );
    }

    #[test]
    fn stops_exactly_at_the_end_in_stream_mode() {
        let nar = Raw::magic()
            .dir_start()
            .entry("x")
            .file(false, b"abc")
            .entry_end()
            .dir_end()
            .0;
        let mut stream = nar.clone();
        stream.extend_from_slice(b"NEXT-MESSAGE");
        for split in 0..=stream.len() {
            let mut decoder = Decoder::new();
            let first = decoder.consume(&stream[..split]).expect("valid prefix");
            let second = decoder.consume(&stream[first..]).expect("valid");
            assert!(decoder.is_done());
            assert_eq!(first + second, nar.len(), "split {split}");
            assert_eq!(decoder.offset(), nar.len() as u64);
            assert_eq!(decoder.consume(b"more").expect("stream mode"), 0);
        }
    }

    #[test]
    fn whole_container_rejects_trailing_bytes() {
        let mut nar = Raw::magic().file(false, b"x").0;
        let len = nar.len() as u64;
        nar.push(0);
        let err = Decoder::whole_container()
            .consume(&nar)
            .expect_err("trailing");
        assert_eq!(err.kind, NarErrorKind::TrailingData);
        assert_eq!(err.offset, len);
        assert_eq!(kind(&nar), NarErrorKind::TrailingData);
    }

    #[test]
    fn truncation_anywhere_is_detected() {
        let nar = Raw::magic()
            .dir_start()
            .entry("a")
            .file(true, b"hello")
            .entry_end()
            .entry("b")
            .symlink(b"a")
            .entry_end()
            .dir_end()
            .0;
        for cut in 0..nar.len() {
            let mut decoder = Decoder::whole_container();
            assert_eq!(decoder.consume(&nar[..cut]).expect("prefix"), cut);
            assert!(!decoder.is_done());
            let err = decoder.finish().expect_err("truncated");
            assert_eq!(err.kind, NarErrorKind::Truncated, "cut {cut}");
            assert_eq!(err.offset, cut as u64);
        }
    }

    #[test]
    fn hostile_table() {
        use NarErrorKind as K;
        let in_dir = |name: &[u8]| {
            Raw::magic()
                .dir_start()
                .entry_bytes(name)
                .file(false, b"")
                .entry_end()
                .dir_end()
                .0
        };
        let two = |a: &str, b: &str| {
            Raw::magic()
                .dir_start()
                .entry(a)
                .file(false, b"")
                .entry_end()
                .entry(b)
                .file(false, b"")
                .entry_end()
                .dir_end()
                .0
        };
        let unexpected = |k: NarErrorKind| matches!(k, K::UnexpectedTag { .. });
        let bad_name = |k: NarErrorKind| matches!(k, K::BadName(_));
        type Check<'c> = &'c dyn Fn(NarErrorKind) -> bool;
        let cases: Vec<(&str, Vec<u8>, Check<'_>)> = vec![
            ("empty input", vec![], &|k| k == K::Truncated),
            ("wrong magic", Raw::new().s(b"nix-archive-2").0, &|k| {
                k == K::BadMagic
            }),
            ("long magic", Raw::new().u64(1 << 40).0, &|k| {
                k == K::BadMagic
            }),
            ("dot", in_dir(b"."), &bad_name),
            ("dotdot", in_dir(b".."), &bad_name),
            ("slash", in_dir(b"a/b"), &bad_name),
            ("nul", in_dir(b"a\0b"), &bad_name),
            ("empty name", in_dir(b""), &bad_name),
            ("name too long", in_dir(&[b'n'; 256]), &|k| {
                matches!(
                    k,
                    K::TooLong {
                        what: "entry name",
                        len: 256,
                        ..
                    }
                )
            }),
            (
                "huge name length",
                Raw::magic()
                    .dir_start()
                    .s(b"entry")
                    .s(b"(")
                    .s(b"name")
                    .u64(u64::MAX)
                    .0,
                &|k| matches!(k, K::TooLong { len: u64::MAX, .. }),
            ),
            ("unsorted", two("b", "a"), &|k| {
                matches!(k, K::Unsorted { .. })
            }),
            ("duplicate", two("a", "a"), &|k| {
                matches!(k, K::DuplicateName { .. })
            }),
            ("bytes order, not locale", two("a", "B"), &|k| {
                matches!(k, K::Unsorted { .. })
            }),
            (
                "one-byte non-zero padding in contents",
                {
                    let mut nar = Raw::magic().file(false, b"abc").0;
                    let pad = nar.len() - 16 - 5;
                    nar[pad] = 1;
                    nar
                },
                &|k| k == K::NonZeroPadding,
            ),
            (
                "non-zero padding in a tag",
                {
                    let mut nar = Raw::magic().0;
                    nar[8 + 13] = b'x';
                    nar
                },
                &|k| k == K::NonZeroPadding,
            ),
            (
                "executable after contents",
                Raw::magic()
                    .s(b"(")
                    .s(b"type")
                    .s(b"regular")
                    .s(b"contents")
                    .u64(0)
                    .s(b"executable")
                    .s(b"")
                    .s(b")")
                    .0,
                &unexpected,
            ),
            (
                "non-empty executable",
                Raw::magic()
                    .s(b"(")
                    .s(b"type")
                    .s(b"regular")
                    .s(b"executable")
                    .s(b"1")
                    .0,
                &|k| k == K::ExecutableNotEmpty,
            ),
            (
                "regular without contents",
                Raw::magic().s(b"(").s(b"type").s(b"regular").s(b")").0,
                &unexpected,
            ),
            (
                "repeated type",
                Raw::magic().s(b"(").s(b"type").s(b"type").0,
                &unexpected,
            ),
            (
                "unknown field",
                Raw::magic().s(b"(").s(b"type").s(b"symlink").s(b"mode").0,
                &unexpected,
            ),
            (
                "unknown type",
                Raw::magic().s(b"(").s(b"type").s(b"fifo").0,
                &unexpected,
            ),
            (
                "tag too long",
                Raw::magic().s(b"(").s(&[b't'; 33]).0,
                &|k| {
                    matches!(
                        k,
                        K::TooLong {
                            what: "tag",
                            len: 33,
                            ..
                        }
                    )
                },
            ),
            (
                "name after node",
                Raw::magic().dir_start().s(b"entry").s(b"(").s(b"node").0,
                &unexpected,
            ),
            ("empty symlink target", Raw::magic().symlink(b"").0, &|k| {
                matches!(k, K::BadTarget(_))
            }),
            (
                "NUL in symlink target",
                Raw::magic().symlink(b"a\0").0,
                &|k| matches!(k, K::BadTarget(_)),
            ),
            (
                "symlink target too long",
                Raw::magic().symlink(&[b'a'; 4096]).0,
                &|k| {
                    matches!(
                        k,
                        K::TooLong {
                            what: "symlink target",
                            ..
                        }
                    )
                },
            ),
            (
                "trailing bytes",
                {
                    let mut nar = Raw::magic().symlink(b"a").0;
                    nar.extend_from_slice(&[0; 8]);
                    nar
                },
                &|k| k == K::TrailingData,
            ),
            (
                "truncated contents",
                {
                    let mut nar = Raw::magic().file(false, b"abcdefghij").0;
                    nar.truncate(nar.len() - 20);
                    nar
                },
                &|k| k == K::Truncated,
            ),
            ("too deep", deep(MAX_DEPTH + 1), &|k| k == K::TooDeep),
        ];
        for (what, nar, check) in cases {
            let got = kind(&nar);
            assert!(check(got.clone()), "{what}: got {got:?}");
        }
    }

    /// A chain of `depth` nested directories ending in an empty file.
    fn deep(depth: usize) -> Vec<u8> {
        let mut raw = Raw::magic();
        for _ in 0..depth {
            raw = raw.dir_start().entry("d");
        }
        raw = raw.file(false, b"");
        for _ in 0..depth {
            raw = raw.entry_end().dir_end();
        }
        raw.0
    }

    #[test]
    fn maximum_depth_is_accepted() {
        let events = events(&deep(MAX_DEPTH)).expect("64 levels are allowed");
        assert_eq!(events.len(), 2 * MAX_DEPTH + 2);
    }

    #[test]
    fn error_names_the_place() {
        let nar = Raw::magic()
            .dir_start()
            .entry("sub")
            .dir_start()
            .entry("link")
            .symlink(b"a\0")
            .0;
        let err = Decoder::new().consume(&nar).expect_err("NUL");
        assert_eq!(err.path_in_nar, "/sub/link");
        let text = err.to_string();
        assert!(text.contains("/sub/link") && text.contains("NUL"), "{text}");
        let err = Decoder::new().consume(&two_names()).expect_err("unsorted");
        assert_eq!(err.path_in_nar, "/sub");
        assert!(err.to_string().contains("'a'"), "{err}");
    }

    fn two_names() -> Vec<u8> {
        Raw::magic()
            .dir_start()
            .entry("sub")
            .dir_start()
            .entry("b")
            .file(false, b"")
            .entry_end()
            .entry("a")
            .0
    }

    #[test]
    fn spent_after_error() {
        let mut decoder = Decoder::new();
        let first = decoder
            .consume(b"\x0e\0\0\0\0\0\0\0")
            .expect_err("bad magic");
        let again = decoder.consume(b"").expect_err("still failed");
        assert_eq!(first, again);
        assert_eq!(decoder.finish().expect_err("failed"), first);
    }
}
