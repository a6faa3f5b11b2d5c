//! `nixq-agent`: parse, set up logging, resolve the configuration, run the
//! server until SIGTERM/SIGINT, exit 0 after a clean shutdown.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use nixq_agent::cli::Cli;
use nixq_agent::server::{self, Shared};
use nixq_agent::{local_nix, store};
use nixq_common::store_path::StoreDir;
use tokio::signal::unix::{signal, SignalKind};

/// How long blocking work (restores being cleaned up, registrations) may
/// take to finish after the server stopped.
const RUNTIME_DRAIN: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse();
    nixq_common::telemetry::init(cli.log_format, cli.log_directive());
    raise_fd_limit();
    nixq_common::alloc::limit_malloc_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    runtime.shutdown_timeout(RUNTIME_DRAIN);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config()?;
    let store_dir = StoreDir::new(config.store.store_dir.clone())
        .map_err(|e| anyhow::anyhow!("store_dir: {e}"))?;
    store::check_writable(std::path::Path::new(store_dir.as_str())).map_err(anyhow::Error::msg)?;
    let platform = match (&config.systems, &config.features) {
        (Some(systems), Some(features)) => local_nix::Platform {
            systems: systems.clone(),
            features: features.clone(),
        },
        _ => {
            let local = local_nix::query().await.map_err(anyhow::Error::msg)?;
            local_nix::Platform {
                systems: config.systems.clone().unwrap_or(local.systems),
                features: config.features.clone().unwrap_or(local.features),
            }
        }
    };
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared::new(config, store_dir, platform, shutdown_rx));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        let _ = shutdown_tx.send(true);
    });
    server::run(shared).await
}

/// The error and its causes, `: `-separated, skipping a cause whose text
/// its parent already includes (thiserror messages often embed their
/// source).
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if !text.contains(&message) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&message);
        }
    }
    text
}

/// Raises the soft limit on open files to the hard limit: every path being
/// imported holds its lock file open until registered.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, writable rlimit struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
