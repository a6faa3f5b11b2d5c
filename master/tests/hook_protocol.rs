//! `nixq-build-hook` as Nix sees it: this test plays the calling Nix, byte
//! for byte as nix-interfaces.md §2.3–§2.6 (modern) and §3.1 / seed
//! `003_…` (classic) describe, against the real binary. Machines are either
//! absent, of the wrong system, unreachable, fully booked through Nix's own
//! slot lock files, or a minimal agent written here that only answers the
//! Hello (with a configurable load). No Nix and no real agent are needed;
//! full remote builds are the end-to-end tests' business.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::io::{AsRawFd as _, FromRawFd as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nixq_certs::{Ca, Validity};
use nixq_common::net;
use nixq_common::proto::{self, AgentStatus, HelloReply, Request, Welcome};
use nixq_common::tls::{self, Identity, TrustedCa};

const HOOK: &str = env!("CARGO_BIN_EXE_nixq-build-hook");
const DRV: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hook-test.drv";
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// What Nix writes (§1).

fn put_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
    out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
}

fn put_list(out: &mut Vec<u8>, items: &[&str]) {
    put_u64(out, items.len() as u64);
    for i in items {
        put_str(out, i);
    }
}

fn preamble(builders: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in [
        ("builders", builders),
        ("max-silent-time", "0"),
        ("system", "x86_64-linux"),
        ("system-features", "benchmark big-parallel nixos-test"),
        ("timeout", "0"),
    ] {
        put_u64(&mut out, 1);
        put_str(&mut out, name);
        put_str(&mut out, value);
    }
    put_u64(&mut out, 0);
    out
}

fn try_request(am_willing: bool, system: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_str(&mut out, "try");
    put_u64(&mut out, u64::from(am_willing));
    put_str(&mut out, system);
    put_str(&mut out, DRV);
    put_list(&mut out, &[]);
    out
}

// ---------------------------------------------------------------------------
// The test's world: a temporary state dir, certificates, a machines file.

struct World {
    dir: tempfile::TempDir,
    ca_file: PathBuf,
    master: PathBuf,
    /// The agent's certificate and key (PEM).
    agent: (String, String),
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let validity = Validity::days_from_now(2).expect("validity");
        let ca = Ca::generate("hook-test-ca", validity).expect("ca");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.cert_pem()).expect("write ca");
        let master_leaf = ca.issue_master("master", validity).expect("master");
        let master = dir.path().join("master.pem");
        std::fs::write(&master, master_leaf.combined_pem()).expect("write master");
        let agent_leaf = ca
            .issue_agent(
                "agent",
                &["localhost".to_owned()],
                &[std::net::Ipv4Addr::LOCALHOST.into()],
                validity,
            )
            .expect("agent");
        let agent = (agent_leaf.cert_pem.clone(), agent_leaf.key_pem.clone());
        Self {
            dir,
            ca_file,
            master,
            agent,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn load_dir(&self) -> PathBuf {
        self.state_dir().join("current-load")
    }

    /// A machines file with one `nixq://127.0.0.1:PORT` machine.
    fn machines(&self, port: u16, systems: &str, max_jobs: u32, params: &str) -> (PathBuf, String) {
        let uri = format!("nixq://127.0.0.1:{port}{params}");
        let text = format!(
            "{uri} {systems} {} {max_jobs} 1 - - {}\n",
            self.master.display(),
            self.ca_file.display()
        );
        let path = self.dir.path().join("machines");
        std::fs::write(&path, text).expect("machines");
        (path, uri)
    }

    /// Holds slot `slot` of `uri` as another hook would (§4.2).
    fn hold_slot(&self, uri: &str, slot: u32) -> File {
        std::fs::create_dir_all(self.load_dir()).expect("load dir");
        let name = format!("{}-{slot}", uri.replace('/', "_"));
        let file = File::create(self.load_dir().join(name)).expect("slot file");
        // SAFETY: flock on an fd owned by `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(rc, 0, "lock the slot");
        file
    }
}

