//! Build: build a derivation on the agent.
//!
//! ```text
//! master → Request::Build(Build { drv_path, drv, settings })
//! agent  → BuildEvent::Started
//!          BuildEvent::Log(bytes)…        (builder output, live)
//!          BuildEvent::Outcome(Built { outputs } | BuilderFailed | TimedOut | Transient)
//! ```
//!
//! Each build has its own daemon connection (builds run in parallel up to
//! `max_builds`; a full agent refuses with `Busy`). The agent enforces
//! `timeout` and `max-silent-time` itself too. The master cancels by
//! resetting its side or stopping ours (`ErrorCode::Cancelled`), or by
//! closing the connection. The build runs in a task of its own that owns
//! the daemon connection, the slot and the `running_builds` count: however
//! the stream ends (even by being dropped with its connection), the task
//! stops the build ([`BuildConn::stop`]: Nix kills the builder), then
//! frees the slot. Built outputs become temp roots of the master's
//! connection.
//!
//! [`BuildConn::stop`]: crate::store::BuildConn::stop

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixq_common::daemon::{
    BuildMode, BuildResult, BuildStatus, ClientSettings, DaemonClient, LogEvent,
};
use nixq_common::path_info::PathInfo;
use nixq_common::proto::{write_frame, Build, BuildEvent, BuildOutcome, Refusal, MAX_LOG_CHUNK};
use nixq_common::store_path::StorePath;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use super::OpError;
use crate::server::{refuse_reply, Ctx};

/// Log chunks queued between the daemon connection and the stream. When a
/// master reads slower than the builder writes, lines beyond this are
/// dropped (and the drop is reported in the log) rather than buffered
/// without bound: 4096 lines is seconds of the chattiest builds.
const LOG_QUEUE: usize = 4096;

/// How often the timeouts are checked.
const TICK: Duration = Duration::from_millis(500);

pub async fn serve(
    ctx: &Ctx,
    build: Build,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), OpError> {
    let shared = &ctx.shared;
    if let Some((free_bytes, floor_bytes)) = shared.below_floor() {
        refuse_reply(
            send,
            &BuildEvent::Refused(Refusal::NoSpace {
                free_bytes,
                floor_bytes,
            }),
        )
        .await;
        return Ok(());
    }
    let platform = &build.drv.platform;
    if platform != "builtin" && !shared.platform.systems.contains(platform) {
        refuse_reply(
            send,
            &BuildEvent::Refused(Refusal::Invalid {
                reason: format!(
                    "this agent builds for {:?}, not {platform}",
                    shared.platform.systems
                ),
            }),
        )
        .await;
        return Ok(());
    }
    let Ok(slot) = Arc::clone(&shared.builds).try_acquire_owned() else {
        refuse_reply(
            send,
            &BuildEvent::Refused(Refusal::Busy {
                limit: shared.max_builds,
            }),
        )
        .await;
        return Ok(());
    };
    tracing::info!(drv = %build.drv_path, "build started");
    let running = Running::start(ctx, slot);
    write_frame(send, &BuildEvent::Started).await?;
    let (log_tx, mut log_rx) = mpsc::channel::<Vec<u8>>(LOG_QUEUE);
    // Dropping `cancel` (a cancel seen below, an error, or this future being
    // dropped with its connection) stops the build task, which kills the
    // build and then frees the slot.
    let (cancel, cancelled) = oneshot::channel::<()>();
    // Not aborted if this future is dropped: told by `cancel`, it stops
    // the build by itself.
    let mut task = tokio::spawn(
        run(ctx.clone(), build.clone(), log_tx, cancelled, running)
            .instrument(tracing::Span::current()),
    );
    let stopped = send.stopped();
    tokio::pin!(stopped);
    let mut recv_open = true;
    let mut scratch = [0u8; 64];
    let outcome = loop {
        tokio::select! {
            // Biased towards forwarding the log before the outcome.
            biased;
            Some(line) = log_rx.recv() => send_log(send, &line).await?,
            joined = &mut task => break joined,
            _ = &mut stopped => {
                tracing::info!("build cancelled by the master");
                return cancelled_build(cancel, task).await;
            }
            read = recv.read(&mut scratch), if recv_open => match read {
                // The master finished its side: normal.
                Ok(None) => recv_open = false,
                Ok(Some(_)) => {
                    drop(cancel);
                    return Err(OpError::Violation("data after the Build request".into()));
                }
                Err(_) => {
                    tracing::info!("build cancelled by the master (stream reset)");
                    return cancelled_build(cancel, task).await;
                }
            },
        }
    };
    drop(cancel);
    // Lines that arrived with the result.
    while let Ok(line) = log_rx.try_recv() {
        send_log(send, &line).await?;
    }
    let outcome = outcome.unwrap_or_else(|e| BuildOutcome::Transient {
        msg: format!("the build task failed: {e}"),
    });
    tracing::info!(drv = %build.drv_path, outcome = outcome_name(&outcome), "build ended");
    write_frame(send, &BuildEvent::Outcome(outcome)).await?;
    Ok(())
}

