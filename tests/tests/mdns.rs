//! LAN discovery: two agents in separate network namespaces, joined by a veth pair, find each
//! other over mDNS with no seed given. Needs root (for `ip netns`), as CI has.

use std::process::Stdio;
use std::time::Duration;

use blx_tests::{Netns, blx_bin, ip, is_root, wait_until};

fn members_json(ns: &Netns, data_dir: &std::path::Path) -> Vec<serde_json::Value> {
    let out = ns
        .exec(&[
            blx_bin().to_str().unwrap(),
            "members",
            "-o",
            "json",
            "--api",
            "127.0.0.1:7947",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[test]
fn two_agents_in_network_namespaces_find_each_other_over_mdns() {
    if !is_root() {
        eprintln!("SKIPPED: needs root for network namespaces (CI runs as root)");
        return;
    }
    let tag = std::process::id() % 10000;
    let (a, b) = (
        Netns::new(&format!("blxa{tag}")),
        Netns::new(&format!("blxb{tag}")),
    );
    let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
    ip(&[
        "link", "add", &va, "netns", &a.0, "type", "veth", "peer", "name", &vb, "netns", &b.0,
    ]);
    for (ns, dev, addr) in [(&a, &va, "10.231.0.1/24"), (&b, &vb, "10.231.0.2/24")] {
        ip(&["-n", &ns.0, "addr", "add", addr, "dev", dev]);
        ip(&["-n", &ns.0, "link", "set", dev, "up", "multicast", "on"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = blx_bin();
    let bin = bin.to_str().unwrap();

    tracing::info!("--- the first agent bootstraps in namespace A and announces itself");
    let token_file = dir.path().join("a.out");
    let mut agent_a = a
        .exec(&[
            bin,
            "agent",
            "--data-dir",
            dir.path().join("a").to_str().unwrap(),
            "--bind",
            "10.231.0.1:7946",
            "--api",
            "127.0.0.1:7947",
            "--name",
            "a",
        ])
        .stdout(std::fs::File::create(&token_file).unwrap())
        .stderr(std::fs::File::create(dir.path().join("a.log")).unwrap())
        .spawn()
        .unwrap();
    let mut token = String::new();
    wait_until(Duration::from_secs(20), "agent A prints a token", || {
        token = std::fs::read_to_string(&token_file)
            .unwrap_or_default()
            .trim()
            .to_string();
        !token.is_empty()
    });

    tracing::info!("--- the second agent joins from namespace B with the token and no seed");
    let mut agent_b = b
        .exec(&[
            bin,
            "join",
            &token,
            "--data-dir",
            dir.path().join("b").to_str().unwrap(),
            "--bind",
            "10.231.0.2:7946",
            "--api",
            "127.0.0.1:7947",
            "--name",
            "b",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("b.log")).unwrap())
        .spawn()
        .unwrap();

    let logs = || {
        format!(
            "{}\n{}",
            std::fs::read_to_string(dir.path().join("a.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("b.log")).unwrap_or_default()
        )
    };
    let both_alive = |ns: &Netns, name: &str| {
        members_json(ns, &dir.path().join(name))
            .iter()
            .filter(|m| m["state"] == "alive")
            .count()
            == 2
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while !(both_alive(&a, "a") && both_alive(&b, "b")) {
        assert!(
            std::time::Instant::now() < deadline,
            "agents did not find each other over mDNS:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = agent_a.kill();
    let _ = agent_b.kill();
    let _ = agent_a.wait();
    let _ = agent_b.wait();
}
