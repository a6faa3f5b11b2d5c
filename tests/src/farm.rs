//! [`Farm`] and [`Host`]: a set of hosts on one machine, each its own network
//! namespace (one address on a private bridge) and its own `/nix`.
//!
//! ```no_run
//! # fn main() -> nixq_e2e::Result<()> {
//! let farm = nixq_e2e::Farm::new("copy")?.host("master")?.host("s1")?;
//! let (master, s1) = (&farm["master"], &farm["s1"]);
//! master.sh(&format!("echo hello > /dev/tcp/{}/7", s1.ip()));
//! # Ok(()) }
//! ```
//!
//! Teardown ([`Drop`] of the farm, also when the test panics): kill every
//! process in every host namespace, print the spawned processes' logs if the
//! test is failing, delete the namespaces (which removes the veths and the
//! bridge), and delete the farm directory (making the read-only store
//! writable first). `NIXQ_E2E_KEEP=1` keeps the directory for inspection.

use std::ffi::OsStr;
use std::fs;
use std::net::Ipv4Addr;
use std::ops::Index;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use crate::enter::Entry;
use crate::error::{Error, Result};
use crate::process::{self, LogRegistry, Proc, Stdin, DEFAULT_TIMEOUT};
use crate::{netns, nix, precondition};

/// The hosts' subnet. 10.213.0.0/24 is private (RFC 1918) and exists only on
/// the bridge inside each farm's switch namespace; farms are disjoint
/// namespaces, so they can all use it. Host *i* (0-based) gets `10.213.0.(i+1)`.
pub const SUBNET_PREFIX: [u8; 3] = [10, 213, 0];
/// Prefix length of [`SUBNET_PREFIX`].
pub const SUBNET_BITS: u8 = 24;
/// Hosts per farm: the /24 minus network and broadcast addresses.
const MAX_HOSTS: usize = 253;
/// Longest host name: keeps namespace names and log file names short.
const MAX_HOST_NAME: usize = 20;

/// Farm numbers, unique within this test process.
static NEXT_FARM: AtomicUsize = AtomicUsize::new(0);
/// Stale resources of crashed runs are swept once per test process.
static SWEEP: Once = Once::new();

/// Prefix of every farm directory in the temporary directory.
const DIR_PREFIX: &str = "nixq-e2e-";

/// Options for one host.
#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    extra_nix_conf: String,
}

impl HostOptions {
    /// Appends lines to the host's `nix.conf` (e.g. `"system-features = kvm\nmax-jobs = 0"`).
    #[must_use]
    pub fn nix_conf(mut self, lines: &str) -> Self {
        self.extra_nix_conf.push_str(lines);
        self.extra_nix_conf.push('\n');
        self
    }
}

/// A set of hosts that reach each other; see the module documentation.
#[derive(Debug)]
pub struct Farm {
    name: String,
    /// `nixq-<pid>-<n>`: prefix of this farm's namespace names.
    prefix: String,
    dir: PathBuf,
    switch: String,
    hosts: Vec<Host>,
    /// Namespaces created so far, in creation order (teardown deletes them all).
    namespaces: Vec<String>,
    logs: LogRegistry,
    hosts_file: PathBuf,
}

impl Farm {
    /// Creates an empty farm (its switch namespace and directory). Panics,
    /// rather than skipping, when the machine cannot run end-to-end tests
    /// (see [`precondition::require_root_and_nix`]).
    pub fn new(name: &str) -> Result<Self> {
        precondition::require_root_and_nix();
        validate_name(name)?;
        SWEEP.call_once(|| {
            for ns in netns::sweep_stale() {
                eprintln!("nixq-e2e: removed stale namespace {ns}");
            }
            sweep_stale_dirs();
        });
        let pid = std::process::id();
        let n = NEXT_FARM.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{}{pid}-{n}", netns::PREFIX);
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{pid}-{n}-{name}"));
        fs::create_dir(&dir).map_err(|e| Error::io("cannot create farm directory", &dir, e))?;
        let mut farm = Self {
            name: name.to_owned(),
            switch: format!("{prefix}--switch"),
            prefix,
            hosts_file: dir.join("hosts"),
            dir,
            hosts: Vec::new(),
            namespaces: Vec::new(),
            logs: LogRegistry::default(),
        };
        fs::create_dir(farm.dir.join("logs"))
            .map_err(|e| Error::io("cannot create log directory", farm.dir.join("logs"), e))?;
        farm.write_hosts_file()?;
        netns::add(&farm.switch)?;
        farm.namespaces.push(farm.switch.clone());
        netns::add_bridge(&farm.switch)?;
        Ok(farm)
    }

