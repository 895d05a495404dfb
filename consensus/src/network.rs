//! Raft RPC: openraft's append-entries, vote and install-snapshot as request/response byte
//! exchanges over an [`RpcTransport`]. The agent backs the transport with the membership
//! crate's mutual-TLS QUIC endpoint (a bidirectional stream per RPC); this crate never sees
//! a socket.
//!
//! One change to how openraft's appends travel. As soon as an entry commits, openraft 0.9
//! sends each follower an empty append to carry the new commit index, and it keeps one append
//! in flight per follower; a write that arrives meanwhile waits for that round trip before its
//! entry goes out (at one connection, about half of all writes did). When the follower has
//! already answered that it holds the append's `prev_log_id` under the same vote, the answer
//! to such a commit-only append is known: a [`Peer`] answers openraft at once and sends it
//! [`COALESCE`] later from a task of its own, unless the next entry carried its commit index
//! first (see [`Peer::append_entries`]). Heartbeats that carry no new commit index,
//! and the appends openraft sends to confirm its leadership for a linearizable read, always
//! wait for the follower.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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
use crate::machine::{Node, TypeConfig, decode, encode};

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
}

impl<T> Network<T> {
    /// A factory sending through `transport` for the node whose log is `durability`.
    pub fn new(transport: Arc<T>, durability: Arc<Durability>) -> Self {
        Network {
            transport,
            durability,
        }
    }
}

/// The connection to one peer.
pub struct Peer<T> {
    target: u64,
    addr: Option<SocketAddr>,
    transport: Arc<T>,
    durability: Arc<Durability>,
    /// The commit index carried by the last append sent, once one has been.
    sent_commit: Option<Option<LogId<u64>>>,
    /// What this peer and the commit-only appends it sent without waiting share.
    shared: Arc<Mutex<Shared>>,
}

/// What a [`Peer`] knows of its target, shared with its commit-only appends waiting to go.
#[derive(Default)]
struct Shared {
    /// The target's last answer that its log matches this leader's through a log id, with the
    /// vote it answered under. A commit-only append sent without waiting clears it if its
    /// answer turns out to be anything else.
    confirmed: Option<(Vote<u64>, Option<LogId<u64>>)>,
    /// The highest commit index an append has carried to the target.
    carried: Option<LogId<u64>>,
}

impl Shared {
    /// Locks `shared`, even after a panic elsewhere: every field is valid on its own.
    fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
        shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How long a commit-only append whose answer is known waits before it goes: if the leader's
/// next entry goes out meanwhile, it carries the commit index and this append is not needed.
const COALESCE: Duration = Duration::from_millis(1);

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
            sent_commit: None,
            shared: Arc::default(),
        }
    }
}

