//! The audit log: every state-changing command this node proposed as leader, with who asked
//! (the member the request came through and the API token, if one), when, what, and how it
//! ended. Written where the decision is made, on the leader, since only the leader sees the
//! caller of every command; a leader change moves the log to the new leader's data dir.
//!
//! Records are JSON lines in `<data dir>/audit/audit.log`, rotated to `audit.log.1` (the one
//! older file kept) when the log passes [`MAX_BYTES`], and leave as OTLP log records when logs
//! are exported (target `blx::audit`, JSON lines as the body, and `command`, `outcome` and
//! `count` attributes). They never go to standard error, where one line per write would drown
//! everything else.
//!
//! One OTLP record can carry several audit lines. A record made inside an exported trace
//! leaves on its own at once, carrying its trace id. The others wait, up to [`HOLD`], to leave
//! together, naming no trace, with the records around them of the same command and outcome, up to
//! [`GROUP_LINES`] lines. At tens of thousands of writes a second, one OTLP record per write
//! cost the leader several percent of its throughput in the SDK's per-record work; the bytes
//! sent are about the same either way.
//! `GET /v1/audit` and `blx audit tail` read them back.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blx_consensus::access::Caller;
use blx_consensus::machine::Response;
use blx_consensus::state::Command;
use blx_membership::NodeId;
use serde::{Deserialize, Serialize};

/// Size at which the log is rotated.
pub(crate) const MAX_BYTES: u64 = 8 * 1024 * 1024;
/// The longest a record waits for others to leave with it.
pub(crate) const HOLD: std::time::Duration = std::time::Duration::from_millis(100);
/// The most audit lines in one OTLP log record.
pub(crate) const GROUP_LINES: u32 = 64;
const FILE: &str = "audit.log";
const OLDER: &str = "audit.log.1";

/// One audit record, as written and as `GET /v1/audit` answers it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
#[allow(missing_docs)] // JSON shapes: each field is the JSON field of that name.
pub struct AuditRecord {
    /// Numbers this node's records in order, across rotations and restarts.
    pub seq: u64,
    /// Unix milliseconds on the leader.
    pub at_ms: u64,
    /// The member the command came through (this node for its own).
    pub node: String,
    /// `node`, or `api token <id>`.
    pub caller: String,
    /// The command's kind (`kv_put`, `vm_create`, ...).
    pub command: String,
    /// What it names: a key, a VM, a node, when it names one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
    /// `applied`, `refused: ...` or `failed: ...`.
    pub outcome: String,
}

/// This node's audit log.
pub(crate) struct AuditLog {
    dir: PathBuf,
    inner: Mutex<Inner>,
    failures: prometheus_client::metrics::counter::Counter,
}

struct Inner {
    next_seq: u64,
    file: Option<std::fs::File>,
    size: u64,
    /// Lines waiting to leave as one OTLP log record.
    outgoing: Option<Outgoing>,
}

/// Audit lines of one command and outcome, for one OTLP log record.
struct Outgoing {
    command: &'static str,
    outcome: &'static str,
    /// The lines, newline-separated, as the file holds them (without the last newline).
    body: String,
    lines: u32,
}

impl Inner {
    /// Hands `line` to the OTLP pipeline: at once when it was written inside an exported trace
    /// (so that it carries the trace's id), otherwise with the lines around it.
    fn send(&mut self, command: &'static str, outcome: &'static str, line: &str) {
        let single = || Outgoing {
            command,
            outcome,
            body: line.to_string(),
            lines: 1,
        };
        if crate::telemetry::in_exported_trace() {
            if let Some(earlier) = self.outgoing.take() {
                earlier.emit(false);
            }
            single().emit(true);
            return;
        }
        match self.outgoing.as_mut() {
            Some(o) if o.command == command && o.outcome == outcome => {
                o.body.push('\n');
                o.body.push_str(line);
                o.lines += 1;
                if o.lines >= GROUP_LINES
                    && let Some(full) = self.outgoing.take()
                {
                    full.emit(false);
                }
            }
            _ => {
                if let Some(earlier) = self.outgoing.replace(single()) {
                    earlier.emit(false);
                }
            }
        }
    }
}

impl Outgoing {
    /// Sends the lines as one record, naming the current span's trace if `traced`.
    fn emit(self, traced: bool) {
        crate::telemetry::emit_log(
            "blx::audit",
            self.body,
            [
                ("command", self.command.into()),
                ("outcome", self.outcome.into()),
                ("count", i64::from(self.lines).into()),
            ],
            traced,
        );
    }
}

