//! Public ingress: TLS on the node's HTTPS port, terminated with the
//! operator's wildcard certificate for `*.<domain>`; the SNI names the
//! tunnel. A visitor that offers ALPN `specter-tcp` gets raw TCP to the
//! tunnel's target ([`tcp`], whose visitor side is `specter connect`); any
//! other ALPN (`h2`, `http/1.1`, or none) is HTTPS ([`http`]). The
//! plain-HTTP port is [`http`] too, with `Host` naming the tunnel.
//!
//! Every listener here (and `specter connect --listen`) shares one accept
//! loop ([`accept`]). What a visitor may hold and for how long is in
//! [`limits`]; [`admission`] bounds connections overall and per source,
//! [`watched`] records each one's activity and cuts stalled writes, and
//! [`bodies`] hold request bodies to a rate. The certificate and the alerts
//! that refuse a visitor are [`edge`]; the node's forwarding headers are
//! [`headers`]; what all of a node's visitor tasks share is [`shared`]. A
//! request's tunnel stream opens with the request in its header ([`early`]),
//! unless an idle one is reused ([`upstream`]).

pub mod accept;
pub mod admission;
pub mod bodies;
pub mod early;
pub mod edge;
pub mod fast;
pub mod headers;
pub mod http;
pub mod limits;
pub mod shared;
pub mod tcp;
pub mod upstream;
pub mod watched;

use std::net::SocketAddr;
use std::sync::Arc;

use specter_tunnel::names::name_in_host;
use specter_tunnel::protocol::{ALPN_CHECK, ALPN_TCP};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;

use self::accept::accept_loop;
pub use self::edge::Edge;
use self::edge::{Refusal, refuse};
use self::limits::Cut;
pub use self::shared::Ingress;
use self::watched::Watched;

/// Serves the HTTPS (and raw TCP over TLS) port until `stop` fires.
pub async fn serve(listener: TcpListener, ingress: Arc<Ingress>, stop: CancellationToken) {
    if ingress.edge().is_none() {
        tracing::error!("the HTTPS ingress has no certificate");
        return;
    }
    let (admission, stats) = (ingress.admission(), ingress.stats.clone());
    accept_loop(
        listener,
        stop,
        admission,
        stats,
        true,
        move |tcp, visitor, ticket| {
            let ingress = ingress.clone();
            async move {
                // The certificate in force when the visitor arrived (see
                // `Ingress::set_edge`).
                let Some(edge) = ingress.edge() else { return };
                let io = ingress.watch(tcp, ticket);
                let slot = io.slot().clone();
                tokio::select! {
                    r = visit(io, visitor, &edge, &ingress) => if let Err(reason) = r {
                        tracing::info!(%visitor, %reason, "visitor refused");
                    },
                    () = slot.closed() => {}
                }
            }
        },
    )
    .await;
}

/// A TLS visitor: read the ClientHello, refuse unknown names, then raw TCP
/// or HTTPS by ALPN.
async fn visit(
    io: Watched<TcpStream>,
    visitor: SocketAddr,
    edge: &Edge,
    ingress: &Arc<Ingress>,
) -> Result<(), String> {
    let handshake = ingress.limits.handshake_timeout;
    let start = tokio::time::timeout(
        handshake,
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io),
    )
    .await;
    let mut start = match start {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            // Not TLS at all: nothing worth a line each.
            tracing::debug!(%visitor, err = %e, "not a TLS client hello");
            return Ok(());
        }
        Err(_) => {
            ingress.stats.cut(Cut::Handshake);
            tracing::debug!(%visitor, "no TLS client hello in time");
            return Ok(());
        }
    };
    let hello = start.client_hello();
    let sni = hello.server_name().unwrap_or_default().to_string();
    let tcp_alpn = hello.alpn().is_some_and(|mut a| a.any(|p| p == ALPN_TCP));
    let check_alpn = hello.alpn().is_some_and(|mut a| a.any(|p| p == ALPN_CHECK));
    let Some(name) = name_in_host(&sni, &edge.domain) else {
        refuse(&mut start.io, Refusal::UnknownName).await;
        return Err(format!(
            "unknown host {sni:?} (not a tunnel under {})",
            edge.domain
        ));
    };
    if tcp_alpn {
        return tcp::visit(start, name, visitor, edge.tcp.clone(), ingress).await;
    }
    if check_alpn {
        return tcp::check(start, name, edge.tcp.clone(), ingress).await;
    }
    let (tls, slot) = ingress.finish_handshake(start, edge.http.clone()).await?;
    fast::serve_https(tls, name, visitor, slot, ingress.clone()).await;
    Ok(())
}

/// Serves the plain-HTTP port until `stop` fires.
pub async fn serve_plain(
    listener: TcpListener,
    ingress: Arc<Ingress>,
    domain: String,
    mode: http::HttpMode,
    https_port: Option<u16>,
    stop: CancellationToken,
) {
    let domain: Arc<str> = domain.trim_end_matches('.').to_ascii_lowercase().into();
    let (admission, stats) = (ingress.admission(), ingress.stats.clone());
    accept_loop(listener, stop, admission, stats, false, move |tcp, visitor, ticket| {
        let (domain, ingress) = (domain.clone(), ingress.clone());
        async move {
            let io = ingress.watch(tcp, ticket);
            let slot = io.slot().clone();
            tokio::select! {
                () = fast::serve_plain(io, visitor, slot.clone(), ingress.clone(), domain, mode, https_port) => {}
                () = slot.closed() => {}
            }
        }
    })
    .await;
}
