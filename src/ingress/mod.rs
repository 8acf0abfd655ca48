//! Public ingress: TLS on the node's HTTPS port, terminated with the
//! operator's wildcard certificate for `*.<domain>`; the SNI names the
//! tunnel. A visitor that offers ALPN `specter-tcp` gets raw TCP to the
//! tunnel's target ([`tcp`], whose visitor side is `specter connect`); any
//! other ALPN (`h2`, `http/1.1`, or none) is HTTPS ([`http`]). The
//! plain-HTTP port is [`http`] too, with `Host` naming the tunnel.
//!
//! Every listener here, `specter connect --listen` included, shares one
//! accept loop ([`accept`]) and its concurrency bound; the certificate is
//! [`edge`].

pub mod accept;
pub mod edge;
pub mod http;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;

use specter_tunnel::names::name_in_host;
use specter_tunnel::protocol::ALPN_TCP;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;

use self::accept::accept_loop;
pub use self::edge::Edge;
use self::edge::{HANDSHAKE_TIMEOUT, unrecognized_name};
use crate::node::tunnels::Tunnels;

/// Serves visitors on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    edge: Arc<Edge>,
    tunnels: Arc<Tunnels>,
    stop: CancellationToken,
) {
    accept_loop(listener, stop, move |tcp, visitor| {
        let (edge, tunnels) = (edge.clone(), tunnels.clone());
        async move {
            if let Err(reason) = visit(tcp, visitor, &edge, &tunnels).await {
                tracing::info!(%visitor, %reason, "visitor refused");
            }
        }
    })
    .await;
}

async fn visit(
    tcp: TcpStream,
    visitor: SocketAddr,
    edge: &Edge,
    tunnels: &Arc<Tunnels>,
) -> Result<(), String> {
    let mut start = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp),
    )
    .await
    .map_err(|_| "no TLS client hello in time".to_string())?
    .map_err(|e| format!("not a TLS client hello: {e}"))?;
    let hello = start.client_hello();
    let sni = hello.server_name().unwrap_or_default().to_string();
    let tcp_alpn = hello.alpn().is_some_and(|mut a| a.any(|p| p == ALPN_TCP));
    let Some(name) = name_in_host(&sni, &edge.domain) else {
        unrecognized_name(&mut start.io).await;
        return Err(format!(
            "unknown host {sni:?} (not a tunnel under {})",
            edge.domain
        ));
    };
    if tcp_alpn {
        return tcp::visit(start, name, visitor, edge.tcp.clone(), tunnels).await;
    }
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(edge.http.clone()))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    http::serve(tls, name, visitor, tunnels.clone(), "https").await;
    Ok(())
}

/// Serves plain-HTTP visitors on `listener` until `stop` fires.
pub async fn serve_plain(
    listener: TcpListener,
    domain: String,
    mode: http::HttpMode,
    https_port: Option<u16>,
    tunnels: Arc<Tunnels>,
    stop: CancellationToken,
) {
    let domain: Arc<str> = domain.trim_end_matches('.').to_ascii_lowercase().into();
    accept_loop(listener, stop, move |tcp, visitor| {
        let (domain, tunnels) = (domain.clone(), tunnels.clone());
        http::serve_plain(tcp, visitor, domain, mode, https_port, tunnels)
    })
    .await;
}
