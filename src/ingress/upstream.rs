//! Reused upstreams for HTTP visitors, as a reverse proxy keeps idle
//! keep-alive connections to its backends: an HTTP/1.1 connection over a
//! tunnel stream (the client's TCP connection to the target behind it) goes
//! back to a per-tunnel idle list when its answer is done, and the next
//! request for that tunnel takes it instead of opening a stream, waiting for
//! the client's `Ready` and making the client dial the target again.
//!
//! A pooled connection that died meanwhile (its node was killed, the target
//! closed it) is found closed before use, or fails before the request was
//! sent and the request goes to a fresh stream; one that fails after sending
//! costs a retry for a replayable request, as any path does.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use specter_gossip::NodeId;

use super::bodies::BoxError;
use super::early::{OpenOutcome, Opening};
use crate::node::tunnels::Tunnels;
use crate::node::tunnels::visit::Pair;

/// Idle connections kept per tunnel: enough for 64 keep-alive visitors
/// through one node without reopening.
pub const IDLE_PER_TUNNEL: usize = 64;

/// Idle connections kept in all, per pool (a node has two: the full proxy's
/// and the fast path's); past it an answered connection is closed.
pub const IDLE_TOTAL: usize = 1_024;

/// An idle connection older than this is closed rather than reused: well
/// under common server keep-alive times (nginx: 75 s), so the target seldom
/// closes one just as it is reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection is not reused once it is this old, however busy: so a
/// pooled path follows the tunnel's attachments as they change, and one
/// through an attachment its client is detaching (which waits for the
/// streams on it to end, see `client::attachment::DETACH_DRAIN`) retires
/// within this time instead of being reused for ever, even where the route
/// check before each reuse ([`Upstreams::take_routed`]) could not tell. nginx bounds a
/// kept-alive upstream's life the same way (`keepalive_time`). It costs one
/// tunnel stream and target connection per pooled connection per minute.
pub const REUSE_WITHIN: Duration = Duration::from_secs(60);

/// How often the pool drops what expired or closed, whatever the traffic
/// (an answer sweeps only its own tunnel's list): a tunnel that went quiet
/// keeps its connections, their tunnel streams and the client's target
/// connections at most this much past [`IDLE_TIMEOUT`].
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A connection over a tunnel stream that the pool can keep: hyper's
/// HTTP/1.1 client ([`SendRequest`]), or the stream itself for the
/// HTTP/1.1 fast path (`super::fast`).
pub trait Link: Send + 'static {
    /// Whether it is known to have closed (the target, or the path under
    /// it, ended it), without looking at it: checked for a whole tunnel's
    /// list at each answer.
    fn closed(&mut self) -> bool;
    /// Whether it has closed, looked at: checked before reuse and by the
    /// periodic sweep.
    fn probe(&mut self) -> bool {
        self.closed()
    }
    /// Whether it can take a request now.
    fn ready(&mut self) -> bool {
        true
    }
}

impl<B: Send + 'static> Link for SendRequest<B> {
    fn closed(&mut self) -> bool {
        self.is_closed()
    }

    fn ready(&mut self) -> bool {
        self.is_ready()
    }
}

/// A bare tunnel stream, as the pool keeps it between answers of the
/// HTTP/1.1 fast path (`super::fast`).
pub struct RawLink(pub Opening<Pair>);

impl Link for RawLink {
    /// Only a look tells (see [`Link::probe`]): each would take the
    /// connection's lock, so an answer does not look at its tunnel's whole
    /// list.
    fn closed(&mut self) -> bool {
        false
    }

    /// Idle between answers, a live stream has nothing to read: an end, an
    /// error or a stray byte (an answer longer than it said) all retire it.
    /// Looked at without waiting, so a stream the target closed while idle
    /// is not reused.
    fn probe(&mut self) -> bool {
        use tokio::io::AsyncRead as _;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        !Pin::new(&mut self.0)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }
}

/// The node a tunnel stream goes through, set once it has opened (unset for
/// a stream to a client attached here).
pub type Via = Arc<OnceLock<NodeId>>;

