//! Remote-build farms for the hook tests and the Quick start demo: a master
//! whose own Nix runs `nixq-build-hook` (nix-interfaces.md §2) and slaves
//! running `nixq-agent`, each host its own network namespace and `/nix`.
//!
//! ```no_run
//! # fn main() -> Result<(), nixq_e2e::nixq::NixqError> {
//! use nixq_e2e::hook_farm::{HookFarm, Slave};
//! let farm = HookFarm::new("hook", &[Slave::new("s1"), Slave::new("s2").supports(&["kvm"])])?;
//! # let expr = std::path::PathBuf::new();
//! let run = farm.nix_build(&expr, &["-A", "root"], std::time::Duration::from_secs(60))?;
//! assert_eq!(run.code, Some(0));
//! # Ok(()) }
//! ```
//!
//! # The master
//!
//! Single-user Nix (like every farm host) with `build-hook` = the absolute
//! path of the `nixq-build-hook` under test (the master's mount namespace
//! still shows the real filesystem outside `/nix` and `/etc/nix`),
//! `max-jobs = 0` (nothing may build locally), `builders = @<its
//! /etc/nix>/machines`, and `build-poll-interval = 1` so that a postponed
//! derivation is asked about again one second later instead of five (§2.5).
//!
//! # The machines file
//!
//! One line per slave in Nix's format with nixq's columns
//! ([`nixq_common::machines`]): `nixq://<name>` (the farm's `/etc/hosts`
//! resolves it), the master's identity file in column 3 and the agents' CA
//! certificate **base64-encoded** in column 8. Nix 2.8 parses the `builders`
//! list itself in places (§4.1) and rejects a column 8 that is not base64,
//! so a file path cannot go there; a PEM in base64 satisfies both.
//!
//! # Slaves
//!
//! [`Slave`] describes one: the features its machines line declares
//! (supported and mandatory), which its Nix also gets as `system-features`
//! (set explicitly: Nix's default depends on `/dev/kvm` of the machine),
//! its max jobs (the agent's `max_builds` and column 4 agree), extra URI
//! parameters, and whether its agent runs at all (a machine that is down).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use nixq_common::proto::AgentStatus;
use nixq_common::store_path::StorePath;

use crate::farm::{Farm, Host, HostOptions};
use crate::nixq::{self, Agent, MasterCreds, NixqError, NixqResult, Outcome, Pki};

/// Name of the master host in every hook farm.
pub const MASTER: &str = "master";

/// The master's certificate name (its identity file is `etc/nixq/master.pem`).
const MASTER_CERT_NAME: &str = "master";

/// How often Nix asks a postponing hook again, in seconds (Nix's default is
/// 5): the load tests postpone a lot and should not idle.
const BUILD_POLL_INTERVAL_SECS: u32 = 1;

/// One slave of a [`HookFarm`].
#[derive(Debug, Clone)]
pub struct Slave {
    name: String,
    supported: Vec<String>,
    mandatory: Vec<String>,
    max_jobs: u32,
    speed: u32,
    uri_params: String,
    running: bool,
    extra_nix_conf: String,
    /// The agent's `min_free_space` (bytes); 0 = no floor.
    min_free_space: u64,
}

