//! The daemon client against the real `nix-daemon --stdio` of Nix 2.8 (the
//! machine's own store; root; no daemon running), and a second store in a
//! private mount namespace with its own `/nix` (nix-interfaces.md §11).
//!
//! Needs root, `nix-daemon`, `nix-build`, `nix-store` and `unshare`. When they
//! are missing the tests fail with the reason (a skipped test would count as
//! a pass).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use nixq_common::daemon::stderr::ACTIVITY_BUILD;
use nixq_common::daemon::{
    BuildMode, BuildStatus, ClientSettings, Connector, DaemonClient, DaemonError, DerivedPath,
    LogEvent, OutputsSpec, ProtocolVersion, Trust,
};
use nixq_common::drv::Derivation;
use nixq_common::hash::NarHash;
use nixq_common::path_info::PathInfo;
use nixq_common::store_path::StorePath;

#[path = "support/local_nix.rs"]
mod local_nix;
use local_nix::{check, nix, store_path as path, NIX_CONFIG};

/// Derivations with `/bin/sh` builders using shell built-ins only (Nix sets
/// no useful PATH): `c` refers to `b`, `a` and itself, `b` to `a` and a
/// `builtins.toFile` source. `build` and `fail` are only instantiated.
const EXPR: &str = r#"
let
  sys = builtins.currentSystem;
  src = builtins.toFile "nixq-dt-src" "source text";
  a = derivation { name = "nixq-dt-a"; system = sys; builder = "/bin/sh";
                   args = [ "-c" "echo a > $out" ]; };
  b = derivation { name = "nixq-dt-b"; system = sys; builder = "/bin/sh";
                   args = [ "-c" "read s < ${src}; echo \"${a} $s\" > $out" ]; };
  c = derivation { name = "nixq-dt-c"; system = sys; builder = "/bin/sh";
                   args = [ "-c" "echo ${b} ${a} $out > $out" ]; };
in {
  inherit c;
  build = derivation { name = "nixq-dt-build"; system = sys; builder = "/bin/sh";
    args = [ "-c" "echo build-log-line; read x < ${a}; echo \"built $x\" > $out" ]; };
  fail = derivation { name = "nixq-dt-fail"; system = sys; builder = "/bin/sh";
    args = [ "-c" "echo about-to-fail; exit 3" ]; };
}
"#;

/// Fails (never skips) unless the machine can run these tests.
fn require_nix() {
    local_nix::require(
        "daemon tests",
        true,
        &[
            "nix-daemon",
            "nix-build",
            "nix-store",
            "nix-instantiate",
            "unshare",
        ],
    );
}

fn paths(text: &str) -> BTreeSet<StorePath> {
    text.lines().map(path).collect()
}

/// The fixture, built once per test process.
struct Fixture {
    c: StorePath,
    build_drv: StorePath,
    fail_drv: StorePath,
    closure: BTreeSet<StorePath>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let c = path(&nix("nix-build", &["--no-out-link", "-E", EXPR, "-A", "c"]));
        let drvs = nix(
            "nix-instantiate",
            &["-E", EXPR, "-A", "build", "-A", "fail"],
        );
        let mut drvs = drvs.lines().map(path);
        let (Some(build_drv), Some(fail_drv)) = (drvs.next(), drvs.next()) else {
            panic!("nix-instantiate gave fewer than two paths");
        };
        let closure = paths(&nix("nix-store", &["-qR", c.as_str()]));
        Fixture {
            c,
            build_drv,
            fail_drv,
            closure,
        }
    })
}

fn main_daemon() -> tokio::process::Command {
    let mut cmd = DaemonClient::stdio_command();
    cmd.env("NIX_CONFIG", NIX_CONFIG);
    cmd
}

async fn main_client(announce: ProtocolVersion) -> DaemonClient {
    Connector::new()
        .announce(announce)
        .spawn_stdio(main_daemon())
        .await
        .expect("handshake with nix-daemon --stdio")
}

