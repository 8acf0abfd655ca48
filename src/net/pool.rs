//! The node↔node QUIC connection pool: one endpoint (one UDP socket) per
//! node, at most one connection per pair of nodes, dialed lazily, shared by
//! everything node↔node, closed when idle.
//!
//! Simultaneous dials from both ends settle on the connection dialed by the
//! lower [`NodeId`]: both ends apply the same rule, so both keep the same one.
//! Every connection is attributed to the id its peer's certificate proves;
//! a dial made to reach id X that reaches a certificate for Y is closed.
//! Accepting (and sorting out what peers open) is in `net::accept`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, Endpoint};
use serde::Serialize;
use specter_gossip::NodeId;
use tokio::sync::{Semaphore, mpsc};

use super::liveness::{PEER_SILENCE, silent};
use super::quic::{OwnStream, StreamBudget};
use super::streams::{StreamInbox, StreamRoutes};
use super::tls::{self, NODE_SERVER_NAME, NodeTls, TlsError};
use crate::wire::{
    CLOSE_DUPLICATE, CLOSE_IDLE, CLOSE_PEER_DOWN, CLOSE_SHUTDOWN, CLOSE_WRONG_PEER, StreamKind,
    WireError,
};

/// Client connections waiting for the tunnel server; beyond this, new ones
/// are closed with [`crate::wire::CLOSE_BUSY`].
pub const CLIENT_INBOX_CAPACITY: usize = 256;

/// Client connections (ALPN `specter-client/1`) for the tunnel server.
pub type ClientInbox = mpsc::Receiver<Connection>;

/// A connection that carried nothing for this long is closed; the next send
/// dials again. Gossip reaches every member of a small cluster every few
/// seconds, so only pairs that stopped talking are affected.
pub const POOL_IDLE_CLOSE: Duration = Duration::from_secs(30);

/// How often idle connections are looked for.
pub(super) const SWEEP_PERIOD: Duration = Duration::from_secs(5);

/// Datagrams kept per peer while its connection is being dialed. Gossip
/// tolerates loss, so more would only delay fresher packets.
pub const PENDING_PER_PEER: usize = 16;

/// After a failed dial to a node, datagrams to it are dropped (not redialed)
/// for this long: gossip keeps probing a dead node several times a second,
/// and each probe must not become a new handshake.
pub const DIAL_BACKOFF: Duration = Duration::from_secs(1);

/// Received datagrams waiting for the gossip task. When full, new datagrams
/// are dropped and counted (SWIM treats that as loss) rather than queued
/// without bound.
pub const INBOX_CAPACITY: usize = 4_096;

/// Handshakes in progress at once from unknown peers; more are refused, so a
/// flood of connection attempts cannot exhaust memory.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// A dial or an inbound handshake that has not completed by then is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a connection that lost a simultaneous dial (see
/// [`keep_newer`]) stays open for the streams already on it. Both ends
/// open no new stream on it; it closes once its streams have ended (and
/// [`drain_quiet`] has passed), or after this, cutting what is still open.
/// Long, since a forwarded visitor (an ssh session) may be on it, and
/// cheap: at most one such connection per peer ([`Pool::draining`]).
pub const DUPLICATE_DRAIN_LIMIT: Duration = Duration::from_secs(600);

/// How often a draining connection looks at its streams.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// How long a draining connection must have had no open stream before it
/// closes: the last bytes of a stream that just ended on this end may still
/// be in flight to the peer, and a close would drop them. Ten round trips,
/// and never under two seconds, cover their loss and retransmission.
pub fn drain_quiet(rtt: Duration) -> Duration {
    (rtt * 10).max(Duration::from_secs(2))
}

/// Datagrams received from nodes, tagged with the cert-derived id of the
/// connection each arrived on.
pub type Inbox = mpsc::Receiver<(NodeId, Bytes)>;

/// What a transport hands to the rest of the node.
pub struct Inboxes {
    /// Gossip datagrams.
    pub datagrams: Inbox,
    /// DHT requests (streams of kind `Rpc`).
    pub rpc: StreamInbox,
    /// Forwarded visitors (streams of kind `Forward`).
    pub forwards: StreamInbox,
    /// Client connections.
    pub clients: ClientInbox,
}

