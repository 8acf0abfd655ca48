//! `/metrics` in the OpenMetrics text format (which Prometheus reads): the
//! counters and gauges of a `/status` snapshot, and the node's histograms
//! ([`crate::node::histograms`]).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use specter_gossip::MemberState;

use crate::node::histograms::Histograms;
use crate::node::status::NodeStatus;

/// The content type of [`render`]'s text.
pub(super) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything as OpenMetrics text.
pub(super) fn render(status: NodeStatus, histograms: &Histograms) -> String {
    let mut registry = Registry::with_prefix("specter");
    let h = histograms.clone();
    registry.register(
        "visit_open_seconds",
        "From a visitor's request for a tunnel to a stream to its client, for visits that opened",
        h.visit_open,
    );
    registry.register("visits", "Visits by how their opening ended", h.visits);
    registry.register(
        "dht_lookup_seconds",
        "DHT reads and writes started at this node, to their outcome",
        h.lookup,
    );
    registry.register(
        "dht_lookup_hops",
        "Requests each DHT read or write took (0: this node holds the key)",
        h.lookup_hops,
    );
    registry.register_collector(Box::new(Snapshot(status)));
    let mut out = String::new();
    if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(%err, "encoding /metrics failed");
    }
    out
}

/// A `/status` snapshot, encoded at scrape time.
#[derive(Debug)]
struct Snapshot(NodeStatus);

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge<N>(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: N) -> std::fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn count(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// One family with a label per value: counters, or (`counter` false)
/// gauges.
fn labelled(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &'static str,
    counter: bool,
    values: &[(&'static str, u64)],
) -> std::fmt::Result {
    let kind = if counter {
        ConstCounter::new(0u64).metric_type()
    } else {
        ConstGauge::new(0i64).metric_type()
    };
    let mut family = e.encode_descriptor(name, help, None, kind)?;
    for (value, v) in values {
        let labels = [(label, *value)];
        let sample = family.encode_family(&labels)?;
        if counter {
            ConstCounter::new(*v).encode(sample)?;
        } else {
            ConstGauge::new(count(*v)).encode(sample)?;
        }
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = &self.0;
        let e = &mut e;
        gauge(
            e,
            "ready",
            "1 once the node serves visitors and clients",
            i64::from(s.ready),
        )?;
        let in_state = |state| s.members.iter().filter(|m| m.state == state).count() as u64;
        labelled(
            e,
            "members",
            "Members this node tracks, by state",
            "state",
            false,
            &[
                ("alive", in_state(MemberState::Alive)),
                ("suspect", in_state(MemberState::Suspect)),
                ("down", in_state(MemberState::Down)),
            ],
        )?;

        let g = s.gossip;
        let meta_refused_help = format!(
            "Metadata broadcasts about a new node refused: the table held its bound ({} nodes)",
            specter_gossip::MAX_META_ENTRIES
        );
        for (name, help, v) in [
            ("gossip_packets_out", "Gossip packets sent", g.packets_out),
            ("gossip_bytes_out", "Gossip bytes sent", g.bytes_out),
            ("gossip_packets_in", "Gossip packets received", g.packets_in),
            ("gossip_bytes_in", "Gossip bytes received", g.bytes_in),
            (
                "gossip_spoofed_dropped",
                "Gossip packets dropped: the sender is not who the connection proves",
                g.spoofed_dropped,
            ),
            (
                "gossip_invalid_dropped",
                "Gossip packets that did not decode",
                g.invalid_dropped,
            ),
            (
                "gossip_refuted_suspicions",
                "Suspicions that ran out after the member had refuted them",
                g.refuted_suspicions,
            ),
            ("gossip_meta_refused", &meta_refused_help, g.meta_refused),
        ] {
            counter(e, name, help, v)?;
        }
        let m = s.membership_timers;
        for (name, help, ms) in [
            (
                "gossip_worst_rtt_seconds",
                "Worst smoothed QUIC round trip to a live member",
                m.worst_rtt_ms,
            ),
            (
                "gossip_probe_rtt_seconds",
                "How long a probe waits for its answer",
                m.probe_rtt_ms,
            ),
            (
                "gossip_probe_period_seconds",
                "Time between probes",
                m.probe_period_ms,
            ),
            (
                "gossip_suspect_to_down_seconds",
                "How long a suspected member has to refute",
                m.suspect_to_down_ms,
            ),
        ] {
            gauge(e, name, help, ms as f64 / 1e3)?;
        }

        let t = s.transport;
        gauge(
            e,
            "quic_connections",
            "Node connections open",
            count(t.connections),
        )?;
        gauge(
            e,
            "quic_peer_streams",
            "Streams other nodes hold open to this node (forwarded visitors, DHT requests)",
            count(t.peer_streams),
        )?;
        gauge(
            e,
            "quic_duplicates_draining",
            "Node connections that lost a simultaneous dial, kept open until their streams end (at most one per node)",
            count(t.duplicates_draining),
        )?;
        for (name, help, v) in [
            (
                "quic_datagrams_sent",
                "QUIC datagrams sent",
                t.datagrams_sent,
            ),
            (
                "quic_datagrams_received",
                "QUIC datagrams received",
                t.datagrams_received,
            ),
            (
                "quic_datagram_send_errors",
                "QUIC datagrams that could not be sent",
                t.datagram_send_errors,
            ),
            (
                "quic_inbox_dropped",
                "Datagrams dropped because the gossip inbox was full",
                t.inbox_dropped,
            ),
            (
                "quic_handshakes_failed",
                "Node handshakes that failed",
                t.handshakes_failed,
            ),
            (
                "quic_stream_limit_raises",
                "Times a node connection's stream limit was doubled (up to MAX_STREAMS_PER_PEER)",
                t.stream_limit_raises,
            ),
            (
                "quic_handshakes_refused",
                "Handshakes refused over the concurrent handshake bound",
                t.handshakes_refused,
            ),
            (
                "dht_frames_refused",
                "DHT request frames refused as larger than the frame limit",
                t.frames_refused,
            ),
            (
                "dht_requests_refused",
                "DHT requests from other nodes answered Unavailable because the queue of requests waiting to be served was full",
                t.dht_requests_refused,
            ),
            (
                "dht_requests_late",
                "DHT requests from other nodes answered Unavailable because they were not served within the 2 s request deadline",
                t.dht_requests_late,
            ),
            (
                "peers_presumed_silent",
                &format!(
                    "Times a node was presumed dead because nothing came from it for {} ms while a DHT request or a forwarded visit waited on it",
                    crate::net::liveness::PEER_SILENCE.as_millis()
                ),
                t.presumed_silent,
            ),
            (
                "clients_busy",
                "Client connections closed busy because the queue of clients waiting to be served was full",
                t.clients_busy,
            ),
            (
                "quic_wrong_peer",
                "Dials that reached another node than the one meant",
                t.wrong_peer,
            ),
            (
                "quic_duplicates_closed",
                "Duplicate connections to one node settled: the loser closed, or drained of its streams first",
                t.duplicates_closed,
            ),
            (
                "quic_duplicate_streams_cut",
                "Streams cut because the connection they were on lost a simultaneous dial and was closed before they ended",
                t.duplicate_streams_cut,
            ),
            (
                "quic_idle_closed",
                "Node connections closed as idle",
                t.idle_closed,
            ),
        ] {
            counter(e, name, help, v)?;
        }

        let d = &s.dht;
        gauge(
            e,
            "dht_ring_size",
            "Nodes on the ring, this one included",
            count(d.ring_size),
        )?;
        labelled(
            e,
            "dht_records",
            "Records held, by role",
            "role",
            false,
            &[
                ("owner", d.records_owned as u64),
                ("replica", d.records_replica as u64),
            ],
        )?;
        for (name, help, v) in [
            ("dht_requests", "DHT requests served", d.stats.requests),
            (
                "dht_redirects",
                "DHT requests answered with a closer node",
                d.stats.redirects,
            ),
            (
                "dht_repaired",
                "Records repaired on replicas",
                d.stats.repaired,
            ),
            (
                "dht_handed_off",
                "Records handed to a new owner",
                d.stats.handed_off,
            ),
            (
                "dht_sync_answers_cut",
                "Anti-entropy answers that left records out to fit a frame (sent in later rounds)",
                d.stats.sync_answers_cut,
            ),
            (
                "dht_stabilize_mismatches",
                "Successor checks that found the ring changed",
                d.stats.stabilize_mismatches,
            ),
        ] {
            counter(e, name, help, v)?;
        }

        gauge(
            e,
            "tunnels_attached",
            "Tunnels attached at this node",
            count(s.tunnels_total),
        )?;
        let connections = s.tunnel_connections;
        gauge(
            e,
            "tunnel_client_connections",
            "Client connections holding tunnels here",
            count(connections),
        )?;

        labelled(
            e,
            "clients_refused",
            "Client hellos refused by a quota of their key",
            "quota",
            true,
            &[
                ("names_per_key", s.clients.refused_names),
                ("claims_per_minute", s.clients.refused_rate),
            ],
        )?;
        counter(
            e,
            "forward_waits",
            "Forwarded visit attempts that waited for a stream of their tunnel to the attached node (forwards_per_tunnel)",
            s.clients.forward_waits,
        )?;
        counter(
            e,
            "forwards_broken",
            "Visitors forwarded here whose splice broke, stalled past the deadline, or was given up by the entry or the client (stopped reading); both sides reset",
            s.clients.forwards_broken,
        )?;
        gauge(
            e,
            "tunnel_clients_detaching",
            "Client connections detached at their client's request whose visitor streams are still running",
            count(s.clients.detaching),
        )?;
        counter(
            e,
            "tunnel_detaches_cut",
            "Detached client connections that ended with visitor streams cut (at the client's or the node's deadline, a client stopped at once, or closed past the per-client bound of lingering connections)",
            s.clients.detaches_cut,
        )?;
        counter(
            e,
            "tunnel_route_refreshes_skipped",
            &format!(
                "Background route lookups for pooled HTTP upstreams not started because {} were under way (the upstream was reused unchecked)",
                crate::node::tunnels::visit::ROUTE_REFRESHES
            ),
            s.clients.route_refreshes_skipped,
        )?;
        counter(
            e,
            "client_peer_requests_coalesced",
            "Peer-sample requests from clients answered together with an earlier one (at most one answer per 250 ms and client)",
            s.clients.peers_coalesced,
        )?;
        gauge(
            e,
            "forwarding_pairs",
            "Tunnel and node pairs with forwarded streams open or visits waiting for one",
            count(s.clients.forwarding),
        )?;

        let i = &s.ingress;
        let c = i.counters;
        gauge(
            e,
            "ingress_visitors",
            "Visitor connections held now",
            count(i.visitors),
        )?;
        gauge(
            e,
            "ingress_max_visitors",
            "Visitor connections allowed at once",
            count(i.limits.max_visitors),
        )?;
        gauge(
            e,
            "ingress_idle_upstreams",
            "Idle upstream HTTP connections kept for reuse",
            count(i.idle_upstreams),
        )?;
        for (name, help, v) in [
            (
                "ingress_accepted",
                "Visitor connections accepted",
                c.accepted,
            ),
            ("ingress_accept_errors", "Failed accepts", c.accept_errors),
            (
                "ingress_misdirected",
                "Requests for a host the connection was not opened for",
                c.misdirected,
            ),
            (
                "ingress_broken",
                "Answers cut because their tunnel broke mid-way",
                c.broken,
            ),
            (
                "ingress_shed",
                "Visitor connections closed at once: the node was full",
                c.shed,
            ),
        ] {
            counter(e, name, help, v)?;
        }
        labelled(
            e,
            "ingress_refused",
            "Visitor connections refused, by reason",
            "reason",
            true,
            &[
                ("source_full", c.refused_source_full),
                ("source_handshakes", c.refused_source_handshakes),
            ],
        )?;
        labelled(
            e,
            "ingress_timeouts",
            "Visitor connections cut at a deadline, by stage (answer: a request answered 504 because its target had not begun its answer)",
            "stage",
            true,
            &[
                ("handshake", c.timeout_handshake),
                ("first_request", c.timeout_first_request),
                ("idle", c.timeout_idle),
                ("body_rate", c.timeout_body_rate),
                ("write_stall", c.timeout_write_stall),
                ("raw_idle", c.timeout_raw_idle),
                ("answer", c.timeout_answer),
            ],
        )?;
        counter(
            e,
            "ingress_fast_requests",
            "HTTP/1.1 requests answered on the fast path (HTTPS, and plain HTTP in proxy mode; pages the node wrote included)",
            c.fast_answered,
        )?;
        labelled(
            e,
            "ingress_fast_handoffs",
            "Visitor connections the HTTP/1.1 fast path handed to the full proxy, by reason (request: one it does not carry; head: a head not ended within 64 KiB; no_answer: its pooled stream gave no answer, the request is sent again)",
            "reason",
            true,
            &[
                ("request", c.fast_handoff_request),
                ("head", c.fast_handoff_head),
                ("no_answer", c.fast_handoff_no_answer),
            ],
        )?;
        counter(
            e,
            "ingress_fast_read_ahead_full",
            "Waits for an answer on the fast path during which the visitor sent a head's worth (64 KiB) more and was no longer read",
            c.fast_read_ahead_full,
        )
    }
}
