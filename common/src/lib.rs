//! nixq-common: everything both sides of nixq need.
//!
//! # Layout
//!
//! | module        | owns                                                           | I/O?  |
//! |---------------|----------------------------------------------------------------|-------|
//! | [`store_path`]| `StoreDir`, `StorePath`, nix-base32                            | pure  |
//! | [`hash`]      | `NarHash` and the text forms Nix prints (`sha256:…`, base16)   | pure  |
//! | [`nar`]       | the NAR grammar, strict streaming decoder and canonical encoder; dump from disk, restore to disk | codec pure, dump/restore do I/O |
//! | [`drv`]       | `.drv` (ATerm) parser into the `BasicDerivation` of the daemon protocol | pure |
//! | [`machines`]  | Nix's machines file with `nixq://` URIs; the choice rule       | pure  |
//! | [`proto`]     | nixq's own wire protocol between master and agent              | pure  |
//! | [`daemon`]    | Nix daemon worker protocol: wire primitives, stderr loop (pure), async client (tokio) | client does I/O |
//! | [`store`]     | Nix's per-path locks and batch `--register-validity` (the route that works while Nix holds locks) | files, processes |
//! | [`path_info`] | `PathInfo` (references, NAR hash and size, deriver, sigs, ca) and closure ordering | pure |
//! | [`telemetry`] | tracing subscriber setup, text or JSON                         | stderr |
//! | [`tls`]       | rustls mutual-TLS configs from PEM files                        | reads files |
//! | [`net`]       | quinn endpoints with transport settings for bulk transfer       | sockets |
//! | [`transfer`]  | store paths as NAR bodies on streams: send (dump → zstd → stream), receive (stream → restore under lock → register) | stream, store, threads |
//!
//! Byte-level facts about Nix cite `shared/docs/nix-interfaces.md` by section (§N).

pub mod alloc;
pub mod daemon;
pub mod drv;
pub mod hash;
pub mod machines;
pub mod nar;
pub mod net;
pub mod path_info;
pub mod proto;
pub mod store;
pub mod store_path;
pub mod telemetry;
pub mod tls;
pub mod transfer;
