//! A lookup as a pure state machine (the shape of libp2p kad's
//! `ClosestPeersIter`): the caller asks [`Lookup::next_step`] whom to ask, reports
//! each answer with [`Lookup::redirected`] or [`Lookup::failed`], and stops at
//! the first authoritative answer.
//!
//! It starts at the node the local view believes owns the key. A node that
//! does not own the key redirects to the owner in *its* view (not to its
//! closest preceding finger: views come from SWIM and are usually complete, so
//! this reaches the owner in one more hop where Chord's finger walk would take
//! several; when views are partial it still converges, because every node
//! checks ownership against its own predecessor). A peer that fails or times
//! out is skipped in favour of the next node after it in the asker's view, and
//! from then on replicas may answer from their copies. Hops are bounded and
//! no node is asked twice, so a lookup always ends.

use std::collections::{BTreeSet, VecDeque};

use specter_gossip::NodeId;

use crate::ring::{Key, Peer, RingView, SUCCESSORS};

/// Default hop bound: far above the ≈ log2(N) a Chord walk needs at any
/// realistic size, low enough to stop a redirect loop between inconsistent
/// views quickly.
pub const MAX_HOPS: u32 = 16;

/// What the caller should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Send the request to `to`.
    Ask {
        /// The node to ask.
        to: Peer,
        /// Whether a replica may answer (the owner looked unreachable).
        any_replica: bool,
    },
    /// No node is left to ask.
    Exhausted,
}

/// An iterative lookup for one key.
#[derive(Clone, Debug)]
pub struct Lookup {
    key: Key,
    candidates: VecDeque<Peer>,
    visited: BTreeSet<NodeId>,
    hops: u32,
    max_hops: u32,
    any_replica: bool,
}

impl Lookup {
    /// Starts at the owner of `key` in `view`, falling back to the nodes after
    /// it. The caller handles keys this node owns itself.
    pub fn new(key: Key, view: &RingView, max_hops: u32) -> Self {
        let me = view.me().id;
        let candidates = view
            .replicas(key, SUCCESSORS + 1)
            .into_iter()
            .filter(|p| p.id != me)
            .collect();
        Lookup {
            key,
            candidates,
            visited: BTreeSet::from([me]),
            hops: 0,
            max_hops,
            any_replica: false,
        }
    }

    /// The key being looked up.
    pub fn key(&self) -> Key {
        self.key
    }

    /// Requests sent so far.
    pub fn hops(&self) -> u32 {
        self.hops
    }

    /// The next node to ask.
    pub fn next_step(&mut self) -> Next {
        if self.hops >= self.max_hops {
            return Next::Exhausted;
        }
        while let Some(peer) = self.candidates.pop_front() {
            if self.visited.insert(peer.id) {
                self.hops += 1;
                return Next::Ask {
                    to: peer,
                    any_replica: self.any_replica,
                };
            }
        }
        Next::Exhausted
    }

    /// The node asked last pointed at `to`.
    pub fn redirected(&mut self, to: Peer) {
        if !self.visited.contains(&to.id) {
            self.candidates.push_front(to);
        }
    }

    /// The node asked last did not answer; replicas may answer from now on.
    pub fn failed(&mut self) {
        self.any_replica = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::ring::test_peer as peer;

    proptest! {
        /// Whatever the views say (random redirects, random failures), a lookup
        /// ends within the hop bound and never asks a node twice.
        #[test]
        fn lookup_terminates_on_any_view(
            ids in proptest::collection::btree_set(any::<u64>(), 2..50),
            key: u64,
            script in proptest::collection::vec((any::<usize>(), any::<bool>()), 0..100),
        ) {
            let ids: Vec<u64> = ids.into_iter().collect();
            let mut v = RingView::new(peer(ids[0]));
            v.rebuild(ids.iter().map(|&i| peer(i)));
            let mut l = Lookup::new(key, &v, MAX_HOPS);
            let mut asked = BTreeSet::new();
            let mut steps = 0;
            let mut script = script.into_iter();
            while let Next::Ask { to, .. } = l.next_step() {
                prop_assert!(asked.insert(to.id), "asked twice");
                steps += 1;
                match script.next() {
                    Some((r, false)) => l.redirected(peer(ids[r % ids.len()])),
                    Some((_, true)) => l.failed(),
                    None => break,
                }
            }
            prop_assert!(steps <= MAX_HOPS as usize);
            prop_assert_eq!(l.hops() as usize, steps);
        }
    }

    #[test]
    fn the_first_ask_goes_to_the_owner_and_failures_fall_back_to_replicas() {
        let mut v = RingView::new(peer(10));
        v.rebuild([10, 20, 30, 40, 50].map(peer));
        let mut l = Lookup::new(25, &v, MAX_HOPS);
        assert_eq!(
            l.next_step(),
            Next::Ask {
                to: peer(30),
                any_replica: false
            }
        );
        l.failed();
        assert_eq!(
            l.next_step(),
            Next::Ask {
                to: peer(40),
                any_replica: true
            }
        );
    }
}
