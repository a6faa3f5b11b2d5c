//! Running processes on hosts: checked commands with a timeout and captured
//! output ([`run`]), and long-running processes under a guard ([`Proc`]) whose
//! output goes to a log file that the [`Farm`](crate::Farm) prints when a test fails.
//!
//! Every child is the leader of its own process group, so a timeout or a
//! guard's `Drop` kills the whole group (a `sh -c` and what it started), not just
//! the direct child. Processes that leave the group (Nix starts its build hook
//! with `setsid`) are still caught by the farm's teardown, which kills every
//! process in the host's network namespace.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a checked command may run when the caller gives no timeout: long
/// enough for a `nix-build` of a test closure on two loaded cores, short enough
/// that a hang fails the test instead of stalling CI.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// How much of each log the farm prints when a test fails: the tail is where the
/// error is, and a bounded amount keeps the test output readable.
const LOG_TAIL_BYTES: u64 = 32 * 1024;

/// A human-readable rendering of a command line, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_quote(arg));
    }
    s
}

fn shell_quote(arg: &OsStr) -> String {
    let text = arg.to_string_lossy();
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b));
    if plain {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Sends `signal` to the process group led by `pid`. Callers only pass the pid
/// of a [`Child`] they have not reaped: a zombie leader keeps its pid and group
/// id reserved, so the signal cannot hit an unrelated process.
pub(crate) fn signal_group(pid: u32, signal: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: killpg has no memory-safety preconditions; a stale group only
    // yields ESRCH, which is what we want to ignore.
    unsafe {
        libc::killpg(pgid, signal);
    }
}

/// Waits for `child` until `deadline`, polling with a short back-off, and reaps it.
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    if exited_by(child.id(), deadline)? {
        child.wait().map(Some)
    } else {
        Ok(None)
    }
}

/// Polls until process `pid` has exited or `deadline` passes, *without reaping
/// it* (`waitid` with `WNOWAIT`), so its pid and process group id stay reserved
/// and the group can still be signalled safely afterwards.
fn exited_by(pid: u32, deadline: Instant) -> std::io::Result<bool> {
    let id = libc::id_t::from(pid);
    let mut pause = Duration::from_millis(1);
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value, and waitid only
        // writes into the struct we pass.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                id,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: waitid filled `info` (or left it zeroed: no child changed state).
        if unsafe { info.si_pid() } != 0 {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn read_all(mut r: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just truncates the captured output; the exit status is
        // what decides success.
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// `command` cut to [`ECHO_MAX`] characters for the echo line: a command
/// given thousands of store paths would otherwise fill the log with them.
/// Errors keep the whole command.
fn shortened(command: &str) -> std::borrow::Cow<'_, str> {
    match command.char_indices().nth(ECHO_MAX) {
        Some((cut, _)) => format!(
            "{} … ({} more characters)",
            &command[..cut],
            command.len() - cut
        )
        .into(),
        None => command.into(),
    }
}

/// The longest command echoed whole.
const ECHO_MAX: usize = 400;

/// Runs `cmd` (stdout and stderr captured) and checks that it exits with 0
/// within `timeout`. Afterwards (and on timeout) its whole process group is
/// killed, so background processes it started cannot hold the pipes open;
/// long-running processes belong in [`Proc`].
pub(crate) fn run(host: &str, mut cmd: Command, timeout: Duration) -> Result<Output> {
    let command = describe(&cmd);
    eprintln!("[{host}] $ {}", shortened(&command));
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        host: host.to_owned(),
        command: command.clone(),
        source,
    })?;
    let out = child.stdout.take().map(read_all);
    let err = child.stderr.take().map(read_all);
    let exited = exited_by(child.id(), Instant::now() + timeout).unwrap_or(false);
    // Not reaped yet, so the group id is still ours: kill what is left of the
    // group (on timeout, everything; on exit, background grandchildren that
    // would otherwise keep the output pipes open and block the readers).
    signal_group(child.id(), libc::SIGKILL);
    let status = child.wait().map_err(|source| Error::Spawn {
        host: host.to_owned(),
        command: command.clone(),
        source,
    })?;
    let status = exited.then_some(status);
    let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
    match status {
        Some(status) if status.success() => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        Some(status) => Err(Error::CommandFailed {
            host: host.to_owned(),
            command,
            status,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }),
        None => Err(Error::Timeout {
            host: host.to_owned(),
            command,
            timeout,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }),
    }
}

/// One log file of a spawned process, remembered by the farm for failure reports.
#[derive(Debug, Clone)]
pub(crate) struct LogEntry {
    pub(crate) host: String,
    pub(crate) label: String,
    pub(crate) command: String,
    pub(crate) path: PathBuf,
}

/// The logs of every process spawned in a farm.
pub(crate) type LogRegistry = Arc<Mutex<Vec<LogEntry>>>;

