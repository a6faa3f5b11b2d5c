//! The canonical NAR writer: a checked typestate API over any `io::Write`.
//!
//! [`Encoder::root`] lends a [`Node`]; a node becomes exactly one of a
//! regular file, a symlink or a [`Directory`], whose [`Directory::entry`]
//! lends the child node of each entry. The borrows make "one entry at a
//! time" a compile-time rule. What the types cannot express is checked at
//! run time, in release builds too: entry names valid and strictly
//! increasing (§6.2, §6.3), targets valid, depth ≤ [`MAX_DEPTH`], contents
//! of the announced size, and no node abandoned half-written (a dropped
//! [`Node`] or unclosed [`Directory`] poisons the encoder, and
//! [`Encoder::finish`] then fails). So the encoder never emits a NAR that
//! the [`Decoder`](super::Decoder) would reject.
//!
//! Output goes through one buffer of [`DEFAULT_BUFFER_SIZE`] bytes: small
//! tokens are batched, and file contents are read straight into the buffer,
//! so each byte is copied once between the source and `out`.

use std::io::{self, Read, Write};

use super::wire::{self, padding_len, MAX_DEPTH};

/// Size of the encoder's output buffer. 1 MiB makes the read and write
/// system calls large enough that their fixed cost vanishes next to the
/// copy (measured with `benches/nar.rs`) while staying a small, bounded
/// allocation per concurrent encoder.
pub const DEFAULT_BUFFER_SIZE: usize = 1 << 20;

/// The smallest buffer accepted: a whole entry header (tags plus a name of
/// 255 bytes) or a symlink target of 4095 bytes must fit after a flush.
const MIN_BUFFER_SIZE: usize = 8 << 10;

