//! Timing a client process and reading peak memory: wall time from spawn to
//! exit, the client's peak RSS from GNU `time` (the maximum over the process
//! and the descendants it reaped, e.g. the `ssh` that `nix-copy-closure`
//! starts), and a daemon's peak RSS from `VmHWM` in `/proc/PID/status`,
//! which writing `5` to `/proc/PID/clear_refs` resets.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How one measured client run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// From just before `spawn` to the exit being observed.
    pub wall: Duration,
    /// The exit code, or `128 + signal`.
    pub code: i32,
    /// `ru_maxrss` of `wait4`, KiB: the peak RSS of the process and its
    /// reaped descendants, but at least this process's RSS at the fork (see
    /// [`under_time`] for the program's own figure).
    pub max_rss_kib: u64,
    /// stdout and stderr of the run.
    pub log: PathBuf,
}

impl Outcome {
    /// The last lines of the log: what a failed run said.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

/// `cmd` (from [`Host::cmd`](crate::Host::cmd) on `host`) run under GNU
/// `time`, which writes the peak RSS of the program (KiB) to `rss_file`.
///
/// Needed because `wait4`'s `ru_maxrss` of a child forked from this
/// process includes this process's own RSS at the fork (the kernel keeps the
/// high-water mark of the pre-`exec` address space); `time` is small, so
/// its child's figure is the program's own.
pub fn under_time(host: &crate::Host, cmd: &Command, rss_file: &Path) -> Command {
    let mut wrapped = host.cmd(TIME);
    wrapped
        .args(["-f", "%M", "-o"])
        .arg(rss_file)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => wrapped.env(key, v),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// GNU time (Debian package `time`).
pub const TIME: &str = "/usr/bin/time";

/// The number GNU `time -f %M -o FILE` wrote.
pub fn read_time_rss_kib(rss_file: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(rss_file)
        .with_context(|| format!("cannot read {}", rss_file.display()))?;
    text.lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .with_context(|| format!("no RSS figure in {}: {text:?}", rss_file.display()))
}

/// Runs `cmd` (output to `log`, stdin `/dev/null`, its own process group)
/// and measures it. After `timeout` the group is killed. Processes the
/// client leaves behind in its group are killed when it exits.
pub fn run_measured(mut cmd: Command, log: &Path, timeout: Duration) -> anyhow::Result<Outcome> {
    let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone().context("cannot duplicate a log handle")?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    // Watchdog: kills the group on timeout, but only while the leader is
    // unreaped (`done` is set before reaping), so the pid cannot be reused.
    let done = Arc::new((Mutex::new(false), Condvar::new()));
    let watchdog = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let (lock, cvar) = &*done;
            let guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
            let (guard, _) = cvar
                .wait_timeout_while(guard, timeout, |d| !*d)
                .unwrap_or_else(PoisonError::into_inner);
            if !*guard {
                // SAFETY: killpg has no memory-safety preconditions.
                unsafe { libc::killpg(pid, libc::SIGKILL) };
            }
        })
    };
    // Wait for the exit without reaping, so the group can still be signalled.
    loop {
        // SAFETY: an all-zero siginfo_t is valid; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is valid and writable.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            bail!("waitid({pid}): {e}");
        }
    }
    let wall = start.elapsed();
    {
        let (lock, cvar) = &*done;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cvar.notify_all();
    }
    // SAFETY: the leader is a zombie, so its group id is still ours.
    unsafe { libc::killpg(pid, libc::SIGKILL) };
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to owned values.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if rc != pid {
        bail!("wait4({pid}): {}", std::io::Error::last_os_error());
    }
    let _ = watchdog.join();
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    Ok(Outcome {
        wall,
        code,
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        log: log.to_owned(),
    })
}

/// `VmHWM` (peak resident set) of process `pid`, KiB.
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmHWM in {path}"))
}

/// Resets `VmHWM` of process `pid` to its current RSS.
pub fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("cannot write {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_exit_code_time_and_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "head -c 20000000 /dev/zero | tail -c 1 >/dev/null; exit 3",
        ]);
        let o = run_measured(cmd, &dir.path().join("log"), Duration::from_secs(30)).expect("runs");
        assert_eq!(o.code, 3);
        assert!(o.max_rss_kib > 0);
        let me = std::process::id();
        reset_peak_rss(me).expect("reset");
        assert!(peak_rss_kib(me).expect("VmHWM") > 0);
    }

    #[test]
    fn kills_on_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("30");
        let o =
            run_measured(cmd, &dir.path().join("log"), Duration::from_millis(200)).expect("runs");
        assert_eq!(o.code, 128 + libc::SIGKILL);
        assert!(o.wall < Duration::from_secs(5));
    }
}
