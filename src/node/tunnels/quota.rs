//! What one client key may register at a node: how many names at once, how
//! many new names a minute, and how long a claim outlives its client. Pure:
//! the caller passes the time, so the rules are tested without a clock.
//!
//! Quotas are counted per node (where the hello arrives): a client attaches
//! the same names to each of its nodes, so each node sees the whole set, and
//! a key spreading registrations over many nodes still meets each node's
//! limit there. Keys are free in `open` mode, so these bound a client that
//! misbehaves, not a flood of keys; `token` mode bounds who registers.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use specter_dht::ClientId;

/// Names one key may hold attached at a node at once.
pub const NAMES_PER_KEY: usize = 64;
/// New names one key may register at a node per minute (names it attached
/// there within the minute do not count again: reconnecting is free).
pub const CLAIMS_PER_MINUTE: usize = 32;
/// How long a name stays claimed after its client left, when it was attached
/// for less than [`CLAIM_EARNED_AFTER`]: a name held for a moment is free
/// again within the hour, not after a week.
pub const CLAIM_FRESH: Duration = Duration::from_secs(3_600);
/// Attached this long, a name is kept [`CLAIM_KEEP`] after its client left.
pub const CLAIM_EARNED_AFTER: Duration = Duration::from_secs(600);
/// How long the claim of a name in real use outlives its last attachment, so
/// a client that crashes and returns gets its name back.
pub const CLAIM_KEEP: Duration = Duration::from_secs(7 * 24 * 3_600);
/// Keys whose recent registrations are remembered; past this, the key idle
/// longest is forgotten (its minute starts over).
pub const TRACKED_KEYS: usize = 4_096;

const WINDOW: Duration = Duration::from_secs(60);

/// The quota settings (`[clients]` in `node.toml`; seconds for durations).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientLimits {
    /// See [`NAMES_PER_KEY`].
    pub names_per_key: usize,
    /// See [`CLAIMS_PER_MINUTE`].
    pub claims_per_minute: usize,
    /// See [`CLAIM_FRESH`].
    #[serde(with = "crate::ingress::limits::secs")]
    pub claim_fresh: Duration,
    /// See [`CLAIM_EARNED_AFTER`].
    #[serde(with = "crate::ingress::limits::secs")]
    pub claim_earned_after: Duration,
    /// See [`CLAIM_KEEP`].
    #[serde(with = "crate::ingress::limits::secs")]
    pub claim_keep: Duration,
    /// See [`super::slots::FORWARDS_PER_TUNNEL`].
    pub forwards_per_tunnel: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            names_per_key: NAMES_PER_KEY,
            claims_per_minute: CLAIMS_PER_MINUTE,
            claim_fresh: CLAIM_FRESH,
            claim_earned_after: CLAIM_EARNED_AFTER,
            claim_keep: CLAIM_KEEP,
            forwards_per_tunnel: super::slots::FORWARDS_PER_TUNNEL,
        }
    }
}

impl ClientLimits {
    /// How long a claim renewed now outlives its client, for a session
    /// attached for `attached_for`.
    pub fn claim_for(&self, attached_for: Duration) -> Duration {
        if attached_for >= self.claim_earned_after {
            self.claim_keep
        } else {
            self.claim_fresh
        }
    }
}

/// Why a hello was refused by a quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    /// The key would hold more names here than `names_per_key`.
    Names(usize),
    /// The key registered `claims_per_minute` new names here this minute.
    Rate(usize),
}

/// Recent registrations by key, and refusals counted.
#[derive(Debug, Default)]
pub struct Quotas {
    recent: Mutex<HashMap<ClientId, VecDeque<(Instant, String)>>>,
    /// Hellos refused by `names_per_key`.
    pub refused_names: AtomicU64,
    /// Hellos refused by `claims_per_minute`.
    pub refused_rate: AtomicU64,
}

