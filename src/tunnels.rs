//! The node side of tunnels: client sessions (register and attach names,
//! renew their leases, hand out peer samples), the local attachment table, and
//! opening streams to a tunnel's client, directly when it is attached here or
//! through a node it is attached to.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use rand::seq::SliceRandom;
use sha2::{Digest, Sha256};
use specter_dht::{ClientId, Outcome, Peer, WriteOp};
use specter_gossip::NodeId;
use specter_tunnel::names;
use specter_tunnel::protocol::{
    ClientMsg, MAX_NAMES_PER_CLIENT, NodeMsg, RefuseCode, STREAM_FORWARD, TUNNEL_PROTOCOL_VERSION,
    Visit, VisitReply,
};
use specter_tunnel::route_cache::{Cached, RouteCache};
use tokio_util::sync::CancellationToken;

use crate::dht::{Command, now_ms};
use crate::node::NodeShared;
use crate::rpc::{read_frame, write_msg};
use crate::transport::{IncomingStream, PEER_SILENCE, silent};

/// Attachment lease: a node that stops renewing (it crashed) stops being
/// listed after this, even if nobody declared it dead.
pub const LEASE: Duration = Duration::from_secs(30);
/// Leases are renewed this often while the client stays connected, so two
/// renewals can be lost before a lease lapses.
pub const RENEW: Duration = Duration::from_secs(10);
/// After a node joins (or returns), attachments are renewed this soon rather
/// than at the next [`RENEW`].
pub const REASSERT_AFTER: Duration = Duration::from_millis(300);
/// A name's claim outlives its last attachment by this much, so a client that
/// crashes and returns gets its name back, and nobody else can take it.
pub const CLAIM_KEEP: Duration = Duration::from_secs(7 * 24 * 3_600);
/// A client must send its hello this soon after connecting.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Nodes in a peer sample.
pub const PEER_SAMPLE: usize = 8;

/// Close code for a refused client.
pub const CLOSE_REFUSED: VarInt = VarInt::from_u32(0x30);
/// Close code: the same client connected again; this connection is stale.
pub const CLOSE_REPLACED: VarInt = VarInt::from_u32(0x33);
/// Stream reset code: the tunnel is not attached here.
pub const STREAM_NOT_HERE: VarInt = VarInt::from_u32(0x31);

/// The id of the client behind a connection: SHA-256 of its certificate's
/// public key.
pub fn client_id(conn: &Connection) -> Option<ClientId> {
    let chain = crate::tls::peer_chain(conn)?;
    let spki = crate::pki::spki_of(chain.first()?).ok()?;
    Some(ClientId(Sha256::digest(spki).into()))
}

/// Why a visitor stream could not be opened.
#[derive(Debug, thiserror::Error)]
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
}

/// How long one attachment may take to answer a visit before the next one
/// is tried as well (at once if its node falls silent, see [`PEER_SILENCE`]). The slow attempt is not abandoned: under a burst a live
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

/// Waits for the client's (or the attached node's) answer to a visit.
async fn await_ready(recv: &mut RecvStream) -> Result<(), OpenError> {
    match read_frame::<VisitReply>(recv).await {
        Ok(VisitReply::Ready) => Ok(()),
        Ok(VisitReply::TargetRefused) => Err(OpenError::TargetRefused),
        Err(_) => Err(OpenError::Unreachable),
    }
}

/// One way to a tunnel's client.
#[derive(Clone)]
enum Path {
    /// The client is attached to this node over this connection.
    Local(Connection),
    /// The client is attached to this other node.
    Via(Peer),
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Local(conn) => write!(f, "client at {}", conn.remote_address()),
            Path::Via(peer) => write!(f, "node {}", peer.id),
        }
    }
}

type Pair = (SendStream, RecvStream);

