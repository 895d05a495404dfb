//! The node's VMM worker wiring. The replicated state says which VMs are placed here;
//! `blx_vmm::Worker` runs against that, and what it observes goes back to the leader as
//! `VmReports`. With drivers whose calls can block (QEMU, processes) the worker runs on a
//! thread of its own; with drivers that never block it runs as a task.
//!
//! ```text
//!  applied state ──desired()──▶ [Worker::tick on change, every 5 or 20 ms] ──changed reports──▶ reporter ──▶ leader
//! ```
//!
//! After a restart the thread adopts what the previous agent left running, but acts only once
//! this node has applied everything the leader had committed when it asked (a read index), so
//! a node that was cut off never restarts, or keeps, VMs that were placed elsewhere meanwhile
//! on the strength of a stale copy of the state. If it cannot reach the leader within the
//! fence time, it stops what it adopted: those VMs may be running elsewhere by now.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use blx_consensus::state::Command;
use blx_consensus::workload::{BootSource, VmPhase, VmRecord, VmReport, WorkloadCommand};
use blx_vmm::{BootSpec, Desired, DesiredState, Driver, Observed, Phase};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::raft::Cluster;

/// How often the worker polls its workloads (exits, restarts) when none is starting. A change
/// of the desired set wakes it at once.
const TICK: Duration = Duration::from_millis(20);

/// How often it polls while a workload is starting, so its readiness line is seen soon after
/// it is written. The poll reads only what was added to the console log since the last one.
const STARTING_TICK: Duration = Duration::from_millis(5);

/// Where this node's VMs and images live.
#[derive(Clone, Debug)]
pub(crate) struct WorkerConfig {
    /// Run directories, one per VM.
    pub(crate) run_root: PathBuf,
    /// Named guest images.
    pub(crate) images: PathBuf,
}

/// The desired set as the feeder hands it over: None until this node has caught up.
type DesiredSet = Option<BTreeMap<String, Wanted>>;

/// Starts the worker and its reporter. They run until the agent exits; VMs keep running when
/// the agent stops, and the next agent adopts them.
pub(crate) fn spawn(
    cluster: Cluster,
    self_id: String,
    config: WorkerConfig,
    drivers: Vec<Box<dyn Driver>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (desired_tx, desired_rx) = watch::channel::<DesiredSet>(None);
    let (report_tx, report_rx) = mpsc::unbounded_channel::<VmReport>();
    let blocks = drivers.iter().any(|d| d.blocks());
    let mut tasks = Vec::new();
    let boots = cluster.metrics.boot.clone();
    if let Some(reconciler) = Reconciler::new(&config, drivers, report_tx, boots) {
        if blocks {
            // The same loop, polled on a thread of its own so that a blocking driver call
            // holds up only that thread; the runtime only times its waits.
            let runtime = tokio::runtime::Handle::current();
            std::thread::Builder::new()
                .name("vmm-worker".into())
                .spawn(move || runtime.block_on(reconciler.run(desired_rx)))
                .ok();
        } else {
            tasks.push(tokio::spawn(reconciler.run(desired_rx)));
        }
    }
    tasks.push(tokio::spawn(feed_desired(
        cluster.clone(),
        self_id.clone(),
        config,
        desired_tx,
    )));
    tasks.push(tokio::spawn(report(cluster, self_id, report_rx)));
    tasks
}

