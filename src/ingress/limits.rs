//! What a visitor may hold, and for how long: every bound of the public
//! ingress as a named constant with its reason, the node settings that
//! override them ([`IngressLimits`]), and the counters that show each one
//! at work ([`IngressStats`], on `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Visitor connections held at once (all stages, all sources). Sized down at
/// start to what the descriptor limit allows (see [`FD_RESERVE`]). When
/// full, the idlest connection is shed for a newcomer.
pub const MAX_VISITORS: usize = 4_096;

/// Visitor connections one source address (an IPv4 address, an IPv6 /64)
/// may hold: 1/64 of [`MAX_VISITORS`], so one address cannot take the node,
/// while an office behind one NAT (browsers open about six connections
/// each) still fits.
pub const VISITORS_PER_SOURCE: usize = 64;

/// Connections one source may have before their TLS handshake completes: a
/// browser opens a few at a time; a flood of silent connections opens
/// hundreds.
pub const HANDSHAKES_PER_SOURCE: usize = 16;

/// Descriptors kept for everything but visitors (the QUIC socket, the admin
/// API, files, the other ingress port); `MAX_VISITORS` is lowered so the
/// node never runs out.
pub const FD_RESERVE: u64 = 256;

/// Visitors a node takes however low its descriptor limit: below
/// [`FD_RESERVE`] + this, lowering [`MAX_VISITORS`] by the reserve would
/// leave it none. The reserve is generous (an idle node uses a few dozen
/// descriptors), so these still fit.
pub const MIN_VISITORS: usize = 16;

/// A visitor must finish its TLS handshake this soon; a stalled one costs a
/// task for no longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// After the TLS handshake, the first request must arrive this soon (the
/// HTTP version sniff waits for bytes with no deadline of its own).
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A request head must be complete this soon after the connection starts
/// waiting for it; for HTTP/1.1 this is also the keep-alive idle time (hyper
/// starts the timer when the connection goes idle). Slowloris is cut here.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP/2 connection with no request in flight and no bytes moving is
/// closed (GOAWAY) after this. Browsers reopen at once when needed.
pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// HTTP/2 keep-alive pings: every this often on a quiet connection...
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
/// ...and a connection whose peer does not answer one within this is closed.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body must arrive at this rate (bytes per second) on average
/// over each [`BODY_RATE_WINDOW`] of waiting for it: a slow mobile upload
/// passes, one byte every few seconds does not. Time spent waiting for the
/// tunnel to take the bytes does not count.
pub const BODY_MIN_RATE: u64 = 1_024;
/// The window [`BODY_MIN_RATE`] is measured over.
pub const BODY_RATE_WINDOW: Duration = Duration::from_secs(10);

/// A visitor that takes none of the answer for this long (its TCP window or
/// its HTTP/2 stream window stays full) is cut off; so is a raw-TCP or
/// upgraded visitor's splice whose tunnel side takes nothing. The splice
/// default ([`specter_tunnel::splice::SPLICE_STALL`]).
pub const WRITE_STALL_TIMEOUT: Duration = specter_tunnel::splice::SPLICE_STALL;

/// A raw-TCP visitor (`specter connect`) with no byte either way for this
/// long is closed. Long: ssh sessions sit idle for hours.
pub const RAW_TCP_IDLE: Duration = Duration::from_secs(2 * 3_600);

/// A target that has not begun its answer (status line and headers) this
/// long after a request was sent to it, body and all, is given up on: the
/// visitor gets a 504 and the tunnel stream is closed. Without it a target
/// that never answers held the visitor's request, its tunnel stream and the
/// client's connection to the target for as long as the visitor waited.
/// 100 s is what Cloudflare gives origins before its 524; long-polls answer
/// well within it (commonly 30–60 s). An answer that has begun is not
/// limited by it (downloads, server-sent events), only by
/// [`WRITE_STALL_TIMEOUT`] on the visitor's side.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(100);

