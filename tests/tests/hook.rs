//! `nixq-build-hook` driven by real Nix 2.8 on a master host, building on
//! real `nixq-agent`s on slave hosts (each its own network and `/nix`; see
//! `nixq_e2e::hook_farm` for the configuration).
//!
//! What each test proves:
//! * [`a_dag_builds_entirely_on_the_slaves`]: 31 derivations (5 layers of 6,
//!   multiple outputs, `builtins.toFile` sources, references by content and
//!   by symlink) all build remotely, on both slaves; every output is valid on
//!   the master with the NAR hash, size and references the building slave
//!   registered; `nix-store -l` on the master shows each builder's output.
//! * [`routing_follows_systems_and_features`]: `kvm` derivations go only
//!   to the slave supporting `kvm`; the slave with the mandatory feature
//!   `perf` gets only `perf` derivations; the fastest slave, below its
//!   free-space floor, gets nothing; a derivation for a system nobody has
//!   fails with Nix's own message, quickly.
//! * [`one_build_at_a_time_per_slave`]: with max jobs 1, ten 1-second builds
//!   never overlap on an agent (its peak running builds is 1) and all
//!   complete (Nix's postpone loop works).
//! * [`builder_failure_is_100_and_timeout_is_101`]: exit statuses and the
//!   failed builder's log on the master.
//! * [`a_killed_agent_is_a_transient_failure_and_a_down_slave_is_skipped`].
//! * [`concurrent_builds_upload_shared_inputs_once`]: two `nix-build`s.
//! * [`sigterm_to_the_hook_cancels_the_remote_build`]: SIGTERM to the
//!   hook mid-build stops the builder on the slave (the agent's running
//!   builds drop to 0, its `sleep` is gone) and `nix-build` fails.
//! * [`classic_and_line_protocols_build`]: the hook spoken to as Nix
//!   0.10–0.12 did (fd 3 reply, fd 4 `okay`/`cancel`, three files), and as
//!   Nix 1.x did (request lines on stdin, `# accept` on stderr, inputs and
//!   outputs as two lines, the build log on fd 4).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nixq_common::store_path::StorePath;
use nixq_e2e::hook_farm::{
    descendants_named, machine_base, processes, remote_builds, HookFarm, Slave,
};
use nixq_e2e::nixq::{registrations, Outcome};
use nixq_e2e::{closure_expr, ClosureSpec, Fill, Host};

/// Deadline of one `nix-build` in these tests: generous for two loaded
/// cores, small enough that a hang fails fast.
const BUILD_TIMEOUT: Duration = Duration::from_secs(150);

fn paths(host: &Host, text: &str) -> Vec<StorePath> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| StorePath::parse_any(l).unwrap_or_else(|e| panic!("{}: {l:?}: {e}", host.name())))
        .collect()
}

/// The output paths of `drv` (`nix-store -q --outputs`).
fn outputs_of(host: &Host, drv: &StorePath) -> Vec<StorePath> {
    let text = host
        .nix_store(&["-q", "--outputs", drv.as_str()])
        .expect("nix-store -q --outputs");
    paths(host, &text)
}

/// `nix-store -l DRV` on `host`.
fn build_log(host: &Host, drv: &StorePath) -> String {
    host.nix_store(&["-l", drv.as_str()]).expect("nix-store -l")
}

/// Checks that `run` succeeded, with its output in the message otherwise.
fn assert_success(what: &str, run: &Outcome) {
    assert_eq!(
        run.code,
        Some(0),
        "{what} failed\n--- stdout\n{}\n--- stderr\n{}",
        run.stdout,
        run.stderr
    );
}

/// Which machine built each derivation, from Nix's "building … on …" lines;
/// every derivation at most once.
fn machines_by_drv(stderr: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for (drv, machine) in remote_builds(stderr) {
        let previous = map.insert(drv.clone(), machine_base(&machine).to_owned());
        assert!(previous.is_none(), "{drv} was built twice\n{stderr}");
    }
    map
}