/// Why the encoder refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("writing the NAR failed: {0}")]
    Write(#[source] io::Error),
    #[error("reading file contents failed: {0}")]
    ReadContents(#[source] io::Error),
    #[error("file contents ended after {got} of the announced {expected} bytes")]
    ContentsTooShort { expected: u64, got: u64 },
    #[error("invalid entry name '{name}': {problem}")]
    BadName { name: String, problem: &'static str },
    #[error("entry '{name}' after '{previous}': entries must be added in strictly increasing byte order")]
    Unsorted { name: String, previous: String },
    #[error("invalid symlink target: {0}")]
    BadTarget(&'static str),
    #[error("directories nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("a node was left unfinished, so the NAR is incomplete")]
    Incomplete,
    #[error("the root node was already written")]
    RootTaken,
}

/// The buffered output shared by all nodes of one NAR.
struct Sink<W> {
    out: W,
    buf: Box<[u8]>,
    filled: usize,
    /// Bytes handed to `out` so far.
    flushed: u64,
    /// A node was dropped unfinished; the output is unusable.
    poisoned: bool,
    /// The root node is complete.
    complete: bool,
}

impl<W: Write> Sink<W> {
    fn check(&self) -> Result<(), EncodeError> {
        if self.poisoned {
            Err(EncodeError::Incomplete)
        } else {
            Ok(())
        }
    }

    fn flush(&mut self) -> Result<(), EncodeError> {
        self.out
            .write_all(&self.buf[..self.filled])
            .map_err(EncodeError::Write)?;
        self.flushed += self.filled as u64;
        self.filled = 0;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        if self.buf.len() - self.filled < bytes.len() {
            self.flush()?;
        }
        self.buf[self.filled..self.filled + bytes.len()].copy_from_slice(bytes);
        self.filled += bytes.len();
        Ok(())
    }

    /// One wire string. Tokens are at most 8 + 4095 + 1 bytes, so they fit
    /// in the buffer after a flush.
    fn put_str(&mut self, s: &[u8]) -> Result<(), EncodeError> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s)?;
        self.put(&[0; 8][..padding_len(s.len() as u64)])
    }

    fn put_strs(&mut self, tokens: &[&[u8]]) -> Result<(), EncodeError> {
        tokens.iter().try_for_each(|t| self.put_str(t))
    }

    /// Copies exactly `size` bytes from `contents`, reading straight into
    /// the buffer, then the padding.
    fn put_contents(&mut self, size: u64, contents: &mut impl Read) -> Result<(), EncodeError> {
        self.put(&size.to_le_bytes())?;
        let mut remaining = size;
        while remaining > 0 {
            if self.filled == self.buf.len() {
                self.flush()?;
            }
            let room = self.buf.len() - self.filled;
            // Bounded by `room`, so the cast cannot truncate.
            let want = remaining.min(room as u64) as usize;
            let n = match contents.read(&mut self.buf[self.filled..self.filled + want]) {
                Ok(0) => {
                    return Err(EncodeError::ContentsTooShort {
                        expected: size,
                        got: size - remaining,
                    })
                }
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(EncodeError::ReadContents(err)),
            };
            self.filled += n;
            remaining -= n as u64;
        }
        self.put(&[0; 8][..padding_len(size)])
    }
}

/// Writes one NAR to `out`. See the [module docs](self).
pub struct Encoder<W: Write> {
    sink: Sink<W>,
    root_taken: bool,
}

impl<W: Write> Encoder<W> {
    /// An encoder with a buffer of [`DEFAULT_BUFFER_SIZE`].
    pub fn new(out: W) -> Self {
        Self::with_buffer_size(out, DEFAULT_BUFFER_SIZE)
    }

    /// An encoder with a buffer of `size` bytes (at least 8 KiB).
    pub fn with_buffer_size(out: W, size: usize) -> Self {
        Self {
            sink: Sink {
                out,
                buf: vec![0; size.max(MIN_BUFFER_SIZE)].into_boxed_slice(),
                filled: 0,
                flushed: 0,
                poisoned: false,
                complete: false,
            },
            root_taken: false,
        }
    }

    /// Writes the magic and lends the root node. Only once per encoder.
    pub fn root(&mut self) -> Result<Node<'_, W>, EncodeError> {
        if self.root_taken {
            return Err(EncodeError::RootTaken);
        }
        self.root_taken = true;
        self.sink.put_str(wire::MAGIC)?;
        self.sink.put_str(wire::OPEN)?;
        Ok(Node {
            sink: Some(&mut self.sink),
            depth: 0,
        })
    }

    /// Flushes the NAR into `out` and returns `out` and the NAR's size.
    /// Fails if the root node is not complete.
    pub fn finish(mut self) -> Result<(W, u64), EncodeError> {
        self.sink.check()?;
        if !self.sink.complete {
            return Err(EncodeError::Incomplete);
        }
        self.sink.flush()?;
        self.sink.out.flush().map_err(EncodeError::Write)?;
        Ok((self.sink.out, self.sink.flushed))
    }
}

/// A node to be written: consume it with [`Node::regular`],
/// [`Node::symlink`] or [`Node::directory`]. Dropping it unused poisons
/// the encoder.
pub struct Node<'e, W: Write> {
    /// `None` once the node has been used.
    sink: Option<&'e mut Sink<W>>,
    /// Directory levels above this node (0 for the root).
    depth: usize,
}

impl<'e, W: Write> Node<'e, W> {
    /// Takes the sink out, failing if the encoder is already poisoned.
    fn take(&mut self) -> Result<&'e mut Sink<W>, EncodeError> {
        let sink = self.sink.take().ok_or(EncodeError::Incomplete)?;
        sink.check()?;
        Ok(sink)
    }

    /// A regular file of `size` bytes read from `contents` (exactly `size`
    /// bytes are read; fewer is an error).
    pub fn regular(
        mut self,
        executable: bool,
        size: u64,
        contents: &mut impl Read,
    ) -> Result<(), EncodeError> {
        let sink = self.take()?;
        let result = (|| {
            sink.put_strs(&[wire::TYPE, wire::REGULAR])?;
            if executable {
                sink.put_strs(&[wire::EXECUTABLE, b""])?;
            }
            sink.put_str(wire::CONTENTS)?;
            sink.put_contents(size, contents)?;
            close_node(sink, self.depth)
        })();
        poison_on_error(sink, result)
    }

    /// A symbolic link to `target`.
    pub fn symlink(mut self, target: &[u8]) -> Result<(), EncodeError> {
        let sink = self.take()?;
        if let Some(problem) = wire::target_problem(target) {
            sink.poisoned = true;
            return Err(EncodeError::BadTarget(problem));
        }
        let result = (|| {
            sink.put_strs(&[wire::TYPE, wire::SYMLINK, wire::TARGET, target])?;
            close_node(sink, self.depth)
        })();
        poison_on_error(sink, result)
    }

    /// A directory; add its entries in byte order, then
    /// [`Directory::close`] it.
    pub fn directory(mut self) -> Result<Directory<'e, W>, EncodeError> {
        let sink = self.take()?;
        let result = sink.put_strs(&[wire::TYPE, wire::DIRECTORY]);
        poison_on_error(sink, result)?;
        Ok(Directory {
            sink: Some(sink),
            depth: self.depth,
            previous: Vec::new(),
        })
    }
}

