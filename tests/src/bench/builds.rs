//! The remote-build benchmark (issue 4, "Benchmark"): how long the
//! master's Nix takes to build trivial derivations on a slave through
//! `nixq-build-hook` and through Nix's own hook with `ssh://` builders,
//! side by side in one run on the same slave.
//!
//! The farm is a [`HookFarm`]: a master whose `nix.conf` has `build-hook =
//! nixq-build-hook`, `max-jobs = 0`, `builders = @machines` (one line,
//! `nixq://s1`, [`JOBS`] jobs) and `build-poll-interval = 1`, and one slave
//! `s1` running `nixq-agent` with `max_builds = JOBS` and `sshd` in its
//! namespaces ([`super::ssh`]). The ssh runs override two settings on the
//! `nix-build` command line, `build-hook` (back to Nix's default, as
//! `nix show-config` prints it on a host without one, i.e.
//! `$libexecdir/nix/build-remote` in Nix 2.8) and `builders =
//! ssh://root@s1 SYSTEM KEY JOBS 1`, and pass the client configuration in
//! `NIX_SSHOPTS`; everything else (the slave, its Nix, max jobs, the poll
//! interval) is shared.
//!
//! Every derivation is new to both stores: its name carries the tool and a
//! per-run nonce, so nothing is cached on the master or the slave. The
//! builder is `/bin/sh -c 'echo … > $out'`, so the time measured is the
//! remote-build machinery, not building. Each run is checked: `nix-build`
//! exits 0 and announced every derivation as built on the slave.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

use super::report::BuildRow;
use super::{measure, ssh};
use crate::hook_farm::{self, HookFarm, Slave};

/// The slave's name.
const SLAVE: &str = "s1";
/// The root key [`ssh::start`] writes in its directory (its client
/// configuration names it too; the machines line repeats it, as a user's would).
const SSH_USER_KEY: &str = "id_ed25519";
/// Max jobs of the slave for both tools (machines column 4 and the agent's
/// `max_builds`): a small builder, as on this 2-core machine class.
pub const JOBS: u32 = 4;
/// Derivations of [`Workload::Independent`] and [`Workload::Chain`]: the
/// sizes issue 4's benchmark section asks for.
const INDEPENDENT: usize = 100;
const CHAIN: usize = 50;
/// Deadline of one `nix-build`: far above any sane run (100 builds over ssh
/// take about a minute), so only a hang hits it.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// What the master builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// One derivation: the latency of one remote build (and a warm-up).
    Single,
    /// [`INDEPENDENT`] derivations without inputs.
    Independent,
    /// [`CHAIN`] derivations, each the input of the next.
    Chain,
}

impl Workload {
    pub const ALL: [Self; 3] = [Self::Single, Self::Independent, Self::Chain];

    /// The attribute of the expression ([`expression`]).
    fn attr(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Independent => "independent",
            Self::Chain => "chain",
        }
    }

    /// How many derivations it builds.
    pub fn derivations(self) -> usize {
        match self {
            Self::Single => 1,
            Self::Independent => INDEPENDENT,
            Self::Chain => CHAIN,
        }
    }

    /// For the table.
    pub fn describe(self) -> String {
        match self {
            Self::Single => "1 trivial derivation".to_owned(),
            Self::Independent => format!("{INDEPENDENT} independent trivial derivations"),
            Self::Chain => format!("a {CHAIN}-deep chain of trivial derivations"),
        }
    }
}

/// Who distributes the builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildTool {
    Nixq,
    NixSsh,
}

impl BuildTool {
    pub const ALL: [Self; 2] = [Self::Nixq, Self::NixSsh];

    /// Short name: derivation names and log files.
    fn key(self) -> &'static str {
        match self {
            Self::Nixq => "nixq",
            Self::NixSsh => "ssh",
        }
    }

    /// For the table.
    pub fn label(self) -> &'static str {
        match self {
            Self::Nixq => "nixq-build-hook (`nixq://s1`)",
            Self::NixSsh => super::report::BUILD_REFERENCE_TOOL,
        }
    }
}

/// The benchmark's expression: attributes `single`, `independent` (a list)
/// and `chain` (the last link), every derivation name prefixed with `tag`.
pub fn expression(tag: &str) -> String {
    format!(
        r#"let
  tag = "{tag}";
  mk = name: deps: derivation {{
    name = "${{tag}}-${{name}}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${{name}} ${{toString deps}} > $out" ];
  }};
  link = n: mk "chain-${{toString n}}" (if n == 0 then [ ] else [ (link (n - 1)) ]);
in {{
  single = mk "single" [ ];
  independent = builtins.genList (i: mk "ind-${{toString i}}" [ ]) {INDEPENDENT};
  chain = link {last};
}}
"#,
        last = CHAIN - 1
    )
}

/// A value that differs between runs of the benchmark, so that derivation
/// names (and thus store paths) are new on every run even if a store were
/// reused.
fn nonce() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}", nanos & 0xffff_ffff_ffff)
}

/// Nix's default `build-hook`, as `nix show-config` prints it on `host`
/// (whose `nix.conf` must not set one).
fn default_build_hook(host: &crate::Host) -> anyhow::Result<String> {
    let hook = host.sh_stdout("nix show-config | sed -n 's/^build-hook = //p'")?;
    anyhow::ensure!(
        Path::new(&hook).is_absolute(),
        "`nix show-config` on {} gives build-hook = {hook:?}, not an absolute path",
        host.name()
    );
    Ok(hook)
}

