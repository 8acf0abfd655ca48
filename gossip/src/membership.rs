//! The pure SWIM state machine: foca plus in-order timers, sender
//! authentication, metadata and a live view. No sockets, no clock reads.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use foca::{AccumulatingRuntime, Foca, OwnedNotification, State, Timer};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use crate::codec::{CodecError, MsgpackCodec, SYNC_TAG, SyncChunk, peek_header};
use crate::config::{ConfigError, GossipConfig, Timing};
use crate::identity::{NodeId, NodeIdentity};
use crate::meta::{self, MetaHandler, MetaTable, NodeMeta};

/// First re-announce delay while joining: a lost announce or reply costs about
/// one probe period, no more.
const JOIN_RETRY_MIN: Duration = Duration::from_millis(500);

/// Longest delay between re-announces while no seed answers, so a node started
/// before its seeds joins within seconds of them coming up without flooding.
const JOIN_RETRY_MAX: Duration = Duration::from_secs(5);

/// How often a member pulls a full member list from a random member (besides
/// right after joining). Repairs views that missed an update that SWIM stopped
/// retransmitting; ~40 B per member, so 4 KB per period at 100 members.
const SYNC_PERIOD: Duration = Duration::from_secs(5);

/// A member answers sync requests from the same peer at most this often, so a
/// misbehaving peer cannot make it send its member list in a loop.
const SYNC_REPLY_INTERVAL: Duration = Duration::from_secs(1);

type Swim = Foca<NodeIdentity, MsgpackCodec, StdRng, MetaHandler>;

/// A gossip packet to hand to the transport (one QUIC datagram).
#[derive(Clone, Debug)]
pub struct Transmit {
    /// Who to send it to; the transport dials `to.addr` if it has no connection
    /// to `to.id`, and must check the peer's certificate proves `to.id`.
    pub to: NodeIdentity,
    /// The packet.
    pub data: Bytes,
}

/// A membership change, for the ring and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    /// A member became active (alive or suspect).
    Up(NodeIdentity),
    /// A member was declared down or left.
    Down(NodeIdentity),
    /// This node is known by at least one live member (joined, or rejoined).
    Joined,
    /// Every known member is gone; the driver should announce to seeds again.
    Isolated,
    /// This node was declared down while alive and renewed its identity.
    Renewed(NodeIdentity),
    /// A member answered this node's request for its member list, and the
    /// list was applied: after joining, the view is now as complete as that
    /// member's (the first one tells a new node it can route).
    Synced,
}

/// SWIM state of a member in the live view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe; will be declared down unless it refutes.
    Suspect,
    /// Declared down (kept for a while so stale gossip cannot revive it).
    Down,
}

/// One member as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberView {
    /// The member's identity.
    pub identity: NodeIdentity,
    /// foca's incarnation (bumped by the member to refute suspicion).
    pub incarnation: u16,
    /// Its SWIM state.
    pub state: MemberState,
    /// The last metadata it published, if it reached us.
    pub meta: Option<NodeMeta>,
}

/// Why an incoming gossip packet was dropped. The membership state is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// Larger than the configured maximum packet size.
    #[error("gossip packet of {0} bytes exceeds the maximum")]
    Oversized(usize),
    /// Not a gossip packet this node can decode.
    #[error(transparent)]
    Malformed(#[from] CodecError),
    /// The packet says it is from another node than the one the connection's
    /// certificate proved.
    #[error("gossip packet claims to be from {claimed} but arrived from {actual}")]
    SpoofedSender {
        /// Id in the packet header.
        claimed: NodeId,
        /// Id proven by the connection's certificate.
        actual: NodeId,
    },
    /// foca refused the packet (for example a message to an old identity).
    #[error("gossip packet refused: {0}")]
    Refused(#[from] foca::Error),
}

/// Counters, for `/metrics` and the benchmarks.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct GossipStats {
    /// Packets handed to the transport.
    pub packets_out: u64,
    /// Bytes handed to the transport.
    pub bytes_out: u64,
    /// Packets received and accepted by foca.
    pub packets_in: u64,
    /// Bytes received (accepted or not).
    pub bytes_in: u64,
    /// Packets whose header named another node than the connection proved.
    pub spoofed_dropped: u64,
    /// Packets that did not decode, were too big or that foca refused.
    pub invalid_dropped: u64,
    /// Suspicions the member refuted before they ran out.
    pub refuted_suspicions: u64,
    /// Metadata about a node new to us, refused because the table held
    /// [`crate::meta::MAX_META_ENTRIES`] (only a peer forging broadcasts
    /// for made-up ids fills it).
    pub meta_refused: u64,
}