impl Quotas {
    /// Admits a hello of `client` for `names` at `now`, given the names it
    /// holds attached here already (`held`), and records them; or says
    /// which quota it would exceed.
    pub fn admit(
        &self,
        limits: &ClientLimits,
        client: ClientId,
        names: &[String],
        held: &[String],
        now: Instant,
    ) -> Result<(), Exceeded> {
        let mut all: Vec<&String> = held.iter().chain(names).collect();
        all.sort();
        all.dedup();
        if all.len() > limits.names_per_key {
            self.refused_names.fetch_add(1, Ordering::Relaxed);
            return Err(Exceeded::Names(limits.names_per_key));
        }
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !recent.contains_key(&client) && recent.len() >= TRACKED_KEYS {
            recent.retain(|_, seen| {
                seen.back()
                    .is_some_and(|(at, _)| now.duration_since(*at) < WINDOW)
            });
            if recent.len() >= TRACKED_KEYS
                && let Some(idle) = recent
                    .iter()
                    .min_by_key(|(_, seen)| seen.back().map(|(at, _)| *at))
                    .map(|(k, _)| *k)
            {
                recent.remove(&idle);
            }
        }
        let seen = recent.entry(client).or_default();
        while seen
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= WINDOW)
        {
            seen.pop_front();
        }
        let new: Vec<&String> = names
            .iter()
            .filter(|n| !held.contains(n) && !seen.iter().any(|(_, s)| s == *n))
            .collect();
        if seen.len() + new.len() > limits.claims_per_minute {
            self.refused_rate.fetch_add(1, Ordering::Relaxed);
            return Err(Exceeded::Rate(limits.claims_per_minute));
        }
        seen.extend(new.into_iter().map(|n| (now, n.clone())));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(n: u64) -> ClientId {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&n.to_be_bytes());
        ClientId(id)
    }

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}-{i}")).collect()
    }

    #[test]
    fn a_key_registers_its_quota_of_new_names_a_minute_and_reconnects_freely() {
        let limits = ClientLimits {
            claims_per_minute: 20,
            ..Default::default()
        };
        let q = Quotas::default();
        let (key, t0) = (client(7), Instant::now());
        assert_eq!(q.admit(&limits, key, &names("a", 16), &[], t0), Ok(()));
        // The same names again (a reconnect): free.
        assert_eq!(q.admit(&limits, key, &names("a", 16), &[], t0), Ok(()));
        // Five new ones would make 21 this minute.
        assert_eq!(
            q.admit(&limits, key, &names("b", 5), &[], t0),
            Err(Exceeded::Rate(20))
        );
        assert_eq!(q.admit(&limits, key, &names("b", 4), &[], t0), Ok(()));
        // Another key has its own minute; the first one's starts over.
        assert_eq!(
            q.admit(&limits, client(8), &names("c", 16), &[], t0),
            Ok(())
        );
        let later = t0 + Duration::from_secs(61);
        assert_eq!(q.admit(&limits, key, &names("d", 16), &[], later), Ok(()));
        assert_eq!(q.refused_rate.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn names_held_at_once_are_bounded_per_key() {
        let limits = ClientLimits {
            names_per_key: 20,
            ..Default::default()
        };
        let q = Quotas::default();
        let (key, now) = (client(1), Instant::now());
        let held = names("a", 16);
        assert_eq!(
            q.admit(&limits, key, &names("b", 5), &held, now),
            Err(Exceeded::Names(20))
        );
        // Names it already holds do not count twice.
        assert_eq!(q.admit(&limits, key, &names("a", 4), &held, now), Ok(()));
        assert_eq!(q.refused_names.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn tracked_keys_are_bounded() {
        let limits = ClientLimits::default();
        let q = Quotas::default();
        let now = Instant::now();
        for k in 0..(TRACKED_KEYS as u64 + 10) {
            q.admit(&limits, client(k), &names("n", 1), &[], now)
                .unwrap();
        }
        assert!(q.recent.lock().unwrap().len() <= TRACKED_KEYS);
    }

    #[test]
    fn claims_are_kept_long_only_for_names_in_real_use() {
        let l = ClientLimits::default();
        assert_eq!(l.claim_for(Duration::ZERO), CLAIM_FRESH);
        assert_eq!(l.claim_for(Duration::from_secs(599)), CLAIM_FRESH);
        assert_eq!(l.claim_for(CLAIM_EARNED_AFTER), CLAIM_KEEP);
    }
}
