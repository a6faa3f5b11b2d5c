//! nixq deployments on a [`Farm`](crate::Farm): a PKI made in-process with
//! `nixq-certs`, the files each host needs, agents running under a guard,
//! `nixq-copy-closure` runs, and an in-test master (the master library's
//! typed client, or raw QUIC streams for what no nixq program would send).
//!
//! ```no_run
//! # fn main() -> Result<(), nixq_e2e::nixq::NixqError> {
//! use nixq_e2e::nixq::{Agent, Direction, MasterCreds, Pki};
//! let farm = nixq_e2e::Farm::new("copy")?.host("master")?.host("s1")?;
//! let (master, s1) = (&farm["master"], &farm["s1"]);
//! let pki = Pki::generate()?;
//! let creds = MasterCreds::install(master, &pki, "master")?;
//! let agent = Agent::start(s1, &Agent::install(s1, &pki, "")?)?;
//! # let paths = vec![];
//! nixq_e2e::nixq::copy_closure(master, &creds, Direction::To, &agent.uri(), &paths, &[])?;
//! let counters = nixq_e2e::nixq::agent_status(master, &creds, s1)?.counters;
//! # Ok(()) }
//! ```
//!
//! Files live under each host's directory (`etc/nixq/…`), which the host's
//! commands see at the same absolute path. Agents listen on
//! `0.0.0.0:`[`AGENT_PORT`] of their host and use a private
//! `nix-daemon --stdio` (hosts run no daemon). The in-test master runs on a
//! thread inside a host's network namespace ([`block_on_in`]) and connects
//! to agents by address, since the farm's `/etc/hosts` exists only inside
//! the hosts' mount namespaces.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nixq_certs::{Ca, CertsError, Leaf, Validity};
use nixq_common::machines::{AgentCa, MachineUri};
use nixq_common::net::{self, ConnectError, EndpointError};
use nixq_common::proto::{self, AgentStatus, HelloReply, Request, Welcome};
use nixq_common::store_path::StorePath;
use nixq_common::tls::{self, Identity, TlsError, TrustedCa};
use nixq_master::agent_client::{AgentClient, AgentTarget, ClientError};

use crate::error::Error;
use crate::farm::Host;
use crate::process::Proc;

/// The agents' UDP port: nixq's default, so `nixq://host` needs no port.
pub const AGENT_PORT: u16 = nixq_common::machines::DEFAULT_PORT;

/// Validity of the test certificates: long enough for any test run.
const CERT_DAYS: u32 = 2;

/// How long an agent may take to log "listening on": it asks the local Nix
/// for its platform first, a few hundred milliseconds on a loaded machine.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an agent may take to stop on SIGTERM (it aborts in-flight work).
pub const AGENT_STOP_GRACE: Duration = Duration::from_secs(15);

/// Deadline for the in-test master's connections (handshake included).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadline of one `nixq-copy-closure` run unless the caller gives one.
pub const COPY_TIMEOUT: Duration = Duration::from_secs(240);

/// Where a host keeps its nixq files, relative to its directory.
const NIXQ_DIR: &str = "etc/nixq";