/// After a graceful close (idle HTTP/2), how long the connection gets to
/// finish before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The ingress bounds a node applies; defaults are the constants above.
/// `[ingress]` in `node.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressLimits {
    /// [`MAX_VISITORS`].
    pub max_visitors: usize,
    /// [`VISITORS_PER_SOURCE`].
    pub visitors_per_source: usize,
    /// [`HANDSHAKES_PER_SOURCE`].
    pub handshakes_per_source: usize,
    /// [`HANDSHAKE_TIMEOUT`], seconds.
    #[serde(with = "secs")]
    pub handshake_timeout: Duration,
    /// [`FIRST_REQUEST_TIMEOUT`], seconds.
    #[serde(with = "secs")]
    pub first_request_timeout: Duration,
    /// [`HEADER_READ_TIMEOUT`], seconds.
    #[serde(with = "secs")]
    pub header_read_timeout: Duration,
    /// [`HTTP_IDLE_TIMEOUT`], seconds.
    #[serde(with = "secs")]
    pub http_idle_timeout: Duration,
    /// [`BODY_MIN_RATE`], bytes per second.
    pub body_min_rate: u64,
    /// [`WRITE_STALL_TIMEOUT`], seconds.
    #[serde(with = "secs")]
    pub write_stall_timeout: Duration,
    /// [`RAW_TCP_IDLE`], seconds.
    #[serde(with = "secs")]
    pub raw_tcp_idle: Duration,
    /// [`ANSWER_TIMEOUT`], seconds.
    #[serde(with = "secs")]
    pub answer_timeout: Duration,
    /// Keep `X-Forwarded-*` and `Forwarded` that arrive on the plain-HTTP
    /// port (append to them) instead of replacing them: only for a node
    /// behind the operator's own proxy or load balancer, which sets them.
    pub trust_proxy_headers: bool,
}

impl Default for IngressLimits {
    fn default() -> Self {
        IngressLimits {
            max_visitors: MAX_VISITORS,
            visitors_per_source: VISITORS_PER_SOURCE,
            handshakes_per_source: HANDSHAKES_PER_SOURCE,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            first_request_timeout: FIRST_REQUEST_TIMEOUT,
            header_read_timeout: HEADER_READ_TIMEOUT,
            http_idle_timeout: HTTP_IDLE_TIMEOUT,
            body_min_rate: BODY_MIN_RATE,
            write_stall_timeout: WRITE_STALL_TIMEOUT,
            raw_tcp_idle: RAW_TCP_IDLE,
            answer_timeout: ANSWER_TIMEOUT,
            trust_proxy_headers: false,
        }
    }
}

impl IngressLimits {
    /// The first bound set to zero, which would refuse or cut every visitor
    /// (`answer_timeout = 0` would answer every request 504). A zero
    /// `body_min_rate` is allowed: it asks for no minimum.
    pub fn zero_bound(&self) -> Option<&'static str> {
        let counts = [
            ("max_visitors", self.max_visitors),
            ("visitors_per_source", self.visitors_per_source),
            ("handshakes_per_source", self.handshakes_per_source),
        ];
        let times = [
            ("handshake_timeout", self.handshake_timeout),
            ("first_request_timeout", self.first_request_timeout),
            ("header_read_timeout", self.header_read_timeout),
            ("http_idle_timeout", self.http_idle_timeout),
            ("write_stall_timeout", self.write_stall_timeout),
            ("raw_tcp_idle", self.raw_tcp_idle),
            ("answer_timeout", self.answer_timeout),
        ];
        counts
            .into_iter()
            .find(|(_, n)| *n == 0)
            .map(|(name, _)| name)
            .or_else(|| {
                times
                    .into_iter()
                    .find(|(_, t)| t.is_zero())
                    .map(|(name, _)| name)
            })
    }

    /// Lowers [`IngressLimits::max_visitors`] to what `fd_limit` descriptors
    /// allow (one per visitor, [`FD_RESERVE`] kept); returns whether it did.
    pub fn fit_descriptors(&mut self, fd_limit: u64) -> bool {
        let room = usize::try_from(fd_limit.saturating_sub(FD_RESERVE))
            .unwrap_or(usize::MAX)
            .max(MIN_VISITORS);
        if room < self.max_visitors {
            self.max_visitors = room;
            return true;
        }
        false
    }
}

