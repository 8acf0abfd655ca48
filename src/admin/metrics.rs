//! `/metrics`: the node's counters in Prometheus' text format.

use std::fmt::Write as _;

use crate::node::status::NodeStatus;

/// The status as Prometheus text.
pub(super) fn render(s: &NodeStatus) -> String {
    let mut out = String::new();
    let count = |state| s.members.iter().filter(|m| m.state == state).count();
    let alive = count(specter_gossip::MemberState::Alive);
    let suspect = count(specter_gossip::MemberState::Suspect);
    let down = count(specter_gossip::MemberState::Down);
    let _ = writeln!(out, "# TYPE specter_members gauge");
    for (state, n) in [("alive", alive), ("suspect", suspect), ("down", down)] {
        let _ = writeln!(out, "specter_members{{state=\"{state}\"}} {n}");
    }
    let g = s.gossip;
    let t = s.transport;
    for (name, v) in [
        ("specter_gossip_packets_out_total", g.packets_out),
        ("specter_gossip_bytes_out_total", g.bytes_out),
        ("specter_gossip_packets_in_total", g.packets_in),
        ("specter_gossip_bytes_in_total", g.bytes_in),
        ("specter_gossip_spoofed_dropped_total", g.spoofed_dropped),
        ("specter_gossip_invalid_dropped_total", g.invalid_dropped),
        (
            "specter_gossip_refuted_suspicions_total",
            g.refuted_suspicions,
        ),
        ("specter_quic_datagrams_sent_total", t.datagrams_sent),
        (
            "specter_quic_datagrams_received_total",
            t.datagrams_received,
        ),
        (
            "specter_quic_datagram_send_errors_total",
            t.datagram_send_errors,
        ),
        ("specter_quic_inbox_dropped_total", t.inbox_dropped),
        ("specter_quic_handshakes_failed_total", t.handshakes_failed),
        (
            "specter_quic_handshakes_refused_total",
            t.handshakes_refused,
        ),
        ("specter_quic_wrong_peer_total", t.wrong_peer),
    ] {
        let _ = writeln!(out, "# TYPE {name} counter\n{name} {v}");
    }
    let _ = writeln!(
        out,
        "# TYPE specter_quic_connections gauge\nspecter_quic_connections {}",
        t.connections
    );
    let m = s.membership_timers;
    for (name, v) in [
        ("specter_gossip_worst_rtt_seconds", m.worst_rtt_ms),
        ("specter_gossip_probe_rtt_seconds", m.probe_rtt_ms),
        ("specter_gossip_probe_period_seconds", m.probe_period_ms),
        (
            "specter_gossip_suspect_to_down_seconds",
            m.suspect_to_down_ms,
        ),
    ] {
        let _ = writeln!(out, "# TYPE {name} gauge\n{name} {:.3}", v as f64 / 1e3);
    }
    let i = &s.ingress;
    let c = i.counters;
    let _ = writeln!(
        out,
        "# TYPE specter_ingress_visitors gauge\nspecter_ingress_visitors {}",
        i.visitors
    );
    let _ = writeln!(
        out,
        "# TYPE specter_ingress_max_visitors gauge\nspecter_ingress_max_visitors {}",
        i.limits.max_visitors
    );
    let _ = writeln!(
        out,
        "# TYPE specter_ingress_idle_upstreams gauge\nspecter_ingress_idle_upstreams {}",
        i.idle_upstreams
    );
    for (name, v) in [
        ("specter_ingress_accepted_total", c.accepted),
        ("specter_ingress_accept_errors_total", c.accept_errors),
        ("specter_ingress_misdirected_total", c.misdirected),
        ("specter_ingress_broken_total", c.broken),
        ("specter_ingress_shed_total", c.shed),
    ] {
        let _ = writeln!(out, "# TYPE {name} counter\n{name} {v}");
    }
    let _ = writeln!(out, "# TYPE specter_ingress_refused_total counter");
    for (reason, v) in [
        ("source_full", c.refused_source_full),
        ("source_handshakes", c.refused_source_handshakes),
    ] {
        let _ = writeln!(
            out,
            "specter_ingress_refused_total{{reason=\"{reason}\"}} {v}"
        );
    }
    let _ = writeln!(out, "# TYPE specter_ingress_timeouts_total counter");
    for (stage, v) in [
        ("handshake", c.timeout_handshake),
        ("first_request", c.timeout_first_request),
        ("idle", c.timeout_idle),
        ("body_rate", c.timeout_body_rate),
        ("write_stall", c.timeout_write_stall),
        ("raw_idle", c.timeout_raw_idle),
    ] {
        let _ = writeln!(
            out,
            "specter_ingress_timeouts_total{{stage=\"{stage}\"}} {v}"
        );
    }
    out
}