/// What can go wrong while deploying or driving nixq on a farm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NixqError {
    #[error(transparent)]
    Harness(#[from] Error),
    #[error("certificates: {0}")]
    Certs(#[from] CertsError),
    #[error("TLS material: {0}")]
    Tls(#[from] TlsError),
    #[error("agent client: {0}")]
    Client(#[from] ClientError),
    #[error("QUIC endpoint: {0}")]
    Endpoint(#[from] EndpointError),
    #[error("connect: {0}")]
    Connect(#[from] ConnectError),
    #[error("cannot start a tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{0}")]
    Unexpected(String),
}

/// Results of this module.
pub type NixqResult<T> = Result<T, NixqError>;

/// A deployment's certificate authority (in memory; nothing of it is
/// written but the CA certificate and the leaves).
pub struct Pki {
    ca: Ca,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

impl Pki {
    /// A fresh CA.
    pub fn generate() -> NixqResult<Self> {
        Self::generate_named("nixq e2e CA")
    }

    /// A fresh CA with the given common name (e.g. a second, foreign CA).
    pub fn generate_named(name: &str) -> NixqResult<Self> {
        Ok(Self {
            ca: Ca::generate(name, validity()?)?,
        })
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// A server certificate for the agent on `host`: valid for its name and
    /// its address.
    pub fn agent_leaf(&self, host: &Host) -> NixqResult<Leaf> {
        Ok(self.ca.issue_agent(
            host.name(),
            &[host.name().to_owned()],
            &[IpAddr::V4(host.ip())],
            validity()?,
        )?)
    }

    /// A client certificate for the master `name`.
    pub fn master_leaf(&self, name: &str) -> NixqResult<Leaf> {
        Ok(self.ca.issue_master(name, validity()?)?)
    }
}

fn validity() -> NixqResult<Validity> {
    Ok(Validity::days_from_now(CERT_DAYS)?)
}

/// A master's credentials on its host: an identity file (certificate and key
/// in one PEM) and the CA it trusts for agents.
#[derive(Debug, Clone)]
pub struct MasterCreds {
    /// `--identity` of nixq-copy-closure.
    pub identity: PathBuf,
    /// `--ca` of nixq-copy-closure.
    pub ca: PathBuf,
    identity_pem: String,
    ca_pem: String,
}

impl MasterCreds {
    /// Issues a master certificate for `name` and installs it with the CA on
    /// `host` (`etc/nixq/<name>.pem`, `etc/nixq/ca.crt`).
    pub fn install(host: &Host, pki: &Pki, name: &str) -> NixqResult<Self> {
        let leaf = pki.master_leaf(name)?;
        Self::write(host, name, &leaf.combined_pem(), pki.ca_pem())
    }

    /// Installs arbitrary identity and CA texts as `etc/nixq/<label>.pem` and
    /// `etc/nixq/<label>-ca.crt` (for refused-certificate tests).
    pub fn write(host: &Host, label: &str, identity_pem: &str, ca_pem: &str) -> NixqResult<Self> {
        let identity = host.write_file(&format!("{NIXQ_DIR}/{label}.pem"), identity_pem)?;
        set_private(&identity)?;
        let ca = host.write_file(&format!("{NIXQ_DIR}/{label}-ca.crt"), ca_pem)?;
        Ok(Self {
            identity,
            ca,
            identity_pem: identity_pem.to_owned(),
            ca_pem: ca_pem.to_owned(),
        })
    }

    /// The TLS client configuration these credentials give (the master's own).
    pub fn client_config(&self) -> NixqResult<Arc<rustls::ClientConfig>> {
        let ca = TrustedCa::from_pem(self.ca_pem.as_bytes(), "the test CA")?;
        let identity = Identity::from_pem(
            self.identity_pem.as_bytes(),
            self.identity_pem.as_bytes(),
            "the test master identity",
        )?;
        Ok(tls::client_config(&ca, identity)?)
    }

    /// A TLS client configuration that trusts the same CA but presents no
    /// certificate at all (a master without one).
    pub fn anonymous_client_config(&self) -> NixqResult<Arc<rustls::ClientConfig>> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| NixqError::Unexpected(format!("CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| NixqError::Unexpected(format!("CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| NixqError::Unexpected(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![proto::ALPN.to_vec()];
        Ok(Arc::new(config))
    }
}

fn set_private(path: &Path) -> NixqResult<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("cannot chmod", path, e).into())
}

/// A running `nixq-agent` on a host, killed when dropped.
#[derive(Debug)]
pub struct Agent {
    host: String,
    ip: Ipv4Addr,
    config: PathBuf,
    proc: Proc,
}

impl Agent {
    /// Installs an agent on `host`: its certificate and key, the CA, and
    /// `etc/nixq/agent.toml` (listen on [`AGENT_PORT`], private
    /// `nix-daemon --stdio`, no free-space floor unless `extra_toml` sets
    /// `min_free_space`, a 10 s idle timeout so that a killed master's
    /// claims and partial uploads are dropped quickly; keep-alives go every
    /// 5 s), followed by `extra_toml` (top-level keys only, e.g.
    /// `allowed_masters = ["m"]`). Returns the config file.
    pub fn install(host: &Host, pki: &Pki, extra_toml: &str) -> NixqResult<PathBuf> {
        let leaf = pki.agent_leaf(host)?;
        let ca = host.write_file(&format!("{NIXQ_DIR}/ca.crt"), pki.ca_pem())?;
        let cert = host.write_file(&format!("{NIXQ_DIR}/agent.crt"), &leaf.cert_pem)?;
        let key = host.write_file(&format!("{NIXQ_DIR}/agent.key"), &leaf.key_pem)?;
        set_private(&key)?;
        let toml = format!(
            "# agent.toml of e2e host {name}\n\
             listen = [\"0.0.0.0:{AGENT_PORT}\"]\n\
             ca = {ca:?}\n\
             cert = {cert:?}\n\
             key = {key:?}\n\
             {floor}\
             {extra_toml}\n\
             [store]\n\
             force_stdio = true\n\
             [limits]\n\
             idle_timeout_secs = 10\n",
            name = host.name(),
            floor = if extra_toml
                .lines()
                .any(|l| l.trim_start().starts_with("min_free_space"))
            {
                ""
            } else {
                "min_free_space = 0\n"
            },
        );
        Ok(host.write_file(&format!("{NIXQ_DIR}/agent.toml"), toml)?)
    }

    /// Starts `nixq-agent --config CONFIG` on `host` and waits until it
    /// listens.
    pub fn start(host: &Host, config: &Path) -> NixqResult<Self> {
        let proc = spawn_agent(host, config)?;
        Ok(Self {
            host: host.name().to_owned(),
            ip: host.ip(),
            config: config.to_owned(),
            proc,
        })
    }

    /// Stops the agent if it runs (SIGKILL) and starts it again with the
    /// same configuration.
    pub fn restart(&mut self, host: &Host) -> NixqResult<()> {
        self.proc.kill()?;
        self.proc = spawn_agent(host, &self.config)?;
        Ok(())
    }

    /// `nixq://<host name>` (resolved by the farm's `/etc/hosts` on hosts).
    pub fn uri(&self) -> String {
        format!("nixq://{}", self.host)
    }

    /// `nixq://<address>`.
    pub fn ip_uri(&self) -> String {
        format!("nixq://{}", self.ip)
    }

    /// The agent's process (to signal it, read its log, wait for it).
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The agent's log so far.
    pub fn log(&self) -> NixqResult<String> {
        Ok(self.proc.log()?)
    }

    /// The agent's peak resident set (`VmHWM` of `/proc/<pid>/status`), in KiB.
    pub fn peak_rss_kib(&self) -> NixqResult<u64> {
        proc_status_kib(self.proc.pid(), "VmHWM")
    }
}

fn spawn_agent(host: &Host, config: &Path) -> NixqResult<Proc> {
    let mut cmd = host.cmd(crate::nixq_bin("nixq-agent")?);
    cmd.arg("--config").arg(config);
    let mut proc = host.spawn("nixq-agent", cmd)?;
    proc.wait_for_log("listening on", AGENT_START_TIMEOUT)?;
    Ok(proc)
}

/// A `kB` field (`VmHWM`, `VmRSS`) of `/proc/<pid>/status`, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> NixqResult<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("cannot read", &path, e))?;
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse().ok()
        })
        .ok_or_else(|| NixqError::Unexpected(format!("no {field} in {path}")))
}

/// Which way `nixq-copy-closure` copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    To,
    From,
}

impl Direction {
    fn flag(self) -> &'static str {
        match self {
            Self::To => "--to",
            Self::From => "--from",
        }
    }
}

/// The command `nixq-copy-closure --to|--from AGENT --identity … --ca …
/// EXTRA… PATHS…` on `master`.
pub fn copy_command(
    master: &Host,
    creds: &MasterCreds,
    direction: Direction,
    agent_uri: &str,
    paths: &[StorePath],
    extra: &[&str],
) -> NixqResult<Command> {
    let mut cmd = master.cmd(crate::nixq_bin("nixq-copy-closure")?);
    cmd.arg(direction.flag())
        .arg(agent_uri)
        .arg("--identity")
        .arg(&creds.identity)
        .arg("--ca")
        .arg(&creds.ca)
        .args(extra)
        .args(paths.iter().map(StorePath::as_str));
    Ok(cmd)
}

/// Runs [`copy_command`] and checks that it succeeds within [`COPY_TIMEOUT`].
pub fn copy_closure(
    master: &Host,
    creds: &MasterCreds,
    direction: Direction,
    agent_uri: &str,
    paths: &[StorePath],
    extra: &[&str],
) -> NixqResult<std::process::Output> {
    let cmd = copy_command(master, creds, direction, agent_uri, paths, extra)?;
    Ok(master.run_timeout(cmd, COPY_TIMEOUT)?)
}

/// How a command ended, success or not.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The exit code; `None` if a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` on `host` and returns how it ended, failure included (a
/// timeout or a failure to start is still an error).
pub fn run_outcome(host: &Host, cmd: Command, timeout: Duration) -> NixqResult<Outcome> {
    match host.run_timeout(cmd, timeout) {
        Ok(out) => Ok(Outcome {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Err(Error::CommandFailed {
            status,
            stdout,
            stderr,
            ..
        }) => Ok(Outcome {
            code: status.code(),
            stdout,
            stderr,
        }),
        Err(e) => Err(e.into()),
    }
}

/// Runs `f` to completion on a current-thread tokio runtime, on a thread
/// inside `host`'s network namespace: sockets it opens are the host's.
pub fn block_on_in<T: Send>(
    host: &Host,
    f: impl AsyncFnOnce() -> NixqResult<T> + Send,
) -> NixqResult<T> {
    host.in_netns(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NixqError::Runtime)?;
        runtime.block_on(f())
    })?
}

/// The agent on `agent` as an [`AgentTarget`] for `creds`, by address.
pub fn agent_target(creds: &MasterCreds, agent: &Host) -> NixqResult<AgentTarget> {
    let text = format!("nixq://{}:{AGENT_PORT}", agent.ip());
    let uri = MachineUri::parse(&text).map_err(|e| NixqError::Unexpected(e.to_string()))?;
    Ok(AgentTarget {
        uri,
        identity: creds.identity.clone(),
        ca: AgentCa::File(creds.ca.clone()),
        connect_timeout: CONNECT_TIMEOUT,
    })
}

/// Connects from `from` to the agent on `agent` with the master library's
/// client (Hello done), runs `f`, and closes the connection (which drops
/// the connection's claims and GC roots on the agent).
pub fn with_client<T: Send>(
    from: &Host,
    creds: &MasterCreds,
    agent: &Host,
    f: impl AsyncFnOnce(&AgentClient) -> NixqResult<T> + Send,
) -> NixqResult<T> {
    let target = agent_target(creds, agent)?;
    let tls = creds.client_config()?;
    block_on_in(from, async move || {
        let client = AgentClient::connect_with(&target, tls, "nixq-e2e").await?;
        let result = f(&client).await;
        client.close().await;
        result
    })
}

/// The agent's Status (counters included), asked from `from`.
pub fn agent_status(from: &Host, creds: &MasterCreds, agent: &Host) -> NixqResult<AgentStatus> {
    with_client(from, creds, agent, async |client: &AgentClient| {
        Ok(client.status().await?)
    })
}

/// A raw QUIC connection to the agent on `agent` (call inside
/// [`block_on_in`] of a host): no Hello yet. Returns the endpoint too,
/// which must outlive the connection.
pub async fn raw_connect(
    tls: Arc<rustls::ClientConfig>,
    agent: &Host,
) -> NixqResult<(quinn::Endpoint, quinn::Connection)> {
    let endpoint = net::client_endpoint(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), tls)?;
    let addr = SocketAddr::from((agent.ip(), AGENT_PORT));
    let conn = net::connect(&endpoint, addr, &agent.ip().to_string(), CONNECT_TIMEOUT).await?;
    Ok((endpoint, conn))
}

/// The Hello exchange on a raw connection.
pub async fn hello(conn: &quinn::Connection) -> NixqResult<Welcome> {
    let unexpected = |what: String| NixqError::Unexpected(format!("hello: {what}"));
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| unexpected(e.to_string()))?;
    proto::write_frame(&mut send, &Request::Hello(proto::hello("nixq-e2e raw")))
        .await
        .map_err(|e| unexpected(e.to_string()))?;
    send.finish().map_err(|e| unexpected(e.to_string()))?;
    match proto::read_frame::<HelloReply, _>(&mut recv).await {
        Ok(Some(HelloReply::Welcome(welcome))) => Ok(*welcome),
        Ok(other) => Err(unexpected(format!("got {other:?}"))),
        Err(e) => Err(unexpected(e.to_string())),
    }
}

