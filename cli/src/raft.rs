//! The agent's consensus wiring: Raft RPC and forwarded writes and reads over the membership
//! crate's QUIC endpoint, and the autopilot's view of the members.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use blx_consensus::access::{Caller, Denied};
use blx_consensus::autopilot::NodeView;
use blx_consensus::machine::{Response, decode, encode};
use blx_consensus::node::{ConsensusError, ConsensusNode};
use blx_consensus::state::{ClusterState, Command};
use blx_membership::quic::QuicTransport;
use blx_membership::wire::{ControlRequest, ControlResponse};
use blx_membership::{MemberState, Membership, NodeId};
use tokio::time::Instant;

/// Raft RPCs.
pub(crate) const SERVICE_RAFT: u8 = 1;
/// A client write forwarded to the leader.
pub(crate) const SERVICE_WRITE: u8 = 2;
/// A linearizable read forwarded to the leader.
pub(crate) const SERVICE_READ: u8 = 3;
/// Ask a voter to start an election (leadership transfer).
pub(crate) const SERVICE_ELECT: u8 = 4;
/// The leader's read index: what a node must have applied to be as current as the leader.
pub(crate) const SERVICE_INDEX: u8 = 5;
/// The tail of a VM's console log, from the node that hosts it.
pub(crate) const SERVICE_LOGS: u8 = 6;

/// A client's watch on a server (see [`crate::follow`]).
pub(crate) const SERVICE_WATCH: u8 = 7;

/// A service's name in the traffic counters.
pub(crate) fn service_kind(service: u8) -> &'static str {
    match service {
        SERVICE_RAFT => "raft",
        SERVICE_WATCH => "watch",
        SERVICE_WRITE | SERVICE_READ | SERVICE_INDEX => "forward",
        _ => "control",
    }
}

/// Most console log bytes sent in one answer.
pub(crate) const MAX_LOG_TAIL: u64 = 1024 * 1024;

/// How long a forwarded write or read may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a linearizable read waits for a leader to answer (an election, as after a whole
/// cluster restarts) before it is refused with "no leader".
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// Raft's node id for a membership node id.
pub(crate) fn raft_id(id: NodeId) -> u64 {
    u64::from_be_bytes(id.0)
}

pub(crate) fn node_id(raft: u64) -> NodeId {
    NodeId(raft.to_be_bytes())
}

/// Carries Raft's bytes on QUIC control streams.
pub(crate) struct QuicRpc {
    pub(crate) transport: QuicTransport,
    /// When each peer last answered.
    pub(crate) contact: Arc<RaftContact>,
}

/// When each Raft peer last answered this node, or renewed its lease through it, by Raft id.
/// On the leader, which sends every peer a heartbeat each [`blx_consensus::node::HEARTBEAT`] and confirms every
/// lease renewal, a recent word is first-hand proof that the peer is up and hears the leader,
/// so the peer's worker is not fencing its VMs. Gossip can say otherwise for a moment: a node
/// cut off from the rest declares the others down, and when the cut heals its gossip carries
/// those verdicts to the majority before the accused refute them. The other way round, a long
/// silence proves that a node's lease has lapsed, so its VMs are stopped (see [`Self::lapsed`]).
#[derive(Default)]
pub(crate) struct RaftContact(
    std::sync::Mutex<std::collections::BTreeMap<u64, tokio::time::Instant>>,
);

impl RaftContact {
    /// How recent a word must be to outweigh gossip: a heartbeat and 700 ms, within which a
    /// live server answers one, and a node holding VMs renews its lease at least once. A peer
    /// that is really gone went silent well before gossip declares it down (seconds), so this
    /// delays no failover.
    pub(crate) const FRESH: Duration = Duration::from_millis(1700);

    /// How long after a node's last word its lease has certainly lapsed: the worker's fence
    /// time ([`crate::worker::FENCE_AFTER`]), the 250 ms between its checks, and margin.
    pub(crate) const LAPSED: Duration = Duration::from_millis(2000);

    pub(crate) fn answered(&self, peer: u64) {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.insert(peer, tokio::time::Instant::now());
    }

