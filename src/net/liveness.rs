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
/// live peer is heard from. Time this process spent unable to run the
/// watch does not count as the peer's silence (see [`Hearing`]).
pub async fn silent(conn: &Connection, silence: Duration) {
    let check = (silence / 8).max(Duration::from_millis(5));
    let mut hearing = Hearing::new(conn, check, silence);
    loop {
        tokio::time::sleep(check).await;
        match hearing.hear(conn) {
            Heard::Nothing | Heard::Again => {}
            Heard::Ping => {
                let _ = conn.send_datagram(Bytes::new());
            }
            Heard::Silent => return,
        }
    }
}

/// What one check of a [`Hearing`] concludes.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// Not quiet for long yet.
    Nothing,
    /// Heard from since the check before.
    Again,
    /// Quiet for another quarter of the silence: ping the peer.
    Ping,
    /// Quiet for the whole silence: presumed dead.
    Silent,
}

/// How long a peer has been quiet, counted by periodic checks of its
/// connection's received-datagram count. A check that comes late counts at
/// most [`LATE_CHECK_COUNTS`] intervals: a late check means this process
/// was busy or descheduled, and then so were the drivers that read our
/// socket, so the peer's packets may be waiting there unread. Counting the
/// whole delay made a loaded node declare live peers silent all at once
/// (and fail every call to them) as soon as it ran again, and a stalled
/// client count every attachment silent and attach replacements.
pub struct Hearing {
    received: u64,
    checked: Instant,
    quiet: Duration,
    pings: u32,
    interval: Duration,
    silence: Duration,
}

/// See [`Hearing`]: a check counts at most this many intervals of quiet,
/// enough for a timer's ordinary lateness.
const LATE_CHECK_COUNTS: u32 = 2;

impl Hearing {
    /// Checks every `interval` of `conn`, from now, quiet for `silence` to
    /// be silent.
    pub fn new(conn: &Connection, interval: Duration, silence: Duration) -> Self {
        Self::from(
            conn.stats().udp_rx.datagrams,
            Instant::now(),
            interval,
            silence,
        )
    }

    fn from(received: u64, at: Instant, interval: Duration, silence: Duration) -> Self {
        Hearing {
            received,
            checked: at,
            quiet: Duration::ZERO,
            pings: 0,
            interval,
            silence,
        }
    }

    /// One check of `conn`, now.
    pub fn hear(&mut self, conn: &Connection) -> Heard {
        self.check(conn.stats().udp_rx.datagrams, Instant::now())
    }

    /// One check at `now`, with `received` datagrams counted on the
    /// connection so far.
    fn check(&mut self, received: u64, now: Instant) -> Heard {
        let elapsed = now.saturating_duration_since(self.checked);
        self.checked = now;
        if received != self.received {
            self.received = received;
            self.quiet = Duration::ZERO;
            self.pings = 0;
            return Heard::Again;
        }
        self.quiet += elapsed.min(self.interval * LATE_CHECK_COUNTS);
        if self.quiet >= self.silence {
            Heard::Silent
        } else if self.quiet >= self.silence / 4 * (self.pings + 1) {
            self.pings += 1;
            Heard::Ping
        } else {
            Heard::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECK: Duration = Duration::from_millis(50);

    /// Checks at the given gaps after the start, all with `received`.
    struct Clock {
        hearing: Hearing,
        now: Instant,
    }

    impl Clock {
        fn new(received: u64) -> Self {
            let now = Instant::now();
            Clock {
                hearing: Hearing::from(received, now, CHECK, PEER_SILENCE),
                now,
            }
        }

        fn check(&mut self, received: u64, after: Duration) -> Heard {
            self.now += after;
            self.hearing.check(received, self.now)
        }
    }

    #[test]
    fn a_peer_quiet_for_the_silence_is_silent_after_a_ping_each_quarter() {
        let mut h = Clock::new(7);
        let heard: Vec<Heard> = (0..8).map(|_| h.check(7, CHECK)).collect();
        use Heard::*;
        assert_eq!(
            heard,
            [Nothing, Ping, Nothing, Ping, Nothing, Ping, Nothing, Silent]
        );
    }

    #[test]
    fn a_packet_starts_the_count_again() {
        let mut h = Clock::new(0);
        for _ in 0..7 {
            assert_ne!(h.check(0, CHECK), Heard::Silent);
        }
        assert_eq!(h.check(1, CHECK), Heard::Again);
        for _ in 0..7 {
            assert_ne!(h.check(1, CHECK), Heard::Silent);
        }
        assert_eq!(h.check(1, CHECK), Heard::Silent);
    }

    #[test]
    fn a_stall_of_this_process_is_not_the_peers_silence() {
        // The check runs two seconds late (the node was busy): the peer's
        // packets may be unread in our socket, so it is not silent yet.
        let mut h = Clock::new(3);
        assert_ne!(h.check(3, Duration::from_secs(2)), Heard::Silent);
        // Our drivers then read what it sent meanwhile.
        assert_eq!(h.check(9, CHECK), Heard::Again);
        // A dead peer is still found, later by at most the counted part of
        // each late check.
        let mut h = Clock::new(3);
        let silent_at = (1..=10).find(|_| h.check(3, Duration::from_secs(2)) == Heard::Silent);
        assert_eq!(silent_at, Some(4), "each late check counts 100 ms, not 2 s");
    }
}
