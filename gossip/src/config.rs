//! Timing and size settings for SWIM, with the reasons for each default.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::{Duration, Instant};

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

/// Shortest time a suspected member has to refute before it is declared down.
///
/// foca's LAN preset waits 4·log10(n) probe periods (8 s at 100 members). A
/// live member refutes within one round trip of hearing the suspicion, but a
/// member whose process is starved (a 2-core node taking a thousand TLS
/// handshakes at once) can go a second without running its gossip task: at
/// 600 ms two such nodes declared each other down under a visitor burst. 2 s
/// rides out such stalls; detection on loopback is then about 3 s. Longer
/// links raise it further (see [`Timing::for_rtt`]).
pub const SUSPECT_TO_DOWN: Duration = Duration::from_secs(2);

/// Suspicion lasts at least this many probe periods, so that on slow links a
/// suspected member hears of it (piggybacked on later probes and gossip) and
/// its refutation travels back before the timer runs out.
pub const SUSPECT_PERIODS: u32 = 3;

/// Room in a probe period, beyond two round trips, for an indirect probe:
/// prober → relay → target and back is two round trips when relays are as
/// far as the target, plus each hop's processing.
pub const INDIRECT_MARGIN: Duration = Duration::from_millis(200);

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

/// The SWIM timers that depend on how far apart members are. A
/// [`GossipConfig`] gives their floors (fit for loopback and LAN); a node
/// measures its members' round-trip times and widens them with
/// [`Timing::for_rtt`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a direct ping may go unanswered before asking others to probe.
    pub probe_rtt: Duration,
    /// How often a member probes one other member; the indirect probes get
    /// what is left of the period after `probe_rtt`.
    pub probe_period: Duration,
    /// How long a suspected member has to refute.
    pub suspect_to_down_after: Duration,
}

impl Timing {
    /// The timers for a cluster whose worst member round trip is `rtt`:
    /// probe RTT = max(floor, 2·rtt); period = max(floor, probe RTT plus
    /// 2·rtt plus [`INDIRECT_MARGIN`]), so an indirect probe through a relay
    /// as far as the target completes within the period; suspicion =
    /// max(floor, [`SUSPECT_PERIODS`] periods).
    pub fn for_rtt(floor: Timing, rtt: Duration) -> Timing {
        let probe_rtt = floor.probe_rtt.max(2 * rtt);
        let probe_period = floor
            .probe_period
            .max(probe_rtt + 2 * rtt + INDIRECT_MARGIN);
        let suspect_to_down_after = floor
            .suspect_to_down_after
            .max(SUSPECT_PERIODS * probe_period);
        Timing {
            probe_rtt,
            probe_period,
            suspect_to_down_after,
        }
    }

    /// An upper bound on how long after a crash every live member has seen
    /// it as down, on a network that delivers most packets within `one_way`.
    ///
    /// foca probes members round-robin in a shuffled order, and every member
    /// probes, so some member probes the crashed one within about two periods
    /// (allowing for a member whose round restarts just before the crash).
    /// The probe fails at the end of its period, suspicion lasts
    /// `suspect_to_down_after`, and the "down" update then needs a few
    /// gossip rounds (fanout [`GOSSIP_FANOUT`]; up to ten rounds for the last
    /// member under 5 % loss) to reach everyone.
    pub fn detection_bound(&self, gossip_period: Duration, one_way: Duration) -> Duration {
        3 * self.probe_period + self.suspect_to_down_after + 10 * (gossip_period + one_way)
    }
}

/// How often a node looks at its members' round-trip times.
pub const RTT_SAMPLE_PERIOD: Duration = Duration::from_secs(2);

/// Timers widen at once when round trips grow (a false "down" costs every
/// tenant on that node its attachments), but narrow only after round trips
/// have stayed lower for this long, so a brief calm between bursts does not
/// bring back timers that the next burst would break.
pub const NARROW_AFTER: Duration = Duration::from_secs(60);

