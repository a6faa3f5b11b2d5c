//! The `nixq-certs` binary end to end: init, issue, bundle, show, the
//! refuse-to-overwrite rule and the 0600 key modes.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn nixq_certs(dir: &Path, cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nixq-certs"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .current_dir(cwd)
        .env_remove("NIXQ_PKI_DIR")
        .output()
        .expect("run nixq-certs")
}

fn ok(dir: &Path, cwd: &Path, args: &[&str]) -> String {
    let out = nixq_certs(dir, cwd, args);
    assert!(
        out.status.success(),
        "nixq-certs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

fn fails(dir: &Path, cwd: &Path, args: &[&str]) -> String {
    let out = nixq_certs(dir, cwd, args);
    assert!(!out.status.success(), "nixq-certs {args:?} succeeded");
    String::from_utf8(out.stderr).expect("utf-8 stderr")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

#[test]
fn init_issue_bundle_show() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    let cwd = tmp.path();

    ok(&pki, cwd, &["init", "--name", "farm CA"]);
    assert_eq!(mode(&pki), 0o700);
    assert_eq!(mode(&pki.join("ca.key")), 0o600);
    assert_eq!(mode(&pki.join("ca.crt")), 0o644);

    ok(
        &pki,
        cwd,
        &[
            "issue", "agent", "s1", "--dns", "s1.lan", "--ip", "10.1.2.3", "--days", "30",
        ],
    );
    ok(&pki, cwd, &["issue", "master", "m1"]);
    assert_eq!(mode(&pki.join("agents/s1.key")), 0o600);
    assert_eq!(mode(&pki.join("masters/m1.key")), 0o600);
    assert_eq!(mode(&pki.join("agents/s1.crt")), 0o644);

    let agent_crt = pki.join("agents/s1.crt").display().to_string();
    let master_crt = pki.join("masters/m1.crt").display().to_string();
    let shown = ok(&pki, cwd, &["show", &agent_crt, &master_crt]);
    assert!(shown.contains("subject:     CN=s1"), "{shown}");
    assert!(shown.contains("issuer:      CN=farm CA"), "{shown}");
    assert!(shown.contains("role:        agent"), "{shown}");
    assert!(
        shown.contains("SANs:        DNS:s1.lan, IP:10.1.2.3"),
        "{shown}"
    );
    assert!(shown.contains("key usage:   serverAuth"), "{shown}");
    assert!(
        shown.contains("status:      valid, expires in 29 days"),
        "{shown}"
    );
    assert!(shown.contains("role:        master"), "{shown}");
    assert!(shown.contains("key usage:   clientAuth"), "{shown}");
    assert_eq!(shown.matches("SHA-256:").count(), 2, "{shown}");

    // Bundles: the role is found from the directory.
    ok(&pki, cwd, &["bundle", "s1"]);
    ok(&pki, cwd, &["bundle", "m1", "--out", "master-bundle.tar"]);
    let agent_tar = cwd.join("s1.tar");
    assert_eq!(mode(&agent_tar), 0o600);

    let entries = tar_entries(&agent_tar);
    let listing: Vec<(&str, u32)> = entries.iter().map(|(p, m, _)| (p.as_str(), *m)).collect();
    assert_eq!(
        listing,
        [
            ("nixq/ca.crt", 0o644),
            ("nixq/agent.crt", 0o644),
            ("nixq/agent.key", 0o600),
            ("nixq/agent.toml.example", 0o644),
        ]
    );
    let agent_key = std::fs::read(pki.join("agents/s1.key")).expect("key");
    assert_eq!(entries[2].2, agent_key);
    let ca = std::fs::read(pki.join("ca.crt")).expect("ca");
    assert_eq!(entries[0].2, ca);

    let master = tar_entries(&cwd.join("master-bundle.tar"));
    assert_eq!(master[1].0, "nixq/master.pem");
    assert_eq!(master[1].1, 0o600);
    let pem = String::from_utf8(master[1].2.clone()).expect("utf-8");
    assert!(pem.contains("BEGIN CERTIFICATE") && pem.contains("BEGIN PRIVATE KEY"));

    // `show` on the combined identity reads its certificate.
    let combined = cwd.join("master.pem");
    std::fs::write(&combined, &master[1].2).expect("write");
    let shown = ok(&pki, cwd, &["show", combined.to_str().expect("utf-8")]);
    assert!(shown.contains("subject:     CN=m1"), "{shown}");
}

#[test]
fn refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    let cwd = tmp.path();
    ok(&pki, cwd, &["init"]);
    let ca_before = std::fs::read(pki.join("ca.crt")).expect("ca");

    let err = fails(&pki, cwd, &["init"]);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert!(err.contains("ca.crt") || err.contains("ca.key"), "{err}");
    assert_eq!(std::fs::read(pki.join("ca.crt")).expect("ca"), ca_before);

    ok(&pki, cwd, &["issue", "master", "m1"]);
    let key_before = std::fs::read(pki.join("masters/m1.key")).expect("key");
    let err = fails(&pki, cwd, &["issue", "master", "m1"]);
    assert!(err.contains("masters/m1.crt"), "{err}");
    assert_eq!(
        std::fs::read(pki.join("masters/m1.key")).expect("key"),
        key_before
    );

    // --force replaces, and the key is still 0600 even if someone loosened it.
    std::fs::set_permissions(
        pki.join("masters/m1.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    ok(&pki, cwd, &["issue", "master", "m1", "--force"]);
    assert_ne!(
        std::fs::read(pki.join("masters/m1.key")).expect("key"),
        key_before
    );
    assert_eq!(mode(&pki.join("masters/m1.key")), 0o600);

    ok(&pki, cwd, &["bundle", "m1"]);
    let err = fails(&pki, cwd, &["bundle", "m1"]);
    assert!(err.contains("m1.tar"), "{err}");
    ok(&pki, cwd, &["bundle", "m1", "--force"]);

    ok(&pki, cwd, &["init", "--force"]);
    assert_ne!(std::fs::read(pki.join("ca.crt")).expect("ca"), ca_before);
    assert_eq!(mode(&pki.join("ca.key")), 0o600);
}

#[test]
fn errors_name_the_problem() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    let cwd = tmp.path();

    let err = fails(&pki, cwd, &["issue", "agent", "s1"]);
    assert!(
        err.contains("ca.crt") && err.contains("nixq-certs init"),
        "{err}"
    );

    ok(&pki, cwd, &["init"]);
    let err = fails(&pki, cwd, &["issue", "agent", "../evil"]);
    assert!(err.contains("invalid name \"../evil\""), "{err}");
    let err = fails(&pki, cwd, &["issue", "agent", "s1", "--dns", "bad_name"]);
    assert!(err.contains("invalid DNS name \"bad_name\""), "{err}");
    assert!(!pki.join("agents/s1.key").exists());

    let err = fails(&pki, cwd, &["bundle", "ghost"]);
    assert!(err.contains("no certificate for ghost"), "{err}");

    ok(&pki, cwd, &["issue", "agent", "both"]);
    ok(&pki, cwd, &["issue", "master", "both"]);
    let err = fails(&pki, cwd, &["bundle", "both"]);
    assert!(err.contains("--role"), "{err}");
    ok(&pki, cwd, &["bundle", "both", "--role", "master"]);

    let key = pki.join("ca.key");
    let err = fails(&pki, cwd, &["show", key.to_str().expect("utf-8")]);
    assert!(
        err.contains("ca.key") && err.contains("PRIVATE KEY"),
        "{err}"
    );
    let err = fails(&pki, cwd, &["show", "/nonexistent.crt"]);
    assert!(err.contains("/nonexistent.crt"), "{err}");

    // A CA key that does not match the certificate is named.
    let other = tmp.path().join("other");
    ok(&other, cwd, &["init"]);
    std::fs::copy(other.join("ca.key"), &key).expect("copy");
    let err = fails(&pki, cwd, &["issue", "master", "m2"]);
    assert!(err.contains("ca.key is not the private key"), "{err}");
}

fn tar_entries(path: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let file = std::fs::File::open(path).expect("open tar");
    let mut archive = tar::Archive::new(file);
    let mut out = Vec::new();
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        let path = entry.path().expect("path").display().to_string();
        let mode = entry.header().mode().expect("mode");
        let mut data = Vec::new();
        entry.read_to_end(&mut data).expect("read");
        out.push((path, mode, data));
    }
    out
}
