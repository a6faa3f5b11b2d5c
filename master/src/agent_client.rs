//! A typed client of one agent over one QUIC connection: the master's side
//! of every stream of [`nixq_common::proto`], one method per stream.
//!
//! Thin glue: each method opens a stream, writes the request and whatever
//! the stream table says the master sends, reads the replies, and turns
//! refusals and protocol breaches into [`ClientError`]s. The connection is
//! shared (`&self`), so streams run in parallel: several uploads, a wait and
//! a query at once.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nixq_common::machines::{AgentCa, Host, MachineUri};
use nixq_common::net::{self, ConnectError, EndpointError};
use nixq_common::path_info::{topo_sort, PathInfo};
use nixq_common::proto::frame::Message;
use nixq_common::proto::{
    self, BuildEvent, Compression, Download, DownloadReply, ErrorCode, HelloReply, PathBatch,
    PathInfosReply, PathState, ProtoError, QueryMissing, QueryMissingReply, QueryPathInfos,
    Refusal, Request, StatusReply, Upload, UploadItem, UploadOutcome, UploadReply, WaitFor,
    WaitOutcome, WaitReply, Welcome, MAX_BATCH_PATHS,
};
use nixq_common::store_path::StorePath;
use nixq_common::tls::{self, Identity, TlsError, TrustedCa};
use nixq_common::transfer::send::{send_body, SendError, SendOptions, SendProgress};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};

/// How long [`AgentClient::close`] waits for its CONNECTION_CLOSE to be
/// sent: a few polls of the connection driver. Waiting for the endpoint to
/// go idle instead means waiting out QUIC's draining period (three probe
/// timeouts, 85 ms on a LAN), which once cost every hook process in a chain
/// of builds more than half of its run time; it only buys a second chance
/// for a lost close packet, and a lost one costs the agent no more than its
/// idle timeout before it drops the connection's claims and roots.
const CLOSE_SEND: Duration = Duration::from_millis(5);

/// The name of the Upload operation in errors.
const UPLOAD: &str = "upload";

/// An Upload stream opened and announced, its body not sent yet
/// ([`AgentClient::open_upload`]).
#[derive(Debug)]
pub struct UploadStream {
    send: SendStream,
    recv: RecvStream,
}

/// Where an agent is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTarget {
    pub uri: MachineUri,
    /// The master's certificate and key (one PEM file, or the key beside
    /// it; see [`Identity::load`]).
    pub identity: PathBuf,
    /// The CA that signed the agent's certificate.
    pub ca: AgentCa,
    /// Deadline for connecting (handshake included).
    pub connect_timeout: Duration,
}

/// Why talking to an agent failed. [`Self::is_unreachable`] and
/// [`Self::is_tls_refusal`] classify it for exit codes and machine choice.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot load TLS material: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot create the QUIC endpoint: {0}")]
    Endpoint(#[from] EndpointError),
    #[error("cannot connect to {uri}: {source}")]
    Connect {
        uri: String,
        #[source]
        source: ConnectError,
    },
    #[error("{uri} speaks nixq protocol versions {theirs_min}..={theirs_max}, we speak {ours_min}..={ours_max}")]
    VersionMismatch {
        uri: String,
        theirs_min: u32,
        theirs_max: u32,
        ours_min: u32,
        ours_max: u32,
    },
    #[error("{uri} refused {op}: {}", refusal_text(.refusal))]
    Refused {
        uri: String,
        op: &'static str,
        refusal: Refusal,
    },
    #[error("lost the connection to {uri} during {op}: {source}")]
    ConnectionLost {
        uri: String,
        op: &'static str,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("{op} stream to {uri} failed: {reason}")]
    Stream {
        uri: String,
        op: &'static str,
        reason: String,
    },
    #[error("{uri} broke the protocol during {op}: {reason}")]
    Protocol {
        uri: String,
        op: &'static str,
        reason: String,
    },
    /// Sending a body failed on our side (corrupt local store, unreadable
    /// path).
    #[error("{0}")]
    Send(#[source] SendError),
}

fn refusal_text(refusal: &Refusal) -> String {
    match refusal {
        Refusal::HelloFirst => "no Hello yet (a bug in this master)".into(),
        Refusal::Busy { limit } => format!("busy (limit {limit})"),
        Refusal::NoSpace {
            free_bytes,
            floor_bytes,
        } => format!(
            "not enough free space in its store ({free_bytes} bytes free, floor {floor_bytes})"
        ),
        Refusal::ShuttingDown => "it is shutting down".into(),
        Refusal::Invalid { reason } => format!("invalid request: {reason}"),
    }
}

impl ClientError {
    /// The agent cannot be reached, or went away: try another machine or
    /// later.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Connect { source, .. } => source.is_unreachable(),
            Self::ConnectionLost { .. } => true,
            _ => false,
        }
    }

    /// One side refused the other's certificate.
    pub fn is_tls_refusal(&self) -> bool {
        matches!(self, Self::Connect { source, .. } if source.is_tls_refusal())
    }
}

