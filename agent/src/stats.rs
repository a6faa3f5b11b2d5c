//! The agent's counters (proto [`Counters`]), updated lock-free by every
//! connection and read by Status and Hello.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nixq_common::proto::Counters;

/// Totals since the agent started; see [`Counters`] for their meaning.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub paths_received: AtomicU64,
    pub nar_bytes_received: AtomicU64,
    pub paths_received_already_valid: AtomicU64,
    pub uploads_rejected: AtomicU64,
    pub claim_waits: AtomicU64,
    pub paths_sent: AtomicU64,
    pub nar_bytes_sent: AtomicU64,
    pub builds_started: AtomicU64,
    pub builds_succeeded: AtomicU64,
    pub builds_failed: AtomicU64,
    pub running_builds: AtomicU32,
    pub peak_running_builds: AtomicU32,
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    pub fn snapshot(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            connections: get(&self.connections),
            paths_received: get(&self.paths_received),
            nar_bytes_received: get(&self.nar_bytes_received),
            paths_received_already_valid: get(&self.paths_received_already_valid),
            uploads_rejected: get(&self.uploads_rejected),
            claim_waits: get(&self.claim_waits),
            paths_sent: get(&self.paths_sent),
            nar_bytes_sent: get(&self.nar_bytes_sent),
            builds_started: get(&self.builds_started),
            builds_succeeded: get(&self.builds_succeeded),
            builds_failed: get(&self.builds_failed),
            peak_running_builds: self.peak_running_builds.load(Ordering::Relaxed),
        }
    }

    /// A build starts: count it and keep the peak.
    pub fn build_started(&self) {
        bump(&self.builds_started);
        let now = self.running_builds.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_running_builds.fetch_max(now, Ordering::Relaxed);
    }

    /// A build ended, successfully or not.
    pub fn build_ended(&self, succeeded: bool) {
        self.running_builds.fetch_sub(1, Ordering::Relaxed);
        bump(if succeeded {
            &self.builds_succeeded
        } else {
            &self.builds_failed
        });
    }

    pub fn running_builds(&self) -> u32 {
        self.running_builds.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_tracks_the_maximum() {
        let stats = Stats::default();
        stats.build_started();
        stats.build_started();
        stats.build_ended(true);
        stats.build_started();
        stats.build_ended(false);
        stats.build_ended(true);
        let c = stats.snapshot();
        assert_eq!(
            (c.builds_started, c.builds_succeeded, c.builds_failed),
            (3, 2, 1)
        );
        assert_eq!(c.peak_running_builds, 2);
        assert_eq!(stats.running_builds(), 0);
    }
}
