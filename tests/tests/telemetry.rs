//! OTLP export with real `blx` processes and a real OTLP receiver (mock-collector, in this
//! test's process, over the network): one `blx vm run` through a follower is one trace across
//! the follower and the leader; metrics and log records arrive, each naming its node; a
//! collector that is gone or never answers does not slow writes, and what could not be sent
//! is counted. Everything is set through the standard `OTEL_*` variables only.

use std::collections::BTreeSet;
use std::time::Duration;

use blx_tests::{Cluster, http, wait_until};
use mock_collector::{MockServer, Protocol};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};

const LONG: Duration = Duration::from_secs(90);

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let kv = attrs.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The variables every agent of these tests gets: short batch and export intervals, so the
/// test need not wait for the defaults.
fn otel_env(endpoint: &str, protocol: &str) -> Vec<(String, String)> {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ("OTEL_BLRP_SCHEDULE_DELAY", "200"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn one_trace_across_nodes(protocol: Protocol, name: &str) {
    let rt = runtime();
    let server = rt
        .block_on(MockServer::builder().protocol(protocol).port(0).start())
        .expect("start the OTLP receiver");
    let endpoint = format!("http://{}", server.addr());
    let env = otel_env(&endpoint, name);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut cluster = Cluster::bootstrap_with_env(&[], &env);
    cluster.join();
    cluster.join();
    cluster.wait_alive(3, LONG);
    cluster.wait_raft(3, 0, LONG);

    // Through a follower, so the write is forwarded to the leader.
    let leader = cluster.agents[0].status().unwrap()["leader"]
        .as_str()
        .unwrap()
        .to_string();
    let follower = (0..3)
        .find(|i| cluster.index_of(&leader) != Some(*i))
        .unwrap();
    let leader_ix = cluster.index_of(&leader).unwrap();
    let follower_id = std::fs::read_to_string(cluster.agents[follower].data_dir.join("node-id"))
        .unwrap()
        .trim()
        .to_string();
    cluster.agents[follower].run_sleeper("traced");

    // The follower's API span for the create and the leader's span of the forwarded write
    // share one trace id.
    let shared = |c: &mock_collector::MockCollector| -> Option<Vec<u8>> {
        let api: BTreeSet<Vec<u8>> = c
            .spans()
            .iter()
            .filter(|s| {
                s.span().name == "POST /v1/vms"
                    && attr(s.resource_attrs(), "service.instance.id").as_deref()
                        == Some(follower_id.as_str())
            })
            .map(|s| s.span().trace_id.clone())
            .collect();
        c.spans()
            .iter()
            .find(|s| {
                s.span().name == "raft.forwarded_write"
                    && attr(s.resource_attrs(), "service.instance.id").as_deref()
                        == Some(leader.as_str())
                    && api.contains(&s.span().trace_id)
            })
            .map(|s| s.span().trace_id.clone())
    };
    let found = rt.block_on(server.wait_until(|c| shared(c).is_some(), LONG));
    if found.is_err() {
        let dump = rt.block_on(server.with_collector(|c| {
            c.spans()
                .iter()
                .map(|s| {
                    format!(
                        "{} {:?} {}",
                        s.span().name,
                        attr(s.resource_attrs(), "service.instance.id"),
                        hex(&s.span().trace_id)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }));
        panic!(
            "no trace shared by {follower_id} and {leader} (agent {leader_ix}):\n{dump}\n{}",
            cluster.logs()
        );
    }
    let trace = rt.block_on(server.with_collector(|c| shared(c))).unwrap();
    assert_eq!(trace.len(), 16);
    rt.block_on(server.with_collector(|c| {
        // Every span names its node and the service.
        for s in c.spans() {
            assert_eq!(
                attr(s.resource_attrs(), "service.name").as_deref(),
                Some("blx")
            );
        }
        // The trace holds the leader's proposal too.
        let in_trace: BTreeSet<&str> = c
            .spans()
            .iter()
            .filter(|s| s.span().trace_id == trace)
            .map(|s| s.span().name.as_str())
            .collect();
        assert!(in_trace.contains("raft.propose"), "{in_trace:?}");
        // The API span carries its request's route and method, recorded once it was kept,
        // and is a server span.
        let api = c
            .spans()
            .iter()
            .find(|s| s.span().trace_id == trace && s.span().name == "POST /v1/vms")
            .expect("the follower's API span");
        assert_eq!(
            attr(&api.span().attributes, "http.route").as_deref(),
            Some("/v1/vms")
        );
        assert_eq!(
            attr(&api.span().attributes, "http.request.method").as_deref(),
            Some("POST")
        );
        assert_eq!(api.span().kind, 2, "SPAN_KIND_SERVER");
    }));

    // The node that runs the VM continues the same trace with each step of its life.
    let vm = cluster.agents[follower].vm("traced").expect("the VM");
    let host = vm["node"].as_str().expect("placed").to_string();
    let booted = |c: &mock_collector::MockCollector| {
        c.spans().iter().any(|s| {
            s.span().name == "vm running"
                && s.span().trace_id == trace
                && attr(s.resource_attrs(), "service.instance.id").as_deref() == Some(host.as_str())
        })
    };
    rt.block_on(server.wait_until(booted, LONG))
        .expect("the host's `vm running` span in the request's trace");

    // Metrics from every node, under their Prometheus names.
    let ids: BTreeSet<String> = cluster
        .agents
        .iter()
        .map(|a| {
            std::fs::read_to_string(a.data_dir.join("node-id"))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    let metric_nodes = |c: &mock_collector::MockCollector| -> BTreeSet<String> {
        c.metrics()
            .iter()
            .filter(|m| m.metric().name == "blx_raft_has_leader")
            .filter_map(|m| attr(m.resource_attrs(), "service.instance.id"))
            .collect()
    };
    rt.block_on(server.wait_until(|c| metric_nodes(c) == ids, LONG))
        .expect("blx_raft_has_leader from every node");

    // Log records, with the trace id of the span they were written in.
    rt.block_on(server.wait_until(
        |c| {
            c.logs().iter().any(|l| {
                attr(l.resource_attrs(), "service.instance.id").is_some()
                    && l.log_record().trace_id.len() == 16
            })
        },
        LONG,
    ))
    .expect("a log record inside a span, from a named node");

    // The audit record of the VM's creation, as a log record from the leader.
    let audit_of_create = |c: &mock_collector::MockCollector| {
        c.logs().iter().any(|l| {
            let r = l.log_record();
            let body = r.body.as_ref().and_then(|b| b.value.as_ref());
            // The body is the record's JSON line, as the audit file holds it.
            let line: Option<serde_json::Value> = match body {
                Some(any_value::Value::StringValue(s)) => serde_json::from_str(s).ok(),
                _ => None,
            };
            // Written inside the request's exported trace, it carries that trace's id.
            line.is_some_and(|v| v["command"] == "vm_create" && v["outcome"] == "applied")
                && r.trace_id == trace
                && attr(&r.attributes, "command").as_deref() == Some("vm_create")
                && attr(&r.attributes, "outcome").as_deref() == Some("applied")
                && attr(l.resource_attrs(), "service.instance.id").as_deref()
                    == Some(leader.as_str())
        })
    };
    rt.block_on(server.wait_until(audit_of_create, LONG))
        .expect("the audit record of the VM's creation, from the leader");
    rt.block_on(server.shutdown()).unwrap();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn one_vm_run_is_one_trace_over_grpc() {
    one_trace_across_nodes(Protocol::Grpc, "grpc");
}

#[test]
fn one_vm_run_is_one_trace_over_http_protobuf() {
    one_trace_across_nodes(Protocol::HttpBinary, "http/protobuf");
}

fn dropped(agent: &blx_tests::Agent, signal: &str) -> f64 {
    let (code, body) = http(agent.api, None, "GET", "/v1/metrics", b"");
    assert_eq!(code, 200);
    let needle = format!("blx_telemetry_dropped_total{{signal=\"{signal}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {needle} in\n{body}"))
}

/// Writes `n` keys one after another; each must be acknowledged, and none may wait as long
/// as one export's timeout (1 s here): a write that waited on the exporter would.
fn write_keys(agent: &blx_tests::Agent, prefix: &str, n: usize) {
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let started = std::time::Instant::now();
        let (code, body) = agent.http("PUT", &format!("/v1/kv/{prefix}/{i}"), b"v");
        assert_eq!(code, 200, "write {i}: {body}");
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(1),
        "a write took {slowest:?} while the collector was {prefix}"
    );
}

#[test]
fn a_collector_that_hangs_or_is_gone_costs_writes_nothing_and_is_counted() {
    // A receiver that accepts connections and never answers: every export times out.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", hang.local_addr().unwrap());
    let env = otel_env(&endpoint, "http/protobuf");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cluster = Cluster::bootstrap_with_env(&[], &env);
    cluster.wait_raft(1, 0, LONG);
    let a = &cluster.agents[0];

    write_keys(a, "hung", 300);
    wait_until(
        LONG,
        "spans that could not be delivered are counted",
        || dropped(a, "traces") > 0.0,
    );
    let before = dropped(a, "traces");

    // The receiver is gone: connections are refused.
    drop(hang);
    write_keys(a, "gone", 300);
    wait_until(LONG, "the count keeps rising while nobody listens", || {
        dropped(a, "traces") > before
    });
    assert!(dropped(a, "metrics") >= 0.0);
}

/// One PUT with `traceparent` set to `value`, the bytes as given; returns the status.
fn put_with_traceparent(agent: &blx_tests::Agent, key: &str, value: &[u8]) -> u16 {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(agent.api).expect("connect to the API");
    let mut head = format!(
        "PUT /v1/kv/{key} HTTP/1.1\r\nHost: blx\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Length: 1\r\ntraceparent: ",
        agent.local_token()
    )
    .into_bytes();
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n\r\nv");
    conn.write_all(&head).expect("send");
    let mut reply = String::new();
    let _ = conn.read_to_string(&mut reply);
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// An OTLP/HTTP receiver and one agent that exports to it, with `extra` variables.
fn one_agent_exporting(
    rt: &tokio::runtime::Runtime,
    extra: &[(&str, &str)],
) -> (mock_collector::ServerHandle, Cluster) {
    let server = rt
        .block_on(
            MockServer::builder()
                .protocol(Protocol::HttpBinary)
                .port(0)
                .start(),
        )
        .expect("start the OTLP receiver");
    let mut env = otel_env(&format!("http://{}", server.addr()), "http/protobuf");
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cluster = Cluster::bootstrap_with_env(&[], &env);
    cluster.wait_raft(1, 0, LONG);
    (server, cluster)
}

#[test]
fn a_garbage_traceparent_is_ignored_and_the_request_starts_its_own_trace() {
    let rt = runtime();
    let (server, cluster) = one_agent_exporting(&rt, &[]);
    let a = &cluster.agents[0];

    let long = format!("00-{}-{}-01", "a".repeat(200), "b".repeat(100));
    let bad: [&[u8]; 5] = [
        b"garbage",
        b"00-00000000000000000000000000000000-0000000000000000-01",
        b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        long.as_bytes(),
        b"00-\xff\xfe-01",
    ];
    for (i, value) in bad.iter().enumerate() {
        assert_eq!(
            put_with_traceparent(a, &format!("tp/{i}"), value),
            200,
            "a write with traceparent {:?}",
            String::from_utf8_lossy(value)
        );
        let (code, body) = a.http("GET", &format!("/v1/kv/tp/{i}"), b"");
        assert_eq!(
            (code, body.as_str()),
            (200, "v"),
            "the write with bad trace context {i}"
        );
    }
    // Each of those requests is the root of a trace of its own: nothing took the garbage as a
    // parent.
    let roots = |c: &mock_collector::MockCollector| {
        c.spans()
            .iter()
            .filter(|s| s.span().name == "PUT /v1/kv/{*key}")
            .filter(|s| s.span().parent_span_id.is_empty() && s.span().trace_id.len() == 16)
            .count()
    };
    rt.block_on(server.wait_until(|c| roots(c) >= bad.len(), LONG))
        .expect("one root span per write with a bad traceparent");
    let (all, with_parent) = rt.block_on(server.with_collector(|c| {
        let puts: Vec<_> = c
            .spans()
            .iter()
            .filter(|s| s.span().name == "PUT /v1/kv/{*key}")
            .map(|s| s.span().parent_span_id.is_empty())
            .collect();
        (puts.len(), puts.iter().filter(|root| !**root).count())
    }));
    assert_eq!(
        with_parent, 0,
        "{with_parent} of {all} writes took a bad parent"
    );
    rt.block_on(server.shutdown()).unwrap();
}

/// With `OTEL_TRACES_SAMPLER=always_off` nothing is traced, but the audit trail still leaves:
/// a sampler chooses traces, not which changes are recorded.
#[test]
fn traces_sampled_out_send_no_spans_but_the_audit_records_still_leave() {
    let rt = runtime();
    let (server, cluster) = one_agent_exporting(&rt, &[("OTEL_TRACES_SAMPLER", "always_off")]);
    let a = &cluster.agents[0];
    let (code, _) = a.http("PUT", "/v1/kv/quiet", b"v");
    assert_eq!(code, 200);

    let audit_of_put = |c: &mock_collector::MockCollector| {
        c.logs()
            .iter()
            .find(|l| {
                let r = l.log_record();
                attr(&r.attributes, "command").as_deref() == Some("kv_put")
                    && matches!(
                        r.body.as_ref().and_then(|b| b.value.as_ref()),
                        Some(any_value::Value::StringValue(s)) if s.contains("\"target\":\"quiet\"")
                    )
            })
            .map(|l| l.log_record().trace_id.clone())
    };
    let trace_id = rt
        .block_on(server.wait_until(|c| audit_of_put(c).is_some(), LONG))
        .map(|_| rt.block_on(server.with_collector(audit_of_put)).unwrap())
        .expect("the audit record of the write");
    assert!(
        trace_id.is_empty(),
        "a request that was not sampled has no trace, but its audit record names {}",
        hex(&trace_id)
    );
    // Two metric exports later (one a second) the span exporter, which sends every 200 ms,
    // has had time to send anything it had: it must have had nothing.
    let exports = |c: &mock_collector::MockCollector| {
        c.metrics()
            .iter()
            .filter(|m| m.metric().name == "blx_raft_has_leader")
            .count()
    };
    let before = rt.block_on(server.with_collector(exports));
    rt.block_on(server.wait_until(|c| exports(c) >= before + 2, LONG))
        .expect("two more metric exports");
    let spans = rt.block_on(server.with_collector(|c| c.spans().len()));
    assert_eq!(spans, 0, "always_off still sent {spans} spans");
    rt.block_on(server.shutdown()).unwrap();
}

/// Audit lines outside an exported trace leave grouped: several lines of one command and
/// outcome in one OTLP record, whose `count` says how many. None is lost or sent twice.
#[test]
fn audit_records_outside_traces_leave_grouped_and_complete() {
    let rt = runtime();
    let (server, cluster) = one_agent_exporting(&rt, &[("OTEL_TRACES_SAMPLER", "always_off")]);
    let a = &cluster.agents[0];
    let keys: Vec<String> = (0..20).map(|i| format!("grouped/{i}")).collect();
    for k in &keys {
        let (code, _) = a.http("PUT", &format!("/v1/kv/{k}"), b"v");
        assert_eq!(code, 200);
    }
    // Every kv_put record that arrived: (its count attribute, the targets of its lines).
    let puts = |c: &mock_collector::MockCollector| -> Vec<(i64, Vec<String>)> {
        c.logs()
            .iter()
            .map(|l| l.log_record())
            .filter(|r| attr(&r.attributes, "command").as_deref() == Some("kv_put"))
            .map(|r| {
                let count = r
                    .attributes
                    .iter()
                    .find(|kv| kv.key == "count")
                    .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                    .and_then(|v| match v {
                        any_value::Value::IntValue(n) => Some(*n),
                        _ => None,
                    })
                    .unwrap_or(-1);
                let body = match r.body.as_ref().and_then(|b| b.value.as_ref()) {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    _ => String::new(),
                };
                let targets = body
                    .lines()
                    .map(|line| {
                        let v: serde_json::Value = serde_json::from_str(line)
                            .unwrap_or_else(|e| panic!("an audit line is not JSON ({e}): {line}"));
                        v["target"].as_str().unwrap_or_default().to_string()
                    })
                    .collect();
                (count, targets)
            })
            .collect()
    };
    let all_arrived = |c: &mock_collector::MockCollector| {
        let seen: Vec<String> = puts(c).into_iter().flat_map(|(_, t)| t).collect();
        keys.iter().all(|k| seen.contains(k))
    };
    rt.block_on(server.wait_until(all_arrived, LONG))
        .expect("the audit lines of all 20 writes");
    let records = rt.block_on(server.with_collector(puts));
    for (count, targets) in &records {
        assert_eq!(
            *count,
            targets.len() as i64,
            "count against lines: {targets:?}"
        );
    }
    let seen: Vec<&String> = records.iter().flat_map(|(_, t)| t).collect();
    for k in &keys {
        let n = seen.iter().filter(|s| **s == k).count();
        assert_eq!(n, 1, "{k} arrived {n} times");
    }
    assert!(
        records.iter().any(|(count, _)| *count > 1),
        "20 writes in a row left as {} records of one line each",
        records.len()
    );
    rt.block_on(server.shutdown()).unwrap();
}
