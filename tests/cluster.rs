//! Real QUIC on loopback, in one process: nodes join, converge, detect a
//! crash, see a graceful leave, and refuse foreign certificates and spoofed
//! gossip.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::wait_until;
use specter::net::Transport;
use specter::net::bind_endpoint;
use specter::net::tls::NodeTls;
use specter::node::Node;
use specter::pki::{CaPem, make_ca, make_node_cert};
use specter_gossip::{GossipConfig, MemberState, Membership, NodeIdentity};

/// Crash detection bound from the gossip config, allowing 20 ms one-way
/// delivery on a loaded 2-core machine running every node of the test.
fn detection_bound() -> Duration {
    GossipConfig::default().detection_bound(Duration::from_millis(20))
}

fn tls_for(ca: &CaPem, i: usize) -> NodeTls {
    let pem = make_node_cert(ca, &format!("n{i}.test.invalid"), &[]).unwrap();
    NodeTls::from_pem(&ca.cert, &pem.cert, &pem.key).unwrap()
}

fn start(ca: &CaPem, i: usize, seed: Option<std::net::SocketAddr>) -> Node {
    specter::demo::start_loopback_node(ca, &format!("n{i}.test.invalid"), seed, i as u64).unwrap()
}

fn alive_ids(node: &Node) -> BTreeSet<String> {
    node.status()
        .members
        .into_iter()
        .filter(|m| m.state != MemberState::Down)
        .map(|m| m.id)
        .collect()
}

fn sees_down(node: &Node, id: &str) -> bool {
    node.status()
        .members
        .iter()
        .find(|m| m.id == id)
        .is_none_or(|m| m.state == MemberState::Down)
}

fn converged(nodes: &[Node]) -> bool {
    nodes.iter().all(|n| {
        let expected: BTreeSet<String> = nodes
            .iter()
            .filter(|o| o.id() != n.id())
            .map(|o| o.id().to_string())
            .collect();
        alive_ids(n) == expected
    })
}

