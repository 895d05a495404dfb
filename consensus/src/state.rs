//! The replicated cluster state and the only way to change it: typed [`Command`]s, each
//! validated in full before anything is touched, so a command applies whole or not at all.
//! The same check runs before a command is proposed and again when it is applied.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::authority::{AuthorityCommand, AuthorityState};
use crate::workload::{NodeRecord, VmRecord, WorkloadApplied, WorkloadCommand};

/// Longest KV key, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Largest KV value, in bytes.
pub const MAX_VALUE_LEN: usize = 512 * 1024;
/// Config versions kept for `rollback`.
pub const CONFIG_HISTORY: usize = 32;

/// Cluster-wide settings, versioned. Read from the API with unknown fields refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How many voters the autopilot keeps: odd, 1 to 9.
    pub desired_voters: u8,
    /// Seconds a voter may stay down before the autopilot replaces it.
    pub voter_grace_secs: u64,
    /// Seconds a learner must stay healthy before it is promoted.
    pub stabilization_secs: u64,
    /// Entries a learner may trail the leader by and still count as caught up.
    pub max_learner_lag: u64,
    /// How the scheduler chooses among nodes that fit: `Binpack` or `Spread`.
    pub scheduler: blx_scheduler::Strategy,
    /// Seconds a node may stay down before its VMs are placed elsewhere. Failure detection
    /// has already waited out its suspicion period when a node counts as down.
    pub vm_grace_secs: u64,
    /// Learners the autopilot keeps beside the voters, ready to replace one: 0 to 9. Every
    /// node beyond the voters and these is a client, outside Raft.
    pub standby_servers: u8,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            desired_voters: 3,
            voter_grace_secs: 30,
            stabilization_secs: 5,
            max_learner_lag: 256,
            scheduler: blx_scheduler::Strategy::Binpack,
            vm_grace_secs: 0,
            standby_servers: 2,
        }
    }
}

impl ClusterConfig {
    /// Checks the config on its own (not against the cluster's size).
    pub fn validate(&self) -> Result<(), CommandError> {
        if self.desired_voters == 0
            || self.desired_voters.is_multiple_of(2)
            || self.desired_voters > 9
        {
            return Err(CommandError::InvalidConfig(format!(
                "desired_voters must be odd and between 1 and 9 (got {}): an even count adds a voter without adding fault tolerance",
                self.desired_voters
            )));
        }
        if self.voter_grace_secs == 0
            || self.stabilization_secs > 3600
            || self.voter_grace_secs > 86_400
        {
            return Err(CommandError::InvalidConfig(
                "voter_grace_secs must be 1 to 86400 and stabilization_secs at most 3600".into(),
            ));
        }
        if self.standby_servers > 9 {
            return Err(CommandError::InvalidConfig(format!(
                "standby_servers must be at most 9 (got {})",
                self.standby_servers
            )));
        }
        if self.vm_grace_secs > 86_400 {
            return Err(CommandError::InvalidConfig(
                "vm_grace_secs must be at most 86400".into(),
            ));
        }
        Ok(())
    }
}

/// A value in the KV namespace, with the Raft indexes that created and last changed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    /// The value.
    pub value: Vec<u8>,
    /// Log index of the write that created the key.
    pub create_index: u64,
    /// Log index of the last write; what compare-and-set compares against.
    pub modify_index: u64,
}

/// The state every node replicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The current config and its version (the log index that set it).
    pub config: (u64, ClusterConfig),
    /// Earlier configs, newest last.
    pub config_history: Vec<(u64, ClusterConfig)>,
    /// The KV namespace, ordered by key.
    pub kv: BTreeMap<String, KvEntry>,
    /// Nodes by hex id, as the leader's membership recorded them.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// VMs by name.
    pub vms: BTreeMap<String, VmRecord>,
    /// The cluster CA and join tokens, once the first agent has moved them here.
    pub authority: Option<AuthorityState>,
}

impl ClusterState {
    /// A copy without the CA key and token records: what `operator snapshot save` writes.
    pub fn without_secrets(&self) -> ClusterState {
        ClusterState {
            authority: None,
            ..self.clone()
        }
    }
}

