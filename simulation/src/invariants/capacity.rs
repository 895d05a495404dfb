//! Capacity: no node holds more VMs than it offers, in the state any host has applied.

use std::collections::BTreeMap;

use blx_vmm::DesiredState;

use super::{Sample, Violation};

pub(crate) fn check(sample: &Sample) -> Option<Violation> {
    for host in &sample.hosts {
        let Some((index, state)) = &host.applied else {
            continue;
        };
        let mut used: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for vm in state.vms.values() {
            let Some(node) = vm.node.as_deref() else {
                continue;
            };
            if vm.desired == DesiredState::Stopped {
                continue;
            }
            let e = used.entry(node).or_default();
            e.0 += u64::from(vm.spec.resources.vcpus);
            e.1 += vm.spec.resources.memory_mib;
        }
        for (node, (vcpus, memory)) in used {
            let Some(rec) = state.nodes.get(node) else {
                continue;
            };
            if vcpus > u64::from(rec.capacity.vcpus) || memory > rec.capacity.memory_mib {
                return Some(Violation {
                    invariant: "capacity",
                    at: sample.at,
                    detail: format!(
                        "at index {index} (host {}), node {} holds {vcpus} vCPUs and {memory} MiB, over its {} and {}",
                        host.index, rec.name, rec.capacity.vcpus, rec.capacity.memory_mib
                    ),
                });
            }
        }
    }
    None
}
