//! The agent assembly: data dir, admission (bootstrap or join), the QUIC endpoint, SWIM,
//! mDNS, consensus, the leader's controllers, the node's VMM worker and the HTTP API, wired
//! together from an [`AgentConfig`] and a [`World`], and run until the world's stop signal
//! or `blx leave`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use blx_consensus::node::{ConsensusNode, raft_config};
use blx_consensus::state::ClusterState;
use blx_membership::discovery;
use blx_membership::join::{JoinError, request_join};
use blx_membership::meta::{Capacity, NodeMeta};
use blx_membership::quic::{CidRng, EndpointSeeds, QuicError, QuicTransport};
use blx_membership::store::DataDir;
use blx_membership::tls::{ClusterCa, NodeCredentials, hex};
use blx_membership::token::{JoinRefusal, JoinToken, TokenAuthority};
use blx_membership::{Membership, NodeIdentity, Swim, SwimConfig};
use rand::SeedableRng;
use tokio::sync::{Notify, mpsc};

use crate::config::AgentConfig;
use crate::control::{AgentControl, Authority};
use crate::world::{BoxFuture, DriverContext, Entropy, HostFacts, World};

const PEERS: &str = "peers";
/// How long a joiner browses mDNS for its cluster.
const MDNS_WAIT: Duration = Duration::from_secs(10);
/// How long a joiner keeps trying a cluster that answers but cannot confirm its token yet.
const JOIN_RETRY_FOR: Duration = Duration::from_secs(30);
/// Pause between those tries.
const JOIN_RETRY_EVERY: Duration = Duration::from_millis(500);

/// Runs one agent until `world.stop` resolves or the API asks it to leave; it leaves the
/// cluster gracefully either way.
pub async fn run(config: AgentConfig, world: World) -> anyhow::Result<()> {
    start(config, world).await?.wait().await
}

/// A running agent, as [`start`] returns it; [`Agent::wait`] runs it to its end.
pub struct Agent {
    view: AgentView,
    running: Running,
}

/// What an embedder (the simulator, a test) may look at while an agent runs. Cheap to clone;
/// it reads the agent's own state and never changes it.
#[derive(Clone)]
pub struct AgentView {
    node: ConsensusNode,
    membership: Membership,
    router: axum::Router,
    id: blx_membership::NodeId,
}

/// What [`Agent::wait`] needs to stop the agent.
struct Running {
    /// The transport holds the control service weakly; this keeps it alive.
    _control: Arc<AgentControl>,
    dir: DataDir,
    transport: QuicTransport,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    api: tokio::task::JoinHandle<()>,
    shutdown: Arc<Notify>,
    stop: BoxFuture<'static, ()>,
    _mdns: Option<discovery::Announcer>,
    /// Sent what it still holds for the collector when the agent stops.
    audit: Arc<crate::audit::AuditLog>,
}

impl Agent {
    /// A view of the running agent.
    pub fn view(&self) -> AgentView {
        self.view.clone()
    }

    /// Runs until the world's stop signal or a leave request, then leaves gracefully.
    pub async fn wait(self) -> anyhow::Result<()> {
        let Agent {
            view: AgentView {
                node, membership, ..
            },
            running,
        } = self;
        let leave_requested = wait_for_stop(&running.shutdown, running.stop).await;
        if leave_requested {
            tracing::info!("leaving the cluster");
        } else {
            tracing::info!("stopping: leaving the cluster first");
        }
        for task in &running.tasks {
            task.abort();
        }
        step_down(&node).await;
        membership.leave().await.ok();
        save_peers(&running.dir, &membership);
        running.api.abort();
        let _ = node.raft.shutdown().await;
        running.transport.shutdown().await;
        running.audit.flush();
        Ok(())
    }
}

impl AgentView {
    /// This node's id.
    pub fn id(&self) -> blx_membership::NodeId {
        self.id
    }

