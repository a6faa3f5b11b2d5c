//! The agent's access to its local Nix: how to open a daemon connection
//! (the socket, or a private `nix-daemon --stdio` child, §5), and the
//! per-master-connection daemon connection that holds that master's
//! temporary GC roots.
//!
//! Temporary roots live exactly as long as the daemon connection that added
//! them (nix-interfaces.md §8, `temproots/<pid>`), so each master connection
//! gets its own daemon connection, kept until the master goes away: paths
//! answered `Valid`, uploaded, or built for it cannot be collected while its
//! job runs.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use nixq_common::daemon::{Connector, DaemonClient, DaemonError};
use nixq_common::path_info::PathInfo;
use nixq_common::store_path::{StoreDir, StorePath};
use tokio::process::Command;

use crate::config::StoreAccess;

/// How to open daemon connections, decided once at startup.
#[derive(Debug, Clone)]
pub struct Daemon {
    connector: Connector,
    route: Route,
}

#[derive(Debug, Clone)]
enum Route {
    Socket(std::path::PathBuf),
    /// The program to run as `PROGRAM --stdio`.
    Stdio(String),
}

impl Daemon {
    /// The socket when it exists and stdio is not forced; else a private
    /// `nix-daemon --stdio` child per connection (root only).
    pub fn new(access: &StoreAccess, store_dir: StoreDir) -> Self {
        let route = if !access.force_stdio && access.daemon_socket.exists() {
            Route::Socket(access.daemon_socket.clone())
        } else {
            Route::Stdio(access.nix_daemon.clone())
        };
        Self {
            connector: Connector::new().store_dir(store_dir),
            route,
        }
    }

    /// How connections are made, for the startup log.
    pub fn describe(&self) -> String {
        match &self.route {
            Route::Socket(path) => format!("daemon socket {}", path.display()),
            Route::Stdio(program) => format!("private `{program} --stdio`"),
        }
    }

    /// A new daemon connection.
    pub async fn connect(&self) -> Result<DaemonClient, DaemonError> {
        match &self.route {
            Route::Socket(path) => self.connector.connect_socket(path).await,
            Route::Stdio(program) => {
                let mut cmd = Command::new(program);
                cmd.arg("--stdio");
                // The child's own messages go to the agent's log via stderr.
                self.connector.spawn_stdio(cmd).await
            }
        }
    }
}

impl Daemon {
    /// A daemon connection for one build, which [`BuildConn::stop`] can end
    /// at any moment with the build stopped and its builder dead.
    ///
    /// For a private `nix-daemon --stdio` the child is spawned here rather
    /// than by the [`Connector`], so that its pid is known: closing its
    /// stdin alone leaves it building until it next talks to us, and
    /// `SIGKILL` would orphan the builder (Nix puts the builder in its own
    /// session, so no process-group kill reaches it). `SIGTERM` makes Nix
    /// interrupt the build and kill the builder itself before it exits.
    pub async fn connect_build(&self) -> Result<BuildConn, DaemonError> {
        let Route::Stdio(program) = &self.route else {
            // Closing a socket connection interrupts the daemon's worker
            // at once (it watches the socket for a hang-up).
            return Ok(BuildConn {
                client: self.connect().await?,
                child: None,
            });
        };
        let mut cmd = Command::new(program);
        cmd.arg("--stdio")
            .env_remove("NIX_REMOTE")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            // A backstop for a runtime torn down mid-build.
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| DaemonError::Spawn {
            command: format!("{program} --stdio"),
            source,
        })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(DaemonError::Protocol {
                op: "handshake",
                reason: "the child's stdin and stdout were not piped".to_owned(),
            });
        };
        let client = self.connector.handshake(stdout, stdin).await?;
        Ok(BuildConn {
            client,
            child: Some(child),
        })
    }
}

/// How long a build's private daemon may take to stop its build and exit
/// after `SIGTERM` before it is killed: Nix kills the builder and exits
/// within milliseconds; a builder stuck in uninterruptible I/O may take
/// longer, and killing the daemon would orphan it.
const BUILD_DAEMON_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The daemon connection of one build; see [`Daemon::connect_build`].
#[derive(Debug)]
pub struct BuildConn {
    pub client: DaemonClient,
    child: Option<tokio::process::Child>,
}

impl BuildConn {
    /// Ends the connection. With `interrupt`, a build still running is
    /// stopped and its builder killed before this returns (bounded by
    /// [`BUILD_DAEMON_GRACE`]).
    pub async fn stop(self, interrupt: bool) {
        let Self { client, child } = self;
        // Closes our end: a socket daemon's worker interrupts the build; a
        // child daemon sees the end of its input.
        drop(client);
        let Some(mut child) = child else {
            return;
        };
        if interrupt {
            if let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
                // SAFETY: kill(2) on our own child, which has not been
                // reaped (its pid cannot have been reused).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        match tokio::time::timeout(BUILD_DAEMON_GRACE, child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(%e, "waiting for the build's daemon"),
            Err(_) => {
                tracing::warn!(
                    "the build's daemon did not exit within {BUILD_DAEMON_GRACE:?}; killing it"
                );
                if let Err(e) = child.kill().await {
                    tracing::debug!(%e, "killing the build's daemon");
                }
            }
        }
    }
}

