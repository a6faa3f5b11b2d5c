//! Real QUIC handshakes on 127.0.0.1 between `common`'s TLS and endpoint
//! setup, with PKIs made by `nixq-certs` and loaded from files: the one
//! good pairing works and echoes bytes; every wrong certificate is refused
//! in the handshake, with the refusal reported as such (not as a timeout).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nixq_certs::{Ca, Leaf, Validity};
use nixq_common::net::{self, ConnectError};
use nixq_common::tls::{self, Identity, TrustedCa};
use rustls::AlertDescription;
use tokio::task::JoinHandle;

/// Handshakes on loopback take milliseconds; a refusal that turned into a
/// timeout would show up as `TimedOut` after this long instead.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// The largest message the echo server reads.
const ECHO_LIMIT: usize = 1 << 20;

fn days(n: u32) -> Validity {
    Validity::days_from_now(n).expect("validity")
}

/// A deployment: a CA, and files for the CA, one agent and one master.
struct Pki {
    ca: Ca,
    ca_file: PathBuf,
}

/// Writes `leaf` as `NAME.crt` + `NAME.key` and returns the `.crt` path
/// (the key is found beside it).
fn write_split(dir: &Path, name: &str, leaf: &Leaf) -> PathBuf {
    let crt = dir.join(format!("{name}.crt"));
    std::fs::write(&crt, &leaf.cert_pem).expect("write cert");
    std::fs::write(dir.join(format!("{name}.key")), &leaf.key_pem).expect("write key");
    crt
}

/// Writes `leaf` as one combined `NAME.pem` (the machines-file identity).
fn write_combined(dir: &Path, name: &str, leaf: &Leaf) -> PathBuf {
    let pem = dir.join(format!("{name}.pem"));
    std::fs::write(&pem, leaf.combined_pem()).expect("write identity");
    pem
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let ca = Ca::generate(name, days(10)).expect("CA");
        let ca_file = dir.join(format!("{name}-ca.crt"));
        std::fs::write(&ca_file, ca.cert_pem()).expect("write CA");
        Self { ca, ca_file }
    }

    fn trusted(&self) -> TrustedCa {
        TrustedCa::load(&self.ca_file).expect("load CA")
    }

    fn agent(&self, dir: &Path, name: &str, validity: Validity) -> PathBuf {
        let ip = "127.0.0.1".parse().expect("ip");
        let leaf = self
            .ca
            .issue_agent(name, &["localhost".to_owned()], &[ip], validity)
            .expect("agent cert");
        write_split(dir, name, &leaf)
    }

    fn master(&self, dir: &Path, name: &str, validity: Validity) -> PathBuf {
        let leaf = self.ca.issue_master(name, validity).expect("master cert");
        write_combined(dir, name, &leaf)
    }
}

/// What the agent side saw: the master's CN after an echo, or the error.
type AgentResult = Result<String, ConnectError>;

/// An agent that accepts one connection, reports the peer's CN, and echoes
/// one bidirectional stream.
fn start_agent(
    ca: &TrustedCa,
    identity: &Path,
) -> (quinn::Endpoint, SocketAddr, JoinHandle<AgentResult>) {
    let id = Identity::load(identity, None).expect("agent identity");
    let config = tls::server_config(ca, id).expect("server config");
    let endpoint = net::server_endpoint("127.0.0.1:0".parse().expect("addr"), config)
        .expect("server endpoint");
    let addr = endpoint.local_addr().expect("local addr");
    let ep = endpoint.clone();
    let task = tokio::spawn(async move {
        let incoming = ep.accept().await.expect("endpoint open");
        let conn = net::accept(incoming, HANDSHAKE_TIMEOUT).await?;
        let name = tls::peer_common_name(&conn).expect("peer CN");
        if let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let data = recv.read_to_end(ECHO_LIMIT).await.expect("read");
            send.write_all(&data).await.expect("write");
            send.finish().expect("finish");
            // Wait for the master to close, so the echo is delivered.
            let _ = conn.closed().await;
        }
        Ok(name)
    });
    (endpoint, addr, task)
}

fn master_endpoint(ca: &TrustedCa, identity: &Path) -> quinn::Endpoint {
    let id = Identity::load(identity, None).expect("master identity");
    let config = tls::client_config(ca, id).expect("client config");
    net::client_endpoint("127.0.0.1:0".parse().expect("addr"), config).expect("client endpoint")
}