/// Narrowing is not worth a change below this fraction of the probe period.
const NARROW_MIN_FRACTION: f64 = 0.2;

/// Follows measured round trips and decides when the [`Timing`] changes
/// (see [`NARROW_AFTER`]). Pure: the caller brings the clock and the
/// samples.
#[derive(Clone, Debug)]
pub struct TimingTracker {
    floor: Timing,
    current: Timing,
    /// Since when every sample asked for narrower timers than `current`,
    /// and the widest of them.
    narrower: Option<(Instant, Timing)>,
}

impl TimingTracker {
    /// Starts at the floor.
    pub fn new(floor: Timing) -> Self {
        TimingTracker {
            floor,
            current: floor,
            narrower: None,
        }
    }

    /// The timers in force.
    pub fn current(&self) -> Timing {
        self.current
    }

    /// Takes the worst round trip measured now (`None`: no member to
    /// measure) and returns the new timers if they change.
    pub fn observe(&mut self, now: Instant, worst_rtt: Option<Duration>) -> Option<Timing> {
        let want = Timing::for_rtt(self.floor, worst_rtt.unwrap_or(Duration::ZERO));
        if want.probe_period > self.current.probe_period || want.probe_rtt > self.current.probe_rtt
        {
            self.narrower = None;
            self.current = want;
            return Some(want);
        }
        let gap = self.current.probe_period.saturating_sub(want.probe_period);
        if gap.as_secs_f64() <= self.current.probe_period.as_secs_f64() * NARROW_MIN_FRACTION {
            self.narrower = None;
            return None;
        }
        let (since, widest) = match self.narrower {
            Some((since, widest)) if want.probe_period > widest.probe_period => (since, want),
            Some(kept) => kept,
            None => (now, want),
        };
        if now.saturating_duration_since(since) >= NARROW_AFTER {
            self.narrower = None;
            self.current = widest;
            return Some(widest);
        }
        self.narrower = Some((since, widest));
        None
    }
}

/// Settings for a [`crate::Membership`], converted into foca's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GossipConfig {
    /// Floor of the probe period, see [`PROBE_PERIOD`] and [`Timing`].
    pub probe_period: Duration,
    /// Floor of the probe RTT, see [`PROBE_RTT`] and [`Timing`].
    pub probe_rtt: Duration,
    /// Floor of the suspicion time, see [`SUSPECT_TO_DOWN`] and [`Timing`].
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
    /// foca refused the settings.
    #[error("gossip settings refused: {0}")]
    Refused(String),
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

    /// The floors of the RTT-dependent timers.
    pub fn timing(&self) -> Timing {
        Timing {
            probe_rtt: self.probe_rtt,
            probe_period: self.probe_period,
            suspect_to_down_after: self.suspect_to_down_after,
        }
    }

    /// [`Timing::detection_bound`] of the floors.
    pub fn detection_bound(&self, one_way: Duration) -> Duration {
        self.timing().detection_bound(self.gossip_period, one_way)
    }

    /// foca's LAN preset (`Config::new_lan`), every timing replaced by ours;
    /// built without it, since its floating-point `log10` was the node's only
    /// use of the C maths library but one (see `src/main.rs`).
    pub(crate) fn to_foca(&self) -> foca::Config {
        let mut c = foca::Config::simple();
        c.notify_down_members = true;
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(65),
            num_members: NonZeroUsize::new(2).expect("non-zero"),
        });
        c.max_transmissions = lan_transmissions(self.expected_members);
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