/// A minimal agent on 127.0.0.1 that answers Hello with `status`.
struct FakeAgent {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl FakeAgent {
    fn start(world: &World, status: AgentStatus) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let ca = TrustedCa::load(&world.ca_file).expect("ca");
        let identity =
            Identity::from_pem(world.agent.0.as_bytes(), world.agent.1.as_bytes(), "agent")
                .expect("agent identity");
        let config = tls::server_config(&ca, identity).expect("server config");
        let endpoint = runtime.block_on(async {
            net::server_endpoint("127.0.0.1:0".parse().expect("addr"), config).expect("endpoint")
        });
        let addr = endpoint.local_addr().expect("addr");
        runtime.spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let status = status.clone();
                tokio::spawn(async move {
                    let Ok(conn) = net::accept(incoming, WAIT).await else {
                        return;
                    };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let Ok(Some(Request::Hello(hello))) =
                            proto::read_frame::<Request, _>(&mut recv).await
                        else {
                            continue;
                        };
                        let welcome = Welcome {
                            version: proto::negotiate(&hello).expect("version"),
                            agent_version: "fake-agent".into(),
                            store_dir: "/nix/store".into(),
                            systems: vec!["x86_64-linux".into()],
                            features: vec![],
                            status: status.clone(),
                        };
                        let _ =
                            proto::write_frame(&mut send, &HelloReply::Welcome(Box::new(welcome)))
                                .await;
                        let _ = send.finish();
                    }
                });
            }
        });
        Self {
            addr,
            _runtime: runtime,
        }
    }
}

fn usable() -> AgentStatus {
    AgentStatus {
        max_jobs: 2,
        running_builds: 0,
        free_store_bytes: 1 << 40,
        free_space_floor: 1 << 30,
        ..AgentStatus::default()
    }
}

// ---------------------------------------------------------------------------
// The hook process.

/// A pipe: (read end, write end), close-on-exec.
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: both descriptors were just created and are owned here only.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

struct Hook {
    child: Child,
    stdin: Option<ChildStdin>,
    stderr_lines: mpsc::Receiver<String>,
}

