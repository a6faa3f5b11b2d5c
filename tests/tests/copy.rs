//! `nixq-copy-closure` against real `nixq-agent`s: each host its own network
//! and its own `/nix` with Nix 2.8, real QUIC and mutual TLS with
//! certificates from `nixq-certs`.
//!
//! What each test proves:
//! * [`to_and_from_uncompressed`], [`to_and_from_zstd`]: a closure (large
//!   files, symlinks, executables, several outputs) arrives valid, with the
//!   same NAR hashes, sizes, derivers and references, and passes
//!   `nix-store --verify --check-contents`, in both directions; a second
//!   `--to` sends nothing; the agent's counters match.
//! * [`from_as_a_user_goes_through_the_daemon`]: `--from` by a user other
//!   than root imports through the master's Nix daemon, which checks
//!   signatures for users it does not trust.
//! * [`concurrent_senders_send_each_path_once`]: 4 copies of overlapping
//!   closures from two masters at once all succeed, and the agent received
//!   each distinct path exactly once.
//! * [`killed_sender_leaves_nothing_and_a_rerun_completes`],
//!   [`stopped_or_killed_agent_leaves_nothing_and_a_rerun_completes`]:
//!   interrupting a 200 MiB transfer at either end leaves no partial path.
//! * [`corrupt_nars_are_rejected_and_leave_nothing`]: hand-made uploads whose
//!   NAR does not match the path info are refused with a hash mismatch; a
//!   copy from a corrupt master store fails naming the master's store.
//! * [`masters_with_bad_certificates_are_refused`]: no certificate, another
//!   CA's, an agent's; the agent stays up for a good master.
//! * [`query_missing_of_100000_paths`], [`large_single_path_with_bounded_agent_memory`]:
//!   scale, with the agent's peak RSS bounded.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nixq_common::hash::NarHash;
use nixq_common::path_info::PathInfo;
use nixq_common::proto::{
    self, Compression, PathState, Request, Upload, UploadItem, UploadOutcome, UploadReply,
};
use nixq_common::store_path::{nix32, StorePath};
use nixq_e2e::nixq::{
    self, agent_status, block_on_in, copy_closure, copy_command, registrations, run_outcome,
    stray_store_entries, Agent, Direction, MasterCreds, NixqError, NixqResult, Pki,
};
use nixq_e2e::{closure_expr, ClosureSpec, Farm, Fill, Host, Proc};
use nixq_master::agent_client::AgentClient;

const MIB: u64 = 1 << 20;

/// Upper bound on the agent's peak RSS in the scale tests: the transfer
/// engine's buffers are a few tens of MiB by design (flow-control windows,
/// bounded channels); 256 MiB catches anything that grows with the data.
const AGENT_RSS_BOUND_KIB: u64 = 256 * 1024;

/// A farm with masters and one slave `s1` running an agent, and the PKI.
struct Deployment {
    // Dropped before the farm, so the agent dies before its namespace goes.
    agent: Agent,
    pki: Pki,
    creds: MasterCreds,
    farm: Farm,
}

impl Deployment {
    /// `masters` (the first is "master") and `s1` with a running agent.
    fn new(name: &str, masters: &[&str]) -> Self {
        let mut farm = Farm::new(name).expect("farm");
        for m in masters {
            farm = farm.host(m).expect("master host");
        }
        let farm = farm.host("s1").expect("slave host");
        let pki = Pki::generate().expect("PKI");
        let creds =
            MasterCreds::install(&farm[masters[0]], &pki, masters[0]).expect("master creds");
        let config = Agent::install(&farm["s1"], &pki, "").expect("agent files");
        let agent = Agent::start(&farm["s1"], &config).expect("agent starts");
        Self {
            agent,
            pki,
            creds,
            farm,
        }
    }

    fn master(&self) -> &Host {
        &self.farm["master"]
    }

    fn s1(&self) -> &Host {
        &self.farm["s1"]
    }

    fn status(&self) -> proto::AgentStatus {
        agent_status(self.master(), &self.creds, self.s1()).expect("agent status")
    }

    /// `nixq-copy-closure --to` the agent of `root`'s closure, started in
    /// the background on the master.
    fn spawn_copy_to(&self, label: &str, root: &StorePath, extra: &[&str]) -> Proc {
        let cmd = copy_command(
            self.master(),
            &self.creds,
            Direction::To,
            &self.agent.uri(),
            std::slice::from_ref(root),
            extra,
        )
        .expect("cmd");
        self.master().spawn(label, cmd).expect("spawn copy")
    }
}

/// Builds `spec`'s `root` on `host` and returns it and its closure.
fn build_closure(host: &Host, spec: &ClosureSpec) -> (StorePath, Vec<StorePath>) {
    let file = host
        .write_file(&format!("{}.nix", spec.name), closure_expr(spec))
        .expect("write expression");
    let root = host
        .nix_build(&file, &["-A", "root"])
        .expect("nix-build root")
        .pop()
        .expect("one root");
    let closure = host.closure(std::slice::from_ref(&root)).expect("closure");
    (root, closure)
}

