//! blx VMM worker: boots, watches and stops the microVMs placed on this node.
//!
//! The pieces:
//! - [`reconcile`]: pure; compares what should run here with what does and returns [`Action`]s.
//! - [`Driver`]: starts, stops, pauses and resumes one kind of workload and reports what it sees.
//!   [`qemu::QemuDriver`] boots QEMU `-M microvm` guests under QMP; [`process::ProcessDriver`] runs
//!   a command as the workload. Both pass the same test suite.
//! - [`Worker`]: owns the drivers and the per-VM run directories, applies actions, adopts
//!   workloads left running by an earlier agent process, and returns observations.
//! - [`image`]: named guest images (kernel, initramfs, readiness marker) on disk.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod image;
pub mod process;
pub mod qemu;
mod reconcile;
mod worker;
mod workload;

pub use reconcile::reconcile;
pub use worker::{Worker, console_log_path};

/// Which driver runs a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DriverKind {
    /// QEMU `-M microvm`.
    Qemu,
    /// A plain process.
    Process,
}

/// How a VM boots: everything a driver needs, resolved to paths on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    /// The driver.
    pub driver: DriverKind,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Kernel (qemu).
    pub kernel: Option<PathBuf>,
    /// Initramfs (qemu).
    pub initrd: Option<PathBuf>,
    /// Raw disk image attached as virtio-blk (qemu).
    pub disk: Option<PathBuf>,
    /// Extra kernel command line, appended to the driver's own (qemu).
    pub cmdline: Option<String>,
    /// Program and arguments (process).
    pub command: Vec<String>,
    /// A line the workload prints on its console when ready. None: ready when started.
    pub ready_marker: Option<String>,
    /// How long the workload may take to print the marker before it counts as failed.
    pub boot_timeout_ms: u64,
}

impl BootSpec {
    /// A plain process running `command` with one vCPU and 64 MiB, ready as soon as it is
    /// started, with 10 s to start.
    pub fn process(command: Vec<String>) -> Self {
        BootSpec {
            driver: DriverKind::Process,
            vcpus: 1,
            memory_mib: 64,
            kernel: None,
            initrd: None,
            disk: None,
            cmdline: None,
            command,
            ready_marker: None,
            boot_timeout_ms: 10_000,
        }
    }
}

/// When a workload that exited is started again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Whatever the exit.
    #[default]
    Always,
    /// Only after a non-zero exit, a crash or a failed boot.
    OnFailure,
    /// Never.
    Never,
}

/// What the cluster wants of a VM placed on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DesiredState {
    /// Booted and running.
    Running,
    /// Booted, vCPUs paused.
    Paused,
    /// Not running.
    Stopped,
}

/// One VM this node should hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// VM name, unique in the cluster; also its run directory's name.
    pub name: String,
    /// Bumped by the cluster each time the VM is placed or started anew. A workload of an older
    /// incarnation is stopped, never adopted as the current one.
    pub incarnation: u64,
    /// How it boots.
    pub spec: BootSpec,
    /// What state it should be in.
    pub state: DesiredState,
    /// What to do when it exits.
    pub restart: RestartPolicy,
}

/// What a workload is doing, as the driver sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Started; readiness line not seen yet.
    Starting,
    /// Ready.
    Running,
    /// Paused.
    Paused,
    /// Exited on its own or was stopped. `code` is the exit code when there was one.
    Exited {
        /// Exit code, None when killed by a signal or when the guest kernel panicked.
        code: Option<i32>,
        /// Why, in words.
        reason: String,
    },
    /// Could not start, or failed to become ready in time.
    Failed {
        /// Why, in words.
        reason: String,
    },
}

/// One workload as observed on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// VM name.
    pub name: String,
    /// The incarnation it was started as.
    pub incarnation: u64,
    /// The driver running it.
    pub driver: DriverKind,
    /// What it is doing.
    pub phase: Phase,
    /// Milliseconds from start to the readiness line, once seen.
    pub boot_ms: Option<u64>,
    /// The `now_ms` at which it was last started, as passed to the worker.
    pub started_at_ms: u64,
    /// How many times it has been restarted under this incarnation.
    pub restarts: u32,
    /// OS process id of the VMM or workload, while it runs.
    pub pid: Option<u32>,
}

/// A step the worker takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start (or restart) this VM.
    Start(Desired),
    /// Stop the workload with this name and forget it once stopped.
    Stop {
        /// VM name.
        name: String,
    },
    /// Pause its vCPUs.
    Pause {
        /// VM name.
        name: String,
    },
    /// Resume its vCPUs.
    Resume {
        /// VM name.
        name: String,
    },
}

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The spec cannot be run by this driver (missing kernel, empty command, ...).
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// No workload of that name.
    #[error("no VM named {0} on this node")]
    Unknown(String),
    /// The operation does not apply in the workload's current phase.
    #[error("{0}")]
    WrongPhase(String),
    /// The OS or the VMM refused.
    #[error("{0}")]
    Io(String),
}

/// One kind of workload runner. Calls are short and never block on the guest: `start` spawns
/// and returns, `poll` reaps exits and scans consoles without waiting.
pub trait Driver: Send {
    /// Which kind this is.
    fn kind(&self) -> DriverKind;
    /// Whether a call may hold the calling thread for long (a stop waits for a process to
    /// exit; a first QEMU start probes KVM). The agent runs a worker with such drivers on a
    /// thread of its own, and one without them as a task.
    fn blocks(&self) -> bool {
        true
    }
    /// Checks a spec without starting anything.
    fn validate(&self, spec: &BootSpec) -> Result<(), DriverError>;
    /// Starts `vm` in `run_dir` (created by the caller; holds the console log and sockets).
    fn start(
        &mut self,
        vm: &Desired,
        run_dir: &std::path::Path,
        now_ms: u64,
    ) -> Result<(), DriverError>;
    /// Stops the named workload, killing its whole process group, and forgets it.
    fn stop(&mut self, name: &str) -> Result<(), DriverError>;
    /// Pauses the named workload.
    fn pause(&mut self, name: &str) -> Result<(), DriverError>;
    /// Resumes the named workload.
    fn resume(&mut self, name: &str) -> Result<(), DriverError>;
    /// Re-attaches to a workload an earlier agent process started in `run_dir`, if it still runs.
    fn adopt(&mut self, run_dir: &std::path::Path) -> Result<Option<Observed>, DriverError>;
    /// What every workload this driver knows is doing now.
    fn poll(&mut self, now_ms: u64) -> BTreeMap<String, Observed>;
}
