//! One node's Raft: openraft on its stores (RocksDB, or in memory in the simulator), plus what the agent asks of it: writes
//! (answered here on the leader, or told where the leader is), linearizable or stale reads,
//! status, and the autopilot task that runs while this node leads.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
#[cfg(feature = "rocks")]
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState};
use serde::Serialize;

use crate::autopilot::{NodeView, Plan, RaftView, plan};
use crate::machine::MachineCell;
use crate::machine::{Node, Response, StoreError, TypeConfig};
use crate::mem::{MemLogStore, MemStateMachine};
use crate::network::{Network, RpcTransport};
use crate::state::{ClusterState, Command};

/// Failures of the consensus layer as the agent sees them.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// RocksDB or the state machine failed.
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
    /// openraft refused its configuration or stopped.
    #[error("raft: {0}")]
    Raft(String),
    /// This node does not lead; the write or read must go to the leader.
    #[error("not the leader")]
    NotLeader {
        /// The leader, if known.
        leader: Option<u64>,
    },
}

/// A server's answer to a client's watch.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct WatchAnswer {
    /// The leader, as the server knows it.
    pub leader: Option<u64>,
    /// The server's term.
    pub term: u64,
    /// The asking node is in the Raft group (a learner being added, or a server already).
    pub member: bool,
    /// The voters and learners, as the server knows them.
    pub servers: BTreeSet<u64>,
    /// What the client lacks; None when the answering node is not a server.
    pub feed: Option<crate::machine::Feed>,
}

/// What a client asks the server it follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct WatchRequest {
    /// The index of the state the client reads.
    pub from: u64,
    /// How long the server may hold the answer while there is nothing to send, in ms.
    pub wait_ms: u32,
}

/// What `blx status` shows. Node ids are written as the 16 hex digits the member list and
/// every table use, not as Raft's integers.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// This node's Raft id.
    #[serde(serialize_with = "id_text::one")]
    pub id: u64,
    /// The leader, if known.
    #[serde(serialize_with = "id_text::maybe")]
    pub leader: Option<u64>,
    /// The current term.
    pub term: u64,
    /// Index of the last applied entry.
    pub applied_index: u64,
    /// Index of the last log entry.
    pub last_log_index: u64,
    /// Leader, follower, learner or candidate.
    pub role: String,
    /// Voter ids; during a voter change, the old and the new voters together.
    #[serde(serialize_with = "id_text::set")]
    pub voters: BTreeSet<u64>,
    /// A voter change is under way (joint consensus): until it ends, a quorum of the old
    /// voters is needed as well as one of the new.
    pub changing: bool,
    /// Learner ids.
    #[serde(serialize_with = "id_text::set")]
    pub learners: BTreeSet<u64>,
    /// Index of the latest snapshot.
    pub snapshot_index: u64,
    /// Index up to which the log was purged.
    pub purged_index: u64,
}

/// Raft ids as JSON text: the node id's 16 hex digits.
mod id_text {
    use std::collections::BTreeSet;

    use serde::Serializer;
    use serde::ser::SerializeSeq;

    fn text(id: u64) -> String {
        format!("{id:016x}")
    }

    pub(super) fn one<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&text(*id))
    }

    pub(super) fn maybe<S: Serializer>(id: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.serialize_some(&text(*id)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn set<S: Serializer>(ids: &BTreeSet<u64>, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(ids.len()))?;
        for id in ids {
            seq.serialize_element(&text(*id))?;
        }
        seq.end()
    }
}

/// One node's consensus.
#[derive(Clone)]
pub struct ConsensusNode {
    /// The openraft handle.
    pub raft: Raft<TypeConfig>,
    machine: MachineCell,
    durability: Arc<crate::durable::Durability>,
    id: u64,
    proposals: tokio::sync::mpsc::Sender<Proposal>,
    permits: Arc<tokio::sync::Semaphore>,
    /// Set while this node is a client: outside Raft, following a server's feed.
    following: Arc<tokio::sync::watch::Sender<Option<Followed>>>,
}

/// What a client knows of the Raft group, from the last answer of the server it follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Followed {
    /// The server it follows.
    pub server: u64,
    /// The leader, as that server knows it.
    pub leader: Option<u64>,
    /// The term, as that server knows it.
    pub term: u64,
    /// When that server last answered.
    pub answered: tokio::time::Instant,
}