async fn agent_outcome(task: JoinHandle<AgentResult>) -> AgentResult {
    tokio::time::timeout(HANDSHAKE_TIMEOUT * 2, task)
        .await
        .expect("agent task finished")
        .expect("agent task did not panic")
}

/// Connects and expects a refusal by the agent with `alert`; the agent
/// must have rejected our certificate too.
async fn expect_refused_by_agent(
    master: quinn::Endpoint,
    addr: SocketAddr,
    task: JoinHandle<AgentResult>,
    alert: AlertDescription,
) {
    let started = std::time::Instant::now();
    let err = net::connect(&master, addr, "127.0.0.1", HANDSHAKE_TIMEOUT)
        .await
        .expect_err("the agent must refuse");
    eprintln!("master sees: {err}");
    assert!(
        started.elapsed() < HANDSHAKE_TIMEOUT / 2,
        "refusal took {:?}: {err}",
        started.elapsed()
    );
    match &err {
        ConnectError::RefusedByPeer { alert: got, .. } => assert_eq!(*got, alert, "{err}"),
        other => panic!("expected a refusal by the agent, got: {other}"),
    }
    assert!(err.is_tls_refusal() && !err.is_unreachable());
    let agent = agent_outcome(task)
        .await
        .expect_err("agent must reject the master");
    eprintln!("agent sees: {agent}");
    assert!(
        matches!(agent, ConnectError::PeerRejected { .. }),
        "agent side: {agent}"
    );
}

#[tokio::test]
async fn same_ca_connects_and_echoes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "farm");
    let (_agent_ep, addr, task) =
        start_agent(&pki.trusted(), &pki.agent(dir.path(), "s1", days(1)));
    let master = master_endpoint(&pki.trusted(), &pki.master(dir.path(), "m1", days(1)));

    let conn = net::connect(&master, addr, "127.0.0.1", HANDSHAKE_TIMEOUT)
        .await
        .expect("connect");
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    assert_eq!(alpn.as_deref(), Some(tls::ALPN));
    assert_eq!(tls::peer_common_name(&conn).as_deref(), Ok("s1"));

    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    send.write_all(&payload).await.expect("send");
    send.finish().expect("finish");
    let echoed = recv.read_to_end(ECHO_LIMIT).await.expect("echo");
    assert_eq!(echoed, payload);
    conn.close(0u32.into(), b"done");
    assert_eq!(agent_outcome(task).await.expect("agent accepted"), "m1");
    master.wait_idle().await;
}

#[tokio::test]
async fn agent_name_may_be_a_dns_san() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "farm");
    let (_agent_ep, addr, task) =
        start_agent(&pki.trusted(), &pki.agent(dir.path(), "s1", days(1)));
    let master = master_endpoint(&pki.trusted(), &pki.master(dir.path(), "m1", days(1)));
    let conn = net::connect(&master, addr, "localhost", HANDSHAKE_TIMEOUT)
        .await
        .expect("connect by DNS SAN");
    conn.close(0u32.into(), b"done");
    assert_eq!(agent_outcome(task).await.expect("agent accepted"), "m1");
}

#[tokio::test]
async fn master_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let farm = Pki::new(dir.path(), "farm");
    let rogue = Pki::new(dir.path(), "rogue");
    let (_agent_ep, addr, task) =
        start_agent(&farm.trusted(), &farm.agent(dir.path(), "s1", days(1)));
    // The rogue master trusts the farm CA, so only the agent can object.
    let master = master_endpoint(&farm.trusted(), &rogue.master(dir.path(), "m1", days(1)));
    expect_refused_by_agent(master, addr, task, AlertDescription::UnknownCA).await;
}

#[tokio::test]
async fn expired_master_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "farm");
    let (_agent_ep, addr, task) =
        start_agent(&pki.trusted(), &pki.agent(dir.path(), "s1", days(1)));
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let expired = Validity::between(now - 3 * day, now - day).expect("validity");
    let master = master_endpoint(&pki.trusted(), &pki.master(dir.path(), "old", expired));
    expect_refused_by_agent(master, addr, task, AlertDescription::CertificateExpired).await;
}

