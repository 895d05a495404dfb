//! [`Worker`]: owns the drivers and the run directories, and turns the desired set into
//! running workloads one tick at a time.
//!
//! ```text
//!  tick(desired, now_ms):
//!    poll drivers ─▶ observed ─▶ reconcile ─▶ actions ─▶ drivers (start/stop/pause/resume)
//!                                                           │
//!    poll drivers again ◀───────────────────────────────────┘  ─▶ observations returned
//! ```
//!
//! Run directories are `<run_root>/<vm name>/`; a fresh incarnation starts with an empty
//! console log, a restart under the same incarnation appends to it. A start that fails is kept
//! as an observed Failed, so that it is reported and retried under the restart policy like any
//! other failure. The worker blocks only as long as a driver call does (a stop waits a second
//! or two for the workload to exit; the first QEMU start under `Accel::Auto` probes KVM).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::workload::{CONSOLE_LOG, STATE_FILE};
use crate::{
    Action, BootSpec, Desired, Driver, DriverError, DriverKind, Observed, Phase, reconcile,
};

/// Where the worker keeps VM `name`'s serial console log under `run_root`.
pub fn console_log_path(run_root: &Path, name: &str) -> PathBuf {
    run_root.join(name).join(CONSOLE_LOG)
}

/// Runs this node's VMs: each [`Worker::tick`] polls the drivers, [`reconcile`]s with the
/// desired set and applies the actions. Run directories are `<run_root>/<vm name>/`; a fresh
/// incarnation starts with an empty console log, a restart under the same incarnation appends
/// to it. A start that fails is observed as Failed and retried under the restart policy.
pub struct Worker {
    run_root: PathBuf,
    drivers: Vec<Box<dyn Driver>>,
    /// Which driver (index into `drivers`) holds each name.
    owners: BTreeMap<String, usize>,
    /// Starts that failed before a driver held anything: reported as Failed.
    failed_starts: BTreeMap<String, Observed>,
    /// Restarts counted by the worker, by name: (incarnation, restarts). Covers failed starts,
    /// which no driver sees.
    restarts: BTreeMap<String, (u64, u32)>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("run_root", &self.run_root)
            .field(
                "drivers",
                &self.drivers.iter().map(|d| d.kind()).collect::<Vec<_>>(),
            )
            .field("owners", &self.owners)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker keeping run directories under `run_root` (created on first start if missing),
    /// with one driver per [`DriverKind`] (the first of a kind wins).
    pub fn new(run_root: PathBuf, drivers: Vec<Box<dyn Driver>>) -> Self {
        Worker {
            run_root,
            drivers,
            owners: BTreeMap::new(),
            failed_starts: BTreeMap::new(),
            restarts: BTreeMap::new(),
        }
    }

    /// Where run directories live.
    pub fn run_root(&self) -> &Path {
        &self.run_root
    }