    /// Leader, term, indexes and voters, as this node sees them.
    pub fn raft_status(&self) -> blx_consensus::node::Status {
        self.node.status()
    }

    /// The member table, as this node sees it.
    pub fn members(
        &self,
    ) -> Arc<std::collections::BTreeMap<blx_membership::NodeId, blx_membership::Member>> {
        self.membership.members()
    }

    /// Runs `f` on the state this node has applied (not confirmed with the leader).
    pub fn with_applied_state<R>(
        &self,
        f: impl FnOnce(&blx_consensus::state::ClusterState) -> R,
    ) -> R {
        self.node.with_local_state(f)
    }

    /// The HTTP API's routes, to call in-process (the same router the API serves).
    pub fn router(&self) -> axum::Router {
        self.router.clone()
    }
}

/// Starts one agent: admission, membership, consensus, the controllers, the worker and the
/// API. Returns once it serves its API.
pub async fn start(config: AgentConfig, world: World) -> anyhow::Result<Agent> {
    // Check everything the operator gave before touching the data dir.
    config.validate()?;
    let World {
        net,
        raft,
        drivers,
        clock,
        entropy,
        host,
        stop,
        operator,
    } = world;
    let advertise = advertise_addr(&config, &host)?;
    let token = config.token.clone();
    if token.is_none() && !config.seeds.is_empty() && !DataDir::is_member(&config.data_dir) {
        bail!("joining through --seed needs a join token (--token or `blx join TOKEN`)");
    }

    let dir = DataDir::open(&config.data_dir)?;
    // openraft draws its election timeouts from a per-thread generator (see
    // `blx_consensus::runtime`); seed this thread's from the agent's entropy.
    blx_consensus::runtime::seed_thread_rng(entropy.u64());
    let quic_seeds = EndpointSeeds {
        reset_key: entropy.bytes(),
        rng: entropy.bytes(),
        cids: entropy.bytes(),
        token_key: entropy.bytes(),
    };
    let cids = CidRng::new(entropy.bytes());
    let socket = net
        .bind_udp(config.bind)
        .await
        .map_err(|source| QuicError::Bind {
            addr: config.bind,
            source,
        })?;
    let endpoint =
        blx_membership::quic::endpoint(socket, Arc::new(quinn::TokioRuntime), &quic_seeds)?;
    let mut seeds = config.seeds.clone();
    let mut fresh_cluster = false;
    let creds = match dir.credentials()? {
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
                let (creds, members) = tracing::Instrument::instrument(
                    join_cluster(&config, &endpoint, token, entropy.bytes(), &cids, &clock),
                    tracing::info_span!("agent.join"),
                )
                .await?;
                seeds.extend(members);
                dir.save_credentials(&creds)?;
                creds
            }
            None if !config.seeds.is_empty() => {
                bail!("joining through --seed needs a join token (--token or `blx join TOKEN`)")
            }
            None => {
                fresh_cluster = true;
                // The first node names itself; every later one is named by the cluster.
                let id = dir.node_id(entropy.bytes())?;
                let (creds, token) = bootstrap(&dir, &config, id, &entropy, clock.now_unix())?;
                operator.bootstrapped(&token, config.bootstrap_token_ttl);
                creds
            }
        },
    };
    let id = creds.id;
    if let Some(message) = crate::renewal::expired_message(&creds, clock.now_unix()) {
        bail!(message);
    }
    let generation = dir.next_generation()?;
    let authority = dir.cluster_ca()?.map(|ca| Authority {
        tokens: TokenAuthority::new(dir.token_store(), ca.fingerprint()),
        ca,
    });

    let mut meta = NodeMeta {
        name: config
            .name
            .clone()
            .unwrap_or_else(|| default_name(&host, id)),
        labels: config.labels.clone(),
        capacity: capacity(&config, &host),
        ..Default::default()
    };
    meta.zone = meta.labels.get("zone").cloned();
    meta.endpoints.insert("api".into(), config.api);
    meta.validate()?;

    let control = Arc::new(AgentControl::new(
        authority,
        id,
        config.cert_validity,
        clock.clone(),
        entropy.clone(),
    ));
    let (inbound_tx, inbound_rx) = mpsc::channel(4096);
    let transport = QuicTransport::new(
        endpoint,
        &creds,
        quic_seeds.token_key,
        &cids,
        inbound_tx,
        control.clone(),
        blx_membership::tls::Verification {
            revoked: Default::default(),
            time: Arc::new(WallTime(clock.clone())),
        },
    )?;
    let identity = NodeIdentity {
        id,
        addr: advertise,
        generation,
    };
    let rng = rand::rngs::StdRng::from_seed(entropy.bytes());
    let swim = Swim::new(
        identity,
        meta,
        SwimConfig::lan(),
        rng,
        tokio::time::Instant::now(),
    );
    let membership = Membership::spawn(swim, Arc::new(transport.clone()), inbound_rx);
    control.attach(membership.clone());
    seeds.retain(|s| *s != advertise);
    if !seeds.is_empty() {
        membership.join(seeds).await?;
    }

    let contact = Arc::new(crate::raft::RaftContact::default());
    let rpc = Arc::new(crate::raft::QuicRpc {
        transport: transport.clone(),
        contact: contact.clone(),
    });
    let raft_id = crate::raft::raft_id(id);
    let stores = raft.open(raft_id, &config.data_dir)?;
    let node = ConsensusNode::start(
        raft_id,
        stores,
        raft_config(config.raft_snapshot_logs)?,
        rpc,
    )
    .await?;
    if fresh_cluster {
        // Only the cluster's first agent ever initializes; everyone else is added by it.
        node.initialize(advertise).await?;
    }
    if node.with_local_state(|s| s.revoked_nodes().contains(&id)) {
        let _ = node.raft.shutdown().await;
        transport.shutdown().await;
        bail!(
            "this node ({id}) was removed from the cluster and its certificate is revoked: \
             to rejoin, start with an empty --data-dir and a new join token"
        );
    }
    let run_root = config.data_dir.join("vms");
    let cluster = crate::raft::Cluster::new(
        node.clone(),
        membership.clone(),
        transport.clone(),
        run_root.clone(),
        id,
        clock.clone(),
        &config.data_dir.join("audit"),
        contact.clone(),
    )
    .context("cannot open the audit log")?;
    control.set_cluster(cluster.clone());
    transport.count_traffic(cluster.metrics.traffic.clone());
    operator.identified(&crate::telemetry::NodeTelemetry {
        id: id.to_string(),
        name: membership.members()[&id]
            .meta
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
        zone: config.labels.get("zone").cloned(),
        render: {
            let metrics = cluster.metrics.clone();
            Arc::new(move || metrics.render())
        },
    });
    let mut tasks = Vec::new();
    tasks.push({
        let control = control.clone();
        tokio::spawn(async move { control.replicate_authority().await })
    });
    // Beyond loopback the API speaks HTTPS with this node's certificate.
    let serving = if config.api.ip().is_loopback() {
        None
    } else {
        Some(blx_membership::tls::ServingCert::new(&creds)?)
    };
    tasks.push(tokio::spawn(
        crate::renewal::Renewal {
            dir: dir.clone(),
            transport: transport.clone(),
            membership: membership.clone(),
            control: control.clone(),
            clock: clock.clone(),
            entropy: entropy.clone(),
            creds: creds.clone(),
            serving: serving.clone(),
        }
        .run(),
    ));
    tasks.push(tokio::spawn(follow_revocations(
        node.clone(),
        transport.clone(),
        id,
    )));
    tasks.push(tokio::spawn(crate::controller::run(
        cluster.clone(),
        membership.clone(),
        contact,
        entropy.u64(),
    )));
    tasks.push(tokio::spawn(crate::leader_loss::run(
        cluster.clone(),
        membership.clone(),
        entropy.u64(),
    )));
    tasks.push(tokio::spawn(crate::follow::run(
        cluster.clone(),
        membership.clone(),
        transport.clone(),
    )));
    let driver_set = drivers(&DriverContext {
        run_root: run_root.clone(),
        accel: config.accel,
    });
    tasks.extend(crate::worker::spawn(
        cluster.clone(),
        id.to_string(),
        crate::worker::WorkerConfig {
            run_root,
            images: config.image_dir.clone(),
        },
        driver_set,
    ));
    tasks.push(tokio::spawn(crate::metrics::count_leader_changes(
        node.clone(),
        cluster.metrics.clone(),
    )));
    tasks.push(tokio::spawn(node.clone().run_autopilot(
        Duration::from_secs(1),
        crate::raft::member_views(membership.clone(), node.clone()),
    )));

    let _mdns = if !config.mdns {
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
    // A new local token at each start, readable only by the agent's user: the CLI on this
    // machine reads it from the data dir.
    let local_token = crate::access::local_token(entropy.bytes());
    dir.write(crate::access::LOCAL_TOKEN_FILE, local_token.as_bytes())?;
    let router = crate::api::router(crate::api::ApiState::new(crate::api::ApiShared {
        membership: membership.clone(),
        control: control.clone(),
        cluster: cluster.clone(),
        shutdown: shutdown.clone(),
        local_token: Arc::new(local_token),
        entropy: entropy.clone(),
        self_id: id,
        cluster_id: hex(&creds.ca_fingerprint()),
        images: config.image_dir.clone(),
        readiness: Default::default(),
        metrics_need_token: config.metrics_need_token,
        openapi: Default::default(),
    }));
    let api = net
        .serve_api(config.api, router.clone(), serving)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the HTTP API on {}: {e}", config.api))?;
    tracing::info!(node = %id, name = %membership.members()[&id].meta.as_ref().map(|m| m.name.as_str()).unwrap_or(""), gossip = %advertise, api = %config.api, "agent running");
    operator.running();
    tasks.push(tokio::spawn(save_peers_periodically(
        dir.clone(),
        membership.clone(),
    )));
    if crate::telemetry::logs_exported() {
        tasks.push(tokio::spawn(cluster.audit.clone().flush_periodically()));
    }

    Ok(Agent {
        view: AgentView {
            node,
            membership,
            router,
            id,
        },
        running: Running {
            _control: control,
            dir,
            transport,
            tasks,
            api,
            shutdown,
            stop,
            _mdns,
            audit: cluster.audit.clone(),
        },
    })
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

/// Resolves when the world says stop (false) or the API asked to leave (true).
async fn wait_for_stop(shutdown: &Notify, stop: BoxFuture<'static, ()>) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.notified() => true,
        _ = stop => false,
    }
}

