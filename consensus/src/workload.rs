//! Nodes and VMs in the replicated state: what the cluster was asked to run, where the leader
//! placed it, and what the hosting node reports. Changed only by [`WorkloadCommand`]s, each
//! checked in full before anything is touched.
//!
//! [`plan_schedule`] is the leader's scheduling pass as a pure function of the state: it picks
//! the VMs that need a node (new, on a node down past the grace period, on a draining node),
//! runs [`blx_scheduler::schedule`] and returns the one command that records the outcome.

use std::collections::BTreeMap;

use blx_scheduler::{Allocation, Constraint, NodeView, Preference, Resources, VmRequest};
use blx_vmm::{DesiredState, DriverKind, RestartPolicy};
use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, CommandError};

/// Longest VM or group name.
pub const MAX_NAME_LEN: usize = 63;
/// Largest VM memory, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;
/// Smallest VM memory, in MiB: below this no Linux guest boots.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most vCPUs per VM.
pub const MAX_VCPUS: u32 = 64;
/// Highest priority.
pub const MAX_PRIORITY: u16 = 1000;
/// Longest W3C trace context kept with a VM (a `traceparent` is 55 characters).
pub const MAX_TRACE_CONTEXT: usize = 128;

/// Longest reason text kept in state.
pub const MAX_REASON_LEN: usize = 512;

/// How a VM boots, as the user asked for it. Paths and image names are resolved on the node
/// that runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootSource {
    /// A named guest image from the node's image folder.
    Image {
        /// Image name (`default`).
        name: String,
    },
    /// A kernel and optional initramfs by path on the node.
    Kernel {
        /// Kernel path.
        kernel: String,
        /// Initramfs path.
        initrd: Option<String>,
    },
    /// A command, for the process driver.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
    },
}

/// Everything the user says about a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Unique name: 1 to 63 of `a-z 0-9 - _ .`, starting with a letter or digit.
    pub name: String,
    /// What it needs.
    pub resources: Resources,
    /// The driver that runs it.
    pub driver: DriverKind,
    /// What it boots.
    pub source: BootSource,
    /// Extra kernel command line (qemu).
    pub cmdline: Option<String>,
    /// Readiness line; None takes the image's, or none.
    pub ready_marker: Option<String>,
    /// Seconds it may take to print the readiness line.
    pub boot_timeout_secs: u32,
    /// User labels, shown and filterable.
    pub labels: BTreeMap<String, String>,
    /// Hard placement constraints.
    pub constraints: Vec<Constraint>,
    /// Soft placement preferences.
    pub preferences: Vec<Preference>,
    /// 0 to 1000.
    pub priority: u16,
    /// Anti-affinity group: no two VMs of a group on one node.
    pub group: Option<String>,
    /// Spread the group across zones.
    pub spread_zones: bool,
    /// What happens when it exits.
    pub restart: RestartPolicy,
}

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// Whether `name` is a valid VM (or group or image) name: safe as a file name.
pub fn valid_vm_name(name: &str) -> bool {
    name_ok(name)
}

fn invalid(msg: impl Into<String>) -> CommandError {
    CommandError::InvalidVm(msg.into())
}