impl Slave {
    /// A slave with an agent, no features, 4 jobs, speed factor 1.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            supported: Vec::new(),
            mandatory: Vec::new(),
            max_jobs: 4,
            speed: 1,
            uri_params: String::new(),
            running: true,
            extra_nix_conf: String::new(),
            min_free_space: 0,
        }
    }

    /// The agent's free-space floor, in bytes: above the store's free space,
    /// the agent refuses uploads and builds and hooks should not choose it.
    pub fn min_free_space(mut self, bytes: u64) -> Self {
        self.min_free_space = bytes;
        self
    }

    /// Supported features (machines column 6, and the slave Nix's
    /// `system-features`).
    #[must_use]
    pub fn supports(mut self, features: &[&str]) -> Self {
        self.supported = features.iter().map(|f| (*f).to_owned()).collect();
        self
    }

    /// Mandatory features (column 7, and `system-features` too).
    #[must_use]
    pub fn mandatory(mut self, features: &[&str]) -> Self {
        self.mandatory = features.iter().map(|f| (*f).to_owned()).collect();
        self
    }

    /// Max jobs: the agent's `max_builds` and column 4.
    #[must_use]
    pub fn max_jobs(mut self, jobs: u32) -> Self {
        self.max_jobs = jobs;
        self
    }

    /// Speed factor (column 5).
    #[must_use]
    pub fn speed(mut self, speed: u32) -> Self {
        self.speed = speed;
        self
    }

    /// URI parameters, e.g. `"compress=zstd"` (without the `?`).
    #[must_use]
    pub fn uri_params(mut self, params: &str) -> Self {
        self.uri_params = params.to_owned();
        self
    }

    /// A machine whose agent is never started (down from the start).
    #[must_use]
    pub fn down(mut self) -> Self {
        self.running = false;
        self
    }

    /// Extra lines for the slave's `nix.conf`.
    #[must_use]
    pub fn nix_conf(mut self, lines: &str) -> Self {
        self.extra_nix_conf.push_str(lines);
        self.extra_nix_conf.push('\n');
        self
    }

    /// The slave's name (also its host name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `nixq://<name>[?params]`.
    pub fn uri(&self) -> String {
        if self.uri_params.is_empty() {
            format!("nixq://{}", self.name)
        } else {
            format!("nixq://{}?{}", self.name, self.uri_params)
        }
    }

    fn features(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .supported
            .iter()
            .chain(&self.mandatory)
            .cloned()
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Its line of the machines file.
    fn machines_line(&self, identity: &Path, ca_pem: &str) -> String {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.join(",")
            }
        };
        format!(
            "{uri} - {identity} {jobs} {speed} {supported} {mandatory} {ca}",
            uri = self.uri(),
            identity = identity.display(),
            jobs = self.max_jobs,
            speed = self.speed,
            supported = list(&self.supported),
            mandatory = list(&self.mandatory),
            ca = base64::engine::general_purpose::STANDARD.encode(ca_pem),
        )
    }

    /// Top-level keys of its `agent.toml`.
    fn agent_toml(&self) -> String {
        let features: Vec<String> = self.features().iter().map(|f| format!("{f:?}")).collect();
        format!(
            "max_builds = {}\nfeatures = [{}]\nmin_free_space = {}",
            self.max_jobs,
            features.join(", "),
            self.min_free_space
        )
    }
}

/// A master and its slaves; see the module documentation. Fields drop in
/// order: agents first, then the farm (which kills whatever is left).
#[derive(Debug)]
pub struct HookFarm {
    agents: BTreeMap<String, Agent>,
    configs: BTreeMap<String, PathBuf>,
    slaves: Vec<Slave>,
    creds: MasterCreds,
    machines: PathBuf,
    hook: PathBuf,
    pki: Pki,
    farm: Farm,
}

impl HookFarm {
    /// Creates the farm `name` ("master" plus `slaves`), issues the
    /// certificates, starts the agents and configures the master's Nix.
    pub fn new(name: &str, slaves: &[Slave]) -> NixqResult<Self> {
        let mut farm = Farm::new(name)?.host(MASTER)?;
        for slave in slaves {
            let conf = format!(
                "system-features = {}\n{}",
                slave.features().join(" "),
                slave.extra_nix_conf
            );
            farm = farm.host_with(&slave.name, HostOptions::default().nix_conf(&conf))?;
        }
        let pki = Pki::generate()?;
        let master = &farm[MASTER];
        let creds = MasterCreds::install(master, &pki, MASTER_CERT_NAME)?;
        let mut configs = BTreeMap::new();
        let mut agents = BTreeMap::new();
        for slave in slaves {
            let host = &farm[slave.name.as_str()];
            let config = Agent::install(host, &pki, &slave.agent_toml())?;
            if slave.running {
                agents.insert(slave.name.clone(), Agent::start(host, &config)?);
            }
            configs.insert(slave.name.clone(), config);
        }
        let machines = master.etc_nix().join("machines");
        let hook = crate::nixq_bin("nixq-build-hook")?;
        let this = Self {
            agents,
            configs,
            slaves: slaves.to_vec(),
            creds,
            machines,
            hook,
            pki,
            farm,
        };
        this.write_machines(slaves)?;
        this.master().append_nix_conf(&format!(
            "build-hook = {hook}\nmax-jobs = 0\nbuilders = @{machines}\nbuild-poll-interval = {BUILD_POLL_INTERVAL_SECS}",
            hook = this.hook.display(),
            machines = this.machines.display(),
        ))?;
        Ok(this)
    }

