//! Opening a stream to a tunnel's client for a visitor: directly when the
//! client is attached here, else through a node it is attached to (route
//! cache, then the DHT). Attachments that fail are skipped, and one that is
//! slow to answer is raced against the next.
//!
//! Two decisions are pure and tested here: [`order_route`] (which attached
//! node to try first) and [`Race`] (when the next attempt starts, and when
//! to give up).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};
use rand::seq::SliceRandom;
use specter_dht::{Outcome, Peer};
use specter_gossip::NodeId;
use specter_tunnel::protocol::{Visit, VisitReply};
use specter_tunnel::route_cache::Cached;
use tokio::time::Instant;

use super::Tunnels;
use super::slots::{ForwardSlot, ForwardSlots};
use crate::clock::now_ms;
use crate::net::Transport;
use crate::net::liveness::{PEER_SILENCE, silent};
use crate::net::quic::OwnStream;
use crate::net::tls::takes_early;
use crate::node::membership::{Members, READY_WAIT};
use crate::wire::{STREAM_NOT_HERE, StreamKind, WireError, read_frame, write_msg};

/// How long one attachment may take to answer a visit before the next one
/// is tried as well (at once if its node falls silent, see
/// [`PEER_SILENCE`]). The slow attempt is not abandoned: under a burst a live
/// client can take longer than this, and a dead one (killed, its connection
/// not yet timed out) never answers, so racing the next attachment serves
/// both without failing either kind of visitor.
pub const VISIT_HEDGE_AFTER: Duration = Duration::from_secs(2);
/// A lookup that reached no holder is tried once more after this.
pub const LOOKUP_RETRY_AFTER: Duration = Duration::from_millis(100);
/// A visit that no attachment answered within this long fails (502).
pub const VISIT_DEADLINE: Duration = Duration::from_secs(10);
/// A node that failed a visit or was slow to answer one is tried after the
/// others for this long, so one dead node (not yet declared dead by gossip)
/// costs the first visitor a hedge delay, not every visitor.
pub const SLOW_FOR: Duration = Duration::from_secs(10);

/// Route lookups [`Tunnels::refresh_route`] runs at once: one per tunnel
/// whose pooled HTTP upstreams through another node are reused while the
/// route cache has nothing fresh, so as many as the pool holds tunnels
/// (`ingress::upstream::IDLE_TOTAL`). Past it, a reuse starts none.
pub const ROUTE_REFRESHES: usize = 1_024;

/// Why a visitor stream could not be opened.
#[derive(Clone, Debug, thiserror::Error)]
pub enum OpenError {
    /// No such tunnel is registered.
    #[error("unknown tunnel")]
    Unknown,
    /// Registered, but no attachment answered.
    #[error("tunnel registered but unreachable")]
    Unreachable,
    /// The client answered but its target refused the connection.
    #[error("the tunnel's client could not reach its target")]
    TargetRefused,
    /// This node is starting and cannot look names up yet (see
    /// [`crate::node::Readiness`]).
    #[error("this node is starting and cannot route yet")]
    NotReady,
}

/// A ready stream to the tunnel's client, readable and writable as one
/// (its halves are public for resets). A forwarded one holds its tunnel's
/// slot on that node (see [`super::slots`]) until dropped.
pub struct Pair {
    /// Towards the client.
    pub send: SendStream,
    /// From the client.
    pub recv: RecvStream,
    /// Held, not read: freed with the pair.
    _slot: Option<ForwardSlot>,
    /// Counts a forwarded stream on its node connection (which stays open
    /// for it if it loses a simultaneous dial); freed with the pair.
    _held: Option<OwnStream>,
    /// The node it goes through, when it is forwarded.
    pub via: Option<NodeId>,
}

impl Pair {
    /// Resets both halves: the far side sees a broken stream, never a
    /// clean end.
    pub fn reset(&mut self) {
        crate::wire::break_stream(&mut self.send, &mut self.recv);
    }
}

impl tokio::io::AsyncRead for Pair {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().recv).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Pair {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.get_mut().send), cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.get_mut().send), cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut self.get_mut().send), cx)
    }
}

