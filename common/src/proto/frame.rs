//! Framing: how one message travels on a stream.
//!
//! ```text
//! frame = length:u32 big-endian ‖ body:length bytes
//! body  = bincode 2 (serde, `config::standard()`: little-endian varints) of the message
//! ```
//!
//! A 4-byte big-endian prefix, like TLS records and HTTP/2 frames: no
//! message comes near 4 GiB, and network order reads naturally in a packet
//! dump. The reader knows which message type comes next (the stream table
//! in [`super`] fixes the sequence), so each type has its own limit
//! ([`Message::MAX_LEN`]), checked on the prefix before any byte of the
//! body is buffered; bincode gets the same limit for its allocations, and a
//! body with bytes left after the message is an error.
//!
//! [`decode`] is the pure decoder (`Ok(None)` = need more bytes, which is not
//! an error), [`encode`] the encoder; [`read_frame`] and [`write_frame`] are
//! the thin async glue over any tokio reader or writer (quinn's `RecvStream`
//! and `SendStream`, or a zstd stream around them). They read exactly one
//! frame, so raw NAR bytes that follow a frame stay in the stream.

use bytes::{Buf as _, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::messages::{
    BuildEvent, DownloadItem, DownloadReply, HelloReply, PathBatch, PathInfosReply,
    QueryMissingReply, Request, StatusReply, UploadItem, UploadReply, WaitReply, MAX_BATCH_LEN,
    MAX_ITEM_LEN, MAX_REPLY_LEN, MAX_REQUEST_LEN, MAX_SMALL_REPLY_LEN,
};
use super::ProtoError;

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// A type that travels as one frame.
pub trait Message: Serialize + DeserializeOwned {
    /// The type's name in errors.
    const NAME: &'static str;
    /// The largest body accepted or sent.
    const MAX_LEN: usize;
    /// For enums, the number of variants: a body whose tag is not below it
    /// is [`ProtoError::UnknownMessage`]. `None` for structs.
    const VARIANTS: Option<u32>;

    /// Decode a whole body (bincode with this type's limit; no trailing
    /// bytes).
    fn decode_body(body: &[u8]) -> Result<Self, ProtoError>;
}

/// bincode's configuration for nixq messages, with an allocation limit.
const fn config<const LIMIT: usize>() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<LIMIT>,
> {
    bincode::config::standard().with_limit::<LIMIT>()
}

fn decode_with_limit<M: Message, const LIMIT: usize>(body: &[u8]) -> Result<M, ProtoError> {
    if let Some(variants) = M::VARIANTS {
        // The enum tag leads the body as a varint u32; check it here to name
        // the error precisely (serde would only say "invalid value").
        let tag = bincode::decode_from_slice::<u32, _>(body, bincode::config::standard())
            .map_err(|e| decode_error::<M>(e, body.len()))?
            .0;
        if tag >= variants {
            return Err(ProtoError::UnknownMessage {
                message: M::NAME,
                tag,
            });
        }
    }
    let (message, used) = bincode::serde::decode_from_slice::<M, _>(body, config::<LIMIT>())
        .map_err(|e| decode_error::<M>(e, body.len()))?;
    match body.len() - used {
        0 => Ok(message),
        extra => Err(ProtoError::TrailingBytes {
            message: M::NAME,
            extra,
        }),
    }
}

fn decode_error<M: Message>(error: bincode::error::DecodeError, len: usize) -> ProtoError {
    use bincode::error::DecodeError as E;
    match error {
        E::UnexpectedEnd { .. } => ProtoError::Malformed {
            message: M::NAME,
            reason: format!("the {len}-byte body ends inside the message"),
        },
        E::LimitExceeded => ProtoError::FrameTooLarge {
            message: M::NAME,
            len: len as u64,
            limit: M::MAX_LEN,
        },
        other => ProtoError::Malformed {
            message: M::NAME,
            reason: other.to_string(),
        },
    }
}

macro_rules! message {
    ($ty:ty, $name:literal, $max:ident, $variants:expr) => {
        impl Message for $ty {
            const NAME: &'static str = $name;
            const MAX_LEN: usize = $max;
            const VARIANTS: Option<u32> = $variants;

            fn decode_body(body: &[u8]) -> Result<Self, ProtoError> {
                decode_with_limit::<Self, { $max }>(body)
            }
        }
    };
}

message!(Request, "Request", MAX_REQUEST_LEN, Some(8));
message!(HelloReply, "HelloReply", MAX_SMALL_REPLY_LEN, Some(3));
message!(StatusReply, "StatusReply", MAX_SMALL_REPLY_LEN, Some(2));
message!(PathBatch, "PathBatch", MAX_BATCH_LEN, None);
message!(
    QueryMissingReply,
    "QueryMissingReply",
    MAX_SMALL_REPLY_LEN,
    Some(2)
);
message!(PathInfosReply, "PathInfosReply", MAX_REPLY_LEN, Some(4));
message!(WaitReply, "WaitReply", MAX_SMALL_REPLY_LEN, Some(3));
message!(UploadItem, "UploadItem", MAX_ITEM_LEN, Some(2));
message!(UploadReply, "UploadReply", MAX_SMALL_REPLY_LEN, Some(3));
message!(DownloadReply, "DownloadReply", MAX_SMALL_REPLY_LEN, Some(2));
message!(DownloadItem, "DownloadItem", MAX_ITEM_LEN, Some(3));
message!(BuildEvent, "BuildEvent", MAX_REPLY_LEN, Some(4));

/// The body length announced by a frame header, checked against `M`'s limit.
fn body_len<M: Message>(header: [u8; HEADER_LEN]) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(header);
    match usize::try_from(len) {
        Ok(len) if len <= M::MAX_LEN => Ok(len),
        _ => Err(ProtoError::FrameTooLarge {
            message: M::NAME,
            len: u64::from(len),
            limit: M::MAX_LEN,
        }),
    }
}

