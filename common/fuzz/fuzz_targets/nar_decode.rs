//! Fuzzes the strict NAR decoder.
//!
//! The first byte picks a chunk size; the rest is the NAR, fed in chunks.
//! Checks: no panic; consumption never passes the input or the NAR's end;
//! contents chunks add up to the announced sizes; the chunked outcome
//! equals the one-shot outcome; and every NAR the decoder accepts
//! re-encodes, through the canonical encoder, to exactly the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nixq_common::nar::{Decoder, Encoder, Event, Node, Step};

/// An in-memory tree rebuilt from the events, to re-encode.
enum Tree {
    File { executable: bool, contents: Vec<u8> },
    Symlink(Vec<u8>),
    Directory(Vec<(Vec<u8>, Tree)>),
}

/// Decodes `nar` in chunks of `chunk` bytes in whole-container mode.
/// Returns the tree, or the error kind's text.
fn decode(nar: &[u8], chunk: usize) -> Result<Tree, String> {
    let mut decoder = Decoder::whole_container();
    // Open directories with their entries, and the entry name of each.
    let mut stack: Vec<(Option<Vec<u8>>, Vec<(Vec<u8>, Tree)>)> = Vec::new();
    let mut file: Option<(Option<Vec<u8>>, bool, u64, Vec<u8>)> = None;
    let mut root: Option<Tree> = None;
    let mut total = 0;
    for piece in nar.chunks(chunk.max(1)) {
        let mut pos = 0;
        loop {
            let progress = decoder
                .feed(&piece[pos..])
                .map_err(|e| format!("{:?}", e.kind))?;
            assert!(progress.consumed <= piece.len() - pos);
            pos += progress.consumed;
            total += progress.consumed;
            let event = match progress.step {
                Step::NeedMore => {
                    assert_eq!(pos, piece.len(), "NeedMore before the input was used up");
                    break;
                }
                Step::Done => break,
                Step::Event(event) => event,
            };
            let mut finished: Option<(Option<Vec<u8>>, Tree)> = None;
            match event {
                Event::Directory { name } => stack.push((name.map(<[u8]>::to_vec), Vec::new())),
                Event::File {
                    name,
                    executable,
                    size,
                } => file = Some((name.map(<[u8]>::to_vec), executable, size, Vec::new())),
                Event::Contents(data) => {
                    let (_, _, size, contents) = file.as_mut().expect("contents inside a file");
                    assert!(!data.is_empty());
                    contents.extend_from_slice(data);
                    assert!(contents.len() as u64 <= *size);
                }
                Event::FileEnd => {
                    let (name, executable, size, contents) = file.take().expect("file end");
                    assert_eq!(contents.len() as u64, size);
                    finished = Some((
                        name,
                        Tree::File {
                            executable,
                            contents,
                        },
                    ));
                }
                Event::Symlink { name, target } => {
                    finished = Some((name.map(<[u8]>::to_vec), Tree::Symlink(target.to_vec())));
                }
                Event::DirectoryEnd => {
                    let (name, entries) = stack.pop().expect("directory end");
                    finished = Some((name, Tree::Directory(entries)));
                }
            }
            if let Some((name, tree)) = finished {
                match (name, stack.last_mut()) {
                    (Some(name), Some((_, entries))) => entries.push((name, tree)),
                    (None, None) => root = Some(tree),
                    _ => panic!("node name does not match its place"),
                }
            }
        }
    }
    decoder.finish().map_err(|e| format!("{:?}", e.kind))?;
    assert!(decoder.is_done());
    assert_eq!(total, nar.len());
    assert_eq!(decoder.offset(), nar.len() as u64);
    Ok(root.expect("a complete NAR has a root"))
}

fn encode(node: Node<'_, &mut Vec<u8>>, tree: &Tree) {
    match tree {
        Tree::File {
            executable,
            contents,
        } => node
            .regular(*executable, contents.len() as u64, &mut &contents[..])
            .expect("encode file"),
        Tree::Symlink(target) => node.symlink(target).expect("encode symlink"),
        Tree::Directory(entries) => {
            let mut dir = node.directory().expect("encode directory");
            for (name, child) in entries {
                encode(dir.entry(name).expect("accepted names re-encode"), child);
            }
            dir.close().expect("close directory");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, nar)) = data.split_first() else {
        return;
    };
    let one_shot = decode(nar, nar.len());
    let chunked = decode(nar, usize::from(chunk % 64) + 1);
    match (&one_shot, &chunked) {
        (Ok(_), Ok(_)) => {}
        (Err(a), Err(b)) => assert_eq!(a, b, "chunking changed the error"),
        _ => panic!("chunking changed the outcome"),
    }

    // Stream mode stops at the NAR's end even with bytes after it.
    let mut stream = Decoder::new();
    if let Ok(used) = stream.consume(nar) {
        assert!(used <= nar.len());
        if stream.is_done() {
            assert_eq!(stream.consume(b"trailing").ok(), Some(0));
        }
    }

    if let Ok(tree) = one_shot {
        let mut out = Vec::new();
        let mut encoder = Encoder::new(&mut out);
        encode(encoder.root().expect("root"), &tree);
        encoder.finish().expect("finish");
        assert!(out == nar, "an accepted NAR is not canonical");
    }
});