impl<W: Write> Drop for Node<'_, W> {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            sink.poisoned = true;
        }
    }
}

/// Writes the `)` of a node at `depth`, and the `)` of its entry unless it
/// is the root.
fn close_node<W: Write>(sink: &mut Sink<W>, depth: usize) -> Result<(), EncodeError> {
    sink.put_str(wire::CLOSE)?;
    if depth == 0 {
        sink.complete = true;
        Ok(())
    } else {
        sink.put_str(wire::CLOSE)
    }
}

fn poison_on_error<W: Write, T>(
    sink: &mut Sink<W>,
    result: Result<T, EncodeError>,
) -> Result<T, EncodeError> {
    if result.is_err() {
        sink.poisoned = true;
    }
    result
}

/// A directory being written. Dropping it without [`Directory::close`]
/// poisons the encoder.
pub struct Directory<'e, W: Write> {
    sink: Option<&'e mut Sink<W>>,
    depth: usize,
    /// The previous entry's name, empty before the first.
    previous: Vec<u8>,
}

impl<W: Write> Directory<'_, W> {
    /// Starts the entry `name`, which must be valid and sort after the
    /// previous entry's; write its node before the next entry.
    pub fn entry(&mut self, name: &[u8]) -> Result<Node<'_, W>, EncodeError> {
        let sink = self.sink.as_deref_mut().ok_or(EncodeError::Incomplete)?;
        sink.check()?;
        let refusal = if let Some(problem) = wire::name_problem(name) {
            Some(EncodeError::BadName {
                name: String::from_utf8_lossy(name).into_owned(),
                problem,
            })
        } else if !self.previous.is_empty() && name <= self.previous.as_slice() {
            Some(EncodeError::Unsorted {
                name: String::from_utf8_lossy(name).into_owned(),
                previous: String::from_utf8_lossy(&self.previous).into_owned(),
            })
        } else if self.depth >= MAX_DEPTH {
            Some(EncodeError::TooDeep)
        } else {
            None
        };
        if let Some(err) = refusal {
            sink.poisoned = true;
            return Err(err);
        }
        let result = sink.put_strs(&[
            wire::ENTRY,
            wire::OPEN,
            wire::NAME,
            name,
            wire::NODE,
            wire::OPEN,
        ]);
        poison_on_error(sink, result)?;
        self.previous.clear();
        self.previous.extend_from_slice(name);
        Ok(Node {
            sink: Some(sink),
            depth: self.depth + 1,
        })
    }

    /// Ends the directory.
    pub fn close(mut self) -> Result<(), EncodeError> {
        let sink = self.sink.take().ok_or(EncodeError::Incomplete)?;
        sink.check()?;
        let result = close_node(sink, self.depth);
        poison_on_error(sink, result)
    }
}

