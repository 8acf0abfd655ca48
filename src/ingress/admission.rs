//! Fair admission of visitor connections: a bound on all connections, a
//! smaller one per source address (and on handshakes under way per source),
//! and, when the node is full, the idlest connection shed for the newcomer
//! rather than every newcomer refused.
//!
//! Each admitted connection holds a [`Ticket`] (inside its IO, so an
//! upgraded WebSocket still holds it) whose [`Slot`] records its activity;
//! dropping the ticket gives the room back.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::limits::{Cut, IngressStats};

/// Where connections are counted from: an IPv4 address, or an IPv6 /64 (one
/// host usually holds a whole /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source(u128);

impl Source {
    /// The source of `addr`.
    pub fn of(addr: IpAddr) -> Source {
        match addr {
            IpAddr::V4(v4) => Source(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(u128::from(u32::from(v4))),
                None => Source((u128::from(v6) >> 64) | (1 << 127)),
            },
        }
    }
}

/// One admitted connection, as its tasks and the admission see it.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    source: Source,
    started: Instant,
    /// Milliseconds after `started` of the last byte either way.
    last: AtomicU64,
    /// Milliseconds after `started` of the last byte written to the visitor.
    last_write: AtomicU64,
    /// Milliseconds after `started` of the last HTTP exchange (a request
    /// begun or ended, a response frame handed over): keep-alive pings and
    /// other protocol chatter do not count, so they cannot keep a connection
    /// that asks for nothing alive.
    last_exchange: AtomicU64,
    handshaking: AtomicBool,
    /// Requests in flight (HTTP); while any is, the connection is not idle.
    in_flight: AtomicUsize,
    /// Requests begun so far.
    requests: AtomicU64,
    /// Cancelled when the connection must end now (shed, or a deadline
    /// found it wanting); every task serving it selects on it.
    close: CancellationToken,
    /// Response bodies whose last frame went out and that have not been
    /// asked for the next, and since when (the visitor is not reading).
    handed: Mutex<HashMap<u64, Instant>>,
    body_keys: AtomicU64,
    /// Told when a request begins, so a watchdog asleep until an idle
    /// deadline looks at the connection again.
    request_began: tokio::sync::Notify,
}

impl Slot {
    /// Records activity (bytes moved) now.
    pub fn touch(&self) {
        self.stamp(&self.last);
    }

    /// Records bytes written to the visitor now (which is also activity).
    pub fn wrote(&self) {
        self.stamp(&self.last);
        self.stamp(&self.last_write);
    }

    /// Records an HTTP exchange now (which is also activity).
    pub fn exchanged(&self) {
        self.stamp(&self.last);
        self.stamp(&self.last_exchange);
    }

    fn stamp(&self, at: &AtomicU64) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        at.store(ms, Ordering::Relaxed);
    }

    fn since(&self, at: &AtomicU64) -> Duration {
        let last = Duration::from_millis(at.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// How long since the last byte either way.
    pub fn idle(&self) -> Duration {
        self.since(&self.last)
    }

    /// How long since the last byte written to the visitor.
    pub fn write_idle(&self) -> Duration {
        self.since(&self.last_write)
    }

    /// How long since the last HTTP exchange (see [`Slot::exchanged`]).
    pub fn exchange_idle(&self) -> Duration {
        self.since(&self.last_exchange)
    }

    /// A request began; the returned guard ends it when dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.exchanged();
        self.request_began.notify_one();
        InFlight(self.clone())
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Completes when a request begins (or one began since the last call).
    pub async fn request_began(&self) {
        self.request_began.notified().await;
    }

    /// Requests begun so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Completes when the connection must end now.
    pub async fn closed(&self) {
        self.close.cancelled().await;
    }

    /// Ends the connection now (its tasks see [`Slot::closed`]).
    pub fn close(&self) {
        self.close.cancel();
    }

    fn handed_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.handed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A key for one response body of this connection.
    pub fn new_body_key(&self) -> u64 {
        self.body_keys.fetch_add(1, Ordering::Relaxed)
    }

    /// Response body `key` handed a frame over to the visitor's connection.
    pub fn handed(&self, key: u64) {
        self.handed_map().insert(key, Instant::now());
        self.exchanged();
    }

    /// Response body `key` was asked for more (or ended).
    pub fn pulled(&self, key: u64) {
        self.handed_map().remove(&key);
    }

    /// How long the oldest frame handed over has waited for the visitor to
    /// take it and ask for more.
    pub fn stalled_for(&self) -> Duration {
        self.handed_map()
            .values()
            .map(|at| at.elapsed())
            .max()
            .unwrap_or_default()
    }
}

/// A request in flight on a [`Slot`]; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<Slot>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.exchanged();
    }
}

