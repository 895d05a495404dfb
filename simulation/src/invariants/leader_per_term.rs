//! Election safety: at most one leader per term.

use std::collections::BTreeMap;

use super::{Sample, Violation};

/// Remembers who led each term.
#[derive(Default)]
pub(crate) struct LeaderPerTerm {
    leaders: BTreeMap<u64, u64>,
}

impl LeaderPerTerm {
    pub(crate) fn observe(&mut self, sample: &Sample) -> Option<Violation> {
        for host in &sample.hosts {
            let Some(raft) = &host.raft else { continue };
            if raft.role != "leader" {
                continue;
            }
            let known = *self.leaders.entry(raft.term).or_insert(raft.id);
            if known != raft.id {
                return Some(Violation {
                    invariant: "leader_per_term",
                    at: sample.at,
                    detail: format!(
                        "term {} has two leaders: {known:016x} and {:016x}",
                        raft.term, raft.id
                    ),
                });
            }
        }
        None
    }
}