#[tokio::test]
async fn agent_certificate_cannot_act_as_a_master() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "farm");
    let (_agent_ep, addr, task) =
        start_agent(&pki.trusted(), &pki.agent(dir.path(), "s1", days(1)));
    // Another agent's (serverAuth-only) certificate as the client identity.
    let master = master_endpoint(&pki.trusted(), &pki.agent(dir.path(), "s2", days(1)));
    expect_refused_by_agent(master, addr, task, AlertDescription::UnsupportedCertificate).await;
}

#[tokio::test]
async fn master_without_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "farm");
    let (_agent_ep, addr, task) =
        start_agent(&pki.trusted(), &pki.agent(dir.path(), "s1", days(1)));

    // A client that trusts the CA and speaks nixq/1 but has no certificate.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(pem_to_der(
            pki.ca.cert_pem(),
        )))
        .expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![tls::ALPN.to_vec()];
    let master = net::client_endpoint("127.0.0.1:0".parse().expect("addr"), Arc::new(config))
        .expect("client endpoint");
    expect_refused_by_agent(master, addr, task, AlertDescription::CertificateRequired).await;
}

/// Connects and expects the master to reject the agent's certificate.
async fn expect_master_rejects(
    master: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    why: &str,
) {
    let started = std::time::Instant::now();
    let err = net::connect(master, addr, server_name, HANDSHAKE_TIMEOUT)
        .await
        .expect_err("the master must reject the agent");
    eprintln!("master sees: {err}");
    assert!(
        started.elapsed() < HANDSHAKE_TIMEOUT / 2,
        "rejection took {:?}",
        started.elapsed()
    );
    match &err {
        ConnectError::PeerRejected { reason, .. } => assert!(reason.contains(why), "{err}"),
        other => panic!("expected the master to reject the agent, got: {other}"),
    }
    assert!(err.is_tls_refusal());
}

#[tokio::test]
async fn agent_from_another_ca_is_refused_by_the_master() {
    let dir = tempfile::tempdir().expect("tempdir");
    let farm = Pki::new(dir.path(), "farm");
    let rogue = Pki::new(dir.path(), "rogue");
    let (_agent_ep, addr, task) =
        start_agent(&farm.trusted(), &rogue.agent(dir.path(), "s1", days(1)));
    let master = master_endpoint(&farm.trusted(), &farm.master(dir.path(), "m1", days(1)));
    expect_master_rejects(&master, addr, "127.0.0.1", "UnknownIssuer").await;
    let agent = agent_outcome(task).await.expect_err("handshake failed");
    assert!(agent.is_tls_refusal(), "agent side: {agent}");
}

#[tokio::test]
async fn master_certificate_cannot_act_as_an_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "farm");
    // A master's (clientAuth-only) certificate as the agent's identity.
    let (_agent_ep, addr, _task) =
        start_agent(&pki.trusted(), &pki.master(dir.path(), "m2", days(1)));
    let master = master_endpoint(&pki.trusted(), &pki.master(dir.path(), "m1", days(1)));
    // webpki checks the usage before the name, so the server name does not matter.
    expect_master_rejects(
        &master,
        addr,
        "m2",
        "extended key usage for server authentication",
    )
    .await;
}

#[tokio::test]
async fn agent_certificate_must_name_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "farm");
    let (_agent_ep, addr, _task) =
        start_agent(&pki.trusted(), &pki.agent(dir.path(), "s1", days(1)));
    let master = master_endpoint(&pki.trusted(), &pki.master(dir.path(), "m1", days(1)));
    expect_master_rejects(
        &master,
        addr,
        "s9.example",
        "not valid for name \"s9.example\"",
    )
    .await;
}

#[tokio::test]
async fn nobody_listening_is_a_timeout_not_a_refusal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "farm");
    let master = master_endpoint(&pki.trusted(), &pki.master(dir.path(), "m1", days(1)));
    // A bound but silent UDP socket: packets arrive and nobody answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr");
    let timeout = Duration::from_millis(300);
    let err = net::connect(&master, addr, "127.0.0.1", timeout)
        .await
        .expect_err("nobody answers");
    assert!(matches!(err, ConnectError::TimedOut { .. }), "{err}");
    assert!(err.is_unreachable() && !err.is_tls_refusal());
}

#[test]
fn bundle_port_matches_the_machines_default() {
    assert_eq!(
        nixq_certs::DEFAULT_AGENT_PORT,
        nixq_common::machines::DEFAULT_PORT
    );
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("CA PEM")
        .to_vec()
}
