//! Timing and size settings for SWIM, with the reasons for each default.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

/// How often each member probes one other member.
///
/// foca's LAN preset probes every 1 s; we probe twice as often so a crash is
/// noticed sooner. Traffic stays small (one ping + ack per member per period).
pub const PROBE_PERIOD: Duration = Duration::from_millis(500);

/// How long a direct ping may go unanswered before asking others to probe.
///
/// Loopback and LAN round trips are well under a millisecond; 200 ms leaves room
/// for a busy 2-core machine running dozens of nodes without false suspicion.
pub const PROBE_RTT: Duration = Duration::from_millis(200);

/// How long a suspected member has to refute before it is declared down.
///
/// foca's LAN preset waits 4·log10(n) probe periods (8 s at 100 members), far
/// beyond our < 2 s detection target. A live member refutes within one round
/// trip of hearing the suspicion, and suspicion spreads in a few gossip rounds
/// (every [`GOSSIP_PERIOD`]), so 600 ms is enough for live members to refute
/// while keeping detection near 1.5 s. Measured false positives: see README.
pub const SUSPECT_TO_DOWN: Duration = Duration::from_millis(600);

/// How often updates are pushed to [`GOSSIP_FANOUT`] random members besides the
/// piggybacking on probes (foca's LAN preset value).
pub const GOSSIP_PERIOD: Duration = Duration::from_millis(200);

/// Members each periodic gossip round reaches (foca's LAN preset value).
pub const GOSSIP_FANOUT: usize = 3;

/// How often each member asks one random member for a sample of its member
/// list (foca's periodic announce). Gossip alone spreads each update a bounded
/// number of times; under loss or mass joins some members miss some updates,
/// and this pull repairs that. foca's LAN preset uses 30 s, which left a
/// 100-member simulation unconverged for over 30 s; the cost is one
/// ~1 KB packet per member per period.
pub const ANNOUNCE_PERIOD: Duration = Duration::from_secs(2);

/// Members asked to probe on our behalf when a direct ping goes unanswered.
///
/// foca's LAN preset asks 3. With 5 % loss each way an indirect probe (four
/// packets) fails 19 % of the time, so 3 leave a 0.7 % chance of a false
/// suspicion per missed ping; and in foca only the prober runs the suspicion
/// timer, so the refutation must reach that one member in time. A 100-member
/// simulation at 5 % loss saw a false "down" every ~9 s with 3. Indirect probes
/// cost nothing until a direct ping is missed, so ask more.
pub const INDIRECT_PROBES: usize = 8;

/// Fewest times each membership update is piggybacked or gossiped by each
/// member that learns it. foca derives 4·log10(n+1) from the expected cluster
/// size: 4 at 10 members, where the epidemic sometimes died out before
/// reaching one member (a 10-member simulation saw one member learn of a
/// crash 4 s after the others, from its own probe). Updates are rare and small
/// (~40 B), so spending a few more transmissions on each is cheap.
pub const MIN_TRANSMISSIONS: u8 = 10;

/// Largest gossip packet. It travels as one QUIC datagram, whose limit
/// (`Connection::max_datagram_size`) is ≈ 1,160 B right after the handshake, so
/// foca's 1,400 B default would be refused; 1,100 B leaves a margin.
pub const MAX_PACKET_SIZE: usize = 1_100;

/// Cluster size assumed for dissemination counts when the caller gives none.
pub const DEFAULT_EXPECTED_MEMBERS: u32 = 32;

/// Settings for a [`crate::Membership`], converted into foca's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GossipConfig {
    /// See [`PROBE_PERIOD`].
    pub probe_period: Duration,
    /// See [`PROBE_RTT`].
    pub probe_rtt: Duration,
    /// See [`SUSPECT_TO_DOWN`].
    pub suspect_to_down_after: Duration,
    /// See [`GOSSIP_PERIOD`].
    pub gossip_period: Duration,
    /// See [`INDIRECT_PROBES`].
    pub indirect_probes: NonZeroUsize,
    /// See [`ANNOUNCE_PERIOD`].
    pub announce_period: Duration,
    /// Largest gossip packet, see [`MAX_PACKET_SIZE`].
    pub max_packet_size: NonZeroUsize,
    /// Expected cluster size; sets how many times each update is retransmitted.
    pub expected_members: NonZeroU32,
}

