//! What all of a node's visitor tasks share: the tunnels, the bounds and
//! counters, one admission for every visitor port, and the certificate.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::admission::{Admission, Bounds, Slot, Ticket};
use super::bodies::ProxyBody;
use super::edge::Edge;
use super::limits::{IngressLimits, IngressStats};
use super::upstream::{RawLink, Upstreams};
use super::watched::Watched;
use crate::node::tunnels::Tunnels;
use hyper::client::conn::http1::SendRequest;

/// What every visitor connection of a node shares: the tunnels, the bounds,
/// the counters, and one admission for all its visitor ports.
pub struct Ingress {
    /// Where visitors go.
    pub tunnels: Arc<Tunnels>,
    /// The bounds.
    pub limits: IngressLimits,
    /// The counters.
    pub stats: Arc<IngressStats>,
    /// Idle HTTP connections to tunnels' targets, reused: hyper's clients,
    /// and the bare tunnel streams of the HTTP/1.1 fast path.
    pub upstreams: Arc<Upstreams<SendRequest<ProxyBody>>>,
    /// The fast path's pool (bounds of its own, the same as `upstreams`').
    pub fast_upstreams: Arc<Upstreams<RawLink>>,
    admission: Arc<Admission>,
    /// The HTTPS port's certificate, if it has one; replaced on reload.
    edge: std::sync::RwLock<Option<Arc<Edge>>>,
    /// The domain tunnels are named under (empty without an HTTPS port);
    /// fixed for the node's life.
    domain: String,
}

impl Ingress {
    /// The ingress of a node serving `tunnels` under `limits`, with `edge`
    /// on its HTTPS port.
    pub fn new(
        tunnels: Arc<Tunnels>,
        limits: IngressLimits,
        edge: Option<Arc<Edge>>,
        stats: Arc<IngressStats>,
    ) -> Arc<Self> {
        let admission = Admission::new(
            Bounds {
                total: limits.max_visitors,
                per_source: limits.visitors_per_source,
                handshakes_per_source: limits.handshakes_per_source,
            },
            stats.clone(),
        );
        let upstreams: Arc<Upstreams<SendRequest<ProxyBody>>> = Upstreams::new();
        let fast_upstreams: Arc<Upstreams<RawLink>> = Upstreams::new();
        let evict = || -> crate::node::tunnels::slots::EvictHook {
            let (idle, fast) = (Arc::downgrade(&upstreams), Arc::downgrade(&fast_upstreams));
            Box::new(move |name, via| {
                if let Some(idle) = idle.upgrade() {
                    idle.evict(name, via);
                }
                if let Some(fast) = fast.upgrade() {
                    fast.evict(name, via);
                }
            })
        };
        // A visit that must wait for a forwarded stream of its tunnel to a
        // node frees the ones idle connections through that node hold.
        tunnels.slots.on_wait(evict());
        // A client leaving this node waits for its open streams to end
        // before it closes: idle upstreams over it would only hold it.
        tunnels.on_detach(evict());
        Arc::new(Ingress {
            tunnels,
            limits,
            stats,
            upstreams,
            fast_upstreams,
            admission,
            domain: edge
                .as_ref()
                .map(|e| e.domain().to_string())
                .unwrap_or_default(),
            edge: std::sync::RwLock::new(edge),
        })
    }

    /// Visitor connections held now.
    pub fn visitors(&self) -> usize {
        self.admission.len()
    }

    /// The domain tunnels are named under (empty without an HTTPS port).
    pub fn edge_domain(&self) -> &str {
        &self.domain
    }

    /// The HTTPS port's certificate in force: each visitor's handshake
    /// takes it when it starts.
    pub fn edge(&self) -> Option<Arc<Edge>> {
        self.edge
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Serves `edge` (for the same domain: [`Edge::load`] is given it) to
    /// visitors from now on; handshakes already under way and connections
    /// already open keep the one they started with. Does nothing on a node
    /// without an HTTPS port.
    pub fn set_edge(&self, edge: Edge) {
        let mut current = self
            .edge
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.is_some() {
            *current = Some(Arc::new(edge));
        }
    }

    /// The admission every visitor port shares.
    pub fn admission(&self) -> Arc<Admission> {
        self.admission.clone()
    }

    /// Completes a visitor's TLS handshake within its deadline (counted if
    /// it passes); the connection then stops counting as a handshake.
    pub async fn finish_handshake(
        &self,
        start: tokio_rustls::StartHandshake<Watched<TcpStream>>,
        config: Arc<rustls::ServerConfig>,
    ) -> Result<
        (
            tokio_rustls::server::TlsStream<Watched<TcpStream>>,
            Arc<Slot>,
        ),
        String,
    > {
        let handshake = self.limits.handshake_timeout;
        let tls = match tokio::time::timeout(handshake, start.into_stream(config)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
            Err(_) => {
                self.stats.cut(super::limits::Cut::Handshake);
                return Err("TLS handshake timed out".into());
            }
        };
        tls.get_ref().0.ticket().handshake_done();
        let slot = tls.get_ref().0.slot().clone();
        Ok((tls, slot))
    }

    /// A visitor's connection, watched.
    pub fn watch(&self, tcp: TcpStream, ticket: Ticket) -> Watched<TcpStream> {
        Watched::new(
            tcp,
            ticket,
            self.stats.clone(),
            self.limits.write_stall_timeout,
        )
    }
}

/// Completes once `slot` has seen no byte either way for `limit`.
pub async fn idle(slot: &Slot, limit: Duration) {
    loop {
        let left = limit.saturating_sub(slot.idle());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left).await;
    }
}