    /// Rewrites the machines file with `slaves` (any subset or variation of
    /// the farm's own; hooks started afterwards read the new file).
    pub fn write_machines(&self, slaves: &[Slave]) -> NixqResult<()> {
        let mut text = String::from("# machines of the nixq hook e2e master\n");
        for slave in slaves {
            text.push_str(&slave.machines_line(&self.creds.identity, self.pki.ca_pem()));
            text.push('\n');
        }
        std::fs::write(&self.machines, text)
            .map_err(|e| crate::Error::io("cannot write", &self.machines, e))?;
        Ok(())
    }

    /// The underlying farm.
    pub fn farm(&self) -> &Farm {
        &self.farm
    }

    /// The master host.
    pub fn master(&self) -> &Host {
        &self.farm[MASTER]
    }

    /// The slave host `name`.
    pub fn host(&self, name: &str) -> &Host {
        &self.farm[name]
    }

    /// The slaves as configured.
    pub fn slaves(&self) -> &[Slave] {
        &self.slaves
    }

    /// The master's credentials (identity and CA files).
    pub fn creds(&self) -> &MasterCreds {
        &self.creds
    }

    /// The machines file (absolute; the master sees it at the same path).
    pub fn machines_file(&self) -> &Path {
        &self.machines
    }

    /// The hook binary the master's Nix runs.
    pub fn hook_bin(&self) -> &Path {
        &self.hook
    }

    /// The running agent of slave `name`, if any.
    pub fn agent(&self, name: &str) -> Option<&Agent> {
        self.agents.get(name)
    }

    /// The agent of slave `name`, mutably (to kill it).
    pub fn agent_mut(&mut self, name: &str) -> Option<&mut Agent> {
        self.agents.get_mut(name)
    }

    /// Starts the agent of slave `name` (again) with its configuration.
    pub fn start_agent(&mut self, name: &str) -> NixqResult<()> {
        let config = self
            .configs
            .get(name)
            .ok_or_else(|| NixqError::Unexpected(format!("no slave {name}")))?;
        let agent = Agent::start(&self.farm[name], config)?;
        self.agents.insert(name.to_owned(), agent);
        Ok(())
    }

    /// The agent's Status (counters included), asked from the master.
    pub fn status(&self, slave: &str) -> NixqResult<AgentStatus> {
        nixq::agent_status(self.master(), &self.creds, &self.farm[slave])
    }

    /// Writes a Nix expression file on the master and returns its path.
    pub fn write_expr(&self, name: &str, text: &str) -> NixqResult<PathBuf> {
        Ok(self.master().write_file(&format!("{name}.nix"), text)?)
    }

    /// `nix-build --no-out-link EXPR ARGS…` on the master, not run yet.
    pub fn nix_build_command(&self, expr: &Path, args: &[&str]) -> Command {
        let mut cmd = self.master().cmd("nix-build");
        cmd.arg("--no-out-link").arg(expr).args(args);
        cmd
    }

    /// Runs `nix-build` on the master within `timeout` and returns how it
    /// ended (failures included).
    pub fn nix_build(&self, expr: &Path, args: &[&str], timeout: Duration) -> NixqResult<Outcome> {
        let cmd = self.nix_build_command(expr, args);
        nixq::run_outcome(self.master(), cmd, timeout)
    }

    /// The `.drv` paths in the closure of `drvs` on the master.
    pub fn drv_closure(&self, drvs: &[StorePath]) -> NixqResult<Vec<StorePath>> {
        Ok(self
            .master()
            .closure(drvs)?
            .into_iter()
            .filter(|p| p.as_str().ends_with(".drv"))
            .collect())
    }

    /// `nix-instantiate EXPR ARGS…` on the master.
    pub fn instantiate(&self, expr: &Path, args: &[&str]) -> NixqResult<Vec<StorePath>> {
        let mut cmd = self.master().cmd("nix-instantiate");
        cmd.arg(expr).args(args);
        let out = self.master().run(cmd)?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                StorePath::parse_any(l).map_err(|e| {
                    NixqError::Unexpected(format!("nix-instantiate printed {l:?}: {e}"))
                })
            })
            .collect()
    }
}

