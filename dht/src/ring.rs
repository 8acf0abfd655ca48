//! Ring arithmetic on the 2^64 identifier circle and a node's view of the
//! ring, derived from the live membership.
//!
//! The view is rebuilt from SWIM's live set on every membership change, so it
//! usually holds every live node: the owner of a key is then known locally and
//! a lookup takes one hop, redirected to the owner in the asked node's view
//! when views disagree (see `lookup.rs`). The successor list gives each key's
//! replica set and a lookup's fallbacks; the fingers are Chord's, computed from
//! the same set and shown in `/status`, not used for routing.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use specter_gossip::NodeId;

/// A position on the ring: a tunnel name's hash, or a node's id.
pub type Key = u64;

/// Number of fingers: one per bit of the identifier space.
pub const FINGERS: usize = 64;

/// Default successor-list length `r`: a node survives `r - 1` consecutive
/// failures among its successors.
pub const SUCCESSORS: usize = 4;

/// The ring key of a tunnel name: the first 8 bytes (big-endian) of its SHA-256.
pub fn key_of(name: &str) -> Key {
    let digest = Sha256::digest(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// `x ∈ (a, b]` going clockwise. When `a == b` the interval is the whole ring.
pub fn in_open_closed(x: Key, a: Key, b: Key) -> bool {
    if a == b {
        return true;
    }
    x.wrapping_sub(a).wrapping_sub(1) < b.wrapping_sub(a)
}

/// `x ∈ (a, b)` going clockwise. When `a == b` it is the ring without `a`.
pub fn in_open(x: Key, a: Key, b: Key) -> bool {
    if a == b {
        return x != a;
    }
    x != b && in_open_closed(x, a, b)
}

/// Clockwise distance from `a` to `b`.
pub fn distance(a: Key, b: Key) -> u64 {
    b.wrapping_sub(a)
}

/// A node as the ring knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Peer {
    /// Its id (ring position).
    pub id: NodeId,
    /// Where to reach it.
    pub addr: SocketAddr,
}

/// Where a request for a key should be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// This node owns the key: `key ∈ (predecessor, self]`.
    Local,
    /// Another node owns it as far as this view knows.
    Remote(Peer),
}

/// One node's view of the ring.
#[derive(Clone, Debug)]
pub struct RingView {
    me: Peer,
    /// Every known live node including this one, sorted by id.
    members: Vec<Peer>,
    index: usize,
}

impl RingView {
    /// A ring holding only this node.
    pub fn new(me: Peer) -> Self {
        RingView {
            me,
            members: vec![me],
            index: 0,
        }
    }

    /// Rebuilds the view from the live members (this node is added if missing;
    /// duplicates are ignored).
    pub fn rebuild(&mut self, live: impl IntoIterator<Item = Peer>) {
        let mut members: Vec<Peer> = live.into_iter().filter(|p| p.id != self.me.id).collect();
        members.push(self.me);
        members.sort_by_key(|p| p.id);
        members.dedup_by_key(|p| p.id);
        self.index = members
            .iter()
            .position(|p| p.id == self.me.id)
            .expect("self is a member");
        self.members = members;
    }

    /// This node.
    pub fn me(&self) -> Peer {
        self.me
    }

    /// Number of nodes in the view, this one included.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True if the view holds only this node.
    pub fn is_alone(&self) -> bool {
        self.members.len() == 1
    }

    /// Always false: a view holds at least this node.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Every node in the view, sorted by id.
    pub fn members(&self) -> &[Peer] {
        &self.members
    }

    /// Whether `id` is in the view.
    pub fn contains(&self, id: NodeId) -> bool {
        self.members.binary_search_by_key(&id, |p| p.id).is_ok()
    }

    fn at(&self, i: usize) -> Peer {
        self.members[i % self.members.len()]
    }

    /// The node just before this one (itself when alone).
    pub fn predecessor(&self) -> Peer {
        self.at(self.index + self.members.len() - 1)
    }

    /// Up to `r` distinct nodes after this one, nearest first.
    pub fn successors(&self, r: usize) -> Vec<Peer> {
        (1..self.members.len())
            .take(r)
            .map(|k| self.at(self.index + k))
            .collect()
    }

    /// Index of the first member whose id is `>= key` (wrapping).
    fn successor_index(&self, key: Key) -> usize {
        match self.members.binary_search_by_key(&key, |p| p.id.0) {
            Ok(i) => i,
            Err(i) => i % self.members.len(),
        }
    }

    /// The node that owns `key` in this view: the first node at or after it.
    pub fn owner(&self, key: Key) -> Peer {
        self.at(self.successor_index(key))
    }

    /// Whether this node owns `key`: `key ∈ (predecessor, self]`.
    pub fn owns(&self, key: Key) -> bool {
        in_open_closed(key, self.predecessor().id.0, self.me.id.0)
    }