/// One way to a tunnel's client.
#[derive(Clone)]
pub(super) enum Path {
    /// The client is attached to this node over this connection.
    Local(Connection),
    /// The client is attached to this other node.
    Via(Peer),
}

impl Path {
    fn node(&self) -> Option<Peer> {
        match self {
            Path::Via(peer) => Some(*peer),
            Path::Local(_) => None,
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Local(conn) => write!(f, "client at {}", conn.remote_address()),
            Path::Via(peer) => write!(f, "node {}", peer.id),
        }
    }
}

/// How an attached node looked lately, best first when sorted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Health {
    /// Gossip holds it dead (a stale route).
    pub dead: bool,
    /// It left something of ours unanswered for [`PEER_SILENCE`].
    pub silent: bool,
    /// It failed or was slow to answer a visit within [`SLOW_FOR`].
    pub slow: bool,
    /// Its round trip is well above the nearest attachment's (see [`far`]):
    /// across a continent while another is next door.
    pub far: bool,
}

/// Whether a round trip of `rtt` is far next to the nearest one, `nearest`:
/// more than twice it plus [`NEAR_SLACK`], so nodes in one place still
/// share visitors at random while one across an ocean is tried after them.
pub fn far(rtt: Option<Duration>, nearest: Option<Duration>) -> bool {
    match (rtt, nearest) {
        (Some(rtt), Some(nearest)) => rtt > nearest * 2 + NEAR_SLACK,
        _ => false,
    }
}

/// Round trips within this of each other (besides a factor of two) count as
/// equally near: jitter, or a neighbouring data centre.
pub const NEAR_SLACK: Duration = Duration::from_millis(20);

/// The order in which to try a tunnel's remote attachments: this node left
/// out, visitors spread at random over equally healthy nodes, then live
/// before dead, answering before silent, fast before lately slow, and near
/// before far.
pub fn order_route(
    route: &[Peer],
    me: NodeId,
    health: impl Fn(NodeId) -> Health,
    rng: &mut impl rand::Rng,
) -> Vec<Peer> {
    let mut route: Vec<Peer> = route.iter().copied().filter(|p| p.id != me).collect();
    route.shuffle(rng);
    // Stable: equals keep their random order.
    route.sort_by_cached_key(|p| health(p.id));
    route
}

/// The racing rule of one visit: attempts start one after another, the next
/// at once when one fails or its node falls silent, else after
/// [`VISIT_HEDGE_AFTER`] without an answer; the slow ones keep running. The
/// visit fails once every path failed, or at [`VISIT_DEADLINE`]. `T` labels
/// each running attempt.
#[derive(Debug)]
pub struct Race<T> {
    deadline: Instant,
    next_at: Instant,
    running: BTreeMap<usize, T>,
    launched: usize,
    exhausted: bool,
}

impl<T> Race<T> {
    /// A race that starts at `now`.
    pub fn new(now: Instant) -> Self {
        Race {
            deadline: now + VISIT_DEADLINE,
            next_at: now,
            running: BTreeMap::new(),
            launched: 0,
            exhausted: false,
        }
    }

    /// Whether the next path should start now.
    pub fn wants_next(&self, now: Instant) -> bool {
        !self.exhausted && (self.running.is_empty() || now >= self.next_at)
    }

    /// An attempt labelled `label` started; returns its index.
    pub fn launched(&mut self, now: Instant, label: T) -> usize {
        let index = self.launched;
        self.launched += 1;
        self.running.insert(index, label);
        self.next_at = now + VISIT_HEDGE_AFTER;
        index
    }

    /// There is no further path: wait for those running, until the deadline.
    pub fn exhausted(&mut self) {
        self.exhausted = true;
    }

    /// Attempt `index` failed: the next path starts now. Returns its label.
    pub fn failed(&mut self, index: usize, now: Instant) -> Option<T> {
        let label = self.running.remove(&index);
        self.next_at = now;
        label
    }

    /// Attempt `index` found its node silent: the next path starts now, if
    /// that attempt is still running.
    pub fn silent(&mut self, index: usize, now: Instant) {
        if self.running.contains_key(&index) {
            self.next_at = now;
        }
    }