/// An HTTP/1.1 connection over a tunnel stream, and the handle that gives
/// the stream up (resets it) when the connection is dropped mid-answer.
pub struct Upstream<L> {
    pub link: L,
    pub stream: OpenOutcome,
    /// When its stream was opened (see [`REUSE_WITHIN`]).
    opened: Instant,
    via: Via,
}

impl<L> Upstream<L> {
    /// `link`'s connection runs over the stream `stream` is the handle of,
    /// whose opening began at `opened` (before its request was sent: an
    /// eviction while its first answer was awaited must retire it too),
    /// through the node `via` names once it is open.
    pub fn new(link: L, stream: OpenOutcome, opened: Instant, via: Via) -> Self {
        Upstream {
            link,
            stream,
            opened,
            via,
        }
    }

    fn via(&self) -> Option<NodeId> {
        self.via.get().copied()
    }
}

struct Idle<L> {
    upstream: Upstream<L>,
    since: Instant,
}

impl<L: Link> Idle<L> {
    /// Whether it may still be reused at `now` (read once by the caller for
    /// a whole list: an answer checks its tunnel's list, up to
    /// [`IDLE_PER_TUNNEL`] connections, and a clock read each was most of
    /// the pool's cost per request), its link looked at ([`Link::probe`])
    /// or only asked ([`Link::closed`]) as `probe` says.
    fn live(&mut self, now: Instant, probe: bool) -> bool {
        now.saturating_duration_since(self.since) < IDLE_TIMEOUT
            && now.saturating_duration_since(self.upstream.opened) < REUSE_WITHIN
            && !(if probe {
                self.upstream.link.probe()
            } else {
                self.upstream.link.closed()
            })
    }
}

/// The lists, and how many connections they hold in all.
struct Lists<L> {
    by_tunnel: HashMap<String, Vec<Idle<L>>>,
    total: usize,
    /// When each tunnel's connections through each path (a node, or `None`
    /// for a client attached here) were last evicted: one opened before
    /// that and answering then is not kept after its answer either. At
    /// most [`IDLE_TOTAL`] tunnels and [`IDLE_PER_TUNNEL`] paths each; an
    /// entry is forgotten after [`REUSE_WITHIN`], past which no connection
    /// opened before is kept anyway.
    evicted: HashMap<String, Vec<(Option<NodeId>, Instant)>>,
}

impl<L: Link> Lists<L> {
    /// Drops what expired or closed in `name`'s list (every list when
    /// `name` is `None`, then looking at each connection: see
    /// [`Link::probe`]), so they hold only live connections. (Dropping a
    /// sender only closes a channel; its connection task ends on its own.)
    fn sweep(&mut self, name: Option<&str>, now: Instant) {
        let mut dropped = 0;
        let mut prune = |list: &mut Vec<Idle<L>>| {
            let before = list.len();
            list.retain_mut(|idle| idle.live(now, name.is_none()));
            dropped += before - list.len();
            !list.is_empty()
        };
        match name {
            Some(name) => {
                if let Some(list) = self.by_tunnel.get_mut(name)
                    && !prune(list)
                {
                    self.by_tunnel.remove(name);
                }
            }
            None => {
                self.by_tunnel.retain(|_, list| prune(list));
                self.evicted.retain(|_, paths| {
                    paths.retain(|(_, at)| now.saturating_duration_since(*at) < REUSE_WITHIN);
                    !paths.is_empty()
                });
            }
        }
        self.total -= dropped;
    }
}

/// The idle upstream connections of a node's HTTP ingress, by tunnel.
pub struct Upstreams<L> {
    idle: Mutex<Lists<L>>,
}

impl<L: Link> Upstreams<L> {
    /// A pool that drops its expired connections every [`SWEEP_EVERY`]
    /// while it lives (when made inside a tokio runtime).
    pub fn new() -> Arc<Self> {
        let pool = Arc::new(Upstreams {
            idle: Mutex::new(Lists {
                by_tunnel: HashMap::new(),
                total: 0,
                evicted: HashMap::new(),
            }),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(pool) = weak.upgrade() else {
                        break;
                    };
                    pool.idle().sweep(None, Instant::now());
                }
            });
        }
        pool
    }
}