    /// Re-attaches to the workloads an earlier agent left in `run_root/*/state.json`, in name
    /// order. Workloads that no longer run are returned too (as Exited): the next tick stops
    /// and forgets them unless they are still desired.
    pub fn adopt_all(&mut self) -> Vec<Observed> {
        let mut adopted = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.run_root) else {
            return adopted;
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.join(STATE_FILE).is_file())
            .collect();
        dirs.sort();
        for dir in dirs {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let kind = match read_driver_kind(&dir) {
                Ok(kind) => kind,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read a run directory's state");
                    continue;
                }
            };
            let Some(index) = self.driver_index(kind) else {
                tracing::warn!(dir = %dir.display(), driver = ?kind, "no driver for a workload left running");
                continue;
            };
            match self.drivers[index].adopt(&dir) {
                Ok(Some(observed)) if observed.name == name => {
                    self.owners.insert(name.clone(), index);
                    self.restarts
                        .insert(name, (observed.incarnation, observed.restarts));
                    adopted.push(observed);
                }
                Ok(Some(observed)) => {
                    tracing::warn!(dir = %dir.display(), vm = %observed.name, "run directory holds a VM of another name; stopping it");
                    let _ = self.drivers[index].stop(&observed.name);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot adopt workload"),
            }
        }
        adopted
    }

    /// Checks `spec` with the driver it names, starting nothing.
    pub fn validate(&self, spec: &BootSpec) -> Result<(), DriverError> {
        match self.driver_index(spec.driver) {
            Some(index) => self.drivers[index].validate(spec),
            None => Err(DriverError::InvalidSpec(format!(
                "no {:?} driver on this node",
                spec.driver
            ))),
        }
    }

    /// `<run_root>/<name>/console.log`.
    pub fn console_log(&self, name: &str) -> PathBuf {
        console_log_path(&self.run_root, name)
    }

    /// One round: polls the drivers, reconciles with `desired` (keyed by VM name), applies the
    /// actions and returns what every known workload is doing afterwards, keyed by name.
    /// Workloads the worker stopped are gone from the result.
    pub fn tick(
        &mut self,
        desired: &BTreeMap<String, Desired>,
        now_ms: u64,
    ) -> BTreeMap<String, Observed> {
        let observed = self.poll(now_ms);
        for action in reconcile(desired, &observed, now_ms) {
            self.apply(action, &observed, now_ms);
        }
        self.poll(now_ms)
    }

    /// Stops every workload (and forgets failed starts). For tests and tear-down: an agent
    /// that exits normally leaves its VMs running for the next one to adopt.
    pub fn shutdown_all(&mut self) {
        let names: Vec<String> = self.poll(0).into_keys().collect();
        for name in names {
            self.stop(&name);
        }
        self.failed_starts.clear();
        self.restarts.clear();
    }

    fn driver_index(&self, kind: DriverKind) -> Option<usize> {
        self.drivers.iter().position(|d| d.kind() == kind)
    }

    /// What every driver sees, plus failed starts; the worker's restart count wins.
    fn poll(&mut self, now_ms: u64) -> BTreeMap<String, Observed> {
        let mut all = self.failed_starts.clone();
        for (index, driver) in self.drivers.iter_mut().enumerate() {
            for (name, mut observed) in driver.poll(now_ms) {
                // A name the worker did not route (adopted or started through the driver
                // directly): track it so that a stop reaches it.
                self.owners.entry(name.clone()).or_insert(index);
                if let Some((incarnation, restarts)) = self.restarts.get(&name)
                    && *incarnation == observed.incarnation
                {
                    observed.restarts = *restarts;
                }
                all.insert(name, observed);
            }
        }
        all
    }

    fn apply(&mut self, action: Action, observed: &BTreeMap<String, Observed>, now_ms: u64) {
        match action {
            Action::Start(vm) => self.start(&vm, observed.get(&vm.name), now_ms),
            Action::Stop { name } => self.stop(&name),
            Action::Pause { name } => self.with_owner(&name, "pause", |d, n| d.pause(n)),
            Action::Resume { name } => self.with_owner(&name, "resume", |d, n| d.resume(n)),
        }
    }

    fn with_owner(
        &mut self,
        name: &str,
        what: &str,
        op: impl FnOnce(&mut dyn Driver, &str) -> Result<(), DriverError>,
    ) {
        let Some(&index) = self.owners.get(name) else {
            tracing::warn!(vm = %name, "cannot {what}: no driver holds it");
            return;
        };
        match op(self.drivers[index].as_mut(), name) {
            Ok(()) => tracing::info!(vm = %name, "{what}d"),
            Err(e) => tracing::warn!(vm = %name, error = %e, "cannot {what}"),
        }
    }

    fn stop(&mut self, name: &str) {
        self.failed_starts.remove(name);
        self.restarts.remove(name);
        if let Some(index) = self.owners.remove(name)
            && let Err(e) = self.drivers[index].stop(name)
        {
            tracing::warn!(vm = %name, error = %e, "stop failed");
        }
    }

    /// Starts (or restarts) `vm`; `before` is what was observed of that name this round.
    fn start(&mut self, vm: &Desired, before: Option<&Observed>, now_ms: u64) {
        let same_incarnation = before.is_some_and(|o| o.incarnation == vm.incarnation);
        let restarts = match before {
            Some(o) if same_incarnation => o.restarts.saturating_add(1),
            _ => 0,
        };
        self.restarts
            .insert(vm.name.clone(), (vm.incarnation, restarts));
        self.failed_starts.remove(&vm.name);
        if let Err(e) = self.try_start(vm, !same_incarnation, now_ms) {
            tracing::warn!(vm = %vm.name, incarnation = vm.incarnation, error = %e, "start failed");
            self.failed_starts.insert(
                vm.name.clone(),
                Observed {
                    name: vm.name.clone(),
                    incarnation: vm.incarnation,
                    driver: vm.spec.driver,
                    phase: Phase::Failed {
                        reason: e.to_string(),
                    },
                    boot_ms: None,
                    started_at_ms: now_ms,
                    restarts,
                    pid: None,
                },
            );
        }
    }

    fn try_start(&mut self, vm: &Desired, fresh: bool, now_ms: u64) -> Result<(), DriverError> {
        if !valid_vm_name(&vm.name) {
            return Err(DriverError::InvalidSpec(format!(
                "VM name {:?} cannot name a run directory",
                vm.name
            )));
        }
        let index = self.driver_index(vm.spec.driver).ok_or_else(|| {
            DriverError::InvalidSpec(format!("no {:?} driver on this node", vm.spec.driver))
        })?;
        if let Some(&other) = self.owners.get(&vm.name)
            && other != index
        {
            // Same name, another driver (its previous workload is dead, or reconcile would
            // not start): let that driver forget it.
            let _ = self.drivers[other].stop(&vm.name);
            self.owners.remove(&vm.name);
        }
        self.drivers[index].validate(&vm.spec)?;
        let run_dir = self.run_root.join(&vm.name);
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| DriverError::Io(format!("cannot create {}: {e}", run_dir.display())))?;
        if fresh {
            std::fs::File::create(run_dir.join(CONSOLE_LOG)).map_err(|e| {
                DriverError::Io(format!(
                    "cannot truncate the console log of {}: {e}",
                    vm.name
                ))
            })?;
        }
        self.drivers[index].start(vm, &run_dir, now_ms)?;
        self.owners.insert(vm.name.clone(), index);
        Ok(())
    }
}

/// Whether a VM name can be a run directory's name: non-empty, no `/`, not `.` or `..`, no NUL.
fn valid_vm_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// The `driver` field of `<dir>/state.json`.
fn read_driver_kind(dir: &Path) -> Result<DriverKind, String> {
    #[derive(serde::Deserialize)]
    struct Head {
        driver: DriverKind,
    }
    let bytes = std::fs::read(dir.join(STATE_FILE)).map_err(|e| e.to_string())?;
    serde_json::from_slice::<Head>(&bytes)
        .map(|h| h.driver)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_stay_inside_the_run_root() {
        for bad in ["", ".", "..", "a/b", "../x", "a\0"] {
            assert!(!valid_vm_name(bad), "{bad:?}");
        }
        assert!(valid_vm_name("web-1"));
        assert!(valid_vm_name("..x"));
    }
}