    /// The labels of the attempts still running.
    pub fn running(&self) -> impl Iterator<Item = &T> {
        self.running.values()
    }

    /// Whether the visit has failed: nothing runs and nothing is left to
    /// try, or the deadline passed.
    pub fn lost(&self, now: Instant) -> bool {
        (self.exhausted && self.running.is_empty()) || now >= self.deadline
    }

    /// When to look again if nothing happens.
    pub fn wake_at(&self) -> Instant {
        if self.exhausted {
            self.deadline
        } else {
            self.next_at.min(self.deadline)
        }
    }
}

/// Where the next paths to try come from.
pub(super) struct Paths {
    pub(super) queue: VecDeque<Path>,
    /// Still to ask the route cache or the DHT for remote attachments.
    pub(super) route_pending: bool,
}

/// Waits for the client's (or the attached node's) answer to a visit.
async fn await_ready(recv: &mut RecvStream) -> Result<(), OpenError> {
    match read_frame::<VisitReply>(recv).await {
        Ok(VisitReply::Ready) => Ok(()),
        Ok(VisitReply::TargetRefused) => Err(OpenError::TargetRefused),
        Err(_) => Err(OpenError::Unreachable),
    }
}

/// What an attempt needs from the node.
#[derive(Clone)]
struct Reach {
    transport: Arc<Transport>,
    members: Members,
    slots: Arc<ForwardSlots>,
}

/// Opens a visitor stream along `path` and waits until the far end is ready.
/// If the far end goes silent meanwhile (see [`PEER_SILENCE`]), `hedge` is
/// told so that the next path starts at once; this attempt goes on, since a
/// silent peer may only be slow.
async fn attempt(
    reach: Reach,
    path: Path,
    visit: Visit,
    hedge: tokio::sync::mpsc::Sender<usize>,
    index: usize,
    slotted: Arc<std::sync::atomic::AtomicBool>,
) -> Result<Pair, OpenError> {
    let via = path.node();
    if via.is_some_and(|peer| !reach.members.is_live(peer.id)) {
        // Gossip holds it dead (a stale route): a dial could wait for the
        // whole handshake timeout, so let the next path start now.
        let _ = hedge.try_send(index);
    }
    let unreachable = |_: WireError| OpenError::Unreachable;
    let mut slot = None;
    let mut held = None;
    let (conn, mut send, mut recv) = match &path {
        Path::Local(conn) => {
            let (send, recv) = conn.open_bi().await.map_err(|_| OpenError::Unreachable)?;
            (conn.clone(), send, recv)
        }
        Path::Via(peer) => {
            // Waiting here is the tunnel's own bound, not the node being
            // slow: the race does not hold it against the node.
            slot = Some(reach.slots.take(peer.id, &visit.name).await);
            slotted.store(true, std::sync::atomic::Ordering::Relaxed);
            let stream = reach
                .transport
                .open_stream(peer.addr, peer.id, StreamKind::Forward)
                .await
                .map_err(|_| OpenError::Unreachable)?;
            held = Some(stream.held);
            (stream.conn, stream.send, stream.recv)
        }
    };
    // A peer of an earlier release takes no early bytes in the header: it
    // gets them right after its `Ready`, as the rest of the visitor's bytes.
    let late = (!visit.early.is_empty() && !takes_early(&conn)).then(|| {
        let late = visit.early.clone();
        (
            Visit {
                early: bytes::Bytes::new(),
                ..visit.clone()
            },
            late,
        )
    });
    let header = late.as_ref().map_or(&visit, |(header, _)| header);
    write_msg(&mut send, header).await.map_err(unreachable)?;
    let via = via.map(|p| p.id);
    let ready = {
        let answer = await_ready(&mut recv);
        tokio::pin!(answer);
        let quiet = async {
            // Known silent: do not wait to find out again.
            if !via.is_some_and(|id| reach.transport.is_silent(id)) {
                silent(&conn, PEER_SILENCE).await;
            }
        };
        tokio::select! {
            r = &mut answer => r,
            () = quiet => {
                if let Some(id) = via {
                    reach.transport.mark_silent(id, &conn);
                }
                let _ = hedge.try_send(index);
                answer.await
            }
        }
    };
    if let (Ok(()), Some((_, late))) = (&ready, &late)
        && send.write_all(late).await.is_err()
    {
        return Err(OpenError::Unreachable);
    }
    match ready {
        Ok(()) => Ok(Pair {
            send,
            recv,
            _slot: slot,
            _held: held,
            via,
        }),
        Err(err) => {
            let _ = send.reset(STREAM_NOT_HERE);
            let _ = recv.stop(STREAM_NOT_HERE);
            Err(err)
        }
    }
}