impl<W: Write> Drop for Directory<'_, W> {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            sink.poisoned = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Raw;
    use super::super::Decoder;
    use super::*;

    fn encode(build: impl FnOnce(Node<'_, &mut Vec<u8>>) -> Result<(), EncodeError>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = Encoder::with_buffer_size(&mut out, 0);
        build(encoder.root().expect("root")).expect("encode");
        let (_, size) = encoder.finish().expect("finish");
        assert_eq!(size as usize, out.len());
        out
    }

    #[test]
    fn matches_the_grammar() {
        let nar = encode(|root| {
            let mut dir = root.directory()?;
            dir.entry(b"a")?.regular(true, 0, &mut &b""[..])?;
            {
                let mut sub = dir.entry(b"b")?.directory()?;
                sub.entry(b"c")?.symlink(b"../a")?;
                sub.close()?;
            }
            dir.entry(b"d")?
                .regular(false, 10, &mut &b"0123456789"[..])?;
            dir.close()
        });
        let expected = Raw::sample_tree();
        assert_eq!(nar, expected);
        let mut decoder = Decoder::whole_container();
        assert_eq!(decoder.consume(&nar).expect("valid"), nar.len());
        assert!(decoder.is_done());
    }

    #[test]
    fn large_contents_cross_buffer_flushes() {
        let data: Vec<u8> = (0..100_003u32).map(|i| (i * 7) as u8).collect();
        let nar = encode(|root| root.regular(false, data.len() as u64, &mut &data[..]));
        assert_eq!(nar, Raw::magic().file(false, &data).0);
    }

    #[test]
    fn refuses_what_the_decoder_would_reject() {
        let mut out = Vec::new();
        let mut encoder = Encoder::new(&mut out);
        let mut dir = encoder.root().expect("root").directory().expect("dir");
        dir.entry(b"b").expect("b").symlink(b"x").expect("symlink");
        assert!(matches!(dir.entry(b"a"), Err(EncodeError::Unsorted { .. })));
        drop(dir);
        assert!(matches!(encoder.finish(), Err(EncodeError::Incomplete)));

        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0"] {
            let mut encoder = Encoder::new(Vec::new());
            let mut dir = encoder.root().expect("root").directory().expect("dir");
            assert!(matches!(dir.entry(bad), Err(EncodeError::BadName { .. })));
        }
        let mut encoder = Encoder::new(Vec::new());
        let err = encoder
            .root()
            .expect("root")
            .symlink(b"")
            .expect_err("empty");
        assert!(matches!(err, EncodeError::BadTarget(_)));
    }

    #[test]
    fn abandoned_nodes_poison() {
        let mut encoder = Encoder::new(Vec::new());
        {
            let mut dir = encoder.root().expect("root").directory().expect("dir");
            drop(dir.entry(b"a").expect("entry"));
            assert!(matches!(dir.entry(b"b"), Err(EncodeError::Incomplete)));
        }
        assert!(matches!(encoder.finish(), Err(EncodeError::Incomplete)));

        let mut encoder = Encoder::new(Vec::new());
        drop(encoder.root().expect("root"));
        assert!(encoder.finish().is_err());

        let encoder = Encoder::new(Vec::new());
        assert!(matches!(encoder.finish(), Err(EncodeError::Incomplete)));
    }

    #[test]
    fn short_contents_are_an_error() {
        let mut encoder = Encoder::new(Vec::new());
        let err = encoder
            .root()
            .expect("root")
            .regular(false, 5, &mut &b"abc"[..])
            .expect_err("short");
        assert!(matches!(
            err,
            EncodeError::ContentsTooShort {
                expected: 5,
                got: 3
            }
        ));
        assert!(encoder.finish().is_err());
    }

    #[test]
    fn depth_limit() {
        fn nest(node: Node<'_, Vec<u8>>, levels: usize) -> Result<(), EncodeError> {
            if levels == 0 {
                return node.regular(false, 0, &mut io::empty());
            }
            let mut dir = node.directory()?;
            nest(dir.entry(b"d")?, levels - 1)?;
            dir.close()
        }
        let mut encoder = Encoder::new(Vec::new());
        nest(encoder.root().expect("root"), MAX_DEPTH).expect("64 levels");
        let (nar, _) = encoder.finish().expect("finish");
        Decoder::whole_container().consume(&nar).expect("decodes");

        let mut encoder = Encoder::new(Vec::new());
        let err = nest(encoder.root().expect("root"), MAX_DEPTH + 1).expect_err("65 levels");
        assert!(matches!(err, EncodeError::TooDeep));
    }
}
