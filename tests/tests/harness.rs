//! Self-tests of the harness (`nixq_e2e`), using Nix alone.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nixq_e2e::{closure_expr, netns, ClosureSpec, Error, Farm, HostOptions, Proc};

/// Listens on `host:port` from the test process, accepts one connection and
/// returns the first line it receives (in a thread, so the caller can connect).
fn serve_one_line(listener: TcpListener) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().expect("accept");
        let mut line = String::new();
        BufReader::new(conn)
            .read_line(&mut line)
            .expect("read line");
        line
    })
}

#[test]
fn hosts_reach_each_other_by_address_and_name_and_nothing_else() {
    let farm = Farm::new("net")
        .and_then(|f| f.host("alpha"))
        .and_then(|f| f.host("beta"))
        .expect("farm");
    let (alpha, beta) = (&farm["alpha"], &farm["beta"]);
    assert_eq!(alpha.ip().to_string(), "10.213.0.1");
    assert_eq!(beta.ip().to_string(), "10.213.0.2");

    // beta -> alpha by address: a listener in alpha's namespace (opened by
    // the test process), a client run on beta with bash's /dev/tcp.
    let listener = alpha
        .in_netns(|| TcpListener::bind((alpha.ip(), 7001)))
        .expect("enter alpha")
        .expect("bind on alpha");
    let got = serve_one_line(listener);
    beta.sh(&format!(
        "exec bash -c 'echo from-beta > /dev/tcp/{}/7001'",
        alpha.ip()
    ))
    .expect("beta connects to alpha");
    assert_eq!(got.join().expect("server thread"), "from-beta\n");

    // alpha -> beta by host name (/etc/hosts of the farm).
    let listener = beta
        .in_netns(|| TcpListener::bind(("0.0.0.0", 7002)))
        .expect("enter beta")
        .expect("bind on beta");
    let got = serve_one_line(listener);
    alpha
        .sh("exec bash -c 'echo from-alpha > /dev/tcp/beta/7002'")
        .expect("alpha connects to beta by name");
    assert_eq!(got.join().expect("server thread"), "from-alpha\n");

    // Isolation: only the farm's subnet is routed, and the machine's loopback
    // is not the host's loopback.
    let routes = alpha.sh_stdout("ip -4 route").expect("ip route");
    assert_eq!(
        routes,
        "10.213.0.0/24 dev eth0 proto kernel scope link src 10.213.0.1"
    );
    let outside = TcpListener::bind("127.0.0.1:0").expect("bind on the machine");
    let port = outside.local_addr().expect("addr").port();
    let err = alpha
        .sh(&format!(
            "exec bash -c 'echo x > /dev/tcp/127.0.0.1/{port}'"
        ))
        .expect_err("the machine's loopback must not be reachable from a host");
    assert!(matches!(err, Error::CommandFailed { .. }), "{err}");
    let from_test_process = alpha
        .in_netns(|| {
            TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(1),
            )
        })
        .expect("enter alpha");
    assert!(
        from_test_process.is_err(),
        "loopback leaked into the namespace"
    );
}

const TINY_EXPR: &str = r#"{ seed }: derivation {
  name = "tiny-${seed}"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo tiny-log-line; echo ${seed} > $out" ];
}"#;

#[test]
fn each_host_has_its_own_store_and_config() {
    let farm = Farm::new("stores")
        .and_then(|f| {
            f.host_with(
                "a",
                HostOptions::default().nix_conf("system-features = kvm"),
            )
        })
        .and_then(|f| f.host("b"))
        .expect("farm");
    let (a, b) = (&farm["a"], &farm["b"]);
    let expr = a.write_file("tiny.nix", TINY_EXPR).expect("write expr");
    let seed = format!("stores-{}", std::process::id());
    let built = a
        .nix_build(&expr, &["--argstr", "seed", &seed])
        .expect("nix-build on a");
    assert_eq!(built.len(), 1);
    let path = &built[0];
    assert!(a.is_valid(path).expect("query a"));
    assert!(
        !b.is_valid(path).expect("query b"),
        "b must not see a's store"
    );
    let relative = path.as_str().trim_start_matches('/');
    assert!(a.dir().join(relative).exists());
    assert!(!b.dir().join(relative).exists());
    assert!(
        !PathBuf::from(path.as_str()).exists(),
        "the machine's /nix/store was written"
    );
    assert_eq!(
        a.sh_stdout(&format!("cat {path}")).expect("read output"),
        seed
    );
    assert_eq!(
        a.all_valid_paths().expect("dump-db a").len(),
        2,
        "output + .drv"
    );
    assert!(b.all_valid_paths().expect("dump-db b").is_empty());
    a.verify_store().expect("verify a");
    b.verify_store().expect("verify b");
    // Build log kept on a only.
    let log = a.nix_store(&["-l", path.as_str()]).expect("build log");
    assert!(log.contains("tiny-log-line"), "{log}");

    // Per-host nix.conf, seen through /etc/nix and NIX_CONF_DIR.
    let conf = |h: &nixq_e2e::Host| {
        h.sh_stdout("nix show-config | grep '^system-features'")
            .expect("show-config")
    };
    assert_eq!(conf(a), "system-features = kvm");
    assert_ne!(conf(b), "system-features = kvm");
    assert!(a
        .sh_stdout("cat /etc/nix/nix.conf")
        .expect("cat")
        .contains("e2e host a"));
}

