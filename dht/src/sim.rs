//! A deterministic simulator of many [`DhtNode`]s: an event heap on a virtual
//! millisecond clock, seeded latency and loss, RPC timeouts, crashes and
//! restarts (a restarted node comes back empty), partitions, and a membership
//! oracle standing in for SWIM that delivers each change to each node after a
//! random lag. Nothing here opens a socket.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use specter_gossip::NodeId;

use crate::messages::{Request, Response};
use crate::node::{DhtConfig, DhtEvent, DhtNode, Handled, OpId, Outcome};
use crate::ring::{Key, Peer};
use crate::store::WriteOp;

/// Unix time at which simulations start (any fixed value works).
pub const EPOCH_MS: u64 = 1_800_000_000_000;

/// Network and timing of a simulation.
#[derive(Clone, Debug)]
pub struct DhtSimConfig {
    /// Seed of everything random; print it when a run fails.
    pub seed: u64,
    /// Probability that a message is lost.
    pub loss: f64,
    /// One-way latency range, ms.
    pub latency_ms: (u64, u64),
    /// A request with no answer after this long fails.
    pub rpc_timeout_ms: u64,
    /// Membership changes reach each node after a lag in this range, ms
    /// (SWIM's detection and dissemination).
    pub membership_lag_ms: (u64, u64),
    /// How often each node's timers are checked, ms.
    pub tick_ms: u64,
}

impl DhtSimConfig {
    /// A LAN: 1–3 ms, no loss, 1 s RPC timeout, membership lag up to 2 s.
    pub fn lan(seed: u64) -> Self {
        DhtSimConfig {
            seed,
            loss: 0.0,
            latency_ms: (1, 3),
            rpc_timeout_ms: 1_000,
            membership_lag_ms: (100, 2_000),
            tick_ms: 250,
        }
    }
}

enum Ev {
    Request {
        from: usize,
        to: usize,
        id: u64,
        request: Request,
    },
    Response {
        to: usize,
        id: u64,
        response: Response,
    },
    Timeout {
        node: usize,
        id: u64,
    },
    Members {
        node: usize,
        peers: Vec<Peer>,
        epoch: u64,
    },
    Tick {
        node: usize,
    },
}

struct SimNode {
    peer: Peer,
    dht: Option<DhtNode>,
    group: u8,
    epoch: u64,
}

/// The simulated cluster.
pub struct DhtSim {
    now: u64,
    net: DhtSimConfig,
    config: DhtConfig,
    rng: StdRng,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Ev>,
    nodes: Vec<SimNode>,
    index: HashMap<NodeId, usize>,
    inflight: BTreeSet<(usize, u64)>,
    deferred: HashMap<(usize, u64), (usize, u64)>,
    results: HashMap<(usize, OpId), Outcome>,
}

impl DhtSim {
    /// `n` nodes with random ids, all knowing each other from the start.
    pub fn new(n: usize, config: DhtConfig, net: DhtSimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(net.seed);
        let mut sim = DhtSim {
            now: EPOCH_MS,
            net,
            config,
            rng: StdRng::seed_from_u64(0),
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            nodes: Vec::new(),
            index: HashMap::new(),
            inflight: BTreeSet::new(),
            deferred: HashMap::new(),
            results: HashMap::new(),
        };
        for i in 0..n {
            let mut id = NodeId(rng.random());
            while sim.index.contains_key(&id) {
                id = NodeId(rng.random());
            }
            let o = u32::try_from(i)
                .expect("fewer than 2^32 nodes")
                .to_be_bytes();
            let peer = Peer {
                id,
                addr: SocketAddr::new(Ipv4Addr::new(127, o[1], o[2], o[3]).into(), 7000),
            };
            sim.index.insert(id, i);
            sim.nodes.push(SimNode {
                peer,
                dht: Some(DhtNode::new(peer, sim.config.clone(), EPOCH_MS)),
                group: 0,
                epoch: 0,
            });
        }
        sim.rng = rng;
        let all: Vec<Peer> = sim.nodes.iter().map(|n| n.peer).collect();
        for i in 0..n {
            if let Some(d) = sim.nodes[i].dht.as_mut() {
                d.set_members(all.clone());
            }
            sim.flush(i);
            let tick = EPOCH_MS + sim.rng.random_range(0..sim.net.tick_ms);
            sim.push(tick, Ev::Tick { node: i });
        }
        sim
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert(self.seq, ev);
        self.queue.push(Reverse((at, self.seq)));
    }