/// What became of the items of one Upload stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadResult {
    /// One outcome per item, in item order, for a prefix of the items:
    /// items past it were not stored (the upload ended early).
    pub outcomes: Vec<UploadOutcome>,
    /// If the stream broke before every item had an outcome: why.
    pub interrupted: Option<String>,
}

/// Events of a Build stream; see [`AgentClient::build`].
#[derive(Debug)]
pub struct BuildStream {
    uri: String,
    send: SendStream,
    recv: RecvStream,
}

impl BuildStream {
    /// The next event; `Ok(None)` after the agent finished the stream (the
    /// `Outcome` has then been returned). A `Refused` event is returned as
    /// [`ClientError::Refused`].
    pub async fn next_event(&mut self) -> Result<Option<BuildEvent>, ClientError> {
        match read::<BuildEvent>(&mut self.recv, &self.uri, "build").await? {
            Some(BuildEvent::Refused(refusal)) => Err(ClientError::Refused {
                uri: self.uri.clone(),
                op: "build",
                refusal,
            }),
            other => Ok(other),
        }
    }

    /// Cancel the build: the agent stops it (stream reset, proto doc).
    pub fn cancel(mut self) {
        let code = VarInt::from_u32(ErrorCode::Cancelled.code());
        // Either may fail only if the stream is already gone; nothing to do.
        let _ = self.send.reset(code);
        let _ = self.recv.stop(code);
    }
}

/// A connection to one agent, after a successful Hello.
#[derive(Debug)]
pub struct AgentClient {
    uri: String,
    endpoint: Endpoint,
    conn: Connection,
    welcome: Welcome,
}

impl AgentClient {
    /// Connects (mutual TLS, handshake confirmed) and says Hello. `client`
    /// names this program for the agent's logs.
    pub async fn connect(target: &AgentTarget, client: &str) -> Result<Self, ClientError> {
        let ca = match &target.ca {
            AgentCa::File(path) => TrustedCa::load(path)?,
            AgentCa::Pem(pem) => {
                TrustedCa::from_pem(pem.as_bytes(), &format!("the CA column of {}", target.uri))?
            }
        };
        let identity = Identity::load(&target.identity, None)?;
        let tls = tls::client_config(&ca, identity)?;
        Self::connect_with(target, tls, client).await
    }

