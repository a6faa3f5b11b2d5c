//! The transfer engine: store paths as NARs over QUIC streams, in both
//! directions, used by the agent (Upload in, Download out) and by the master
//! (Upload out, Download in: `--from` and build outputs).
//!
//! The body of an Upload or Download stream ([`crate::proto`] fixes the
//! sequence, nix-interfaces.md §6 the NAR) is a run of item frames, each
//! followed by exactly `nar_size` raw NAR bytes, and an end frame; the whole
//! body is one zstd stream if the request says so.
//!
//! | module      | owns                                                                  | I/O? |
//! |-------------|-----------------------------------------------------------------------|------|
//! | [`send`]    | items → frames + NARs dumped from disk, hashed → optional zstd → stream | store files, stream, threads |
//! | [`receive`] | stream → optional unzstd → item frames and NAR chunks; NAR → store path under Nix's lock, hash and size checked; batched registration | stream, store, threads |

pub mod receive;
pub mod send;
