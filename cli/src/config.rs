//! [`AgentConfig`]: how one agent is configured. The binary fills it from its flags; a
//! simulator fills it in code. [`AgentConfig::validate`] refuses a bad one before anything
//! is touched.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use blx_membership::token::JoinToken;
use blx_vmm::qemu::Accel;

/// How long a node certificate is valid unless configured otherwise.
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// One agent's configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where the agent keeps its identity, certificates, Raft state and VM run directories.
    pub data_dir: PathBuf,
    /// UDP address of the QUIC endpoint (gossip and cluster traffic).
    pub bind: SocketAddr,
    /// Address other nodes reach this one at; None: `bind`, or when that is a wildcard, the
    /// host's first non-loopback IPv4 address.
    pub advertise: Option<SocketAddr>,
    /// HTTP API address. Beyond loopback the API speaks HTTPS with the node's certificate.
    pub api: SocketAddr,
    /// Node name; None: the host name if it is a valid name, else `node-<id>`.
    pub name: Option<String>,
    /// Gossip addresses of members to join through.
    pub seeds: Vec<SocketAddr>,
    /// Join token, for a data dir that has not joined a cluster yet.
    pub token: Option<JoinToken>,
    /// Node labels; `zone` sets the failure zone.
    pub labels: BTreeMap<String, String>,
    /// Announce on, and browse, the LAN over mDNS.
    pub mdns: bool,
    /// `GET /v1/metrics` asks for an API token of read scope, like every other route.
    pub metrics_need_token: bool,
    /// Take a Raft snapshot (and purge the log before it) every this many applied entries;
    /// at least 10.
    pub raft_snapshot_logs: u64,
    /// How long a fresh cluster's first join token is valid: 1 s to a year.
    pub bootstrap_token_ttl: Duration,
    /// How long the node certificates this agent signs are valid (10 s to a year; default
    /// 30 days). Nodes renew theirs two thirds of the way through.
    pub cert_validity: Duration,
    /// vCPUs offered to VMs (1 to 4096); None: the host's.
    pub vcpus: Option<u32>,
    /// Memory offered to VMs, in bytes (at least 1 MiB); None: the host's.
    pub memory_bytes: Option<u64>,
    /// Folder of named guest images.
    pub image_dir: PathBuf,
    /// QEMU acceleration.
    pub accel: Accel,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The advertised address is a wildcard.
    #[error("--advertise must be a concrete address, not {0}")]
    WildcardAdvertise(SocketAddr),
    /// The node name is not a valid name.
    #[error("{0}")]
    BadName(String),
    /// A label is not valid.
    #[error("{0}")]
    BadLabel(String),
    /// Snapshots would be taken too often.
    #[error("raft snapshot interval {0} is below the minimum of 10 entries")]
    SnapshotInterval(u64),
    /// The first token's lifetime is out of range.
    #[error("the bootstrap token TTL must be between 1 second and a year")]
    BootstrapTtl,
    /// The certificate validity is out of range.
    #[error("the certificate validity must be between 10 seconds and a year")]
    CertValidity,
    /// vCPUs out of range.
    #[error("vcpus must be between 1 and 4096, not {0}")]
    Vcpus(u32),
    /// Memory below 1 MiB.
    #[error("memory must be at least 1 MiB")]
    Memory,
}

impl AgentConfig {
    /// A configuration with the binary's defaults, keeping its data in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        AgentConfig {
            data_dir,
            bind: SocketAddr::from(([0, 0, 0, 0], 7946)),
            advertise: None,
            api: SocketAddr::from(([127, 0, 0, 1], 7947)),
            name: None,
            seeds: Vec::new(),
            token: None,
            labels: BTreeMap::new(),
            mdns: true,
            metrics_need_token: false,
            raft_snapshot_logs: 5000,
            bootstrap_token_ttl: Duration::from_secs(24 * 3600),
            cert_validity: DEFAULT_CERT_VALIDITY,
            vcpus: None,
            memory_bytes: None,
            image_dir: blx_vmm::image::default_dir(),
            accel: Accel::Auto,
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(a) = self.advertise
            && a.ip().is_unspecified()
        {
            return Err(ConfigError::WildcardAdvertise(a));
        }
        if let Some(name) = &self.name {
            blx_membership::meta::validate_name(name)
                .map_err(|e| ConfigError::BadName(e.to_string()))?;
        }
        for (k, v) in &self.labels {
            blx_membership::meta::parse_label(&format!("{k}={v}"))
                .map_err(|e| ConfigError::BadLabel(e.to_string()))?;
        }
        if self.raft_snapshot_logs < 10 {
            return Err(ConfigError::SnapshotInterval(self.raft_snapshot_logs));
        }
        if self.bootstrap_token_ttl < Duration::from_secs(1)
            || self.bootstrap_token_ttl > crate::duration::MAX_TTL
        {
            return Err(ConfigError::BootstrapTtl);
        }
        if self.cert_validity < Duration::from_secs(10)
            || self.cert_validity > crate::duration::MAX_TTL
        {
            return Err(ConfigError::CertValidity);
        }
        if let Some(n) = self.vcpus
            && !(1..=4096).contains(&n)
        {
            return Err(ConfigError::Vcpus(n));
        }
        if self.memory_bytes.is_some_and(|b| b < 1024 * 1024) {
            return Err(ConfigError::Memory);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_bad_field_is_named() {
        let ok = AgentConfig::new("/tmp/x".into());
        assert_eq!(ok.validate(), Ok(()));
        let mut c = ok.clone();
        c.api = "0.0.0.0:7947".parse().unwrap();
        assert_eq!(c.validate(), Ok(()), "beyond loopback the API is HTTPS");
        let mut c = ok.clone();
        c.advertise = Some("0.0.0.0:1".parse().unwrap());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::WildcardAdvertise(_))
        ));
        let mut c = ok.clone();
        c.name = Some("bad name!".into());
        assert!(matches!(c.validate(), Err(ConfigError::BadName(_))));
        let mut c = ok.clone();
        c.raft_snapshot_logs = 9;
        assert_eq!(c.validate(), Err(ConfigError::SnapshotInterval(9)));
        let mut c = ok.clone();
        c.bootstrap_token_ttl = Duration::ZERO;
        assert_eq!(c.validate(), Err(ConfigError::BootstrapTtl));
        let mut c = ok.clone();
        c.vcpus = Some(0);
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        let mut c = ok;
        c.memory_bytes = Some(1);
        assert_eq!(c.validate(), Err(ConfigError::Memory));
    }
}
