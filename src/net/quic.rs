//! QUIC transport settings: keep-alives, idle timeouts, stream and
//! flow-control limits, and path-MTU discovery, for node↔node and
//! client↔node connections. TLS builds its configs from these; nothing here
//! knows about certificates.

use std::time::Duration;

/// QUIC keep-alive between nodes: well inside the idle timeout, so a quiet but
/// healthy pair keeps its connection, and NAT bindings stay fresh.
pub const NODE_KEEP_ALIVE: Duration = Duration::from_secs(2);

/// QUIC idle timeout between nodes: a dead peer's connection is dropped within
/// 10 s. Failure *detection* is SWIM's job (≈ 2 s); this only frees resources,
/// so it is generous enough to ride out a busy peer.
pub const NODE_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC keep-alive, client↔node: the node's acknowledgements of these tell
/// the client it is alive; after four unanswered ones the client attaches a
/// replacement (see `client::CLIENT_SILENCE`). A few dozen bytes each, ten
/// a second per attachment.
pub const CLIENT_KEEP_ALIVE: Duration = Duration::from_millis(100);

/// QUIC idle timeout, client↔node: a connection silent this long is closed.
/// Longer than the silence that triggers a replacement, so a node that is
/// only slow for a moment keeps its visitors.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// Bi-streams a peer may have open to us at once (QUIC enforces it). Each
/// forwarded visitor holds one for its whole life, so this bounds concurrent
/// visitors per pair of nodes (and per client attachment); 64 stalled the
/// 65th visitor. Memory stays bounded by the connection window
/// ([`NODE_CONNECTION_RECEIVE_WINDOW`], [`CONNECTION_RECEIVE_WINDOW`]), not by
/// the stream count. A connection starts at [`STREAMS_START`] and grows to
/// this as its streams are used ([`StreamBudget`]); at 4,096 a client could
/// not hold 5,000 idle raw-TCP visitors through one node.
pub const MAX_STREAMS_PER_PEER: u32 = 16_384;

/// Bi-streams a peer may open to us at first. quinn keeps state for every
/// stream the peer may open (two hash-map entries each, allocated up front):
/// at 4,096 that was ~0.35 MB per connection, 10 MB of an idle node's memory
/// in a cluster of 30. The limit doubles whenever more than half of it is
/// open ([`StreamBudget`]), one round trip ahead of a burst.
pub const STREAMS_START: u32 = 256;

/// The concurrent-stream limit a peer is given next, once `open` of `limit`
/// streams are open: doubled (up to `max`) past half.
pub fn next_stream_limit(open: u32, limit: u32, max: u32) -> Option<u32> {
    (open.saturating_mul(2) > limit && limit < max).then(|| limit.saturating_mul(2).min(max))
}

/// Grows one connection's limit of concurrent incoming bi-streams from
/// [`STREAMS_START`] to [`MAX_STREAMS_PER_PEER`] as its streams are used
/// (see [`next_stream_limit`]); never lowered, since quinn keeps what it
/// allocated. It also counts the streams this end opened on the connection,
/// so that a connection about to close can wait for both kinds to end.
pub struct StreamBudget {
    conn: quinn::Connection,
    open: std::sync::atomic::AtomicU32,
    ours: std::sync::atomic::AtomicU32,
    limit: std::sync::atomic::AtomicU32,
    counts: std::sync::Arc<StreamCounts>,
}

/// What the [`StreamBudget`]s of a process's connections add up to, for
/// `/metrics`.
#[derive(Debug, Default)]
pub struct StreamCounts {
    /// Incoming bi-streams peers hold open now.
    pub held: std::sync::atomic::AtomicU64,
    /// Times a connection's stream limit was doubled.
    pub raises: std::sync::atomic::AtomicU64,
}

/// One open incoming stream, counted until dropped.
pub struct HeldStream(std::sync::Arc<StreamBudget>);

/// One stream this end opened, counted until dropped.
pub struct OwnStream(std::sync::Arc<StreamBudget>);

impl StreamBudget {
    /// The budget of `conn`, whose limit is [`STREAMS_START`] now, counted
    /// in `counts`.
    pub fn new(
        conn: &quinn::Connection,
        counts: std::sync::Arc<StreamCounts>,
    ) -> std::sync::Arc<Self> {
        std::sync::Arc::new(StreamBudget {
            conn: conn.clone(),
            open: std::sync::atomic::AtomicU32::new(0),
            ours: std::sync::atomic::AtomicU32::new(0),
            limit: std::sync::atomic::AtomicU32::new(STREAMS_START),
            counts,
        })
    }

