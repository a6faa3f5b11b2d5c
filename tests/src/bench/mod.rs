//! The copy-closure benchmark (issue 3, "Benchmark"): `nixq-copy-closure`
//! against `nix-copy-closure` over ssh and `nix copy --to ssh-ng://`, side
//! by side in one run, on a master and a slave host of a [`Farm`], plus the
//! raw throughput of one QUIC connection between the same namespaces.
//!
//! Not a test: `target/release/nixq-bench` runs it (see `src/bin/nixq-bench.rs`).
//!
//! | module      | owns                                                          |
//! |-------------|---------------------------------------------------------------|
//! | [`data`]    | the reproducible data sets and the `gen` builder              |
//! | [`builds`]  | the remote-build benchmark (issue 4): nixq hook against ssh   |
//! | [`measure`] | wall time and peak RSS of a client; a daemon's VmHWM          |
//! | [`ssh`]     | `sshd` in the slave's namespaces, the client's `ssh -F` file  |
//! | [`quic`]    | the raw quinn baseline                                        |
//! | [`report`]  | the Markdown table                                            |
//!
//! Each copy starts from a slave store without the data set: the agent (if
//! any) is stopped, `nix-store --gc` empties the slave's store, the agent is
//! started again (a fresh agent, so its VmHWM is this copy's), and dirty
//! pages are flushed (`sync`) so the previous copy's writeback does not eat
//! into this one. Then the same copy runs again as the no-op copy.

pub mod builds;
pub mod data;
pub mod measure;
pub mod quic;
pub mod report;
pub mod ssh;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nixq_common::store_path::StorePath;

use self::data::DataSet;
use self::report::{Measured, Row};
use crate::nixq::{self, Agent, Direction, MasterCreds, Pki};
use crate::{Farm, Host};

/// Names of the two hosts.
const MASTER: &str = "master";
const SLAVE: &str = "s1";
/// Bytes of the raw QUIC transfer at scale 1.
const RAW_QUIC_BYTES: f64 = 2.0 * 1024.0 * 1024.0 * 1024.0;
/// Deadline of one copy or one data-set build: far above any sane run, so
/// only a hang hits it.
const RUN_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long the remote ssh session may take to report its peak RSS after
/// the client exited (the session ends a moment after the client's side).
const REMOTE_RSS_WAIT: Duration = Duration::from_secs(3);

/// A copy tool under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    NixCopyClosure,
    NixCopyClosureGzip,
    NixCopySshNg,
    Nixq,
    NixqZstd,
}

impl Tool {
    pub const ALL: [Self; 5] = [
        Self::NixCopyClosure,
        Self::NixCopyClosureGzip,
        Self::NixCopySshNg,
        Self::Nixq,
        Self::NixqZstd,
    ];

    /// Short name, for `--tools`.
    pub fn key(self) -> &'static str {
        match self {
            Self::NixCopyClosure => "ncc",
            Self::NixCopyClosureGzip => "ncc-gzip",
            Self::NixCopySshNg => "nix-copy",
            Self::Nixq => "nixq",
            Self::NixqZstd => "nixq-zstd",
        }
    }

    /// The command line, as the table shows it.
    pub fn label(self) -> &'static str {
        match self {
            Self::NixCopyClosure => report::REFERENCE_TOOL,
            Self::NixCopyClosureGzip => "nix-copy-closure --gzip",
            Self::NixCopySshNg => "nix copy --to ssh-ng://",
            Self::Nixq => "nixq-copy-closure --no-compress",
            Self::NixqZstd => "nixq-copy-closure --zstd",
        }
    }

    fn is_nixq(self) -> bool {
        matches!(self, Self::Nixq | Self::NixqZstd)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to copy the farm's logs (every client's and daemon's output)
    /// before the farm is torn down.
    pub logs: Option<PathBuf>,
    /// Multiplies every data-set size (1.0 = the sizes of the issue).
    pub scale: f64,
    pub datasets: Vec<DataSet>,
    pub tools: Vec<Tool>,
    /// Measure the raw QUIC baseline.
    pub raw_quic: bool,
    /// The benchmark binary, the data sets' builder.
    pub builder: PathBuf,
    /// Also run the remote-build benchmark ([`builds`]), on its own farm
    /// after the copies.
    pub builds: bool,
}

