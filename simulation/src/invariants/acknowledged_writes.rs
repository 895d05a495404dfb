//! Durability: no acknowledged KV write is lost. Values are unique per write, so the final
//! value of a key names the one write that made it; an acknowledged write that was called
//! after that write had returned must have overwritten it, unless it was lost. With no
//! deletes in the workload, a key that ends absent while a write to it was acknowledged
//! lost that write too.

use std::collections::BTreeMap;
use std::time::Duration;

use blx_consensus::state::ClusterState;

use super::Violation;
use crate::linearizability::{KvOp, KvResult, Operation};

pub(crate) fn check(history: &[Operation], last: &ClusterState, at: Duration) -> Option<Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in history {
        if matches!(op.op, KvOp::Put(_)) {
            by_key.entry(op.key.as_str()).or_default().push(op);
        }
    }
    for (key, puts) in by_key {
        let acked = || {
            puts.iter()
                .filter(|p| matches!(p.ret, Some((_, KvResult::Ok))))
        };
        let lost = |w: &Operation| Violation {
            invariant: "acknowledged_writes",
            at,
            detail: format!(
                "the write of {:?} to {key} by client {} was acknowledged at {:.3}s and is lost (final value {:?})",
                value_of(w),
                w.client,
                w.ret.as_ref().map(|r| r.0).unwrap_or(0) as f64 / 1e9,
                last.kv
                    .get(key)
                    .map(|e| String::from_utf8_lossy(&e.value).into_owned())
            ),
        };
        match last.kv.get(key) {
            None => {
                if let Some(w) = acked().next() {
                    return Some(lost(w));
                }
            }
            Some(entry) => {
                let Some(maker) = puts.iter().find(|p| value_of(p) == Some(&entry.value)) else {
                    return Some(Violation {
                        invariant: "acknowledged_writes",
                        at,
                        detail: format!("{key} ends with a value no client wrote"),
                    });
                };
                let Some((made_ret, _)) = maker.ret.as_ref() else {
                    continue;
                };
                if let Some(w) = acked().find(|w| w.call > *made_ret) {
                    return Some(lost(w));
                }
            }
        }
    }
    None
}

fn value_of(op: &Operation) -> Option<&Vec<u8>> {
    match &op.op {
        KvOp::Put(v) => Some(v),
        _ => None,
    }
}
