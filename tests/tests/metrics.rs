//! `GET /v1/metrics` with real `blx` processes: the text parses as Prometheus exposition, every
//! metric an operator of Consul, Nomad or etcd would look for is there with its type, and the
//! values follow what the cluster did. It answers without a token unless the agent is told
//! to ask for one.

use std::collections::BTreeMap;
use std::time::Duration;

use blx_tests::{Agent, Cluster, http, wait_until};

const LONG: Duration = Duration::from_secs(90);

/// Every metric family the agent must serve, with its Prometheus type (counters carry their
/// `_total` in the family name in the 0.0.4 text format).
const EXPECTED: &[(&str, &str)] = &[
    ("blx_members", "gauge"),
    ("blx_gossip_probes_total", "counter"),
    ("blx_gossip_indirect_probes_total", "counter"),
    ("blx_gossip_suspicions_total", "counter"),
    ("blx_gossip_refutations_total", "counter"),
    ("blx_gossip_received_bytes_total", "counter"),
    ("blx_gossip_sent_bytes_total", "counter"),
    ("blx_net_sent_bytes_total", "counter"),
    ("blx_net_received_bytes_total", "counter"),
    ("blx_raft_term", "gauge"),
    ("blx_raft_has_leader", "gauge"),
    ("blx_raft_is_leader", "gauge"),
    ("blx_raft_leader_changes_total", "counter"),
    ("blx_raft_commit_index", "gauge"),
    ("blx_raft_applied_index", "gauge"),
    ("blx_raft_last_log_index", "gauge"),
    ("blx_raft_snapshot_index", "gauge"),
    ("blx_raft_last_contact_seconds", "gauge"),
    ("blx_raft_proposal_duration_seconds", "histogram"),
    ("blx_raft_commit_duration_seconds", "histogram"),
    ("blx_raft_fsync_duration_seconds", "histogram"),
    ("blx_raft_proposal_queue_duration_seconds", "histogram"),
    ("blx_raft_entry_writes", "histogram"),
    ("blx_raft_entry_duration_seconds", "histogram"),
    ("blx_raft_apply_wait_duration_seconds", "histogram"),
    ("blx_raft_apply_duration_seconds", "histogram"),
    ("blx_raft_append_sent_duration_seconds", "histogram"),
    ("blx_raft_append_served_duration_seconds", "histogram"),
    ("blx_raft_proposals_pending", "gauge"),
    ("blx_raft_proposals_failed_total", "counter"),
    ("blx_raft_snapshot_build_duration_seconds", "histogram"),
    ("blx_raft_snapshot_restore_duration_seconds", "histogram"),
    ("blx_autopilot_healthy", "gauge"),
    ("blx_autopilot_voters", "gauge"),
    ("blx_autopilot_learners", "gauge"),
    ("blx_scheduler_pending_vms", "gauge"),
    ("blx_scheduler_pass_duration_seconds", "histogram"),
    ("blx_scheduler_placements_total", "counter"),
    ("blx_scheduler_preemptions_total", "counter"),
    ("blx_scheduler_failovers_total", "counter"),
    ("blx_vms", "gauge"),
    ("blx_vm_boot_duration_seconds", "histogram"),
    ("blx_api_requests_total", "counter"),
    ("blx_api_request_duration_seconds", "histogram"),
    ("blx_telemetry_dropped_total", "counter"),
    ("blx_audit_write_failures_total", "counter"),
    ("blx_process_resident_memory_bytes", "gauge"),
    ("blx_process_open_fds", "gauge"),
];

/// One scrape: the families' declared types, and every sample by name and labels.
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<prometheus_parse::Sample>,
    text: String,
}

impl Scrape {
    fn of(agent: &Agent) -> Scrape {
        let (code, body) = http(agent.api, None, "GET", "/v1/metrics", b"");
        assert_eq!(code, 200, "{body}");
        let mut types = BTreeMap::new();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "{name} declared twice"
                );
            }
        }
        let lines: Vec<std::io::Result<String>> = body.lines().map(|l| Ok(l.to_string())).collect();
        let parsed =
            prometheus_parse::Scrape::parse(lines.into_iter()).expect("Prometheus text parses");
        Scrape {
            types,
            samples: parsed.samples,
            text: body,
        }
    }

    /// The value of the sample `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                other => panic!("{name} is not a plain value: {other:?}"),
            })
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }
}

