//! The trust model under attack, with real agents: a joiner cannot pick its node id, a
//! revoked token admits no one while the leader is down, a member cannot speak for another
//! member, and the data dir keeps its secrets to its owner.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blx_consensus::access::{ApiToken, Caller};
use blx_consensus::machine::{decode, encode};
use blx_consensus::state::Command as RaftCommand;
use blx_consensus::workload::WorkloadCommand;
use blx_membership::store::DataDir;
use blx_membership::tls::{CLOCK_SLACK_SECS, NodeCredentials, Validity, Verification, node_id_of};
use blx_membership::token::JoinToken;
use blx_membership::wire::{self, ControlRequest, ControlResponse, JoinRequest};
use blx_membership::{NodeId, quic};
use blx_tests::{Agent, Cluster, blx_bin, wait_until};

/// How the leader refuses a forwarded write (`WriteRefusal` in `cli/src/raft.rs`, which
/// postcard encodes by variant position).
#[derive(Debug, serde::Deserialize)]
enum Refusal {
    Denied(blx_consensus::access::Denied),
    Failed(String),
}

/// The consensus services of `cli/src/raft.rs`, as they are numbered on the wire.
const SERVICE_RAFT: u8 = 1;
const SERVICE_WRITE: u8 = 2;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One control exchange with `addr` over `tls`, as a blx node would make it.
async fn exchange(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    request: &ControlRequest,
) -> Result<ControlResponse, String> {
    let client =
        quic::client_config(tls, &quic::CidRng::new([3; 32])).map_err(|e| e.to_string())?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client);
    let conn = endpoint
        .connect(addr, "node.blx")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // In TLS 1.3 the server checks the client's certificate after the client has finished
    // its side of the handshake: a refusal shows as the connection's close reason.
    let closed = |e: String| match conn.close_reason() {
        Some(reason) => format!("{e}: {reason}"),
        None => e,
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| closed(e.to_string()))?;
    send.write_all(&wire::encode_control(request))
        .await
        .map_err(|e| closed(e.to_string()))?;
    send.finish().map_err(|e| closed(e.to_string()))?;
    let bytes = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| closed(e.to_string()))?;
    wire::decode_control_response(&bytes, 1 << 20).map_err(|e| e.to_string())
}

fn credentials(agent: &Agent) -> NodeCredentials {
    DataDir::open(&agent.data_dir)
        .unwrap()
        .credentials()
        .unwrap()
        .expect("the agent has joined")
}

fn raft_id(id: &str) -> u64 {
    u64::from_str_radix(id, 16).unwrap()
}

#[test]
fn a_joiner_cannot_choose_its_node_id() {
    let mut cluster = Cluster::bootstrap();
    cluster.join();
    cluster.wait_raft(1, 1, Duration::from_secs(90));
    let n1 = credentials(&cluster.agents[0]);
    let n2 = credentials(&cluster.agents[1]);
    assert_ne!(n1.id, n2.id);

    tracing::info!("--- a certificate request naming the first node gets a fresh id");
    let token: JoinToken = cluster.token.parse().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![n1.id.dns_name()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, n1.id.dns_name());
    let csr = params.serialize_request(&key).unwrap();
    let request = ControlRequest::Join(JoinRequest {
        token_id: token.id,
        secret: token.secret,
        csr_der: csr.der().to_vec(),
    });
    let tls =
        blx_membership::tls::join_client_config(token.ca_fingerprint, Verification::system().time)
            .unwrap();
    let answer = runtime()
        .block_on(exchange(cluster.agents[1].gossip, tls, &request))
        .unwrap();
    let ControlResponse::Joined(grant) = answer else {
        panic!("the join was not granted: {answer:?}");
    };
    assert_ne!(grant.node, NodeId::UNKNOWN);
    for existing in [n1.id, n2.id] {
        assert_ne!(
            grant.node, existing,
            "the cluster granted an existing node's id"
        );
    }
    assert_eq!(node_id_of(&grant.cert_der), Some(grant.node));
}

