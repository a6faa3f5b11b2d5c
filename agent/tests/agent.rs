//! The real `nixq-agent` binary over a private store: its own `/nix` in a
//! private mount namespace (`unshare -m`, nix-interfaces.md §11), QUIC on
//! 127.0.0.1, certificates from `nixq-certs`, and a tiny master written here
//! with `nixq_common::proto`.
//!
//! Needs root, `unshare`, `nsenter` and Nix. When they are missing the tests
//! fail with the reason (a skipped test would count as a pass).

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nixq_certs::{Ca, Validity};
use nixq_common::drv::Derivation;
use nixq_common::hash::NarHash;
use nixq_common::path_info::PathInfo;
use nixq_common::proto::{
    self, read_frame, write_frame, BuildEvent, BuildOutcome, BuildSettings, Compression, Download,
    DownloadItem, DownloadReply, HelloReply, PathBatch, PathState, QueryMissing, QueryMissingReply,
    Refusal, Request, StatusReply, Upload, UploadItem, UploadOutcome, UploadReply, WaitFor,
    WaitOutcome, WaitReply,
};
use nixq_common::store_path::StorePath;
use nixq_common::transfer::receive::BodyReader;
use nixq_common::{net, tls};

#[path = "../../common/tests/support/local_nix.rs"]
mod local_nix;
use local_nix::{nix, store_path, NIX_CONFIG};

/// A closure with references (c → b → a, c → a, c → itself), plus `lone`
/// for the corruption test and `build` for the build test (instantiated
/// only).
const EXPR: &str = r#"
let
  sys = builtins.currentSystem;
  a = derivation { name = "nixq-at-a"; system = sys; builder = "/bin/sh";
                   args = [ "-c" "echo a > $out" ]; };
  b = derivation { name = "nixq-at-b"; system = sys; builder = "/bin/sh";
                   args = [ "-c" "echo ${a} > $out" ]; };
  c = derivation { name = "nixq-at-c"; system = sys; builder = "/bin/sh";
                   args = [ "-c" "read x < ${b}; echo \"$x ${b} $out\" > $out" ]; };
in {
  inherit c;
  lone = derivation { name = "nixq-at-lone"; system = sys; builder = "/bin/sh";
                      args = [ "-c" "echo lonely path contents > $out" ]; };
  build = derivation { name = "nixq-at-build"; system = sys; builder = "/bin/sh";
                       args = [ "-c" "echo agent-build-log; echo built > $out" ]; };
  silent = derivation { name = "nixq-at-silent"; system = sys; builder = "/bin/sh";
                        args = [ "-c" "echo going-quiet; exec /bin/sleep 37.5" ]; };
  stuck1 = derivation { name = "nixq-at-stuck-1"; system = sys; builder = "/bin/sh";
                        args = [ "-c" "echo stuck-started; exec /bin/sleep 41.25" ]; };
  stuck2 = derivation { name = "nixq-at-stuck-2"; system = sys; builder = "/bin/sh";
                        args = [ "-c" "echo stuck-started; exec /bin/sleep 41.25" ]; };
}
"#;

/// Fails (never skips) unless the machine can run these tests.
fn require_nix() {
    local_nix::require(
        "agent tests",
        true,
        &[
            "nix",
            "nix-store",
            "nix-build",
            "nix-instantiate",
            "unshare",
            "nsenter",
        ],
    );
}

/// A path of the outer store with its info and NAR.
#[derive(Clone)]
struct Item {
    info: PathInfo,
    nar: Vec<u8>,
}

fn item(path: &StorePath) -> Item {
    let p = path.as_str();
    let references: BTreeSet<StorePath> = nix("nix-store", &["-q", "--references", p])
        .lines()
        .map(store_path)
        .collect();
    let nar = Command::new("nix-store")
        .args(["--dump", p])
        .output()
        .expect("dump")
        .stdout;
    let hash = NarHash::parse(nix("nix-store", &["-q", "--hash", p]).trim()).expect("hash");
    assert_eq!(hash, NarHash::of(&nar));
    Item {
        info: PathInfo {
            path: path.clone(),
            deriver: None,
            nar_hash: hash,
            nar_size: nar.len() as u64,
            references,
            registration_time: 0,
            ultimate: false,
            sigs: vec![],
            ca: None,
        },
        nar,
    }
}