    fn latency(&mut self) -> u64 {
        let (lo, hi) = self.net.latency_ms;
        self.rng.random_range(lo..=hi)
    }

    fn lost(&mut self, a: usize, b: usize) -> bool {
        self.nodes[a].group != self.nodes[b].group || self.rng.random::<f64>() < self.net.loss
    }

    /// Virtual milliseconds since the start.
    pub fn elapsed_ms(&self) -> u64 {
        self.now - EPOCH_MS
    }

    /// Number of nodes (crashed ones included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True if there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s state, if it is running.
    pub fn node(&self, i: usize) -> Option<&DhtNode> {
        self.nodes[i].dht.as_ref()
    }

    /// Whether node `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].dht.is_some()
    }

    /// Index of the running node with id `id`.
    pub fn index_of(&self, id: NodeId) -> usize {
        self.index[&id]
    }

    /// Starts a write through node `i`.
    pub fn write(&mut self, i: usize, name: &str, op: WriteOp) -> (usize, OpId) {
        let now = self.now;
        let op = self.nodes[i]
            .dht
            .as_mut()
            .expect("running")
            .start_write(now, name, op);
        self.flush(i);
        (i, op)
    }

    /// Starts a read through node `i`.
    pub fn get(&mut self, i: usize, name: &str) -> (usize, OpId) {
        let op = self.nodes[i].dht.as_mut().expect("running").start_get(name);
        self.flush(i);
        (i, op)
    }

    /// How an operation ended, once it has.
    pub fn result(&self, op: (usize, OpId)) -> Option<&Outcome> {
        self.results.get(&op)
    }

    /// Stops node `i` at once; it loses its records.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].dht = None;
        self.deferred.retain(|(server, _), _| *server != i);
    }

    /// Starts node `i` again, empty, knowing the current running set.
    pub fn restart(&mut self, i: usize) {
        let peer = self.nodes[i].peer;
        let mut d = DhtNode::new(peer, self.config.clone(), self.now);
        d.set_members(self.running_peers(i));
        self.nodes[i].dht = Some(d);
        self.flush(i);
        let t = self.now + self.net.tick_ms;
        self.push(t, Ev::Tick { node: i });
    }

    fn running_peers(&self, viewer: usize) -> Vec<Peer> {
        let group = self.nodes[viewer].group;
        self.nodes
            .iter()
            .filter(|n| n.dht.is_some() && n.group == group)
            .map(|n| n.peer)
            .collect()
    }

    /// Tells every running node about the current running set (and the
    /// partition), each after its own random lag; dead nodes go through
    /// `member_down` first.
    pub fn membership_changed(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].dht.is_none() {
                continue;
            }
            let peers = self.running_peers(i);
            let (lo, hi) = self.net.membership_lag_ms;
            let at = self.now + self.rng.random_range(lo..=hi);
            self.nodes[i].epoch += 1;
            let epoch = self.nodes[i].epoch;
            self.push(
                at,
                Ev::Members {
                    node: i,
                    peers,
                    epoch,
                },
            );
        }
    }

    /// Splits the nodes into groups that cannot talk (and whose membership
    /// views exclude each other once [`DhtSim::membership_changed`] is called).
    pub fn partition(&mut self, group_of: impl Fn(usize) -> u8) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            n.group = group_of(i);
        }
    }

    /// Number of running nodes holding a record for `key`.
    pub fn holders(&self, key: Key) -> usize {
        self.nodes
            .iter()
            .filter_map(|n| n.dht.as_ref())
            .filter(|d| d.store().get(key).is_some())
            .count()
    }

    /// Runs until every op in `ops` finished or `limit_ms` passed; true if all did.
    pub fn run_until_done(&mut self, ops: &[(usize, OpId)], limit_ms: u64) -> bool {
        let end = self.now + limit_ms;
        while self.now < end {
            if ops.iter().all(|o| self.results.contains_key(o)) {
                return true;
            }
            self.run_for(10);
        }
        ops.iter().all(|o| self.results.contains_key(o))
    }

    /// Advances the clock by `ms`, processing every event on the way.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.now + ms;
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = self.now.max(at);
            let Some(ev) = self.events.remove(&seq) else {
                continue;
            };
            self.process(ev);
        }
        self.now = until;
    }

    fn process(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Request {
                from,
                to,
                id,
                request,
            } => {
                let from_id = self.nodes[from].peer.id;
                let Some(d) = self.nodes[to].dht.as_mut() else {
                    return;
                };
                match d.handle_request(now, from_id, request) {
                    Handled::Reply(response) => self.respond(to, from, id, response),
                    Handled::Deferred(token) => {
                        self.deferred.insert((to, token), (from, id));
                    }
                }
                self.flush(to);
            }
            Ev::Response { to, id, response } => {
                if self.inflight.remove(&(to, id))
                    && let Some(d) = self.nodes[to].dht.as_mut()
                {
                    d.handle_response(now, id, Ok(response));
                    self.flush(to);
                }
            }
            Ev::Timeout { node, id } => {
                if self.inflight.remove(&(node, id))
                    && let Some(d) = self.nodes[node].dht.as_mut()
                {
                    d.handle_response(now, id, Err(()));
                    self.flush(node);
                }
            }
            Ev::Members { node, peers, epoch } => {
                if self.nodes[node].epoch != epoch {
                    return;
                }
                let Some(d) = self.nodes[node].dht.as_mut() else {
                    return;
                };
                let old: BTreeSet<NodeId> = d.view().members().iter().map(|p| p.id).collect();
                let new: BTreeSet<NodeId> = peers.iter().map(|p| p.id).collect();
                for gone in old.difference(&new) {
                    d.member_down(now, *gone);
                }
                d.set_members(peers);
                self.flush(node);
            }
            Ev::Tick { node } => {
                if let Some(d) = self.nodes[node].dht.as_mut() {
                    if d.poll_timeout() <= now {
                        d.handle_timeout(now);
                    }
                    self.flush(node);
                    let t = now + self.net.tick_ms;
                    self.push(t, Ev::Tick { node });
                }
            }
        }
    }

    fn respond(&mut self, server: usize, client: usize, id: u64, response: Response) {
        if self.lost(server, client) {
            return;
        }
        let at = self.now + self.latency();
        self.push(
            at,
            Ev::Response {
                to: client,
                id,
                response,
            },
        );
    }

    fn flush(&mut self, i: usize) {
        let now = self.now;
        let mut out = Vec::new();
        let mut events = Vec::new();
        if let Some(d) = self.nodes[i].dht.as_mut() {
            while let Some(o) = d.poll_request() {
                out.push(o);
            }
            while let Some(e) = d.poll_event() {
                events.push(e);
            }
        }
        for o in out {
            self.inflight.insert((i, o.id));
            let timeout = now + self.net.rpc_timeout_ms;
            self.push(timeout, Ev::Timeout { node: i, id: o.id });
            let Some(&to) = self.index.get(&o.to.id) else {
                continue;
            };
            if self.lost(i, to) {
                continue;
            }
            let at = now + self.latency();
            self.push(
                at,
                Ev::Request {
                    from: i,
                    to,
                    id: o.id,
                    request: o.request,
                },
            );
        }
        for e in events {
            match e {
                DhtEvent::Completed { op, outcome } => {
                    self.results.insert((i, op), outcome);
                }
                DhtEvent::Reply { token, response } => {
                    if let Some((client, id)) = self.deferred.remove(&(i, token)) {
                        self.respond(i, client, id, response);
                    }
                }
            }
        }
    }
}