impl VmSpec {
    /// Checks the spec on its own.
    pub fn validate(&self) -> Result<(), CommandError> {
        if !name_ok(&self.name) {
            return Err(invalid(format!(
                "VM name {:?} must be 1 to {MAX_NAME_LEN} characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit",
                self.name
            )));
        }
        let r = &self.resources;
        if r.vcpus == 0 || r.vcpus > MAX_VCPUS {
            return Err(invalid(format!(
                "vcpus must be 1 to {MAX_VCPUS} (got {})",
                r.vcpus
            )));
        }
        if r.memory_mib < MIN_MEMORY_MIB || r.memory_mib > MAX_MEMORY_MIB {
            return Err(invalid(format!(
                "memory must be {MIN_MEMORY_MIB} MiB to 1 TiB (got {} MiB)",
                r.memory_mib
            )));
        }
        if r.disk_mib > 64 * MAX_MEMORY_MIB {
            return Err(invalid(format!(
                "disk of {} MiB is over 64 TiB",
                r.disk_mib
            )));
        }
        if self.priority > MAX_PRIORITY {
            return Err(invalid(format!(
                "priority must be 0 to {MAX_PRIORITY} (got {})",
                self.priority
            )));
        }
        if self.boot_timeout_secs == 0 || self.boot_timeout_secs > 3600 {
            return Err(invalid("boot timeout must be 1 to 3600 seconds"));
        }
        match (&self.driver, &self.source) {
            (DriverKind::Qemu, BootSource::Image { name }) => {
                if !name_ok(name) {
                    return Err(invalid(format!("image name {name:?} is not valid")));
                }
            }
            (DriverKind::Qemu, BootSource::Kernel { kernel, initrd }) => {
                for p in std::iter::once(kernel).chain(initrd) {
                    if p.is_empty() || p.len() > 4096 || !p.starts_with('/') {
                        return Err(invalid(format!(
                            "kernel and initrd must be absolute paths (got {p:?})"
                        )));
                    }
                }
            }
            (DriverKind::Process, BootSource::Command { argv }) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(invalid("the process driver needs a command"));
                }
                if argv.len() > 256 || argv.iter().any(|a| a.len() > 4096) {
                    return Err(invalid("a command has at most 256 arguments of 4096 bytes"));
                }
            }
            (DriverKind::Qemu, BootSource::Command { .. }) => {
                return Err(invalid(
                    "a command runs with the process driver (--driver process), not qemu",
                ));
            }
            (DriverKind::Process, _) => {
                return Err(invalid(
                    "the process driver runs a command (--command), not an image or kernel",
                ));
            }
        }
        if self.cmdline.as_ref().is_some_and(|c| c.len() > 2048)
            || self
                .ready_marker
                .as_ref()
                .is_some_and(|m| m.is_empty() || m.len() > 256)
        {
            return Err(invalid(
                "cmdline is at most 2048 bytes and the ready marker 1 to 256",
            ));
        }
        if self.labels.len() > 32
            || self
                .labels
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 63 || v.len() > 255)
        {
            return Err(invalid(
                "at most 32 labels, keys 1 to 63 bytes, values at most 255",
            ));
        }
        if self.constraints.len() + self.preferences.len() > 32 {
            return Err(invalid("at most 32 constraints and preferences in all"));
        }
        if let Some(g) = &self.group
            && !name_ok(g)
        {
            return Err(invalid(format!("group name {g:?} is not valid")));
        }
        Ok(())
    }
}

/// Where a VM is in its life, as `blx vm list` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum VmPhase {
    /// Waiting for a node.
    Pending,
    /// Placed; the node has not reported yet.
    Scheduled,
    /// Booting; readiness line not seen yet.
    Starting,
    /// Ready.
    Running,
    /// vCPUs paused.
    Paused,
    /// Stopped on request.
    Stopped,
    /// Exited on its own.
    Exited,
    /// Failed to start or to become ready.
    Failed,
}

impl VmPhase {
    /// Every phase, in order.
    pub const ALL: [VmPhase; 8] = [
        VmPhase::Pending,
        VmPhase::Scheduled,
        VmPhase::Starting,
        VmPhase::Running,
        VmPhase::Paused,
        VmPhase::Stopped,
        VmPhase::Exited,
        VmPhase::Failed,
    ];
}

impl std::fmt::Display for VmPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmPhase::Pending => "pending",
            VmPhase::Scheduled => "scheduled",
            VmPhase::Starting => "starting",
            VmPhase::Running => "running",
            VmPhase::Paused => "paused",
            VmPhase::Stopped => "stopped",
            VmPhase::Exited => "exited",
            VmPhase::Failed => "failed",
        })
    }
}

/// What is known of a VM's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// The phase.
    pub phase: VmPhase,
    /// Why it is pending, failed or exited, in words.
    pub reason: Option<String>,
    /// Milliseconds from start to the readiness line.
    pub boot_ms: Option<u64>,
    /// Restarts under the current incarnation.
    pub restarts: u32,
    /// When the phase last changed (leader's unix milliseconds).
    pub since_ms: u64,
}

/// A VM in the replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// What the user asked for.
    pub spec: VmSpec,
    /// What state the user wants.
    pub desired: DesiredState,
    /// The node it is placed on (hex id).
    pub node: Option<String>,
    /// Bumped on every placement and fresh start; reports of older ones are ignored.
    pub incarnation: u64,
    /// Progress.
    pub status: VmStatus,
    /// Log index that created it.
    pub create_index: u64,
    /// The W3C trace context of the request that created it.
    pub trace: Option<String>,
}

/// Whether a node is reachable, as the leader's membership sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    /// Alive or suspected.
    Up,
    /// Declared down by failure detection.
    Down,
    /// Left on purpose.
    Left,
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeStatus::Up => "up",
            NodeStatus::Down => "down",
            NodeStatus::Left => "left",
        })
    }
}

