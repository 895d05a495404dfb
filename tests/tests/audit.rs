//! The audit log with real `blx` processes: a write through a follower with an API token is
//! recorded on the leader with the member it came through, the token's id, the key and the
//! outcome; a refused compare-and-set is recorded as refused; `blx audit tail --follow`
//! prints records as they are written; and reading the log needs an operator token.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use blx_tests::{Agent, Cluster, blx_bin};

const LONG: Duration = Duration::from_secs(90);

fn node_id(agent: &Agent) -> String {
    std::fs::read_to_string(agent.data_dir.join("node-id"))
        .unwrap()
        .trim()
        .to_string()
}

fn tail(agent: &Agent, n: &str) -> Vec<serde_json::Value> {
    let (ok, out, err) = agent.run(&["audit", "tail", "-n", n]);
    assert!(ok, "audit tail: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn writes_are_audited_on_the_leader_with_who_asked_and_tail_follows() {
    let mut cluster = Cluster::bootstrap();
    cluster.join();
    cluster.join();
    cluster.wait_alive(3, LONG);
    cluster.wait_raft(3, 0, LONG);
    let leader_id = cluster.agents[0].status().unwrap()["leader"]
        .as_str()
        .unwrap()
        .to_string();
    let leader = &cluster.agents[cluster.index_of(&leader_id).unwrap()];
    let follower = cluster
        .agents
        .iter()
        .find(|a| node_id(a) != leader_id)
        .unwrap();

    let (ok, token, err) = leader.run(&[
        "api-token",
        "create",
        "--name",
        "deployer",
        "--scope",
        "write",
        "--ttl",
        "1h",
    ]);
    assert!(ok, "{err}");
    let token = token.trim();
    let (ok, list, _) = leader.run(&["api-token", "list", "-o", "json"]);
    assert!(ok);
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    let token_id = list.iter().find(|t| t["name"] == "deployer").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let (ok, _, err) = follower.run(&["kv", "put", "app/color", "blue", "--api-token", token]);
    assert!(ok, "{err}");
    // A compare-and-set against the wrong index, sent to the leader, is refused there and
    // recorded as refused.
    let (ok, _, _) = leader.run(&[
        "kv",
        "put",
        "app/color",
        "red",
        "--cas",
        "1",
        "--api-token",
        token,
    ]);
    assert!(!ok, "a stale compare-and-set must be refused");

    let mut records = Vec::new();
    blx_tests::wait_until(LONG, "both writes are in the leader's audit log", || {
        records = tail(leader, "200")
            .into_iter()
            .filter(|r| r["target"] == "app/color")
            .collect();
        records.len() >= 2
    });
    let applied = &records[0];
    assert_eq!(applied["command"], "kv_put");
    assert_eq!(applied["node"], node_id(follower).as_str());
    assert_eq!(applied["caller"], format!("api token {token_id}").as_str());
    assert_eq!(applied["outcome"], "applied");
    assert!(applied["at_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let refused = &records[1];
    assert!(
        refused["outcome"]
            .as_str()
            .unwrap()
            .starts_with("refused: "),
        "{refused}"
    );
    assert!(refused["seq"].as_u64() > applied["seq"].as_u64());
    // The file itself: JSON lines in the data dir.
    let text = std::fs::read_to_string(leader.data_dir.join("audit/audit.log")).unwrap();
    assert!(text.lines().any(|l| l.contains("\"app/color\"")));

    // --follow prints a record written after it started.
    let mut child = Command::new(blx_bin())
        .args(["audit", "tail", "-n", "0", "--follow", "--api"])
        .arg(leader.api.to_string())
        .arg("--data-dir")
        .arg(&leader.data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let (ok, _, err) = leader.run(&["kv", "put", "app/size", "large"]);
    assert!(ok, "{err}");
    let deadline = std::time::Instant::now() + LONG;
    let mut seen = false;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("\"app/size\"") => {
                seen = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen, "audit tail --follow printed the new write");

    // Garbage in the query is refused whole, in the one error shape.
    for q in ["after=abc", "limit=-1", "after=1&bogus=2"] {
        let (code, body) = leader.http("GET", &format!("/v1/audit?{q}"), b"");
        assert_eq!(code, 400, "{q}: {body}");
        assert!(body.contains("\"code\":\"bad_request\""), "{q}: {body}");
    }

    // Reading the audit log is for operators: a write token is not enough.
    let (ok, _, err) = leader.run(&["audit", "tail", "--api-token", token]);
    assert!(!ok && err.contains("operator"), "{err}");
}