/// A scheduled foca timer; ordered by deadline, then by scheduling order, so
/// timers are delivered in the order foca asked for them (foca issue #26).
struct Scheduled {
    at: Instant,
    seq: u64,
    timer: Timer<NodeIdentity>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap and we want the earliest first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// SWIM membership for one node, driven by `handle_*` and drained by `poll_*`.
///
/// Call order, after any `handle_*` or [`Membership::announce`]: drain
/// [`Membership::poll_transmit`] and [`Membership::poll_event`], then sleep until
/// [`Membership::poll_timeout`] and call [`Membership::handle_timeout`].
pub struct Membership {
    foca: Swim,
    runtime: AccumulatingRuntime<NodeIdentity>,
    timers: BinaryHeap<Scheduled>,
    timer_seq: u64,
    meta: MetaTable,
    /// See [`GossipStats::meta_refused`].
    meta_refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    own_meta: NodeMeta,
    transmits: VecDeque<Transmit>,
    events: VecDeque<MemberEvent>,
    seeds: Vec<NodeIdentity>,
    rng: StdRng,
    sync_due: Option<Instant>,
    sync_replied: HashMap<NodeId, Instant>,
    /// Peers we asked for a sync and have not answered yet (at most one per
    /// sync period, and only members: bounded by the cluster size).
    sync_requested: std::collections::HashSet<NodeId>,
    /// Set once this node leaves; foca then reports itself defunct.
    left: bool,
    join_due: Option<Instant>,
    join_attempt: u32,
    /// Members reported up and not since reported down: the view consumers see.
    up: BTreeMap<NodeId, NodeIdentity>,
    stats: GossipStats,
    max_packet_size: usize,
    /// The RTT-dependent timers in force; foca's own copies of them are only
    /// used to schedule, and [`Membership::schedule`] replaces them.
    timing: Timing,
    config: GossipConfig,
    /// A requested member list was applied whole by the packet being
    /// handled.
    synced: bool,
    /// The member whose answer to our request has more chunks to come.
    list_from: Option<NodeId>,
}

impl Membership {
    /// A node that knows nobody yet. `rng` must be seeded by the caller.
    pub fn new(
        identity: NodeIdentity,
        config: &GossipConfig,
        mut rng: StdRng,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let own_rng = StdRng::seed_from_u64(rng.random());
        let table = MetaTable::default();
        let meta_refused = std::sync::Arc::<std::sync::atomic::AtomicU64>::default();
        let foca = Foca::with_custom_broadcast(
            identity,
            config.to_foca(),
            rng,
            MsgpackCodec::default(),
            MetaHandler {
                table: table.clone(),
                own: identity.id,
                refused: meta_refused.clone(),
            },
        );
        let own_meta = NodeMeta {
            id: identity.id,
            generation: identity.generation,
            seq: 0,
            ingress: None,
            load: 0,
        };
        meta::lock(&table).insert(identity.id, own_meta.clone());
        Ok(Membership {
            foca,
            runtime: AccumulatingRuntime::new(),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            meta: table,
            meta_refused,
            own_meta,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            up: BTreeMap::new(),
            seeds: Vec::new(),
            rng: own_rng,
            sync_due: None,
            sync_replied: HashMap::new(),
            sync_requested: std::collections::HashSet::new(),
            left: false,
            join_due: None,
            join_attempt: 0,
            stats: GossipStats::default(),
            max_packet_size: config.max_packet_size.get(),
            timing: config.timing(),
            config: config.clone(),
            synced: false,
            list_from: None,
        })
    }