#[test]
fn a_revoked_token_admits_no_one_while_the_leader_is_down() {
    let mut cluster = Cluster::bootstrap();
    cluster.join();
    cluster.join();
    let leader = cluster.wait_raft(3, 0, Duration::from_secs(90));
    let token = cluster.agents[leader].token("1h");
    let id = token.parse::<JoinToken>().unwrap().id.to_string();
    let follower = (leader + 1) % 3;
    let out = cluster.agents[follower].cli(&["token", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    tracing::info!("--- SIGKILL the leader, then join with the revoked token at once");
    cluster.agents[leader].kill();
    let out = cluster.try_join_through(follower, "intruder", &token);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a revoked token was admitted");
    assert!(
        stderr.contains("revoked") || stderr.contains("no quorum"),
        "expected a revoked or no-quorum refusal, got:\n{stderr}"
    );
    let members = cluster.agents[follower]
        .members()
        .expect("the follower answers");
    assert!(members.iter().all(|m| m.name != "intruder"), "{members:?}");
    assert!(
        !DataDir::is_member(&cluster.root.path().join("intruder")),
        "the refused node holds a certificate"
    );
}

#[test]
fn a_member_cannot_speak_for_another() {
    let mut cluster = Cluster::bootstrap();
    cluster.join();
    let leader = cluster.wait_raft(1, 1, Duration::from_secs(90));
    let other = 1 - leader;
    let leader_creds = credentials(&cluster.agents[leader]);
    let member = credentials(&cluster.agents[other]);
    let tls = || {
        member
            .member_client_config(&Verification::system())
            .unwrap()
    };
    let rt = runtime();
    let before = cluster.agents[leader].status().unwrap();

    tracing::info!(
        "--- a VM report for the leader's node, sent with the other member's certificate"
    );
    let report = RaftCommand::Workload(WorkloadCommand::VmReports {
        node: leader_creds.id.to_string(),
        reports: Vec::new(),
        now_ms: 0,
    });
    let forward = |caller: Caller, cmd: &RaftCommand| {
        let request = ControlRequest::Service {
            service: SERVICE_WRITE,
            // The forwarded-write envelope: caller, command, trace context.
            payload: encode(&(caller, cmd.clone(), None::<String>)),
        };
        let answer = rt
            .block_on(exchange(cluster.agents[leader].gossip, tls(), &request))
            .unwrap();
        let ControlResponse::Service(bytes) = answer else {
            panic!("unexpected answer {answer:?}");
        };
        decode::<Result<blx_consensus::machine::Response, Refusal>>(&bytes).unwrap()
    };
    match forward(Caller::Node, &report) {
        Err(Refusal::Failed(e)) => assert!(e.contains("only its own VMs"), "{e}"),
        other => panic!("a report for another node was not refused: {other:?}"),
    }

    tracing::info!("--- a key write forwarded for a read-only API token");
    let (ok, reader, err) =
        cluster.agents[leader].run(&["api-token", "create", "--name", "reader", "--scope", "read"]);
    assert!(ok, "{err}");
    let reader: ApiToken = reader.trim().parse().unwrap();
    let put = RaftCommand::KvPut {
        key: "forged".into(),
        value: b"x".to_vec(),
        cas: None,
    };
    match forward(Caller::Token(reader.id), &put) {
        Err(Refusal::Denied(d)) => assert!(d.to_string().contains("needs write"), "{d}"),
        other => panic!("a write for a read-only token was not refused: {other:?}"),
    }
    let (found, _, _) = cluster.agents[leader].run(&["kv", "get", "forged"]);
    assert!(!found, "the refused write was applied");

    tracing::info!("--- a vote request naming the leader as candidate, from the other member");
    let vote = openraft::raft::VoteRequest::<u64> {
        vote: openraft::Vote::new(1_000, raft_id(&leader_creds.id.to_string())),
        last_log_id: None,
    };
    let payload = encode(&blx_consensus::network::RaftRequest::Vote(vote));
    let request = ControlRequest::Service {
        service: SERVICE_RAFT,
        payload,
    };
    let answer = rt
        .block_on(exchange(cluster.agents[leader].gossip, tls(), &request))
        .unwrap();
    let ControlResponse::Service(bytes) = answer else {
        panic!("unexpected answer {answer:?}");
    };
    match decode::<blx_consensus::network::RaftReply>(&bytes).unwrap() {
        blx_consensus::network::RaftReply::Malformed(e) => {
            assert!(e.contains("comes from"), "{e}")
        }
        other => panic!("a forged vote request was served: {other:?}"),
    }

    tracing::info!("--- renewal with a garbled certificate request, and without a certificate");
    let garbled = ControlRequest::Renew {
        csr_der: b"not a certificate request".to_vec(),
    };
    let answer = rt
        .block_on(exchange(cluster.agents[leader].gossip, tls(), &garbled))
        .unwrap();
    assert!(
        matches!(&answer, ControlResponse::Failed(e) if e.contains("bad certificate request")),
        "{answer:?}"
    );
    let fingerprint = leader_creds.ca_fingerprint();
    let joiner =
        blx_membership::tls::join_client_config(fingerprint, Verification::system().time).unwrap();
    let answer = rt
        .block_on(exchange(cluster.agents[leader].gossip, joiner, &garbled))
        .unwrap();
    assert!(
        matches!(&answer, ControlResponse::Failed(e) if e.contains("only a join request")),
        "{answer:?}"
    );
    let after = cluster.agents[leader].status().unwrap();
    assert_eq!(
        before["term"], after["term"],
        "the forged vote moved the term"
    );
}

#[test]
fn a_removed_node_is_refused_everywhere_and_cannot_come_back() {
    let mut cluster = Cluster::bootstrap();
    cluster.join();
    cluster.join();
    cluster.join();
    cluster.wait_raft(3, 1, Duration::from_secs(120));
    let removed = credentials(&cluster.agents[2]);
    let probe = |agent: &Agent| {
        let ping = ControlRequest::TokenList;
        let tls = removed
            .member_client_config(&Verification::system())
            .unwrap();
        runtime().block_on(exchange(agent.gossip, tls, &ping))
    };
    assert!(probe(&cluster.agents[0]).is_ok(), "n3 is a member before");

    tracing::info!("--- blx node remove n3, through n1");
    let out = cluster.agents[0].cli(&["node", "remove", "n3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for agent in [&cluster.agents[0], &cluster.agents[1], &cluster.agents[3]] {
        wait_until(
            Duration::from_secs(10),
            "the member refuses n3's certificate",
            || probe(agent).is_err_and(|e| e.contains("invalid peer certificate: Revoked")),
        );
    }
    cluster.wait_or_dump(Duration::from_secs(30), "the others see n3 gone", || {
        [0, 1, 3].iter().map(|i| &cluster.agents[*i]).all(|a| {
            a.members()
                .is_some_and(|ms| ms.iter().any(|m| m.name == "n3" && m.state != "alive"))
        })
    });
    tracing::info!("--- the autopilot takes it out of Raft (the fourth node replaces it)");
    let n3 = removed.id.to_string();
    cluster.wait_or_dump(
        Duration::from_secs(30),
        "n3 is no longer a Raft member",
        || {
            cluster.agents[0].status().is_some_and(|s| {
                ["voters", "learners"].iter().all(|k| {
                    s[*k]
                        .as_array()
                        .is_some_and(|ids| ids.iter().all(|v| v.as_str() != Some(&n3)))
                })
            })
        },
    );

    tracing::info!("--- restarted from its data dir, n3 says it was removed and stops");
    cluster.agents[2].kill();
    cluster.agents[2].restart();
    assert!(
        cluster.agents[2].wait_exit(Duration::from_secs(60)),
        "the removed node kept running"
    );
    let log = cluster.agents[2].log();
    assert!(log.contains("removed from the cluster"), "{log}");
}

/// Accepts and spreads whatever it is given: the forger's side of foca.
struct AnyBroadcast;

struct AnyKey;

impl foca::Invalidates for AnyKey {
    fn invalidates(&self, _: &Self) -> bool {
        false
    }
}

impl foca::BroadcastHandler<blx_membership::NodeIdentity> for AnyBroadcast {
    type Key = AnyKey;
    type Error = std::io::Error;

    fn receive_item(
        &mut self,
        _: &[u8],
        _: Option<&blx_membership::NodeIdentity>,
    ) -> Result<Option<AnyKey>, std::io::Error> {
        Ok(Some(AnyKey))
    }
}

#[test]
fn a_member_cannot_announce_another_nodes_metadata() {
    use blx_membership::NodeIdentity;
    use blx_membership::wire::MetaUpdate;
    use rand::SeedableRng;

    let mut cluster = Cluster::bootstrap();
    cluster.join();
    cluster.join();
    cluster.wait_alive(3, Duration::from_secs(60));
    let view = cluster.agents[0].members().unwrap();
    let row = |name: &str| view.iter().find(|m| m.name == name).unwrap().clone();
    let identity = |name: &str| {
        let m = row(name);
        NodeIdentity {
            id: m.id.parse().unwrap(),
            addr: m.addr,
            generation: m.generation,
        }
    };
    let (n1, n2) = (identity("n1"), identity("n2"));
    let n3_id: NodeId = row("n3").id.parse().unwrap();
    let forged = MetaUpdate {
        id: n3_id,
        version: u64::MAX / 2,
        meta: blx_membership::meta::NodeMeta {
            name: "n3".into(),
            labels: [("forged".to_string(), "yes".to_string())].into(),
            leaving: true,
            ..Default::default()
        },
    };

    tracing::info!("--- n2, with its own valid certificate, speaks for n3 three ways");
    let mut foca = foca::Foca::with_custom_broadcast(
        n2,
        foca::Config::new_lan(std::num::NonZeroU32::new(3).unwrap()),
        rand::rngs::StdRng::seed_from_u64(1),
        foca::PostcardCodec,
        AnyBroadcast,
    );
    foca.add_broadcast(&wire::encode_meta_broadcast(&forged))
        .unwrap();
    let mut out = foca::AccumulatingRuntime::new();
    // A gossip message (announcements carry no custom broadcasts) to n1 alone.
    foca.apply_many(std::iter::once(foca::Member::alive(n1)), true, &mut out)
        .unwrap();
    while out.to_send().is_some() {}
    foca.gossip(&mut out).unwrap();
    let mut packets = Vec::new();
    while let Some((_, packet)) = out.to_send() {
        packets.push(wire::encode_swim(&packet));
    }
    assert!(!packets.is_empty());
    let creds = credentials(&cluster.agents[1]);
    let tls = creds.member_client_config(&Verification::system()).unwrap();
    runtime().block_on(async {
        let client = quic::client_config(tls, &quic::CidRng::new([4; 32])).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(client);
        let conn = endpoint
            .connect(n1.addr, &n1.id.dns_name())
            .unwrap()
            .await
            .unwrap();
        // Piggybacked on a SWIM packet whose header truly names n2.
        for p in &packets {
            conn.send_datagram(p.clone()).unwrap();
        }
        // Pushed directly, as a datagram and on a stream.
        let direct = wire::encode_meta(&forged);
        conn.send_datagram(direct.clone()).unwrap();
        let mut stream = conn.open_uni().await.unwrap();
        stream.write_all(&direct).await.unwrap();
        stream.finish().unwrap();
        let _ = stream.stopped().await;
        // Give n1 a full probe period to act on them; there is nothing to wait for.
        tokio::time::sleep(Duration::from_secs(2)).await;
    });

    tracing::info!("--- n1 believes none of it");
    let n3_row = cluster.agents[0]
        .members()
        .unwrap()
        .into_iter()
        .find(|m| m.id == n3_id.to_string())
        .unwrap();
    assert_eq!(n3_row.state, "alive", "{n3_row:?}");
    assert!(!n3_row.labels.contains_key("forged"), "{n3_row:?}");
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_short_lived_certificate_is_renewed_and_an_expired_one_is_refused() {
    let mut cluster = Cluster::bootstrap_with(&["--cert-validity", "15s"]);
    cluster.join();
    cluster.wait_raft(1, 1, Duration::from_secs(90));
    let first = Validity::of(&credentials(&cluster.agents[1]).cert_der).unwrap();
    assert!(first.not_after_unix <= unix_now() + 15, "{first:?}");

    tracing::info!("--- n2 outlives its first certificate, a member throughout");
    cluster.wait_or_dump(
        Duration::from_secs(60),
        "n2 holds a certificate issued after its first one expired",
        || {
            for (a, b) in [(0, "n2"), (1, "n1")] {
                let members = cluster.agents[a].members().unwrap_or_default();
                assert!(
                    members.iter().any(|m| m.name == b && m.state == "alive"),
                    "{b} is not alive in {}'s view: {members:?}",
                    cluster.agents[a].name
                );
            }
            let now = Validity::of(&credentials(&cluster.agents[1]).cert_der).unwrap();
            now.not_before_unix + CLOCK_SLACK_SECS > first.not_after_unix
        },
    );
    assert!(
        cluster.agents[1]
            .log()
            .contains("renewed this node's certificate")
    );

    tracing::info!("--- stopped past its expiry, n2 is refused and says why");
    cluster.agents[1].kill();
    let stale = credentials(&cluster.agents[1]);
    let until = Validity::of(&stale.cert_der).unwrap().not_after_unix;
    wait_until(Duration::from_secs(30), "n2's certificate expires", || {
        unix_now() > until
    });
    let tls = stale.member_client_config(&Verification::system()).unwrap();
    let refused = runtime().block_on(exchange(
        cluster.agents[0].gossip,
        tls,
        &ControlRequest::TokenList,
    ));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("certificate expired")),
        "{refused:?}"
    );
    cluster.agents[1].restart();
    assert!(cluster.agents[1].wait_exit(Duration::from_secs(30)));
    let log = cluster.agents[1].log();
    assert!(log.contains("certificate expired"), "{log}");
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn the_data_dir_is_private_and_an_open_one_is_refused() {
    let mut cluster = Cluster::bootstrap();
    cluster.join();
    cluster.wait_raft(1, 1, Duration::from_secs(90));
    let leader = &cluster.agents[0];
    // A token created now is in the replicated state, so in RocksDB's files.
    leader.token("1h");
    for agent in &cluster.agents {
        assert_eq!(mode(&agent.data_dir), 0o700, "{}", agent.data_dir.display());
        let mut files = Vec::new();
        files_under(&agent.data_dir, &mut files);
        assert!(files.iter().any(|f| f.ends_with("node.key")));
        for file in files {
            assert_eq!(
                mode(&file) & 0o077,
                0,
                "{} is open to other users",
                file.display()
            );
        }
    }
    assert_eq!(mode(&cluster.agents[0].data_dir.join("ca.key")), 0o600);
    for agent in &cluster.agents {
        assert_eq!(mode(&agent.data_dir.join("api.token")), 0o600);
    }
    assert_eq!(mode(&cluster.agents[0].data_dir.join("tokens.bin")), 0o600);

    tracing::info!("--- an agent refuses a data dir that others can read");
    use std::os::unix::fs::PermissionsExt;
    let open = cluster.root.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(blx_bin())
        .arg("agent")
        .arg("--data-dir")
        .arg(&open)
        .args(["--no-mdns", "--bind", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&open.display().to_string()), "{stderr}");
    assert!(stderr.contains("chmod 700"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(&open).unwrap().count(),
        0,
        "it wrote into it"
    );
}
