//! QUIC endpoints for nixq: transport settings for bulk transfer, endpoint
//! constructors, and connecting (or accepting) with a deadline and an error
//! that says *why* a connection failed.
//!
//! Thin glue over quinn; the TLS side is [`crate::tls`].
//!
//! A connection counts as established only when the handshake is
//! **confirmed**: in TLS 1.3 the client finishes its side of the handshake
//! before the server has checked the client's certificate, so quinn hands
//! the master a connection that the agent may still refuse a round trip
//! later. [`connect`] waits for the agent's HANDSHAKE_DONE frame (RFC 9001
//! §4.1.2), which the agent sends only after accepting the master's
//! certificate. So a refused certificate is reported by [`connect`] as
//! [`ConnectError::RefusedByPeer`], never later as a puzzling stream error.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, Endpoint, IdleTimeout, TransportConfig, VarInt};
use tokio::time::Instant;

/// Flow-control credit per stream. A single stream (one large NAR) must be
/// able to fill the link by itself: 1 Gbit/s × 50 ms RTT = 6.25 MB of
/// bandwidth-delay product, rounded up. On a LAN (≤ 5 ms) that is enough
/// for 10 Gbit/s. quinn's default (1.25 MB) would cap one stream at about
/// 200 Mbit/s at 50 ms.
pub const STREAM_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;

/// Flow-control credit per connection, over all its streams: two streams'
/// worth (2 Gbit/s at 50 ms). It is also the most one connection can make
/// the receiver buffer when the receiver's store is slower than the network
/// (Nix imports at ~225 MB/s, QUIC on veth runs at ~450 MB/s), so it bounds
/// the agent's memory per master; quinn's default is unbounded.
pub const RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;

/// Unacknowledged bytes a sender keeps in flight: the peer's
/// [`RECEIVE_WINDOW`], since flow control never lets more be in flight.
pub const SEND_WINDOW: u64 = RECEIVE_WINDOW as u64;

/// Streams the peer may have open at once, each direction. Every operation
/// (an upload, a build, a log stream) is its own stream, and copy-closure
/// runs a few dozen in parallel; 256 leaves room for several hook
/// processes' worth without letting one peer pin unbounded state.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// Keep-alive ping interval: keeps NAT and conntrack state alive and lets
/// a quiet connection (a long build with no log output) survive the idle
/// timeout. Six pings fit in one idle timeout, so a few lost pings are
/// harmless.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// A peer silent for this long is gone (DESIGN.md, "Failure model": an
/// agent that dies or a link that drops becomes a transient failure within
/// a timeout, never a hang). Long enough to ride out a brief link flap.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default deadline for establishing a connection (handshake included)
/// when the machines file gives none (`connect-timeout=`): a LAN handshake
/// takes milliseconds, so 10 s only ever expires for a host that is down.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The transport settings of every nixq endpoint (see the constants).
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        // nixq sends no datagrams; do not offer to receive any.
        .datagram_receive_buffer_size(None);
    // 30 s is far below QUIC's 2^62 ms limit, so the conversion cannot fail;
    // fall back to quinn's default rather than panic if it ever did.
    if let Ok(idle) = IdleTimeout::try_from(IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// Why an endpoint could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The rustls configuration cannot drive QUIC (no TLS 1.3 suite usable
    /// for QUIC's initial packets); a configuration bug.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Crypto(String),
}