    /// Where a request for `key` goes from here.
    pub fn route(&self, key: Key) -> Route {
        if self.owns(key) {
            Route::Local
        } else {
            Route::Remote(self.owner(key))
        }
    }

    /// The nodes that should hold `key`: its owner and the next `n - 1`
    /// distinct nodes. With fewer than `n` nodes, all of them.
    pub fn replicas(&self, key: Key, n: usize) -> Vec<Peer> {
        let start = self.successor_index(key);
        (0..n.min(self.members.len()))
            .map(|k| self.at(start + k))
            .collect()
    }

    /// Finger `i`: the first node at or after `self + 2^i`.
    pub fn finger(&self, i: usize) -> Peer {
        self.owner(self.me.id.0.wrapping_add(1u64 << i))
    }

    /// All 64 fingers.
    pub fn fingers(&self) -> Vec<Peer> {
        (0..FINGERS).map(|i| self.finger(i)).collect()
    }
}

/// A peer with id `id` at a dummy address, for tests.
#[cfg(test)]
pub(crate) fn test_peer(id: u64) -> Peer {
    Peer {
        id: NodeId(id),
        addr: "127.0.0.1:1".parse().unwrap(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use super::test_peer as peer;

    /// Brute force: the first id at or after `key` going clockwise.
    fn brute_owner(ids: &[u64], key: u64) -> u64 {
        *ids.iter().min_by_key(|&&id| distance(key, id)).unwrap()
    }

    #[test]
    fn intervals_wrap_around_zero() {
        assert!(in_open_closed(5, u64::MAX - 3, 10));
        assert!(in_open_closed(10, u64::MAX - 3, 10));
        assert!(!in_open_closed(u64::MAX - 3, u64::MAX - 3, 10));
        assert!(in_open_closed(0, u64::MAX, 0));
        assert!(in_open_closed(123, 7, 7), "(a, a] is the whole ring");
        assert!(!in_open(7, 7, 7));
        assert!(in_open(8, 7, 7));
        assert!(!in_open(10, 5, 10));
    }

    #[test]
    fn a_lone_node_owns_everything() {
        let v = RingView::new(peer(42));
        assert!(v.owns(0) && v.owns(42) && v.owns(u64::MAX));
        assert_eq!(v.route(7), Route::Local);
        assert!(v.successors(4).is_empty());
        assert_eq!(v.replicas(9, 3), vec![peer(42)]);
    }

    proptest! {
        #[test]
        fn interval_membership_matches_distances(x: u64, a: u64, b: u64) {
            prop_assume!(a != b);
            let expected = distance(a, x) != 0 && distance(a, x) <= distance(a, b);
            prop_assert_eq!(in_open_closed(x, a, b), expected);
            prop_assert_eq!(in_open(x, a, b), expected && x != b);
        }

        #[test]
        fn owner_successors_fingers_match_brute_force(
            ids in proptest::collection::btree_set(any::<u64>(), 1..60),
            me_pick: prop::sample::Index,
            key: u64,
        ) {
            let ids: Vec<u64> = ids.into_iter().collect();
            let me = ids[me_pick.index(ids.len())];
            let mut v = RingView::new(peer(me));
            v.rebuild(ids.iter().map(|&i| peer(i)));
            prop_assert_eq!(v.owner(key).id.0, brute_owner(&ids, key));
            // Exactly one node owns each key, and it is the brute-force owner.
            let owners: Vec<u64> = ids.iter().copied().filter(|&i| {
                let mut w = RingView::new(peer(i));
                w.rebuild(ids.iter().map(|&j| peer(j)));
                w.owns(key)
            }).collect();
            prop_assert_eq!(owners, vec![brute_owner(&ids, key)]);
            // Successors: the next distinct ids clockwise.
            let mut clockwise: Vec<u64> = ids.iter().copied().filter(|&i| i != me).collect();
            clockwise.sort_by_key(|&i| distance(me, i));
            let succ: Vec<u64> = v.successors(SUCCESSORS).iter().map(|p| p.id.0).collect();
            prop_assert_eq!(&succ[..], &clockwise[..clockwise.len().min(SUCCESSORS)]);
            // Predecessor: the nearest counter-clockwise.
            let pred = clockwise.last().copied().unwrap_or(me);
            prop_assert_eq!(v.predecessor().id.0, pred);
            // Fingers: owner of me + 2^i.
            for i in 0..FINGERS {
                prop_assert_eq!(v.finger(i).id.0, brute_owner(&ids, me.wrapping_add(1 << i)));
            }
            // Replicas: distinct, starting at the owner.
            let reps = v.replicas(key, 3);
            prop_assert_eq!(reps.len(), ids.len().min(3));
            prop_assert_eq!(reps[0].id.0, brute_owner(&ids, key));
        }
    }
}