/// Creates the cluster CA, this node's credentials and the first join token.
fn bootstrap(
    dir: &DataDir,
    config: &AgentConfig,
    id: blx_membership::NodeId,
    entropy: &Entropy,
    now_unix: u64,
) -> anyhow::Result<(NodeCredentials, JoinToken)> {
    let ca = ClusterCa::generate(&hex(&entropy.bytes::<4>()), entropy.bytes())?;
    let validity = blx_membership::tls::Validity::starting(now_unix, config.cert_validity);
    let creds = ca.issue_node(id, entropy.bytes(), validity)?;
    dir.save_ca_key(&ca)?;
    dir.save_credentials(&creds)?;
    let mut tokens = TokenAuthority::new(dir.token_store(), ca.fingerprint());
    let token = tokens.issue(
        now_unix,
        config.bootstrap_token_ttl.as_secs(),
        entropy.bytes(),
    )?;
    Ok((creds, token))
}

async fn join_cluster(
    config: &AgentConfig,
    endpoint: &quinn::Endpoint,
    token: &JoinToken,
    key_seed: [u8; 32],
    cids: &CidRng,
    clock: &Arc<dyn crate::world::WallClock>,
) -> anyhow::Result<(NodeCredentials, Vec<SocketAddr>)> {
    let targets = if !config.seeds.is_empty() {
        config.seeds.clone()
    } else if !config.mdns {
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
    // A cluster that cannot confirm tokens right now (no leader yet, an election under way)
    // refuses with NoQuorum; that is worth a few more tries. Any other refusal is final.
    let deadline = tokio::time::Instant::now() + JOIN_RETRY_FOR;
    loop {
        let mut last: Option<JoinError> = None;
        for addr in &targets {
            match request_join(
                endpoint,
                *addr,
                token,
                key_seed,
                cids,
                Arc::new(WallTime(clock.clone())),
            )
            .await
            {
                Ok(joined) => {
                    tracing::info!(through = %addr, node = %joined.credentials.id, "joined the cluster");
                    let mut members = joined.members;
                    members.push(*addr);
                    return Ok((joined.credentials, members));
                }
                Err(e @ JoinError::Refused(refusal)) if refusal != JoinRefusal::NoQuorum => {
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "join attempt failed");
                    last = Some(e);
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(last
                .map(anyhow::Error::from)
                .unwrap_or_else(|| anyhow::anyhow!("no address to join through")));
        }
        tokio::time::sleep(JOIN_RETRY_EVERY).await;
    }
}

/// The agent's wall clock as rustls reads it, so certificates expire in the agent's time (in
/// a simulation, simulated time).
struct WallTime(Arc<dyn crate::world::WallClock>);

impl std::fmt::Debug for WallTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WallTime")
    }
}

