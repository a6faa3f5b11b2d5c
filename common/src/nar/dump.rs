//! Disk → NAR: the canonical serialisation of a file, symlink or directory
//! tree, byte for byte what `nix-store --dump` writes (§6.2).
//!
//! Directory entries are sorted by the bytes of their names; a regular file
//! is executable when its owner-execute bit is set; nothing else of the
//! metadata is recorded (§6.1). Symlinks are never followed: the root and
//! every entry are examined with `lstat` semantics and files are opened with
//! `O_NOFOLLOW`, and a file's size is taken from the opened descriptor.
//! Memory stays bounded by the encoder's buffer plus one directory listing
//! per open level.

use std::fs::{self, File, FileType, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::encode::{EncodeError, Encoder, Node};

/// Why a path could not be dumped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DumpError {
    #[error("cannot read '{path}': {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("'{path}' is not a regular file, directory or symlink, which a NAR cannot hold")]
    Unsupported { path: PathBuf },
    #[error("cannot encode '{path}': {source}")]
    Encode { path: PathBuf, source: EncodeError },
    #[error("writing the NAR failed: {0}")]
    Write(#[source] io::Error),
}

impl DumpError {
    fn encode(path: &Path, err: EncodeError) -> Self {
        match err {
            EncodeError::Write(err) => Self::Write(err),
            EncodeError::ReadContents(source) => Self::Read {
                path: path.to_owned(),
                source,
            },
            other => Self::Encode {
                path: path.to_owned(),
                source: other,
            },
        }
    }
}

/// Writes the NAR of `path` (not following it if it is a symlink) to
/// `out` and returns the NAR's size. `out` gets large writes; wrap it in
/// nothing.
pub fn dump_path(path: &Path, out: impl Write) -> Result<u64, DumpError> {
    let file_type = fs::symlink_metadata(path)
        .map_err(|source| read_error(path, source))?
        .file_type();
    let mut encoder = Encoder::new(out);
    let root = encoder.root().map_err(|err| DumpError::encode(path, err))?;
    dump_node(root, path, file_type)?;
    let (_, size) = encoder
        .finish()
        .map_err(|err| DumpError::encode(path, err))?;
    Ok(size)
}

fn read_error(path: &Path, source: io::Error) -> DumpError {
    DumpError::Read {
        path: path.to_owned(),
        source,
    }
}

/// Writes `path`, whose `lstat` type is `file_type`, as `node`. Recursion
/// is bounded by the encoder's depth limit.
fn dump_node<W: Write>(
    node: Node<'_, W>,
    path: &Path,
    file_type: FileType,
) -> Result<(), DumpError> {
    let encode_error = |err| DumpError::encode(path, err);
    if file_type.is_symlink() {
        let target = fs::read_link(path).map_err(|source| read_error(path, source))?;
        node.symlink(target.as_os_str().as_bytes())
            .map_err(encode_error)
    } else if file_type.is_file() {
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|source| read_error(path, source))?;
        let meta = file.metadata().map_err(|source| read_error(path, source))?;
        if !meta.file_type().is_file() {
            return Err(DumpError::Unsupported {
                path: path.to_owned(),
            });
        }
        // §6.1: executable when the owner-execute bit is set.
        let executable = meta.permissions().mode() & 0o100 != 0;
        node.regular(executable, meta.len(), &mut file as &mut File)
            .map_err(encode_error)
    } else if file_type.is_dir() {
        let mut entries = Vec::new();
        for entry in fs::read_dir(path).map_err(|source| read_error(path, source))? {
            let entry = entry.map_err(|source| read_error(path, source))?;
            let file_type = entry
                .file_type()
                .map_err(|source| read_error(&entry.path(), source))?;
            entries.push((entry.file_name(), file_type));
        }
        // §6.2: plain byte order of the names.
        entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut dir = node.directory().map_err(encode_error)?;
        let mut child_path = path.to_owned();
        for (name, file_type) in entries {
            child_path.push(&name);
            let child = dir
                .entry(name.as_bytes())
                .map_err(|err| DumpError::encode(&child_path, err))?;
            dump_node(child, &child_path, file_type)?;
            child_path.pop();
        }
        dir.close().map_err(encode_error)
    } else {
        Err(DumpError::Unsupported {
            path: path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::super::testing::Raw;
    use super::*;

    #[test]
    fn dumps_a_small_tree() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        fs::create_dir(&root).expect("mkdir");
        fs::write(root.join("b"), b"bee").expect("write");
        fs::write(root.join("B"), b"").expect("write");
        fs::set_permissions(root.join("B"), fs::Permissions::from_mode(0o700)).expect("chmod");
        symlink("/nowhere", root.join("a")).expect("symlink");
        fs::create_dir(root.join("d")).expect("mkdir");
        let mut nar = Vec::new();
        let size = dump_path(&root, &mut nar).expect("dump");
        assert_eq!(size as usize, nar.len());
        let expected = Raw::magic()
            .dir_start()
            .entry("B")
            .file(true, b"")
            .entry_end()
            .entry("a")
            .symlink(b"/nowhere")
            .entry_end()
            .entry("b")
            .file(false, b"bee")
            .entry_end()
            .entry("d")
            .dir_start()
            .dir_end()
            .entry_end()
            .dir_end()
            .0;
        assert_eq!(nar, expected);

        let mut nar = Vec::new();
        dump_path(&root.join("a"), &mut nar).expect("dump symlink");
        assert_eq!(nar, Raw::magic().symlink(b"/nowhere").0);
    }

    #[test]
    fn refuses_special_files_and_missing_paths() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let missing = dump_path(&tmp.path().join("missing"), io::sink()).expect_err("missing");
        assert!(matches!(missing, DumpError::Read { .. }), "{missing}");
        let err = dump_path(Path::new("/dev/null"), io::sink()).expect_err("device");
        assert!(matches!(err, DumpError::Unsupported { .. }), "{err}");
    }
}
