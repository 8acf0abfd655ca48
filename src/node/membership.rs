//! The task that owns the node's [`Membership`]: it feeds it datagrams and
//! timers, hands its packets to the transport, and publishes its view: the
//! member list for `/status`, and [`Members`], the live set of other nodes
//! with a stream of [`MemberChange`]s that every consumer reacts to.
//!
//! One task owns the state machine, so foca's timers are delivered in order
//! from one queue (the state machine's own heap) and nothing locks it. Sending
//! never waits on a handshake: the transport queues or drops (SWIM tolerates
//! loss).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use specter_dht::Peer;
use specter_gossip::config::RTT_SAMPLE_PERIOD;
use specter_gossip::{
    GossipError, GossipStats, MemberEvent, MemberState, Membership, NodeId, NodeIdentity, Timing,
    TimingTracker,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::net::pool::Inbox;
use crate::net::{DialError, Transport};

/// After a graceful leave, how long the packets announcing it get to leave
/// before the endpoint closes. Loopback and LAN need far less.
pub const LEAVE_FLUSH: Duration = Duration::from_millis(300);

/// The published member list is rebuilt at most this often (and on every
/// membership event), so a busy node does not rebuild it per packet.
const VIEW_REFRESH: Duration = Duration::from_millis(250);

/// First and longest wait between attempts to reach a seed. A node started
/// before its seeds joins within seconds of them coming up.
const SEED_RETRY_MIN: Duration = Duration::from_millis(250);
const SEED_RETRY_MAX: Duration = Duration::from_secs(5);

/// Capacity of the channel that brings reached seeds to the owner task; each
/// seed sends once, so this only needs to exceed the seed list.
const SEED_CHANNEL: usize = 64;

/// Changes a subscriber may fall behind by before it has to start again
/// from a snapshot ([`Update::Resync`]). Changes come at the pace of
/// gossip (a few per node that joins or dies), and every consumer handles
/// each in microseconds.
pub const MEMBER_EVENTS_CAPACITY: usize = 1_024;

/// How long a visit or a client hello waits for a starting node to become
/// ready before it is turned away (503 with `Retry-After`; a client is told
/// `unavailable` and takes its other nodes). Joining takes one round trip
/// to a seed and one more for its member list.
pub const READY_WAIT: Duration = Duration::from_secs(5);

/// A node none of whose seeds has answered this long after it started
/// serves as the first node of a cluster: nodes that all list each other
/// as seeds and are started one after another (each waiting for the
/// previous one to be ready) must not wait for each other forever. A node
/// that reached a seed waits for the join to finish instead.
pub const FIRST_NODE_AFTER: Duration = Duration::from_secs(10);

/// Whether the node can route: it has no seeds (it is the first node), or
/// it joined and applied a member's full list. Before that a lookup would
/// run on an empty ring, and answer "unknown tunnel" for names it has not
/// heard of yet, or store a registration where no other node looks. Cheap to
/// clone; the membership task sets it, once.
#[derive(Clone)]
pub struct Readiness {
    tx: Arc<watch::Sender<bool>>,
}

impl Readiness {
    /// Starts ready or not.
    pub fn new(ready: bool) -> Self {
        Readiness {
            tx: Arc::new(watch::channel(ready).0),
        }
    }

    /// Whether the node is ready.
    pub fn is_ready(&self) -> bool {
        *self.tx.borrow()
    }

    /// Marks the node ready; true if it was not yet.
    pub fn set_ready(&self) -> bool {
        self.tx
            .send_if_modified(|ready| !std::mem::replace(ready, true))
    }

    /// Waits until the node is ready, at most `limit`; whether it is.
    pub async fn wait(&self, limit: Duration) -> bool {
        if self.is_ready() {
            // Every lookup and hello asks; almost always it already is.
            return true;
        }
        let mut rx = self.tx.subscribe();
        matches!(
            tokio::time::timeout(limit, rx.wait_for(|ready| *ready)).await,
            Ok(Ok(_))
        )
    }
}

/// A change in the live set of other nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// The node is up (joined, returned, or restarted under a new generation
    /// after its old run went [`MemberChange::Down`]).
    Up(Peer),
    /// The node was declared down or left.
    Down(Peer),
}

