//! The QUIC server: endpoints, the accept loop, one task per connection
//! (span `connection{peer, cn}`), one task per stream (span `op{kind}`),
//! the limits, and shutdown.
//!
//! ```text
//! accept loop ─▶ connection task ─▶ stream task: read Request ─▶ ops::<kind>::serve
//!   (max_connections)   (allowed_masters, Hello first, claim lease)
//! ```
//!
//! Shutdown (SIGTERM/SIGINT): stop accepting, refuse new requests with
//! `ShuttingDown`, abort uploads (their partial paths are removed), give
//! running builds [`BUILD_GRACE`], close every connection with
//! [`ErrorCode::ShuttingDown`], then wait up to [`IMPORT_DRAIN`] until the
//! aborted uploads have cleaned up (`Importer::idle`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nixq_common::proto::{
    read_frame, write_frame, AgentStatus, BuildEvent, DownloadReply, ErrorCode, HelloReply,
    Message, PathInfosReply, QueryMissingReply, Refusal, Request, StatusReply, UploadReply,
    WaitReply,
};
use nixq_common::store::RegistrationBatcher;
use nixq_common::store_path::{StoreDir, StorePath};
use nixq_common::transfer::receive::Importer;
use nixq_common::{net, tls};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, IdleTimeout, VarInt};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::claims::{Claim, ClaimTable};
use crate::config::AgentConfig;
use crate::load;
use crate::local_nix::Platform;
use crate::ops;
use crate::stats::{bump, Stats};
use crate::store::{ConnStore, Daemon};

/// How long running builds may go on after a shutdown signal before they
/// are killed: long enough for a build that is about to finish, short
/// enough for systemd's 30 s stop timeout.
pub const BUILD_GRACE: Duration = Duration::from_secs(10);

/// How long shutdown waits for cancelled builds to stop (their builders
/// killed): a little more than a build daemon's stop grace.
const BUILD_STOP: Duration = Duration::from_secs(6);

/// How long shutdown waits, after cancelling the uploads, for their
/// clean-up (partial paths removed, queued registrations finished, lock
/// files deleted), which runs on blocking threads and in drops that an
/// exiting process would cut short. Removing a large tree takes well under
/// a second; the bound only matters if the file system hangs.
pub const IMPORT_DRAIN: Duration = Duration::from_secs(10);

/// A claimed path whose upload has not started within this time is given up,
/// so a master that asked and vanished (or changed its mind) does not block
/// other senders for long. A master uploads right after QueryMissing, so a
/// minute is generous.
pub const CLAIM_LEASE: Duration = Duration::from_secs(60);

/// How long a master may take to send a stream's request frame.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the TLS handshake of a new connection may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Agent-wide state, shared by every connection.
#[derive(Debug)]
pub struct Shared {
    pub config: AgentConfig,
    pub store_dir: StoreDir,
    pub platform: Platform,
    pub max_builds: u32,
    pub daemon: Arc<Daemon>,
    pub importer: Importer,
    pub claims: ClaimTable<StorePath>,
    pub stats: Stats,
    pub builds: Arc<Semaphore>,
    started: Instant,
    shutdown: watch::Receiver<bool>,
    next_conn: AtomicU64,
}

impl Shared {
    pub fn new(
        config: AgentConfig,
        store_dir: StoreDir,
        platform: Platform,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let max_builds = config
            .max_builds
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
        let max_builds = u32::try_from(max_builds).unwrap_or(u32::MAX);
        let daemon = Arc::new(Daemon::new(&config.store, store_dir.clone()));
        let batcher = RegistrationBatcher::spawn(config.store.nix_store.clone());
        Self {
            importer: Importer::new(store_dir.clone(), batcher),
            store_dir,
            platform,
            max_builds,
            daemon,
            claims: ClaimTable::new(),
            stats: Stats::default(),
            builds: Arc::new(Semaphore::new(max_builds as usize)),
            started: Instant::now(),
            shutdown,
            next_conn: AtomicU64::new(1),
            config,
        }
    }

    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            max_jobs: self.max_builds,
            running_builds: self.stats.running_builds(),
            load_average: load::load_average(),
            free_store_bytes: self.free_bytes(),
            free_space_floor: self.config.min_free_space,
            uptime_secs: self.started.elapsed().as_secs(),
            counters: self.stats.snapshot(),
        }
    }

    /// Free bytes in the store's file system (0 if it cannot be read, which
    /// then refuses uploads: better than filling a disk we cannot see).
    pub fn free_bytes(&self) -> u64 {
        load::free_bytes(std::path::Path::new(self.store_dir.as_str())).unwrap_or(0)
    }

    /// `Some((free, floor))` when the store is below its free-space floor.
    pub fn below_floor(&self) -> Option<(u64, u64)> {
        let floor = self.config.min_free_space;
        let free = self.free_bytes();
        (free < floor).then_some((free, floor))
    }

    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves when shutdown begins.
    pub async fn shutdown_signal(&self) {
        let mut rx = self.shutdown.clone();
        // An error means the sender is gone: the agent is going away too.
        let _ = rx.wait_for(|down| *down).await;
    }
}

