//! The HTTP API's credentials under attack, with real agents: requests with no token, a wrong
//! token, a revoked or expired token, and a read-scoped token on a write route are refused
//! with 401 or 403 and change nothing; beyond loopback the API speaks only HTTPS.

use std::time::Duration;

use blx_tests::{Agent, Cluster, Netns, blx_bin, http, ip, is_root, wait_until};

/// The join tokens an agent lists.
fn join_tokens(agent: &Agent) -> usize {
    let (ok, out, err) = agent.run(&["token", "list", "-o", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .unwrap()
        .len()
}

fn create(agent: &Agent, name: &str, scope: &str, ttl: &str) -> String {
    let (ok, out, err) = agent.run(&[
        "api-token",
        "create",
        "--name",
        name,
        "--scope",
        scope,
        "--ttl",
        ttl,
    ]);
    assert!(ok, "api-token create: {err}");
    out.trim().to_string()
}

#[test]
fn the_api_refuses_missing_wrong_revoked_expired_and_narrow_tokens() {
    let mut cluster = Cluster::bootstrap();
    cluster.join();
    let leader = cluster.wait_raft(1, 1, Duration::from_secs(90));
    let (l, f) = (&cluster.agents[leader], &cluster.agents[1 - leader]);
    let tokens = join_tokens(l);
    let mint = br#"{"ttl_secs": 60}"#;

    tracing::info!("--- no token, an empty one, garbage, a forged API token, a wrong local token");
    // Well-formed, with a valid checksum, but never issued.
    let forged = blx_consensus::access::ApiToken {
        id: blx_membership::token::TokenId([7; 8]),
        secret: [7; 32],
    }
    .to_string();
    let wrong_local = format!("blxlocal1.{}", "0".repeat(64));
    for token in [
        None,
        Some(""),
        Some("hello"),
        Some(&forged),
        Some(&wrong_local),
    ] {
        for agent in [l, f] {
            let (status, body) = http(agent.api, token, "POST", "/v1/tokens", mint);
            assert_eq!(status, 401, "{token:?}: {body}");
            let (status, body) = http(agent.api, token, "PUT", "/v1/kv/k", b"v");
            assert_eq!(status, 401, "{token:?}: {body}");
        }
    }
    let (status, _) = http(l.api, None, "GET", "/v1/health", b"");
    assert_eq!(status, 200, "health needs no token");

    tracing::info!("--- a read token reads, and is refused on every write route");
    let reader = create(l, "reader", "read", "1h");
    let (status, body) = http(f.api, Some(&reader), "GET", "/v1/members", b"");
    assert_eq!(status, 200, "{body}");
    for (method, path, body) in [
        ("PUT", "/v1/kv/k", &b"v"[..]),
        ("POST", "/v1/tokens", &mint[..]),
        (
            "POST",
            "/v1/vms",
            br#"{"name":"x","command":["/bin/true"]}"#,
        ),
        ("POST", "/v1/agent/leave", b""),
    ] {
        for agent in [l, f] {
            let (status, text) = http(agent.api, Some(&reader), method, path, body);
            assert_eq!(status, 403, "{method} {path}: {text}");
            assert!(text.contains("scope read"), "{text}");
        }
    }

    tracing::info!("--- a write token writes keys through the follower, and cannot mint tokens");
    let writer = create(l, "deploy", "write", "1h");
    let (status, body) = http(f.api, Some(&writer), "PUT", "/v1/kv/k", b"from-writer");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(f.api, Some(&writer), "POST", "/v1/tokens", mint);
    assert_eq!(status, 403, "{body}");
    let (ok, out, err) = f.run(&["kv", "get", "k", "--api-token", &reader]);
    assert!(ok && out.trim() == "from-writer", "{out} {err}");

    tracing::info!("--- revoked on the leader, refused on the follower at once");
    let list = |agent: &Agent| -> Vec<serde_json::Value> {
        let (ok, out, err) = agent.run(&["api-token", "list", "-o", "json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let id = list(l).into_iter().find(|t| t["name"] == "deploy").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (ok, _, err) = l.run(&["api-token", "revoke", &id]);
    assert!(ok, "{err}");
    let (status, body) = http(f.api, Some(&writer), "PUT", "/v1/kv/k", b"after-revoke");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("revoked"), "{body}");
    let (ok, _, err) = l.run(&["api-token", "revoke", "00000000000000aa"]);
    assert!(!ok && err.contains("no API token"), "{err}");

    tracing::info!("--- an expired token is refused");
    let brief = create(l, "brief", "operator", "1s");
    wait_until(Duration::from_secs(10), "the 1s token expires", || {
        let (status, body) = http(f.api, Some(&brief), "GET", "/v1/status", b"");
        status == 401 && body.contains("expired")
    });

    tracing::info!("--- bad token requests are refused");
    for (args, expect) in [
        (&["--name", "has space", "--scope", "read"][..], "name"),
        (&["--name", "x", "--scope", "admin"][..], "unknown scope"),
        (
            &["--name", "x", "--scope", "read", "--ttl", "2y"][..],
            "unit must be",
        ),
    ] {
        let mut all = vec!["api-token", "create"];
        all.extend_from_slice(args);
        let (ok, _, err) = l.run(&all);
        assert!(!ok && err.contains(expect), "{args:?}: {err}");
    }
    let (ok, _, err) = l.run(&["kv", "get", "k", "--api-token", ""]);
    assert!(!ok && err.contains("empty"), "{err}");

    tracing::info!("--- nothing that was refused was applied");
    assert_eq!(
        join_tokens(l),
        tokens,
        "a refused request minted a join token"
    );
    let (ok, out, err) = l.run(&["kv", "get", "k"]);
    assert!(ok && out.trim() == "from-writer", "{out} {err}");
    let names: Vec<String> = list(f)
        .iter()
        .map(|t| format!("{}:{}", t["name"], t["status"]))
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.contains("revoked")).count(),
        1,
        "{names:?}"
    );
}

/// An agent alone in a network namespace, with its API on a non-loopback address.
struct Isolated {
    ns: Netns,
    dir: tempfile::TempDir,
    addr: String,
}

impl Isolated {
    fn blx(&self, args: &[&str]) -> (bool, String, String) {
        let bin = blx_bin();
        let data = self.dir.path().join("data");
        let mut all = vec![bin.to_str().unwrap()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--api", &self.addr, "--data-dir", data.to_str().unwrap()]);
        let out = self.ns.exec(&all).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// One plain-HTTP request sent from inside the namespace with bash's /dev/tcp; the raw
    /// answer.
    fn plain_http(&self, request: &str) -> String {
        let (host, port) = self.addr.split_once(':').unwrap();
        let script =
            format!("exec 3<>/dev/tcp/{host}/{port}; printf '%s' \"$REQ\" >&3; timeout 5 cat <&3");
        let out = self
            .ns
            .exec(&["bash", "-c", &script])
            .env("REQ", request)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[test]
fn beyond_loopback_the_api_speaks_only_https() {
    if !is_root() {
        eprintln!("SKIPPED: needs root for network namespaces (CI runs as root)");
        return;
    }
    let tag = std::process::id() % 10000;
    let ns = Netns::new(&format!("blxapi{tag}"));
    // A veth pair with both ends in the namespace: an interface that is not loopback.
    let (dev, peer) = (format!("ta{tag}"), format!("tb{tag}"));
    ip(&[
        "-n", &ns.0, "link", "add", &dev, "type", "veth", "peer", "name", &peer,
    ]);
    ip(&["-n", &ns.0, "addr", "add", "10.232.0.1/24", "dev", &dev]);
    ip(&["-n", &ns.0, "link", "set", &dev, "up"]);
    ip(&["-n", &ns.0, "link", "set", &peer, "up"]);
    let node = Isolated {
        ns,
        dir: tempfile::tempdir().unwrap(),
        addr: "10.232.0.1:7947".into(),
    };
    let data = node.dir.path().join("data");
    let out = node.dir.path().join("agent.out");
    let log = node.dir.path().join("agent.log");
    let bin = blx_bin();
    // Killed when the namespace is dropped (`Netns` kills what runs in it), not waited on.
    #[allow(clippy::zombie_processes)]
    let _agent = node
        .ns
        .exec(&[
            bin.to_str().unwrap(),
            "agent",
            "--data-dir",
            data.to_str().unwrap(),
            "--bind",
            "10.232.0.1:7946",
            "--api",
            &node.addr,
            "--no-mdns",
        ])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(Duration::from_secs(60), "the agent leads", || {
        let (ok, out, _) = node.blx(&["status", "-o", "json"]);
        ok && serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|s| s["role"] == "leader")
    });

    tracing::info!("--- the CLI checks the HTTPS API against the data dir's CA");
    let (ok, _, err) = node.blx(&["token", "create", "--ttl", "1h"]);
    assert!(ok, "{err}\n{}", logs());
    let count = |node: &Isolated| {
        let (ok, out, err) = node.blx(&["token", "list", "-o", "json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .unwrap()
            .len()
    };
    let tokens = count(&node);

    tracing::info!("--- a CA that did not sign the node's certificate is not trusted");
    let wrong_ca = data.join("node.crt");
    let (ok, _, err) = node.blx(&["status", "--ca-cert", wrong_ca.to_str().unwrap()]);
    assert!(!ok, "a server checked against the wrong CA was trusted");
    assert!(err.contains("UnknownIssuer"), "{err}");

    tracing::info!("--- plain HTTP from beyond loopback is refused, even with a valid token");
    let local = std::fs::read_to_string(data.join("api.token")).unwrap();
    let body = r#"{"ttl_secs": 60}"#;
    let request = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: blx\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        local.trim(),
        body.len()
    );
    let answer = node.plain_http(&request);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("HTTPS"), "{answer}");
    assert_eq!(
        count(&node),
        tokens,
        "the plain-HTTP request minted a token"
    );
}
