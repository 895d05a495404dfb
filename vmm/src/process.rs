//! [`ProcessDriver`]: runs a plain command as the workload, for tests, demos and nodes without
//! QEMU.
//!
//! The command runs in its own process group with stdin from /dev/null and stdout and stderr
//! appended to `<run_dir>/console.log`. Pause and resume are SIGSTOP and SIGCONT to the group;
//! stop is SIGTERM to the group, up to [`STOP_GRACE`] to exit, then SIGKILL. It ignores the
//! spec's vCPUs, memory, kernel, initramfs, disk and command line.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::workload::{CONSOLE_LOG, ExitHints, Workload, Workloads, find_program, proc_state};
use crate::{BootSpec, Desired, Driver, DriverError, DriverKind, Observed, Phase};

/// How long a stopped workload may take to exit after SIGTERM before it gets SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_millis(1000);
/// How long a pause waits for SIGSTOP to take effect.
const STOP_SETTLE: Duration = Duration::from_millis(200);

/// Runs `spec.command` as the workload. See the [module docs](self).
#[derive(Debug, Default)]
pub struct ProcessDriver {
    workloads: Workloads,
}

impl ProcessDriver {
    /// A driver that knows no workloads yet.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Driver for ProcessDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    fn validate(&self, spec: &BootSpec) -> Result<(), DriverError> {
        if spec.driver != DriverKind::Process {
            return Err(DriverError::InvalidSpec(format!(
                "a {:?} spec given to the process driver",
                spec.driver
            )));
        }
        let Some(program) = spec.command.first() else {
            return Err(DriverError::InvalidSpec(
                "the process driver needs a command".into(),
            ));
        };
        if program.is_empty() {
            return Err(DriverError::InvalidSpec(
                "the command's program is empty".into(),
            ));
        }
        if find_program(Path::new(program)).is_none() {
            return Err(DriverError::InvalidSpec(format!(
                "program {program:?} not found"
            )));
        }
        Ok(())
    }

    fn start(&mut self, vm: &Desired, run_dir: &Path, now_ms: u64) -> Result<(), DriverError> {
        self.validate(&vm.spec)?;
        let restarts = self.workloads.make_room(&vm.name, vm.incarnation)?;
        let console_path = run_dir.join(CONSOLE_LOG);
        let console = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_path)
            .map_err(|e| DriverError::Io(format!("cannot open {}: {e}", console_path.display())))?;
        let stderr = console
            .try_clone()
            .map_err(|e| DriverError::Io(format!("cannot open {}: {e}", console_path.display())))?;
        let mut cmd = Command::new(&vm.spec.command[0]);
        cmd.args(&vm.spec.command[1..])
            .stdout(console)
            .stderr(stderr);
        let workload = Workload::spawn(cmd, vm, run_dir, now_ms, restarts, ExitHints::default())?;
        tracing::info!(vm = %vm.name, incarnation = vm.incarnation, pid = workload.pid(), "process started");
        self.workloads.insert(workload);
        Ok(())
    }

    fn stop(&mut self, name: &str) -> Result<(), DriverError> {
        let mut workload = self.workloads.remove(name)?;
        workload.terminate(STOP_GRACE);
        workload.forget();
        tracing::info!(vm = %name, "process stopped");
        Ok(())
    }

    fn pause(&mut self, name: &str) -> Result<(), DriverError> {
        let workload = self.workloads.get_mut(name)?;
        if *workload.phase() != Phase::Running {
            return Err(DriverError::WrongPhase(format!(
                "cannot pause {name}: it is {:?}, not running",
                workload.phase()
            )));
        }
        workload.signal(Signal::STOP)?;
        workload.set_phase(Phase::Paused);
        // SIGSTOP takes effect when the process is next scheduled; wait for it briefly so that
        // "paused" means stopped (and a later agent adopting it sees it stopped).
        let pid = workload.pid();
        let deadline = Instant::now() + STOP_SETTLE;
        while proc_state(pid).is_some_and(|s| s != 'T') && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn resume(&mut self, name: &str) -> Result<(), DriverError> {
        let workload = self.workloads.get_mut(name)?;
        if *workload.phase() != Phase::Paused {
            return Err(DriverError::WrongPhase(format!(
                "cannot resume {name}: it is {:?}, not paused",
                workload.phase()
            )));
        }
        workload.signal(Signal::CONT)?;
        workload.set_phase(Phase::Running);
        Ok(())
    }

    fn adopt(&mut self, run_dir: &Path) -> Result<Option<Observed>, DriverError> {
        let Some(mut workload) =
            Workload::adopt(run_dir, DriverKind::Process, ExitHints::default())?
        else {
            return Ok(None);
        };
        if let Some(known) = self.workloads.held(&workload)? {
            return Ok(Some(known));
        }
        if *workload.phase() == Phase::Running && proc_state(workload.pid()) == Some('T') {
            workload.set_phase(Phase::Paused);
        }
        let observed = workload.observe();
        self.workloads.insert(workload);
        Ok(Some(observed))
    }

    fn poll(&mut self, now_ms: u64) -> BTreeMap<String, Observed> {
        self.workloads.poll(now_ms)
    }
}