/// Opens a visitor stream along `path` and waits until the far end is ready.
/// If the far end goes silent meanwhile (see [`PEER_SILENCE`]), `hedge` is
/// told so that the next path starts at once; this attempt goes on, since a
/// silent peer may only be slow.
async fn attempt(
    node: Arc<NodeShared>,
    path: Path,
    visit: Visit,
    hedge: tokio::sync::mpsc::Sender<usize>,
    index: usize,
) -> Result<Pair, OpenError> {
    if let Path::Via(peer) = &path
        && !node.live.borrow().iter().any(|p| p.id == peer.id)
    {
        // Gossip holds it dead (a stale route): a dial could wait for the
        // whole handshake timeout, so let the next path start now.
        let _ = hedge.try_send(index);
    }
    let (conn, mut send, mut recv) = match &path {
        Path::Local(conn) => {
            let (mut send, recv) = conn.open_bi().await.map_err(|_| OpenError::Unreachable)?;
            write_msg(&mut send, &visit)
                .await
                .map_err(|_| OpenError::Unreachable)?;
            (conn.clone(), send, recv)
        }
        Path::Via(peer) => {
            let (_, conn) = node
                .transport
                .connect(peer.addr, Some(peer.id))
                .await
                .map_err(|_| OpenError::Unreachable)?;
            let (mut send, recv) = conn.open_bi().await.map_err(|_| OpenError::Unreachable)?;
            send.write_all(&[STREAM_FORWARD])
                .await
                .map_err(|_| OpenError::Unreachable)?;
            write_msg(&mut send, &visit)
                .await
                .map_err(|_| OpenError::Unreachable)?;
            (conn, send, recv)
        }
    };
    let via = match &path {
        Path::Via(peer) => Some(peer.id),
        Path::Local(_) => None,
    };
    let ready = {
        let answer = await_ready(&mut recv);
        tokio::pin!(answer);
        let quiet = async {
            // Known silent: do not wait to find out again.
            if !via.is_some_and(|id| node.transport.is_silent(id)) {
                silent(&conn, PEER_SILENCE).await;
            }
        };
        tokio::select! {
            r = &mut answer => r,
            () = quiet => {
                if let Some(id) = via {
                    node.transport.mark_silent(id, &conn);
                }
                let _ = hedge.try_send(index);
                answer.await
            }
        }
    };
    match ready {
        Ok(()) => Ok((send, recv)),
        Err(err) => {
            let _ = send.reset(STREAM_NOT_HERE);
            let _ = recv.stop(STREAM_NOT_HERE);
            Err(err)
        }
    }
}

/// Where the next paths to try come from.
struct Paths {
    queue: std::collections::VecDeque<Path>,
    /// Still to ask the route cache or the DHT for remote attachments.
    route_pending: bool,
}

/// Local attachments and the route cache.
pub struct Tunnels {
    node: Arc<NodeShared>,
    /// CA certificates (DER) client tokens must be signed by; `None` when
    /// clients need no token.
    token_cas: Option<Vec<Vec<u8>>>,
    attached: Mutex<HashMap<String, Vec<Connection>>>,
    routes: RouteCache<Vec<Peer>>,
    /// Nodes that lately failed or were slow to answer a visit, and until
    /// when they are tried last.
    slow: Mutex<HashMap<NodeId, std::time::Instant>>,
    public: std::sync::OnceLock<specter_tunnel::protocol::Ingress>,
}

impl Tunnels {
    /// Tunnels served by `node`; with `token_cas`, clients must hold a token
    /// signed by one of those CAs.
    pub fn new(node: Arc<NodeShared>, token_cas: Option<Vec<Vec<u8>>>) -> Arc<Self> {
        Arc::new(Tunnels {
            node,
            token_cas,
            attached: Mutex::new(HashMap::new()),
            routes: RouteCache::new(),
            slow: Mutex::new(HashMap::new()),
            public: std::sync::OnceLock::new(),
        })
    }

    fn local(&self, name: &str) -> Vec<Connection> {
        let mut attached = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(conns) = attached.get_mut(name) {
            conns.retain(|c| c.close_reason().is_none());
            return conns.clone();
        }
        Vec::new()
    }

