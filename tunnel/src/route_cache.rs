//! The route cache: where a tunnel name was last found (its attachments), or
//! that it was not found, with short lifetimes and explicit invalidation.
//!
//! Backed by quick_cache (bounded, concurrent). Entries carry their own expiry,
//! checked against the `now` the caller passes, so the cache is deterministic
//! under test.

use std::time::{Duration, Instant};

use quick_cache::sync::Cache;

/// How long a found route is trusted: short, so a client that moved is found
/// again quickly even if no failure invalidated the entry.
pub const FOUND_TTL: Duration = Duration::from_secs(10);

/// How long "no such tunnel" is remembered: shorter still, so a client that
/// just registered is reachable within seconds, while a flood of requests for
/// an unknown name costs one lookup per two seconds.
pub const MISSING_TTL: Duration = Duration::from_secs(2);

/// Names cached at most; least recently used ones are evicted beyond it.
pub const CAPACITY: usize = 65_536;

#[derive(Clone)]
enum Entry<V> {
    Found(V, Instant),
    Missing(Instant),
}

/// What the cache knows about a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cached<V> {
    /// A fresh route.
    Found(V),
    /// Recently looked up and not registered.
    Missing,
    /// Nothing fresh: look it up.
    Unknown,
}

/// Routes by tunnel name.
pub struct RouteCache<V: Clone> {
    cache: Cache<String, Entry<V>>,
    found_ttl: Duration,
    missing_ttl: Duration,
}

impl<V: Clone + Send + Sync + 'static> RouteCache<V> {
    /// A cache with the default lifetimes and capacity.
    pub fn new() -> Self {
        Self::with(CAPACITY, FOUND_TTL, MISSING_TTL)
    }

    /// A cache with explicit capacity and lifetimes.
    pub fn with(capacity: usize, found_ttl: Duration, missing_ttl: Duration) -> Self {
        RouteCache {
            cache: Cache::new(capacity),
            found_ttl,
            missing_ttl,
        }
    }

    /// The fresh entry for `name` at `now`.
    pub fn get(&self, name: &str, now: Instant) -> Cached<V> {
        match self.cache.get(name) {
            Some(Entry::Found(v, expires)) if now < expires => Cached::Found(v),
            Some(Entry::Missing(expires)) if now < expires => Cached::Missing,
            Some(_) => {
                self.cache.remove(name);
                Cached::Unknown
            }
            None => Cached::Unknown,
        }
    }

    /// Remembers where `name` was found.
    pub fn found(&self, name: &str, route: V, now: Instant) {
        self.cache
            .insert(name.to_string(), Entry::Found(route, now + self.found_ttl));
    }

    /// Remembers that `name` is not registered.
    pub fn missing(&self, name: &str, now: Instant) {
        self.cache
            .insert(name.to_string(), Entry::Missing(now + self.missing_ttl));
    }

    /// Forgets `name` (a forward through its route failed).
    pub fn invalidate(&self, name: &str) {
        self.cache.remove(name);
    }

    /// Rewrites every found route with `keep`: `None` drops the entry, `Some`
    /// replaces the route and keeps its expiry (a dead node leaves the routes
    /// that named it; the rest of each route stays usable).
    /// Routes `keep` leaves unchanged are not touched.
    pub fn rewrite(&self, keep: impl Fn(&V) -> Option<V>)
    where
        V: PartialEq,
    {
        let found: Vec<(String, V, Instant)> = self
            .cache
            .iter()
            .filter_map(|(name, entry)| match entry {
                Entry::Found(v, expires) => Some((name, v, expires)),
                Entry::Missing(_) => None,
            })
            .collect();
        for (name, route, expires) in found {
            match keep(&route) {
                Some(kept) if kept == route => {}
                Some(kept) => self.cache.insert(name, Entry::Found(kept, expires)),
                None => {
                    self.cache.remove(&name);
                }
            }
        }
    }

    /// Entries held (fresh or not yet evicted).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// True if nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.cache.len() == 0
    }
}

impl<V: Clone + Send + Sync + 'static> Default for RouteCache<V> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_their_lifetimes() {
        let t0 = Instant::now();
        let c: RouteCache<Vec<u64>> = RouteCache::new();
        c.found("a", vec![1, 2], t0);
        c.missing("b", t0);
        assert_eq!(
            c.get("a", t0 + Duration::from_secs(9)),
            Cached::Found(vec![1, 2])
        );
        assert_eq!(c.get("b", t0 + Duration::from_secs(1)), Cached::Missing);
        assert_eq!(c.get("b", t0 + MISSING_TTL), Cached::Unknown);
        assert_eq!(c.get("a", t0 + FOUND_TTL), Cached::Unknown);
        assert_eq!(c.get("c", t0), Cached::Unknown);
    }

    #[test]
    fn failures_invalidate_routes() {
        let t0 = Instant::now();
        let c: RouteCache<Vec<u64>> = RouteCache::new();
        c.found("b", vec![3], t0);
        c.missing("m", t0);
        assert_eq!(c.get("b", t0), Cached::Found(vec![3]));
        assert_eq!(c.get("m", t0), Cached::Missing);
        c.invalidate("b");
        assert_eq!(c.get("b", t0), Cached::Unknown);
    }

    #[test]
    fn a_dead_node_leaves_routes_and_the_rest_stays() {
        let t0 = Instant::now();
        let c: RouteCache<Vec<u64>> = RouteCache::new();
        c.found("a", vec![1, 2], t0);
        c.found("b", vec![1], t0);
        c.missing("m", t0);
        let without_1 = |route: &Vec<u64>| {
            let rest: Vec<u64> = route.iter().copied().filter(|&n| n != 1).collect();
            (!rest.is_empty()).then_some(rest)
        };
        c.rewrite(without_1);
        assert_eq!(c.get("a", t0), Cached::Found(vec![2]));
        assert_eq!(c.get("b", t0), Cached::Unknown);
        assert_eq!(c.get("m", t0), Cached::Missing);
        // The kept route expires when the original would have.
        assert_eq!(c.get("a", t0 + FOUND_TTL), Cached::Unknown);
    }

    #[test]
    fn the_cache_stays_bounded() {
        let t0 = Instant::now();
        let c: RouteCache<u32> = RouteCache::with(100, FOUND_TTL, MISSING_TTL);
        for i in 0..10_000u32 {
            c.found(&format!("n{i}"), i, t0);
        }
        assert!(c.len() <= 200, "{}", c.len());
    }
}
