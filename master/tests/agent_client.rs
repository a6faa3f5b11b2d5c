//! The master's agent client against a minimal agent written here, over
//! real QUIC and mutual TLS on 127.0.0.1: Hello, QueryMissing with batches,
//! Upload with the real send half (plain and zstd), an upload the agent
//! cuts short, and the classification of an unreachable agent.
//!
//! The fake agent checks every NAR's hash and size like the real one, but
//! stores nothing; the real agent is exercised by the end-to-end tests.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixq_certs::{Ca, Validity};
use nixq_common::hash::{NarHash, NarHasher};
use nixq_common::machines::{AgentCa, MachineUri};
use nixq_common::nar::dump_path;
use nixq_common::net;
use nixq_common::path_info::PathInfo;
use nixq_common::proto::{
    self, AgentStatus, Compression, HelloReply, PathBatch, PathState, QueryMissingReply, Request,
    UploadItem, UploadOutcome, UploadReply, Welcome,
};
use nixq_common::store_path::StorePath;
use nixq_common::tls::{self, Identity, TrustedCa};
use nixq_common::transfer::receive::BodyReader;
use nixq_common::transfer::send::SendOptions;
use nixq_master::agent_client::{AgentClient, AgentTarget, ClientError};

const TIMEOUT: Duration = Duration::from_secs(10);

struct Setup {
    dir: tempfile::TempDir,
    ca_file: PathBuf,
    master: PathBuf,
    agent: Identity,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let validity = Validity::days_from_now(2).expect("validity");
    let ca = Ca::generate("test-ca", validity).expect("ca");
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.cert_pem()).expect("write ca");
    let master_leaf = ca.issue_master("master", validity).expect("master");
    let master = dir.path().join("master.pem");
    std::fs::write(&master, master_leaf.combined_pem()).expect("write master");
    let ip = Ipv4Addr::LOCALHOST.into();
    let agent_leaf = ca
        .issue_agent("agent", &["localhost".to_owned()], &[ip], validity)
        .expect("agent");
    let agent = Identity::from_pem(
        agent_leaf.cert_pem.as_bytes(),
        agent_leaf.key_pem.as_bytes(),
        "agent",
    )
    .expect("agent identity");
    Setup {
        dir,
        ca_file,
        master,
        agent,
    }
}

/// The minimal agent: serves one connection until the master closes it.
/// Every path whose name starts with `have-` is valid; uploads are checked
/// and counted.
fn start_agent(setup: Setup) -> (SocketAddr, tempfile::TempDir, PathBuf, PathBuf) {
    let ca = TrustedCa::load(&setup.ca_file).expect("ca");
    let config = tls::server_config(&ca, setup.agent).expect("server config");
    let endpoint =
        net::server_endpoint("127.0.0.1:0".parse().expect("addr"), config).expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    tokio::spawn(async move {
        let Some(incoming) = endpoint.accept().await else {
            return;
        };
        let Ok(conn) = net::accept(incoming, TIMEOUT).await else {
            return;
        };
        while let Ok((send, recv)) = conn.accept_bi().await {
            tokio::spawn(serve(send, recv));
        }
    });
    (addr, setup.dir, setup.ca_file, setup.master)
}

