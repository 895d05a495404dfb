//! The openraft type configuration and the state machine core that every store shares: apply
//! log entries to [`ClusterState`], and encode or decode the whole of it as a snapshot.

use std::io::Cursor;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::{AnyError, EntryPayload, LogId, StorageError, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::state::{Applied, ClusterState, Command, CommandError};

/// What applying a command answers: the result, or why it was refused.
pub type Response = Result<Applied, CommandError>;

openraft::declare_raft_types!(
    /// blx's Raft types: commands in, responses out, u64 node ids, gossip address as the node.
    pub TypeConfig:
        D = Command,
        R = Response,
        AsyncRuntime = crate::runtime::BlxRuntime,
);

/// One log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A node as Raft knows it.
pub type Node = openraft::BasicNode;
/// Membership as the state machine stores it.
pub type Membership = StoredMembership<u64, Node>;
/// Storage failures, as openraft wants them.
pub type StoreError = StorageError<u64>;

/// The format version byte of every stored record.
pub const RECORD_VERSION: u8 = 1;

/// Whether applying `cmd` may change nodes or VMs.
fn touches_workload(cmd: &Command) -> bool {
    match cmd {
        Command::Workload(_) => true,
        Command::Batch(cmds) => cmds.iter().any(touches_workload),
        _ => false,
    }
}

/// Everything a snapshot holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineData {
    /// The last entry applied.
    pub last_applied: Option<LogId<u64>>,
    /// The last membership applied.
    pub last_membership: Membership,
    /// The cluster state.
    pub state: ClusterState,
}

impl MachineData {
    /// Applies entries in order; a refused command is answered with its error and changes
    /// nothing, like any other deterministic outcome.
    pub fn apply(&mut self, entries: impl IntoIterator<Item = Entry>) -> Vec<Response> {
        entries
            .into_iter()
            .map(|entry| {
                self.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => Ok(Applied::Nothing),
                    EntryPayload::Normal(cmd) => self.state.apply(entry.log_id.index, &cmd),
                    EntryPayload::Membership(m) => {
                        self.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        Ok(Applied::Nothing)
                    }
                }
            })
            .collect()
    }

    /// The snapshot bytes: a version byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Reads snapshot bytes made by [`MachineData::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        decode(bytes).map_err(|e| StorageIOError::read_snapshot(None, AnyError::error(e)).into())
    }
}

/// Encodes a stored record: version byte, then postcard.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    out.extend(postcard::to_allocvec(value).unwrap_or_default());
    out
}

/// Decodes a stored record made by [`encode`].
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, body)) => postcard::from_bytes(body).map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!("unknown record version {v}")),
        None => Err("empty record".into()),
    }
}

/// A snapshot as a store keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredSnapshot {
    /// Which log position it covers.
    pub meta: openraft::SnapshotMeta<u64, Node>,
    /// [`MachineData::encode`] bytes.
    pub data: Vec<u8>,
}

impl StoredSnapshot {
    /// As openraft hands snapshots around.
    pub fn to_snapshot(&self) -> openraft::Snapshot<TypeConfig> {
        openraft::Snapshot {
            meta: self.meta.clone(),
            snapshot: Box::new(Cursor::new(self.data.clone())),
        }
    }
}

/// Builds the snapshot of `data`, naming it after its last applied entry and `seq`.
pub fn snapshot_of(data: &MachineData, seq: u64) -> StoredSnapshot {
    let snapshot_id = match data.last_applied {
        Some(last) => format!("{}-{}-{seq}", last.leader_id, last.index),
        None => format!("--{seq}"),
    };
    let meta = openraft::SnapshotMeta {
        last_log_id: data.last_applied,
        last_membership: data.last_membership.clone(),
        snapshot_id,
    };
    StoredSnapshot {
        meta,
        data: data.encode(),
    }
}

#[derive(Default)]
struct MachineInner {
    data: MachineData,
    snapshot: Option<StoredSnapshot>,
    snapshots_built: u64,
}

/// The state machine's in-memory half, shared by every store: the applied data and the latest
/// snapshot. Stores add persistence around it (the RocksDB store writes snapshots to disk).
#[derive(Clone)]
pub struct MachineCell(
    Arc<Mutex<MachineInner>>,
    Arc<tokio::sync::watch::Sender<u64>>,
    Arc<tokio::sync::watch::Sender<u64>>,
);