/// Sends `request` to `target` and decodes its answer.
async fn exchange<T: RpcTransport, E: std::error::Error>(
    transport: &T,
    target: u64,
    addr: Option<SocketAddr>,
    request: &RaftRequest,
    timeout: Duration,
) -> Result<RaftReply, RPCError<u64, Node, E>> {
    let addr = addr.ok_or_else(|| {
        RPCError::Unreachable(Unreachable::new(&Failure(format!(
            "node {target} has no valid address"
        ))))
    })?;
    let bytes = transport
        .call(target, addr, encode(request), timeout)
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

impl<T: RpcTransport> Peer<T> {
    async fn exchange<E: std::error::Error>(
        &self,
        request: RaftRequest,
        option: &RPCOption,
    ) -> Result<RaftReply, RPCError<u64, Node, E>> {
        exchange(
            &*self.transport,
            self.target,
            self.addr,
            &request,
            option.hard_ttl(),
        )
        .await
    }

    fn wrong<E: std::error::Error>() -> RPCError<u64, Node, E> {
        RPCError::Network(NetworkError::new(&Failure(
            "reply of the wrong kind".into(),
        )))
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        Shared::lock(&self.shared)
    }

    /// Whether `rpc` only brings the target a new commit index for a log it has already
    /// answered that it holds, under the same vote. Such an append's answer is known before it
    /// is sent: a leader's log only grows within its term, and a follower holds what it
    /// acknowledged (it answers only once entries are on its disk, see [`crate::durable`]).
    fn answer_is_known(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        rpc.entries.is_empty()
            && self
                .sent_commit
                .is_some_and(|sent| sent < rpc.leader_commit)
            && self
                .shared()
                .confirmed
                .is_some_and(|(vote, matching)| vote == rpc.vote && matching == rpc.prev_log_id)
    }

    /// Sends a commit-only append whose answer is known, without holding up openraft. It waits
    /// [`COALESCE`] first and is dropped if another append carried its commit index by then.
    /// An answer other than success (the target moved to a newer vote, or could not be
    /// reached) clears what the target confirmed, so openraft's next append waits and hears it.
    fn send_detached(&self, rpc: AppendEntriesRequest<TypeConfig>, timeout: Duration) {
        let transport = self.transport.clone();
        let (target, addr) = (self.target, self.addr);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(COALESCE).await;
            {
                let mut shared = Shared::lock(&shared);
                if shared.carried >= rpc.leader_commit {
                    return;
                }
                shared.carried = rpc.leader_commit;
            }
            let request = RaftRequest::Append(rpc);
            let reply =
                exchange::<T, RaftError<u64>>(&*transport, target, addr, &request, timeout).await;
            if !matches!(
                reply,
                Ok(RaftReply::Append(Ok(AppendEntriesResponse::Success)))
            ) {
                tracing::debug!(target, "a commit-only append was not answered with success");
                Shared::lock(&shared).confirmed = None;
            }
        });
    }
}