/// The master cancelled: stop the build task and wait until the build is
/// stopped (bounded by the daemon's stop grace), so that its slot is free
/// when the master hears back.
async fn cancelled_build(
    cancel: oneshot::Sender<()>,
    task: JoinHandle<BuildOutcome>,
) -> Result<(), OpError> {
    drop(cancel);
    let _ = task.await;
    Ok(())
}

fn outcome_name(outcome: &BuildOutcome) -> &'static str {
    match outcome {
        BuildOutcome::Built { .. } => "built",
        BuildOutcome::BuilderFailed { .. } => "builder failed",
        BuildOutcome::TimedOut { .. } => "timed out",
        BuildOutcome::Transient { .. } => "transient failure",
    }
}

/// A running build: holds its slot and counts it in `running_builds` until
/// dropped, whichever way the build ends.
struct Running {
    ctx: Ctx,
    _slot: OwnedSemaphorePermit,
    succeeded: bool,
}

impl Running {
    fn start(ctx: &Ctx, slot: OwnedSemaphorePermit) -> Self {
        ctx.shared.stats.build_started();
        Self {
            ctx: ctx.clone(),
            _slot: slot,
            succeeded: false,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.ctx.shared.stats.build_ended(self.succeeded);
    }
}

/// Runs the build on its own daemon connection, as a task of its own so
/// that a cancel, however it comes (the stream stopped or reset, the
/// connection closed, the stream task aborted), still ends with the build
/// stopped, its builder killed and its slot freed.
async fn run(
    ctx: Ctx,
    build: Build,
    log_tx: mpsc::Sender<Vec<u8>>,
    mut cancelled: oneshot::Receiver<()>,
    mut running: Running,
) -> BuildOutcome {
    let transient = |msg: String| BuildOutcome::Transient { msg };
    let mut conn = match ctx.shared.daemon.connect_build().await {
        Ok(conn) => conn,
        Err(e) => return transient(format!("cannot reach the local Nix daemon: {e}")),
    };
    let settings = build.settings;
    let options = ClientSettings {
        max_silent_time: settings.max_silent_secs,
        build_cores: u64::from(settings.build_cores),
        // sandbox, build-users-group, substituters: the slave's nix.conf.
        ..ClientSettings::default()
    };
    if let Err(e) = conn.client.set_options(&options).await {
        conn.stop(true).await;
        return transient(format!("the local Nix daemon refused the settings: {e}"));
    }
    let last_output = Arc::new(Mutex::new(Instant::now()));
    conn.client
        .on_log(log_forwarder(log_tx, Arc::clone(&last_output)));

    let started = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    let ended = {
        let building = conn
            .client
            .build_derivation(&build.drv_path, &build.drv, BuildMode::Normal);
        tokio::pin!(building);
        loop {
            tokio::select! {
                result = &mut building => break Ended::Finished(result),
                _ = tick.tick() => {
                    let limits = (settings.timeout_secs, settings.max_silent_secs);
                    let last = *last_output.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(msg) = timed_out(limits, started, last) {
                        break Ended::TimedOut(msg);
                    }
                }
                _ = &mut cancelled => break Ended::Cancelled,
            }
        }
    };
    let outcome = match ended {
        Ended::Cancelled => {
            conn.stop(true).await;
            tracing::info!("cancelled build stopped");
            return transient("cancelled".to_owned());
        }
        Ended::TimedOut(msg) => {
            tracing::info!("{msg}");
            conn.stop(true).await;
            return BuildOutcome::TimedOut { msg };
        }
        Ended::Finished(Ok(result)) => outcome_of(&ctx, &build, &mut conn.client, result).await,
        Ended::Finished(Err(e)) => transient(format!("the local Nix daemon: {e}")),
    };
    conn.stop(false).await;
    running.succeeded = matches!(outcome, BuildOutcome::Built { .. });
    outcome
}

/// How the wait for a build ended.
enum Ended {
    Finished(Result<BuildResult, nixq_common::daemon::DaemonError>),
    TimedOut(String),
    Cancelled,
}

/// The message if `timeout` or `max-silent-time` (seconds, 0 = none) ran out.
fn timed_out(
    (timeout_secs, max_silent_secs): (u64, u64),
    started: Instant,
    last_output: Instant,
) -> Option<String> {
    if timeout_secs > 0 && started.elapsed() >= Duration::from_secs(timeout_secs) {
        return Some(format!("build timed out after {timeout_secs} seconds"));
    }
    if max_silent_secs > 0 && last_output.elapsed() >= Duration::from_secs(max_silent_secs) {
        return Some(format!(
            "build timed out after {max_silent_secs} seconds of silence"
        ));
    }
    None
}

/// A log callback that queues builder output and Nix's messages for the
/// stream, one line per chunk; lines beyond the queue are counted and the
/// count is reported with the next line that fits.
fn log_forwarder(
    tx: mpsc::Sender<Vec<u8>>,
    last_output: Arc<Mutex<Instant>>,
) -> impl FnMut(LogEvent) + Send + 'static {
    let mut dropped = 0u64;
    move |event| {
        let mut line = match &event {
            LogEvent::Result(result) => match result.build_log_line() {
                Some(line) => line.to_vec(),
                None => return,
            },
            LogEvent::Message(message) => message.clone(),
            LogEvent::StartActivity(_) | LogEvent::StopActivity { .. } => return,
        };
        if dropped > 0 {
            let mut note = format!("[nixq-agent: {dropped} log lines dropped]\n").into_bytes();
            note.append(&mut line);
            line = note;
        }
        line.push(b'\n');
        *last_output.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        match tx.try_send(line) {
            Ok(()) => dropped = 0,
            Err(_) => dropped += 1,
        }
    }
}

