//! The openraft type configuration and the state machine core that every store shares: apply
//! log entries to [`ClusterState`], and encode or decode the whole of it as a snapshot.

use std::io::Cursor;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::{AnyError, EntryPayload, LogId, StorageError, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::state::{Applied, ClusterState, Command, CommandError};
use crate::window::EntryWindow;

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

/// Applied entries a server keeps for the clients that follow it, at most.
const RECENT_ENTRIES: usize = 1024;
/// And at most about this many bytes of them.
const RECENT_BYTES: usize = 16 << 20;
/// Most entries in one [`Feed`].
const FEED_ENTRIES: usize = 256;
/// And about this many bytes (a single larger entry still goes alone).
const FEED_BYTES: usize = 4 << 20;

/// About how many bytes an entry takes, encoded: enough to bound what is kept and sent.
fn approx_bytes(entry: &Entry) -> usize {
    fn cmd_bytes(cmd: &Command) -> usize {
        match cmd {
            Command::KvPut { key, value, .. } => 32 + key.len() + value.len(),
            Command::Batch(cmds) => cmds.iter().map(cmd_bytes).sum(),
            Command::Restore { state } => {
                let kv: usize = state
                    .kv
                    .iter()
                    .map(|(k, v)| 48 + k.len() + v.value.len())
                    .sum();
                kv + 1024 * (state.vms.len() + state.nodes.len() + 1)
            }
            _ => 512,
        }
    }
    match &entry.payload {
        EntryPayload::Normal(cmd) => cmd_bytes(cmd),
        _ => 256,
    }
}

/// What a server sends a client that follows it from some index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Feed {
    /// The client is as current as the server.
    Nothing,
    /// The entries applied after the client's index, in order.
    Entries(Vec<Entry>),
    /// The server no longer holds the entries the client lacks: its whole applied data.
    Snapshot(Box<MachineData>),
}

fn index_of(data: &MachineData) -> u64 {
    data.last_applied.map(|l| l.index).unwrap_or(0)
}

#[derive(Default)]
struct MachineInner {
    data: MachineData,
    snapshot: Option<StoredSnapshot>,
    snapshots_built: u64,
    /// On a client: the copy fed by a server's watch, not by Raft. Whichever of it and `data`
    /// is further along is the state this node reads.
    followed: Option<MachineData>,
    /// On a server that has been asked for a feed: the latest applied entries, oldest first.
    recent: Option<EntryWindow>,
}

impl MachineInner {
    /// The state this node reads: Raft's, or a client's followed copy if that is ahead.
    fn current(&self) -> &MachineData {
        match &self.followed {
            Some(f) if index_of(f) > index_of(&self.data) => f,
            _ => &self.data,
        }
    }

    /// Drops the followed copy once Raft has caught up with it.
    fn settle(&mut self) {
        if self
            .followed
            .as_ref()
            .is_some_and(|f| index_of(f) <= index_of(&self.data))
        {
            self.followed = None;
        }
    }
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
                ..Default::default()
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

    /// Tells the subscribers what this node now reads, and the workload ones if `workload`.
    fn changed(&self, workload: bool) {
        let index = self.applied_index();
        self.1.send_replace(index);
        if workload {
            self.2.send_replace(index);
        }
    }