async fn cluster(ca: &CaPem, n: usize) -> Vec<Node> {
    let seed = start(ca, 0, None);
    let seed_addr = seed.status().addr;
    let mut nodes = vec![seed];
    for i in 1..n {
        nodes.push(start(ca, i, Some(seed_addr)));
    }
    let took = wait_until(Duration::from_secs(20), || converged(&nodes)).await;
    assert!(took.is_some(), "{n} nodes did not converge in 20 s");
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_converge_and_see_a_crash_and_a_leave() {
    let ca = make_ca("test").unwrap();
    let mut nodes = cluster(&ca, 10).await;
    let bound = detection_bound();

    // Crash: the endpoint goes away without a word.
    let crashed = nodes.remove(4);
    let crashed_id = crashed.id().to_string();
    let started = std::time::Instant::now();
    crashed.crash().await;
    let crash_took = wait_until(bound, || nodes.iter().all(|n| sees_down(n, &crashed_id)))
        .await
        .map(|_| started.elapsed());
    assert!(
        crash_took.is_some(),
        "not every node saw the crash within {bound:?}"
    );

    // Graceful leave: seen sooner than a crash.
    let leaver = nodes.remove(7);
    let leaver_id = leaver.id().to_string();
    let started = std::time::Instant::now();
    let leaving = tokio::spawn(leaver.shutdown());
    let leave_took = wait_until(bound, || nodes.iter().all(|n| sees_down(n, &leaver_id)))
        .await
        .map(|_| started.elapsed());
    leaving.await.unwrap();
    println!("crash seen by all in {crash_took:?}, leave in {leave_took:?}");
    let (crash_took, leave_took) = (crash_took.unwrap(), leave_took.expect("leave not seen"));
    assert!(
        leave_took < crash_took,
        "leave took {leave_took:?}, crash {crash_took:?}"
    );
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_from_another_ca_cannot_join() {
    let ca = make_ca("ours").unwrap();
    let nodes = cluster(&ca, 3).await;
    let seed_addr = nodes[0].status().addr;

    let foreign_ca = make_ca("theirs").unwrap();
    let stranger = start(&foreign_ca, 9, Some(seed_addr));
    let stranger_id = stranger.id().to_string();
    // The seed refuses its handshake (it retries with backoff).
    let refused = wait_until(Duration::from_secs(10), || {
        nodes[0].status().transport.handshakes_failed > 0
    })
    .await;
    assert!(refused.is_some(), "the seed never refused the stranger");
    // Give gossip time to spread anything the stranger might have said.
    tokio::time::sleep(GossipConfig::default().probe_period * 4).await;
    for n in &nodes {
        assert!(
            n.status().members.iter().all(|m| m.id != stranger_id),
            "the stranger was gossiped"
        );
    }
    assert!(!stranger.status().joined);
    stranger.crash().await;

    // A stranger that trusts our CA too (so its side of the handshake
    // succeeds) is refused by the seed's check right after the handshake.
    let before = nodes[0].status().transport.handshakes_failed;
    let pem = make_node_cert(&foreign_ca, "sly.test.invalid", &[]).unwrap();
    let both = format!("{}{}", ca.cert, foreign_ca.cert);
    let sly_tls = NodeTls::from_pem(&both, &pem.cert, &pem.key).unwrap();
    let (sly, _inboxes) = Transport::new(
        bind_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(),
        &sly_tls,
    )
    .unwrap();
    let (_, conn) = sly
        .connect(seed_addr, None)
        .await
        .expect("TLS itself succeeds");
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap();
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == specter::wire::CLOSE_NOT_MEMBER),
        "{reason:?}"
    );
    assert!(nodes[0].status().transport.handshakes_failed > before);
    for n in &nodes {
        assert!(
            n.status()
                .members
                .iter()
                .all(|m| m.id != sly_tls.id.to_string())
        );
    }
    sly.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_claiming_another_nodes_identity_is_dropped() {
    let ca = make_ca("test").unwrap();
    let nodes = cluster(&ca, 3).await;
    let target = nodes[0].status();
    let target_identity = NodeIdentity {
        id: nodes[0].id(),
        addr: target.addr,
        generation: 0,
    };

    // A valid member of the CA, but it speaks for node 1 (whose key it lacks).
    let liar_tls = tls_for(&ca, 7);
    let (liar, _inboxes) = Transport::new(
        bind_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(),
        &liar_tls,
    )
    .unwrap();
    let victim = NodeIdentity {
        id: nodes[1].id(),
        addr: liar.local_addr().unwrap(),
        generation: u64::MAX / 2,
    };
    let mut forged = Membership::new(
        victim,
        &GossipConfig::default(),
        rand::SeedableRng::seed_from_u64(1),
    )
    .unwrap();
    forged.announce(std::time::Instant::now(), target_identity);
    let packet = forged.poll_transmit().unwrap();
    let (_, _) = liar
        .connect(target.addr, Some(nodes[0].id()))
        .await
        .unwrap();
    for _ in 0..5 {
        liar.send_datagram(nodes[0].id(), target.addr, Bytes::clone(&packet.data));
    }
    let dropped = wait_until(Duration::from_secs(5), || {
        nodes[0].status().gossip.spoofed_dropped >= 1
    })
    .await;
    assert!(
        dropped.is_some(),
        "spoofed datagram was not counted as dropped"
    );
    // Node 1 keeps its real identity; nothing of the forgery stuck.
    let seen = nodes[0].status();
    let entry = seen
        .members
        .iter()
        .find(|m| m.id == nodes[1].id().to_string())
        .unwrap();
    assert_ne!(entry.generation, u64::MAX / 2);
    assert_eq!(entry.state, MemberState::Alive);
    liar.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}

/// Callers that need a connection to the same peer at once (gossip, a DHT
/// request and visitors after a restart, by id; the seed, by address) share
/// one dial: each extra one would end as a duplicate connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_dials_to_one_peer_share_one_handshake() {
    let ca = make_ca("test").unwrap();
    let (ta, tb) = (tls_for(&ca, 1), tls_for(&ca, 2));
    let bind = || bind_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let (a, _inbox_a) = Transport::new(bind(), &ta).unwrap();
    let (b, _inbox_b) = Transport::new(bind(), &tb).unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(a.clone().serve(cancel.clone()));
    tokio::spawn(b.clone().serve(cancel.clone()));
    let b_addr = b.local_addr().unwrap();
    let dials = (0..8).map(|i| {
        let a = a.clone();
        let expected = (i % 2 == 0).then_some(tb.id);
        tokio::spawn(async move { a.connect(b_addr, expected).await })
    });
    let mut ids = BTreeSet::new();
    for dial in dials.collect::<Vec<_>>() {
        let (peer, conn) = dial.await.unwrap().unwrap();
        assert_eq!(peer, tb.id);
        ids.insert(conn.stable_id());
    }
    assert_eq!(ids.len(), 1, "one connection for all eight callers");
    assert_eq!(a.counters().duplicates_closed, 0);
    assert_eq!(b.counters().duplicates_closed, 0);
    cancel.cancel();
}

