//! The async shell around [`Swim`]: feeds it packets, timer expiries and commands with tokio's
//! clock (which the simulator controls), and hands its output to a [`Transport`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::identity::NodeId;
use crate::meta::NodeMeta;
use crate::swim::{Member, MemberEvent, Swim};
use crate::transport::{Inbound, Transport};

enum Command {
    Join(Vec<SocketAddr>),
    SetMeta(NodeMeta),
    Leave(oneshot::Sender<()>),
}

/// A handle to a running membership task. Cheap to clone.
#[derive(Clone)]
pub struct Membership {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<MemberEvent>,
    table: watch::Receiver<Arc<BTreeMap<NodeId, Member>>>,
    stats: Arc<crate::swim::SwimStats>,
}

/// The membership task has stopped.
#[derive(Debug, thiserror::Error)]
#[error("the membership task has stopped")]
pub struct Stopped;

impl Membership {
    /// Starts the task that drives `swim`, sending through `transport` and reading `inbound`.
    pub fn spawn<T: Transport>(
        swim: Swim,
        transport: Arc<T>,
        inbound: mpsc::Receiver<Inbound>,
    ) -> Membership {
        let (commands, command_rx) = mpsc::channel(64);
        let (events, _) = broadcast::channel(1024);
        let (table_tx, table) = watch::channel(Arc::new(swim.members().clone()));
        let stats = swim.stats();
        tokio::spawn(run(
            swim,
            transport,
            inbound,
            command_rx,
            events.clone(),
            table_tx,
        ));
        Membership {
            commands,
            events,
            table,
            stats,
        }
    }

    /// What this node's SWIM has done so far.
    pub fn stats(&self) -> &Arc<crate::swim::SwimStats> {
        &self.stats
    }

    /// Announces to these addresses (and keeps announcing while nobody answers).
    pub async fn join(&self, seeds: Vec<SocketAddr>) -> Result<(), Stopped> {
        self.commands
            .send(Command::Join(seeds))
            .await
            .map_err(|_| Stopped)
    }

    /// Replaces this node's metadata.
    pub async fn set_meta(&self, meta: NodeMeta) -> Result<(), Stopped> {
        self.commands
            .send(Command::SetMeta(meta))
            .await
            .map_err(|_| Stopped)
    }

    /// Leaves the cluster gracefully; returns once the news is sent.
    pub async fn leave(&self) -> Result<(), Stopped> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Leave(tx))
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// The member table as of now.
    pub fn members(&self) -> Arc<BTreeMap<NodeId, Member>> {
        self.table.borrow().clone()
    }

    /// A watch on the member table, for waiting on a condition.
    pub fn watch(&self) -> watch::Receiver<Arc<BTreeMap<NodeId, Member>>> {
        self.table.clone()
    }

    /// Subscribes to membership events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<MemberEvent> {
        self.events.subscribe()
    }
}

async fn run<T: Transport>(
    mut swim: Swim,
    transport: Arc<T>,
    mut inbound: mpsc::Receiver<Inbound>,
    mut commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<MemberEvent>,
    table: watch::Sender<Arc<BTreeMap<NodeId, Member>>>,
) {
    let mut leaving: Option<(oneshot::Sender<()>, Instant)> = None;
    loop {
        while let Some((to, bytes)) = swim.poll_transmit() {
            transport.send(&to, bytes);
        }
        while let Some(event) = swim.poll_event() {
            tracing::info!(?event, "membership");
            let _ = events.send(event);
        }
        if **table.borrow() != *swim.members() {
            table.send_replace(Arc::new(swim.members().clone()));
        }
        if let Some((_, at)) = &leaving
            && Instant::now() >= *at
            && let Some((done, _)) = leaving.take()
        {
            let _ = done.send(());
        }
        let far = Instant::now() + Duration::from_secs(3600);
        let mut deadline = swim.poll_deadline().unwrap_or(far);
        if let Some((_, at)) = &leaving {
            deadline = deadline.min(*at);
        }
        tokio::select! {
            packet = inbound.recv() => match packet {
                Some(p) => {
                    if let Err(e) = swim.handle_packet(p.from, &p.bytes, Instant::now()) {
                        tracing::debug!(from = %p.addr, error = %e, "packet dropped");
                    }
                }
                None => return,
            },
            command = commands.recv() => match command {
                Some(Command::Join(seeds)) => swim.join(seeds, Instant::now()),
                Some(Command::SetMeta(meta)) => swim.set_meta(meta, Instant::now()),
                Some(Command::Leave(done)) => {
                    swim.leave(Instant::now());
                    // Give the transport a moment to put the news on the wire.
                    leaving = Some((done, Instant::now() + Duration::from_millis(300)));
                }
                None => return,
            },
            _ = tokio::time::sleep_until(deadline) => swim.handle_deadline(Instant::now()),
        }
    }
}
