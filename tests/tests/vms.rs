//! VMs with real `blx` processes: a real QEMU microvm boots the default image, and process
//! workloads are placed, moved off dead and drained nodes, preempted and spread.

use std::time::Duration;

use blx_tests::{Cluster, wait_until};

const LONG: Duration = Duration::from_secs(90);

fn phase(v: &serde_json::Value) -> &str {
    v["phase"].as_str().unwrap_or("")
}

/// A process workload that prints a readiness line and then waits.
const WORKLOAD: [&str; 6] = [
    "--ready-marker",
    "READY",
    "--",
    "sh",
    "-c",
    "echo READY; exec sleep 600",
];

fn create(cluster: &Cluster, via: usize, name: &str, extra: &[&str]) {
    let mut args = vec!["vm", "create", name];
    args.extend_from_slice(extra);
    if !extra.contains(&"--") {
        args.extend_from_slice(&WORKLOAD);
    }
    let (ok, _, err) = cluster.agents[via].run(&args);
    assert!(ok, "vm create {name}: {err}");
}

fn three_nodes(extra: &[&str]) -> Cluster {
    let mut cluster = Cluster::bootstrap_with(extra);
    cluster.join();
    cluster.join();
    cluster.wait_alive(3, LONG);
    cluster.wait_raft(3, 0, LONG);
    cluster
}

#[test]
fn the_default_image_boots_in_qemu_and_obeys_stop_start_pause_resume_delete() {
    let image = blx_vmm::image::default_dir().join("default/image.json");
    assert!(
        image.is_file(),
        "no default guest image at {}: run scripts/build-image.sh (make test does)",
        image.display()
    );
    let cluster = Cluster::bootstrap();
    cluster.wait_raft(1, 0, LONG);
    let a = &cluster.agents[0];

    let (ok, out, err) = a.run(&["vm", "run", "web", "--memory", "256MiB", "--wait", "120s"]);
    assert!(ok, "vm run: {err}\n{out}\n{}", cluster.logs());
    let v = a.vm("web").unwrap();
    assert_eq!(phase(&v), "running");
    assert!(v["boot_ms"].as_u64().is_some_and(|b| b > 0), "{v}");
    let (_, logs, _) = a.run(&["vm", "logs", "web"]);
    assert!(
        logs.contains("BLX_READY"),
        "the console shows no readiness line:\n{logs}"
    );
    assert_eq!(a.workload_pids().len(), 1, "one QEMU process");

    let (ok, _, err) = a.run(&["vm", "pause", "web"]);
    assert!(ok, "{err}");
    cluster.wait_vm(0, "web", LONG, "paused", |v| phase(v) == "paused");
    let (ok, _, err) = a.run(&["vm", "resume", "web"]);
    assert!(ok, "{err}");
    cluster.wait_vm(0, "web", LONG, "running again", |v| phase(v) == "running");

    let (ok, _, err) = a.run(&["vm", "stop", "web"]);
    assert!(ok, "{err}");
    cluster.wait_vm(0, "web", LONG, "stopped", |v| phase(v) == "stopped");
    wait_until(LONG, "no QEMU process after stop", || {
        a.workload_pids().is_empty()
    });

    let (ok, _, err) = a.run(&["vm", "start", "web"]);
    assert!(ok, "{err}");
    let v = cluster.wait_vm(0, "web", LONG, "running after start", |v| {
        phase(v) == "running"
    });
    assert!(
        v["incarnation"].as_u64() > Some(2),
        "a start is a fresh incarnation: {v}"
    );

    let (ok, _, err) = a.run(&["vm", "delete", "web"]);
    assert!(ok, "{err}");
    wait_until(LONG, "no QEMU process after delete", || {
        a.workload_pids().is_empty()
    });
    assert!(a.vm("web").is_none(), "a deleted VM is still listed");
}