/// A claim this connection holds and has not started uploading.
#[derive(Debug)]
struct Held {
    claim: Claim<StorePath>,
    since: Instant,
}

/// The state of one master connection.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub quic: quinn::Connection,
    pub store: ConnStore,
    claims: Mutex<HashMap<StorePath, Held>>,
    welcomed: AtomicBool,
}

impl Conn {
    fn claims(&self) -> MutexGuard<'_, HashMap<StorePath, Held>> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `claim` until this connection uploads the path, or the lease
    /// runs out, or the connection closes.
    pub fn hold(&self, claim: Claim<StorePath>) {
        let path = claim.key().clone();
        self.claims().insert(
            path,
            Held {
                claim,
                since: Instant::now(),
            },
        );
    }

    /// Whether this connection holds a claim on `path` it has not started
    /// uploading.
    pub fn holds(&self, path: &StorePath) -> bool {
        self.claims().contains_key(path)
    }

    /// Takes this connection's claim on `path` for an upload.
    pub fn take_claim(&self, path: &StorePath) -> Option<Claim<StorePath>> {
        self.claims().remove(path).map(|held| held.claim)
    }

    /// Gives up the claims older than `lease` (dropping abandons them).
    fn expire(&self, lease: Duration) -> usize {
        let mut claims = self.claims();
        let before = claims.len();
        claims.retain(|_, held| held.since.elapsed() < lease);
        before - claims.len()
    }

    pub fn is_welcomed(&self) -> bool {
        self.welcomed.load(Ordering::Acquire)
    }

    pub fn set_welcomed(&self) {
        self.welcomed.store(true, Ordering::Release);
    }
}

/// What an operation gets: the agent and its connection.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub conn: Arc<Conn>,
}