impl AuditLog {
    /// The log under `dir` (created if needed); `failures` counts records it could not write.
    pub(crate) fn open(
        dir: &Path,
        failures: prometheus_client::metrics::counter::Counter,
    ) -> std::io::Result<AuditLog> {
        std::fs::create_dir_all(dir)?;
        let last = read_records(dir)?.last().map(|r| r.seq).unwrap_or(0);
        Ok(AuditLog {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                next_seq: last + 1,
                file: None,
                size: 0,
                outgoing: None,
            }),
            failures,
        })
    }

    /// Records one command and its outcome.
    pub(crate) fn record(
        &self,
        at_ms: u64,
        node: NodeId,
        caller: Caller,
        cmd: &Command,
        outcome: &Result<Response, String>,
    ) {
        let (kind, outcome) = match outcome {
            Ok(Ok(_)) => ("applied", "applied".to_string()),
            Ok(Err(e)) => ("refused", format!("refused: {e}")),
            Err(e) => ("failed", format!("failed: {e}")),
        };
        let command = crate::raft::command_name(cmd);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let record = AuditRecord {
            seq: inner.next_seq,
            at_ms,
            node: node.to_string(),
            caller: caller.to_string(),
            command: command.to_string(),
            target: command_target(cmd),
            outcome,
        };
        inner.next_seq += 1;
        // Serialized once: the line of the file is also the body of the OTLP record, so a
        // collector receives exactly what `blx audit tail` prints. The two attributes are
        // static strings, for routing and filtering in a pipeline without parsing the body.
        let line = match serde_json::to_string(&record) {
            Ok(line) => line,
            Err(e) => {
                self.failures.inc();
                tracing::warn!(error = %e, "cannot encode an audit record");
                return;
            }
        };
        if crate::telemetry::logs_exported() {
            inner.send(command, kind, &line);
        }
        if let Err(e) = self.append(&mut inner, line) {
            inner.file = None;
            self.failures.inc();
            tracing::warn!(error = %e, dir = %self.dir.display(), "cannot write the audit log");
        }
    }

    /// Sends the lines still waiting every [`HOLD`], until the task is dropped. The agent
    /// runs it while logs are exported, and calls [`AuditLog::flush`] when it stops.
    pub(crate) async fn flush_periodically(self: std::sync::Arc<Self>) {
        let mut every = tokio::time::interval(HOLD);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.flush();
        }
    }

    /// Sends the lines still waiting.
    pub(crate) fn flush(&self) {
        let waiting = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .outgoing
            .take();
        if let Some(o) = waiting {
            o.emit(false);
        }
    }

    fn append(&self, inner: &mut Inner, mut line: String) -> std::io::Result<()> {
        line.push('\n');
        if inner.file.is_some() && inner.size + line.len() as u64 > MAX_BYTES {
            inner.file = None;
            // The older file goes first, so the rename replaces nothing: on a rename that
            // replaces a file ext4 starts writing the renamed one out at once
            // (`auto_da_alloc`), and under load those 8 MiB went ahead of the fsyncs on the
            // same disk, the Raft log's included: the slowest writes fell at rotations.
            match std::fs::remove_file(self.dir.join(OLDER)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            std::fs::rename(self.dir.join(FILE), self.dir.join(OLDER))?;
        }
        if inner.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(FILE))?;
            inner.size = file.metadata()?.len();
            inner.file = Some(file);
        }
        if let Some(file) = inner.file.as_mut() {
            file.write_all(line.as_bytes())?;
            inner.size += line.len() as u64;
        }
        Ok(())
    }

    /// The records after `after`, oldest first, at most `limit` of the newest.
    pub(crate) fn read(&self, after: u64, limit: usize) -> std::io::Result<Vec<AuditRecord>> {
        // Hold the lock so a rotation does not happen between the two files.
        let _inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut records: Vec<AuditRecord> = read_records(&self.dir)?
            .into_iter()
            .filter(|r| r.seq > after)
            .collect();
        let skip = records.len().saturating_sub(limit);
        records.drain(..skip);
        Ok(records)
    }
}

/// Every readable record under `dir`, oldest first; a torn last line (a crash mid-write) is
/// skipped.
fn read_records(dir: &Path) -> std::io::Result<Vec<AuditRecord>> {
    let mut out = Vec::new();
    for name in [OLDER, FILE] {
        let file = match std::fs::File::open(dir.join(name)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in std::io::BufReader::new(file).lines() {
            if let Ok(r) = serde_json::from_str::<AuditRecord>(&line?) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// What a command names, for the record.
fn command_target(cmd: &Command) -> Option<String> {
    use blx_consensus::workload::WorkloadCommand as W;
    match cmd {
        Command::KvPut { key, .. } | Command::KvDelete { key, .. } => Some(key.clone()),
        Command::Workload(w) => match w {
            W::VmCreate { spec, .. } => Some(spec.name.clone()),
            W::VmSetDesired { name, desired, .. } => Some(format!("{name} -> {desired:?}")),
            W::VmDelete { name } => Some(name.clone()),
            W::VmReports { node, .. } => Some(node.clone()),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str) -> Command {
        Command::KvPut {
            key: key.into(),
            value: b"v".to_vec(),
            cas: None,
        }
    }

    #[test]
    fn records_survive_rotation_and_a_restart_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), Default::default()).unwrap();
        let node = NodeId([1; 8]);
        let ok: Result<Response, String> = Ok(Ok(blx_consensus::state::Applied::Kv { index: 1 }));
        log.record(1, node, Caller::Node, &put("a"), &ok);
        // Force a rotation before the next record.
        log.inner.lock().unwrap().size = MAX_BYTES;
        log.record(2, node, Caller::Node, &put("b"), &Err("no leader".into()));
        assert!(dir.path().join(OLDER).is_file());
        drop(log);
        let log = AuditLog::open(dir.path(), Default::default()).unwrap();
        log.record(3, node, Caller::Node, &put("c"), &ok);
        let all = log.read(0, 10).unwrap();
        let seqs: Vec<u64> = all.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(all[0].target.as_deref(), Some("a"));
        assert_eq!(all[0].outcome, "applied");
        assert_eq!(all[1].outcome, "failed: no leader");
        assert_eq!(all[0].command, "kv_put");
        assert_eq!(
            log.read(1, 1)
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            vec![3]
        );
    }
}
