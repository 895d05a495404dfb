//! What load balancers and process supervisors use, with real `blx` processes: `/v1/health`
//! answers while the process is up, and `/v1/ready` only while a Raft leader answers the node,
//! both without an API token; under systemd (`Type=notify`) the agent says when it is ready.

use std::time::Duration;

use std::process::{Command, Stdio};

use blx_tests::{Agent, Cluster, blx_bin, http, subnet, wait_until};

const LONG: Duration = Duration::from_secs(90);

fn ready(agent: &Agent) -> (u16, String) {
    http(agent.api, None, "GET", "/v1/ready", b"")
}

#[test]
fn ready_is_503_while_no_leader_answers_and_200_once_one_does() {
    let mut cluster = Cluster::bootstrap();
    cluster.join();
    cluster.join();
    cluster.wait_alive(3, LONG);
    cluster.wait_raft(3, 0, LONG);
    for a in &cluster.agents {
        wait_until(LONG, "every member is ready", || ready(a).0 == 200);
        let (code, body) = ready(a);
        assert!(
            body.contains("\"ready\":true") && body.contains("\"leader\""),
            "{code} {body}"
        );
        assert_eq!(http(a.api, None, "GET", "/v1/health", b"").0, 200);
    }

    tracing::info!("--- SIGKILL every agent, start one: it is up, but has no quorum");
    for a in cluster.agents.iter_mut() {
        a.kill();
    }
    cluster.agents[0].restart();
    let first = &cluster.agents[0];
    wait_until(LONG, "the restarted agent serves its API", || {
        first.status().is_some()
    });
    assert_eq!(http(first.api, None, "GET", "/v1/health", b"").0, 200);
    let (code, body) = ready(first);
    assert_eq!(code, 503, "ready without a quorum: {body}");
    assert!(
        body.contains("\"ready\":false") && body.contains("\"reason\""),
        "{body}"
    );

    tracing::info!("--- a second voter back: a leader is elected and answers");
    cluster.agents[1].restart();
    let first = &cluster.agents[0];
    wait_until(LONG, "ready once a quorum elects a leader", || {
        ready(first).0 == 200
    });
}

#[test]
fn the_agent_tells_systemd_it_is_ready_once_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(LONG)).unwrap();
    let [a, b, c] = subnet();
    let ip = format!("{a}.{b}.{c}.1");
    let data = dir.path().join("data");
    let mut agent = Command::new(blx_bin())
        .args(["agent", "--no-mdns", "--threads", "1"])
        .args([
            "--bind",
            &format!("{ip}:7946"),
            "--api",
            &format!("{ip}:7947"),
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("NOTIFY_SOCKET", &socket_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let got = socket.recv(&mut buf);
    // Ready means serving: the API answers at once.
    let health = got.is_ok().then(|| {
        http(
            format!("{ip}:7947").parse().unwrap(),
            None,
            "GET",
            "/v1/health",
            b"",
        )
    });
    let _ = agent.kill();
    let _ = agent.wait();
    let n = got.expect("no notification from the agent");
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(health.map(|h| h.0), Some(200));
}

#[test]
fn every_error_has_one_shape_with_a_stable_code() {
    let cluster = Cluster::bootstrap();
    let a = &cluster.agents[0];
    wait_until(LONG, "the agent answers", || a.status().is_some());
    let token = a.local_token();
    let cases: [(Option<&str>, &str, &str, &[u8], u16, &str); 5] = [
        (Some(&token), "GET", "/v1/nowhere", b"", 404, "not_found"),
        (None, "GET", "/v1/nowhere", b"", 404, "not_found"),
        (
            Some(&token),
            "DELETE",
            "/v1/members",
            b"",
            405,
            "method_not_allowed",
        ),
        (None, "GET", "/v1/members", b"", 401, "unauthorized"),
        (
            Some(&token),
            "POST",
            "/v1/tokens",
            b"{\"ttl_secs\":",
            400,
            "bad_request",
        ),
    ];
    for (token, method, path, body, status, code) in cases {
        let (got, text) = http(a.api, token, method, path, body);
        assert_eq!(got, status, "{method} {path}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text:?}"));
        assert_eq!(v["code"], code, "{method} {path}: {text}");
        assert!(
            v["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{method} {path}: {text}"
        );
    }
}

#[test]
fn long_commands_show_progress_on_a_terminal_and_stay_quiet_when_piped() {
    let cluster = Cluster::bootstrap();
    cluster.wait_raft(1, 0, LONG);
    let a = &cluster.agents[0];
    let vm_run = |name: &str| -> Vec<String> {
        let mut args: Vec<String> = ["vm", "run", name, "--api", &a.api.to_string(), "--data-dir"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(a.data_dir.display().to_string());
        args.extend(blx_tests::SLEEPER.iter().map(|s| s.to_string()));
        args
    };

    // Piped: the VM's table on stdout, and no progress lines.
    let out = Command::new(blx_bin())
        .args(vm_run("piped"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("piped: "), "progress while piped: {err}");

    // On a terminal (script(1) gives it a pseudo-terminal): each phase as it is reached,
    // ending with where it runs and how long it took to boot.
    let quoted: Vec<String> = std::iter::once(blx_bin().display().to_string())
        .chain(vm_run("onterm"))
        .map(|s| format!("'{}'", s.replace('\'', r"'\''")))
        .collect();
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &quoted.join(" "), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("onterm: running on n1 (booted in "), "{text}");
}