#[test]
fn a_dag_builds_entirely_on_the_slaves() {
    let farm = HookFarm::new(
        "hook-dag",
        &[Slave::new("s1").max_jobs(2), Slave::new("s2").max_jobs(2)],
    )
    .expect("hook farm");
    let master = farm.master();
    let spec = ClosureSpec {
        layers: 5,
        width: 6,
        fan_in: 3,
        large_every: 7,
        large_bytes: 256 * 1024,
        fill: Fill::Compressible,
        multi_output_every: 3,
        ..ClosureSpec::new("hookdag")
    };
    assert!(spec.derivation_count() >= 30);
    let expr = farm
        .write_expr("hookdag", &closure_expr(&spec))
        .expect("expression");
    let root_drv = farm
        .instantiate(&expr, &["-A", "root"])
        .expect("instantiate")
        .pop()
        .expect("one root drv");
    let drvs = farm
        .drv_closure(std::slice::from_ref(&root_drv))
        .expect("drv closure");
    assert_eq!(drvs.len(), spec.derivation_count(), "{drvs:?}");

    let started = Instant::now();
    let run = farm
        .nix_build(&expr, &["-A", "root"], BUILD_TIMEOUT)
        .expect("nix-build runs");
    assert_success("nix-build of the DAG", &run);
    eprintln!(
        "{} derivations built remotely in {:.1?}",
        drvs.len(),
        started.elapsed()
    );

    // Every derivation was announced as built on a slave, and both worked.
    let built_on = machines_by_drv(&run.stderr);
    let expected: BTreeSet<String> = drvs.iter().map(|d| d.as_str().to_owned()).collect();
    assert_eq!(
        built_on.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "every derivation is built remotely\n{}",
        run.stderr
    );
    let used: BTreeSet<&str> = built_on.values().map(String::as_str).collect();
    assert_eq!(used, BTreeSet::from(["nixq://s1", "nixq://s2"]));

    // Outputs valid on the master, registered as the building slave did.
    let mut all_outputs = Vec::new();
    for drv in &drvs {
        let outs = outputs_of(master, drv);
        assert!(!outs.is_empty());
        let slave_name = built_on[drv.as_str()].trim_start_matches("nixq://");
        let slave = farm.host(slave_name);
        assert_eq!(
            master.valid_paths(&outs).expect("validity"),
            outs,
            "outputs of {drv} valid on the master"
        );
        let ours = registrations(master, &outs).expect("master registrations");
        let theirs = registrations(slave, &outs).expect("slave registrations");
        for out in &outs {
            let (m, s) = (&ours[out], &theirs[out]);
            assert_eq!(
                (&m.nar_hash, m.nar_size, &m.references),
                (&s.nar_hash, s.nar_size, &s.references),
                "{out}: the master's registration matches {slave_name}'s"
            );
            assert_eq!(m.deriver, drv.as_str(), "{out}: deriver on the master");
        }
        // The builder's output (stdout and stderr) is in the master's log.
        let log = build_log(master, drv);
        let name = drv.name().trim_end_matches(".drv");
        assert!(
            log.contains(&format!("building {name}")),
            "log of {drv} on the master: {log:?}"
        );
        if !name.ends_with("-root") {
            assert!(
                log.contains(&format!("{name} on stderr")),
                "log of {drv}: {log:?}"
            );
        }
        all_outputs.extend(outs);
    }
    // References by content and by symlink survived: the root's closure on
    // the master is complete and every path in it verifies.
    let root_out = outputs_of(master, &root_drv);
    let closure = master.closure(&root_out).expect("closure");
    for out in &all_outputs {
        assert!(closure.contains(out), "{out} in the root's closure");
    }
    master
        .verify_store()
        .expect("nix-store --verify --check-contents on the master");
    for slave in ["s1", "s2"] {
        let counters = farm.status(slave).expect("status").counters;
        eprintln!("{slave}: {counters:?}");
        assert_eq!(counters.builds_failed, 0);
    }
}

/// Independent derivations: `mk NAME ATTRS` makes one whose builder prints
/// `building NAME` and sleeps `sleep` seconds (an attribute, default 0).
const MK: &str = r#"
  mk = name: extra: derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    sleep = "0";
    args = [ "-e" "-c" ''
      echo building ${name}; echo "${name} on stderr" >&2
      /bin/sleep $sleep
      /bin/mkdir $out; echo ${name} > $out/name
    '' ];
  } // extra);
"#;

/// An expression `let MK; in { BODY }`.
fn independent_expr(body: &str) -> String {
    format!("let {MK} in rec {{\n{body}\n}}\n")
}

/// The machine (`nixq://sN`) each derivation of `attr` went to.
fn machines_of(
    farm: &HookFarm,
    expr: &std::path::Path,
    attr: &str,
    built_on: &BTreeMap<String, String>,
) -> Vec<String> {
    farm.instantiate(expr, &["-A", attr])
        .expect("instantiate")
        .iter()
        .map(|drv| {
            built_on
                .get(drv.as_str())
                .unwrap_or_else(|| panic!("{drv} ({attr}) was not built remotely"))
                .clone()
        })
        .collect()
}

