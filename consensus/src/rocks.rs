//! RocksDB log store and state machine: one database per agent, with column families for the
//! Raft log (`log`, keyed by big-endian index), vote and log metadata (`meta`), and the state
//! machine's latest snapshot (`machine`). Every write is synced before it is acknowledged,
//! except a leader's own new entries, which are synced in the background while they are
//! replicated; [`crate::durable`] says why that is safe.
//!
//! The state machine lives in memory and is rebuilt on start from its snapshot plus the
//! committed log after it, which openraft replays; building a snapshot persists it and lets
//! the log before it be purged, so neither the log nor the snapshot grows without bound.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageIOError, Vote,
};
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};

use crate::durable::Durability;
use crate::machine::{
    Entry, MachineCell, MachineData, Membership, Node, Response, StoreError, StoredSnapshot,
    TypeConfig, decode, encode,
};
use crate::window::EntryWindow;

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_MACHINE: &str = "machine";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT: &[u8] = b"snapshot";
const KEY_PRIMER: &[u8] = b"wal_primer";

/// How many written-out write-ahead log files RocksDB keeps to reuse, and how large
/// [`prime_wal_files`] makes them. Syncing a write that grows a file also writes the file's
/// inode; one that overwrites within its size does not. On this project's benchmark disk
/// that is 0.19 ms against 0.15 ms per sync, and every Raft append waits for one.
const RECYCLED_WAL_FILES: usize = 2;
const PRIMED_WAL_BYTES: usize = 16 << 20;

fn io(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

/// The index a `log` key holds (big-endian, so keys sort by index).
fn log_index(key: &[u8]) -> Result<u64, StoreError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StorageIOError::read_logs(io("bad log key")).into())
}

fn synced() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

/// Opens (creating if needed) the database of node `id` under `path` and returns its two
/// halves. The write-ahead log files are primed (see [`prime_wal_files`]) on a thread of
/// their own: that writes 32 MiB, most of a start's time, and nothing needs to wait for it.
pub fn open(path: &Path, id: u64) -> Result<(RocksLogStore, RocksStateMachine), StoreError> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_recycle_log_file_num(RECYCLED_WAL_FILES);
    let cfs =
        [CF_LOG, CF_META, CF_MACHINE].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    let db = Arc::new(
        DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| StorageIOError::write(io(e)))?,
    );
    // Whatever an earlier process wrote unsynced counts as on disk from here on: sync it now.
    db.flush_wal(true)
        .map_err(|e| StorageIOError::write_logs(io(e)))?;
    let db = Arc::new(Database::priming(db));
    let mut log = RocksLogStore {
        db: db.clone(),
        durability: Durability::new(id, None, None),
        tail: Arc::new(Mutex::new(EntryWindow::new(TAIL_ENTRIES, TAIL_BYTES))),
    };
    log.cut_at_gap()?;
    let mut vote = log.get_meta::<Vote<u64>>(KEY_VOTE)?;
    if let Some(saved) = vote {
        let restarted = crate::durable::vote_after_restart(id, saved);
        if restarted != saved {
            log.put_meta(KEY_VOTE, &restarted)?;
            vote = Some(restarted);
        }
    }
    let last = log.last_log_id()?;
    log.durability = Durability::new(id, vote, last);
    let machine = RocksStateMachine::load(db, log.durability.clone())?;
    Ok((log, machine))
}

/// The open database, shared by the log and the state machine, and the thread priming its
/// write-ahead log files. The last owner to go stops that thread and waits for it, so the
/// database is closed (and its lock released) when the stores are dropped, as before.
struct Database {
    db: Arc<DB>,
    primer: Mutex<Option<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
}