/// How often an idle leader sends every server an empty append. A follower starts an election
/// only after [`VOTE_LEASE`] plus its [`ELECTION_TIMEOUT_MIN`]-to-[`VOTE_LEASE`] timeout without
/// one (openraft waits out the lease before its own timer): 2.25 to 2.4 s, which leaves room
/// for a heartbeat to go missing and the next to be late. A lost packet costs less than that:
/// QUIC resends it within milliseconds. Writes and commit updates go out at once, whatever
/// this is, and a dead leader is usually replaced sooner, on gossip's word
/// (`cli/src/leader_loss.rs`). Each heartbeat is a QUIC exchange of three packets per server,
/// after gossip the largest part of an idle cluster's traffic: every 500 ms it was a quarter
/// of a 10-node cluster's bytes, every 150 ms three times gossip's.
pub const HEARTBEAT: Duration = Duration::from_millis(1000);

/// The shortest election timeout a voter draws, once per process; openraft requires it to
/// be longer than [`HEARTBEAT`]. The longest is [`VOTE_LEASE`].
pub const ELECTION_TIMEOUT_MIN: Duration = Duration::from_millis(1050);

/// How long after its last append from a leader a voter refuses to vote for anyone else
/// (openraft's leader lease: its `election_timeout_max`). A leader elected at time E was
/// therefore voted for by a majority that had not heard the old leader since E less this:
/// whatever the old leader confirmed with a quorum was confirmed before then, or on this node.
pub const VOTE_LEASE: Duration = Duration::from_millis(1200);

/// A learner that has heard no leader for this long is no longer a server: it may have been
/// taken out of the group without hearing of it. Two heartbeats and some.
pub const SERVER_CONTACT: Duration = Duration::from_millis(2500);

/// The longest a server holds a watch open with nothing to send.
pub const MAX_WATCH_WAIT: Duration = Duration::from_secs(30);

/// A write waiting to be proposed, and where its outcome goes.
struct Proposal {
    cmd: Command,
    reply: tokio::sync::oneshot::Sender<Result<Response, ConsensusError>>,
    /// When it was queued, for [`crate::stats::RaftStats::queued`].
    queued_at: tokio::time::Instant,
}

/// Proposals in flight at once: while they are, new writes queue up and go out together.
const IN_FLIGHT: usize = 4;

/// Proposes writes, grouping those that queued up while earlier ones were in flight into one
/// [`Command::Batch`] entry. openraft 0.9 appends (and fsyncs) each proposal on its own before
/// taking the next, so without grouping a leader makes at most one write per fsync; grouped,
/// a fsync carries every write that arrived meanwhile. A write that finds nothing queued goes
/// out alone, at once.
async fn propose_in_batches(
    raft: Raft<TypeConfig>,
    permits: Arc<tokio::sync::Semaphore>,
    mut rx: tokio::sync::mpsc::Receiver<Proposal>,
    stats: Arc<crate::stats::RaftStats>,
) {
    while let Some(first) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < crate::state::MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let queued: Vec<_> = batch.iter().map(|p| p.queued_at).collect();
            if batch.len() == 1 {
                let p = batch.remove(0);
                let _ = p
                    .reply
                    .send(propose_entry(&raft, &stats, p.cmd, &queued).await);
                return;
            }
            let (cmds, replies): (Vec<Command>, Vec<_>) =
                batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
            let outcome = propose_entry(&raft, &stats, Command::Batch(cmds), &queued).await;
            match outcome {
                Ok(Ok(crate::state::Applied::Batch(results))) if results.len() == replies.len() => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(result));
                    }
                }
                Ok(other) => {
                    for reply in replies {
                        let _ = reply.send(Ok(other.clone()));
                    }
                }
                Err(ConsensusError::NotLeader { leader }) => {
                    for reply in replies {
                        let _ = reply.send(Err(ConsensusError::NotLeader { leader }));
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    for reply in replies {
                        let _ = reply.send(Err(ConsensusError::Raft(text.clone())));
                    }
                }
            }
        });
    }
}

/// Proposes one log entry carrying the writes queued at `queued`, and records its stages:
/// each write's wait for a slot, the writes it carries, and its time to the answer.
async fn propose_entry(
    raft: &Raft<TypeConfig>,
    stats: &crate::stats::RaftStats,
    cmd: Command,
    queued: &[tokio::time::Instant],
) -> Result<Response, ConsensusError> {
    let proposed = tokio::time::Instant::now();
    for at in queued {
        stats.queued.observe((proposed - *at).as_secs_f64());
    }
    stats.batch_writes.observe(queued.len() as f64);
    let outcome = client_write(raft, cmd).await;
    stats.entry.observe(proposed.elapsed().as_secs_f64());
    outcome
}

