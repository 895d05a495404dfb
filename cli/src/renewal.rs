//! Node certificate renewal: two thirds of the way through its certificate's validity, a node
//! makes a fresh key and asks a member, over its authenticated connection, for a certificate
//! naming its own id; it stores it and presents it on every new connection. The same task
//! closes connections whose peer certificate has expired since their handshake.

use std::sync::Arc;
use std::time::Duration;

use blx_membership::quic::QuicTransport;
use blx_membership::store::DataDir;
use blx_membership::tls::{NodeCredentials, PendingKey, Validity, node_id_of};
use blx_membership::wire::{ControlRequest, ControlResponse};
use blx_membership::{MemberState, Membership};

use crate::control::AgentControl;
use crate::world::{Entropy, WallClock};

/// How often the task looks at the clock.
const TICK: Duration = Duration::from_secs(1);
/// Pause after a failed attempt.
const RETRY: Duration = Duration::from_secs(5);

/// What the renewal task works with.
pub(crate) struct Renewal {
    pub(crate) dir: DataDir,
    pub(crate) transport: QuicTransport,
    pub(crate) membership: Membership,
    pub(crate) control: Arc<AgentControl>,
    pub(crate) clock: Arc<dyn WallClock>,
    pub(crate) entropy: Entropy,
    pub(crate) creds: NodeCredentials,
    /// The HTTPS API's certificate, when the API listens beyond loopback.
    pub(crate) serving: Option<blx_membership::tls::ServingCert>,
}

/// Why a certificate cannot be used at start.
pub(crate) fn expired_message(creds: &NodeCredentials, now_unix: u64) -> Option<String> {
    let v = Validity::of(&creds.cert_der)?;
    (now_unix > v.not_after_unix).then(|| {
        format!(
            "this node's certificate expired {}s ago (valid until Unix time {}), so every member \
             refuses it: it missed its renewal while stopped or cut off. Start with an empty \
             --data-dir and a new join token",
            now_unix - v.not_after_unix,
            v.not_after_unix
        )
    })
}

impl Renewal {
    /// Runs until the agent stops.
    pub(crate) async fn run(mut self) {
        let mut told_expired = false;
        loop {
            self.transport.close_expired();
            let now = self.clock.now_unix();
            match Validity::of(&self.creds.cert_der) {
                Some(v) if now >= v.renew_at() => match self.renew_once().await {
                    Ok(until) => {
                        told_expired = false;
                        tracing::info!(until, "renewed this node's certificate");
                    }
                    Err(e) => {
                        if now > v.not_after_unix && !told_expired {
                            tracing::error!(error = %e, "this node's certificate has expired and renewal failed: members refuse it");
                            told_expired = true;
                        } else {
                            tracing::warn!(error = %e, "certificate renewal failed; retrying");
                        }
                        tokio::time::sleep(RETRY).await;
                    }
                },
                Some(_) => {}
                None => {
                    tracing::error!("this node's certificate states no validity; not renewing");
                    return;
                }
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// One renewal: a member other than this node if one is alive, else this node itself.
    async fn renew_once(&mut self) -> Result<u64, String> {
        let me = self.creds.id;
        let pending = PendingKey::generate(self.entropy.bytes()).map_err(|e| e.to_string())?;
        let request = ControlRequest::Renew {
            csr_der: pending.csr_der.clone(),
        };
        let peers: Vec<_> = self
            .membership
            .members()
            .values()
            .filter(|m| m.state == MemberState::Alive && m.identity.id != me)
            .map(|m| (m.identity.addr, m.identity.id))
            .collect();
        let mut last = String::from("no member answered");
        let mut answer = None;
        for (addr, id) in peers {
            match self.transport.request(addr, Some(id), &request).await {
                Ok(ControlResponse::Renewed(cert)) => {
                    answer = Some(cert);
                    break;
                }
                Ok(ControlResponse::Failed(e)) => last = e,
                Ok(other) => last = format!("unexpected answer {other:?}"),
                Err(e) => last = e.to_string(),
            }
        }
        let cert = match answer {
            Some(cert) => cert,
            None => match self.control.renew(me, &pending.csr_der).await {
                ControlResponse::Renewed(cert) => cert,
                ControlResponse::Failed(e) => return Err(format!("{last}; here: {e}")),
                other => return Err(format!("unexpected answer {other:?}")),
            },
        };
        if node_id_of(&cert) != Some(me) {
            return Err("the renewed certificate names another node".into());
        }
        let until = Validity::of(&cert)
            .ok_or("the renewed certificate states no validity")?
            .not_after_unix;
        let creds = pending.into_credentials(me, cert, self.creds.ca_der.to_vec());
        self.dir
            .save_credentials(&creds)
            .map_err(|e| e.to_string())?;
        self.transport
            .use_credentials(&creds)
            .map_err(|e| e.to_string())?;
        if let Some(serving) = &self.serving {
            serving.replace(&creds).map_err(|e| e.to_string())?;
        }
        self.creds = creds;
        Ok(until)
    }
}