/// SetOptions as §11 says: no build users, no sandbox, no substituters.
fn settings() -> ClientSettings {
    let mut settings = ClientSettings::default();
    for (k, v) in [
        ("build-users-group", ""),
        ("sandbox", "false"),
        ("substituters", ""),
    ] {
        settings.overrides.insert(k.to_owned(), v.to_owned());
    }
    settings
}

/// A second Nix store: a temporary directory bind-mounted on `/nix` in
/// private mount namespaces. The namespaces die with their processes; the
/// directory is removed on drop.
struct SecondStore {
    dir: tempfile::TempDir,
}

impl SecondStore {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nixq-second-store-")
            .tempdir()
            .expect("temp dir");
        for sub in ["nix/store", "nix/var/nix"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        let store = Self { dir };
        check(
            store
                .command(&["nix-store", "--init"])
                .output()
                .expect("run"),
            "nix-store --init",
        );
        store
    }

    fn nix_dir(&self) -> PathBuf {
        self.dir.path().join("nix")
    }

    /// `argv` inside a fresh private mount namespace with this store's `/nix`.
    fn command(&self, argv: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new("unshare");
        cmd.args([
            "-m",
            "sh",
            "-c",
            r#"mount --make-rprivate / && mount --bind "$0" /nix && exec "$@""#,
        ])
        .arg(self.nix_dir())
        .args(argv)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env_remove("NIX_REMOTE");
        cmd
    }

    fn run(&self, argv: &[&str]) -> String {
        check(
            self.command(argv).output().expect("run"),
            &format!("{argv:?} in the second store"),
        )
    }

    async fn client(&self, announce: ProtocolVersion) -> DaemonClient {
        let cmd = tokio::process::Command::from(self.command(&["nix-daemon", "--stdio"]));
        let mut client = Connector::new()
            .announce(announce)
            .spawn_stdio(cmd)
            .await
            .expect("handshake with the second store's daemon");
        client.set_options(&settings()).await.expect("SetOptions");
        client
    }
}

/// Collects build log lines and activity texts.
#[derive(Clone, Default)]
struct LogSink(Arc<Mutex<Vec<String>>>);