/// Sends the desired set to the worker whenever this node's VMs change, starting once this
/// node has caught up with the leader (and stopping what it adopted if that takes longer than
/// [`FENCE_AFTER`]). The node holds a lease on its VMs: a read index from
/// the leader, renewed every [`LEASE_RENEW`]. When the lease is older than [`FENCE_AFTER`], or
/// its gossip view has shown no majority of the voters for that long, it is cut off and the
/// others will place its VMs elsewhere: it stops them all (self-fencing), and once it can
/// reach the leader again it catches up before it runs anything.
///
/// The gossip check alone is not enough: in a partition that is not transitive (A hears B, B
/// hears C, A does not hear C) a node can see a majority in gossip while the leader cannot
/// reach it and has placed its VMs elsewhere (the simulator found this).
async fn feed_desired(
    cluster: Cluster,
    self_id: String,
    config: WorkerConfig,
    tx: watch::Sender<DesiredSet>,
) {
    loop {
        // The lease holds from the agent's first moment: what it adopted from the previous
        // agent may have been placed elsewhere while it was away, so a node that cannot hear
        // the leader within the fence time stops everything until it can.
        let asked = match tokio::time::timeout(FENCE_AFTER, catch_up(&cluster)).await {
            Ok(asked) => asked,
            Err(_) => {
                tracing::warn!(
                    "no word from the leader within the fence time: stopping every VM on this node until there is"
                );
                if tx.send(Some(BTreeMap::new())).is_err() {
                    return;
                }
                catch_up(&cluster).await
            }
        };
        tracing::info!("VMM worker caught up with the leader; reconciling");
        let mut applied = cluster.node.subscribe_workload();
        let mut check = tokio::time::interval(Duration::from_millis(250));
        let mut cut_off_since: Option<tokio::time::Instant> = None;
        let (lease_tx, lease) = watch::channel(Lease {
            asked,
            confirmed: true,
        });
        let renewing = tokio::spawn(renew_lease(
            cluster.clone(),
            self_id.clone(),
            lease_tx.clone(),
        ));
        let mut last: Option<BTreeMap<String, Wanted>> = None;
        loop {
            let desired = cluster.node.with_local_state(|s| {
                s.vms_on(&self_id)
                    .map(|vm| (vm.spec.name.clone(), resolve(vm, &config)))
                    .collect::<BTreeMap<_, _>>()
            });
            // A lease this node gave itself while it held nothing guards nothing: the leader
            // has no word from it to time a failover by. Before it runs a VM, the leader
            // confirms it (and so records this node's word).
            if !desired.is_empty() && !lease.borrow().confirmed {
                match confirmed_lease(&cluster).await {
                    Some(confirmed) => {
                        lease_tx.send_replace(confirmed);
                    }
                    None => {
                        tracing::warn!(
                            "the leader did not confirm this node's lease: running nothing"
                        );
                        break;
                    }
                }
            }
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
            if lease.borrow().asked.elapsed() >= FENCE_AFTER {
                tracing::warn!("no word from the leader: stopping every VM on this node");
                break;
            }
            if cluster.sees_majority() {
                cut_off_since = None;
            } else if cut_off_since
                .get_or_insert_with(tokio::time::Instant::now)
                .elapsed()
                >= FENCE_AFTER
            {
                tracing::warn!(
                    "cut off from a majority of the voters: stopping every VM on this node"
                );
                break;
            }
        }
        renewing.abort();
        if tx.send(Some(BTreeMap::new())).is_err() {
            return;
        }
        while !cluster.sees_majority() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tracing::info!("a majority of the voters is reachable again");
    }
}

/// How often a node renews the lease on its VMs.
const LEASE_RENEW: Duration = Duration::from_millis(500);

/// A node's lease on its VMs.
#[derive(Clone, Copy, Debug)]
struct Lease {
    /// When the request behind it was sent.
    asked: tokio::time::Instant,
    /// Whether the leader confirmed it. A node that holds no VMs renews its lease itself,
    /// asking nothing: it has nothing to fence.
    confirmed: bool,
}

/// Renews the lease: asks the leader for a read index (which the leader confirms with a
/// quorum), and on success records when the request was sent. A node with no VMs placed on
/// it has nothing to fence and asks nothing, so idle nodes add no traffic.
async fn renew_lease(cluster: Cluster, self_id: String, lease: watch::Sender<Lease>) {
    loop {
        let asked = tokio::time::Instant::now();
        let holds_vms = cluster
            .node
            .with_local_state(|s| s.vms_on(&self_id).next().is_some());
        if !holds_vms {
            lease.send_replace(Lease {
                asked,
                confirmed: false,
            });
        } else if let Some(confirmed) = confirmed_lease(&cluster).await {
            lease.send_replace(confirmed);
        }
        tokio::time::sleep_until(asked + LEASE_RENEW).await;
    }
}

