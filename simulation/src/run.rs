//! One run: a cluster of real agents on turmoil hosts, clients beside them, the faults of the
//! seed's plan, samples of every host fed to the invariants, and a trace of what happened.
//!
//! ```text
//!   seed ──▶ Plan (faults) ──┐
//!        ──▶ turmoil (network RNG, each host's tokio RNG)
//!        ──▶ per host and boot: the agent's Entropy, the client's RNG
//!                            │
//!   loop every 1 ms tick: apply faults due ─▶ Sim::step ─▶ every 100 ms: sample ─▶ invariants
//!                                                                     └─▶ trace (events, hash)
//! ```

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use blx::{AgentConfig, AgentView, World};
use blx_membership::token::JoinToken;

use crate::client::{History, create_vms, kv_workload};
use crate::faults::{Fault, Plan, Scheduled};
use crate::invariants::{
    HostSample, Sample, Violation, acknowledged_writes, capacity, convergence, leader_per_term,
    linearizable, single_vm_copy, state_machines_agree,
};
use crate::trace::Trace;
use crate::udp::LinkFaults;
use crate::world::{
    SimClock, SimDisk, SimDriver, SimNet, SimOperator, VmRegistry, host_facts, lock,
};

/// What to run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The seed: the run is a function of it.
    pub seed: u64,
    /// How many agents.
    pub agents: usize,
    /// Virtual time the run lasts. Faults fall between 20 s and 30 s before the end; the
    /// last 30 s are for healing and the final checks.
    pub duration: Duration,
    /// Keep the event log in the outcome.
    pub keep_events: bool,
    /// VMs the operator creates once the cluster is up.
    pub vms: usize,
}

impl RunConfig {
    /// The run the test suite and `--seeds` use for `seed`.
    pub fn standard(seed: u64) -> Self {
        RunConfig {
            seed,
            agents: 5,
            duration: Duration::from_secs(75),
            keep_events: false,
            vms: 4,
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// SHA-256 over the trace's events, hex.
    pub trace_hash: String,
    /// The first invariant broken, if any.
    pub violation: Option<Violation>,
    /// The event log, if asked for.
    pub events: Vec<String>,
    /// Client operations recorded.
    pub operations: usize,
    /// Datagrams dropped by injected loss.
    pub dropped: u64,
}

/// The address of host `i`: TEST-NET-2 (RFC 5737), which exists only inside the simulator.
fn host_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        198,
        51,
        100,
        u8::try_from(i + 1).unwrap_or(255),
    ))
}

fn host_name(i: usize) -> String {
    format!("h{i}")
}

const GOSSIP_PORT: u16 = 7946;
const EPOCH_MS: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const WARMUP: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_secs(30);
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
const CONVERGE_WITHIN: Duration = Duration::from_secs(5);
const DEFAULT_MAX_LATENCY: Duration = Duration::from_millis(10);

/// What every host of a run shares with the harness.
struct Shared {
    seed: u64,
    root: PathBuf,
    faults: Arc<LinkFaults>,
    token: Arc<Mutex<Option<JoinToken>>>,
    registry: VmRegistry,
    history: History,
    clients_until: Duration,
    final_read_at: Duration,
    vms: usize,
}

/// What the harness keeps of one host.
struct HostSlot {
    index: usize,
    disk: SimDisk,
    api: Arc<Mutex<Option<axum::Router>>>,
    view: Arc<Mutex<Option<AgentView>>>,
    skew_ms: Arc<AtomicI64>,
    boots: Rc<RefCell<u64>>,
    down: u32,
}

/// splitmix64 of the run seed and a salt: a seed for one part of the run.
fn derive(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn seed_bytes(seed: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&derive(seed, i as u64 + 1).to_le_bytes());
    }
    out
}

