//! The agent's metrics, one registry per agent (the simulator runs many in one process), served
//! as Prometheus text at `GET /v1/metrics` and exported over OTLP when that is configured.
//!
//! Counters and histograms are updated where things happen: SWIM and the Raft stores count in
//! their own crates ([`blx_membership::swim::SwimStats`], [`blx_consensus::stats::RaftStats`])
//! and are registered here by handle; the API, the controller and the worker count here.
//! Gauges that describe state (members by state, Raft indexes, VMs by phase, the process's
//! memory) are read from their owner when a scrape asks, so they are never stale and cost
//! nothing between scrapes. Every name starts with `blx_`; `docs/operations.md` lists them.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use blx_consensus::node::ConsensusNode;
use blx_membership::{MemberState, Membership, NodeId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// A label set of one `state` (members, voters) or `phase` (VMs).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// An API request's route (the router's pattern, not the path) and method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: String,
}

/// An API request's route, method and answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

/// Telemetry that could not be exported, by signal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabel {
    signal: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// One agent's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    node: ConsensusNode,
    membership: Membership,
    self_id: NodeId,
    members: Family<StateLabel, Gauge>,
    /// Control-stream bytes by kind, counted by the transport.
    pub(crate) traffic: blx_membership::quic::Traffic,
    term: Gauge,
    has_leader: Gauge,
    is_leader: Gauge,
    pub(crate) leader_changes: Counter,
    commit_index: Gauge,
    applied_index: Gauge,
    last_log_index: Gauge,
    snapshot_index: Gauge,
    last_contact: FloatGauge,
    /// Seconds from a write reaching this node to its answer, forwarding included.
    pub(crate) proposal: Histogram,
    autopilot_healthy: Gauge,
    voters: Family<StateLabel, Gauge>,
    learners: Gauge,
    pending_vms: Gauge,
    /// Seconds each scheduling pass took to plan.
    pub(crate) scheduling_pass: Histogram,
    pub(crate) placements: Counter,
    pub(crate) preemptions: Counter,
    pub(crate) failovers: Counter,
    vms: Family<StateLabel, Gauge>,
    /// Seconds from a VM's start to its readiness line, on this node.
    pub(crate) boot: Histogram,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    /// Telemetry dropped because the collector was down, slow or refusing.
    dropped: Family<SignalLabel, Counter>,
    /// Audit records that could not be written to the audit log.
    pub(crate) audit_failures: Counter,
    rss: Gauge,
    open_fds: Gauge,
    /// What the process's exporters had dropped at the last scrape.
    dropped_seen: std::sync::Mutex<[u64; 3]>,
    /// When these metrics began: "never heard from a leader" counts from here.
    started: tokio::time::Instant,
}

fn buckets() -> Histogram {
    blx_consensus::stats::latency_buckets()
}

