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

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use blx_consensus::machine::{decode, encode};
use blx_consensus::node::{Followed, HEARTBEAT, SERVER_CONTACT, WatchAnswer, WatchRequest};
use blx_membership::quic::QuicTransport;
use blx_membership::wire::{ControlRequest, ControlResponse};
use blx_membership::{MemberState, Membership};

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
    // Members that answered "not a server" since this node last followed one. Two nodes that
    // have never been in Raft know no servers; without this they could ask each other forever.
    let mut not_servers: BTreeSet<u64> = BTreeSet::new();
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
            .or_else(|| choose(&cluster, &membership, &told, &not_servers));
        let Some(target) = target else {
            // Everyone alive has said no: ask them again, they may know servers by now.
            not_servers.clear();
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
                    not_servers.insert(target);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if let Err(e) = node.follow(feed) {
                    tracing::warn!(server = %node_id(target), error = %e, "bad feed from the server");
                    server = None;
                    tokio::time::sleep(CHECK).await;
                    continue;
                }
                not_servers.clear();
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
                if failures >= FAILURES_BEFORE_NO_LEADER
                    && let Some(f) = node.following()
                {
                    node.set_following(Some(Followed { leader: None, ..f }));
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

/// The server to follow, from what this node knows (see [`pick`]).
fn choose(
    cluster: &Cluster,
    membership: &Membership,
    told: &BTreeSet<u64>,
    not_servers: &BTreeSet<u64>,
) -> Option<u64> {
    let status = cluster.node.status();
    let members = membership.members();
    let mut known: BTreeSet<u64> = status.voters.union(&status.learners).copied().collect();
    known.extend(told);
    let candidates: BTreeMap<u64, Candidate> = members
        .iter()
        .filter(|(id, _)| **id != cluster.self_id)
        .map(|(id, m)| {
            let zone = m.meta.as_ref().and_then(|meta| meta.zone.clone());
            (
                raft_id(*id),
                Candidate {
                    alive: m.state == MemberState::Alive,
                    zone,
                },
            )
        })
        .collect();
    let my_zone = members
        .get(&cluster.self_id)
        .and_then(|m| m.meta.as_ref())
        .and_then(|meta| meta.zone.clone());
    pick(
        raft_id(cluster.self_id),
        my_zone.as_deref(),
        &candidates,
        &known,
        not_servers,
        status.leader,
    )
}

/// A member as [`pick`] sees it.
#[derive(Clone, Debug)]
struct Candidate {
    alive: bool,
    zone: Option<String>,
}

/// Among the servers `known` that are alive and have not said they are not servers: those in
/// this node's zone first and the leader last, then one fixed by this node's id so clients
/// spread over the servers. With none (a node that has just joined), any alive member that
/// has not said no: it names the servers it knows in its answer.
fn pick(
    me: u64,
    my_zone: Option<&str>,
    members: &BTreeMap<u64, Candidate>,
    known: &BTreeSet<u64>,
    not_servers: &BTreeSet<u64>,
    leader: Option<u64>,
) -> Option<u64> {
    let eligible = |id: &u64| {
        *id != me && !not_servers.contains(id) && members.get(id).is_some_and(|c| c.alive)
    };
    let mut live: Vec<u64> = known.iter().copied().filter(eligible).collect();
    if live.is_empty() {
        live = members.keys().copied().filter(eligible).collect();
    }
    let rank = |s: &u64| {
        let zone = members.get(s).and_then(|c| c.zone.as_deref());
        (zone != my_zone, Some(*s) == leader && live.len() > 1)
    };
    let best = live.iter().map(rank).min()?;
    let preferred: Vec<u64> = live.iter().copied().filter(|s| rank(s) == best).collect();
    let at = usize::try_from(me % preferred.len() as u64).unwrap_or(0);
    preferred.get(at).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(alive: &[u64], zones: &[(u64, &str)]) -> BTreeMap<u64, Candidate> {
        alive
            .iter()
            .map(|id| {
                let zone = zones
                    .iter()
                    .find(|(z, _)| z == id)
                    .map(|(_, z)| (*z).to_string());
                (*id, Candidate { alive: true, zone })
            })
            .collect()
    }

    #[test]
    fn a_node_that_knows_no_server_skips_members_that_said_no() {
        // 7 and 11 have never been in Raft: neither knows a server, and 7's id makes it ask 11
        // first. 11 says no; it is skipped from then on, so 7 reaches a server next.
        let all = members(&[1, 2, 3, 7, 11], &[]);
        let none = BTreeSet::new();
        assert_eq!(pick(7, None, &all, &none, &none, None), Some(11));
        let mut refused = BTreeSet::new();
        let mut asked = Vec::new();
        while let Some(s) = pick(7, None, &all, &none, &refused, None) {
            asked.push(s);
            if [1, 2, 3].contains(&s) {
                break;
            }
            refused.insert(s);
        }
        assert_eq!(asked, [11, 2]);
        // Once everyone has said no, there is nothing to ask (the caller starts over).
        let everyone: BTreeSet<u64> = [1, 2, 3, 11].into();
        assert_eq!(pick(7, None, &all, &none, &everyone, None), None);
    }

    #[test]
    fn known_servers_come_first_in_this_zone_and_the_leader_last() {
        let all = members(&[1, 2, 3, 10], &[(1, "a"), (2, "b"), (3, "b"), (10, "b")]);
        let servers: BTreeSet<u64> = [1, 2, 3].into();
        let none = BTreeSet::new();
        // Zone b holds 2 and 3; 3 leads, so 2.
        assert_eq!(pick(10, Some("b"), &all, &servers, &none, Some(3)), Some(2));
        // A server that said no is passed over even when it is the only one in the zone.
        let refused: BTreeSet<u64> = [2].into();
        assert_eq!(
            pick(10, Some("b"), &all, &servers, &refused, Some(3)),
            Some(3)
        );
        // A dead server is not asked.
        let mut down = all.clone();
        down.get_mut(&2).unwrap().alive = false;
        assert_eq!(
            pick(10, Some("b"), &down, &servers, &none, Some(3)),
            Some(3)
        );
    }
}