impl<L: Link> Upstreams<L> {
    fn idle(&self) -> std::sync::MutexGuard<'_, Lists<L>> {
        // Handles only; a panic elsewhere leaves the map usable.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle, open, ready connection to tunnel `name`, newest first.
    pub fn take(&self, name: &str) -> Option<Upstream<L>> {
        let mut idle = self.idle();
        let list = idle.by_tunnel.get_mut(name)?;
        let now = Instant::now();
        let mut popped = 0;
        let found = loop {
            let Some(mut candidate) = list.pop() else {
                break None;
            };
            popped += 1;
            if candidate.live(now, true) && candidate.upstream.link.ready() {
                break Some(candidate.upstream);
            }
        };
        if list.is_empty() {
            idle.by_tunnel.remove(name);
        }
        idle.total -= popped;
        found
    }

    /// [`Self::take`], skipping connections through a node the tunnel's
    /// route no longer lists (its client detached from there, and waits for
    /// the streams through it to end): those, and every other kept through
    /// that node, are evicted. Checked against the route cache, without
    /// waiting: while it has nothing fresh, the connection is reused and
    /// the route looked up in the background, whose answer evicts what is
    /// off it. A detach is thus followed within the cache's lifetime
    /// (`route_cache::FOUND_TTL`, 10 s) of reaching the DHT, while the DHT
    /// answers; else within [`REUSE_WITHIN`].
    pub fn take_routed(
        self: &Arc<Self>,
        name: &str,
        tunnels: &Arc<Tunnels>,
    ) -> Option<Upstream<L>> {
        loop {
            let upstream = self.take(name)?;
            let Some(via) = upstream.via() else {
                return Some(upstream);
            };
            match tunnels.route_lists(name, via) {
                Some(true) => return Some(upstream),
                Some(false) => self.evict(name, Some(via)),
                None => {
                    let pool = Arc::downgrade(self);
                    tunnels.refresh_route(name, move |name, route| {
                        if let Some(pool) = pool.upgrade() {
                            pool.evict_off(name, route, via);
                        }
                    });
                    return Some(upstream);
                }
            }
        }
    }

    /// Evicts `name`'s connections through nodes that are not in `route`:
    /// those idle now, and `used`'s, the path whose reuse asked for the
    /// route (its connection is likely still answering: the eviction keeps
    /// it from coming back).
    fn evict_off(&self, name: &str, route: &[NodeId], used: NodeId) {
        let mut off: Vec<NodeId> = {
            let idle = self.idle();
            let list = idle.by_tunnel.get(name).map_or(&[][..], Vec::as_slice);
            list.iter()
                .filter_map(|i| i.upstream.via())
                .chain([used])
                .filter(|via| !route.contains(via))
                .collect()
        };
        off.sort_unstable();
        off.dedup();
        for via in off {
            self.evict(name, Some(via));
        }
    }

    /// Keeps `sender`, whose answer is done, for the next request to `name`
    /// (unless the bounds are reached; then it is dropped and closes).
    /// What expired or closed meanwhile is dropped from `name`'s list here,
    /// and from the others by the sweep every [`SWEEP_EVERY`], so an answer
    /// never walks the whole pool.
    pub fn put(&self, name: &str, upstream: Upstream<L>) {
        let mut idle = self.idle();
        let now = Instant::now();
        idle.sweep(Some(name), now);
        let via = upstream.via();
        let evicted_since = idle.evicted.get(name).is_some_and(|paths| {
            paths
                .iter()
                .any(|&(path, at)| path == via && upstream.opened < at)
        });
        let aged = now.saturating_duration_since(upstream.opened) >= REUSE_WITHIN;
        if idle.total >= IDLE_TOTAL || aged || evicted_since {
            return;
        }
        let kept = Idle {
            upstream,
            since: now,
        };
        match idle.by_tunnel.get_mut(name) {
            Some(list) if list.len() >= IDLE_PER_TUNNEL => return,
            Some(list) => list.push(kept),
            None => {
                idle.by_tunnel.insert(name.to_string(), vec![kept]);
            }
        }
        idle.total += 1;
    }

