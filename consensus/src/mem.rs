//! In-memory log store and state machine, for the simulator and tests. Same traits, same
//! state machine core and the same durability rules as the RocksDB stores ([`crate::durable`]):
//! a leader's own entries count as on disk only after a background "sync" task has run, and
//! [`MemLogStore::after_power_loss`] gives what a machine's disk would hold after losing power.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{
    LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta, Vote,
};

use crate::durable::{Durability, vote_after_restart};

use crate::machine::{
    Entry, MachineCell, MachineData, Membership, Node, Response, StoreError, StoredSnapshot,
    TypeConfig,
};

#[derive(Default)]
struct LogInner {
    log: BTreeMap<u64, Entry>,
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
    last_purged: Option<LogId<u64>>,
}

/// The Raft log in memory.
#[derive(Clone)]
pub struct MemLogStore {
    inner: Arc<Mutex<LogInner>>,
    durability: Arc<Durability>,
    /// While true, background syncs wait: a disk that has not flushed yet.
    held: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for MemLogStore {
    fn default() -> Self {
        MemLogStore::new(0)
    }
}

impl MemLogStore {
    /// An empty log for node `id`.
    pub fn new(id: u64) -> Self {
        MemLogStore {
            inner: Arc::default(),
            durability: Durability::new(id, None, None),
            held: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Holds background syncs back (`true`) or lets them finish (`false`): a slow disk, for
    /// tests and the simulator.
    pub fn hold_syncs(&self, hold: bool) {
        self.held.send_replace(hold);
    }

    /// What of this log is "on disk"; shared with its state machine and the Raft network.
    pub fn durability(&self) -> Arc<Durability> {
        self.durability.clone()
    }

    /// The log a power loss would leave, as the restarted node opens it: the vote (always
    /// saved synced, and never a committed one of its own: [`vote_after_restart`]), the entries
    /// up to the last one on disk, and a committed index no later than that. A fresh store,
    /// sharing nothing with this one.
    pub fn after_power_loss(&self, id: u64) -> MemLogStore {
        let inner = self.lock();
        let durable = self.durability.durable();
        let keep = durable.map_or(0, |l| l.index + 1);
        let log: BTreeMap<u64, Entry> = inner
            .log
            .range(..keep)
            .map(|(i, e)| (*i, e.clone()))
            .collect();
        let last = log.values().next_back().map(|e| e.log_id);
        let vote = inner.vote.map(|v| vote_after_restart(id, v));
        MemLogStore {
            inner: Arc::new(Mutex::new(LogInner {
                log,
                vote,
                committed: self.durability.clamp(inner.committed),
                last_purged: inner.last_purged,
            })),
            durability: Durability::new(id, vote, last),
            held: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RaftLogReader<TypeConfig> for MemLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .lock()
            .log
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for MemLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StoreError> {
        let inner = self.lock();
        let last = inner
            .log
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StoreError> {
        self.lock().vote = Some(*vote);
        self.durability.vote_saved(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StoreError> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StoreError> {
        if let Some(c) = committed {
            self.durability.stats().committed_to(c.index);
        }
        self.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StoreError> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let defer = self.durability.may_defer(&entries);
        {
            let mut inner = self.lock();
            for e in entries {
                inner.log.insert(e.log_id.index, e);
            }
        }
        if let Some(ticket) = self.durability.wrote(last, !defer) {
            // The "fsync" completes once the runtime has run something else in between, and
            // not while syncs are held.
            let durability = self.durability.clone();
            let mut held = self.held.subscribe();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                let _ = held.wait_for(|h| !h).await;
                durability.run_syncs(ticket, || Ok(()));
            });
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.log.split_off(&log_id.index);
        let last = inner.log.values().next_back().map(|e| e.log_id);
        self.durability.truncated(last);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.last_purged = Some(log_id);
        inner.log = inner.log.split_off(&(log_id.index + 1));
        Ok(())
    }
}

/// The state machine in memory.
#[derive(Clone, Default)]
pub struct MemStateMachine {
    cell: MachineCell,
    /// The log whose entries it applies, if it is to wait for them to be on disk.
    durability: Option<Arc<Durability>>,
}

impl MemStateMachine {
    /// A state machine that applies an entry only once `log` has it on disk.
    pub fn for_log(log: &MemLogStore) -> Self {
        MemStateMachine {
            cell: MachineCell::default(),
            durability: Some(log.durability()),
        }
    }

    /// A copy of the cluster state as applied so far.
    pub fn state(&self) -> crate::state::ClusterState {
        self.cell.state()
    }

    /// The shared state machine core.
    pub fn cell(&self) -> &MachineCell {
        &self.cell
    }

    /// The state machine a power loss would leave, for the log `log` that the restarted node
    /// opens (from [`MemLogStore::after_power_loss`]): the latest snapshot, which is what a
    /// store keeps on disk (the RocksDB store writes it synced); entries applied after it are
    /// applied again from the log.
    pub fn after_power_loss(&self, log: &MemLogStore) -> MemStateMachine {
        let cell = match self.cell.stored_snapshot() {
            Some(snapshot) => match MachineData::decode(&snapshot.data) {
                Ok(data) => MachineCell::new(data, Some(snapshot)),
                Err(_) => MachineCell::default(),
            },
            None => MachineCell::default(),
        };
        MemStateMachine {
            cell,
            durability: Some(log.durability()),
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MemStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StoreError> {
        let snapshot = self.cell.build_snapshot();
        self.cell.set_snapshot(snapshot.clone());
        Ok(snapshot.to_snapshot())
    }
}

impl RaftStateMachine<TypeConfig> for MemStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, Membership), StoreError> {
        Ok(self.cell.applied_state())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StoreError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Some(d) = &self.durability {
            d.before_apply(&entries).await?;
        }
        Ok(self.cell.apply(entries))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StoreError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StoreError> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        let data = MachineData::decode(&stored.data)?;
        self.cell.replace(data, stored);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StoreError> {
        Ok(self.cell.current_snapshot())
    }
}