impl Tunnels {
    /// Opens a stream to the client of `name` for a visitor: directly when it
    /// is attached here, else through a node it is attached to (route cache,
    /// then DHT). Attachments that fail are skipped, and one that is slow to
    /// answer is raced against the next (see [`Race`]).
    pub async fn open(&self, name: &str, visit: &Visit) -> Result<Pair, OpenError> {
        let started = std::time::Instant::now();
        let opened = self.open_paths(name, visit).await;
        let outcome = match &opened {
            Ok(_) => "opened",
            Err(OpenError::Unknown) => "unknown",
            Err(OpenError::Unreachable) => "unreachable",
            Err(OpenError::TargetRefused) => "target_refused",
            Err(OpenError::NotReady) => "not_ready",
        };
        let took = opened.is_ok().then(|| started.elapsed());
        self.dht.histograms().visit_done(outcome, took);
        opened
    }

    /// Whether `name` is registered: attached here, or found by a route
    /// lookup (cached as [`Self::open`]'s are). Opens no stream, so the
    /// tunnel's target sees nothing. [`OpenError::Unknown`] when the name is
    /// not registered.
    pub async fn known(&self, name: &str) -> Result<(), OpenError> {
        if !self.local(name).is_empty() {
            return Ok(());
        }
        self.lookup(name).await.map(drop)
    }

    async fn open_paths(&self, name: &str, visit: &Visit) -> Result<Pair, OpenError> {
        let mut paths = Paths {
            queue: self.local(name).into_iter().map(Path::Local).collect(),
            route_pending: true,
        };
        if paths.queue.is_empty() {
            // Not attached here: the route decides whether the name exists.
            paths.queue.extend(self.route(name).await?);
            paths.route_pending = false;
        }
        let opened = self.race(name, visit, paths).await;
        if matches!(opened, Err(OpenError::Unreachable)) {
            self.routes.invalidate(name);
        }
        opened
    }

    fn mark_slow(&self, node: NodeId, slow: bool) {
        let mut marks = self.slow.lock().unwrap_or_else(PoisonError::into_inner);
        if slow {
            marks.insert(node, std::time::Instant::now() + SLOW_FOR);
        } else {
            marks.remove(&node);
        }
    }

    /// Whether the route cache still lists node `via` for `name` (`false`
    /// when it knows the name is gone), or `None` when it has nothing
    /// fresh. For a pooled HTTP upstream through `via`, checked before each
    /// reuse: a client detaching from `via` waits for the streams through
    /// it to end. A read of the cache, never a lookup.
    pub fn route_lists(&self, name: &str, via: NodeId) -> Option<bool> {
        match self.routes.get(name, std::time::Instant::now()) {
            Cached::Found(route) => Some(route.iter().any(|p| p.id == via)),
            Cached::Missing => Some(false),
            Cached::Unknown => None,
        }
    }