/// When the leader's disk catches up with a commit index it had to hold back from followers,
/// sends it at once rather than at the next heartbeat, so followers apply without delay.
async fn announce_released_commits(
    raft: Raft<TypeConfig>,
    mut released: tokio::sync::watch::Receiver<u64>,
) {
    while released.changed().await.is_ok() {
        let leading = raft.metrics().borrow().state == ServerState::Leader;
        if leading && raft.trigger().heartbeat().await.is_err() {
            return;
        }
    }
}

async fn client_write(raft: &Raft<TypeConfig>, cmd: Command) -> Result<Response, ConsensusError> {
    match raft.client_write(cmd).await {
        Ok(r) => Ok(r.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(ConsensusError::NotLeader {
                leader: f.leader_id,
            })
        }
        Err(e) => Err(ConsensusError::Raft(e.to_string())),
    }
}

/// openraft timing for a LAN; a snapshot every `snapshot_logs` applied entries.
pub fn raft_config(snapshot_logs: u64) -> Result<openraft::Config, ConsensusError> {
    let config = openraft::Config {
        cluster_name: "blx".into(),
        heartbeat_interval: millis(HEARTBEAT),
        election_timeout_min: millis(ELECTION_TIMEOUT_MIN),
        election_timeout_max: millis(VOTE_LEASE),
        max_payload_entries: 64,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_logs),
        max_in_snapshot_log_to_keep: snapshot_logs / 5,
        purge_batch_size: 1,
        snapshot_max_chunk_size: 1024 * 1024,
        ..Default::default()
    };
    config
        .validate()
        .map_err(|e| ConsensusError::Raft(e.to_string()))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The log store and state machine one node's Raft runs on.
pub enum Stores {
    /// RocksDB, under the agent's data dir.
    #[cfg(feature = "rocks")]
    Rocks(crate::rocks::RocksLogStore, crate::rocks::RocksStateMachine),
    /// In memory, modelling unsynced writes (the simulator's).
    Mem(MemLogStore, MemStateMachine),
}

impl Stores {
    /// Opens (creating if needed) the RocksDB stores of node `id` under `dir`.
    #[cfg(feature = "rocks")]
    pub fn open_rocks(dir: &Path, id: u64) -> Result<Stores, ConsensusError> {
        let (log, machine) = crate::rocks::open(dir, id)?;
        Ok(Stores::Rocks(log, machine))
    }
}

impl ConsensusNode {
    /// Starts Raft on `stores`.
    pub async fn start<T: RpcTransport>(
        id: u64,
        stores: Stores,
        config: openraft::Config,
        transport: Arc<T>,
    ) -> Result<Self, ConsensusError> {
        let config = Arc::new(config);
        let (raft, machine, durability) = match stores {
            #[cfg(feature = "rocks")]
            Stores::Rocks(log, machine) => {
                let durability = log.durability();
                let cell = machine.cell().clone();
                let network = Network::new(transport, durability.clone());
                let raft = Raft::new(id, config, network, log, machine).await;
                (raft, cell, durability)
            }
            Stores::Mem(log, machine) => {
                let durability = log.durability();
                let cell = machine.cell().clone();
                let network = Network::new(transport, durability.clone());
                let raft = Raft::new(id, config, network, log, machine).await;
                (raft, cell, durability)
            }
        };
        let raft = raft.map_err(|e| ConsensusError::Raft(e.to_string()))?;
        tokio::spawn(announce_released_commits(
            raft.clone(),
            durability.released(),
        ));
        let (proposals, rx) = tokio::sync::mpsc::channel(4 * crate::state::MAX_BATCH);
        let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        tokio::spawn(propose_in_batches(
            raft.clone(),
            permits.clone(),
            rx,
            durability.stats().clone(),
        ));
        Ok(ConsensusNode {
            raft,
            machine,
            durability,
            id,
            proposals,
            permits,
            following: Arc::new(tokio::sync::watch::Sender::new(None)),
        })
    }

    /// Says whether this node is a client following a server (and what that server last
    /// said), or, with None, a server that hears Raft itself.
    pub fn set_following(&self, followed: Option<Followed>) {
        self.following.send_if_modified(|now| {
            let changed = now.map(|f| (f.server, f.leader, f.term))
                != followed.map(|f| (f.server, f.leader, f.term));
            *now = followed;
            changed
        });
    }