async fn serve(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let Ok(Some(request)) = proto::read_frame::<Request, _>(&mut recv).await else {
        return;
    };
    match request {
        Request::Hello(hello) => {
            let version = proto::negotiate(&hello).expect("version");
            let welcome = Welcome {
                version,
                agent_version: "fake-agent".into(),
                store_dir: "/nix/store".into(),
                systems: vec!["x86_64-linux".into()],
                features: vec![],
                status: AgentStatus::default(),
            };
            proto::write_frame(&mut send, &HelloReply::Welcome(Box::new(welcome)))
                .await
                .expect("welcome");
        }
        Request::QueryMissing(_) => loop {
            let batch: PathBatch = proto::read_frame(&mut recv)
                .await
                .expect("batch")
                .expect("a batch");
            let states = batch
                .paths
                .iter()
                .map(|p| {
                    if p.name().starts_with("have-") {
                        PathState::Valid
                    } else {
                        PathState::Missing
                    }
                })
                .collect();
            proto::write_frame(&mut send, &QueryMissingReply::States(states))
                .await
                .expect("states");
            if batch.last {
                break;
            }
        },
        Request::Upload(upload) => {
            let mut body = BodyReader::new(recv, upload.compression);
            let mut index = 0;
            while let Some(UploadItem::Path(info)) =
                body.read_item::<UploadItem>().await.expect("item")
            {
                let mut hasher = NarHasher::new();
                let mut left = info.nar_size;
                while left > 0 {
                    let chunk = body.next_chunk(left).await.expect("nar");
                    left -= chunk.len() as u64;
                    hasher.update(&chunk);
                }
                let (got, _) = hasher.finish();
                let outcome = if got == info.nar_hash {
                    UploadOutcome::Stored
                } else {
                    UploadOutcome::HashMismatch {
                        expected: info.nar_hash,
                        got,
                    }
                };
                let failed = !outcome.continues();
                proto::write_frame(&mut send, &UploadReply::Result { index, outcome })
                    .await
                    .expect("result");
                index += 1;
                if failed {
                    break;
                }
            }
            proto::write_frame(&mut send, &UploadReply::Done)
                .await
                .expect("done");
        }
        other => panic!("the fake agent does not serve {}", other.kind()),
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

fn target(addr: SocketAddr, ca_file: &Path, master: &Path) -> AgentTarget {
    AgentTarget {
        uri: MachineUri::parse(&format!("nixq://127.0.0.1:{}", addr.port())).expect("uri"),
        identity: master.to_path_buf(),
        ca: AgentCa::File(ca_file.to_path_buf()),
        connect_timeout: TIMEOUT,
    }
}

/// Writes `count` small files and one larger one as store paths under
/// `root`, and returns their infos.
fn make_paths(root: &Path, count: usize) -> Vec<PathInfo> {
    let store = root.join("nix/store");
    std::fs::create_dir_all(&store).expect("store");
    (0..=count)
        .map(|i| {
            let path = StorePath::parse_any(&format!("/nix/store/{i:032}-p{i}")).expect("path");
            let file = store.join(path.base_name());
            let contents: Vec<u8> = if i == count {
                (0..3_000_000u32).map(|n| (n % 251) as u8).collect()
            } else {
                format!("file {i}\n").into_bytes()
            };
            std::fs::write(&file, contents).expect("write");
            let mut nar = Vec::new();
            dump_path(&file, &mut nar).expect("dump");
            PathInfo {
                path,
                deriver: None,
                nar_hash: NarHash::of(&nar),
                nar_size: nar.len() as u64,
                references: BTreeSet::new(),
                registration_time: 0,
                ultimate: false,
                sigs: Vec::new(),
                ca: None,
            }
        })
        .collect()
}

#[tokio::test]
async fn hello_query_missing_and_uploads() {
    let (addr, dir, ca_file, master) = start_agent(setup());
    let client = AgentClient::connect(&target(addr, &ca_file, &master), "test")
        .await
        .expect("connected");
    assert_eq!(client.welcome().agent_version, "fake-agent");

    // More paths than one batch holds.
    let have =
        StorePath::parse_any(&format!("/nix/store/{}-have-it", "1".repeat(32))).expect("path");
    let mut query: Vec<StorePath> = (0..proto::MAX_BATCH_PATHS + 10)
        .map(|i| StorePath::parse_any(&format!("/nix/store/{i:032}-x")).expect("path"))
        .collect();
    query.insert(5, have);
    let states = client.query_missing(&query, true).await.expect("states");
    assert_eq!(states.len(), query.len());
    assert_eq!(states[5], PathState::Valid);
    assert_eq!(states[0], PathState::Missing);
    assert_eq!(
        client.query_missing(&[], true).await.expect("empty"),
        Vec::new()
    );

    let infos = make_paths(dir.path(), 300);
    for compression in [Compression::None, Compression::Zstd { level: 3 }] {
        let options = SendOptions {
            compression,
            store_root: Some(dir.path().to_path_buf()),
            verify_hash: false,
        };
        let result = client
            .upload(infos.clone(), &options, |_| {})
            .await
            .expect("uploaded");
        assert_eq!(result.interrupted, None);
        assert_eq!(result.outcomes.len(), infos.len());
        assert!(result.outcomes.iter().all(|o| *o == UploadOutcome::Stored));
    }

    // A path info whose hash is wrong for what is on disk: the agent finds
    // out (bodies are not hashed by default when sent), and nothing of it
    // is stored ...
    let mut corrupt = infos[..2].to_vec();
    let mut bad = infos[2].clone();
    bad.path =
        StorePath::parse_any(&format!("/nix/store/{}-corrupt", "c".repeat(32))).expect("path");
    std::fs::copy(
        dir.path()
            .join(infos[2].path.as_str().trim_start_matches('/')),
        dir.path().join(bad.path.as_str().trim_start_matches('/')),
    )
    .expect("copy");
    bad.nar_hash = NarHash::of(b"not it");
    corrupt.push(bad);
    let mut options = SendOptions {
        compression: Compression::None,
        store_root: Some(dir.path().to_path_buf()),
        verify_hash: false,
    };
    let result = client
        .upload(corrupt.clone(), &options, |_| {})
        .await
        .expect("upload ran");
    assert!(
        matches!(
            result.outcomes.last(),
            Some(UploadOutcome::HashMismatch { .. })
        ),
        "{:?}",
        result.outcomes
    );
    let states = client
        .query_missing(&[corrupt[2].path.clone()], false)
        .await
        .expect("queried");
    assert_eq!(states, vec![PathState::Missing]);
    // ... and a sender that hashes as it sends catches it as a corrupt local
    // store before the agent sees the NAR.
    options.verify_hash = true;
    let err = client
        .upload(corrupt, &options, |_| {})
        .await
        .expect_err("corrupt");
    match &err {
        ClientError::Send(e) => assert!(e.is_local_corruption(), "{err}"),
        other => panic!("expected a send error, got {other}"),
    }

    // The connection is still usable after a reset stream.
    let result = client
        .upload(infos[..3].to_vec(), &options, |_| {})
        .await
        .expect("uploaded after the reset");
    assert_eq!(result.outcomes.len(), 3);
    client.close().await;
}

#[tokio::test]
async fn unreachable_agent_is_classified() {
    let setup = setup();
    // A UDP port with nobody behind it.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    drop(socket);
    let mut target = target(addr, &setup.ca_file, &setup.master);
    target.connect_timeout = Duration::from_millis(300);
    let err = AgentClient::connect(&target, "test")
        .await
        .expect_err("nobody there");
    assert!(err.is_unreachable(), "{err}");
    assert!(!err.is_tls_refusal(), "{err}");
}
