//! Three real openraft nodes on the in-memory store, wired through [`crate::network`] in one
//! process, check the durability rules of [`crate::durable`] end to end: while the leader's
//! own copy of a write is not on its disk, no node applies the write and its client hears
//! nothing, and a power loss of the leader then loses no acknowledged write. They also check
//! that a commit-only append never holds up the leader's next entry (see [`crate::network`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{BasicNode, Raft, RaftLogReader, ServerState};

use crate::durable::Durability;
use crate::machine::TypeConfig;
use crate::mem::{MemLogStore, MemStateMachine};
use crate::network::{Network, RaftRequest, RpcTransport, decode_request};
use crate::state::Command;

const PATIENCE: Duration = Duration::from_secs(10);

/// Calls the node's Raft directly; a node not in the map is down.
#[derive(Default)]
struct Router {
    nodes: Mutex<BTreeMap<u64, (Raft<TypeConfig>, Arc<Durability>)>>,
    gate: Gate,
}

/// While closed, holds every append that carries no entries and is the first to bring its
/// target a new commit index, and counts the held appends their sender gave up on.
#[derive(Default)]
struct Gate {
    closed: AtomicBool,
    opened: tokio::sync::Notify,
    /// Per target, the highest commit index any append has brought it.
    seen: Mutex<BTreeMap<u64, u64>>,
    held: AtomicUsize,
    abandoned: AtomicUsize,
}

impl Gate {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        self.opened.notify_waiters();
    }

    /// Whether an append of `payload` to `target` must wait for the gate to open.
    fn holds(&self, target: u64, payload: &[u8]) -> bool {
        let Ok(RaftRequest::Append(rpc)) = decode_request(payload) else {
            return false;
        };
        let commit = rpc.leader_commit.map_or(0, |c| c.index + 1);
        let mut seen = self.seen.lock().unwrap();
        let before = seen.get(&target).copied().unwrap_or(0);
        if commit > before {
            seen.insert(target, commit);
        }
        rpc.entries.is_empty() && commit > before && self.closed.load(Ordering::SeqCst)
    }

    async fn pass(&self) {
        /// Counts the wait as abandoned if it is dropped before the gate opens.
        struct Waiting<'a>(&'a AtomicUsize, bool);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        self.held.fetch_add(1, Ordering::SeqCst);
        let mut waiting = Waiting(&self.abandoned, false);
        loop {
            let opened = self.opened.notified();
            if !self.closed.load(Ordering::SeqCst) {
                break;
            }
            opened.await;
        }
        waiting.1 = true;
    }
}

impl RpcTransport for Router {
    fn call(
        &self,
        target: u64,
        _addr: SocketAddr,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
        let node = self.nodes.lock().unwrap().get(&target).cloned();
        let held = self.gate.holds(target, &payload);
        Box::pin(async move {
            if held {
                self.gate.pass().await;
            }
            let (raft, durability) = node.ok_or_else(|| format!("node {target} is down"))?;
            tokio::time::timeout(
                timeout,
                crate::network::serve(&raft, &durability, &payload, |_| Ok(())),
            )
            .await
            .map_err(|_| "timed out".to_string())
        })
    }
}

struct Member {
    raft: Raft<TypeConfig>,
    machine: MemStateMachine,
    log: MemLogStore,
}

async fn start(router: &Arc<Router>, id: u64, log: MemLogStore) -> Member {
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 300,
        election_timeout_max: 600,
        ..Default::default()
    };
    let machine = MemStateMachine::for_log(&log);
    let raft = Raft::new(
        id,
        Arc::new(config.validate().expect("config")),
        Network::new(router.clone(), log.durability()),
        log.clone(),
        machine.clone(),
    )
    .await
    .expect("raft starts");
    router
        .nodes
        .lock()
        .unwrap()
        .insert(id, (raft.clone(), log.durability()));
    Member { raft, machine, log }
}

/// Writes `key` through `raft`, which must lead, and returns its log index once acknowledged.
async fn acknowledged(raft: &Raft<TypeConfig>, key: &str) -> u64 {
    raft.client_write(put(key))
        .await
        .unwrap_or_else(|e| panic!("{key} is not acknowledged: {e}"))
        .log_id
        .index
}

fn put(key: &str) -> Command {
    Command::KvPut {
        key: key.into(),
        value: b"v".to_vec(),
        cas: None,
    }
}

async fn leader_of(members: &BTreeMap<u64, Member>) -> u64 {
    let any = members.values().next().expect("members");
    let m = any
        .raft
        .wait(Some(PATIENCE))
        .metrics(
            |m| {
                m.current_leader
                    .is_some_and(|l| members.contains_key(&l) && l != 0)
            },
            "a leader",
        )
        .await
        .expect("a leader is elected");
    let leader = m.current_leader.expect("leader");
    members[&leader]
        .raft
        .wait(Some(PATIENCE))
        .state(ServerState::Leader, "leader")
        .await
        .expect("the leader knows it leads");
    leader
}