/// Every path of `closure` is valid on `to` with the registration it has
/// on `from`, `to`'s store verifies, and nothing but valid paths is in it.
fn assert_copied(from: &Host, to: &Host, closure: &[StorePath]) {
    assert_eq!(
        to.valid_paths(closure).expect("valid paths"),
        closure,
        "every path of the closure is valid on {}",
        to.name()
    );
    let theirs = registrations(from, closure).expect("registrations on the source");
    let ours = registrations(to, closure).expect("registrations on the destination");
    assert_eq!(theirs.len(), closure.len());
    for (path, reg) in &theirs {
        assert_eq!(
            ours.get(path),
            Some(reg),
            "{path}: same NAR hash, size, deriver and references on {} as on {}",
            to.name(),
            from.name()
        );
    }
    to.verify_store()
        .expect("nix-store --verify --check-contents");
    assert_clean(to);
}

/// No partial path in `host`'s store: every entry is a valid path. Lock
/// files (`<path>.lock`) are not counted: Nix itself leaves them behind and
/// reuses them; they are printed for the record.
fn assert_clean(host: &Host) {
    assert_eq!(
        stray_store_entries(host).expect("store entries"),
        Vec::<String>::new(),
        "entries of {}'s store that are not valid paths",
        host.name()
    );
    let locks = nixq::store_lock_files(host).expect("store entries");
    if !locks.is_empty() {
        eprintln!("lock files in {}'s store: {locks:?}", host.name());
    }
}

fn nar_bytes(host: &Host, paths: &[StorePath]) -> u64 {
    registrations(host, paths)
        .expect("registrations")
        .values()
        .map(|r| r.nar_size)
        .sum()
}

/// A closure with large files (a few MiB, half of them compressible),
/// symlinks, executables and multi-output derivations.
fn rich_spec(name: &str) -> ClosureSpec {
    ClosureSpec {
        large_every: 3,
        large_bytes: 3 * MIB,
        ..ClosureSpec::new(name)
    }
}

fn to_and_from(farm_name: &str, extra: &[&str]) {
    let d = Deployment::new(farm_name, &["master"]);
    let (master, s1) = (d.master(), d.s1());
    let uri = d.agent.uri();

    // --to
    let (root, closure) = build_closure(master, &rich_spec(&format!("{farm_name}-to")));
    assert!(closure.len() >= 20, "a closure of {} paths", closure.len());
    let started = Instant::now();
    copy_closure(
        master,
        &d.creds,
        Direction::To,
        &uri,
        std::slice::from_ref(&root),
        extra,
    )
    .expect("--to");
    eprintln!(
        "--to {extra:?}: {} paths, {:.1} MiB in {:.2?}",
        closure.len(),
        nar_bytes(master, &closure) as f64 / MIB as f64,
        started.elapsed()
    );
    assert_copied(master, s1, &closure);
    let after_to = d.status().counters;
    assert_eq!(
        after_to.paths_received,
        closure.len() as u64,
        "{after_to:?}"
    );
    assert_eq!(after_to.nar_bytes_received, nar_bytes(master, &closure));
    assert_eq!(after_to.paths_received_already_valid, 0, "{after_to:?}");

    // A second copy finds everything there and sends nothing: the agent
    // has the root, so the closure is not even listed.
    let started = Instant::now();
    let verbose: Vec<&str> = extra.iter().copied().chain(["-v"]).collect();
    let out =
        copy_closure(master, &d.creds, Direction::To, &uri, &[root], &verbose).expect("no-op --to");
    eprintln!("no-op --to: {:.2?}", started.elapsed());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("nothing to copy"), "{said}");
    let after_noop = d.status().counters;
    assert_eq!(after_noop.paths_received, after_to.paths_received);
    assert_eq!(after_noop.paths_received_already_valid, 0);

    // --from: a closure built on s1 only.
    let (root, closure) = build_closure(s1, &rich_spec(&format!("{farm_name}-from")));
    assert!(!master.is_valid(&root).expect("validity"));
    let started = Instant::now();
    copy_closure(master, &d.creds, Direction::From, &uri, &[root], extra).expect("--from");
    eprintln!(
        "--from {extra:?}: {} paths in {:.2?}",
        closure.len(),
        started.elapsed()
    );
    assert_copied(s1, master, &closure);
    let after_from = d.status().counters;
    assert_eq!(
        after_from.paths_sent,
        closure.len() as u64,
        "{after_from:?}"
    );
    assert_eq!(after_from.nar_bytes_sent, nar_bytes(s1, &closure));
}