/// foca's LAN dissemination count for `members`: ⌊4·log10(members + 1)⌋,
/// within 1..=255, in integers (⌊log10(x⁴)⌋).
fn lan_transmissions(members: NonZeroU32) -> std::num::NonZeroU8 {
    let x = u128::from(members.get()) + 1;
    let t = x.checked_pow(4).map_or(38, u128::ilog10);
    std::num::NonZeroU8::new(t.clamp(1, 255) as u8).expect("non-zero")
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
    fn the_foca_config_is_foca_lan_with_our_timings() {
        for n in (1..=20_000).chain([65_535, 1_000_000, u32::MAX - 1, u32::MAX]) {
            let n = NonZeroU32::new(n).unwrap();
            assert_eq!(
                lan_transmissions(n),
                foca::Config::new_lan(n).max_transmissions,
                "{n} members"
            );
        }
        let ours = GossipConfig::default().to_foca();
        let lan = foca::Config::new_lan(NonZeroU32::new(DEFAULT_EXPECTED_MEMBERS).unwrap());
        assert_eq!(ours.remove_down_after, lan.remove_down_after);
        assert_eq!(ours.notify_down_members, lan.notify_down_members);
        let to_down = |c: &foca::Config| {
            c.periodic_announce_to_down_members
                .as_ref()
                .map(|p| (p.frequency, p.num_members))
        };
        assert_eq!(to_down(&ours), to_down(&lan));
    }

    #[test]
    fn the_preset_is_valid_and_probes_faster_than_foca_lan() {
        let c = GossipConfig::default();
        c.validate().unwrap();
        let lan = foca::Config::new_lan(c.expected_members);
        assert!(c.probe_period < lan.probe_period);
        assert!(c.suspect_to_down_after < lan.suspect_to_down_after);
        assert_eq!(c.to_foca().max_packet_size.get(), MAX_PACKET_SIZE);
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn loopback_keeps_the_floors_and_long_links_widen_every_timer() {
        let floor = GossipConfig::default().timing();
        assert_eq!(Timing::for_rtt(floor, ms(1)), floor);
        assert_eq!(Timing::for_rtt(floor, ms(40)), floor);
        let wan = Timing::for_rtt(floor, ms(300));
        assert_eq!(wan.probe_rtt, ms(600));
        // Ping + indirect probe through a relay as far as the target.
        assert_eq!(wan.probe_period, ms(600 + 600 + 200));
        assert_eq!(wan.suspect_to_down_after, ms(3 * 1_400));
        let p2 = Timing::for_rtt(floor, ms(80));
        assert_eq!((p2.probe_rtt, p2.probe_period), (ms(200), ms(560)));
        assert_eq!(p2.suspect_to_down_after, ms(2_000));
    }

    #[test]
    fn timers_widen_at_once_and_narrow_only_after_a_calm_minute() {
        let floor = GossipConfig::default().timing();
        let t0 = Instant::now();
        let mut tracker = TimingTracker::new(floor);
        assert_eq!(tracker.observe(t0, Some(ms(2))), None);
        assert_eq!(tracker.observe(t0, None), None);
        let wide = tracker.observe(t0, Some(ms(300))).expect("widens at once");
        assert_eq!(wide.probe_rtt, ms(600));
        // Round trips fall back: nothing changes for a minute...
        let calm = t0 + ms(1_000);
        assert_eq!(tracker.observe(calm, Some(ms(5))), None);
        assert_eq!(tracker.observe(calm + ms(30_000), Some(ms(100))), None);
        // ...a new burst restarts the wait and widens again...
        assert_eq!(
            tracker
                .observe(calm + ms(40_000), Some(ms(400)))
                .map(|t| t.probe_rtt),
            Some(ms(800))
        );
        assert_eq!(tracker.observe(calm + ms(41_000), Some(ms(100))), None);
        assert_eq!(tracker.observe(calm + ms(100_000), Some(ms(2))), None);
        // ...and after a full minute lower, the widest of the calm applies.
        let narrowed = tracker.observe(calm + ms(101_000), Some(ms(2))).unwrap();
        assert_eq!(narrowed, Timing::for_rtt(floor, ms(100)));
        assert_eq!(tracker.current(), narrowed);
        // A small wobble changes nothing.
        let mut tracker = TimingTracker::new(floor);
        tracker.observe(t0, Some(ms(300)));
        assert_eq!(tracker.observe(t0 + ms(120_000), Some(ms(290))), None);
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