/// Runs one seed to its end, or to its first broken invariant.
pub fn run(config: &RunConfig) -> Outcome {
    let seed = config.seed;
    let root = tempfile::Builder::new()
        .prefix("blx-sim-")
        .tempdir()
        .expect("a temporary directory for the agents' data dirs");
    let window_end = config.duration.saturating_sub(SETTLE);
    let plan = Plan::draw(seed, config.agents, (WARMUP, window_end));
    let shared = Arc::new(Shared {
        seed,
        root: root.path().to_path_buf(),
        faults: LinkFaults::new(derive(seed, 0x1055)),
        token: Arc::default(),
        registry: VmRegistry::default(),
        history: History::default(),
        clients_until: plan.healed_at() + Duration::from_secs(5),
        final_read_at: config.duration - Duration::from_secs(8),
        vms: config.vms,
    });

    let mut sim = turmoil::Builder::new()
        .rng_seed(derive(seed, 0x7e7))
        .epoch(UNIX_EPOCH + Duration::from_millis(EPOCH_MS))
        .simulation_duration(config.duration + Duration::from_secs(60))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(DEFAULT_MAX_LATENCY)
        .udp_capacity(4096)
        .build();

    let mut hosts = Vec::new();
    for i in 0..config.agents {
        let slot = HostSlot {
            index: i,
            disk: SimDisk::default(),
            api: Arc::default(),
            view: Arc::default(),
            skew_ms: Arc::new(AtomicI64::new(plan.initial_skew_ms[i])),
            boots: Rc::default(),
            down: 0,
        };
        let shared = shared.clone();
        let (disk, api, view, skew, boots) = (
            slot.disk.clone(),
            slot.api.clone(),
            slot.view.clone(),
            slot.skew_ms.clone(),
            slot.boots.clone(),
        );
        sim.host(host_ip(i), move || {
            let boot = {
                let mut b = boots.borrow_mut();
                *b += 1;
                *b
            };
            host_software(
                i,
                boot,
                shared.clone(),
                disk.clone(),
                api.clone(),
                view.clone(),
                skew.clone(),
            )
        });
        hosts.push(slot);
    }

    let mut trace = Trace::new(config.keep_events);
    for f in &plan.faults {
        trace.event(format!(
            "plan {:.3}s..{:.3}s {:?}",
            f.at.as_secs_f64(),
            f.until.as_secs_f64(),
            f.fault
        ));
    }
    let mut started: Vec<bool> = vec![false; plan.faults.len()];
    let mut healed: Vec<bool> = vec![false; plan.faults.len()];
    let mut leaders = leader_per_term::LeaderPerTerm::default();
    let mut agree = state_machines_agree::StateMachinesAgree::default();
    let mut copies = single_vm_copy::SingleVmCopy::default();
    let mut next_sample = SAMPLE_EVERY;
    let mut violation: Option<Violation> = None;
    let mut last_sample: Option<Sample> = None;
    // Convergence is a liveness property: it must be seen at some sample of the last
    // CONVERGE_WITHIN of the run (a suspicion that comes and goes in a healthy cluster is
    // not a failure to converge); the last failure is reported if it never is.
    let converge_from = config.duration.saturating_sub(CONVERGE_WITHIN);
    let mut converged = false;
    let mut not_converged: Option<Violation> = None;

    while violation.is_none() {
        let now = sim.elapsed();
        if now >= config.duration {
            break;
        }
        for (k, f) in plan.faults.iter().enumerate() {
            if !started[k] && now >= f.at {
                started[k] = true;
                trace.event(format!("{:.3}s fault {:?}", now.as_secs_f64(), f.fault));
                apply(&mut sim, &mut hosts, &shared, f, true);
            }
            if started[k] && !healed[k] && now >= f.until {
                healed[k] = true;
                trace.event(format!("{:.3}s heal {:?}", now.as_secs_f64(), f.fault));
                apply(&mut sim, &mut hosts, &shared, f, false);
            }
        }
        if let Err(e) = sim.step() {
            violation = Some(Violation {
                invariant: "agent_runs",
                at: now,
                detail: format!("a host's software failed: {e}"),
            });
            break;
        }
        if sim.elapsed() >= next_sample {
            next_sample += SAMPLE_EVERY;
            let at = sim.elapsed();
            let sample = take_sample(&mut sim, &hosts, &shared, at);
            trace.sample(&sample);
            let grace = grace_of(&sample);
            violation = leaders
                .observe(&sample)
                .or_else(|| agree.observe(&sample))
                .or_else(|| copies.observe(&sample, grace))
                .or_else(|| capacity::check(&sample));
            if at >= converge_from && !converged {
                match convergence::check(&sample) {
                    None => converged = true,
                    Some(v) => not_converged = Some(v),
                }
            }
            last_sample = Some(sample);
        }
    }

    let history = shared.history.operations();
    if violation.is_none()
        && let Some(sample) = &last_sample
    {
        violation = (!converged)
            .then(|| not_converged.clone())
            .flatten()
            .or_else(|| linearizable::check(&history, sample.at))
            .or_else(|| {
                let last = sample
                    .hosts
                    .iter()
                    .filter_map(|h| h.applied.as_ref())
                    .max_by_key(|(i, _)| *i)
                    .map(|(_, s)| s.clone())
                    .unwrap_or_default();
                acknowledged_writes::check(&history, &last, sample.at)
            });
    }
    trace.history(&history);
    if let Some(v) = &violation {
        trace.event(format!("violation {v}"));
    }
    // The hosts' runtimes go before the data dirs they write to.
    drop(sim);
    Outcome {
        seed,
        trace_hash: trace.hash(),
        violation,
        events: trace.into_events(),
        operations: history.len(),
        dropped: shared.faults.dropped(),
    }
}