impl<T: RpcTransport> RaftNetwork<TypeConfig> for Peer<T> {
    /// Sends one append and returns the target's answer. A commit-only append whose answer is
    /// known (see [`Peer::answer_is_known`]) is sent without waiting, so the leader's next
    /// entry does not queue behind its round trip; the follower hears the commit index with
    /// the next entry or [`COALESCE`] later.
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Node, RaftError<u64>>> {
        // Never tell a follower to apply what this leader could still lose.
        rpc.leader_commit = self.durability.clamp(rpc.leader_commit);
        let known = self.answer_is_known(&rpc);
        self.sent_commit = Some(rpc.leader_commit);
        if known {
            self.send_detached(rpc, option.hard_ttl());
            return Ok(AppendEntriesResponse::Success);
        }
        {
            let mut shared = self.shared();
            shared.carried = shared.carried.max(rpc.leader_commit);
        }
        let vote = rpc.vote;
        let upto = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        let started = (!rpc.entries.is_empty()).then(tokio::time::Instant::now);
        let reply = self.exchange(RaftRequest::Append(rpc), &option).await;
        if let Some(started) = started {
            self.durability
                .stats()
                .append_sent
                .observe(started.elapsed().as_secs_f64());
        }
        let confirmed = match &reply {
            Ok(RaftReply::Append(Ok(AppendEntriesResponse::Success))) => Some((vote, upto)),
            Ok(RaftReply::Append(Ok(AppendEntriesResponse::PartialSuccess(matching)))) => {
                Some((vote, *matching))
            }
            _ => None,
        };
        self.shared().confirmed = confirmed;
        match reply? {
            RaftReply::Append(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(Self::wrong()),
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
            let started = (!rpc.entries.is_empty()).then(tokio::time::Instant::now);
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
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::machine::Entry;

    /// Answers every append with success, or with `higher` once that is set, and records what
    /// it was sent.
    struct Scripted {
        higher: Mutex<Option<Vote<u64>>>,
        /// Per append: how many entries it carried and its commit index.
        sent: Mutex<Vec<(usize, Option<u64>)>>,
    }

    impl RpcTransport for Scripted {
        fn call(
            &self,
            _target: u64,
            _addr: SocketAddr,
            payload: Vec<u8>,
            _timeout: Duration,
        ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
            Box::pin(async move {
                let Ok(RaftRequest::Append(rpc)) = decode_request(&payload) else {
                    return Err("not an append".to_string());
                };
                self.sent
                    .lock()
                    .unwrap()
                    .push((rpc.entries.len(), rpc.leader_commit.map(|l| l.index)));
                let answer = match *self.higher.lock().unwrap() {
                    Some(vote) => AppendEntriesResponse::HigherVote(vote),
                    None => AppendEntriesResponse::Success,
                };
                Ok(encode(&RaftReply::Append(Ok(answer))))
            })
        }
    }

    fn log(index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    fn append(prev: u64, upto: u64, commit: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(log(prev)),
            entries: (prev + 1..=upto)
                .map(|i| Entry {
                    log_id: log(i),
                    payload: EntryPayload::Blank,
                })
                .collect(),
            leader_commit: Some(log(commit)),
        }
    }

    /// A leader whose log is on disk through index 10, and its connection to node 2.
    async fn peer() -> (Arc<Scripted>, Peer<Scripted>) {
        let transport = Arc::new(Scripted {
            higher: Mutex::new(None),
            sent: Mutex::new(Vec::new()),
        });
        let mut network = Network::new(transport.clone(), Durability::new(1, None, Some(log(10))));
        let peer = network.new_client(2, &Node::new("127.0.0.1:7946")).await;
        (transport, peer)
    }

    /// Has `peer` send an append of entries `prev + 1 ..= upto` and commit index `commit`.
    async fn send(
        peer: &mut Peer<Scripted>,
        prev: u64,
        upto: u64,
        commit: u64,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Node, RaftError<u64>>> {
        let option = RPCOption::new(Duration::from_millis(150));
        peer.append_entries(append(prev, upto, commit), option)
            .await
    }

    fn sent(t: &Scripted) -> Vec<(usize, Option<u64>)> {
        t.sent.lock().unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_only_append_is_answered_at_once_and_sent_after_a_pause() {
        let (t, mut peer) = peer().await;
        send(&mut peer, 3, 5, 3).await.unwrap();
        let answer = send(&mut peer, 5, 5, 5).await;
        assert!(matches!(answer, Ok(AppendEntriesResponse::Success)));
        assert_eq!(sent(&t), [(2, Some(3))], "sent before its pause");
        tokio::time::sleep(COALESCE * 2).await;
        assert_eq!(sent(&t), [(2, Some(3)), (0, Some(5))]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_only_append_is_dropped_when_the_next_entry_carries_its_commit() {
        let (t, mut peer) = peer().await;
        send(&mut peer, 3, 5, 3).await.unwrap();
        send(&mut peer, 5, 5, 5).await.unwrap();
        send(&mut peer, 5, 6, 5).await.unwrap();
        tokio::time::sleep(COALESCE * 2).await;
        assert_eq!(sent(&t), [(2, Some(3)), (1, Some(5))]);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_and_appends_without_a_confirmed_prev_wait_for_the_answer() {
        let (t, mut peer) = peer().await;
        // Nothing confirmed yet: even a new commit index waits for the follower.
        send(&mut peer, 5, 5, 5).await.unwrap();
        assert_eq!(sent(&t).len(), 1);
        // Confirmed through 5, but the same commit index again: a heartbeat.
        send(&mut peer, 5, 5, 5).await.unwrap();
        assert_eq!(sent(&t).len(), 2);
        // A new commit index on a prev the follower never confirmed.
        send(&mut peer, 4, 4, 6).await.unwrap();
        assert_eq!(sent(&t).len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_other_than_success_makes_the_next_commit_only_append_wait() {
        let (t, mut peer) = peer().await;
        send(&mut peer, 3, 5, 3).await.unwrap();
        let newer = Vote::new_committed(2, 3);
        *t.higher.lock().unwrap() = Some(newer);
        // Answered at once; the follower's real answer comes back after the pause.
        send(&mut peer, 5, 5, 5).await.unwrap();
        tokio::time::sleep(COALESCE * 2).await;
        assert_eq!(sent(&t).len(), 2);
        // The next commit-only append is not taken as known: openraft hears the newer vote.
        let answer = send(&mut peer, 5, 5, 6).await;
        assert!(
            matches!(answer, Ok(AppendEntriesResponse::HigherVote(v)) if v == newer),
            "{answer:?}"
        );
        assert_eq!(sent(&t).len(), 3);
    }
}
