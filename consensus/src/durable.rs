//! Which part of the Raft log is on this node's disk.
//!
//! A leader writes the entries it proposes without waiting for the disk and syncs them in the
//! background, so its own fsync overlaps the followers' instead of preceding them (the Raft
//! thesis, §10.2.1). openraft 0.9 counts the leader's copy towards the commit quorum as soon as
//! the log store reports it flushed, so three rules keep every entry that is applied anywhere,
//! or acknowledged to a client, on the disks of a majority:
//!
//! 1. the state machine applies an entry only once it is on this node's disk ([`Durability::wait`]);
//! 2. the commit index a node sends to others is clamped to what is on its own disk
//!    ([`Durability::clamp`]), so no follower applies an entry its leader could still lose;
//! 3. a node answers an append only once what its answer acknowledges is on its disk.
//!
//! Everything else (a follower's appends, votes, truncation, purge) is written synced, and a
//! synced write covers every write before it, since they share one write-ahead log, in order.
//! A store that cannot sync records the failure; waiters then get an error, which stops Raft.
//!
//! One more rule covers a restart. openraft resumes leadership at once when a node restarts
//! with a committed vote for itself, and it would then number new entries under the same
//! leader id as entries it may have lost in a power cut, which followers holding the lost
//! entries would take for the same ones. So a store opened after a stop saves such a vote as
//! not committed ([`vote_after_restart`]): the node campaigns for a new term instead.

use std::sync::{Arc, Mutex, MutexGuard};

use openraft::{AnyError, LogId, StorageIOError, Vote};
use tokio::sync::watch;

use crate::machine::{Entry, StoreError};

/// What is written and what is on disk, shared by a log store, its state machine and the
/// Raft network of one node.
pub struct Durability {
    id: u64,
    marks: Mutex<Marks>,
    on_disk: watch::Sender<OnDisk>,
    /// Counts the times the disk caught up with a commit index that [`Durability::clamp`]
    /// had to lower, so the leader can tell followers at once instead of at its next heartbeat.
    released: watch::Sender<u64>,
    stats: Arc<crate::stats::RaftStats>,
}

#[derive(Debug, Default)]
struct Marks {
    /// The last vote saved: the rule for which appends may be deferred.
    vote: Option<Vote<u64>>,
    /// The last entry written, synced or not.
    written: Option<LogId<u64>>,
    /// The last entry known to be on disk, with everything before it.
    durable: Option<LogId<u64>>,
    /// Bumped by truncation, so a sync that started before it does not count after it.
    epoch: u64,
    /// A background sync is running and will look at `written` again before it stops.
    syncing: bool,
    /// The highest commit index `clamp` lowered and that is not on disk yet.
    held_commit: Option<u64>,
}

/// What waiters see.
#[derive(Clone, Debug, Default)]
struct OnDisk {
    /// The last index on disk.
    index: Option<u64>,
    /// The last index written (it falls with a truncation).
    written: Option<u64>,
    failed: Option<String>,
}

/// A sync the store should run: everything written up to `target`.
#[derive(Clone, Copy, Debug)]
pub struct SyncTicket {
    target: LogId<u64>,
    epoch: u64,
}

impl Durability {
    /// Node `id`, whose log on disk ends at `last` and whose saved vote is `vote`.
    pub fn new(id: u64, vote: Option<Vote<u64>>, last: Option<LogId<u64>>) -> Arc<Self> {
        let on_disk = OnDisk {
            index: last.map(|l| l.index),
            written: last.map(|l| l.index),
            failed: None,
        };
        Arc::new(Durability {
            id,
            marks: Mutex::new(Marks {
                vote,
                written: last,
                durable: last,
                ..Marks::default()
            }),
            on_disk: watch::Sender::new(on_disk),
            released: watch::Sender::new(0),
            stats: Default::default(),
        })
    }

    /// What this node's log, state machine and proposals have done.
    pub fn stats(&self) -> &Arc<crate::stats::RaftStats> {
        &self.stats
    }

    fn lock(&self) -> MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a vote the store has saved (synced).
    pub fn vote_saved(&self, vote: Vote<u64>) {
        self.lock().vote = Some(vote);
    }

    /// Whether `entries` may be written without waiting for the disk: they are this node's
    /// own proposals as the leader of its current, committed vote. Anything a follower
    /// appends, and anything this node wrote in an earlier leadership, is synced first.
    pub fn may_defer(&self, entries: &[Entry]) -> bool {
        let marks = self.lock();
        let Some(vote) = marks.vote else {
            return false;
        };
        let leader = openraft::CommittedLeaderId::new(vote.leader_id().get_term(), self.id);
        vote.is_committed()
            && vote.leader_id().voted_for() == Some(self.id)
            && !entries.is_empty()
            && entries.iter().all(|e| e.log_id.leader_id == leader)
    }