/// Everything a run needs besides the farm.
struct Setup {
    sshd: ssh::Sshd,
    /// `build-hook` and `builders` for the ssh runs.
    ssh_hook: String,
    ssh_builders: String,
    expr_dir: PathBuf,
    logs: PathBuf,
    nonce: String,
}

/// Runs every workload with both tools and returns the rows (a failed run
/// is a row with its error) and notes for the report. `logs`: where to copy
/// the farm's logs (its `builds/` subdirectory is replaced).
pub fn run(logs: Option<&Path>) -> anyhow::Result<(Vec<BuildRow>, Vec<String>)> {
    let farm = HookFarm::new("bench-builds", &[Slave::new(SLAVE).max_jobs(JOBS)])?;
    let (master, slave) = (farm.master(), farm.host(SLAVE));
    let ssh_dir = farm.farm().dir().join("ssh");
    let sshd = ssh::start(&ssh_dir, slave, master)?;
    let key = ssh_dir.join(SSH_USER_KEY);
    anyhow::ensure!(key.is_file(), "no ssh key at {}", key.display());
    let system = master.sh_stdout("nix-instantiate --eval --expr builtins.currentSystem")?;
    let system = system.trim_matches('"');
    let setup = Setup {
        ssh_hook: default_build_hook(slave)?,
        ssh_builders: format!(
            "ssh://root@{SLAVE} {system} {key} {JOBS} 1",
            key = key.display()
        ),
        sshd,
        expr_dir: master.dir().join("bench-builds"),
        logs: farm.farm().dir().join("logs"),
        nonce: nonce(),
    };
    std::fs::create_dir_all(&setup.expr_dir)
        .with_context(|| format!("cannot create {}", setup.expr_dir.display()))?;
    let notes = vec![format!(
        "Remote builds: master `max-jobs = 0`, `build-poll-interval = 1`; one slave, max jobs {JOBS} \
         for both tools; nixq: `build-hook = {hook}`, `builders = @machines` (`nixq://{SLAVE}`); \
         ssh: `build-hook = {ssh_hook}` (Nix's default), `builders = {builders}`. Every \
         derivation is new to both stores; builder `/bin/sh -c 'echo … > $out'`. \
         \"vs ssh\" = ssh wall time / this wall time.",
        hook = farm.hook_bin().display(),
        ssh_hook = setup.ssh_hook,
        builders = setup.ssh_builders,
    )];

    let mut rows = Vec::new();
    for workload in Workload::ALL {
        for tool in BuildTool::ALL {
            let result = measure_build(&farm, &setup, workload, tool).map_err(|e| format!("{e:#}"));
            eprintln!(
                "nixq-bench: builds {} {}: {result:?}",
                workload.attr(),
                tool.key()
            );
            rows.push(BuildRow {
                workload: workload.describe(),
                derivations: workload.derivations(),
                tool: tool.label().to_owned(),
                result,
            });
        }
    }
    if let Some(dest) = logs {
        let dest = dest.join("builds");
        if let Err(e) = super::copy_logs(&setup.logs, &dest) {
            eprintln!(
                "nixq-bench: cannot keep the build logs in {}: {e:#}",
                dest.display()
            );
        }
    }
    Ok((rows, notes))
}

/// Builds `workload` with `tool` on a fresh expression and returns the wall
/// time of `nix-build`.
fn measure_build(
    farm: &HookFarm,
    setup: &Setup,
    workload: Workload,
    tool: BuildTool,
) -> anyhow::Result<Duration> {
    let tag = format!("{}-{}-{}", setup.nonce, tool.key(), workload.attr());
    let expr = setup.expr_dir.join(format!("{tag}.nix"));
    std::fs::write(&expr, expression(&tag))
        .with_context(|| format!("cannot write {}", expr.display()))?;
    let mut cmd = farm.nix_build_command(&expr, &["-A", workload.attr()]);
    if tool == BuildTool::NixSsh {
        cmd.args(["--option", "build-hook", &setup.ssh_hook])
            .args(["--option", "builders", &setup.ssh_builders])
            .env("NIX_SSHOPTS", setup.sshd.nix_sshopts());
    }
    let log = setup.logs.join(format!(
        "bench-build-{}-{}.log",
        workload.attr(),
        tool.key()
    ));
    eprintln!(
        "nixq-bench: running {} ({})",
        crate::process::describe(&cmd),
        log.display()
    );
    let outcome = measure::run_measured(cmd, &log, BUILD_TIMEOUT)?;
    anyhow::ensure!(
        outcome.code == 0,
        "nix-build exit {}: {}",
        outcome.code,
        outcome.log_tail()
    );
    let text =
        std::fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
    let remote = hook_farm::remote_builds(&text);
    let on_slave = remote
        .iter()
        .filter(|(drv, machine)| drv.contains(&tag) && machine.contains(SLAVE))
        .count();
    anyhow::ensure!(
        on_slave == workload.derivations(),
        "nix-build announced {on_slave} of {} derivations as built on {SLAVE} (see {})",
        workload.derivations(),
        log.display()
    );
    Ok(outcome.wall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expression_names_every_derivation_with_the_tag() {
        let e = expression("abc-nixq-chain");
        assert!(e.contains("tag = \"abc-nixq-chain\";"));
        assert!(e.contains("builtins.genList (i: mk \"ind-${toString i}\" [ ]) 100;"));
        assert!(e.contains("chain = link 49;"));
        assert_eq!(
            Workload::ALL.map(Workload::derivations),
            [1, INDEPENDENT, CHAIN]
        );
    }
}