    /// Whether `peer` answered within [`Self::FRESH`].
    pub(crate) fn fresh(&self, peer: u64) -> bool {
        let seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&peer)
            .is_some_and(|at| at.elapsed() <= Self::FRESH)
    }

    /// Whether `peer`'s lease on its VMs has certainly lapsed, so its worker has stopped
    /// them: [`Self::LAPSED`] has passed since its last word here, and since `floor`, a
    /// moment before which this node cannot vouch for having heard every renewal (see
    /// [`crate::controller::Tenure`]). A lease renewal reaches this node, as leader, after the
    /// node asked for it, and the node's lease runs from its asking.
    pub(crate) fn lapsed(
        &self,
        peer: u64,
        floor: tokio::time::Instant,
        now: tokio::time::Instant,
    ) -> bool {
        let seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let last = seen.get(&peer).map_or(floor, |at| (*at).max(floor));
        now.saturating_duration_since(last) >= Self::LAPSED
    }
}

impl blx_consensus::network::RpcTransport for QuicRpc {
    fn call(
        &self,
        target: u64,
        addr: SocketAddr,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send + '_>>
    {
        Box::pin(async move {
            let request = ControlRequest::Service {
                service: SERVICE_RAFT,
                payload,
            };
            match self
                .transport
                .request_within(addr, Some(node_id(target)), &request, timeout)
                .await
            {
                Ok(ControlResponse::Service(bytes)) => {
                    self.contact.answered(target);
                    Ok(bytes)
                }
                Ok(ControlResponse::Failed(e)) => Err(e),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

/// Why a write or read failed, as the API reports it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClusterError {
    /// No leader is known right now (an election is under way, or no quorum).
    #[error("no leader is known right now; retry shortly")]
    NoLeader,
    /// The consensus layer failed.
    #[error("{0}")]
    Consensus(String),
    /// The leader changed while a forwarded request was in flight: a write may or may not
    /// have been applied.
    #[error(
        "the leader changed while the request was in flight (a write may or may not have been applied); retry"
    )]
    LeaderChanged,
    /// The caller's API token does not allow the write (checked where the write is proposed).
    #[error("{0}")]
    Denied(Denied),
}

impl ClusterError {
    /// No leader answered: one may a moment later.
    fn leaderless(&self) -> bool {
        matches!(self, ClusterError::NoLeader | ClusterError::LeaderChanged)
    }
}

/// The error a member answered a forwarded read with, as this node's error: the member this
/// one took for the leader saying it does not lead (any more, or not yet) is "no leader".
fn remote_error(message: String) -> ClusterError {
    if message == (ConsensusError::NotLeader { leader: None }).to_string() {
        ClusterError::NoLeader
    } else {
        ClusterError::Consensus(message)
    }
}

/// Why the leader did not commit a forwarded write, as it answers the forwarding member.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum WriteRefusal {
    /// The caller's token does not allow it.
    Denied(Denied),
    /// Anything else.
    Failed(String),
}

/// The agent's handle on consensus, with forwarding to the leader.
#[derive(Clone)]
pub(crate) struct Cluster {
    pub(crate) node: ConsensusNode,
    membership: Membership,
    transport: QuicTransport,
    /// This node's VM run directories (console logs).
    pub(crate) run_root: std::path::PathBuf,
    /// This node's id.
    pub(crate) self_id: NodeId,
    /// The wall clock, for the stamps on state changes.
    pub(crate) clock: Arc<dyn crate::world::WallClock>,
    /// This agent's metrics.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// This node's audit log, written while it leads.
    pub(crate) audit: Arc<crate::audit::AuditLog>,
    /// When each peer last answered this node's Raft, or asked it for a read index.
    pub(crate) contact: Arc<RaftContact>,
}

impl Cluster {
    pub(crate) fn new(
        node: ConsensusNode,
        membership: Membership,
        transport: QuicTransport,
        run_root: std::path::PathBuf,
        self_id: NodeId,
        clock: Arc<dyn crate::world::WallClock>,
        audit_dir: &std::path::Path,
        contact: Arc<RaftContact>,
    ) -> std::io::Result<Self> {
        let metrics = Arc::new(crate::metrics::Metrics::new(
            node.clone(),
            membership.clone(),
            self_id,
        ));
        let audit = Arc::new(crate::audit::AuditLog::open(
            audit_dir,
            metrics.audit_failures.clone(),
        )?);
        Ok(Cluster {
            node,
            membership,
            transport,
            run_root,
            self_id,
            clock,
            metrics,
            audit,
            contact,
        })
    }

    /// Audits a command this node proposed as leader for `node`'s `caller`.
    pub(crate) fn audit(
        &self,
        node: NodeId,
        caller: Caller,
        cmd: &Command,
        outcome: &Result<Response, String>,
    ) {
        self.audit
            .record(self.clock.now_ms(), node, caller, cmd, outcome);
    }

    fn leader_addr(&self, leader: u64) -> Option<SocketAddr> {
        self.membership
            .members()
            .get(&node_id(leader))
            .map(|m| m.identity.addr)
    }

    async fn forward(
        &self,
        leader: Option<u64>,
        service: u8,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, ClusterError> {
        let leader = leader
            .or(self.node.status().leader)
            .ok_or(ClusterError::NoLeader)?;
        let addr = self.leader_addr(leader).ok_or(ClusterError::NoLeader)?;
        if self
            .membership
            .members()
            .get(&node_id(leader))
            .is_some_and(|m| matches!(m.state, MemberState::Down | MemberState::Left))
        {
            return Err(ClusterError::NoLeader);
        }
        let request = ControlRequest::Service { service, payload };
        // A leader that dies mid-request never answers: stop waiting as soon as this node
        // learns of another leader (or of none), rather than at the timeout.
        let request =
            self.transport
                .request_within(addr, Some(node_id(leader)), &request, FORWARD_TIMEOUT);
        let answer = tokio::select! {
            answer = request => answer,
            () = self.node.wait_leader(|l| l != Some(leader)) => {
                return Err(ClusterError::LeaderChanged);
            }
        };
        match answer {
            Ok(ControlResponse::Service(bytes)) => Ok(bytes),
            Ok(ControlResponse::Failed(e)) => Err(ClusterError::Consensus(e)),
            Ok(other) => Err(ClusterError::Consensus(format!(
                "unexpected answer {other:?}"
            ))),
            Err(e) => Err(ClusterError::Consensus(format!(
                "forwarding to the leader: {e}"
            ))),
        }
    }

    /// Writes through the leader, wherever it is, for the caller of the API request being
    /// served (see [`crate::access::CALLER`]), or for this node outside a request.
    pub(crate) async fn write(&self, cmd: Command) -> Result<Response, ClusterError> {
        let caller = crate::access::CALLER
            .try_with(|c| *c)
            .unwrap_or(Caller::Node);
        self.authorize(caller, &cmd).map_err(ClusterError::Denied)?;
        let started = tokio::time::Instant::now();
        let outcome = self.write_as(caller, cmd).await;
        if outcome.is_ok() {
            self.metrics
                .proposal
                .observe(started.elapsed().as_secs_f64());
        }
        outcome
    }

    async fn write_as(&self, caller: Caller, cmd: Command) -> Result<Response, ClusterError> {
        let outcome = self.node.write(cmd.clone()).await;
        // Audited where the leader decided. A follower refuses a command that fails its own
        // validation without asking anyone; that changes nothing and is not audited.
        if !matches!(outcome, Err(ConsensusError::NotLeader { .. })) && self.node.is_leader() {
            let seen = outcome
                .as_ref()
                .map(Clone::clone)
                .map_err(ToString::to_string);
            self.audit(self.self_id, caller, &cmd, &seen);
        }
        match outcome {
            Ok(r) => Ok(r),
            Err(ConsensusError::NotLeader { leader }) => {
                let bytes = self
                    .forward(
                        leader,
                        SERVICE_WRITE,
                        encode(&ForwardedWrite {
                            caller,
                            cmd,
                            traceparent: crate::telemetry::current_traceparent(),
                        }),
                    )
                    .await?;
                match decode::<Result<Response, WriteRefusal>>(&bytes)
                    .map_err(ClusterError::Consensus)?
                {
                    Ok(r) => Ok(r),
                    Err(WriteRefusal::Denied(d)) => Err(ClusterError::Denied(d)),
                    Err(WriteRefusal::Failed(e)) => Err(ClusterError::Consensus(e)),
                }
            }
            Err(e) => Err(ClusterError::Consensus(e.to_string())),
        }
    }

    /// Whether `caller` may have `cmd` committed, by this node's applied records: an API
    /// token must be valid now and of the command's scope. The member that took the request
    /// checked the token's secret; the leader checks the record again before proposing.
    fn authorize(&self, caller: Caller, cmd: &Command) -> Result<(), Denied> {
        let Caller::Token(id) = caller else {
            return Ok(());
        };
        let now = self.clock.now_unix();
        self.node.with_local_state(|s| match &s.authority {
            Some(a) => a.authorize(id, now, cmd.scope()).map(|_| ()),
            None => Err(Denied::Unknown),
        })
    }

    /// Runs `f` on this node's state once it is as current as the leader's (a read-index
    /// read): without a leader that a quorum confirms, an error, never a stale answer.
    pub(crate) async fn fresh<R>(
        &self,
        f: impl FnOnce(&ClusterState) -> R,
    ) -> Result<R, ClusterError> {
        let index = self.read_index().await?;
        let mut applied = self.node.subscribe();
        let caught_up =
            tokio::time::timeout(FORWARD_TIMEOUT / 2, applied.wait_for(|a| *a >= index))
                .await
                .is_ok_and(|r| r.is_ok());
        if !caught_up {
            return Err(ClusterError::Consensus(format!(
                "this node has not caught up to the leader's index {index}"
            )));
        }
        Ok(self.node.with_local_state(f))
    }

    /// Reads the state: this node's copy if `stale`; otherwise linearizable. A follower asks
    /// the leader for its read index, waits to have applied that far, and reads its own copy
    /// (Raft's read-index read, served by followers), so no state crosses the network; only if
    /// it cannot catch up in time does the leader send its copy.
    pub(crate) async fn read(&self, stale: bool) -> Result<ClusterState, ClusterError> {
        if stale {
            return Ok(self.node.with_local_state(ClusterState::clone));
        }
        self.while_leaderless(|| self.read_once()).await
    }

    async fn read_once(&self) -> Result<ClusterState, ClusterError> {
        match self.node.read(false).await {
            Ok(s) => Ok(s),
            Err(ConsensusError::NotLeader { leader }) => {
                let bytes = self.forward(leader, SERVICE_INDEX, Vec::new()).await?;
                let index = decode::<Result<u64, String>>(&bytes)
                    .map_err(ClusterError::Consensus)?
                    .map_err(remote_error)?;
                let mut applied = self.node.subscribe();
                let caught_up =
                    tokio::time::timeout(FORWARD_TIMEOUT / 2, applied.wait_for(|a| *a >= index))
                        .await
                        .is_ok_and(|r| r.is_ok());
                if caught_up {
                    return Ok(self.node.with_local_state(ClusterState::clone));
                }
                let bytes = self.forward(leader, SERVICE_READ, Vec::new()).await?;
                decode::<Result<ClusterState, String>>(&bytes)
                    .map_err(ClusterError::Consensus)?
                    .map_err(remote_error)
            }
            Err(e) => Err(ClusterError::Consensus(e.to_string())),
        }
    }

    /// Whether this node's gossip view shows a majority of the Raft voters alive (itself
    /// included). A node that does not is cut off from the cluster, or the cluster has lost
    /// its quorum.
    pub(crate) fn sees_majority(&self) -> bool {
        let status = self.node.status();
        let members = self.membership.members();
        let alive = status
            .voters
            .iter()
            .filter(|v| {
                **v == status.id
                    || members
                        .get(&node_id(**v))
                        .is_some_and(|m| m.state == MemberState::Alive)
            })
            .count();
        status.voters.is_empty() || alive * 2 > status.voters.len()
    }

    /// The leader's read index: the applied index at which the leader confirmed, with a
    /// quorum, that it still leads. A node that has applied up to it is as current as the
    /// leader was when asked.
    pub(crate) async fn read_index(&self) -> Result<u64, ClusterError> {
        self.while_leaderless(|| self.read_index_once()).await
    }

    async fn read_index_once(&self) -> Result<u64, ClusterError> {
        match self.node.confirm_leader().await {
            Ok(()) => Ok(self.node.status().applied_index),
            Err(ConsensusError::NotLeader { leader }) => {
                let bytes = self.forward(leader, SERVICE_INDEX, Vec::new()).await?;
                decode::<Result<u64, String>>(&bytes)
                    .map_err(ClusterError::Consensus)?
                    .map_err(remote_error)
            }
            Err(e) => Err(ClusterError::Consensus(e.to_string())),
        }
    }

    /// Runs a read until it gets past "no leader": an election under way, a leader that has
    /// just won and does not serve reads yet, or one that changed mid-request. A read changes
    /// nothing, so it may be tried again; it waits for the next leader change or 100 ms
    /// between tries, and for [`LEADER_WAIT`] in all, then answers with the last error.
    async fn while_leaderless<T, F, Fut>(&self, mut attempt: F) -> Result<T, ClusterError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClusterError>>,
    {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let known = self.node.status().leader;
            match attempt().await {
                Err(e) if e.leaderless() && Instant::now() < deadline => {
                    let pause = deadline.min(Instant::now() + Duration::from_millis(100));
                    let _ = tokio::time::timeout_at(
                        pause,
                        self.node.wait_leader(|l| l.is_some() && l != known),
                    )
                    .await;
                }
                other => return other,
            }
        }
    }

    /// The tail of a VM's console log from the node that hosts it (hex id).
    pub(crate) async fn console_log(
        &self,
        node: &str,
        vm: &str,
        max: u64,
    ) -> Result<Vec<u8>, ClusterError> {
        let id: NodeId = node
            .parse()
            .map_err(|_| ClusterError::Consensus(format!("bad node id {node}")))?;
        if id == self.self_id {
            return crate::console::console_tail(&self.run_root, vm, max)
                .map_err(ClusterError::Consensus);
        }
        let addr = self
            .membership
            .members()
            .get(&id)
            .map(|m| m.identity.addr)
            .ok_or_else(|| ClusterError::Consensus(format!("node {node} is not a member")))?;
        let request = ControlRequest::Service {
            service: SERVICE_LOGS,
            payload: encode(&(vm.to_string(), max)),
        };
        match self
            .transport
            .request_within(addr, Some(id), &request, FORWARD_TIMEOUT)
            .await
        {
            Ok(ControlResponse::Service(bytes)) => decode::<Result<Vec<u8>, String>>(&bytes)
                .map_err(ClusterError::Consensus)?
                .map_err(ClusterError::Consensus),
            Ok(ControlResponse::Failed(e)) => Err(ClusterError::Consensus(e)),
            Ok(other) => Err(ClusterError::Consensus(format!(
                "unexpected answer {other:?}"
            ))),
            Err(e) => Err(ClusterError::Consensus(format!("asking node {node}: {e}"))),
        }
    }

    /// Hands leadership to `to` (or to another voter): asks it to stand for election and
    /// waits until it leads.
    pub(crate) async fn transfer_leader(&self, to: Option<u64>) -> Result<u64, ClusterError> {
        let status = self.node.status();
        let leader = status.leader.ok_or(ClusterError::NoLeader)?;
        let target = match to {
            Some(t) if status.voters.contains(&t) => t,
            Some(t) => return Err(ClusterError::Consensus(format!("{t:016x} is not a voter"))),
            None => *status
                .voters
                .iter()
                .find(|v| **v != leader)
                .ok_or_else(|| {
                    ClusterError::Consensus("there is no other voter to hand leadership to".into())
                })?,
        };
        if target == leader {
            return Ok(target);
        }
        if target == status.id {
            self.node
                .elect()
                .await
                .map_err(|e| ClusterError::Consensus(e.to_string()))?;
        } else {
            let addr = self.leader_addr(target).ok_or(ClusterError::NoLeader)?;
            let request = ControlRequest::Service {
                service: SERVICE_ELECT,
                payload: Vec::new(),
            };
            match self
                .transport
                .request_within(addr, Some(node_id(target)), &request, FORWARD_TIMEOUT)
                .await
            {
                Ok(ControlResponse::Service(_)) => {}
                Ok(other) => {
                    return Err(ClusterError::Consensus(format!(
                        "unexpected answer {other:?}"
                    )));
                }
                Err(e) => return Err(ClusterError::Consensus(e.to_string())),
            }
        }
        let done = tokio::time::timeout(
            FORWARD_TIMEOUT,
            self.node.wait_leader(|l| l == Some(target)),
        )
        .await;
        match done {
            Ok(()) => Ok(target),
            _ => Err(ClusterError::Consensus(format!(
                "{target:016x} did not take over within {}s",
                FORWARD_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Serves a consensus service request from another member.
    pub(crate) async fn serve(&self, from: NodeId, service: u8, payload: &[u8]) -> ControlResponse {
        match service {
            SERVICE_RAFT => {
                ControlResponse::Service(self.node.serve_rpc(raft_id(from), payload).await)
            }
            SERVICE_WRITE => {
                let result = match decode::<ForwardedWrite>(payload) {
                    Ok(ForwardedWrite {
                        caller,
                        cmd,
                        traceparent,
                    }) => match check_forwarded(from, &cmd) {
                        Ok(()) => match self.authorize(caller, &cmd) {
                            Ok(()) => {
                                let tp = traceparent.as_deref();
                                let span = if crate::telemetry::wants_remote_span(tp) {
                                    let span = tracing::info_span!(
                                        "raft.forwarded_write",
                                        otel.kind = "server",
                                        from = %from,
                                        command = command_name(&cmd),
                                    );
                                    crate::telemetry::set_parent(&span, tp);
                                    span
                                } else {
                                    tracing::Span::none()
                                };
                                // Audited inside the span, so the record names its trace.
                                let outcome = tracing::Instrument::instrument(
                                    async {
                                        let outcome = self
                                            .node
                                            .write(cmd.clone())
                                            .await
                                            .map_err(|e| e.to_string());
                                        self.audit(from, caller, &cmd, &outcome);
                                        outcome
                                    },
                                    span,
                                )
                                .await;
                                outcome.map_err(WriteRefusal::Failed)
                            }
                            Err(d) => {
                                tracing::warn!(%from, %caller, refusal = %d, "forwarded write refused");
                                Err(WriteRefusal::Denied(d))
                            }
                        },
                        Err(e) => {
                            tracing::warn!(%from, error = %e, "forwarded write refused");
                            Err(WriteRefusal::Failed(e))
                        }
                    },
                    Err(e) => Err(WriteRefusal::Failed(format!("bad command: {e}"))),
                };
                ControlResponse::Service(encode(&result))
            }
            SERVICE_READ => ControlResponse::Service(encode(
                &self.node.read(false).await.map_err(|e| e.to_string()),
            )),
            SERVICE_ELECT => ControlResponse::Service(encode(
                &self.node.elect().await.map_err(|e| e.to_string()),
            )),
            SERVICE_INDEX => {
                ControlResponse::Service(encode(&match self.node.confirm_leader().await {
                    Ok(()) => {
                        // A client's lease renewal: first-hand word that it hears the leader,
                        // as a server's Raft answers are (see [`RaftContact`]).
                        self.contact.answered(raft_id(from));
                        Ok(self.node.status().applied_index)
                    }
                    Err(e) => Err(e.to_string()),
                }))
            }
            SERVICE_WATCH => match decode::<blx_consensus::node::WatchRequest>(payload) {
                Ok(w) => ControlResponse::Service(encode(
                    &self
                        .node
                        .serve_watch(
                            raft_id(from),
                            w.from,
                            Duration::from_millis(u64::from(w.wait_ms)),
                        )
                        .await,
                )),
                Err(e) => ControlResponse::Failed(format!("bad watch request: {e}")),
            },
            SERVICE_LOGS => {
                ControlResponse::Service(encode(&match decode::<(String, u64)>(payload) {
                    Ok((vm, max)) if blx_consensus::workload::valid_vm_name(&vm) => {
                        crate::console::console_tail(&self.run_root, &vm, max.min(MAX_LOG_TAIL))
                    }
                    Ok((vm, _)) => Err(format!("bad VM name {vm:?}")),
                    Err(e) => Err(format!("bad request: {e}")),
                }))
            }
            other => ControlResponse::Failed(format!("unknown service {other}")),
        }
    }
}

/// A write a member forwards to the leader: who asked, what, and the W3C trace context of
/// the request it serves (so the leader's part joins the caller's trace). The record is
/// postcard behind the format version byte, as every message; new fields go at the end.
#[derive(serde::Serialize, serde::Deserialize)]
struct ForwardedWrite {
    caller: Caller,
    cmd: Command,
    traceparent: Option<String>,
}

/// A short name for a command, for spans.
pub(crate) fn command_name(cmd: &Command) -> &'static str {
    use blx_consensus::workload::WorkloadCommand as W;
    match cmd {
        Command::Workload(w) => match w {
            W::VmCreate { .. } => "vm_create",
            W::VmSetDesired { .. } => "vm_set_desired",
            W::VmDelete { .. } => "vm_delete",
            W::Schedule { .. } => "schedule",
            W::VmReports { .. } => "vm_reports",
            _ => "workload",
        },
        Command::Batch(_) => "batch",
        Command::KvPut { .. } => "kv_put",
        Command::KvDelete { .. } => "kv_delete",
        Command::ConfigSet { .. } | Command::ConfigRollback => "config",
        Command::Authority(_) => "authority",
        _ => "other",
    }
}

/// What a member may ask the leader to commit on its own behalf. A node reports only its own
/// VMs. Operator commands arrive forwarded from the member whose API took them.
fn check_forwarded(from: NodeId, cmd: &Command) -> Result<(), String> {
    use blx_consensus::workload::WorkloadCommand;
    match cmd {
        Command::Workload(WorkloadCommand::VmReports { node, .. }) if *node != from.to_string() => {
            Err(format!(
                "refused: {from} may report only its own VMs, not those of {node}"
            ))
        }
        Command::Batch(cmds) => cmds.iter().try_for_each(|c| check_forwarded(from, c)),
        _ => Ok(()),
    }
}

/// The autopilot's view of the members, remembering since when each has been in its state.
/// A node removed by an operator counts as left, so the autopilot takes it out of Raft.
pub(crate) fn member_views(
    membership: Membership,
    node: ConsensusNode,
) -> impl Fn() -> BTreeMap<u64, (NodeView, SocketAddr)> + Send + Sync + 'static {
    let since: Mutex<BTreeMap<NodeId, (MemberState, Instant)>> = Mutex::new(BTreeMap::new());
    move || {
        let revoked = node.with_local_state(ClusterState::revoked_nodes);
        let now = Instant::now();
        let mut since = since.lock().unwrap_or_else(|e| e.into_inner());
        membership
            .members()
            .iter()
            .map(|(id, m)| {
                let entry = since.entry(*id).or_insert((m.state, now));
                if entry.0 != m.state {
                    *entry = (m.state, now);
                }
                let view = NodeView {
                    up: m.state == MemberState::Alive,
                    left: m.state == MemberState::Left || revoked.contains(id),
                    state_for: now - entry.1,
                    zone: m.meta.as_ref().and_then(|meta| meta.zone.clone()),
                    lag: None,
                };
                (raft_id(*id), (view, m.identity.addr))
            })
            .collect()
    }
}

/// Set once consensus is up; the control service answers Raft traffic only after that.
pub(crate) type ClusterCell = Arc<OnceLock<Cluster>>;
