//! Fuzz the frame decoder of nixq's protocol (`nixq_common::proto::frame`).
//!
//! Input: one byte choosing a split point, then a byte stream. The stream is
//! decoded as every message type, once whole and once fed in two parts split
//! at that point. Checked: no panic; both feedings give the same messages,
//! the same error and the same leftover bytes ("need more" is not an error,
//! and a frame's fate does not depend on how its bytes arrive); every decoded
//! message re-encodes, and its encoding is a fixed point (decode → encode
//! gives the same bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixq_common::proto::frame::{decode_slice, encode_to_vec, Message};
use nixq_common::proto::messages::{
    BuildEvent, DownloadItem, DownloadReply, HelloReply, PathBatch, PathInfosReply,
    QueryMissingReply, Request, StatusReply, UploadItem, UploadReply, WaitReply,
};

/// What a feeding produced: each message's encoding, the error (as text),
/// and the bytes left over.
type Outcome = (Vec<Vec<u8>>, Option<String>, Vec<u8>);

fn feed<M: Message>(parts: &[&[u8]]) -> Outcome {
    let mut buf = Vec::new();
    let mut messages = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        buf.extend_from_slice(part);
        loop {
            match decode_slice::<M>(&buf) {
                Ok(Some((message, taken))) => {
                    buf.drain(..taken);
                    let frame = encode_to_vec(&message).expect("a decoded message re-encodes");
                    let (again, used) = decode_slice::<M>(&frame)
                        .expect("a re-encoded message decodes")
                        .expect("a whole frame");
                    assert_eq!(used, frame.len());
                    assert_eq!(encode_to_vec(&again).expect("re-encodes"), frame);
                    messages.push(frame);
                }
                Ok(None) => break,
                Err(error) => {
                    // The leftover is everything not consumed, fed or not.
                    for rest in &parts[i + 1..] {
                        buf.extend_from_slice(rest);
                    }
                    return (messages, Some(error.to_string()), buf);
                }
            }
        }
    }
    (messages, None, buf)
}

fn check<M: Message>(stream: &[u8], split: usize) {
    let whole = feed::<M>(&[stream]);
    let parts = feed::<M>(&[&stream[..split], &stream[split..]]);
    assert_eq!(whole, parts, "{} split at {split}", M::NAME);
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let split = usize::from(selector) * stream.len() / 255;
    check::<Request>(stream, split);
    check::<HelloReply>(stream, split);
    check::<StatusReply>(stream, split);
    check::<PathBatch>(stream, split);
    check::<QueryMissingReply>(stream, split);
    check::<PathInfosReply>(stream, split);
    check::<WaitReply>(stream, split);
    check::<UploadItem>(stream, split);
    check::<UploadReply>(stream, split);
    check::<DownloadReply>(stream, split);
    check::<DownloadItem>(stream, split);
    check::<BuildEvent>(stream, split);
});