/// A built data set on the master.
#[derive(Debug)]
struct Built {
    set: DataSet,
    root: StorePath,
    closure: Vec<StorePath>,
    nar_bytes: u64,
}

/// The nixq side: credentials on the master, the agent on the slave.
struct NixqSide {
    creds: MasterCreds,
    agent: Agent,
}

/// Runs the benchmark and returns the report (Markdown).
pub fn run(opts: &Options) -> anyhow::Result<String> {
    let started = Instant::now();
    ssh::ensure_tools()?;
    let farm = Farm::new("bench")?.host(MASTER)?.host(SLAVE)?;
    let (master, slave) = (&farm[MASTER], &farm[SLAVE]);
    let mut ctx = report::Context {
        date: master.sh_stdout("date -u '+%Y-%m-%d %H:%M UTC'")?,
        machine: machine_info(master),
        scale: opts.scale,
        ..report::Context::default()
    };

    let mut built = Vec::new();
    for &set in &opts.datasets {
        let t = Instant::now();
        let b = build(master, set, opts)?;
        eprintln!(
            "nixq-bench: built {} ({} paths, {} NAR bytes) in {:.1} s",
            set.key(),
            b.closure.len(),
            b.nar_bytes,
            t.elapsed().as_secs_f64()
        );
        built.push(b);
    }

    let needs_ssh = !built.is_empty() && opts.tools.iter().any(|t| !t.is_nixq());
    let sshd = if needs_ssh {
        let sshd = ssh::start(&farm.dir().join("ssh"), slave, master)?;
        let mut cmd = master.cmd("ssh");
        cmd.args(sshd.nix_sshopts().split(' '))
            .args([SLAVE, "true"]);
        let o = measure::run_measured(cmd, &farm.dir().join("ssh-true.log"), RUN_TIMEOUT)?;
        ctx.ssh_connect = Some(o.wall);
        Some(sshd)
    } else {
        None
    };

    let mut nixq_side = None;
    let mut nixq_error = None;
    if !built.is_empty() && opts.tools.iter().any(|t| t.is_nixq()) {
        match start_nixq(master, slave) {
            Ok(side) => nixq_side = Some(side),
            Err(e) => {
                eprintln!("nixq-bench: cannot deploy nixq: {e:#}");
                nixq_error = Some(format!("{e:#}"));
            }
        }
    }

    if opts.raw_quic {
        let bytes = (RAW_QUIC_BYTES * opts.scale) as u64;
        let r = quic::raw_quic(master, slave, bytes)
            .map(|d| (bytes, d))
            .map_err(|e| format!("{e:#}"));
        eprintln!("nixq-bench: raw QUIC: {r:?}");
        ctx.raw_quic = Some(r);
    }

    let mut rows = Vec::new();
    for b in &built {
        for &tool in &opts.tools {
            for noop in [false, true] {
                let result = if tool.is_nixq() && nixq_side.is_none() {
                    Err(nixq_error.clone().unwrap_or_default())
                } else {
                    measure_copy(
                        &farm,
                        master,
                        slave,
                        tool,
                        b,
                        noop,
                        sshd.as_ref(),
                        nixq_side.as_mut(),
                    )
                    .map_err(|e| format!("{e:#}"))
                };
                eprintln!(
                    "nixq-bench: {} {} {}: {:?}",
                    b.set.key(),
                    tool.key(),
                    if noop { "no-op" } else { "fresh" },
                    result
                );
                let failed = result.is_err();
                rows.push(Row {
                    dataset: b.set.describe(opts.scale),
                    nar_bytes: b.nar_bytes,
                    paths: b.closure.len(),
                    tool: tool.label().to_owned(),
                    noop,
                    result,
                });
                if failed {
                    break;
                }
            }
        }
    }
    if let Some(dest) = &opts.logs {
        if let Err(e) = copy_logs(&farm.dir().join("logs"), dest) {
            eprintln!(
                "nixq-bench: cannot keep the logs in {}: {e:#}",
                dest.display()
            );
        }
    }
    let mut builds_report = String::new();
    if opts.builds {
        // One farm at a time: the copy farm's processes would compete.
        drop(nixq_side);
        drop(sshd);
        drop(farm);
        builds_report = match builds::run(opts.logs.as_deref()) {
            Ok((rows, notes)) => report::render_builds(&rows, &notes),
            Err(e) => {
                eprintln!("nixq-bench: remote-build benchmark failed: {e:#}");
                format!("\n### Remote-build benchmark\n\nfailed: {e:#}\n")
            }
        };
    }
    ctx.notes.push(format!(
        "Whole benchmark run: {:.0} s (`nixq-bench --scale {}`).",
        started.elapsed().as_secs_f64(),
        opts.scale
    ));
    let mut out = if built.is_empty() && ctx.raw_quic.is_none() {
        // Nothing copied: the header and notes only.
        format!(
            "### nixq benchmark ({})\n\n{}\n\n{}\n",
            ctx.date,
            ctx.machine,
            ctx.notes.join("\n\n")
        )
    } else {
        report::render(&ctx, &rows)
    };
    out.push_str(&builds_report);
    Ok(out)
}