/// Prints the tail of every registered log to stderr (the test's output).
pub(crate) fn print_logs(registry: &LogRegistry) {
    let entries = registry
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for entry in entries {
        eprintln!(
            "===== [{}] {} (`{}`), log {} =====",
            entry.host,
            entry.label,
            entry.command,
            entry.path.display()
        );
        match tail(&entry.path, LOG_TAIL_BYTES) {
            Ok(text) => eprintln!("{text}"),
            Err(e) => eprintln!("(cannot read the log: {e})"),
        }
    }
}

fn tail(path: &Path, max: u64) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if len > max {
        f.seek(SeekFrom::Start(len - max))?;
    }
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if len > max {
        text.insert_str(0, &format!("(… first {} bytes omitted …)\n", len - max));
    }
    Ok(text)
}

/// How a guarded process's standard streams are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdin {
    /// Reads from `/dev/null`; stdout and stderr both go to the log file.
    Null,
    /// stdin and stdout are pipes (take them with [`Proc::take_stdin`] and
    /// [`Proc::take_stdout`]); stderr goes to the log file.
    Piped,
}

/// A process running on a host, killed with its whole process group when the
/// guard is dropped. Its output is in [`Proc::log_path`].
#[derive(Debug)]
pub struct Proc {
    host: String,
    label: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    pub(crate) fn spawn(
        host: &str,
        label: &str,
        mut cmd: Command,
        stdio: Stdin,
        log: PathBuf,
        registry: &LogRegistry,
    ) -> Result<Self> {
        let command = describe(&cmd);
        eprintln!("[{host}] spawn {label}: {command} (log {})", log.display());
        let file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| Error::io("cannot create log file", &log, e))?;
        let file2 = file
            .try_clone()
            .map_err(|e| Error::io("cannot duplicate log file handle", &log, e))?;
        match stdio {
            Stdin::Null => {
                cmd.stdin(Stdio::null()).stdout(file).stderr(file2);
            }
            Stdin::Piped => {
                drop(file);
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(file2);
            }
        }
        cmd.process_group(0);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            host: host.to_owned(),
            command: command.clone(),
            source,
        })?;
        registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(LogEntry {
                host: host.to_owned(),
                label: label.to_owned(),
                command,
                path: log.clone(),
            });
        Ok(Self {
            host: host.to_owned(),
            label: label.to_owned(),
            child,
            log,
            status: None,
        })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file that receives the process's output.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far.
    pub fn log(&self) -> Result<String> {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|e| Error::io("cannot read log", &self.log, e))
    }

    /// Waits until the log contains `needle` (e.g. "listening on"), failing early
    /// if the process exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log()?.contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                return Err(Error::WaitTimeout {
                    what: format!(
                        "{needle:?} in the log of [{}] {}, which exited ({status}) first",
                        self.host, self.label
                    ),
                    timeout,
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::WaitTimeout {
                    what: format!("{needle:?} in the log of [{}] {}", self.host, self.label),
                    timeout,
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if the process has exited (reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|e| Error::io("cannot wait for process", &self.log, e))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = wait_until(&mut self.child, Instant::now() + timeout)
                .map_err(|e| Error::io("cannot wait for process", &self.log, e))?;
        }
        Ok(self.status)
    }

    /// Sends `signal` to the process group (e.g. `libc::SIGSTOP` to freeze an
    /// agent mid-transfer). Does nothing once the process has been reaped.
    pub fn signal(&self, signal: libc::c_int) {
        if self.status.is_none() {
            signal_group(self.pid(), signal);
        }
    }

    /// Graceful stop: SIGTERM to the group, up to `grace` to exit, then SIGKILL.
    /// Returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        self.kill()
    }

    /// SIGKILL to the whole group, then reap. Returns the exit status.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        signal_group(self.pid(), libc::SIGKILL);
        let status = self
            .child
            .wait()
            .map_err(|e| Error::io("cannot wait for process", &self.log, e))?;
        self.status = Some(status);
        Ok(status)
    }

    /// The pipe to the process's stdin (with [`Stdin::Piped`]; once).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// The pipe from the process's stdout (with [`Stdin::Piped`]; once).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Once reaped, the group id may belong to someone else: only signal an
        // unreaped leader. Stray children of an exited leader are killed by the
        // farm's teardown, which empties the host's network namespace.
        if self.status.is_none() {
            signal_group(self.pid(), libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_commands_are_shortened_for_the_echo_only() {
        assert_eq!(shortened("nix-store -q"), "nix-store -q");
        let long = format!("nix-store --check-validity {}", "/nix/store/x ".repeat(500));
        let echoed = shortened(&long);
        assert!(echoed.starts_with("nix-store --check-validity /nix/store/x"));
        assert!(echoed.chars().count() < ECHO_MAX + 40, "{echoed}");
        assert!(echoed.ends_with(&format!("({} more characters)", long.len() - ECHO_MAX)));
    }
}
