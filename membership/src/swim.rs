//! The SWIM state machine: foca plus the member table, metadata and re-announcing that blx adds.
//!
//! Sans-IO, in the style of foca itself: packets and timer expiries go in through `handle_*`
//! with the current time, and what to send, when to wake up and which [`MemberEvent`]s happened
//! come out through `poll_*`. No clock or randomness is read here; the driver passes them in.
//!
//! ```text
//!  packet(from, bytes) ─┐                        ┌─▶ poll_transmit() -> (to, datagram)
//!  timer expiry(now) ───┼─▶ foca + member table ─┼─▶ poll_deadline()  -> next wake-up
//!  announce / leave /   │   + metadata versions  └─▶ poll_event()     -> MemberEvent
//!  set_meta ────────────┘
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use foca::{
    AccumulatingRuntime, BroadcastHandler, Foca, Invalidates, OwnedNotification, State, Timer,
};
use prometheus_client::metrics::counter::Counter;
use rand::rngs::StdRng;
use serde::Serialize;
use tokio::time::Instant;

use crate::identity::{NodeId, NodeIdentity};
use crate::meta::NodeMeta;
use crate::wire::{self, Datagram, MetaUpdate};

/// Largest foca packet: a QUIC datagram at quinn's initial 1200-byte MTU carries about 1160
/// bytes, and blx's own header takes two. Larger messages would go on a stream.
pub const MAX_PACKET: usize = 1100;

/// SWIM timing. Plain data; [`SwimConfig::lan`] is the default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwimConfig {
    /// How often each member probes one other member.
    pub probe_period: Duration,
    /// How long to wait for a direct ack before asking others to probe indirectly.
    /// Must be below `probe_period`.
    pub probe_rtt: Duration,
    /// Members asked to probe indirectly.
    pub indirect_probes: NonZeroUsize,
    /// How long a suspect has to refute before it is declared down.
    pub suspect_to_down_after: Duration,
    /// How long a down or left member is remembered before it is reaped.
    pub remove_down_after: Duration,
    /// How often each update is piggybacked, at least; the node raises it as the cluster grows
    /// (4 × log10(members + 1), as memberlist does).
    pub min_transmissions: NonZeroU8,
    /// How often to re-announce to a few members, so partitions heal.
    pub periodic_announce: Duration,
    /// How often to announce to one member this node holds down. After a split both halves
    /// hold the other down and never probe it; this is how they find each other again, so it
    /// bounds how long a healed partition stays split.
    pub announce_to_down: Duration,
    /// Longest wait between announces while no member is reachable.
    pub max_reannounce_backoff: Duration,
}

impl SwimConfig {
    /// Tuned for a LAN or one host: fast detection with room for refutation under loss.
    ///
    /// A probe is three packets over QUIC (the ping, the ack, and QUIC's acknowledgement of
    /// the ack), so the probe period sets most of an idle member's traffic: at 600 ms a member
    /// sends about as many gossip bytes as a Serf member probing once a second. A dead member
    /// is suspect one period after its missed probe and down 1.2 s later: about 2.2 s in all
    /// (Serf: 5 to 10 s). Five indirect probes keep suspicions rare under loss, so the short
    /// refutation window costs no false downs (`bench-membership.sh --soak`).
    pub fn lan() -> Self {
        SwimConfig {
            probe_period: Duration::from_millis(600),
            probe_rtt: Duration::from_millis(200),
            indirect_probes: NonZeroUsize::new(5).expect("non-zero"),
            suspect_to_down_after: Duration::from_millis(1200),
            remove_down_after: Duration::from_secs(3600),
            min_transmissions: NonZeroU8::new(3).expect("non-zero"),
            periodic_announce: Duration::from_secs(30),
            announce_to_down: Duration::from_secs(10),
            max_reannounce_backoff: Duration::from_secs(30),
        }
    }

    /// Checks the relations between fields.
    pub fn validate(&self) -> Result<(), String> {
        if self.probe_rtt >= self.probe_period {
            return Err("probe_rtt must be shorter than probe_period".into());
        }
        if self.probe_period.is_zero() || self.suspect_to_down_after.is_zero() {
            return Err("probe_period and suspect_to_down_after must be positive".into());
        }
        Ok(())
    }