    /// Adds a host with default options (builder style).
    pub fn host(self, name: &str) -> Result<Self> {
        self.host_with(name, HostOptions::default())
    }

    /// Adds a host with `options` (builder style).
    pub fn host_with(mut self, name: &str, options: HostOptions) -> Result<Self> {
        self.add_host(name, options)?;
        Ok(self)
    }

    /// Adds a host and returns it.
    pub fn add_host(&mut self, name: &str, options: HostOptions) -> Result<&Host> {
        validate_name(name)?;
        if self.get(name).is_some() {
            return Err(Error::InvalidHostName {
                name: name.to_owned(),
                why: "already used in this farm",
            });
        }
        let index = self.hosts.len();
        if index >= MAX_HOSTS {
            return Err(Error::InvalidHostName {
                name: name.to_owned(),
                why: "the farm's /24 is full",
            });
        }
        let last = u8::try_from(index + 1).map_err(|_| Error::InvalidHostName {
            name: name.to_owned(),
            why: "the farm's /24 is full",
        })?;
        let [a, b, c] = SUBNET_PREFIX;
        let ip = Ipv4Addr::new(a, b, c, last);
        let ns = format!("{}-{name}", self.prefix);
        let dir = self.dir.join(name);

        netns::add(&ns)?;
        self.namespaces.push(ns.clone());
        netns::connect(
            &self.switch,
            &format!("h{index}"),
            &ns,
            &format!("{ip}/{SUBNET_BITS}"),
        )?;

        let layout = nix::HostLayout::create(&dir, name, &options.extra_nix_conf)?;
        let mut binds: Vec<(&Path, &Path)> = vec![(&layout.nix, Path::new("/nix"))];
        if Path::new("/etc/nix").is_dir() {
            binds.push((&layout.etc_nix, Path::new("/etc/nix")));
        }
        if Path::new("/etc/hosts").is_file() {
            binds.push((&self.hosts_file, Path::new("/etc/hosts")));
        }
        let entry = Arc::new(Entry::new(&Path::new(netns::NETNS_DIR).join(&ns), &binds)?);
        let host = Host {
            name: name.to_owned(),
            netns: ns,
            ip,
            dir,
            layout,
            entry,
            logs: Arc::clone(&self.logs),
        };
        host.init_store()?;
        self.hosts.push(host);
        self.write_hosts_file()?;
        Ok(&self.hosts[index])
    }

    /// The host called `name`.
    pub fn get(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// All hosts, in the order they were added.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The farm's directory (host directories, logs, hosts file).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The farm's name as given to [`Farm::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Names of the namespaces this farm created (switch and hosts).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Prints the logs of every process spawned in this farm to the test output
    /// (done automatically when the farm is dropped during a panic).
    pub fn print_logs(&self) {
        process::print_logs(&self.logs);
    }

    /// `/etc/hosts` of every host: `localhost` plus each host's name. Written
    /// in place (not replaced) so running processes' bind mounts see updates.
    fn write_hosts_file(&self) -> Result<()> {
        let mut text = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost\n");
        for h in &self.hosts {
            text.push_str(&format!("{}\t{}\n", h.ip, h.name));
        }
        fs::write(&self.hosts_file, text)
            .map_err(|e| Error::io("cannot write hosts file", &self.hosts_file, e))
    }
}

impl Index<&str> for Farm {
    type Output = Host;