/// A [`GossipConfig`] that cannot work; nothing was built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The direct probe timeout must leave room for indirect probes in the period.
    #[error("probe_rtt ({rtt:?}) must be shorter than probe_period ({period:?})")]
    RttNotBelowPeriod {
        /// Configured probe RTT.
        rtt: Duration,
        /// Configured probe period.
        period: Duration,
    },
    /// A duration is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// Packets must fit foca's smallest message plus some updates.
    #[error("max_packet_size {0} is below the 512 B minimum")]
    PacketTooSmall(usize),
}

impl GossipConfig {
    /// The tuned LAN preset (see the constants) for about `expected_members` nodes.
    pub fn lan(expected_members: NonZeroU32) -> Self {
        GossipConfig {
            probe_period: PROBE_PERIOD,
            probe_rtt: PROBE_RTT,
            suspect_to_down_after: SUSPECT_TO_DOWN,
            gossip_period: GOSSIP_PERIOD,
            announce_period: ANNOUNCE_PERIOD,
            indirect_probes: NonZeroUsize::new(INDIRECT_PROBES).expect("non-zero"),
            max_packet_size: NonZeroUsize::new(MAX_PACKET_SIZE).expect("non-zero"),
            expected_members,
        }
    }

    /// Checks the relations between the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, d) in [
            ("probe_period", self.probe_period),
            ("probe_rtt", self.probe_rtt),
            ("suspect_to_down_after", self.suspect_to_down_after),
            ("gossip_period", self.gossip_period),
            ("announce_period", self.announce_period),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.probe_rtt >= self.probe_period {
            return Err(ConfigError::RttNotBelowPeriod {
                rtt: self.probe_rtt,
                period: self.probe_period,
            });
        }
        if self.max_packet_size.get() < 512 {
            return Err(ConfigError::PacketTooSmall(self.max_packet_size.get()));
        }
        Ok(())
    }

    /// An upper bound on how long after a crash every live member has seen it as
    /// down, on a network that delivers most packets within `one_way` latency.
    ///
    /// foca probes members round-robin in a shuffled order, and every member
    /// probes, so some member probes the crashed one within about two periods
    /// (allowing for a member whose round restarts just before the crash). The
    /// probe fails at the end of its period, suspicion lasts
    /// `suspect_to_down_after`, and the "down" update then needs a few gossip
    /// rounds (fanout [`GOSSIP_FANOUT`]; up to ten rounds for the last member under 5 % loss) to reach everyone.
    pub fn detection_bound(&self, one_way: Duration) -> Duration {
        2 * self.probe_period
            + self.probe_period
            + self.suspect_to_down_after
            + 10 * (self.gossip_period + one_way)
    }

    pub(crate) fn to_foca(&self) -> foca::Config {
        let mut c = foca::Config::new_lan(self.expected_members);
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.suspect_to_down_after = self.suspect_to_down_after;
        c.max_packet_size = self.max_packet_size;
        c.num_indirect_probes = self.indirect_probes;
        c.max_transmissions = c
            .max_transmissions
            .max(std::num::NonZeroU8::new(MIN_TRANSMISSIONS).expect("non-zero"));
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_period,
            num_members: NonZeroUsize::new(GOSSIP_FANOUT).expect("non-zero"),
        });
        c.periodic_announce = Some(foca::PeriodicParams {
            frequency: self.announce_period,
            num_members: NonZeroUsize::MIN,
        });
        c
    }
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self::lan(NonZeroU32::new(DEFAULT_EXPECTED_MEMBERS).expect("non-zero"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preset_is_valid_and_probes_faster_than_foca_lan() {
        let c = GossipConfig::default();
        c.validate().unwrap();
        let lan = foca::Config::new_lan(c.expected_members);
        assert!(c.probe_period < lan.probe_period);
        assert!(c.suspect_to_down_after < lan.suspect_to_down_after);
        assert_eq!(c.to_foca().max_packet_size.get(), MAX_PACKET_SIZE);
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        let mut c = GossipConfig::default();
        c.probe_rtt = c.probe_period;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::RttNotBelowPeriod { .. })
        ));
        let c = GossipConfig {
            suspect_to_down_after: Duration::ZERO,
            ..GossipConfig::default()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::Zero("suspect_to_down_after"))
        );
    }
}