/// A node in the replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Name.
    pub name: String,
    /// Resources offered to VMs.
    pub capacity: Resources,
    /// Labels the agent announces.
    pub labels: BTreeMap<String, String>,
    /// Labels set by operators (`blx node label`); they win over the agent's.
    pub operator_labels: BTreeMap<String, String>,
    /// Failure zone.
    pub zone: Option<String>,
    /// Reachability.
    pub status: NodeStatus,
    /// When the status last changed (leader's unix milliseconds).
    pub since_ms: u64,
    /// Nothing new is placed here.
    pub cordoned: bool,
    /// Cordoned, and what runs here is moved away.
    pub draining: bool,
}

impl NodeRecord {
    /// The labels constraints see: the agent's, overridden by the operator's.
    pub fn effective_labels(&self) -> BTreeMap<String, String> {
        let mut l = self.labels.clone();
        l.extend(self.operator_labels.clone());
        l
    }
}

/// A node as the leader's membership sees it, for [`WorkloadCommand::NodeSync`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUpdate {
    /// Hex node id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Capacity.
    pub capacity: Resources,
    /// Agent labels.
    pub labels: BTreeMap<String, String>,
    /// Zone.
    pub zone: Option<String>,
    /// Reachability.
    pub status: NodeStatus,
}

/// What a node reports of one VM it hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReport {
    /// VM name.
    pub name: String,
    /// The incarnation the node runs.
    pub incarnation: u64,
    /// Phase.
    pub phase: VmPhase,
    /// Why, for exits and failures.
    pub reason: Option<String>,
    /// Boot time.
    pub boot_ms: Option<u64>,
    /// Restarts.
    pub restarts: u32,
}

/// One VM placed on one node by a scheduling pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceVm {
    /// VM name.
    pub vm: String,
    /// Its incarnation when the pass ran; the placement is refused if it moved on since.
    pub incarnation: u64,
    /// Target node.
    pub node: String,
}

/// A VM taken off its node (preempted, or its node is down or draining) with no new node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictVm {
    /// VM name.
    pub vm: String,
    /// Its incarnation when the pass ran.
    pub incarnation: u64,
    /// Why, shown as the pending reason.
    pub reason: String,
}

/// Changes to nodes and VMs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkloadCommand {
    /// Adds a VM, pending.
    VmCreate {
        /// The spec.
        spec: VmSpec,
        /// Leader's clock.
        now_ms: u64,
        /// The W3C trace context of the request that created it, so the node that boots it
        /// continues that trace.
        trace: Option<String>,
    },
    /// Start, stop, pause or resume.
    VmSetDesired {
        /// VM name.
        name: String,
        /// The new desired state.
        desired: DesiredState,
        /// Leader's clock.
        now_ms: u64,
    },
    /// Removes a VM; its node stops it.
    VmDelete {
        /// VM name.
        name: String,
    },
    /// A scheduling pass's outcome, applied whole or refused whole.
    Schedule {
        /// New placements.
        placements: Vec<PlaceVm>,
        /// VMs taken off their node with no new one.
        evictions: Vec<EvictVm>,
        /// New pending reasons for unplaced VMs.
        pending: Vec<(String, String)>,
        /// Leader's clock.
        now_ms: u64,
    },
    /// A node's report of the VMs it hosts. Reports for VMs no longer placed on that node, or
    /// of an older incarnation, are ignored: that is how a node that was cut off is fenced.
    VmReports {
        /// The reporting node.
        node: String,
        /// Reports.
        reports: Vec<VmReport>,
        /// Leader's clock.
        now_ms: u64,
    },
    /// Records nodes as membership sees them (new nodes, status or metadata changes).
    NodeSync {
        /// Changed nodes.
        nodes: Vec<NodeUpdate>,
        /// Leader's clock.
        now_ms: u64,
    },
    /// Operator changes to a node.
    NodeSet {
        /// Hex node id.
        id: String,
        /// Cordon or uncordon.
        cordoned: Option<bool>,
        /// Drain, or stop draining.
        draining: Option<bool>,
        /// Labels to set.
        labels_set: BTreeMap<String, String>,
        /// Labels to remove.
        labels_remove: Vec<String>,
    },
}

/// What an applied workload command answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkloadApplied {
    /// A VM was created or changed; its incarnation now.
    Vm {
        /// Incarnation.
        incarnation: u64,
    },
    /// Something else took effect.
    Done,
}

