//! Node metadata spread by gossip: name, labels, zone, capacity, roles and the addresses of the
//! node's other endpoints. Every member sees every other member's metadata.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Longest node name, in bytes (a DNS label).
pub const MAX_NAME_LEN: usize = 63;
/// Most labels a node may carry.
pub const MAX_LABELS: usize = 32;
/// Longest label key or value, in bytes.
pub const MAX_LABEL_LEN: usize = 63;
/// Largest encoded metadata, in bytes, so an update always fits one gossip packet.
pub const MAX_ENCODED_META: usize = 900;

/// What a node tells the cluster about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// Human name, unique by convention (not enforced by gossip).
    pub name: String,
    /// Free-form `key=value` labels used by placement constraints.
    pub labels: BTreeMap<String, String>,
    /// Failure zone, from the `zone` label when present.
    pub zone: Option<String>,
    /// Resources this node offers to workloads.
    pub capacity: Capacity,
    /// What this node does in the cluster.
    pub roles: BTreeSet<Role>,
    /// Addresses of the node's other endpoints, by name (`api`, ...).
    pub endpoints: BTreeMap<String, SocketAddr>,
    /// Set when the node is leaving on purpose, so members record `left` rather than `down`.
    pub leaving: bool,
}

/// Resources a node offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory, in MiB.
    pub memory_mib: u64,
    /// Disk, in GiB.
    pub disk_gib: u64,
}

/// A role a node plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Holds the cluster CA key and join tokens: admits new nodes.
    Authority,
}

/// Metadata that breaks a limit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetaError {
    /// The name is empty, too long, or has characters outside `[A-Za-z0-9._-]`.
    #[error("node name {0:?} must be 1 to 63 characters of letters, digits, '.', '_' or '-'")]
    BadName(String),
    /// More labels than [`MAX_LABELS`].
    #[error("a node may carry at most {MAX_LABELS} labels, got {0}")]
    TooManyLabels(usize),
    /// A label key or value breaks the label rules.
    #[error(
        "label {0:?}: keys are 1 to 63 characters of letters, digits, '.', '_', '/' or '-'; values at most 63 printable characters"
    )]
    BadLabel(String),
    /// The whole record encodes larger than [`MAX_ENCODED_META`].
    #[error(
        "node metadata encodes to {0} bytes, more than the {MAX_ENCODED_META} that fit a gossip packet"
    )]
    TooLarge(usize),
}

fn name_ok(s: &str, extra: &[char]) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || extra.contains(&c)
        })
}

/// Checks a node name.
pub fn validate_name(name: &str) -> Result<(), MetaError> {
    if name_ok(name, &[]) {
        Ok(())
    } else {
        Err(MetaError::BadName(name.to_string()))
    }
}

/// Parses a `key=value` label, checking both halves.
pub fn parse_label(s: &str) -> Result<(String, String), MetaError> {
    let bad = || MetaError::BadLabel(s.chars().take(80).collect());
    let (k, v) = s.split_once('=').ok_or_else(bad)?;
    validate_label(k, v).map_err(|_| bad())?;
    Ok((k.to_string(), v.to_string()))
}

fn validate_label(k: &str, v: &str) -> Result<(), MetaError> {
    let value_ok = v.len() <= MAX_LABEL_LEN && v.chars().all(|c| c.is_ascii_graphic());
    if name_ok(k, &['/']) && value_ok {
        Ok(())
    } else {
        Err(MetaError::BadLabel(format!("{k}={v}")))
    }
}

impl NodeMeta {
    /// Checks every limit, including the encoded size.
    pub fn validate(&self) -> Result<(), MetaError> {
        validate_name(&self.name)?;
        if self.labels.len() > MAX_LABELS {
            return Err(MetaError::TooManyLabels(self.labels.len()));
        }
        for (k, v) in &self.labels {
            validate_label(k, v)?;
        }
        let len = postcard::to_allocvec(self)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if len > MAX_ENCODED_META {
            return Err(MetaError::TooLarge(len));
        }
        Ok(())
    }

    /// The address of a named endpoint, if the node announced one.
    pub fn endpoint(&self, name: &str) -> Option<SocketAddr> {
        self.endpoints.get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        assert_eq!(parse_label("zone=a").unwrap(), ("zone".into(), "a".into()));
        assert_eq!(
            parse_label("example.com/gpu=yes").unwrap().0,
            "example.com/gpu"
        );
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=x").is_err());
        assert!(parse_label("k=has space").is_err());
        assert!(parse_label(&format!("k={}", "v".repeat(64))).is_err());
    }

    #[test]
    fn oversized_meta_is_refused() {
        let mut meta = NodeMeta {
            name: "n1".into(),
            ..Default::default()
        };
        assert!(meta.validate().is_ok());
        for i in 0..MAX_LABELS {
            meta.labels
                .insert(format!("key-{i:02}-{}", "k".repeat(50)), "v".repeat(60));
        }
        assert!(matches!(meta.validate(), Err(MetaError::TooLarge(_))));
        meta.name = "bad name".into();
        assert!(matches!(meta.validate(), Err(MetaError::BadName(_))));
    }
}
