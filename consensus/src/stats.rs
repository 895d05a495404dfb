//! What one node's Raft has done, counted where it happens and read by the agent's metrics.
//! Nothing here feeds a decision: the counters and histograms are written and never read back
//! by consensus itself.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Buckets for disk and commit latencies: 100 µs to about 6.5 s.
pub fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Counters and histograms of one node's Raft log, state machine and proposals.
#[derive(Debug)]
pub struct RaftStats {
    /// Seconds each synced write or WAL flush of the log took.
    pub fsync: Histogram,
    /// Seconds each snapshot took to build.
    pub snapshot_build: Histogram,
    /// Seconds each snapshot received from the leader took to install.
    pub snapshot_install: Histogram,
    /// Seconds from a proposal reaching the leader to its answer (commit and apply).
    pub commit: Histogram,
    /// The stages of `commit`, on the leader: seconds a write waited for a slot before it
    /// was proposed (0 when one was free).
    pub queued: Histogram,
    /// Writes carried by each proposed log entry.
    pub batch_writes: Histogram,
    /// Seconds from proposing one entry to its answer: appending and syncing it on the
    /// leader, replication to a quorum, commit and apply.
    pub entry: Histogram,
    /// Seconds an apply waited for this node's own log to be on disk up to what it applies.
    pub apply_wait: Histogram,
    /// Seconds the state machine took to apply one group of entries.
    pub apply: Histogram,
    /// On a leader, seconds from sending an append that carries entries to a follower to
    /// reading its answer.
    pub append_sent: Histogram,
    /// On a follower, seconds from a leader's append with entries being decoded to its answer
    /// being ready. `append_sent` less this is what the network and both transports took.
    pub append_served: Histogram,
    /// Proposals the leader is working on.
    pub pending: Gauge,
    /// Proposals that ended without being committed (lost leadership, Raft stopping).
    pub failed: Counter,
    committed: AtomicU64,
    /// When an append from a leader last reached this node.
    contact: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Default for RaftStats {
    fn default() -> Self {
        RaftStats {
            fsync: latency_buckets(),
            snapshot_build: latency_buckets(),
            snapshot_install: latency_buckets(),
            commit: latency_buckets(),
            queued: latency_buckets(),
            batch_writes: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            entry: latency_buckets(),
            apply_wait: latency_buckets(),
            apply: latency_buckets(),
            append_sent: latency_buckets(),
            append_served: latency_buckets(),
            pending: Gauge::default(),
            failed: Counter::default(),
            committed: AtomicU64::new(0),
            contact: Default::default(),
        }
    }
}

impl RaftStats {
    /// Records the commit index the log store was told of.
    pub fn committed_to(&self, index: u64) {
        self.committed.fetch_max(index, Ordering::Relaxed);
    }

    /// Records that an append from a leader reached this node at `now`.
    pub fn heard_from_leader(&self, now: tokio::time::Instant) {
        *self.contact.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
    }

    /// When an append from a leader last reached this node.
    pub fn last_leader_contact(&self) -> Option<tokio::time::Instant> {
        *self.contact.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The highest commit index the log store was told of.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }
}
