//! A deterministic network simulator for [`Membership`]: N members, an event
//! heap of packets and timer wake-ups, a virtual clock that jumps to the next
//! event, and seeded loss, latency, partitions, crashes and restarts.
//!
//! Used by the tests (100+ members in well under a second of real time) and by
//! the failure-detection benchmark. Addresses are labels only; nothing here
//! opens a socket.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::{GossipConfig, MemberEvent, Membership, NodeId, NodeIdentity, Timing};

/// Network conditions of a simulation.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed for the network and every member's RNG; print it when a run fails.
    pub seed: u64,
    /// Probability that a packet is lost.
    pub loss: f64,
    /// Shortest one-way latency.
    pub min_latency: Duration,
    /// Longest one-way latency.
    pub max_latency: Duration,
    /// Members are dealt round-robin into this many regions (member `i` is
    /// in region `i % regions`); 1 is one flat network.
    pub regions: usize,
    /// Shortest one-way latency between members of different regions.
    pub cross_min_latency: Duration,
    /// Longest one-way latency between members of different regions.
    pub cross_max_latency: Duration,
}

impl SimConfig {
    /// A LAN-like network: 0.2–2 ms one way, the given loss.
    pub fn lan(seed: u64, loss: f64) -> Self {
        SimConfig {
            seed,
            loss,
            min_latency: Duration::from_micros(200),
            max_latency: Duration::from_millis(2),
            regions: 1,
            cross_min_latency: Duration::from_micros(200),
            cross_max_latency: Duration::from_millis(2),
        }
    }

    /// Links of round-trip time `rtt` with uniform jitter of ±10 % each way
    /// and the given loss, between every pair of members.
    pub fn wan(seed: u64, loss: f64, rtt: Duration) -> Self {
        SimConfig::regions(seed, loss, 1, rtt, rtt)
    }

    /// Members in `regions` regions: round trips of `inside` within a
    /// region and `across` between regions, each with ±10 % jitter each way.
    pub fn regions(
        seed: u64,
        loss: f64,
        regions: usize,
        inside: Duration,
        across: Duration,
    ) -> Self {
        SimConfig {
            seed,
            loss,
            min_latency: inside.mul_f64(0.45),
            max_latency: inside.mul_f64(0.55),
            regions: regions.max(1),
            cross_min_latency: across.mul_f64(0.45),
            cross_max_latency: across.mul_f64(0.55),
        }
    }

    fn latency_bounds(&self, from: usize, to: usize) -> (Duration, Duration) {
        if from % self.regions == to % self.regions {
            (self.min_latency, self.max_latency)
        } else {
            (self.cross_min_latency, self.cross_max_latency)
        }
    }

    /// The worst round trip member `i` of `n` measures to another member:
    /// what a node learns from its QUIC connections' RTT estimates.
    pub fn worst_rtt(&self, i: usize, n: usize) -> Duration {
        (0..n)
            .filter(|&j| j != i)
            .map(|j| 2 * self.latency_bounds(i, j).1)
            .max()
            .unwrap_or_default()
    }
}

/// An event seen by one member, with the virtual time it happened.
#[derive(Clone, Debug)]
pub struct Observed {
    /// Virtual time since the simulation started.
    pub at: Duration,
    /// Index of the member that saw it.
    pub observer: usize,
    /// What it saw.
    pub event: MemberEvent,
}

struct Node {
    identity: NodeIdentity,
    membership: Option<Membership>,
    armed: Option<Instant>,
    bytes_out: u64,
    group: u8,
    /// Until when the member runs nothing (a starved process): packets and
    /// timers wait for it.
    stalled_until: Option<Instant>,
    /// Set its timers from the round trips it would measure.
    adaptive: bool,
}

/// The simulated cluster.
pub struct Sim {
    start: Instant,
    now: Instant,
    gossip: GossipConfig,
    net: SimConfig,
    rng: StdRng,
    seq: u64,
    nodes: Vec<Node>,
    index: HashMap<NodeId, usize>,
    packets: BinaryHeap<Reverse<(Instant, u64, usize, usize)>>,
    payloads: HashMap<u64, Bytes>,
    wakeups: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Every membership event every member saw, in order.
    pub log: Vec<Observed>,
}

