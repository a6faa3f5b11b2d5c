//! The progress of a copy: an indicatif bar on a terminal (paths and bytes
//! done of total, throughput, ETA), nothing otherwise. Cheap to clone; every
//! method is a no-op without a bar.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Redraws per second: smooth enough, and the bar costs nothing measurable.
const REFRESH_HZ: u8 = 10;

#[derive(Debug, Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    paths_done: Arc<AtomicU64>,
    paths_total: Arc<AtomicU64>,
}

impl Progress {
    /// A bar when `wanted` and stderr is a terminal.
    pub fn new(wanted: bool) -> Self {
        let bar = (wanted && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(
                Some(0),
                ProgressDrawTarget::stderr_with_hz(REFRESH_HZ),
            );
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(1000 / u64::from(REFRESH_HZ)));
            bar
        });
        Self {
            bar,
            paths_done: Arc::new(AtomicU64::new(0)),
            paths_total: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A progress that shows nothing.
    pub fn hidden() -> Self {
        Self::new(false)
    }

    pub fn set_prefix(&self, prefix: &str) {
        if let Some(bar) = &self.bar {
            bar.set_prefix(prefix.to_owned());
        }
    }

    /// More work: `paths` paths of `bytes` NAR bytes.
    pub fn add_work(&self, paths: u64, bytes: u64) {
        self.paths_total.fetch_add(paths, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc_length(bytes);
            self.show_paths(bar);
        }
    }

    /// NAR bytes moved.
    pub fn bytes(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    /// One path is done (stored or found present).
    pub fn path_done(&self) {
        self.paths_done.fetch_add(1, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            self.show_paths(bar);
        }
    }

    fn show_paths(&self, bar: &ProgressBar) {
        let done = self.paths_done.load(Ordering::Relaxed);
        let total = self.paths_total.load(Ordering::Relaxed);
        bar.set_message(format!("{done}/{total} paths"));
    }

    /// Prints a line above the bar (or to stderr without one).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