/// The cluster's VM grace period, as the applied state says.
fn grace_of(sample: &Sample) -> Duration {
    sample
        .hosts
        .iter()
        .filter_map(|h| h.applied.as_ref())
        .max_by_key(|(i, _)| *i)
        .map(|(_, s)| Duration::from_secs(s.config.1.vm_grace_secs))
        .unwrap_or_default()
}

fn take_sample(
    sim: &mut turmoil::Sim<'_>,
    hosts: &[HostSlot],
    shared: &Shared,
    at: Duration,
) -> Sample {
    let hosts = hosts
        .iter()
        .map(|slot| {
            let running = sim.is_host_running(host_ip(slot.index));
            let view = if running {
                lock(&slot.view).clone()
            } else {
                None
            };
            let applied = view.as_ref().and_then(|_| {
                // What the node reads: Raft's state, or a client's followed copy.
                Some(slot.disk.machine()?.cell().indexed_state())
            });
            HostSample {
                index: slot.index,
                id: view.as_ref().map(AgentView::id),
                running: view.is_some(),
                raft: view.as_ref().map(AgentView::raft_status),
                members: view
                    .as_ref()
                    .map(|v| v.members().iter().map(|(id, m)| (*id, m.state)).collect())
                    .unwrap_or_default(),
                applied,
            }
        })
        .collect();
    Sample {
        at,
        hosts,
        vms: shared.registry.snapshot(),
    }
}

fn others(hosts: usize, side: &[usize]) -> Vec<usize> {
    (0..hosts).filter(|h| !side.contains(h)).collect()
}

