//! Bad flags to `blx agent` are refused with a clear error before the data dir is touched, and
//! bad input to the remaining API routes is refused with nothing changed.

use std::process::{Command, Stdio};
use std::time::Duration;

use blx_tests::{Cluster, blx_bin, exits_within, wait_until};

fn agent_fails(args: &[&str], expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(blx_bin())
        .arg("agent")
        .arg("--data-dir")
        .arg(&data)
        .args(["--no-mdns", "--bind", "127.0.0.1:0"])
        .args(if args.contains(&"--api") {
            &[][..]
        } else {
            &["--api", "127.0.0.1:0"][..]
        })
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "agent accepted {args:?}");
    assert!(
        stderr.contains(expect),
        "{args:?}: expected {expect:?} in:\n{stderr}"
    );
    assert!(
        !data.exists(),
        "agent with {args:?} created its data dir before refusing"
    );
}

#[test]
fn bad_agent_flags_are_refused_before_anything_is_written() {
    agent_fails(&["--name", "has space"], "node name");
    agent_fails(&["--label", "novalue"], "label");
    agent_fails(&["--label", "k=has space"], "label");
    // The agent takes no shared secret for its API: tokens are scoped and replicated.
    agent_fails(&["--api-token", "s3cret"], "unexpected argument");
    agent_fails(&["--seed", "127.0.0.1:7946"], "needs a join token");
    agent_fails(&["--token", "blx1.garbage"], "malformed join token");
    agent_fails(&["--raft-snapshot-logs", "3"], "raft-snapshot-logs");
    agent_fails(&["--bootstrap-token-ttl", "2y"], "unit must be");
    agent_fails(&["--advertise", "0.0.0.0:7946"], "concrete address");
    agent_fails(&["--vcpus", "0"], "vcpus");
    agent_fails(&["--memory", "12XB"], "unit must be");
    agent_fails(&["--accel", "xen"], "accel");
    agent_fails(&["--threads", "0"], "threads");
    agent_fails(&["--cert-validity", "5s"], "certificate validity");
    agent_fails(&["--cert-validity", "soon"], "not a duration");
}

#[test]
fn a_bad_log_filter_is_refused_with_the_variable_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (command, args) in [
        (
            "agent",
            &["--no-mdns", "--bind", "127.0.0.1:0", "--api", "127.0.0.1:0"][..],
        ),
        ("status", &["--api", "127.0.0.1:9"][..]),
    ] {
        let mut child = Command::new(blx_bin())
            .arg(command)
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .env("BLX_LOG", "blx=loud")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // An agent that accepted the filter would run on: give it a while, then fail.
        let exited = exits_within(&mut child, Duration::from_secs(20));
        if !exited {
            child.kill().ok();
        }
        let out = child.wait_with_output().unwrap();
        assert!(exited, "{command} started with a bad BLX_LOG");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("BLX_LOG=blx=loud"),
            "{command}: expected the variable in:\n{stderr}"
        );
        assert!(
            !data.exists(),
            "{command} created the data dir before refusing"
        );
    }
}

#[test]
fn bad_operator_and_query_input_is_refused() {
    let cluster = Cluster::bootstrap();
    let a = &cluster.agents[0];
    wait_until(Duration::from_secs(60), "n1 leads", || {
        a.status().is_some_and(|s| s["role"] == "leader")
    });
    wait_until(Duration::from_secs(30), "n1 is in the node table", || {
        a.run(&["node", "list"]).1.contains("n1")
    });
    let before = a.status().unwrap();

    let (ok, _, err) = a.run(&["operator", "transfer-leader", "--to", "not-hex"]);
    assert!(!ok && err.contains("not a node id"), "{err}");
    let (ok, _, err) = a.run(&["operator", "transfer-leader", "--to", "00000000000000ff"]);
    assert!(!ok && err.contains("not a voter"), "{err}");
    let (ok, _, err) = a.run(&["operator", "transfer-leader"]);
    assert!(!ok && err.contains("no other voter"), "{err}");

    let (ok, _, err) = a.run(&["config", "set", "--standby-servers", "10"]);
    assert!(
        !ok && err.contains("standby_servers must be at most 9"),
        "{err}"
    );
    let (ok, _, err) = a.run(&["config", "set", "--standby-servers", "many"]);
    assert!(!ok && err.contains("--standby-servers"), "{err}");

    let (ok, _, err) = a.run(&["node", "remove", "no-such-node"]);
    assert!(!ok && err.contains("no node with id or name"), "{err}");
    let (ok, _, err) = a.run(&["node", "remove", "n1"]);
    assert!(!ok && err.contains("cannot remove itself"), "{err}");

    let mut conn = std::net::TcpStream::connect(a.api).unwrap();
    std::io::Write::write_all(
        &mut conn,
        format!(
            "GET /v1/kv/x?stale=maybe HTTP/1.1\r\nHost: blx\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n",
            a.local_token()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut conn, &mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 400"),
        "?stale=maybe must be a 400, got: {reply}"
    );
    let after = a.status().unwrap();
    assert_eq!(
        before["applied_index"], after["applied_index"],
        "refused requests changed the log"
    );
    assert_eq!(before["leader"], after["leader"]);
}