#[test]
fn a_vm_comes_back_elsewhere_when_its_host_dies_and_the_old_host_does_not_run_it() {
    let mut cluster = three_nodes(&[]);
    create(&cluster, 0, "job", &[]);
    let v = cluster.wait_vm(0, "job", LONG, "running", |v| phase(v) == "running");
    let host = cluster.index_of(v["node"].as_str().unwrap()).unwrap();
    let via = (host + 1) % 3;
    let old_pids = cluster.agents[host].workload_pids();
    assert_eq!(old_pids.len(), 1, "one workload on the host");

    cluster.agents[host].kill();
    let v = cluster.wait_vm(via, "job", LONG, "running on another node", |v| {
        phase(v) == "running" && cluster.index_of(v["node"].as_str().unwrap_or("")) != Some(host)
    });
    let new_host = cluster.index_of(v["node"].as_str().unwrap()).unwrap();
    assert_eq!(cluster.agents[new_host].workload_pids().len(), 1);

    // The old workload outlived its agent (no agent, no fencing yet). The restarted agent
    // adopts it, learns the VM now lives elsewhere, and stops it.
    cluster.agents[host].restart();
    wait_until(LONG, "the old host stops its stale copy", || {
        cluster.agents[host].workload_pids().is_empty()
    });
    let v = cluster.agents[via].vm("job").unwrap();
    assert_eq!(
        cluster.index_of(v["node"].as_str().unwrap()),
        Some(new_host)
    );
    assert_eq!(phase(&v), "running");
}

#[test]
fn drain_moves_every_vm_off_a_node() {
    // Room for every VM of the test on any one node, whatever this host has.
    let cluster = three_nodes(&["--vcpus", "16", "--memory", "4GiB"]);
    for i in 0..4 {
        create(&cluster, 0, &format!("w{i}"), &["--memory", "64MiB"]);
    }
    for i in 0..4 {
        cluster.wait_vm(0, &format!("w{i}"), LONG, "running", |v| {
            phase(v) == "running"
        });
    }
    // Binpack put them together; drain whichever node holds the first.
    let node = cluster.agents[0].vm("w0").unwrap()["node"]
        .as_str()
        .unwrap()
        .to_string();
    let drained = cluster.index_of(&node).unwrap();
    let (ok, _, err) = cluster.agents[0].run(&["node", "drain", &cluster.agents[drained].name]);
    assert!(ok, "{err}");
    for i in 0..4 {
        cluster.wait_vm(
            0,
            &format!("w{i}"),
            LONG,
            "running off the drained node",
            |v| phase(v) == "running" && v["node"].as_str() != Some(node.as_str()),
        );
    }
    wait_until(LONG, "the drained node runs nothing", || {
        cluster.agents[drained].workload_pids().is_empty()
    });
    let (_, out, _) = cluster.agents[0].run(&["node", "list"]);
    assert!(out.contains("draining"), "{out}");

    // Cordon a second node and label the third: a VM constrained to the label lands there,
    // and nothing lands on the cordoned or drained node.
    let cordoned = (drained + 1) % 3;
    let labelled = (drained + 2) % 3;
    let (ok, _, err) = cluster.agents[1].run(&["node", "cordon", &cluster.agents[cordoned].name]);
    assert!(ok, "{err}");
    let (ok, _, err) =
        cluster.agents[1].run(&["node", "label", &cluster.agents[labelled].name, "disk=ssd"]);
    assert!(ok, "{err}");
    create(
        &cluster,
        1,
        "fast",
        &["--constraint", "disk=ssd", "--memory", "64MiB"],
    );
    let v = cluster.wait_vm(1, "fast", LONG, "running", |v| phase(v) == "running");
    assert_eq!(
        cluster.index_of(v["node"].as_str().unwrap()),
        Some(labelled)
    );
    create(&cluster, 1, "anywhere", &["--memory", "64MiB"]);
    let v = cluster.wait_vm(1, "anywhere", LONG, "running", |v| phase(v) == "running");
    assert_eq!(
        cluster.index_of(v["node"].as_str().unwrap()),
        Some(labelled),
        "{v}"
    );

    // Uncordon: the node takes work again; with the w VMs gone it is the emptiest, and the
    // spread strategy picks it.
    for i in 0..4 {
        let (ok, _, err) = cluster.agents[1].run(&["vm", "delete", &format!("w{i}")]);
        assert!(ok, "{err}");
    }
    let (ok, _, err) = cluster.agents[1].run(&["node", "uncordon", &cluster.agents[cordoned].name]);
    assert!(ok, "{err}");
    let (ok, _, err) = cluster.agents[1].run(&["config", "set", "--scheduler", "spread"]);
    assert!(ok, "{err}");
    create(&cluster, 1, "spread", &["--memory", "64MiB"]);
    let v = cluster.wait_vm(1, "spread", LONG, "running", |v| phase(v) == "running");
    assert_eq!(
        cluster.index_of(v["node"].as_str().unwrap()),
        Some(cordoned),
        "{v}"
    );
}

