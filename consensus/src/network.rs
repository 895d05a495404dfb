//! Raft RPC: openraft's append-entries, vote and install-snapshot as request/response byte
//! exchanges over an [`RpcTransport`]. The agent backs the transport with the membership
//! crate's mutual-TLS QUIC endpoint (a bidirectional stream per RPC); this crate never sees
//! a socket.
//!
//! One change to what openraft asks for. As soon as an entry commits, openraft 0.9 sends each
//! follower an empty append to carry the new commit index, and it keeps one append in flight
//! per follower, so a write that arrives meanwhile waits for that round trip before its entry
//! goes out: at one connection, about half of all writes did. A [`Peer`] lets such a
//! commit-only append wait up to [`PIGGYBACK_WAIT`] for the leader's next entry and carries it
//! along; when openraft then sends that entry, the follower's answer is already in hand and
//! the append is not sent again (see [`already_acked`] for why that answer still holds).
//! Heartbeats that carry no new commit index, and the appends openraft sends to confirm its
//! leadership for a linearizable read, go out at once.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, LogId, Raft, StorageIOError, Vote};
use serde::{Deserialize, Serialize};

use crate::durable::Durability;
use crate::machine::{Entry, Node, TypeConfig, decode, encode};

/// How much of an append the target has already acknowledged.
#[derive(Debug, PartialEq, Eq)]
enum Covered {
    /// Every entry: the append need not be sent.
    All,
    /// The first entries, now taken off the append, whose `prev` is moved up to them.
    Prefix,
    /// None of its entries, or it carries none.
    Nothing,
}

/// Takes off `rpc` the entries the target acknowledged, through `acked`, in answer to an
/// append under the same vote. A leader's log only grows within its term, so those are the
/// entries this append carries at the same indexes, and a follower acknowledges an entry only
/// once it is on its disk (see [`crate::durable`]): the answer stays true, as a late answer
/// does in Raft.
fn already_acked(rpc: &mut AppendEntriesRequest<TypeConfig>, acked: LogId<u64>) -> Covered {
    let Some(last) = rpc.entries.last().map(|e| e.log_id) else {
        return Covered::Nothing;
    };
    if last.index <= acked.index {
        return Covered::All;
    }
    if rpc.prev_log_id.is_none_or(|p| p.index < acked.index)
        && rpc.entries.iter().any(|e| e.log_id == acked)
    {
        rpc.entries.retain(|e| e.log_id.index > acked.index);
        rpc.prev_log_id = Some(acked);
        return Covered::Prefix;
    }
    Covered::Nothing
}

/// The node a request says it comes from (the leader or candidate named in its vote).
pub fn sender(request: &RaftRequest) -> Option<u64> {
    match request {
        RaftRequest::Append(r) => r.vote.leader_id().voted_for(),
        RaftRequest::Vote(r) => r.vote.leader_id().voted_for(),
        RaftRequest::Snapshot(r) => r.vote.leader_id().voted_for(),
    }
}

/// A Raft RPC on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    /// Append entries (and heartbeats).
    Append(AppendEntriesRequest<TypeConfig>),
    /// Request a vote.
    Vote(VoteRequest<u64>),
    /// One chunk of a snapshot.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

/// The answer to a [`RaftRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    /// To `Append`.
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// To `Snapshot`.
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// The request did not decode.
    Malformed(String),
}

/// Carries one request to a node and brings back its answer.
pub trait RpcTransport: Send + Sync + 'static {
    /// Sends `payload` to the node `target` at `addr`, waiting at most `timeout`.
    fn call(
        &self,
        target: u64,
        addr: SocketAddr,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>>;
}

/// openraft's network factory over an [`RpcTransport`].
pub struct Network<T> {
    transport: Arc<T>,
    durability: Arc<Durability>,
    recent: Arc<dyn RecentEntries>,
}

/// The newest entries of this node's log, read without going to storage: what a leader's
/// commit-only append carries when new entries arrive while it waits (see [`Peer`]).
pub trait RecentEntries: Send + Sync + 'static {
    /// The entries with indexes in `[start, end)`, if every one of them is at hand.
    fn recent(&self, start: u64, end: u64) -> Option<Vec<Entry>>;
}

/// How long a commit-only append waits for the leader's next entry to carry along.
pub const PIGGYBACK_WAIT: Duration = Duration::from_millis(2);

/// At most this many entries ride on a commit-only append.
const PIGGYBACK_ENTRIES: u64 = 64;

impl<T> Network<T> {
    /// A factory sending through `transport` for the node whose log is `durability`.
    pub fn new(
        transport: Arc<T>,
        durability: Arc<Durability>,
        recent: Arc<dyn RecentEntries>,
    ) -> Self {
        Network {
            transport,
            durability,
            recent,
        }
    }
}