/// One store path's registration, as `nix-store --dump-db` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// NAR hash in base16.
    pub nar_hash: String,
    pub nar_size: u64,
    pub deriver: String,
    pub references: Vec<String>,
}

/// The registrations of `paths` on `host` (one `nix-store --dump-db`).
pub fn registrations(
    host: &Host,
    paths: &[StorePath],
) -> NixqResult<BTreeMap<StorePath, Registration>> {
    let mut args = vec!["--dump-db"];
    args.extend(paths.iter().map(StorePath::as_str));
    let text = host.nix_store(&args)?;
    let bad = |why: String| {
        NixqError::Unexpected(format!("nix-store --dump-db on {}: {why}", host.name()))
    };
    let mut lines = text.lines();
    let mut out = BTreeMap::new();
    while let Some(path) = lines.next() {
        let path = StorePath::parse_any(path).map_err(|e| bad(format!("{path:?}: {e}")))?;
        let mut next = |what: &str| {
            lines
                .next()
                .map(str::to_owned)
                .ok_or_else(|| bad(format!("{path}: no {what}")))
        };
        let nar_hash = next("hash")?;
        let nar_size = next("size")?
            .parse()
            .map_err(|e| bad(format!("{path}: size: {e}")))?;
        let deriver = next("deriver")?;
        let count: usize = next("reference count")?
            .parse()
            .map_err(|e| bad(format!("{path}: reference count: {e}")))?;
        let mut references = (0..count)
            .map(|_| next("reference"))
            .collect::<NixqResult<Vec<_>>>()?;
        references.sort();
        out.insert(
            path,
            Registration {
                nar_hash,
                nar_size,
                deriver,
                references,
            },
        );
    }
    Ok(out)
}

