//! Membership with real `blx` processes on loopback: joining, failure detection, leaving,
//! restarts.

use std::time::Duration;

use blx_tests::{Cluster, wait_until};

#[test]
fn five_agents_join_detect_a_kill_and_see_a_leave() {
    tracing::info!("--- five agents joined with a token all see five alive");
    let mut cluster = Cluster::bootstrap();
    for _ in 0..4 {
        cluster.join();
    }
    cluster.wait_alive(5, Duration::from_secs(60));
    let names: Vec<String> = cluster.agents[2]
        .members()
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["n1", "n2", "n3", "n4", "n5"]);

    tracing::info!("--- a SIGKILLed agent is down on every survivor");
    cluster.agents[4].kill();
    wait_until(Duration::from_secs(30), "n5 down everywhere", || {
        cluster.agents[..4]
            .iter()
            .all(|a| a.state_of("n5").as_deref() == Some("down"))
    });

    tracing::info!("--- an agent that leaves is left, never down");
    let out = cluster.agents[3].cli(&["leave"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        cluster.agents[3].wait_exit(Duration::from_secs(10)),
        "n4 did not stop after leaving"
    );
    let mut seen_down = false;
    wait_until(Duration::from_secs(30), "n4 left everywhere", || {
        let states: Vec<Option<String>> = cluster.agents[..3]
            .iter()
            .map(|a| a.state_of("n4"))
            .collect();
        seen_down |= states.iter().any(|s| s.as_deref() == Some("down"));
        states.iter().all(|s| s.as_deref() == Some("left"))
    });
    assert!(
        !seen_down,
        "n4 was reported down after a graceful leave\n{}",
        cluster.logs()
    );
}

#[test]
fn a_restarted_agent_rejoins_with_its_data_dir_and_no_token() {
    let mut cluster = Cluster::bootstrap();
    cluster.join();
    cluster.join();
    cluster.wait_alive(3, Duration::from_secs(60));
    let before = cluster.agents[0]
        .members()
        .unwrap()
        .into_iter()
        .find(|m| m.name == "n3")
        .unwrap();

    tracing::info!("--- kill n3 and wait until it is down");
    cluster.agents[2].kill();
    wait_until(Duration::from_secs(30), "n3 down", || {
        cluster.agents[0].state_of("n3").as_deref() == Some("down")
    });

    tracing::info!(
        "--- restart n3 with no token: it comes back alive as a newer generation of the same node"
    );
    cluster.agents[2].restart();
    cluster.wait_alive(3, Duration::from_secs(60));
    let after = cluster.agents[0]
        .members()
        .unwrap()
        .into_iter()
        .find(|m| m.name == "n3")
        .unwrap();
    assert_eq!(after.id, before.id);
    assert!(
        after.generation > before.generation,
        "{} !> {}",
        after.generation,
        before.generation
    );
    assert_eq!(
        cluster.agents[0].members().unwrap().len(),
        3,
        "the restart must not add a member"
    );
}
