//! Fencing: no VM runs on two hosts at once for longer than the grace period allows (the
//! cluster's `vm_grace_secs` plus the few seconds failure detection and self-fencing take).

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Sample, Violation};

/// What failure detection and self-fencing may add to the grace period: a cut-off node stops
/// its VMs 1.5 s after it loses sight of a majority, and the others declare it down after
/// their suspicion period; either side may lag a gossip round.
pub(crate) const FENCING_SLACK: Duration = Duration::from_secs(5);

/// Since when each VM has run in two places.
#[derive(Default)]
pub(crate) struct SingleVmCopy {
    doubled_since: BTreeMap<String, Duration>,
}

impl SingleVmCopy {
    pub(crate) fn observe(&mut self, sample: &Sample, grace: Duration) -> Option<Violation> {
        let mut hosts: BTreeMap<&str, usize> = BTreeMap::new();
        for (vm, _) in sample.vms.keys() {
            *hosts.entry(vm.as_str()).or_default() += 1;
        }
        self.doubled_since
            .retain(|vm, _| hosts.get(vm.as_str()).is_some_and(|n| *n > 1));
        for (vm, n) in hosts {
            if n < 2 {
                continue;
            }
            let since = *self
                .doubled_since
                .entry(vm.to_string())
                .or_insert(sample.at);
            if sample.at - since > grace + FENCING_SLACK {
                return Some(Violation {
                    invariant: "single_vm_copy",
                    at: sample.at,
                    detail: format!(
                        "{vm} has run on {n} hosts since {:.3}s",
                        since.as_secs_f64()
                    ),
                });
            }
        }
        None
    }
}