impl Drop for Hook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Hook {
    /// Spawns the hook with `args`; `fds` are (child fd number, file) pairs
    /// dup'ed into place in the child.
    fn spawn(world: &World, args: &[&str], env: &[(&str, &Path)], fds: Vec<(i32, File)>) -> Self {
        let mut cmd = Command::new(HOOK);
        cmd.args(args)
            .env_remove("NIX_BUILD_HOOK")
            .env_remove("NIXQ_LOG")
            .env("NIX_STATE_DIR", world.state_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            cmd.env(name, value);
        }
        let raw: Vec<(i32, i32)> = fds.iter().map(|(n, f)| (*n, f.as_raw_fd())).collect();
        // SAFETY: only async-signal-safe dup2 calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for &(target, fd) in &raw {
                    if libc::dup2(fd, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn the hook");
        drop(fds);
        let stdin = child.stdin.take();
        let stderr = child.stderr.take().expect("stderr");
        let (tx, stderr_lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            stderr_lines,
        }
    }

    fn modern(world: &World, builders: &str, fds: Vec<(i32, File)>) -> Self {
        let mut hook = Self::spawn(world, &["3"], &[], fds);
        hook.send(&preamble(builders));
        hook
    }

    fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).expect("write to the hook");
        stdin.flush().expect("flush");
    }

    fn line(&self) -> String {
        self.stderr_lines
            .recv_timeout(WAIT)
            .expect("a line from the hook in time")
    }

    /// The next reply line (`# …`); other lines (messages) are skipped.
    fn reply(&self) -> String {
        loop {
            let line = self.line();
            if line.starts_with("# ") {
                return line;
            }
        }
    }

    /// Closes stdin and waits for the exit.
    fn finish(mut self) -> ExitStatus {
        drop(self.stdin.take());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the hook did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---------------------------------------------------------------------------
// Modern protocol.

#[test]
fn no_machines_declines_permanently() {
    let world = World::new();
    let mut hook = Hook::modern(&world, "", vec![]);
    hook.send(&try_request(true, "x86_64-linux"));
    assert_eq!(hook.reply(), "# decline-permanently");
    assert!(hook.finish().success());

    // The default `@/etc/nix/machines`-style include of a missing file is
    // no machines too (Nix ignores a missing file).
    let missing = format!("@{}/no-such-machines", world.dir.path().display());
    let mut hook = Hook::modern(&world, &missing, vec![]);
    hook.send(&try_request(false, "x86_64-linux"));
    assert_eq!(hook.reply(), "# decline-permanently");
    assert!(hook.finish().success());
}

#[test]
fn wrong_system_declines_and_one_process_serves_many_tries() {
    let world = World::new();
    let (machines, _) = world.machines(9, "aarch64-linux", 1, "");
    let mut hook = Hook::modern(&world, &format!("@{}", machines.display()), vec![]);
    hook.send(&try_request(true, "x86_64-linux"));
    assert_eq!(hook.reply(), "# decline");
    hook.send(&try_request(false, "x86_64-linux"));
    assert_eq!(hook.reply(), "# decline");
    // A tag other than "try" ends the conversation.
    let mut bye = Vec::new();
    put_str(&mut bye, "bye");
    hook.send(&bye);
    assert!(hook.finish().success());
}

#[test]
fn unreachable_machine_is_declined_and_remembered() {
    let world = World::new();
    // Nothing listens there; give up after one second.
    let (machines, uri) = world.machines(9, "x86_64-linux", 1, "?connect-timeout=1");
    let builders = format!("@{}", machines.display());
    let mut hook = Hook::modern(&world, &builders, vec![]);
    hook.send(&try_request(false, "x86_64-linux"));
    // Nix's rule: a machine that cannot be reached is disabled and does not
    // count as the right type, so the request is declined.
    assert_eq!(hook.reply(), "# decline");
    assert!(hook.finish().success());
    let down = std::fs::read_to_string(world.load_dir().join("nixq-machines-down"))
        .expect("the back-off file");
    assert!(down.trim_end().ends_with(&format!(" 1 {uri}")), "{down:?}");

    // The next hook skips it without paying the connection timeout.
    let started = Instant::now();
    let mut hook = Hook::modern(&world, &builders, vec![]);
    hook.send(&try_request(false, "x86_64-linux"));
    assert_eq!(hook.reply(), "# decline");
    assert!(hook.finish().success());
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn all_slots_taken_postpones_unless_nix_can_build_it() {
    let world = World::new();
    let (machines, uri) = world.machines(9, "x86_64-linux", 2, "");
    let _slot0 = world.hold_slot(&uri, 0);
    let _slot1 = world.hold_slot(&uri, 1);
    let mut hook = Hook::modern(&world, &format!("@{}", machines.display()), vec![]);
    let started = Instant::now();
    hook.send(&try_request(false, "x86_64-linux"));
    assert_eq!(hook.reply(), "# postpone");
    // It waited about the hook's slot wait (1.5 s) for a slot first ...
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(10),
        "postponed after {waited:?}"
    );
    // ... and, nothing having freed, postpones the next try at once.
    let started = Instant::now();
    hook.send(&try_request(false, "x86_64-linux"));
    assert_eq!(hook.reply(), "# postpone");
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "took {:?}",
        started.elapsed()
    );
    hook.send(&try_request(true, "x86_64-linux"));
    assert_eq!(hook.reply(), "# decline");
    assert!(hook.finish().success());
}

#[test]
fn a_try_waits_for_a_slot_to_free_and_accepts() {
    let world = World::new();
    let agent = FakeAgent::start(&world, usable());
    let (machines, uri) = world.machines(agent.addr.port(), "x86_64-linux", 1, "");
    // Another hook holds the only slot and exits after 200 ms.
    let slot = world.hold_slot(&uri, 0);
    let release = Duration::from_millis(200);
    let holder = std::thread::spawn(move || {
        std::thread::sleep(release);
        drop(slot);
    });
    let (_log_read, log_write) = pipe();
    let mut hook = Hook::modern(
        &world,
        &format!("@{}", machines.display()),
        vec![(4, log_write)],
    );
    let started = Instant::now();
    hook.send(&try_request(false, "x86_64-linux"));
    assert_eq!(hook.reply(), "# accept");
    assert!(started.elapsed() >= release, "{:?}", started.elapsed());
    assert_eq!(hook.line(), uri);
    holder.join().expect("slot holder");
}