/// Runs the agent until `shutdown` turns true, then shuts down cleanly.
pub async fn run(shared: Arc<Shared>) -> anyhow::Result<()> {
    let config = &shared.config;
    let ca = tls::TrustedCa::load(&config.ca).context("loading the CA")?;
    let identity =
        tls::Identity::load(&config.cert, Some(&config.key)).context("loading the certificate")?;
    let server_tls = tls::server_config(&ca, identity).context("TLS configuration")?;
    let crypto = QuicServerConfig::try_from(server_tls)
        .map_err(|e| anyhow::anyhow!("TLS configuration unusable for QUIC: {e}"))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = net::transport_config();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(config.limits.max_streams_per_connection));
    if let Ok(idle) = IdleTimeout::try_from(config.limits.idle_timeout()) {
        transport.max_idle_timeout(Some(idle));
    }
    server_config.transport_config(Arc::new(transport));

    let mut endpoints = Vec::new();
    for addr in &config.listen {
        let endpoint = Endpoint::server(server_config.clone(), *addr)
            .with_context(|| format!("cannot listen on UDP {addr}"))?;
        let local = endpoint.local_addr().unwrap_or(*addr);
        tracing::info!(
            store = %shared.daemon.describe(),
            systems = ?shared.platform.systems,
            max_builds = shared.max_builds,
            "listening on {local}"
        );
        endpoints.push(endpoint);
    }

    let limit = Arc::new(Semaphore::new(config.limits.max_connections));
    let mut connections = JoinSet::new();
    let mut accepts = JoinSet::new();
    for endpoint in &endpoints {
        let endpoint = endpoint.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        accepts.spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                if tx.send(incoming).await.is_err() {
                    break;
                }
            }
        });
        connections.spawn(accept_loop(Arc::clone(&shared), rx, Arc::clone(&limit)));
    }

    shared.shutdown_signal().await;
    tracing::info!("shutting down: no new work; aborting uploads");
    accepts.abort_all();
    for endpoint in &endpoints {
        endpoint.set_server_config(None);
    }
    // Builds get a grace period; everything else stops now (the stream
    // tasks watch the shutdown signal themselves).
    let grace = tokio::time::timeout(BUILD_GRACE, async {
        while shared.stats.running_builds() > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if grace.is_err() {
        tracing::warn!("builds still running after {BUILD_GRACE:?}; stopping them");
    }
    for endpoint in &endpoints {
        endpoint.close(
            VarInt::from_u32(ErrorCode::ShuttingDown.code()),
            b"agent shutting down",
        );
    }
    connections.shutdown().await;
    // Builds cancelled by the close stop in their own tasks, which kill
    // the builders and then free their slots.
    let stopped = tokio::time::timeout(BUILD_STOP, async {
        while shared.stats.running_builds() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if stopped.is_err() {
        tracing::warn!(
            running = shared.stats.running_builds(),
            "builds not stopped after {BUILD_STOP:?}"
        );
    }
    drain_imports(&shared).await;
    for endpoint in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Waits (up to [`IMPORT_DRAIN`]) until every cancelled upload has cleaned
/// up and every queued registration has ended.
async fn drain_imports(shared: &Shared) {
    let importer = &shared.importer;
    let in_flight = importer.in_flight();
    if in_flight == 0 {
        return;
    }
    tracing::info!(in_flight, "waiting for interrupted imports to clean up");
    let started = Instant::now();
    match tokio::time::timeout(IMPORT_DRAIN, importer.idle()).await {
        Ok(()) => tracing::info!(elapsed = ?started.elapsed(), "imports cleaned up"),
        Err(_) => tracing::warn!(
            in_flight = importer.in_flight(),
            "imports still cleaning up after {IMPORT_DRAIN:?}; their paths may be left \
             behind (Nix removes invalid paths when it next locks them)"
        ),
    }
}

/// Accepts connections from one endpoint, up to the connection limit.
async fn accept_loop(
    shared: Arc<Shared>,
    mut incoming: tokio::sync::mpsc::Receiver<quinn::Incoming>,
    limit: Arc<Semaphore>,
) {
    let mut connections = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = incoming.recv() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            tracing::warn!(
                peer = %incoming.remote_address(),
                limit = shared.config.limits.max_connections,
                "connection refused: too many connections"
            );
            incoming.refuse();
            continue;
        };
        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            let peer = incoming.remote_address();
            match net::accept(incoming, HANDSHAKE_TIMEOUT).await {
                Ok(conn) => serve_connection(shared, conn, peer).await,
                Err(e) => tracing::info!(%peer, "handshake failed: {e}"),
            }
            drop(permit);
        });
    }
    // Dropping the set aborts the connection tasks (after the endpoints
    // have been closed by `run`).
    connections.shutdown().await;
}

/// Serves one master connection until it closes or the agent shuts down.
async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection, peer: SocketAddr) {
    let cn = match tls::peer_common_name(&conn) {
        Ok(cn) => cn,
        Err(e) => {
            tracing::warn!(%peer, "connection refused: {e}");
            conn.close(
                VarInt::from_u32(ErrorCode::Refused.code()),
                b"no common name",
            );
            return;
        }
    };
    if let Some(allowed) = &shared.config.allowed_masters {
        if !allowed.contains(&cn) {
            tracing::warn!(%peer, %cn, "connection refused: master '{cn}' is not in allowed_masters");
            conn.close(
                VarInt::from_u32(ErrorCode::Refused.code()),
                b"master not allowed",
            );
            return;
        }
    }
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("connection", %peer, %cn, id);
    async move {
        bump(&shared.stats.connections);
        tracing::info!("connected");
        let state = Arc::new(Conn {
            id,
            quic: conn.clone(),
            store: ConnStore::new(Arc::clone(&shared.daemon)),
            claims: Mutex::new(HashMap::new()),
            welcomed: AtomicBool::new(false),
        });
        let ctx = Ctx {
            shared: Arc::clone(&shared),
            conn: Arc::clone(&state),
        };
        let mut streams = JoinSet::new();
        let mut lease = tokio::time::interval(CLAIM_LEASE / 6);
        let reason = loop {
            tokio::select! {
                accepted = conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        let ctx = ctx.clone();
                        streams.spawn(serve_stream(ctx, send, recv).in_current_span());
                    }
                    Err(e) => break e.to_string(),
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
                _ = lease.tick() => {
                    let expired = state.expire(CLAIM_LEASE);
                    if expired > 0 {
                        tracing::info!(expired, "claims given up: no upload within {CLAIM_LEASE:?}");
                    }
                }
            }
        };
        // Streams die with the connection: aborting them drops uploads
        // half-way, which removes their partial paths.
        streams.shutdown().await;
        state.claims().clear();
        state.store.close().await;
        tracing::info!(%reason, "disconnected");
    }
    .instrument(span)
    .await;
}

