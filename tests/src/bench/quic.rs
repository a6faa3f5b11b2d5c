//! The physical limit: raw throughput of one quinn connection between two
//! hosts' network namespaces, one unidirectional stream, with nixq's own
//! transport settings ([`net::transport_config`]) and mutual TLS
//! ([`nixq_common::tls`]) from a test PKI. No NAR, no store, no hashing:
//! whatever nixq adds on top is measured against this.
//!
//! The receiver runs on a thread in the slave's namespace, the sender on a
//! thread in the master's, each with its own two-worker tokio runtime (both
//! ends share the machine's cores, as the agent and copy-closure do).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use bytes::Bytes;
use nixq_common::net;
use nixq_common::tls::{self, Identity, TrustedCa};

use crate::nixq::Pki;
use crate::Host;

/// Size of each chunk handed to quinn: large enough that per-call overhead
/// vanishes, small next to the stream window.
const CHUNK: usize = 1 << 20;
/// UDP port of the receiver (any free port of the slave's namespace).
const PORT: u16 = 7499;
/// Deadline for the whole transfer.
const TIMEOUT: Duration = Duration::from_secs(600);

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")
}

/// Streams `bytes` from `sender` to `receiver` over one QUIC stream and
/// returns the time from opening the stream until the receiver has read the
/// last byte.
pub fn raw_quic(sender: &Host, receiver: &Host, bytes: u64) -> anyhow::Result<Duration> {
    let pki = Pki::generate()?;
    let agent = pki.agent_leaf(receiver)?;
    let master = pki.master_leaf("bench-master")?;
    let ca = TrustedCa::from_pem(pki.ca_pem().as_bytes(), "bench CA")?;
    let server_tls = tls::server_config(
        &ca,
        Identity::from_pem(
            agent.cert_pem.as_bytes(),
            agent.key_pem.as_bytes(),
            "bench agent",
        )?,
    )?;
    let client_tls = tls::client_config(
        &ca,
        Identity::from_pem(
            master.cert_pem.as_bytes(),
            master.key_pem.as_bytes(),
            "bench master",
        )?,
    )?;
    let addr = SocketAddr::from((receiver.ip(), PORT));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();

    std::thread::scope(|scope| {
        let rx = scope.spawn(move || {
            receiver.in_netns(move || -> anyhow::Result<u64> {
                runtime()?.block_on(async move {
                    let endpoint = net::server_endpoint(addr, server_tls)?;
                    let _ = ready_tx.send(());
                    let incoming = endpoint
                        .accept()
                        .await
                        .ok_or_else(|| anyhow!("the receiver's endpoint closed"))?;
                    let conn = net::accept(incoming, Duration::from_secs(10)).await?;
                    let mut stream = conn.accept_uni().await?;
                    let mut got = 0u64;
                    while let Some(chunk) = stream.read_chunk(CHUNK, true).await? {
                        got += chunk.bytes.len() as u64;
                    }
                    // Tell the sender everything arrived.
                    conn.close(0u32.into(), b"done");
                    endpoint.wait_idle().await;
                    Ok(got)
                })
            })?
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the QUIC receiver did not start"))?;
        let elapsed = sender.in_netns(move || -> anyhow::Result<Duration> {
            runtime()?.block_on(async move {
                let endpoint =
                    net::client_endpoint(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), client_tls)?;
                let conn = net::connect(
                    &endpoint,
                    addr,
                    &receiver.ip().to_string(),
                    Duration::from_secs(10),
                )
                .await?;
                let chunk = Bytes::from(vec![0x5a; CHUNK]);
                let start = Instant::now();
                let transfer = async {
                    let mut stream = conn.open_uni().await?;
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(CHUNK as u64) as usize;
                        stream.write_chunk(chunk.slice(..n)).await?;
                        left -= n as u64;
                    }
                    stream.finish()?;
                    // The receiver closes the connection after the last byte.
                    let _ = conn.closed().await;
                    anyhow::Ok(())
                };
                tokio::time::timeout(TIMEOUT, transfer)
                    .await
                    .map_err(|_| anyhow!("raw QUIC transfer timed out"))??;
                let elapsed = start.elapsed();
                endpoint.wait_idle().await;
                Ok(elapsed)
            })
        })??;
        let got = rx
            .join()
            .map_err(|_| anyhow!("the QUIC receiver panicked"))??;
        anyhow::ensure!(got == bytes, "receiver got {got} of {bytes} bytes");
        Ok(elapsed)
    })
}