/// The live set of other nodes as gossip sees it, and its changes. Cheap to
/// clone; the membership task is the only writer.
#[derive(Clone)]
pub struct Members {
    inner: Arc<Mutex<LiveSet>>,
}

struct LiveSet {
    peers: BTreeMap<NodeId, Peer>,
    changes: broadcast::Sender<MemberChange>,
}

impl Default for Members {
    fn default() -> Self {
        Members {
            inner: Arc::new(Mutex::new(LiveSet {
                peers: BTreeMap::new(),
                changes: broadcast::channel(MEMBER_EVENTS_CAPACITY).0,
            })),
        }
    }
}

impl Members {
    fn lock(&self) -> std::sync::MutexGuard<'_, LiveSet> {
        // Only whole inserts and removes happen under the lock.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live nodes, by id.
    pub fn live(&self) -> Vec<Peer> {
        self.lock().peers.values().copied().collect()
    }

    /// Whether gossip holds `id` live.
    pub fn is_live(&self, id: NodeId) -> bool {
        self.lock().peers.contains_key(&id)
    }

    /// The live set now and every change after it, with nothing missed or
    /// seen twice in between.
    pub fn subscribe(&self) -> Subscription {
        let live = self.lock();
        Subscription {
            snapshot: live.peers.values().copied().collect(),
            changes: live.changes.subscribe(),
            members: self.clone(),
        }
    }

    /// Applies a change and tells the subscribers (the membership task, and
    /// tests that stand in for it).
    pub fn publish(&self, change: MemberChange) {
        let mut live = self.lock();
        match change {
            MemberChange::Up(peer) => live.peers.insert(peer.id, peer),
            MemberChange::Down(peer) => live.peers.remove(&peer.id),
        };
        // No subscriber is not an error.
        let _ = live.changes.send(change);
    }
}

/// What a [`Subscription`] delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// The next change.
    Change(MemberChange),
    /// The subscriber fell more than [`MEMBER_EVENTS_CAPACITY`] changes
    /// behind: this is the live set now, and changes continue from it.
    Resync(Vec<Peer>),
}

/// A consumer's view of [`Members`]: the set when it subscribed, then each
/// change.
pub struct Subscription {
    /// The live set when the subscription started.
    pub snapshot: Vec<Peer>,
    changes: broadcast::Receiver<MemberChange>,
    members: Members,
}

impl Subscription {
    /// The next update. Cancel-safe. `None` cannot happen while the
    /// subscription holds its [`Members`] (it always does); callers still
    /// treat it as the end, and stop with the node's cancellation token.
    pub async fn next(&mut self) -> Option<Update> {
        match self.changes.recv().await {
            Ok(change) => Some(Update::Change(change)),
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let fresh = self.members.subscribe();
                self.changes = fresh.changes;
                Some(Update::Resync(fresh.snapshot))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// One member as shown in `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct MemberStatus {
    /// Cert-derived id, hex.
    pub id: String,
    /// QUIC address it advertises.
    pub addr: SocketAddr,
    /// SWIM state.
    pub state: MemberState,
    /// foca incarnation (refutations of suspicion).
    pub incarnation: u16,
    /// Run of the node (start time in ms; higher after a restart).
    pub generation: u64,
    /// Public ingress address, if it published one.
    pub ingress: Option<SocketAddr>,
    /// When this node last saw its state, incarnation or generation change
    /// (Unix ms).
    pub since_ms: u64,
}

/// The membership as last published by the owner task.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MembershipView {
    /// This node's generation (it changes if the node had to renew).
    pub generation: u64,
    /// Whether at least one other member knows this node.
    pub joined: bool,
    /// Whether it serves visitors and clients (see [`Readiness`]).
    pub ready: bool,
    /// Every member tracked (alive, suspect, recently down), sorted by id.
    pub members: Vec<MemberStatus>,
    /// Gossip counters.
    pub gossip: GossipStats,
    /// The membership timers in force, derived from measured round trips.
    pub timers: TimersStatus,
}

/// The RTT-dependent membership timers, in milliseconds, and the round trip
/// they were derived from.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TimersStatus {
    /// Worst smoothed QUIC round trip to a live member at the last sample.
    pub worst_rtt_ms: u64,
    /// Direct ping timeout.
    pub probe_rtt_ms: u64,
    /// Probe period.
    pub probe_period_ms: u64,
    /// Suspicion time.
    pub suspect_to_down_ms: u64,
}

