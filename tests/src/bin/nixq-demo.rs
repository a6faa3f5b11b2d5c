//! `nixq-demo`: the Quick start. On this one machine it sets up a master
//! and a slave (each its own network namespace and its own `/nix`), issues
//! certificates, starts `nixq-agent` on the slave, points the master's Nix
//! at `nixq-build-hook`, runs a real `nix-build` of a small DAG that builds
//! entirely on the slave, prints what happened, and tears everything down.
//!
//! ```text
//! tests/demo              # as root: builds the workspace, then runs this
//! ```
//!
//! Needs root (namespaces, bind mounts) and Nix (`apt-get install -y
//! nix-bin iproute2` on Debian). Exits non-zero with a message naming the
//! step that failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nixq_common::store_path::StorePath;
use nixq_e2e::hook_farm::{remote_builds, HookFarm, Slave};
use nixq_e2e::nixq::AGENT_PORT;

/// The demo's derivations: a `builtins.toFile` source, two derivations that
/// use it side by side, and one that combines both (4 derivations, 3 layers).
const DEMO_EXPR: &str = r#"# The nixq Quick start DAG: built by the master's Nix, on the slave.
let
  poem = builtins.toFile "demo-poem" "roses are red\nstore paths are blue\n";
  hello = derivation {
    name = "demo-hello";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-e" "-c" ''
      echo "hello from the builder of demo-hello"
      /bin/mkdir $out
      echo "hello" > $out/word
    '' ];
  };
  upper = derivation {
    name = "demo-poem-upper";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-e" "-c" ''
      echo "shouting the poem"
      /bin/mkdir $out
      /usr/bin/tr a-z A-Z < ${poem} > $out/poem
    '' ];
  };
  counted = derivation {
    name = "demo-poem-lines";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-e" "-c" ''
      echo "counting the lines of the poem"
      /bin/mkdir $out
      /usr/bin/wc -l < ${poem} > $out/lines
    '' ];
  };
in derivation {
  name = "demo-result";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-e" "-c" ''
    echo "combining ${hello}, ${upper} and ${counted}"
    /bin/mkdir $out
    { /bin/cat ${hello}/word; /bin/cat ${upper}/poem; echo "lines: $(/bin/cat ${counted}/lines)"; } > $out/result
    /bin/ln -s ${upper} $out/upper
  '' ];
}
"#;