/// Durations as seconds (`10`, `2.5`) in `node.toml`.
pub(crate) mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes seconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    /// Reads seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

/// Why a visitor's connection was closed early, or refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Its source already holds [`IngressLimits::visitors_per_source`].
    SourceFull,
    /// Its source already has [`IngressLimits::handshakes_per_source`]
    /// handshakes under way.
    SourceHandshakes,
    /// The node was full and this was the idlest connection.
    Shed,
    /// No TLS handshake within [`IngressLimits::handshake_timeout`].
    Handshake,
    /// No first request within [`IngressLimits::first_request_timeout`].
    FirstRequest,
    /// An idle HTTP/2 connection ([`IngressLimits::http_idle_timeout`]).
    Idle,
    /// A request body slower than [`IngressLimits::body_min_rate`].
    BodyRate,
    /// A visitor that took none of the answer for
    /// [`IngressLimits::write_stall_timeout`].
    WriteStall,
    /// A raw-TCP visitor idle for [`IngressLimits::raw_tcp_idle`].
    RawIdle,
    /// A request whose target did not begin its answer within
    /// [`IngressLimits::answer_timeout`] (answered 504; the connection
    /// stays).
    Answer,
}

/// Counters of the ingress, for `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct IngressStats {
    accepted: AtomicU64,
    accept_errors: AtomicU64,
    misdirected: AtomicU64,
    broken: AtomicU64,
    cuts: [AtomicU64; 10],
    fast: [AtomicU64; 5],
}

/// What befell a request on the HTTP/1.1 fast path (`ingress::fast`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fast {
    /// Answered there (a page the node wrote, 404 to 504, included).
    Answered,
    /// Handed to the full proxy: a request the fast path does not carry (a
    /// body, an upgrade, another method or version, a misdirected `Host`),
    /// or a head it does not parse (over 100 header lines among them).
    HandoffRequest,
    /// Handed to the full proxy: a head not ended within 64 KiB, for the
    /// full proxy to refuse (431).
    HandoffHead,
    /// Handed to the full proxy: the pooled stream gave no answer that
    /// began (it died, or its answer head was not HTTP/1.1 or too large);
    /// the full proxy sends the request again.
    HandoffNoAnswer,
    /// Reading ahead of a visitor while its answer was awaited stopped at a
    /// head's worth of bytes.
    ReadAheadFull,
}

/// A point-in-time copy of [`IngressStats`].
#[derive(Clone, Copy, Debug, Default, Serialize)]
#[allow(missing_docs)]
pub struct IngressCounters {
    pub accepted: u64,
    pub accept_errors: u64,
    pub misdirected: u64,
    /// Answers cut because their path died mid-way (the visitor was reset).
    pub broken: u64,
    pub refused_source_full: u64,
    pub refused_source_handshakes: u64,
    pub shed: u64,
    pub timeout_handshake: u64,
    pub timeout_first_request: u64,
    pub timeout_idle: u64,
    pub timeout_body_rate: u64,
    pub timeout_write_stall: u64,
    pub timeout_raw_idle: u64,
    pub timeout_answer: u64,
    /// Requests answered on the HTTP/1.1 fast path.
    pub fast_answered: u64,
    pub fast_handoff_request: u64,
    pub fast_handoff_head: u64,
    pub fast_handoff_no_answer: u64,
    pub fast_read_ahead_full: u64,
}

impl IngressStats {
    /// A connection was accepted.
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// `accept` failed.
    pub fn accept_error(&self) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A request named another tunnel than its TLS name (421).
    pub fn misdirected(&self) {
        self.misdirected.fetch_add(1, Ordering::Relaxed);
    }