    /// What this node follows, while it is a client.
    pub fn following(&self) -> Option<Followed> {
        *self.following.borrow()
    }

    /// Whether this node votes in the Raft group, by its own Raft state.
    pub fn is_voter(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.id)
    }

    /// Whether a leader's append (a heartbeat at least) reached this node within `within`:
    /// whether it is a server in fact, not only by a membership it may have been taken out of.
    pub fn hears_raft_within(&self, within: Duration) -> bool {
        self.durability
            .stats()
            .last_leader_contact()
            .is_some_and(|at| at.elapsed() <= within)
    }

    /// The index of the state this node reads (on a client, the followed copy's).
    pub fn applied_index(&self) -> u64 {
        self.machine.applied_index()
    }

    /// Applies what the followed server sent.
    pub fn follow(&self, feed: crate::machine::Feed) -> Result<(), String> {
        self.machine.follow(feed)
    }

    /// Answers a client's watch: what it lacks after `from`, waiting up to `wait` (at most
    /// [`MAX_WATCH_WAIT`]) for something to send or for the leader to change. A node that is
    /// not a server itself, or is a client right now, sends no feed, only the servers it knows.
    pub async fn serve_watch(&self, client: u64, from: u64, wait: Duration) -> WatchAnswer {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WATCH_WAIT);
        let mut applied = self.machine.subscribe();
        let mut metrics = self.raft.metrics();
        let leader = metrics.borrow().current_leader;
        loop {
            let status = self.status();
            let servers: BTreeSet<u64> = status.voters.union(&status.learners).copied().collect();
            let member = servers.contains(&client);
            let serving = self.following().is_none()
                && servers.contains(&self.id)
                && (self.is_voter() || self.hears_raft_within(SERVER_CONTACT));
            let feed = serving.then(|| self.machine.feed(from));
            let answer = WatchAnswer {
                leader: status.leader,
                term: status.term,
                member,
                servers,
                feed: feed.clone(),
            };
            if !matches!(feed, Some(crate::machine::Feed::Nothing)) {
                return answer;
            }
            tokio::select! {
                r = applied.changed() => if r.is_err() { return answer },
                _ = metrics.wait_for(|m| m.current_leader != leader) => return answer,
                _ = tokio::time::sleep_until(deadline) => return answer,
            }
        }
    }

    /// Waits until the leader this node knows of satisfies `done`: from Raft on a server, from
    /// the followed server on a client.
    pub async fn wait_leader(&self, done: impl Fn(Option<u64>) -> bool) {
        let mut metrics = self.raft.metrics();
        let mut following = self.following.subscribe();
        loop {
            if done(self.status().leader) {
                return;
            }
            tokio::select! {
                r = metrics.changed() => if r.is_err() { return std::future::pending().await },
                r = following.changed() => if r.is_err() { return std::future::pending().await },
            }
        }
    }

    /// Waits (up to `within`) until this node has applied its latest membership entry, which
    /// puts that entry on its disk; true once it has. A membership change must start only
    /// then: openraft lets one start as soon as the previous config is committed, and it
    /// counts a leader's copy that may not be synced yet (see [`crate::durable`]).
    pub async fn membership_settled(&self, within: Duration) -> bool {
        self.raft
            .wait(Some(within))
            .metrics(
                |m| {
                    let config = m.membership_config.log_id().map(|l| l.index);
                    m.last_applied.map(|l| l.index) >= config
                },
                "membership applied",
            )
            .await
            .is_ok()
    }

    /// Answers a Raft RPC (an encoded [`crate::network::RaftRequest`]) from the member whose
    /// certificate names `from`. Refused unless the request names `from` as its leader or
    /// candidate, and `from` is in this node's Raft membership; a node that has no
    /// membership yet (a learner being added) accepts its first entries from any member.
    pub async fn serve_rpc(&self, from: u64, payload: &[u8]) -> Vec<u8> {
        let members = self.raft.metrics().borrow().membership_config.clone();
        crate::network::serve(&self.raft, &self.durability, payload, |request| {
            match crate::network::sender(request) {
                Some(claimed) if claimed == from => {}
                Some(claimed) => {
                    return Err(format!(
                        "refused: the request names {claimed:016x} but comes from {from:016x}"
                    ));
                }
                None => {
                    return Err(format!(
                        "refused: a request from {from:016x} names no sender"
                    ));
                }
            }
            let nodes = members.membership().nodes().count();
            if nodes > 0 && members.membership().get_node(&from).is_none() {
                return Err(format!(
                    "refused: {from:016x} is not in this node's Raft membership"
                ));
            }
            Ok(())
        })
        .await
    }

    /// Makes this node the single voter of a new group. Only the cluster's first agent calls
    /// it, once; on a node that already has state it does nothing.
    pub async fn initialize(&self, addr: SocketAddr) -> Result<(), ConsensusError> {
        let members = BTreeMap::from([(
            self.id,
            Node {
                addr: addr.to_string(),
            },
        )]);
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ConsensusError::Raft(e.to_string())),
        }
    }

    /// Proposes a command if this node leads.
    pub async fn write(&self, cmd: Command) -> Result<Response, ConsensusError> {
        // Refuse before proposing what would be refused on apply.
        if let Err(e) = self.machine.validate(&cmd) {
            return Ok(Err(e));
        }
        if let Some(f) = self.following() {
            return Err(ConsensusError::NotLeader { leader: f.leader });
        }
        if !self.is_leader() {
            // Say where the leader is without queueing behind this node's own proposals.
            return client_write(&self.raft, cmd).await;
        }
        #[cfg(feature = "unsafe-early-ack")]
        if let Command::KvPut { .. } = &cmd {
            // A deliberate bug, for the simulator to find: acknowledge a KV write as soon as
            // it is proposed, before it commits. Never enabled by a production build.
            let raft = self.raft.clone();
            tokio::spawn(async move {
                let _ = client_write(&raft, cmd).await;
            });
            return Ok(Ok(crate::state::Applied::Kv { index: 0 }));
        }
        let stats = self.durability.stats();
        stats.pending.inc();
        let started = tokio::time::Instant::now();
        // A proposal's span belongs to the trace of whatever asked for it; a write asked for
        // outside any span (or by a request that tracing sampled out) gets none of its own.
        let span = if tracing::Span::current().is_none() {
            tracing::Span::none()
        } else {
            tracing::info_span!("raft.propose")
        };
        let outcome = tracing::Instrument::instrument(self.propose(cmd), span).await;
        stats.pending.dec();
        match &outcome {
            Ok(_) => stats.commit.observe(started.elapsed().as_secs_f64()),
            Err(_) => {
                stats.failed.inc();
            }
        };
        outcome
    }

    /// What this node's log, state machine and proposals have done.
    pub fn stats(&self) -> Arc<crate::stats::RaftStats> {
        self.durability.stats().clone()
    }

    async fn propose(&self, cmd: Command) -> Result<Response, ConsensusError> {
        // Nothing in flight and nothing queued: propose directly, saving the hand-off.
        if self.permits.available_permits() == IN_FLIGHT
            && self.proposals.capacity() == self.proposals.max_capacity()
            && let Ok(_permit) = self.permits.try_acquire()
        {
            let now = [tokio::time::Instant::now()];
            return propose_entry(&self.raft, self.durability.stats(), cmd, &now).await;
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let stopped = || ConsensusError::Raft("consensus is stopping".into());
        self.proposals
            .send(Proposal {
                cmd,
                reply,
                queued_at: tokio::time::Instant::now(),
            })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// The state; linearizable (confirmed with a quorum, then applied up to that point) unless
    /// `stale`.
    pub async fn read(&self, stale: bool) -> Result<ClusterState, ConsensusError> {
        if !stale {
            self.confirm_leader().await?;
        }
        Ok(self.machine.state())
    }

    /// Confirms with a quorum that this node leads and waits until it has applied what was
    /// committed before the call (Raft's read index), without copying the state.
    pub async fn confirm_leader(&self) -> Result<(), ConsensusError> {
        if let Some(f) = self.following() {
            return Err(ConsensusError::NotLeader { leader: f.leader });
        }
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ConsensusError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Err(e) => Err(ConsensusError::Raft(e.to_string())),
        }
    }

    /// Wakes on every change to this node's applied state.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.machine.subscribe()
    }

    /// Wakes when this node's applied nodes or VMs change.
    pub fn subscribe_workload(&self) -> tokio::sync::watch::Receiver<u64> {
        self.machine.subscribe_workload()
    }

    /// Runs `f` on this node's applied state (stale: not confirmed with the leader).
    pub fn with_local_state<R>(&self, f: impl FnOnce(&crate::state::ClusterState) -> R) -> R {
        self.machine.with_state(f)
    }

    /// Whether this node leads right now, as far as it knows.
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader
    }

    /// Leader, term, indexes and the voter set. On a client, as the followed server said, and
    /// the membership as of the state it follows.
    pub fn status(&self) -> Status {
        let m = self.raft.metrics().borrow().clone();
        let following = self.following();
        let followed_membership;
        let membership = match following {
            Some(_) => {
                followed_membership = self.machine.current_membership();
                followed_membership.membership()
            }
            None => m.membership_config.membership(),
        };
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let learners: BTreeSet<u64> = membership.learner_ids().collect();
        Status {
            id: self.id,
            leader: following.map_or(m.current_leader, |f| f.leader),
            term: following.map_or(m.current_term, |f| f.term),
            applied_index: match following {
                Some(_) => self.machine.applied_index(),
                None => m.last_applied.map(|l| l.index).unwrap_or(0),
            },
            last_log_index: m.last_log_index.unwrap_or(0),
            role: match following {
                Some(_) => "client".into(),
                None => format!("{:?}", m.state).to_lowercase(),
            },
            voters,
            changing: membership.get_joint_config().len() > 1,
            learners,
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
        }
    }

    /// Starts an election on this node: how leadership is handed to it (openraft 0.9 has no
    /// transfer call; a caught-up voter that asks wins, and the old leader steps down).
    pub async fn elect(&self) -> Result<(), ConsensusError> {
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| ConsensusError::Raft(e.to_string()))
    }

    /// Runs the autopilot while this node leads: every `period`, reads the nodes through
    /// `nodes` (membership's view: up, left, how long, zone, gossip address) and executes the
    /// plan. Runs until the task is dropped.
    pub async fn run_autopilot<F>(self, period: Duration, nodes: F)
    where
        F: Fn() -> BTreeMap<u64, (NodeView, SocketAddr)> + Send + Sync + 'static,
    {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let m = self.raft.metrics().borrow().clone();
            if m.state != ServerState::Leader {
                continue;
            }
            let membership = m.membership_config.membership();
            // Wait for a joint config to settle before planning the next change.
            if membership.get_joint_config().len() > 1 {
                continue;
            }
            let raft_view = RaftView {
                leader: self.id,
                voters: membership.voter_ids().collect(),
                learners: membership.learner_ids().collect(),
            };
            let last = m.last_log_index.unwrap_or(0);
            let matched: BTreeMap<u64, u64> = m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, l)| (*id, l.map(|l| l.index).unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default();
            let mut views = nodes();
            for (id, (view, _)) in views.iter_mut() {
                view.lag = if *id == self.id {
                    Some(0)
                } else {
                    matched.get(id).map(|idx| last.saturating_sub(*idx))
                };
            }
            let config = self.machine.config();
            let plan_nodes: BTreeMap<u64, NodeView> =
                views.iter().map(|(id, (v, _))| (*id, v.clone())).collect();
            let p = plan(&plan_nodes, &raft_view, &config);
            if p.is_empty() {
                continue;
            }
            tracing::info!(?p, "autopilot");
            let span = tracing::info_span!(
                "autopilot.step",
                add_learners = p.add_learners.len(),
                voters = p.voters.as_ref().map(|v| v.len()),
                remove_learners = p.remove_learners.len(),
            );
            tracing::Instrument::instrument(self.carry_out(p, &views), span).await;
        }
    }

    /// Carries out one autopilot step, once the last membership change is on disk.
    async fn carry_out(&self, p: Plan, views: &BTreeMap<u64, (NodeView, SocketAddr)>) {
        if !self.membership_settled(Duration::from_secs(5)).await {
            return;
        }
        for id in &p.add_learners {
            let Some((_, addr)) = views.get(id) else {
                continue;
            };
            if let Err(e) = self
                .raft
                .add_learner(
                    *id,
                    Node {
                        addr: addr.to_string(),
                    },
                    false,
                )
                .await
            {
                tracing::warn!(node = id, error = %e, "add learner");
            }
        }
        if let Some(voters) = p.voters
            && let Err(e) = self
                .raft
                .change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
                .await
        {
            tracing::warn!(error = %e, "change voters");
        }
        if !p.remove_learners.is_empty() {
            let gone: BTreeSet<u64> = p.remove_learners.into_iter().collect();
            if let Err(e) = self
                .raft
                .change_membership(ChangeMembers::RemoveNodes(gone), false)
                .await
            {
                tracing::warn!(error = %e, "remove learners");
            }
        }
    }
}
