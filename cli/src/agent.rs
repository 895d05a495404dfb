//! The agent assembly: data dir, admission (bootstrap or join), the QUIC endpoint, SWIM,
//! mDNS and the HTTP API, wired together and run until SIGINT, SIGTERM or `blx leave`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use blx_consensus::node::{ConsensusNode, raft_config};
use blx_membership::discovery;
use blx_membership::join::{JoinError, request_join};
use blx_membership::meta::{Capacity, NodeMeta, Role};
use blx_membership::quic::QuicTransport;
use blx_membership::store::DataDir;
use blx_membership::tls::{ClusterCa, NodeCredentials, hex};
use blx_membership::token::{JoinToken, TokenAuthority};
use blx_membership::{Membership, NodeIdentity, Swim, SwimConfig};
use rand::SeedableRng;
use tokio::sync::{Notify, mpsc};

use crate::args::AgentArgs;
use crate::control::{AgentControl, Authority, now_unix, random};

const PEERS: &str = "peers";
/// How long a joiner browses mDNS for its cluster.
const MDNS_WAIT: Duration = Duration::from_secs(10);

pub(crate) async fn run(args: AgentArgs) -> anyhow::Result<()> {
    // Check everything the operator typed before touching the data dir.
    let token = args
        .token
        .as_deref()
        .map(str::parse::<JoinToken>)
        .transpose()?;
    if let Some(name) = &args.name {
        blx_membership::meta::validate_name(name)?;
    }
    if !args.api.ip().is_loopback() && args.api_token.is_none() {
        bail!(
            "--api {} is reachable beyond this host: set --api-token (or BLX_API_TOKEN)",
            args.api
        );
    }
    let advertise = advertise_addr(&args)?;
    let images = args
        .image_dir
        .clone()
        .unwrap_or_else(blx_vmm::image::default_dir);
    if token.is_none() && !args.seeds.is_empty() && !DataDir::is_member(&args.data_dir) {
        bail!("joining through --seed needs a join token (--token or `blx join TOKEN`)");
    }

    let dir = DataDir::open(&args.data_dir)?;
    let id = dir.node_id(random())?;
    let mut seeds = args.seeds.clone();
    let mut fresh_cluster = false;
    let creds = match dir.credentials(id)? {
        Some(creds) => {
            if token.is_some() {
                tracing::info!(
                    "this data dir already belongs to a cluster; the token is not needed and was ignored"
                );
            }
            seeds.extend(load_peers(&dir));
            creds
        }
        None => match &token {
            Some(token) => {
                let (creds, members) = join_cluster(&args, token, id).await?;
                seeds.extend(members);
                dir.save_credentials(&creds)?;
                creds
            }
            None if !args.seeds.is_empty() => {
                bail!("joining through --seed needs a join token (--token or `blx join TOKEN`)")
            }
            None => {
                fresh_cluster = true;
                bootstrap(&dir, &args, id)?
            }
        },
    };
    let generation = dir.next_generation()?;
    let authority = dir.cluster_ca()?.map(|ca| Authority {
        tokens: TokenAuthority::new(dir.token_store(), ca.fingerprint()),
        ca,
    });

    let mut meta = NodeMeta {
        name: args.name.clone().unwrap_or_else(|| default_name(id)),
        labels: args.labels.iter().cloned().collect(),
        capacity: capacity(&args),
        ..Default::default()
    };
    meta.zone = meta.labels.get("zone").cloned();
    if authority.is_some() {
        meta.roles.insert(Role::Authority);
    }
    meta.endpoints.insert("api".into(), args.api);
    meta.validate()?;

    let control = Arc::new(AgentControl::new(authority));
    let (inbound_tx, inbound_rx) = mpsc::channel(4096);
    let transport = QuicTransport::bind(args.bind, &creds, inbound_tx, control.clone())?;
    let identity = NodeIdentity {
        id,
        addr: advertise,
        generation,
    };
    let rng = rand::rngs::StdRng::from_seed(random());
    let swim = Swim::new(
        identity,
        meta,
        SwimConfig::lan(),
        rng,
        tokio::time::Instant::now(),
    );
    let membership = Membership::spawn(swim, Arc::new(transport.clone()), inbound_rx);
    control.attach(membership.clone(), transport.clone());
    seeds.retain(|s| *s != advertise);
    if !seeds.is_empty() {
        membership.join(seeds).await?;
    }

    let raft_dir = args.data_dir.join("raft");
    let rpc = Arc::new(crate::raft::QuicRpc {
        transport: transport.clone(),
    });
    let node = ConsensusNode::start(
        crate::raft::raft_id(id),
        &raft_dir,
        raft_config(args.raft_snapshot_logs)?,
        rpc,
    )
    .await?;
    if fresh_cluster {
        // Only the cluster's first agent ever initializes; everyone else is added by it.
        node.initialize(advertise).await?;
    }
    let run_root = args.data_dir.join("vms");
    let cluster = crate::raft::Cluster::new(
        node.clone(),
        membership.clone(),
        transport.clone(),
        run_root.clone(),
        id,
    );
    control.set_cluster(cluster.clone());
    let replicate = {
        let control = control.clone();
        tokio::spawn(async move { control.replicate_authority().await })
    };
    let controller = tokio::spawn(crate::controller::run(cluster.clone(), membership.clone()));
    crate::worker::spawn(
        cluster.clone(),
        id.to_string(),
        crate::worker::WorkerConfig {
            run_root,
            images: images.clone(),
            accel: args.accel.into(),
        },
    );
    let autopilot = tokio::spawn(node.clone().run_autopilot(
        Duration::from_secs(1),
        crate::raft::member_views(membership.clone()),
    ));

    let _mdns = if args.no_mdns {
        None
    } else {
        match discovery::Announcer::start(id, advertise, &creds.ca_fingerprint()) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "mDNS announcements are off");
                None
            }
        }
    };

    let shutdown = Arc::new(Notify::new());
    let api = crate::api::serve(
        args.api,
        crate::api::ApiState {
            membership: membership.clone(),
            control: control.clone(),
            cluster: cluster.clone(),
            shutdown: shutdown.clone(),
            api_token: args.api_token.clone(),
            self_id: id,
            cluster_id: hex(&creds.ca_fingerprint()),
            images,
        },
    )
    .await?;
    tracing::info!(node = %id, name = %membership.members()[&id].meta.as_ref().map(|m| m.name.as_str()).unwrap_or(""), gossip = %advertise, api = %args.api, "agent running");
    let peers_task = tokio::spawn(save_peers_periodically(dir.clone(), membership.clone()));

    let leave_requested = wait_for_stop(&shutdown).await;
    if leave_requested {
        tracing::info!("leaving the cluster");
    } else {
        tracing::info!("stopping: leaving the cluster first");
    }
    autopilot.abort();
    controller.abort();
    replicate.abort();
    step_down(&node).await;
    membership.leave().await.ok();
    peers_task.abort();
    save_peers(&dir, &membership);
    api.abort();
    let _ = node.raft.shutdown().await;
    transport.shutdown().await;
    Ok(())
}