/// `--from` run by a user other than root goes through the master's Nix
/// daemon (AddToStoreNar): a trusted user gets the closure, valid with the
/// same registrations; a user the daemon does not trust is refused for the
/// missing signatures, with nothing of the paths left behind.
#[test]
fn from_as_a_user_goes_through_the_daemon() {
    const NOBODY: u32 = 65534;
    let d = Deployment::new("copy-user", &["master"]);
    let (master, s1) = (d.master(), d.s1());
    // The user must be able to read its credentials: a copy under /nix,
    // the only part of the host's tree that is not private to root.
    let creds_dir = master.dir().join("nix/var/nixq-user");
    std::fs::create_dir_all(&creds_dir).expect("creds dir");
    for (from, name) in [(&d.creds.identity, "master.pem"), (&d.creds.ca, "ca.crt")] {
        let to = creds_dir.join(name);
        std::fs::copy(from, &to).expect("copy a credential");
        std::os::unix::fs::chown(&to, Some(NOBODY), Some(NOBODY)).expect("chown");
    }
    let as_nobody = |root: &StorePath| {
        let mut cmd = master.cmd(nixq_e2e::nixq_bin("nixq-copy-closure").expect("binary"));
        cmd.args(["--from", &d.agent.uri()])
            .args(["--identity", "/nix/var/nixq-user/master.pem"])
            .args(["--ca", "/nix/var/nixq-user/ca.crt"])
            .arg(root.as_str());
        // After the host entry (which needs root): become nobody.
        // SAFETY: setgroups, setgid and setuid are async-signal-safe and
        // allocate nothing.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        run_outcome(master, cmd, nixq::COPY_TIMEOUT).expect("ran")
    };
    let start_daemon = |trusted: &str| {
        master
            .append_nix_conf(&format!("trusted-users = {trusted}\n"))
            .expect("nix.conf");
        let daemon = master
            .spawn("nix-daemon", master.cmd("nix-daemon"))
            .expect("nix-daemon");
        let socket = master.dir().join("nix/var/nix/daemon-socket/socket");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "no daemon socket after 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    };

    // Trusted: the whole closure arrives, as for root.
    let mut daemon = start_daemon("root nobody");
    let (root, closure) = build_closure(s1, &ClosureSpec::new("user-trusted"));
    let out = as_nobody(&root);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_copied(s1, master, &closure);
    daemon
        .terminate(Duration::from_secs(5))
        .expect("stop the daemon");
    std::fs::remove_file(master.dir().join("nix/var/nix/daemon-socket/socket"))
        .expect("remove the socket");

    // Untrusted: unsigned paths are refused by the daemon, and the error
    // says so. (The `builtins.toFile` sources are content-addressed: Nix
    // takes those from anyone.)
    let _daemon = start_daemon("root");
    let (root, closure) = build_closure(s1, &ClosureSpec::new("user-untrusted"));
    let out = as_nobody(&root);
    assert_ne!(out.code, Some(0), "{out:?}");
    eprintln!("untrusted --from: {:?}\n{}", out.code, out.stderr);
    assert!(
        out.stderr.contains("lacks a valid signature") && out.stderr.contains("trusted-users"),
        "{out:?}"
    );
    let fresh: Vec<&StorePath> = closure
        .iter()
        .filter(|p| p.name().contains("user-untrusted") && !p.name().ends_with("-src"))
        .collect();
    assert!(!fresh.is_empty());
    for path in fresh {
        assert!(!master.is_valid(path).expect("validity"), "{path}");
    }
    assert_clean(master);
}

#[test]
fn to_and_from_uncompressed() {
    to_and_from("copy-plain", &[]);
}

#[test]
fn to_and_from_zstd() {
    to_and_from("copy-zstd", &["--zstd"]);
}

#[test]
fn concurrent_senders_send_each_path_once() {
    let d = Deployment::new("copy-conc", &["master", "m2"]);
    let (master, m2, s1) = (d.master(), &d.farm["m2"], d.s1());
    let creds2 = MasterCreds::install(m2, &d.pki, "m2").expect("m2 creds");
    // Reproducible contents, so that both masters hold identical paths.
    let spec = ClosureSpec {
        layers: 3,
        width: 6,
        large_every: 2,
        large_bytes: 2 * MIB,
        fill: Fill::Compressible,
        ..ClosureSpec::new("conc")
    };
    let file_m = master
        .write_file("conc.nix", closure_expr(&spec))
        .expect("expr");
    let file_2 = m2
        .write_file("conc.nix", closure_expr(&spec))
        .expect("expr");
    let nodes = master.nix_build(&file_m, &["-A", "nodes"]).expect("build");
    let nodes2 = m2.nix_build(&file_2, &["-A", "nodes"]).expect("build");
    assert_eq!(
        nodes, nodes2,
        "same derivations, same outputs on both masters"
    );
    // The last layer's outputs (`out` only), as four overlapping sets.
    let top: Vec<StorePath> = nodes
        .iter()
        .filter(|p| p.name().starts_with("conc-2-"))
        .cloned()
        .collect();
    assert_eq!(top.len(), 6, "{top:?}");
    let sets: [Vec<StorePath>; 4] = [
        top[0..3].to_vec(),
        top[2..5].to_vec(),
        top[3..6].to_vec(),
        vec![top[5].clone(), top[0].clone()],
    ];
    let mut distinct = BTreeSet::new();
    for set in &sets {
        distinct.extend(master.closure(set).expect("closure"));
    }
    let distinct: Vec<StorePath> = distinct.into_iter().collect();
    assert_eq!(
        registrations(master, &distinct).expect("regs"),
        registrations(m2, &distinct).expect("regs"),
        "identical paths on both masters"
    );

    let uri = d.agent.uri();
    let mut procs: Vec<Proc> = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        let (host, creds) = if i % 2 == 0 {
            (master, &d.creds)
        } else {
            (m2, &creds2)
        };
        let cmd = copy_command(host, creds, Direction::To, &uri, set, &["-v"]).expect("cmd");
        procs.push(host.spawn(&format!("copy-{i}"), cmd).expect("spawn copy"));
    }
    for (i, proc) in procs.iter_mut().enumerate() {
        let status = proc
            .wait_timeout(nixq::COPY_TIMEOUT)
            .expect("wait")
            .unwrap_or_else(|| panic!("copy {i} did not finish"));
        assert!(
            status.success(),
            "copy {i} failed ({status}):\n{}",
            proc.log().unwrap_or_default()
        );
    }
    assert_copied(master, s1, &distinct);
    let counters = d.status().counters;
    eprintln!(
        "{} distinct paths; agent counters {counters:?}",
        distinct.len()
    );
    assert_eq!(
        counters.paths_received,
        distinct.len() as u64,
        "each distinct path received once: {counters:?}"
    );
    assert_eq!(counters.paths_received_already_valid, 0, "{counters:?}");
    assert_eq!(counters.nar_bytes_received, nar_bytes(master, &distinct));
    // A rejected upload means a NAR crossed the wire for nothing (and
    // again later): the claims must prevent that.
    let log = d.agent.log().expect("agent log");
    let notable: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("not registered"))
        .collect();
    assert_eq!(
        counters.uploads_rejected,
        0,
        "uploads rejected during concurrent copies; agent log:\n{}",
        notable.join("\n")
    );
}