fn machine_info(host: &Host) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = host.sh_stdout("uname -r").unwrap_or_default();
    let nix = host.sh_stdout("nix-store --version").unwrap_or_default();
    let ssh = host.sh_stdout("ssh -V 2>&1").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or_else(String::new, |kib| {
            format!(", {:.0} GiB RAM", kib as f64 / 1048576.0)
        });
    format!("Machine: {cores} × {cpu}{mem}, Linux {kernel}; {nix}; {ssh}.")
}

/// Builds `set` on the master and measures its closure.
fn build(master: &Host, set: DataSet, opts: &Options) -> anyhow::Result<Built> {
    let expr = set.expression(opts.scale, &opts.builder);
    let file = master.write_file(&format!("bench/{}.nix", set.key()), expr)?;
    let root = match set {
        DataSet::Small => {
            let mut cmd = master.cmd("nix-instantiate");
            cmd.args(["--eval", "--read-write-mode"]).arg(&file);
            let out = master.run_timeout(cmd, RUN_TIMEOUT)?;
            let text = String::from_utf8_lossy(&out.stdout);
            let path = text.trim().trim_matches('"');
            StorePath::parse_any(path)
                .with_context(|| format!("nix-instantiate printed {path:?}, not a store path"))?
        }
        DataSet::Mixed | DataSet::Huge => {
            let mut cmd = master.cmd("nix-build");
            cmd.arg("--no-out-link")
                .args(["--max-jobs", "2", "-A", "root"])
                .arg(&file);
            let out = master.run_timeout(cmd, RUN_TIMEOUT)?;
            let text = String::from_utf8_lossy(&out.stdout);
            let path = text.trim();
            StorePath::parse_any(path)
                .with_context(|| format!("nix-build printed {path:?}, not a store path"))?
        }
    };
    let closure = master.closure(std::slice::from_ref(&root))?;
    // One size per line, in bytes; summed here (awk would print a float).
    let sizes = master.sh_stdout(&format!(
        "nix-store -qR {root} | xargs nix-store -q --size",
        root = root.as_str()
    ))?;
    let nar_bytes = sizes
        .lines()
        .map(|l| {
            l.trim()
                .parse::<u64>()
                .with_context(|| format!("nix-store -q --size printed {l:?}"))
        })
        .sum::<anyhow::Result<u64>>()?;
    Ok(Built {
        set,
        root,
        closure,
        nar_bytes,
    })
}

fn start_nixq(master: &Host, slave: &Host) -> anyhow::Result<NixqSide> {
    let pki = Pki::generate()?;
    let creds = MasterCreds::install(master, &pki, "master")?;
    let config = Agent::install(slave, &pki, "")?;
    let agent = Agent::start(slave, &config)?;
    Ok(NixqSide { creds, agent })
}