#[test]
fn routing_follows_systems_and_features() {
    let farm = HookFarm::new(
        "hook-route",
        &[
            Slave::new("s1").supports(&["kvm"]),
            Slave::new("s2"),
            Slave::new("s3").mandatory(&["perf"]),
            // The fastest, but its store is below its free-space floor:
            // every hook must pass it over.
            Slave::new("s4").speed(100).min_free_space(1 << 60),
        ],
    )
    .expect("hook farm");
    let expr = farm
        .write_expr(
            "route",
            &independent_expr(
                r#"
  plain = map (i: mk "route-plain-${toString i}" {}) [ 1 2 3 4 5 6 ];
  kvm = map (i: mk "route-kvm-${toString i}" { requiredSystemFeatures = [ "kvm" ]; }) [ 1 2 3 ];
  perf = map (i: mk "route-perf-${toString i}" { requiredSystemFeatures = [ "perf" ]; }) [ 1 2 ];
  alien = mk "route-alien" { system = "riscv64-none"; };
"#,
            ),
        )
        .expect("expression");
    let run = farm
        .nix_build(
            &expr,
            &["-A", "plain", "-A", "kvm", "-A", "perf"],
            BUILD_TIMEOUT,
        )
        .expect("nix-build runs");
    assert_success("nix-build of the routed derivations", &run);
    let built_on = machines_by_drv(&run.stderr);
    let kvm = machines_of(&farm, &expr, "kvm", &built_on);
    assert!(kvm.iter().all(|m| m == "nixq://s1"), "kvm went to {kvm:?}");
    let perf = machines_of(&farm, &expr, "perf", &built_on);
    assert!(
        perf.iter().all(|m| m == "nixq://s3"),
        "perf went to {perf:?}"
    );
    let plain = machines_of(&farm, &expr, "plain", &built_on);
    assert!(
        plain.iter().all(|m| m == "nixq://s1" || m == "nixq://s2"),
        "plain derivations went to {plain:?}"
    );
    // The agents agree: s3 built exactly the perf derivations.
    let started = |slave| farm.status(slave).expect("status").counters.builds_started;
    assert_eq!(started("s3"), 2);
    let on_s1 = kvm.len() + plain.iter().filter(|m| *m == "nixq://s1").count();
    assert_eq!(started("s1"), on_s1 as u64);
    assert_eq!(started("s2"), (plain.len() + kvm.len() - on_s1) as u64);
    assert_eq!(started("s4"), 0);
    assert!(
        run.stderr.contains("not using nixq://s4") && run.stderr.contains("free"),
        "the hook says why it passes s4 over: {}",
        run.stderr
    );

    // A system nobody has: Nix's own error, not a hang.
    let started_at = Instant::now();
    let run = farm
        .nix_build(&expr, &["-A", "alien"], Duration::from_secs(60))
        .expect("nix-build runs");
    let took = started_at.elapsed();
    eprintln!(
        "riscv64-none: exit {:?} after {took:.1?}\n{}",
        run.code, run.stderr
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        run.stderr.contains("riscv64-none"),
        "Nix names the system: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains("is required to build")
            || run.stderr.contains("unable to start any build"),
        "Nix's own message: {}",
        run.stderr
    );
}

#[test]
fn one_build_at_a_time_per_slave() {
    let farm = HookFarm::new(
        "hook-load",
        &[Slave::new("s1").max_jobs(1), Slave::new("s2").max_jobs(1)],
    )
    .expect("hook farm");
    let expr = farm
        .write_expr(
            "load",
            &independent_expr(
                r#"all = map (i: mk "load-${toString i}" { sleep = "1"; }) [ 1 2 3 4 5 6 7 8 9 10 ];"#,
            ),
        )
        .expect("expression");
    let started = Instant::now();
    let run = farm
        .nix_build(&expr, &["-A", "all"], BUILD_TIMEOUT)
        .expect("nix-build runs");
    let took = started.elapsed();
    assert_success("nix-build of 10 sleepers", &run);
    let outs = paths(farm.master(), &run.stdout);
    assert_eq!(outs.len(), 10);
    assert_eq!(farm.master().valid_paths(&outs).expect("validity"), outs);
    assert_eq!(machines_by_drv(&run.stderr).len(), 10);
    let mut total = 0;
    for slave in ["s1", "s2"] {
        let counters = farm.status(slave).expect("status").counters;
        eprintln!("{slave}: {counters:?}");
        assert_eq!(
            counters.peak_running_builds, 1,
            "{slave} ran at most (and at least) one build at a time"
        );
        assert_eq!(counters.builds_failed, 0);
        total += counters.builds_succeeded;
    }
    assert_eq!(total, 10, "every build ran once");
    // Ten 1-second builds on two one-slot machines take at least 5 s.
    eprintln!("10 builds on 2 × 1 slots in {took:.1?}");
    assert!(took >= Duration::from_secs(5), "took {took:?}");
}