/// A closure with one path holding a 200 MiB random file, so a copy takes
/// long enough to be interrupted; returns the root, the closure and the
/// big path.
fn big_random_closure(host: &Host, name: &str) -> (StorePath, Vec<StorePath>, StorePath) {
    let spec = ClosureSpec {
        layers: 1,
        width: 2,
        large_every: 2,
        large_bytes: 200 * MIB,
        fill: Fill::Random,
        multi_output_every: 0,
        ..ClosureSpec::new(name)
    };
    let (root, closure) = build_closure(host, &spec);
    let big = closure
        .iter()
        .find(|p| p.name() == format!("{name}-0-0"))
        .expect("the node with the big file")
        .clone();
    (root, closure, big)
}

/// Waits until `s1` has at least `bytes` of `path` on disk, while `copy`
/// runs; panics if the copy ends first or nothing arrives in time.
fn wait_for_partial(s1: &Host, path: &StorePath, bytes: u64, copy: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = nixq::bytes_on_disk(s1, path);
        if got >= bytes {
            assert!(
                !s1.is_valid(path).expect("validity"),
                "{path} is already valid: the copy is too fast to interrupt"
            );
            eprintln!("{got} bytes of {path} on s1: interrupting");
            return;
        }
        if let Some(status) = copy.try_wait().expect("try_wait") {
            panic!(
                "the copy ended ({status}) before {bytes} bytes of {path} arrived:\n{}",
                copy.log().unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{bytes} bytes of {path} did not arrive"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (bounded) until `host`'s store holds nothing but valid paths (and
/// lock files, see [`assert_clean`]); returns how long that took.
fn wait_until_clean(host: &Host, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let stray = stray_store_entries(host).expect("store entries");
        if stray.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{}'s store still holds {stray:?} after {within:?}",
            host.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn killed_sender_leaves_nothing_and_a_rerun_completes() {
    let d = Deployment::new("copy-ksend", &["master"]);
    let (master, s1) = (d.master(), d.s1());
    let (root, closure, big) = big_random_closure(master, "ksend");
    let uri = d.agent.uri();
    let mut copy = d.spawn_copy_to("copy", &root, &["-v"]);
    wait_for_partial(s1, &big, 16 * MIB, &mut copy);
    copy.kill().expect("kill the sender");
    // The agent learns of the dead sender by the idle timeout (10 s here).
    let took = wait_until_clean(s1, Duration::from_secs(40));
    eprintln!("s1's store clean {took:?} after the sender was killed");
    assert!(!s1.is_valid(&big).expect("validity"));
    copy_closure(master, &d.creds, Direction::To, &uri, &[root], &[]).expect("rerun");
    assert_copied(master, s1, &closure);
}

#[test]
fn stopped_or_killed_agent_leaves_nothing_and_a_rerun_completes() {
    let mut d = Deployment::new("copy-kagent", &["master"]);
    // Fields, not methods: the agent is borrowed mutably below.
    let (master, s1) = (&d.farm["master"], &d.farm["s1"]);
    let (root, closure, big) = big_random_closure(master, "kagent");
    let uri = d.agent.uri();

    // SIGTERM mid-transfer: the agent aborts the upload, removes the partial
    // path and exits 0; the sender fails.
    let mut copy = d.spawn_copy_to("copy-term", &root, &[]);
    wait_for_partial(s1, &big, 16 * MIB, &mut copy);
    let stopped = Instant::now();
    let status = d
        .agent
        .proc()
        .terminate(nixq::AGENT_STOP_GRACE)
        .expect("SIGTERM");
    eprintln!("agent stopped in {:.2?}: {status}", stopped.elapsed());
    assert!(status.success(), "the agent exits 0 on SIGTERM: {status}");
    assert_clean(s1);
    let status = copy
        .wait_timeout(Duration::from_secs(60))
        .expect("wait")
        .expect("the sender ends once the agent is gone");
    assert!(!status.success(), "the sender fails when the agent stops");

    // SIGKILL mid-transfer: nothing can clean up at once; the restarted
    // agent and the rerun must cope with the leftovers.
    d.agent.restart(s1).expect("restart the agent");
    let mut copy = d.spawn_copy_to("copy-kill", &root, &[]);
    wait_for_partial(s1, &big, 16 * MIB, &mut copy);
    d.agent.proc().kill().expect("SIGKILL the agent");
    let left = stray_store_entries(s1).expect("entries");
    eprintln!("left in s1's store by the killed agent: {left:?}");
    let outcome = copy
        .wait_timeout(Duration::from_secs(60))
        .expect("wait")
        .expect("the sender ends once the agent is gone");
    let log = copy.log().unwrap_or_default();
    eprintln!("sender after the agent was killed: {outcome}; {log}");
    assert!(!outcome.success());
    assert_eq!(
        outcome.code(),
        Some(3),
        "a lost agent is exit code 3 (unreachable): {log}"
    );
    d.agent.restart(s1).expect("restart the agent");
    copy_closure(master, &d.creds, Direction::To, &uri, &[root], &[]).expect("rerun");
    assert_copied(master, s1, &closure);
}

/// Uploads one item by hand on a fresh stream: `info`, then `nar` as its
/// NAR, whatever they say; returns the agent's replies.
async fn upload_by_hand(
    conn: &quinn::Connection,
    info: PathInfo,
    nar: &[u8],
) -> NixqResult<Vec<UploadReply>> {
    let broken = |e: String| NixqError::Unexpected(format!("hand-made upload: {e}"));
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| broken(e.to_string()))?;
    let request = Request::Upload(Upload {
        compression: Compression::None,
    });
    proto::write_frame(&mut send, &request)
        .await
        .map_err(|e| broken(e.to_string()))?;
    proto::write_frame(&mut send, &UploadItem::Path(info))
        .await
        .map_err(|e| broken(e.to_string()))?;
    // The agent may stop reading once it has seen enough: write errors are
    // not the test's concern, the replies are.
    let _ = send.write_all(nar).await;
    let _ = proto::write_frame(&mut send, &UploadItem::End).await;
    let _ = send.finish();
    let mut replies = Vec::new();
    while let Some(reply) = proto::read_frame::<UploadReply, _>(&mut recv)
        .await
        .map_err(|e| broken(e.to_string()))?
    {
        let done = reply == UploadReply::Done;
        replies.push(reply);
        if done || replies.len() > 4 {
            break;
        }
    }
    Ok(replies)
}

fn assert_hash_mismatch(replies: &[UploadReply], expected: NarHash, got: NarHash) {
    match replies {
        [UploadReply::Result {
            index: 0,
            outcome:
                UploadOutcome::HashMismatch {
                    expected: e,
                    got: g,
                },
        }, UploadReply::Done] => {
            assert_eq!((*e, *g), (expected, got), "the hashes in the reply");
        }
        other => panic!("expected a hash mismatch then Done, got {other:?}"),
    }
}

#[test]
fn corrupt_nars_are_rejected_and_leave_nothing() {
    let d = Deployment::new("copy-corrupt", &["master"]);
    let (master, s1) = (d.master(), d.s1());

    // 1. A hand-made path whose NAR is fine but whose info claims another hash.
    let scratch = tempfile::tempdir().expect("tempdir");
    let file = scratch.path().join("f");
    std::fs::write(&file, "contents the path info does not describe\n").expect("write");
    let mut nar = Vec::new();
    nixq_common::nar::dump_path(&file, &mut nar).expect("NAR");
    let made_up = made_up_path(u64::MAX, "e2e-corrupt");
    let claimed = NarHash::of(b"something else");
    let made_up_info = PathInfo {
        path: made_up.clone(),
        deriver: None,
        nar_hash: claimed,
        nar_size: nar.len() as u64,
        references: BTreeSet::new(),
        registration_time: 0,
        ultimate: false,
        sigs: Vec::new(),
        ca: None,
    };

    // 2. A real path of the master (a `builtins.toFile` source: no
    //    references) with its true info and one byte of its NAR flipped in
    //    flight.
    let (closure_root, closure) = build_closure(master, &ClosureSpec::new("corrupt"));
    let source = closure
        .iter()
        .find(|p| p.name().ends_with("-src"))
        .expect("a source file in the closure")
        .clone();
    let reg = registrations(master, std::slice::from_ref(&source))
        .expect("registration")
        .remove(&source)
        .expect("registered");
    assert!(reg.references.is_empty(), "{reg:?}");
    let true_hash = NarHash::parse(&reg.nar_hash).expect("hash");
    let real_info = PathInfo {
        path: source.clone(),
        deriver: None,
        nar_hash: true_hash,
        nar_size: reg.nar_size,
        references: BTreeSet::new(),
        registration_time: 0,
        ultimate: false,
        sigs: Vec::new(),
        ca: None,
    };
    let mut real_nar = Vec::new();
    nixq_common::nar::dump_path(
        &master.dir().join(source.as_str().trim_start_matches('/')),
        &mut real_nar,
    )
    .expect("dump the source");
    assert_eq!(NarHash::of(&real_nar), true_hash);
    let mut flipped = real_nar.clone();
    let at = flipped
        .windows(9)
        .position(|w| w == b"source of")
        .expect("the file's text in its NAR");
    flipped[at] ^= 0x20;

    let tls = d.creds.client_config().expect("tls");
    let (nar_sent, flipped_sent, real_sent) = (&nar, &flipped, &real_nar);
    let results = block_on_in(master, async move || {
        let (endpoint, conn) = nixq::raw_connect(tls, s1).await?;
        nixq::hello(&conn).await?;
        let made_up_replies = upload_by_hand(&conn, made_up_info, nar_sent).await?;
        let flipped_replies = upload_by_hand(&conn, real_info.clone(), flipped_sent).await?;
        // The connection stays usable: the true NAR is stored.
        let good_replies = upload_by_hand(&conn, real_info, real_sent).await?;
        conn.close(quinn::VarInt::from_u32(0), b"done");
        endpoint.wait_idle().await;
        Ok((made_up_replies, flipped_replies, good_replies))
    })
    .expect("hand-made uploads");
    let (made_up_replies, flipped_replies, good_replies) = results;
    assert_hash_mismatch(&made_up_replies, claimed, NarHash::of(&nar));
    assert_hash_mismatch(&flipped_replies, true_hash, NarHash::of(&flipped));
    assert_eq!(
        good_replies,
        [
            UploadReply::Result {
                index: 0,
                outcome: UploadOutcome::Stored
            },
            UploadReply::Done
        ]
    );

    assert!(!s1.is_valid(&made_up).expect("validity"));
    assert_eq!(
        nixq::bytes_on_disk(s1, &made_up),
        0,
        "nothing of {made_up} on disk"
    );
    assert!(s1.is_valid(&source).expect("validity"));
    s1.verify_store().expect("verify");
    assert_clean(s1);
    let counters = d.status().counters;
    assert_eq!(counters.uploads_rejected, 2, "{counters:?}");
    assert_eq!(counters.paths_received, 1, "{counters:?}");

    // 3. A corrupt master store: one byte of a file of the closure flipped
    //    on disk, the size unchanged. The copy does not hash what it sends;
    //    the agent refuses the NAR, and the copy then re-reads the path and
    //    names its own store as the culprit.
    let (victim, file) = closure
        .iter()
        .filter(|p| **p != source)
        .find_map(|p| {
            first_regular_file(&master.dir().join(p.as_str().trim_start_matches('/')))
                .map(|f| (p.clone(), f))
        })
        .expect("a regular file in the closure");
    flip_first_byte(&file);
    let cmd = copy_command(
        master,
        &d.creds,
        Direction::To,
        &d.agent.uri(),
        &[closure_root],
        &[],
    )
    .expect("command");
    let out = run_outcome(master, cmd, nixq::COPY_TIMEOUT).expect("ran");
    assert_eq!(out.code, Some(6), "exit 6 (hash mismatch): {out:?}");
    assert!(
        out.stderr.contains("local store is corrupt") && out.stderr.contains(victim.as_str()),
        "{out:?}"
    );
    // The agent saw the NAR and refused it.
    let counters = d.status().counters;
    assert_eq!(counters.uploads_rejected, 3, "{counters:?}");
    assert!(!s1.is_valid(&victim).expect("validity"));
    assert_eq!(nixq::bytes_on_disk(s1, &victim), 0, "nothing of {victim}");
    s1.verify_store().expect("verify");
    assert_clean(s1);
    flip_first_byte(&file);
}

/// The first regular file at or under `path` (depth first, sorted).
fn first_regular_file(path: &std::path::Path) -> Option<PathBuf> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if meta.is_file() && meta.len() > 0 {
        return Some(path.to_path_buf());
    }
    if !meta.is_dir() {
        return None;
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    entries.iter().find_map(|e| first_regular_file(e))
}

/// Flips the first byte of a (read-only) store file in place.
fn flip_first_byte(file: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(file).expect("stat").permissions().mode();
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode | 0o200)).expect("chmod");
    let mut bytes = std::fs::read(file).expect("read");
    bytes[0] ^= 0x01;
    std::fs::write(file, &bytes).expect("write");
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).expect("chmod back");
}