/// Why a dial failed. The pool is unchanged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    /// quinn refused to start the connection (bad address, endpoint closed).
    #[error("cannot dial {addr}: {source}")]
    Connect {
        /// Target address.
        addr: SocketAddr,
        /// The cause.
        source: quinn::ConnectError,
    },
    /// The handshake failed (unreachable, refused, TLS error).
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// Target address.
        addr: SocketAddr,
        /// The cause.
        source: quinn::ConnectionError,
    },
    /// No answer within [`HANDSHAKE_TIMEOUT`].
    #[error("handshake with {0} timed out")]
    Timeout(SocketAddr),
    /// The peer's certificate proves another id than the one we meant to reach.
    #[error("{addr} proved id {actual}, expected {expected}")]
    WrongPeer {
        /// Target address.
        addr: SocketAddr,
        /// The id we wanted.
        expected: NodeId,
        /// The id its certificate proves.
        actual: NodeId,
    },
    /// The address is our own endpoint.
    #[error("{0} is this node")]
    SelfDial(SocketAddr),
    /// The peer presented no usable certificate (cannot happen with our TLS
    /// configuration; kept as an error rather than a panic).
    #[error("{0} presented no certificate")]
    NoIdentity(SocketAddr),
}

/// A bi-stream this node opened to another ([`Transport::open_stream`]); its
/// kind byte is sent.
pub struct NodeStream {
    /// The connection it is on.
    pub conn: Connection,
    /// Our sending half.
    pub send: quinn::SendStream,
    /// Our receiving half.
    pub recv: quinn::RecvStream,
    /// Counts the stream on its connection while held.
    pub held: OwnStream,
}

/// Why [`Transport::open_stream`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// No connection to the peer.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The connection failed while the stream was opened.
    #[error(transparent)]
    Stream(#[from] WireError),
}

/// Counters for `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct TransportStats {
    pub(super) datagrams_sent: AtomicU64,
    pub(super) datagrams_received: AtomicU64,
    pub(super) datagram_send_errors: AtomicU64,
    pub(super) inbox_dropped: AtomicU64,
    pub(super) handshakes_failed: AtomicU64,
    pub(super) handshakes_refused: AtomicU64,
    pub(super) wrong_peer: AtomicU64,
    pub(super) duplicates_closed: AtomicU64,
    pub(super) duplicate_streams_cut: AtomicU64,
    pub(super) idle_closed: AtomicU64,
    pub(super) frames_refused: AtomicU64,
    pub(super) dht_requests_refused: AtomicU64,
    pub(super) dht_requests_late: AtomicU64,
    pub(super) presumed_silent: AtomicU64,
    pub(super) clients_busy: AtomicU64,
    /// Streams other nodes hold open to this one, and limit raises.
    pub(super) streams: Arc<super::quic::StreamCounts>,
}

/// A point-in-time copy of [`TransportStats`].
#[derive(Debug, Clone, Copy, Serialize)]
#[allow(missing_docs)]
pub struct TransportCounters {
    pub connections: u64,
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    pub datagram_send_errors: u64,
    pub inbox_dropped: u64,
    pub handshakes_failed: u64,
    pub handshakes_refused: u64,
    pub wrong_peer: u64,
    /// Duplicate connections resolved (the loser closed, or draining).
    pub duplicates_closed: u64,
    /// Connections that lost a simultaneous dial and still carry streams
    /// (at most one per peer, see [`DUPLICATE_DRAIN_LIMIT`]).
    pub duplicates_draining: u64,
    /// Streams cut because their connection lost a simultaneous dial and
    /// was closed before they ended: [`DUPLICATE_DRAIN_LIMIT`] passed, or a
    /// newer loser replaced it.
    pub duplicate_streams_cut: u64,
    pub idle_closed: u64,
    pub frames_refused: u64,
    /// DHT requests answered `Unavailable` because the served queue was
    /// full (`node::dht::SERVED_CAPACITY`).
    pub dht_requests_refused: u64,
    /// DHT requests answered `Unavailable` because the DHT did not answer
    /// them within the request deadline (`node::rpc::RPC_TIMEOUT`).
    pub dht_requests_late: u64,
    /// Nodes presumed dead while a DHT request or a forwarded visit waited
    /// on them: nothing at all came from them for [`PEER_SILENCE`] (see
    /// [`Transport::mark_silent`]).
    pub presumed_silent: u64,
    /// Client connections closed busy: the queue of clients waiting to be
    /// served was full (`CLIENT_INBOX_CAPACITY`).
    pub clients_busy: u64,
    pub peer_streams: u64,
    pub stream_limit_raises: u64,
}