    /// Transmissions per update for a cluster of `members`.
    pub fn transmissions_for(&self, members: usize) -> NonZeroU8 {
        let scaled = (4.0 * ((members + 1) as f64).log10())
            .ceil()
            .clamp(1.0, 255.0);
        #[allow(clippy::cast_possible_truncation)] // clamped to 1..=255 just above
        let scaled = scaled as u8;
        NonZeroU8::new(scaled)
            .unwrap_or(self.min_transmissions)
            .max(self.min_transmissions)
    }

    fn foca(&self, members: usize) -> foca::Config {
        let mut c = foca::Config::new_lan(std::num::NonZeroU32::new(16).expect("non-zero"));
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.num_indirect_probes = self.indirect_probes;
        c.suspect_to_down_after = self.suspect_to_down_after;
        c.remove_down_after = Some(self.remove_down_after);
        c.max_transmissions = self.transmissions_for(members);
        c.max_packet_size = NonZeroUsize::new(MAX_PACKET).expect("non-zero");
        c.notify_down_members = true;
        c.periodic_announce = Some(foca::PeriodicParams {
            frequency: self.periodic_announce,
            num_members: NonZeroUsize::new(1).expect("non-zero"),
        });
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: self.announce_to_down,
            num_members: NonZeroUsize::new(1).expect("non-zero"),
        });
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(200),
            num_members: NonZeroUsize::new(3).expect("non-zero"),
        });
        c
    }
}

/// A member's state as blx reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe; has `suspect_to_down_after` to refute.
    Suspect,
    /// Declared dead by the cluster.
    Down,
    /// Left on purpose.
    Left,
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
            MemberState::Left => "left",
        })
    }
}

/// One row of the member table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The member's current identity (address and generation).
    pub identity: NodeIdentity,
    /// Its state.
    pub state: MemberState,
    /// foca's incarnation: bumped by the member each time it refutes a suspicion.
    pub incarnation: u16,
    /// Its metadata, once learned.
    pub meta: Option<NodeMeta>,
}

/// A change in the member table, for crates that follow membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    /// A member became alive (joined, came back, or refuted a suspicion).
    Up(NodeId),
    /// A member missed probes and is suspected.
    Suspect(NodeId),
    /// A member was declared down.
    Down(NodeId),
    /// A member left on purpose.
    Left(NodeId),
    /// A member's metadata changed.
    MetaChanged(NodeId),
    /// A down or left member was forgotten.
    Reaped(NodeId),
}

#[derive(Default)]
struct MetaTable {
    known: BTreeMap<NodeId, (u64, NodeMeta)>,
    changed: BTreeSet<NodeId>,
}

impl MetaTable {
    /// Stores the update if it is newer; true if it was.
    fn offer(&mut self, update: MetaUpdate) -> bool {
        let newer = self
            .known
            .get(&update.id)
            .is_none_or(|(v, _)| update.version > *v);
        if newer {
            self.changed.insert(update.id);
            self.known.insert(update.id, (update.version, update.meta));
        }
        newer
    }
}

/// Key of a metadata broadcast: a newer version of the same node's metadata replaces an older.
struct MetaKey {
    id: NodeId,
    version: u64,
}

impl Invalidates for MetaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.id == other.id && self.version >= other.version
    }
}

/// Metadata carried on foca's broadcasts. A node's metadata is taken only from the node
/// itself: an update arriving in a packet from anyone but its subject is dropped, so no member
/// can announce another's labels, capacity, endpoints or `leaving` flag, or push its version
/// past what the node announced. (foca's header is checked against the connection's
/// certificate before foca sees the packet, so the sender here is authenticated.) Nothing
/// received is relayed either, since no relay would be believed: a node spreads its own
/// metadata on its own packets and pushes it to every member directly.
struct MetaBroadcasts {
    table: Arc<Mutex<MetaTable>>,
    own: NodeId,
}