#[test]
fn masters_with_bad_certificates_are_refused() {
    let d = Deployment::new("copy-certs", &["master"]);
    let (master, s1) = (d.master(), d.s1());
    let (root, closure) = build_closure(
        master,
        &ClosureSpec {
            large_every: 0,
            ..ClosureSpec::new("certs")
        },
    );
    let uri = d.agent.uri();

    // No certificate at all (no nixq program can do that: an in-test client).
    let anonymous = d.creds.anonymous_client_config().expect("tls");
    let refused = block_on_in(master, async move || {
        match nixq::raw_connect(anonymous, s1).await {
            Err(e) => Ok(format!("connect: {e}")),
            Ok((_endpoint, conn)) => match nixq::hello(&conn).await {
                Err(e) => Ok(format!("hello: {e}")),
                Ok(welcome) => Err(NixqError::Unexpected(format!(
                    "a master without a certificate was welcomed: {welcome:?}"
                ))),
            },
        }
    })
    .expect("a master without a certificate is refused");
    eprintln!("no certificate: {refused}");

    // nixq-copy-closure with the wrong credentials: exit 4, a message about
    // the certificate, nothing copied.
    let foreign = Pki::generate_named("foreign CA").expect("foreign CA");
    let agent_leaf = d.pki.agent_leaf(master).expect("an agent certificate");
    let cases = [
        (
            "another CA's master certificate",
            MasterCreds::write(
                master,
                "foreign",
                &foreign.master_leaf("master").expect("leaf").combined_pem(),
                d.pki.ca_pem(),
            ),
        ),
        (
            "an agent certificate",
            MasterCreds::write(
                master,
                "agentcert",
                &agent_leaf.combined_pem(),
                d.pki.ca_pem(),
            ),
        ),
        (
            "a master that trusts another CA",
            MasterCreds::write(
                master,
                "distrust",
                &d.pki.master_leaf("master").expect("leaf").combined_pem(),
                foreign.ca_pem(),
            ),
        ),
    ];
    for (what, creds) in cases {
        let creds = creds.expect("write credentials");
        let cmd = copy_command(
            master,
            &creds,
            Direction::To,
            &uri,
            std::slice::from_ref(&root),
            &[],
        )
        .expect("cmd");
        let out = run_outcome(master, cmd, Duration::from_secs(60)).expect("run");
        eprintln!("{what}: exit {:?}: {}", out.code, out.stderr.trim());
        assert_eq!(out.code, Some(4), "{what}: exit code 4\n{}", out.stderr);
        assert!(
            out.stderr.to_lowercase().contains("certificate"),
            "{what}: the message names the certificate problem: {}",
            out.stderr
        );
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "one line: {}",
            out.stderr
        );
    }
    assert!(
        s1.valid_paths(&closure).expect("valid").is_empty(),
        "nothing was copied"
    );
    assert!(d.agent.log().is_ok());

    // The agent is still up and serves a good master.
    copy_closure(master, &d.creds, Direction::To, &uri, &[root], &[]).expect("good master");
    assert_copied(master, s1, &closure);
}