    /// Counts a stream the peer opened, raising the limit if it is getting
    /// used up; the stream counts until the returned guard is dropped.
    pub fn opened(self: &std::sync::Arc<Self>) -> HeldStream {
        use std::sync::atomic::Ordering;
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.counts.held.fetch_add(1, Ordering::Relaxed);
        let limit = self.limit.load(Ordering::Relaxed);
        if let Some(next) = next_stream_limit(open, limit, MAX_STREAMS_PER_PEER)
            && self
                .limit
                .compare_exchange(limit, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.conn.set_max_concurrent_bi_streams(next.into());
            self.counts.raises.fetch_add(1, Ordering::Relaxed);
        }
        HeldStream(self.clone())
    }

    /// Incoming streams open now.
    pub fn open(&self) -> u32 {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts a stream this end is opening; it counts until the returned
    /// guard is dropped.
    pub fn ours_opened(self: &std::sync::Arc<Self>) -> OwnStream {
        self.ours.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        OwnStream(self.clone())
    }

    /// Streams open now either way.
    pub fn in_use(&self) -> u32 {
        self.open() + self.ours.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for OwnStream {
    fn drop(&mut self) {
        self.0
            .ours
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for HeldStream {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.counts.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Bytes a client may have in flight to us across all streams of its
/// connection (the answers of its visitors), so many open streams cannot make
/// us buffer without bound. Also what a client grants a node.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 64 << 20;

/// Bytes another node may have in flight to us across all streams of the
/// connection: every forwarded visitor and DHT request between the pair.
/// Four times what one tunnel may hold of it (see
/// [`NODE_STREAM_RECEIVE_WINDOW`] and
/// `node::tunnels::slots::FORWARDS_PER_TUNNEL`), so a tunnel whose target
/// stops reading leaves the rest to the other tenants and the DHT.
pub const NODE_CONNECTION_RECEIVE_WINDOW: u32 = 128 << 20;

/// Bytes in flight per stream on every connection a node makes or accepts.
/// A stream whose far side stops reading holds this much of its
/// connection's window until it ends; bounded per tunnel and node (64
/// streams, 32 MiB), that is a quarter of [`NODE_CONNECTION_RECEIVE_WINDOW`].
/// One stream then carries at most 512 KiB per round trip: 4 GB/s at
/// loopback's 0.1 ms, 50 MB/s at 10 ms between data centres, 6.4 MB/s
/// across an ocean at 80 ms (quinn's default, 1.25 MB, would let 53 stalled
/// streams hold all of a 64 MiB window).
pub const NODE_STREAM_RECEIVE_WINDOW: u32 = 512 << 10;

/// Bytes in flight per stream a node sends a client on (a visitor's
/// request and upload), quinn's default being 1.25 MB. The client's
/// process takes a stream's bytes off in bursts, between its other work on
/// a machine it shares; a window of a few milliseconds of a fast stream ran
/// dry during those pauses (quinn's "peer claims to be blocked at stream
/// level", about 600 times a second). The tunnel benchmark's single stream,
/// alternated runs of each build on 2026-11-28: direct path 1.58 / 1.81 /
/// 1.56 / 1.78 / 1.54 / 1.76 Gbit/s with quinn's default against 1.82 /
/// 1.96 / 1.88 at 2 MiB (+13 %, CPU per GiB 6.90 → 6.30 s on average), and
/// 1.72–1.90 at 4 MiB; forwarded 1.29 / 1.08 → 1.39 / 1.28. What the client
/// may buffer in all stays [`CONNECTION_RECEIVE_WINDOW`]; the client's peak
/// RSS during the stream rose from 15–47 to 50–58 MiB (its allocator keeps
/// freed receive buffers for a while; 11–16 MiB 10 s later either way).
pub const CLIENT_STREAM_RECEIVE_WINDOW: u32 = 2 << 20;

/// What a connection we accepted may send before it has proven what it is
/// (a node with a cluster certificate, or a client whose hello was
/// accepted): one bi-stream (a client's control stream, a node's first
/// request) and this many bytes in flight. Anyone can complete a handshake
/// as a tunnel client; with the node limits from the start, 8 such
/// connections pushing data on streams the node never reads held 490 MB.
/// A proven node connection is raised to [`STREAMS_START`] (then grown, see
/// [`StreamBudget`]) and [`NODE_CONNECTION_RECEIVE_WINDOW`], a client's to
/// [`CONNECTION_RECEIVE_WINDOW`] (see [`prove_node`], [`prove_client`]).
pub const UNPROVEN_STREAMS: u32 = 1;
/// See [`UNPROVEN_STREAMS`]: room for a hello (16 names) many times over.
pub const UNPROVEN_RECEIVE_WINDOW: u32 = 256 << 10;

/// Largest UDP payload path-MTU discovery probes for: what a 1,500-byte
/// Ethernet MTU carries over IPv4 (quinn's own default stops at 1,452). It
/// is also the most a peer accepts: quinn's endpoints announce a
/// `max_udp_payload_size` of 1,472 and discovery never goes past the
/// peer's, so a larger bound here alone changes nothing. Jumbo datagrams
/// (8,952 here and announced by both endpoints) were measured on loopback,
/// where discovery reached them within 3 ms: the single stream was no faster
/// and cost more CPU per byte (direct path 1.44 / 1.60 Gbit/s and 8.04 /
/// 7.34 CPU s per GiB, against 1.61 / 1.59 and 6.99 / 7.31 at 1,472, two
/// alternated pairs), and each endpoint's receive buffer grows with the
/// announced size (32 batches of 64 coalesced datagrams each: 17.5 MiB
/// at 8,952, 2.9 MiB at 1,472).
pub const MTU_UPPER_BOUND: u16 = 1_472;

fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    mtu
}

/// Congestion control of every QUIC connection: BBR, which paces by the
/// measured bandwidth and round trip instead of halving its window on each
/// lost packet. A visitor's answer crosses one or two long-lived QUIC hops;
/// on a path with random loss, Cubic (quinn's default) kept their windows
/// small: in the WAN test (RTT 80 ms, 2 % loss) a 100 KB HTTPS request took a
/// p50 of 8.5 RTT through the attached node and 12.7 forwarded with Cubic,
/// 5.3 and 7.5 with BBR. On loopback both carry the same (iperf3 through
/// `specter connect`: 2.3–2.7 Gbit/s direct, 1.8 forwarded, either way).
/// quinn marks its BBR experimental; the test suite, the chaos-kill runs and
/// the WAN test all run on it.
fn congestion() -> std::sync::Arc<quinn::congestion::BbrConfig> {
    std::sync::Arc::new(quinn::congestion::BbrConfig::default())
}

/// Transport settings for node↔node connections (and the node's side of
/// client connections, which share the endpoint's server config).
pub fn node_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.mtu_discovery_config(Some(mtu_discovery()));
    t.keep_alive_interval(Some(NODE_KEEP_ALIVE));
    t.max_concurrent_bidi_streams(STREAMS_START.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.receive_window(NODE_CONNECTION_RECEIVE_WINDOW.into());
    t.stream_receive_window(NODE_STREAM_RECEIVE_WINDOW.into());
    t.congestion_controller_factory(congestion());
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(NODE_IDLE_TIMEOUT).expect("10 s fits a QUIC varint"),
    ));
    t
}

/// Transport settings the node accepts connections with: the node limits,
/// but [`UNPROVEN_STREAMS`] and [`UNPROVEN_RECEIVE_WINDOW`] until
/// [`prove_node`] or [`prove_client`].
pub fn accepted_transport() -> quinn::TransportConfig {
    let mut t = node_transport();
    t.max_concurrent_bidi_streams(UNPROVEN_STREAMS.into());
    t.receive_window(UNPROVEN_RECEIVE_WINDOW.into());
    t
}

/// Raises an accepted node connection (its certificate is from the cluster
/// CA) to the node limits. Credit only grows: what was granted stays.
pub fn prove_node(conn: &quinn::Connection) {
    conn.set_max_concurrent_bi_streams(STREAMS_START.into());
    conn.set_receive_window(NODE_CONNECTION_RECEIVE_WINDOW.into());
}

/// Raises a client connection whose hello was accepted: visitors' answers
/// come back on streams the node opens, so the connection gets the full
/// window; the client itself still opens only its control stream.
pub fn prove_client(conn: &quinn::Connection) {
    conn.set_receive_window(CONNECTION_RECEIVE_WINDOW.into());
}

/// Transport settings for a tunnel client's connections to nodes.
pub fn client_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.mtu_discovery_config(Some(mtu_discovery()));
    t.keep_alive_interval(Some(CLIENT_KEEP_ALIVE));
    // Nodes open one stream per visitor to the client: grown as they are
    // used (see `StreamBudget`).
    t.max_concurrent_bidi_streams(STREAMS_START.into());
    t.receive_window(CONNECTION_RECEIVE_WINDOW.into());
    t.stream_receive_window(CLIENT_STREAM_RECEIVE_WINDOW.into());
    t.congestion_controller_factory(congestion());
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(CLIENT_IDLE_TIMEOUT).expect("3 s fits a QUIC varint"),
    ));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_limit_doubles_past_half_use_up_to_the_maximum() {
        assert_eq!(next_stream_limit(128, 256, 4_096), None);
        assert_eq!(next_stream_limit(129, 256, 4_096), Some(512));
        assert_eq!(next_stream_limit(2_049, 4_096, 4_096), None);
        assert_eq!(next_stream_limit(1_500, 2_048, 3_000), Some(3_000));
        // From the start to the maximum in six doublings.
        let mut limit = STREAMS_START;
        let mut steps = 0;
        while let Some(next) = next_stream_limit(limit, limit, MAX_STREAMS_PER_PEER) {
            limit = next;
            steps += 1;
        }
        assert_eq!((limit, steps), (MAX_STREAMS_PER_PEER, 6));
    }
}