/// Asks the leader for a read index (confirmed with a quorum) within the fence time: the
/// lease it gives, dated from the asking, or None.
async fn confirmed_lease(cluster: &Cluster) -> Option<Lease> {
    let asked = tokio::time::Instant::now();
    match tokio::time::timeout(FENCE_AFTER, cluster.read_index()).await {
        Ok(Ok(_)) => Some(Lease {
            asked,
            confirmed: true,
        }),
        _ => None,
    }
}

/// How long a node may see no majority of the voters, or go without renewing its lease,
/// before it stops its VMs. Gossip marks a silent member suspect within about a second and
/// down 1.2 s later; the leader replaces a node's VMs once it is down, or once it is suspect
/// and has been silent for longer than this and a margin
/// ([`crate::raft::RaftContact::LAPSED`]). By then the old copy is being stopped; a graceful
/// stop may take its driver's grace (1 s for a process, 1.5 s for QEMU) beyond that.
pub(crate) const FENCE_AFTER: Duration = Duration::from_millis(1500);

/// Waits for the leader's read index, then for this node to have applied that far; answers
/// when the read index that succeeded was asked for (the lease it gives runs from then).
async fn catch_up(cluster: &Cluster) -> tokio::time::Instant {
    loop {
        let asked = tokio::time::Instant::now();
        match cluster.read_index().await {
            Ok(index) => {
                let mut applied = cluster.node.subscribe();
                let _ = applied.wait_for(|a| *a >= index).await;
                return asked;
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
    /// What to run, and the trace context of the request that created it.
    Run(Desired, Option<String>),
    Broken {
        incarnation: u64,
        reason: String,
    },
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
    Wanted::Run(
        Desired {
            name: spec.name.clone(),
            incarnation: vm.incarnation,
            spec: boot,
            state: vm.desired,
            restart: spec.restart,
        },
        vm.trace.clone(),
    )
}

/// The worker and what it last saw and said.
struct Reconciler {
    worker: blx_vmm::Worker,
    desired: DesiredSet,
    runnable: BTreeMap<String, Desired>,
    reported: BTreeMap<String, VmReport>,
    reports: mpsc::UnboundedSender<VmReport>,
    /// Boot durations, observed once per boot as reports change.
    boots: Histogram,
    epoch: Instant,
}

impl Reconciler {
    fn new(
        config: &WorkerConfig,
        drivers: Vec<Box<dyn Driver>>,
        reports: mpsc::UnboundedSender<VmReport>,
        boots: Histogram,
    ) -> Option<Self> {
        if let Err(e) = std::fs::create_dir_all(&config.run_root) {
            tracing::error!(error = %e, dir = %config.run_root.display(), "VMM worker cannot create its run directory");
            return None;
        }
        let mut worker = blx_vmm::Worker::new(config.run_root.clone(), drivers);
        for adopted in worker.adopt_all() {
            tracing::info!(vm = %adopted.name, incarnation = adopted.incarnation, "adopted a VM left running by the previous agent");
        }
        Some(Reconciler {
            worker,
            desired: None,
            runnable: BTreeMap::new(),
            reported: BTreeMap::new(),
            reports,
            boots,
            epoch: Instant::now(),
        })
    }

    /// Steps whenever the desired set changes, and at the latest every [`Self::pace`], until
    /// the agent is gone.
    async fn run(mut self, mut desired: watch::Receiver<DesiredSet>) {
        loop {
            let wake = next_wake(&mut desired, self.pace()).await;
            if !self.step(&desired, wake) {
                return;
            }
        }
    }

    /// How long to wait for a change before polling the workloads again.
    fn pace(&self) -> Duration {
        let starting = self.reported.values().any(|r| r.phase == VmPhase::Starting);
        if starting { STARTING_TICK } else { TICK }
    }

    /// Takes the newest desired set if it changed, ticks the worker, and sends what changed.
    /// False once the agent is gone.
    fn step(&mut self, desired: &watch::Receiver<DesiredSet>, wake: Wake) -> bool {
        match wake {
            Wake::Changed => {
                self.desired = desired.borrow().clone();
                self.runnable = self
                    .desired
                    .iter()
                    .flatten()
                    .filter_map(|(name, w)| match w {
                        Wanted::Run(d, _) => Some((name.clone(), d.clone())),
                        Wanted::Broken { .. } => None,
                    })
                    .collect();
            }
            Wake::Poll => {}
            Wake::Gone => return false,
        }
        // Until caught up, only watch.
        let Some(want) = &self.desired else {
            return true;
        };
        let now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let observed = self.worker.tick(&self.runnable, now_ms);
        for (name, w) in want {
            let report = match w {
                Wanted::Run(d, _) => to_report(d, observed.get(name)),
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
            let before = self.reported.get(name);
            if before != Some(&report) {
                if before.map(|r| (r.incarnation, r.phase))
                    != Some((report.incarnation, report.phase))
                {
                    lifecycle_step(w, &report);
                }
                if let Some(ms) = newly_booted(before, &report) {
                    self.boots.observe(ms as f64 / 1000.0);
                }
                if self.reports.send(report.clone()).is_err() {
                    return false;
                }
                self.reported.insert(name.clone(), report);
            }
        }
        self.reported.retain(|name, _| want.contains_key(name));
        true
    }
}

/// Why the worker steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// The desired set changed (and is marked seen).
    Changed,
    /// Time to poll the workloads.
    Poll,
    /// The agent is gone.
    Gone,
}

/// Waits for the desired set to change, or `pace` at most.
async fn next_wake(desired: &mut watch::Receiver<DesiredSet>, pace: Duration) -> Wake {
    match tokio::time::timeout(pace, desired.changed()).await {
        Ok(Ok(())) => Wake::Changed,
        Ok(Err(_)) => Wake::Gone,
        Err(_) => Wake::Poll,
    }
}

/// The boot time a report shows for the first time: a boot (incarnation and restart count)
/// that the report before it had not timed. Kept beside `reported`, which forgets VMs that
/// leave this node, so nothing here grows with the VMs a node has ever run.
fn newly_booted(before: Option<&VmReport>, now: &VmReport) -> Option<u64> {
    let ms = now.boot_ms?;
    let timed_before = before
        .filter(|b| b.boot_ms.is_some())
        .map(|b| (b.incarnation, b.restarts));
    (timed_before != Some((now.incarnation, now.restarts))).then_some(ms)
}

/// A span for one step of a VM's life on this node (placed, starting, running, stopped,
/// failed), in the trace of the request that created the VM.
fn lifecycle_step(wanted: &Wanted, report: &VmReport) {
    let span = tracing::info_span!(
        "vm.lifecycle",
        otel.name = format!("vm {}", report.phase),
        vm = %report.name,
        incarnation = report.incarnation,
        phase = %report.phase,
        boot_ms = report.boot_ms,
    );
    if let Wanted::Run(_, trace) = wanted {
        crate::telemetry::set_parent(&span, trace.as_deref());
    }
    span.in_scope(|| {
        tracing::info!(vm = %report.name, phase = %report.phase, reason = report.reason.as_deref().unwrap_or(""), "VM step");
    });
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
            now_ms: cluster.clock.now_ms(),
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use blx_vmm::{DriverError, DriverKind};

    use super::*;

    /// A driver whose workloads print their readiness line `READY_AFTER` after they start.
    #[derive(Default)]
    struct ReadyAfter {
        started: BTreeMap<String, (u64, u64)>,
    }

    const READY_AFTER: u64 = 3;

    impl Driver for ReadyAfter {
        fn kind(&self) -> DriverKind {
            DriverKind::Process
        }
        fn blocks(&self) -> bool {
            false
        }
        fn validate(&self, _spec: &BootSpec) -> Result<(), DriverError> {
            Ok(())
        }
        fn start(&mut self, vm: &Desired, _dir: &Path, now_ms: u64) -> Result<(), DriverError> {
            self.started
                .insert(vm.name.clone(), (vm.incarnation, now_ms));
            Ok(())
        }
        fn stop(&mut self, name: &str) -> Result<(), DriverError> {
            self.started.remove(name);
            Ok(())
        }
        fn pause(&mut self, _name: &str) -> Result<(), DriverError> {
            Ok(())
        }
        fn resume(&mut self, _name: &str) -> Result<(), DriverError> {
            Ok(())
        }
        fn adopt(&mut self, _dir: &Path) -> Result<Option<Observed>, DriverError> {
            Ok(None)
        }
        fn poll(&mut self, now_ms: u64) -> BTreeMap<String, Observed> {
            let observed = |(name, &(incarnation, at)): (&String, &(u64, u64))| {
                let ready = now_ms >= at + READY_AFTER;
                let o = Observed {
                    name: name.clone(),
                    incarnation,
                    driver: DriverKind::Process,
                    phase: if ready {
                        Phase::Running
                    } else {
                        Phase::Starting
                    },
                    boot_ms: ready.then_some(now_ms - at),
                    started_at_ms: at,
                    restarts: 0,
                    pid: None,
                };
                (name.clone(), o)
            };
            self.started.iter().map(observed).collect()
        }
    }

    fn wanted(name: &str) -> Wanted {
        let spec = BootSpec {
            ready_marker: Some("READY".into()),
            ..BootSpec::process(vec!["true".into()])
        };
        let desired = Desired {
            name: name.into(),
            incarnation: 1,
            spec,
            state: DesiredState::Running,
            restart: blx_vmm::RestartPolicy::Always,
        };
        Wanted::Run(desired, None)
    }

    /// The worker starts a VM as soon as the desired set names it, and sees it ready within
    /// [`STARTING_TICK`] of its readiness line, not on its slower idle poll.
    #[tokio::test(start_paused = true)]
    async fn a_new_vm_starts_at_once_and_its_readiness_is_seen_on_the_fast_poll() {
        let dir = tempfile::tempdir().unwrap();
        let config = WorkerConfig {
            run_root: dir.path().join("run"),
            images: dir.path().join("images"),
        };
        let (desired_tx, desired_rx) = watch::channel::<DesiredSet>(None);
        let (report_tx, mut reports) = mpsc::unbounded_channel();
        let boots = Histogram::new([1.0].into_iter());
        let drivers: Vec<Box<dyn Driver>> = vec![Box::new(ReadyAfter::default())];
        let reconciler = Reconciler::new(&config, drivers, report_tx, boots).unwrap();
        let worker = tokio::spawn(reconciler.run(desired_rx));
        // Caught up, with nothing to run; then a VM is placed here, off the idle poll's beat.
        desired_tx.send_replace(Some(BTreeMap::new()));
        tokio::time::sleep(TICK + TICK / 2).await;
        let placed = Instant::now();
        desired_tx.send_replace(Some(BTreeMap::from([("web".to_string(), wanted("web"))])));

        let starting = reports.recv().await.unwrap();
        assert_eq!(starting.phase, VmPhase::Starting);
        assert_eq!(
            placed.elapsed(),
            Duration::ZERO,
            "started without waiting for a poll"
        );
        let running = reports.recv().await.unwrap();
        assert_eq!(running.phase, VmPhase::Running);
        let seen = placed.elapsed();
        assert!(
            seen >= Duration::from_millis(READY_AFTER) && seen < TICK,
            "readiness seen {seen:?} after the placement: not before the idle poll"
        );
        drop(desired_tx);
        worker.await.unwrap();
    }

    fn report(incarnation: u64, restarts: u32, boot_ms: Option<u64>) -> VmReport {
        VmReport {
            name: "web".into(),
            incarnation,
            phase: if boot_ms.is_some() {
                VmPhase::Running
            } else {
                VmPhase::Starting
            },
            reason: None,
            boot_ms,
            restarts,
        }
    }

    #[test]
    fn each_boot_is_timed_once() {
        let starting = report(1, 0, None);
        let running = report(1, 0, Some(900));
        assert_eq!(newly_booted(None, &starting), None);
        assert_eq!(newly_booted(Some(&starting), &running), Some(900));
        // The same boot reported again (paused, say) is not timed again.
        let paused = VmReport {
            phase: VmPhase::Paused,
            ..running.clone()
        };
        assert_eq!(newly_booted(Some(&running), &paused), None);
        // A restart and a new incarnation are new boots.
        assert_eq!(
            newly_booted(Some(&running), &report(1, 1, Some(700))),
            Some(700)
        );
        assert_eq!(
            newly_booted(Some(&running), &report(2, 0, Some(800))),
            Some(800)
        );
        // A node that adopts a running VM times it once, when it first reports it.
        assert_eq!(newly_booted(None, &running), Some(900));
    }
}