impl Database {
    fn priming(db: Arc<DB>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (for_thread, stopping) = (db.clone(), stop.clone());
        let primer = std::thread::Builder::new()
            .name("blx-wal-primer".into())
            .spawn(move || {
                if let Err(e) = prime_wal_files(&for_thread, &stopping) {
                    tracing::warn!(error = %e, "could not prime the write-ahead log files; syncs stay slower until RocksDB has written some out itself");
                }
            })
            .map_err(|e| tracing::warn!(error = %e, "could not start the WAL primer"))
            .ok();
        Self {
            db,
            primer: Mutex::new(primer),
            stop,
        }
    }

    /// Waits until the primer is done (tests measure the primed files).
    #[cfg(test)]
    fn primed(&self) {
        let handle = self.primer.lock().map(|mut h| h.take()).ok().flatten();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl std::ops::Deref for Database {
    type Target = DB;
    fn deref(&self) -> &DB {
        &self.db
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.primer.get_mut().map(Option::take).ok().flatten();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// Leaves the database writing into a recycled write-ahead log file of [`PRIMED_WAL_BYTES`],
/// so that the log's syncs overwrite a file instead of growing one from the first write on.
/// RocksDB reuses a WAL file only once every column family with data in it is flushed: each
/// round writes (and at once deletes) a filler of that size into the current file, then
/// flushes all three families, which moves writing to another file and leaves this one to
/// be recycled. The second round's switch takes the first round's file. The filler never
/// reaches a table file: the flush drops a value deleted in the same memtable. Raft's own
/// writes may go on meanwhile; they land in whichever file is current, and are synced as
/// ever. Gives up between steps once `stop` is set.
fn prime_wal_files(db: &DB, stop: &AtomicBool) -> Result<(), rocksdb::Error> {
    let cf = |name| {
        db.cf_handle(name)
            .expect("column families are created on open")
    };
    let families = [cf(CF_LOG), cf(CF_META), cf(CF_MACHINE)];
    for _ in 0..RECYCLED_WAL_FILES {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(families[1], KEY_PRIMER, vec![0; PRIMED_WAL_BYTES]);
        batch.delete_cf(families[1], KEY_PRIMER);
        db.write_opt(batch, &synced())?;
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        db.flush_cfs_opt(&families, &rocksdb::FlushOptions::default())?;
    }
    Ok(())
}

/// At most this many of the newest entries, and this many bytes of them encoded, stay in a
/// log store's tail (see [`RocksLogStore::tail`]).
const TAIL_ENTRIES: usize = 1024;
const TAIL_BYTES: usize = 4 << 20;

/// The Raft log in RocksDB.
#[derive(Clone)]
pub struct RocksLogStore {
    db: Arc<Database>,
    durability: Arc<Durability>,
    /// The newest entries, in memory. Right after an append openraft reads the same entries
    /// back: once per follower to replicate them, and once more to apply them once they
    /// commit. Served from here, those reads skip a RocksDB iterator and a decode each, on the
    /// path of every write. Every write to the log updates it once RocksDB has taken it, so
    /// what it holds is what RocksDB holds at those indexes.
    tail: Arc<Mutex<EntryWindow>>,
}

impl RocksLogStore {
    /// What of this log is on disk; shared with its state machine and the Raft network.
    pub fn durability(&self) -> Arc<Durability> {
        self.durability.clone()
    }

    /// Truncates the log at its first gap, if a power cut left one. RocksDB can lose the
    /// unsynced tail of one write-ahead log file while later unsynced writes in the next file
    /// survive; entries after such a gap were never synced, so nothing counted on them.
    fn cut_at_gap(&self) -> Result<(), StoreError> {
        let mut expected: Option<u64> = None;
        for item in self.db.iterator_cf(self.cf(CF_LOG), IteratorMode::Start) {
            let (k, _) = item.map_err(|e| StorageIOError::read_logs(io(e)))?;
            let index = log_index(&k)?;
            if let Some(want) = expected.filter(|want| *want != index) {
                tracing::warn!(
                    missing = want,
                    "the Raft log has a gap; dropping the entries after it"
                );
                let mut batch = WriteBatch::default();
                batch.delete_range_cf(self.cf(CF_LOG), want.to_be_bytes(), u64::MAX.to_be_bytes());
                return self
                    .db
                    .write_opt(batch, &synced())
                    .map_err(|e| StorageIOError::write_logs(io(e)).into());
            }
            expected = Some(index + 1);
        }
        Ok(())
    }

    /// The last entry in the log, if it holds any.
    fn last_log_id(&self) -> Result<Option<LogId<u64>>, StoreError> {
        match self
            .db
            .iterator_cf(self.cf(CF_LOG), IteratorMode::End)
            .next()
        {
            Some(item) => {
                let (_, v) = item.map_err(|e| StorageIOError::read_logs(io(e)))?;
                let entry: Entry = decode(&v).map_err(|e| StorageIOError::read_logs(io(e)))?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, EntryWindow> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created on open")
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        let Some(bytes) = self
            .db
            .get_cf(self.cf(CF_META), key)
            .map_err(|e| StorageIOError::read(io(e)))?
        else {
            return Ok(None);
        };
        decode(&bytes)
            .map(Some)
            .map_err(|e| StorageIOError::read(io(e)).into())
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), StoreError> {
        self.db
            .put_cf_opt(self.cf(CF_META), key, encode(value), &synced())
            .map_err(|e| StorageIOError::write(io(e)).into())
    }
}

impl RaftLogReader<TypeConfig> for RocksLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StoreError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        // Only bounded reads: an open end means "to the end of the log", which is RocksDB's
        // to say. openraft's replication and apply always name their end.
        let end = match range.end_bound() {
            Bound::Included(i) => i.checked_add(1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        if let Some(hit) = end.and_then(|end| self.tail().get(start, end)) {
            return Ok(hit);
        }
        let mut out = Vec::new();
        let key = start.to_be_bytes();
        for item in self.db.iterator_cf(
            self.cf(CF_LOG),
            IteratorMode::From(&key, Direction::Forward),
        ) {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(io(e)))?;
            let index = log_index(&k)?;
            if !range.contains(&index) {
                break;
            }
            out.push(decode(&v).map_err(|e| StorageIOError::read_logs(io(e)))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for RocksLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StoreError> {
        let last_purged: Option<LogId<u64>> = self.get_meta(KEY_PURGED)?;
        let last = self.last_log_id()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StoreError> {
        self.put_meta(KEY_VOTE, vote)?;
        self.durability.vote_saved(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StoreError> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StoreError> {
        // Not synced: the committed index only saves re-applying entries after a restart, and
        // openraft recomputes it if it is behind. An fsync here would sit on every commit.
        if let Some(c) = committed {
            self.durability.stats().committed_to(c.index);
        }
        self.db
            .put_cf(self.cf(CF_META), KEY_COMMITTED, encode(&committed))
            .map_err(|e| StorageIOError::write(io(e)).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StoreError> {
        Ok(self
            .get_meta::<Option<LogId<u64>>>(KEY_COMMITTED)?
            .flatten())
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
        let mut batch = WriteBatch::default();
        let mut sizes = Vec::with_capacity(entries.len());
        for e in &entries {
            let bytes = encode(e);
            sizes.push(bytes.len());
            batch.put_cf(self.cf(CF_LOG), e.log_id.index.to_be_bytes(), bytes);
        }
        let options = if defer {
            WriteOptions::default()
        } else {
            synced()
        };
        let started = std::time::Instant::now();
        let written = self.db.write_opt(batch, &options);
        if !defer {
            self.durability
                .stats()
                .fsync
                .observe(started.elapsed().as_secs_f64());
        }
        if let Err(e) = written {
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Err(StorageIOError::write_logs(io(e)).into());
        }
        let mut tail = self.tail();
        for (entry, size) in entries.into_iter().zip(sizes) {
            tail.push(entry, size);
        }
        drop(tail);
        if let Some(ticket) = self.durability.wrote(last, !defer) {
            let (db, durability) = (self.db.clone(), self.durability.clone());
            tokio::task::spawn_blocking(move || {
                let stats = durability.stats().clone();
                durability.run_syncs(ticket, || {
                    let started = std::time::Instant::now();
                    let flushed = db.flush_wal(true).map_err(|e| e.to_string());
                    stats.fsync.observe(started.elapsed().as_secs_f64());
                    flushed
                })
            });
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_LOG),
            log_id.index.to_be_bytes(),
            u64::MAX.to_be_bytes(),
        );
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| StorageIOError::write_logs(io(e)))?;
        self.tail().truncate_from(log_id.index);
        // The synced write put everything before it on disk too.
        self.durability.truncated(self.last_log_id()?);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StoreError> {
        // Record the purge point first: a crash between the two writes leaves extra entries,
        // never a gap.
        self.put_meta(KEY_PURGED, &log_id)?;
        self.tail().purge_through(log_id.index);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_LOG),
            0u64.to_be_bytes(),
            (log_id.index + 1).to_be_bytes(),
        );
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| StorageIOError::write_logs(io(e)).into())
    }
}

/// The state machine, in memory, with its snapshots in RocksDB.
#[derive(Clone)]
pub struct RocksStateMachine {
    db: Arc<Database>,
    cell: MachineCell,
    durability: Arc<Durability>,
}

impl RocksStateMachine {
    fn load(db: Arc<Database>, durability: Arc<Durability>) -> Result<Self, StoreError> {
        let cf = db
            .cf_handle(CF_MACHINE)
            .expect("column families are created on open");
        let snapshot: Option<StoredSnapshot> = match db
            .get_cf(cf, KEY_SNAPSHOT)
            .map_err(|e| StorageIOError::read_state_machine(io(e)))?
        {
            Some(bytes) => {
                Some(decode(&bytes).map_err(|e| StorageIOError::read_state_machine(io(e)))?)
            }
            None => None,
        };
        let data = match &snapshot {
            Some(s) => MachineData::decode(&s.data)?,
            None => MachineData::default(),
        };
        Ok(RocksStateMachine {
            db,
            cell: MachineCell::new(data, snapshot),
            durability,
        })
    }

    fn persist(&self, snapshot: &StoredSnapshot) -> Result<(), StoreError> {
        let cf = self
            .db
            .cf_handle(CF_MACHINE)
            .expect("column families are created on open");
        self.db
            .put_cf_opt(cf, KEY_SNAPSHOT, encode(snapshot), &synced())
            .map_err(|e| {
                StorageIOError::write_snapshot(Some(snapshot.meta.signature()), io(e)).into()
            })
    }

    /// A copy of the cluster state as applied so far.
    pub fn state(&self) -> crate::state::ClusterState {
        self.cell.state()
    }

    /// The current cluster config.
    pub fn config(&self) -> crate::state::ClusterConfig {
        self.cell.config()
    }

    /// Checks a command against the applied state, without copying it.
    pub fn validate(&self, cmd: &crate::state::Command) -> Result<(), crate::state::CommandError> {
        self.cell.validate(cmd)
    }

    /// The shared state machine core.
    pub fn cell(&self) -> &MachineCell {
        &self.cell
    }
}

impl RaftSnapshotBuilder<TypeConfig> for RocksStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StoreError> {
        let started = std::time::Instant::now();
        let snapshot = self.cell.build_snapshot();
        self.persist(&snapshot)?;
        self.cell.set_snapshot(snapshot.clone());
        self.durability
            .stats()
            .snapshot_build
            .observe(started.elapsed().as_secs_f64());
        Ok(snapshot.to_snapshot())
    }
}

impl RaftStateMachine<TypeConfig> for RocksStateMachine {
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
        let stats = self.durability.stats().clone();
        let started = tokio::time::Instant::now();
        self.durability.before_apply(&entries).await?;
        let synced = tokio::time::Instant::now();
        stats.apply_wait.observe((synced - started).as_secs_f64());
        let applied = self.cell.apply(entries);
        stats.apply.observe(synced.elapsed().as_secs_f64());
        Ok(applied)
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
        let started = std::time::Instant::now();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        let data = MachineData::decode(&stored.data)?;
        // On disk first: a crash after this keeps the snapshot, and the log catches up.
        self.persist(&stored)?;
        self.cell.replace(data, stored);
        self.durability
            .stats()
            .snapshot_install
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StoreError> {
        Ok(self.cell.current_snapshot())
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorage;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    use super::{CF_LOG, CF_META, KEY_PRIMER, PRIMED_WAL_BYTES, open, synced};
    use crate::machine::{Entry, encode};

    fn indexes(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    #[tokio::test]
    async fn reads_after_a_truncation_see_the_new_entries_not_the_cut_ones() {
        use openraft::RaftLogReader;
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = open(dir.path(), 1).expect("open");
        let term = |t: u64, index: u64| Entry {
            log_id: LogId::new(CommittedLeaderId::new(t, 1), index),
            payload: EntryPayload::Blank,
        };
        let write = |log: &super::RocksLogStore, entries: Vec<Entry>| {
            let sizes: Vec<usize> = entries.iter().map(|e| encode(e).len()).collect();
            let mut batch = rocksdb::WriteBatch::default();
            for e in &entries {
                batch.put_cf(log.cf(CF_LOG), e.log_id.index.to_be_bytes(), encode(e));
            }
            log.db.write_opt(batch, &synced()).expect("write");
            for (entry, size) in entries.into_iter().zip(sizes) {
                log.tail().push(entry, size);
            }
        };
        write(&log, (1..=5).map(|i| term(1, i)).collect());
        log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 4))
            .await
            .expect("truncate");
        write(&log, (4..=6).map(|i| term(2, i)).collect());
        let read = log.try_get_log_entries(3..7).await.expect("read");
        let terms: Vec<u64> = read.iter().map(|e| e.log_id.leader_id.term).collect();
        assert_eq!(indexes(&read), [3, 4, 5, 6]);
        assert_eq!(terms, [1, 2, 2, 2]);
        // The same through RocksDB, with the tail emptied.
        log.tail().clear();
        let again = log.try_get_log_entries(3..7).await.expect("read");
        assert_eq!(again, read);
    }

    /// The size of the write-ahead log file RocksDB writes into (the highest-numbered).
    fn current_wal_size(dir: &std::path::Path) -> u64 {
        let newest = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .max()
            .expect("a WAL file");
        std::fs::metadata(newest).expect("metadata").len()
    }

    #[test]
    fn synced_writes_overwrite_a_written_out_wal_file_from_the_first_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..2 {
            // Fresh, then reopened as after a restart.
            let (log, _) = open(dir.path(), 1).expect("open");
            log.db.primed();
            let before = current_wal_size(dir.path());
            assert!(
                before >= PRIMED_WAL_BYTES as u64,
                "WAL file of {before} bytes"
            );
            for index in 1..=100u64 {
                let entry = Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                    payload: EntryPayload::Blank,
                };
                log.db
                    .put_cf_opt(
                        log.cf(CF_LOG),
                        index.to_be_bytes(),
                        encode(&entry),
                        &synced(),
                    )
                    .expect("put");
            }
            assert_eq!(current_wal_size(dir.path()), before, "the WAL file grew");
            let primer = log.db.get_cf(log.cf(CF_META), KEY_PRIMER).expect("get");
            assert_eq!(primer, None);
        }
    }

    #[tokio::test]
    async fn a_gap_left_by_a_power_cut_is_cut_off_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (log, _) = open(dir.path(), 1).expect("open");
            for index in [1, 2, 3, 5, 6] {
                let entry = Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                    payload: EntryPayload::Blank,
                };
                log.db
                    .put_cf(log.cf(CF_LOG), index.to_be_bytes(), encode(&entry))
                    .expect("put");
            }
        }
        let (mut log, _) = open(dir.path(), 1).expect("reopen");
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
        assert_eq!(log.durability().durable().map(|l| l.index), Some(3));
    }
}