/// The connection to one peer.
pub struct Peer<T> {
    target: u64,
    addr: Option<SocketAddr>,
    transport: Arc<T>,
    durability: Arc<Durability>,
    recent: Arc<dyn RecentEntries>,
    /// The commit index of the last append sent, once one has been.
    last_commit: Option<Option<LogId<u64>>>,
    /// The target's last answer that its log matches this leader's through an entry, with
    /// the vote it answered.
    acked: Option<(Vote<u64>, LogId<u64>)>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

impl<T: RpcTransport> RaftNetworkFactory<TypeConfig> for Network<T> {
    type Network = Peer<T>;

    async fn new_client(&mut self, target: u64, node: &Node) -> Peer<T> {
        Peer {
            target,
            addr: node.addr.parse().ok(),
            transport: self.transport.clone(),
            durability: self.durability.clone(),
            recent: self.recent.clone(),
            last_commit: None,
            acked: None,
        }
    }
}

impl<T: RpcTransport> Peer<T> {
    async fn exchange<E: std::error::Error>(
        &self,
        request: RaftRequest,
        option: &RPCOption,
    ) -> Result<RaftReply, RPCError<u64, Node, E>> {
        let addr = self.addr.ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&Failure(format!(
                "node {} has no valid address",
                self.target
            ))))
        })?;
        let bytes = self
            .transport
            .call(self.target, addr, encode(&request), option.hard_ttl())
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&Failure(e))))?;
        match decode::<RaftReply>(&bytes) {
            Ok(RaftReply::Malformed(e)) => Err(RPCError::Network(NetworkError::new(&Failure(
                format!("peer could not decode our request: {e}"),
            )))),
            Ok(reply) => Ok(reply),
            Err(e) => Err(RPCError::Network(NetworkError::new(&Failure(format!(
                "bad reply: {e}"
            ))))),
        }
    }

    /// Lets a commit-only append carry the leader's next entries: waits up to
    /// [`PIGGYBACK_WAIT`] for an entry after the append's `prev`, and adds what has been
    /// written by then. True if it added any.
    async fn piggyback(&self, rpc: &mut AppendEntriesRequest<TypeConfig>) -> bool {
        let Some(prev) = rpc.prev_log_id else {
            return false;
        };
        let Some(written) = self
            .durability
            .written_after(prev.index, PIGGYBACK_WAIT)
            .await
        else {
            return false;
        };
        let end = written.min(prev.index + PIGGYBACK_ENTRIES) + 1;
        match self.recent.recent(prev.index + 1, end) {
            Some(entries) if !entries.is_empty() => {
                rpc.entries = entries;
                true
            }
            _ => false,
        }
    }

    fn wrong<E: std::error::Error>() -> RPCError<u64, Node, E> {
        RPCError::Network(NetworkError::new(&Failure(
            "reply of the wrong kind".into(),
        )))
    }
}