impl Metrics {
    /// The metrics of the agent whose Raft is `node` and whose membership is `membership`.
    pub(crate) fn new(node: ConsensusNode, membership: Membership, self_id: NodeId) -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("blx"),
            node,
            membership,
            self_id,
            members: Family::default(),
            traffic: blx_membership::quic::Traffic::new(crate::raft::service_kind),
            term: Gauge::default(),
            has_leader: Gauge::default(),
            is_leader: Gauge::default(),
            leader_changes: Counter::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            last_log_index: Gauge::default(),
            snapshot_index: Gauge::default(),
            last_contact: FloatGauge::default(),
            proposal: buckets(),
            autopilot_healthy: Gauge::default(),
            voters: Family::default(),
            learners: Gauge::default(),
            pending_vms: Gauge::default(),
            scheduling_pass: buckets(),
            placements: Counter::default(),
            preemptions: Counter::default(),
            failovers: Counter::default(),
            vms: Family::default(),
            boot: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.05, 2.0, 12,
            )),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(buckets),
            dropped: Family::default(),
            audit_failures: Counter::default(),
            rss: Gauge::default(),
            open_fds: Gauge::default(),
            started: tokio::time::Instant::now(),
            dropped_seen: Default::default(),
        };
        for signal in ["traces", "metrics", "logs"] {
            m.dropped(signal, 0);
        }
        m.register();
        m
    }

    fn register(&mut self) {
        let swim = self.membership.stats().clone();
        let raft = self.node.stats();
        let r = &mut self.registry;
        r.register(
            "members",
            "Members by SWIM state, as this node sees them",
            self.members.clone(),
        );
        r.register(
            "gossip_probes",
            "Direct SWIM probes sent",
            swim.probes.clone(),
        );
        r.register(
            "gossip_indirect_probes",
            "Indirect SWIM probes asked of other members",
            swim.indirect_probes.clone(),
        );
        r.register(
            "gossip_suspicions",
            "Members this node turned suspect",
            swim.suspicions.clone(),
        );
        r.register(
            "gossip_refutations",
            "Suspicions of this node that it refuted",
            swim.refutations.clone(),
        );
        r.register_with_unit(
            "gossip_received",
            "SWIM and metadata datagram bytes received",
            Unit::Bytes,
            swim.bytes_in.clone(),
        );
        r.register_with_unit(
            "gossip_sent",
            "SWIM and metadata datagram bytes sent",
            Unit::Bytes,
            swim.bytes_out.clone(),
        );
        r.register(
            "gossip_sent_datagrams",
            "SWIM and metadata datagrams sent",
            swim.datagrams_out.clone(),
        );
        r.register_with_unit(
            "net_sent",
            "Control-stream bytes sent, by kind (raft, watch, forward, join, control); gossip is blx_gossip_sent_bytes",
            Unit::Bytes,
            self.traffic.sent.clone(),
        );
        r.register_with_unit(
            "net_received",
            "Control-stream bytes received, by kind",
            Unit::Bytes,
            self.traffic.received.clone(),
        );
        r.register("raft_term", "The current Raft term", self.term.clone());
        r.register(
            "raft_has_leader",
            "1 when this node knows a Raft leader",
            self.has_leader.clone(),
        );
        r.register(
            "raft_is_leader",
            "1 when this node is the Raft leader",
            self.is_leader.clone(),
        );
        r.register(
            "raft_leader_changes",
            "Times the leader this node knows changed",
            self.leader_changes.clone(),
        );
        r.register(
            "raft_commit_index",
            "The highest log index this node knows is committed",
            self.commit_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "The last log index this node applied",
            self.applied_index.clone(),
        );
        r.register(
            "raft_last_log_index",
            "The last index in this node's log",
            self.last_log_index.clone(),
        );
        r.register(
            "raft_snapshot_index",
            "The log index of this node's latest snapshot",
            self.snapshot_index.clone(),
        );
        r.register_with_unit("raft_last_contact", "Time since this node last heard from the leader (on the leader: since a quorum acknowledged it)", Unit::Seconds, self.last_contact.clone());
        r.register_with_unit(
            "raft_proposal_duration",
            "From a write reaching this node to its answer, forwarding to the leader included",
            Unit::Seconds,
            self.proposal.clone(),
        );
        // The leader's write path and the log's disk work, all in seconds.
        let raft_seconds = [
            (
                "raft_commit_duration",
                "From a proposal reaching the leader to its commit and apply",
                &raft.commit,
            ),
            (
                "raft_proposal_queue_duration",
                "On the leader, how long a write waited for a slot before it was proposed",
                &raft.queued,
            ),
            (
                "raft_entry_duration",
                "On the leader, from proposing an entry to its answer: the leader's append and sync, replication to a quorum, commit and apply",
                &raft.entry,
            ),
            (
                "raft_apply_wait_duration",
                "How long an apply waited for this node's own log to be on disk up to what it applies",
                &raft.apply_wait,
            ),
            (
                "raft_apply_duration",
                "The state machine applying one group of entries",
                &raft.apply,
            ),
            (
                "raft_append_sent_duration",
                "On a leader, from sending an append with entries to a follower to reading its answer",
                &raft.append_sent,
            ),
            (
                "raft_append_served_duration",
                "On a follower, from decoding a leader's append with entries to having its answer ready",
                &raft.append_served,
            ),
            (
                "raft_fsync_duration",
                "Synced writes and WAL flushes of the Raft log",
                &raft.fsync,
            ),
            (
                "raft_snapshot_build_duration",
                "Building and saving a snapshot",
                &raft.snapshot_build,
            ),
            (
                "raft_snapshot_restore_duration",
                "Installing a snapshot received from the leader",
                &raft.snapshot_install,
            ),
        ];
        for (name, help, histogram) in raft_seconds {
            r.register_with_unit(name, help, Unit::Seconds, histogram.clone());
        }
        r.register(
            "raft_entry_writes",
            "On the leader, the writes each proposed log entry carried",
            raft.batch_writes.clone(),
        );
        r.register(
            "raft_proposals_pending",
            "Proposals the leader is working on",
            raft.pending.clone(),
        );
        r.register(
            "raft_proposals_failed",
            "Proposals that ended without being committed",
            raft.failed.clone(),
        );
        r.register(
            "autopilot_healthy",
            "1 when a leader is known, no voter change is under way and every voter is alive",
            self.autopilot_healthy.clone(),
        );
        r.register(
            "autopilot_voters",
            "Raft voters by SWIM state",
            self.voters.clone(),
        );
        r.register("autopilot_learners", "Raft learners", self.learners.clone());
        r.register(
            "scheduler_pending_vms",
            "VMs waiting for a node, cluster-wide",
            self.pending_vms.clone(),
        );
        r.register_with_unit(
            "scheduler_pass_duration",
            "Planning one scheduling pass, on the leader",
            Unit::Seconds,
            self.scheduling_pass.clone(),
        );
        r.register(
            "scheduler_placements",
            "VMs placed on a node by this leader's passes",
            self.placements.clone(),
        );
        r.register(
            "scheduler_preemptions",
            "VMs preempted by higher-priority ones",
            self.preemptions.clone(),
        );
        r.register(
            "scheduler_failovers",
            "VMs placed again after their node was lost",
            self.failovers.clone(),
        );
        r.register("vms", "VMs placed on this node, by phase", self.vms.clone());
        r.register_with_unit(
            "vm_boot_duration",
            "From a VM's start to its readiness line, on this node",
            Unit::Seconds,
            self.boot.clone(),
        );
        r.register(
            "api_requests",
            "HTTP API requests by route, method and status",
            self.requests.clone(),
        );
        r.register_with_unit(
            "api_request_duration",
            "HTTP API request latency by route and method",
            Unit::Seconds,
            self.request_duration.clone(),
        );
        r.register("telemetry_dropped", "Spans, metric exports and log records dropped because the collector was down, slow or refusing", self.dropped.clone());
        r.register(
            "audit_write_failures",
            "Audit records that could not be written to the audit log",
            self.audit_failures.clone(),
        );
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory of the agent's process",
            Unit::Bytes,
            self.rss.clone(),
        );
        r.register(
            "process_open_fds",
            "Open file descriptors of the agent's process",
            self.open_fds.clone(),
        );
    }

    /// Counts an API request.
    pub(crate) fn api_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.into(),
                method: method.into(),
                status,
            })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabels {
                route: route.into(),
                method: method.into(),
            })
            .observe(seconds);
    }

    /// Counts `n` items of `signal` ("traces", "metrics", "logs") the exporter dropped.
    pub(crate) fn dropped(&self, signal: &str, n: u64) {
        self.dropped
            .get_or_create(&SignalLabel {
                signal: signal.into(),
            })
            .inc_by(n);
    }

    /// The metrics in Prometheus's text format (0.0.4, which every scraper reads), the state
    /// gauges read now.
    pub(crate) fn render(&self) -> String {
        self.refresh();
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Reads every state gauge from its owner.
    fn refresh(&self) {
        let members = self.membership.members();
        let mut by_state = std::collections::BTreeMap::new();
        for m in members.values() {
            *by_state.entry(m.state.to_string()).or_insert(0i64) += 1;
        }
        for state in [
            MemberState::Alive,
            MemberState::Suspect,
            MemberState::Down,
            MemberState::Left,
        ] {
            let state = state.to_string();
            let n = by_state.get(&state).copied().unwrap_or(0);
            self.members.get_or_create(&StateLabel { state }).set(n);
        }

        let status = self.node.status();
        let raft = self.node.stats();
        self.term.set(to_i64(status.term));
        self.has_leader.set(i64::from(status.leader.is_some()));
        let leading = status.leader == Some(status.id);
        self.is_leader.set(i64::from(leading));
        self.commit_index
            .set(to_i64(raft.committed().max(status.applied_index)));
        self.applied_index.set(to_i64(status.applied_index));
        self.last_log_index.set(to_i64(status.last_log_index));
        self.snapshot_index.set(to_i64(status.snapshot_index));
        let contact = if leading {
            self.node
                .raft
                .metrics()
                .borrow()
                .millis_since_quorum_ack
                .map(|ms| ms as f64 / 1000.0)
        } else if let Some(f) = self.node.following() {
            // A client hears the leader through the server it follows.
            Some(f.answered.elapsed().as_secs_f64())
        } else {
            raft.last_leader_contact()
                .map(|at| at.elapsed().as_secs_f64())
        };
        // Never heard from a leader: as long as this agent has run, which is what an alert on
        // a large value wants to see.
        self.last_contact
            .set(contact.unwrap_or_else(|| self.started.elapsed().as_secs_f64()));

        let mut voters = std::collections::BTreeMap::new();
        for v in &status.voters {
            let state = members
                .get(&crate::raft::node_id(*v))
                .map(|m| m.state.to_string())
                .unwrap_or_else(|| "unknown".into());
            *voters.entry(state).or_insert(0i64) += 1;
        }
        for state in ["alive", "suspect", "down", "left", "unknown"] {
            let n = voters.get(state).copied().unwrap_or(0);
            self.voters
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(n);
        }
        let healthy = status.leader.is_some()
            && !status.changing
            && voters.get("alive").copied().unwrap_or(0) == to_i64(status.voters.len() as u64);
        self.autopilot_healthy.set(i64::from(healthy));
        self.learners.set(to_i64(status.learners.len() as u64));

        let me = self.self_id.to_string();
        let (pending, phases) = self.node.with_local_state(|s| {
            let pending = s
                .vms
                .values()
                .filter(|v| v.status.phase == blx_consensus::workload::VmPhase::Pending)
                .count();
            let mut phases = std::collections::BTreeMap::new();
            for v in s
                .vms
                .values()
                .filter(|v| v.node.as_deref() == Some(me.as_str()))
            {
                *phases.entry(v.status.phase.to_string()).or_insert(0i64) += 1;
            }
            (pending, phases)
        });
        self.pending_vms.set(to_i64(pending as u64));
        for phase in blx_consensus::workload::VmPhase::ALL {
            let state = phase.to_string();
            let n = phases.get(&state).copied().unwrap_or(0);
            self.vms.get_or_create(&StateLabel { state }).set(n);
        }

        {
            use crate::telemetry::{Signal, dropped};
            let mut seen = self.dropped_seen.lock().unwrap_or_else(|e| e.into_inner());
            for (i, signal) in [Signal::Traces, Signal::Metrics, Signal::Logs]
                .into_iter()
                .enumerate()
            {
                let now = dropped(signal);
                self.dropped(signal.name(), now.saturating_sub(seen[i]));
                seen[i] = now.max(seen[i]);
            }
        }
        let (rss, fds) = process_usage();
        self.rss.set(to_i64(rss));
        self.open_fds.set(to_i64(fds));
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// This process's resident bytes and open file descriptors, from `/proc` (zeros elsewhere).
fn process_usage() -> (u64, u64) {
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * rustix::param::page_size() as u64)
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    (rss, fds)
}

/// Counts every change of the leader this node knows, until Raft stops.
pub(crate) async fn count_leader_changes(node: ConsensusNode, metrics: Arc<Metrics>) {
    let mut rx = node.raft.metrics();
    let mut leader = rx.borrow().current_leader;
    while rx.changed().await.is_ok() {
        let now = rx.borrow().current_leader;
        if now != leader {
            if now.is_some() {
                metrics.leader_changes.inc();
            }
            leader = now;
        }
    }
}