    /// A visitor's path died after its answer had started: the visitor's
    /// connection or HTTP/2 stream was reset rather than ended cleanly.
    pub fn broken(&self) {
        self.broken.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was refused or cut, for `why`.
    pub fn cut(&self, why: Cut) {
        self.cuts[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A request on the fast path came to `what`.
    pub fn fast(&self, what: Fast) {
        self.fast[what as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Current counters.
    pub fn counters(&self) -> IngressCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let cut = |why: Cut| get(&self.cuts[why as usize]);
        let fast = |what: Fast| get(&self.fast[what as usize]);
        IngressCounters {
            accepted: get(&self.accepted),
            accept_errors: get(&self.accept_errors),
            misdirected: get(&self.misdirected),
            broken: get(&self.broken),
            refused_source_full: cut(Cut::SourceFull),
            refused_source_handshakes: cut(Cut::SourceHandshakes),
            shed: cut(Cut::Shed),
            timeout_handshake: cut(Cut::Handshake),
            timeout_first_request: cut(Cut::FirstRequest),
            timeout_idle: cut(Cut::Idle),
            timeout_body_rate: cut(Cut::BodyRate),
            timeout_write_stall: cut(Cut::WriteStall),
            timeout_raw_idle: cut(Cut::RawIdle),
            timeout_answer: cut(Cut::Answer),
            fast_answered: fast(Fast::Answered),
            fast_handoff_request: fast(Fast::HandoffRequest),
            fast_handoff_head: fast(Fast::HandoffHead),
            fast_handoff_no_answer: fast(Fast::HandoffNoAnswer),
            fast_read_ahead_full: fast(Fast::ReadAheadFull),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_visitor_bound_follows_the_descriptor_limit() {
        let mut limits = IngressLimits::default();
        assert!(!limits.fit_descriptors(1 << 20));
        assert_eq!(limits.max_visitors, MAX_VISITORS);
        assert!(limits.fit_descriptors(1_024));
        assert_eq!(limits.max_visitors, 768);
        assert!(limits.fit_descriptors(10));
        assert_eq!(limits.max_visitors, 16);
    }

    #[test]
    fn limits_read_from_toml_keep_defaults_for_what_is_not_given() {
        let limits: IngressLimits =
            toml::from_str("raw_tcp_idle = 60\nvisitors_per_source = 8\n").unwrap();
        assert_eq!(limits.raw_tcp_idle, Duration::from_secs(60));
        assert_eq!(limits.visitors_per_source, 8);
        assert_eq!(limits.max_visitors, MAX_VISITORS);
        assert!(toml::from_str::<IngressLimits>("nope = 1").is_err());
    }

    #[test]
    fn each_cut_has_its_own_counter() {
        let stats = IngressStats::default();
        // Cut number i is counted i + 1 times, so a field wired to the wrong
        // cut (or two fields to one) shows.
        let cuts = [
            Cut::SourceFull,
            Cut::SourceHandshakes,
            Cut::Shed,
            Cut::Handshake,
            Cut::FirstRequest,
            Cut::Idle,
            Cut::BodyRate,
            Cut::WriteStall,
            Cut::RawIdle,
            Cut::Answer,
        ];
        for (i, why) in cuts.into_iter().enumerate() {
            for _ in 0..=i {
                stats.cut(why);
            }
        }
        let c = stats.counters();
        assert_eq!(
            [
                c.refused_source_full,
                c.refused_source_handshakes,
                c.shed,
                c.timeout_handshake,
                c.timeout_first_request,
                c.timeout_idle,
                c.timeout_body_rate,
                c.timeout_write_stall,
                c.timeout_raw_idle,
                c.timeout_answer,
            ],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
        );
    }

    #[test]
    fn each_fast_path_outcome_has_its_own_counter() {
        let stats = IngressStats::default();
        let outcomes = [
            Fast::Answered,
            Fast::HandoffRequest,
            Fast::HandoffHead,
            Fast::HandoffNoAnswer,
            Fast::ReadAheadFull,
        ];
        for (i, what) in outcomes.into_iter().enumerate() {
            for _ in 0..=i {
                stats.fast(what);
            }
        }
        let c = stats.counters();
        assert_eq!(
            [
                c.fast_answered,
                c.fast_handoff_request,
                c.fast_handoff_head,
                c.fast_handoff_no_answer,
                c.fast_read_ahead_full,
            ],
            [1, 2, 3, 4, 5]
        );
    }
}