impl BroadcastHandler<NodeIdentity> for MetaBroadcasts {
    type Key = MetaKey;
    type Error = wire::WireError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeIdentity>,
    ) -> Result<Option<MetaKey>, wire::WireError> {
        let update = wire::decode_meta_broadcast(data)?;
        let key = MetaKey {
            id: update.id,
            version: update.version,
        };
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match sender {
            // This node's own update, queued by `set_meta`: disseminate it.
            None if update.id == self.own => Ok(table.offer(update).then_some(key)),
            Some(from) if from.id == update.id => {
                table.offer(update);
                Ok(None)
            }
            _ => {
                tracing::debug!(subject = %update.id, from = ?sender.map(|s| s.id), "metadata about another node dropped");
                Ok(None)
            }
        }
    }
}

type FocaInstance = Foca<NodeIdentity, crate::wire::SwimCodec, StdRng, MetaBroadcasts>;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Wakeup {
    Foca(TimerSlot),
    Reannounce,
}

/// foca's `Timer` has no total order of its own that we can rely on for keys; we keep it
/// beside a sequence number instead.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TimerSlot(u64);

/// Why a packet was dropped. Nothing in the state changed.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// Not a blx message.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// The SWIM header names a different node than the sender's certificate.
    #[error("packet claims to be from {claimed:?} but the connection belongs to {actual:?}")]
    Spoofed {
        /// Who the header claims.
        claimed: NodeId,
        /// Whose certificate the connection carries.
        actual: NodeId,
    },
    /// foca refused the packet.
    #[error("swim: {0}")]
    Foca(String),
}

/// The SWIM state machine of one node.
pub struct Swim {
    foca: FocaInstance,
    runtime: AccumulatingRuntime<NodeIdentity>,
    config: SwimConfig,
    meta: Arc<Mutex<MetaTable>>,
    own_meta_version: u64,
    members: BTreeMap<NodeId, Member>,
    wakeups: BTreeMap<(Instant, u64), Wakeup>,
    foca_timers: BTreeMap<u64, Timer<NodeIdentity>>,
    next_seq: u64,
    outbox: VecDeque<(NodeIdentity, Bytes)>,
    events: VecDeque<MemberEvent>,
    seeds: BTreeSet<SocketAddr>,
    tuned_for: usize,
    reannounce_backoff: Duration,
    reannounce_armed: bool,
    /// Whether foca is probing (it said `Active`). After it renews its identity because the
    /// cluster declared it down, it waits without any timer until a message reaches it; if
    /// its own announcement of the new identity is lost, nothing ever would.
    active: bool,
    /// Members foca holds suspect: the incarnation suspected and since when.
    suspected: BTreeMap<NodeId, (u16, Instant)>,
    /// A member was just declared down (or left) here: gossip it at once rather than at the
    /// next periodic round (see [`Swim::drain_runtime`]).
    spread_down: bool,
    left: bool,
    stats: Arc<SwimStats>,
    /// This node's incarnation when last looked at, to count refutations.
    incarnation: u16,
}

/// What this node's SWIM has done, for the agent's metrics. Counted, never read back.
#[derive(Debug, Default)]
pub struct SwimStats {
    /// Direct probes sent.
    pub probes: Counter,
    /// Indirect probes asked of others.
    pub indirect_probes: Counter,
    /// Members this node turned suspect.
    pub suspicions: Counter,
    /// Suspicions of this node that it refuted (each bumps its incarnation).
    pub refutations: Counter,
    /// SWIM and metadata datagram bytes received.
    pub bytes_in: Counter,
    /// SWIM and metadata datagram bytes sent.
    pub bytes_out: Counter,
    /// SWIM and metadata datagrams sent.
    pub datagrams_out: Counter,
}

