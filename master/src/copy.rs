//! `nixq-copy-closure`: copies the closure of store paths to (`--to`) or
//! from (`--from`) an agent.
//!
//! [`CopyArgs`] are the raw flags, [`Plan::resolve`] turns them into a
//! checked plan (target, credentials, paths, compression) before any network
//! I/O, and [`run`] does the copy:
//!
//! * `--to`: the closure from the local Nix daemon (its socket, else a
//!   private `nix-daemon --stdio`) while the connection to the agent comes
//!   up; the per-machine upload lock; one QueryMissing with claims for the
//!   whole closure; the missing paths in dependency order over `--jobs`
//!   parallel Upload streams ([`crate::batch`]); paths in flight from another
//!   sender are waited for (WaitFor), and sent by us if their sender gives
//!   up. Paths whose upload failed for a passing reason are retried, with
//!   a fresh QueryMissing, up to [`MAX_ROUNDS`] times.
//! * `--from`: the closure's path infos from the agent (QueryPathInfos), the
//!   ones missing locally (QueryValidPaths), downloaded over parallel
//!   Download streams and imported, as root, by the receive half of the
//!   transfer engine (restore under Nix's lock, hash check, batched
//!   registration); as any other user, through the local Nix daemon
//!   (AddToStoreNar, which checks hashes, and signatures for users it does
//!   not trust).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::{ArgAction, Parser};
use nixq_common::daemon::client::DEFAULT_SOCKET;
use nixq_common::daemon::{DaemonClient, DaemonError};
use nixq_common::drv::Derivation;
use nixq_common::path_info::PathInfo;
use nixq_common::proto::{
    Compression, DownloadItem, PathState, UploadOutcome, WaitOutcome, MAX_BATCH_PATHS,
};
use nixq_common::store::RegistrationBatcher;
use nixq_common::store_path::{StoreDir, StorePath, StorePathError};
use nixq_common::transfer::receive::{BodyReader, Importer, ItemError, Locking};
use nixq_common::transfer::send::{check_local_nar, SendOptions, SendProgress};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::agent_client::{AgentClient, AgentTarget, ClientError, UploadResult, UploadStream};
use crate::batch::{batches, BatchLimits};
use crate::progress::Progress;
use crate::target::{self, Credentials, MachinesSource, TargetError};
use crate::upload_lock;

/// Parallel streams by default: enough to hide per-stream round trips and
/// to keep both cores of a small machine busy hashing and writing, few
/// enough not to thrash one disk.
pub const DEFAULT_JOBS: usize = 4;

/// The most parallel streams `--jobs` accepts.
pub const MAX_JOBS: usize = 64;

/// Rounds of QueryMissing → upload for paths whose upload failed for a
/// passing reason (a claim that moved, a reference that was in flight, an
/// interrupted stream).
pub const MAX_ROUNDS: usize = 3;

/// Verified paths a Download stream may hold while they wait for their
/// registration (each holds its lock file open): bounds open files at
/// `jobs` × this.
const PENDING_REGISTRATIONS_PER_STREAM: usize = 128;

/// The local store directory. Store paths are absolute, so both ends must
/// agree on it; Nix's default is the only one supported for now.
pub const STORE_DIR: &str = "/nix/store";

/// Copies the closures of Nix store paths to or from a nixq agent over
/// QUIC: one round trip to learn what is missing, then parallel streams.
#[derive(Debug, Clone, Parser)]
#[command(name = "nixq-copy-closure", version)]
pub struct CopyArgs {
    /// Copy to this agent: a nixq://host[:port][?params] URI, or the host
    /// name or URI of an entry of the machines file.
    #[arg(
        long,
        value_name = "HOST",
        required_unless_present = "from",
        conflicts_with = "from"
    )]
    pub to: Option<String>,
    /// Copy from this agent (same forms as --to). As root, paths are
    /// written into the store directly; as another user, they go through
    /// the Nix daemon, which accepts unsigned paths only from its
    /// trusted-users.
    #[arg(long, value_name = "HOST")]
    pub from: Option<String>,
    /// Store paths whose closures to copy (or paths inside them, or
    /// symlinks to them such as ./result).
    #[arg(value_name = "PATHS")]
    pub paths: Vec<String>,
    /// Also read paths from standard input (separated by white space), so
    /// that no argument-length limit applies.
    #[arg(long)]
    pub stdin: bool,
    /// The machines file to look HOST up in [default: /etc/nix/machines].
    #[arg(long, value_name = "FILE")]
    pub machines: Option<PathBuf>,
    /// The master's certificate and key (one PEM file) [default: the
    /// machine entry's identity column, else /etc/nixq/master.pem].
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// The CA that signed the agent's certificate [default: the machine
    /// entry's CA column, else /etc/nixq/ca.crt].
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// For derivations (.drv) in the closure, also copy their outputs that
    /// are valid.
    #[arg(long)]
    pub include_outputs: bool,
    /// Compress with zstd, at LEVEL (1-22, default 3) [default: the
    /// machine's compress= parameter, else no compression].
    #[arg(long, value_name = "LEVEL", num_args = 0..=1, require_equals = true,
          default_missing_value = "3", conflicts_with = "no_compress",
          value_parser = clap::value_parser!(i32).range(1..=22))]
    pub zstd: Option<i32>,
    /// Do not compress, whatever the machine entry says (fast LANs).
    #[arg(long)]
    pub no_compress: bool,
    /// Parallel transfer streams.
    #[arg(long, short = 'j', value_name = "N", default_value_t = DEFAULT_JOBS,
          value_parser = parse_jobs)]
    pub jobs: usize,
    /// Print nothing but errors, and no progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Say what is being done (repeat for debug logs).
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count)]
    pub verbose: u8,
}

fn parse_jobs(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_JOBS).contains(&n) => Ok(n),
        _ => Err(format!("expected a number from 1 to {MAX_JOBS}")),
    }
}

/// Which way the paths go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    To,
    From,
}

/// A checked copy, ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub direction: Direction,
    pub target: AgentTarget,
    pub roots: Vec<StorePath>,
    pub compression: Compression,
    pub jobs: usize,
    pub include_outputs: bool,
    pub quiet: bool,
    pub verbose: u8,
}