/// The remote builds Nix announced on its stderr: `building '<drv>' on
/// '<machine>'...` (the machine name is the hook's line after `# accept`,
/// nix-interfaces.md §2.6), as (drv path, machine) pairs in order.
pub fn remote_builds(nix_stderr: &str) -> Vec<(String, String)> {
    nix_stderr
        .lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix("building '")?;
            let (drv, rest) = rest.split_once("' on '")?;
            let (machine, _) = rest.split_once('\'')?;
            Some((drv.to_owned(), machine.to_owned()))
        })
        .collect()
}

/// The URI of a machine as the hook names it, without parameters
/// (`nixq://s1?compress=zstd` → `nixq://s1`).
pub fn machine_base(machine: &str) -> &str {
    machine.split_once('?').map_or(machine, |(base, _)| base)
}

/// A live process as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    /// `argv`, from `/proc/PID/cmdline`.
    pub argv: Vec<String>,
}

/// Every process of the machine (all farms' hosts included: they share the
/// PID namespace of the tests). Processes that exit while being read, and
/// zombies (empty command line), are left out.
pub fn processes() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        // `PID (COMM) STATE PPID …`; COMM may contain spaces and parentheses.
        let (_, after_comm) = stat.rsplit_once(')')?;
        let ppid: i32 = after_comm.split_whitespace().nth(1)?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        (!argv.is_empty()).then_some(ProcInfo { pid, ppid, argv })
    })
    .collect()
}

/// The live descendants of `root` (children, grandchildren…) whose program
/// (the file name of `argv[0]`) is `program`. Nix starts its build hook in
/// a session of its own (nix-interfaces.md §2), but still as its child.
pub fn descendants_named(root: u32, program: &str) -> Vec<i32> {
    let all = processes();
    let Ok(root) = i32::try_from(root) else {
        return Vec::new();
    };
    let mut tree = BTreeSet::from([root]);
    // Parents may have larger pids than children (pid wrap): iterate to a
    // fixed point, bounded by the number of processes.
    for _ in 0..all.len() {
        let before = tree.len();
        let children: Vec<i32> = all
            .iter()
            .filter(|p| tree.contains(&p.ppid))
            .map(|p| p.pid)
            .collect();
        tree.extend(children);
        if tree.len() == before {
            break;
        }
    }
    all.iter()
        .filter(|p| p.pid != root && tree.contains(&p.pid))
        .filter(|p| {
            Path::new(&p.argv[0])
                .file_name()
                .is_some_and(|name| name == program)
        })
        .map(|p| p.pid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_build_lines_are_parsed() {
        let text = "these 2 derivations will be built:\n  /nix/store/a-x.drv\n\
                    building '/nix/store/a-x.drv' on 'nixq://s1'...\n\
                    building '/nix/store/b-y.drv'...\n\
                    building '/nix/store/c-z.drv' on 'nixq://s2?compress=zstd'...\n";
        assert_eq!(
            remote_builds(text),
            [
                ("/nix/store/a-x.drv".to_owned(), "nixq://s1".to_owned()),
                (
                    "/nix/store/c-z.drv".to_owned(),
                    "nixq://s2?compress=zstd".to_owned()
                )
            ]
        );
        assert_eq!(machine_base("nixq://s2?compress=zstd"), "nixq://s2");
        assert_eq!(machine_base("nixq://s2"), "nixq://s2");
    }

    #[test]
    fn processes_and_descendants_are_found() {
        let me = std::process::id();
        let mut child = Command::new("/bin/sleep")
            .arg("7.31")
            .spawn()
            .expect("spawn sleep");
        let found = descendants_named(me, "sleep");
        let listed = processes()
            .into_iter()
            .any(|p| p.argv == ["/bin/sleep", "7.31"]);
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        assert!(found.contains(&pid), "{found:?} lacks {pid}");
        assert!(listed);
        assert!(descendants_named(me, "no-such-program").is_empty());
    }

    #[test]
    fn machines_lines_have_eight_columns() {
        let slave = Slave::new("s1")
            .supports(&["kvm"])
            .mandatory(&["perf"])
            .max_jobs(1);
        let line = slave.machines_line(Path::new("/x/master.pem"), "PEM");
        let columns: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            columns,
            [
                "nixq://s1",
                "-",
                "/x/master.pem",
                "1",
                "1",
                "kvm",
                "perf",
                "UEVN"
            ]
        );
        assert_eq!(
            slave.agent_toml(),
            "max_builds = 1\nfeatures = [\"kvm\", \"perf\"]\nmin_free_space = 0"
        );
    }
}