impl Swim {
    /// A node that knows nobody yet. `rng` is the only randomness foca gets.
    pub fn new(
        identity: NodeIdentity,
        meta: NodeMeta,
        config: SwimConfig,
        rng: StdRng,
        now: Instant,
    ) -> Self {
        let table = Arc::new(Mutex::new(MetaTable::default()));
        let foca = Foca::with_custom_broadcast(
            identity,
            config.foca(1),
            rng,
            crate::wire::SwimCodec::new(identity.addr),
            MetaBroadcasts {
                table: table.clone(),
                own: identity.id,
            },
        );
        let mut swim = Swim {
            foca,
            runtime: AccumulatingRuntime::new(),
            config,
            meta: table,
            // Versions continue across restarts: peers still hold the last generation's
            // metadata, and take only a higher version (a generation has 2^32 of its own).
            own_meta_version: identity.generation.saturating_mul(1 << 32),
            members: BTreeMap::new(),
            wakeups: BTreeMap::new(),
            foca_timers: BTreeMap::new(),
            next_seq: 0,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            seeds: BTreeSet::new(),
            tuned_for: 1,
            reannounce_backoff: Duration::from_millis(500),
            reannounce_armed: false,
            active: false,
            suspected: BTreeMap::new(),
            spread_down: false,
            left: false,
            stats: Default::default(),
            incarnation: 0,
        };
        swim.members.insert(
            identity.id,
            Member {
                identity,
                state: MemberState::Alive,
                incarnation: 0,
                meta: None,
            },
        );
        swim.set_meta(meta, now);
        swim
    }

    /// This node's identity.
    pub fn identity(&self) -> &NodeIdentity {
        self.foca.identity()
    }

    /// The member table, including this node, ordered by id.
    pub fn members(&self) -> &BTreeMap<NodeId, Member> {
        &self.members
    }

    /// Number of other members foca considers active (alive or suspect).
    pub fn active_members(&self) -> usize {
        self.foca.num_members()
    }

    /// Adds seed addresses and announces to them now; while no member answers, announces
    /// again with backoff, forever.
    pub fn join(&mut self, seeds: impl IntoIterator<Item = SocketAddr>, now: Instant) {
        let own = self.identity().addr;
        self.seeds.extend(seeds.into_iter().filter(|s| *s != own));
        self.announce_all(now);
    }

    /// Replaces this node's metadata and spreads it.
    pub fn set_meta(&mut self, meta: NodeMeta, now: Instant) {
        self.own_meta_version += 1;
        let update = MetaUpdate {
            id: self.identity().id,
            version: self.own_meta_version,
            meta,
        };
        let item = wire::encode_meta_broadcast(&update);
        if let Err(e) = self.foca.add_broadcast(&item) {
            tracing::warn!(error = %e, "could not queue a metadata broadcast");
        }
        // Also push directly to every active member: broadcasts are lossy.
        let direct = wire::encode_meta(&update);
        for m in self.foca.iter_members() {
            self.outbox.push_back((*m.id(), direct.clone()));
        }
        self.after_input(now);
    }

    /// Leaves the cluster: marks this node's metadata as leaving, then tells members it is down.
    /// After this, the driver should flush [`Swim::poll_transmit`] and stop.
    pub fn leave(&mut self, now: Instant) {
        if self.left {
            return;
        }
        let mut meta = self.own_meta().cloned().unwrap_or_default();
        meta.leaving = true;
        self.set_meta(meta, now);
        if let Err(e) = self.foca.leave_cluster(&mut self.runtime) {
            tracing::warn!(error = %e, "foca leave_cluster");
        }
        self.left = true;
        let me = self.identity().id;
        if let Some(me) = self.members.get_mut(&me) {
            me.state = MemberState::Left;
        }
        self.after_input(now);
    }

    fn own_meta(&self) -> Option<&NodeMeta> {
        self.members
            .get(&self.identity().id)
            .and_then(|m| m.meta.as_ref())
    }

