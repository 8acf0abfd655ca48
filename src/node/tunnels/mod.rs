//! The node side of tunnels:
//!
//! - this module: the registry of names attached here (client connections
//!   by name), the route cache, and what tunnels are built from;
//! - [`session`]: a client's connection (hello, registration, lease renewal,
//!   peer samples, down notices);
//! - [`visit`]: opening a stream to a tunnel's client for a visitor, directly
//!   or through another node, racing slow attachments (the ordering and
//!   racing rules are pure and tested beside it);
//! - [`forward`]: serving visitors that other nodes forward here.

pub mod forward;
pub mod quota;
pub mod session;
pub mod slots;
pub mod visit;

use self::quota::{ClientLimits, Quotas};
use self::slots::ForwardSlots;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use quinn::Connection;
use specter_dht::Peer;
use specter_gossip::NodeId;
use specter_tunnel::protocol::Ingress;
use specter_tunnel::route_cache::RouteCache;

use super::dht::DhtHandle;
use super::membership::{Members, Readiness};
use crate::net::Transport;

/// Attachment lease: a node that stops renewing (it crashed) stops being
/// listed after this, even if nobody declared it dead.
pub const LEASE: Duration = Duration::from_secs(30);
/// Leases are renewed this often while the client stays connected, so two
/// renewals can be lost before a lease lapses.
pub const RENEW: Duration = Duration::from_secs(10);
/// After a node joins (or returns), attachments are renewed this soon rather
/// than at the next [`RENEW`].
pub const REASSERT_AFTER: Duration = Duration::from_millis(300);

/// Who may register tunnels at a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Any client (names are still owned by the first key that claims them).
    #[default]
    Open,
    /// Only clients holding a token from `specter ca issue-client-token`.
    Token,
}

/// What tunnels are built from: narrow handles, so tests can build them
/// around a stand-in DHT.
pub struct TunnelParts {
    /// This node's id and advertised QUIC address.
    pub me: Peer,
    /// The DHT (registrations and lookups).
    pub dht: DhtHandle,
    /// Node connections (forwarding, silence marks).
    pub transport: Arc<Transport>,
    /// The live set from gossip.
    pub members: Members,
    /// CA certificates (DER) client tokens must be signed by; `None` when
    /// clients need no token.
    pub token_cas: Option<Vec<Vec<u8>>>,
    /// Whether the node can route yet; lookups and registrations wait for it.
    pub ready: Readiness,
    /// What one client key may register here.
    pub clients: ClientLimits,
}

/// Local attachments and the route cache.
pub struct Tunnels {
    me: Peer,
    dht: DhtHandle,
    transport: Arc<Transport>,
    members: Members,
    /// See [`TunnelParts::token_cas`]; replaced on reload.
    token_cas: std::sync::RwLock<Option<Vec<Vec<u8>>>>,
    ready: Readiness,
    clients: ClientLimits,
    /// Registrations by key, for the quotas.
    pub quotas: Quotas,
    /// Client connections by tunnel name.
    attached: Mutex<HashMap<String, Vec<Connection>>>,
    /// Detached client connections kept for their streams, by client key,
    /// oldest first (see `session::LINGERING_PER_CLIENT`).
    lingering: Mutex<HashMap<specter_dht::ClientId, std::collections::VecDeque<Connection>>>,
    routes: RouteCache<Vec<Peer>>,
    /// Tunnels whose route is being looked up in the background (see
    /// [`Tunnels::refresh_route`]).
    refreshing: Mutex<std::collections::HashSet<String>>,
    /// Refreshes not started, [`visit::ROUTE_REFRESHES`] being under way.
    pub route_refreshes_skipped: std::sync::atomic::AtomicU64,
    /// Nodes that lately failed or were slow to answer a visit, and until
    /// when they are tried last.
    slow: Mutex<HashMap<NodeId, std::time::Instant>>,
    /// Streams open per tunnel and node this node forwards to.
    pub slots: Arc<ForwardSlots>,
    /// Visitors forwarded here whose splice broke or stalled (a side took
    /// nothing for the stall deadline), or whose entry or client stopped
    /// reading (`splice_watching`); both sides reset.
    pub forwards_broken: std::sync::atomic::AtomicU64,
    /// Client connections detached at their client's request whose
    /// streams are still running (see `session::DETACH_LINGER`).
    pub detaching: std::sync::atomic::AtomicU64,
    /// Of those, the ones that ended with visitor streams cut: closed by
    /// their client that way ([`crate::wire::CLOSE_DETACH_CUT`], at its
    /// drain deadline or told to stop at once), or by this node at
    /// `session::DETACH_LINGER` or past `session::LINGERING_PER_CLIENT`;
    /// and client connections closed that way before their detach came (a
    /// client told to stop twice before it could ask).
    pub detaches_cut: std::sync::atomic::AtomicU64,
    /// Peer-sample requests answered together with an earlier one (see
    /// `session::PEERS_ANSWER_GAP`).
    pub peers_coalesced: std::sync::atomic::AtomicU64,
    public: std::sync::OnceLock<Ingress>,
    /// Called with each name a client connection leaves (see
    /// [`Tunnels::on_detach`]).
    on_detach: std::sync::OnceLock<slots::EvictHook>,
}