/// The whole demo must finish within this (a fresh debug build on two
/// slow cores takes a few seconds).
const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nnixq-demo: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(n: u32, text: &str) {
    println!("\n==> [{n}] {text}");
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Lets the farm find `nixq-agent` and `nixq-build-hook` next to this
/// program (`target/<profile>/`) unless `NIXQ_BIN_DIR` says otherwise.
fn locate_binaries() -> anyhow::Result<()> {
    if std::env::var_os("NIXQ_BIN_DIR").is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe().context("cannot locate nixq-demo itself")?;
    let dir = exe
        .parent()
        .map(PathBuf::from)
        .context("nixq-demo has no directory")?;
    // Single-threaded here: nothing reads the environment concurrently.
    std::env::set_var("NIXQ_BIN_DIR", dir);
    Ok(())
}

fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    nixq_e2e::check_root_and_nix().context(
        "the demo needs root and Nix: run it as root after `apt-get install -y nix-bin iproute2`",
    )?;
    locate_binaries()?;
    for bin in ["nixq-agent", "nixq-build-hook"] {
        nixq_e2e::nixq_bin(bin).with_context(|| {
            format!(
                "{bin} is missing: run `cargo build --workspace --bins` first (tests/demo does)"
            )
        })?;
    }
    println!("nixq Quick start: a master and a slave on this machine, each with its own network");
    println!("namespace and its own /nix; the master's Nix builds on the slave through nixq.");

    step(
        1,
        "creating hosts, issuing certificates with nixq-certs, starting nixq-agent on s1",
    );
    let farm = HookFarm::new("demo", &[Slave::new("s1").max_jobs(2)])
        .context("setting up the master and the slave")?;
    let master = farm.master();
    let s1 = farm.host("s1");
    println!(
        "    master  {}  (its own /nix: {}/nix)",
        master.ip(),
        master.dir().display()
    );
    println!(
        "    s1      {}  (its own /nix: {}/nix)",
        s1.ip(),
        s1.dir().display()
    );
    println!(
        "    certificates: a fresh CA; agent certificate for s1 ({} and {});",
        s1.name(),
        s1.ip()
    );
    println!(
        "                  master certificate + key in {}",
        farm.creds().identity.display()
    );
    let agent = farm.agent("s1").context("the agent of s1 is not running")?;
    let agent_log = strip_ansi(&agent.log().context("reading the agent's log")?);
    let listening = agent_log
        .lines()
        .find(|l| l.contains("listening on"))
        .context("the agent never said it was listening")?;
    println!(
        "    nixq-agent on s1: {}",
        listening.split_once("INFO ").map_or(listening, |(_, l)| l)
    );
    println!("    (port {AGENT_PORT}/udp, QUIC with mutual TLS)");

    step(2, "configuring the master's Nix");
    let conf = std::fs::read_to_string(master.etc_nix().join("nix.conf")).context("nix.conf")?;
    for line in conf.lines().filter(|l| {
        ["build-hook", "max-jobs", "builders", "build-poll-interval"]
            .iter()
            .any(|k| l.starts_with(k))
    }) {
        println!("    nix.conf: {line}");
    }
    let machines = std::fs::read_to_string(farm.machines_file()).context("machines file")?;
    for line in machines.lines().filter(|l| !l.starts_with('#')) {
        let shown: Vec<&str> = line.split_whitespace().collect();
        let ca = shown
            .get(7)
            .map_or(String::new(), |c| format!("{}…", &c[..c.len().min(16)]));
        println!(
            "    machines: {} {} {} {} {} {} {} {ca}",
            shown.first().unwrap_or(&""),
            shown.get(1).unwrap_or(&""),
            shown.get(2).unwrap_or(&""),
            shown.get(3).unwrap_or(&""),
            shown.get(4).unwrap_or(&""),
            shown.get(5).unwrap_or(&""),
            shown.get(6).unwrap_or(&""),
        );
    }
    println!("    (columns: URI, systems, master identity, max jobs, speed, features, mandatory, agent CA in base64)");

    step(
        3,
        "nix-build of a 4-derivation DAG on the master (max-jobs = 0: nothing may build locally)",
    );
    let expr = farm
        .write_expr("demo", DEMO_EXPR)
        .context("writing demo.nix")?;
    let drvs = farm
        .instantiate(&expr, &[])
        .context("nix-instantiate demo.nix")?;
    let all_drvs = farm
        .drv_closure(&drvs)
        .context("the derivations of demo.nix")?;
    let build_started = Instant::now();
    let run = farm
        .nix_build(&expr, &[], BUILD_TIMEOUT)
        .context("running nix-build")?;
    let took = build_started.elapsed();
    if run.code != Some(0) {
        bail!(
            "nix-build exited with {:?}\n--- its stderr:\n{}",
            run.code,
            run.stderr
        );
    }
    let builds = remote_builds(&run.stderr);
    for (drv, machine) in &builds {
        println!("    built {drv} on {machine}");
    }
    if builds.len() != all_drvs.len() {
        bail!(
            "{} derivations, but Nix announced {} remote builds\n--- nix-build's stderr:\n{}",
            all_drvs.len(),
            builds.len(),
            run.stderr
        );
    }
    println!("    nix-build finished in {took:.1?}");

    step(4, "checking the result on the master");
    let out = run
        .stdout
        .lines()
        .next_back()
        .context("nix-build printed no output path")?;
    let out = StorePath::parse_any(out).with_context(|| format!("{out:?} is not a store path"))?;
    let closure = master
        .closure(std::slice::from_ref(&out))
        .context("closure of the result")?;
    let valid = master
        .valid_paths(&closure)
        .context("validity on the master")?;
    if valid.len() != closure.len() {
        bail!(
            "only {} of {} paths of the result's closure are valid on the master",
            valid.len(),
            closure.len()
        );
    }
    println!(
        "    {out} and its {} references are valid in the master's store:",
        closure.len() - 1
    );
    for path in &closure {
        println!("      {path}");
    }
    master
        .nix_store(&["--verify-path", out.as_str()])
        .context("nix-store --verify-path on the master")?;
    let result = std::fs::read_to_string(
        master
            .dir()
            .join(out.as_str().trim_start_matches('/'))
            .join("result"),
    )
    .context("reading the result")?;
    for line in result.lines() {
        println!("    result: {line}");
    }
    let result_drv = drvs.first().context("no derivation")?;
    let log = master
        .nix_store(&["-l", result_drv.as_str()])
        .context("nix-store -l on the master")?;
    println!(
        "    nix-store -l {} (on the master; the builder ran on s1):",
        result_drv.name()
    );
    for line in log.lines().take(5) {
        println!("      | {line}");
    }

    step(5, "what the agent on s1 saw");
    let status = farm
        .status("s1")
        .context("asking the agent for its status")?;
    let c = status.counters;
    println!(
        "    builds started {}, succeeded {}, failed {}; paths received {} ({} NAR bytes), outputs sent back {}",
        c.builds_started, c.builds_succeeded, c.builds_failed, c.paths_received, c.nar_bytes_received, c.paths_sent
    );
    let agent_log = strip_ansi(
        &farm
            .agent("s1")
            .context("agent")?
            .log()
            .context("agent log")?,
    );
    for line in agent_log
        .lines()
        .filter(|l| l.contains("build started") || l.contains("build ended"))
    {
        let short = line.split_once("}: ").map_or(line, |(_, rest)| rest);
        println!("    agent: {short}");
    }
    if c.builds_succeeded != all_drvs.len() as u64 {
        bail!(
            "the agent built {} derivations, expected {}",
            c.builds_succeeded,
            all_drvs.len()
        );
    }

    step(6, "tearing down (agents, namespaces, the hosts' /nix)");
    drop(farm);
    println!(
        "\nnixq-demo: OK: {} derivations built remotely on s1 through nixq-build-hook in {took:.1?} (demo total {:.1?})",
        all_drvs.len(),
        started.elapsed()
    );
    Ok(())
}
