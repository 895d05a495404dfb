//! LAN discovery: two agents in separate network namespaces, joined by a veth pair, find each
//! other over mDNS with no seed given. Needs root (for `ip netns`), as CI has.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use blx_tests::{blx_bin, wait_until};

struct Netns(String);

impl Netns {
    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.0])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let out: Output = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn members_json(ns: &Netns) -> Vec<serde_json::Value> {
    let out = ns
        .exec(&[
            blx_bin().to_str().unwrap(),
            "members",
            "-o",
            "json",
            "--api",
            "127.0.0.1:7947",
        ])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[test]
fn two_agents_in_network_namespaces_find_each_other_over_mdns() {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !is_root {
        eprintln!("SKIPPED: needs root for network namespaces (CI runs as root)");
        return;
    }
    let tag = std::process::id() % 10000;
    let (a, b) = (Netns(format!("blxa{tag}")), Netns(format!("blxb{tag}")));
    ip(&["netns", "add", &a.0]);
    ip(&["netns", "add", &b.0]);
    let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
    ip(&[
        "link", "add", &va, "netns", &a.0, "type", "veth", "peer", "name", &vb, "netns", &b.0,
    ]);
    for (ns, dev, addr) in [(&a, &va, "10.231.0.1/24"), (&b, &vb, "10.231.0.2/24")] {
        ip(&["-n", &ns.0, "addr", "add", addr, "dev", dev]);
        ip(&["-n", &ns.0, "link", "set", dev, "up", "multicast", "on"]);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
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
    let both_alive = |ns: &Netns| {
        members_json(ns)
            .iter()
            .filter(|m| m["state"] == "alive")
            .count()
            == 2
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while !(both_alive(&a) && both_alive(&b)) {
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
