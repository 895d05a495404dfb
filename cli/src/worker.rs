//! The node's VMM worker wiring. The replicated state says which VMs are placed here; a
//! blocking thread runs `blx_vmm::Worker` against that, and what it observes goes back to the
//! leader as `VmReports`.
//!
//! ```text
//!  applied state ──desired()──▶ [thread: Worker::tick every 20 ms] ──changed reports──▶ reporter ──▶ leader
//! ```
//!
//! After a restart the thread adopts what the previous agent left running, but acts only once
//! this node has applied everything the leader had committed when it asked (a read index), so
//! a node that was cut off never restarts, or keeps, VMs that were placed elsewhere meanwhile
//! on the strength of a stale copy of the state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use blx_consensus::state::Command;
use blx_consensus::workload::{BootSource, VmPhase, VmRecord, VmReport, WorkloadCommand};
use blx_vmm::process::ProcessDriver;
use blx_vmm::qemu::{Accel, QemuConfig, QemuDriver};
use blx_vmm::{BootSpec, Desired, DesiredState, Driver, Observed, Phase};
use tokio::sync::mpsc;

use crate::raft::Cluster;

/// How often the worker polls its workloads (readiness lines, exits).
const TICK: Duration = Duration::from_millis(20);

/// Where this node's VMs and images live, and how QEMU runs.
#[derive(Clone, Debug)]
pub(crate) struct WorkerConfig {
    /// Run directories, one per VM.
    pub(crate) run_root: PathBuf,
    /// Named guest images.
    pub(crate) images: PathBuf,
    /// QEMU acceleration.
    pub(crate) accel: Accel,
}

/// Starts the worker thread and its reporter. They run until the agent exits; VMs keep
/// running when the agent stops, and the next agent adopts them.
pub(crate) fn spawn(cluster: Cluster, self_id: String, config: WorkerConfig) {
    let (desired_tx, desired_rx) = std_mpsc::channel::<Option<BTreeMap<String, Wanted>>>();
    let (report_tx, report_rx) = mpsc::unbounded_channel::<VmReport>();
    let thread_config = config.clone();
    std::thread::Builder::new()
        .name("vmm-worker".into())
        .spawn(move || worker_thread(thread_config, desired_rx, report_tx))
        .ok();
    tokio::spawn(feed_desired(
        cluster.clone(),
        self_id.clone(),
        config,
        desired_tx,
    ));
    tokio::spawn(report(cluster, self_id, report_rx));
}

/// Sends the desired set to the thread whenever this node's VMs change, starting once this
/// node has caught up with the leader. While this node cannot see a majority of the voters
/// (its gossip view counts them down or suspect for [`FENCE_AFTER`]), it is cut off and the
/// others will place its VMs elsewhere: it stops them all (self-fencing), and after the cut
/// heals it catches up again before it runs anything.
async fn feed_desired(
    cluster: Cluster,
    self_id: String,
    config: WorkerConfig,
    tx: std_mpsc::Sender<Option<BTreeMap<String, Wanted>>>,
) {
    loop {
        catch_up(&cluster).await;
        tracing::info!("VMM worker caught up with the leader; reconciling");
        let mut applied = cluster.node.subscribe_workload();
        let mut check = tokio::time::interval(Duration::from_millis(250));
        let mut cut_off_since: Option<tokio::time::Instant> = None;
        let mut last: Option<BTreeMap<String, Wanted>> = None;
        loop {
            let desired = cluster.node.with_local_state(|s| {
                s.vms_on(&self_id)
                    .map(|vm| (vm.spec.name.clone(), resolve(vm, &config)))
                    .collect::<BTreeMap<_, _>>()
            });
            if last.as_ref() != Some(&desired) {
                if tx.send(Some(desired.clone())).is_err() {
                    return;
                }
                last = Some(desired);
            }
            tokio::select! {
                r = applied.changed() => if r.is_err() { return },
                _ = check.tick() => {}
            }
            if cluster.sees_majority() {
                cut_off_since = None;
            } else if cut_off_since
                .get_or_insert_with(tokio::time::Instant::now)
                .elapsed()
                >= FENCE_AFTER
            {
                break;
            }
        }
        tracing::warn!("cut off from a majority of the voters: stopping every VM on this node");
        if tx.send(Some(BTreeMap::new())).is_err() {
            return;
        }
        while !cluster.sees_majority() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tracing::info!("a majority of the voters is reachable again");
    }
}

/// How long a node may see no majority of the voters before it stops its VMs. Gossip marks a
/// silent member suspect within about a second and down 1.5 s later, and the leader replaces
/// a node's VMs once it is down: fencing on a sustained suspicion stops the old copy before
/// the new one starts, in the common case.
const FENCE_AFTER: Duration = Duration::from_millis(1500);