#[test]
fn metrics_parse_and_hold_every_family_an_operator_watches() {
    let mut cluster = Cluster::bootstrap();
    cluster.join();
    cluster.join();
    cluster.wait_alive(3, LONG);
    cluster.wait_raft(3, 0, LONG);
    let a = &cluster.agents[0];
    let (code, body) = a.http("PUT", "/v1/kv/metrics/probe", b"one");
    assert_eq!(code, 200, "{body}");
    a.run_sleeper("sleeper");

    let scrapes: Vec<Scrape> = cluster.agents.iter().map(Scrape::of).collect();
    for (i, s) in scrapes.iter().enumerate() {
        for (name, kind) in EXPECTED {
            assert_eq!(
                s.types.get(*name).map(String::as_str),
                Some(*kind),
                "agent {i}: {name} should be a {kind}"
            );
        }
        assert_eq!(
            s.get("blx_members", &[("state", "alive")]),
            3.0,
            "agent {i}"
        );
        assert_eq!(s.get("blx_raft_has_leader", &[]), 1.0, "agent {i}");
        assert_eq!(
            s.get("blx_autopilot_voters", &[("state", "alive")]),
            3.0,
            "agent {i}"
        );
        assert_eq!(s.get("blx_autopilot_healthy", &[]), 1.0, "agent {i}");
        assert!(s.get("blx_raft_term", &[]) >= 1.0);
        assert!(s.get("blx_raft_applied_index", &[]) > 0.0);
        assert!(s.get("blx_raft_commit_index", &[]) >= s.get("blx_raft_applied_index", &[]));
        assert!(s.get("blx_gossip_probes_total", &[]) > 0.0, "agent {i}");
        assert!(s.get("blx_gossip_sent_bytes_total", &[]) > 0.0, "agent {i}");
        assert!(
            s.get("blx_gossip_received_bytes_total", &[]) > 0.0,
            "agent {i}"
        );
        // Raft's traffic is counted apart from gossip, on every server.
        assert!(
            s.get("blx_net_sent_bytes_total", &[("kind", "raft")]) > 0.0,
            "agent {i}"
        );
        assert!(
            s.get("blx_net_received_bytes_total", &[("kind", "raft")]) > 0.0,
            "agent {i}"
        );
        assert!(s.get("blx_process_resident_memory_bytes", &[]) > 1e6);
        assert!(s.get("blx_process_open_fds", &[]) > 3.0);
        assert!(
            s.get("blx_raft_last_contact_seconds", &[]) < 5.0,
            "agent {i}"
        );
        assert!(
            s.get("blx_raft_fsync_duration_seconds_count", &[]) > 0.0,
            "agent {i}"
        );
        assert_eq!(
            s.get("blx_telemetry_dropped_total", &[("signal", "traces")]),
            0.0
        );
    }
    let leaders: Vec<&Scrape> = scrapes
        .iter()
        .filter(|s| s.get("blx_raft_is_leader", &[]) == 1.0)
        .collect();
    assert_eq!(leaders.len(), 1, "exactly one leader");
    let leader = leaders[0];
    assert!(leader.get("blx_raft_commit_duration_seconds_count", &[]) > 0.0);
    // The stages of a commit: every write queued (or not) once, and went out in an entry.
    let commits = leader.get("blx_raft_commit_duration_seconds_count", &[]);
    assert_eq!(
        leader.get("blx_raft_proposal_queue_duration_seconds_count", &[]),
        commits
    );
    assert_eq!(leader.get("blx_raft_entry_writes_sum", &[]), commits);
    assert!(leader.get("blx_raft_entry_duration_seconds_count", &[]) > 0.0);
    assert!(leader.get("blx_raft_apply_duration_seconds_count", &[]) > 0.0);
    // Replication, timed from both ends: the leader's appends with entries, and the
    // followers' answers to them.
    assert!(leader.get("blx_raft_append_sent_duration_seconds_count", &[]) > 0.0);
    let served: f64 = scrapes
        .iter()
        .filter(|s| s.get("blx_raft_is_leader", &[]) != 1.0)
        .map(|s| s.get("blx_raft_append_served_duration_seconds_count", &[]))
        .sum();
    assert!(served > 0.0, "a follower timed the appends it answered");
    assert!(leader.get("blx_scheduler_placements_total", &[]) >= 1.0);
    assert_eq!(leader.get("blx_scheduler_pending_vms", &[]), 0.0);
    assert!(leader.get("blx_scheduler_pass_duration_seconds_count", &[]) > 0.0);

    // The agent that took the write counted it by its route's pattern, not its path.
    let s = &scrapes[0];
    assert!(
        s.get(
            "blx_api_requests_total",
            &[("route", "/v1/vms"), ("method", "POST"), ("status", "201")]
        ) >= 1.0
    );
    // prometheus-parse drops a sample whose label value holds braces, as the KV route's
    // pattern does (Prometheus itself reads it), so look at that line as text.
    assert!(
        s.text
            .lines()
            .any(|l| l.starts_with("blx_api_requests_total{")
                && l.contains(r#"route="/v1/kv/{*key}""#)
                && l.contains(r#"method="PUT""#)
                && l.contains(r#"status="200""#)),
        "the KV write is counted under its route's pattern"
    );
    assert!(s.get("blx_raft_proposal_duration_seconds_count", &[]) >= 1.0);

    // The node running the VM timed its boot and counts it running.
    let vm = a.vm("sleeper").expect("the VM");
    let host = cluster
        .index_of(vm["node"].as_str().expect("placed"))
        .expect("a member runs it");
    wait_until(LONG, "the host counts its VM running", || {
        Scrape::of(&cluster.agents[host]).value("blx_vms", &[("state", "running")]) == Some(1.0)
    });
    let s = Scrape::of(&cluster.agents[host]);
    assert_eq!(s.get("blx_vm_boot_duration_seconds_count", &[]), 1.0);
}

#[test]
fn metrics_ask_for_a_token_when_told_to() {
    let cluster = Cluster::bootstrap_with(&["--metrics-need-token"]);
    cluster.wait_raft(1, 0, LONG);
    let a = &cluster.agents[0];
    let (code, body) = http(a.api, None, "GET", "/v1/metrics", b"");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("\"code\":\"unauthorized\""), "{body}");
    let (code, body) = a.http("GET", "/v1/metrics", b"");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("blx_raft_has_leader 1"), "{body}");
    // Health and readiness stay open for load balancers.
    assert_eq!(http(a.api, None, "GET", "/v1/health", b"").0, 200);
}
