//! Files: the PKI directory layout, and reading and writing certificate and
//! key files safely.
//!
//! Rules:
//! - a key file is created with mode 0600 by the `open` call itself, so it is
//!   never readable by others, not even for an instant;
//! - an existing file is never replaced unless [`Overwrite::Replace`] is
//!   given (`--force`); a replacement is written to a fresh temporary file
//!   (again created 0600 or 0644 at `open`) and renamed over the old one, so
//!   the old file's permissions never carry over and a crash leaves either
//!   the old or the new file;
//! - every error names the file.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::CertsError;

/// Mode of private-key files (and of anything that contains a key).
pub const KEY_MODE: u32 = 0o600;

/// Mode of certificate and example files: certificates are public.
pub const PUBLIC_MODE: u32 = 0o644;

/// Mode of directories this tool creates: the PKI directory holds the CA
/// key, so only its owner may list or enter it.
pub const DIR_MODE: u32 = 0o700;

/// No certificate or key file is anywhere near this large; the cap keeps a
/// wrong path (a disk image, `/dev/zero`) from being read into memory.
pub const MAX_PEM_FILE: u64 = 1024 * 1024;

/// Whether an existing destination may be replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overwrite {
    /// Fail with [`CertsError::Exists`] (the default).
    Refuse,
    /// Replace it atomically (`--force`).
    Replace,
}

/// Where `nixq-certs` keeps things under its `--dir`.
///
/// ```text
/// DIR/ca.crt  DIR/ca.key
/// DIR/agents/NAME.crt  DIR/agents/NAME.key
/// DIR/masters/NAME.crt DIR/masters/NAME.key
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiDir {
    root: PathBuf,
}

impl PkiDir {
    /// The layout rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `DIR/ca.crt`.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }

    /// `DIR/ca.key`.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    /// `DIR/agents`.
    pub fn agents(&self) -> PathBuf {
        self.root.join("agents")
    }

    /// `DIR/masters`.
    pub fn masters(&self) -> PathBuf {
        self.root.join("masters")
    }

    /// `DIR/agents/NAME.crt` and `.key` (the name must have passed
    /// [`crate::check_name`], which keeps it inside the directory).
    pub fn agent(&self, name: &str) -> (PathBuf, PathBuf) {
        pair(&self.agents(), name)
    }

    /// `DIR/masters/NAME.crt` and `.key`.
    pub fn master(&self, name: &str) -> (PathBuf, PathBuf) {
        pair(&self.masters(), name)
    }
}

fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

/// Creates `dir` and its missing parents with mode 0700; an existing
/// directory is left as it is.
pub fn create_dir(dir: &Path) -> Result<(), CertsError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| CertsError::io("create directory", dir, e))
}

/// Fails with [`CertsError::Exists`] if `path` exists and may not be
/// replaced. Lets a command check all its destinations before it writes any.
pub fn check_writable(path: &Path, overwrite: Overwrite) -> Result<(), CertsError> {
    if overwrite == Overwrite::Refuse && path.symlink_metadata().is_ok() {
        return Err(CertsError::Exists {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Writes `contents` to `path` with `mode` set at creation.
pub fn write_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
    overwrite: Overwrite,
) -> Result<(), CertsError> {
    match overwrite {
        Overwrite::Refuse => {
            // O_CREAT|O_EXCL: fails if anything (even a dangling symlink) is there.
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
                .map_err(|e| match e.kind() {
                    ErrorKind::AlreadyExists => CertsError::Exists {
                        path: path.to_owned(),
                    },
                    _ => CertsError::io("create", path, e),
                })?;
            fill(file, path, contents).inspect_err(|_| {
                // Best effort: do not leave a truncated file we created.
                let _ = std::fs::remove_file(path);
            })
        }
        Overwrite::Replace => {
            let tmp = temp_path(path)?;
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
                .map_err(|e| CertsError::io("create", &tmp, e))?;
            fill(file, &tmp, contents)
                .and_then(|()| {
                    std::fs::rename(&tmp, path).map_err(|e| CertsError::io("replace", path, e))
                })
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                })
        }
    }
}

fn fill(mut file: File, path: &Path, contents: &[u8]) -> Result<(), CertsError> {
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| CertsError::io("write", path, e))
}

/// `DIR/.NAME.tmp.PID` beside `path`, so the rename stays in one file system.
fn temp_path(path: &Path) -> Result<PathBuf, CertsError> {
    let Some(name) = path.file_name() else {
        return Err(CertsError::io(
            "write",
            path,
            std::io::Error::new(ErrorKind::InvalidInput, "not a file path"),
        ));
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    Ok(path.with_file_name(tmp_name))
}

/// Reads a certificate or key file (at most [`MAX_PEM_FILE`] bytes) as text.
pub fn read_pem_file(path: &Path) -> Result<String, CertsError> {
    let file = File::open(path).map_err(|e| CertsError::io("read", path, e))?;
    let mut text = String::new();
    let read = file
        .take(MAX_PEM_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidData => {
                CertsError::bad_pem(path.display().to_string(), "not a text (PEM) file")
            }
            _ => CertsError::io("read", path, e),
        })?;
    if read as u64 > MAX_PEM_FILE {
        return Err(CertsError::TooLarge {
            path: path.to_owned(),
            size: read as u64,
            limit: MAX_PEM_FILE,
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn refuses_to_overwrite_and_replaces_with_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k.key");
        write_file(&p, b"one", KEY_MODE, Overwrite::Refuse).expect("first write");
        assert_eq!(mode(&p), 0o600);
        let err = write_file(&p, b"two", KEY_MODE, Overwrite::Refuse).expect_err("exists");
        assert!(matches!(err, CertsError::Exists { .. }));
        assert!(err.to_string().contains("k.key"));
        assert!(check_writable(&p, Overwrite::Refuse).is_err());
        assert_eq!(std::fs::read(&p).expect("read"), b"one");

        // A replaced file gets the new mode, not the old file's.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        write_file(&p, b"two", KEY_MODE, Overwrite::Replace).expect("replace");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        assert_eq!(mode(&p), 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "temp file left"
        );
    }

    #[test]
    fn dangling_symlink_is_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("elsewhere");
        let link = dir.path().join("ca.key");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert!(write_file(&link, b"secret", KEY_MODE, Overwrite::Refuse).is_err());
        assert!(!target.exists());
    }

    #[test]
    fn read_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.crt");
        let err = read_pem_file(&missing).expect_err("missing");
        assert!(err.to_string().contains("nope.crt"), "{err}");

        let big = dir.path().join("big.crt");
        std::fs::write(&big, vec![b'a'; (MAX_PEM_FILE + 10) as usize]).expect("write");
        assert!(matches!(
            read_pem_file(&big),
            Err(CertsError::TooLarge { .. })
        ));

        let binary = dir.path().join("bin.crt");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).expect("write");
        assert!(read_pem_file(&binary).is_err());
    }

    #[test]
    fn directories_are_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = PkiDir::new(dir.path().join("pki"));
        create_dir(&pki.agents()).expect("mkdir");
        assert_eq!(mode(pki.root()), 0o700);
        assert_eq!(mode(&pki.agents()), 0o700);
        let (crt, key) = pki.agent("s1");
        assert!(crt.ends_with("agents/s1.crt") && key.ends_with("agents/s1.key"));
    }
}
