//! Each host's Nix: its directory layout, its `nix.conf`, store
//! initialisation, and thin helpers over the Nix CLI (`nix-build`,
//! `nix-store -q`, `--verify`) that return typed results.
//!
//! Nix runs as root in single-user mode on every host: `NIX_REMOTE` empty,
//! `sandbox = false`, empty `build-users-group`, no substituters
//! (nix-interfaces.md §11 "How to reproduce"), so nothing ever leaves the
//! machine and builders run as root with `PATH=/path-not-set`.

use std::fs;
use std::path::{Path, PathBuf};

use nixq_common::store_path::StorePath;

use crate::error::{Error, Result};
use crate::farm::Host;

/// The settings every host needs, before the test's own lines.
///
/// * `build-users-group =`, `sandbox = false`: single-user root Nix without
///   build users or namespaces (the sandbox does not work on Debian's Nix).
/// * `substituters =`: never reach for cache.nixos.org; hosts have no route out.
/// * `fsync-metadata = false`: the store database is thrown away after the
///   test, durability buys nothing and fsyncs cost seconds on loaded disks.
/// * `experimental-features = nix-command`: lets tests use `nix path-info`,
///   `nix log`, `nix store …` as well as the classic commands.
const BASE_NIX_CONF: &str = "\
build-users-group =
sandbox = false
substituters =
trusted-substituters =
fsync-metadata = false
experimental-features = nix-command
";

/// Where a host's files live on the machine.
#[derive(Debug)]
pub(crate) struct HostLayout {
    /// Bind-mounted over `/nix`.
    pub(crate) nix: PathBuf,
    /// Bind-mounted over `/etc/nix` and given as `NIX_CONF_DIR`.
    pub(crate) etc_nix: PathBuf,
    pub(crate) home: PathBuf,
    pub(crate) tmp: PathBuf,
}

impl HostLayout {
    pub(crate) fn create(dir: &Path, host: &str, extra_conf: &str) -> Result<Self> {
        let layout = Self {
            nix: dir.join("nix"),
            etc_nix: dir.join("etc/nix"),
            home: dir.join("home"),
            tmp: dir.join("tmp"),
        };
        for d in [
            layout.nix.join("store"),
            layout.nix.join("var/nix"),
            layout.etc_nix.clone(),
            layout.home.clone(),
            layout.tmp.clone(),
        ] {
            fs::create_dir_all(&d).map_err(|e| Error::io("cannot create directory", &d, e))?;
        }
        let conf = layout.etc_nix.join("nix.conf");
        let text = format!("# nix.conf of e2e host {host}\n{BASE_NIX_CONF}{extra_conf}");
        fs::write(&conf, text).map_err(|e| Error::io("cannot write", &conf, e))?;
        Ok(layout)
    }
}

fn parse_paths(host: &Host, command: &str, stdout: &[u8]) -> Result<Vec<StorePath>> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            StorePath::parse_any(l).map_err(|e| Error::BadOutput {
                host: host.name().to_owned(),
                command: command.to_owned(),
                why: format!("{l:?} is not a store path: {e}"),
            })
        })
        .collect()
}

impl Host {
    /// Creates the host's store database (`nix-store --init`).
    pub(crate) fn init_store(&self) -> Result<()> {
        let mut cmd = self.cmd("nix-store");
        cmd.arg("--init");
        self.run(cmd).map(drop)
    }

    /// Appends lines to the host's `nix.conf` (read by every later Nix command).
    pub fn append_nix_conf(&self, lines: &str) -> Result<()> {
        use std::io::Write;
        let conf = self.etc_nix().join("nix.conf");
        let mut f = fs::File::options()
            .append(true)
            .open(&conf)
            .map_err(|e| Error::io("cannot open", &conf, e))?;
        writeln!(f, "{lines}").map_err(|e| Error::io("cannot write", &conf, e))
    }

    /// `nix-build --no-out-link EXPR ARGS…` on the host; returns the output
    /// paths it prints.
    pub fn nix_build(&self, expr: &Path, args: &[&str]) -> Result<Vec<StorePath>> {
        let mut cmd = self.cmd("nix-build");
        cmd.arg("--no-out-link").arg(expr).args(args);
        let command = crate::process::describe(&cmd);
        let out = self.run(cmd)?;
        parse_paths(self, &command, &out.stdout)
    }

