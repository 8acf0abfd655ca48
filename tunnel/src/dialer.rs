//! Which node a client dials next when it is short of attachments.
//!
//! The client knows two lists of nodes: the seeds it was started with and the
//! latest peer sample from gossip. Every address that fails is backed off on
//! its own (jittered, doubling, capped), so a dead node is not hammered while
//! the others are still tried at once, and when every node is gone (a laptop
//! that lost its network) the client keeps trying them all forever at the
//! capped rate. Pure: time and randomness are passed in.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::RngExt;

/// Per-address backoff state.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    /// The next failure waits twice this (capped).
    delay: Duration,
    /// Not dialed again before this.
    until: Instant,
}

/// Chooses addresses to dial.
#[derive(Debug)]
pub struct Dialer {
    seeds: Vec<SocketAddr>,
    sample: Vec<SocketAddr>,
    backoff: HashMap<SocketAddr, Backoff>,
    min: Duration,
    max: Duration,
}

impl Dialer {
    /// A dialer over `seeds`, backing off failed addresses from `min` up to
    /// `max`.
    pub fn new(seeds: Vec<SocketAddr>, min: Duration, max: Duration) -> Self {
        Dialer {
            seeds,
            sample: Vec::new(),
            backoff: HashMap::new(),
            min,
            max,
        }
    }

    /// Replaces the peer sample. An empty sample keeps the last one: the
    /// last known subset is still the best guess while nodes come back.
    pub fn set_sample(&mut self, sample: Vec<SocketAddr>) {
        if !sample.is_empty() {
            self.sample = sample;
        }
    }

    /// `addr` failed (dial, refusal, or a lost attachment) at `now`.
    pub fn failed<R: RngExt + ?Sized>(&mut self, addr: SocketAddr, now: Instant, rng: &mut R) {
        let delay = match self.backoff.get(&addr) {
            Some(b) => (b.delay * 2).min(self.max),
            None => self.min,
        };
        // Full jitter over the upper half, so clients that lost the same node
        // do not come back in lockstep.
        let half = delay / 2;
        let wait = half + half.mul_f64(rng.random_range(0.0..=1.0));
        self.backoff.insert(
            addr,
            Backoff {
                delay,
                until: now + wait,
            },
        );
    }

    /// `addr` accepted an attachment: forget its failures.
    pub fn succeeded(&mut self, addr: SocketAddr) {
        self.backoff.remove(&addr);
    }

    /// Every address known, sample first, without duplicates.
    #[cfg(test)]
    fn known(&self) -> Vec<SocketAddr> {
        let mut seen = HashSet::new();
        self.sample
            .iter()
            .chain(&self.seeds)
            .copied()
            .filter(|a| seen.insert(*a))
            .collect()
    }

    /// A random address to dial at `now`, not in `busy` (attached or being
    /// dialed) and not backing off. Sample members are preferred to seeds.
    pub fn next<R: RngExt + ?Sized>(
        &self,
        now: Instant,
        busy: &HashSet<SocketAddr>,
        rng: &mut R,
    ) -> Option<SocketAddr> {
        let ready = |a: &&SocketAddr| {
            !busy.contains(a) && self.backoff.get(a).is_none_or(|b| b.until <= now)
        };
        let from_sample: Vec<&SocketAddr> = self.sample.iter().filter(ready).collect();
        let pool = if from_sample.is_empty() {
            self.seeds.iter().filter(ready).collect()
        } else {
            from_sample
        };
        if pool.is_empty() {
            return None;
        }
        Some(*pool[rng.random_range(0..pool.len())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 4000))
    }

    #[test]
    fn prefers_the_sample_and_skips_busy_addresses() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let now = Instant::now();
        let mut d = Dialer::new(
            vec![addr(1)],
            Duration::from_millis(200),
            Duration::from_secs(5),
        );
        assert_eq!(d.next(now, &HashSet::new(), &mut rng), Some(addr(1)));
        d.set_sample(vec![addr(2), addr(3)]);
        let busy: HashSet<_> = [addr(2)].into();
        for _ in 0..20 {
            assert_eq!(d.next(now, &busy, &mut rng), Some(addr(3)));
        }
        // Sample exhausted: seeds.
        let busy: HashSet<_> = [addr(2), addr(3)].into();
        assert_eq!(d.next(now, &busy, &mut rng), Some(addr(1)));
        // An empty sample keeps the last one.
        d.set_sample(Vec::new());
        assert_eq!(d.known(), vec![addr(2), addr(3), addr(1)]);
    }

    #[test]
    fn failures_back_off_per_address_with_jitter_and_a_cap() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let t0 = Instant::now();
        let (min, max) = (Duration::from_millis(200), Duration::from_secs(5));
        let mut d = Dialer::new(vec![addr(1), addr(2)], min, max);
        d.failed(addr(1), t0, &mut rng);
        // addr(1) waits at least min/2; addr(2) is still dialed at once.
        for _ in 0..20 {
            assert_eq!(d.next(t0, &HashSet::new(), &mut rng), Some(addr(2)));
        }
        assert_eq!(d.next(t0 + min, &[addr(2)].into(), &mut rng), Some(addr(1)));
        // Repeated failures double up to the cap, never beyond it.
        let mut now = t0;
        for _ in 0..20 {
            d.failed(addr(1), now, &mut rng);
            now += max;
        }
        let b = d.backoff[&addr(1)];
        assert_eq!(b.delay, max);
        assert!(b.until - (now - max) >= max / 2 && b.until - (now - max) <= max);
        // Everything backing off: nothing now, everything later (forever).
        d.failed(addr(2), now - max, &mut rng);
        assert_eq!(d.next(now - max, &HashSet::new(), &mut rng), None);
        assert!(d.next(now + max, &HashSet::new(), &mut rng).is_some());
        d.succeeded(addr(1));
        assert_eq!(d.next(now - max, &HashSet::new(), &mut rng), Some(addr(1)));
    }
}