    /// Records where this node serves visitors, so clients can print their
    /// public URLs.
    pub fn set_public(&self, domain: &str, https_port: u16) {
        let _ = self.public.set(specter_tunnel::protocol::Ingress {
            domain: domain.trim_end_matches('.').to_string(),
            https_port,
        });
    }

    /// Names attached here, with their client connection counts.
    pub fn attached_names(&self) -> Vec<(String, usize)> {
        let attached = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<_> = attached.iter().map(|(n, c)| (n.clone(), c.len())).collect();
        v.sort();
        v
    }

    /// Takes a node that was declared dead out of cached routes (the rest of
    /// each route stays: looking every name up again while the ring is
    /// changing is when lookups are least reliable), and closes the
    /// connection to it if it is silent too (see
    /// [`crate::transport::Transport::forget`]).
    pub fn node_down(&self, node: specter_gossip::NodeId) {
        self.node.transport.forget(node);
        self.routes.rewrite(|route| {
            let rest: Vec<Peer> = route.iter().copied().filter(|p| p.id != node).collect();
            (!rest.is_empty()).then_some(rest)
        });
    }

    /// Opens a stream to the client of `name` for a visitor: directly when it
    /// is attached here, else through a node it is attached to (route cache,
    /// then DHT). Attachments that fail are skipped, and one that is slow to
    /// answer is raced against the next (see [`VISIT_HEDGE_AFTER`]).
    pub async fn open(&self, name: &str, visit: &Visit) -> Result<Pair, OpenError> {
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

    /// Remote attachments of `name`: from the route cache, else the DHT.
    async fn route(&self, name: &str) -> Result<Vec<Path>, OpenError> {
        let now = std::time::Instant::now();
        let route = match self.routes.get(name, now) {
            Cached::Found(route) => route,
            Cached::Missing => return Err(OpenError::Unknown),
            Cached::Unknown => {
                let get = || {
                    self.node.dht(|reply| Command::Get {
                        name: name.to_string(),
                        reply,
                    })
                };
                let mut looked_up = get().await;
                if !matches!(looked_up, Some((Outcome::Got { .. }, _))) {
                    // A lookup that found no holder ran into a ring change
                    // (a holder just died); the ring settles within moments.
                    tokio::time::sleep(LOOKUP_RETRY_AFTER).await;
                    looked_up = get().await;
                }
                match looked_up {
                    Some((
                        Outcome::Got {
                            item: Some(item), ..
                        },
                        _,
                    )) => {
                        let t = now_ms();
                        let route: Vec<Peer> = item
                            .record
                            .live_attachments(t)
                            .map(|(id, a)| Peer { id, addr: a.addr })
                            .collect();
                        // A registered name with no live attachment is not a
                        // route worth remembering: look again next time.
                        if !route.is_empty() {
                            self.routes.found(name, route.clone(), now);
                        }
                        route
                    }
                    Some((Outcome::Got { item: None, .. }, _)) => {
                        self.routes.missing(name, now);
                        return Err(OpenError::Unknown);
                    }
                    _ => return Err(OpenError::Unreachable),
                }
            }
        };
        // Spread visitors over the attachments, healthy nodes first.
        let mut route: Vec<Peer> = route.into_iter().filter(|p| p.id != self.node.id).collect();
        route.shuffle(&mut rand::rng());
        {
            let now = std::time::Instant::now();
            let mut slow = self.slow.lock().unwrap_or_else(PoisonError::into_inner);
            slow.retain(|_, until| *until > now);
            let live = self.node.live.borrow();
            route.sort_by_cached_key(|p| {
                (
                    !live.iter().any(|l| l.id == p.id),
                    self.node.transport.is_silent(p.id),
                    slow.contains_key(&p.id),
                )
            });
        }
        let remote: Vec<Path> = route.into_iter().map(Path::Via).collect();
        if remote.is_empty() {
            return Err(OpenError::Unreachable);
        }
        Ok(remote)
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

    /// Tries `paths` in order until one is ready: the next starts when the
    /// previous fails, and alongside it when its node goes silent
    /// ([`PEER_SILENCE`]) or nothing answered for [`VISIT_HEDGE_AFTER`].
    /// Gives up after [`VISIT_DEADLINE`].
    async fn race(&self, name: &str, visit: &Visit, mut paths: Paths) -> Result<Pair, OpenError> {
        let began = tokio::time::Instant::now();
        let deadline = began + VISIT_DEADLINE;
        let mut running = tokio::task::JoinSet::new();
        let mut hedge_at = deadline;
        // Attempts still running, by index, with the node each goes through.
        let mut waiting: HashMap<usize, Option<Peer>> = HashMap::new();
        let mut launched = 0usize;
        let (hedge_tx, mut hedge_rx) = tokio::sync::mpsc::channel::<usize>(8);
        loop {
            if running.is_empty() || tokio::time::Instant::now() >= hedge_at {
                match self.next_path(name, &mut paths).await {
                    Some(path) => {
                        if !running.is_empty() {
                            for peer in waiting.values().flatten() {
                                self.mark_slow(peer.id, true);
                            }
                            tracing::info!(tunnel = name, next = %path, waited = ?began.elapsed(), "no attachment answered yet; trying the next as well");
                        }
                        let index = launched;
                        launched += 1;
                        waiting.insert(
                            index,
                            match &path {
                                Path::Via(peer) => Some(*peer),
                                Path::Local(_) => None,
                            },
                        );
                        let node = self.node.clone();
                        let visit = visit.clone();
                        let hedge = hedge_tx.clone();
                        running.spawn(async move {
                            let result = attempt(node, path.clone(), visit, hedge, index).await;
                            (index, path, result)
                        });
                        hedge_at = tokio::time::Instant::now() + VISIT_HEDGE_AFTER;
                    }
                    None if running.is_empty() => return Err(OpenError::Unreachable),
                    None => hedge_at = deadline,
                }
            }
            tokio::select! {
                Some(joined) = running.join_next() => match joined {
                    Ok((_, path, Ok(pair))) => {
                        if let Path::Via(peer) = path {
                            self.mark_slow(peer.id, false);
                        }
                        return Ok(pair);
                    }
                    Ok((_, _, Err(OpenError::TargetRefused))) => return Err(OpenError::TargetRefused),
                    Ok((index, path, Err(err))) => {
                        waiting.remove(&index);
                        if let Path::Via(peer) = &path {
                            self.mark_slow(peer.id, true);
                        }
                        tracing::info!(tunnel = name, via = %path, %err, "attachment failed, trying the next");
                        // The next path starts now, whatever else still runs.
                        hedge_at = tokio::time::Instant::now();
                    }
                    Err(err) => tracing::warn!(tunnel = name, %err, "visit attempt panicked"),
                },
                () = tokio::time::sleep_until(hedge_at) => {}
                Some(index) = hedge_rx.recv() => {
                    // Only an attempt still running may ask for the next.
                    if waiting.contains_key(&index) {
                        hedge_at = tokio::time::Instant::now();
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(tunnel = name, "no attachment answered within {VISIT_DEADLINE:?}");
                    return Err(OpenError::Unreachable);
                }
            }
        }
    }

    /// Serves a forwarded visitor that another node sent here.
    pub async fn serve_forward(self: Arc<Self>, stream: IncomingStream) {
        let IncomingStream {
            peer,
            mut send,
            mut recv,
        } = stream;
        let visit: Visit = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut recv)).await {
            Ok(Ok(v)) => v,
            _ => {
                let _ = send.reset(STREAM_NOT_HERE);
                return;
            }
        };
        let paths = Paths {
            queue: self
                .local(&visit.name)
                .into_iter()
                .map(Path::Local)
                .collect(),
            route_pending: false,
        };
        let (mut c_send, mut c_recv) = match self.race(&visit.name, &visit, paths).await {
            Ok(pair) => pair,
            Err(OpenError::TargetRefused) => {
                let _ = crate::rpc::write_frame(&mut send, &VisitReply::TargetRefused).await;
                return;
            }
            Err(_) => {
                tracing::info!(from = %peer, tunnel = %visit.name, "forwarded visitor for a tunnel not attached here");
                let _ = send.reset(STREAM_NOT_HERE);
                let _ = recv.stop(STREAM_NOT_HERE);
                return;
            }
        };
        if write_msg(&mut send, &VisitReply::Ready).await.is_err() {
            return;
        }
        let mut entry = tokio::io::join(recv, send);
        let mut client = tokio::io::join(&mut c_recv, &mut c_send);
        if let Err(err) = specter_tunnel::splice::splice(&mut entry, &mut client).await {
            tracing::debug!(tunnel = %visit.name, %err, "forwarded stream ended with an error");
        }
    }

    /// Serves one client connection until it closes or `stop` fires.
    pub async fn serve_client(self: Arc<Self>, conn: Connection, stop: CancellationToken) {
        let remote = conn.remote_address();
        let Some(client) = client_id(&conn) else {
            conn.close(CLOSE_REFUSED, b"no client certificate");
            return;
        };
        let accepted = tokio::time::timeout(HELLO_TIMEOUT, async {
            let (send, mut recv) = conn.accept_bi().await.ok()?;
            let hello: ClientMsg = read_frame(&mut recv).await.ok()?;
            Some((send, recv, hello))
        })
        .await;
        let Ok(Some((mut send, mut recv, hello))) = accepted else {
            tracing::info!(%remote, "client sent no hello in time");
            conn.close(CLOSE_REFUSED, b"no hello");
            return;
        };
        let names = match self.register(client, hello).await {
            Ok(names) => names,
            Err((code, name)) => {
                tracing::info!(%remote, %client, ?name, %code, "refused client");
                let _ = write_msg(&mut send, &NodeMsg::Refused { code, name }).await;
                let _ = send.finish();
                // Give the refusal time to arrive before closing.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                return;
            }
        };
        {
            let mut attached = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
            for n in &names {
                let conns = attached.entry(n.clone()).or_default();
                // The owner reconnected: its earlier connection here is stale
                // (the client restarted or lost its network); drop it now
                // rather than waiting for its idle timeout.
                for old in conns.iter().filter(|c| client_id(c) == Some(client)) {
                    old.close(
                        CLOSE_REPLACED,
                        b"replaced by a newer connection of the same client",
                    );
                }
                conns.retain(|c| client_id(c) != Some(client) && c.close_reason().is_none());
                conns.push(conn.clone());
            }
        }
        tracing::info!(%remote, %client, ?names, "client attached");
        let me = Peer {
            id: self.node.id,
            addr: self.node.advertise,
        };
        if write_msg(
            &mut send,
            &NodeMsg::Welcome {
                node: me,
                ingress: self.public.get().cloned(),
            },
        )
        .await
        .is_ok()
        {
            self.session(&conn, client, &names, &mut send, &mut recv, &stop)
                .await;
        }
        // Detach only names no other connection of the client holds here
        // (a reconnect may already have replaced this one).
        let mut gone = Vec::new();
        {
            let mut attached = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
            for n in &names {
                if let Some(conns) = attached.get_mut(n) {
                    conns.retain(|c| c.stable_id() != conn.stable_id());
                    if conns.is_empty() {
                        attached.remove(n);
                        gone.push(n.clone());
                    }
                }
            }
        }
        tracing::info!(%remote, %client, ?names, "client detached");
        for n in &gone {
            // The client may have reconnected here while we waited on the DHT:
            // a detach now would tombstone its fresh attachment.
            if !self.local(n).is_empty() {
                continue;
            }
            let op = WriteOp::Detach {
                client,
                node: self.node.id,
                version: now_ms(),
            };
            let _ = self
                .node
                .dht(|reply| Command::Put {
                    name: n.clone(),
                    op,
                    reply,
                })
                .await;
        }
    }

    async fn session(
        &self,
        conn: &Connection,
        client: ClientId,
        names: &[String],
        send: &mut SendStream,
        recv: &mut RecvStream,
        stop: &CancellationToken,
    ) {
        let mut renew = tokio::time::interval(RENEW);
        renew.tick().await;
        let mut live = self.node.live.clone();
        let mut known: HashSet<NodeId> = live.borrow_and_update().iter().map(|p| p.id).collect();
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                _ = conn.closed() => return,
                changed = live.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now: HashSet<NodeId> = live.borrow_and_update().iter().map(|p| p.id).collect();
                    let nodes: Vec<NodeId> = known.difference(&now).copied().collect();
                    if now.difference(&known).next().is_some() {
                        // A node came (back): records may have a new owner,
                        // or one that dropped this attachment when it took
                        // us for dead. Renew soon, once the ring settled.
                        renew.reset_after(REASSERT_AFTER);
                    }
                    known = now;
                    if !nodes.is_empty() && write_msg(send, &NodeMsg::Down { nodes }).await.is_err() {
                        return;
                    }
                }
                _ = renew.tick() => {
                    for n in names {
                        let _ = self.attach(client, n).await;
                    }
                }
                msg = read_frame::<ClientMsg>(recv) => match msg {
                    Ok(ClientMsg::Peers) => {
                        let nodes = self.peer_sample();
                        if write_msg(send, &NodeMsg::Peers { nodes }).await.is_err() {
                            return;
                        }
                    }
                    Ok(ClientMsg::Hello { .. }) | Err(_) => return,
                },
            }
        }
    }

    fn peer_sample(&self) -> Vec<Peer> {
        let mut nodes: Vec<Peer> = self.node.live.borrow().clone();
        nodes.push(Peer {
            id: self.node.id,
            addr: self.node.advertise,
        });
        nodes.shuffle(&mut rand::rng());
        nodes.truncate(PEER_SAMPLE);
        nodes
    }

    async fn attach(&self, client: ClientId, name: &str) -> Result<(), RefuseCode> {
        let op = WriteOp::Attach {
            client,
            node: self.node.id,
            addr: self.node.advertise,
            version: now_ms(),
            lease_ms: u64::try_from(LEASE.as_millis()).unwrap_or(u64::MAX),
            claim_ms: u64::try_from(CLAIM_KEEP.as_millis()).unwrap_or(u64::MAX),
        };
        match self
            .node
            .dht(|reply| Command::Put {
                name: name.to_string(),
                op,
                reply,
            })
            .await
        {
            Some((Outcome::Wrote { .. }, _)) => {
                self.routes.invalidate(name);
                Ok(())
            }
            Some((
                Outcome::Refused(specter_dht::messages::ErrorCode::Write(
                    specter_dht::WriteError::NameTaken(_),
                )),
                _,
            )) => Err(RefuseCode::NameTaken),
            _ => Err(RefuseCode::Unavailable),
        }
    }

    async fn register(
        &self,
        client: ClientId,
        hello: ClientMsg,
    ) -> Result<Vec<String>, (RefuseCode, Option<String>)> {
        let ClientMsg::Hello {
            version,
            names,
            token,
        } = hello
        else {
            return Err((RefuseCode::Version, None));
        };
        if version != TUNNEL_PROTOCOL_VERSION {
            return Err((RefuseCode::Version, None));
        }
        if names.is_empty() || names.len() > MAX_NAMES_PER_CLIENT {
            return Err((
                RefuseCode::NameCount {
                    max: MAX_NAMES_PER_CLIENT,
                },
                None,
            ));
        }
        for n in &names {
            names::validate(n).map_err(|_| (RefuseCode::InvalidName, Some(n.clone())))?;
        }
        if let Some(cas) = &self.token_cas {
            let now = now_ms() / 1_000;
            let token = token.ok_or((RefuseCode::Unauthorized, None))?;
            let valid = cas
                .iter()
                .any(|ca| crate::token::verify(ca, &token, now, &names).is_ok());
            if !valid {
                return Err((RefuseCode::Unauthorized, None));
            }
        }
        for n in &names {
            self.attach(client, n)
                .await
                .map_err(|code| (code, Some(n.clone())))?;
        }
        Ok(names)
    }
}
