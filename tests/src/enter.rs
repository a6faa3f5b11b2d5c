//! Entering a host: how a command comes to run "on" a host.
//!
//! [`Host::cmd`](crate::Host::cmd) returns an ordinary [`Command`] with a
//! `pre_exec` step that runs in the forked child just before `exec`:
//!
//! 1. `setns` into the host's network namespace (`/run/netns/<name>`);
//! 2. `unshare(CLONE_NEWNS)` for a fresh mount namespace, then make every
//!    mount in it private (`mount --make-rprivate /`), so nothing below
//!    propagates back to the machine;
//! 3. bind-mount the host's own directories over `/nix` (its store and
//!    database), `/etc/nix` (its `nix.conf`, machines file, …; when the
//!    machine has an `/etc/nix` to mount over) and the farm's hosts file over
//!    `/etc/hosts` (so host names resolve).
//!
//! This is the equivalent of
//! `ip netns exec NS unshare -m sh -c 'mount --make-rprivate / && mount --bind DIR/nix /nix && exec "$@"' sh CMD…`
//! without the extra processes: the pid of the spawned child *is* the program,
//! so signals and exit statuses are exact, and the `ip`/`unshare`/`sh`
//! wrappers cannot mangle arguments. Each command gets its own mount
//! namespace, but all of a host's commands see the same directories, so they
//! share one store, one database and one set of lock files, exactly like
//! processes on one machine. Mount namespaces die with their last process, so
//! no mount is ever left behind on the machine. (`ip netns exec` also remounts
//! `/sys` for the namespace; nothing here needs that.)

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Everything the child needs, prepared (allocated) before the fork: after
/// `fork` in a multi-threaded process only async-signal-safe calls are allowed.
#[derive(Debug)]
pub(crate) struct Entry {
    netns: CString,
    /// (source, target) bind mounts, in order.
    binds: Vec<(CString, CString)>,
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        Error::io(
            "path contains a NUL byte",
            p,
            io::Error::from(io::ErrorKind::InvalidInput),
        )
    })
}

impl Entry {
    pub(crate) fn new(netns_handle: &Path, binds: &[(&Path, &Path)]) -> Result<Self> {
        Ok(Self {
            netns: cstring(netns_handle)?,
            binds: binds
                .iter()
                .map(|(s, t)| Ok((cstring(s)?, cstring(t)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// Makes `cmd` enter the host when spawned.
    pub(crate) fn apply(self: &Arc<Self>, cmd: &mut Command) {
        let entry = Arc::clone(self);
        // SAFETY: the closure only makes raw syscalls (open, setns, close,
        // unshare, mount) on data allocated before the fork, and reads errno;
        // it allocates nothing and takes no locks, so it is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || entry.enter());
        }
    }

    fn enter(&self) -> io::Result<()> {
        fn check(rc: libc::c_int) -> io::Result<()> {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        }
        // SAFETY: all pointers are valid NUL-terminated strings owned by
        // `self`, which outlives these calls; the fd is ours and closed once.
        unsafe {
            let fd = libc::open(self.netns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let joined = check(libc::setns(fd, libc::CLONE_NEWNET));
            libc::close(fd);
            joined?;
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for (source, target) in &self.binds {
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
        }
        Ok(())
    }
}