    /// This node's current identity (changes when it renews).
    pub fn identity(&self) -> NodeIdentity {
        *self.foca.identity()
    }

    /// Adds a seed (a node to join through) and announces to it now. Until this
    /// node sees at least one member up, it re-announces to every seed with
    /// capped exponential backoff; if it later finds itself alone
    /// ([`MemberEvent::Isolated`]) it starts over. A packet lost on the way
    /// therefore delays a join, it never prevents one.
    pub fn add_seed(&mut self, now: Instant, seed: NodeIdentity) {
        if seed.id == self.identity().id {
            return;
        }
        match self.seeds.iter_mut().find(|s| s.id == seed.id) {
            Some(known) => *known = seed,
            None => self.seeds.push(seed),
        }
        self.announce(now, seed);
        if self.up.is_empty() && self.join_due.is_none() {
            self.join_attempt = 0;
            self.join_due = Some(now + JOIN_RETRY_MIN);
        }
    }

    /// Asks `seed` to let us in. `seed` only needs the right id and address; the
    /// generation is not checked for announcements.
    pub fn announce(&mut self, now: Instant, seed: NodeIdentity) {
        if let Err(err) = self.foca.announce(seed, &mut self.runtime) {
            tracing::debug!(%err, "announce failed");
        }
        self.drain(now);
    }

    /// Leaves the cluster gracefully: tells some members we are going, so they
    /// mark us down at once instead of after a failed probe and suspicion.
    pub fn leave(&mut self, now: Instant) {
        let identity = self.identity();
        self.left = true;
        // `leave_cluster` consumes nothing else; a second call is harmless.
        if let Err(err) = self.foca.leave_cluster(&mut self.runtime) {
            tracing::debug!(%err, ?identity, "leave failed");
        }
        self.drain(now);
    }

    /// Feeds a packet that arrived on a connection authenticated as `from`.
    pub fn handle_data(
        &mut self,
        now: Instant,
        from: NodeId,
        data: &[u8],
    ) -> Result<(), GossipError> {
        self.stats.bytes_in += data.len() as u64;
        let result = self.accept(now, from, data);
        match &result {
            Ok(()) => self.stats.packets_in += 1,
            Err(GossipError::SpoofedSender { .. }) => self.stats.spoofed_dropped += 1,
            Err(_) => self.stats.invalid_dropped += 1,
        }
        self.drain(now);
        if std::mem::take(&mut self.synced) {
            // After the members it brought came up.
            self.events.push_back(MemberEvent::Synced);
        }
        result
    }

    fn accept(&mut self, now: Instant, from: NodeId, data: &[u8]) -> Result<(), GossipError> {
        if data.len() > self.max_packet_size {
            return Err(GossipError::Oversized(data.len()));
        }
        if data.first() == Some(&SYNC_TAG) {
            return self.accept_sync(now, from, SyncChunk::decode(data)?);
        }
        let header = peek_header(data)?;
        if header.src.id != from {
            return Err(GossipError::SpoofedSender {
                claimed: header.src.id,
                actual: from,
            });
        }
        self.foca.handle_data(data, &mut self.runtime)?;
        Ok(())
    }