/// Serves one stream: reads its request and hands it to its operation.
async fn serve_stream(ctx: Ctx, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let request =
        match tokio::time::timeout(REQUEST_TIMEOUT, read_frame::<Request, _>(&mut recv)).await {
            Ok(Ok(Some(request))) => request,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::info!("bad request frame: {e}");
                violation(&mut send, &mut recv);
                return;
            }
            Err(_) => {
                tracing::info!("no request within {REQUEST_TIMEOUT:?}");
                violation(&mut send, &mut recv);
                return;
            }
        };
    let span = tracing::info_span!("op", kind = request.kind(), stream = %send.id());
    async move {
        let is_hello = matches!(request, Request::Hello(_));
        if !is_hello && !ctx.conn.is_welcomed() {
            refuse(&mut send, &mut recv, &request, Refusal::HelloFirst).await;
            return;
        }
        if ctx.shared.shutting_down() {
            refuse(&mut send, &mut recv, &request, Refusal::ShuttingDown).await;
            return;
        }
        let kind = request.kind();
        let result = tokio::select! {
            result = ops::serve(&ctx, request, &mut send, recv) => result,
            () = ctx.shared.shutdown_signal(), if kind != "build" => {
                tracing::info!("aborted by shutdown");
                let _ = send.reset(VarInt::from_u32(ErrorCode::ShuttingDown.code()));
                return;
            }
        };
        match result {
            Ok(()) => {
                let _ = send.finish();
            }
            Err(e) => {
                tracing::info!("{e}");
                let _ = send.reset(VarInt::from_u32(e.code().code()));
            }
        }
    }
    .instrument(span)
    .await;
}

fn violation(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream) {
    let code = VarInt::from_u32(ErrorCode::ProtocolViolation.code());
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// Sends `reply` (a `Refused` variant) as the first and only frame, then
/// finishes the stream; the caller drops its receiving side, which stops
/// the master's.
pub async fn refuse_reply<M: Message>(send: &mut quinn::SendStream, reply: &M) {
    tracing::info!("refused");
    if let Err(e) = write_frame(send, reply).await {
        tracing::debug!("cannot send the refusal: {e}");
    }
    let _ = send.finish();
}

/// Sends `refusal` as the first and only frame of the reply type of
/// `request`, finishes the stream and stops reading.
pub async fn refuse(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    request: &Request,
    refusal: Refusal,
) {
    tracing::info!(?refusal, "refused");
    let written = match request {
        Request::Hello(_) => write_frame(send, &HelloReply::Refused(refusal)).await,
        Request::Status => write_frame(send, &StatusReply::Refused(refusal)).await,
        Request::QueryMissing(_) => write_frame(send, &QueryMissingReply::Refused(refusal)).await,
        Request::QueryPathInfos(_) => write_frame(send, &PathInfosReply::Refused(refusal)).await,
        Request::WaitFor(_) => write_frame(send, &WaitReply::Refused(refusal)).await,
        Request::Upload(_) => write_frame(send, &UploadReply::Refused(refusal)).await,
        Request::Download(_) => write_frame(send, &DownloadReply::Refused(refusal)).await,
        Request::Build(_) => write_frame(send, &BuildEvent::Refused(refusal)).await,
    };
    if let Err(e) = written {
        tracing::debug!("cannot send the refusal: {e}");
    }
    let _ = send.finish();
    let _ = recv.stop(VarInt::from_u32(ErrorCode::Refused.code()));
}