impl LogSink {
    fn attach(&self, client: &mut DaemonClient) {
        let lines = self.0.clone();
        client.on_log(move |event| {
            let text = match &event {
                LogEvent::Result(r) => r
                    .build_log_line()
                    .map(|l| format!("log: {}", String::from_utf8_lossy(l))),
                LogEvent::StartActivity(a) if a.kind == ACTIVITY_BUILD => {
                    Some(format!("start: {}", String::from_utf8_lossy(&a.text)))
                }
                _ => None,
            };
            if let (Some(text), Ok(mut lines)) = (text, lines.lock()) {
                lines.push(text);
            }
        });
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

#[tokio::test]
async fn handshake_negotiates_every_version() {
    require_nix();
    for minor in [21u8, 23, 26, 33, 34, 35, 38] {
        let mut client = main_client(ProtocolVersion::from_minor(minor)).await;
        // Nix 2.8 speaks 1.34 (§5.1).
        assert_eq!(
            client.version().minor(),
            minor.min(34),
            "announced 1.{minor}"
        );
        assert_eq!(
            client.daemon_nix_version(),
            (minor >= 33).then_some("2.8.0"),
            "announced 1.{minor}"
        );
        assert_eq!(client.trust(), Trust::Unknown);
        client.set_options(&settings()).await.expect("SetOptions");
        let c = &fixture().c;
        assert!(client.is_valid_path(c).await.expect("IsValidPath"));
        let valid = client
            .query_valid_paths(&BTreeSet::from([c.clone()]))
            .await
            .expect("QueryValidPaths");
        assert_eq!(valid, BTreeSet::from([c.clone()]));
        client.shutdown().await.expect("shutdown");
    }
    let err = Connector::new()
        .announce(ProtocolVersion::from_minor(20))
        .spawn_stdio(main_daemon())
        .await
        .expect_err("1.20 is too old for nixq");
    assert!(matches!(err, DaemonError::TooOld { .. }), "{err}");
    assert!(err.to_string().contains("1.21"), "{err}");
}

#[tokio::test]
async fn queries_and_nar_export_match_nix_store() {
    require_nix();
    let fx = fixture();
    for minor in [21u8, 34] {
        let mut client = main_client(ProtocolVersion::from_minor(minor)).await;
        let bogus = path("/nix/store/00000000000000000000000000000000-nixq-bogus");
        let asked = BTreeSet::from([fx.c.clone(), fx.build_drv.clone(), bogus.clone()]);
        let valid = client
            .query_valid_paths(&asked)
            .await
            .expect("QueryValidPaths");
        assert_eq!(valid, BTreeSet::from([fx.c.clone(), fx.build_drv.clone()]));
        assert_eq!(
            client.query_path_info(&bogus).await.expect("QueryPathInfo"),
            None
        );
        assert!(!client.is_valid_path(&bogus).await.expect("IsValidPath"));

        for p in &fx.closure {
            let info = client
                .query_path_info(p)
                .await
                .expect("QueryPathInfo")
                .expect("valid");
            let refs = paths(&nix("nix-store", &["-q", "--references", p.as_str()]));
            assert_eq!(info.references, refs, "{p}");
            let hash = nix("nix-store", &["-q", "--hash", p.as_str()]);
            assert_eq!(info.nar_hash.to_nix32_prefixed(), hash.trim(), "{p}");
            let deriver = nix("nix-store", &["-q", "--deriver", p.as_str()]);
            assert_eq!(
                info.deriver
                    .as_ref()
                    .map_or("unknown-deriver", StorePath::as_str),
                deriver.trim()
            );

            let mut nar = Vec::new();
            let size = client
                .nar_from_path(p, &mut nar)
                .await
                .expect("NarFromPath");
            let dump = std::process::Command::new("nix-store")
                .args(["--dump", p.as_str()])
                .output()
                .expect("nix-store --dump");
            assert!(dump.status.success());
            assert_eq!(
                nar, dump.stdout,
                "NarFromPath of {p} differs from nix-store --dump"
            );
            assert_eq!(size, info.nar_size);
            assert_eq!(NarHash::of(&nar), info.nar_hash);
        }
        // The connection is still in step after all that.
        assert!(client.is_valid_path(&fx.c).await.expect("IsValidPath"));

        let closure = client.query_closure([fx.c.clone()]).await.expect("closure");
        let got: BTreeSet<StorePath> = closure.iter().map(|i| i.path.clone()).collect();
        assert_eq!(got, fx.closure);
        assert_references_first(&closure);
        let err = client
            .query_closure([fx.c.clone(), bogus.clone()])
            .await
            .expect_err("bogus root");
        assert!(
            matches!(&err, DaemonError::PathNotValid { path, .. } if *path == bogus),
            "{err}"
        );
        assert!(client.is_usable());
        client.shutdown().await.expect("shutdown");
    }
}

fn assert_references_first(closure: &[PathInfo]) {
    let mut seen = BTreeSet::new();
    for info in closure {
        for r in &info.references {
            assert!(
                r == &info.path || seen.contains(r),
                "{} before {r}",
                info.path
            );
        }
        seen.insert(info.path.clone());
    }
}

/// Copy `closure` from `src` to `dst` path by path, streaming each NAR
/// through a small pipe (nothing is buffered whole).
async fn copy_closure(src: &mut DaemonClient, dst: &mut DaemonClient, closure: &[PathInfo]) {
    for info in closure {
        let (mut tx, mut rx) = tokio::io::duplex(4096);
        let export = async {
            let n = src.nar_from_path(&info.path, &mut tx).await;
            drop(tx);
            n
        };
        let import = dst.add_to_store_nar(info, &mut rx, false);
        let (exported, imported) = tokio::join!(export, import);
        assert_eq!(exported.expect("NarFromPath"), info.nar_size);
        imported.unwrap_or_else(|e| panic!("AddToStoreNar {}: {e}", info.path));
    }
}

/// The full input closure of a derivation (what Nix gives a hook as
/// `inputs`): outputs of its input derivations plus its sources, closed.
async fn input_closure(main: &mut DaemonClient, drv: &Derivation) -> BTreeSet<StorePath> {
    let mut roots: Vec<StorePath> = drv.input_srcs.iter().cloned().collect();
    for (input, names) in &drv.input_drvs {
        let text = std::fs::read(input.as_path()).expect("read input .drv");
        let input = Derivation::parse(&text).expect("parse input .drv");
        for name in names {
            roots.extend(input.outputs[name].path.clone());
        }
    }
    let closure = main.query_closure(roots).await.expect("input closure");
    closure.into_iter().map(|i| i.path).collect()
}

async fn closure_copy_build_and_errors(dst_version: ProtocolVersion) {
    require_nix();
    let fx = fixture();
    let mut main = main_client(ProtocolVersion::LATEST).await;
    let closure = main.query_closure([fx.c.clone()]).await.expect("closure");

    let second = SecondStore::new();
    let mut dst = second.client(dst_version).await;
    assert_eq!(
        dst.version(),
        dst_version.min(ProtocolVersion::from_minor(34))
    );

    // Wrong hash first: a typed error naming the mismatch, connection usable.
    let first = &closure[0];
    let mut nar = Vec::new();
    main.nar_from_path(&first.path, &mut nar)
        .await
        .expect("NarFromPath");
    let mut wrong = first.clone();
    wrong.nar_hash = NarHash::of(b"not this NAR");
    let err = dst
        .add_to_store_nar(&wrong, &mut nar.as_slice(), false)
        .await
        .expect_err("wrong hash must be refused");
    let message = err.nix_message().unwrap_or_default().to_owned();
    assert!(message.contains("hash mismatch"), "{err}");
    assert!(
        matches!(
            err,
            DaemonError::Nix {
                op: "AddToStoreNar",
                ..
            }
        ),
        "{err}"
    );
    assert!(dst.is_usable());
    assert!(!dst
        .is_valid_path(&first.path)
        .await
        .expect("IsValidPath after the error"));

    copy_closure(&mut main, &mut dst, &closure).await;

    let all: Vec<&str> = closure.iter().map(|i| i.path.as_str()).collect();
    let mut verify = vec!["nix-store", "--verify-path"];
    verify.extend(&all);
    second.run(&verify);
    for info in &closure {
        let refs = paths(&second.run(&["nix-store", "-q", "--references", info.path.as_str()]));
        assert_eq!(refs, info.references, "{}", info.path);
        let copied = dst
            .query_path_info(&info.path)
            .await
            .expect("QueryPathInfo")
            .expect("valid in the second store");
        assert_eq!(copied.nar_hash, info.nar_hash);
        assert_eq!(copied.deriver, info.deriver);
        assert_eq!(copied.ca, info.ca);
    }

    // BuildDerivation of a derivation whose .drv is not in the second store.
    let logs = LogSink::default();
    logs.attach(&mut dst);
    let text = std::fs::read(fx.build_drv.as_path()).expect("read .drv");
    let drv = Derivation::parse(&text).expect("parse .drv");
    let inputs = input_closure(&mut main, &drv).await;
    let mut missing = inputs.clone();
    missing.retain(|p| !closure.iter().any(|i| &i.path == p));
    assert!(missing.is_empty(), "inputs not copied: {missing:?}");
    let result = dst
        .build_derivation(&fx.build_drv, &drv.to_basic(&inputs), BuildMode::Normal)
        .await
        .expect("BuildDerivation");
    assert_eq!(result.status, BuildStatus::Built, "{}", result.error_msg);
    let out = drv.outputs["out"].path.clone().expect("output path");
    if dst.version().minor() >= 28 {
        assert_eq!(result.built_outputs.get("out"), Some(&out));
    }
    if dst.version().minor() >= 29 {
        assert!(result.start_time > 0 && result.stop_time >= result.start_time);
    }
    assert!(dst.is_valid_path(&out).await.expect("IsValidPath"));
    let lines = logs.lines();
    assert!(
        lines.contains(&"log: build-log-line".to_owned()),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("start: building")),
        "{lines:?}"
    );

    // A failing builder is a PermanentFailure with the log tail.
    let text = std::fs::read(fx.fail_drv.as_path()).expect("read .drv");
    let fail = Derivation::parse(&text).expect("parse .drv");
    let result = dst
        .build_derivation(
            &fx.fail_drv,
            &fail.to_basic(&BTreeSet::new()),
            BuildMode::Normal,
        )
        .await
        .expect("BuildDerivation answers with a result");
    assert_eq!(result.status, BuildStatus::PermanentFailure);
    assert!(
        result.error_msg.contains("exit code 3"),
        "{}",
        result.error_msg
    );
    assert!(logs.lines().contains(&"log: about-to-fail".to_owned()));

    // GC safety for the agent.
    dst.add_temp_root(&out).await.expect("AddTempRoot");
    dst.shutdown().await.expect("shutdown");
    main.shutdown().await.expect("shutdown");
    drop(second);
}

#[tokio::test]
async fn closure_copy_framed_at_1_34() {
    closure_copy_build_and_errors(ProtocolVersion::from_minor(34)).await;
}

#[tokio::test]
async fn closure_copy_pulled_with_stderr_read_at_1_21() {
    closure_copy_build_and_errors(ProtocolVersion::from_minor(21)).await;
}

#[tokio::test]
async fn closure_copy_framed_at_1_23() {
    closure_copy_build_and_errors(ProtocolVersion::from_minor(23)).await;
}

#[tokio::test]
async fn build_paths_with_results_and_fallback() {
    require_nix();
    let fx = fixture();
    for minor in [34u8, 33] {
        // A fresh store per version, so the derivation really builds.
        let second = SecondStore::new();
        let mut main = main_client(ProtocolVersion::LATEST).await;
        let mut dst = second.client(ProtocolVersion::from_minor(minor)).await;
        // The .drv closure goes over, so BuildPaths can find it.
        let drv_closure = main
            .query_closure([fx.build_drv.clone()])
            .await
            .expect("closure");
        copy_closure(&mut main, &mut dst, &drv_closure).await;
        let text = std::fs::read(fx.build_drv.as_path()).expect("read .drv");
        let drv = Derivation::parse(&text).expect("parse");
        let out = drv.outputs["out"].path.clone().expect("output path");
        let input_outs: Vec<StorePath> = input_closure(&mut main, &drv).await.into_iter().collect();
        let input_infos = main.query_closure(input_outs).await.expect("closure");
        copy_closure(&mut main, &mut dst, &input_infos).await;

        let target = [DerivedPath::Built {
            drv: fx.build_drv.clone(),
            outputs: OutputsSpec::All,
        }];
        let missing = dst.query_missing(&target).await.expect("QueryMissing");
        assert!(missing.will_build.contains(&fx.build_drv), "{missing:?}");
        let results = dst
            .build_paths_with_results(&target, BuildMode::Normal)
            .await
            .expect("build");
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].1.status, BuildStatus::Built, "1.{minor}");
        assert!(dst.is_valid_path(&out).await.expect("IsValidPath"));
        if minor >= 34 {
            let again = dst
                .build_paths_with_results(&target, BuildMode::Normal)
                .await
                .expect("build again");
            assert_eq!(again[0].1.status, BuildStatus::AlreadyValid);
        }
        // A failure through BuildPaths is a typed Nix error.
        let fail = [DerivedPath::Built {
            drv: fx.fail_drv.clone(),
            outputs: OutputsSpec::Names(BTreeSet::from(["out".to_owned()])),
        }];
        let fail_closure = main
            .query_closure([fx.fail_drv.clone()])
            .await
            .expect("closure");
        copy_closure(&mut main, &mut dst, &fail_closure).await;
        if minor >= 34 {
            let results = dst
                .build_paths_with_results(&fail, BuildMode::Normal)
                .await
                .expect("results");
            assert_eq!(results[0].1.status, BuildStatus::PermanentFailure);
        } else {
            let err = dst
                .build_paths(&fail, BuildMode::Normal)
                .await
                .expect_err("fails");
            assert!(
                matches!(
                    err,
                    DaemonError::Nix {
                        op: "BuildPaths",
                        ..
                    }
                ),
                "{err}"
            );
        }
        assert!(dst.is_usable());
        dst.shutdown().await.expect("shutdown");
        main.shutdown().await.expect("shutdown");
    }
}
