//! The hook's glue: reads what Nix says, asks the pure parts what to do, and
//! does it — choose a machine (slot files, back-off file, the agent's
//! Welcome), upload the inputs, follow the remote build, bring the outputs
//! back — with a timeout on every wait and the exit status decided by
//! [`super::exit`].
//!
//! # Channels (nix-interfaces.md §2.2, §2.8, §3)
//!
//! | protocol | requests   | replies          | builder log | hook messages                          |
//! |----------|------------|------------------|-------------|----------------------------------------|
//! | modern   | stdin      | stderr (`# …`)   | fd 4        | stderr; after accept as `@nix` msg lines (plain text is dropped) and, for problems, on fd 4 too |
//! | classic  | argv       | fd 3             | stderr      | stderr (it is the build log)           |
//! | 1.x      | stdin lines| stderr (`# …`)   | fd 4        | stderr                                 |
//!
//! Stderr stays open until the process ends (Nix takes its EOF as the end
//! of the build, §2.7); children get neither Nix's stderr nor fds 3–5.
//!
//! # The runtime
//!
//! One current-thread tokio runtime. The protocol conversation before an
//! accept is synchronous (Nix waits for each reply, §2.5) and enters the
//! runtime only to connect to an agent; after the accept everything is
//! async, raced against SIGINT/SIGTERM, which close the agent connection
//! and so cancel the remote build.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufRead as _, Read, Write as _};
use std::os::unix::io::FromRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixq_common::daemon::client::DEFAULT_SOCKET;
use nixq_common::daemon::{DaemonClient, DaemonError};
use nixq_common::drv::Derivation;
use nixq_common::machines::{
    self, Decision, ForeignUris, FsIncludes, MachineSpec, MachinesError, ParseOptions,
};
use nixq_common::path_info::PathInfo;
use nixq_common::proto::{
    self, BuildEvent, BuildOutcome, BuildSettings, Compression, PathState, Refusal,
};
use nixq_common::store::RegistrationBatcher;
use nixq_common::store_path::StorePath;
use tokio::sync::watch;
use tokio::time::Instant;

use super::choice::{self, Availability, LocalCaps, View};
use super::classic::{self, ClassicArgs, ClassicReply, Go, LineArgs, Protocol};
use super::exit::{self, Outcome};
use super::modern::{
    nix_msg_line, Event, Job, ModernDecoder, ModernError, Reply, Settings, TryRequest, Verbosity,
    WantedOutputs,
};
use super::outputs::{self, OutputsError};
use crate::agent_client::{AgentClient, AgentTarget, BuildStream, ClientError};
use crate::copy::{self, CopyError, Direction, Plan};
use crate::progress::Progress;
use crate::slots::{self, DownState, LoadDir, SlotLock};
use crate::target::{self, Credentials};
use crate::upload_lock;