/// What a master connection knows about a path on this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Temp-rooted on this connection's daemon connection, not valid (yet).
    Rooted,
    /// Valid and temp-rooted: it stays valid while this connection lives.
    Valid,
}

/// The daemon connection of one master connection, opened lazily, and the
/// paths it keeps alive.
#[derive(Debug)]
pub struct ConnStore {
    daemon: Arc<Daemon>,
    client: tokio::sync::Mutex<Option<DaemonClient>>,
    known: Mutex<HashMap<StorePath, Known>>,
}

impl ConnStore {
    pub fn new(daemon: Arc<Daemon>) -> Self {
        Self {
            daemon,
            client: tokio::sync::Mutex::new(None),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The connection, opened (or reopened after a failure) on demand. A
    /// reopened connection has lost the old one's temp roots, so they are
    /// forgotten and re-added as paths are used again.
    async fn client(&self) -> Result<tokio::sync::MappedMutexGuard<'_, DaemonClient>, DaemonError> {
        let mut guard = self.client.lock().await;
        if !guard.as_ref().is_some_and(DaemonClient::is_usable) {
            if guard.is_some() {
                tracing::warn!("daemon connection lost; its temporary roots are re-added on use");
                self.known().clear();
            }
            *guard = Some(self.daemon.connect().await?);
        }
        Ok(tokio::sync::MutexGuard::map(guard, |c| {
            c.as_mut().unwrap_or_else(|| unreachable!("set just above"))
        }))
    }

    fn known(&self) -> MutexGuard<'_, HashMap<StorePath, Known>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this connection has seen `path` valid (and so keeps it alive).
    pub fn is_known_valid(&self, path: &StorePath) -> bool {
        self.known().get(path) == Some(&Known::Valid)
    }

    /// Records that `path` became valid through this connection (an upload,
    /// a build); it must be rooted already.
    pub fn mark_valid(&self, path: &StorePath) {
        self.known().insert(path.clone(), Known::Valid);
    }

    /// The valid paths among `paths`. Every path of `paths` becomes a temp
    /// root of this connection first, valid or not, and only then is
    /// validity asked (the order Nix itself uses, §8): a path found valid
    /// cannot be collected between the answer and its root. Roots of paths
    /// that are missing are needed anyway by the uploads that follow.
    pub async fn valid_and_root(
        &self,
        paths: &[StorePath],
    ) -> Result<BTreeSet<StorePath>, DaemonError> {
        let started = std::time::Instant::now();
        self.root(paths).await?;
        let rooted = started.elapsed();
        let set: BTreeSet<StorePath> = paths.iter().cloned().collect();
        let valid = self.client().await?.query_valid_paths(&set).await?;
        tracing::debug!(
            paths = paths.len(),
            valid = valid.len(),
            ?rooted,
            elapsed = ?started.elapsed(),
            "validity queried"
        );
        let mut known = self.known();
        for path in &valid {
            known.insert(path.clone(), Known::Valid);
        }
        Ok(valid)
    }

    /// Whether `path` is valid now (asks the daemon).
    pub async fn is_valid(&self, path: &StorePath) -> Result<bool, DaemonError> {
        if self.is_known_valid(path) {
            return Ok(true);
        }
        self.client().await?.is_valid_path(path).await
    }

    /// Makes `paths` temp roots of this connection (valid or not yet: a
    /// path about to be restored must be safe from the collector too). The
    /// AddTempRoot requests are pipelined: thousands of paths cost a few
    /// round trips, not one each.
    pub async fn root(&self, paths: &[StorePath]) -> Result<(), DaemonError> {
        let todo: Vec<StorePath> = {
            let known = self.known();
            paths
                .iter()
                .filter(|p| !known.contains_key(*p))
                .cloned()
                .collect()
        };
        if todo.is_empty() {
            return Ok(());
        }
        self.client().await?.add_temp_roots(&todo).await?;
        let mut known = self.known();
        for path in todo {
            known.entry(path).or_insert(Known::Rooted);
        }
        Ok(())
    }

    /// Path infos of `paths` in order (`None` = not valid).
    pub async fn path_infos(
        &self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<PathInfo>>, DaemonError> {
        self.client().await?.query_path_infos(paths).await
    }

    /// The closure of `roots`, references first.
    pub async fn closure(&self, roots: &[StorePath]) -> Result<Vec<PathInfo>, DaemonError> {
        self.client()
            .await?
            .query_closure(roots.iter().cloned())
            .await
    }

    /// Closes the daemon connection (the roots go with it).
    pub async fn close(&self) {
        if let Some(client) = self.client.lock().await.take() {
            if let Err(e) = client.shutdown().await {
                tracing::debug!(%e, "closing the daemon connection");
            }
        }
    }
}

/// Whether the store directory can be written by this process: the agent
/// restores NARs into it directly.
pub fn check_writable(store_dir: &Path) -> Result<(), String> {
    crate::load::writable(store_dir).map_err(|e| {
        format!(
            "the store directory {} is not writable by this process ({e}); nixq-agent restores \
             paths straight into the store and must run as root over a local, writable store",
            store_dir.display()
        )
    })
}