struct Fixture {
    /// a, b, c: references first.
    closure: Vec<Item>,
    lone: Item,
    build_drv: StorePath,
    /// Prints a line, then sleeps: for max-silent-time.
    silent_drv: StorePath,
    /// Print a line, then sleep (`sleep 41.25`) with no timeout: for
    /// cancellation.
    stuck_drvs: [StorePath; 2],
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let c = store_path(&nix("nix-build", &["--no-out-link", "-E", EXPR, "-A", "c"]));
        let lone = store_path(&nix(
            "nix-build",
            &["--no-out-link", "-E", EXPR, "-A", "lone"],
        ));
        let build_drv = store_path(&nix("nix-instantiate", &["-E", EXPR, "-A", "build"]));
        let silent_drv = store_path(&nix("nix-instantiate", &["-E", EXPR, "-A", "silent"]));
        let stuck_drvs = ["stuck1", "stuck2"]
            .map(|a| store_path(&nix("nix-instantiate", &["-E", EXPR, "-A", a])));
        let order = nix("nix-store", &["-q", "--requisites", c.as_str()]);
        let closure = order.lines().map(|l| item(&store_path(l))).collect();
        Fixture {
            closure,
            lone: item(&lone),
            build_drv,
            silent_drv,
            stuck_drvs,
        }
    })
}

/// Certificates of one test: CA, agent (127.0.0.1), master.
struct Pki {
    dir: tempfile::TempDir,
    /// The master's certificate and key (PEM).
    master: (String, String),
    ca: tls::TrustedCa,
}

fn pki() -> Pki {
    let validity = || Validity::days_from_now(1).expect("validity");
    let ca = Ca::generate("nixq test CA", validity()).expect("CA");
    let agent = ca
        .issue_agent(
            "agent",
            &[],
            &["127.0.0.1".parse().expect("ip")],
            validity(),
        )
        .expect("agent cert");
    let master = ca.issue_master("master", validity()).expect("master cert");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).expect("write");
    std::fs::write(dir.path().join("agent.crt"), &agent.cert_pem).expect("write");
    std::fs::write(dir.path().join("agent.key"), &agent.key_pem).expect("write");
    Pki {
        master: (master.cert_pem, master.key_pem),
        ca: tls::TrustedCa::from_pem(ca.cert_pem().as_bytes(), "test").expect("ca"),
        dir,
    }
}

/// The agent process in its own mount namespace with its own `/nix`.
/// Dropping it kills the agent; its namespace goes with it.
struct Agent {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _root: tempfile::TempDir,
    pki: Pki,
}

impl Agent {
    fn start() -> Self {
        Self::start_with("")
    }

