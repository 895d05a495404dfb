//! Raft RPC: openraft's append-entries, vote and install-snapshot as request/response byte
//! exchanges over an [`RpcTransport`]. The agent backs the transport with the membership
//! crate's mutual-TLS QUIC endpoint (a bidirectional stream per RPC); this crate never sees
//! a socket.

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
use openraft::{AnyError, Raft, StorageIOError};
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
        // Never tell a follower to apply what this leader could still lose.
        rpc.leader_commit = self.durability.clamp(rpc.leader_commit);
        let started = (!rpc.entries.is_empty()).then(tokio::time::Instant::now);
        let reply = self.exchange(RaftRequest::Append(rpc), &option).await;
        if let Some(started) = started {
            self.durability
                .stats()
                .append_sent
                .observe(started.elapsed().as_secs_f64());
        }
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
