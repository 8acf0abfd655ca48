//! Raw TCP over TLS: a visitor that offers ALPN `specter-tcp` gets a byte
//! stream to the tunnel's target. The node opens the tunnel stream before it
//! finishes the TLS handshake, so an unknown name is refused with a TLS
//! alert. [`Visitor`] and [`connect_listener`] are the visitor side
//! (`specter connect`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use specter_tunnel::protocol::{ALPN_TCP, Visit, VisitKind};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::StartHandshake;
use tokio_util::sync::CancellationToken;

use super::accept::accept_loop;
use super::edge::{HANDSHAKE_TIMEOUT, unrecognized_name};
use crate::node::tunnels::Tunnels;
use crate::node::tunnels::visit::OpenError;

/// Carries one raw-TCP visitor whose ClientHello named tunnel `name`.
pub(super) async fn visit(
    mut start: StartHandshake<TcpStream>,
    name: String,
    visitor: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    tunnels: &Arc<Tunnels>,
) -> Result<(), String> {
    let header = Visit {
        name: name.clone(),
        visitor,
        kind: VisitKind::Tcp,
    };
    let (mut send, mut recv) = match tunnels.open(&name, &header).await {
        Ok(pair) => pair,
        Err(OpenError::Unknown) => {
            unrecognized_name(&mut start.io).await;
            return Err(format!("tunnel {name} is not registered"));
        }
        Err(OpenError::TargetRefused) => {
            return Err(format!(
                "tunnel {name}: the client could not reach its target"
            ));
        }
        Err(OpenError::Unreachable) => {
            return Err(format!("tunnel {name} is registered but unreachable"));
        }
    };
    let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let mut tunnel = tokio::io::join(&mut recv, &mut send);
    specter_tunnel::splice::splice(&mut tls, &mut tunnel)
        .await
        .map(|_| ())
        .map_err(|e| format!("tunnel {name}: stream ended: {e}"))
}

/// The visitor side of `specter connect`: TLS to one node's ingress for one
/// tunnel, configured once and used for every connection.
pub struct Visitor {
    connector: tokio_rustls::TlsConnector,
    host: rustls::pki_types::ServerName<'static>,
    via: String,
}

impl Visitor {
    /// Trusts the CA certificates in `ca_pem` for the ingress of `via`, and
    /// asks for tunnel `host` (`NAME.DOMAIN`).
    pub fn new(via: &str, host: &str, ca_pem: &[u8]) -> Result<Self> {
        let (roots, _) = crate::net::tls::roots_from_pem(ca_pem)?;
        let mut config = rustls::ClientConfig::builder_with_provider(crate::net::tls::provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_TCP.to_vec()];
        Ok(Visitor {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            host: rustls::pki_types::ServerName::try_from(host.to_string())
                .context("invalid host name")?,
            via: via.to_string(),
        })
    }

    /// Opens one TLS connection through the ingress.
    pub async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let via = &self.via;
        let tcp = TcpStream::connect(via)
            .await
            .with_context(|| format!("connecting to {via}"))?;
        let _ = tcp.set_nodelay(true);
        self.connector
            .connect(self.host.clone(), tcp)
            .await
            .with_context(|| format!("TLS with {via} for {}", self.host.to_str()))
    }
}

/// `specter connect --listen`: each local connection gets its own TLS
/// connection through `visitor`, until `stop` fires.
pub async fn connect_listener(
    listener: TcpListener,
    visitor: Arc<Visitor>,
    stop: CancellationToken,
) {
    accept_loop(listener, stop, |mut local, _| {
        let visitor = visitor.clone();
        async move {
            match visitor.connect().await {
                Ok(mut tls) => {
                    if let Err(err) = specter_tunnel::splice::splice(&mut local, &mut tls).await {
                        tracing::debug!(%err, "connection ended with an error");
                    }
                }
                Err(err) => tracing::warn!("{err:#}"),
            }
        }
    })
    .await;
}
