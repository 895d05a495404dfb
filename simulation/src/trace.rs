//! The trace of a run: a line for each thing that matters when it changes (each host's Raft
//! role, term, leader and applied state; its view of the members; where VMs run; faults;
//! every client operation and its result), and a SHA-256 over the lines. Two runs of one seed
//! give the same lines and so the same hash.

use std::collections::BTreeMap;

use crate::invariants::{Sample, state_digest};
use crate::linearizability::{KvOp, KvResult, Operation};

/// The event log and its running hash.
pub(crate) struct Trace {
    hasher: ring::digest::Context,
    keep: bool,
    events: Vec<String>,
    last: BTreeMap<String, String>,
}

impl Trace {
    pub(crate) fn new(keep: bool) -> Self {
        Trace {
            hasher: ring::digest::Context::new(&ring::digest::SHA256),
            keep,
            events: Vec::new(),
            last: BTreeMap::new(),
        }
    }

    pub(crate) fn event(&mut self, line: String) {
        self.hasher.update(line.as_bytes());
        self.hasher.update(b"\n");
        if self.keep {
            self.events.push(line);
        }
    }

    /// Records what changed since the last sample.
    pub(crate) fn sample(&mut self, sample: &Sample) {
        let t = sample.at.as_secs_f64();
        for host in &sample.hosts {
            let raft = host
                .raft
                .as_ref()
                .map(|r| {
                    format!(
                        "{} term {} leader {}",
                        r.role,
                        r.term,
                        r.leader.map(|l| format!("{l:016x}")).unwrap_or("-".into())
                    )
                })
                .unwrap_or_else(|| "down".into());
            let applied = host
                .applied
                .as_ref()
                .map(|(i, s)| {
                    let d = state_digest(s);
                    format!(
                        "applied {i} state {:02x}{:02x}{:02x}{:02x}",
                        d[0], d[1], d[2], d[3]
                    )
                })
                .unwrap_or_default();
            let members: Vec<String> = host
                .members
                .iter()
                .map(|(id, st)| format!("{}={st}", id.short()))
                .collect();
            self.changed(format!("h{} raft", host.index), t, raft);
            self.changed(format!("h{} state", host.index), t, applied);
            self.changed(format!("h{} members", host.index), t, members.join(","));
        }
        let vms: Vec<String> = sample
            .vms
            .keys()
            .map(|(vm, host)| format!("{vm}@{host}"))
            .collect();
        self.changed("vms".into(), t, vms.join(","));
    }

    fn changed(&mut self, what: String, t: f64, now: String) {
        if self.last.get(&what) != Some(&now) {
            self.event(format!("{t:.3}s {what} {now}"));
            self.last.insert(what, now);
        }
    }

    /// Records every client operation with its times and result.
    pub(crate) fn history(&mut self, ops: &[Operation]) {
        for op in ops {
            let what = match &op.op {
                KvOp::Put(v) => format!("put {} {}", op.key, String::from_utf8_lossy(v)),
                KvOp::Get => format!("get {}", op.key),
                KvOp::Delete => format!("delete {}", op.key),
            };
            let ret = match &op.ret {
                None => "unknown".to_string(),
                Some((t, KvResult::Ok)) => format!("ok at {t}"),
                Some((t, KvResult::Value(v))) => format!(
                    "{:?} at {t}",
                    v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned())
                ),
            };
            self.event(format!(
                "client {} {what} called {} -> {ret}",
                op.client, op.call
            ));
        }
    }

    pub(crate) fn hash(&self) -> String {
        self.hasher
            .clone()
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub(crate) fn into_events(self) -> Vec<String> {
        self.events
    }
}
