//! A node holding more records than fit one frame hands them off in frames
//! its peers accept.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use specter_dht::messages::{MAX_FRAME_SIZE, Request, encode};
use specter_dht::{Attachment, DhtConfig, DhtNode, Item, Peer, Record, key_of};
use specter_gossip::NodeId;

fn peer(id: u64, port: u16) -> Peer {
    Peer {
        id: NodeId(id),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

#[test]
fn twenty_five_thousand_records_are_handed_off_in_frames_under_the_limit() {
    const NOW: u64 = 1_000_000;
    let me = peer(1, 7001);
    let mut node = DhtNode::new(me, DhtConfig::default(), NOW);
    node.set_members([]);
    let items: Vec<Item> = (0..25_000)
        .map(|i| {
            let name = format!("tunnel-number-{i:06}");
            let mut attachments = BTreeMap::new();
            attachments.insert(
                NodeId(1),
                Attachment {
                    addr: me.addr,
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
        .collect();
    // Together they are well over one frame.
    assert!(
        encode(&Request::Replicate {
            items: items.clone()
        })
        .is_err()
    );
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
