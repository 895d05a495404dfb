//! State-machine safety: every node that has applied index i holds the same state there.

use std::collections::BTreeMap;

use super::{Sample, Violation, state_digest};

/// The digest of the state first seen at each applied index, and by whom.
#[derive(Default)]
pub(crate) struct StateMachinesAgree {
    seen: BTreeMap<u64, ([u8; 32], usize)>,
}

impl StateMachinesAgree {
    pub(crate) fn observe(&mut self, sample: &Sample) -> Option<Violation> {
        for host in &sample.hosts {
            let Some((index, state)) = &host.applied else {
                continue;
            };
            let digest = state_digest(state);
            let (first, by) = *self.seen.entry(*index).or_insert((digest, host.index));
            if first != digest {
                return Some(Violation {
                    invariant: "state_machines_agree",
                    at: sample.at,
                    detail: format!(
                        "at applied index {index} host {} and host {by} hold different states",
                        host.index
                    ),
                });
            }
        }
        None
    }
}
