//! Liveness of a peer we are waiting on, from QUIC's own packet counts: a
//! peer that sends nothing at all (not even acknowledgements of our pings)
//! for [`PEER_SILENCE`] is presumed dead, so callers fail over at once
//! instead of waiting for QUIC's idle timeout or gossip.

use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::Connection;

/// A peer we are waiting on that sends nothing at all for this long is
/// presumed dead. While waiting we send it small pings (empty datagrams,
/// which QUIC must acknowledge), so a live peer's QUIC stack answers within
/// milliseconds however long its application takes; only a dead (or cut off)
/// peer stays silent this long. Gossip takes ~1.5 s to say the same.
pub const PEER_SILENCE: Duration = Duration::from_millis(400);

/// Completes once `conn` has received no packet for `silence`, counted from
/// the call. Used beside a wait for a peer's answer. After a quarter of
/// `silence` without a packet it pings the peer (an empty datagram, ignored
/// by the receiver), and again at each further quarter, so that an idle but
/// live peer is heard from.
pub async fn silent(conn: &Connection, silence: Duration) {
    let check = (silence / 8).max(Duration::from_millis(5));
    let mut heard = (conn.stats().udp_rx.datagrams, Instant::now());
    let mut pings = 0u32;
    loop {
        tokio::time::sleep(check).await;
        let received = conn.stats().udp_rx.datagrams;
        if received != heard.0 {
            heard = (received, Instant::now());
            pings = 0;
            continue;
        }
        let quiet = heard.1.elapsed();
        if quiet >= silence {
            return;
        }
        if quiet >= silence / 4 * (pings + 1) {
            pings += 1;
            let _ = conn.send_datagram(Bytes::new());
        }
    }
}