#[test]
fn builder_failure_is_100_and_timeout_is_101() {
    let farm = HookFarm::new("hook-fail", &[Slave::new("s1")]).expect("hook farm");
    let expr = farm
        .write_expr(
            "fail",
            &independent_expr(
                r#"
  fail = mk "failing" { args = [ "-c" "echo about to fail with status 3; echo failing on stderr >&2; exit 3" ]; };
  slow = mk "slow" { sleep = "30"; };
  silent = mk "silent" { sleep = "30"; };
"#,
            ),
        )
        .expect("expression");

    let run = farm
        .nix_build(&expr, &["-A", "fail"], BUILD_TIMEOUT)
        .expect("nix-build runs");
    assert_eq!(run.code, Some(100), "builder failure\n{}", run.stderr);
    assert!(
        run.stderr.contains("about to fail with status 3"),
        "{}",
        run.stderr
    );
    let drv = farm
        .instantiate(&expr, &["-A", "fail"])
        .expect("instantiate")
        .pop()
        .expect("drv");
    let log = build_log(farm.master(), &drv);
    assert!(log.contains("about to fail with status 3"), "log: {log:?}");
    assert!(log.contains("failing on stderr"), "log: {log:?}");

    for (attr, option) in [("slow", "timeout"), ("silent", "max-silent-time")] {
        let started = Instant::now();
        let run = farm
            .nix_build(&expr, &["-A", attr, "--option", option, "2"], BUILD_TIMEOUT)
            .expect("nix-build runs");
        let took = started.elapsed();
        eprintln!(
            "{option} 2 with sleep 30: exit {:?} after {took:.1?}",
            run.code
        );
        assert_eq!(run.code, Some(101), "{option}\n{}", run.stderr);
        assert!(took < Duration::from_secs(9), "{option}: took {took:?}");
    }
    // The timed-out builds were stopped on the slave too, long before
    // their builders would have ended by themselves.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = farm.status("s1").expect("status");
        if status.running_builds == 0 {
            assert_eq!(status.counters.builds_succeeded, 0, "{status:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent still counts running builds 10 s after the master gave up: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `proc`'s log has a line `building '<drv>' on '<machine>'`
/// and returns the machine.
fn wait_for_remote_build(proc: &mut nixq_e2e::Proc, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let log = proc.log().expect("log");
        if let Some((_, machine)) = remote_builds(&log).pop() {
            return machine_base(&machine).to_owned();
        }
        assert!(
            proc.try_wait().expect("wait").is_none(),
            "nix-build ended before a remote build started:\n{log}"
        );
        assert!(
            Instant::now() < deadline,
            "no remote build after {within:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_agent_is_a_transient_failure_and_a_down_slave_is_skipped() {
    // s0 is first and fastest, so it is tried first; its agent never runs.
    let quick = "connect-timeout=2";
    let slaves = [
        Slave::new("s0").down().speed(4).uri_params(quick),
        Slave::new("s1").uri_params(quick),
        Slave::new("s2").uri_params(quick),
    ];
    let mut farm = HookFarm::new("hook-kill", &slaves).expect("hook farm");
    let expr = farm
        .write_expr(
            "kill",
            &independent_expr(
                r#"
  first = mk "kill-first" {};
  second = mk "kill-second" {};
  long = mk "kill-long" { sleep = "20"; };
"#,
            ),
        )
        .expect("expression");

    // Down from the start: skipped after one bounded connection attempt,
    // and remembered, so the next hook does not even try it.
    let started = Instant::now();
    let run = farm
        .nix_build(&expr, &["-A", "first"], BUILD_TIMEOUT)
        .expect("nix-build runs");
    let first_took = started.elapsed();
    assert_success("nix-build with a slave down", &run);
    let machines: Vec<String> = machines_by_drv(&run.stderr).into_values().collect();
    assert_eq!(machines.len(), 1);
    assert_ne!(machines[0], "nixq://s0");
    assert!(
        run.stderr.contains("nixq://s0"),
        "the hook says it skipped s0:\n{}",
        run.stderr
    );
    eprintln!(
        "with s0 down: built on {} in {first_took:.1?}\n{}",
        machines[0], run.stderr
    );
    let started = Instant::now();
    let run = farm
        .nix_build(&expr, &["-A", "second"], BUILD_TIMEOUT)
        .expect("nix-build runs");
    let second_took = started.elapsed();
    assert_success("second nix-build with a slave down", &run);
    assert!(
        !run.stderr.contains("cannot use nixq://s0"),
        "s0 is in back-off:\n{}",
        run.stderr
    );
    eprintln!("s0 remembered as down: second build in {second_took:.1?}");
    assert!(second_took < Duration::from_secs(2) + first_took.min(Duration::from_secs(60)));

    // Killed mid-build.
    let cmd = farm.nix_build_command(&expr, &["-A", "long"]);
    let mut build = farm
        .master()
        .spawn("nix-build-long", cmd)
        .expect("spawn nix-build");
    let victim = wait_for_remote_build(&mut build, Duration::from_secs(60));
    let victim = victim.trim_start_matches("nixq://").to_owned();
    build
        .wait_for_log("kill-long on stderr", Duration::from_secs(30))
        .expect("the builder runs");
    let killed_at = Instant::now();
    farm.agent_mut(&victim)
        .expect("victim agent")
        .proc()
        .kill()
        .expect("kill the agent");
    let status = build
        .wait_timeout(Duration::from_secs(90))
        .expect("wait")
        .expect("nix-build ends within 90 s of the agent's death");
    let lost_after = killed_at.elapsed();
    let log = build.log().expect("log");
    eprintln!("agent on {victim} killed: nix-build {status} after {lost_after:.1?}\n{log}");
    let rebuilt_on = machines_by_drv(&log);
    if status.success() {
        // The hook's fallback or Nix's retry finished it elsewhere.
        assert!(
            rebuilt_on
                .values()
                .any(|m| m != &format!("nixq://{victim}")),
            "{log}"
        );
    } else {
        assert_eq!(
            status.code(),
            Some(1),
            "a transient failure (MiscFailure)\n{log}"
        );
        // A second run completes on the other slave.
        let run = farm
            .nix_build(&expr, &["-A", "long"], BUILD_TIMEOUT)
            .expect("nix-build runs");
        assert_success("nix-build after the agent was killed", &run);
        let machines: Vec<String> = machines_by_drv(&run.stderr).into_values().collect();
        assert_eq!(machines.len(), 1);
        assert_ne!(machines[0], format!("nixq://{victim}"), "{}", run.stderr);
        assert_ne!(machines[0], "nixq://s0");
    }
}

/// Whether a process runs exactly `argv` anywhere on the machine.
fn running(argv: &[&str]) -> bool {
    processes().iter().any(|p| p.argv == argv)
}

/// Polls `check` every 100 ms until it holds; panics with `what` after
/// `within`.
fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what} not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigterm_to_the_hook_cancels_the_remote_build() {
    let farm = HookFarm::new("hook-sig", &[Slave::new("s1")]).expect("hook farm");
    // A sleep length no other test uses, so that its process is ours.
    let builder_sleep = ["/bin/sleep", "29.37"];
    let expr = farm
        .write_expr(
            "sig",
            &independent_expr(&format!(
                "  long = mk \"sig-long\" {{ sleep = \"{}\"; }};\n",
                builder_sleep[1]
            )),
        )
        .expect("expression");
    let cmd = farm.nix_build_command(&expr, &["-A", "long"]);
    let mut build = farm
        .master()
        .spawn("nix-build-sig", cmd)
        .expect("spawn nix-build");
    assert_eq!(
        wait_for_remote_build(&mut build, Duration::from_secs(60)),
        "nixq://s1"
    );
    wait_until(
        "the agent reporting one running build",
        Duration::from_secs(20),
        || farm.status("s1").expect("status").running_builds == 1,
    );
    wait_until("the builder's sleep", Duration::from_secs(20), || {
        running(&builder_sleep)
    });

    let hooks = descendants_named(build.pid(), "nixq-build-hook");
    assert!(
        !hooks.is_empty(),
        "no nixq-build-hook under nix-build ({})",
        build.pid()
    );
    let signalled_at = Instant::now();
    for pid in &hooks {
        // SAFETY: kill(2) has no memory effects; `pid` is a live child of
        // our nix-build (a stale pid would at worst get ESRCH).
        let rc = unsafe { libc::kill(*pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill({pid}, SIGTERM)");
    }
    wait_until(
        "the agent reporting no running build",
        Duration::from_secs(10),
        || farm.status("s1").expect("status").running_builds == 0,
    );
    wait_until(
        "the builder's sleep ending on the slave",
        Duration::from_secs(10),
        || !running(&builder_sleep),
    );
    let cancelled_after = signalled_at.elapsed();
    let status = build
        .wait_timeout(Duration::from_secs(30))
        .expect("wait")
        .expect("nix-build ends within 30 s of the hook's SIGTERM");
    let log = build.log().expect("log");
    eprintln!(
        "SIGTERM to hook {hooks:?}: remote build cancelled after {cancelled_after:.1?}, \
         nix-build {status} after {:.1?}\n{log}",
        signalled_at.elapsed()
    );
    assert!(!status.success(), "nix-build succeeded\n{log}");
    let status = farm.status("s1").expect("status");
    assert_eq!(status.counters.builds_succeeded, 0, "{status:?}");
}

#[test]
fn concurrent_builds_upload_shared_inputs_once() {
    let farm = HookFarm::new("hook-share", &[Slave::new("s1").max_jobs(4)]).expect("hook farm");
    let master = farm.master();
    // Inputs that exist only on the master: built there, without the hook.
    let shared = ClosureSpec {
        layers: 2,
        width: 4,
        large_every: 2,
        large_bytes: 512 * 1024,
        fill: Fill::Compressible,
        ..ClosureSpec::new("share")
    };
    farm.write_expr("shared", &closure_expr(&shared))
        .expect("expression");
    let local = ["--option", "builders", "", "--option", "max-jobs", "2"];
    let mut args = vec!["-A", "root"];
    args.extend(local);
    let shared_expr = master.dir().join("shared.nix");
    let shared_root = master
        .nix_build(&shared_expr, &args)
        .expect("local build of the shared inputs")
        .pop()
        .expect("root");
    let shared_closure = master
        .closure(std::slice::from_ref(&shared_root))
        .expect("closure");

    // Two expressions whose derivations all take the shared closure and a
    // shared source, plus a source of their own.
    for side in ["a", "b"] {
        let body = format!(
            r#"
  shared = (import ./shared.nix).root;
  common = builtins.toFile "share-common-src" "the same source for everybody";
  all = map (i: mk "share-{side}-${{toString i}}" {{
    inherit shared common;
    own = builtins.toFile "share-{side}-${{toString i}}-src" "source {side} ${{toString i}}";
  }}) [ 1 2 3 4 ];
"#
        );
        farm.write_expr(&format!("share-{side}"), &independent_expr(&body))
            .expect("expression");
    }
    let mut builds = Vec::new();
    for side in ["a", "b"] {
        let expr = master.dir().join(format!("share-{side}.nix"));
        let cmd = farm.nix_build_command(&expr, &["-A", "all"]);
        builds.push(
            master
                .spawn(&format!("nix-build-{side}"), cmd)
                .expect("spawn"),
        );
    }
    let mut outputs = BTreeSet::new();
    for mut build in builds {
        let status = build
            .wait_timeout(BUILD_TIMEOUT)
            .expect("wait")
            .expect("nix-build ends");
        let log = build.log().expect("log");
        assert!(status.success(), "{status}\n{log}");
        assert_eq!(machines_by_drv(&log).len(), 4, "{log}");
        for line in log.lines().filter(|l| l.starts_with("/nix/store/")) {
            outputs.insert(StorePath::parse_any(line).expect("output path"));
        }
    }
    assert_eq!(outputs.len(), 8);

    // Everything on s1 was either built there or received, and each
    // received path crossed the wire once.
    let on_s1: BTreeSet<StorePath> = farm
        .host("s1")
        .all_valid_paths()
        .expect("s1 paths")
        .into_iter()
        .collect();
    let received: BTreeSet<&StorePath> = on_s1.difference(&outputs).collect();
    for path in &shared_closure {
        assert!(received.contains(path), "{path} was uploaded");
    }
    let counters = farm.status("s1").expect("status").counters;
    eprintln!(
        "{} paths on s1 besides the 8 outputs; {counters:?}",
        received.len()
    );
    assert_eq!(counters.builds_succeeded, 8);
    assert_eq!(
        counters.paths_received,
        received.len() as u64,
        "{counters:?}"
    );
    assert_eq!(counters.paths_received_already_valid, 0, "{counters:?}");
    // shared closure + the common source + 8 own sources
    assert_eq!(received.len(), shared_closure.len() + 1 + 8);
}

/// A pipe whose ends are close-on-exec in this process.
fn pipe() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd as _;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

/// The hook started as Nix 0.10–0.12 starts it (nix-interfaces.md §3.1,
/// seed 003): four arguments, `NIX_BUILD_HOOK`, the reply pipe on fd 3,
/// the go-ahead pipe on fd 4, a fresh working directory; stdout and stderr
/// (the build log) go to the Proc's log.
struct ClassicHook {
    proc: nixq_e2e::Proc,
    reply: std::sync::mpsc::Receiver<String>,
    go: Option<std::fs::File>,
    dir: std::path::PathBuf,
}

impl ClassicHook {
    fn start(farm: &HookFarm, label: &str, system: &str, drv: &StorePath) -> Self {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::process::CommandExt as _;
        let master = farm.master();
        let dir = master.dir().join(label);
        std::fs::create_dir_all(&dir).expect("hook directory");
        let (reply_r, reply_w) = pipe();
        let (go_r, go_w) = pipe();
        let mut cmd = master.cmd(farm.hook_bin());
        cmd.args(["1", system, system, drv.as_str()])
            .env("NIX_BUILD_HOOK", farm.hook_bin())
            .env("NIX_REMOTE_SYSTEMS", farm.machines_file())
            .env("NIX_CURRENT_LOAD", master.dir().join("classic-load"))
            .current_dir(&dir);
        let (w, r) = (reply_w.as_raw_fd(), go_r.as_raw_fd());
        // SAFETY: only fcntl and dup2 on descriptors that stay open in the
        // parent until spawn returns: async-signal-safe, no allocation.
        unsafe {
            cmd.pre_exec(move || {
                // Move both out of the way first: either may already be 3 or 4.
                let high_w = libc::fcntl(w, libc::F_DUPFD_CLOEXEC, 10);
                let high_r = libc::fcntl(r, libc::F_DUPFD_CLOEXEC, 10);
                if high_w < 0
                    || high_r < 0
                    || libc::dup2(high_w, 3) < 0
                    || libc::dup2(high_r, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let proc = master.spawn(label, cmd).expect("spawn the hook");
        drop((reply_w, go_r));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut line = String::new();
            let _ = std::io::BufReader::new(reply_r).read_line(&mut line);
            let _ = tx.send(line);
        });
        Self {
            proc,
            reply: rx,
            go: Some(go_w),
            dir,
        }
    }

    /// The line the hook wrote on fd 3 ("" if it closed fd 3 without one).
    fn reply(&self) -> String {
        self.reply
            .recv_timeout(Duration::from_secs(30))
            .expect("a reply on fd 3 within 30 s")
    }

    /// Writes `line` on fd 4 and closes it.
    fn go(&mut self, line: &str) {
        use std::io::Write as _;
        let mut go = self.go.take().expect("fd 4 still open");
        go.write_all(line.as_bytes()).expect("write on fd 4");
    }

    fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        self.proc
            .wait_timeout(within)
            .expect("wait")
            .unwrap_or_else(|| {
                panic!(
                    "the hook still runs after {within:?}:\n{}",
                    self.proc.log().unwrap_or_default()
                )
            })
    }
}

/// The `references` file of §3.1: path, deriver, count, references.
fn references_file(host: &Host, paths: &[StorePath]) -> String {
    let mut text = String::new();
    for (path, reg) in registrations(host, paths).expect("registrations") {
        text.push_str(&format!(
            "{path}\n{}\n{}\n",
            reg.deriver,
            reg.references.len()
        ));
        for r in &reg.references {
            text.push_str(r);
            text.push('\n');
        }
    }
    text
}

fn lines_of(paths: &[StorePath]) -> String {
    paths.iter().map(|p| format!("{p}\n")).collect()
}

/// Checks that `outputs` are valid on the master with the NAR hash and
/// references they have on `s1`; returns the master's registrations.
fn assert_outputs_as_on_s1(
    farm: &HookFarm,
    outputs: &[StorePath],
) -> BTreeMap<StorePath, nixq_e2e::nixq::Registration> {
    let master = farm.master();
    assert_eq!(master.valid_paths(outputs).expect("validity"), outputs);
    let ours = registrations(master, outputs).expect("registrations");
    let theirs = registrations(farm.host("s1"), outputs).expect("registrations");
    for out in outputs {
        assert_eq!(
            (&ours[out].nar_hash, &ours[out].references),
            (&theirs[out].nar_hash, &theirs[out].references)
        );
    }
    ours
}

/// The `.drv` of `attr` in `expr`.
fn instantiate_one(farm: &HookFarm, expr: &std::path::Path, attr: &str) -> StorePath {
    farm.instantiate(expr, &["-A", attr])
        .expect("instantiate")
        .pop()
        .expect("drv")
}

/// What Nix hands a classic or 1.x hook as the inputs of `drv`: the closure
/// of its input outputs and of the derivation itself.
fn hook_inputs(master: &Host, input_outputs: &[StorePath], drv: &StorePath) -> Vec<StorePath> {
    let mut inputs: BTreeSet<StorePath> = master
        .closure(input_outputs)
        .expect("closure")
        .into_iter()
        .collect();
    inputs.extend(
        master
            .closure(std::slice::from_ref(drv))
            .expect("drv closure"),
    );
    inputs.into_iter().collect()
}

#[test]
fn classic_and_line_protocols_build() {
    let farm = HookFarm::new("hook-classic", &[Slave::new("s1")]).expect("hook farm");
    let master = farm.master();
    let expr = farm
        .write_expr(
            "classic",
            &independent_expr(
                r#"
  dep = mk "classic-dep" {};
  top = mk "classic-top" {
    inherit dep;
    src = builtins.toFile "classic-src" "a source of the classic top";
    args = [ "-e" "-c" "echo building classic-top; echo classic-top on stderr >&2; /bin/mkdir $out; echo $dep > $out/dep; while read l; do echo $l; done < $src > $out/src" ];
  };
  cancelled = mk "classic-cancelled" {};
  line = mk "line-top" {
    inherit dep;
    args = [ "-e" "-c" "echo building line-top; /bin/mkdir $out; echo $dep > $out/dep" ];
  };
"#,
            ),
        )
        .expect("expression");
    // The input is built locally (the hook declines permanently without builders).
    let dep_out = master
        .nix_build(
            &expr,
            &[
                "-A", "dep", "--option", "builders", "", "--option", "max-jobs", "1",
            ],
        )
        .expect("local build of the input");
    let system = master
        .sh_stdout("nix-instantiate --eval --expr builtins.currentSystem")
        .expect("system")
        .trim_matches('"')
        .to_owned();
    let drv = instantiate_one(&farm, &expr, "top");
    let outputs = outputs_of(master, &drv);
    assert!(!master.is_valid(&outputs[0]).expect("validity"));

    let mut hook = ClassicHook::start(&farm, "hook-classic", &system, &drv);
    assert_eq!(hook.reply(), "accept\n");
    // Nix writes the files, then says okay (§3.1).
    let inputs = hook_inputs(master, &dep_out, &drv);
    std::fs::write(hook.dir.join("inputs"), lines_of(&inputs)).expect("inputs");
    std::fs::write(hook.dir.join("outputs"), lines_of(&outputs)).expect("outputs");
    std::fs::write(
        hook.dir.join("references"),
        references_file(master, &inputs),
    )
    .expect("references");
    hook.go("okay\n");
    let status = hook.wait(BUILD_TIMEOUT);
    let log = hook.proc.log().expect("log");
    eprintln!("classic hook: {status}\n{log}");
    assert!(status.success(), "{status}\n{log}");
    assert!(
        log.contains("building classic-top"),
        "the build log is on stderr: {log}"
    );
    let ours = assert_outputs_as_on_s1(&farm, &outputs);
    for out in &outputs {
        assert!(
            ours[out]
                .references
                .contains(&dep_out[0].as_str().to_owned()),
            "{:?}",
            ours[out]
        );
    }
    master.verify_store().expect("verify");

    // cancel: the hook exits cleanly and builds nothing.
    let before = farm.status("s1").expect("status").counters.builds_started;
    let drv = instantiate_one(&farm, &expr, "cancelled");
    let mut hook = ClassicHook::start(&farm, "hook-cancel", &system, &drv);
    assert_eq!(hook.reply(), "accept\n");
    hook.go("cancel\n");
    let status = hook.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "{status}\n{}",
        hook.proc.log().unwrap_or_default()
    );
    assert_eq!(
        farm.status("s1").expect("status").counters.builds_started,
        before
    );
    let out = outputs_of(master, &drv);
    assert!(!master.is_valid(&out[0]).expect("validity"));

    // The Nix 1.x line protocol (§3.3): request lines on stdin, replies on
    // stderr, then the inputs and the outputs as two lines; the builder log
    // on fd 4.
    let drv = instantiate_one(&farm, &expr, "line");
    let outputs = outputs_of(master, &drv);
    let build_log = master.dir().join("line-build.log");
    let log_file = std::fs::File::create(&build_log).expect("build log file");
    let mut cmd = master.cmd(farm.hook_bin());
    cmd.args([system.as_str(), "0", "0", "0"])
        .env("NIX_BUILD_HOOK", farm.hook_bin())
        .env("NIX_REMOTE_SYSTEMS", farm.machines_file())
        .env("NIX_CURRENT_LOAD", master.dir().join("classic-load"));
    {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::process::CommandExt as _;
        let fd = log_file.as_raw_fd();
        // SAFETY: fcntl and dup2 on a descriptor open in the parent until
        // spawn returns: async-signal-safe, no allocation.
        unsafe {
            cmd.pre_exec(move || {
                let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if high < 0 || libc::dup2(high, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut hook = master
        .spawn_with("hook-line", cmd, nixq_e2e::Stdin::Piped)
        .expect("spawn the hook");
    drop(log_file);
    let mut stdin = hook.take_stdin().expect("stdin");
    {
        use std::io::Write as _;
        // A system nobody has first: declined, and the same process goes on.
        writeln!(stdin, "0 mips64-linux {drv} ").expect("request");
        hook.wait_for_log("# decline", Duration::from_secs(30))
            .expect("declined");
        writeln!(stdin, "1 {system} {drv} ").expect("request");
        hook.wait_for_log("# accept", Duration::from_secs(30))
            .expect("accepted");
        let inputs = hook_inputs(master, &dep_out, &drv);
        let words = |paths: &[StorePath]| {
            paths
                .iter()
                .map(StorePath::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        };
        writeln!(stdin, "{}", words(&inputs)).expect("inputs");
        writeln!(stdin, "{}", words(&outputs)).expect("outputs");
    }
    drop(stdin);
    let status = hook
        .wait_timeout(BUILD_TIMEOUT)
        .expect("wait")
        .unwrap_or_else(|| {
            panic!(
                "the 1.x hook still runs:\n{}",
                hook.log().unwrap_or_default()
            )
        });
    let log = hook.log().expect("log");
    assert!(status.success(), "{status}\n{log}");
    let built = std::fs::read_to_string(&build_log).expect("build log");
    assert!(
        built.contains("building line-top"),
        "fd 4 carries the build log: {built:?}"
    );
    assert_outputs_as_on_s1(&farm, &outputs);
    master.verify_store().expect("verify");
}
