//! How busy and how full the slave is: the load average (`/proc/loadavg`)
//! and the free space of the store's file system (`statvfs`).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

/// Where Linux publishes the load averages.
const LOADAVG_FILE: &str = "/proc/loadavg";

/// The 1-minute load average; 0 when it cannot be read (not Linux).
pub fn load_average() -> f64 {
    std::fs::read_to_string(LOADAVG_FILE)
        .ok()
        .and_then(|text| parse_loadavg(&text))
        .unwrap_or(0.0)
}

/// The first field of `/proc/loadavg` (`0.52 0.58 0.59 1/467 12345`).
pub fn parse_loadavg(text: &str) -> Option<f64> {
    let value: f64 = text.split_ascii_whitespace().next()?.parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some(value)
}

/// Bytes available to unprivileged writers on the file system of `dir`
/// (`f_bavail × f_frsize`: the space Nix itself can count on).
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let c_dir = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a path"))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_dir is a valid NUL-terminated string and st a valid,
    // writable statvfs.
    if unsafe { libc::statvfs(c_dir.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field types differ between libc targets
    Ok(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// Whether this process may create files in `dir` (root on a read-only
/// mount gets `EROFS` here, which is the case to catch: NixOS mounts the
/// store read-only outside the daemon's namespace).
pub fn writable(dir: &Path) -> io::Result<()> {
    let c_dir = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a path"))?;
    // SAFETY: c_dir is a valid NUL-terminated string.
    if unsafe { libc::access(c_dir.as_ptr(), libc::W_OK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loadavg_first_field() {
        assert_eq!(parse_loadavg("0.52 0.58 0.59 1/467 12345\n"), Some(0.52));
        assert_eq!(parse_loadavg("12.00 1 1 1/1 1"), Some(12.0));
        assert_eq!(parse_loadavg(""), None);
        assert_eq!(parse_loadavg("nan 1 1"), None);
        assert_eq!(parse_loadavg("-1 1 1"), None);
        assert_eq!(parse_loadavg("x 1 1"), None);
    }

    #[test]
    fn free_space_of_a_real_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(free_bytes(dir.path()).expect("statvfs") > 0);
        assert!(free_bytes(Path::new("/nonexistent/nixq")).is_err());
        writable(dir.path()).expect("writable");
    }
}