impl TimersStatus {
    fn new(timing: Timing, worst_rtt: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        TimersStatus {
            worst_rtt_ms: ms(worst_rtt),
            probe_rtt_ms: ms(timing.probe_rtt),
            probe_period_ms: ms(timing.probe_period),
            suspect_to_down_ms: ms(timing.suspect_to_down_after),
        }
    }
}

/// The worst smoothed round trip to a live member over the pooled
/// connections (`None` with no connected member).
fn worst_member_rtt(members: &Members, transport: &Transport) -> Option<Duration> {
    members
        .live()
        .iter()
        .filter_map(|p| transport.rtt(p.id))
        .max()
}

/// Shared handle on the published view.
pub type SharedView = Arc<RwLock<MembershipView>>;

/// Reads the published view.
pub fn read_view(view: &SharedView) -> MembershipView {
    view.read().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Inputs of the owner task.
pub struct Driver {
    /// The state machine.
    pub membership: Membership,
    /// Where packets go.
    pub transport: Arc<Transport>,
    /// Datagrams from the transport, tagged with their cert-derived sender.
    pub inbox: Inbox,
    /// Seeds to join through (`host:port`).
    pub seeds: Vec<String>,
    /// Published view.
    pub view: SharedView,
    /// Stops the task without telling anyone (a crash, as far as peers see).
    pub stop: CancellationToken,
    /// Leaves the cluster gracefully, then stops.
    pub leave: CancellationToken,
    /// The live set (other nodes), updated on every change.
    pub members: Members,
    /// Set once the node has joined and synced (or has no seed but itself).
    pub ready: Readiness,
}

impl Driver {
    /// Runs until `stop` or `leave` fires.
    pub async fn run(self) {
        let Driver {
            mut membership,
            transport,
            mut inbox,
            seeds,
            view,
            stop,
            leave,
            members,
            ready,
        } = self;
        let (seed_tx, mut seed_rx) = mpsc::channel(SEED_CHANNEL);
        // Seeds not yet found to be this node; if all are, it is the first.
        let mut seeds_left = seeds.len();
        let started = Instant::now();
        let mut seed_answered = false;
        for seed in seeds {
            tokio::spawn(reach_seed(
                seed,
                transport.clone(),
                seed_tx.clone(),
                stop.clone(),
            ));
        }
        drop(seed_tx);
        let mut joined = false;
        let mut published = Instant::now();
        let mut tracker = TimingTracker::new(membership.timing());
        let mut timers = TimersStatus::new(membership.timing(), Duration::ZERO);
        let mut sample = tokio::time::interval(RTT_SAMPLE_PERIOD);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        publish(&membership, joined, ready.is_ready(), timers, &view);
        loop {
            let deadline = membership
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = leave.cancelled() => {
                    tracing::info!("leaving the cluster");
                    membership.leave(Instant::now());
                    flush(&mut membership, &transport);
                    tokio::time::sleep(LEAVE_FLUSH).await;
                    return;
                }
                Some((from, data)) = inbox.recv() => {
                    if let Err(err) = membership.handle_data(Instant::now(), from, &data) {
                        match err {
                            GossipError::SpoofedSender { .. } => tracing::warn!(%err, "dropped gossip packet"),
                            _ => tracing::debug!(%err, "dropped gossip packet"),
                        }
                    }
                }
                Some(seed) = seed_rx.recv() => match seed {
                    Some(seed) => {
                        seed_answered = true;
                        membership.add_seed(Instant::now(), seed);
                    }
                    None => {
                        seeds_left -= 1;
                        if seeds_left == 0 && ready.set_ready() {
                            tracing::info!("ready: every seed is this node, so it starts the cluster");
                        }
                    }
                },
                _ = sample.tick() => {
                    let worst = worst_member_rtt(&members, &transport);
                    if let Some(timing) = tracker.observe(Instant::now(), worst) {
                        match membership.set_timing(timing) {
                            Ok(()) => tracing::info!(
                                worst_rtt = ?worst.unwrap_or_default(),
                                probe_rtt = ?timing.probe_rtt,
                                probe_period = ?timing.probe_period,
                                suspicion = ?timing.suspect_to_down_after,
                                "membership timers follow the measured round trips"
                            ),
                            Err(err) => tracing::warn!(%err, "membership timers unchanged"),
                        }
                    }
                    timers = TimersStatus::new(membership.timing(), worst.unwrap_or_default());
                    if !seed_answered && started.elapsed() >= FIRST_NODE_AFTER && ready.set_ready() {
                        tracing::warn!(
                            waited = ?FIRST_NODE_AFTER,
                            "ready: no seed answered, so this node starts the cluster (it joins the others when they come up)"
                        );
                    }
                }
                () = tokio::time::sleep_until(deadline) => membership.handle_timeout(Instant::now()),
            }
            // A steady stream of packets must not starve the timers: fire
            // whatever is due before handling more input.
            if membership
                .poll_timeout()
                .is_some_and(|t| t <= Instant::now())
            {
                membership.handle_timeout(Instant::now());
            }
            flush(&mut membership, &transport);
            let mut changed = false;
            while let Some(event) = membership.poll_event() {
                changed = true;
                match event {
                    MemberEvent::Up(m) => {
                        tracing::info!(member = %m.id, addr = %m.addr, generation = m.generation, "member up");
                        members.publish(MemberChange::Up(peer_of(&m)));
                    }
                    MemberEvent::Down(m) => {
                        tracing::info!(member = %m.id, addr = %m.addr, generation = m.generation, "member down");
                        members.publish(MemberChange::Down(peer_of(&m)));
                    }
                    MemberEvent::Joined => {
                        joined = true;
                        tracing::info!("joined the cluster");
                    }
                    MemberEvent::Isolated => {
                        joined = false;
                        tracing::warn!("no live members left; announcing to seeds again");
                    }
                    MemberEvent::Renewed(me) => tracing::warn!(
                        generation = me.generation,
                        "was declared down while alive; rejoined with a new generation"
                    ),
                    MemberEvent::Synced => {
                        if ready.set_ready() {
                            tracing::info!(
                                members = membership.up_members().count(),
                                took = ?started.elapsed(),
                                "ready: joined and holds the cluster's member list"
                            );
                        }
                    }
                }
            }
            if changed || published.elapsed() >= VIEW_REFRESH {
                publish(&membership, joined, ready.is_ready(), timers, &view);
                published = Instant::now();
            }
        }
    }
}

