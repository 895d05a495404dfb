//! Servers and clients with real `blx` processes: beyond the voters and the standbys, a node
//! stays out of Raft and follows a server's watch, yet writes, reads and runs VMs like any
//! other; when a voter dies, a client steps up to take its place.

use std::time::Duration;

use blx_tests::{Cluster, SLEEPER, wait_until};

const LONG: Duration = Duration::from_secs(90);

fn role(status: &serde_json::Value) -> &str {
    status["role"].as_str().unwrap_or("")
}

#[test]
fn nodes_beyond_the_servers_are_clients_that_write_read_run_vms_and_step_up() {
    let mut cluster = Cluster::bootstrap();
    let token = cluster.token.clone();
    for k in 2..=5 {
        cluster.join_with(0, &token, &["--label", &format!("host=n{k}")]);
    }
    cluster.wait_alive(5, LONG);
    // Every joiner starts as a learner while the voters fill up; with no standbys wanted, the
    // two beyond the voters then leave Raft, one at a time, and become clients.
    let (ok, _, err) = cluster.agents[0].run(&[
        "config",
        "set",
        "--standby-servers",
        "0",
        "--voter-grace-secs",
        "3",
    ]);
    assert!(ok, "{err}");

    tracing::info!("--- 3 voters, no standby: the other two are clients that know the leader");
    let leader = cluster.wait_raft(3, 0, LONG);
    let leader_id = cluster.agents[leader].status().unwrap()["id"].clone();
    // A learner the autopilot has just removed counts itself a server until it has not heard
    // the leader for `SERVER_CONTACT`; wait for it to follow a watch instead, and for its
    // followed copy, which may trail for a moment after it starts, to show the 3 voters.
    let clients_now = || -> Vec<usize> {
        (0..5)
            .filter(|i| {
                cluster.agents[*i].status().is_some_and(|s| {
                    role(&s) == "client"
                        && s["leader"] == leader_id
                        && s["voters"].as_array().map(Vec::len) == Some(3)
                })
            })
            .collect()
    };
    wait_until(
        LONG,
        "two clients that know the leader and the voters",
        || clients_now().len() == 2,
    );
    let clients = clients_now();
    assert_eq!(clients.len(), 2, "{}", cluster.logs());
    let client = clients[0];

    tracing::info!("--- a write through a client, read back through a voter and the client");
    let (ok, _, err) = cluster.agents[client].run(&["kv", "put", "via/client", "c1"]);
    assert!(ok, "{err}");
    let (ok, out, err) = cluster.agents[leader].run(&["kv", "get", "via/client"]);
    assert!(ok && out == "c1", "{out} {err}");
    let (ok, _, err) = cluster.agents[leader].run(&["kv", "put", "via/leader", "l1"]);
    assert!(ok, "{err}");
    let (ok, out, err) = cluster.agents[client].run(&["kv", "get", "via/leader"]);
    assert!(
        ok && out == "l1",
        "a linearizable read on a client: {out} {err}"
    );
    wait_until(LONG, "the client's own copy has the leader's write", || {
        let (ok, out, _) = cluster.agents[client].run(&["kv", "get", "--stale", "via/leader"]);
        ok && out == "l1"
    });

    tracing::info!("--- a VM placed on the client runs there");
    let host = cluster.agents[client].name.clone();
    let mut args = vec!["vm", "run", "on-client", "--constraint"];
    let constraint = format!("host={host}");
    args.push(&constraint);
    args.extend_from_slice(&SLEEPER);
    let (ok, _, err) = cluster.agents[leader].run(&args);
    assert!(ok, "vm run on the client: {err}");
    let vm = cluster.agents[leader].vm("on-client").unwrap();
    assert_eq!(vm["phase"], "running", "{vm}");
    assert_eq!(vm["node"], cluster.agents[client].status().unwrap()["id"]);
    assert_eq!(cluster.agents[client].workload_pids().len(), 1);

    tracing::info!("--- a voter dies: a client is promoted in its place");
    let victim = (0..5)
        .find(|i| *i != leader && !clients.contains(i))
        .unwrap();
    let victim_id = cluster.agents[victim].status().unwrap()["id"].clone();
    cluster.agents[victim].kill();
    let client_ids: Vec<serde_json::Value> = clients
        .iter()
        .map(|i| cluster.agents[*i].status().unwrap()["id"].clone())
        .collect();
    cluster.wait_or_dump(
        LONG,
        "a former client votes in place of the dead voter",
        || {
            cluster.agents[leader].status().is_some_and(|s| {
                let voters = s["voters"].as_array().unwrap();
                s["changing"] == false
                    && voters.len() == 3
                    && !voters.contains(&victim_id)
                    && client_ids.iter().any(|c| voters.contains(c))
            })
        },
    );
    let promoted = clients
        .iter()
        .copied()
        .find(|i| {
            cluster.agents[leader].status().unwrap()["voters"]
                .as_array()
                .unwrap()
                .contains(&cluster.agents[*i].status().unwrap()["id"])
        })
        .unwrap();
    wait_until(LONG, "the promoted node is no longer a client", || {
        cluster.agents[promoted]
            .status()
            .is_some_and(|s| role(&s) == "follower")
    });
    let (ok, _, err) = cluster.agents[promoted].run(&["kv", "put", "after/promotion", "p"]);
    assert!(ok, "{err}");
    let still_client = clients.iter().copied().find(|i| *i != promoted).unwrap();
    wait_until(
        LONG,
        "the other client still follows, and sees the write",
        || {
            let (ok, out, _) =
                cluster.agents[still_client].run(&["kv", "get", "--stale", "after/promotion"]);
            ok && out == "p"
                && cluster.agents[still_client]
                    .status()
                    .is_some_and(|s| role(&s) == "client" && s["leader"] == leader_id)
        },
    );
}

#[test]
fn nodes_that_never_entered_raft_find_a_server_and_follow_it() {
    // With no standbys wanted, the autopilot takes in the two joiners it needs as voters; the
    // three that join after that never hear Raft and know no server. Each must find one by
    // asking members, some of which are in the same position.
    let mut cluster = Cluster::bootstrap();
    let token = cluster.token.clone();
    for k in 2..=3 {
        cluster.join_with(0, &token, &["--label", &format!("host=n{k}")]);
    }
    cluster.wait_alive(3, LONG);
    cluster.wait_raft(3, 0, LONG);
    let (ok, _, err) = cluster.agents[0].run(&["config", "set", "--standby-servers", "0"]);
    assert!(ok, "{err}");
    for k in 4..=6 {
        cluster.join_with(0, &token, &["--label", &format!("host=n{k}")]);
    }
    cluster.wait_alive(6, LONG);
    let leader = cluster.wait_raft(3, 0, LONG);
    let leader_id = cluster.agents[leader].status().unwrap()["id"].clone();
    let (ok, _, err) = cluster.agents[leader].run(&["kv", "put", "seen/by", "all"]);
    assert!(ok, "{err}");
    for i in 0..6 {
        let voter = cluster.agents[leader].status().unwrap()["voters"]
            .as_array()
            .unwrap()
            .contains(&cluster.agents[i].status().unwrap()["id"]);
        if voter {
            continue;
        }
        wait_until(LONG, "a node outside Raft follows a server", || {
            let (ok, out, _) = cluster.agents[i].run(&["kv", "get", "--stale", "seen/by"]);
            ok && out == "all"
                && cluster.agents[i]
                    .status()
                    .is_some_and(|s| role(&s) == "client" && s["leader"] == leader_id)
        });
    }
}