/// Empties the slave's store of everything unreachable (all the benchmark
/// copies) and checks that none of `closure` is left.
fn clean_slave(slave: &Host, closure: &[StorePath]) -> anyhow::Result<()> {
    let mut cmd = slave.cmd("nix-store");
    cmd.arg("--gc");
    slave.run_timeout(cmd, RUN_TIMEOUT)?;
    let left = slave.valid_paths(closure)?;
    anyhow::ensure!(
        left.is_empty(),
        "{} paths of the data set survived nix-store --gc on the slave, e.g. {}",
        left.len(),
        left[0]
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn measure_copy(
    farm: &Farm,
    master: &Host,
    slave: &Host,
    tool: Tool,
    b: &Built,
    noop: bool,
    sshd: Option<&ssh::Sshd>,
    mut nixq_side: Option<&mut NixqSide>,
) -> anyhow::Result<Measured> {
    if !noop {
        // A running agent's private nix-daemon holds temporary roots on
        // what it imported: stop it while collecting, then start it afresh
        // (whichever tool runs next: an earlier nixq copy may have imported
        // this very data set).
        match nixq_side.as_deref_mut() {
            Some(side) => {
                side.agent.proc().kill()?;
                clean_slave(slave, &b.closure)?;
                side.agent.restart(slave)?;
            }
            None => clean_slave(slave, &b.closure)?,
        }
    }
    Command::new("sync").status().context("cannot run sync")?;

    let root = std::slice::from_ref(&b.root);
    let cmd = match tool {
        Tool::NixCopyClosure | Tool::NixCopyClosureGzip => {
            let sshd = sshd.context("sshd is not running")?;
            let mut cmd = master.cmd("nix-copy-closure");
            cmd.env("NIX_SSHOPTS", sshd.nix_sshopts())
                .args(["--to", &format!("root@{SLAVE}")]);
            if tool == Tool::NixCopyClosureGzip {
                cmd.arg("--gzip");
            }
            cmd.arg(b.root.as_str());
            cmd
        }
        Tool::NixCopySshNg => {
            let sshd = sshd.context("sshd is not running")?;
            let mut cmd = master.cmd("nix");
            cmd.env("NIX_SSHOPTS", sshd.nix_sshopts())
                .args(["--extra-experimental-features", "nix-command", "copy"])
                .args(["--no-check-sigs", "--to", &format!("ssh-ng://root@{SLAVE}")])
                .arg(b.root.as_str());
            cmd
        }
        Tool::Nixq | Tool::NixqZstd => {
            let side = nixq_side.as_deref().context("nixq is not deployed")?;
            let extra: &[&str] = if tool == Tool::NixqZstd {
                &["--zstd"]
            } else {
                &["--no-compress"]
            };
            nixq::copy_command(
                master,
                &side.creds,
                Direction::To,
                &side.agent.uri(),
                root,
                extra,
            )?
        }
    };
    if let Some(sshd) = sshd {
        sshd.take_remote_rss_kib();
    }
    let agent_pid = nixq_side
        .as_mut()
        .filter(|_| tool.is_nixq())
        .map(|side| side.agent.proc().pid());
    if let Some(pid) = agent_pid {
        measure::reset_peak_rss(pid)?;
    }
    let log = log_path(farm.dir(), b.set, tool, noop);
    eprintln!(
        "nixq-bench: running {} ({})",
        crate::process::describe(&cmd),
        log.display()
    );
    let rss_file = log.with_extension("rss");
    let cmd = measure::under_time(master, &cmd, &rss_file);
    let outcome = measure::run_measured(cmd, &log, RUN_TIMEOUT)?;
    anyhow::ensure!(
        outcome.code == 0,
        "exit {}: {}",
        outcome.code,
        outcome.log_tail()
    );
    let client_rss_kib = measure::read_time_rss_kib(&rss_file)?;
    let receiver_rss_kib = match (agent_pid, sshd) {
        (Some(pid), _) => Some(measure::peak_rss_kib(pid)?),
        (None, Some(sshd)) => sshd.wait_remote_rss_kib(REMOTE_RSS_WAIT),
        (None, None) => None,
    };
    let valid = slave.valid_paths(&b.closure)?;
    anyhow::ensure!(
        valid.len() == b.closure.len(),
        "exit 0 but only {} of {} paths are valid on the slave",
        valid.len(),
        b.closure.len()
    );
    Ok(Measured {
        wall: outcome.wall,
        client_rss_kib,
        receiver_rss_kib,
    })
}

/// Copies the files of `from` into `to` (replacing what was there).
fn copy_logs(from: &Path, to: &Path) -> anyhow::Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to).with_context(|| format!("cannot remove {}", to.display()))?;
    }
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))?
    {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))
            .with_context(|| format!("cannot copy {}", entry.path().display()))?;
    }
    Ok(())
}

fn log_path(dir: &Path, set: DataSet, tool: Tool, noop: bool) -> PathBuf {
    dir.join("logs").join(format!(
        "bench-{}-{}-{}.log",
        set.key(),
        tool.key(),
        if noop { "noop" } else { "fresh" }
    ))
}