    /// Starts the agent with `extra` flags (shell words).
    fn start_with(extra: &str) -> Self {
        let pki = pki();
        let root = tempfile::tempdir().expect("tempdir");
        let nix_dir = root.path().join("nix");
        std::fs::create_dir_all(nix_dir.join("store")).expect("mkdir");
        std::fs::create_dir_all(nix_dir.join("var/nix")).expect("mkdir");
        let d = pki.dir.path();
        let script = format!(
            "mount --make-rprivate / && mount --bind {nix} /nix && nix-store --init && \
             exec {agent} --config /dev/null --listen 127.0.0.1:0 --ca {ca} --cert {cert} \
             --key {key} --stdio --min-free-space 0 --max-builds 2 -v {extra}",
            nix = nix_dir.display(),
            agent = env!("CARGO_BIN_EXE_nixq-agent"),
            ca = d.join("ca.crt").display(),
            cert = d.join("agent.crt").display(),
            key = d.join("agent.key").display(),
        );
        let mut child = Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .env("NIX_CONFIG", NIX_CONFIG)
            .env_remove("NIX_REMOTE")
            .env(
                "NIXQ_LOG",
                std::env::var("NIXQ_TEST_AGENT_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let stderr = child.stderr.take().expect("piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("listening on ") {
                    let addr = line[at + 13..].split_whitespace().next().unwrap_or("");
                    let _ = tx.send(addr.trim_end_matches(',').to_owned());
                }
                sink.lock().expect("log").push(line);
            }
        });
        let mut agent = Self {
            child,
            addr: "127.0.0.1:1".parse().expect("addr"),
            log,
            _root: root,
            pki,
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => agent.addr = addr.parse().expect("listening address"),
            Err(_) => panic!("the agent did not start:\n{}", agent.logs()),
        }
        agent
    }

    fn logs(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// Runs a command inside the agent's mount namespace.
    fn in_ns(&self, args: &[&str]) -> std::process::Output {
        let pid = self.child.id().to_string();
        Command::new("nsenter")
            .args(["-t", &pid, "-m", "--"])
            .args(args)
            .env_remove("NIX_REMOTE")
            .output()
            .expect("nsenter")
    }

    fn is_valid(&self, path: &StorePath) -> bool {
        self.in_ns(&["nix-store", "--check-validity", path.as_str()])
            .status
            .success()
    }

    fn exists(&self, path: &StorePath) -> bool {
        self.in_ns(&["test", "-e", path.as_str()]).status.success()
    }

    /// SIGTERM, then the exit status (within `limit`).
    fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    async fn connect(&self) -> Master {
        let master = self.connect_only().await;
        let (mut send, mut recv) = master
            .open(&Request::Hello(proto::hello("agent-test")))
            .await;
        let _ = send.finish();
        match read_frame::<HelloReply, _>(&mut recv).await.expect("reply") {
            Some(HelloReply::Welcome(w)) => {
                assert_eq!(w.store_dir, "/nix/store");
                assert!(!w.systems.is_empty(), "systems from the local Nix");
            }
            other => panic!("no welcome: {other:?}"),
        }
        master
    }

    /// A connection without the Hello.
    async fn connect_only(&self) -> Master {
        self.try_connect().await.expect("connect")
    }

    async fn try_connect(&self) -> Result<Master, net::ConnectError> {
        let (cert, key) = &self.pki.master;
        let identity =
            tls::Identity::from_pem(cert.as_bytes(), key.as_bytes(), "test").expect("identity");
        let tls = tls::client_config(&self.pki.ca, identity).expect("client tls");
        let endpoint =
            net::client_endpoint("127.0.0.1:0".parse().expect("addr"), tls).expect("endpoint");
        let conn = net::connect(&endpoint, self.addr, "127.0.0.1", Duration::from_secs(10)).await?;
        Ok(Master {
            conn,
            _endpoint: endpoint,
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.logs());
        }
    }
}

/// A minimal master over one connection.
struct Master {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl Master {
    async fn open(&self, request: &Request) -> (quinn::SendStream, quinn::RecvStream) {
        let (mut send, recv) = self.conn.open_bi().await.expect("open stream");
        write_frame(&mut send, request).await.expect("request");
        (send, recv)
    }

    async fn query_missing(&self, paths: &[StorePath], claim: bool) -> Vec<PathState> {
        let (mut send, mut recv) = self
            .open(&Request::QueryMissing(QueryMissing { claim }))
            .await;
        let mut states = Vec::new();
        for batch in PathBatch::split(paths) {
            write_frame(&mut send, &batch).await.expect("batch");
            match read_frame::<QueryMissingReply, _>(&mut recv).await {
                Ok(Some(QueryMissingReply::States(s))) => states.extend(s),
                other => panic!("query missing: {other:?}"),
            }
        }
        let _ = send.finish();
        states
    }