/// Sends `line` as one or more Log frames of at most `MAX_LOG_CHUNK` bytes.
async fn send_log(send: &mut quinn::SendStream, line: &[u8]) -> Result<(), OpError> {
    for chunk in line.chunks(MAX_LOG_CHUNK) {
        write_frame(send, &BuildEvent::Log(chunk.to_vec())).await?;
    }
    Ok(())
}

/// The outcome of a finished build; built outputs become temp roots of the
/// master's connection.
async fn outcome_of(
    ctx: &Ctx,
    build: &Build,
    client: &mut DaemonClient,
    result: BuildResult,
) -> BuildOutcome {
    let msg = || nixq_common::daemon::stderr::strip_ansi(&result.error_msg);
    match result.status {
        BuildStatus::Built
        | BuildStatus::Substituted
        | BuildStatus::AlreadyValid
        | BuildStatus::ResolvesToAlreadyValid => {}
        BuildStatus::TimedOut | BuildStatus::LogLimitExceeded => {
            return BuildOutcome::TimedOut { msg: msg() }
        }
        BuildStatus::PermanentFailure
        | BuildStatus::InputRejected
        | BuildStatus::OutputRejected
        | BuildStatus::CachedFailure
        | BuildStatus::DependencyFailed
        | BuildStatus::NotDeterministic => return BuildOutcome::BuilderFailed { msg: msg() },
        BuildStatus::TransientFailure | BuildStatus::MiscFailure | BuildStatus::NoSubstituters => {
            return BuildOutcome::Transient { msg: msg() }
        }
    }
    // Output paths: what the daemon reports (≥ 1.28), else the derivation's.
    let mut outputs: Vec<(String, StorePath)> = Vec::new();
    for (name, output) in &build.drv.outputs {
        let path = result
            .built_outputs
            .get(name)
            .cloned()
            .or_else(|| output.path.clone());
        match path {
            Some(path) => outputs.push((name.clone(), path)),
            None => {
                return BuildOutcome::Transient {
                    msg: format!("the daemon did not say where output '{name}' is"),
                }
            }
        }
    }
    let paths: Vec<StorePath> = outputs.iter().map(|(_, p)| p.clone()).collect();
    let store = &ctx.conn.store;
    if let Err(e) = store.root(&paths).await {
        return BuildOutcome::Transient {
            msg: format!("cannot keep the outputs alive: {e}"),
        };
    }
    let infos = match client.query_path_infos(&paths).await {
        Ok(infos) => infos,
        Err(e) => {
            return BuildOutcome::Transient {
                msg: format!("cannot query the outputs: {e}"),
            }
        }
    };
    let mut map: BTreeMap<String, PathInfo> = BTreeMap::new();
    for ((name, path), info) in outputs.into_iter().zip(infos) {
        let Some(info) = info else {
            return BuildOutcome::Transient {
                msg: format!("output {path} is not valid after the build"),
            };
        };
        store.mark_valid(&path);
        map.insert(name, info);
    }
    BuildOutcome::Built { outputs: map }
}