/// Waits for the leader's read index, then for this node to have applied that far.
async fn catch_up(cluster: &Cluster) {
    loop {
        match cluster.read_index().await {
            Ok(index) => {
                let mut applied = cluster.node.subscribe();
                let _ = applied.wait_for(|a| *a >= index).await;
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "worker waiting for the leader");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A VM placed here: runnable, or not resolvable on this node (reported failed, not started).
#[derive(Clone, Debug, PartialEq)]
enum Wanted {
    Run(Desired),
    Broken { incarnation: u64, reason: String },
}

/// Turns a VM record into what the driver runs, resolving the image on this node.
fn resolve(vm: &VmRecord, config: &WorkerConfig) -> Wanted {
    let spec = &vm.spec;
    let mut boot = BootSpec {
        driver: spec.driver,
        vcpus: spec.resources.vcpus,
        memory_mib: spec.resources.memory_mib,
        kernel: None,
        initrd: None,
        disk: None,
        cmdline: spec.cmdline.clone(),
        command: Vec::new(),
        ready_marker: spec.ready_marker.clone(),
        boot_timeout_ms: u64::from(spec.boot_timeout_secs) * 1000,
    };
    match &spec.source {
        BootSource::Image { name } => match blx_vmm::image::load(&config.images, name) {
            Ok(image) => {
                boot.kernel = Some(image.kernel);
                boot.initrd = Some(image.initrd);
                if boot.ready_marker.is_none() {
                    boot.ready_marker = image.ready_marker;
                }
            }
            Err(e) => {
                return Wanted::Broken {
                    incarnation: vm.incarnation,
                    reason: e.to_string(),
                };
            }
        },
        BootSource::Kernel { kernel, initrd } => {
            boot.kernel = Some(PathBuf::from(kernel));
            boot.initrd = initrd.as_ref().map(PathBuf::from);
        }
        BootSource::Command { argv } => boot.command = argv.clone(),
    }
    Wanted::Run(Desired {
        name: spec.name.clone(),
        incarnation: vm.incarnation,
        spec: boot,
        state: vm.desired,
        restart: spec.restart,
    })
}

fn worker_thread(
    config: WorkerConfig,
    desired_rx: std_mpsc::Receiver<Option<BTreeMap<String, Wanted>>>,
    report_tx: mpsc::UnboundedSender<VmReport>,
) {
    if let Err(e) = std::fs::create_dir_all(&config.run_root) {
        tracing::error!(error = %e, dir = %config.run_root.display(), "VMM worker cannot create its run directory");
        return;
    }
    let drivers: Vec<Box<dyn Driver>> = vec![
        Box::new(QemuDriver::new(QemuConfig {
            accel: config.accel,
            accel_cache: Some(config.run_root.join("accel")),
            ..QemuConfig::default()
        })),
        Box::new(ProcessDriver::default()),
    ];
    let mut worker = blx_vmm::Worker::new(config.run_root.clone(), drivers);
    for adopted in worker.adopt_all() {
        tracing::info!(vm = %adopted.name, incarnation = adopted.incarnation, "adopted a VM left running by the previous agent");
    }
    let epoch = Instant::now();
    let now_ms = || u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut desired: Option<BTreeMap<String, Wanted>> = None;
    let mut runnable: BTreeMap<String, Desired> = BTreeMap::new();
    let mut reported: BTreeMap<String, VmReport> = BTreeMap::new();
    loop {
        match desired_rx.recv_timeout(TICK) {
            Ok(d) => {
                desired = d;
                // Take the newest if several queued up.
                while let Ok(d) = desired_rx.try_recv() {
                    desired = d;
                }
                runnable = desired
                    .iter()
                    .flatten()
                    .filter_map(|(name, w)| match w {
                        Wanted::Run(d) => Some((name.clone(), d.clone())),
                        Wanted::Broken { .. } => None,
                    })
                    .collect();
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
        // Until caught up, only watch.
        let Some(want) = &desired else { continue };
        let observed = worker.tick(&runnable, now_ms());
        for (name, w) in want {
            let report = match w {
                Wanted::Run(d) => to_report(d, observed.get(name)),
                Wanted::Broken {
                    incarnation,
                    reason,
                } => VmReport {
                    name: name.clone(),
                    incarnation: *incarnation,
                    phase: VmPhase::Failed,
                    reason: Some(reason.clone()),
                    boot_ms: None,
                    restarts: 0,
                },
            };
            if reported.get(name) != Some(&report) {
                if report_tx.send(report.clone()).is_err() {
                    return;
                }
                reported.insert(name.clone(), report);
            }
        }
        reported.retain(|name, _| want.contains_key(name));
    }
}

/// What to tell the leader about one desired VM.
fn to_report(d: &Desired, observed: Option<&Observed>) -> VmReport {
    let current = observed.filter(|o| o.incarnation == d.incarnation);
    let (phase, reason) = match current.map(|o| &o.phase) {
        None if d.state == DesiredState::Stopped => (VmPhase::Stopped, None),
        None => (VmPhase::Scheduled, None),
        Some(Phase::Starting) => (VmPhase::Starting, None),
        Some(Phase::Running) => (VmPhase::Running, None),
        Some(Phase::Paused) => (VmPhase::Paused, None),
        Some(Phase::Exited { reason, .. }) if d.state == DesiredState::Stopped => {
            (VmPhase::Stopped, Some(reason.clone()))
        }
        Some(Phase::Exited { reason, .. }) => (VmPhase::Exited, Some(reason.clone())),
        Some(Phase::Failed { reason }) => (VmPhase::Failed, Some(reason.clone())),
    };
    VmReport {
        name: d.name.clone(),
        incarnation: d.incarnation,
        phase,
        reason,
        boot_ms: current.and_then(|o| o.boot_ms),
        restarts: current.map(|o| o.restarts).unwrap_or(0),
    }
}

/// Sends reports to the leader in batches, newest per VM, retrying until one gets through.
async fn report(cluster: Cluster, self_id: String, mut rx: mpsc::UnboundedReceiver<VmReport>) {
    let mut pending: BTreeMap<String, VmReport> = BTreeMap::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(r) => {
                    pending.insert(r.name.clone(), r);
                }
                None => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            pending.insert(r.name.clone(), r);
        }
        let cmd = Command::Workload(WorkloadCommand::VmReports {
            node: self_id.clone(),
            reports: pending.values().cloned().collect(),
            now_ms: crate::control::now_ms(),
        });
        match cluster.write(cmd).await {
            Ok(_) => pending.clear(),
            Err(e) => {
                tracing::debug!(error = %e, "VM report not delivered; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