#[test]
fn a_generated_closure_builds_with_every_feature() {
    let farm = Farm::new("closure")
        .and_then(|f| f.host("builder"))
        .expect("farm");
    let host = &farm["builder"];
    let mut spec = ClosureSpec::new(&format!("gen{}", std::process::id()));
    spec.large_bytes = 300_000;
    let expr = host
        .write_file("closure.nix", closure_expr(&spec))
        .expect("write");
    let started = Instant::now();
    let root = host.nix_build(&expr, &["-A", "root"]).expect("nix-build");
    eprintln!(
        "built {} derivations in {:?}",
        spec.derivation_count(),
        started.elapsed()
    );
    let closure = host.closure(&root).expect("closure");
    let names: Vec<&str> = closure.iter().map(|p| p.name()).collect();
    // 12 nodes + root + 4 `doc` outputs (nodes 0, 3, 6, 9) + 12 toFile sources.
    assert_eq!(closure.len(), 12 + 1 + 4 + 12, "{names:#?}");
    assert!(names.iter().any(|n| n.ends_with("-src")));

    let n = format!("{}-1-0", spec.name);
    let node = closure.iter().find(|p| p.name() == n).expect("node 1-0");
    let out = host.dir().join(node.as_str().trim_start_matches('/'));
    use std::os::unix::fs::PermissionsExt;
    let run = out.join("bin/run");
    assert_ne!(
        run.metadata().expect("bin/run").permissions().mode() & 0o111,
        0
    );
    assert_eq!(
        host.sh_stdout(&format!("{node}/bin/run")).expect("run"),
        format!("running {n}")
    );
    assert!(std::fs::read_link(out.join("dep"))
        .expect("dep link")
        .starts_with("/nix/store"));
    assert_eq!(
        std::fs::read_link(out.join("share/data-link")).expect("link"),
        PathBuf::from("data")
    );
    assert_eq!(
        std::fs::metadata(out.join("empty")).expect("empty").len(),
        0
    );
    assert!(out.join("emptydir").is_dir());
    let src = std::fs::read_to_string(out.join("share/deep/er/src")).expect("src copy");
    assert_eq!(
        src,
        format!("source of {n}\nsecond line with \"quotes\" and \\backslash\n")
    );
    let refs = host.references(node).expect("references");
    // node 1-0 references nodes 0-0 (and its doc output) and 0-1, and its source.
    assert_eq!(refs.len(), 4, "{refs:#?}");

    // Large files: random for node 0, compressible for node 4.
    let blob = |name: &str| {
        let p = closure.iter().find(|p| p.name() == name).expect("node");
        std::fs::read(
            host.dir()
                .join(p.as_str().trim_start_matches('/'))
                .join("blob"),
        )
        .expect("blob")
    };
    let random = blob(&format!("{}-0-0", spec.name));
    let text = blob(&format!("{}-1-0", spec.name));
    assert_eq!((random.len(), text.len()), (300_000, 300_000));
    assert!(text.starts_with(b"nixq e2e compressible filler line"));
    assert!(!random.starts_with(b"nixq"));

    // The `doc` output references `out`.
    let doc = closure
        .iter()
        .find(|p| p.name() == format!("{}-0-0-doc", spec.name))
        .expect("doc");
    assert!(host
        .references(doc)
        .expect("doc refs")
        .iter()
        .any(|r| r.name() == format!("{}-0-0", spec.name)));
    host.verify_store().expect("verify --check-contents");
}

/// What a farm leaves behind after it is dropped (must be nothing).
struct Residue {
    namespaces: Vec<String>,
    identities: Vec<String>,
    pids: Vec<i32>,
    dir: PathBuf,
}

impl Residue {
    fn of(farm: &Farm, pids: Vec<i32>) -> Self {
        Self {
            namespaces: farm.namespaces().to_vec(),
            identities: farm
                .namespaces()
                .iter()
                .map(|ns| {
                    use std::os::unix::fs::MetadataExt;
                    let ino = std::fs::metadata(format!("/run/netns/{ns}"))
                        .expect("ns handle")
                        .ino();
                    format!("net:[{ino}]")
                })
                .collect(),
            pids,
            dir: farm.dir().to_path_buf(),
        }
    }

    fn assert_gone(&self) {
        let left = netns::ours();
        for ns in &self.namespaces {
            assert!(!left.contains(ns), "namespace {ns} survived");
        }
        for id in &self.identities {
            assert!(netns::pids_in(id).is_empty(), "processes left in {id}");
        }
        for pid in &self.pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            assert!(
                status.is_empty() || status.contains("State:\tZ"),
                "process {pid} survived"
            );
        }
        assert!(!self.dir.exists(), "{} survived", self.dir.display());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let dir = self.dir.to_string_lossy();
        for ns in &self.namespaces {
            assert!(!mounts.contains(ns.as_str()), "mount of {ns} survived");
        }
        assert!(!mounts.contains(dir.as_ref()), "mount under {dir} survived");
    }
}