/// Sends `msg` one way on a stream and reads it at the other end.
async fn carry(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, msg: &[u8]) {
    send.write_all(msg).await.expect("write");
    let mut got = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut got))
        .await
        .expect("read in time")
        .expect("read");
    assert_eq!(got, msg);
}

/// A connection that loses a simultaneous dial carries the streams already
/// on it to their end, then closes: at the higher id's end the pooled
/// connection it dialed itself loses to the peer's, and at the lower id's
/// end the peer's new one loses while the peer still uses it. Closing the
/// loser at once cut answers under way when a restarted node and its peers
/// dialed each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_losing_duplicate_carries_its_streams_to_their_end() {
    use specter::wire::StreamKind;
    let ca = make_ca("test").unwrap();
    let (t1, t2) = (tls_for(&ca, 1), tls_for(&ca, 2));
    let (hi, lo) = if t1.id > t2.id { (t1, t2) } else { (t2, t1) };
    for (ta, tb) in [(&hi, &lo), (&lo, &hi)] {
        let bind = || bind_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let (a, mut inbox_a) = Transport::new(bind(), ta).unwrap();
        let (b, mut inbox_b) = Transport::new(bind(), tb).unwrap();
        // The peer's simultaneous dial: the same identity from another socket.
        let (b2, _inbox_b2) = Transport::new(bind(), tb).unwrap();
        for t in [&a, &b, &b2] {
            tokio::spawn(t.clone().serve(cancel.clone()));
        }
        let a_addr = a.local_addr().unwrap();
        // A stream from a, under way when the duplicate arrives.
        let mut first = a
            .open_stream(b.local_addr().unwrap(), tb.id, StreamKind::Forward)
            .await
            .unwrap();
        let mut first_at_b = inbox_b.forwards.recv().await.unwrap();
        carry(&mut first.send, &mut first_at_b.recv, b"request").await;
        carry(&mut first_at_b.send, &mut first.recv, b"answer, part 1").await;
        // b dials again and opens a stream on its new connection before it
        // can know that a keeps the other one.
        let mut second = b2
            .open_stream(a_addr, ta.id, StreamKind::Forward)
            .await
            .unwrap();
        let settled = wait_until(Duration::from_secs(5), || {
            a.counters().duplicates_closed == 1
        })
        .await;
        assert!(settled.is_some(), "a never saw the duplicate");
        let mut second_at_a = tokio::time::timeout(Duration::from_secs(5), inbox_a.forwards.recv())
            .await
            .expect("the stream on the new connection is served")
            .unwrap();
        carry(&mut second.send, &mut second_at_a.recv, b"second request").await;
        carry(&mut second_at_a.send, &mut second.recv, b"second answer").await;
        // Both streams still carry, whichever connection lost.
        carry(&mut first_at_b.send, &mut first.recv, b"answer, part 2").await;
        carry(&mut first.send, &mut first_at_b.recv, b"more request").await;
        let loser = if ta.id > tb.id {
            first.conn.clone()
        } else {
            second.conn.clone()
        };
        assert_eq!(a.counters().duplicates_draining, 1);
        assert!(loser.close_reason().is_none());
        // Once its streams end, the end that dialed the loser closes it. Here
        // b2 stands for b, but never learns of the winner (it went to b), so
        // when a accepted the loser, b2 is made to close it.
        drop((first, first_at_b, second, second_at_a));
        let a_dialed_it = ta.id > tb.id;
        if !a_dialed_it {
            tokio::time::sleep(specter::net::pool::drain_quiet(loser.rtt()) * 2).await;
            assert!(
                loser.close_reason().is_none(),
                "the end that accepted the loser closed it"
            );
            b2.shutdown().await;
        }
        let closed = wait_until(Duration::from_secs(10), || {
            loser.close_reason().is_some() && a.counters().duplicates_draining == 0
        })
        .await;
        assert!(closed.is_some(), "the losing connection was never closed");
        let c = a.counters();
        assert_eq!((c.duplicates_draining, c.duplicate_streams_cut), (0, 0));
        assert_eq!(a.connected_peers(), vec![tb.id]);
        cancel.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_settle_on_one_connection() {
    let ca = make_ca("test").unwrap();
    let (ta, tb) = (tls_for(&ca, 1), tls_for(&ca, 2));
    let (a, inboxes_a) =
        Transport::new(bind_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(), &ta).unwrap();
    let (b, inboxes_b) =
        Transport::new(bind_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(), &tb).unwrap();
    let (mut inbox_a, mut inbox_b) = (inboxes_a.datagrams, inboxes_b.datagrams);
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(a.clone().serve(cancel.clone()));
    tokio::spawn(b.clone().serve(cancel.clone()));
    let (ra, rb) = tokio::join!(
        a.connect(b.local_addr().unwrap(), Some(tb.id)),
        b.connect(a.local_addr().unwrap(), Some(ta.id))
    );
    ra.unwrap();
    rb.unwrap();
    // The loser of the tie-break is closed on both ends; until both ends have
    // processed the close a datagram may ride the dying connection and be
    // lost (SWIM tolerates that), so send until both directions work.
    let (mut got_a, mut got_b) = (None, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while (got_a.is_none() || got_b.is_none()) && tokio::time::Instant::now() < deadline {
        a.send_datagram(
            tb.id,
            b.local_addr().unwrap(),
            Bytes::from_static(b"from a"),
        );
        b.send_datagram(
            ta.id,
            a.local_addr().unwrap(),
            Bytes::from_static(b"from b"),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(m) = inbox_b.try_recv() {
            got_b = Some(m);
        }
        while let Ok(m) = inbox_a.try_recv() {
            got_a = Some(m);
        }
    }
    assert_eq!(got_b, Some((ta.id, Bytes::from_static(b"from a"))));
    assert_eq!(got_a, Some((tb.id, Bytes::from_static(b"from b"))));
    // Both ends keep exactly one connection; one duplicate was closed.
    assert_eq!(a.connected_peers(), vec![tb.id]);
    assert_eq!(b.connected_peers(), vec![ta.id]);
    assert!(a.counters().duplicates_closed + b.counters().duplicates_closed >= 1);
    // Dialing an address expecting another id than its certificate proves fails.
    let wrong = a
        .connect(
            b.local_addr().unwrap(),
            Some(specter_gossip::NodeId(tb.id.0 ^ 1)),
        )
        .await;
    assert!(matches!(
        wrong,
        Err(specter::net::DialError::WrongPeer { .. })
    ));
    assert_eq!(a.counters().wrong_peer, 1);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_rpc_frames_are_refused_and_the_node_keeps_serving() {
    use specter_dht::messages::{self, ErrorCode, Request, Response};
    let ca = make_ca("test").unwrap();
    let nodes = cluster(&ca, 3).await;
    let target = nodes[0].status().addr;
    let peer_tls = tls_for(&ca, 8);
    let (peer, _inboxes) = Transport::new(
        bind_endpoint("127.0.0.1:0".parse().unwrap()).unwrap(),
        &peer_tls,
    )
    .unwrap();
    let (_, conn) = peer.connect(target, Some(nodes[0].id())).await.unwrap();

    async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&[specter::wire::StreamKind::Rpc.byte()])
            .await
            .map_err(|e| e.to_string())?;
        send.write_all(bytes).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
    }

    // Oversized: refused from the header alone, with a stream reset.
    let mut huge = (u32::try_from(messages::MAX_FRAME_SIZE).unwrap() + 1)
        .to_be_bytes()
        .to_vec();
    huge.extend_from_slice(&[1, 2, 3]);
    assert!(
        exchange(&conn, &huge).await.is_err(),
        "oversized frame not reset"
    );

    // Garbage body, wrong version: typed errors.
    let garbage = [0, 0, 0, 3, messages::PROTOCOL_VERSION, 0xc1, 0xc1];
    let answer = exchange(&conn, &garbage).await.unwrap();
    assert_eq!(
        messages::decode_frame::<Response>(&answer).unwrap(),
        Response::Error(ErrorCode::Malformed)
    );
    let wrong_version = [0, 0, 0, 2, 9, 0x90];
    let answer = exchange(&conn, &wrong_version).await.unwrap();
    assert_eq!(
        messages::decode_frame::<Response>(&answer).unwrap(),
        Response::Error(ErrorCode::Version)
    );

    // A truncated frame is abandoned without an answer.
    assert!(
        exchange(&conn, &[0, 0, 0, 9, 1])
            .await
            .map(|a| a.is_empty())
            .unwrap_or(true)
    );

    // Still serving: a valid request gets a real answer.
    let get = messages::encode(&Request::Get {
        key: specter_dht::key_of("nobody"),
        name: "nobody".into(),
        any_replica: true,
    })
    .unwrap();
    let answer = exchange(&conn, &get).await.unwrap();
    assert!(matches!(
        messages::decode_frame::<Response>(&answer).unwrap(),
        Response::Found { item: None } | Response::Redirect { .. }
    ));
    peer.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn a_client_connection_that_has_not_said_hello_gets_one_stream_and_junk_closes_it() {
    let ca = make_ca("t").unwrap();
    let node = start(&ca, 0, None);
    // Anyone can be a tunnel client: a fresh self-signed key.
    let client = common::own_client::OwnClient::new(&ca.cert);
    let conn = client.connect(node.addresses().quic).await;
    // The control stream...
    let (mut control, _recv) = conn.open_bi().await.unwrap();
    control.write_all(&[0]).await.unwrap();
    // ...and nothing more until a hello is accepted: before, a client could
    // open 4,096 streams and fill a 64 MiB window on streams never read.
    let second = tokio::time::timeout(Duration::from_secs(1), conn.open_bi()).await;
    assert!(
        second.is_err(),
        "a second stream was granted before any hello"
    );
    // Junk where the hello should be is refused from its frame header (it
    // claims more than a frame may hold) and the connection closed.
    let pushed = tokio::time::timeout(
        Duration::from_secs(5),
        control.write_all(&vec![0x55; 4 << 20]),
    )
    .await;
    assert!(matches!(pushed, Ok(Err(_))), "{pushed:?}");
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    assert!(closed.is_ok(), "the connection was left open");
    node.crash().await;
}
