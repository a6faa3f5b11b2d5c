//! `sshd` on a host, for Nix's own ssh transports (`nix-copy-closure`,
//! `nix copy --to ssh-ng://`), and the client configuration that reaches it.
//!
//! Keys live in `<farm>/ssh/`: an ed25519 host key and a root key pair whose
//! public half is the only authorized key. `sshd` runs in the slave's network
//! and mount namespaces, so sessions see the slave's `/nix` and `/etc/nix`;
//! root logs in by key, without PAM. Every session's command runs under GNU
//! `time` (`ForceCommand`), which appends the remote side's peak RSS to
//! [`Sshd::remote_rss_file`]: the ssh tools' counterpart of the agent's RSS.
//!
//! The client side is an `ssh -F` file: `ssh` reads `~/.ssh` from the
//! password database's home (`/root`), not `$HOME`, so nothing in the
//! machine's `/root` is used or changed; Nix passes it on through
//! `NIX_SSHOPTS`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::{Host, Proc};

/// Where `sshd` puts its privilege-separation chroot; it must exist.
const PRIVSEP_DIR: &str = "/run/sshd";

/// A running `sshd` and the files a client needs.
#[derive(Debug)]
pub struct Sshd {
    /// Kills `sshd` when dropped.
    _proc: Proc,
    client_config: PathBuf,
    remote_rss: PathBuf,
}

impl Sshd {
    /// `-F FILE` for `ssh`, as `NIX_SSHOPTS` wants it.
    pub fn nix_sshopts(&self) -> String {
        format!("-F {}", self.client_config.display())
    }

    /// The file that collects the remote sessions' peak RSS (KiB, one line
    /// per session).
    pub fn remote_rss_file(&self) -> &Path {
        &self.remote_rss
    }

    /// [`Sshd::take_remote_rss_kib`], waiting up to `wait` for the sessions'
    /// `time` to write it.
    pub fn wait_remote_rss_kib(&self, wait: Duration) -> Option<u64> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if let Some(kib) = self.take_remote_rss_kib() {
                return Some(kib);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The largest peak RSS of the sessions since the last call (KiB), and
    /// empties the file.
    pub fn take_remote_rss_kib(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.remote_rss).ok()?;
        let _ = std::fs::write(&self.remote_rss, "");
        text.lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .max()
    }
}

fn run(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    anyhow::ensure!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Installs what the benchmark runs besides Nix (OpenSSH, GNU time) with
/// apt-get if any of it is missing.
pub fn ensure_tools() -> anyhow::Result<()> {
    let wanted = [
        ("/usr/sbin/sshd", "openssh-server"),
        ("/usr/bin/ssh", "openssh-client"),
        (super::measure::TIME, "time"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(file, _)| !Path::new(file).exists())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("nixq-bench: installing {}", missing.join(" "));
    run(std::process::Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Starts `sshd` on `server` (port 22 of its address) with keys in `dir`,
/// and checks that `client` can run `nix-store --version` there.
pub fn start(dir: &Path, server: &Host, client: &Host) -> anyhow::Result<Sshd> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::create_dir_all(PRIVSEP_DIR).context("cannot create /run/sshd")?;
    let host_key = dir.join("host_ed25519");
    let user_key = dir.join("id_ed25519");
    for key in [&host_key, &user_key] {
        if !key.exists() {
            run(std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "nixq-bench", "-f"])
                .arg(key))?;
        }
    }
    let authorized = dir.join("authorized_keys");
    std::fs::copy(dir.join("id_ed25519.pub"), &authorized)
        .context("cannot write authorized_keys")?;
    let remote_rss = dir.join("remote-rss");
    std::fs::write(&remote_rss, "").context("cannot create the remote RSS file")?;
    let cache = server.dir().join("home/.cache");
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress {ip}\nPort 22\nHostKey {hk}\nPermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\nAuthorizedKeysFile {ak}\nPidFile none\nPrintMotd no\n\
             SetEnv XDG_CACHE_HOME={cache}\n\
             ForceCommand /usr/bin/time -a -o {rss} -f %M /bin/sh -c \"$SSH_ORIGINAL_COMMAND\"\n",
            ip = server.ip(),
            hk = host_key.display(),
            ak = authorized.display(),
            cache = cache.display(),
            rss = remote_rss.display(),
        ),
    )
    .context("cannot write sshd_config")?;
    let client_config = dir.join("ssh_config");
    std::fs::write(
        &client_config,
        format!(
            "Host *\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  \
             StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n",
            user_key.display()
        ),
    )
    .context("cannot write ssh_config")?;
    let mut cmd = server.cmd("/usr/sbin/sshd");
    cmd.arg("-D").arg("-e").arg("-f").arg(&config);
    let mut proc = server.spawn("sshd", cmd)?;
    // sshd prints "Server listening on …" with -e once bound.
    proc.wait_for_log("Server listening", Duration::from_secs(20))?;
    let sshd = Sshd {
        _proc: proc,
        client_config,
        remote_rss,
    };
    let version = client.sh_stdout(&format!(
        "ssh {} {} nix-store --version",
        sshd.nix_sshopts(),
        server.name()
    ))?;
    anyhow::ensure!(
        version.contains("nix-store"),
        "nix-store is not on the PATH of an ssh session on {}: {version:?}",
        server.name()
    );
    sshd.take_remote_rss_kib();
    Ok(sshd)
}