fn apply(
    sim: &mut turmoil::Sim<'_>,
    hosts: &mut [HostSlot],
    shared: &Shared,
    f: &Scheduled,
    begin: bool,
) {
    let n = hosts.len();
    match &f.fault {
        Fault::Crash { host } => {
            let slot = &mut hosts[*host];
            if begin {
                slot.down += 1;
                if slot.down == 1 {
                    // Drop the harness's handles first, so the host's sockets are released
                    // while turmoil knows which host they belong to (inside `crash`).
                    *lock(&slot.view) = None;
                    *lock(&slot.api) = None;
                    sim.crash(host_ip(*host));
                }
            } else {
                slot.down = slot.down.saturating_sub(1);
                if slot.down == 0 {
                    sim.bounce(host_ip(*host));
                }
            }
        }
        Fault::Partition { side } => {
            for a in side {
                for b in others(n, side) {
                    if begin {
                        sim.partition(host_ip(*a), host_ip(b));
                    } else {
                        sim.repair(host_ip(*a), host_ip(b));
                    }
                }
            }
        }
        Fault::OneWay { from, to } => {
            if begin {
                sim.partition_oneway(host_ip(*from), host_ip(*to));
            } else {
                sim.repair_oneway(host_ip(*from), host_ip(*to));
            }
        }
        Fault::Loss { host, percent } => {
            let p = if begin {
                f64::from(*percent) / 100.0
            } else {
                0.0
            };
            for other in others(n, &[*host]) {
                shared.faults.set_loss(host_ip(*host), host_ip(other), p);
                shared.faults.set_loss(host_ip(other), host_ip(*host), p);
            }
        }
        Fault::Latency { host, max_ms } => {
            let max = if begin {
                Duration::from_millis(*max_ms)
            } else {
                DEFAULT_MAX_LATENCY
            };
            for other in others(n, &[*host]) {
                sim.set_link_max_message_latency(host_ip(*host), host_ip(other), max);
            }
        }
        Fault::ClockSkew { host, skew_ms } => {
            let slot = &hosts[*host];
            let base = slot.skew_ms.load(Ordering::Relaxed);
            let next = if begin {
                base + skew_ms
            } else {
                base - skew_ms
            };
            slot.skew_ms.store(next, Ordering::Relaxed);
        }
    }
}

/// What runs on host `index` at its `boot`-th start: its client, and its agent.
#[allow(clippy::too_many_arguments)]
fn host_software(
    index: usize,
    boot: u64,
    shared: Arc<Shared>,
    disk: SimDisk,
    api: Arc<Mutex<Option<axum::Router>>>,
    view: Arc<Mutex<Option<AgentView>>>,
    skew: Arc<AtomicI64>,
) -> impl std::future::Future<Output = turmoil::Result> + 'static {
    async move {
        let ip = host_ip(index);
        let part = derive(shared.seed, (index as u64 + 1) * 1000 + boot);
        tokio::spawn(kv_workload(
            index as u64 * 1000 + boot,
            derive(part, 1),
            api.clone(),
            shared.history.clone(),
            shared.clients_until,
            shared.final_read_at,
        ));
        if index == 0 && boot == 1 {
            tokio::spawn(create_vms(api.clone(), shared.vms));
        }
        let mut config = AgentConfig::new(shared.root.join(host_name(index)));
        config.bind = SocketAddr::new(ip, GOSSIP_PORT);
        config.api = SocketAddr::from(([127, 0, 0, 1], 7947));
        config.name = Some(host_name(index));
        config.mdns = false;
        config.raft_snapshot_logs = 500;
        if index > 0 {
            let token = loop {
                if let Some(t) = lock(&shared.token).clone() {
                    break t;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            config.token = Some(token);
            config.seeds = vec![SocketAddr::new(host_ip(0), GOSSIP_PORT)];
        }
        let registry = shared.registry.clone();
        let world = World {
            net: Arc::new(SimNet {
                faults: shared.faults.clone(),
                api: api.clone(),
                data_dir: config.data_dir.clone(),
            }),
            raft: Arc::new(disk),
            drivers: Arc::new(move |_ctx| {
                vec![Box::new(SimDriver::new(ip, registry.clone())) as Box<dyn blx_vmm::Driver>]
            }),
            clock: Arc::new(SimClock {
                epoch_ms: EPOCH_MS,
                skew_ms: skew,
            }),
            entropy: blx::world::Entropy::from_seed(seed_bytes(derive(part, 2))),
            host: host_facts(&host_name(index), ip),
            stop: Box::pin(std::future::pending()),
            operator: Arc::new(SimOperator {
                token: shared.token.clone(),
            }),
        };
        let agent = blx::start(config, world)
            .await
            .map_err(|e| -> Box<dyn std::error::Error> { format!("{e:#}").into() })?;
        *lock(&view) = Some(agent.view());
        agent
            .wait()
            .await
            .map_err(|e| -> Box<dyn std::error::Error> { format!("{e:#}").into() })?;
        Ok(())
    }
}
