//! The NAR codec against the real Nix (2.8 here): our encoding of a tree
//! must be byte-identical to `nix-store --dump`, our restore must give back
//! the same tree, and Nix must accept our NARs (§6.2).
//!
//! Needs `nix-store` on the PATH. Without it the tests fail with the reason
//! (a skipped test would count as a pass).

use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{symlink, PermissionsExt as _};
use std::path::Path;
use std::process::{Command, Stdio};

use nixq_common::hash::NarHash;
use nixq_common::nar::{dump_path, restore, Decoder};

#[path = "support/local_nix.rs"]
mod local_nix;

/// Fails (never skips) unless `nix-store` can run.
fn require_nix() {
    local_nix::require("the real-Nix NAR tests", false, &["nix-store"]);
}

fn nix_dump(path: &Path) -> Vec<u8> {
    let out = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .expect("run nix-store --dump");
    assert!(
        out.status.success(),
        "nix-store --dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn nix_restore(nar: &[u8], target: &Path) {
    let mut child = Command::new("nix-store")
        .arg("--restore")
        .arg(target)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nix-store --restore");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(nar)
        .expect("feed nix-store --restore");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "nix-store --restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn our_dump(path: &Path) -> Vec<u8> {
    let mut nar = Vec::new();
    let size = dump_path(path, &mut nar).expect("dump_path");
    assert_eq!(size, nar.len() as u64);
    nar
}

fn write_mode(path: &Path, contents: &[u8], mode: u32) {
    fs::write(path, contents).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A tree with everything a NAR can hold and names whose byte order is not
/// their locale order.
fn build_tree(root: &Path) {
    fs::create_dir(root).expect("mkdir");
    write_mode(&root.join("empty"), b"", 0o644);
    write_mode(&root.join("empty-exec"), b"", 0o755);
    write_mode(&root.join("script"), b"#!/bin/sh\necho hi\n", 0o755);
    // Owner-execute alone makes a file executable; group/other bits do not.
    write_mode(&root.join("owner-x-only"), b"x", 0o700);
    write_mode(&root.join("group-x-only"), b"x", 0o654);
    write_mode(&root.join("read-only"), b"ro", 0o444);
    for len in [1usize, 7, 8, 9, 15, 16, 17, 4095, 4096, 65537] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        fs::write(root.join(format!("len-{len}")), data).expect("write");
    }
    let mut big = Vec::with_capacity(5 << 20);
    let mut x = 0x1234_5678_9abc_def0_u64;
    while big.len() < (5 << 20) + 3 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        big.extend_from_slice(&x.to_le_bytes());
    }
    big.truncate((5 << 20) + 3);
    fs::write(root.join("big"), &big).expect("write big");

    let sub = root.join("nested/deeper/deepest");
    fs::create_dir_all(&sub).expect("mkdir");
    fs::write(sub.join("leaf"), b"leaf\n").expect("write");
    fs::create_dir(root.join("empty-dir")).expect("mkdir");
    fs::create_dir_all(root.join("nested/empty/also-empty")).expect("mkdir");

    symlink("/nix/store/does-not-exist", root.join("abs-dangling")).expect("symlink");
    symlink("/etc", root.join("abs-dir")).expect("symlink");
    symlink("nested/deeper/deepest/leaf", root.join("rel")).expect("symlink");
    symlink("../../script", root.join("nested/deeper/up")).expect("symlink");
    symlink("nowhere/at/all", root.join("rel-dangling")).expect("symlink");
    symlink("empty-dir", root.join("to-dir")).expect("symlink");
    symlink("ünïcödé target ✓", root.join("unicode-target")).expect("symlink");

    let names = root.join("order");
    fs::create_dir(&names).expect("mkdir");
    for name in [
        "B",
        "a",
        "_",
        "Z",
        "e",
        "é",
        "e\u{301}",
        "E",
        "10",
        "9",
        "-x",
        ".hidden",
        "~",
        "Ä",
        "ä",
        "日本語",
        "😀",
        "a b",
        "a\tb",
        "A",
        "aa",
        "a.",
        "...",
    ] {
        fs::write(names.join(name), name.as_bytes()).expect("write");
    }
    // A name that is not UTF-8 at all.
    fs::write(names.join(OsStr::from_bytes(b"latin1-\xe9")), b"latin1").expect("write");
}

#[test]
fn dump_is_byte_identical_to_nix_and_round_trips() {
    require_nix();
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    build_tree(&src);

    let ours = our_dump(&src);
    let theirs = nix_dump(&src);
    assert!(ours == theirs, "our NAR differs from nix-store --dump");

    // Every node as a root too: files, symlinks, subdirectories.
    for sub in [
        "script",
        "empty",
        "big",
        "rel",
        "abs-dangling",
        "nested",
        "empty-dir",
        "order",
    ] {
        let path = src.join(sub);
        assert!(
            our_dump(&path) == nix_dump(&path),
            "{sub}: differs from nix-store --dump"
        );
    }

    // Strict decode of Nix's bytes, then our restore and a second dump.
    let mut decoder = Decoder::whole_container();
    assert_eq!(
        decoder.consume(&theirs).expect("strict decode"),
        theirs.len()
    );
    decoder.finish().expect("complete");
    let ours_restored = tmp.path().join("ours");
    let (hash, size) = restore(&ours[..], &ours_restored).expect("restore");
    assert_eq!((hash, size), (NarHash::of(&ours), ours.len() as u64));
    assert!(
        our_dump(&ours_restored) == ours,
        "restore + dump changed the NAR"
    );
    assert!(
        nix_dump(&ours_restored) == ours,
        "Nix sees a different tree"
    );

    // Nix restores our NAR to the same tree.
    let nix_restored = tmp.path().join("nix");
    nix_restore(&ours, &nix_restored);
    assert!(
        our_dump(&nix_restored) == ours,
        "nix-store --restore gave another tree"
    );
}

#[test]
fn real_store_paths_are_byte_identical() {
    require_nix();
    let Ok(entries) = fs::read_dir("/nix/store") else {
        eprintln!("no /nix/store: nothing to compare");
        return;
    };
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| !n.starts_with('.') && !n.ends_with(".lock"))
        })
        .collect();
    paths.sort();
    for path in paths.iter().take(20) {
        assert!(
            our_dump(path) == nix_dump(path),
            "{}: differs from nix-store --dump",
            path.display()
        );
    }
    eprintln!("compared {} store paths", paths.len().min(20));
}