    /// Closes the idle connections to `name` through `via` (a node, or
    /// `None` for a client attached here), and keeps none open now on that
    /// path once it is answered: visits of that tunnel wait for a forwarded
    /// stream to that node, and idle ones hold theirs (see
    /// `node::tunnels::slots`), or the tunnel's client is leaving that node
    /// and waits for the streams they hold.
    pub fn evict(&self, name: &str, via: Option<NodeId>) {
        let evicted = {
            let mut idle = self.idle();
            let mut gone = Vec::new();
            if let Some(list) = idle.by_tunnel.get_mut(name) {
                let (out, kept) = std::mem::take(list)
                    .into_iter()
                    .partition::<Vec<_>, _>(|i| i.upstream.via() == via);
                *list = kept;
                gone = out;
                if list.is_empty() {
                    idle.by_tunnel.remove(name);
                }
            }
            idle.total -= gone.len();
            let now = Instant::now();
            let known = idle.evicted.contains_key(name);
            if known || idle.evicted.len() < IDLE_TOTAL {
                let paths = idle.evicted.entry(name.to_string()).or_default();
                if let Some(i) = paths.iter().position(|(path, _)| *path == via) {
                    paths[i].1 = now;
                } else if paths.len() < IDLE_PER_TUNNEL {
                    paths.push((via, now));
                } else if let Some(oldest) = paths.iter_mut().min_by_key(|(_, at)| *at) {
                    // Every place taken: the oldest path's entry goes.
                    *oldest = (via, now);
                }
            }
            gone
        };
        drop(evicted);
    }

    /// Idle connections kept now.
    pub fn len(&self) -> usize {
        self.idle().total
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where an answered upstream goes back to, and when: unless visits of its
/// tunnel wait for a forwarded stream (`wanted`), since idle it would hold
/// a slot they need (see `node::tunnels::slots`).
pub struct Return<B: Send + 'static> {
    pub upstream: Upstream<SendRequest<B>>,
    pub name: String,
    pub upstreams: Arc<Upstreams<SendRequest<B>>>,
    pub tunnels: Arc<Tunnels>,
}

impl<B: Send + 'static> Return<B> {
    /// Pools the connection if it is ready for the next request now (its
    /// answer was read to the end and hyper took it back), else once it is,
    /// within the idle time; a connection the target closed is dropped.
    fn home(self) {
        if self.upstream.link.is_closed() {
            return;
        }
        if self.upstream.link.is_ready() {
            self.put();
            return;
        }
        // hyper's connection task has not taken it back yet (or the answer
        // was dropped before its end): wait for it, bounded.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut this = self;
        runtime.spawn(async move {
            let ready = this.upstream.link.ready();
            if let Ok(Ok(())) = tokio::time::timeout(IDLE_TIMEOUT, ready).await {
                this.put();
            }
        });
    }

    fn put(self) {
        home(&self.upstreams, &self.tunnels, &self.name, self.upstream);
    }
}

/// Pools `upstream`, whose answer is done, for tunnel `name`, unless visits
/// of the tunnel wait for a forwarded stream through its node (`wanted`):
/// idle, it would hold a slot they need (see `node::tunnels::slots`).
pub fn home<L: Link>(
    upstreams: &Upstreams<L>,
    tunnels: &Tunnels,
    name: &str,
    upstream: Upstream<L>,
) {
    let wanted = upstream
        .via()
        .is_some_and(|node| tunnels.slots.wanted(node, name));
    if !wanted {
        upstreams.put(name, upstream);
    }
}

/// An upstream's answer on its way to the visitor: when it has been read
/// to the end, its connection goes back to the pool from here, mostly
/// without a task per request to wait for it (one is spawned when hyper has
/// not taken the connection back yet, or the answer was dropped before its
/// end or never polled, as a HEAD's is).
pub struct Returning<B: Send + 'static> {
    inner: Incoming,
    back: Option<Return<B>>,
}