    /// Uploads `items`; returns the outcomes in order.
    async fn upload(&self, items: &[Item], compression: Compression) -> Vec<UploadOutcome> {
        let (mut send, mut recv) = self.open(&Request::Upload(Upload { compression })).await;
        let mut body = Vec::new();
        for item in items {
            body.extend(
                proto::frame::encode_to_vec(&UploadItem::Path(item.info.clone())).expect("item"),
            );
            body.extend_from_slice(&item.nar);
        }
        body.extend(proto::frame::encode_to_vec(&UploadItem::End).expect("end"));
        if let Compression::Zstd { level } = compression {
            body = zstd::encode_all(&body[..], level).expect("compress");
        }
        let writer = async {
            // The agent may stop reading after a failed item.
            let _ = send.write_all(&body).await;
            let _ = send.finish();
        };
        let reader = async {
            let mut outcomes = Vec::new();
            loop {
                match read_frame::<UploadReply, _>(&mut recv).await {
                    Ok(Some(UploadReply::Result { index, outcome })) => {
                        assert_eq!(index as usize, outcomes.len());
                        outcomes.push(outcome);
                    }
                    Ok(Some(UploadReply::Done)) => return outcomes,
                    other => panic!("upload reply: {other:?}"),
                }
            }
        };
        let ((), outcomes) = tokio::join!(writer, reader);
        outcomes
    }

    async fn wait_for(&self, paths: &[StorePath]) -> Vec<WaitOutcome> {
        let (mut send, mut recv) = self
            .open(&Request::WaitFor(WaitFor {
                paths: paths.to_vec(),
            }))
            .await;
        let _ = send.finish();
        let mut outcomes = vec![None; paths.len()];
        loop {
            match read_frame::<WaitReply, _>(&mut recv).await {
                Ok(Some(WaitReply::Settled { index, outcome })) => {
                    outcomes[index as usize] = Some(outcome);
                }
                Ok(Some(WaitReply::Done)) => break,
                other => panic!("wait reply: {other:?}"),
            }
        }
        outcomes.into_iter().map(|o| o.expect("settled")).collect()
    }

    /// Downloads `paths`: (info, NAR) per path, `None` for one not valid.
    async fn download(
        &self,
        paths: &[StorePath],
        compression: Compression,
    ) -> Vec<Option<(PathInfo, Vec<u8>)>> {
        let (mut send, mut recv) = self
            .open(&Request::Download(Download {
                paths: paths.to_vec(),
                compression,
            }))
            .await;
        let _ = send.finish();
        match read_frame::<DownloadReply, _>(&mut recv).await {
            Ok(Some(DownloadReply::Sending)) => {}
            other => panic!("download reply: {other:?}"),
        }
        let mut body = BodyReader::new(recv, compression);
        let mut got = Vec::new();
        loop {
            match body.read_item::<DownloadItem>().await.expect("item") {
                Some(DownloadItem::Path(info)) => {
                    let mut nar = Vec::new();
                    while (nar.len() as u64) < info.nar_size {
                        let left = info.nar_size - nar.len() as u64;
                        nar.extend_from_slice(&body.next_chunk(left).await.expect("NAR"));
                    }
                    got.push(Some((info, nar)));
                }
                Some(DownloadItem::NotValid(_)) => got.push(None),
                Some(DownloadItem::End) => return got,
                None => panic!("the body ended without End"),
            }
        }
    }

