//! Liveness after healing: once every fault has healed and the cluster has had time to
//! settle, every host runs, every host sees every other as alive, and all agree on one
//! leader, which says it leads. It must hold at some sample of the run's last 5 s.

use super::{Sample, Violation};
use blx_membership::MemberState;

pub(crate) fn check(sample: &Sample) -> Option<Violation> {
    let fail = |detail: String| {
        Some(Violation {
            invariant: "convergence",
            at: sample.at,
            detail,
        })
    };
    let ids: Vec<_> = sample.hosts.iter().filter_map(|h| h.id).collect();
    let mut leader = None;
    for host in &sample.hosts {
        if !host.running {
            return fail(format!("host {} is not running", host.index));
        }
        for id in &ids {
            match host.members.get(id) {
                Some(MemberState::Alive) => {}
                other => {
                    return fail(format!(
                        "host {} sees {id} as {other:?}, not alive",
                        host.index
                    ));
                }
            }
        }
        let Some(raft) = &host.raft else {
            return fail(format!("host {} has no Raft", host.index));
        };
        match (raft.leader, leader) {
            (None, _) => return fail(format!("host {} knows no leader", host.index)),
            (Some(l), Some(known)) if l != known => {
                return fail(format!(
                    "host {} follows {l:016x}, others {known:016x}",
                    host.index
                ));
            }
            (Some(l), _) => leader = Some(l),
        }
    }
    let Some(leader) = leader else {
        return fail("no host knows a leader".into());
    };
    let leads = sample.hosts.iter().any(|h| {
        h.raft
            .as_ref()
            .is_some_and(|r| r.id == leader && r.role == "leader")
    });
    if !leads {
        return fail(format!("{leader:016x} is named leader but does not lead"));
    }
    None
}