/// Builds a farm with a store path and processes (one in the spawn guard's
/// group, one that escaped with `setsid` as Nix's build hook does).
fn busy_farm(name: &str) -> (Farm, Proc, Vec<i32>) {
    let farm = Farm::new(name)
        .and_then(|f| f.host("m"))
        .and_then(|f| f.host("s"))
        .expect("farm");
    let expr = farm["s"].write_file("tiny.nix", TINY_EXPR).expect("write");
    farm["s"]
        .nix_build(&expr, &["--argstr", "seed", name])
        .expect("build");
    let mut cmd = farm["m"].cmd("/bin/sh");
    cmd.args([
        "-c",
        "setsid /bin/sleep 1000 & echo escaped $!; exec /bin/sleep 1000",
    ]);
    let mut proc = farm["m"].spawn("sleeper", cmd).expect("spawn");
    proc.wait_for_log("escaped", Duration::from_secs(10))
        .expect("escapee started");
    let escaped: i32 = proc
        .log()
        .expect("log")
        .trim()
        .trim_start_matches("escaped ")
        .parse()
        .expect("pid");
    let pids = vec![i32::try_from(proc.pid()).expect("pid"), escaped];
    (farm, proc, pids)
}

#[test]
fn a_dropped_farm_leaves_nothing_behind() {
    let (farm, guard, pids) = busy_farm("drop");
    let residue = Residue::of(&farm, pids);
    // The farm goes first, with the guard still alive: the farm must clean up
    // on its own (the guard then only reaps its zombie).
    drop(farm);
    residue.assert_gone();
    drop(guard);
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let (farm, guard, pids) = busy_farm("panic");
        // The guard leaves through the channel, so only the farm's Drop
        // cleans up during the unwinding.
        tx.send((Residue::of(&farm, pids), guard)).expect("send");
        panic!("deliberate failure inside a farm");
    });
    assert!(result.is_err());
    let (residue, guard) = rx.recv().expect("residue");
    residue.assert_gone();
    drop(guard);
}

#[test]
fn stale_namespaces_of_dead_processes_are_swept() {
    // A pid that is certainly dead: a child we have reaped.
    let mut child = std::process::Command::new("/bin/true")
        .spawn()
        .expect("spawn");
    let dead = child.id();
    child.wait().expect("wait");
    let name = format!("nixq-{dead}-0-stale");
    assert!(std::process::Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .expect("ip")
        .success());
    // Something still running inside, as after a crash.
    let mut inside = std::process::Command::new("ip")
        .args(["netns", "exec", &name, "/bin/sleep", "1000"])
        .spawn()
        .expect("spawn in stale namespace");
    // `ip netns exec` joins the namespace after `spawn` returns: wait for it,
    // or the sweep could empty the namespace before the process is inside.
    let identity = {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(format!("/run/netns/{name}"))
            .expect("handle")
            .ino();
        format!("net:[{ino}]")
    };
    let pid = i32::try_from(inside.id()).expect("pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !netns::pids_in(&identity).contains(&pid) {
        assert!(
            Instant::now() < deadline,
            "ip netns exec never entered {name}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let removed = netns::sweep_stale();
    assert!(removed.contains(&name), "{removed:?}");
    assert!(!netns::ours().contains(&name));
    let status = inside.wait().expect("wait");
    assert!(!status.success(), "the process inside was killed");
}

#[test]
fn failures_name_the_host_the_command_and_its_output() {
    let farm = Farm::new("errors").and_then(|f| f.host("h")).expect("farm");
    let h = &farm["h"];
    let err = h
        .sh("echo to-out; echo to-err >&2; exit 3")
        .expect_err("must fail");
    let text = err.to_string();
    assert!(matches!(err, Error::CommandFailed { .. }));
    for part in ["[h]", "exit status: 3", "to-out", "to-err", "/bin/sh -c"] {
        assert!(text.contains(part), "{part:?} missing from {text}");
    }
    let started = Instant::now();
    let mut cmd = h.cmd("/bin/sleep");
    cmd.arg("30");
    let err = h
        .run_timeout(cmd, Duration::from_millis(200))
        .expect_err("must time out");
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // A spawned process's output lands in its log.
    let mut cmd = h.cmd("/bin/sh");
    cmd.args(["-c", "echo ready; echo oops >&2; exit 7"]);
    let mut p = h.spawn("short", cmd).expect("spawn");
    let status = p
        .wait_timeout(Duration::from_secs(10))
        .expect("wait")
        .expect("exited");
    assert_eq!(status.code(), Some(7));
    assert_eq!(p.log().expect("log"), "ready\noops\n");
    let log_name = p
        .log_path()
        .file_name()
        .expect("log name")
        .to_string_lossy()
        .into_owned();
    assert_eq!(log_name, "h-short.log");
}
