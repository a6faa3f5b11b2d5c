//! nixq-agent: the daemon on every build slave. It receives closures,
//! sends paths back, and runs builds for nixq masters over QUIC with mutual
//! TLS ([`nixq_common::proto`] is the protocol).
//!
//! # Layout
//!
//! | module        | owns                                                            |
//! |---------------|-----------------------------------------------------------------|
//! | [`cli`]       | the command line (clap), applied over the configuration file    |
//! | [`config`]    | [`config::AgentConfig`] from TOML, with defaults and their reasons |
//! | [`server`]    | endpoints, accept loop, connection and stream tasks, limits, shutdown |
//! | [`ops`]       | one module per stream: hello, status, query_missing, query_path_infos, wait_for, upload, download, build |
//! | [`claims`]    | the path-claim table (pure state machine + watch channels)      |
//! | [`store`]     | daemon connections; the per-connection one that holds temp roots |
//! | [`load`]      | load average, free store space, writability                     |
//! | [`local_nix`] | systems and features of the local Nix                           |
//! | [`stats`]     | the counters of the Status reply                                |

pub mod claims;
pub mod cli;
pub mod config;
pub mod load;
pub mod local_nix;
pub mod ops;
pub mod server;
pub mod stats;
pub mod store;