    /// [`Self::connect`] with a ready TLS configuration (tests, or a caller
    /// connecting to many agents with one identity).
    pub async fn connect_with(
        target: &AgentTarget,
        tls: Arc<rustls::ClientConfig>,
        client: &str,
    ) -> Result<Self, ClientError> {
        let uri = target.uri.text.clone();
        let endpoint = client_endpoint(&target.uri.host, tls)?;
        let server_name = target.uri.server_name();
        let connected = match &target.uri.host {
            Host::Ip(ip) => {
                let addr = SocketAddr::new(*ip, target.uri.port);
                net::connect(&endpoint, addr, &server_name, target.connect_timeout).await
            }
            Host::Name(name) => {
                net::connect_host(
                    &endpoint,
                    name,
                    target.uri.port,
                    &server_name,
                    target.connect_timeout,
                )
                .await
            }
        };
        let conn = connected.map_err(|source| ClientError::Connect {
            uri: uri.clone(),
            source,
        })?;
        let welcome = hello(&conn, &uri, client).await?;
        Ok(Self {
            uri,
            endpoint,
            conn,
            welcome,
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The agent's description of itself, from the Hello.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The current round-trip estimate of the connection.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// The Status stream.
    pub async fn status(&self) -> Result<proto::AgentStatus, ClientError> {
        const OP: &str = "status";
        let (mut send, mut recv) = self.open(OP, &Request::Status).await?;
        self.finish(&mut send, OP)?;
        match self.expect::<StatusReply>(&mut recv, OP).await? {
            StatusReply::Status(status) => Ok(status),
            StatusReply::Refused(refusal) => Err(self.refused(OP, refusal)),
        }
    }

    /// The QueryMissing stream: the state of each of `paths` on the agent,
    /// in order; with `claim`, every `Missing` path is now claimed by this
    /// connection. All batches go out at once, so a whole closure costs one
    /// round trip.
    pub async fn query_missing(
        &self,
        paths: &[StorePath],
        claim: bool,
    ) -> Result<Vec<PathState>, ClientError> {
        const OP: &str = "query-missing";
        let request = Request::QueryMissing(QueryMissing { claim });
        let (mut send, mut recv) = self.open(OP, &request).await?;
        let write = async {
            for batch in PathBatch::split(paths) {
                self.write(&mut send, &batch, OP).await?;
            }
            self.finish(&mut send, OP)
        };
        let read = async {
            let mut states = Vec::with_capacity(paths.len());
            for chunk in chunks_or_empty(paths) {
                match self.expect::<QueryMissingReply>(&mut recv, OP).await? {
                    QueryMissingReply::States(got) if got.len() == chunk.len() => {
                        states.extend(got);
                    }
                    QueryMissingReply::States(got) => {
                        return Err(self.violation(
                            OP,
                            format!("{} states for a batch of {} paths", got.len(), chunk.len()),
                        ))
                    }
                    QueryMissingReply::Refused(refusal) => return Err(self.refused(OP, refusal)),
                }
            }
            Ok(states)
        };
        let ((), states) = tokio::try_join!(write, read)?;
        Ok(states)
    }

    /// The QueryPathInfos stream: the infos of `paths` (their closure, with
    /// `closure`) in dependency order, and which of `paths` are not valid
    /// on the agent. More than [`MAX_BATCH_PATHS`] paths take several
    /// streams, one after the other; the answers are merged.
    pub async fn query_path_infos(
        &self,
        paths: &[StorePath],
        closure: bool,
    ) -> Result<(Vec<PathInfo>, Vec<StorePath>), ClientError> {
        let mut infos = std::collections::BTreeMap::new();
        let mut not_valid = Vec::new();
        for chunk in paths.chunks(MAX_BATCH_PATHS) {
            let (got, missing) = self.query_path_infos_once(chunk.to_vec(), closure).await?;
            for info in got {
                infos.insert(info.path.clone(), info);
            }
            not_valid.extend(missing);
        }
        let ordered = topo_sort(infos.into_values())
            .map_err(|e| self.violation("query-path-infos", e.to_string()))?;
        Ok((ordered, not_valid))
    }

    async fn query_path_infos_once(
        &self,
        paths: Vec<StorePath>,
        closure: bool,
    ) -> Result<(Vec<PathInfo>, Vec<StorePath>), ClientError> {
        const OP: &str = "query-path-infos";
        let request = Request::QueryPathInfos(QueryPathInfos { paths, closure });
        let (mut send, mut recv) = self.open(OP, &request).await?;
        self.finish(&mut send, OP)?;
        let mut infos = Vec::new();
        let mut not_valid = Vec::new();
        loop {
            match self.expect::<PathInfosReply>(&mut recv, OP).await? {
                PathInfosReply::Infos(got) => infos.extend(got),
                PathInfosReply::NotValid(got) => not_valid.extend(got),
                PathInfosReply::Done => return Ok((infos, not_valid)),
                PathInfosReply::Refused(refusal) => return Err(self.refused(OP, refusal)),
            }
        }
    }

    /// The WaitFor stream: waits until each of `paths` (answered `InFlight`)
    /// settles; `on_settled` hears each as it does, so a `SendIt` can be
    /// acted on at once. More than [`MAX_BATCH_PATHS`] paths take several
    /// streams, waited on together.
    pub async fn wait_for(
        &self,
        paths: &[StorePath],
        on_settled: &mut (dyn FnMut(&StorePath, WaitOutcome) + Send),
    ) -> Result<(), ClientError> {
        const OP: &str = "wait-for";
        let mut streams = Vec::new();
        for chunk in paths.chunks(MAX_BATCH_PATHS) {
            let request = Request::WaitFor(WaitFor {
                paths: chunk.to_vec(),
            });
            let (mut send, recv) = self.open(OP, &request).await?;
            self.finish(&mut send, OP)?;
            streams.push((chunk, recv));
        }
        for (chunk, mut recv) in streams {
            let mut settled = vec![false; chunk.len()];
            loop {
                match self.expect::<WaitReply>(&mut recv, OP).await? {
                    WaitReply::Settled { index, outcome } => {
                        let i = index as usize;
                        match settled.get_mut(i) {
                            Some(seen @ false) => *seen = true,
                            _ => {
                                return Err(self.violation(
                                    OP,
                                    format!("index {index} out of range or settled twice"),
                                ))
                            }
                        }
                        on_settled(&chunk[i], outcome);
                    }
                    WaitReply::Done if settled.iter().all(|s| *s) => break,
                    WaitReply::Done => {
                        return Err(self.violation(OP, "Done before every path settled".into()))
                    }
                    WaitReply::Refused(refusal) => return Err(self.refused(OP, refusal)),
                }
            }
        }
        Ok(())
    }

    /// The Upload stream: sends `items` (path infos in dependency order;
    /// the agent waits for references that other streams are still
    /// uploading) with their NARs from the local store, and returns what
    /// became of each. `progress` hears NAR bytes as they go out.
    ///
    /// A failed item ends the upload (its outcome is the last one); a
    /// broken stream is [`UploadResult::interrupted`], not an error, so the
    /// caller can retry what has no outcome. Errors are the connection's,
    /// a refusal, or our own store's corruption.
    pub async fn upload(
        &self,
        items: Vec<PathInfo>,
        options: &SendOptions,
        progress: impl FnMut(SendProgress) + Send + 'static,
    ) -> Result<UploadResult, ClientError> {
        let stream = self.open_upload(options).await?;
        self.upload_on(stream, items, options, progress).await
    }

    /// Opens an Upload stream, for [`AgentClient::upload_on`]. Streams are
    /// numbered in the order they are opened and the agent takes them in
    /// that order: a caller with several batches opens their streams in
    /// dependency order, so that a batch whose references are in an
    /// earlier one never holds the last stream the agent allows while the
    /// earlier one waits for a stream.
    pub async fn open_upload(&self, options: &SendOptions) -> Result<UploadStream, ClientError> {
        let request = Request::Upload(Upload {
            compression: options.compression,
        });
        let (send, recv) = self.open(UPLOAD, &request).await?;
        Ok(UploadStream { send, recv })
    }

    /// [`AgentClient::upload`] on a stream opened with
    /// [`AgentClient::open_upload`] (with the same `options`).
    pub async fn upload_on(
        &self,
        stream: UploadStream,
        items: Vec<PathInfo>,
        options: &SendOptions,
        progress: impl FnMut(SendProgress) + Send + 'static,
    ) -> Result<UploadResult, ClientError> {
        let count = items.len();
        let UploadStream { mut send, mut recv } = stream;
        let read = self.upload_replies(&mut recv, count);
        let write = async {
            let result = send_body(
                &mut send,
                items.into_iter().map(UploadItem::Path),
                options,
                progress,
            )
            .await;
            match result {
                Ok(_) => send.finish().map_err(|e| SendError::Write(e.into())),
                Err(e) => {
                    let _ = send.reset(VarInt::from_u32(ErrorCode::Internal.code()));
                    Err(e)
                }
            }
        };
        tokio::pin!(read);
        tokio::pin!(write);
        // The agent may end the upload early (a failed item) and stop
        // reading: then the body is abandoned.
        let (sent, replies) = tokio::select! {
            replies = &mut read => {
                let ended_early = match &replies {
                    Ok((outcomes, _)) => outcomes.len() < count,
                    Err(_) => true,
                };
                if ended_early {
                    (None, replies)
                } else {
                    (Some((&mut write).await), replies)
                }
            }
            sent = &mut write => (Some(sent), (&mut read).await),
        };
        match sent {
            Some(Err(e)) if e.is_local_corruption() => return Err(ClientError::Send(e)),
            Some(Err(e @ SendError::Dump { .. })) => return Err(ClientError::Send(e)),
            _ => {}
        }
        let (outcomes, interrupted) = replies?;
        let interrupted = match (interrupted, sent) {
            (Some(reason), _) => Some(reason),
            (None, Some(Err(e))) if outcomes.len() < count => Some(e.to_string()),
            (None, _) => None,
        };
        Ok(UploadResult {
            outcomes,
            interrupted,
        })
    }

    /// Reads an Upload stream's replies: the outcomes in order, and why the
    /// stream broke if it did before `Done`.
    async fn upload_replies(
        &self,
        recv: &mut RecvStream,
        count: usize,
    ) -> Result<(Vec<UploadOutcome>, Option<String>), ClientError> {
        const OP: &str = UPLOAD;
        let mut outcomes = Vec::with_capacity(count);
        loop {
            let reply = match read::<UploadReply>(recv, &self.uri, OP).await {
                Ok(Some(reply)) => reply,
                Ok(None) => return Ok((outcomes, Some("the agent ended the stream".into()))),
                Err(e @ ClientError::ConnectionLost { .. }) => return Err(e),
                Err(e @ ClientError::Stream { .. }) => return Ok((outcomes, Some(e.to_string()))),
                Err(e) => return Err(e),
            };
            match reply {
                UploadReply::Result { index, outcome } => {
                    if index as usize != outcomes.len() || outcomes.len() >= count {
                        return Err(self.violation(
                            OP,
                            format!("result for item {index}, expected {}", outcomes.len()),
                        ));
                    }
                    let continues = outcome.continues();
                    outcomes.push(outcome);
                    if !continues {
                        // The agent sends Done next and reads no more.
                        let _ = self.expect::<UploadReply>(recv, OP).await;
                        return Ok((outcomes, None));
                    }
                }
                UploadReply::Done => {
                    let interrupted = (outcomes.len() < count).then(|| {
                        format!(
                            "the agent ended the upload after {} of {count} items",
                            outcomes.len()
                        )
                    });
                    return Ok((outcomes, interrupted));
                }
                UploadReply::Refused(refusal) => return Err(self.refused(OP, refusal)),
            }
        }
    }

    /// Opens a Download stream for `paths` (at most [`MAX_BATCH_PATHS`])
    /// and returns its receiving side positioned at the start of the body,
    /// once the agent said `Sending`. The body ([`proto::DownloadItem`]s and
    /// NARs, compressed as asked) is for the receive half of the transfer
    /// engine.
    pub async fn download(
        &self,
        paths: Vec<StorePath>,
        compression: Compression,
    ) -> Result<RecvStream, ClientError> {
        const OP: &str = "download";
        let request = Request::Download(Download { paths, compression });
        let (mut send, mut recv) = self.open(OP, &request).await?;
        self.finish(&mut send, OP)?;
        match self.expect::<DownloadReply>(&mut recv, OP).await? {
            DownloadReply::Sending => Ok(recv),
            DownloadReply::Refused(refusal) => Err(self.refused(OP, refusal)),
        }
    }

    /// Opens a Build stream; read its events with
    /// [`BuildStream::next_event`] until `Outcome`, or cancel it with
    /// [`BuildStream::cancel`].
    pub async fn build(&self, build: proto::Build) -> Result<BuildStream, ClientError> {
        const OP: &str = "build";
        let (mut send, recv) = self.open(OP, &Request::Build(Box::new(build))).await?;
        self.finish(&mut send, OP)?;
        Ok(BuildStream {
            uri: self.uri.clone(),
            send,
            recv,
        })
    }

    /// Closes the connection (the agent drops its claims and GC roots for
    /// it) and waits a moment for the close to be sent ([`CLOSE_SEND`]).
    pub async fn close(self) {
        self.conn
            .close(VarInt::from_u32(ErrorCode::Done.code()), b"done");
        let _ = tokio::time::timeout(CLOSE_SEND, self.endpoint.wait_idle()).await;
    }

    /// Closes the connection at once from a shared reference (a signal while
    /// streams are in use elsewhere): every stream fails and the agent
    /// cancels the connection's builds and drops its claims.
    pub fn abort(&self) {
        self.conn
            .close(VarInt::from_u32(ErrorCode::Cancelled.code()), b"cancelled");
    }

    async fn open(
        &self,
        op: &'static str,
        request: &Request,
    ) -> Result<(SendStream, RecvStream), ClientError> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|source| self.lost(op, source))?;
        self.write(&mut send, request, op).await?;
        Ok((send, recv))
    }

    async fn write<M: Message>(
        &self,
        send: &mut SendStream,
        message: &M,
        op: &'static str,
    ) -> Result<(), ClientError> {
        proto::write_frame(send, message)
            .await
            .map_err(|e| self.frame_error(op, e))
    }

    fn finish(&self, send: &mut SendStream, op: &'static str) -> Result<(), ClientError> {
        send.finish().map_err(|e| ClientError::Stream {
            uri: self.uri.clone(),
            op,
            reason: e.to_string(),
        })
    }

    /// The next frame, which must be there.
    async fn expect<M: Message>(
        &self,
        recv: &mut RecvStream,
        op: &'static str,
    ) -> Result<M, ClientError> {
        read::<M>(recv, &self.uri, op)
            .await?
            .ok_or_else(|| self.violation(op, format!("stream ended before a {}", M::NAME)))
    }

    fn frame_error(&self, op: &'static str, e: ProtoError) -> ClientError {
        frame_error(&self.uri, op, e)
    }

    fn lost(&self, op: &'static str, source: quinn::ConnectionError) -> ClientError {
        ClientError::ConnectionLost {
            uri: self.uri.clone(),
            op,
            source,
        }
    }

    fn refused(&self, op: &'static str, refusal: Refusal) -> ClientError {
        ClientError::Refused {
            uri: self.uri.clone(),
            op,
            refusal,
        }
    }

    fn violation(&self, op: &'static str, reason: String) -> ClientError {
        ClientError::Protocol {
            uri: self.uri.clone(),
            op,
            reason,
        }
    }
}

/// The Hello exchange on a fresh connection.
async fn hello(conn: &Connection, uri: &str, client: &str) -> Result<Welcome, ClientError> {
    const OP: &str = "hello";
    let lost = |source| ClientError::ConnectionLost {
        uri: uri.to_owned(),
        op: OP,
        source,
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(lost)?;
    proto::write_frame(&mut send, &Request::Hello(proto::hello(client)))
        .await
        .map_err(|e| frame_error(uri, OP, e))?;
    send.finish().map_err(|e| ClientError::Stream {
        uri: uri.to_owned(),
        op: OP,
        reason: e.to_string(),
    })?;
    let reply = read::<HelloReply>(&mut recv, uri, OP)
        .await?
        .ok_or_else(|| ClientError::Protocol {
            uri: uri.to_owned(),
            op: OP,
            reason: "no reply to Hello".into(),
        })?;
    match reply {
        HelloReply::Welcome(welcome) => Ok(*welcome),
        HelloReply::VersionMismatch {
            min_version,
            max_version,
        } => Err(ClientError::VersionMismatch {
            uri: uri.to_owned(),
            theirs_min: min_version,
            theirs_max: max_version,
            ours_min: proto::MIN_PROTOCOL_VERSION,
            ours_max: proto::PROTOCOL_VERSION,
        }),
        HelloReply::Refused(refusal) => Err(ClientError::Refused {
            uri: uri.to_owned(),
            op: OP,
            refusal,
        }),
    }
}

/// One frame, `None` at a clean end of the stream.
async fn read<M: Message>(
    recv: &mut RecvStream,
    uri: &str,
    op: &'static str,
) -> Result<Option<M>, ClientError> {
    proto::read_frame::<M, _>(recv)
        .await
        .map_err(|e| frame_error(uri, op, e))
}

/// Classifies a frame error: the connection gone, the stream reset, or a
/// malformed frame from the agent.
fn frame_error(uri: &str, op: &'static str, e: ProtoError) -> ClientError {
    match e {
        ProtoError::Io(io) => match io.get_ref().and_then(|inner| {
            inner
                .downcast_ref::<quinn::ReadError>()
                .and_then(read_connection_error)
                .or_else(|| {
                    inner
                        .downcast_ref::<quinn::WriteError>()
                        .and_then(write_connection_error)
                })
        }) {
            Some(source) => ClientError::ConnectionLost {
                uri: uri.to_owned(),
                op,
                source,
            },
            None => ClientError::Stream {
                uri: uri.to_owned(),
                op,
                reason: io.to_string(),
            },
        },
        other => ClientError::Protocol {
            uri: uri.to_owned(),
            op,
            reason: other.to_string(),
        },
    }
}

fn read_connection_error(e: &quinn::ReadError) -> Option<quinn::ConnectionError> {
    match e {
        quinn::ReadError::ConnectionLost(c) => Some(c.clone()),
        _ => None,
    }
}

fn write_connection_error(e: &quinn::WriteError) -> Option<quinn::ConnectionError> {
    match e {
        quinn::WriteError::ConnectionLost(c) => Some(c.clone()),
        _ => None,
    }
}

/// `paths` in batches of [`MAX_BATCH_PATHS`], as [`PathBatch::split`] cuts
/// them (one empty batch for no paths).
fn chunks_or_empty(paths: &[StorePath]) -> Vec<&[StorePath]> {
    if paths.is_empty() {
        vec![&[]]
    } else {
        paths.chunks(MAX_BATCH_PATHS).collect()
    }
}

/// A client endpoint able to reach `host`: dual-stack where IPv6 exists,
/// IPv4-only where it does not (a network namespace without IPv6).
fn client_endpoint(host: &Host, tls: Arc<rustls::ClientConfig>) -> Result<Endpoint, EndpointError> {
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
    match host {
        Host::Ip(ip) if ip.is_ipv4() => net::client_endpoint(v4, tls),
        Host::Ip(_) => net::client_endpoint(v6, tls),
        Host::Name(_) => {
            net::client_endpoint(v6, Arc::clone(&tls)).or_else(|_| net::client_endpoint(v4, tls))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_match_path_batch_split() {
        let p =
            StorePath::parse_any("/nix/store/00000000000000000000000000000000-a").expect("valid");
        for n in [
            0,
            1,
            MAX_BATCH_PATHS,
            MAX_BATCH_PATHS + 1,
            3 * MAX_BATCH_PATHS,
        ] {
            let paths = vec![p.clone(); n];
            let ours: Vec<usize> = chunks_or_empty(&paths).iter().map(|c| c.len()).collect();
            let theirs: Vec<usize> = PathBatch::split(&paths).map(|b| b.paths.len()).collect();
            assert_eq!(ours, theirs, "{n} paths");
        }
    }

    #[test]
    fn refusals_read_well() {
        let err = ClientError::Refused {
            uri: "nixq://s1".into(),
            op: "upload",
            refusal: Refusal::NoSpace {
                free_bytes: 10,
                floor_bytes: 20,
            },
        };
        assert_eq!(
            err.to_string(),
            "nixq://s1 refused upload: not enough free space in its store (10 bytes free, floor 20)"
        );
        assert!(!err.is_unreachable());
        assert!(!err.is_tls_refusal());
    }
}