    /// `nix-store ARGS…` on the host; returns stdout.
    pub fn nix_store(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.cmd("nix-store");
        cmd.args(args);
        let out = self.run(cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn nix_store_paths(&self, args: &[&str]) -> Result<Vec<StorePath>> {
        let mut cmd = self.cmd("nix-store");
        cmd.args(args);
        let command = crate::process::describe(&cmd);
        let out = self.run(cmd)?;
        parse_paths(self, &command, &out.stdout)
    }

    /// Whether `path` is valid (registered) in the host's store.
    pub fn is_valid(&self, path: &StorePath) -> Result<bool> {
        let invalid = self.nix_store(&["--check-validity", "--print-invalid", path.as_str()])?;
        Ok(invalid.trim().is_empty())
    }

    /// Which of `paths` are valid in the host's store.
    pub fn valid_paths(&self, paths: &[StorePath]) -> Result<Vec<StorePath>> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["--check-validity", "--print-invalid"];
        args.extend(paths.iter().map(StorePath::as_str));
        let invalid = self.nix_store(&args)?;
        let invalid: Vec<&str> = invalid.lines().collect();
        Ok(paths
            .iter()
            .filter(|p| !invalid.contains(&p.as_str()))
            .cloned()
            .collect())
    }

    /// The references of a valid path (`nix-store -q --references`), sorted.
    pub fn references(&self, path: &StorePath) -> Result<Vec<StorePath>> {
        let mut refs = self.nix_store_paths(&["-q", "--references", path.as_str()])?;
        refs.sort();
        Ok(refs)
    }

    /// The closure of `paths` (`nix-store -q --requisites`), sorted.
    pub fn closure(&self, paths: &[StorePath]) -> Result<Vec<StorePath>> {
        let mut args = vec!["-q", "--requisites"];
        args.extend(paths.iter().map(StorePath::as_str));
        let mut all = self.nix_store_paths(&args)?;
        all.sort();
        Ok(all)
    }

    /// The registered NAR hash (`sha256:<nix-base32>`, as `nix-store -q --hash` prints it).
    pub fn nar_hash(&self, path: &StorePath) -> Result<String> {
        Ok(self
            .nix_store(&["-q", "--hash", path.as_str()])?
            .trim()
            .to_owned())
    }

    /// `nix-store --verify --check-contents`: the database is consistent and
    /// every path's contents match its registered hash. Fails otherwise.
    pub fn verify_store(&self) -> Result<()> {
        self.nix_store(&["--verify", "--check-contents"]).map(drop)
    }

    /// Every valid path in the host's store.
    pub fn all_valid_paths(&self) -> Result<Vec<StorePath>> {
        let dump = self.nix_store(&["--dump-db"])?;
        let mut paths = Vec::new();
        let mut lines = dump.lines();
        // --dump-db prints registrations: path, NAR hash, NAR size, deriver,
        // reference count, references… (nix-store --load-db's format).
        while let Some(path) = lines.next() {
            let parsed = StorePath::parse_any(path).map_err(|e| Error::BadOutput {
                host: self.name().to_owned(),
                command: "nix-store --dump-db".to_owned(),
                why: format!("{path:?} is not a store path: {e}"),
            })?;
            let bad = |why: &str| Error::BadOutput {
                host: self.name().to_owned(),
                command: "nix-store --dump-db".to_owned(),
                why: format!("registration of {path}: {why}"),
            };
            lines.next().ok_or_else(|| bad("no hash"))?;
            lines.next().ok_or_else(|| bad("no size"))?;
            lines.next().ok_or_else(|| bad("no deriver"))?;
            let n: usize = lines
                .next()
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| bad("no reference count"))?;
            for _ in 0..n {
                lines.next().ok_or_else(|| bad("missing reference"))?;
            }
            paths.push(parsed);
        }
        paths.sort();
        Ok(paths)
    }
}
