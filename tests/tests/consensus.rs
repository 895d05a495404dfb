//! Consensus with real `blx` processes: the autopilot builds the voter set by itself, writes
//! go through whoever leads, and a leader's death loses no acknowledged write.

use std::time::Duration;

use blx_tests::{Cluster, wait_until};

const LONG: Duration = Duration::from_secs(90);

#[test]
fn one_agent_and_four_joiners_end_with_three_voters_then_five_on_request() {
    let mut cluster = Cluster::bootstrap();
    for _ in 0..4 {
        cluster.join();
    }
    cluster.wait_alive(5, LONG);

    tracing::info!("--- with no operator step: 3 voters and 2 learners");
    cluster.wait_raft(3, 2, LONG);

    tracing::info!("--- desired_voters 5: every node votes");
    let (ok, _, err) = cluster.agents[2].run(&["config", "set", "--desired-voters", "5"]);
    assert!(ok, "{err}");
    cluster.wait_raft(5, 0, LONG);
}

#[test]
fn writes_survive_the_leaders_death_and_bad_input_changes_nothing() {
    let mut cluster = Cluster::bootstrap();
    cluster.join();
    cluster.join();
    cluster.wait_alive(3, LONG);
    let leader = cluster.wait_raft(3, 0, LONG);
    let follower = (leader + 1) % 3;

    tracing::info!("--- KV round trip through a follower (forwarded to the leader)");
    for i in 0..20 {
        let via = &cluster.agents[i % 3];
        let (ok, _, err) = via.run(&["kv", "put", &format!("app/k{i:02}"), &format!("v{i}")]);
        assert!(ok, "put via {}: {err}", via.name);
    }
    let (ok, out, err) = cluster.agents[follower].run(&["kv", "get", "app/k07"]);
    assert!(ok, "{err}");
    assert_eq!(out, "v7");

    tracing::info!("--- bad input: each refused with a clear error, nothing applied");
    let f = &cluster.agents[follower];
    let (ok, _, err) = f.run(&["kv", "put", "app/k01", "x", "--cas", "1"]);
    assert!(!ok && err.contains("compare-and-set failed"), "stale CAS: {err}");
    for (voters, why) in [("4", "odd"), ("0", "odd"), ("7", "more than")] {
        let (ok, _, err) = f.run(&["config", "set", "--desired-voters", voters]);
        assert!(!ok && err.contains(why), "desired_voters {voters}: {err}");
    }
    let bad = cluster.root.path().join("bad.json");
    std::fs::write(&bad, r#"{"desired_voters": 3, "bogus": 1}"#).unwrap();
    let (ok, _, err) = f.run(&["config", "set", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("bogus"), "unknown field: {err}");
    let big = cluster.root.path().join("big");
    std::fs::write(&big, vec![b'x'; 600 * 1024]).unwrap();
    let out = std::process::Command::new(blx_tests::blx_bin())
        .args(["kv", "put", "app/big", "-", "--api", &f.api.to_string()])
        .stdin(std::fs::File::open(&big).unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success(), "an oversized value was accepted");
    let (_, out, _) = f.run(&["kv", "get", "app/k01"]);
    assert_eq!(out, "v1", "a refused write changed the value");
    let (ok, _, _) = f.run(&["kv", "get", "app/big"]);
    assert!(!ok, "a refused write created a key");
    let (_, history, _) = f.run(&["config", "history"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&history).unwrap().as_array().unwrap().len(), 1);

    tracing::info!("--- config set, then rollback restores the previous version");
    let (ok, _, err) = f.run(&["config", "set", "--voter-grace-secs", "45"]);
    assert!(ok, "{err}");
    let (ok, _, err) = f.run(&["config", "rollback"]);
    assert!(ok, "{err}");
    let (_, cfg, _) = f.run(&["config", "get"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&cfg).unwrap()["config"]["voter_grace_secs"], 30);

    tracing::info!("--- SIGKILL the leader: a new one is elected and every acknowledged write is there");
    let old_leader = cluster.agents[leader].status().unwrap()["id"].clone();
    cluster.agents[leader].kill();
    let survivor = &cluster.agents[follower];
    wait_until(LONG, "a new leader", || survivor.status().is_some_and(|s| s["leader"].is_u64() && s["leader"] != old_leader));
    for i in 0..20 {
        let (ok, out, err) = survivor.run(&["kv", "get", &format!("app/k{i:02}")]);
        assert!(ok, "k{i:02} lost: {err}\n{}", cluster.logs());
        assert_eq!(out, format!("v{i}"));
    }
    let (ok, _, err) = survivor.run(&["kv", "put", "app/after", "yes"]);
    assert!(ok, "write after failover: {err}");
}