impl Sim {
    /// `n` members with random ids, none of which knows any other yet.
    pub fn new(n: usize, gossip: GossipConfig, net: SimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(net.seed);
        let start = Instant::now();
        let mut sim = Sim {
            start,
            now: start,
            gossip,
            net,
            rng: StdRng::seed_from_u64(0),
            seq: 0,
            nodes: Vec::new(),
            index: HashMap::new(),
            packets: BinaryHeap::new(),
            payloads: HashMap::new(),
            wakeups: BinaryHeap::new(),
            log: Vec::new(),
        };
        for i in 0..n {
            let mut id = NodeId(rng.random());
            while sim.index.contains_key(&id) {
                id = NodeId(rng.random());
            }
            let octets = u32::try_from(i)
                .expect("fewer than 2^32 members")
                .to_be_bytes();
            let identity = NodeIdentity {
                id,
                addr: SocketAddr::new(
                    Ipv4Addr::new(127, octets[1], octets[2], octets[3]).into(),
                    7000,
                ),
                generation: 1,
            };
            sim.index.insert(id, i);
            sim.nodes.push(Node {
                identity,
                membership: None,
                armed: None,
                bytes_out: 0,
                group: 0,
                stalled_until: None,
                adaptive: false,
            });
            sim.boot(i);
        }
        sim.rng = rng;
        sim
    }

    fn boot(&mut self, i: usize) {
        let seed = self.net.seed
            ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ self.nodes[i].identity.generation;
        let m = Membership::new(
            self.nodes[i].identity,
            &self.gossip,
            StdRng::seed_from_u64(seed),
        )
        .expect("valid gossip config");
        self.nodes[i].membership = Some(m);
        if self.nodes[i].adaptive {
            self.adapt_timing(i);
        }
        self.nodes[i].armed = None;
    }

    /// Virtual time elapsed since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Number of members (crashed ones included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True if the simulation has no members.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The current identity of member `i`.
    pub fn identity(&self, i: usize) -> NodeIdentity {
        self.nodes[i]
            .membership
            .as_ref()
            .map_or(self.nodes[i].identity, Membership::identity)
    }