fn reason(s: &str) -> String {
    let mut s = s.to_string();
    if s.len() > MAX_REASON_LEN {
        let mut cut = MAX_REASON_LEN;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

impl ClusterState {
    pub(crate) fn validate_workload(&self, cmd: &WorkloadCommand) -> Result<(), CommandError> {
        match cmd {
            WorkloadCommand::VmCreate { spec, trace, .. } => {
                spec.validate()?;
                if trace.as_ref().is_some_and(|t| t.len() > MAX_TRACE_CONTEXT) {
                    return Err(CommandError::InvalidVm(
                        "the trace context is too long".into(),
                    ));
                }
                if self.vms.contains_key(&spec.name) {
                    return Err(CommandError::VmExists(spec.name.clone()));
                }
                Ok(())
            }
            WorkloadCommand::VmSetDesired { name, desired, .. } => {
                let vm = self
                    .vms
                    .get(name)
                    .ok_or_else(|| CommandError::NoSuchVm(name.clone()))?;
                if *desired == DesiredState::Paused && vm.desired == DesiredState::Stopped {
                    return Err(CommandError::Conflict(format!(
                        "VM {name} is stopped: start it before pausing it"
                    )));
                }
                Ok(())
            }
            WorkloadCommand::VmDelete { name } => {
                if self.vms.contains_key(name) {
                    Ok(())
                } else {
                    Err(CommandError::NoSuchVm(name.clone()))
                }
            }
            WorkloadCommand::Schedule {
                placements,
                evictions,
                ..
            } => {
                let mut seen = std::collections::BTreeSet::new();
                for (vm, inc) in placements
                    .iter()
                    .map(|p| (&p.vm, p.incarnation))
                    .chain(evictions.iter().map(|e| (&e.vm, e.incarnation)))
                {
                    let rec = self
                        .vms
                        .get(vm)
                        .ok_or_else(|| CommandError::NoSuchVm(vm.clone()))?;
                    if rec.incarnation != inc || !seen.insert(vm) {
                        return Err(CommandError::Conflict(format!(
                            "VM {vm} changed since the scheduling pass"
                        )));
                    }
                }
                for p in placements {
                    if !self.nodes.contains_key(&p.node) {
                        return Err(CommandError::NoSuchNode(p.node.clone()));
                    }
                }
                Ok(())
            }
            WorkloadCommand::VmReports { reports, .. } => {
                if reports.len() > 10_000 {
                    return Err(invalid("more than 10000 reports in one command"));
                }
                Ok(())
            }
            WorkloadCommand::NodeSync { nodes, .. } => {
                for n in nodes {
                    if n.id.len() != 16 || !n.id.chars().all(|c| c.is_ascii_hexdigit()) {
                        return Err(CommandError::NoSuchNode(n.id.clone()));
                    }
                }
                Ok(())
            }
            WorkloadCommand::NodeSet {
                id,
                labels_set,
                labels_remove,
                ..
            } => {
                if !self.nodes.contains_key(id) {
                    return Err(CommandError::NoSuchNode(id.clone()));
                }
                for (k, v) in labels_set {
                    blx_membership::meta::parse_label(&format!("{k}={v}"))
                        .map_err(|e| CommandError::InvalidVm(e.to_string()))?;
                }
                if labels_remove.iter().any(|k| k.is_empty() || k.len() > 63) {
                    return Err(invalid("label keys are 1 to 63 bytes"));
                }
                Ok(())
            }
        }
    }

    /// Applies a validated workload command.
    pub(crate) fn apply_workload(&mut self, index: u64, cmd: &WorkloadCommand) -> WorkloadApplied {
        match cmd {
            WorkloadCommand::VmCreate {
                spec,
                now_ms,
                trace,
            } => {
                self.vms.insert(
                    spec.name.clone(),
                    VmRecord {
                        spec: spec.clone(),
                        desired: DesiredState::Running,
                        node: None,
                        incarnation: 1,
                        status: VmStatus {
                            phase: VmPhase::Pending,
                            reason: Some("waiting for the scheduler".into()),
                            boot_ms: None,
                            restarts: 0,
                            since_ms: *now_ms,
                        },
                        create_index: index,
                        trace: trace.clone(),
                    },
                );
                WorkloadApplied::Vm { incarnation: 1 }
            }
            WorkloadCommand::VmSetDesired {
                name,
                desired,
                now_ms,
            } => {
                let Some(vm) = self.vms.get_mut(name) else {
                    return WorkloadApplied::Done;
                };
                let was = vm.desired;
                vm.desired = *desired;
                if was == DesiredState::Stopped && *desired == DesiredState::Running {
                    // A fresh start is a fresh placement: the old node may be gone or full.
                    vm.node = None;
                    vm.incarnation += 1;
                    vm.status = VmStatus {
                        phase: VmPhase::Pending,
                        reason: Some("waiting for the scheduler".into()),
                        boot_ms: None,
                        restarts: 0,
                        since_ms: *now_ms,
                    };
                } else if *desired == DesiredState::Stopped && vm.node.is_none() {
                    vm.status.phase = VmPhase::Stopped;
                    vm.status.reason = None;
                    vm.status.since_ms = *now_ms;
                }
                WorkloadApplied::Vm {
                    incarnation: vm.incarnation,
                }
            }
            WorkloadCommand::VmDelete { name } => {
                self.vms.remove(name);
                WorkloadApplied::Done
            }
            WorkloadCommand::Schedule {
                placements,
                evictions,
                pending,
                now_ms,
            } => {
                for e in evictions {
                    if let Some(vm) = self.vms.get_mut(&e.vm) {
                        vm.node = None;
                        vm.incarnation += 1;
                        vm.status = VmStatus {
                            phase: VmPhase::Pending,
                            reason: Some(reason(&e.reason)),
                            boot_ms: None,
                            restarts: 0,
                            since_ms: *now_ms,
                        };
                    }
                }
                for p in placements {
                    let name = self.nodes.get(&p.node).map(|n| n.name.clone());
                    if let Some(vm) = self.vms.get_mut(&p.vm) {
                        vm.node = Some(p.node.clone());
                        vm.incarnation += 1;
                        vm.status = VmStatus {
                            phase: VmPhase::Scheduled,
                            reason: Some(format!(
                                "placed on {}",
                                name.unwrap_or_else(|| p.node.clone())
                            )),
                            boot_ms: None,
                            restarts: 0,
                            since_ms: *now_ms,
                        };
                    }
                }
                for (name, why) in pending {
                    if let Some(vm) = self.vms.get_mut(name)
                        && vm.node.is_none()
                        && vm.status.phase == VmPhase::Pending
                    {
                        vm.status.reason = Some(reason(why));
                    }
                }
                WorkloadApplied::Done
            }
            WorkloadCommand::VmReports {
                node,
                reports,
                now_ms,
            } => {
                for r in reports {
                    let Some(vm) = self.vms.get_mut(&r.name) else {
                        continue;
                    };
                    if vm.node.as_deref() != Some(node.as_str()) || vm.incarnation != r.incarnation
                    {
                        continue;
                    }
                    if vm.status.phase != r.phase {
                        vm.status.since_ms = *now_ms;
                    }
                    vm.status.phase = r.phase;
                    vm.status.reason = r.reason.as_deref().map(reason);
                    vm.status.boot_ms = r.boot_ms.or(vm.status.boot_ms);
                    vm.status.restarts = r.restarts;
                }
                WorkloadApplied::Done
            }
            WorkloadCommand::NodeSync { nodes, now_ms } => {
                for n in nodes {
                    let rec = self.nodes.entry(n.id.clone()).or_insert(NodeRecord {
                        name: n.name.clone(),
                        capacity: n.capacity,
                        labels: BTreeMap::new(),
                        operator_labels: BTreeMap::new(),
                        zone: None,
                        status: n.status,
                        since_ms: *now_ms,
                        cordoned: false,
                        draining: false,
                    });
                    if rec.status != n.status {
                        rec.status = n.status;
                        rec.since_ms = *now_ms;
                    }
                    rec.name = n.name.clone();
                    rec.capacity = n.capacity;
                    rec.labels = n.labels.clone();
                    rec.zone = n.zone.clone();
                }
                WorkloadApplied::Done
            }
            WorkloadCommand::NodeSet {
                id,
                cordoned,
                draining,
                labels_set,
                labels_remove,
            } => {
                if let Some(rec) = self.nodes.get_mut(id) {
                    if let Some(c) = cordoned {
                        rec.cordoned = *c;
                        if !c {
                            rec.draining = false;
                        }
                    }
                    if let Some(d) = draining {
                        rec.draining = *d;
                        if *d {
                            rec.cordoned = true;
                        }
                    }
                    for k in labels_remove {
                        rec.operator_labels.remove(k);
                    }
                    rec.operator_labels.extend(labels_set.clone());
                }
                WorkloadApplied::Done
            }
        }
    }

    /// The VMs placed on `node`, as its worker should run them.
    pub fn vms_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a VmRecord> + 'a {
        self.vms
            .values()
            .filter(move |vm| vm.node.as_deref() == Some(node))
    }
}

/// Whether a VM on `node` must move: the node is gone, down or left past `grace_ms`, or
/// draining.
fn node_lost(state: &ClusterState, node: &str, now_ms: u64, grace_ms: u64) -> Option<String> {
    let Some(rec) = state.nodes.get(node) else {
        return Some(format!("node {node} is not in the cluster"));
    };
    if rec.draining {
        return Some(format!("node {} is draining", rec.name));
    }
    if rec.status != NodeStatus::Up && now_ms.saturating_sub(rec.since_ms) >= grace_ms {
        return Some(format!("node {} is {}", rec.name, rec.status));
    }
    None
}

/// The leader's scheduling pass: which VMs need a node, where they go, and what is preempted.
/// Returns None when nothing would change. Pure: the state, the leader's clock and a seed in;
/// one command out.
pub fn plan_schedule(state: &ClusterState, now_ms: u64, seed: u64) -> Option<WorkloadCommand> {
    let config = &state.config.1;
    let grace_ms = config.vm_grace_secs.saturating_mul(1000);
    // The common case, nothing to place, costs one pass over the VMs and nothing more.
    let any = state.vms.values().any(|vm| {
        vm.desired != DesiredState::Stopped
            && vm
                .node
                .as_deref()
                .is_none_or(|n| node_lost(state, n, now_ms, grace_ms).is_some())
    });
    if !any {
        return None;
    }
    let nodes: Vec<NodeView> = state
        .nodes
        .iter()
        .map(|(id, n)| NodeView {
            id: id.clone(),
            name: n.name.clone(),
            capacity: n.capacity,
            labels: n.effective_labels(),
            zone: n.zone.clone(),
            schedulable: n.status == NodeStatus::Up && !n.cordoned && !n.draining,
        })
        .collect();
    let mut allocations = Vec::new();
    let mut requests = Vec::new();
    let mut lost: BTreeMap<&str, String> = BTreeMap::new();
    for (name, vm) in &state.vms {
        if vm.desired == DesiredState::Stopped {
            continue;
        }
        let needs_node = match &vm.node {
            None => true,
            Some(node) => match node_lost(state, node, now_ms, grace_ms) {
                Some(why) => {
                    lost.insert(name, why);
                    true
                }
                None => false,
            },
        };
        let spec = &vm.spec;
        if needs_node {
            requests.push(VmRequest {
                name: name.clone(),
                resources: spec.resources,
                priority: spec.priority,
                constraints: spec.constraints.clone(),
                preferences: spec.preferences.clone(),
                group: spec.group.clone(),
                spread_zones: spec.spread_zones,
            });
        } else if let Some(node) = &vm.node {
            allocations.push(Allocation {
                vm: name.clone(),
                node: node.clone(),
                resources: spec.resources,
                priority: spec.priority,
                group: spec.group.clone(),
            });
        }
    }
    if requests.is_empty() {
        return None;
    }
    let plan = blx_scheduler::schedule(&nodes, &allocations, &requests, config.scheduler, seed);
    let incarnation = |vm: &str| state.vms.get(vm).map(|v| v.incarnation).unwrap_or(0);
    let placements: Vec<PlaceVm> = plan
        .placements
        .iter()
        .map(|p| PlaceVm {
            vm: p.vm.clone(),
            incarnation: incarnation(&p.vm),
            node: p.node.clone(),
        })
        .collect();
    let mut evictions: Vec<EvictVm> = plan
        .preemptions
        .iter()
        .map(|p| EvictVm {
            vm: p.victim.clone(),
            incarnation: incarnation(&p.victim),
            reason: format!(
                "preempted by {} (priority {})",
                p.by,
                state.vms.get(&p.by).map(|v| v.spec.priority).unwrap_or(0)
            ),
        })
        .collect();
    let mut pending = Vec::new();
    for u in &plan.unplaced {
        if let Some(why) = lost.get(u.vm.as_str()) {
            evictions.push(EvictVm {
                vm: u.vm.clone(),
                incarnation: incarnation(&u.vm),
                reason: format!("{why}; {}", u.reason),
            });
        } else {
            // Keep why the VM lost its node ("preempted by ...", "node n2 is down") in front
            // of why it has no new one.
            let current = state
                .vms
                .get(&u.vm)
                .and_then(|v| v.status.reason.as_deref());
            let cause = current
                .map(|r| r.split("; ").next().unwrap_or(r))
                .filter(|c| c.starts_with("preempted by") || c.starts_with("node "));
            let text = match cause {
                Some(c) => reason(&format!("{c}; {}", u.reason)),
                None => reason(&u.reason),
            };
            if current != Some(text.as_str()) {
                pending.push((u.vm.clone(), text));
            }
        }
    }
    if placements.is_empty() && evictions.is_empty() && pending.is_empty() {
        return None;
    }
    Some(WorkloadCommand::Schedule {
        placements,
        evictions,
        pending,
        now_ms,
    })
}

/// The node updates that bring `state` in line with membership's view, or nothing.
pub fn node_changes(state: &ClusterState, seen: &[NodeUpdate]) -> Vec<NodeUpdate> {
    seen.iter()
        .filter(|n| match state.nodes.get(&n.id) {
            None => true,
            Some(r) => {
                r.status != n.status
                    || r.name != n.name
                    || r.capacity != n.capacity
                    || r.labels != n.labels
                    || r.zone != n.zone
            }
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    fn spec(name: &str, memory_mib: u64, priority: u16) -> VmSpec {
        VmSpec {
            name: name.into(),
            resources: Resources {
                vcpus: 1,
                memory_mib,
                disk_mib: 0,
            },
            driver: DriverKind::Process,
            source: BootSource::Command {
                argv: vec!["sleep".into(), "600".into()],
            },
            cmdline: None,
            ready_marker: None,
            boot_timeout_secs: 60,
            labels: BTreeMap::new(),
            constraints: vec![],
            preferences: vec![],
            priority,
            group: None,
            spread_zones: false,
            restart: RestartPolicy::Always,
        }
    }

    fn node(id: &str, memory_mib: u64) -> NodeUpdate {
        NodeUpdate {
            id: id.into(),
            name: format!("n{}", &id[15..]),
            capacity: Resources {
                vcpus: 8,
                memory_mib,
                disk_mib: 0,
            },
            labels: BTreeMap::new(),
            zone: None,
            status: NodeStatus::Up,
        }
    }

    fn run(
        s: &mut ClusterState,
        index: &mut u64,
        cmd: WorkloadCommand,
    ) -> Result<(), CommandError> {
        *index += 1;
        s.apply(*index, &Command::Workload(cmd)).map(|_| ())
    }

    fn settle(s: &mut ClusterState, index: &mut u64, now: u64) {
        while let Some(cmd) = plan_schedule(s, now, 7) {
            run(s, index, cmd).unwrap();
        }
    }

    const A: &str = "000000000000000a";
    const B: &str = "000000000000000b";

    #[test]
    fn a_vm_create_with_an_over_long_trace_context_is_refused_and_changes_nothing() {
        let mut s = ClusterState::default();
        let mut i = 0;
        let create = |trace: String| WorkloadCommand::VmCreate {
            spec: spec("web", 512, 0),
            now_ms: 0,
            trace: Some(trace),
        };
        let before = s.clone();
        let err = run(&mut s, &mut i, create("0".repeat(MAX_TRACE_CONTEXT + 1))).unwrap_err();
        assert!(
            matches!(&err, CommandError::InvalidVm(m) if m.contains("trace context")),
            "{err:?}"
        );
        assert_eq!(s, before);
        // At the limit it is kept, for the node that boots the VM to continue the trace.
        let longest = "0".repeat(MAX_TRACE_CONTEXT);
        run(&mut s, &mut i, create(longest.clone())).unwrap();
        assert_eq!(s.vms["web"].trace.as_deref(), Some(longest.as_str()));
    }

    #[test]
    fn a_vm_is_placed_and_moves_when_its_node_goes_down() {
        let mut s = ClusterState::default();
        let mut i = 0;
        run(
            &mut s,
            &mut i,
            WorkloadCommand::NodeSync {
                nodes: vec![node(A, 1024)],
                now_ms: 0,
            },
        )
        .unwrap();
        run(
            &mut s,
            &mut i,
            WorkloadCommand::VmCreate {
                spec: spec("web", 512, 0),
                now_ms: 0,
                trace: None,
            },
        )
        .unwrap();
        settle(&mut s, &mut i, 1);
        assert_eq!(s.vms["web"].node.as_deref(), Some(A));
        assert_eq!(s.vms["web"].incarnation, 2);
        run(
            &mut s,
            &mut i,
            WorkloadCommand::NodeSync {
                nodes: vec![node(B, 1024)],
                now_ms: 2,
            },
        )
        .unwrap();
        let mut down = node(A, 1024);
        down.status = NodeStatus::Down;
        run(
            &mut s,
            &mut i,
            WorkloadCommand::NodeSync {
                nodes: vec![down],
                now_ms: 10,
            },
        )
        .unwrap();
        settle(&mut s, &mut i, 10);
        assert_eq!(s.vms["web"].node.as_deref(), Some(B));
        // A report from the old node's incarnation is ignored: fencing.
        run(
            &mut s,
            &mut i,
            WorkloadCommand::VmReports {
                node: A.into(),
                reports: vec![VmReport {
                    name: "web".into(),
                    incarnation: 2,
                    phase: VmPhase::Running,
                    reason: None,
                    boot_ms: Some(5),
                    restarts: 0,
                }],
                now_ms: 11,
            },
        )
        .unwrap();
        assert_eq!(s.vms["web"].status.phase, VmPhase::Scheduled);
    }

    #[test]
    fn unplaceable_vms_wait_with_a_reason_and_bad_specs_are_refused_whole() {
        let mut s = ClusterState::default();
        let mut i = 0;
        run(
            &mut s,
            &mut i,
            WorkloadCommand::NodeSync {
                nodes: vec![node(A, 1024)],
                now_ms: 0,
            },
        )
        .unwrap();
        run(
            &mut s,
            &mut i,
            WorkloadCommand::VmCreate {
                spec: spec("big", 4096, 0),
                now_ms: 0,
                trace: None,
            },
        )
        .unwrap();
        settle(&mut s, &mut i, 1);
        let vm = &s.vms["big"];
        assert_eq!(vm.status.phase, VmPhase::Pending);
        assert!(
            vm.status.reason.as_deref().unwrap().contains("4096"),
            "{:?}",
            vm.status.reason
        );
        let before = s.clone();
        for bad in [
            spec("big", 512, 0),
            spec("zero", 0, 0),
            spec("huge", 1 << 30, 0),
            spec("Bad Name", 512, 0),
            spec("p", 512, 1001),
        ] {
            assert!(
                run(
                    &mut s,
                    &mut i,
                    WorkloadCommand::VmCreate {
                        spec: bad,
                        now_ms: 2,
                        trace: None,
                    }
                )
                .is_err()
            );
        }
        assert_eq!(s, before);
    }

    #[test]
    fn higher_priority_preempts_and_the_victim_waits() {
        let mut s = ClusterState::default();
        let mut i = 0;
        run(
            &mut s,
            &mut i,
            WorkloadCommand::NodeSync {
                nodes: vec![node(A, 1024)],
                now_ms: 0,
            },
        )
        .unwrap();
        run(
            &mut s,
            &mut i,
            WorkloadCommand::VmCreate {
                spec: spec("low", 768, 100),
                now_ms: 0,
                trace: None,
            },
        )
        .unwrap();
        settle(&mut s, &mut i, 1);
        run(
            &mut s,
            &mut i,
            WorkloadCommand::VmCreate {
                spec: spec("high", 768, 900),
                now_ms: 2,
                trace: None,
            },
        )
        .unwrap();
        settle(&mut s, &mut i, 3);
        assert_eq!(s.vms["high"].node.as_deref(), Some(A));
        assert_eq!(s.vms["low"].node, None);
        assert!(
            s.vms["low"]
                .status
                .reason
                .as_deref()
                .unwrap()
                .contains("high")
        );
    }

    #[test]
    fn draining_moves_everything_off_the_node() {
        let mut s = ClusterState::default();
        let mut i = 0;
        run(
            &mut s,
            &mut i,
            WorkloadCommand::NodeSync {
                nodes: vec![node(A, 4096)],
                now_ms: 0,
            },
        )
        .unwrap();
        for n in ["a", "b", "c"] {
            run(
                &mut s,
                &mut i,
                WorkloadCommand::VmCreate {
                    spec: spec(n, 256, 0),
                    now_ms: 0,
                    trace: None,
                },
            )
            .unwrap();
        }
        settle(&mut s, &mut i, 1);
        run(
            &mut s,
            &mut i,
            WorkloadCommand::NodeSync {
                nodes: vec![node(B, 4096)],
                now_ms: 1,
            },
        )
        .unwrap();
        run(
            &mut s,
            &mut i,
            WorkloadCommand::NodeSet {
                id: A.into(),
                cordoned: None,
                draining: Some(true),
                labels_set: BTreeMap::new(),
                labels_remove: vec![],
            },
        )
        .unwrap();
        settle(&mut s, &mut i, 2);
        assert!(s.vms.values().all(|v| v.node.as_deref() == Some(B)));
    }
}