/// What the admission bounds.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// All connections.
    pub total: usize,
    /// Connections per source.
    pub per_source: usize,
    /// Connections per source still in their handshake.
    pub handshakes_per_source: usize,
}

#[derive(Default)]
struct PerSource {
    connections: usize,
    handshakes: usize,
}

#[derive(Default)]
struct State {
    slots: HashMap<u64, Arc<Slot>>,
    sources: HashMap<Source, PerSource>,
    next_id: u64,
}

/// The admission of one listener's visitors.
pub struct Admission {
    bounds: Bounds,
    state: Mutex<State>,
    stats: Arc<IngressStats>,
}

/// An admitted connection's hold on its room; dropping it gives the room
/// back.
#[derive(Debug)]
pub struct Ticket {
    slot: Arc<Slot>,
    admission: Arc<Admission>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// An admission with these bounds, counting into `stats`.
    pub fn new(bounds: Bounds, stats: Arc<IngressStats>) -> Arc<Self> {
        Arc::new(Admission {
            bounds,
            state: Mutex::default(),
            stats,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Counters and handles only; a panic elsewhere leaves them usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.state().slots.len()
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Admits a connection from `addr`, shedding the idlest one if the node
    /// is full; refuses it if its source is over its share.
    /// `handshake`: whether the connection starts with a TLS handshake
    /// (counted per source until [`Ticket::handshake_done`]).
    pub fn admit(self: &Arc<Self>, addr: SocketAddr, handshake: bool) -> Result<Ticket, Cut> {
        let source = Source::of(addr.ip());
        let mut state = self.state();
        let per = state.sources.entry(source).or_default();
        if per.connections >= self.bounds.per_source {
            drop(state);
            self.stats.cut(Cut::SourceFull);
            return Err(Cut::SourceFull);
        }
        if handshake && per.handshakes >= self.bounds.handshakes_per_source {
            drop(state);
            self.stats.cut(Cut::SourceHandshakes);
            return Err(Cut::SourceHandshakes);
        }
        per.connections += 1;
        if handshake {
            per.handshakes += 1;
        }
        if state.slots.len() >= self.bounds.total {
            // Shed the idlest: a connection with nothing in flight first,
            // then the one quiet for longest.
            let victim = state
                .slots
                .values()
                .max_by_key(|s| (s.in_flight() == 0, s.idle()))
                .map(|s| s.id);
            if let Some(id) = victim
                && let Some(slot) = state.slots.remove(&id)
            {
                release(&mut state, &slot);
                slot.close();
                self.stats.cut(Cut::Shed);
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let slot = Arc::new(Slot {
            id,
            source,
            started: Instant::now(),
            last: AtomicU64::new(0),
            last_write: AtomicU64::new(0),
            last_exchange: AtomicU64::new(0),
            handshaking: AtomicBool::new(handshake),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            close: CancellationToken::new(),
            handed: Mutex::default(),
            body_keys: AtomicU64::new(0),
            request_began: tokio::sync::Notify::new(),
        });
        state.slots.insert(id, slot.clone());
        Ok(Ticket {
            slot,
            admission: self.clone(),
        })
    }
}

/// Gives a slot's room back to its source (it is already out of `slots`).
fn release(state: &mut State, slot: &Slot) {
    if let Some(per) = state.sources.get_mut(&slot.source) {
        per.connections = per.connections.saturating_sub(1);
        if slot.handshaking.swap(false, Ordering::Relaxed) {
            per.handshakes = per.handshakes.saturating_sub(1);
        }
        if per.connections == 0 {
            state.sources.remove(&slot.source);
        }
    }
}

impl Ticket {
    /// The connection's slot.
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }

    /// The TLS handshake is done: the connection no longer counts toward
    /// its source's handshakes, and its first-request time starts now.
    pub fn handshake_done(&self) {
        {
            // Under the lock: a shed (which releases the slot) cannot slip in
            // between the flag and the count.
            let mut state = self.admission.state();
            if self.slot.handshaking.swap(false, Ordering::Relaxed)
                && state.slots.contains_key(&self.slot.id)
                && let Some(per) = state.sources.get_mut(&self.slot.source)
            {
                per.handshakes = per.handshakes.saturating_sub(1);
            }
        }
        self.slot.exchanged();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.admission.state();
        // A shed slot was already taken out and released.
        if state.slots.remove(&self.slot.id).is_some() {
            release(&mut state, &self.slot);
        }
    }
}

/// A ticket from a small admission of its own, for tests of what holds one.
#[cfg(test)]
pub(crate) fn test_ticket(stats: &Arc<IngressStats>) -> Ticket {
    let admission = Admission::new(
        Bounds {
            total: 4,
            per_source: 4,
            handshakes_per_source: 4,
        },
        stats.clone(),
    );
    admission
        .admit("127.0.0.1:1".parse().expect("an address"), true)
        .expect("room for one")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(total: usize, per_source: usize, handshakes: usize) -> Arc<Admission> {
        Admission::new(
            Bounds {
                total,
                per_source,
                handshakes_per_source: handshakes,
            },
            Arc::default(),
        )
    }

    fn from(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40_000)
    }

    #[test]
    fn one_source_cannot_take_more_than_its_share() {
        let a = admission(100, 3, 3);
        let held: Vec<Ticket> = (0..3)
            .map(|_| a.admit(from("10.0.0.1"), true).unwrap())
            .collect();
        assert_eq!(
            a.admit(from("10.0.0.1"), true).unwrap_err(),
            Cut::SourceFull
        );
        // Another source is not affected.
        let other = a.admit(from("10.0.0.2"), true).unwrap();
        drop(held);
        assert_eq!(a.len(), 1);
        a.admit(from("10.0.0.1"), true).unwrap();
        drop(other);
    }

    #[test]
    fn handshakes_under_way_are_bounded_per_source_until_they_complete() {
        let a = admission(100, 10, 2);
        let t1 = a.admit(from("10.0.0.1"), true).unwrap();
        let _t2 = a.admit(from("10.0.0.1"), true).unwrap();
        assert_eq!(
            a.admit(from("10.0.0.1"), true).unwrap_err(),
            Cut::SourceHandshakes
        );
        t1.handshake_done();
        let _t3 = a.admit(from("10.0.0.1"), true).unwrap();
    }

    #[test]
    fn connections_without_a_handshake_do_not_count_as_handshakes() {
        let a = admission(100, 10, 1);
        let _tls = a.admit(from("10.0.0.1"), true).unwrap();
        let _plain: Vec<Ticket> = (0..5)
            .map(|_| a.admit(from("10.0.0.1"), false).unwrap())
            .collect();
        assert_eq!(
            a.admit(from("10.0.0.1"), true).unwrap_err(),
            Cut::SourceHandshakes
        );
    }

    #[test]
    fn a_full_node_sheds_its_idlest_connection_for_a_newcomer() {
        let a = admission(2, 10, 10);
        let quiet = a.admit(from("10.0.0.1"), true).unwrap();
        let busy = a.admit(from("10.0.0.2"), true).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        busy.slot().touch();
        let _req = busy.slot().request();
        let newcomer = a.admit(from("10.0.0.3"), true).unwrap();
        assert!(quiet.slot().close.is_cancelled(), "the idle one was shed");
        assert!(!busy.slot().close.is_cancelled());
        assert!(!newcomer.slot().close.is_cancelled());
        assert_eq!(a.len(), 2);
        // Dropping the shed ticket later does not free anyone else's room.
        drop(quiet);
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn an_ipv6_host_counts_as_its_slash_64() {
        assert_eq!(
            Source::of("2001:db8::1".parse().unwrap()),
            Source::of("2001:db8::ffff:1".parse().unwrap())
        );
        assert_ne!(
            Source::of("2001:db8:0:1::1".parse().unwrap()),
            Source::of("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            Source::of("::ffff:10.0.0.1".parse().unwrap()),
            Source::of("10.0.0.1".parse().unwrap())
        );
    }
}
