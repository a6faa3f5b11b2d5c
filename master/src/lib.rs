//! nixq-master: the master's side of nixq, shared by its three programs
//! (`nixq-build-hook`, `nixq-copy-closure`, `nixq-status`).
//!
//! # Layout
//!
//! | module           | owns                                                              | I/O? |
//! |------------------|-------------------------------------------------------------------|------|
//! | [`batch`]        | cutting a closure into upload batches in dependency order         | pure |
//! | [`target`]       | HOST / machines file / identity / CA → an [`agent_client::AgentTarget`] | reads the machines file |
//! | [`agent_client`] | one QUIC connection to an agent, one method per protocol stream   | network |
//! | [`upload_lock`]  | Nix's per-machine `.upload-lock` in the current-load directory    | files |
//! | [`copy`]         | `nixq-copy-closure`: arguments → plan → transfer                  | all |
//! | [`progress`]     | the progress bar (a terminal only)                                | stderr |
//! | [`status`]       | `nixq-status`: table and JSON                                     | network |
//! | [`hook`]         | `nixq-build-hook`: Nix's hook protocols, machine choice, remote build | all |
//! | [`slots`]        | Nix's current-load slot locks and the machine back-off file       | files |
//! | [`exit`]         | every error of the programs → its exit code, in one place         | pure |

pub mod agent_client;
pub mod batch;
pub mod copy;
pub mod exit;
pub mod hook;
pub mod progress;
pub mod slots;
pub mod status;
pub mod target;
pub mod upload_lock;