impl Tunnels {
    /// Tunnels served by this node.
    pub fn new(parts: TunnelParts) -> Arc<Self> {
        let TunnelParts {
            me,
            dht,
            transport,
            members,
            token_cas,
            ready,
            clients,
        } = parts;
        let slots = ForwardSlots::new(clients.forwards_per_tunnel);
        Arc::new(Tunnels {
            me,
            dht,
            transport,
            members,
            token_cas: std::sync::RwLock::new(token_cas),
            ready,
            clients,
            quotas: Quotas::default(),
            attached: Mutex::new(HashMap::new()),
            lingering: Mutex::new(HashMap::new()),
            routes: RouteCache::new(),
            refreshing: Mutex::new(std::collections::HashSet::new()),
            route_refreshes_skipped: std::sync::atomic::AtomicU64::new(0),
            slow: Mutex::new(HashMap::new()),
            slots,
            forwards_broken: std::sync::atomic::AtomicU64::new(0),
            detaching: std::sync::atomic::AtomicU64::new(0),
            detaches_cut: std::sync::atomic::AtomicU64::new(0),
            peers_coalesced: std::sync::atomic::AtomicU64::new(0),
            public: std::sync::OnceLock::new(),
            on_detach: std::sync::OnceLock::new(),
        })
    }

    /// Sets what to do with a tunnel's name when a client connection
    /// leaves it here (the HTTP ingress closes the tunnel's idle upstreams
    /// to it: idle, they would hold the streams a detaching client waits
    /// on).
    pub fn on_detach(&self, hook: slots::EvictHook) {
        let _ = self.on_detach.set(hook);
    }

    /// Open client connections attached here for `name`.
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
        let _ = self.public.set(Ingress {
            domain: domain.trim_end_matches('.').to_string(),
            https_port,
        });
    }

    /// Client tokens are checked against `cas` from now on (a reloaded CA
    /// bundle); does nothing on a node that takes clients without tokens.
    pub fn set_token_cas(&self, cas: Vec<Vec<u8>>) {
        let mut current = self
            .token_cas
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if current.is_some() {
            *current = Some(cas);
        }
    }

    /// What one client key may register here.
    pub fn client_limits(&self) -> &ClientLimits {
        &self.clients
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
    /// connection to it if it is silent too (see [`Transport::forget`]).
    pub fn node_down(&self, node: NodeId) {
        self.transport.forget(node);
        self.routes.rewrite(|route| {
            let rest: Vec<Peer> = route.iter().copied().filter(|p| p.id != node).collect();
            (!rest.is_empty()).then_some(rest)
        });
    }
}