impl<B: Send + 'static> Returning<B> {
    pub fn new(inner: Incoming, back: Return<B>) -> Self {
        Returning {
            inner,
            back: Some(back),
        }
    }
}

impl<B: Send + 'static> Body for Returning<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let done = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) => {
                // A broken answer: the connection is not reused.
                self.back = None;
                false
            }
            Poll::Pending => false,
        };
        if done && let Some(back) = self.back.take() {
            back.home();
        }
        polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Send + 'static> Drop for Returning<B> {
    fn drop(&mut self) {
        if let Some(back) = self.back.take() {
            back.home();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;

    /// A ready HTTP/1.1 sender over an in-memory pipe, and the far end
    /// (dropping it closes the connection).
    async fn sender() -> (Upstream<SendRequest<Empty<Bytes>>>, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(1024);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.ready().await.unwrap();
        (
            Upstream::new(
                sender,
                OpenOutcome::default(),
                Instant::now(),
                Via::default(),
            ),
            far,
        )
    }

    #[tokio::test]
    async fn connections_through_a_node_are_dropped_together_and_the_rest_kept() {
        let pool = Upstreams::new();
        let mut far_ends = Vec::new();
        for (name, via) in [
            ("a", Some(7)),
            ("a", None),
            ("a", Some(7)),
            ("a", Some(8)),
            ("b", Some(7)),
        ] {
            let (s, far) = sender().await;
            if let Some(id) = via {
                s.via.set(NodeId(id)).unwrap();
            }
            pool.put(name, s);
            far_ends.push(far);
        }
        pool.evict("a", Some(NodeId(7)));
        assert_eq!(pool.len(), 3);
        let mut left: Vec<_> = std::iter::from_fn(|| pool.take("a"))
            .map(|u| u.via())
            .collect();
        left.sort();
        assert_eq!(left, [None, Some(NodeId(8))]);
        assert_eq!(pool.take("b").and_then(|u| u.via()), Some(NodeId(7)));
        pool.evict("c", Some(NodeId(7)));
        assert!(pool.is_empty());
    }

    #[tokio::test]
    async fn the_count_follows_puts_takes_evictions_and_closed_connections() {
        let pool = Upstreams::new();
        let mut far_ends = Vec::new();
        for name in ["a", "a", "a", "b", "b"] {
            let (s, far) = sender().await;
            pool.put(name, s);
            far_ends.push(far);
        }
        assert_eq!(pool.len(), 5);
        assert!(pool.take("a").is_some());
        assert_eq!(pool.len(), 4);
        pool.evict("b", None);
        assert_eq!(pool.len(), 2);
        assert!(pool.take("b").is_none());

        // The far ends of "a"'s two go away: the next put to "a" drops them.
        far_ends.truncate(0);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (s, far) = sender().await;
            far_ends.push(far);
            pool.put("a", s);
            if pool.len() == 1 {
                break;
            }
            assert!(pool.take("a").is_some(), "the live one is still there");
            assert!(Instant::now() < deadline, "closed connections were kept");
            tokio::task::yield_now().await;
        }
        assert!(pool.take("a").is_some());
        assert!(pool.take("a").is_none());
        assert!(pool.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnels_expired_connections_are_dropped_without_traffic() {
        let pool = Upstreams::new();
        let (s, _far) = sender().await;
        pool.put("quiet", s);
        assert_eq!(pool.len(), 1);
        tokio::time::sleep(SWEEP_EVERY * 2).await;
        assert_eq!(pool.len(), 1, "a live connection was dropped");
        // `Idle::live` reads the real clock, which paused time does not
        // move: age the entry by hand. No answer and no take follow: only
        // the sweep can drop it.
        pool.idle().by_tunnel.get_mut("quiet").unwrap()[0].since -= IDLE_TIMEOUT;
        tokio::time::sleep(SWEEP_EVERY * 2).await;
        assert!(pool.is_empty(), "the sweep left an expired connection");
    }

    #[tokio::test]
    async fn a_connection_past_its_reuse_age_is_neither_taken_nor_kept() {
        let pool = Upstreams::new();
        let (young, _far) = sender().await;
        let (mut old, _far_old) = sender().await;
        // `REUSE_WITHIN` reads the real clock: age one by hand.
        old.opened -= REUSE_WITHIN;
        pool.put("a", old);
        assert!(pool.is_empty(), "an old connection was kept");
        pool.put("a", young);
        let mut taken = pool.take("a").expect("a young one is reused");
        // It ages while it answers: back in the pool, it is not reused.
        taken.opened -= REUSE_WITHIN;
        pool.put("a", taken);
        assert!(pool.take("a").is_none());
        // Nor is one that aged while idle.
        let (young, _far) = sender().await;
        pool.put("a", young);
        pool.idle().by_tunnel.get_mut("a").unwrap()[0]
            .upstream
            .opened -= REUSE_WITHIN;
        assert!(pool.take("a").is_none());
        assert!(pool.is_empty());
    }

    #[tokio::test]
    async fn a_connection_answering_through_an_eviction_is_not_kept_after() {
        let pool = Upstreams::new();
        let (s, _far) = sender().await;
        pool.put("a", s);
        let busy = pool.take("a").unwrap();
        let (idle, _far_idle) = sender().await;
        pool.put("a", idle);
        pool.evict("a", None);
        assert!(pool.is_empty());
        // The one that was answering comes back: closed, not kept.
        pool.put("a", busy);
        assert!(pool.is_empty());
        // One opened since is kept.
        let (fresh, _far_fresh) = sender().await;
        pool.put("a", fresh);
        assert!(pool.take("a").is_some());
    }

    #[tokio::test]
    async fn a_route_without_a_node_evicts_its_paths_answering_ones_included() {
        let pool = Upstreams::new();
        let (answering, _far) = sender().await;
        answering.via.set(NodeId(7)).unwrap();
        let (idle, _far_idle) = sender().await;
        idle.via.set(NodeId(9)).unwrap();
        let (kept, _far_kept) = sender().await;
        kept.via.set(NodeId(8)).unwrap();
        pool.put("a", idle);
        pool.put("a", kept);
        // The route came back without 7 (whose connection is answering) and 9.
        pool.evict_off("a", &[NodeId(8)], NodeId(7));
        assert_eq!(pool.len(), 1);
        pool.put("a", answering);
        assert_eq!(pool.take("a").and_then(|u| u.via()), Some(NodeId(8)));
        assert!(pool.is_empty());
    }

    #[tokio::test]
    async fn an_eviction_through_one_node_leaves_the_other_paths_alone() {
        let pool = Upstreams::new();
        let (direct, _far) = sender().await;
        let (elsewhere, _far_elsewhere) = sender().await;
        elsewhere.via.set(NodeId(8)).unwrap();
        let (busy, _far_busy) = sender().await;
        busy.via.set(NodeId(7)).unwrap();
        pool.evict("a", Some(NodeId(7)));
        // Answering through node 7 during its eviction: not kept.
        pool.put("a", busy);
        assert!(pool.is_empty());
        // Opened as early, through other paths: kept.
        pool.put("a", direct);
        pool.put("a", elsewhere);
        assert_eq!(pool.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_total_bound_answered_connections_are_not_kept() {
        let pool = Upstreams::new();
        let mut far_ends = Vec::new();
        for i in 0..IDLE_TOTAL + 5 {
            let (s, far) = sender().await;
            pool.put(&format!("t{}", i / IDLE_PER_TUNNEL), s);
            far_ends.push(far);
        }
        assert_eq!(pool.len(), IDLE_TOTAL);
        let (s, _far) = sender().await;
        pool.put("new", s);
        assert!(pool.take("new").is_none(), "kept past the bound");
        // Once some close, the sweep makes room for new ones.
        far_ends.truncate(IDLE_TOTAL - 10);
        tokio::time::sleep(SWEEP_EVERY * 2).await;
        assert_eq!(pool.len(), IDLE_TOTAL - 10);
        let (s, _far) = sender().await;
        pool.put("new", s);
        assert!(pool.take("new").is_some(), "no room after the sweep");
    }
}