    fn accept_sync(
        &mut self,
        now: Instant,
        from: NodeId,
        chunk: SyncChunk,
    ) -> Result<(), GossipError> {
        // Like foca, trust member lists only from active members (a node
        // that was cut off holds stale states) or in answer to our own
        // request. Anyone the cluster CA vouches for may still ask for ours:
        // a newcomer syncs before every member has heard of it.
        let solicited = self.sync_requested.remove(&from);
        let trusted = solicited || self.up.contains_key(&from);
        // The answer to our request may come in several chunks: the list is
        // whole once its last chunk is applied.
        let answering = solicited || self.list_from == Some(from);
        let more = chunk.more;
        // The sender lists itself; its certificate proved `from`.
        let Some(peer) = chunk
            .members
            .iter()
            .map(|m| *m.id())
            .find(|id| id.id == from)
            .or_else(|| self.up.get(&from).copied())
        else {
            return Ok(());
        };
        // Others already know these states; applying without re-broadcast
        // keeps a sync from flooding the cluster with stale updates.
        if trusted {
            self.foca
                .apply_many(chunk.members.into_iter(), false, &mut self.runtime)?;
            if answering {
                self.list_from = more.then_some(from);
                self.synced |= !more;
            }
        }
        if chunk.reply_wanted {
            let recent = self
                .sync_replied
                .get(&from)
                .is_some_and(|at| now.saturating_duration_since(*at) < SYNC_REPLY_INTERVAL);
            if !recent {
                self.sync_replied.insert(from, now);
                self.send_sync(peer, false);
            }
        }
        Ok(())
    }

    /// Sends our member list (and ourselves) to `to`.
    fn send_sync(&mut self, to: NodeIdentity, reply_wanted: bool) {
        let mut members: Vec<_> = self.foca.iter_membership_state().cloned().collect();
        members.push(foca::Member::new(
            self.identity(),
            self.foca_incarnation(),
            foca::State::Alive,
        ));
        for data in SyncChunk::split(&members, reply_wanted, self.max_packet_size) {
            self.stats.packets_out += 1;
            self.stats.bytes_out += data.len() as u64;
            self.transmits.push_back(Transmit {
                to,
                data: Bytes::from(data),
            });
        }
    }

    fn foca_incarnation(&self) -> u16 {
        // foca does not expose our own incarnation; the sync carries 0, which
        // never overrides fresher knowledge (updates only win with a higher
        // incarnation or a worse state).
        0
    }

    fn sync_with_random_member(&mut self, now: Instant) {
        self.sync_due = Some(now + SYNC_PERIOD);
        if self.up.is_empty() {
            return;
        }
        let pick = self.rng.random_range(0..self.up.len());
        if let Some(&peer) = self.up.values().nth(pick) {
            // A reply may arrive in several chunks; the first one clears this,
            // later ones are applied only if the sender is an active member.
            self.sync_requested.insert(peer.id);
            self.send_sync(peer, true);
        }
    }

    /// When [`Membership::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.timers.peek().map(|s| s.at),
            self.join_due,
            self.sync_due,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Fires every timer due at `now`, in the order they were scheduled.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.join_due.is_some_and(|due| due <= now) {
            self.retry_join(now);
        }
        if self.sync_due.is_some_and(|due| due <= now) {
            self.sync_with_random_member(now);
        }
        while self.timers.peek().is_some_and(|s| s.at <= now) {
            let Some(due) = self.timers.pop() else { break };
            if self.is_stale_suspicion(&due.timer) {
                self.stats.refuted_suspicions += 1;
                continue;
            }
            if let Err(err) = self.foca.handle_timer(due.timer, &mut self.runtime) {
                tracing::debug!(%err, "gossip timer failed");
            }
            self.drain(now);
        }
    }

    /// The next packet to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next membership change.
    pub fn poll_event(&mut self) -> Option<MemberEvent> {
        self.events.pop_front()
    }

    /// Publishes this node's ingress address and load to the cluster.
    pub fn set_meta(&mut self, ingress: Option<SocketAddr>, load: u32) {
        self.own_meta.ingress = ingress;
        self.own_meta.load = load;
        self.publish_meta();
    }

    fn publish_meta(&mut self) {
        let me = self.identity();
        self.own_meta.generation = me.generation;
        self.own_meta.seq += 1;
        // foca passes our own broadcast through the handler too, which stores
        // it in the table and queues it only if it is newer than what the
        // table holds, so the table must not be updated first.
        match self.foca.add_broadcast(&self.own_meta.encode()) {
            Ok(true) => {}
            Ok(false) => tracing::warn!("metadata broadcast not newer than the last one"),
            Err(err) => tracing::warn!(%err, "could not queue metadata broadcast"),
        }
    }