/// Drops cached routes through nodes as soon as gossip declares them dead,
/// until `stop` fires.
pub async fn forget_dead_routes(tunnels: Arc<Tunnels>, stop: tokio_util::sync::CancellationToken) {
    use super::membership::{MemberChange, Update};
    let mut members = tunnels.members.subscribe();
    loop {
        let update = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            u = members.next() => u,
        };
        match update {
            None => return,
            Some(Update::Change(MemberChange::Down(peer))) => tunnels.node_down(peer.id),
            Some(Update::Change(MemberChange::Up(_))) => {}
            Some(Update::Resync(live)) => {
                tunnels.routes.rewrite(|route| {
                    let rest: Vec<Peer> = route
                        .iter()
                        .copied()
                        .filter(|p| live.iter().any(|l| l.id == p.id))
                        .collect();
                    (!rest.is_empty()).then_some(rest)
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use specter_dht::{Attachment, Item, Outcome, Record};
    use specter_tunnel::protocol::{Visit, VisitKind, VisitReply};
    use tokio::sync::mpsc;

    use super::visit::OpenError;
    use super::*;
    use crate::net::IncomingStream;
    use crate::net::tls::NodeTls;
    use crate::node::dht::Command;
    use crate::node::membership::MemberChange;
    use crate::pki::{CaPem, make_ca, make_node_cert};
    use crate::wire::{STREAM_NOT_HERE, read_frame, write_msg};

    /// A node's transport on loopback, serving until the test ends.
    fn transport(ca: &CaPem, name: &str) -> (Arc<Transport>, crate::net::pool::Inboxes) {
        transport_of_release(ca, name, true)
    }

    /// A node's transport; `early` false plays a node of the release before
    /// early bytes in visit headers.
    fn transport_of_release(
        ca: &CaPem,
        name: &str,
        early: bool,
    ) -> (Arc<Transport>, crate::net::pool::Inboxes) {
        let pem = make_node_cert(ca, name, &[]).unwrap();
        let mut tls = NodeTls::from_pem(&ca.cert, &pem.cert, &pem.key).unwrap();
        tls.early = early;
        let endpoint = crate::net::bind_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let (transport, inboxes) = Transport::new(endpoint, &tls).unwrap();
        tokio::spawn(
            transport
                .clone()
                .serve(tokio_util::sync::CancellationToken::new()),
        );
        (transport, inboxes)
    }

    fn peer_of(t: &Transport) -> Peer {
        Peer {
            id: t.local_id(),
            addr: t.local_addr().unwrap(),
        }
    }

    /// Tunnels around a stand-in DHT that knows `records`; also returns how
    /// many reads it served.
    fn tunnels(
        ca: &CaPem,
        records: BTreeMap<String, Record>,
        members: Members,
    ) -> (Arc<Tunnels>, Arc<AtomicUsize>) {
        tunnels_ready(ca, records, members, Readiness::new(true))
    }

    fn tunnels_ready(
        ca: &CaPem,
        records: BTreeMap<String, Record>,
        members: Members,
        ready: Readiness,
    ) -> (Arc<Tunnels>, Arc<AtomicUsize>) {
        let (transport, _inboxes) = transport(ca, "me");
        let (dht, mut commands) = DhtHandle::new();
        let reads = Arc::new(AtomicUsize::new(0));
        let counter = reads.clone();
        tokio::spawn(async move {
            while let Some(command) = commands.recv().await {
                if let Command::Get { name, reply } = command {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let item = records.get(&name).map(|record| Item {
                        key: specter_dht::key_of(&name),
                        name: name.clone(),
                        record: record.clone(),
                    });
                    let _ = reply.send((Outcome::Got { item, hops: 0 }, Duration::ZERO));
                }
            }
        });
        let me = peer_of(&transport);
        let tunnels = Tunnels::new(TunnelParts {
            me,
            dht,
            transport,
            members,
            token_cas: None,
            ready,
            clients: ClientLimits::default(),
        });
        (tunnels, reads)
    }

    /// Tunnels of a node that sees `live` up, with tunnel `web` attached at
    /// `attached`.
    fn web_through(ca: &CaPem, live: &[Peer], attached: &[Peer]) -> Arc<Tunnels> {
        let members = Members::default();
        for p in live {
            members.publish(MemberChange::Up(*p));
        }
        let records = BTreeMap::from([("web".to_string(), attached_at(attached))]);
        tunnels(ca, records, members).0
    }

    fn attached_at(nodes: &[Peer]) -> Record {
        let lease_expiry = crate::clock::now_ms() + 60_000;
        Record {
            claim: None,
            attachments: nodes
                .iter()
                .map(|p| {
                    let a = Attachment {
                        addr: p.addr,
                        version: 1,
                        lease_expiry,
                        detached: false,
                    };
                    (p.id, a)
                })
                .collect(),
        }
    }

    fn visit(name: &str) -> Visit {
        Visit {
            name: name.into(),
            visitor: SocketAddr::from(([127, 0, 0, 9], 5555)),
            kind: VisitKind::Http,
            early: Bytes::new(),
        }
    }

    /// Plays an attached node: answers every forwarded visit with `Ready`
    /// and echoes its bytes (`ready`), or refuses it with a reset; sends
    /// each visit's tunnel name to the returned channel.
    fn attached_node(
        mut forwards: mpsc::Receiver<IncomingStream>,
        ready: bool,
    ) -> mpsc::UnboundedReceiver<Visit> {
        let (seen, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(IncomingStream {
                mut send, mut recv, ..
            }) = forwards.recv().await
            {
                let Ok(v) = read_frame::<Visit>(&mut recv).await else {
                    continue;
                };
                let _ = seen.send(v);
                if !ready {
                    let _ = send.reset(STREAM_NOT_HERE);
                    continue;
                }
                tokio::spawn(async move {
                    write_msg(&mut send, &VisitReply::Ready).await.unwrap();
                    let mut buf = [0u8; 5];
                    recv.read_exact(&mut buf).await.unwrap();
                    send.write_all(&buf).await.unwrap();
                    let _ = send.finish();
                });
            }
        });
        rx
    }

    #[tokio::test]
    async fn a_node_that_has_not_joined_looks_nothing_up_until_it_has() {
        let ca = make_ca("t").unwrap();
        let ready = Readiness::new(false);
        let (tunnels, reads) =
            tunnels_ready(&ca, BTreeMap::new(), Members::default(), ready.clone());
        let visitor = {
            let tunnels = tunnels.clone();
            tokio::spawn(async move { tunnels.open("nobody-here", &visit("nobody-here")).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Its ring is itself alone: a lookup now would call every name unknown.
        assert_eq!(reads.load(Ordering::SeqCst), 0);
        assert!(!visitor.is_finished());
        assert!(ready.set_ready());
        assert!(matches!(visitor.await.unwrap(), Err(OpenError::Unknown)));
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_never_joins_turns_visitors_away_after_the_ready_wait() {
        let ca = make_ca("t").unwrap();
        let (tunnels, reads) = tunnels_ready(
            &ca,
            BTreeMap::new(),
            Members::default(),
            Readiness::new(false),
        );
        let began = tokio::time::Instant::now();
        let opened = tunnels.open("nobody-here", &visit("nobody-here")).await;
        assert!(matches!(opened, Err(OpenError::NotReady)));
        assert!(began.elapsed() >= crate::node::membership::READY_WAIT);
        assert_eq!(reads.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_unknown_name_is_answered_from_the_cache_after_one_lookup() {
        let ca = make_ca("t").unwrap();
        let (tunnels, reads) = tunnels(&ca, BTreeMap::new(), Members::default());
        for _ in 0..3 {
            let opened = tunnels.open("nobody-here", &visit("nobody-here")).await;
            assert!(matches!(opened, Err(OpenError::Unknown)));
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_visit_goes_through_an_attached_node_and_carries_bytes_both_ways() {
        let ca = make_ca("t").unwrap();
        let (node, inboxes) = transport(&ca, "x");
        let mut seen = attached_node(inboxes.forwards, true);
        let x = peer_of(&node);
        let tunnels = web_through(&ca, &[x], &[x]);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut pair = tunnels.open("web", &visit("web")).await.unwrap();
        assert_eq!(seen.recv().await.unwrap().name, "web");
        pair.write_all(b"hello").await.unwrap();
        let mut echo = [0u8; 5];
        pair.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"hello");
    }

    /// Tunnel `web` attached at two nodes: one that refuses every visit and
    /// one that answers; also what each was sent.
    fn refusing_and_answering() -> (
        Arc<Tunnels>,
        mpsc::UnboundedReceiver<Visit>,
        mpsc::UnboundedReceiver<Visit>,
    ) {
        let ca = make_ca("t").unwrap();
        let (bad, bad_inboxes) = transport(&ca, "bad");
        let (good, good_inboxes) = transport(&ca, "good");
        let bad_seen = attached_node(bad_inboxes.forwards, false);
        let good_seen = attached_node(good_inboxes.forwards, true);
        let (bad, good) = (peer_of(&bad), peer_of(&good));
        let tunnels = web_through(&ca, &[bad, good], &[bad, good]);
        (tunnels, bad_seen, good_seen)
    }

    #[tokio::test]
    async fn a_failing_attachment_costs_a_retry_not_an_error_and_is_tried_last_afterwards() {
        let (tunnels, mut bad_seen, mut good_seen) = refusing_and_answering();
        // Until the failing node has been tried once, either may come first.
        let mut tried_bad = false;
        for _ in 0..20 {
            let opened = tunnels.open("web", &visit("web")).await;
            assert!(opened.is_ok(), "a visit failed while a path answered");
            assert_eq!(good_seen.recv().await.unwrap().name, "web");
            if bad_seen.try_recv().is_ok() {
                tried_bad = true;
                break;
            }
        }
        assert!(tried_bad, "the failing node was never tried");
        // Now it is marked slow: the answering node comes first every time.
        for _ in 0..10 {
            tunnels.open("web", &visit("web")).await.unwrap();
            assert_eq!(good_seen.recv().await.unwrap().name, "web");
        }
        assert!(
            bad_seen.try_recv().is_err(),
            "a node marked slow was tried first"
        );
    }

    #[tokio::test]
    async fn early_bytes_go_with_the_header_and_again_on_the_next_path() {
        let (tunnels, mut bad_seen, mut good_seen) = refusing_and_answering();
        let early = Visit {
            early: Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"),
            ..visit("web")
        };
        let mut replayed = false;
        for _ in 0..20 {
            tunnels.open("web", &early).await.unwrap();
            // Whichever path answered got the request with the header, before
            // its `Ready`; one that refused it got it too, and the next path
            // got it again.
            assert_eq!(good_seen.recv().await.unwrap().early, early.early);
            if let Ok(refused) = bad_seen.try_recv() {
                assert_eq!(refused.early, early.early);
                replayed = true;
                break;
            }
        }
        assert!(replayed, "the refusing node was never tried");
    }

    #[tokio::test]
    async fn a_node_of_an_earlier_release_gets_the_early_bytes_after_its_ready() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ca = make_ca("t").unwrap();
        let (old, old_inboxes) = transport_of_release(&ca, "old", false);
        // Echoes the 5 bytes that follow its `Ready`.
        let mut seen = attached_node(old_inboxes.forwards, true);
        let old = peer_of(&old);
        let tunnels = web_through(&ca, &[old], &[old]);
        let early = Visit {
            early: Bytes::from_static(b"hello"),
            ..visit("web")
        };
        let mut pair = tunnels.open("web", &early).await.unwrap();
        // The header it got decodes as the earlier release's did: no early
        // bytes in it...
        assert!(seen.recv().await.unwrap().early.is_empty());
        // ...and they came after `Ready`, as the visitor's bytes.
        let mut echo = [0u8; 5];
        pair.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"hello");
        pair.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_node_gossip_holds_dead_is_tried_after_a_live_one() {
        let ca = make_ca("t").unwrap();
        let (dead, dead_inboxes) = transport(&ca, "dead");
        let (live, live_inboxes) = transport(&ca, "live");
        let mut dead_seen = attached_node(dead_inboxes.forwards, true);
        let mut live_seen = attached_node(live_inboxes.forwards, true);
        let (dead, live) = (peer_of(&dead), peer_of(&live));
        let tunnels = web_through(&ca, &[live], &[dead, live]);
        for _ in 0..10 {
            tunnels.open("web", &visit("web")).await.unwrap();
            assert_eq!(live_seen.recv().await.unwrap().name, "web");
        }
        assert!(dead_seen.try_recv().is_err());
    }
}