/// Whether a new connection to a peer replaces the open one (`existing_age`
/// old, dialed by us if `existing_outbound`), on the end where `new_outbound`
/// says who dialed the new one and `we_are_lower` compares the two node ids.
///
/// A simultaneous dial (the existing connection is itself only a handshake
/// old, and the two were dialed from opposite ends): the one dialed by the
/// lower id wins, so both ends keep the same one. Otherwise the newer one
/// replaces a connection the peer has probably abandoned (it restarted, or
/// closed it as idle); keeping the old one would refuse a restarted peer
/// until our idle timeout.
pub fn keep_newer(
    existing_age: Duration,
    existing_outbound: bool,
    new_outbound: bool,
    we_are_lower: bool,
) -> bool {
    !simultaneous(existing_age) || existing_outbound == new_outbound || new_outbound == we_are_lower
}

/// Whether a connection `existing_age` old that another one to the same
/// peer joins was dialed at the same time: both are live, and either end may
/// already have opened streams on the one that loses, so it is drained
/// rather than closed. An older one is taken for abandoned (the peer
/// restarted, or closed it as idle): closed at once, so that what waits on
/// it fails over now.
pub fn simultaneous(existing_age: Duration) -> bool {
    existing_age < HANDSHAKE_TIMEOUT
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(super) struct Entry {
    conn: Connection,
    /// Its streams, both ways.
    budget: Arc<StreamBudget>,
    outbound: bool,
    since: Instant,
    last_used: Instant,
}

#[derive(Default)]
pub(super) struct Pool {
    conns: HashMap<NodeId, Entry>,
    /// Peers being dialed, with the datagrams waiting for the connection.
    dialing: HashMap<NodeId, Vec<Bytes>>,
    /// Peers whose last dial failed, and when. Entries are removed on the
    /// next successful connection or when they expire, so the map holds at
    /// most the peers that failed in the last [`DIAL_BACKOFF`].
    failed: HashMap<NodeId, Instant>,
    /// Peers that left something unacknowledged for [`PEER_SILENCE`]: the
    /// connection's id and its received-packet count at the time. An entry
    /// is cleared by the next [`Transport::is_silent`] that finds the count
    /// moved (the peer spoke) or the connection gone or replaced.
    silent: HashMap<NodeId, (usize, u64)>,
    /// Per peer, the connection that lost a simultaneous dial and still
    /// carries streams (see [`DUPLICATE_DRAIN_LIMIT`]); a later loser closes
    /// the earlier one at once, so there is at most one per peer.
    draining: HashMap<NodeId, (Connection, Arc<StreamBudget>)>,
    /// Dials under way, per address: callers that need the same node
    /// meanwhile share the dial's outcome instead of each dialing (every
    /// extra dial would end as a duplicate connection), whether they know it
    /// by id (gossip, DHT, visitors) or by address only (a seed). An entry
    /// lives while someone waits on it ([`DialTicket`]).
    dials: HashMap<SocketAddr, Arc<SharedDial>>,
}

/// The outcome of one dial, for everyone who waited on it.
type SharedDial = tokio::sync::OnceCell<Result<Counted, DialError>>;

/// A connection to a peer, with its streams.
type Counted = (NodeId, Connection, Arc<StreamBudget>);

/// A caller's share in a dial under way; the last one out removes it from
/// [`Pool::dials`].
struct DialTicket<'a> {
    transport: &'a Transport,
    addr: SocketAddr,
    dial: Arc<SharedDial>,
}

impl Drop for DialTicket<'_> {
    fn drop(&mut self) {
        let mut pool = self.transport.pool();
        // Shares are taken under the pool's lock: two references are the
        // map's and this one.
        if pool
            .dials
            .get(&self.addr)
            .is_some_and(|d| Arc::ptr_eq(d, &self.dial) && Arc::strong_count(d) == 2)
        {
            pool.dials.remove(&self.addr);
        }
    }
}