    /// Every member this node tracks (alive, suspect, or recently down), not
    /// including itself.
    pub fn members(&self) -> Vec<MemberView> {
        let table = meta::lock(&self.meta);
        self.foca
            .iter_membership_state()
            .map(|m| MemberView {
                identity: *m.id(),
                incarnation: m.incarnation(),
                state: match m.state() {
                    foca::State::Alive => MemberState::Alive,
                    foca::State::Suspect => MemberState::Suspect,
                    foca::State::Down => MemberState::Down,
                },
                meta: table
                    .get(&m.id().id)
                    .filter(|meta| meta.generation == m.id().generation)
                    .cloned(),
            })
            .collect()
    }

    /// Counters since start.
    pub fn stats(&self) -> GossipStats {
        GossipStats {
            meta_refused: self.meta_refused.load(std::sync::atomic::Ordering::Relaxed),
            ..self.stats
        }
    }

    fn retry_join(&mut self, now: Instant) {
        if !self.up.is_empty() || self.seeds.is_empty() {
            self.join_due = None;
            return;
        }
        for seed in self.seeds.clone() {
            self.announce(now, seed);
        }
        self.join_attempt = self.join_attempt.saturating_add(1);
        let backoff = JOIN_RETRY_MIN
            .saturating_mul(1 << self.join_attempt.min(8))
            .min(JOIN_RETRY_MAX);
        self.join_due = Some(now + backoff);
    }

    /// Whether `timer` ends a suspicion that the member has since refuted.
    /// foca 2.0 checks the incarnation before declaring the member down, but
    /// then sends it `TurnUndead` even when the check failed, and a member
    /// that receives one renews its identity: every refuted suspicion would
    /// end in a false "down" and a rejoin (seen under load, where a starved
    /// node is suspected and refutes in time). Such timers are not delivered.
    fn is_stale_suspicion(&self, timer: &Timer<NodeIdentity>) -> bool {
        let Timer::ChangeSuspectToDown {
            member_id,
            incarnation,
            ..
        } = timer
        else {
            return false;
        };
        !self.foca.iter_membership_state().any(|m| {
            m.id() == member_id && m.state() == State::Suspect && m.incarnation() == *incarnation
        })
    }

    /// The RTT-dependent timers in force.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Replaces the RTT-dependent timers (see [`Timing::for_rtt`]). foca
    /// cannot change its probe period or probe RTT at runtime, but it only
    /// uses them to schedule its timers, and every timer goes through
    /// [`Membership::schedule`]: the new values apply from the next probe
    /// and the next suspicion on; timers already set keep their time.
    pub fn set_timing(&mut self, timing: Timing) -> Result<(), ConfigError> {
        if timing.probe_rtt >= timing.probe_period {
            return Err(ConfigError::RttNotBelowPeriod {
                rtt: timing.probe_rtt,
                period: timing.probe_period,
            });
        }
        if timing.probe_rtt.is_zero() || timing.suspect_to_down_after.is_zero() {
            return Err(ConfigError::Zero("timing"));
        }
        let mut config = self.config.to_foca();
        config.suspect_to_down_after = timing.suspect_to_down_after;
        // Only the suspicion time may change in foca; the probe timers are
        // replaced when scheduled.
        self.foca
            .set_config(config)
            .map_err(|err| ConfigError::Refused(err.to_string()))?;
        self.timing = timing;
        Ok(())
    }

    fn schedule(&mut self, now: Instant, after: Duration, timer: Timer<NodeIdentity>) {
        let after = match timer {
            Timer::ProbeRandomMember(_) => self.timing.probe_period,
            Timer::SendIndirectProbe { .. } => self.timing.probe_rtt,
            Timer::ChangeSuspectToDown { .. } => self.timing.suspect_to_down_after,
            _ => after,
        };
        self.timer_seq += 1;
        self.timers.push(Scheduled {
            at: now + after,
            seq: self.timer_seq,
            timer,
        });
    }

