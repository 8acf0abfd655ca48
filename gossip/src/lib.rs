//! SWIM membership for Specter nodes, built on [foca].
//!
//! The model: every node runs one [`Membership`], a pure state machine that owns a
//! foca instance. It never touches sockets or clocks: the driver feeds it
//! packets with [`Membership::handle_data`] (naming the [`NodeId`] that the
//! packet's QUIC connection proved with its certificate), fires timers with
//! [`Membership::handle_timeout`] at [`Membership::poll_timeout`], and drains
//! [`Membership::poll_transmit`] (packets, one QUIC datagram each) and
//! [`Membership::poll_event`] ([`MemberEvent::Up`] / [`MemberEvent::Down`] for
//! the ring). All randomness comes from the seeded RNG given at construction, so
//! the same inputs give the same outputs; [`sim`] runs hundreds of members on a
//! virtual clock this way.
//!
//! Identities are `{node_id, advertise_addr, generation}` ([`NodeIdentity`]); a
//! restarted node uses a higher generation and rejoins at once. Node metadata
//! (ingress address, load) rides foca's custom broadcasts ([`NodeMeta`]).
//!
//! Timing defaults are tuned for < 2 s failure detection on a LAN; see
//! [`config`] for each value and why.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod codec;
pub mod config;
mod identity;
mod membership;
mod meta;
pub mod sim;

pub use config::{GossipConfig, Timing, TimingTracker};
pub use identity::{NodeId, NodeIdentity};
pub use membership::{
    GossipError, GossipStats, MemberEvent, MemberState, MemberView, Membership, Transmit,
};
pub use meta::{MAX_META_ENTRIES, MetaError, NodeMeta};