    /// The host called `name`; panics (failing the test) if there is none.
    fn index(&self, name: &str) -> &Host {
        match self.get(name) {
            Some(h) => h,
            None => panic!("farm {:?} has no host {name:?}", self.name),
        }
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        // Hosts first: emptying them ends every process that could still
        // write logs or hold the store busy.
        for ns in self.namespaces.iter().rev() {
            netns::kill_all(ns);
        }
        if std::thread::panicking() {
            eprintln!(
                "===== farm {:?} failed; logs of its processes follow =====",
                self.name
            );
            self.print_logs();
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = netns::delete(ns) {
                eprintln!("nixq-e2e: teardown: {e}");
            }
        }
        if std::env::var_os("NIXQ_E2E_KEEP").is_some_and(|v| v == "1") {
            eprintln!("nixq-e2e: keeping {} (NIXQ_E2E_KEEP=1)", self.dir.display());
        } else if let Err(e) = remove_tree(&self.dir) {
            eprintln!("nixq-e2e: teardown: {e}");
        }
    }
}

fn validate_name(name: &str) -> Result<()> {
    let why = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_HOST_NAME {
        Some("longer than 20 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("only a-z, 0-9 and '-' are allowed")
    } else if name.starts_with('-') {
        Some("must not start with '-'")
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::InvalidHostName {
            name: name.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// Removes a directory tree that may contain a Nix store, whose directories
/// are read-only (mode 0555): makes each directory writable before emptying it.
pub fn remove_tree(dir: &Path) -> Result<()> {
    fn walk(dir: &Path) -> std::io::Result<()> {
        let meta = fs::symlink_metadata(dir)?;
        if !meta.is_dir() {
            return fs::remove_file(dir);
        }
        let mut perms = meta.permissions();
        perms.set_mode(perms.mode() | 0o700);
        fs::set_permissions(dir, perms)?;
        for entry in fs::read_dir(dir)? {
            walk(&entry?.path())?;
        }
        fs::remove_dir(dir)
    }
    match walk(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io("cannot remove directory", dir, e))
        }
        _ => Ok(()),
    }
}

/// Removes farm directories of test processes that no longer exist.
fn sweep_stale_dirs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !netns::alive(pid) {
            match remove_tree(&entry.path()) {
                Ok(()) => eprintln!("nixq-e2e: removed stale {}", entry.path().display()),
                Err(e) => eprintln!("nixq-e2e: {e}"),
            }
        }
    }
}

/// One host of a [`Farm`]: a network namespace with one address, and its own
/// `/nix`, `/etc/nix`, `HOME` and `TMPDIR`.
#[derive(Debug)]
pub struct Host {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    layout: nix::HostLayout,
    entry: Arc<Entry>,
    logs: LogRegistry,
}

impl Host {
    /// The host's name (also resolvable through `/etc/hosts` on every host).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on the farm's bridge.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The name of the host's network namespace (for `ip -n`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The host's directory on the machine: `nix/` (its `/nix`), `etc/nix/`
    /// (its `/etc/nix`), `home/`, `tmp/`. Files written here are visible to
    /// the host's commands under the same absolute path.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host's `/etc/nix` as seen from the machine (put a `machines` file
    /// here; the host sees it as `/etc/nix/machines`).
    pub fn etc_nix(&self) -> &Path {
        &self.layout.etc_nix
    }