#[test]
fn priority_preempts_when_nothing_fits_and_a_group_spreads_over_nodes() {
    let cluster = three_nodes(&["--vcpus", "2", "--memory", "1GiB"]);
    for i in 1..=3 {
        create(
            &cluster,
            0,
            &format!("low{i}"),
            &["--memory", "768MiB", "--priority", "100"],
        );
    }
    for i in 1..=3 {
        cluster.wait_vm(0, &format!("low{i}"), LONG, "running", |v| {
            phase(v) == "running"
        });
    }
    create(
        &cluster,
        1,
        "high",
        &["--memory", "768MiB", "--priority", "900"],
    );
    cluster.wait_vm(0, "high", LONG, "running", |v| phase(v) == "running");
    let vms = cluster.agents[0].vms().unwrap();
    let preempted: Vec<&serde_json::Value> = vms
        .iter()
        .filter(|v| v["name"].as_str().unwrap().starts_with("low") && phase(v) == "pending")
        .collect();
    assert_eq!(preempted.len(), 1, "exactly one low VM gives way: {vms:?}");
    assert!(
        preempted[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("preempted by high"),
        "{:?}",
        preempted[0]
    );

    for i in 1..=3 {
        let (ok, _, err) = cluster.agents[0].run(&["vm", "delete", &format!("low{i}")]);
        assert!(ok, "{err}");
    }
    let (ok, _, err) = cluster.agents[0].run(&["vm", "delete", "high"]);
    assert!(ok, "{err}");
    for i in 1..=3 {
        create(
            &cluster,
            2,
            &format!("g{i}"),
            &["--memory", "64MiB", "--group", "web"],
        );
    }
    let mut nodes = std::collections::BTreeSet::new();
    for i in 1..=3 {
        let v = cluster.wait_vm(0, &format!("g{i}"), LONG, "running", |v| {
            phase(v) == "running"
        });
        nodes.insert(v["node"].as_str().unwrap().to_string());
    }
    assert_eq!(
        nodes.len(),
        3,
        "an anti-affinity group of 3 lands on 3 nodes"
    );
}

#[test]
fn bad_vm_input_is_refused_and_nothing_is_half_created() {
    let cluster = Cluster::bootstrap_with(&["--vcpus", "2", "--memory", "2GiB"]);
    cluster.wait_raft(1, 0, LONG);
    let a = &cluster.agents[0];
    create(&cluster, 0, "taken", &[]);

    let cases: &[(&[&str], &str)] = &[
        (
            &["vm", "create", "zero", "--memory", "0", "--", "true"],
            "memory",
        ),
        (
            &["vm", "create", "absurd", "--memory", "2TiB", "--", "true"],
            "memory",
        ),
        (
            &["vm", "create", "noimg", "--image", "nope"],
            "unknown image",
        ),
        (
            &[
                "vm",
                "create",
                "nokernel",
                "--kernel",
                "/nonexistent/vmlinux",
            ],
            "does not exist",
        ),
        (&["vm", "create", "taken", "--", "true"], "already exists"),
        (&["vm", "create", "Bad Name", "--", "true"], "VM name"),
        (
            &[
                "vm",
                "create",
                "badc",
                "--constraint",
                "disk>ssd",
                "--",
                "true",
            ],
            "constraint",
        ),
        (
            &[
                "vm",
                "create",
                "badprio",
                "--priority",
                "5000",
                "--",
                "true",
            ],
            "priority",
        ),
        (
            &[
                "vm", "create", "mixed", "--image", "default", "--driver", "process", "--", "true",
            ],
            "process driver",
        ),
    ];
    for (args, expect) in cases {
        let (ok, _, err) = a.run(args);
        assert!(!ok, "{args:?} was accepted");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in: {err}"
        );
    }
    let names: Vec<String> = a
        .vms()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["taken"], "a refused create left something behind");

    // A constraint no node satisfies: accepted, and pending with a reason to act on.
    create(&cluster, 0, "nowhere", &["--constraint", "gpu=a100"]);
    let v = cluster.wait_vm(0, "nowhere", LONG, "pending with a reason", |v| {
        phase(v) == "pending" && v["reason"].as_str().unwrap_or("").contains("gpu=a100")
    });
    assert!(v["node"].is_null());
    // More memory than any node has: pending, and the reason names the shortfall.
    create(&cluster, 0, "toobig", &["--memory", "4GiB"]);
    cluster.wait_vm(0, "toobig", LONG, "pending on memory", |v| {
        phase(v) == "pending" && v["reason"].as_str().unwrap_or("").contains("4096")
    });
}