impl Default for MachineCell {
    fn default() -> Self {
        MachineCell::new(MachineData::default(), None)
    }
}

impl MachineCell {
    /// A cell holding `data`, with `snapshot` as the latest snapshot.
    pub fn new(data: MachineData, snapshot: Option<StoredSnapshot>) -> Self {
        let applied = data.last_applied.map(|l| l.index).unwrap_or(0);
        MachineCell(
            Arc::new(Mutex::new(MachineInner {
                data,
                snapshot,
                snapshots_built: 0,
            })),
            Arc::new(tokio::sync::watch::channel(applied).0),
            Arc::new(tokio::sync::watch::channel(applied).0),
        )
    }

    /// Wakes when nodes or VMs change (not on KV or config writes); the value is the applied
    /// index of the change. What the scheduler and the VMM workers wait on.
    pub fn subscribe_workload(&self) -> tokio::sync::watch::Receiver<u64> {
        self.2.subscribe()
    }

    /// Wakes on every change to the applied state; the value is the last applied index.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.1.subscribe()
    }

    fn changed(&self, index: Option<LogId<u64>>) {
        self.1.send_replace(index.map(|l| l.index).unwrap_or(0));
    }

    /// Runs `f` on the applied state without copying it.
    pub fn with_state<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        f(&self.lock().data.state)
    }

    fn lock(&self) -> MutexGuard<'_, MachineInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest snapshot, as a store keeps it.
    pub fn stored_snapshot(&self) -> Option<StoredSnapshot> {
        self.lock().snapshot.clone()
    }

    /// A copy of the cluster state as applied so far.
    pub fn state(&self) -> ClusterState {
        self.lock().data.state.clone()
    }

    /// The current cluster config.
    pub fn config(&self) -> crate::state::ClusterConfig {
        self.lock().data.state.config.1.clone()
    }

    /// Checks a command against the applied state, without copying it.
    pub fn validate(&self, cmd: &Command) -> Result<(), CommandError> {
        self.lock().data.state.validate(cmd)
    }

    /// The last applied entry and membership.
    pub fn applied_state(&self) -> (Option<LogId<u64>>, Membership) {
        let inner = self.lock();
        (inner.data.last_applied, inner.data.last_membership.clone())
    }

    /// Applies entries in order.
    pub fn apply(&self, entries: impl IntoIterator<Item = Entry>) -> Vec<Response> {
        let mut workload = false;
        let entries = entries.into_iter().inspect(|e| {
            if let EntryPayload::Normal(cmd) = &e.payload {
                workload |= touches_workload(cmd);
            }
        });
        let (responses, last) = {
            let mut inner = self.lock();
            let r = inner.data.apply(entries);
            (r, inner.data.last_applied)
        };
        self.changed(last);
        if workload {
            self.2.send_replace(last.map(|l| l.index).unwrap_or(0));
        }
        responses
    }

    /// Builds a snapshot of the applied data (not yet recorded as the latest).
    pub fn build_snapshot(&self) -> StoredSnapshot {
        let mut inner = self.lock();
        inner.snapshots_built += 1;
        snapshot_of(&inner.data, inner.snapshots_built)
    }

    /// Records `snapshot` as the latest.
    pub fn set_snapshot(&self, snapshot: StoredSnapshot) {
        self.lock().snapshot = Some(snapshot);
    }

    /// Replaces the applied data with a received snapshot's, which becomes the latest.
    pub fn replace(&self, data: MachineData, snapshot: StoredSnapshot) {
        let last = data.last_applied;
        {
            let mut inner = self.lock();
            inner.data = data;
            inner.snapshot = Some(snapshot);
        }
        self.changed(last);
        self.2.send_replace(last.map(|l| l.index).unwrap_or(0));
    }

    /// The latest snapshot, as openraft hands them around.
    pub fn current_snapshot(&self) -> Option<openraft::Snapshot<TypeConfig>> {
        self.lock()
            .snapshot
            .as_ref()
            .map(StoredSnapshot::to_snapshot)
    }
}