    /// Looks `name`'s route up in the background (at most one lookup per
    /// name at a time, [`ROUTE_REFRESHES`] in all) and hands `done` the
    /// nodes it is attached to: none when the name is gone. Nothing is
    /// handed when the lookup fails. The lookup refills the route cache
    /// when it finds attachments.
    pub fn refresh_route(
        self: &Arc<Self>,
        name: &str,
        done: impl FnOnce(&str, &[NodeId]) + Send + 'static,
    ) {
        {
            let mut refreshing = self
                .refreshing
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if refreshing.contains(name) {
                return;
            }
            if refreshing.len() >= ROUTE_REFRESHES {
                self.route_refreshes_skipped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            refreshing.insert(name.to_string());
        }
        let (this, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            let route = match this.lookup(&name).await {
                Ok(route) => Some(route.iter().map(|p| p.id).collect()),
                Err(OpenError::Unknown) => Some(Vec::new()),
                Err(_) => None,
            };
            this.refreshing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&name);
            if let Some(route) = route {
                done(&name, &route);
            }
        });
    }

    /// The tunnel's attachments as the route cache, else the DHT, knows them.
    async fn lookup(&self, name: &str) -> Result<Vec<Peer>, OpenError> {
        // On a node that has not joined, the ring is this node alone: every
        // name would look unknown (and be cached so for a while).
        if !self.ready.wait(READY_WAIT).await {
            return Err(OpenError::NotReady);
        }
        let now = std::time::Instant::now();
        match self.routes.get(name, now) {
            Cached::Found(route) => return Ok(route),
            Cached::Missing => return Err(OpenError::Unknown),
            Cached::Unknown => {}
        }
        let mut looked_up = self.dht.get(name).await;
        if !matches!(looked_up, Some((Outcome::Got { .. }, _))) {
            // A lookup that found no holder ran into a ring change (a
            // holder just died); the ring settles within moments.
            tokio::time::sleep(LOOKUP_RETRY_AFTER).await;
            looked_up = self.dht.get(name).await;
        }
        match looked_up {
            Some((
                Outcome::Got {
                    item: Some(item), ..
                },
                _,
            )) => {
                let route: Vec<Peer> = item
                    .record
                    .live_attachments(now_ms())
                    .map(|(id, a)| Peer { id, addr: a.addr })
                    .collect();
                // A registered name with no live attachment is not a route
                // worth remembering: look again next time.
                if !route.is_empty() {
                    self.routes.found(name, route.clone(), now);
                }
                Ok(route)
            }
            Some((Outcome::Got { item: None, .. }, _)) => {
                self.routes.missing(name, now);
                Err(OpenError::Unknown)
            }
            _ => Err(OpenError::Unreachable),
        }
    }

    /// Remote attachments of `name`, in the order to try them.
    pub(super) async fn route(&self, name: &str) -> Result<Vec<Path>, OpenError> {
        let route = self.lookup(name).await?;
        // Each round trip read once (the pool's lock), for the nearest and
        // for each node's health.
        let rtts: Vec<(NodeId, Option<Duration>)> = route
            .iter()
            .filter(|p| p.id != self.me.id)
            .map(|p| (p.id, self.transport.rtt(p.id)))
            .collect();
        let nearest = rtts.iter().filter_map(|(_, rtt)| *rtt).min();
        let rtt_of = |id: NodeId| rtts.iter().find(|(n, _)| *n == id).and_then(|(_, r)| *r);
        let ordered = {
            let now = std::time::Instant::now();
            let mut slow = self.slow.lock().unwrap_or_else(PoisonError::into_inner);
            slow.retain(|_, until| *until > now);
            order_route(
                &route,
                self.me.id,
                |id| Health {
                    dead: !self.members.is_live(id),
                    silent: self.transport.is_silent(id),
                    slow: slow.contains_key(&id),
                    far: far(rtt_of(id), nearest),
                },
                &mut rand::rng(),
            )
        };
        if ordered.is_empty() {
            return Err(OpenError::Unreachable);
        }
        Ok(ordered.into_iter().map(Path::Via).collect())
    }

    /// The next path to try: local connections first, then (looked up only
    /// when needed) the nodes the client is attached to.
    async fn next_path(&self, name: &str, paths: &mut Paths) -> Option<Path> {
        if paths.queue.is_empty() && paths.route_pending {
            paths.route_pending = false;
            if let Ok(remote) = self.route(name).await {
                paths.queue.extend(remote);
            }
        }
        paths.queue.pop_front()
    }

    /// Tries `paths` by the rule of [`Race`] until one is ready.
    pub(super) async fn race(
        &self,
        name: &str,
        visit: &Visit,
        mut paths: Paths,
    ) -> Result<Pair, OpenError> {
        let began = Instant::now();
        // Each attempt's node, and whether it got its forwarded-stream slot
        // (until then it waits on its tunnel's bound, not on the node).
        let mut race: Race<(Option<Peer>, Arc<std::sync::atomic::AtomicBool>)> = Race::new(began);
        let mut running = tokio::task::JoinSet::new();
        // Task ids of the attempts, so one that panicked can be told apart.
        let mut tasks = std::collections::HashMap::new();
        let (hedge_tx, mut hedge_rx) = tokio::sync::mpsc::channel::<usize>(8);
        let reach = Reach {
            transport: self.transport.clone(),
            members: self.members.clone(),
            slots: self.slots.clone(),
        };
        loop {
            if race.wants_next(Instant::now()) {
                match self.next_path(name, &mut paths).await {
                    Some(path) => {
                        if race.running().next().is_some() {
                            for (peer, slotted) in race.running() {
                                if let Some(peer) = peer
                                    && slotted.load(std::sync::atomic::Ordering::Relaxed)
                                {
                                    self.mark_slow(peer.id, true);
                                }
                            }
                            tracing::info!(tunnel = name, next = %path, waited = ?began.elapsed(), "no attachment answered yet; trying the next as well");
                        }
                        let slotted = Arc::new(std::sync::atomic::AtomicBool::new(matches!(
                            path,
                            Path::Local(_)
                        )));
                        let index = race.launched(Instant::now(), (path.node(), slotted.clone()));
                        let (reach, visit, hedge) =
                            (reach.clone(), visit.clone(), hedge_tx.clone());
                        let task = running.spawn(async move {
                            let result =
                                attempt(reach, path.clone(), visit, hedge, index, slotted).await;
                            (index, path, result)
                        });
                        tasks.insert(task.id(), index);
                    }
                    None => race.exhausted(),
                }
            }
            if race.lost(Instant::now()) {
                if Instant::now() >= began + VISIT_DEADLINE {
                    tracing::warn!(
                        tunnel = name,
                        "no attachment answered within {VISIT_DEADLINE:?}"
                    );
                }
                return Err(OpenError::Unreachable);
            }
            tokio::select! {
                Some(joined) = running.join_next() => match joined {
                    Ok((_, path, Ok(pair))) => {
                        if let Some(peer) = path.node() {
                            self.mark_slow(peer.id, false);
                        }
                        return Ok(pair);
                    }
                    Ok((_, _, Err(OpenError::TargetRefused))) => return Err(OpenError::TargetRefused),
                    Ok((index, path, Err(err))) => {
                        race.failed(index, Instant::now());
                        if let Some(peer) = path.node() {
                            self.mark_slow(peer.id, true);
                        }
                        tracing::info!(tunnel = name, via = %path, %err, "attachment failed, trying the next");
                    }
                    Err(err) => {
                        // Counts as a failed attempt: the next path starts now.
                        tracing::warn!(tunnel = name, %err, "visit attempt panicked");
                        if let Some(index) = tasks.remove(&err.id()) {
                            race.failed(index, Instant::now());
                        }
                    }
                },
                () = tokio::time::sleep_until(race.wake_at()) => {}
                Some(index) = hedge_rx.recv() => race.silent(index, Instant::now()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn peer(id: u64) -> Peer {
        Peer {
            id: NodeId(id),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 7000)),
        }
    }

    #[test]
    fn routes_try_live_then_answering_then_fast_nodes_and_never_this_node() {
        let route: Vec<Peer> = (1..=5).map(peer).collect();
        let health = |id: NodeId| Health {
            dead: id == NodeId(2),
            silent: id == NodeId(3),
            slow: id == NodeId(4),
            far: false,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ordered = order_route(&route, NodeId(5), health, &mut rng);
        let ids: Vec<u64> = ordered.iter().map(|p| p.id.0).collect();
        assert_eq!(ids, vec![1, 4, 3, 2]);
    }

    #[test]
    fn near_attachments_are_tried_before_far_ones_and_share_visitors() {
        let ms = Duration::from_millis;
        let rtt = |id: NodeId| Some(ms(if id.0 == 3 { 300 } else { 2 + id.0 }));
        let nearest = Some(ms(3));
        // 2 ms and 5 ms are equally near; 300 ms across an ocean is far.
        assert!(!far(rtt(NodeId(1)), nearest));
        assert!(!far(rtt(NodeId(3 - 1)), nearest));
        assert!(far(rtt(NodeId(3)), nearest));
        assert!(!far(None, nearest) && !far(Some(ms(300)), None));
        let route: Vec<Peer> = (1..=3).map(peer).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut first = [0usize; 4];
        for _ in 0..1_000 {
            let health = |id: NodeId| Health {
                far: far(rtt(id), nearest),
                ..Health::default()
            };
            let ordered = order_route(&route, NodeId(9), health, &mut rng);
            assert_eq!(ordered[2].id, NodeId(3), "the far one last");
            first[usize::try_from(ordered[0].id.0).unwrap()] += 1;
        }
        assert!(first[1] > 400 && first[2] > 400, "{first:?}");
    }

    #[test]
    fn equally_healthy_attachments_share_the_visitors() {
        let route: Vec<Peer> = (1..=3).map(peer).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut first = [0usize; 4];
        for _ in 0..3_000 {
            let ordered = order_route(&route, NodeId(99), |_| Health::default(), &mut rng);
            first[usize::try_from(ordered[0].id.0).unwrap()] += 1;
        }
        for n in &first[1..] {
            assert!((800..1_200).contains(n), "{first:?}");
        }
    }

    #[test]
    fn the_first_attempt_starts_at_once_and_the_next_after_the_hedge_delay() {
        let t0 = Instant::now();
        let mut race = Race::new(t0);
        assert!(race.wants_next(t0));
        race.launched(t0, "a");
        assert!(!race.wants_next(t0 + VISIT_HEDGE_AFTER / 2));
        assert_eq!(race.wake_at(), t0 + VISIT_HEDGE_AFTER);
        assert!(race.wants_next(t0 + VISIT_HEDGE_AFTER));
        race.launched(t0 + VISIT_HEDGE_AFTER, "b");
        // The slow one keeps running beside the next.
        assert_eq!(race.running().copied().collect::<Vec<_>>(), vec!["a", "b"]);
    }

    #[test]
    fn a_failure_or_a_silent_node_starts_the_next_attempt_at_once() {
        let t0 = Instant::now();
        let mut race = Race::new(t0);
        let a = race.launched(t0, ());
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(race.failed(a, t1), Some(()));
        assert!(race.wants_next(t1));
        let b = race.launched(t1, ());
        let t2 = t1 + Duration::from_millis(10);
        assert!(!race.wants_next(t2));
        race.silent(b, t2);
        assert!(race.wants_next(t2));
    }

    #[test]
    fn silence_reported_by_a_finished_attempt_changes_nothing() {
        let t0 = Instant::now();
        let mut race = Race::new(t0);
        let a = race.launched(t0, ());
        race.failed(a, t0);
        let b = race.launched(t0, ());
        let t1 = t0 + Duration::from_millis(5);
        race.silent(a, t1);
        assert!(!race.wants_next(t1));
        race.silent(b, t1);
        assert!(race.wants_next(t1));
    }

    #[test]
    fn a_visit_fails_when_every_path_failed_or_at_the_deadline() {
        let t0 = Instant::now();
        let mut race = Race::new(t0);
        let a = race.launched(t0, ());
        race.exhausted();
        // Nothing more to try: wait for the one running, up to the deadline.
        assert!(!race.wants_next(t0 + VISIT_HEDGE_AFTER));
        assert_eq!(race.wake_at(), t0 + VISIT_DEADLINE);
        assert!(!race.lost(t0 + VISIT_DEADLINE / 2));
        assert!(race.lost(t0 + VISIT_DEADLINE));
        race.failed(a, t0 + Duration::from_secs(1));
        assert!(race.lost(t0 + Duration::from_secs(1)));
    }
}