/// The agent's endpoint: listens on `addr` (UDP) with `tls` from
/// [`crate::tls::server_config`]. Needs a tokio runtime.
pub fn server_endpoint(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
) -> Result<Endpoint, EndpointError> {
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Crypto(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Endpoint::server(config, addr).map_err(|source| EndpointError::Bind { addr, source })
}

/// The master's endpoint: bound to `bind` (usually `0.0.0.0:0` or
/// `[::]:0`), connecting with `tls` from [`crate::tls::client_config`] by
/// default. Needs a tokio runtime.
pub fn client_endpoint(
    bind: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Endpoint, EndpointError> {
    let crypto =
        QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Crypto(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    let mut endpoint =
        Endpoint::client(bind).map_err(|source| EndpointError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Why a connection could not be established. [`Self::is_tls_refusal`]
/// separates "wrong certificate" (fix the PKI) from "host not there" (try
/// another machine, retry later).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The host name does not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    /// The host name resolves to nothing.
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    /// quinn refused to start the attempt (bad server name, endpoint shut down).
    #[error("cannot connect to {addr} as {server_name:?}: {source}")]
    Setup {
        addr: SocketAddr,
        server_name: String,
        #[source]
        source: quinn::ConnectError,
    },
    /// Nothing answered in time: host down, wrong address or port, or UDP
    /// filtered. (A QUIC client gets no "connection refused": an ICMP
    /// port-unreachable is not trusted, so this is also what a closed port
    /// looks like.)
    #[error("no answer from {addr} within {:.1} s (host down, agent not running, wrong address or port, or UDP blocked)", after.as_secs_f64())]
    TimedOut { addr: SocketAddr, after: Duration },
    /// The path broke (the peer reset the connection, or it closed before
    /// the handshake completed).
    #[error("{addr} is unreachable: {source}")]
    Unreachable {
        addr: SocketAddr,
        #[source]
        source: ConnectionError,
    },
    /// The peer refused our certificate (or our ALPN) with a TLS alert.
    #[error("{addr} refused the TLS handshake: alert {alert:?}{}", hint_text(*.alert))]
    RefusedByPeer {
        addr: SocketAddr,
        /// The TLS alert the peer sent.
        alert: rustls::AlertDescription,
    },
    /// We refused the peer's certificate (wrong CA, expired, wrong role,
    /// not valid for the name we connected to).
    #[error("{addr} presented an unacceptable certificate: {reason}{}", peer_hint(*.alert))]
    PeerRejected {
        addr: SocketAddr,
        /// The TLS alert we sent.
        alert: rustls::AlertDescription,
        /// rustls's account of what was wrong.
        reason: String,
    },
    /// Any other failure of the handshake.
    #[error("handshake with {addr} failed: {source}")]
    Failed {
        addr: SocketAddr,
        #[source]
        source: ConnectionError,
    },
}

fn hint_text(alert: rustls::AlertDescription) -> &'static str {
    use rustls::AlertDescription as A;
    match alert {
        A::UnknownCA | A::BadCertificate | A::CertificateUnknown => {
            " (is our certificate signed by the CA the peer trusts?)"
        }
        A::CertificateExpired => " (our certificate has expired or is not yet valid)",
        A::UnsupportedCertificate => {
            " (our certificate is for the wrong role: masters need a client certificate, agents a server certificate)"
        }
        A::CertificateRequired => " (we presented no certificate)",
        A::NoApplicationProtocol => " (the peer does not speak nixq/1)",
        _ => "",
    }
}

fn peer_hint(alert: rustls::AlertDescription) -> &'static str {
    use rustls::AlertDescription as A;
    match alert {
        A::UnknownCA => " (not signed by the CA we trust)",
        A::UnsupportedCertificate => " (a certificate for the other role)",
        _ => "",
    }
}

impl ConnectError {
    /// The connection failed because one side refused the other's TLS
    /// identity: retrying will not help, the PKI or the configuration must
    /// change.
    pub fn is_tls_refusal(&self) -> bool {
        matches!(self, Self::RefusedByPeer { .. } | Self::PeerRejected { .. })
    }

    /// The host could not be reached (down, unreachable, timed out): a
    /// transient failure; another machine may be tried.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Resolve { .. }
                | Self::NoAddress { .. }
                | Self::TimedOut { .. }
                | Self::Unreachable { .. }
        )
    }

    /// Classifies a connection error seen during (or right after) the
    /// handshake with `addr`; `after` is the time spent so far.
    pub fn from_connection_error(addr: SocketAddr, err: ConnectionError, after: Duration) -> Self {
        match err {
            ConnectionError::TimedOut => Self::TimedOut { addr, after },
            ConnectionError::ConnectionClosed(ref close) => match alert_of(close.error_code) {
                Some(alert) => Self::RefusedByPeer { addr, alert },
                None => Self::Failed { addr, source: err },
            },
            ConnectionError::TransportError(ref e) => match alert_of(e.code) {
                Some(alert) => Self::PeerRejected {
                    addr,
                    alert,
                    reason: e.reason.clone(),
                },
                None => Self::Failed { addr, source: err },
            },
            ConnectionError::Reset => Self::Unreachable { addr, source: err },
            other => Self::Failed {
                addr,
                source: other,
            },
        }
    }
}

/// The TLS alert carried by a QUIC CRYPTO_ERROR code (0x100 + alert,
/// RFC 9001 §4.8), if the code is one.
fn alert_of(code: quinn::TransportErrorCode) -> Option<rustls::AlertDescription> {
    let code = u64::from(code);
    let alert = code.checked_sub(0x100).filter(|a| *a < 0x100)?;
    u8::try_from(alert).ok().map(rustls::AlertDescription::from)
}

/// Resolves `host` (a DNS name or an address literal) to socket addresses.
pub async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ConnectError::Resolve {
            host: host.to_owned(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ConnectError::NoAddress {
            host: host.to_owned(),
        });
    }
    Ok(addrs)
}

/// Connects to `addr`, expecting the agent's certificate to be valid for
/// `server_name` (a DNS name or an IP address in text form), and returns
/// once the handshake is confirmed (see the module doc) or fails within
/// `timeout`.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<Connection, ConnectError> {
    let connecting = endpoint
        .connect(addr, server_name)
        .map_err(|source| ConnectError::Setup {
            addr,
            server_name: server_name.to_owned(),
            source,
        })?;
    let attempt = async {
        let conn = connecting.await?;
        confirmed(&conn).await?;
        Ok::<_, ConnectionError>(conn)
    };
    // Dropping the attempt on timeout abandons the connection; quinn
    // closes it.
    handshake_within(addr, timeout, attempt).await
}