/// The longest a "try" waits for one agent to answer (connection and
/// Hello). Nix's whole scheduler waits for the reply (§2.5), and an
/// unreachable machine is remembered in the back-off file, so this is paid
/// once per outage, not per derivation.
pub const TRY_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Extra time for the Hello after the QUIC handshake (the connection's
/// own timeout covers the handshake).
const HELLO_GRACE: Duration = Duration::from_secs(5);

/// Fixed part of the deadline of an upload or an output download: room for
/// waiting on the upload lock's holder and on paths in flight elsewhere.
const TRANSFER_BASE: Duration = Duration::from_secs(15 * 60);

/// Slowest acceptable transfer rate, for the size-dependent part of a
/// transfer's deadline (bytes per second): a link slower than this is
/// broken for build farm purposes.
const MIN_TRANSFER_RATE: u64 = 1 << 20;

/// How long an accepted build waits for an agent that refuses it as busy
/// (another master took its last slot between our Welcome and our Build).
const BUSY_WAIT: Duration = Duration::from_secs(10 * 60);
const BUSY_FIRST_RETRY: Duration = Duration::from_secs(1);
const BUSY_MAX_RETRY: Duration = Duration::from_secs(30);

/// How long a "try" that would be answered `# postpone` waits for a slot
/// of an eligible machine to become free (another hook exits) before it
/// answers. Nix asks a postponed derivation again only after
/// `build-poll-interval` (default 5 s), and a build that ends does not wake
/// it (measured on 2.8), so without the wait a farm of short builds idles
/// most of the time. Nix's whole scheduler is blocked while it waits for
/// our reply (§2.5): it reads no other hook's fd-4 log meanwhile (their
/// pipes may fill and stall them) and notices no finished build, so the
/// bound is modest — a little more than a short remote build takes — and
/// it guarantees progress.
const SLOT_WAIT: Duration = Duration::from_millis(1500);

/// How often the wait looks at the slot files: a few `flock` calls, cheap,
/// and short against the ~100 ms a remote build costs at the very least.
const SLOT_POLL: Duration = Duration::from_millis(5);

/// After a wait that saw no slot become free, this hook process answers
/// `# postpone` at once for this long. Nix re-asks every postponed
/// derivation in a burst after each poll interval, through the same hook
/// process (§2.9); with long builds every one of them would otherwise
/// block Nix for [`SLOT_WAIT`]. This keeps the time Nix is blocked by our
/// waits under a tenth.
const SLOT_WAIT_COOLDOWN: Duration = Duration::from_secs(15);

/// Bytes read from stdin at a time.
const STDIN_CHUNK: usize = 64 * 1024;

/// The program that registers outputs (§2.10).
const NIX_STORE: &str = "nix-store";

/// Why the hook failed. Every one of them is a transient failure for Nix
/// (exit 1, [`super::exit`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HookError {
    #[error(transparent)]
    Detect(#[from] classic::DetectError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("reading from Nix: {0}")]
    Stdin(#[source] io::Error),
    #[error("writing to Nix: {0}")]
    Reply(#[source] io::Error),
    #[error("Nix broke the hook protocol: {0}")]
    Protocol(#[from] ModernError),
    #[error("Nix broke the classic hook protocol: {0}")]
    Classic(#[from] classic::ClassicError),
    #[error("fd {fd} is not open; the caller is not Nix or did not set it up")]
    MissingFd { fd: i32 },
    #[error("cannot read the classic hook file {name}: {source}")]
    ClassicFile {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the derivation {path}: {reason}")]
    Derivation { path: StorePath, reason: String },
    #[error("the local Nix store: {0}")]
    LocalStore(#[source] DaemonError),
    #[error(transparent)]
    Agent(#[from] ClientError),
    #[error("uploading the inputs to {uri}: {source}")]
    Upload {
        uri: String,
        #[source]
        source: Box<CopyError>,
    },
    #[error("{what} on {uri} took longer than {limit:?}")]
    Timeout {
        what: &'static str,
        uri: String,
        limit: Duration,
    },
    #[error("{uri} ended the build stream without an outcome")]
    NoOutcome { uri: String },
    #[error("{uri} stayed busy for {BUSY_WAIT:?}")]
    StayedBusy { uri: String },
    #[error("the agent built output '{name}' as {got}, but the derivation says {expected}")]
    OutputMismatch {
        name: String,
        got: StorePath,
        expected: StorePath,
    },
    #[error("Nix wants output '{0}', which the agent did not build")]
    UnknownOutput(String),
    #[error(transparent)]
    Outputs(#[from] OutputsError),
    #[error("connecting to the local Nix store: {0}")]
    LocalTask(#[source] tokio::task::JoinError),
    #[error("cannot watch for signals: {0}")]
    Signals(#[source] io::Error),
}

/// The hook's `main`: detects the protocol, runs it, returns the status.
pub fn main() -> ExitCode {
    if std::env::var_os("NIXQ_LOG").is_some() {
        nixq_common::telemetry::init(nixq_common::telemetry::LogFormat::Text, "warn");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let build_hook_env = std::env::var_os("NIX_BUILD_HOOK").is_some();
    let result = classic::detect(&args, build_hook_env)
        .map_err(HookError::from)
        .and_then(|protocol| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(HookError::Runtime)?;
            match protocol {
                Protocol::Modern { verbosity } => run_modern(&rt, verbosity),
                Protocol::Classic(args) => run_classic(&rt, args),
                Protocol::Line(args) => run_line(&rt, &args),
            }
        });
    if let Err(e @ (HookError::Detect(_) | HookError::Runtime(_))) = &result {
        eprintln!("nixq-build-hook: error: {e}");
    }
    exit::exit_code(&result)
}

// ---------------------------------------------------------------------------
// Messages and the build log.

/// Where builder output goes: fd 4, or stderr for the classic protocol.
/// A write error (Nix gone) is ignored: the build goes on to its end.
#[derive(Debug)]
pub struct LogSink {
    file: Mutex<File>,
}

impl LogSink {
    fn new(file: File) -> Self {
        Self {
            file: Mutex::new(file),
        }
    }

    fn write(&self, bytes: &[u8]) {
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = file.write_all(bytes);
    }
}

/// How messages reach the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// Nix 2.x: plain lines before the accept, `@nix` lines after.
    Modern,
    /// Classic and 1.x: plain lines on stderr.
    Plain,
}

/// The hook's own messages, at Nix's verbosity.
#[derive(Debug)]
pub struct Messenger {
    verbosity: Verbosity,
    style: Style,
    accepted: AtomicBool,
    log: Mutex<Option<Arc<LogSink>>>,
}

impl Messenger {
    fn new(verbosity: Verbosity, style: Style) -> Self {
        Self {
            verbosity,
            style,
            accepted: AtomicBool::new(false),
            log: Mutex::new(None),
        }
    }

    /// From now on (modern protocol) plain stderr is dropped by Nix:
    /// messages go as `@nix` lines, problems also into the build log.
    fn accepted(&self, log: Arc<LogSink>) {
        self.accepted.store(true, Ordering::SeqCst);
        *self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(log);
    }

    fn say(&self, level: Verbosity, text: &str) {
        let prefix = match level {
            Verbosity::ERROR => "error: ",
            Verbosity::WARN => "warning: ",
            _ => "",
        };
        let line = format!("nixq-build-hook: {prefix}{text}");
        if self.accepted.load(Ordering::SeqCst) && self.style == Style::Modern {
            let log = self
                .log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            match log {
                // Problems go into the build log: the log file, the user's
                // terminal and the last lines of Nix's failure message.
                Some(log) if level <= Verbosity::WARN => log.write(format!("{line}\n").as_bytes()),
                // The rest as `@nix` messages, which Nix filters by its own
                // verbosity (plain stderr is dropped after the accept).
                _ => {
                    let _ = io::stderr()
                        .lock()
                        .write_all(nix_msg_line(level, &line).as_bytes());
                }
            }
        } else if level <= self.verbosity {
            let _ = writeln!(io::stderr().lock(), "{line}");
        }
    }
}

// ---------------------------------------------------------------------------
// File descriptors.

fn fd_is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD only reads the descriptor flags of `fd`.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Keeps `fd` from children (nix-daemon, nix-store): the log pipe's ends
/// and Nix's leaked descriptors are not theirs to hold open.
fn set_cloexec(fd: i32) {
    // SAFETY: fcntl on a descriptor number; a closed one fails harmlessly.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

/// Takes ownership of an inherited descriptor.
fn take_fd(fd: i32) -> Result<File, HookError> {
    if !fd_is_open(fd) {
        return Err(HookError::MissingFd { fd });
    }
    set_cloexec(fd);
    // SAFETY: `fd` is open, was inherited from the caller, and nothing else
    // in this process owns it (std uses only 0-2); it is taken once.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A close-on-exec duplicate of `fd`.
fn dup_fd(fd: i32) -> Result<File, HookError> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor (or fails).
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(HookError::MissingFd { fd });
    }
    // SAFETY: `new` was just created and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(new) })
}

// ---------------------------------------------------------------------------
// Machines and the choice.

/// Parses a machines list; `source` names it in errors.
fn parse_machines(
    source: &str,
    text: &str,
    system: &str,
) -> Result<Vec<MachineSpec>, MachinesError> {
    let options = ParseOptions {
        local_system: system,
        foreign_uris: ForeignUris::Reject,
    };
    Ok(machines::parse(source, text, &options, &mut FsIncludes)?.machines)
}

/// The machines file of the classic protocols (`NIX_REMOTE_SYSTEMS`); none
/// set or no such file means no machines.
fn classic_machines(system: &str) -> Result<Vec<MachineSpec>, String> {
    let Some(path) = std::env::var_os("NIX_REMOTE_SYSTEMS") else {
        return Ok(Vec::new());
    };
    let path = PathBuf::from(path);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            parse_machines(&path.display().to_string(), &text, system).map_err(|e| e.to_string())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The current-load directory of the classic protocols.
fn classic_load_dir() -> LoadDir {
    std::env::var_os("NIX_CURRENT_LOAD")
        .map_or_else(|| LoadDir::new(slots::default_load_dir()), LoadDir::new)
}

/// How to reach a machine: its columns, else `NIXQ_IDENTITY` / `NIXQ_CA`,
/// else the defaults of [`crate::target`].
fn target_for(spec: &MachineSpec) -> AgentTarget {
    let env_path = |name| std::env::var_os(name).map(PathBuf::from);
    let credentials = Credentials {
        identity: spec.identity.clone().or_else(|| env_path("NIXQ_IDENTITY")),
        ca: if spec.agent_ca.is_some() {
            None
        } else {
            env_path("NIXQ_CA")
        },
    };
    target::with_timeout(
        target::target_of(spec.uri.clone(), Some(spec), &credentials),
        TRY_CONNECT_TIMEOUT,
    )
}

fn client_name() -> String {
    format!("nixq-build-hook {}", env!("CARGO_PKG_VERSION"))
}

/// Connects and says Hello, within the target's timeout plus a grace.
async fn connect(target: &AgentTarget) -> Result<AgentClient, String> {
    let limit = target.connect_timeout + HELLO_GRACE;
    match tokio::time::timeout(limit, AgentClient::connect(target, &client_name())).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) if e.is_unreachable() => Err(e.to_string()),
        Ok(Err(e)) => Err(format!("{e} (not retried)")),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// A machine that took the job: the connection to its agent and our slot.
#[derive(Debug)]
pub struct Accepted {
    pub spec: MachineSpec,
    pub target: AgentTarget,
    pub client: AgentClient,
    /// Held until the hook exits (§4.2 step 4).
    pub slot: SlotLock,
}

/// The answer to a "try".
#[derive(Debug)]
enum Choice {
    Accept(Box<Accepted>),
    Answer(Decision),
}

/// Machine choice across the "try" requests of one hook process.
struct Scheduler<'a> {
    machines: Vec<MachineSpec>,
    machines_error: Option<String>,
    load_dir: LoadDir,
    local: LocalCaps,
    /// Machines unusable for the rest of this process (Nix's "disabled").
    disabled: BTreeSet<usize>,
    /// Until then, postpone without waiting for a slot ([`SLOT_WAIT_COOLDOWN`]).
    no_wait_until: Option<Instant>,
    msgs: &'a Messenger,
}

impl<'a> Scheduler<'a> {
    /// A scheduler over `machines`; a machines file that could not be read
    /// leaves it with none and the error to report on every try.
    fn new(
        machines: Result<Vec<MachineSpec>, String>,
        load_dir: LoadDir,
        local: LocalCaps,
        msgs: &'a Messenger,
    ) -> Self {
        let (machines, machines_error) = match machines {
            Ok(machines) => (machines, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        Self {
            machines,
            machines_error,
            load_dir,
            local,
            disabled: BTreeSet::new(),
            no_wait_until: None,
            msgs,
        }
    }

    /// The scheduler of the classic and 1.x protocols: machines from
    /// `NIX_REMOTE_SYSTEMS`, slots in `NIX_CURRENT_LOAD`, and only
    /// `this_system` known about the local machine.
    fn classic(this_system: &str, msgs: &'a Messenger) -> Self {
        let local = LocalCaps {
            systems: vec![this_system.to_owned()],
            features: BTreeSet::new(),
        };
        Self::new(
            classic_machines(this_system),
            classic_load_dir(),
            local,
            msgs,
        )
    }
}

impl Scheduler<'_> {
    async fn choose(&mut self, request: &TryRequest) -> Choice {
        if let Some(e) = &self.machines_error {
            self.msgs.say(Verbosity::ERROR, e);
            return Choice::Answer(Decision::Decline { warn: false });
        }
        if self.machines.is_empty() {
            return Choice::Answer(Decision::DeclinePermanently);
        }
        let eligible = choice::eligible_machines(&self.machines, request);
        // Machines whose agent said "full" during this request.
        let mut busy = BTreeSet::new();
        // The end of this request's wait for a slot, once it started.
        let mut wait_until = None;
        loop {
            let (decision, mut held, down) = match self.look(&eligible, &busy, request) {
                Ok(looked) => looked,
                Err(e) => {
                    self.msgs.say(
                        Verbosity::ERROR,
                        &format!(
                            "the current-load directory {}: {e}",
                            self.load_dir.path().display()
                        ),
                    );
                    return Choice::Answer(Decision::Decline { warn: false });
                }
            };
            let index = match decision {
                Decision::Accept(index) => index,
                Decision::Decline { warn: true } => {
                    self.msgs.say(
                        Verbosity::WARN,
                        &format!(
                            "no machine can build '{}' now (system {}, features [{}])",
                            request.drv_path,
                            request.needed_system,
                            request
                                .required_features
                                .iter()
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                    return Choice::Answer(decision);
                }
                Decision::Postpone => {
                    drop(held);
                    let until = *wait_until.get_or_insert_with(|| Instant::now() + SLOT_WAIT);
                    if self.wait_for_slot(&eligible, &busy, &down, until).await {
                        continue;
                    }
                    return Choice::Answer(decision);
                }
                other => return Choice::Answer(other),
            };
            let Some(slot) = held.remove(&index) else {
                // `decide_try` only picks machines with a held slot.
                self.disabled.insert(index);
                continue;
            };
            drop(held);
            let _ = slot.touch();
            let spec = self.machines[index].clone();
            let uri = spec.uri.text.clone();
            let target = target_for(&spec);
            self.msgs
                .say(Verbosity::CHATTY, &format!("connecting to {uri}"));
            let client = match connect(&target).await {
                Ok(client) => client,
                Err(e) => {
                    let now = slots::unix_now();
                    let mut wait = None;
                    let recorded = self.load_dir.update_down(|s| {
                        wait = Some(s.record_failure(&uri, now));
                    });
                    let skip = match (recorded, wait) {
                        (Ok(()), Some(wait)) => format!("skipping it for {}s", wait.as_secs()),
                        _ => "skipping it".to_owned(),
                    };
                    self.msgs
                        .say(Verbosity::WARN, &format!("cannot use {uri}: {e}; {skip}"));
                    self.disabled.insert(index);
                    continue;
                }
            };
            if down.entry(&uri).is_some() {
                let _ = self.load_dir.update_down(|s| {
                    s.record_success(&uri);
                });
            }
            match choice::verdict(
                client.welcome(),
                &request.needed_system,
                copy::STORE_DIR,
                spec.uri.params.max_load,
            ) {
                choice::Verdict::Usable => {
                    return Choice::Accept(Box::new(Accepted {
                        spec,
                        target,
                        client,
                        slot,
                    }))
                }
                verdict => {
                    let level = if verdict.is_busy() {
                        busy.insert(index);
                        Verbosity::TALKATIVE
                    } else {
                        self.disabled.insert(index);
                        Verbosity::WARN
                    };
                    self.msgs.say(level, &format!("not using {uri}: {verdict}"));
                    client.close().await;
                }
            }
        }
    }

    /// Waits until `until` for a slot of an eligible machine that is not
    /// disabled, down or full to become free, without `main-lock` (§4.2:
    /// it is held only for a choice). True if one did: the caller chooses
    /// again, under `main-lock`. A wait that ends empty-handed starts
    /// [`SLOT_WAIT_COOLDOWN`].
    async fn wait_for_slot(
        &mut self,
        eligible: &[usize],
        busy: &BTreeSet<usize>,
        down: &DownState,
        until: Instant,
    ) -> bool {
        if self.no_wait_until.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        let now = slots::unix_now();
        let watched = eligible
            .iter()
            .filter(|i| !self.disabled.contains(i) && !busy.contains(i))
            .filter_map(|&i| self.machines.get(i))
            .filter(|m| !down.is_down(&m.uri.text, now))
            .map(|m| (m.uri.text.as_str(), m.max_jobs));
        let watch = match self.load_dir.watch(watched) {
            Ok(watch) => watch,
            Err(e) => {
                self.msgs.say(
                    Verbosity::DEBUG,
                    &format!("cannot watch the slot files: {e}"),
                );
                return false;
            }
        };
        loop {
            match watch.any_free() {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => {
                    self.msgs.say(
                        Verbosity::DEBUG,
                        &format!("cannot watch the slot files: {e}"),
                    );
                    return false;
                }
            }
            if Instant::now() >= until {
                self.no_wait_until = Some(Instant::now() + SLOT_WAIT_COOLDOWN);
                return false;
            }
            tokio::time::sleep(SLOT_POLL).await;
        }
    }

    /// Under `main-lock`: the state of each eligible machine, and Nix's
    /// decision. Returns the slots held (only the chosen one is kept) and
    /// the back-off state read.
    fn look(
        &self,
        eligible: &[usize],
        busy: &BTreeSet<usize>,
        request: &TryRequest,
    ) -> io::Result<(Decision, BTreeMap<usize, SlotLock>, DownState)> {
        let _main = self.load_dir.lock_main(slots::MAIN_LOCK_WAIT)?;
        let down = self.load_dir.read_down().unwrap_or_default();
        let now = slots::unix_now();
        let mut views = Vec::with_capacity(eligible.len());
        let mut held = BTreeMap::new();
        for &index in eligible {
            let machine = &self.machines[index];
            let availability =
                if self.disabled.contains(&index) || down.is_down(&machine.uri.text, now) {
                    Availability::Disabled
                } else if busy.contains(&index) {
                    Availability::Full
                } else {
                    let probe = self.load_dir.probe(&machine.uri.text, machine.max_jobs)?;
                    let free = probe.free.is_some();
                    if let Some(slot) = probe.free {
                        held.insert(index, slot);
                    }
                    Availability::Slots {
                        load: probe.load,
                        free,
                    }
                };
            views.push(View {
                index,
                availability,
            });
        }
        let decision = choice::decide_try(&self.machines, &views, request, &self.local);
        Ok((decision, held, down))
    }
}

// ---------------------------------------------------------------------------
// The modern protocol.

/// Reads [`Event`]s from Nix's stdin through the pure decoder.
struct EventReader<R> {
    reader: R,
    decoder: ModernDecoder,
    buf: Vec<u8>,
}

impl<R: Read> EventReader<R> {
    fn new(reader: R) -> Self {
        Self {
            reader,
            decoder: ModernDecoder::new(),
            buf: Vec::new(),
        }
    }

    fn next(&mut self) -> Result<Event, HookError> {
        let mut chunk = vec![0u8; STDIN_CHUNK];
        loop {
            let (event, used) = self.decoder.decode(&self.buf)?;
            self.buf.drain(..used);
            if let Some(event) = event {
                return Ok(event);
            }
            let n = loop {
                match self.reader.read(&mut chunk) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(HookError::Stdin(e)),
                }
            };
            if n == 0 {
                return Ok(self.decoder.eof(self.buf.len())?);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn write_stderr(text: &str) -> Result<(), HookError> {
    let mut stderr = io::stderr().lock();
    stderr
        .write_all(text.as_bytes())
        .and_then(|()| stderr.flush())
        .map_err(HookError::Reply)
}

fn run_modern(rt: &tokio::runtime::Runtime, verbosity: Verbosity) -> Result<Outcome, HookError> {
    // fd 3 is Nix's leaked mount-namespace fd, fd 5 the read side of the
    // log pipe (§2.2): neither may reach our children.
    set_cloexec(3);
    set_cloexec(5);
    let msgs = Messenger::new(verbosity, Style::Modern);
    let result = modern_session(rt, &msgs);
    if let Err(e) = &result {
        msgs.say(Verbosity::ERROR, &e.to_string());
    }
    result
}

fn modern_session(rt: &tokio::runtime::Runtime, msgs: &Messenger) -> Result<Outcome, HookError> {
    let mut events = EventReader::new(io::stdin().lock());
    let settings = match events.next()? {
        Event::Settings(settings) => *settings,
        // The decoder yields Settings first or fails.
        Event::Exit => return Ok(Outcome::NoJob),
        _ => return Err(ModernError::NotAccepted.into()),
    };
    let mut scheduler = Scheduler::new(
        parse_machines("builders", &settings.builders, &settings.system).map_err(|e| e.to_string()),
        LoadDir::new(slots::default_load_dir()),
        LocalCaps {
            systems: settings.local_systems(),
            features: settings.system_features.clone(),
        },
        msgs,
    );
    loop {
        let request = match events.next()? {
            Event::Try(request) => request,
            Event::Exit => return Ok(Outcome::NoJob),
            Event::Settings(_) | Event::Job(_) => return Err(ModernError::NotAccepted.into()),
        };
        let accepted = match rt.block_on(scheduler.choose(&request)) {
            Choice::Accept(accepted) => accepted,
            Choice::Answer(decision) => {
                write_stderr(&modern_reply(decision).to_line())?;
                continue;
            }
        };
        let log_fd = take_fd(4);
        write_stderr(
            &Reply::Accept {
                machine: accepted.spec.uri.text.clone(),
            }
            .to_line(),
        )?;
        events.decoder.accepted()?;
        let Event::Job(job) = events.next()? else {
            return Err(ModernError::Truncated("before the job details").into());
        };
        let log = Arc::new(LogSink::new(log_fd?));
        msgs.accepted(Arc::clone(&log));
        let work = Work {
            drv_path: request.drv_path,
            job,
            limits: limits_of(&settings),
            log,
            msgs,
            load_dir: scheduler.load_dir.clone(),
        };
        return rt.block_on(work.run(*accepted));
    }
}

fn limits_of(settings: &Settings) -> BuildSettings {
    BuildSettings {
        timeout_secs: settings.timeout,
        max_silent_secs: settings.max_silent_time,
        build_cores: settings.build_cores,
    }
}

fn modern_reply(decision: Decision) -> Reply {
    match decision {
        // `choose` never answers Accept this way.
        Decision::Accept(_) | Decision::Decline { .. } => Reply::Decline,
        Decision::Postpone => Reply::Postpone,
        Decision::DeclinePermanently => Reply::DeclinePermanently,
    }
}

fn classic_reply(decision: &Decision) -> ClassicReply {
    match decision {
        Decision::Postpone => ClassicReply::Postpone,
        _ => ClassicReply::Decline,
    }
}

// ---------------------------------------------------------------------------
// The classic protocol (Nix 0.10 – 0.12).

fn run_classic(rt: &tokio::runtime::Runtime, args: ClassicArgs) -> Result<Outcome, HookError> {
    // Stderr is the build log here: messages go there at the default level.
    let msgs = Messenger::new(Verbosity::INFO, Style::Plain);
    let result = classic_session(rt, &msgs, args);
    if let Err(e) = &result {
        msgs.say(Verbosity::ERROR, &e.to_string());
    }
    result
}

/// `requiredSystemFeatures` of a derivation in the local store (empty if it
/// cannot be read: the machines then decide by system alone).
fn required_features(drv_path: &StorePath) -> BTreeSet<String> {
    read_derivation(drv_path)
        .ok()
        .and_then(|drv| {
            drv.env
                .get("requiredSystemFeatures")
                .map(|v| v.split_whitespace().map(str::to_owned).collect())
        })
        .unwrap_or_default()
}

fn classic_session(
    rt: &tokio::runtime::Runtime,
    msgs: &Messenger,
    args: ClassicArgs,
) -> Result<Outcome, HookError> {
    let mut reply_fd = take_fd(3)?;
    let go_fd = take_fd(4)?;
    let request = TryRequest {
        am_willing: args.can_build_more,
        needed_system: args.drv_system.clone(),
        drv_path: args.drv_path.clone(),
        required_features: required_features(&args.drv_path),
    };
    let mut scheduler = Scheduler::classic(&args.this_system, msgs);
    let accepted = match rt.block_on(scheduler.choose(&request)) {
        Choice::Accept(accepted) => accepted,
        Choice::Answer(decision) => {
            reply_fd
                .write_all(classic_reply(&decision).to_line().as_bytes())
                .map_err(HookError::Reply)?;
            return Ok(Outcome::NoJob);
        }
    };
    reply_fd
        .write_all(ClassicReply::Accept.to_line().as_bytes())
        .map_err(HookError::Reply)?;
    drop(reply_fd);
    let mut line = String::new();
    io::BufReader::new(go_fd)
        .read_line(&mut line)
        .map_err(HookError::Stdin)?;
    if line.is_empty() {
        return Err(HookError::Stdin(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "fd 4 closed before 'okay' or 'cancel'",
        )));
    }
    if classic::parse_go(&line)? == Go::Cancel {
        msgs.say(Verbosity::TALKATIVE, "Nix cancelled the build");
        return Ok(Outcome::Cancelled);
    }
    let read = |name: &'static str| {
        std::fs::read_to_string(name).map_err(|source| HookError::ClassicFile { name, source })
    };
    let inputs = classic::parse_path_list("inputs", &read("inputs")?)?;
    let outputs = classic::parse_path_list("outputs", &read("outputs")?)?;
    // The reference graph is Nix's own view of the inputs; our upload takes
    // the same facts from the local store, so it is only checked.
    let references = classic::parse_references(&read("references")?)?;
    msgs.say(
        Verbosity::DEBUG,
        &format!(
            "{} inputs, {} outputs, {} reference entries",
            inputs.len(),
            outputs.len(),
            references.len()
        ),
    );
    // Stderr is the build log of the classic protocol; a duplicate, so
    // that dropping the sink never closes stderr itself (§2.7).
    let stderr = dup_fd(2)?;
    let work = Work {
        drv_path: args.drv_path,
        job: Job {
            inputs,
            wanted: WantedOutputs::Paths(outputs),
        },
        limits: BuildSettings::default(),
        log: Arc::new(LogSink::new(stderr)),
        msgs,
        load_dir: scheduler.load_dir.clone(),
    };
    rt.block_on(work.run(*accepted))
}

// ---------------------------------------------------------------------------
// The 1.x line protocol.

fn run_line(rt: &tokio::runtime::Runtime, args: &LineArgs) -> Result<Outcome, HookError> {
    let msgs = Messenger::new(Verbosity::INFO, Style::Plain);
    let result = line_session(rt, &msgs, args);
    if let Err(e) = &result {
        msgs.say(Verbosity::ERROR, &e.to_string());
    }
    result
}

fn line_session(
    rt: &tokio::runtime::Runtime,
    msgs: &Messenger,
    args: &LineArgs,
) -> Result<Outcome, HookError> {
    set_cloexec(3);
    set_cloexec(5);
    let mut scheduler = Scheduler::classic(&args.this_system, msgs);
    let mut stdin = io::stdin().lock();
    let mut line = String::new();
    loop {
        line.clear();
        if stdin.read_line(&mut line).map_err(HookError::Stdin)? == 0 {
            return Ok(Outcome::NoJob);
        }
        let request = classic::parse_line_request(line.trim_end())?;
        let accepted = match rt.block_on(scheduler.choose(&request)) {
            Choice::Accept(accepted) => accepted,
            Choice::Answer(decision) => {
                write_stderr(classic::line_reply(classic_reply(&decision)))?;
                continue;
            }
        };
        let log_fd = take_fd(4);
        write_stderr(classic::line_reply(ClassicReply::Accept))?;
        let mut read_paths = |what: &'static str| -> Result<Vec<StorePath>, HookError> {
            let mut text = String::new();
            stdin.read_line(&mut text).map_err(HookError::Stdin)?;
            Ok(classic::parse_path_words(what, &text)?)
        };
        let inputs = read_paths("inputs")?;
        let outputs = read_paths("outputs")?;
        let work = Work {
            drv_path: request.drv_path,
            job: Job {
                inputs,
                wanted: WantedOutputs::Paths(outputs),
            },
            limits: BuildSettings {
                timeout_secs: args.build_timeout,
                max_silent_secs: args.max_silent_time,
                build_cores: 0,
            },
            log: Arc::new(LogSink::new(log_fd?)),
            msgs,
            load_dir: scheduler.load_dir.clone(),
        };
        return rt.block_on(work.run(*accepted));
    }
}

// ---------------------------------------------------------------------------
// After the accept: upload, build, outputs.

/// An accepted job.
struct Work<'a> {
    drv_path: StorePath,
    job: Job,
    limits: BuildSettings,
    log: Arc<LogSink>,
    msgs: &'a Messenger,
    load_dir: LoadDir,
}

/// How following the Build stream ended.
enum BuildEnd {
    Remote(BuildOutcome),
    /// Our own enforcement of `timeout` / `max-silent-time`.
    LocalTimeout(String),
    /// The agent refused the build as busy before it started.
    Busy,
    Interrupted,
}

/// A watch that turns true on SIGINT or SIGTERM.
fn watch_signals() -> Result<watch::Receiver<bool>, HookError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).map_err(HookError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(HookError::Signals)?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Resolves when the watch turns true (never if its sender is gone).
async fn interrupted(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The deadline of a transfer of `bytes`.
fn transfer_deadline(bytes: u64) -> Duration {
    TRANSFER_BASE + Duration::from_secs(bytes / MIN_TRANSFER_RATE)
}

fn read_derivation(path: &StorePath) -> Result<Derivation, HookError> {
    let error = |reason: String| HookError::Derivation {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read(path.as_path()).map_err(|e| error(e.to_string()))?;
    Derivation::parse(&text).map_err(|e| error(e.to_string()))
}

/// The local Nix store, for reading: its daemon socket if there is one,
/// else a private `nix-daemon --stdio` whose stderr is not Nix's pipe.
async fn local_daemon() -> Result<DaemonClient, HookError> {
    let client = if Path::new(DEFAULT_SOCKET).exists() {
        DaemonClient::connect_socket(DEFAULT_SOCKET).await
    } else {
        let mut cmd = DaemonClient::stdio_command();
        cmd.stderr(Stdio::null());
        DaemonClient::spawn_stdio(cmd).await
    };
    client.map_err(HookError::LocalStore)
}

/// The task connecting to the local store; aborted if dropped unfinished.
struct DaemonTask(tokio::task::JoinHandle<Result<DaemonClient, HookError>>);

impl DaemonTask {
    /// Waits for the connection (once).
    async fn connected(&mut self) -> Result<DaemonClient, HookError> {
        (&mut self.0).await.map_err(HookError::LocalTask)?
    }
}

impl Drop for DaemonTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The store paths of the wanted outputs, from what the agent built.
fn resolve_wanted(
    wanted: &WantedOutputs,
    drv: &Derivation,
    built: &BTreeMap<String, PathInfo>,
) -> Result<Vec<StorePath>, HookError> {
    match wanted {
        WantedOutputs::Paths(paths) => Ok(paths.clone()),
        WantedOutputs::Names(names) => names
            .iter()
            .map(|name| {
                let info = built
                    .get(name)
                    .ok_or_else(|| HookError::UnknownOutput(name.clone()))?;
                if let Some(expected) = drv.outputs.get(name).and_then(|o| o.path.as_ref()) {
                    if *expected != info.path {
                        return Err(HookError::OutputMismatch {
                            name: name.clone(),
                            got: info.path.clone(),
                            expected: expected.clone(),
                        });
                    }
                }
                Ok(info.path.clone())
            })
            .collect(),
    }
}

impl Work<'_> {
    async fn run(self, accepted: Accepted) -> Result<Outcome, HookError> {
        let stop = watch_signals()?;
        let Accepted {
            spec,
            target,
            client,
            slot,
        } = accepted;
        let client = Arc::new(client);
        let mut outer_stop = stop.clone();
        let result = tokio::select! {
            result = self.remote_build(&client, &spec, &target, stop) => result,
            () = interrupted(&mut outer_stop) => Ok(Outcome::Interrupted),
        };
        let result = self.report(&spec.uri.text, result);
        if matches!(result, Ok(Outcome::Interrupted)) {
            client.abort();
        }
        if let Ok(client) = Arc::try_unwrap(client) {
            client.close().await;
        }
        drop(slot);
        result
    }

    /// Tells the user how it ended (errors are reported by the caller).
    fn report(&self, uri: &str, result: Result<Outcome, HookError>) -> Result<Outcome, HookError> {
        let drv = &self.drv_path;
        match &result {
            Ok(Outcome::Built) => self
                .msgs
                .say(Verbosity::TALKATIVE, &format!("built '{drv}' on {uri}")),
            Ok(Outcome::BuilderFailed { msg }) => self.msgs.say(
                Verbosity::ERROR,
                &format!("build of '{drv}' on {uri} failed: {msg}"),
            ),
            Ok(Outcome::TimedOut { msg }) => self.msgs.say(
                Verbosity::ERROR,
                &format!("build of '{drv}' on {uri} timed out: {msg}"),
            ),
            Ok(Outcome::Transient { msg }) => self.msgs.say(
                Verbosity::ERROR,
                &format!("build of '{drv}' on {uri} failed (transient): {msg}"),
            ),
            Ok(Outcome::Interrupted) => self.msgs.say(
                Verbosity::ERROR,
                &format!("interrupted; the build of '{drv}' on {uri} was cancelled"),
            ),
            Ok(Outcome::NoJob | Outcome::Cancelled) | Err(_) => {}
        }
        result
    }

    async fn remote_build(
        &self,
        client: &Arc<AgentClient>,
        spec: &MachineSpec,
        target: &AgentTarget,
        stop: watch::Receiver<bool>,
    ) -> Result<Outcome, HookError> {
        let uri = spec.uri.text.clone();
        let compression = spec.uri.params.compress.unwrap_or(Compression::None);
        let drv = read_derivation(&self.drv_path)?;
        // The local store connection (a `nix-daemon --stdio` to spawn when
        // there is no socket) is made while the agent is asked about the
        // inputs: in a chain of builds it usually has them all already, and
        // a path valid there has its closure valid there too, so neither the
        // closure nor the upload lock is needed, and the connection is
        // awaited only for the outputs, after the build.
        let mut daemon_task = DaemonTask(tokio::spawn(local_daemon()));
        // Its `nix-store --register-validity` starts now and is ready for
        // the outputs when the build is done.
        let batcher = RegistrationBatcher::spawn_for_one_batch(NIX_STORE.to_owned());
        let states = if self.job.inputs.is_empty() {
            Vec::new()
        } else {
            client.query_missing(&self.job.inputs, false).await?
        };
        let mut daemon = None;
        if states.iter().all(|s| *s == PathState::Valid) {
            self.msgs.say(
                Verbosity::CHATTY,
                &format!("{uri} has all {} input paths", states.len()),
            );
        } else {
            let mut local = daemon_task.connected().await?;
            self.upload(client, target, &mut local, &uri, compression)
                .await?;
            daemon = Some(local);
        }
        // The build, retried while the agent is busy (another master).
        let inputs: BTreeSet<StorePath> = self.job.inputs.iter().cloned().collect();
        let request = proto::Build {
            drv_path: self.drv_path.clone(),
            drv: drv.to_basic(&inputs),
            settings: self.limits,
        };
        let busy_since = Instant::now();
        let mut retry = BUSY_FIRST_RETRY;
        let end = loop {
            let stream = client.build(request.clone()).await?;
            match self.follow(stream, &uri, stop.clone()).await? {
                BuildEnd::Busy if busy_since.elapsed() < BUSY_WAIT => {
                    self.msgs.say(
                        Verbosity::TALKATIVE,
                        &format!("{uri} is busy; retrying in {}s", retry.as_secs()),
                    );
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(BUSY_MAX_RETRY);
                }
                BuildEnd::Busy => return Err(HookError::StayedBusy { uri }),
                end => break end,
            }
        };
        let built = match end {
            BuildEnd::Remote(BuildOutcome::Built { outputs }) => outputs,
            BuildEnd::Remote(BuildOutcome::BuilderFailed { msg }) => {
                return Ok(Outcome::BuilderFailed { msg })
            }
            BuildEnd::Remote(BuildOutcome::TimedOut { msg }) | BuildEnd::LocalTimeout(msg) => {
                return Ok(Outcome::TimedOut { msg })
            }
            BuildEnd::Remote(BuildOutcome::Transient { msg }) => {
                return Ok(Outcome::Transient { msg })
            }
            BuildEnd::Interrupted => return Ok(Outcome::Interrupted),
            BuildEnd::Busy => return Err(HookError::StayedBusy { uri }),
        };

        // The outputs.
        let mut daemon = match daemon {
            Some(daemon) => daemon,
            None => daemon_task.connected().await?,
        };
        let wanted = resolve_wanted(&self.job.wanted, &drv, &built)?;
        let out_bytes = built
            .values()
            .filter(|i| wanted.contains(&i.path))
            .map(|i| i.nar_size)
            .sum();
        let limit = transfer_deadline(out_bytes);
        let fetched = tokio::time::timeout(
            limit,
            outputs::fetch_outputs(client, &built, &wanted, &mut daemon, compression, batcher),
        )
        .await
        .map_err(|_| HookError::Timeout {
            what: "fetching the outputs",
            uri: uri.clone(),
            limit,
        })??;
        self.msgs.say(
            Verbosity::CHATTY,
            &format!(
                "fetched {} outputs ({} bytes) from {uri}; {} were valid already",
                fetched.fetched.len(),
                fetched.bytes,
                fetched.already_valid
            ),
        );
        if let Err(e) = daemon.shutdown().await {
            self.msgs
                .say(Verbosity::DEBUG, &format!("closing the local daemon: {e}"));
        }
        Ok(Outcome::Built)
    }

    /// Uploads the closure of the inputs, under the per-machine upload
    /// lock (§4.2 step 7).
    async fn upload(
        &self,
        client: &Arc<AgentClient>,
        target: &AgentTarget,
        daemon: &mut DaemonClient,
        uri: &str,
        compression: Compression,
    ) -> Result<(), HookError> {
        let closure = daemon
            .query_closure(self.job.inputs.iter().cloned())
            .await
            .map_err(HookError::LocalStore)?;
        let bytes: u64 = closure.iter().map(|i| i.nar_size).sum();
        let paths = closure.len();
        let lock = upload_lock::acquire(self.load_dir.path(), uri, upload_lock::MAX_WAIT).await;
        if let Some(warning) = &lock.warning {
            self.msgs.say(Verbosity::WARN, warning);
        }
        let plan = Plan {
            direction: Direction::To,
            target: target.clone(),
            roots: Vec::new(),
            compression,
            jobs: copy::DEFAULT_JOBS,
            include_outputs: false,
            quiet: true,
            verbose: 0,
        };
        let limit = transfer_deadline(bytes);
        let sent = tokio::time::timeout(
            limit,
            copy::send_closure(client, closure, &plan, &Progress::hidden()),
        )
        .await
        .map_err(|_| HookError::Timeout {
            what: "the upload",
            uri: uri.to_owned(),
            limit,
        })?
        .map_err(|source| HookError::Upload {
            uri: uri.to_owned(),
            source: Box::new(source),
        })?;
        drop(lock);
        self.msgs.say(
            Verbosity::CHATTY,
            &format!(
                "{uri} lacked {} of {paths} input paths; sent {} bytes",
                sent.copied, sent.bytes
            ),
        );
        Ok(())
    }

    /// Follows a Build stream: builder output to the log as it comes,
    /// `timeout` and `max-silent-time` enforced here too, a signal cancels.
    async fn follow(
        &self,
        mut stream: BuildStream,
        uri: &str,
        mut stop: watch::Receiver<bool>,
    ) -> Result<BuildEnd, HookError> {
        let limits = self.limits;
        let start = Instant::now();
        let total =
            (limits.timeout_secs > 0).then(|| start + Duration::from_secs(limits.timeout_secs));
        let mut last_output = start;
        let mut started = false;
        loop {
            let silent = (limits.max_silent_secs > 0)
                .then(|| last_output + Duration::from_secs(limits.max_silent_secs));
            let deadline = match (total, silent) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let timer = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = stream.next_event() => match event {
                    Ok(Some(BuildEvent::Log(bytes))) => {
                        self.log.write(&bytes);
                        last_output = Instant::now();
                    }
                    Ok(Some(BuildEvent::Started)) => {
                        started = true;
                        self.msgs.say(Verbosity::CHATTY, &format!("the build started on {uri}"));
                    }
                    Ok(Some(BuildEvent::Outcome(outcome))) => return Ok(BuildEnd::Remote(outcome)),
                    Ok(Some(BuildEvent::Refused(Refusal::Busy { .. })))
                    | Err(ClientError::Refused { refusal: Refusal::Busy { .. }, .. }) if !started => {
                        return Ok(BuildEnd::Busy)
                    }
                    Ok(Some(BuildEvent::Refused(refusal))) => {
                        return Err(HookError::Agent(ClientError::Refused {
                            uri: uri.to_owned(),
                            op: "build",
                            refusal,
                        }))
                    }
                    Ok(None) => return Err(HookError::NoOutcome { uri: uri.to_owned() }),
                    Err(e) => return Err(e.into()),
                },
                () = timer => {
                    let now = Instant::now();
                    let msg = if total.is_some_and(|t| now >= t) {
                        format!("building for more than {} seconds (timeout)", limits.timeout_secs)
                    } else {
                        format!("no output for {} seconds (max-silent-time)", limits.max_silent_secs)
                    };
                    stream.cancel();
                    return Ok(BuildEnd::LocalTimeout(msg));
                }
                () = interrupted(&mut stop) => {
                    stream.cancel();
                    return Ok(BuildEnd::Interrupted);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use nixq_common::drv::DerivationOutput;
    use nixq_common::hash::NarHash;

    use super::*;

    fn path(name: &str) -> StorePath {
        StorePath::parse_any(&format!(
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-{name}"
        ))
        .expect("path")
    }

    fn info(p: &StorePath) -> PathInfo {
        PathInfo {
            path: p.clone(),
            deriver: None,
            nar_hash: NarHash::of(b"x"),
            nar_size: 100,
            references: BTreeSet::new(),
            registration_time: 0,
            ultimate: false,
            sigs: vec![],
            ca: None,
        }
    }

    #[test]
    fn wanted_names_resolve_against_the_derivation() {
        let out = path("x");
        let drv = Derivation {
            outputs: [(
                "out".to_owned(),
                DerivationOutput {
                    path: Some(out.clone()),
                    hash_algo: String::new(),
                    hash: String::new(),
                },
            )]
            .into(),
            input_drvs: BTreeMap::new(),
            input_srcs: BTreeSet::new(),
            platform: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            args: vec![],
            env: BTreeMap::new(),
        };
        let built: BTreeMap<String, PathInfo> = [("out".to_owned(), info(&out))].into();
        let names = WantedOutputs::Names(vec!["out".into()]);
        assert_eq!(
            resolve_wanted(&names, &drv, &built).expect("ok"),
            std::slice::from_ref(&out)
        );
        let missing = WantedOutputs::Names(vec!["doc".into()]);
        assert!(matches!(
            resolve_wanted(&missing, &drv, &built),
            Err(HookError::UnknownOutput(_))
        ));
        let other = path("y");
        let wrong: BTreeMap<String, PathInfo> = [("out".to_owned(), info(&other))].into();
        assert!(matches!(
            resolve_wanted(&names, &drv, &wrong),
            Err(HookError::OutputMismatch { .. })
        ));
        let paths = WantedOutputs::Paths(vec![other.clone()]);
        assert_eq!(resolve_wanted(&paths, &drv, &built).expect("ok"), [other]);
    }

    #[test]
    fn deadlines_grow_with_size() {
        assert_eq!(transfer_deadline(0), TRANSFER_BASE);
        assert_eq!(
            transfer_deadline(100 * MIN_TRANSFER_RATE),
            TRANSFER_BASE + Duration::from_secs(100)
        );
    }

    #[test]
    fn replies_for_decisions() {
        assert_eq!(modern_reply(Decision::Postpone), Reply::Postpone);
        assert_eq!(
            modern_reply(Decision::DeclinePermanently),
            Reply::DeclinePermanently
        );
        assert_eq!(
            modern_reply(Decision::Decline { warn: true }),
            Reply::Decline
        );
        assert_eq!(classic_reply(&Decision::Postpone), ClassicReply::Postpone);
        assert_eq!(
            classic_reply(&Decision::DeclinePermanently),
            ClassicReply::Decline
        );
    }
}
