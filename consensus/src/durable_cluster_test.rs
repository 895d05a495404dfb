//! Three real openraft nodes on the in-memory store, wired through [`crate::network`] in one
//! process, check the durability rules of [`crate::durable`] end to end: while the leader's
//! own copy of a write is not on its disk, no node applies the write and its client hears
//! nothing, and a power loss of the leader then loses no acknowledged write.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{BasicNode, Raft, RaftLogReader, ServerState};

use crate::durable::Durability;
use crate::machine::TypeConfig;
use crate::mem::{MemLogStore, MemStateMachine};
use crate::network::{Network, RpcTransport};
use crate::state::Command;

const PATIENCE: Duration = Duration::from_secs(10);

/// Calls the node's Raft directly; a node not in the map is down.
#[derive(Default)]
struct Router {
    nodes: Mutex<BTreeMap<u64, (Raft<TypeConfig>, Arc<Durability>)>>,
    /// Appends sent: without entries, and with.
    appends: Mutex<(u64, u64)>,
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
        if let Ok(crate::network::RaftRequest::Append(a)) = crate::network::decode_request(&payload)
        {
            let mut appends = self.appends.lock().unwrap();
            if a.entries.is_empty() {
                appends.0 += 1;
            } else {
                appends.1 += 1;
            }
        }
        Box::pin(async move {
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
        Network::new(router.clone(), log.durability(), log.recent()),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_leader_has_not_synced_is_not_applied_or_acknowledged_and_survives_its_power_loss()
 {
    let router = Arc::new(Router::default());
    let mut members = BTreeMap::new();
    for id in 1..=3 {
        members.insert(id, start(&router, id, MemLogStore::new(id)).await);
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
    for m in members.values() {
        m.raft
            .wait(Some(PATIENCE))
            .applied_index_at_least(Some(last), "k3 applied")
            .await
            .expect("every node applies k3");
    }
    let states: Vec<_> = members.values().map(|m| m.machine.state()).collect();
    assert!(states[0].kv.contains_key("k1") && states[0].kv.contains_key("k3"));
    assert!(
        states.windows(2).all(|w| w[0] == w[1]),
        "the nodes applied different states: {states:#?}"
    );
    for m in members.values() {
        m.raft.shutdown().await.expect("shutdown");
    }
}

/// A leader tells followers of each commit with an append of its own, and openraft holds the
/// next entry back until that append is answered. The network lets the commit append wait
/// briefly and carry the next entry instead, and answers openraft's append of that entry
/// from the follower's answer: sequential writes then cost one append per follower, and
/// every node still ends with the same log and state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_writes_ride_on_the_commit_appends_and_every_node_converges() {
    let router = Arc::new(Router::default());
    let mut members = BTreeMap::new();
    for id in 1..=3 {
        members.insert(id, start(&router, id, MemLogStore::new(id)).await);
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
    acknowledged(&members[&leader].raft, "warm").await;
    let before = *router.appends.lock().unwrap();
    const WRITES: u64 = 40;
    let mut last = 0;
    for i in 0..WRITES {
        last = acknowledged(&members[&leader].raft, &format!("k{i}")).await;
    }
    let (empty, with_entries) = {
        let now = *router.appends.lock().unwrap();
        (now.0 - before.0, now.1 - before.1)
    };
    // Without the ride, each write is an append and a commit append to each of two
    // followers: 160. Heartbeats (every 50 ms here) add a few empty ones.
    assert!(
        empty + with_entries <= 2 * WRITES + 20,
        "{empty} empty and {with_entries} appends with entries for {WRITES} writes"
    );
    for m in members.values() {
        m.raft
            .wait(Some(PATIENCE))
            .applied_index_at_least(Some(last), "every write applied")
            .await
            .expect("every node applies every write");
    }
    let states: Vec<_> = members.values().map(|m| m.machine.state()).collect();
    assert!((0..WRITES).all(|i| states[0].kv.contains_key(&format!("k{i}"))));
    assert!(
        states.windows(2).all(|w| w[0] == w[1]),
        "the nodes applied different states: {states:#?}"
    );
    let mut logs = Vec::new();
    for m in members.values() {
        let mut log = m.log.clone();
        logs.push(log.try_get_log_entries(0..=last).await.expect("read"));
    }
    assert!(logs.windows(2).all(|w| w[0] == w[1]), "the logs differ");
    for m in members.values() {
        m.raft.shutdown().await.expect("shutdown");
    }
}