/// Why a copy failed. [`crate::exit::copy_exit_code`] maps each to the
/// contract's exit code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("'{arg}' is not a store path: {source}")]
    NotAStorePath {
        arg: String,
        #[source]
        source: StorePathError,
    },
    #[error("cannot read paths from standard input: {0}")]
    Stdin(#[source] std::io::Error),
    #[error("the local Nix store: {0}")]
    LocalStore(#[source] DaemonError),
    #[error("{path} is not valid in the local store{}", needed_by_text(.needed_by))]
    NotValidLocally {
        path: StorePath,
        needed_by: Option<StorePath>,
    },
    #[error("{} is not valid on {uri}", .paths.first().map_or("", StorePath::as_str))]
    NotValidOnAgent { uri: String, paths: Vec<StorePath> },
    #[error("cannot read the derivation {path}: {reason}")]
    Derivation { path: StorePath, reason: String },
    #[error("{uri} uses the store directory {theirs}, but ours is {ours}")]
    StoreDirMismatch {
        uri: String,
        ours: String,
        theirs: String,
    },
    #[error(transparent)]
    Agent(#[from] ClientError),
    #[error("{uri} rejected {path}: {}", outcome_text(.outcome))]
    Rejected {
        uri: String,
        path: StorePath,
        outcome: Box<UploadOutcome>,
    },
    #[error("the local Nix daemon refused {path}: {source}; it takes unsigned paths only from users in its `trusted-users` (or copy as root)")]
    Untrusted {
        path: StorePath,
        #[source]
        source: Box<DaemonError>,
    },
    #[error(
        "cannot import {path} from {uri}: {source}{}",
        sender_store_hint(source)
    )]
    Import {
        uri: String,
        path: StorePath,
        #[source]
        source: Box<ItemError>,
    },
    #[error(
        "copying into the local store needs root or a Nix daemon, and there is no daemon socket at {DEFAULT_SOCKET}"
    )]
    NotRoot,
    #[error("{count} paths could not be copied to {uri} after {MAX_ROUNDS} attempts; the last problem: {last}")]
    Incomplete {
        uri: String,
        count: usize,
        last: String,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

/// For a NAR that does not match what its sender said: where to look.
/// (Senders do not hash what they send; the receiver does.)
pub(crate) fn sender_store_hint(error: &ItemError) -> &'static str {
    match error.outcome() {
        Some(UploadOutcome::HashMismatch { .. } | UploadOutcome::SizeMismatch { .. }) => {
            "; the sender's store may be corrupt (run `nix-store --verify --check-contents` there)"
        }
        _ => "",
    }
}

fn needed_by_text(needed_by: &Option<StorePath>) -> String {
    needed_by
        .as_ref()
        .map(|p| format!(" (a reference of {p})"))
        .unwrap_or_default()
}

fn outcome_text(outcome: &UploadOutcome) -> String {
    match outcome {
        UploadOutcome::HashMismatch { expected, got } => format!(
            "NAR hash mismatch: expected {}, got {}",
            expected.to_nix32_prefixed(),
            got.to_nix32_prefixed()
        ),
        UploadOutcome::SizeMismatch { expected, got } => {
            format!("NAR size mismatch: expected {expected} bytes, got {got}")
        }
        UploadOutcome::BadNar { reason } => format!("bad NAR: {reason}"),
        UploadOutcome::BadPathInfo { reason } => format!("bad path info: {reason}"),
        UploadOutcome::ImportFailed { reason } => format!("import failed: {reason}"),
        UploadOutcome::ReferenceNotValid { reference } => {
            format!("its reference {reference} is not valid there")
        }
        UploadOutcome::ClaimedByOther => "another sender holds its claim".into(),
        UploadOutcome::NoSpace {
            free_bytes,
            floor_bytes,
        } => format!("no space ({free_bytes} bytes free, floor {floor_bytes})"),
        UploadOutcome::Stored => "stored".into(),
        UploadOutcome::AlreadyValid => "already valid".into(),
    }
}

/// Whether a failed outcome may pass on a later attempt.
fn is_retryable(outcome: &UploadOutcome) -> bool {
    matches!(
        outcome,
        UploadOutcome::ReferenceNotValid { .. }
            | UploadOutcome::ClaimedByOther
            | UploadOutcome::ImportFailed { .. }
    )
}

impl Plan {
    /// Checks the arguments and resolves the target; reads the machines
    /// file, standard input (with `--stdin`) and `./result`-style symlinks,
    /// but touches no network and no store.
    pub fn resolve(args: CopyArgs, stdin: &mut dyn std::io::Read) -> Result<Self, CopyError> {
        let (direction, host) = match (&args.to, &args.from) {
            (Some(host), None) => (Direction::To, host.clone()),
            (None, Some(host)) => (Direction::From, host.clone()),
            // clap enforces exactly one; keep the error path anyway.
            _ => {
                return Err(CopyError::Internal(
                    "exactly one of --to and --from is needed".into(),
                ))
            }
        };
        let source = MachinesSource::file_or_default(args.machines.clone());
        let credentials = Credentials {
            identity: args.identity.clone(),
            ca: args.ca.clone(),
        };
        let target = target::resolve(&host, &source, &credentials)?;
        let compression = if args.no_compress {
            Compression::None
        } else if let Some(level) = args.zstd {
            Compression::Zstd { level }
        } else {
            target.uri.params.compress.unwrap_or(Compression::None)
        };
        let mut texts = args.paths.clone();
        if args.stdin {
            let mut input = String::new();
            stdin.read_to_string(&mut input).map_err(CopyError::Stdin)?;
            texts.extend(input.split_whitespace().map(str::to_owned));
        }
        let store_dir = StoreDir::new(STORE_DIR).map_err(|e| CopyError::Internal(e.to_string()))?;
        let mut seen = HashSet::new();
        let mut roots = Vec::new();
        for text in texts {
            let path = parse_store_path(&store_dir, &text)?;
            if seen.insert(path.clone()) {
                roots.push(path);
            }
        }
        Ok(Self {
            direction,
            target,
            roots,
            compression,
            jobs: args.jobs,
            include_outputs: args.include_outputs,
            quiet: args.quiet,
            verbose: args.verbose,
        })
    }
}

