//! LAN discovery over mDNS / DNS-SD: members announce `_blx._udp.local.` with the cluster's CA
//! fingerprint in a TXT record; a joiner with a token and no seed browses for services whose
//! fingerprint matches its token, and joins through the first one that answers.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};

use crate::identity::NodeId;
use crate::tls::hex;

/// The DNS-SD service type.
pub const SERVICE_TYPE: &str = "_blx._udp.local.";

/// mDNS failures.
#[derive(Debug, thiserror::Error)]
#[error("mDNS: {0}")]
pub struct DiscoveryError(String);

fn err(e: impl std::fmt::Display) -> DiscoveryError {
    DiscoveryError(e.to_string())
}

/// The TXT value that names a cluster: the first 16 bytes of the CA fingerprint, in hex.
pub fn cluster_tag(ca_fingerprint: &[u8; 32]) -> String {
    hex(&ca_fingerprint[..16])
}

/// A running mDNS responder announcing this agent. Stops announcing when dropped.
pub struct Announcer {
    daemon: ServiceDaemon,
}

impl Announcer {
    /// Announces the agent's gossip address. `addr` with an unspecified IP announces every
    /// interface's address.
    pub fn start(
        node: NodeId,
        addr: SocketAddr,
        ca_fingerprint: &[u8; 32],
    ) -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new().map_err(err)?;
        let instance = format!("blx-{}", node.short());
        let host = format!("{instance}.local.");
        let props = [
            ("ca", cluster_tag(ca_fingerprint)),
            ("id", node.to_string()),
        ];
        let info = if addr.ip().is_unspecified() {
            ServiceInfo::new(SERVICE_TYPE, &instance, &host, "", addr.port(), &props[..])
                .map_err(err)?
                .enable_addr_auto()
        } else {
            ServiceInfo::new(
                SERVICE_TYPE,
                &instance,
                &host,
                addr.ip(),
                addr.port(),
                &props[..],
            )
            .map_err(err)?
        };
        daemon.register(info).map_err(err)?;
        Ok(Announcer { daemon })
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

/// Browses for up to `wait` and returns the gossip addresses of agents of the cluster with this
/// CA fingerprint, as soon as at least one is found.
pub async fn find_cluster(
    ca_fingerprint: &[u8; 32],
    wait: Duration,
) -> Result<Vec<SocketAddr>, DiscoveryError> {
    let daemon = ServiceDaemon::new().map_err(err)?;
    let events = daemon.browse(SERVICE_TYPE).map_err(err)?;
    let tag = cluster_tag(ca_fingerprint);
    let mut found = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + wait;
    while found.is_empty() {
        let event = match tokio::time::timeout_at(deadline, events.recv_async()).await {
            Ok(Ok(event)) => event,
            _ => break,
        };
        if let ServiceEvent::ServiceResolved(service) = event {
            if service.txt_properties.get_property_val_str("ca") != Some(tag.as_str()) {
                continue;
            }
            for ip in &service.addresses {
                let ip = ip.to_ip_addr();
                if matches!(ip, IpAddr::V4(_)) && !ip.is_loopback() {
                    found.insert(SocketAddr::new(ip, service.port));
                }
            }
        }
    }
    let _ = daemon.shutdown();
    Ok(found.into_iter().collect())
}