/// A syntactically valid store path numbered `n` that exists nowhere.
fn made_up_path(n: u64, name: &str) -> StorePath {
    let mut digest = [0x5au8; 20];
    digest[..8].copy_from_slice(&n.to_le_bytes());
    StorePath::parse_any(&format!("/nix/store/{}-{name}", nix32::encode(&digest)))
        .expect("a valid store path")
}

/// `n` syntactically valid store paths that exist nowhere.
fn absent_paths(n: usize) -> Vec<StorePath> {
    (0..n as u64)
        .map(|i| made_up_path(i, &format!("e2e-absent-{i}")))
        .collect()
}

#[test]
fn query_missing_of_100000_paths() {
    const N: usize = 100_000;
    let d = Deployment::new("copy-100k", &["master"]);
    let (master, s1) = (d.master(), d.s1());
    let (root, present) = build_closure(
        master,
        &ClosureSpec {
            layers: 1,
            width: 2,
            large_every: 0,
            multi_output_every: 0,
            ..ClosureSpec::new("present")
        },
    );
    copy_closure(
        master,
        &d.creds,
        Direction::To,
        &d.agent.uri(),
        &[root],
        &[],
    )
    .expect("copy");
    let mut paths = present.clone();
    paths.extend(absent_paths(N));
    let total = paths.len();

    let target = nixq::agent_target(&d.creds, s1).expect("target");
    let tls = d.creds.client_config().expect("tls");
    let (first, second, third, elapsed) = block_on_in(master, async move || {
        let a = AgentClient::connect_with(&target, tls.clone(), "e2e-a").await?;
        let b = AgentClient::connect_with(&target, tls.clone(), "e2e-b").await?;
        let started = Instant::now();
        let first = a.query_missing(&paths, true).await?;
        let elapsed = started.elapsed();
        // Connection b sees a's claims.
        let second = b.query_missing(&paths, true).await?;
        // Closing a drops its claims (once the agent has processed the
        // close): b, which got InFlight, then gets Missing.
        a.close().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let third = loop {
            let states = b.query_missing(&paths, false).await?;
            let in_flight = states.iter().filter(|s| **s == PathState::InFlight).count();
            if in_flight == 0 || Instant::now() >= deadline {
                break states;
            }
            eprintln!("{in_flight} paths still claimed by the closed connection");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        b.close().await;
        Ok((first, second, third, elapsed))
    })
    .expect("queries");
    eprintln!("QueryMissing of {total} paths (with claims): {elapsed:.2?}");
    let count =
        |states: &[PathState], want: PathState| states.iter().filter(|s| **s == want).count();
    let k = present.len();
    assert_eq!(first.len(), total);
    assert!(
        first[..k].iter().all(|s| *s == PathState::Valid),
        "{:?}",
        &first[..k]
    );
    assert_eq!(
        count(&first, PathState::Missing),
        N,
        "every absent path is missing"
    );
    assert!(second[..k].iter().all(|s| *s == PathState::Valid));
    assert_eq!(
        count(&second, PathState::InFlight),
        N,
        "claimed by the first connection"
    );
    assert!(third[..k].iter().all(|s| *s == PathState::Valid));
    assert_eq!(
        count(&third, PathState::Missing),
        N,
        "claims end with their connection"
    );

    let peak = d.agent.peak_rss_kib().expect("VmHWM");
    eprintln!(
        "agent peak RSS after 3 × {total}-path QueryMissing: {} MiB",
        peak / 1024
    );
    assert!(peak < AGENT_RSS_BOUND_KIB, "agent peak RSS {peak} KiB");
}

/// Size of the single-path copy: 4 GiB, past every 32-bit size and far
/// past every buffer (the whole test takes under a minute here).
const SINGLE_PATH_SIZE: u64 = 4 << 30;

#[test]
fn large_single_path_with_bounded_agent_memory() {
    let size = SINGLE_PATH_SIZE;
    let d = Deployment::new("copy-big", &["master"]);
    let (master, s1) = (d.master(), d.s1());
    let expr = format!(
        "derivation {{ name = \"e2e-single-{size}\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [ \"-e\" \"-c\" \
         \"/bin/yes 'nixq e2e single large path' | /bin/head -c {size} > $out\" ]; }}\n"
    );
    let file: PathBuf = master.write_file("single.nix", expr).expect("expr");
    let started = Instant::now();
    let path = master
        .nix_build(&file, &[])
        .expect("build")
        .pop()
        .expect("one path");
    eprintln!("built {} MiB in {:.2?}", size / MIB, started.elapsed());
    let started = Instant::now();
    copy_closure(
        master,
        &d.creds,
        Direction::To,
        &d.agent.uri(),
        std::slice::from_ref(&path),
        &[],
    )
    .expect("copy");
    let took = started.elapsed();
    eprintln!(
        "copied {} MiB in {took:.2?} ({:.0} MB/s)",
        size / MIB,
        size as f64 / took.as_secs_f64() / 1e6
    );
    let peak = d.agent.peak_rss_kib().expect("VmHWM");
    eprintln!("agent peak RSS: {} MiB", peak / 1024);
    assert_eq!(
        registrations(master, std::slice::from_ref(&path)).expect("regs"),
        registrations(s1, std::slice::from_ref(&path)).expect("regs")
    );
    s1.nix_store(&["--verify-path", path.as_str()])
        .expect("the copy's contents match its hash");
    assert_clean(s1);
    assert!(peak < AGENT_RSS_BOUND_KIB, "agent peak RSS {peak} KiB");
}