    /// A command that runs `program` on this host (entered as described in the
    /// `enter` module docs) with the host's Nix environment: `NIX_REMOTE`
    /// empty (single-user local store), `NIX_CONF_DIR` the host's `/etc/nix`,
    /// no user configuration files, `HOME` and `TMPDIR` in the host's
    /// directory, stdin `/dev/null`. Change anything before spawning it.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.entry.apply(&mut cmd);
        for var in [
            "NIX_CONFIG",
            "NIX_PATH",
            "NIX_STORE_DIR",
            "NIX_STATE_DIR",
            "NIX_LOG_DIR",
            "NIX_DATA_DIR",
            "NIX_HELD_LOCKS",
            "NIX_BUILD_HOOK",
            "NIX_REMOTE_SYSTEMS",
            "NIX_DAEMON_SOCKET_PATH",
            "XDG_CONFIG_DIRS",
            "XDG_DATA_HOME",
            "XDG_RUNTIME_DIR",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("NIX_REMOTE", "")
            .env("NIX_CONF_DIR", &self.layout.etc_nix)
            .env("NIX_USER_CONF_FILES", "")
            .env("HOME", &self.layout.home)
            .env("XDG_CACHE_HOME", self.layout.home.join(".cache"))
            .env("XDG_CONFIG_HOME", self.layout.home.join(".config"))
            .env("TMPDIR", &self.layout.tmp)
            .env("NIXQ_E2E_HOST", &self.name)
            .current_dir(&self.layout.home)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `cmd` (from [`Host::cmd`]) to completion with [`DEFAULT_TIMEOUT`]
    /// and fails with its command line, exit status, stdout and stderr unless
    /// it exits 0. Background processes it leaves in its process group are killed.
    pub fn run(&self, cmd: Command) -> Result<Output> {
        self.run_timeout(cmd, DEFAULT_TIMEOUT)
    }

    /// [`Host::run`] with an explicit timeout.
    pub fn run_timeout(&self, cmd: Command, timeout: Duration) -> Result<Output> {
        process::run(&self.name, cmd, timeout)
    }

    /// Runs a `/bin/sh` script on the host; see [`Host::run`].
    pub fn sh(&self, script: &str) -> Result<Output> {
        let mut cmd = self.cmd("/bin/sh");
        cmd.arg("-c").arg(script);
        self.run(cmd)
    }

    /// Runs a `/bin/sh` script on the host and returns its stdout, trimmed.
    pub fn sh_stdout(&self, script: &str) -> Result<String> {
        let out = self.sh(script)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts a long-running process (from [`Host::cmd`]) under a guard that
    /// kills its process group when dropped; stdin is `/dev/null` and its
    /// output goes to a log file that the farm prints if the test fails.
    /// `label` names it in messages and in the log file name.
    pub fn spawn(&self, label: &str, cmd: Command) -> Result<Proc> {
        self.spawn_with(label, cmd, Stdin::Null)
    }

    /// [`Host::spawn`] choosing how stdin and stdout are connected.
    pub fn spawn_with(&self, label: &str, cmd: Command, stdio: Stdin) -> Result<Proc> {
        let logs_dir = self.dir.parent().unwrap_or(&self.dir).join("logs");
        let mut log = logs_dir.join(format!("{}-{}.log", self.name, sanitize(label)));
        let mut n = 1;
        while log.exists() {
            n += 1;
            log = logs_dir.join(format!("{}-{}.{n}.log", self.name, sanitize(label)));
        }
        Proc::spawn(&self.name, label, cmd, stdio, log, &self.logs)
    }

    /// Runs `f` on a fresh thread that has joined the host's network namespace,
    /// and returns its result. Sockets created there stay in that namespace, so
    /// the test process itself can listen or connect "on" a host (e.g. a
    /// `std::net::TcpListener` to hand to tokio, or a fault-injecting proxy)
    /// without a helper program. The mount namespace is *not* changed: `/nix`
    /// is still the machine's inside `f`.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let handle = Path::new(netns::NETNS_DIR).join(&self.netns);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = fs::File::open(&handle)
                        .map_err(|e| Error::io("cannot open namespace", &handle, e))?;
                    // SAFETY: setns on a valid fd affects only this thread,
                    // which exits when `f` returns.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        let e = std::io::Error::last_os_error();
                        return Err(Error::io("cannot enter namespace", &handle, e));
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Writes `contents` to `relative` under the host directory and returns
    /// the absolute path (valid on the host too).
    pub fn write_file(&self, relative: &str, contents: impl AsRef<[u8]>) -> Result<PathBuf> {
        let path = self.dir.join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| Error::io("cannot create directory", parent, e))?;
        }
        fs::write(&path, contents).map_err(|e| Error::io("cannot write", &path, e))?;
        Ok(path)
    }
}

fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_checked() {
        assert!(validate_name("master").is_ok());
        assert!(validate_name("s1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("Master").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a-very-long-host-name-indeed").is_err());
    }

    #[test]
    fn remove_tree_handles_read_only_directories() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let top = tmp.path().join("store");
        fs::create_dir_all(top.join("p/sub")).expect("mkdir");
        fs::write(top.join("p/sub/f"), "x").expect("write");
        std::os::unix::fs::symlink("/nonexistent", top.join("p/link")).expect("symlink");
        for d in ["p/sub", "p", ""] {
            fs::set_permissions(top.join(d), fs::Permissions::from_mode(0o555)).expect("chmod");
        }
        remove_tree(&top).expect("remove");
        assert!(!top.exists());
    }
}