/// Names in `host`'s store directory that are not valid paths: partial or
/// leftover files of an interrupted import. Ignores `.lock` files (listed
/// separately by [`store_lock_files`]) and Nix's `.links` directory.
pub fn stray_store_entries(host: &Host) -> NixqResult<Vec<String>> {
    let valid: std::collections::BTreeSet<String> = host
        .all_valid_paths()?
        .iter()
        .map(|p| p.base_name().to_owned())
        .collect();
    Ok(store_entries(host)?
        .into_iter()
        .filter(|name| !name.ends_with(".lock") && name != ".links" && !valid.contains(name))
        .collect())
}

/// `.lock` files in `host`'s store directory.
pub fn store_lock_files(host: &Host) -> NixqResult<Vec<String>> {
    Ok(store_entries(host)?
        .into_iter()
        .filter(|name| name.ends_with(".lock"))
        .collect())
}

fn store_entries(host: &Host) -> NixqResult<Vec<String>> {
    let dir = host.dir().join("nix/store");
    let entries = std::fs::read_dir(&dir).map_err(|e| Error::io("cannot list", &dir, e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", &dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Bytes on disk under `host`'s copy of `path` (0 if it does not exist):
/// how far an import has got.
pub fn bytes_on_disk(host: &Host, path: &StorePath) -> u64 {
    fn walk(p: &Path) -> u64 {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return 0;
        };
        if meta.is_dir() {
            std::fs::read_dir(p)
                .map(|entries| entries.flatten().map(|e| walk(&e.path())).sum())
                .unwrap_or(0)
        } else {
            meta.len()
        }
    }
    walk(&host.dir().join(path.as_str().trim_start_matches('/')))
}
