//! A node holding more records than fit one frame hands them off in frames
//! its peers accept.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use specter_dht::messages::{MAX_FRAME_SIZE, Request, Response, encode};
use specter_dht::{Attachment, DhtConfig, DhtNode, Handled, Item, Peer, Record, key_of};
use specter_gossip::NodeId;

fn peer(id: u64, port: u16) -> Peer {
    Peer {
        id: NodeId(id),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

const NOW: u64 = 1_000_000;

/// `n` registrations attached to `at`.
fn records(n: usize, at: Peer) -> Vec<Item> {
    (0..n)
        .map(|i| {
            let name = format!("tunnel-number-{i:06}");
            let mut attachments = BTreeMap::new();
            attachments.insert(
                NodeId(1),
                Attachment {
                    addr: at.addr,
                    version: NOW,
                    lease_expiry: NOW + 30_000,
                    detached: false,
                },
            );
            Item {
                key: key_of(&name),
                name,
                record: Record {
                    claim: None,
                    attachments,
                },
            }
        })
        .collect()
}

/// A node alone in its ring (at `peer(1, …)`) holding `n` registrations,
/// given to it in frames a peer would accept; what it had to send is
/// dropped.
fn holding(n: usize) -> (Peer, DhtNode, Vec<Item>) {
    let me = peer(1, 7001);
    let mut node = DhtNode::new(me, DhtConfig::default(), NOW);
    node.set_members([]);
    let items = records(n, me);
    for chunk in items.chunks(1_000) {
        node.handle_request(
            NOW,
            NodeId(9),
            Request::Replicate {
                items: chunk.to_vec(),
            },
        );
    }
    while node.poll_request().is_some() {}
    (me, node, items)
}

#[test]
fn twenty_five_thousand_records_are_handed_off_in_frames_under_the_limit() {
    let (_, mut node, items) = holding(25_000);
    // Together they are well over one frame.
    assert!(
        encode(&Request::Replicate {
            items: items.clone()
        })
        .is_err()
    );
    // A second node joins: every record goes to it (two nodes hold all).
    node.set_members([peer(2, 7002)]);
    let mut handed = 0;
    let mut requests = 0;
    while let Some(out) = node.poll_request() {
        if let Request::Replicate { items } = &out.request {
            let frame = encode(&out.request).expect("every request fits a frame");
            assert!(frame.len() <= MAX_FRAME_SIZE);
            handed += items.len();
            requests += 1;
        }
    }
    assert_eq!(handed, 25_000);
    assert!(requests > 1, "{requests}");
}

#[test]
fn a_peer_that_lacks_a_whole_range_is_repaired_by_anti_entropy_in_frames_under_the_limit() {
    let (me, mut node, items) = holding(50_000);
    // A peer in the middle of the ring, back with an empty store: it owns
    // about half the keys, far more than one frame of records.
    let back = peer(u64::MAX / 2, 7002);
    node.set_members([back]);
    while node.poll_request().is_some() {}
    let range = |key: u64| key > me.id.0 && key <= back.id.0;
    let expected = items.iter().filter(|i| range(i.key)).count();
    assert!(expected > 20_000, "{expected}");
    // Its anti-entropy rounds: it lists what it holds of its range, the node
    // answers what it lacks.
    let mut held: BTreeMap<u64, u64> = BTreeMap::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 100, "no progress");
        let digests = held.iter().map(|(k, d)| (*k, *d)).collect();
        let Handled::Reply(reply) = node.handle_request(
            NOW,
            back.id,
            Request::Sync {
                digests,
                within: None,
            },
        ) else {
            panic!("a sync is answered at once")
        };
        let frame = encode(&reply).expect("the answer fits a frame");
        assert!(frame.len() <= MAX_FRAME_SIZE);
        let Response::SyncReply { items, .. } = reply else {
            panic!("{reply:?}")
        };
        if items.is_empty() {
            break;
        }
        for item in items {
            assert!(range(item.key), "a record outside its range");
            held.insert(item.key, item.record.digest());
        }
    }
    assert_eq!(held.len(), expected);
    assert!(
        node.stats().sync_answers_cut >= 2,
        "answers cut: {}",
        node.stats().sync_answers_cut
    );
    assert!(
        rounds > 2,
        "{rounds} rounds: the test did not need more than a frame"
    );
}

#[test]
fn a_node_owning_seventy_thousand_records_syncs_them_in_frames_under_the_limit() {
    let (me, mut node, items) = holding(80_000);
    // A replica that lost its copies (restarted empty). With two nodes both
    // hold every record; `me` owns the seven eighths of the ring after it.
    let replica = peer(u64::MAX / 8, 7002);
    let mut other = DhtNode::new(replica, DhtConfig::default(), NOW);
    other.set_members([me]);
    node.set_members([replica]);
    // Hand-off and anything else the join sent: the replica receives none of
    // it, as if lost.
    while node.poll_request().is_some() {}
    let owned = items.iter().filter(|i| node.view().owns(i.key)).count();
    // All their digests in one request would be over a frame.
    assert!(owned > 60_000, "{owned}");

    // One anti-entropy round of `me`, answered by the replica.
    let later = NOW + DhtConfig::default().anti_entropy_ms;
    node.handle_timeout(later);
    let mut syncs = 0;
    let mut listed = 0;
    let mut repaired = 0;
    let mut rounds = 0;
    while let Some(out) = node.poll_request() {
        rounds += 1;
        assert!(rounds < 1_000, "no end to the requests");
        let frame = encode(&out.request).expect("every request fits a frame");
        assert!(frame.len() <= MAX_FRAME_SIZE);
        if let Request::Sync { digests, .. } = &out.request {
            syncs += 1;
            listed += digests.len();
        }
        if let Request::Replicate { items } = &out.request {
            repaired += items.len();
        }
        let Handled::Reply(reply) = other.handle_request(later, me.id, out.request) else {
            panic!("answered at once");
        };
        assert!(encode(&reply).expect("the answer fits a frame").len() <= MAX_FRAME_SIZE);
        node.handle_response(later, out.id, Ok(reply));
    }
    assert_eq!(listed, owned, "every owned record is listed once");
    assert!(
        syncs > 1,
        "{syncs} Sync requests: the test needs more than one"
    );
    assert_eq!(repaired, owned, "the replica wanted every record it lacked");
    let held = items
        .iter()
        .filter(|i| node.view().owns(i.key))
        .filter(|i| other.store().get(i.key).is_some())
        .count();
    assert_eq!(held, owned, "the replica holds every record again");

    // The next round finds nothing to repair: each part's answer holds only
    // what differs within that part (nothing), not the records the other
    // parts listed.
    let cut_before = other.stats().sync_answers_cut;
    node.handle_timeout(later + DhtConfig::default().anti_entropy_ms);
    let mut parts = 0;
    while let Some(out) = node.poll_request() {
        if !matches!(out.request, Request::Sync { .. }) {
            continue;
        }
        parts += 1;
        let Handled::Reply(reply) = other.handle_request(later, me.id, out.request) else {
            panic!("answered at once");
        };
        let Response::SyncReply { items, want } = reply else {
            panic!("{reply:?}")
        };
        assert!(
            items.is_empty() && want.is_empty(),
            "{} items, {} wanted",
            items.len(),
            want.len()
        );
    }
    assert!(parts > 1, "{parts}");
    assert_eq!(other.stats().sync_answers_cut, cut_before);
}
