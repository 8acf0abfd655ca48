//! Registration records and their merge.
//!
//! A record is the claim on a tunnel name plus the set of nodes the name's
//! client is attached to. Replicas accept writes independently (during ring
//! changes two nodes may both think they own a key), so records merge like a
//! CRDT: the merge is commutative, associative and idempotent, and every
//! replica that has seen the same writes holds the same record.
//!
//! - **Claim.** `version` counts the claims on the name: a new owner may only
//!   claim once the previous claim expired, and does so with `version + 1`.
//!   The highest version wins; two claims with the same version (made
//!   concurrently on both sides of a partition, the only way they arise) resolve
//!   to the smaller owner id on every replica. Renewals by the winner extend
//!   `expires_at` (max); `claimed_at` keeps the earliest.
//! - **Attachments.** One entry per node, last-writer-wins by `version` (the
//!   attaching node's own counter). Detaching writes a tombstone with a higher
//!   version. Entries are pruned once their lease has expired, tombstones
//!   included; a stale copy of a pruned entry carries an expired lease too, so
//!   it is pruned again wherever it reappears.
//!
//! Times are Unix milliseconds (node clocks are assumed NTP-synchronised to
//! well within the lease length).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use specter_gossip::NodeId;

/// A client's identity: the SHA-256 of its public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientId(pub [u8; 32]);

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Who holds a name, since when, until when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The owning client.
    pub owner: ClientId,
    /// How many claims the name has had (see the module docs).
    pub version: u64,
    /// When this claim was made (Unix ms).
    pub claimed_at: u64,
    /// When it lapses unless renewed (Unix ms).
    pub expires_at: u64,
}

impl Claim {
    /// Whether the claim still holds at `now`.
    pub fn is_live(&self, now: u64) -> bool {
        now < self.expires_at
    }

    /// Winner order: higher version, then the smaller owner id. Only fields
    /// that merging never changes take part, which keeps the merge
    /// associative (ranking by `claimed_at` too is not: a losing owner's
    /// entry can be dropped before a copy with an earlier `claimed_at` makes
    /// it the winner).
    fn rank(&self) -> (std::cmp::Reverse<u64>, ClientId) {
        (std::cmp::Reverse(self.version), self.owner)
    }

    /// The claim every replica keeps when it has seen both.
    pub fn merge(a: Claim, b: Claim) -> Claim {
        if a.version == b.version && a.owner == b.owner {
            return Claim {
                claimed_at: a.claimed_at.min(b.claimed_at),
                expires_at: a.expires_at.max(b.expires_at),
                ..a
            };
        }
        if a.rank() <= b.rank() { a } else { b }
    }
}

/// One node that holds a connection from the name's client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Where to reach that node.
    pub addr: SocketAddr,
    /// The node's own counter for this entry; higher wins.
    pub version: u64,
    /// When the lease lapses unless renewed (Unix ms).
    pub lease_expiry: u64,
    /// A tombstone: the client detached (or the node died).
    pub detached: bool,
}

impl Attachment {
    fn merge(a: Attachment, b: Attachment) -> Attachment {
        // Equal versions only arise from the same write; break the tie on the
        // remaining fields anyway so the merge stays commutative.
        let key = |x: &Attachment| (x.version, x.detached, x.lease_expiry, x.addr);
        if key(&a) >= key(&b) { a } else { b }
    }

    /// Whether this entry is a live attachment at `now`.
    pub fn is_live(&self, now: u64) -> bool {
        !self.detached && now < self.lease_expiry
    }
}

/// Everything the DHT stores under one tunnel name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The claim, once someone registered the name.
    pub claim: Option<Claim>,
    /// Attachments by node.
    pub attachments: BTreeMap<NodeId, Attachment>,
}

impl Record {
    /// Folds `other` into `self`; returns whether `self` changed.
    pub fn merge(&mut self, other: &Record) -> bool {
        let before = self.clone();
        self.claim = match (self.claim, other.claim) {
            (Some(a), Some(b)) => Some(Claim::merge(a, b)),
            (a, b) => a.or(b),
        };
        for (node, theirs) in &other.attachments {
            self.attachments
                .entry(*node)
                .and_modify(|ours| *ours = Attachment::merge(*ours, *theirs))
                .or_insert(*theirs);
        }
        *self != before
    }

    /// The attachments live at `now`.
    pub fn live_attachments(&self, now: u64) -> impl Iterator<Item = (NodeId, &Attachment)> {
        self.attachments
            .iter()
            .filter(move |(_, a)| a.is_live(now))
            .map(|(n, a)| (*n, a))
    }