    async fn status(&self) -> proto::AgentStatus {
        let (mut send, mut recv) = self.open(&Request::Status).await;
        let _ = send.finish();
        match read_frame::<StatusReply, _>(&mut recv).await {
            Ok(Some(StatusReply::Status(s))) => s,
            other => panic!("status: {other:?}"),
        }
    }
}

fn paths(items: &[Item]) -> Vec<StorePath> {
    items.iter().map(|i| i.info.path.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_claims_wait_and_corruption() {
    require_nix();
    let fx = fixture();
    let mut agent = Agent::start();
    let m1 = agent.connect().await;
    let m2 = agent.connect().await;
    let all = paths(&fx.closure);
    let (a_b, c) = fx.closure.split_at(2);

    // m1 claims the closure; m2 sees it in flight.
    assert_eq!(
        m1.query_missing(&all, true).await,
        vec![PathState::Missing; 3]
    );
    assert_eq!(
        m2.query_missing(&all, true).await,
        vec![PathState::InFlight; 3]
    );

    // a and b, uncompressed; m2 waits for c while m1 sends it compressed.
    assert_eq!(
        m1.upload(a_b, Compression::None).await,
        vec![UploadOutcome::Stored; 2]
    );
    let c_path = paths(c);
    let (waited, uploaded) = tokio::join!(m2.wait_for(&c_path), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        m1.upload(c, Compression::Zstd { level: 3 }).await
    });
    assert_eq!(uploaded, vec![UploadOutcome::Stored]);
    assert_eq!(waited, vec![WaitOutcome::Valid]);
    assert_eq!(
        m2.query_missing(&all, true).await,
        vec![PathState::Valid; 3]
    );

    for item in &fx.closure {
        let p = item.info.path.as_str();
        let verify = agent.in_ns(&["nix-store", "--verify-path", p]);
        assert!(verify.status.success(), "verify {p}: {verify:?}");
        let refs = agent.in_ns(&["nix-store", "-q", "--references", p]);
        let refs: BTreeSet<StorePath> = String::from_utf8_lossy(&refs.stdout)
            .lines()
            .map(store_path)
            .collect();
        assert_eq!(refs, item.info.references, "references of {p}");
    }

    // Back again, compressed, with a path the agent does not have.
    let mut wanted = all.clone();
    wanted.push(fx.lone.info.path.clone());
    let downloaded = m2.download(&wanted, Compression::Zstd { level: 1 }).await;
    assert_eq!(downloaded.len(), 4);
    assert!(downloaded[3].is_none(), "lone is not on the agent yet");
    for (item, got) in fx.closure.iter().zip(&downloaded) {
        let (info, nar) = got.as_ref().expect("valid on the agent");
        assert_eq!(info.path, item.info.path);
        assert_eq!(info.nar_hash, item.info.nar_hash);
        assert_eq!(info.references, item.info.references);
        assert!(*nar == item.nar, "NAR of {}", info.path);
    }

    // Sent again: already valid, the bytes are dropped.
    assert_eq!(
        m2.upload(&fx.closure[..1], Compression::None).await,
        vec![UploadOutcome::AlreadyValid]
    );

    // A corrupted NAR (same size, one byte flipped in the file contents).
    let mut bad = fx.lone.clone();
    let at = bad
        .nar
        .windows(6)
        .position(|w| w == b"lonely")
        .expect("contents in the NAR");
    bad.nar[at] ^= 0x20;
    let outcomes = m1.upload(&[bad], Compression::None).await;
    assert!(
        matches!(outcomes[..], [UploadOutcome::HashMismatch { expected, .. }] if expected == fx.lone.info.nar_hash),
        "{outcomes:?}"
    );
    assert!(!agent.is_valid(&fx.lone.info.path));
    assert!(
        !agent.exists(&fx.lone.info.path),
        "nothing restored is left"
    );

    // A reference that is neither valid nor being sent.
    let mut orphan = fx.lone.clone();
    orphan.info.references.insert(store_path(
        "/nix/store/00000000000000000000000000000000-missing",
    ));
    let outcomes = m1.upload(&[orphan], Compression::None).await;
    assert!(
        matches!(outcomes[..], [UploadOutcome::ReferenceNotValid { .. }]),
        "{outcomes:?}"
    );
    assert!(!agent.exists(&fx.lone.info.path));

    // The claim of a connection that goes away passes to a waiter.
    let lone = vec![fx.lone.info.path.clone()];
    assert_eq!(
        m1.query_missing(&lone, true).await,
        vec![PathState::Missing]
    );
    assert_eq!(
        m2.query_missing(&lone, true).await,
        vec![PathState::InFlight]
    );
    let (sent_it, ()) = tokio::join!(m2.wait_for(&lone), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        m1.conn.close(0u32.into(), b"bye");
    });
    assert_eq!(sent_it, vec![WaitOutcome::SendIt]);
    assert_eq!(
        m2.upload(std::slice::from_ref(&fx.lone), Compression::None)
            .await,
        vec![UploadOutcome::Stored]
    );
    assert!(agent.is_valid(&fx.lone.info.path));

    // An upload cut off in the middle of a NAR leaves nothing behind.
    let cut = synthetic("nixq-at-cut", 7, 4 << 20);
    let (mut send, _recv) = m2
        .open(&Request::Upload(Upload {
            compression: Compression::None,
        }))
        .await;
    write_frame(&mut send, &UploadItem::Path(cut.info.clone()))
        .await
        .expect("item");
    send.write_all(&cut.nar[..cut.nar.len() / 2])
        .await
        .expect("half the NAR");
    let path = cut.info.path.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.exists(&path) {
        assert!(Instant::now() < deadline, "the restore never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send.reset(0u32.into()).expect("reset");
    while agent.exists(&path) {
        assert!(
            Instant::now() < deadline,
            "the partial restore was not removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!agent.is_valid(&path));

    let counters = m2.status().await.counters;
    assert_eq!(counters.paths_received, 4, "{counters:?}");
    assert_eq!(counters.paths_received_already_valid, 1, "{counters:?}");
    assert_eq!(counters.uploads_rejected, 2, "{counters:?}");
    assert_eq!(counters.claim_waits, 2, "{counters:?}");
    assert_eq!(counters.paths_sent, 3, "{counters:?}");

    drop(m2);
    let status = agent.terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM: {status:?}\n{}",
        agent.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_with_live_log() {
    require_nix();
    let fx = fixture();
    let agent = Agent::start();
    let master = agent.connect().await;
    let text = std::fs::read(fx.build_drv.as_path()).expect("read .drv");
    let drv = Derivation::parse(&text).expect("parse .drv");
    let basic = drv.to_basic(&BTreeSet::new());
    let out = basic.outputs["out"].path.clone().expect("output path");
    let (mut send, mut recv) = master
        .open(&Request::Build(Box::new(proto::Build {
            drv_path: fx.build_drv.clone(),
            drv: basic,
            settings: BuildSettings {
                timeout_secs: 60,
                max_silent_secs: 60,
                build_cores: 1,
            },
        })))
        .await;
    let _ = send.finish();
    let mut log = Vec::new();
    let outcome = loop {
        match read_frame::<BuildEvent, _>(&mut recv).await {
            Ok(Some(BuildEvent::Started)) => {}
            Ok(Some(BuildEvent::Log(chunk))) => log.extend(chunk),
            Ok(Some(BuildEvent::Outcome(outcome))) => break outcome,
            other => panic!("build event: {other:?}"),
        }
    };
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("agent-build-log"), "log: {log}");
    match outcome {
        BuildOutcome::Built { outputs } => assert_eq!(outputs["out"].path, out),
        other => panic!("build failed: {other:?}"),
    }
    assert!(agent.is_valid(&out));
    let counters = master.status().await.counters;
    assert_eq!((counters.builds_started, counters.builds_succeeded), (1, 1));
    assert_eq!(counters.peak_running_builds, 1);

    // max-silent-time: the agent stops the build itself and says TimedOut;
    // the builder does not outlive it.
    let text = std::fs::read(fx.silent_drv.as_path()).expect("read .drv");
    let drv = Derivation::parse(&text).expect("parse .drv");
    let start = Instant::now();
    let (mut send, mut recv) = master
        .open(&Request::Build(Box::new(proto::Build {
            drv_path: fx.silent_drv.clone(),
            drv: drv.to_basic(&BTreeSet::new()),
            settings: BuildSettings {
                timeout_secs: 0,
                max_silent_secs: 1,
                build_cores: 1,
            },
        })))
        .await;
    let _ = send.finish();
    let outcome = loop {
        match read_frame::<BuildEvent, _>(&mut recv).await {
            Ok(Some(BuildEvent::Outcome(outcome))) => break outcome,
            Ok(Some(_)) => {}
            other => panic!("build event: {other:?}"),
        }
    };
    assert!(
        matches!(outcome, BuildOutcome::TimedOut { .. }),
        "{outcome:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = Command::new("pgrep")
            .args(["-f", "sleep 37.5"])
            .output()
            .expect("pgrep");
        if !left.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the builder outlived the build");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a build of `drv` with no time limits and waits until its builder
/// has printed its first line.
async fn start_stuck_build(
    master: &Master,
    drv_path: &StorePath,
) -> (quinn::SendStream, quinn::RecvStream) {
    let text = std::fs::read(drv_path.as_path()).expect("read .drv");
    let drv = Derivation::parse(&text).expect("parse .drv");
    let (mut send, mut recv) = master
        .open(&Request::Build(Box::new(proto::Build {
            drv_path: drv_path.clone(),
            drv: drv.to_basic(&BTreeSet::new()),
            settings: BuildSettings {
                timeout_secs: 0,
                max_silent_secs: 0,
                build_cores: 1,
            },
        })))
        .await;
    let _ = send.finish();
    let mut log = Vec::new();
    let deadline = Duration::from_secs(30);
    tokio::time::timeout(deadline, async {
        while !String::from_utf8_lossy(&log).contains("stuck-started") {
            match read_frame::<BuildEvent, _>(&mut recv).await {
                Ok(Some(BuildEvent::Started)) => {}
                Ok(Some(BuildEvent::Log(chunk))) => log.extend(chunk),
                other => panic!("build event: {other:?}"),
            }
        }
    })
    .await
    .expect("the builder started");
    (send, recv)
}

/// Waits until no builder of the stuck derivations runs (any agent's).
fn stuck_builders_gone(within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let left = Command::new("pgrep")
            .args(["-f", "sleep 41.25"])
            .output()
            .expect("pgrep");
        if !left.status.success() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn running_builds_drop_to_zero(master: &Master, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let running = master.status().await.running_builds;
        if running == 0 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{running} builds still running {within:?} after the cancel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_builds_free_their_slot_and_die() {
    require_nix();
    let fx = fixture();
    let mut agent = Agent::start();
    let master = agent.connect().await;
    let other = agent.connect().await;

    // Both slots (--max-builds 2) taken: one cancelled the way the hook's
    // BuildStream::cancel does (reset + STOP_SENDING), the other by closing
    // its connection.
    let (mut send, mut recv) = start_stuck_build(&master, &fx.stuck_drvs[0]).await;
    let _held = start_stuck_build(&other, &fx.stuck_drvs[1]).await;
    assert_eq!(master.status().await.running_builds, 2);
    let code = quinn::VarInt::from_u32(proto::ErrorCode::Cancelled.code());
    let _ = send.reset(code);
    let _ = recv.stop(code);
    other.conn.close(code, b"cancelled");
    let freed = running_builds_drop_to_zero(&master, Duration::from_secs(3)).await;
    assert!(
        stuck_builders_gone(Duration::from_secs(5)),
        "a cancelled builder outlived its build"
    );

    // The slots are free at once: two new builds start (not Busy). Only a
    // STOP_SENDING this time (the request side is finished already).
    let (_, mut recv) = start_stuck_build(&master, &fx.stuck_drvs[0]).await;
    let (_, mut recv2) = start_stuck_build(&master, &fx.stuck_drvs[1]).await;
    let _ = recv.stop(code);
    let _ = recv2.stop(code);
    let freed_again = running_builds_drop_to_zero(&master, Duration::from_secs(3)).await;
    assert!(stuck_builders_gone(Duration::from_secs(5)));
    let counters = master.status().await.counters;
    assert_eq!(counters.builds_started, 4);
    eprintln!("slots freed {freed:?} and {freed_again:?} after the cancels");

    // Nothing left to wait for: SIGTERM stops the agent promptly.
    let start = Instant::now();
    let status = agent
        .terminate(Duration::from_secs(8))
        .expect("the agent exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals() {
    require_nix();
    // Hello first.
    let agent = Agent::start();
    let master = agent.connect_only().await;
    let (mut send, mut recv) = master.open(&Request::Status).await;
    let _ = send.finish();
    match read_frame::<StatusReply, _>(&mut recv).await {
        Ok(Some(StatusReply::Refused(Refusal::HelloFirst))) => {}
        other => panic!("expected HelloFirst, got {other:?}"),
    }
    drop(agent);

    // A master whose name is not allowed is turned away at once.
    let agent = Agent::start_with("--allow-master someone-else");
    // The agent closes the connection right after the handshake; `connect`
    // waits for the handshake's confirmation, so it sees the close itself.
    let refused = match agent.try_connect().await {
        Err(e) => e.to_string(),
        Ok(master) => tokio::time::timeout(Duration::from_secs(5), master.conn.closed())
            .await
            .expect("closed by the agent")
            .to_string(),
    };
    assert!(refused.contains("master not allowed"), "{refused}");
    // The agent logs the refusal after closing the connection: give the
    // line a moment (bounded) to reach its log.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.logs().contains("not in allowed_masters") {
        assert!(
            Instant::now() < deadline,
            "the agent did not log the refusal: {}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A NAR of one regular file with `len` bytes of cheap pseudo-random data,
/// under a made-up store path (registration does not check path hashes).
fn synthetic(name: &str, seed: u64, len: usize) -> Item {
    let mut contents = vec![0u8; len];
    let mut x = seed | 1;
    for chunk in contents.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let mut nar = Vec::with_capacity(len + 200);
    for token in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
    ] {
        put_str(&mut nar, token);
    }
    put_str(&mut nar, &contents);
    put_str(&mut nar, b")");
    const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let hash: String = (0..32)
        .map(|i| NIX32[((seed as usize).wrapping_mul(31) + i * 7) % 32] as char)
        .collect();
    let path = store_path(&format!("/nix/store/{hash}-{name}"));
    Item {
        info: PathInfo {
            path,
            deriver: None,
            nar_hash: NarHash::of(&nar),
            nar_size: nar.len() as u64,
            references: BTreeSet::new(),
            registration_time: 0,
            ultimate: false,
            sigs: vec![],
            ca: None,
        },
        nar,
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len().next_multiple_of(8), 0);
}

/// Receive throughput of the agent over loopback QUIC (client in this
/// process): one 512 MiB path, 4 parallel streams of 128 MiB, 2000 small
/// paths. Run with `cargo test --release -p nixq-agent --test agent
/// throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn throughput() {
    require_nix();
    let agent = Agent::start();
    let master = agent.connect().await;
    let mb = |bytes: u64, secs: f64| bytes as f64 / secs / 1e6;

    let big = synthetic("nixq-bench-big", 1, 512 << 20);
    let start = Instant::now();
    let out = master
        .upload(std::slice::from_ref(&big), Compression::None)
        .await;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(out, vec![UploadOutcome::Stored]);
    println!(
        "one 512 MiB path: {secs:.2} s, {:.0} MB/s",
        mb(big.info.nar_size, secs)
    );

    let parts: Vec<Item> = (0..4)
        .map(|i| synthetic(&format!("nixq-bench-part{i}"), 10 + i, 128 << 20))
        .collect();
    let start = Instant::now();
    let uploads = parts
        .iter()
        .map(|p| master.upload(std::slice::from_ref(p), Compression::None));
    let results = futures_join_all(uploads).await;
    let secs = start.elapsed().as_secs_f64();
    assert!(results.iter().all(|r| r == &vec![UploadOutcome::Stored]));
    let total: u64 = parts.iter().map(|p| p.info.nar_size).sum();
    println!(
        "4 parallel streams of 128 MiB: {secs:.2} s, {:.0} MB/s",
        mb(total, secs)
    );

    let small: Vec<Item> = (0..2000)
        .map(|i| synthetic(&format!("nixq-bench-small{i}"), 1000 + i, 4096))
        .collect();
    let start = Instant::now();
    // As a master does: one round trip to learn what is missing (which
    // claims it), then the upload.
    let missing = master.query_missing(&paths(&small), true).await;
    assert!(missing.iter().all(|s| *s == PathState::Missing));
    let out = master.upload(&small, Compression::None).await;
    let secs = start.elapsed().as_secs_f64();
    assert!(out.iter().all(|o| *o == UploadOutcome::Stored), "{out:?}");
    println!("2000 paths of 4 KiB in one stream: {secs:.2} s");
    for line in agent
        .logs()
        .lines()
        .filter(|l| l.contains("upload body read"))
    {
        println!("  {line}");
    }
    if let Ok(file) = std::env::var("NIXQ_TEST_AGENT_LOG_FILE") {
        std::fs::write(file, agent.logs()).expect("write log");
    }
    let rss = agent.in_ns(&[
        "sh",
        "-c",
        &format!("grep VmHWM /proc/{}/status", agent.child.id()),
    ]);
    println!("agent {}", String::from_utf8_lossy(&rss.stdout).trim());
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
