//! The client's side of the split between servers and clients. A server (a voter, or one of
//! the few standby learners) hears the leader's Raft; every other node is a client: it holds
//! a watch on one server, which answers as soon as something is applied and otherwise holds
//! the request for [`WATCH_WAIT`], so a quiet cluster costs a client one small exchange every
//! few seconds and the leader nothing at all.
//!
//! ```text
//!  client ──WatchRequest{from}──▶ server ──(waits for an apply or a leader change)──▶
//!         ◀──WatchAnswer{leader, feed: entries after `from` | whole state | nothing}──
//!  client: node.follow(feed), node.set_following(leader) → worker, API, controller as before
//! ```
//!
//! Writes and linearizable reads from a client go to the leader the watch names, as they do
//! from a follower. A node switches by itself: as soon as the leader's appends reach it (the
//! autopilot made it a standby) it is a server and stops watching; when they stop for
//! [`SERVER_CONTACT`] (it was taken out of the group, possibly without hearing of it) it
//! starts again.

use std::collections::BTreeSet;
use std::time::Duration;

use blx_consensus::machine::{decode, encode};
use blx_consensus::node::{Followed, HEARTBEAT, SERVER_CONTACT, WatchAnswer, WatchRequest};
use blx_membership::quic::QuicTransport;
use blx_membership::wire::{ControlRequest, ControlResponse};
use blx_membership::{MemberState, Membership, NodeId};

use crate::raft::{Cluster, SERVICE_WATCH, node_id, raft_id};

/// How long a server may hold a client's watch when nothing changes.
pub(crate) const WATCH_WAIT: Duration = Duration::from_secs(10);
/// How often a server's state is checked: whether this node became a server, or the one it
/// follows went down.
const CHECK: Duration = Duration::from_millis(250);
/// Failed watches in a row after which a client no longer claims to know the leader.
const FAILURES_BEFORE_NO_LEADER: u32 = 3;

/// Follows a server while this node is a client, until the agent stops.
pub(crate) async fn run(cluster: Cluster, membership: Membership, transport: QuicTransport) {
    let node = cluster.node.clone();
    let me = cluster.self_id;
    let mut server: Option<u64> = None;
    let mut told: BTreeSet<u64> = BTreeSet::new();
    let mut failures = 0u32;
    loop {
        if node.is_voter() || node.hears_raft_within(SERVER_CONTACT) {
            if node.following().is_some() {
                tracing::info!("this node is a Raft server now; it no longer follows a watch");
            }
            node.set_following(None);
            server = None;
            tokio::time::sleep(CHECK).await;
            continue;
        }
        let target = server
            .filter(|s| alive(&membership, *s))
            .or_else(|| choose(&cluster, &membership, &told));
        let Some(target) = target else {
            tokio::time::sleep(CHECK).await;
            continue;
        };
        let Some(addr) = membership
            .members()
            .get(&node_id(target))
            .map(|m| m.identity.addr)
        else {
            server = None;
            continue;
        };
        let request = ControlRequest::Service {
            service: SERVICE_WATCH,
            payload: encode(&WatchRequest {
                from: node.applied_index(),
                wait_ms: u32::try_from(WATCH_WAIT.as_millis()).unwrap_or(u32::MAX),
            }),
        };
        let exchange = transport.request_within(
            addr,
            Some(node_id(target)),
            &request,
            WATCH_WAIT + Duration::from_secs(3),
        );
        let answer = tokio::select! {
            a = exchange => Some(a),
            () = gone_or_promoted(&cluster, &membership, target) => None,
        };
        let outcome = match answer {
            None => Err("the server went down, or this node became a server".to_string()),
            Some(Ok(ControlResponse::Service(bytes))) => decode::<WatchAnswer>(&bytes),
            Some(Ok(ControlResponse::Failed(e))) => Err(e),
            Some(Ok(other)) => Err(format!("unexpected answer {other:?}")),
            Some(Err(e)) => Err(e.to_string()),
        };
        match outcome {
            Ok(answer) => {
                failures = 0;
                told = answer.servers.clone();
                told.remove(&raft_id(me));
                let Some(feed) = answer.feed else {
                    // Not a server (any more): ask one of those it named.
                    tracing::debug!(node = %node_id(target), "not a server; choosing another");
                    server = None;
                    told.remove(&target);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if let Err(e) = node.follow(feed) {
                    tracing::warn!(server = %node_id(target), error = %e, "bad feed from the server");
                    server = None;
                    tokio::time::sleep(CHECK).await;
                    continue;
                }
                if node.following().is_none_or(|f| f.server != target) {
                    tracing::info!(server = %node_id(target), "this node is a client: it follows a server's watch");
                }
                node.set_following(Some(Followed {
                    server: target,
                    leader: answer.leader,
                    term: answer.term,
                    answered: tokio::time::Instant::now(),
                }));
                server = Some(target);
            }
            Err(e) => {
                tracing::debug!(server = %node_id(target), error = %e, "watch failed");
                failures += 1;
                server = None;
                if failures >= FAILURES_BEFORE_NO_LEADER {
                    if let Some(f) = node.following() {
                        node.set_following(Some(Followed { leader: None, ..f }));
                    }
                }
                let pause = CHECK * failures.min(8);
                tokio::time::sleep(pause).await;
            }
        }
    }
}

fn alive(membership: &Membership, id: u64) -> bool {
    membership
        .members()
        .get(&node_id(id))
        .is_some_and(|m| m.state == MemberState::Alive)
}

/// Resolves when `server` is down in gossip, or this node starts hearing Raft itself.
async fn gone_or_promoted(cluster: &Cluster, membership: &Membership, server: u64) {
    let mut tick = tokio::time::interval(CHECK);
    loop {
        tick.tick().await;
        let down = membership
            .members()
            .get(&node_id(server))
            .is_none_or(|m| matches!(m.state, MemberState::Down | MemberState::Left));
        if down || cluster.node.hears_raft_within(HEARTBEAT * 2) {
            return;
        }
    }
}

/// The server to follow: among the servers this node knows that gossip shows alive, those
/// in its own zone first and the leader last, then one fixed by this node's id so clients
/// spread over the servers. With no server known yet (a node that has just joined), any
/// alive member: it names the servers in its answer.
fn choose(cluster: &Cluster, membership: &Membership, told: &BTreeSet<u64>) -> Option<u64> {
    let me = raft_id(cluster.self_id);
    let status = cluster.node.status();
    let members = membership.members();
    let zone_of = |id: NodeId| {
        members
            .get(&id)
            .and_then(|m| m.meta.as_ref())
            .and_then(|meta| meta.zone.clone())
    };
    let my_zone = zone_of(cluster.self_id);
    let mut servers: BTreeSet<u64> = status.voters.union(&status.learners).copied().collect();
    servers.extend(told);
    servers.remove(&me);
    let mut live: Vec<u64> = servers
        .into_iter()
        .filter(|s| alive(membership, *s))
        .collect();
    if live.is_empty() {
        live = members
            .iter()
            .filter(|(id, m)| **id != cluster.self_id && m.state == MemberState::Alive)
            .map(|(id, _)| raft_id(*id))
            .collect();
    }
    let rank = |s: &u64| {
        (
            zone_of(node_id(*s)) != my_zone,
            Some(*s) == status.leader && live.len() > 1,
        )
    };
    let best = live.iter().map(rank).min()?;
    let preferred: Vec<u64> = live.iter().copied().filter(|s| rank(s) == best).collect();
    let at = usize::try_from(me % preferred.len() as u64).unwrap_or(0);
    preferred.get(at).copied()
}