/// A change to [`ClusterState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets a key. With `cas`, only if the key's modify index equals it (0: only if absent).
    KvPut {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// Compare-and-set index.
        cas: Option<u64>,
    },
    /// Deletes a key. With `cas`, only if the key's modify index equals it.
    KvDelete {
        /// The key.
        key: String,
        /// Compare-and-set index.
        cas: Option<u64>,
    },
    /// Replaces the cluster config. `nodes` is how many nodes the cluster has, for the check
    /// that it does not ask for more voters than there are nodes.
    ConfigSet {
        /// The new config.
        config: ClusterConfig,
        /// Nodes in the cluster when the command was made.
        nodes: u32,
    },
    /// Restores the config that preceded the current one.
    ConfigRollback,
    /// Replaces the KV namespace and config with a saved snapshot's (`operator snapshot
    /// restore`). The config history keeps the config being replaced.
    Restore {
        /// The saved state.
        state: Box<ClusterState>,
    },
    /// A change to nodes or VMs.
    Workload(WorkloadCommand),
    /// A change to the cluster CA or join tokens.
    Authority(AuthorityCommand),
    /// Several clients' commands in one log entry, applied in order, each whole or not at all
    /// on its own: the leader groups writes that arrive together, so they share one append
    /// and one fsync. Never nested.
    Batch(Vec<Command>),
}

/// Most commands in one [`Command::Batch`].
pub const MAX_BATCH: usize = 1024;

/// Why a command was refused. Refused commands change nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    /// The key is empty, too long, or not printable.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The value is over [`MAX_VALUE_LEN`].
    #[error("value of {0} bytes is over the {MAX_VALUE_LEN}-byte limit")]
    ValueTooLarge(usize),
    /// Compare-and-set found another modify index.
    #[error("compare-and-set failed: key {key:?} is at index {actual}, not {expected}")]
    CasMismatch {
        /// The key.
        key: String,
        /// The index the caller expected.
        expected: u64,
        /// The key's index now (0: absent).
        actual: u64,
    },
    /// The config breaks a rule.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// Rollback with no earlier version.
    #[error("no earlier config version to roll back to")]
    NothingToRollBack,
    /// A VM spec breaks a rule.
    #[error("invalid VM: {0}")]
    InvalidVm(String),
    /// A VM of that name exists.
    #[error("a VM named {0} already exists")]
    VmExists(String),
    /// No VM of that name.
    #[error("no VM named {0}")]
    NoSuchVm(String),
    /// No node of that id.
    #[error("no node {0} in the cluster")]
    NoSuchNode(String),
    /// The command was made against a state that has moved on.
    #[error("{0}")]
    Conflict(String),
    /// Token commands before the CA is in the replicated state.
    #[error("the cluster CA is not in the replicated state yet")]
    NoAuthority,
    /// The join token was refused by the committed token records.
    #[error(transparent)]
    JoinRefused(blx_membership::token::JoinRefusal),
}

/// What an applied command answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// A log entry that carried no command (a leader's blank entry, a membership change).
    Nothing,
    /// A KV write took effect at this index.
    Kv {
        /// The key's new modify index.
        index: u64,
    },
    /// A delete; whether the key existed.
    Deleted {
        /// The key existed.
        existed: bool,
    },
    /// The config is now at this version.
    Config {
        /// The version (log index).
        version: u64,
    },
    /// A workload command took effect.
    Workload(WorkloadApplied),
    /// A token revocation; whether the token existed.
    Revoked {
        /// The token existed.
        existed: bool,
    },
    /// Each command of a batch's own outcome, in order.
    Batch(Vec<Result<Applied, CommandError>>),
}

fn check_key(key: &str) -> Result<(), CommandError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(|c| c.is_control()) {
        return Err(CommandError::InvalidKey(format!(
            "keys are 1 to {MAX_KEY_LEN} bytes without control characters (got {} bytes)",
            key.len()
        )));
    }
    Ok(())
}