fn peer_of(identity: &NodeIdentity) -> Peer {
    Peer {
        id: identity.id,
        addr: identity.addr,
    }
}

fn flush(membership: &mut Membership, transport: &Arc<Transport>) {
    while let Some(t) = membership.poll_transmit() {
        transport.send_datagram(t.to.id, t.to.addr, t.data);
    }
}

fn publish(
    membership: &Membership,
    joined: bool,
    ready: bool,
    timers: TimersStatus,
    view: &SharedView,
) {
    let now = crate::clock::now_ms();
    let before = read_view(view).members;
    let mut members: Vec<MemberStatus> = membership
        .members()
        .into_iter()
        .map(|m| {
            let mut status = MemberStatus {
                id: m.identity.id.to_string(),
                addr: m.identity.addr,
                state: m.state,
                incarnation: m.incarnation,
                generation: m.identity.generation,
                ingress: m.meta.and_then(|meta| meta.ingress),
                since_ms: now,
            };
            // Unchanged since the last publication: keep when it changed.
            // `before` is sorted by id (below).
            if let Ok(i) = before.binary_search_by(|o| o.id.cmp(&status.id))
                && let Some(old) = before.get(i)
                && (old.state, old.incarnation, old.generation)
                    == (status.state, status.incarnation, status.generation)
            {
                status.since_ms = old.since_ms;
            }
            status
        })
        .collect();
    members.sort_by(|a, b| a.id.cmp(&b.id));
    let next = MembershipView {
        generation: membership.identity().generation,
        joined,
        ready,
        members,
        gossip: membership.stats(),
        timers,
    };
    *view.write().unwrap_or_else(PoisonError::into_inner) = next;
}