    /// The live claim at `now`, if any.
    pub fn live_claim(&self, now: u64) -> Option<Claim> {
        self.claim.filter(|c| c.is_live(now))
    }

    /// Drops entries whose lease has lapsed (tombstones included) and a claim
    /// that expired with no live attachment left. Returns whether the record
    /// is now empty and can be forgotten.
    pub fn prune(&mut self, now: u64) -> bool {
        self.attachments.retain(|_, a| now < a.lease_expiry);
        if self.claim.is_some_and(|c| !c.is_live(now)) && self.attachments.is_empty() {
            self.claim = None;
        }
        self.claim.is_none() && self.attachments.is_empty()
    }

    /// A stable 64-bit digest of the record, for anti-entropy comparisons.
    pub fn digest(&self) -> u64 {
        use sha2::{Digest, Sha256};
        // MessagePack of plain data cannot fail.
        let bytes = rmp_serde::to_vec(self).expect("record encodes");
        let d = Sha256::digest(bytes);
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        u64::from_be_bytes(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn client(n: u8) -> ClientId {
        ClientId([n; 32])
    }

    fn arb_claim() -> impl Strategy<Value = Claim> {
        (0u8..3, 0u64..3, 0u64..5, 0u64..5).prop_map(|(o, v, at, exp)| Claim {
            owner: client(o),
            version: v,
            claimed_at: at,
            expires_at: at + exp,
        })
    }

    fn arb_attachment() -> impl Strategy<Value = Attachment> {
        (0u64..4, 0u64..4, any::<bool>(), 1u16..3).prop_map(|(v, l, d, port)| Attachment {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            version: v,
            lease_expiry: l,
            detached: d,
        })
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            proptest::option::of(arb_claim()),
            proptest::collection::btree_map((0u64..4).prop_map(NodeId), arb_attachment(), 0..4),
        )
            .prop_map(|(claim, attachments)| Record { claim, attachments })
    }

    fn merged(a: &Record, b: &Record) -> Record {
        let mut m = a.clone();
        m.merge(b);
        m
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in arb_record(), b in arb_record()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        }

        #[test]
        fn merge_is_associative(a in arb_record(), b in arb_record(), c in arb_record()) {
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        }

        #[test]
        fn merge_is_idempotent(a in arb_record(), b in arb_record()) {
            let ab = merged(&a, &b);
            prop_assert_eq!(merged(&ab, &b), ab.clone());
            prop_assert_eq!(merged(&a, &a), a);
        }

        #[test]
        fn every_order_of_delivery_converges(records in proptest::collection::vec(arb_record(), 1..6)) {
            let forward = records.iter().fold(Record::default(), |acc, r| merged(&acc, r));
            let backward = records.iter().rev().fold(Record::default(), |acc, r| merged(&acc, r));
            prop_assert_eq!(forward.digest(), backward.digest());
        }
    }

    #[test]
    fn a_higher_claim_version_wins_and_concurrent_claims_pick_the_smaller_owner() {
        let old = Claim {
            owner: client(1),
            version: 1,
            claimed_at: 10,
            expires_at: 20,
        };
        let next = Claim {
            owner: client(2),
            version: 2,
            claimed_at: 30,
            expires_at: 40,
        };
        assert_eq!(Claim::merge(old, next), next);
        let rival = Claim {
            owner: client(1),
            version: 2,
            claimed_at: 25,
            expires_at: 35,
        };
        assert_eq!(Claim::merge(next, rival), rival);
        assert_eq!(Claim::merge(rival, next), rival);
        let renewal = Claim {
            expires_at: 99,
            claimed_at: 26,
            ..rival
        };
        assert_eq!(Claim::merge(rival, renewal).expires_at, 99);
        assert_eq!(Claim::merge(rival, renewal).claimed_at, 25);
    }

    #[test]
    fn pruning_drops_lapsed_leases_and_orphaned_expired_claims() {
        let mut r = Record {
            claim: Some(Claim {
                owner: client(1),
                version: 1,
                claimed_at: 0,
                expires_at: 100,
            }),
            ..Default::default()
        };
        let a = Attachment {
            addr: "127.0.0.1:1".parse().unwrap(),
            version: 1,
            lease_expiry: 50,
            detached: false,
        };
        r.attachments.insert(NodeId(1), a);
        assert!(!r.prune(10));
        assert_eq!(r.live_attachments(10).count(), 1);
        assert!(!r.prune(60));
        assert_eq!(r.attachments.len(), 0);
        assert!(
            r.claim.is_some(),
            "claim outlives its attachments until it expires"
        );
        assert!(r.prune(100));
    }
}