impl ClusterState {
    /// Checks a command against this state without changing anything.
    pub fn validate(&self, cmd: &Command) -> Result<(), CommandError> {
        match cmd {
            Command::KvPut { key, value, cas } => {
                check_key(key)?;
                if value.len() > MAX_VALUE_LEN {
                    return Err(CommandError::ValueTooLarge(value.len()));
                }
                self.check_cas(key, *cas)
            }
            Command::KvDelete { key, cas } => {
                check_key(key)?;
                self.check_cas(key, *cas)
            }
            Command::ConfigSet { config, nodes } => {
                config.validate()?;
                if u32::from(config.desired_voters) > (*nodes).max(1) {
                    return Err(CommandError::InvalidConfig(format!(
                        "desired_voters {} is more than the {nodes} nodes in the cluster",
                        config.desired_voters
                    )));
                }
                Ok(())
            }
            Command::ConfigRollback => {
                if self.config_history.is_empty() {
                    Err(CommandError::NothingToRollBack)
                } else {
                    Ok(())
                }
            }
            Command::Restore { state } => {
                state.config.1.validate()?;
                for (key, entry) in &state.kv {
                    check_key(key)?;
                    if entry.value.len() > MAX_VALUE_LEN {
                        return Err(CommandError::ValueTooLarge(entry.value.len()));
                    }
                }
                Ok(())
            }
            Command::Workload(w) => self.validate_workload(w),
            Command::Authority(a) => self.validate_authority(a),
            // Each command is checked when it is applied, against the state the ones before it
            // left; the batch itself only has a shape to respect.
            Command::Batch(cmds) => {
                if cmds.is_empty()
                    || cmds.len() > MAX_BATCH
                    || cmds.iter().any(|c| matches!(c, Command::Batch(_)))
                {
                    return Err(CommandError::InvalidConfig(format!(
                        "a batch holds 1 to {MAX_BATCH} commands and no batch"
                    )));
                }
                Ok(())
            }
        }
    }

    fn check_cas(&self, key: &str, cas: Option<u64>) -> Result<(), CommandError> {
        let Some(expected) = cas else { return Ok(()) };
        let actual = self.kv.get(key).map(|e| e.modify_index).unwrap_or(0);
        if actual == expected {
            Ok(())
        } else {
            Err(CommandError::CasMismatch {
                key: key.to_string(),
                expected,
                actual,
            })
        }
    }