    /// Whether member `i` is running.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].membership.is_some()
    }

    /// Member `i`'s state machine, if it is running.
    pub fn membership(&self, i: usize) -> Option<&Membership> {
        self.nodes[i].membership.as_ref()
    }

    /// Member `i` announces itself to member `seed`.
    pub fn announce(&mut self, i: usize, seed: usize) {
        let seed_identity = self.identity(seed);
        let now = self.now;
        if let Some(m) = self.nodes[i].membership.as_mut() {
            m.announce(now, seed_identity);
        }
        self.flush(i);
    }

    /// Member `i` joins through member `seed` (announcing until it is in).
    pub fn add_seed(&mut self, i: usize, seed: usize) {
        let seed_identity = self.identity(seed);
        let now = self.now;
        if let Some(m) = self.nodes[i].membership.as_mut() {
            m.add_seed(now, seed_identity);
        }
        self.flush(i);
    }

    /// Member `i` leaves gracefully and then stops.
    pub fn leave(&mut self, i: usize) {
        let now = self.now;
        if let Some(m) = self.nodes[i].membership.as_mut() {
            m.leave(now);
        }
        self.flush(i);
        self.nodes[i].membership = None;
    }

    /// Every member sets its timers from the worst round trip it would
    /// measure ([`Timing::for_rtt`]), as a node does from its QUIC
    /// connections; restarted members do so again.
    pub fn adapt_timers(&mut self) {
        for i in 0..self.nodes.len() {
            self.nodes[i].adaptive = true;
            self.adapt_timing(i);
        }
    }

    fn adapt_timing(&mut self, i: usize) {
        let timing = Timing::for_rtt(
            self.gossip.timing(),
            self.net.worst_rtt(i, self.nodes.len()),
        );
        if let Some(m) = self.nodes[i].membership.as_mut() {
            m.set_timing(timing).expect("timing from for_rtt is valid");
        }
    }

    /// Member `i` runs nothing for `d` (a starved or paused process): what
    /// arrives meanwhile and its timers wait until then.
    pub fn stall(&mut self, i: usize, d: Duration) {
        self.nodes[i].stalled_until = Some(self.now + d);
    }

    /// Member `i` stops at once, telling nobody.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].membership = None;
    }

    /// Member `i` starts again with the same id and a higher generation (as the
    /// real node does from its start time) and announces itself to `seed`.
    pub fn restart(&mut self, i: usize, seed: usize) {
        assert!(!self.is_running(i), "restart of a running member");
        self.nodes[i].identity.generation += 1_000;
        self.boot(i);
        self.add_seed(i, seed);
    }

    /// Splits the cluster: packets between members of different groups are lost.
    pub fn partition(&mut self, group_of: impl Fn(usize) -> u8) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            n.group = group_of(i);
        }
    }

    /// Removes any partition.
    pub fn heal(&mut self) {
        self.partition(|_| 0);
    }

    /// The ids member `i` currently considers up.
    pub fn view(&self, i: usize) -> BTreeSet<NodeId> {
        self.nodes[i]
            .membership
            .as_ref()
            .map(|m| m.up_members().map(|id| id.id).collect())
            .unwrap_or_default()
    }

    /// The ids of running members other than `i`: what a converged view of `i` is.
    pub fn expected_view(&self, i: usize) -> BTreeSet<NodeId> {
        (0..self.nodes.len())
            .filter(|&j| j != i && self.is_running(j))
            .map(|j| self.nodes[j].identity.id)
            .collect()
    }

    /// True when every running member's view is exactly the other running members.
    pub fn converged(&self) -> bool {
        (0..self.nodes.len())
            .filter(|&i| self.is_running(i))
            .all(|i| self.view(i) == self.expected_view(i))
    }

    /// Bytes member `i` has sent so far.
    pub fn bytes_out(&self, i: usize) -> u64 {
        self.nodes[i].bytes_out
    }

    /// Runs until `pred` holds (checked every `step`) or `limit` virtual time has
    /// passed; returns the virtual time it took, or `None` on timeout.
    pub fn run_until(
        &mut self,
        limit: Duration,
        step: Duration,
        mut pred: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let began = self.now;
        loop {
            if pred(self) {
                return Some(self.now - began);
            }
            if self.now - began >= limit {
                return None;
            }
            self.run_for(step);
        }
    }

    /// Advances the virtual clock by `d`, processing every event on the way.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            let next_packet = self.packets.peek().map(|Reverse(p)| p.0);
            let next_wake = self.wakeups.peek().map(|Reverse(w)| w.0);
            let next = match (next_packet, next_wake) {
                (Some(p), Some(w)) => p.min(w),
                (Some(p), None) => p,
                (None, Some(w)) => w,
                (None, None) => break,
            };
            if next > until {
                break;
            }
            self.now = next;
            if next_packet == Some(next) {
                let Some(Reverse((_, seq, from, to))) = self.packets.pop() else {
                    break;
                };
                if let Some(until) = self.stalled(to) {
                    self.packets.push(Reverse((until, seq, from, to)));
                    continue;
                }
                let data = self
                    .payloads
                    .remove(&seq)
                    .expect("payload for queued packet");
                self.deliver(from, to, &data);
            } else {
                let Some(Reverse((_, i))) = self.wakeups.pop() else {
                    break;
                };
                if let Some(until) = self.stalled(i) {
                    self.wakeups.push(Reverse((until, i)));
                    continue;
                }
                self.wake(i);
            }
        }
        self.now = until;
    }

    /// When member `i` runs again, if it is stalled now.
    fn stalled(&self, i: usize) -> Option<Instant> {
        self.nodes[i]
            .stalled_until
            .filter(|&until| until > self.now)
    }

    fn deliver(&mut self, from: usize, to: usize, data: &[u8]) {
        if self.nodes[from].group != self.nodes[to].group {
            return;
        }
        let now = self.now;
        let from_id = self.nodes[from].identity.id;
        if let Some(m) = self.nodes[to].membership.as_mut() {
            // Invalid packets are counted by the membership; nothing else to do.
            let _ = m.handle_data(now, from_id, data);
            self.flush(to);
        }
    }

    fn wake(&mut self, i: usize) {
        let now = self.now;
        self.nodes[i].armed = None;
        if let Some(m) = self.nodes[i].membership.as_mut() {
            if m.poll_timeout().is_some_and(|t| t <= now) {
                m.handle_timeout(now);
            }
            self.flush(i);
        }
    }

    /// Sends what member `i` produced, logs its events, re-arms its timer.
    fn flush(&mut self, i: usize) {
        let now = self.now;
        let elapsed = self.elapsed();
        let Some(m) = self.nodes[i].membership.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        while let Some(t) = m.poll_transmit() {
            out.push(t);
        }
        while let Some(event) = m.poll_event() {
            self.log.push(Observed {
                at: elapsed,
                observer: i,
                event,
            });
        }
        let deadline = m.poll_timeout();
        if let Some(at) = deadline
            && self.nodes[i].armed.is_none_or(|armed| at < armed)
        {
            self.nodes[i].armed = Some(at);
            self.wakeups.push(Reverse((at, i)));
        }
        for t in out {
            self.nodes[i].bytes_out += t.data.len() as u64;
            if self.rng.random::<f64>() < self.net.loss {
                continue;
            }
            let Some(&to) = self.index.get(&t.to.id) else {
                continue;
            };
            let (min, max) = self.net.latency_bounds(i, to);
            let latency = min + max.saturating_sub(min).mul_f64(self.rng.random::<f64>());
            self.seq += 1;
            self.payloads.insert(self.seq, t.data);
            self.packets.push(Reverse((now + latency, self.seq, i, to)));
        }
    }

    /// When member `observer` first saw `id` go down at or after `since`.
    pub fn first_down_seen(
        &self,
        observer: usize,
        id: NodeId,
        since: Duration,
    ) -> Option<Duration> {
        self.log.iter().find_map(|o| match o.event {
            MemberEvent::Down(who) if o.observer == observer && who.id == id && o.at >= since => {
                Some(o.at)
            }
            _ => None,
        })
    }
}
