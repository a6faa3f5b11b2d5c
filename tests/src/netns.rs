//! Network namespaces: creation and wiring with `ip`, emptying a namespace of
//! its processes, deletion, and the sweep of namespaces left by crashed runs.
//!
//! Naming: every namespace is `nixq-<pid>-<farm>-<host>`, where `<pid>` is the
//! test process that created it and `<farm>` a per-process counter, so
//! parallel tests (threads of one test binary, or several binaries) never
//! collide, and a later run can tell a stale namespace (creator dead) from a
//! live one. The farm's switch namespace is `nixq-<pid>-<farm>--switch` (host
//! names cannot start with `-`).
//!
//! Topology: the switch namespace holds a bridge `br0`; each host gets a veth
//! pair created *inside* the switch namespace (`h<index>`, enslaved to the
//! bridge) whose peer is moved straight into the host namespace as `eth0`.
//! Nothing is ever created in the machine's own namespace, so interface names
//! cannot clash and no test traffic can leave: the hosts have only `lo` and
//! `eth0`, and no default route.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::process;

/// Prefix of every namespace the harness creates.
pub const PREFIX: &str = "nixq-";

/// Where `ip netns` keeps its namespace handles (bind mounts of nsfs files).
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// The first-ever `ip netns add` on a machine makes `/run/netns` a shared
/// mount; concurrent first calls race on that. Serialise our own calls.
static IP_NETNS_LOCK: Mutex<()> = Mutex::new(());

/// How long `ip` may take: it returns in milliseconds unless the kernel is stuck.
const IP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `ip ARGS…` in the machine's namespace and checks its exit status.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args).stdin(std::process::Stdio::null());
    process::run("root", cmd, IP_TIMEOUT).map(drop)
}

/// Creates the namespace `name` with `lo` up.
pub(crate) fn add(name: &str) -> Result<()> {
    {
        let _guard = IP_NETNS_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        ip(&["netns", "add", name])?;
    }
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Creates the bridge of a switch namespace.
pub(crate) fn add_bridge(switch: &str) -> Result<()> {
    ip(&["-n", switch, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", switch, "link", "set", "br0", "up"])
}

/// Connects host namespace `host` to the bridge of `switch` with address
/// `cidr` (e.g. `10.213.0.2/24`) on its `eth0`.
pub(crate) fn connect(switch: &str, port: &str, host: &str, cidr: &str) -> Result<()> {
    ip(&[
        "-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host,
    ])?;
    ip(&["-n", switch, "link", "set", port, "master", "br0"])?;
    ip(&["-n", switch, "link", "set", port, "up"])?;
    ip(&["-n", host, "addr", "add", cidr, "dev", "eth0"])?;
    ip(&["-n", host, "link", "set", "eth0", "up"])
}

/// The identity of a namespace handle, as `/proc/PID/ns/net` links show it
/// (`net:[INODE]`), or `None` if the handle is gone.
pub(crate) fn identity(name: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(Path::new(NETNS_DIR).join(name)).ok()?;
    Some(format!("net:[{}]", meta.ino()))
}

/// Pids of the live processes whose network namespace is `identity`.
pub fn pids_in(identity: &str) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        // Zombies and exited processes have no namespace link: skipped.
        let link = fs::read_link(entry.path().join("ns/net")).ok()?;
        (link.as_os_str() == identity).then_some(pid)
    })
    .collect()
}

/// SIGKILLs every process in the namespace until none is left (processes may
/// fork while we kill), giving up after a bound.
pub(crate) fn kill_all(name: &str) {
    let Some(identity) = identity(name) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = pids_in(&identity);
        if pids.is_empty() || Instant::now() >= deadline {
            if !pids.is_empty() {
                eprintln!("nixq-e2e: processes {pids:?} in namespace {name} survived SIGKILL");
            }
            return;
        }
        for pid in pids {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Empties and deletes the namespace (and with it its veth ends and bridge).
pub(crate) fn delete(name: &str) -> Result<()> {
    kill_all(name);
    let _guard = IP_NETNS_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    ip(&["netns", "delete", name])
}

/// Names of all namespaces with our prefix.
pub fn ours() -> Vec<String> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX))
        .collect()
}

/// The pid encoded in one of our names (`nixq-<pid>-…`).
pub(crate) fn creator_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Whether process `pid` exists (EPERM counts as existing).
pub(crate) fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Deletes namespaces whose creating process is dead (left by a run that was
/// killed before its teardown), killing whatever still runs inside them.
/// Returns the names it removed.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for name in ours() {
        match creator_pid(&name) {
            Some(pid) if !alive(pid) => match delete(&name) {
                Ok(()) => removed.push(name),
                Err(e) => eprintln!("nixq-e2e: cannot sweep stale namespace {name}: {e}"),
            },
            _ => {}
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creator_pid_parses_our_names_only() {
        assert_eq!(creator_pid("nixq-1234-0-master"), Some(1234));
        assert_eq!(creator_pid("nixq-1234-7--switch"), Some(1234));
        assert_eq!(creator_pid("nixq-x-0-master"), None);
        assert_eq!(creator_pid("other-1234-0-master"), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(alive(
            i32::try_from(std::process::id()).expect("pid fits i32")
        ));
    }
}