/// Decode one `M` frame from the front of `bytes`: `Ok(None)` if more bytes
/// are needed, else the message and how many bytes it took. The length is
/// checked before the body is looked at.
pub fn decode_slice<M: Message>(bytes: &[u8]) -> Result<Option<(M, usize)>, ProtoError> {
    let Some((header, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = body_len::<M>(*header)?;
    let Some(body) = rest.get(..len) else {
        return Ok(None);
    };
    Ok(Some((M::decode_body(body)?, HEADER_LEN + len)))
}

/// Decode one `M` frame from the front of `buf`, consuming it; `Ok(None)`
/// (nothing consumed) if more bytes are needed. Bytes after the frame stay.
pub fn decode<M: Message>(buf: &mut BytesMut) -> Result<Option<M>, ProtoError> {
    let Some((message, used)) = decode_slice::<M>(buf)? else {
        return Ok(None);
    };
    buf.advance(used);
    Ok(Some(message))
}

/// Append `message` as one frame to `dst`. A message over its type's limit
/// is refused here, so a peer is never sent what it must reject.
pub fn encode<M: Message>(message: &M, dst: &mut BytesMut) -> Result<(), ProtoError> {
    let frame = encode_to_vec(message)?;
    dst.extend_from_slice(&frame);
    Ok(())
}

/// `message` as one frame.
pub fn encode_to_vec<M: Message>(message: &M) -> Result<Vec<u8>, ProtoError> {
    let mut frame = vec![0; HEADER_LEN];
    bincode::serde::encode_into_std_write(message, &mut frame, bincode::config::standard())
        .map_err(|e| ProtoError::Encode {
            message: M::NAME,
            reason: e.to_string(),
        })?;
    let len = frame.len() - HEADER_LEN;
    let too_large = || ProtoError::FrameTooLarge {
        message: M::NAME,
        len: len as u64,
        limit: M::MAX_LEN,
    };
    if len > M::MAX_LEN {
        return Err(too_large());
    }
    let prefix = u32::try_from(len).map_err(|_| too_large())?;
    frame[..HEADER_LEN].copy_from_slice(&prefix.to_be_bytes());
    Ok(frame)
}

/// Read one `M` frame. `Ok(None)` if the stream ended cleanly before the
/// frame's first byte; an end anywhere inside the frame is
/// [`ProtoError::Truncated`]. The body buffer grows with the bytes that
/// actually arrive, so a peer announcing a large frame and then stalling
/// holds no more memory than it sent.
pub async fn read_frame<M, R>(reader: &mut R) -> Result<Option<M>, ProtoError>
where
    M: Message,
    R: AsyncRead + Unpin + ?Sized,
{
    let mut header = [0; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match reader.read(&mut header[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(ProtoError::Truncated { message: M::NAME }),
            n => got += n,
        }
    }
    let len = body_len::<M>(header)?;
    let mut body = Vec::new();
    (&mut *reader)
        .take(len as u64)
        .read_to_end(&mut body)
        .await?;
    if body.len() < len {
        return Err(ProtoError::Truncated { message: M::NAME });
    }
    M::decode_body(&body).map(Some)
}

/// Write `message` as one frame (not flushed: quinn sends as the window
/// allows; wrap a buffered writer and flush yourself if you need to).
pub async fn write_frame<M, W>(writer: &mut W, message: &M) -> Result<(), ProtoError>
where
    M: Message,
    W: AsyncWrite + Unpin + ?Sized,
{
    let frame = encode_to_vec(message)?;
    writer.write_all(&frame).await?;
    Ok(())
}

/// [`read_frame`] for blocking readers (a zstd decoder on a blocking thread).
pub fn read_frame_blocking<M, R>(reader: &mut R) -> Result<Option<M>, ProtoError>
where
    M: Message,
    R: std::io::Read + ?Sized,
{
    use std::io::Read as _;
    let mut header = [0; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match reader.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Truncated { message: M::NAME }),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = body_len::<M>(header)?;
    let mut body = Vec::new();
    (&mut *reader).take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(ProtoError::Truncated { message: M::NAME });
    }
    M::decode_body(&body).map(Some)
}

/// [`write_frame`] for blocking writers.
pub fn write_frame_blocking<M, W>(writer: &mut W, message: &M) -> Result<(), ProtoError>
where
    M: Message,
    W: std::io::Write + ?Sized,
{
    writer.write_all(&encode_to_vec(message)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::fmt::Debug;

    use super::*;
    use crate::drv::{BasicDerivation, DerivationOutput};
    use crate::hash::NarHash;
    use crate::path_info::PathInfo;
    use crate::proto::messages::*;
    use crate::store_path::StorePath;

    fn path(n: u32, name: &str) -> StorePath {
        const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
        let hash: String = (0..32)
            .map(|i| NIX32[((n as usize) * 7 + i * 13) % 32] as char)
            .collect();
        StorePath::parse_any(&format!("/nix/store/{hash}-{name}")).expect("valid store path")
    }

    fn info(n: u32) -> PathInfo {
        PathInfo {
            path: path(n, "hello-2.12"),
            deriver: (n % 2 == 0).then(|| path(n + 100, "hello-2.12.drv")),
            nar_hash: NarHash::of(&n.to_le_bytes()),
            nar_size: 1 << (n % 40),
            references: (0..n % 5).map(|r| path(r, "dep")).collect(),
            registration_time: 1_700_000_000 + u64::from(n),
            ultimate: n % 3 == 0,
            sigs: vec![format!("cache.example-1:{n}sig==")],
            ca: (n % 4 == 1).then(|| {
                "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".to_owned()
            }),
        }
    }

    fn derivation() -> BasicDerivation {
        BasicDerivation {
            outputs: BTreeMap::from([(
                "out".to_owned(),
                DerivationOutput {
                    path: Some(path(1, "x")),
                    hash_algo: String::new(),
                    hash: String::new(),
                },
            )]),
            input_srcs: BTreeSet::from([path(2, "src"), path(3, "bash")]),
            platform: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hi > $out".into()],
            env: BTreeMap::from([("out".into(), path(1, "x").to_string())]),
        }
    }

    fn status() -> AgentStatus {
        AgentStatus {
            max_jobs: 4,
            running_builds: 2,
            load_average: 1.25,
            free_store_bytes: 50 << 30,
            free_space_floor: 1 << 30,
            uptime_secs: 3600,
            counters: Counters {
                paths_received: 10,
                nar_bytes_received: 1 << 20,
                peak_running_builds: 3,
                ..Counters::default()
            },
        }
    }

    fn refusals() -> Vec<Refusal> {
        vec![
            Refusal::HelloFirst,
            Refusal::Busy { limit: 4 },
            Refusal::NoSpace {
                free_bytes: 1,
                floor_bytes: 2,
            },
            Refusal::ShuttingDown,
            Refusal::Invalid {
                reason: "batch of 5000 paths".into(),
            },
        ]
    }

    fn requests() -> Vec<Request> {
        vec![
            Request::Hello(crate::proto::hello("nixq-build-hook 0.1.0")),
            Request::Status,
            Request::QueryMissing(QueryMissing { claim: true }),
            Request::QueryPathInfos(QueryPathInfos {
                paths: vec![path(1, "a"), path(2, "b")],
                closure: true,
            }),
            Request::WaitFor(WaitFor {
                paths: vec![path(5, "w")],
            }),
            Request::Upload(Upload {
                compression: Compression::Zstd { level: 3 },
            }),
            Request::Download(Download {
                paths: vec![],
                compression: Compression::None,
            }),
            Request::Build(Box::new(Build {
                drv_path: path(9, "x.drv"),
                drv: derivation(),
                settings: BuildSettings {
                    timeout_secs: 3600,
                    max_silent_secs: 600,
                    build_cores: 2,
                },
            })),
        ]
    }

    fn hello_replies() -> Vec<HelloReply> {
        let mut v = vec![
            HelloReply::Welcome(Box::new(Welcome {
                version: 1,
                agent_version: "nixq-agent 0.1.0".into(),
                store_dir: "/nix/store".into(),
                systems: vec!["x86_64-linux".into(), "i686-linux".into()],
                features: vec!["kvm".into(), "big-parallel".into()],
                status: status(),
            })),
            HelloReply::VersionMismatch {
                min_version: 2,
                max_version: 3,
            },
        ];
        v.extend(refusals().into_iter().map(HelloReply::Refused));
        v
    }

    fn status_replies() -> Vec<StatusReply> {
        vec![
            StatusReply::Status(status()),
            StatusReply::Refused(Refusal::HelloFirst),
        ]
    }

    fn batches() -> Vec<PathBatch> {
        vec![
            PathBatch {
                paths: (0..50).map(|i| path(i, "p")).collect(),
                last: false,
            },
            PathBatch {
                paths: vec![],
                last: true,
            },
        ]
    }

    fn query_missing_replies() -> Vec<QueryMissingReply> {
        vec![
            QueryMissingReply::States(vec![
                PathState::Valid,
                PathState::Missing,
                PathState::InFlight,
            ]),
            QueryMissingReply::Refused(Refusal::ShuttingDown),
        ]
    }

    fn path_infos_replies() -> Vec<PathInfosReply> {
        vec![
            PathInfosReply::Infos((0..8).map(info).collect()),
            PathInfosReply::NotValid(vec![path(3, "gone")]),
            PathInfosReply::Done,
            PathInfosReply::Refused(Refusal::HelloFirst),
        ]
    }

    fn wait_replies() -> Vec<WaitReply> {
        vec![
            WaitReply::Settled {
                index: 0,
                outcome: WaitOutcome::Valid,
            },
            WaitReply::Settled {
                index: 70_000,
                outcome: WaitOutcome::SendIt,
            },
            WaitReply::Done,
            WaitReply::Refused(Refusal::Busy { limit: 1 }),
        ]
    }

    fn upload_items() -> Vec<UploadItem> {
        vec![
            UploadItem::Path(info(4)),
            UploadItem::Path(info(5)),
            UploadItem::End,
        ]
    }

    fn upload_outcomes() -> Vec<UploadOutcome> {
        vec![
            UploadOutcome::Stored,
            UploadOutcome::AlreadyValid,
            UploadOutcome::HashMismatch {
                expected: NarHash::of(b"a"),
                got: NarHash::of(b"b"),
            },
            UploadOutcome::SizeMismatch {
                expected: 10,
                got: 11,
            },
            UploadOutcome::ReferenceNotValid {
                reference: path(8, "dep"),
            },
            UploadOutcome::ClaimedByOther,
            UploadOutcome::NoSpace {
                free_bytes: 5,
                floor_bytes: 6,
            },
            UploadOutcome::BadNar {
                reason: "unsorted entries".into(),
            },
            UploadOutcome::BadPathInfo {
                reason: "wrong store".into(),
            },
            UploadOutcome::ImportFailed {
                reason: "daemon said no".into(),
            },
        ]
    }

    fn upload_replies() -> Vec<UploadReply> {
        let mut v: Vec<UploadReply> = upload_outcomes()
            .into_iter()
            .enumerate()
            .map(|(i, outcome)| UploadReply::Result {
                index: i as u32,
                outcome,
            })
            .collect();
        v.push(UploadReply::Done);
        v.push(UploadReply::Refused(Refusal::NoSpace {
            free_bytes: 0,
            floor_bytes: 1,
        }));
        v
    }

    fn download_replies() -> Vec<DownloadReply> {
        vec![
            DownloadReply::Sending,
            DownloadReply::Refused(Refusal::HelloFirst),
        ]
    }

    fn download_items() -> Vec<DownloadItem> {
        vec![
            DownloadItem::Path(info(7)),
            DownloadItem::NotValid(path(1, "x")),
            DownloadItem::End,
        ]
    }

    fn build_events() -> Vec<BuildEvent> {
        vec![
            BuildEvent::Started,
            BuildEvent::Log(b"building '/nix/store/...'\n\xff\xfe raw bytes\n".to_vec()),
            BuildEvent::Outcome(BuildOutcome::Built {
                outputs: BTreeMap::from([("out".into(), info(1)), ("doc".into(), info(2))]),
            }),
            BuildEvent::Outcome(BuildOutcome::BuilderFailed {
                msg: "builder exited with 3".into(),
            }),
            BuildEvent::Outcome(BuildOutcome::TimedOut {
                msg: "timed out after 10 s".into(),
            }),
            BuildEvent::Outcome(BuildOutcome::Transient {
                msg: "daemon died".into(),
            }),
            BuildEvent::Refused(Refusal::Busy { limit: 1 }),
        ]
    }

    fn tag(body: &[u8]) -> u32 {
        bincode::decode_from_slice::<u32, _>(body, bincode::config::standard())
            .expect("tag")
            .0
    }

    /// Every sample round-trips, re-encodes to the same bytes, and together
    /// the samples use every tag below `VARIANTS` (so the constant is right).
    fn check<M: Message + PartialEq + Debug>(samples: &[M]) {
        let mut tags = BTreeSet::new();
        for sample in samples {
            let frame = encode_to_vec(sample).expect("encodes");
            let len = u32::from_be_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
            assert_eq!(len, frame.len() - HEADER_LEN);
            let (back, used) = decode_slice::<M>(&frame)
                .expect("decodes")
                .expect("complete");
            assert_eq!(&back, sample);
            assert_eq!(used, frame.len());
            assert_eq!(encode_to_vec(&back).expect("encodes"), frame);
            // Every proper prefix needs more bytes.
            for cut in 0..frame.len() {
                assert!(decode_slice::<M>(&frame[..cut]).expect("prefix").is_none());
            }
            if M::VARIANTS.is_some() {
                tags.insert(tag(&frame[HEADER_LEN..]));
            }
        }
        if let Some(variants) = M::VARIANTS {
            assert_eq!(tags, (0..variants).collect(), "{} variants", M::NAME);
            let unknown = [&[0, 0, 0, 1][..], &[variants as u8]].concat();
            assert!(matches!(
                decode_slice::<M>(&unknown),
                Err(ProtoError::UnknownMessage { tag, .. }) if tag == variants
            ));
        }
    }

    #[test]
    fn every_message_round_trips() {
        check(&requests());
        check(&hello_replies());
        check(&status_replies());
        check(&batches());
        check(&query_missing_replies());
        check(&path_infos_replies());
        check(&wait_replies());
        check(&upload_items());
        check(&upload_replies());
        check(&download_replies());
        check(&download_items());
        check(&build_events());
    }

    /// A stream of frames split at every point decodes to the same messages.
    #[test]
    fn every_split_point_decodes_identically() {
        let messages = requests();
        let mut stream = BytesMut::new();
        for m in &messages {
            encode(m, &mut stream).expect("encodes");
        }
        let stream = stream.freeze();
        for split in 0..=stream.len() {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                buf.extend_from_slice(part);
                while let Some(m) = decode::<Request>(&mut buf).expect("valid stream") {
                    got.push(m);
                }
            }
            assert_eq!(got, messages, "split at {split}");
            assert!(buf.is_empty());
        }
        // Byte by byte.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in stream.iter() {
            buf.extend_from_slice(&[*byte]);
            if let Some(m) = decode::<Request>(&mut buf).expect("valid stream") {
                got.push(m);
            }
        }
        assert_eq!(got, messages);
    }

    /// Raw bytes after a frame are left for the NAR reader.
    #[test]
    fn bytes_after_a_frame_stay() {
        let mut buf = BytesMut::new();
        encode(&UploadItem::Path(info(3)), &mut buf).expect("encodes");
        buf.extend_from_slice(b"nix-archive-1");
        assert_eq!(
            decode::<UploadItem>(&mut buf).expect("decodes"),
            Some(UploadItem::Path(info(3)))
        );
        assert_eq!(&buf[..], b"nix-archive-1");
    }

    #[test]
    fn oversized_length_is_rejected_before_the_body() {
        // Only the header: the decoder must not wait for 4 GiB.
        for len in [u32::MAX, (MAX_REQUEST_LEN + 1) as u32] {
            let header = len.to_be_bytes();
            let err = decode_slice::<Request>(&header).expect_err("too large");
            assert!(
                matches!(err, ProtoError::FrameTooLarge { len: l, limit, .. } if l == u64::from(len) && limit == MAX_REQUEST_LEN),
                "{err}"
            );
        }
        // Each type has its own limit.
        let header = ((MAX_SMALL_REPLY_LEN + 1) as u32).to_be_bytes();
        assert!(decode_slice::<Request>(&header).expect("fits").is_none());
        assert!(matches!(
            decode_slice::<UploadReply>(&header),
            Err(ProtoError::FrameTooLarge {
                message: "UploadReply",
                ..
            })
        ));
        // And the encoder refuses to produce what the peer must reject.
        let huge = PathBatch {
            paths: (0..100_000)
                .map(|i| path(i, "a-long-enough-name"))
                .collect(),
            last: true,
        };
        assert!(matches!(
            encode_to_vec(&huge),
            Err(ProtoError::FrameTooLarge {
                message: "PathBatch",
                ..
            })
        ));
    }

    #[test]
    fn huge_collection_claims_do_not_allocate() {
        // PathBatch claiming 2^40 paths in a 9-byte body (varint u64 marker 253).
        let mut body = vec![253];
        body.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let frame = [&(body.len() as u32).to_be_bytes()[..], &body].concat();
        let err = decode_slice::<PathBatch>(&frame).expect_err("rejected");
        assert!(
            matches!(
                err,
                ProtoError::FrameTooLarge { .. } | ProtoError::Malformed { .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let frame = encode_to_vec(&Request::Status).expect("encodes");
        let mut body = frame[HEADER_LEN..].to_vec();
        body.extend_from_slice(&[0, 0]);
        let padded = [&(body.len() as u32).to_be_bytes()[..], &body].concat();
        assert!(matches!(
            decode_slice::<Request>(&padded),
            Err(ProtoError::TrailingBytes {
                message: "Request",
                extra: 2
            })
        ));
    }

    #[test]
    fn bad_bodies_are_errors() {
        let frame = |body: &[u8]| [&(body.len() as u32).to_be_bytes()[..], body].concat();
        // An empty body has no tag.
        assert!(matches!(
            decode_slice::<Request>(&frame(&[])),
            Err(ProtoError::Malformed { .. })
        ));
        // A body cut inside the message.
        let whole = encode_to_vec(&requests()[3]).expect("encodes");
        let cut = &whole[HEADER_LEN..whole.len() - 3];
        assert!(matches!(
            decode_slice::<Request>(&frame(cut)),
            Err(ProtoError::Malformed { .. })
        ));
        // A store path that is not one.
        let bad = bincode::serde::encode_to_vec(
            &(vec!["/nix/store/not-a-store-path".to_owned()], true),
            bincode::config::standard(),
        )
        .expect("encodes");
        let err = decode_slice::<PathBatch>(&frame(&bad)).expect_err("bad path");
        assert!(matches!(err, ProtoError::Malformed { .. }), "{err}");
        // A bool that is 2.
        assert!(decode_slice::<PathBatch>(&frame(&[0, 2])).is_err());
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    fn decode_all<M: Message>(bytes: &[u8]) {
        let mut buf = BytesMut::from(bytes);
        while let Ok(Some(_)) = decode::<M>(&mut buf) {}
    }

    /// Random bytes, and valid frames with random bytes flipped, never panic.
    #[test]
    fn garbage_is_rejected_without_panic() {
        let mut rng = Rng(0xDEAD_BEEF);
        let mut valid = BytesMut::new();
        for m in requests() {
            encode(&m, &mut valid).expect("encodes");
        }
        for round in 0..3000 {
            let mut bytes = if round % 2 == 0 {
                let len = (rng.next() % 200) as usize;
                let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                // Mostly plausible lengths so bodies get decoded.
                if b.len() >= 4 {
                    b[..4].copy_from_slice(&((len as u32).saturating_sub(4)).to_be_bytes());
                }
                b
            } else {
                valid.to_vec()
            };
            for _ in 0..3 {
                let at = (rng.next() as usize) % bytes.len().max(1);
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= rng.next() as u8;
                }
            }
            decode_all::<Request>(&bytes);
            decode_all::<PathBatch>(&bytes);
            decode_all::<PathInfosReply>(&bytes);
            decode_all::<UploadItem>(&bytes);
            decode_all::<UploadReply>(&bytes);
            decode_all::<BuildEvent>(&bytes);
            decode_all::<HelloReply>(&bytes);
        }
    }

    #[tokio::test]
    async fn async_frames_over_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let sent = build_events();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                for m in &sent {
                    write_frame(&mut a, m).await.expect("writes");
                }
                a.write_all(b"raw").await.expect("writes raw");
            })
        };
        let mut got = Vec::new();
        for _ in 0..sent.len() {
            got.push(
                read_frame::<BuildEvent, _>(&mut b)
                    .await
                    .expect("reads")
                    .expect("a frame"),
            );
        }
        assert_eq!(got, sent);
        let mut raw = Vec::new();
        b.read_to_end(&mut raw).await.expect("reads raw");
        assert_eq!(raw, b"raw");
        writer.await.expect("writer task");
    }

    #[tokio::test]
    async fn async_end_of_stream() {
        // Clean end before a frame.
        let mut empty: &[u8] = &[];
        assert!(read_frame::<Request, _>(&mut empty)
            .await
            .expect("clean")
            .is_none());
        // End inside the header, and inside the body.
        let frame = encode_to_vec(&requests()[7]).expect("encodes");
        for cut in [2, HEADER_LEN + 1, frame.len() - 1] {
            let mut part = &frame[..cut];
            assert!(matches!(
                read_frame::<Request, _>(&mut part).await,
                Err(ProtoError::Truncated { message: "Request" })
            ));
        }
    }

    #[tokio::test]
    async fn async_oversized_header_fails_without_waiting_for_the_body() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.expect("writes");
        // The writer stays open: waiting for the body would hang the test.
        let result = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            read_frame::<Request, _>(&mut b),
        )
        .await
        .expect("answers at once");
        assert!(matches!(result, Err(ProtoError::FrameTooLarge { .. })));
        drop(a);
    }

    /// Writes one seed file per sample message (with a leading split byte)
    /// for `cargo fuzz run frame_decode DIR`. Run explicitly:
    /// `NIXQ_FUZZ_SEEDS=DIR cargo test -p nixq-common --lib write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore = "writes fuzz seeds when asked"]
    fn write_fuzz_seeds() {
        let dir = std::env::var("NIXQ_FUZZ_SEEDS").expect("NIXQ_FUZZ_SEEDS=DIR");
        std::fs::create_dir_all(&dir).expect("seed dir");
        let mut frames: Vec<Vec<u8>> = Vec::new();
        frames.extend(
            requests()
                .iter()
                .map(|m| encode_to_vec(m).expect("encodes")),
        );
        frames.extend(
            hello_replies()
                .iter()
                .map(|m| encode_to_vec(m).expect("encodes")),
        );
        frames.extend(
            status_replies()
                .iter()
                .map(|m| encode_to_vec(m).expect("encodes")),
        );
        frames.extend(batches().iter().map(|m| encode_to_vec(m).expect("encodes")));
        frames.extend(
            query_missing_replies()
                .iter()
                .map(|m| encode_to_vec(m).expect("encodes")),
        );
        frames.extend(
            path_infos_replies()
                .iter()
                .map(|m| encode_to_vec(m).expect("encodes")),
        );
        frames.extend(
            wait_replies()
                .iter()
                .map(|m| encode_to_vec(m).expect("encodes")),
        );
        frames.extend(
            upload_items()
                .iter()
                .map(|m| encode_to_vec(m).expect("encodes")),
        );
        frames.extend(
            upload_replies()
                .iter()
                .map(|m| encode_to_vec(m).expect("encodes")),
        );
        frames.extend(
            download_replies()
                .iter()
                .map(|m| encode_to_vec(m).expect("encodes")),
        );
        frames.extend(
            download_items()
                .iter()
                .map(|m| encode_to_vec(m).expect("encodes")),
        );
        frames.extend(
            build_events()
                .iter()
                .map(|m| encode_to_vec(m).expect("encodes")),
        );
        for (i, frame) in frames.iter().enumerate() {
            let seed = [&[(i * 37 % 256) as u8][..], frame, frame].concat();
            std::fs::write(format!("{dir}/seed-{i:03}"), seed).expect("write seed");
        }
    }

    #[test]
    fn blocking_frames() {
        let mut wire = Vec::new();
        for m in download_items() {
            write_frame_blocking(&mut wire, &m).expect("writes");
        }
        let mut reader = &wire[..];
        let mut got = Vec::new();
        while let Some(m) = read_frame_blocking::<DownloadItem, _>(&mut reader).expect("reads") {
            got.push(m);
        }
        assert_eq!(got, download_items());
        let mut cut = &wire[..wire.len() - 1];
        let mut result = Ok(None);
        for _ in 0..3 {
            result = read_frame_blocking::<DownloadItem, _>(&mut cut);
        }
        assert!(matches!(result, Err(ProtoError::Truncated { .. })));
    }
}