    /// Moves what foca produced into our queues.
    fn drain(&mut self, now: Instant) {
        while let Some((to, data)) = self.runtime.to_send() {
            self.stats.packets_out += 1;
            self.stats.bytes_out += data.len() as u64;
            self.transmits.push_back(Transmit { to, data });
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.schedule(now, after, timer);
        }
        let mut republish = false;
        while let Some(n) = self.runtime.to_notify() {
            match n {
                OwnedNotification::MemberUp(id) => {
                    // A newcomer missed our earlier metadata broadcasts.
                    republish = true;
                    self.mark_up(id);
                }
                OwnedNotification::MemberDown(id) => self.mark_down(id.id),
                OwnedNotification::Rename(_old, new) => {
                    // Same node id, new run. foca reports only the rename when
                    // liveness did not change, but the old run's state is gone:
                    // consumers see the old run go down and the new one come up.
                    if self.up.contains_key(&new.id) {
                        if self.is_active(new.id) {
                            republish = true;
                            self.mark_up(new);
                        } else {
                            self.mark_down(new.id);
                        }
                    }
                }
                OwnedNotification::Active => {
                    self.events.push_back(MemberEvent::Joined);
                    // Pull a full view right away instead of waiting for
                    // gossip to bring every member.
                    self.sync_due = Some(now);
                }
                OwnedNotification::Idle => {
                    self.events.push_back(MemberEvent::Isolated);
                    self.join_attempt = 0;
                    self.join_due = Some(now + JOIN_RETRY_MIN);
                }
                OwnedNotification::Rejoin(id) => {
                    republish = true;
                    self.events.push_back(MemberEvent::Renewed(id));
                }
                OwnedNotification::Defunct => {
                    // Expected after leaving; otherwise our identities renew,
                    // so this should not happen.
                    if !self.left {
                        tracing::error!("gossip identity defunct");
                    }
                }
            }
        }
        if republish {
            self.publish_meta();
        }
    }

    fn mark_up(&mut self, id: NodeIdentity) {
        match self.up.insert(id.id, id) {
            Some(prev) if prev == id => return,
            Some(prev) => self.events.push_back(MemberEvent::Down(prev)),
            None => {}
        }
        self.events.push_back(MemberEvent::Up(id));
    }

    fn mark_down(&mut self, id: NodeId) {
        // An unanswered sync request must not let a later list from this id
        // (a restart, or a rumour) be trusted unasked.
        self.sync_requested.remove(&id);
        if let Some(prev) = self.up.remove(&id) {
            meta::lock(&self.meta).remove(&id);
            self.events.push_back(MemberEvent::Down(prev));
        }
    }

    /// Identities of the members currently up, as reported by the events.
    pub fn up_members(&self) -> impl Iterator<Item = &NodeIdentity> {
        self.up.values()
    }