    /// Runs `f` on the applied state without copying it.
    pub fn with_state<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        f(&self.lock().current().state)
    }

    /// The index of the state this node reads (Raft's or, on a client, the followed copy's).
    pub fn applied_index(&self) -> u64 {
        index_of(self.lock().current())
    }

    /// The index and a copy of the state this node reads, taken together.
    pub fn indexed_state(&self) -> (u64, ClusterState) {
        let inner = self.lock();
        let current = inner.current();
        (index_of(current), current.state.clone())
    }

    /// The Raft membership as of the state this node reads.
    pub fn current_membership(&self) -> Membership {
        self.lock().current().last_membership.clone()
    }

    /// What a client that has applied up to `from` lacks, from this node's Raft-applied data.
    /// The first call starts keeping recent entries, so that later feeds can be entries rather
    /// than the whole state.
    pub fn feed(&self, from: u64) -> Feed {
        let mut inner = self.lock();
        let at = index_of(&inner.data);
        let recent = inner
            .recent
            .get_or_insert_with(|| EntryWindow::new(RECENT_ENTRIES, RECENT_BYTES));
        if from >= at {
            return Feed::Nothing;
        }
        let covered = recent.first_index().is_some_and(|first| first <= from + 1);
        if covered {
            let mut bytes = 0;
            let entries = recent
                .after(from)
                .take(FEED_ENTRIES)
                .take_while(|e| {
                    let first = bytes == 0;
                    bytes += approx_bytes(e);
                    first || bytes <= FEED_BYTES
                })
                .cloned()
                .collect();
            return Feed::Entries(entries);
        }
        Feed::Snapshot(Box::new(inner.data.clone()))
    }

    /// Applies what a server fed this client. Entries must follow on from the state this node
    /// reads (those it already has are skipped); a gap is refused and changes nothing.
    pub fn follow(&self, feed: Feed) -> Result<(), String> {
        let workload = {
            let mut inner = self.lock();
            let at = index_of(inner.current());
            match feed {
                Feed::Nothing => return Ok(()),
                Feed::Snapshot(data) => {
                    if index_of(&data) <= at {
                        return Ok(());
                    }
                    inner.followed = Some(*data);
                    true
                }
                Feed::Entries(entries) => {
                    let fresh: Vec<Entry> = entries
                        .into_iter()
                        .filter(|e| e.log_id.index > at)
                        .collect();
                    let Some(first) = fresh.first() else {
                        return Ok(());
                    };
                    if first.log_id.index != at + 1
                        || fresh
                            .windows(2)
                            .any(|w| w[1].log_id.index != w[0].log_id.index + 1)
                    {
                        return Err(format!(
                            "the feed is not contiguous: this node is at {at}, the feed starts at {}",
                            first.log_id.index
                        ));
                    }
                    let workload = fresh.iter().any(|e| match &e.payload {
                        EntryPayload::Normal(cmd) => touches_workload(cmd),
                        _ => false,
                    });
                    let mut base = match inner.followed.take() {
                        Some(f) if index_of(&f) == at => f,
                        _ => inner.data.clone(),
                    };
                    base.apply(fresh);
                    inner.followed = Some(base);
                    workload
                }
            }
        };
        self.changed(workload);
        Ok(())
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
        self.lock().current().state.clone()
    }

    /// The current cluster config.
    pub fn config(&self) -> crate::state::ClusterConfig {
        self.lock().current().state.config.1.clone()
    }

    /// Checks a command against the applied state, without copying it.
    pub fn validate(&self, cmd: &Command) -> Result<(), CommandError> {
        self.lock().current().state.validate(cmd)
    }

    /// The last entry and membership Raft applied (never the followed copy's).
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
        let responses = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let r = match &mut inner.recent {
                None => inner.data.apply(entries),
                Some(recent) => {
                    let entries: Vec<Entry> = entries.collect();
                    for e in &entries {
                        recent.push(e.clone(), approx_bytes(e));
                    }
                    inner.data.apply(entries)
                }
            };
            guard.settle();
            r
        };
        self.changed(workload);
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
        {
            let mut inner = self.lock();
            inner.data = data;
            inner.snapshot = Some(snapshot);
            // The entries kept for feeds no longer lead up to the new data.
            if let Some(recent) = &mut inner.recent {
                recent.clear();
            }
            inner.settle();
        }
        self.changed(true);
    }

    /// The latest snapshot, as openraft hands them around.
    pub fn current_snapshot(&self) -> Option<openraft::Snapshot<TypeConfig>> {
        self.lock()
            .snapshot
            .as_ref()
            .map(StoredSnapshot::to_snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId};

    fn put(index: u64, key: &str) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::KvPut {
                key: key.into(),
                value: key.as_bytes().to_vec(),
                cas: None,
            }),
        }
    }

    fn keys(cell: &MachineCell) -> Vec<String> {
        cell.with_state(|s| s.kv.keys().cloned().collect())
    }

    #[test]
    fn a_client_follows_a_server_from_its_whole_state_then_by_entries() {
        let server = MachineCell::default();
        server.apply([put(1, "a"), put(2, "b")]);
        let client = MachineCell::default();
        // The server kept no entries before its first feed: the client gets the whole state.
        let first = server.feed(0);
        assert!(matches!(first, Feed::Snapshot(_)), "{first:?}");
        client.follow(first).unwrap();
        assert_eq!(keys(&client), ["a", "b"]);
        assert_eq!(client.applied_index(), 2);
        assert_eq!(server.feed(2), Feed::Nothing);
        server.apply([put(3, "c")]);
        let next = server.feed(2);
        assert_eq!(next, Feed::Entries(vec![put(3, "c")]));
        let mut woken = client.subscribe();
        client.follow(next.clone()).unwrap();
        assert_eq!(*woken.borrow_and_update(), 3);
        // The same entries again change nothing.
        client.follow(next).unwrap();
        assert_eq!(keys(&client), ["a", "b", "c"]);
        // Raft's own data stays empty: openraft never sees what a watch fed.
        assert_eq!(client.applied_state().0, None);
    }

    #[test]
    fn a_feed_with_a_gap_is_refused_and_changes_nothing() {
        let client = MachineCell::default();
        client.follow(Feed::Entries(vec![put(1, "a")])).unwrap();
        let gap = client.follow(Feed::Entries(vec![put(3, "c")]));
        assert!(gap.unwrap_err().contains("not contiguous"));
        assert_eq!(keys(&client), ["a"]);
        let holes = client.follow(Feed::Entries(vec![put(2, "b"), put(4, "d")]));
        assert!(holes.is_err());
        assert_eq!(client.applied_index(), 1);
    }

    #[test]
    fn once_raft_catches_up_the_followed_copy_is_dropped() {
        let node = MachineCell::default();
        node.follow(Feed::Entries(vec![put(1, "a"), put(2, "b")]))
            .unwrap();
        node.apply([put(1, "a")]);
        assert_eq!(node.applied_index(), 2, "the followed copy is ahead");
        node.apply([put(2, "b")]);
        assert!(node.lock().followed.is_none());
        assert_eq!(keys(&node), ["a", "b"]);
    }

    #[test]
    fn big_entries_shorten_the_window_and_the_feed() {
        let server = MachineCell::default();
        let _ = server.feed(0);
        let big = |index: u64| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::KvPut {
                key: format!("k{index}"),
                value: vec![0; 3 << 20],
                cas: None,
            }),
        };
        for i in 1..=8 {
            server.apply([big(i)]);
        }
        // 24 MiB applied: the window keeps the last 16 MiB or so.
        assert!(matches!(server.feed(1), Feed::Snapshot(_)));
        match server.feed(4) {
            Feed::Entries(e) => assert_eq!(e.len(), 1, "one 3 MiB entry, then the 4 MiB bound"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_server_keeps_a_bounded_window_of_entries() {
        let server = MachineCell::default();
        assert_eq!(server.feed(0), Feed::Nothing);
        for i in 1..=(RECENT_ENTRIES as u64 + 10) {
            server.apply([put(i, &format!("k{i}"))]);
        }
        assert!(
            matches!(server.feed(5), Feed::Snapshot(_)),
            "fell out of the window"
        );
        match server.feed(100) {
            Feed::Entries(e) => {
                assert_eq!(e.len(), FEED_ENTRIES);
                assert_eq!(e[0].log_id.index, 101);
            }
            other => panic!("{other:?}"),
        }
    }
}