/// Drops every UDP packet to or from `ip` (its gossip and Raft traffic) while alive; the
/// agent's HTTP API, on TCP, stays reachable.
struct Partition {
    table: String,
}

impl Partition {
    fn cut(ip: std::net::Ipv4Addr) -> Partition {
        // One table per partition: tests in this binary run in parallel, and one's cleanup
        // must not lift another's cut.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let table = format!("blx_partition_{}_{n}", std::process::id());
        let script = format!(
            "add table inet {table}\n\
             add chain inet {table} input {{ type filter hook input priority 0; }}\n\
             add rule inet {table} input ip saddr {ip} meta l4proto udp drop\n\
             add rule inet {table} input ip daddr {ip} meta l4proto udp drop\n"
        );
        let mut nft = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft (nftables) is needed for the partition test; make test installs it");
        use std::io::Write;
        nft.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(
            nft.wait().unwrap().success(),
            "nft refused the partition rules"
        );
        Partition { table }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

#[test]
fn a_node_cut_off_from_the_cluster_stops_its_vms_while_they_run_elsewhere() {
    let cluster = three_nodes(&[]);
    create(&cluster, 0, "job", &[]);
    let v = cluster.wait_vm(0, "job", LONG, "running", |v| phase(v) == "running");
    let host = cluster.index_of(v["node"].as_str().unwrap()).unwrap();
    let other = (host + 1) % 3;
    assert_eq!(cluster.agents[host].workload_pids().len(), 1);

    let cut = Partition::cut(cluster.ip(u8::try_from(host + 1).unwrap()));
    tracing::info!("--- the host is cut off: the others run the VM, the host stops its copy");
    cluster.wait_vm(other, "job", LONG, "running elsewhere", |v| {
        phase(v) == "running" && cluster.index_of(v["node"].as_str().unwrap_or("")) != Some(host)
    });
    cluster.wait_or_dump(LONG, "the cut-off host stops its copy", || {
        cluster.agents[host].workload_pids().is_empty()
    });
    assert!(
        cluster.agents[host].is_running(),
        "the cut-off agent itself keeps running"
    );

    drop(cut);
    tracing::info!("--- healed: the host rejoins and still runs nothing");
    cluster.wait_alive(3, LONG);
    cluster.wait_raft(3, 0, LONG);
    let v = cluster.agents[host].vm("job").unwrap();
    assert_ne!(cluster.index_of(v["node"].as_str().unwrap()), Some(host));
    assert!(cluster.agents[host].workload_pids().is_empty());
}

#[test]
fn an_agent_restarted_while_cut_off_stops_the_vms_it_adopts() {
    let mut cluster = three_nodes(&[]);
    create(&cluster, 0, "job", &[]);
    let v = cluster.wait_vm(0, "job", LONG, "running", |v| phase(v) == "running");
    let host = cluster.index_of(v["node"].as_str().unwrap()).unwrap();
    let other = (host + 1) % 3;
    assert_eq!(cluster.agents[host].workload_pids().len(), 1);

    tracing::info!("--- the host's agent dies, its workload lives on; the host is cut off");
    cluster.agents[host].kill();
    assert_eq!(cluster.agents[host].workload_pids().len(), 1);
    let cut = Partition::cut(cluster.ip(u8::try_from(host + 1).unwrap()));
    let restarted = std::time::Instant::now();
    cluster.agents[host].restart();
    wait_until(LONG, "the restarted agent answers", || {
        cluster.agents[host].status().is_some()
    });
    tracing::info!("--- restarted, it cannot hear the leader: it stops what it adopted");
    cluster.wait_or_dump(LONG, "the cut-off host stops its adopted copy", || {
        cluster.agents[host].workload_pids().is_empty()
    });
    // The fence holds from the agent's first moment: its adopted copy ends within the fence
    // time (1.5 s) of the start, not once a catch-up that cannot happen gives up. The slack is
    // the simulator's for the same bound (`single_vm_copy`), for a debug build's start.
    let stopped_after = restarted.elapsed();
    assert!(
        stopped_after < Duration::from_millis(1500) + Duration::from_secs(5),
        "the adopted copy ran {stopped_after:?} after the restart\n{}",
        cluster.agents[host].log()
    );
    // The log line comes before the stop; if it is missing, something else stopped the copy,
    // and the logs say what.
    assert!(
        cluster.agents[host].log().contains("stopping every VM"),
        "the agent does not say why it stopped its VMs\n{}",
        cluster.logs()
    );
    cluster.wait_vm(other, "job", LONG, "running elsewhere", |v| {
        phase(v) == "running" && cluster.index_of(v["node"].as_str().unwrap_or("")) != Some(host)
    });

    drop(cut);
    tracing::info!("--- healed: the host catches up and still runs nothing");
    cluster.wait_alive(3, LONG);
    cluster.wait_raft(3, 0, LONG);
    assert!(cluster.agents[host].workload_pids().is_empty());
}

#[test]
fn garbage_on_the_vm_and_node_routes_is_refused_with_nothing_changed() {
    let cluster = Cluster::bootstrap();
    cluster.wait_raft(1, 0, LONG);
    let a = &cluster.agents[0];
    create(&cluster, 0, "taken", &[]);
    cluster.wait_vm(0, "taken", LONG, "running", |v| phase(v) == "running");
    let vms_before = a.vms().unwrap();
    let (_, nodes_before, _) = a.run(&["node", "list", "--output", "json"]);

    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("POST", "/v1/vms", "not json", 400, ""),
        ("POST", "/v1/vms", r#"{"name":"x","bogus":1}"#, 400, "bogus"),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"x","memory_mib":"lots"}"#,
            400,
            "memory_mib",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"x","command":["true"],"constraints":["a>b"]}"#,
            400,
            "constraint",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"x","command":["true"],"restart":"sometimes"}"#,
            400,
            "restart policy",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"x","driver":"xen"}"#,
            400,
            "unknown driver",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"x","image":"../../etc"}"#,
            400,
            "image",
        ),
        (
            "POST",
            "/v1/vms",
            r#"{"name":"taken","command":["true"]}"#,
            409,
            "already exists",
        ),
        ("GET", "/v1/vms/taken?wait=forever", "", 400, "wait"),
        (
            "GET",
            "/v1/vms/taken?timeout_ms=-1&wait=running",
            "",
            400,
            "timeout_ms",
        ),
        ("GET", "/v1/vms/taken/logs?bytes=abc", "", 400, "bytes"),
        ("GET", "/v1/vms/nosuch/logs", "", 404, "no VM"),
        (
            "POST",
            "/v1/vms/taken/explode",
            "",
            404,
            "unknown VM action",
        ),
        ("POST", "/v1/vms/nosuch/stop", "", 404, "no VM"),
        ("DELETE", "/v1/vms/nosuch", "", 404, "no VM"),
        (
            "POST",
            "/v1/nodes/n1/explode",
            "",
            404,
            "unknown node action",
        ),
        ("POST", "/v1/nodes/nosuch/drain", "", 404, "no node"),
        ("PUT", "/v1/nodes/n1/labels", "garbage", 400, ""),
        (
            "PUT",
            "/v1/nodes/n1/labels",
            r#"{"set":{"bad key":"v"}}"#,
            400,
            "label",
        ),
        (
            "PUT",
            "/v1/nodes/n1/labels",
            r#"{"set":{},"extra":1}"#,
            400,
            "extra",
        ),
    ];
    for (method, path, body, status, expect) in cases {
        let (got, text) = a.http(method, path, body.as_bytes());
        assert_eq!(got, *status, "{method} {path} {body}: {text}");
        assert!(
            text.contains(expect),
            "{method} {path} {body}: expected {expect:?} in {text}"
        );
    }
    let strip = |vms: Vec<serde_json::Value>| -> Vec<(String, String, u64)> {
        vms.iter()
            .map(|v| {
                (
                    v["name"].to_string(),
                    v["phase"].to_string(),
                    v["incarnation"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        strip(a.vms().unwrap()),
        strip(vms_before),
        "refused requests changed the VMs"
    );
    let (_, nodes_after, _) = a.run(&["node", "list", "--output", "json"]);
    let flags = |t: &str| -> Vec<(serde_json::Value, serde_json::Value, serde_json::Value)> {
        serde_json::from_str::<Vec<serde_json::Value>>(t)
            .unwrap()
            .into_iter()
            .map(|n| {
                (
                    n["labels"].clone(),
                    n["cordoned"].clone(),
                    n["draining"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(
        flags(&nodes_after),
        flags(&nodes_before),
        "refused requests changed a node"
    );
}