/// Resolves `host` and tries its addresses in turn until one connects or
/// `timeout` (for the whole attempt) runs out; returns the last error.
pub async fn connect_host(
    endpoint: &Endpoint,
    host: &str,
    port: u16,
    server_name: &str,
    timeout: Duration,
) -> Result<Connection, ConnectError> {
    let deadline = Instant::now() + timeout;
    let addrs = tokio::time::timeout(timeout, resolve(host, port))
        .await
        .map_err(|_| ConnectError::Resolve {
            host: host.to_owned(),
            source: io::Error::new(io::ErrorKind::TimedOut, "name lookup timed out"),
        })??;
    let mut last = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match connect(endpoint, addr, server_name, left).await {
            Ok(conn) => return Ok(conn),
            // A refused certificate will be refused at every address.
            Err(e) if e.is_tls_refusal() => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(ConnectError::NoAddress {
        host: host.to_owned(),
    }))
}

/// Completes the server side of a handshake within `timeout`. The agent
/// uses it on each [`quinn::Incoming`]: a master with a bad certificate
/// shows up as [`ConnectError::PeerRejected`].
pub async fn accept(
    incoming: quinn::Incoming,
    timeout: Duration,
) -> Result<Connection, ConnectError> {
    let addr = incoming.remote_address();
    let connecting = incoming
        .accept()
        .map_err(|e| ConnectError::Failed { addr, source: e })?;
    handshake_within(addr, timeout, connecting).await
}

/// Runs a handshake (either side) with `addr` for at most `timeout`,
/// mapping its failure or the timeout to a [`ConnectError`].
async fn handshake_within(
    addr: SocketAddr,
    timeout: Duration,
    handshake: impl std::future::Future<Output = Result<Connection, ConnectionError>>,
) -> Result<Connection, ConnectError> {
    let start = Instant::now();
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(ConnectError::from_connection_error(
            addr,
            e,
            start.elapsed(),
        )),
        Err(_) => Err(ConnectError::TimedOut {
            addr,
            after: start.elapsed(),
        }),
    }
}

/// Waits until the peer has confirmed the handshake (HANDSHAKE_DONE
/// received) or closed the connection.
///
/// quinn reports confirmation only through its frame counters, so this
/// polls them, starting at 1 ms and backing off to 20 ms; confirmation
/// takes one round trip, so on a LAN this is one or two polls. The
/// connection's own close (a refusal) wakes it at once.
async fn confirmed(conn: &Connection) -> Result<(), ConnectionError> {
    const FIRST_POLL: Duration = Duration::from_millis(1);
    const MAX_POLL: Duration = Duration::from_millis(20);
    let mut poll = FIRST_POLL;
    loop {
        if conn.stats().frame_rx.handshake_done > 0 {
            return Ok(());
        }
        if let Some(reason) = conn.close_reason() {
            return Err(reason);
        }
        tokio::select! {
            reason = conn.closed() => return Err(reason),
            () = tokio::time::sleep(poll) => {}
        }
        poll = (poll * 2).min(MAX_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_error_codes_map_to_alerts() {
        use rustls::AlertDescription as A;
        let code = quinn::TransportErrorCode::crypto(48);
        assert_eq!(alert_of(code), Some(A::UnknownCA));
        assert_eq!(
            alert_of(quinn::TransportErrorCode::crypto(116)),
            Some(A::CertificateRequired)
        );
        assert_eq!(
            alert_of(quinn::TransportErrorCode::PROTOCOL_VIOLATION),
            None
        );
    }

    #[test]
    fn refusals_and_timeouts_are_told_apart() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let closed = ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(45),
            frame_type: None,
            reason: bytes::Bytes::new(),
        });
        let e = ConnectError::from_connection_error(addr, closed, Duration::ZERO);
        assert!(e.is_tls_refusal() && !e.is_unreachable(), "{e}");
        assert!(e.to_string().contains("expired"), "{e}");

        let e =
            ConnectError::from_connection_error(addr, ConnectionError::TimedOut, Duration::ZERO);
        assert!(e.is_unreachable() && !e.is_tls_refusal(), "{e}");
    }

    #[test]
    fn windows_cover_a_gigabit_at_50ms() {
        let bdp = 1_000_000_000u64 / 8 * 50 / 1000;
        assert!(u64::from(STREAM_RECEIVE_WINDOW) >= bdp);
        assert!(u64::from(RECEIVE_WINDOW) >= 2 * bdp);
        assert!(KEEP_ALIVE_INTERVAL * 3 < IDLE_TIMEOUT);
    }
}