/// A leader that stops hands over first: it removes itself from the voters, and steps down
/// once that change commits, so the others elect a successor at once instead of waiting out
/// an election timeout.
async fn step_down(node: &ConsensusNode) {
    let status = node.status();
    if status.leader != Some(status.id) || status.voters.len() < 2 {
        return;
    }
    let others: std::collections::BTreeSet<u64> = status
        .voters
        .iter()
        .copied()
        .filter(|v| *v != status.id)
        .collect();
    if !node.membership_settled(Duration::from_secs(5)).await {
        tracing::warn!("could not hand leadership over: a voter change is still being applied");
        return;
    }
    let change = node
        .raft
        .change_membership(openraft::ChangeMembers::ReplaceAllVoters(others), false);
    match tokio::time::timeout(Duration::from_secs(5), change).await {
        Ok(Ok(_)) => tracing::info!("handed leadership over before leaving"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not hand leadership over"),
        Err(_) => tracing::warn!("handing leadership over timed out"),
    }
}

/// Resolves when a signal arrives (false) or the API asked to leave (true).
async fn wait_for_stop(shutdown: &Notify) -> bool {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            return {
                shutdown.notified().await;
                true
            };
        }
    };
    tokio::select! {
        _ = shutdown.notified() => true,
        _ = tokio::signal::ctrl_c() => false,
        _ = term.recv() => false,
    }
}