/// Three members on the in-memory store, initialized, and the one that leads.
async fn three_members(router: &Arc<Router>) -> (BTreeMap<u64, Member>, u64) {
    let mut members = BTreeMap::new();
    for id in 1..=3 {
        members.insert(id, start(router, id, MemLogStore::new(id)).await);
    }
    let nodes: BTreeMap<u64, BasicNode> = (1..=3)
        .map(|id| (id, BasicNode::new(format!("127.0.0.1:{}", 9000 + id))))
        .collect();
    members[&1]
        .raft
        .initialize(nodes)
        .await
        .expect("initialize");
    let leader = leader_of(&members).await;
    (members, leader)
}

/// Waits until every member has applied `last`, checks they all hold the same state with
/// every one of `keys` in it, and shuts them down.
async fn converge_and_stop(members: BTreeMap<u64, Member>, last: u64, keys: &[String]) {
    for m in members.values() {
        m.raft
            .wait(Some(PATIENCE))
            .applied_index_at_least(Some(last), "last applied")
            .await
            .expect("every node applies the last write");
    }
    let states: Vec<_> = members.values().map(|m| m.machine.state()).collect();
    for key in keys {
        assert!(states[0].kv.contains_key(key), "{key} is missing");
    }
    assert!(
        states.windows(2).all(|w| w[0] == w[1]),
        "the nodes applied different states: {states:#?}"
    );
    for m in members.values() {
        m.raft.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_leader_has_not_synced_is_not_applied_or_acknowledged_and_survives_its_power_loss()
 {
    let router = Arc::new(Router::default());
    let (mut members, leader) = three_members(&router).await;
    let followers: Vec<u64> = members.keys().copied().filter(|&id| id != leader).collect();
    let first = acknowledged(&members[&leader].raft, "k1").await;

    // The leader's disk stops flushing; the next write reaches both followers' disks.
    members[&leader].log.hold_syncs(true);
    let pending = tokio::spawn({
        let raft = members[&leader].raft.clone();
        async move { raft.client_write(put("k2")).await }
    });
    let k2 = first + 1;
    for f in &followers {
        members[&leader]
            .raft
            .wait(Some(PATIENCE))
            .metrics(
                |m| {
                    m.replication
                        .as_ref()
                        .is_some_and(|r| r.get(f).copied().flatten().is_some_and(|l| l.index >= k2))
                },
                "follower has k2",
            )
            .await
            .expect("k2 is replicated to both followers");
        assert!(
            members[f]
                .log
                .durability()
                .durable()
                .is_some_and(|l| l.index >= k2)
        );
    }
    // A majority holds k2 on disk, and the leader counts its own unsynced copy, so openraft
    // takes k2 as committed. For several heartbeats, nobody may apply it and its client may
    // not hear back.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !pending.is_finished(),
        "k2 was acknowledged before the leader synced it"
    );
    for (id, m) in &members {
        assert!(
            !m.machine.state().kv.contains_key("k2"),
            "node {id} applied k2 before the leader synced it"
        );
    }
    assert_eq!(
        members[&leader].log.durability().durable().map(|l| l.index),
        Some(first)
    );

    // Power loss on the leader: its copy of k2 is gone, and k2's client gets an error.
    let old = members.remove(&leader).expect("leader");
    router.nodes.lock().unwrap().remove(&leader);
    let mut disk = old.log.after_power_loss(leader);
    old.raft.shutdown().await.expect("shutdown");
    assert!(
        pending.await.expect("joined").is_err(),
        "k2 must not be acknowledged"
    );
    assert!(
        disk.try_get_log_entries(k2..=k2)
            .await
            .expect("read")
            .is_empty(),
        "the unsynced entry survived the power loss"
    );
    assert!(
        disk.try_get_log_entries(first..=first)
            .await
            .expect("read")
            .len()
            == 1,
        "the acknowledged entry was lost"
    );

    // The node restarts from what its disk kept; the cluster goes on and converges.
    members.insert(leader, start(&router, leader, disk).await);
    let new_leader = leader_of(&members).await;
    let last = acknowledged(&members[&new_leader].raft, "k3").await;
    converge_and_stop(members, last, &["k1".into(), "k3".into()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_only_append_does_not_hold_up_the_next_write() {
    let router = Arc::new(Router::default());
    let (members, leader) = three_members(&router).await;
    acknowledged(&members[&leader].raft, "k0").await;

    // Only client writes move appends now: no heartbeats, no elections. Every empty append
    // that first brings a follower a commit index hangs until the gate opens.
    for m in members.values() {
        m.raft.runtime_config().heartbeat(false);
        m.raft.runtime_config().elect(false);
    }
    router.gate.close();
    for i in 1..=20 {
        acknowledged(&members[&leader].raft, &format!("k{i}")).await;
    }
    assert_eq!(
        router.gate.abandoned.load(Ordering::SeqCst),
        0,
        "openraft waited on a commit-only append ({} held) until it gave up",
        router.gate.held.load(Ordering::SeqCst)
    );

    // Whatever was held goes through; every node applies every write and ends the same.
    router.gate.open();
    for m in members.values() {
        m.raft.runtime_config().heartbeat(true);
        m.raft.runtime_config().elect(true);
    }
    let last = acknowledged(&members[&leader].raft, "last").await;
    let keys: Vec<String> = (0..=20).map(|i| format!("k{i}")).collect();
    converge_and_stop(members, last, &keys).await;
}