    /// Applies a command at log `index`: validates it again, then changes the state.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Result<Applied, CommandError> {
        self.validate(cmd)?;
        Ok(match cmd {
            Command::KvPut { key, value, .. } => {
                let create_index = self.kv.get(key).map(|e| e.create_index).unwrap_or(index);
                self.kv.insert(
                    key.clone(),
                    KvEntry {
                        value: value.clone(),
                        create_index,
                        modify_index: index,
                    },
                );
                Applied::Kv { index }
            }
            Command::KvDelete { key, .. } => Applied::Deleted {
                existed: self.kv.remove(key).is_some(),
            },
            Command::ConfigSet { config, .. } => {
                let previous = std::mem::replace(&mut self.config, (index, config.clone()));
                self.config_history.push(previous);
                if self.config_history.len() > CONFIG_HISTORY {
                    self.config_history.remove(0);
                }
                Applied::Config { version: index }
            }
            Command::ConfigRollback => {
                let (_, previous) = self
                    .config_history
                    .pop()
                    .ok_or(CommandError::NothingToRollBack)?;
                self.config = (index, previous);
                Applied::Config { version: index }
            }
            Command::Restore { state } => {
                let previous = std::mem::replace(&mut self.config, (index, state.config.1.clone()));
                self.config_history.push(previous);
                self.kv = state.kv.clone();
                Applied::Config { version: index }
            }
            Command::Workload(w) => Applied::Workload(self.apply_workload(index, w)),
            Command::Batch(cmds) => {
                Applied::Batch(cmds.iter().map(|c| self.apply(index, c)).collect())
            }
            Command::Authority(a) => {
                let existed = self.apply_authority(a);
                match a {
                    AuthorityCommand::TokenRevoke(_) | AuthorityCommand::ApiTokenRevoke(_) => {
                        Applied::Revoked { existed }
                    }
                    _ => Applied::Nothing,
                }
            }
        })
    }

    /// Keys starting with `prefix`, in order.
    pub fn list(&self, prefix: &str) -> impl Iterator<Item = (&String, &KvEntry)> {
        self.kv
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put(key: &str, value: &[u8], cas: Option<u64>) -> Command {
        Command::KvPut {
            key: key.into(),
            value: value.to_vec(),
            cas,
        }
    }

    #[test]
    fn cas_and_indexes_behave_like_consul() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(5, &put("a", b"1", Some(0))),
            Ok(Applied::Kv { index: 5 })
        );
        assert_eq!(
            s.apply(6, &put("a", b"2", Some(0))),
            Err(CommandError::CasMismatch {
                key: "a".into(),
                expected: 0,
                actual: 5
            })
        );
        assert_eq!(
            s.apply(7, &put("a", b"3", Some(5))),
            Ok(Applied::Kv { index: 7 })
        );
        assert_eq!(
            s.kv["a"],
            KvEntry {
                value: b"3".to_vec(),
                create_index: 5,
                modify_index: 7
            }
        );
        assert_eq!(
            s.apply(
                8,
                &Command::KvDelete {
                    key: "a".into(),
                    cas: Some(5)
                }
            )
            .unwrap_err(),
            CommandError::CasMismatch {
                key: "a".into(),
                expected: 5,
                actual: 7
            }
        );
        assert_eq!(
            s.apply(
                9,
                &Command::KvDelete {
                    key: "a".into(),
                    cas: None
                }
            ),
            Ok(Applied::Deleted { existed: true })
        );
    }

    #[test]
    fn bad_configs_are_refused_and_rollback_restores() {
        let mut s = ClusterState::default();
        for bad in [0u8, 2, 4, 11] {
            let config = ClusterConfig {
                desired_voters: bad,
                ..Default::default()
            };
            assert!(matches!(
                s.apply(1, &Command::ConfigSet { config, nodes: 20 }),
                Err(CommandError::InvalidConfig(_))
            ));
        }
        let too_many_standbys = ClusterConfig {
            standby_servers: 10,
            ..Default::default()
        };
        assert!(matches!(
            s.apply(
                1,
                &Command::ConfigSet {
                    config: too_many_standbys,
                    nodes: 20
                }
            ),
            Err(CommandError::InvalidConfig(m)) if m.contains("standby_servers")
        ));
        let five = ClusterConfig {
            desired_voters: 5,
            ..Default::default()
        };
        assert!(
            s.apply(
                1,
                &Command::ConfigSet {
                    config: five.clone(),
                    nodes: 3
                }
            )
            .is_err(),
            "more voters than nodes"
        );
        assert_eq!(
            s,
            ClusterState::default(),
            "refused commands change nothing"
        );
        assert_eq!(
            s.apply(2, &Command::ConfigRollback),
            Err(CommandError::NothingToRollBack)
        );
        s.apply(
            3,
            &Command::ConfigSet {
                config: five.clone(),
                nodes: 5,
            },
        )
        .unwrap();
        assert_eq!(s.config, (3, five));
        s.apply(4, &Command::ConfigRollback).unwrap();
        assert_eq!(s.config.1, ClusterConfig::default());
    }

    #[test]
    fn a_batch_applies_each_command_on_its_own_in_order() {
        let mut s = ClusterState::default();
        let batch = Command::Batch(vec![
            put("a", b"1", Some(0)),
            put("a", b"2", Some(0)),
            put("b", b"3", None),
        ]);
        let Ok(Applied::Batch(results)) = s.apply(4, &batch) else {
            panic!("a batch answers per command");
        };
        assert_eq!(results[0], Ok(Applied::Kv { index: 4 }));
        assert!(
            matches!(results[1], Err(CommandError::CasMismatch { .. })),
            "the second sees the first"
        );
        assert_eq!(results[2], Ok(Applied::Kv { index: 4 }));
        assert_eq!(s.kv["a"].value, b"1");
        for bad in [
            Command::Batch(vec![]),
            Command::Batch(vec![Command::Batch(vec![put("x", b"", None)])]),
        ] {
            assert!(s.apply(5, &bad).is_err());
        }
    }

    #[test]
    fn prefix_listing_is_ordered_and_bounded() {
        let mut s = ClusterState::default();
        for (i, k) in ["b/2", "a/1", "b/1", "c", "b"].iter().enumerate() {
            s.apply(i as u64 + 1, &put(k, b"x", None)).unwrap();
        }
        let keys: Vec<&String> = s.list("b/").map(|(k, _)| k).collect();
        assert_eq!(keys, ["b/1", "b/2"]);
    }

    proptest! {
        /// Whatever the commands, a refused one leaves the state exactly as it was.
        #[test]
        fn refused_commands_change_nothing(ops in proptest::collection::vec((0u8..4, "[a-c]{0,2}", proptest::option::of(0u64..6), 0u8..12), 1..40)) {
            let mut s = ClusterState::default();
            for (i, (kind, key, cas, voters)) in ops.into_iter().enumerate() {
                let cmd = match kind {
                    0 => put(&key, b"v", cas),
                    1 => Command::KvDelete { key, cas },
                    2 => Command::ConfigSet { config: ClusterConfig { desired_voters: voters, ..Default::default() }, nodes: 5 },
                    _ => Command::ConfigRollback,
                };
                let before = s.clone();
                if s.apply(i as u64 + 1, &cmd).is_err() {
                    prop_assert_eq!(&s, &before);
                }
            }
        }
    }
}