fn bootstrap(
    dir: &DataDir,
    args: &AgentArgs,
    id: blx_membership::NodeId,
) -> anyhow::Result<NodeCredentials> {
    let ca = ClusterCa::generate(&hex(&random::<4>()))?;
    let creds = ca.issue_node(id)?;
    dir.save_ca_key(&ca)?;
    dir.save_credentials(&creds)?;
    let mut tokens = TokenAuthority::new(dir.token_store(), ca.fingerprint());
    let token = tokens.issue(now_unix(), args.bootstrap_token_ttl.as_secs(), random())?;
    eprintln!(
        "blx: bootstrapped a new cluster (CA {}).",
        &hex(&ca.fingerprint())[..16]
    );
    eprintln!(
        "blx: join other agents with this token (valid {}s):",
        args.bootstrap_token_ttl.as_secs()
    );
    println!("{token}");
    Ok(creds)
}

async fn join_cluster(
    args: &AgentArgs,
    token: &JoinToken,
    id: blx_membership::NodeId,
) -> anyhow::Result<(NodeCredentials, Vec<SocketAddr>)> {
    let targets = if !args.seeds.is_empty() {
        args.seeds.clone()
    } else if args.no_mdns {
        bail!("no --seed given and mDNS is off (--no-mdns): nowhere to find the cluster");
    } else {
        tracing::info!("looking for the cluster on the LAN (mDNS)");
        let found = discovery::find_cluster(&token.ca_fingerprint, MDNS_WAIT).await?;
        if found.is_empty() {
            bail!(
                "no agent of this token's cluster answered on the LAN within {}s: pass --seed IP:PORT",
                MDNS_WAIT.as_secs()
            );
        }
        found
    };
    let mut last: Option<JoinError> = None;
    for addr in targets {
        match request_join(addr, token, id).await {
            Ok(joined) => {
                tracing::info!(through = %addr, "joined the cluster");
                let mut members = joined.members;
                members.push(addr);
                return Ok((joined.credentials, members));
            }
            Err(e @ JoinError::Refused(_)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "join attempt failed");
                last = Some(e);
            }
        }
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("no address to join through")))
}

fn advertise_addr(args: &AgentArgs) -> anyhow::Result<SocketAddr> {
    if let Some(a) = args.advertise {
        if a.ip().is_unspecified() {
            bail!("--advertise must be a concrete address, not {a}");
        }
        return Ok(a);
    }
    if !args.bind.ip().is_unspecified() {
        return Ok(args.bind);
    }
    let ip = if_addrs::get_if_addrs()
        .context("listing network interfaces")?
        .into_iter()
        .map(|i| i.ip())
        .find(|ip| matches!(ip, IpAddr::V4(_)) && !ip.is_loopback())
        .context(
            "--bind is a wildcard and no non-loopback IPv4 address was found: pass --advertise",
        )?;
    Ok(SocketAddr::new(ip, args.bind.port()))
}

fn default_name(id: blx_membership::NodeId) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| blx_membership::meta::validate_name(h).is_ok())
        .unwrap_or_else(|| format!("node-{}", id.short()))
}

/// The host's resources, or what the flags say to offer instead.
fn capacity(args: &AgentArgs) -> Capacity {
    let host = host_capacity();
    Capacity {
        vcpus: args.vcpus.unwrap_or(host.vcpus),
        memory_mib: args
            .memory
            .map(|b| b / (1024 * 1024))
            .unwrap_or(host.memory_mib),
        disk_gib: host.disk_gib,
    }
}

fn host_capacity() -> Capacity {
    let vcpus = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0);
    Capacity {
        vcpus,
        memory_mib,
        disk_gib: 0,
    }
}

fn load_peers(dir: &DataDir) -> Vec<SocketAddr> {
    std::fs::read_to_string(dir.path().join(PEERS))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn save_peers(dir: &DataDir, membership: &Membership) {
    let text: String = membership
        .members()
        .values()
        .map(|m| format!("{}\n", m.identity.addr))
        .collect();
    if let Err(e) = dir.write(PEERS, text.as_bytes()) {
        tracing::warn!(error = %e, "could not save the peer list");
    }
}

/// Keeps the addresses of known members in the data dir, so a restart can rejoin by itself.
async fn save_peers_periodically(dir: DataDir, membership: Membership) {
    let mut watch = membership.watch();
    loop {
        if watch.changed().await.is_err() {
            return;
        }
        save_peers(&dir, &membership);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