/// The node's QUIC endpoint and its pool of node connections.
pub struct Transport {
    pub(super) endpoint: Endpoint,
    pub(super) local: NodeId,
    /// The dialing config; replaced by [`Transport::set_tls`].
    client_config: std::sync::RwLock<quinn::ClientConfig>,
    pool: Mutex<Pool>,
    inbox: mpsc::Sender<(NodeId, Bytes)>,
    streams: StreamRoutes,
    pub(super) clients: mpsc::Sender<Connection>,
    /// The identity and CA in force; replaced by [`Transport::set_tls`].
    tls: std::sync::RwLock<NodeTls>,
    pub(super) handshakes: Arc<Semaphore>,
    pub(super) stats: TransportStats,
}

impl Transport {
    /// Wraps a bound endpoint. Received datagrams go to the returned inbox,
    /// tagged with the cert-derived id of the connection they arrived on, and
    /// bi-streams opened by nodes to the inbox of their kind.
    pub fn new(endpoint: Endpoint, tls: &NodeTls) -> Result<(Arc<Self>, Inboxes), TlsError> {
        endpoint.set_server_config(Some(tls.server_config()?));
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        let (streams, rpc_rx, forward_rx) = StreamRoutes::new();
        let (client_tx, client_rx) = mpsc::channel(CLIENT_INBOX_CAPACITY);
        let transport = Arc::new(Transport {
            endpoint,
            local: tls.id,
            client_config: std::sync::RwLock::new(tls.client_config()?),
            pool: Mutex::default(),
            inbox: tx,
            streams,
            clients: client_tx,
            tls: std::sync::RwLock::new(tls.clone()),
            handshakes: Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES)),
            stats: TransportStats::default(),
        });
        Ok((
            transport,
            Inboxes {
                datagrams: rx,
                rpc: rpc_rx,
                forwards: forward_rx,
                clients: client_rx,
            },
        ))
    }

    /// The identity and CA in force.
    pub(super) fn tls(&self) -> NodeTls {
        self.tls
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn dial_config(&self) -> quinn::ClientConfig {
        self.client_config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Serves and dials with `tls` from now on (a renewed certificate, or a
    /// new CA bundle); connections already open keep the identity they
    /// were made with. Refused if `tls` proves another node id: the id is
    /// the key's hash, and members know this node by it.
    pub fn set_tls(&self, tls: &NodeTls) -> Result<(), TlsError> {
        if tls.id != self.local {
            return Err(TlsError::Config(format!(
                "the new key belongs to node {}, not {}; a new key is a new node (restart it)",
                tls.id, self.local
            )));
        }
        let server = tls.server_config()?;
        let client = tls.client_config()?;
        self.endpoint.set_server_config(Some(server));
        *self
            .client_config
            .write()
            .unwrap_or_else(PoisonError::into_inner) = client;
        *self.tls.write().unwrap_or_else(PoisonError::into_inner) = tls.clone();
        Ok(())
    }

    /// This node's id.
    pub fn local_id(&self) -> NodeId {
        self.local
    }

    /// The endpoint's bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub(super) fn pool(&self) -> MutexGuard<'_, Pool> {
        // The pool holds handles and timestamps; a panic elsewhere cannot
        // leave it inconsistent enough to matter.
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one datagram to `to`, dialing `addr` first if there is no
    /// connection. Never waits: while a dial is under way the datagram is
    /// queued (up to [`PENDING_PER_PEER`]), otherwise dropped and counted.
    pub fn send_datagram(self: &Arc<Self>, to: NodeId, addr: SocketAddr, data: Bytes) {
        let mut pool = self.pool();
        if let Some(entry) = pool.conns.get_mut(&to) {
            entry.last_used = Instant::now();
            match entry.conn.send_datagram(data) {
                Ok(()) => bump(&self.stats.datagrams_sent),
                Err(err) => {
                    tracing::debug!(peer = %to, %err, "datagram not sent");
                    bump(&self.stats.datagram_send_errors);
                }
            }
            return;
        }
        if let Some(queue) = pool.dialing.get_mut(&to) {
            if queue.len() < PENDING_PER_PEER {
                queue.push(data);
            }
            return;
        }
        let now = Instant::now();
        pool.failed
            .retain(|_, at| now.saturating_duration_since(*at) < DIAL_BACKOFF);
        if pool.failed.contains_key(&to) {
            bump(&self.stats.datagram_send_errors);
            return;
        }
        pool.dialing.insert(to, vec![data]);
        drop(pool);
        let this = self.clone();
        tokio::spawn(async move {
            let result = this.connect(addr, Some(to)).await;
            let pending = this.pool().dialing.remove(&to).unwrap_or_default();
            match result {
                Ok((_, conn)) => {
                    for data in pending {
                        match conn.send_datagram(data) {
                            Ok(()) => bump(&this.stats.datagrams_sent),
                            Err(_) => bump(&this.stats.datagram_send_errors),
                        }
                    }
                }
                Err(err) => {
                    tracing::debug!(peer = %to, %err, "dial failed");
                    this.pool().failed.insert(to, Instant::now());
                }
            }
        });
    }

    /// Dials `addr` (or returns the pooled connection to `expected`), checks the
    /// peer's id, and adds the connection to the pool.
    pub async fn connect(
        self: &Arc<Self>,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<(NodeId, Connection), DialError> {
        let (peer, conn, _) = self.connect_counted(addr, expected).await?;
        Ok((peer, conn))
    }

    /// Opens a bi-stream of `kind` to `peer` at `addr` (dialing it if there
    /// is no connection) and names its kind. The stream counts on its
    /// connection until [`NodeStream::held`] is dropped: a connection that
    /// loses a simultaneous dial stays open until then.
    pub async fn open_stream(
        self: &Arc<Self>,
        addr: SocketAddr,
        peer: NodeId,
        kind: StreamKind,
    ) -> Result<NodeStream, StreamError> {
        let (_, conn, budget) = self.connect_counted(addr, Some(peer)).await?;
        // Counted before it is opened: a drain that starts meanwhile waits
        // for it.
        let held = budget.ours_opened();
        let (mut send, recv) = conn.open_bi().await.map_err(WireError::from)?;
        send.write_all(&[kind.byte()])
            .await
            .map_err(WireError::from)?;
        Ok(NodeStream {
            conn,
            send,
            recv,
            held,
        })
    }

    /// [`Transport::connect`], with the streams of the connection.
    async fn connect_counted(
        self: &Arc<Self>,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<Counted, DialError> {
        let ticket = {
            let mut pool = self.pool();
            let pooled = match expected {
                Some(id) => pool.conns.get_key_value(&id),
                // A seed known by address only: reuse a connection to it.
                None => pool
                    .conns
                    .iter()
                    .find(|(_, e)| e.conn.remote_address() == addr),
            };
            if let Some((id, entry)) = pooled
                && entry.conn.close_reason().is_none()
            {
                return Ok((*id, entry.conn.clone(), entry.budget.clone()));
            }
            DialTicket {
                transport: self,
                addr,
                dial: pool.dials.entry(addr).or_default().clone(),
            }
        };
        // If the caller that runs the dial gives up, the next one waiting
        // runs it.
        let shared = ticket
            .dial
            .get_or_init(|| self.dial(addr, expected))
            .await
            .clone();
        // The dial may have been run for someone who knew the address only,
        // or another id: it reached a node, but perhaps not this caller's.
        let (actual, conn, budget) = shared?;
        self.check_peer(addr, expected, actual)?;
        Ok((actual, conn, budget))
    }

    /// `Err(WrongPeer)`, counted, if the node reached at `addr` is not the
    /// one the caller expected there.
    fn check_peer(
        &self,
        addr: SocketAddr,
        expected: Option<NodeId>,
        actual: NodeId,
    ) -> Result<(), DialError> {
        match expected {
            Some(expected) if expected != actual => {
                bump(&self.stats.wrong_peer);
                Err(DialError::WrongPeer {
                    addr,
                    expected,
                    actual,
                })
            }
            _ => Ok(()),
        }
    }

    /// Dials `addr`, checks the peer's id and adds the connection to the pool.
    async fn dial(
        self: &Arc<Self>,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<Counted, DialError> {
        let connecting = self
            .endpoint
            .connect_with(self.dial_config(), addr, NODE_SERVER_NAME)
            .map_err(|source| DialError::Connect { addr, source })?;
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(source)) => {
                bump(&self.stats.handshakes_failed);
                return Err(DialError::Handshake { addr, source });
            }
            Err(_) => {
                bump(&self.stats.handshakes_failed);
                return Err(DialError::Timeout(addr));
            }
        };
        let Some(peer) = tls::peer_node_id(&conn) else {
            conn.close(CLOSE_WRONG_PEER, b"no certificate");
            return Err(DialError::NoIdentity(addr));
        };
        if peer == self.local {
            conn.close(CLOSE_WRONG_PEER, b"self");
            return Err(DialError::SelfDial(addr));
        }
        if let Err(err) = self.check_peer(addr, expected, peer) {
            conn.close(CLOSE_WRONG_PEER, b"unexpected node id");
            return Err(err);
        }
        let (conn, budget) = self.adopt(conn, peer, true);
        Ok((peer, conn, budget))
    }

    /// Puts `conn` in the pool unless it loses the tie-break against an open
    /// connection to the same peer; returns the connection that stays, with
    /// its streams. The loser of a simultaneous dial is drained (see
    /// [`DUPLICATE_DRAIN_LIMIT`]), an abandoned one closed at once.
    pub(super) fn adopt(
        self: &Arc<Self>,
        conn: Connection,
        peer: NodeId,
        outbound: bool,
    ) -> (Connection, Arc<StreamBudget>) {
        let budget = StreamBudget::new(&conn, self.stats.streams.clone());
        let mut pool = self.pool();
        let mut stays = None;
        let mut drain = None;
        if let Some(existing) = pool.conns.get(&peer)
            && existing.conn.close_reason().is_none()
            && existing.conn.stable_id() != conn.stable_id()
        {
            let age = existing.since.elapsed();
            bump(&self.stats.duplicates_closed);
            if !keep_newer(age, existing.outbound, outbound, self.local < peer) {
                // Only ever a simultaneous dial: the peer may have opened
                // streams on the new one already.
                stays = Some((existing.conn.clone(), existing.budget.clone()));
                drain = Some((conn.clone(), budget.clone(), outbound));
            } else if simultaneous(age) {
                drain = Some((
                    existing.conn.clone(),
                    existing.budget.clone(),
                    existing.outbound,
                ));
            } else {
                existing
                    .conn
                    .close(CLOSE_DUPLICATE, b"duplicate connection");
            }
        }
        if let Some((loser, streams, _)) = &drain
            && let Some((earlier, streams)) =
                pool.draining.insert(peer, (loser.clone(), streams.clone()))
        {
            self.close_drained(&earlier, &streams);
        }
        if stays.is_none() {
            pool.failed.remove(&peer);
            pool.conns.insert(
                peer,
                Entry {
                    conn: conn.clone(),
                    budget: budget.clone(),
                    outbound,
                    since: Instant::now(),
                    last_used: Instant::now(),
                },
            );
        }
        drop(pool);
        tracing::debug!(%peer, outbound, remote = %conn.remote_address(), kept = stays.is_none(), "node connection up");
        // Served even when it lost: streams the peer opened on it before it
        // learned so are carried to their end.
        let this = self.clone();
        let reader = conn.clone();
        tokio::spawn(async move { this.read_datagrams(reader, peer).await });
        tokio::spawn(
            self.streams
                .clone()
                .serve(conn.clone(), peer, budget.clone()),
        );
        if let Some((loser, streams, dialed_here)) = drain {
            tokio::spawn(self.clone().drain(peer, loser, streams, dialed_here));
        }
        stays.unwrap_or((conn, budget))
    }

    /// Keeps `conn`, which lost a simultaneous dial, open until its streams
    /// have ended and [`drain_quiet`] has passed, or
    /// [`DUPLICATE_DRAIN_LIMIT`]; then closes it.
    ///
    /// Only the end that dialed it closes it then: that end takes the
    /// winner in by accepting it, which it can do only once the peer has
    /// finished that handshake and so has the winner too and opens no more
    /// streams on the loser. The end that accepted the loser may have the
    /// winner before the peer does, while the peer still opens streams on
    /// the loser: it waits for the peer to close it (or for the limit, or
    /// for the peer to be declared dead, see [`Transport::forget`]).
    async fn drain(
        self: Arc<Self>,
        peer: NodeId,
        conn: Connection,
        streams: Arc<StreamBudget>,
        dialed_here: bool,
    ) {
        let began = Instant::now();
        let mut quiet_since = None;
        while conn.close_reason().is_none() {
            let now = Instant::now();
            if streams.in_use() > 0 {
                quiet_since = None;
            } else if dialed_here
                && now.saturating_duration_since(*quiet_since.get_or_insert(now))
                    >= drain_quiet(conn.rtt())
            {
                break;
            }
            if now.saturating_duration_since(began) >= DUPLICATE_DRAIN_LIMIT {
                break;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        let mut pool = self.pool();
        if pool
            .draining
            .get(&peer)
            .is_some_and(|(c, _)| c.stable_id() == conn.stable_id())
        {
            pool.draining.remove(&peer);
        }
        drop(pool);
        self.close_drained(&conn, &streams);
    }

    /// Closes a connection that lost a simultaneous dial, counting the
    /// streams this cuts.
    fn close_drained(&self, conn: &Connection, streams: &StreamBudget) {
        if conn.close_reason().is_some() {
            return;
        }
        let cut = streams.in_use();
        if cut > 0 {
            self.stats
                .duplicate_streams_cut
                .fetch_add(u64::from(cut), Ordering::Relaxed);
            tracing::info!(remote = %conn.remote_address(), cut, "closed a duplicate connection with streams still open");
        }
        conn.close(CLOSE_DUPLICATE, b"duplicate connection");
    }

    async fn read_datagrams(self: Arc<Self>, conn: Connection, peer: NodeId) {
        let reason = loop {
            match conn.read_datagram().await {
                // An empty datagram is a liveness ping (see `silent`): its
                // acknowledgement was the point.
                Ok(data) if data.is_empty() => {}
                Ok(data) => {
                    bump(&self.stats.datagrams_received);
                    if let Some(entry) = self.pool().conns.get_mut(&peer)
                        && entry.conn.stable_id() == conn.stable_id()
                    {
                        entry.last_used = Instant::now();
                    }
                    if self.inbox.try_send((peer, data)).is_err() {
                        bump(&self.stats.inbox_dropped);
                    }
                }
                Err(err) => break err,
            }
        };
        self.unpool(peer, &conn);
        tracing::debug!(%peer, %reason, "node connection closed");
    }

    /// Removes `conn` from the pool if it is still the connection to `peer`
    /// (not a newer one that replaced it).
    fn unpool(&self, peer: NodeId, conn: &Connection) {
        let mut pool = self.pool();
        if pool
            .conns
            .get(&peer)
            .is_some_and(|e| e.conn.stable_id() == conn.stable_id())
        {
            pool.conns.remove(&peer);
        }
    }

    pub(super) fn close_idle(&self) {
        let now = Instant::now();
        let mut pool = self.pool();
        pool.conns.retain(|peer, e| {
            let idle = now.saturating_duration_since(e.last_used) >= POOL_IDLE_CLOSE;
            if idle {
                tracing::debug!(%peer, "closing idle node connection");
                e.conn.close(CLOSE_IDLE, b"idle");
                self.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            }
            !idle
        });
    }

    /// Marks `peer` silent on `conn`: it acknowledged nothing we sent within
    /// [`PEER_SILENCE`]. Until it is heard from again, [`Transport::is_silent`]
    /// says so and callers fail over at once instead of waiting again.
    pub fn mark_silent(&self, peer: NodeId, conn: &Connection) {
        bump(&self.stats.presumed_silent);
        let heard = conn.stats().udp_rx.datagrams;
        self.pool().silent.insert(peer, (conn.stable_id(), heard));
    }

    /// Whether `peer` was marked silent and has said nothing since.
    pub fn is_silent(&self, peer: NodeId) -> bool {
        let mut pool = self.pool();
        let Some(&(id, heard)) = pool.silent.get(&peer) else {
            return false;
        };
        let still = pool
            .conns
            .get(&peer)
            .is_some_and(|e| e.conn.stable_id() == id && e.conn.stats().udp_rx.datagrams == heard);
        if !still {
            pool.silent.remove(&peer);
        }
        still
    }

    /// Closes the connection to `peer` (and a duplicate still draining),
    /// which gossip declared dead, if it is also silent (see
    /// [`PEER_SILENCE`]). QUIC alone would keep it for
    /// [`crate::tls::NODE_IDLE_TIMEOUT`], and every stream on it (a forwarded
    /// visitor) would stall that long instead of failing at once and being
    /// retried elsewhere. A peer declared dead while it still answers (an
    /// overloaded one) keeps its connection and the visitors on it.
    pub fn forget(self: &Arc<Self>, peer: NodeId) {
        let conns: Vec<Connection> = {
            let pool = self.pool();
            let pooled = pool.conns.get(&peer).map(|e| e.conn.clone());
            // A duplicate connection still draining goes the same way.
            let draining = pool.draining.get(&peer).map(|(c, _)| c.clone());
            pooled.into_iter().chain(draining).collect()
        };
        for conn in conns {
            self.forget_conn(peer, conn);
        }
    }

    fn forget_conn(self: &Arc<Self>, peer: NodeId, conn: Connection) {
        let this = self.clone();
        tokio::spawn(async move {
            let silent = tokio::time::timeout(PEER_SILENCE * 2, silent(&conn, PEER_SILENCE)).await;
            if silent.is_err() {
                tracing::info!(%peer, "a node declared dead still answers; keeping its connection");
                return;
            }
            this.unpool(peer, &conn);
            tracing::debug!(%peer, "closing the connection to a node declared dead");
            conn.close(CLOSE_PEER_DOWN, b"declared dead");
        });
    }

    /// Closes every connection and the endpoint, then waits (bounded) for the
    /// close frames to leave.
    pub async fn shutdown(&self) {
        self.endpoint.close(CLOSE_SHUTDOWN, b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    /// QUIC's smoothed round-trip estimate to `peer`, if connected.
    pub fn rtt(&self, peer: NodeId) -> Option<Duration> {
        self.pool().conns.get(&peer).map(|e| e.conn.rtt())
    }

    /// Ids of peers with an open connection.
    pub fn connected_peers(&self) -> Vec<NodeId> {
        self.pool().conns.keys().copied().collect()
    }

    /// Current counters.
    pub fn counters(&self) -> TransportCounters {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (connections, draining) = {
            let pool = self.pool();
            (pool.conns.len() as u64, pool.draining.len() as u64)
        };
        TransportCounters {
            connections,
            datagrams_sent: get(&s.datagrams_sent),
            datagrams_received: get(&s.datagrams_received),
            datagram_send_errors: get(&s.datagram_send_errors),
            inbox_dropped: get(&s.inbox_dropped),
            handshakes_failed: get(&s.handshakes_failed),
            handshakes_refused: get(&s.handshakes_refused),
            wrong_peer: get(&s.wrong_peer),
            duplicates_closed: get(&s.duplicates_closed),
            duplicates_draining: draining,
            duplicate_streams_cut: get(&s.duplicate_streams_cut),
            idle_closed: get(&s.idle_closed),
            frames_refused: get(&s.frames_refused),
            dht_requests_refused: get(&s.dht_requests_refused),
            dht_requests_late: get(&s.dht_requests_late),
            presumed_silent: get(&s.presumed_silent),
            clients_busy: get(&s.clients_busy),
            peer_streams: get(&s.streams.held),
            stream_limit_raises: get(&s.streams.raises),
        }
    }

    /// A peer's request frame was refused as larger than the frame limit.
    pub fn frame_refused(&self) {
        bump(&self.stats.frames_refused);
    }

    /// A peer's DHT request was refused: the queue of requests waiting to be
    /// served was full.
    pub fn dht_request_refused(&self) {
        bump(&self.stats.dht_requests_refused);
    }

    /// A peer's DHT request was answered `Unavailable`: it was queued, but
    /// not served within the request deadline.
    pub fn dht_request_late(&self) {
        bump(&self.stats.dht_requests_late);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: Duration = Duration::from_millis(10);
    const OLD: Duration = Duration::from_secs(60);

    #[test]
    fn simultaneous_dials_keep_the_one_dialed_by_the_lower_id_on_both_ends() {
        // Lower end: its own (outbound) dial wins, the peer's (inbound) loses.
        assert!(!keep_newer(FRESH, true, false, true));
        assert!(keep_newer(FRESH, false, true, true));
        // Higher end: the peer's dial (inbound there) wins.
        assert!(keep_newer(FRESH, true, false, false));
        assert!(!keep_newer(FRESH, false, true, false));
    }

    #[test]
    fn a_newer_connection_replaces_an_old_one_or_one_from_the_same_side() {
        // The peer restarted or dropped the old one as idle.
        for (existing_out, new_out, lower) in [
            (true, false, true),
            (false, true, false),
            (true, true, true),
            (false, false, false),
        ] {
            assert!(keep_newer(OLD, existing_out, new_out, lower));
        }
        // Two dials from the same side: the newer one is the live one.
        assert!(keep_newer(FRESH, true, true, true));
        assert!(keep_newer(FRESH, false, false, false));
    }
}