impl<T: RpcTransport> RaftNetwork<TypeConfig> for Peer<T> {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Node, RaftError<u64>>> {
        if let Some(acked) = self
            .acked
            .filter(|(vote, _)| *vote == rpc.vote)
            .map(|(_, l)| l)
        {
            match already_acked(&mut rpc, acked) {
                Covered::All => return Ok(AppendEntriesResponse::Success),
                Covered::Prefix | Covered::Nothing => {}
            }
        }
        let commit = rpc.leader_commit;
        let prev = rpc.prev_log_id;
        let piggybacked = rpc.entries.is_empty()
            && self.last_commit.is_some_and(|sent| commit > sent)
            && self.piggyback(&mut rpc).await;
        self.last_commit = Some(commit);
        // Never tell a follower to apply what this leader could still lose.
        rpc.leader_commit = self.durability.clamp(commit);
        let vote = rpc.vote;
        let last = rpc.entries.last().map(|e| e.log_id);
        let started = last.is_some().then(std::time::Instant::now);
        let reply = self.exchange(RaftRequest::Append(rpc), &option).await;
        if let Some(started) = started {
            self.durability
                .stats()
                .append_sent
                .observe(started.elapsed().as_secs_f64());
        }
        let answer = match reply {
            Ok(RaftReply::Append(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(Self::wrong()),
            Err(e) => Err(e),
        };
        match answer {
            Ok(AppendEntriesResponse::Success) => {
                if let Some(last) = last {
                    self.acked = Some((vote, last));
                }
                Ok(AppendEntriesResponse::Success)
            }
            // openraft asked for an empty append: that the target matches `prev` is its answer.
            Ok(AppendEntriesResponse::PartialSuccess(Some(matching)))
                if piggybacked && prev.is_some_and(|p| matching.index >= p.index) =>
            {
                self.acked = Some((vote, matching));
                Ok(AppendEntriesResponse::Success)
            }
            other => {
                self.acked = None;
                other
            }
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, Node, RaftError<u64, InstallSnapshotError>>,
    > {
        // A snapshot replaces the target's log: acknowledgements of entries start again.
        self.acked = None;
        match self.exchange(RaftRequest::Snapshot(rpc), &option).await? {
            RaftReply::Snapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(Self::wrong()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, Node, RaftError<u64>>> {
        match self.exchange(RaftRequest::Vote(rpc), &option).await? {
            RaftReply::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(Self::wrong()),
        }
    }
}

/// Decodes a Raft RPC from the wire; what the RPC fuzz target exercises.
pub fn decode_request(bytes: &[u8]) -> Result<RaftRequest, String> {
    decode(bytes)
}

/// The server side: hands one encoded request to the local Raft and encodes its answer. An
/// append is acknowledged only once what the answer claims is on this node's disk.
pub async fn serve(
    raft: &Raft<TypeConfig>,
    durability: &Durability,
    payload: &[u8],
    authorize: impl FnOnce(&RaftRequest) -> Result<(), String>,
) -> Vec<u8> {
    let request = decode_request(payload).and_then(|r| authorize(&r).map(|()| r));
    let reply = match request {
        Ok(RaftRequest::Append(rpc)) => {
            let started = (!rpc.entries.is_empty()).then(std::time::Instant::now);
            let upto = rpc
                .entries
                .last()
                .map(|e| e.log_id)
                .or(rpc.prev_log_id)
                .map(|l| l.index);
            let reply = raft.append_entries(rpc).await;
            if reply.is_ok() {
                durability
                    .stats()
                    .heard_from_leader(tokio::time::Instant::now());
            }
            let claimed = match &reply {
                Ok(AppendEntriesResponse::Success) => upto,
                Ok(AppendEntriesResponse::PartialSuccess(matching)) => matching.map(|l| l.index),
                _ => None,
            };
            let answer = match claimed {
                Some(index) => match durability.wait(index).await {
                    Ok(()) => RaftReply::Append(reply),
                    Err(e) => RaftReply::Append(Err(RaftError::Fatal(Fatal::StorageError(
                        StorageIOError::write_logs(AnyError::error(e)).into(),
                    )))),
                },
                None => RaftReply::Append(reply),
            };
            if let Some(started) = started {
                durability
                    .stats()
                    .append_served
                    .observe(started.elapsed().as_secs_f64());
            }
            answer
        }
        Ok(RaftRequest::Vote(rpc)) => RaftReply::Vote(raft.vote(rpc).await),
        Ok(RaftRequest::Snapshot(rpc)) => RaftReply::Snapshot(raft.install_snapshot(rpc).await),
        Err(e) => RaftReply::Malformed(e),
    };
    encode(&reply)
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};

    use super::{AppendEntriesRequest, Covered, already_acked};
    use crate::machine::{Entry, TypeConfig};

    fn id(index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(3, 1), index)
    }

    fn append(prev: u64, last: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(id(prev)),
            entries: (prev + 1..=last)
                .map(|i| Entry {
                    log_id: id(i),
                    payload: EntryPayload::Blank,
                })
                .collect(),
            leader_commit: Some(id(prev)),
        }
    }

    fn indexes(rpc: &AppendEntriesRequest<TypeConfig>) -> Vec<u64> {
        rpc.entries.iter().map(|e| e.log_id.index).collect()
    }

    #[test]
    fn an_append_the_target_acknowledged_whole_is_not_sent() {
        let mut rpc = append(4, 6);
        assert_eq!(already_acked(&mut rpc, id(6)), Covered::All);
        let mut rpc = append(4, 6);
        assert_eq!(already_acked(&mut rpc, id(9)), Covered::All);
    }

    #[test]
    fn an_acknowledged_prefix_is_taken_off_and_prev_moves_up() {
        let mut rpc = append(4, 8);
        assert_eq!(already_acked(&mut rpc, id(6)), Covered::Prefix);
        assert_eq!(rpc.prev_log_id, Some(id(6)));
        assert_eq!(indexes(&rpc), [7, 8]);
    }

    #[test]
    fn nothing_is_taken_off_without_a_matching_acknowledgement() {
        // Acknowledged up to before this append.
        let mut rpc = append(4, 8);
        assert_eq!(already_acked(&mut rpc, id(3)), Covered::Nothing);
        assert_eq!(indexes(&rpc), [5, 6, 7, 8]);
        // An acknowledgement at the same index under another leader's entry.
        let other = LogId::new(CommittedLeaderId::new(2, 2), 6);
        assert_eq!(already_acked(&mut rpc, other), Covered::Nothing);
        assert_eq!(indexes(&rpc), [5, 6, 7, 8]);
        assert_eq!(rpc.prev_log_id, Some(id(4)));
        // An empty append carries nothing to take off.
        let mut empty = append(8, 8);
        assert_eq!(already_acked(&mut empty, id(8)), Covered::Nothing);
    }
}
