//! What a node shows of itself (`/status`, the admin API, the demo): one
//! snapshot assembled from what each task publishes.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use specter_dht::Peer;

use super::dht::{DhtHandle, DhtStatus};
use super::membership::{MemberStatus, Readiness, SharedView, TimersStatus, read_view};
use crate::ingress::Ingress;
use crate::ingress::limits::{IngressCounters, IngressLimits};
use crate::net::{Transport, TransportCounters};

/// Everything `/status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    /// This node's id (hex).
    pub id: String,
    /// Its advertised QUIC address.
    pub addr: SocketAddr,
    /// Its current generation.
    pub generation: u64,
    /// Whether another member knows it.
    pub joined: bool,
    /// Whether it serves visitors and clients: it joined and holds the
    /// member list, or it is the first node.
    pub ready: bool,
    /// Every member it tracks (not itself).
    pub members: Vec<MemberStatus>,
    /// Gossip counters.
    pub gossip: specter_gossip::GossipStats,
    /// Membership timers in force and the round trip they follow.
    pub membership_timers: TimersStatus,
    /// Transport counters.
    pub transport: TransportCounters,
    /// Ring neighbours, fingers and records held.
    pub dht: DhtStatus,
    /// Visitor connections held now, the bounds, and the ingress counters.
    pub ingress: IngressStatus,
    /// Tunnels attached here, with their client connection counts (the
    /// first [`STATUS_TUNNELS_SHOWN`] by name).
    pub tunnels: Vec<TunnelStatus>,
    /// Tunnels attached here in all.
    pub tunnels_total: usize,
    /// Client connections holding tunnels here, in all.
    pub tunnel_connections: usize,
    /// Client quotas in force and the hellos they refused.
    pub clients: ClientsStatus,
}

/// The client quota part of `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct ClientsStatus {
    /// The quotas.
    pub limits: super::tunnels::quota::ClientLimits,
    /// Hellos refused: the key would hold too many names here.
    pub refused_names: u64,
    /// Hellos refused: the key registered too many new names this minute.
    pub refused_rate: u64,
    /// Forwarded visit attempts that waited for their tunnel's streams to
    /// the attached node to drop under `forwards_per_tunnel`.
    pub forward_waits: u64,
    /// (tunnel, node) pairs with forwarded streams open or visits waiting
    /// for one now.
    pub forwarding: usize,
    /// Visitors forwarded here whose splice broke or stalled.
    pub forwards_broken: u64,
    /// Client connections detached at their client's request, waiting for
    /// their streams to end.
    pub detaching: u64,
    /// Detached client connections that ended with visitor streams cut.
    pub detaches_cut: u64,
    /// Background route lookups for pooled HTTP upstreams not started,
    /// `ROUTE_REFRESHES` being under way.
    pub route_refreshes_skipped: u64,
    /// Client peer-sample requests answered together with an earlier one.
    pub peers_coalesced: u64,
}

/// At most this many tunnels are listed in `/status` (the totals cover
/// all): in `open` mode any number of keys may attach names, and the status
/// page polls.
pub const STATUS_TUNNELS_SHOWN: usize = 200;

/// A tunnel attached at this node.
#[derive(Clone, Debug, Serialize)]
pub struct TunnelStatus {
    /// Its name.
    pub name: String,
    /// Client connections holding it here.
    pub connections: usize,
}

/// The ingress part of `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct IngressStatus {
    /// Visitor connections held now.
    pub visitors: usize,
    /// Idle upstream HTTP connections kept for reuse.
    pub idle_upstreams: usize,
    /// The bounds in force.
    pub limits: IngressLimits,
    /// Counters.
    pub counters: IngressCounters,
}

/// What the admin API needs of a node: its identity, its DHT, and the views
/// its tasks publish. Cheap to clone.
#[derive(Clone)]
pub struct NodeState {
    /// This node's id and advertised address.
    pub me: Peer,
    /// The DHT.
    pub dht: DhtHandle,
    pub(super) ready: Readiness,
    pub(super) view: SharedView,
    pub(super) transport: Arc<Transport>,
    pub(super) ingress: Arc<Ingress>,
    /// Set when the node was started from files that can be read again.
    pub(super) reloader: Arc<std::sync::OnceLock<Arc<super::reload::Reloader>>>,
}

impl NodeState {
    /// Reloads the node's files (see [`super::reload`]); `None` when it was
    /// not started from files.
    pub async fn reload(&self) -> Option<Result<super::reload::ReloadReport, String>> {
        let reloader = self.reloader.get()?.clone();
        Some(
            tokio::task::spawn_blocking(move || reloader.reload())
                .await
                .unwrap_or_else(|e| Err(format!("reload failed: {e}"))),
        )
    }

    /// A consistent snapshot for `/status`.
    pub fn status(&self) -> NodeStatus {
        let view = read_view(&self.view);
        let attached = self.ingress.tunnels.attached_names();
        let tunnel_connections = attached.iter().map(|(_, c)| c).sum();
        NodeStatus {
            id: self.me.id.to_string(),
            addr: self.me.addr,
            generation: view.generation,
            joined: view.joined,
            ready: self.ready.is_ready(),
            members: view.members,
            gossip: view.gossip,
            membership_timers: view.timers,
            transport: self.transport.counters(),
            dht: self.dht.status(),
            ingress: IngressStatus {
                visitors: self.ingress.visitors(),
                idle_upstreams: self.ingress.upstreams.len() + self.ingress.fast_upstreams.len(),
                limits: self.ingress.limits.clone(),
                counters: self.ingress.stats.counters(),
            },
            tunnels_total: attached.len(),
            tunnel_connections,
            tunnels: attached
                .into_iter()
                .take(STATUS_TUNNELS_SHOWN)
                .map(|(name, connections)| TunnelStatus { name, connections })
                .collect(),
            clients: {
                let t = &self.ingress.tunnels;
                let q = &t.quotas;
                ClientsStatus {
                    limits: t.client_limits().clone(),
                    refused_names: q.refused_names.load(std::sync::atomic::Ordering::Relaxed),
                    refused_rate: q.refused_rate.load(std::sync::atomic::Ordering::Relaxed),
                    forward_waits: t.slots.waited.load(std::sync::atomic::Ordering::Relaxed),
                    forwarding: t.slots.len(),
                    forwards_broken: t.forwards_broken.load(std::sync::atomic::Ordering::Relaxed),
                    detaching: t.detaching.load(std::sync::atomic::Ordering::Relaxed),
                    detaches_cut: t.detaches_cut.load(std::sync::atomic::Ordering::Relaxed),
                    route_refreshes_skipped: t
                        .route_refreshes_skipped
                        .load(std::sync::atomic::Ordering::Relaxed),
                    peers_coalesced: t.peers_coalesced.load(std::sync::atomic::Ordering::Relaxed),
                }
            },
        }
    }
}