/// A store path from an argument: a store path, a path inside one, or a
/// symlink (chain) leading into the store such as `./result`.
fn parse_store_path(store_dir: &StoreDir, text: &str) -> Result<StorePath, CopyError> {
    match store_dir.parse_prefix(text) {
        Ok(path) => Ok(path),
        Err(source) => {
            let Ok(resolved) = std::fs::canonicalize(text) else {
                return Err(CopyError::NotAStorePath {
                    arg: text.to_owned(),
                    source,
                });
            };
            let resolved = resolved.to_string_lossy();
            store_dir
                .parse_prefix(&resolved)
                .map_err(|source| CopyError::NotAStorePath {
                    arg: text.to_owned(),
                    source,
                })
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Paths in the closure; `None` when it was not listed because the
    /// agent had every root (and so the whole closure) already.
    pub closure: Option<usize>,
    /// Paths this copy transferred.
    pub copied: usize,
    /// NAR bytes this copy transferred.
    pub bytes: u64,
}

/// Runs the plan.
pub async fn run(plan: &Plan) -> Result<Report, CopyError> {
    let progress = Progress::new(!plan.quiet);
    let result = match plan.direction {
        Direction::To => run_to(plan, &progress).await,
        Direction::From => run_from(plan, &progress).await,
    };
    progress.finish();
    result
}

fn client_name() -> String {
    format!("nixq-copy-closure {}", env!("CARGO_PKG_VERSION"))
}

/// The local daemon: its socket if there is one, else a private
/// `nix-daemon --stdio` (single-user installs, or root without a daemon).
async fn local_daemon() -> Result<DaemonClient, CopyError> {
    let client = if Path::new(DEFAULT_SOCKET).exists() {
        DaemonClient::connect_socket(DEFAULT_SOCKET).await
    } else {
        DaemonClient::spawn_stdio(DaemonClient::stdio_command()).await
    };
    client.map_err(CopyError::LocalStore)
}

fn daemon_error(e: DaemonError) -> CopyError {
    match e {
        DaemonError::PathNotValid { path, needed_by } => {
            CopyError::NotValidLocally { path, needed_by }
        }
        other => CopyError::LocalStore(other),
    }
}

fn check_store_dir(client: &AgentClient) -> Result<(), CopyError> {
    let theirs = &client.welcome().store_dir;
    if theirs != STORE_DIR {
        return Err(CopyError::StoreDirMismatch {
            uri: client.uri().to_owned(),
            ours: STORE_DIR.to_owned(),
            theirs: theirs.clone(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// --to

async fn run_to(plan: &Plan, progress: &Progress) -> Result<Report, CopyError> {
    // The local store and the connection are both latency; overlap them.
    // The agent is asked about the roots at once: Nix makes a path valid
    // only after its references, so if the agent has every root, it has
    // their closures too and the copy is done without listing them (a
    // no-op copy of 5,001 paths: 190 ms -> the cost of a connection).
    let local = async {
        let mut daemon = local_daemon().await?;
        let roots: BTreeSet<StorePath> = plan.roots.iter().cloned().collect();
        let valid = daemon
            .query_valid_paths(&roots)
            .await
            .map_err(daemon_error)?;
        if let Some(path) = roots.into_iter().find(|r| !valid.contains(r)) {
            return Err(CopyError::NotValidLocally {
                path,
                needed_by: None,
            });
        }
        Ok(daemon)
    };
    let name = client_name();
    let remote = async {
        let client = AgentClient::connect(&plan.target, &name).await?;
        tracing::debug!("connected");
        check_store_dir(&client)?;
        // With --include-outputs the closure can hold more than the
        // roots' closures.
        let has_roots = !plan.include_outputs
            && client
                .query_missing(&plan.roots, false)
                .await?
                .iter()
                .all(|state| *state == PathState::Valid);
        Ok::<_, CopyError>((client, has_roots))
    };
    let (daemon, remote) = tokio::join!(local, remote);
    let mut daemon = daemon?;
    let (client, has_roots) = remote?;
    let closure = if has_roots {
        tracing::debug!("the agent has every root");
        None
    } else {
        let closure = closure_of(&mut daemon, plan.roots.clone(), plan.include_outputs).await?;
        tracing::debug!("closure queried");
        Some(closure)
    };
    // Waiting for a private `nix-daemon --stdio` to exit is off the
    // critical path: the copy goes on meanwhile (if the process ends first,
    // the child sees its input closed and exits by itself).
    tokio::spawn(async move {
        if let Err(e) = daemon.shutdown().await {
            tracing::debug!("closing the daemon connection: {e}");
        }
    });
    let Some(closure) = closure else {
        client.close().await;
        return Ok(Report {
            closure: None,
            copied: 0,
            bytes: 0,
        });
    };
    tracing::debug!(
        paths = closure.len(),
        uri = client.uri(),
        "closure computed"
    );
    let lock = upload_lock::acquire(
        &upload_lock::current_load_dir(),
        &plan.target.uri.text,
        upload_lock::MAX_WAIT,
    )
    .await;
    if let Some(warning) = &lock.warning {
        if !plan.quiet {
            progress.println(&format!("warning: {warning}"));
        }
    }
    let client = Arc::new(client);
    let result = send_closure(&client, closure, plan, progress).await;
    drop(lock);
    if let Ok(client) = Arc::try_unwrap(client) {
        client.close().await;
        tracing::debug!("connection closed");
    }
    result
}

/// The closure of `roots` in dependency order; with `include_outputs`, the
/// valid outputs of every derivation in it and their closures too.
async fn closure_of(
    daemon: &mut DaemonClient,
    roots: Vec<StorePath>,
    include_outputs: bool,
) -> Result<Vec<PathInfo>, CopyError> {
    let closure = daemon
        .query_closure(roots.clone())
        .await
        .map_err(daemon_error)?;
    if !include_outputs {
        return Ok(closure);
    }
    let outputs: BTreeSet<StorePath> = derivation_outputs(&closure)?.into_iter().collect();
    if outputs.is_empty() {
        return Ok(closure);
    }
    let valid = daemon
        .query_valid_paths(&outputs)
        .await
        .map_err(daemon_error)?;
    let mut all_roots = roots;
    all_roots.extend(valid);
    daemon.query_closure(all_roots).await.map_err(daemon_error)
}

/// Per-path bookkeeping of a `--to` copy.
#[derive(Debug, Default)]
struct Tally {
    /// Paths known valid on the agent.
    done: BTreeSet<StorePath>,
    copied: usize,
    bytes: u64,
    /// The last passing failure, for the final error.
    last_problem: Option<String>,
}

/// Uploads `closure` (dependency order, from the local store) to the
/// agent: QueryMissing with claims, parallel Upload streams, WaitFor for
/// paths in flight elsewhere, up to [`MAX_ROUNDS`] rounds. Only
/// `plan.jobs` and `plan.compression` are read from `plan`. Also the upload
/// of `nixq-build-hook` ([`crate::hook`]); the caller holds the upload lock.
pub async fn send_closure(
    client: &Arc<AgentClient>,
    closure: Vec<PathInfo>,
    plan: &Plan,
    progress: &Progress,
) -> Result<Report, CopyError> {
    let total = closure.len();
    let position: BTreeMap<StorePath, usize> = closure
        .iter()
        .enumerate()
        .map(|(i, info)| (info.path.clone(), i))
        .collect();
    let closure = Arc::new(closure);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut remaining: Vec<usize> = (0..total).collect();
    progress.set_prefix(&format!("copying to {}", client.uri()));
    for round in 0..MAX_ROUNDS {
        if remaining.is_empty() {
            break;
        }
        let paths: Vec<StorePath> = remaining.iter().map(|i| closure[*i].path.clone()).collect();
        let states = client.query_missing(&paths, true).await?;
        let mut missing = Vec::new();
        let mut in_flight = Vec::new();
        {
            let mut tally = lock(&tally);
            for (i, state) in remaining.iter().zip(states) {
                match state {
                    PathState::Valid => {
                        tally.done.insert(closure[*i].path.clone());
                    }
                    PathState::Missing => missing.push(*i),
                    PathState::InFlight => in_flight.push(closure[*i].path.clone()),
                }
            }
        }
        if round == 0 {
            let bytes = missing.iter().map(|i| closure[*i].nar_size).sum();
            progress.add_work((missing.len() + in_flight.len()) as u64, bytes);
        }
        tracing::debug!(
            round,
            missing = missing.len(),
            in_flight = in_flight.len(),
            "query-missing answered"
        );
        if missing.is_empty() && in_flight.is_empty() {
            remaining.clear(); // every remaining path answered Valid
            break;
        }
        let infos: Vec<PathInfo> = missing.iter().map(|i| closure[*i].clone()).collect();
        let (send_it_tx, send_it_rx) = mpsc::unbounded_channel::<StorePath>();
        let uploads = upload_all(client, infos, plan, progress, &tally);
        let waits = async {
            let tx = send_it_tx;
            let mut on_settled = |path: &StorePath, outcome: WaitOutcome| match outcome {
                WaitOutcome::Valid => {
                    lock(&tally).done.insert(path.clone());
                    progress.path_done();
                }
                WaitOutcome::SendIt => {
                    // The receiver lives as long as this round.
                    let _ = tx.send(path.clone());
                }
            };
            client.wait_for(&in_flight, &mut on_settled).await
        };
        let handed_over = send_handed_over(
            client, send_it_rx, &closure, &position, plan, progress, &tally,
        );
        let (uploaded, waited, handed) = tokio::join!(uploads, waits, handed_over);
        uploaded?;
        waited?;
        handed?;
        let tally = lock(&tally);
        remaining.retain(|i| !tally.done.contains(&closure[*i].path));
    }
    let tally = lock(&tally);
    if !remaining.is_empty() {
        return Err(CopyError::Incomplete {
            uri: client.uri().to_owned(),
            count: remaining.len(),
            last: tally
                .last_problem
                .clone()
                .unwrap_or_else(|| "paths still in flight from another sender".into()),
        });
    }
    Ok(Report {
        closure: Some(total),
        copied: tally.copied,
        bytes: tally.bytes,
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned tally only means another task panicked mid-update; the
    // counts are still usable.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Uploads the paths handed over by WaitFor (`SendIt`) as they come, in
/// dependency order within each group.
async fn send_handed_over(
    client: &Arc<AgentClient>,
    mut rx: mpsc::UnboundedReceiver<StorePath>,
    closure: &Arc<Vec<PathInfo>>,
    position: &BTreeMap<StorePath, usize>,
    plan: &Plan,
    progress: &Progress,
    tally: &Arc<Mutex<Tally>>,
) -> Result<(), CopyError> {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        let mut indices: Vec<usize> = group
            .iter()
            .filter_map(|p| position.get(p).copied())
            .collect();
        indices.sort_unstable();
        let infos: Vec<PathInfo> = indices.iter().map(|i| closure[*i].clone()).collect();
        progress.add_work(0, infos.iter().map(|i| i.nar_size).sum());
        upload_all(client, infos, plan, progress, tally).await?;
    }
    Ok(())
}

/// Uploads `infos` (dependency order) in batches over `plan.jobs` parallel
/// streams, recording outcomes in `tally`. Returns an error only for a
/// failure that ends the copy; passing failures leave paths out of
/// `tally.done` for the next round.
///
/// At most `plan.jobs` bodies are being written at once, but a stream whose
/// body is written frees its place for the next batch while it waits for
/// its last results: the agent registers a batch's paths tens of
/// milliseconds after their bytes arrive, and waiting for that before
/// sending more left both ends idle between batches (5,001 small paths:
/// 16 batches in 4 stop-and-go rounds). Up to [`OPEN_UPLOADS_PER_JOB`] ×
/// `plan.jobs` streams are open at once.
async fn upload_all(
    client: &Arc<AgentClient>,
    infos: Vec<PathInfo>,
    plan: &Plan,
    progress: &Progress,
    tally: &Arc<Mutex<Tally>>,
) -> Result<(), CopyError> {
    if infos.is_empty() {
        return Ok(());
    }
    let cut = batches(&infos, BatchLimits::for_transfer(&infos, plan.jobs));
    let options = SendOptions::new(plan.compression);
    let writing = Arc::new(Semaphore::new(plan.jobs));
    let open = Arc::new(Semaphore::new(plan.jobs * OPEN_UPLOADS_PER_JOB));
    let mut uploads: JoinSet<Result<(), CopyError>> = JoinSet::new();
    // Batches start in order, so a batch's references are in it or in a
    // batch already under way (the agent waits for those).
    for range in cut {
        let permits = async {
            let open = Arc::clone(&open).acquire_owned().await;
            let writing = Arc::clone(&writing).acquire_owned().await;
            (open, writing)
        };
        tokio::pin!(permits);
        let (open_permit, writing_permit) = loop {
            tokio::select! {
                (open, writing) = &mut permits => match (open, writing) {
                    (Ok(open), Ok(writing)) => break (open, writing),
                    _ => return Err(CopyError::Internal("upload permits closed".into())),
                },
                Some(joined) = uploads.join_next() => upload_ended(joined)?,
            }
        };
        // Opened here, in batch order (see `AgentClient::open_upload`).
        let stream = client.open_upload(&options).await?;
        let client = Arc::clone(client);
        let batch = infos[range].to_vec();
        let options = options.clone();
        let progress = progress.clone();
        let tally = Arc::clone(tally);
        uploads.spawn(async move {
            let result = upload_batch(
                &client,
                stream,
                batch,
                &options,
                &progress,
                &tally,
                writing_permit,
            )
            .await;
            drop(open_permit);
            result
        });
    }
    while let Some(joined) = uploads.join_next().await {
        // Dropping the set aborts the other uploads.
        upload_ended(joined)?;
    }
    Ok(())
}

/// Streams per `--jobs` that may be open at once: one writing its body, the
/// other waiting for its last results.
const OPEN_UPLOADS_PER_JOB: usize = 2;

fn upload_ended(
    joined: Result<Result<(), CopyError>, tokio::task::JoinError>,
) -> Result<(), CopyError> {
    joined.map_err(|e| CopyError::Internal(format!("upload task: {e}")))?
}

/// Uploads one batch on a stream of its own. `writing` is released as soon
/// as the last item is in the body (or the upload ends), before the
/// results are in.
async fn upload_batch(
    client: &AgentClient,
    stream: UploadStream,
    batch: Vec<PathInfo>,
    options: &SendOptions,
    progress: &Progress,
    tally: &Mutex<Tally>,
    writing: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), CopyError> {
    let bar = progress.clone();
    let last = batch.len().saturating_sub(1);
    let mut writing = Some(writing);
    let result = client
        .upload_on(stream, batch.clone(), options, move |event| match event {
            SendProgress::NarBytes(n) => bar.bytes(n),
            SendProgress::ItemWritten { index } if index >= last => drop(writing.take()),
            SendProgress::ItemWritten { .. } => {}
        })
        .await;
    let result = match result {
        Ok(result) => result,
        Err(ClientError::Refused {
            refusal: nixq_common::proto::Refusal::Busy { .. },
            ..
        }) => {
            lock(tally).last_problem = Some(format!("{} is busy", client.uri()));
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let rejected = record_outcomes(&batch, &result, progress, &mut lock(tally));
    let Some((info, outcome)) = rejected else {
        return Ok(());
    };
    if let UploadOutcome::HashMismatch { .. } = outcome {
        // Bodies are not hashed as they are sent: find out now whether our
        // own store is to blame.
        check_local(info, options).await?;
    }
    Err(CopyError::Rejected {
        uri: client.uri().to_owned(),
        path: info.path.clone(),
        outcome: Box::new(outcome.clone()),
    })
}

/// Records a batch's outcomes in `tally`; returns the first outcome that
/// ends the copy, with its path.
fn record_outcomes<'a>(
    batch: &'a [PathInfo],
    result: &'a UploadResult,
    progress: &Progress,
    tally: &mut Tally,
) -> Option<(&'a PathInfo, &'a UploadOutcome)> {
    for (info, outcome) in batch.iter().zip(&result.outcomes) {
        match outcome {
            UploadOutcome::Stored => {
                tally.done.insert(info.path.clone());
                tally.copied += 1;
                tally.bytes += info.nar_size;
                progress.path_done();
            }
            UploadOutcome::AlreadyValid => {
                tally.done.insert(info.path.clone());
                progress.path_done();
            }
            failed if is_retryable(failed) => {
                tally.last_problem = Some(format!("{}: {}", info.path, outcome_text(failed)));
            }
            failed => return Some((info, failed)),
        }
    }
    if let Some(reason) = &result.interrupted {
        tally.last_problem = Some(reason.clone());
    }
    None
}

/// Re-reads `info`'s path from the local store after the agent found its
/// NAR hash wrong: a corrupt local store is the error then. If the check
/// cannot tell (the path cannot be read), the agent's report stands.
async fn check_local(info: &PathInfo, options: &SendOptions) -> Result<(), CopyError> {
    let location = options.location(&info.path);
    let info = info.clone();
    let checked = tokio::task::spawn_blocking(move || check_local_nar(&info, &location)).await;
    match checked {
        Ok(Err(e)) if e.is_local_corruption() => Err(CopyError::Agent(ClientError::Send(e))),
        Ok(Err(e)) => {
            tracing::warn!("cannot re-check the local copy: {e}");
            Ok(())
        }
        Err(e) => {
            tracing::warn!("cannot re-check the local copy: {e}");
            Ok(())
        }
        Ok(Ok(())) => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// --from

async fn run_from(plan: &Plan, progress: &Progress) -> Result<Report, CopyError> {
    let name = client_name();
    let (daemon, client) = tokio::join!(local_daemon(), AgentClient::connect(&plan.target, &name));
    let daemon = Arc::new(tokio::sync::Mutex::new(daemon?));
    let client = Arc::new(client?);
    check_store_dir(&client)?;
    progress.set_prefix(&format!("copying from {}", client.uri()));
    let (closure, not_valid) = client.query_path_infos(&plan.roots, true).await?;
    if !not_valid.is_empty() {
        return Err(CopyError::NotValidOnAgent {
            uri: client.uri().to_owned(),
            paths: not_valid,
        });
    }
    let mut report = fetch_missing(&client, &closure, plan, progress, &daemon).await?;
    if plan.include_outputs {
        // The derivations are local now: name their outputs and fetch
        // those the agent has, with their closures.
        let outputs = derivation_outputs(&closure)?;
        if !outputs.is_empty() {
            let (outputs, _absent) = client.query_path_infos(&outputs, true).await?;
            let more = fetch_missing(&client, &outputs, plan, progress, &daemon).await?;
            report.closure = Some(report.closure.unwrap_or(0) + more.closure.unwrap_or(0));
            report.copied += more.copied;
            report.bytes += more.bytes;
        }
    }
    if let Ok(client) = Arc::try_unwrap(client) {
        client.close().await;
    }
    Ok(report)
}

/// The output paths named by the derivations among `infos` (read from the
/// local store).
fn derivation_outputs(infos: &[PathInfo]) -> Result<Vec<StorePath>, CopyError> {
    let mut outputs = BTreeSet::new();
    for info in infos.iter().filter(|i| i.path.is_derivation()) {
        let text = std::fs::read(info.path.as_path()).map_err(|e| CopyError::Derivation {
            path: info.path.clone(),
            reason: e.to_string(),
        })?;
        let drv = Derivation::parse(&text).map_err(|e| CopyError::Derivation {
            path: info.path.clone(),
            reason: e.to_string(),
        })?;
        outputs.extend(drv.outputs.into_values().filter_map(|o| o.path));
    }
    Ok(outputs.into_iter().collect())
}

/// Downloads the paths of `closure` (dependency order) that are not valid
/// locally.
async fn fetch_missing(
    client: &Arc<AgentClient>,
    closure: &[PathInfo],
    plan: &Plan,
    progress: &Progress,
    daemon: &Arc<tokio::sync::Mutex<DaemonClient>>,
) -> Result<Report, CopyError> {
    let all: BTreeSet<StorePath> = closure.iter().map(|i| i.path.clone()).collect();
    let valid = daemon
        .lock()
        .await
        .query_valid_paths(&all)
        .await
        .map_err(daemon_error)?;
    let missing: Vec<PathInfo> = closure
        .iter()
        .filter(|i| !valid.contains(&i.path))
        .cloned()
        .collect();
    let report = Report {
        closure: Some(closure.len()),
        copied: missing.len(),
        bytes: missing.iter().map(|i| i.nar_size).sum(),
    };
    if missing.is_empty() {
        return Ok(report);
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && !Path::new(DEFAULT_SOCKET).exists() {
        return Err(CopyError::NotRoot);
    }
    progress.add_work(missing.len() as u64, report.bytes);
    if root {
        download_all(client, missing, plan, progress, daemon).await?;
    } else {
        download_through_daemon(client, missing, plan, progress).await?;
    }
    Ok(report)
}

/// Tracks which paths of a `--from` copy are registered, so that a path is
/// submitted for registration only after its references (which may arrive
/// on another stream).
#[derive(Debug, Default)]
struct Registered {
    paths: Mutex<HashSet<StorePath>>,
    changed: Notify,
}

impl Registered {
    fn add(&self, path: StorePath) {
        lock(&self.paths).insert(path);
        self.changed.notify_waiters();
    }

    /// Waits until every path of `needed` is registered.
    async fn wait(&self, needed: &[StorePath]) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let all_there = {
                let paths = lock(&self.paths);
                needed.iter().all(|p| paths.contains(p))
            };
            if all_there {
                return;
            }
            notified.await;
        }
    }
}

/// What the Download streams of a `--from` copy share: the paths in the
/// copy, which of them are valid already, and the batches not yet taken
/// (dependency order; a path's references are in its batch or an earlier
/// one). Cheap to clone.
#[derive(Clone)]
struct Downloads {
    in_copy: Arc<HashSet<StorePath>>,
    registered: Arc<Registered>,
    queue: Arc<Mutex<std::vec::IntoIter<Vec<PathInfo>>>>,
}

impl Downloads {
    fn new(missing: &[PathInfo], jobs: usize) -> Self {
        let mut limits = BatchLimits::for_transfer(missing, jobs);
        limits.max_paths = limits.max_paths.min(MAX_BATCH_PATHS);
        Self {
            in_copy: Arc::new(missing.iter().map(|i| i.path.clone()).collect()),
            registered: Arc::new(Registered::default()),
            queue: Arc::new(Mutex::new(
                batches(missing, limits)
                    .into_iter()
                    .map(|range| missing[range].to_vec())
                    .collect::<Vec<_>>()
                    .into_iter(),
            )),
        }
    }

    /// The next batch, in order.
    fn next_batch(&self) -> Option<Vec<PathInfo>> {
        lock(&self.queue).next()
    }

    /// The references of `info` that are in this copy: what must be valid
    /// before it is registered.
    fn references_in_copy(&self, info: &PathInfo) -> Vec<StorePath> {
        info.references
            .iter()
            .filter(|r| **r != info.path && self.in_copy.contains(*r))
            .cloned()
            .collect()
    }

    /// Runs `jobs` workers, each made by `worker` and sharing these
    /// batches; returns the first error.
    async fn run<F, Fut>(self, jobs: usize, worker: F) -> Result<(), CopyError>
    where
        F: Fn(Self) -> Fut,
        Fut: std::future::Future<Output = Result<(), CopyError>> + Send + 'static,
    {
        let mut workers: JoinSet<Result<(), CopyError>> = JoinSet::new();
        for _ in 0..jobs {
            workers.spawn(worker(self.clone()));
        }
        while let Some(joined) = workers.join_next().await {
            // Dropping the set aborts the other workers.
            joined.map_err(|e| CopyError::Internal(format!("download task: {e}")))??;
        }
        Ok(())
    }
}

async fn download_all(
    client: &Arc<AgentClient>,
    missing: Vec<PathInfo>,
    plan: &Plan,
    progress: &Progress,
    daemon: &Arc<tokio::sync::Mutex<DaemonClient>>,
) -> Result<(), CopyError> {
    let store_dir = StoreDir::new(STORE_DIR).map_err(|e| CopyError::Internal(e.to_string()))?;
    let importer = Importer::new(store_dir, RegistrationBatcher::spawn("nix-store".into()));
    let downloads = Downloads::new(&missing, plan.jobs);
    downloads
        .run(plan.jobs, |downloads| {
            let ctx = DownloadContext {
                client: Arc::clone(client),
                importer: importer.clone(),
                downloads,
                progress: progress.clone(),
                daemon: Arc::clone(daemon),
                compression: plan.compression,
            };
            async move {
                while let Some(batch) = ctx.downloads.next_batch() {
                    ctx.download_batch(batch).await?;
                }
                Ok(())
            }
        })
        .await
}

struct DownloadContext {
    client: Arc<AgentClient>,
    importer: Importer,
    downloads: Downloads,
    progress: Progress,
    daemon: Arc<tokio::sync::Mutex<DaemonClient>>,
    compression: Compression,
}

impl DownloadContext {
    fn import_error(&self, path: &StorePath, source: ItemError) -> CopyError {
        CopyError::Import {
            uri: self.client.uri().to_owned(),
            path: path.clone(),
            source: Box::new(source),
        }
    }

    async fn download_batch(&self, batch: Vec<PathInfo>) -> Result<(), CopyError> {
        let paths: Vec<StorePath> = batch.iter().map(|i| i.path.clone()).collect();
        let recv = self.client.download(paths, self.compression).await?;
        let mut body = BodyReader::new(recv, self.compression);
        let permits = Arc::new(Semaphore::new(PENDING_REGISTRATIONS_PER_STREAM));
        let mut registrations = JoinSet::new();
        for expected in &batch {
            let info = read_download_item(&self.client, &mut body, expected).await?;
            self.importer
                .check_info(&info)
                .map_err(|e| self.import_error(&info.path, e))?;
            let mut locked = self
                .importer
                .lock(&info.path, Locking::Take)
                .await
                .map_err(|e| self.import_error(&info.path, e))?;
            if locked.is_occupied() {
                let valid = self
                    .daemon
                    .lock()
                    .await
                    .is_valid_path(&info.path)
                    .await
                    .map_err(daemon_error)?;
                if valid {
                    body.skip(info.nar_size)
                        .await
                        .map_err(|e| self.import_error(&info.path, e.into()))?;
                    self.downloads.registered.add(info.path.clone());
                    self.progress.bytes(info.nar_size);
                    self.progress.path_done();
                    continue;
                }
                locked
                    .clear()
                    .await
                    .map_err(|e| self.import_error(&info.path, e))?;
            }
            let verified = locked
                .restore(&info, &mut body)
                .await
                .map_err(|e| self.import_error(&info.path, e))?;
            self.progress.bytes(info.nar_size);
            let permit = Arc::clone(&permits)
                .acquire_owned()
                .await
                .map_err(|e| CopyError::Internal(e.to_string()))?;
            let needed = self.downloads.references_in_copy(&info);
            let importer = self.importer.clone();
            let registered = Arc::clone(&self.downloads.registered);
            let progress = self.progress.clone();
            registrations.spawn(async move {
                registered.wait(&needed).await;
                let path = verified.info().path.clone();
                let result = importer.register(verified).await;
                drop(permit);
                if result.is_ok() {
                    registered.add(path.clone());
                    progress.path_done();
                }
                result.map_err(|e| (path, e))
            });
        }
        while let Some(joined) = registrations.join_next().await {
            joined
                .map_err(|e| CopyError::Internal(format!("registration task: {e}")))?
                .map_err(|(path, e)| self.import_error(&path, e))?;
        }
        Ok(())
    }
}

/// The `--from` route for users other than root: every downloaded path goes
/// to the local Nix daemon with `AddToStoreNar`, which checks its hash and,
/// for a user it does not trust, its signatures (as for
/// `nix-copy-closure --from`). One daemon connection per stream; a path is
/// sent once its references in the copy are valid.
async fn download_through_daemon(
    client: &Arc<AgentClient>,
    missing: Vec<PathInfo>,
    plan: &Plan,
    progress: &Progress,
) -> Result<(), CopyError> {
    let compression = plan.compression;
    Downloads::new(&missing, plan.jobs)
        .run(plan.jobs, |downloads| {
            let client = Arc::clone(client);
            let progress = progress.clone();
            async move {
                let mut daemon = DaemonClient::connect_socket(DEFAULT_SOCKET)
                    .await
                    .map_err(CopyError::LocalStore)?;
                // Batches in order: a path's references are in its batch or
                // in one already under way.
                while let Some(batch) = downloads.next_batch() {
                    let recv = client
                        .download(batch.iter().map(|i| i.path.clone()).collect(), compression)
                        .await?;
                    let mut body = BodyReader::new(recv, compression);
                    for expected in &batch {
                        let info = read_download_item(&client, &mut body, expected).await?;
                        downloads
                            .registered
                            .wait(&downloads.references_in_copy(&info))
                            .await;
                        add_through_daemon(&mut daemon, &mut body, &info, client.uri()).await?;
                        progress.bytes(info.nar_size);
                        progress.path_done();
                        downloads.registered.add(info.path.clone());
                    }
                }
                if let Err(e) = daemon.shutdown().await {
                    tracing::debug!("closing the daemon connection: {e}");
                }
                Ok(())
            }
        })
        .await
}

/// The next item of a Download body, which must be `expected`'s path.
async fn read_download_item(
    client: &AgentClient,
    body: &mut BodyReader,
    expected: &PathInfo,
) -> Result<PathInfo, CopyError> {
    let item = body
        .read_item::<DownloadItem>()
        .await
        .map_err(|e| CopyError::Import {
            uri: client.uri().to_owned(),
            path: expected.path.clone(),
            source: Box::new(e.into()),
        })?;
    match item {
        Some(DownloadItem::Path(info)) if info.path == expected.path => Ok(info),
        Some(DownloadItem::NotValid(path)) => Err(CopyError::NotValidOnAgent {
            uri: client.uri().to_owned(),
            paths: vec![path],
        }),
        other => Err(CopyError::Agent(ClientError::Protocol {
            uri: client.uri().to_owned(),
            op: "download",
            reason: format!("expected {}, got {other:?}", expected.path),
        })),
    }
}

/// Streams the NAR of `info` (exactly `nar_size` bytes of `body`, from the
/// agent at `uri`) into `AddToStoreNar`. Chunks go through a small channel:
/// the body and the daemon connection are read and written at the same
/// time.
async fn add_through_daemon(
    daemon: &mut DaemonClient,
    body: &mut BodyReader,
    info: &PathInfo,
    uri: &str,
) -> Result<(), CopyError> {
    let (tx, rx) = mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    let produce = async move {
        let mut left = info.nar_size;
        while left > 0 {
            match body.next_chunk(left).await {
                Ok(chunk) => {
                    left -= chunk.len() as u64;
                    if tx.send(Ok(chunk)).await.is_err() {
                        // The daemon side gave up; its error is the one.
                        return Ok(());
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(std::io::Error::other("the download broke off")))
                        .await;
                    return Err(CopyError::Import {
                        uri: uri.to_owned(),
                        path: info.path.clone(),
                        source: Box::new(e.into()),
                    });
                }
            }
        }
        Ok(())
    };
    // Built elsewhere: not ultimately trusted here (as Nix's own copies
    // record it).
    let as_added = PathInfo {
        ultimate: false,
        ..info.clone()
    };
    let consume = async {
        let mut reader = ChannelReader {
            rx,
            current: bytes::Bytes::new(),
        };
        daemon
            .add_to_store_nar(&as_added, &mut reader, false)
            .await
            .map_err(|e| {
                if is_signature_refusal(&e.to_string()) {
                    CopyError::Untrusted {
                        path: info.path.clone(),
                        source: Box::new(e),
                    }
                } else {
                    daemon_error(e)
                }
            })
    };
    let (produced, consumed) = tokio::join!(produce, consume);
    produced?;
    consumed
}

/// Whether a daemon error is its refusal of an unsigned path from a user
/// it does not trust (Nix 2.8: "lacks a valid signature"; later: "lacks a
/// signature by a trusted key").
fn is_signature_refusal(message: &str) -> bool {
    message.contains("lacks a valid signature") || message.contains("lacks a signature")
}

/// An `AsyncRead` over a channel of chunks; ends when the sender is gone.
struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
}

impl tokio::io::AsyncRead for ChannelReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use bytes::Buf as _;
        use std::task::Poll;
        loop {
            if !self.current.is_empty() {
                let n = buf.remaining().min(self.current.len());
                buf.put_slice(&self.current[..n]);
                self.current.advance(n);
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunk))) => self.current = chunk,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixq_common::machines::DEFAULT_ZSTD_LEVEL;

    fn args(line: &[&str]) -> Result<CopyArgs, clap::Error> {
        CopyArgs::try_parse_from(std::iter::once("nixq-copy-closure").chain(line.iter().copied()))
    }

    const P1: &str = "/nix/store/00000000000000000000000000000000-one";
    const P2: &str = "/nix/store/11111111111111111111111111111111-two";

    #[test]
    fn flags_parse() {
        let a = args(&["--to", "nixq://h", "--zstd", P1]).expect("parse");
        assert_eq!(a.zstd, Some(DEFAULT_ZSTD_LEVEL));
        assert_eq!(a.paths, [P1]);
        let a = args(&["--from", "nixq://h", "--zstd=9", "-j", "8", P1]).expect("parse");
        assert_eq!(a.zstd, Some(9));
        assert_eq!(a.jobs, 8);
        assert!(args(&["--to", "a", "--from", "b"]).is_err());
        assert!(args(&[P1]).is_err());
        assert!(args(&["--to", "a", "--zstd=30"]).is_err());
        assert!(args(&["--to", "a", "--zstd", "--no-compress"]).is_err());
        assert!(args(&["--to", "a", "--jobs", "0"]).is_err());
    }

    #[test]
    fn plan_resolves_paths_compression_and_stdin() {
        let a = args(&[
            "--to",
            "nixq://10.0.0.2?compress=zstd:7",
            "--machines",
            "/nonexistent/machines-file",
            &format!("{P1}/bin/x"),
            "--stdin",
        ])
        .expect("parse");
        // An explicit missing machines file is an error, even for a URI.
        assert!(Plan::resolve(a.clone(), &mut &b""[..]).is_err());
        let a = CopyArgs {
            machines: None,
            ..a
        };
        let mut input = format!("{P2}\n{P1}  {P2}\t").into_bytes();
        let plan = Plan::resolve(a.clone(), &mut &input[..]).expect("plan");
        assert_eq!(plan.direction, Direction::To);
        assert_eq!(plan.compression, Compression::Zstd { level: 7 });
        let roots: Vec<&str> = plan.roots.iter().map(StorePath::as_str).collect();
        assert_eq!(roots, [P1, P2]);
        input.clear();
        let plan = Plan::resolve(
            CopyArgs {
                no_compress: true,
                ..a.clone()
            },
            &mut &input[..],
        )
        .expect("plan");
        assert_eq!(plan.compression, Compression::None);
        let plan = Plan::resolve(
            CopyArgs {
                zstd: Some(1),
                ..a.clone()
            },
            &mut &input[..],
        )
        .expect("plan");
        assert_eq!(plan.compression, Compression::Zstd { level: 1 });
        let err = Plan::resolve(
            CopyArgs {
                paths: vec!["/tmp/definitely-not-a-store-path".into()],
                stdin: false,
                ..a
            },
            &mut &input[..],
        )
        .expect_err("not a store path");
        assert!(matches!(err, CopyError::NotAStorePath { .. }), "{err}");
    }

    #[test]
    fn daemon_signature_refusals_are_recognised_in_both_wordings() {
        assert!(is_signature_refusal(
            "cannot add path '/nix/store/x' because it lacks a valid signature"
        ));
        assert!(is_signature_refusal(
            "cannot add path '/nix/store/x' because it lacks a signature by a trusted key"
        ));
        assert!(!is_signature_refusal("hash mismatch importing path"));
    }

    #[test]
    fn symlinks_into_the_store_resolve() {
        let store_dir = StoreDir::new(STORE_DIR).expect("dir");
        // A dangling link into the store cannot be canonicalized: error.
        let dir = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("result");
        std::os::unix::fs::symlink(P1, &link).expect("symlink");
        assert!(parse_store_path(&store_dir, &link.to_string_lossy()).is_err());
        // A link to a real store path resolves to it.
        let real = std::fs::read_dir("/nix/store").ok().and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .find(|p| store_dir.parse(&p.to_string_lossy()).is_ok())
        });
        if let Some(real) = real {
            let link = dir.path().join("result2");
            std::os::unix::fs::symlink(&real, &link).expect("symlink");
            let got = parse_store_path(&store_dir, &link.to_string_lossy()).expect("resolved");
            assert_eq!(got.as_path(), real.as_path());
        }
    }

    #[tokio::test]
    async fn registered_waits_for_references() {
        let registered = Arc::new(Registered::default());
        let a = StorePath::parse_any(P1).expect("path");
        let b = StorePath::parse_any(P2).expect("path");
        let waiter = {
            let registered = Arc::clone(&registered);
            let needed = vec![a.clone(), b.clone()];
            tokio::spawn(async move { registered.wait(&needed).await })
        };
        registered.add(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        registered.add(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }
}