    /// Records entries up to `last` as written, on disk already if `synced`. Returns a ticket
    /// when the caller must start a background sync (none is running).
    pub fn wrote(&self, last: LogId<u64>, synced: bool) -> Option<SyncTicket> {
        let mut marks = self.lock();
        marks.written = Some(last);
        if synced {
            marks.durable = Some(last);
        }
        self.publish(&mut marks);
        if synced || marks.syncing {
            return None;
        }
        marks.syncing = true;
        Some(SyncTicket {
            target: last,
            epoch: marks.epoch,
        })
    }

    /// Records a synced truncation that left `last` as the log's last entry.
    pub fn truncated(&self, last: Option<LogId<u64>>) {
        let mut marks = self.lock();
        marks.written = last;
        marks.durable = last;
        marks.epoch += 1;
        self.publish(&mut marks);
    }

    /// Runs background syncs until everything written is on disk, starting with `ticket`.
    /// `sync` makes every write so far durable.
    pub fn run_syncs(&self, ticket: SyncTicket, mut sync: impl FnMut() -> Result<(), String>) {
        let mut ticket = Some(ticket);
        while let Some(t) = ticket {
            if let Err(e) = sync() {
                let mut marks = self.lock();
                marks.syncing = false;
                self.on_disk.send_modify(|d| d.failed = Some(e));
                return;
            }
            ticket = self.synced(t);
        }
    }

    /// Marks `ticket`'s target on disk; returns the next ticket if more was written meanwhile.
    fn synced(&self, ticket: SyncTicket) -> Option<SyncTicket> {
        let mut marks = self.lock();
        if ticket.epoch == marks.epoch && Some(ticket.target.index) > marks.durable.map(|l| l.index)
        {
            marks.durable = Some(ticket.target);
            self.publish(&mut marks);
        }
        match marks.written {
            Some(w) if Some(w.index) > marks.durable.map(|l| l.index) => Some(SyncTicket {
                target: w,
                epoch: marks.epoch,
            }),
            _ => {
                marks.syncing = false;
                None
            }
        }
    }

    fn publish(&self, marks: &mut Marks) {
        let index = marks.durable.map(|l| l.index);
        let written = marks.written.map(|l| l.index);
        self.on_disk.send_if_modified(|d| {
            let changed = d.index != index || d.written != written;
            d.index = index;
            d.written = written;
            changed
        });
        if marks.held_commit.is_some() && marks.held_commit <= index {
            marks.held_commit = None;
            self.released.send_modify(|n| *n += 1);
        }
    }

    /// Changes each time the disk catches up with a commit index that had to be lowered.
    pub fn released(&self) -> watch::Receiver<u64> {
        self.released.subscribe()
    }

    /// The last entry on disk.
    pub fn durable(&self) -> Option<LogId<u64>> {
        self.lock().durable
    }

    /// `commit`, lowered to the last entry on disk: the commit index this node may tell others.
    pub fn clamp(&self, commit: Option<LogId<u64>>) -> Option<LogId<u64>> {
        let mut marks = self.lock();
        let index = commit.map(|l| l.index);
        if index > marks.durable.map(|l| l.index) {
            marks.held_commit = marks.held_commit.max(index);
            marks.durable
        } else {
            commit
        }
    }

    /// Waits until `entries`, about to be applied, are on disk: rule 1 above, for both stores.
    pub async fn before_apply(&self, entries: &[Entry]) -> Result<(), StoreError> {
        match entries.last() {
            Some(last) => self
                .wait(last.log_id.index)
                .await
                .map_err(|e| StorageIOError::write_logs(AnyError::error(e)).into()),
            None => Ok(()),
        }
    }

    /// Waits until the entry at `index` and all before it are on disk, as far as they were
    /// written through this log: an index past the last write waits only for that write.
    /// A truncation lowers that last write, so a waiter never outlives the entries it waits for.
    pub async fn wait(&self, index: u64) -> Result<(), String> {
        let mut rx = self.on_disk.subscribe();
        let seen = rx
            .wait_for(|d| d.failed.is_some() || d.index >= d.written.map(|w| w.min(index)))
            .await
            .map_err(|_| "log store closed".to_string())?;
        match &seen.failed {
            Some(e) => Err(format!("log sync failed: {e}")),
            None => Ok(()),
        }
    }
}

/// The vote node `id` may start with, given the one it saved before it stopped: its own
/// committed vote comes back uncommitted, so that it does not resume leading the same term.
pub fn vote_after_restart(id: u64, saved: Vote<u64>) -> Vote<u64> {
    if saved.is_committed() && saved.leader_id().voted_for() == Some(id) {
        Vote::new(saved.leader_id().get_term(), id)
    } else {
        saved
    }
}

#[cfg(test)]
#[path = "durable_test.rs"]
mod tests;