/// Dials a seed until it answers, then hands its proven identity to the owner
/// task. A seed that turns out to be this node is skipped.
async fn reach_seed(
    seed: String,
    transport: Arc<Transport>,
    found: mpsc::Sender<Option<NodeIdentity>>,
    stop: CancellationToken,
) {
    let mut wait = SEED_RETRY_MIN;
    loop {
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(seed.as_str()).await {
            Ok(addrs) => addrs.collect(),
            Err(err) => {
                tracing::warn!(%seed, %err, "cannot resolve seed");
                Vec::new()
            }
        };
        for addr in addrs {
            match transport.connect(addr, None).await {
                Ok((id, _)) => {
                    tracing::info!(%seed, node = %id, "reached seed");
                    let identity = NodeIdentity {
                        id,
                        addr,
                        generation: 0,
                    };
                    let _ = found.send(Some(identity)).await;
                    return;
                }
                Err(DialError::SelfDial(_)) => {
                    let _ = found.send(None).await;
                    return;
                }
                Err(err) => tracing::debug!(%seed, %err, "seed not reachable yet"),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(SEED_RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u64) -> Peer {
        Peer {
            id: NodeId(id),
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + u16::try_from(id).unwrap())),
        }
    }

    #[tokio::test]
    async fn a_node_that_goes_down_and_returns_between_reads_is_seen_doing_both() {
        let members = Members::default();
        members.publish(MemberChange::Up(peer(1)));
        let mut sub = members.subscribe();
        assert_eq!(sub.snapshot, vec![peer(1)]);
        // Both happen before the consumer looks: a set diff would see nothing.
        members.publish(MemberChange::Down(peer(1)));
        members.publish(MemberChange::Up(peer(1)));
        assert_eq!(
            sub.next().await,
            Some(Update::Change(MemberChange::Down(peer(1))))
        );
        assert_eq!(
            sub.next().await,
            Some(Update::Change(MemberChange::Up(peer(1))))
        );
        assert!(members.is_live(NodeId(1)));
    }

    #[tokio::test]
    async fn a_late_subscriber_starts_from_the_snapshot_and_misses_nothing_after_it() {
        let members = Members::default();
        members.publish(MemberChange::Up(peer(1)));
        members.publish(MemberChange::Up(peer(2)));
        members.publish(MemberChange::Down(peer(1)));
        let mut sub = members.subscribe();
        assert_eq!(sub.snapshot, vec![peer(2)]);
        members.publish(MemberChange::Up(peer(3)));
        assert_eq!(
            sub.next().await,
            Some(Update::Change(MemberChange::Up(peer(3))))
        );
        assert_eq!(members.live(), vec![peer(2), peer(3)]);
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_gets_the_live_set_again() {
        let members = Members::default();
        let mut sub = members.subscribe();
        for i in 0..u64::try_from(MEMBER_EVENTS_CAPACITY).unwrap() + 10 {
            members.publish(MemberChange::Up(peer(i % 50)));
            members.publish(MemberChange::Down(peer(i % 50)));
        }
        members.publish(MemberChange::Up(peer(7)));
        assert_eq!(sub.next().await, Some(Update::Resync(vec![peer(7)])));
        members.publish(MemberChange::Down(peer(7)));
        assert_eq!(
            sub.next().await,
            Some(Update::Change(MemberChange::Down(peer(7))))
        );
    }
}