    fn is_active(&self, id: NodeId) -> bool {
        self.foca.iter_members().any(|m| m.id().id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(n: u64) -> NodeIdentity {
        NodeIdentity {
            id: NodeId(n),
            addr: format!("127.0.0.{n}:7000").parse().unwrap(),
            generation: 1,
        }
    }

    fn member(n: u64) -> Membership {
        Membership::new(ident(n), &GossipConfig::default(), StdRng::seed_from_u64(n)).unwrap()
    }

    /// Delivers every queued packet between `nodes` (by id) until quiet.
    fn pump(now: Instant, nodes: &mut [Membership]) {
        loop {
            let mut moved = false;
            for i in 0..nodes.len() {
                while let Some(t) = nodes[i].poll_transmit() {
                    moved = true;
                    let from = nodes[i].identity().id;
                    if let Some(j) = nodes.iter().position(|m| m.identity().id == t.to.id) {
                        let _ = nodes[j].handle_data(now, from, &t.data);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn events(m: &mut Membership) -> Vec<MemberEvent> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }

    #[test]
    fn announcing_to_a_seed_brings_both_up_and_shares_metadata() {
        let t0 = Instant::now();
        let mut nodes = vec![member(1), member(2)];
        nodes[0].set_meta(Some("127.0.0.1:443".parse().unwrap()), 7);
        nodes[1].add_seed(t0, ident(1));
        pump(t0, &mut nodes);
        assert!(events(&mut nodes[0]).contains(&MemberEvent::Up(ident(2))));
        let e1 = events(&mut nodes[1]);
        assert!(e1.contains(&MemberEvent::Up(ident(1))));
        assert!(e1.contains(&MemberEvent::Joined));
        // Gossip rounds carry the metadata broadcast.
        let mut now = t0;
        for _ in 0..10 {
            now += Duration::from_millis(200);
            for n in nodes.iter_mut() {
                n.handle_timeout(now);
            }
            pump(now, &mut nodes);
        }
        let seen = nodes[1].members();
        let meta = seen[0].meta.as_ref().expect("metadata arrived");
        assert_eq!(meta.load, 7);
        assert_eq!(meta.ingress, Some("127.0.0.1:443".parse().unwrap()));
    }

    #[test]
    fn a_newcomer_is_told_synced_once_the_member_list_it_asked_for_is_applied() {
        let t0 = Instant::now();
        let mut nodes = vec![member(1), member(2), member(3)];
        nodes[1].add_seed(t0, ident(1));
        pump(t0, &mut nodes);
        let mut now = t0;
        for _ in 0..5 {
            now += Duration::from_millis(100);
            for n in nodes.iter_mut() {
                n.handle_timeout(now);
            }
            pump(now, &mut nodes);
        }
        events(&mut nodes[2]);
        // Member 3 joins through 1 and asks it for its list right away.
        nodes[2].add_seed(now, ident(1));
        let mut seen = Vec::new();
        for _ in 0..3 {
            pump(now, &mut nodes);
            nodes[2].handle_timeout(now);
            seen.extend(events(&mut nodes[2]));
        }
        pump(now, &mut nodes);
        seen.extend(events(&mut nodes[2]));
        let synced = seen.iter().position(|e| *e == MemberEvent::Synced);
        let synced = synced.unwrap_or_else(|| panic!("no Synced in {seen:?}"));
        // Both members are up by then, the one it did not announce to too.
        for id in [ident(1), ident(2)] {
            let up = seen.iter().position(|e| *e == MemberEvent::Up(id));
            assert!(up.is_some_and(|up| up < synced), "{seen:?}");
        }
    }

    #[test]
    fn synced_waits_for_the_last_chunk_of_a_long_member_list() {
        let t0 = Instant::now();
        let mut seed = member(1);
        let mut newcomer = member(2);
        // The seed knows 200 members: its list takes several packets.
        let known: Vec<foca::Member<NodeIdentity>> = (10..210)
            .map(|n| foca::Member::new(ident(n), 0, State::Alive))
            .collect();
        seed.foca
            .apply_many(known.into_iter(), false, &mut seed.runtime)
            .unwrap();
        seed.drain(t0);
        while seed.poll_transmit().is_some() {}
        events(&mut seed);
        newcomer.sync_requested.insert(ident(1).id);
        seed.send_sync(newcomer.identity(), false);
        let packets: Vec<Transmit> = std::iter::from_fn(|| seed.poll_transmit()).collect();
        assert!(packets.len() > 2, "{}", packets.len());
        // The newcomer must count the seed as up to trust the later chunks.
        newcomer.mark_up(ident(1));
        events(&mut newcomer);
        for (i, t) in packets.iter().enumerate() {
            let _ = newcomer.handle_data(t0, ident(1).id, &t.data);
            let synced = events(&mut newcomer).contains(&MemberEvent::Synced);
            assert_eq!(
                synced,
                i + 1 == packets.len(),
                "chunk {i} of {}",
                packets.len()
            );
        }
    }

    #[test]
    fn a_packet_naming_another_sender_is_refused_and_counted() {
        let t0 = Instant::now();
        let mut liar = member(3);
        let mut target = member(1);
        liar.announce(t0, ident(1));
        let packet = liar.poll_transmit().unwrap();
        // It arrived on a connection that proved id 2, but says it is from 3.
        let err = target.handle_data(t0, NodeId(2), &packet.data).unwrap_err();
        assert!(matches!(
            err,
            GossipError::SpoofedSender {
                claimed: NodeId(3),
                actual: NodeId(2)
            }
        ));
        assert_eq!(target.stats().spoofed_dropped, 1);
        assert!(target.members().is_empty());
        assert!(target.poll_event().is_none());
        // The same packet from the right connection is accepted.
        target.handle_data(t0, NodeId(3), &packet.data).unwrap();
        assert_eq!(target.members().len(), 1);
    }

    #[test]
    fn oversized_and_garbage_packets_change_nothing() {
        let t0 = Instant::now();
        let mut m = member(1);
        let big = vec![WIRE_VERSION_FOR_TESTS; MAX_FOR_TESTS + 1];
        assert!(matches!(
            m.handle_data(t0, NodeId(2), &big),
            Err(GossipError::Oversized(_))
        ));
        assert!(matches!(
            m.handle_data(t0, NodeId(2), &[0xff, 0, 1]),
            Err(GossipError::Malformed(_))
        ));
        assert!(matches!(
            m.handle_data(t0, NodeId(2), &[SYNC_TAG, 0xc1]),
            Err(GossipError::Malformed(_))
        ));
        assert_eq!(m.stats().invalid_dropped, 3);
        assert!(m.members().is_empty());
    }

    const WIRE_VERSION_FOR_TESTS: u8 = crate::codec::WIRE_VERSION;
    const MAX_FOR_TESTS: usize = crate::config::MAX_PACKET_SIZE;

    #[test]
    fn a_member_that_stops_answering_is_declared_down_after_probe_and_suspicion() {
        let cfg = GossipConfig::default();
        let t0 = Instant::now();
        let mut nodes = vec![member(1), member(2)];
        nodes[1].add_seed(t0, ident(1));
        pump(t0, &mut nodes);
        events(&mut nodes[0]);
        // Node 2 goes silent: only node 1 keeps running its timers.
        let mut survivor = nodes.remove(0);
        let mut now = t0;
        let mut down_at = None;
        while now < t0 + Duration::from_secs(10) && down_at.is_none() {
            now = survivor.poll_timeout().unwrap();
            survivor.handle_timeout(now);
            while survivor.poll_transmit().is_some() {}
            if events(&mut survivor).contains(&MemberEvent::Down(ident(2))) {
                down_at = Some(now - t0);
            }
        }
        let took = down_at.expect("declared down");
        // At most: a probe period to start probing, one to fail, then suspicion.
        assert!(
            took <= 2 * cfg.probe_period + cfg.suspect_to_down_after,
            "{took:?}"
        );
        assert!(took >= cfg.suspect_to_down_after);
    }

    #[test]
    fn timers_fire_in_deadline_then_scheduling_order() {
        let t0 = Instant::now();
        let mut heap = BinaryHeap::new();
        let timer = |n| Timer::<NodeIdentity>::PeriodicGossip(n);
        for (seq, (after, n)) in [(5u64, 1u8), (1, 2), (5, 3), (0, 4)]
            .into_iter()
            .enumerate()
        {
            heap.push(Scheduled {
                at: t0 + Duration::from_millis(after),
                seq: seq as u64,
                timer: timer(n),
            });
        }
        let order: Vec<_> = std::iter::from_fn(|| heap.pop()).map(|s| s.timer).collect();
        assert_eq!(order, vec![timer(4), timer(2), timer(1), timer(3)]);
    }
}