impl rustls::time_provider::TimeProvider for WallTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        Some(rustls::pki_types::UnixTime::since_unix_epoch(
            Duration::from_secs(self.0.now_unix()),
        ))
    }
}

/// Keeps the transport's revocation list equal to the applied state's, so a `node remove`
/// reaches every member's verifiers as fast as the log reaches it.
async fn follow_revocations(
    node: ConsensusNode,
    transport: QuicTransport,
    me: blx_membership::NodeId,
) {
    let mut applied = node.subscribe();
    let mut told = false;
    loop {
        let revoked = node.with_local_state(ClusterState::revoked_nodes);
        if revoked.contains(&me) && !told {
            tracing::error!(
                "this node was removed from the cluster: its certificate is revoked and every member refuses it"
            );
            told = true;
        }
        transport.revoke(revoked);
        // At most a few checks a second, however fast entries are applied.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if applied.changed().await.is_err() {
            return;
        }
    }
}

fn advertise_addr(config: &AgentConfig, host: &HostFacts) -> anyhow::Result<SocketAddr> {
    if let Some(a) = config.advertise {
        return Ok(a);
    }
    if !config.bind.ip().is_unspecified() {
        return Ok(config.bind);
    }
    let ip = host
        .addresses
        .iter()
        .copied()
        .find(|ip| matches!(ip, IpAddr::V4(_)) && !ip.is_loopback())
        .context(
            "--bind is a wildcard and no non-loopback IPv4 address was found: pass --advertise",
        )?;
    Ok(SocketAddr::new(ip, config.bind.port()))
}

fn default_name(host: &HostFacts, id: blx_membership::NodeId) -> String {
    host.hostname
        .clone()
        .filter(|h| blx_membership::meta::validate_name(h).is_ok())
        .unwrap_or_else(|| format!("node-{}", id.short()))
}

/// The host's resources, or what the config says to offer instead.
fn capacity(config: &AgentConfig, host: &HostFacts) -> Capacity {
    Capacity {
        vcpus: config.vcpus.unwrap_or(host.capacity.vcpus),
        memory_mib: config
            .memory_bytes
            .map(|b| b / (1024 * 1024))
            .unwrap_or(host.capacity.memory_mib),
        disk_gib: host.capacity.disk_gib,
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