#[test]
fn a_full_agent_postpones() {
    let world = World::new();
    let agent = FakeAgent::start(
        &world,
        AgentStatus {
            running_builds: 2,
            ..usable()
        },
    );
    let (machines, _) = world.machines(agent.addr.port(), "x86_64-linux", 4, "");
    let mut hook = Hook::modern(&world, &format!("@{}", machines.display()), vec![]);
    hook.send(&try_request(false, "x86_64-linux"));
    assert_eq!(hook.reply(), "# postpone");
    assert!(hook.finish().success());
}

#[test]
fn accept_names_the_machine_and_errors_after_it_reach_the_log() {
    let world = World::new();
    let agent = FakeAgent::start(&world, usable());
    let (machines, uri) = world.machines(agent.addr.port(), "x86_64-linux", 1, "");
    let (mut log_read, log_write) = pipe();
    let mut hook = Hook::modern(
        &world,
        &format!("@{}", machines.display()),
        vec![(4, log_write)],
    );
    hook.send(&try_request(false, "x86_64-linux"));
    assert_eq!(hook.reply(), "# accept");
    // The machine name is the very next line (§2.6).
    assert_eq!(hook.line(), uri);
    // Our slot is taken while the hook lives.
    let slot = world
        .load_dir()
        .join(format!("{}-0", uri.replace('/', "_")));
    let file = File::open(&slot).expect("slot file");
    // SAFETY: flock on an fd owned by `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_ne!(rc, 0, "the hook holds its slot");
    drop(file);
    // The job: the derivation does not exist here, so the hook fails after
    // the accept; it must say why on fd 4 and exit 1 (transient).
    let mut job = Vec::new();
    put_list(&mut job, &[]);
    put_list(&mut job, &["out"]);
    hook.send(&job);
    let status = hook.finish();
    assert_eq!(status.code(), Some(1));
    let mut log = String::new();
    log_read.read_to_string(&mut log).expect("log");
    assert!(log.contains("error") && log.contains(DRV), "{log:?}");
}

// ---------------------------------------------------------------------------
// Classic protocol (Nix 0.10 – 0.12).

/// Runs a classic hook: (its fd 3 reply reader, fd 4 writer, the hook).
fn classic(
    world: &World,
    machines: Option<&Path>,
    can_build_more: &str,
) -> (BufReader<File>, File, Hook) {
    let (reply_read, reply_write) = pipe();
    let (go_read, go_write) = pipe();
    let hook_var = PathBuf::from(HOOK);
    let load = world.load_dir();
    let mut env: Vec<(&str, &Path)> =
        vec![("NIX_BUILD_HOOK", &hook_var), ("NIX_CURRENT_LOAD", &load)];
    if let Some(m) = machines {
        env.push(("NIX_REMOTE_SYSTEMS", m));
    }
    let hook = Hook::spawn(
        world,
        &[can_build_more, "x86_64-linux", "x86_64-linux", DRV],
        &env,
        vec![(3, reply_write), (4, go_read)],
    );
    (BufReader::new(reply_read), go_write, hook)
}

fn read_reply(reader: &mut BufReader<File>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("fd 3");
    line
}

#[test]
fn classic_declines_without_machines() {
    let world = World::new();
    let (mut reply, _go, hook) = classic(&world, None, "1");
    assert_eq!(read_reply(&mut reply), "decline\n");
    assert!(hook.finish().success());
}

#[test]
fn classic_postpones_when_slots_are_taken() {
    let world = World::new();
    let (machines, uri) = world.machines(9, "x86_64-linux", 1, "");
    let _slot = world.hold_slot(&uri, 0);
    let (mut reply, _go, hook) = classic(&world, Some(&machines), "0");
    assert_eq!(read_reply(&mut reply), "postpone\n");
    assert!(hook.finish().success());
}

#[test]
fn classic_cancel_ends_the_hook_cleanly() {
    let world = World::new();
    let agent = FakeAgent::start(&world, usable());
    let (machines, _) = world.machines(agent.addr.port(), "x86_64-linux", 1, "");
    let (mut reply, mut go, hook) = classic(&world, Some(&machines), "0");
    assert_eq!(read_reply(&mut reply), "accept\n");
    go.write_all(b"cancel\n").expect("cancel");
    let status = hook.finish();
    assert!(status.success(), "{status:?}");
}