    /// Handles one datagram from the peer whose certificate names `from`.
    pub fn handle_packet(
        &mut self,
        from: NodeId,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(), PacketError> {
        self.stats.bytes_in.inc_by(bytes.len() as u64);
        let result = match wire::decode_datagram(bytes)? {
            Datagram::Swim(packet) => {
                let header = foca::Codec::decode_header(
                    &mut wire::SwimCodec::new(self.foca.identity().addr),
                    packet,
                )
                .map_err(|e| PacketError::Wire(wire::WireError::Body(e.to_string())))?;
                if header.src.id != from {
                    return Err(PacketError::Spoofed {
                        claimed: header.src.id,
                        actual: from,
                    });
                }
                self.foca
                    .handle_data(packet, &mut self.runtime)
                    .map_err(|e| PacketError::Foca(e.to_string()))
            }
            Datagram::Meta(update) => {
                if update.id != from {
                    return Err(PacketError::Spoofed {
                        claimed: update.id,
                        actual: from,
                    });
                }
                self.meta
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .offer(update);
                Ok(())
            }
        };
        self.after_input(now);
        result
    }

    /// The next instant at which [`Swim::handle_deadline`] has work.
    pub fn poll_deadline(&self) -> Option<Instant> {
        self.wakeups.keys().next().map(|(at, _)| *at)
    }

    /// Runs every timer due at `now`, in deadline order.
    pub fn handle_deadline(&mut self, now: Instant) {
        while let Some(entry) = self.wakeups.first_entry() {
            if entry.key().0 > now {
                break;
            }
            match entry.remove() {
                Wakeup::Foca(TimerSlot(seq)) => {
                    if let Some(timer) = self.foca_timers.remove(&seq)
                        && let Err(e) = self.foca.handle_timer(timer, &mut self.runtime)
                    {
                        tracing::debug!(error = %e, "foca timer");
                    }
                }
                Wakeup::Reannounce => {
                    self.reannounce_armed = false;
                    if (self.foca.num_members() == 0 || !self.active) && !self.left {
                        self.announce_all(now);
                        self.reannounce_backoff =
                            (self.reannounce_backoff * 2).min(self.config.max_reannounce_backoff);
                    }
                }
            }
            self.drain_runtime(now);
        }
        self.after_input(now);
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<(NodeIdentity, Bytes)> {
        let next = self.outbox.pop_front();
        if let Some((_, bytes)) = &next {
            self.stats.bytes_out.inc_by(bytes.len() as u64);
            self.stats.datagrams_out.inc();
        }
        next
    }

    /// What this node's SWIM has done so far.
    pub fn stats(&self) -> Arc<SwimStats> {
        self.stats.clone()
    }

    /// The next membership event.
    pub fn poll_event(&mut self) -> Option<MemberEvent> {
        self.events.pop_front()
    }

    fn announce_all(&mut self, now: Instant) {
        let mut targets: BTreeSet<NodeIdentity> =
            self.seeds.iter().map(|a| NodeIdentity::seed(*a)).collect();
        let me = self.identity().id;
        targets.extend(
            self.members
                .values()
                .filter(|m| m.identity.id != me)
                .map(|m| m.identity),
        );
        for t in targets {
            if let Err(e) = self.foca.announce(t, &mut self.runtime) {
                tracing::debug!(error = %e, "announce");
            }
        }
        self.arm_reannounce(now);
        self.after_input(now);
    }

    fn arm_reannounce(&mut self, now: Instant) {
        if !self.reannounce_armed && !self.left {
            self.reannounce_armed = true;
            self.schedule(now + self.reannounce_backoff, Wakeup::Reannounce);
        }
    }

    fn schedule(&mut self, at: Instant, wakeup: Wakeup) {
        self.next_seq += 1;
        self.wakeups.insert((at, self.next_seq), wakeup);
    }

    /// Takes what foca produced: packets to the outbox, timers to the wakeups, notifications
    /// to the member table. When a member was declared down here, by this node's own
    /// suspicion running out or by news of it, foca is told to gossip at once: each member
    /// that learns of it passes it on to a few others straight away, so the whole cluster
    /// knows within a few round trips instead of a periodic round (200 ms) per hop. That
    /// costs a few packets per member each time one goes down, nothing in steady state.
    fn drain_runtime(&mut self, now: Instant) {
        loop {
            self.drain_runtime_once(now);
            if !std::mem::take(&mut self.spread_down) {
                break;
            }
            if let Err(e) = self.foca.gossip(&mut self.runtime) {
                tracing::debug!(error = %e, "gossip of a member down");
            }
        }
    }

    fn drain_runtime_once(&mut self, now: Instant) {
        let mut codec = wire::SwimCodec::new(self.foca.identity().addr);
        while let Some((to, packet)) = self.runtime.to_send() {
            match foca::Codec::decode_header(&mut codec, &packet[..]) {
                Ok(header) => {
                    // foca raises its own incarnation only to refute a suspicion of itself,
                    // and every packet it sends carries it.
                    if header.src_incarnation > self.incarnation {
                        self.stats
                            .refutations
                            .inc_by(u64::from(header.src_incarnation - self.incarnation));
                    }
                    self.incarnation = header.src_incarnation;
                    match header.message {
                        foca::Message::Ping(_) => self.stats.probes.inc(),
                        foca::Message::PingReq { .. } => self.stats.indirect_probes.inc(),
                        _ => 0,
                    }
                }
                Err(_) => 0,
            };
            self.outbox.push_back((to, wire::encode_swim(&packet)));
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.next_seq += 1;
            let seq = self.next_seq;
            self.foca_timers.insert(seq, timer);
            self.wakeups
                .insert((now + after, seq), Wakeup::Foca(TimerSlot(seq)));
        }
        while let Some(n) = self.runtime.to_notify() {
            self.handle_notification(n, now);
        }
    }

    fn handle_notification(&mut self, n: OwnedNotification<NodeIdentity>, now: Instant) {
        match n {
            OwnedNotification::MemberUp(id) => {
                // Tell the newcomer who we are directly: broadcasts of our metadata may be over.
                if let Some(update) = self.own_update() {
                    self.outbox.push_back((id, wire::encode_meta(&update)));
                }
                self.set_state(id, MemberState::Alive, None);
            }
            OwnedNotification::MemberDown(id) => {
                self.spread_down = true;
                let leaving = self.meta_of(&id.id).is_some_and(|m| m.leaving);
                self.set_state(
                    id,
                    if leaving {
                        MemberState::Left
                    } else {
                        MemberState::Down
                    },
                    None,
                );
            }
            OwnedNotification::Rename(old, new) => {
                if old.id != new.id {
                    self.set_state(old, MemberState::Down, None);
                } else if let Some(update) = self.own_update() {
                    // The same node under a new generation: it restarted and knows nobody's
                    // metadata. foca reports no MemberUp for it, so tell it ours as we would
                    // a newcomer, or it never learns it (a restarted leader would then
                    // record no other node, and fail none of them over).
                    self.outbox.push_back((new, wire::encode_meta(&update)));
                }
                if let Some(m) = self.members.get_mut(&new.id) {
                    m.identity = new;
                }
            }
            OwnedNotification::Idle | OwnedNotification::Rejoin(_) => {
                // Announce, with backoff, until foca is active again.
                self.active = false;
                self.reannounce_backoff = Duration::from_millis(500);
                self.arm_reannounce(now);
            }
            OwnedNotification::Defunct => self.active = false,
            OwnedNotification::Active => self.active = true,
        }
    }

    fn own_update(&self) -> Option<MetaUpdate> {
        let id = self.identity().id;
        let table = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        table.known.get(&id).map(|(version, meta)| MetaUpdate {
            id,
            version: *version,
            meta: meta.clone(),
        })
    }

    fn meta_of(&self, id: &NodeId) -> Option<NodeMeta> {
        self.meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .known
            .get(id)
            .map(|(_, m)| m.clone())
    }

    fn set_state(&mut self, identity: NodeIdentity, state: MemberState, incarnation: Option<u16>) {
        if identity.id.is_unknown() || identity.id == self.identity().id {
            return;
        }
        let meta = self.meta_of(&identity.id);
        let entry = self.members.entry(identity.id).or_insert_with(|| Member {
            identity,
            state: MemberState::Down,
            incarnation: 0,
            meta: None,
        });
        // An older generation never overrides a newer one.
        if identity.generation < entry.identity.generation {
            return;
        }
        entry.identity = identity;
        if let Some(i) = incarnation {
            entry.incarnation = i;
        }
        if entry.meta.is_none() {
            entry.meta = meta;
        }
        let was = entry.state;
        if was == state {
            return;
        }
        entry.state = state;
        if state == MemberState::Suspect {
            self.stats.suspicions.inc();
        }
        let id = identity.id;
        self.events.push_back(match state {
            MemberState::Alive => MemberEvent::Up(id),
            MemberState::Suspect => MemberEvent::Suspect(id),
            MemberState::Down => MemberEvent::Down(id),
            MemberState::Left => MemberEvent::Left(id),
        });
    }

    /// Brings the member table in line with foca and the metadata table after any input.
    fn after_input(&mut self, now: Instant) {
        self.drain_runtime(now);

        let size = self.foca.num_members() + 1;
        if self.config.transmissions_for(size) != self.config.transmissions_for(self.tuned_for)
            && let Err(e) = self.foca.set_config(self.config.foca(size))
        {
            tracing::warn!(error = %e, "could not retune foca");
        }
        self.tuned_for = size;
        // Suspicion, refutation and incarnations: foca does not notify these; read them.
        let foca_view: BTreeMap<NodeId, (NodeIdentity, State, u16)> = self
            .foca
            .iter_membership_state()
            .map(|m| (m.id().id, (*m.id(), m.state(), m.incarnation())))
            .collect();
        for (id, (identity, state, incarnation)) in &foca_view {
            let Some(member) = self.members.get(id) else {
                continue;
            };
            if member.identity != *identity {
                continue;
            }
            // foca starts the timer that turns a suspect down only when its own probe fails.
            // A suspicion heard through gossip whose origin then went away (it crashed, or
            // renewed its identity and so dropped its timers), about a member that never
            // heard of it and so never refuted it, stays in foca for good while the member
            // answers every probe (found by the simulator). Once a suspicion has outlived
            // what a real failure takes to be declared down, it is not reported any more.
            let stale = match state {
                State::Suspect => {
                    let (inc, since) = *self
                        .suspected
                        .entry(*id)
                        .and_modify(|e| {
                            if e.0 != *incarnation {
                                *e = (*incarnation, now);
                            }
                        })
                        .or_insert((*incarnation, now));
                    inc == *incarnation
                        && now.saturating_duration_since(since)
                            >= self.config.suspect_to_down_after * 3
                }
                _ => {
                    self.suspected.remove(id);
                    false
                }
            };
            let want = match (state, member.state) {
                (State::Suspect, MemberState::Alive) if !stale => Some(MemberState::Suspect),
                (State::Suspect, MemberState::Suspect) if stale => Some(MemberState::Alive),
                (State::Alive, MemberState::Suspect) => Some(MemberState::Alive),
                _ => None,
            };
            if let Some(m) = self.members.get_mut(id) {
                m.incarnation = *incarnation;
            }
            if let Some(want) = want {
                self.set_state(*identity, want, Some(*incarnation));
            }
        }
        // Reaping: foca forgot a down member, so do we.
        let me = self.identity().id;
        let reaped: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(id, m)| {
                **id != me
                    && matches!(m.state, MemberState::Down | MemberState::Left)
                    && !foca_view.contains_key(id)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in reaped {
            self.members.remove(&id);
            self.events.push_back(MemberEvent::Reaped(id));
        }
        // Metadata that arrived since the last input.
        let changed: Vec<NodeId> =
            std::mem::take(&mut self.meta.lock().unwrap_or_else(|e| e.into_inner()).changed)
                .into_iter()
                .collect();
        for id in changed {
            let meta = self.meta_of(&id);
            if id == me {
                if let Some(m) = self.members.get_mut(&id) {
                    m.meta = meta;
                }
                continue;
            }
            let Some(member) = self.members.get_mut(&id) else {
                continue;
            };
            member.meta = meta.clone();
            self.events.push_back(MemberEvent::MetaChanged(id));
            // A member that said it was leaving and is already down has left.
            if member.state == MemberState::Down && meta.is_some_and(|m| m.leaving) {
                member.state = MemberState::Left;
                self.events.push_back(MemberEvent::Left(id));
            }
        }
    }
}

#[cfg(test)]
#[path = "swim_test.rs"]
mod swim_test;
