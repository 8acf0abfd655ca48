//! Raw TCP over TLS: a visitor that offers ALPN `specter-tcp` gets a byte
//! stream to the tunnel's target. The node opens the tunnel stream before it
//! finishes the TLS handshake, so an unknown name is refused with a TLS
//! alert. [`Visitor`] and [`connect_listener`] are the visitor side
//! (`specter connect`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use specter_tunnel::protocol::{ALPN_CHECK, ALPN_TCP, Visit, VisitKind};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::StartHandshake;
use tokio_util::sync::CancellationToken;

use super::accept::accept_loop;
use super::admission::{Admission, Bounds};
use super::edge::{Refusal, refuse};
use super::limits::{Cut, IngressStats};
use super::shared::{Ingress, idle};
use super::watched::Watched;
use crate::node::tunnels::visit::OpenError;

/// Carries one raw-TCP visitor whose ClientHello named tunnel `name`. A
/// tunnel that cannot be opened is refused with the alert that says why
/// ([`Refusal`]); a visitor that simply hangs up is a normal end.
pub(super) async fn visit(
    mut start: StartHandshake<Watched<TcpStream>>,
    name: String,
    visitor: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    ingress: &Arc<Ingress>,
) -> Result<(), String> {
    let header = Visit {
        name: name.clone(),
        visitor,
        kind: VisitKind::Tcp,
        early: bytes::Bytes::new(),
    };
    let mut tunnel = match ingress.tunnels.open(&name, &header).await {
        Ok(pair) => pair,
        Err(err) => return refused(&mut start, &name, err).await,
    };
    let (mut tls, slot) = ingress.finish_handshake(start, config).await?;
    let idle_limit = ingress.limits.raw_tcp_idle;
    let stall = ingress.limits.write_stall_timeout;
    tokio::select! {
        spliced = crate::wire::splice_stream(&mut tunnel.send, &mut tunnel.recv, &mut tls, stall) => match spliced {
            Ok(_) => {}
            // Most TCP clients hang up without a TLS close_notify: an end,
            // not a failure.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => {
                // One side broke mid-stream: the other must not see a clean
                // end (a dropped QUIC stream would be finished, a dropped
                // socket closed with FIN, and a cut answer would look whole).
                ingress.stats.broken();
                tracing::info!(%visitor, tunnel = %name, err = %e, "raw TCP visitor broken mid-stream; both sides reset");
                tunnel.reset();
                let _ = tls.get_ref().0.get_ref().set_zero_linger();
            }
        },
        () = idle(&slot, idle_limit) => {
            ingress.stats.cut(Cut::RawIdle);
            tracing::debug!(%visitor, tunnel = %name, "closing an idle raw TCP visitor");
        }
    }
    Ok(())
}

/// Refuses the visitor asking for tunnel `name` with the alert that says
/// why it could not be opened; the reason, for the log.
async fn refused(
    start: &mut StartHandshake<Watched<TcpStream>>,
    name: &str,
    err: OpenError,
) -> Result<(), String> {
    let why = match err {
        OpenError::Unknown => Refusal::UnknownName,
        OpenError::Unreachable | OpenError::NotReady => Refusal::Unreachable,
        OpenError::TargetRefused => Refusal::TargetRefused,
    };
    refuse(&mut start.io, why).await;
    Err(why.explain(name))
}

/// Answers a visitor that only asks whether tunnel `name` is registered
/// (ALPN [`ALPN_CHECK`]): the alert that says why not, or a completed
/// handshake closed at once. No stream is opened to the tunnel's client.
pub(super) async fn check(
    mut start: StartHandshake<Watched<TcpStream>>,
    name: String,
    config: Arc<rustls::ServerConfig>,
    ingress: &Arc<Ingress>,
) -> Result<(), String> {
    if let Err(err) = ingress.tunnels.known(&name).await {
        return refused(&mut start, &name, err).await;
    }
    let (mut tls, _slot) = ingress.finish_handshake(start, config).await?;
    let _ = tls.shutdown().await;
    Ok(())
}

/// The visitor side of `specter connect`: TLS to one node's ingress for one
/// tunnel, configured once and used for every connection.
pub struct Visitor {
    connector: tokio_rustls::TlsConnector,
    checker: tokio_rustls::TlsConnector,
    host: rustls::pki_types::ServerName<'static>,
    via: String,
}

impl Visitor {
    /// Trusts the CA certificates in `ca_pem` for the ingress of `via`, and
    /// asks for tunnel `host` (`NAME.DOMAIN`).
    pub fn new(via: &str, host: &str, ca_pem: &[u8]) -> Result<Self> {
        let (roots, _) = crate::net::tls::roots_from_pem(ca_pem)?;
        let config = rustls::ClientConfig::builder_with_provider(crate::net::tls::provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let with_alpn = |alpn: &[u8]| {
            let mut config = config.clone();
            config.alpn_protocols = vec![alpn.to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(config))
        };
        Ok(Visitor {
            connector: with_alpn(ALPN_TCP),
            checker: with_alpn(ALPN_CHECK),
            host: rustls::pki_types::ServerName::try_from(host.to_string())
                .context("invalid host name")?,
            via: via.to_string(),
        })
    }

    /// Opens one TLS connection through the ingress. A node's refusal
    /// (unknown tunnel, no attachment answered, target refused) is an error
    /// that says so.
    pub async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.handshake(&self.connector).await
    }

    /// Asks the ingress whether the tunnel is registered, without a
    /// connection to its target: the same errors as [`Self::connect`] for
    /// an unknown or unreachable name.
    pub async fn check(&self) -> Result<()> {
        let mut tls = self.handshake(&self.checker).await?;
        let _ = tls.shutdown().await;
        Ok(())
    }

    async fn handshake(
        &self,
        connector: &tokio_rustls::TlsConnector,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let via = &self.via;
        let tcp = TcpStream::connect(via)
            .await
            .with_context(|| format!("connecting to {via}"))?;
        let _ = tcp.set_nodelay(true);
        match connector.connect(self.host.clone(), tcp).await {
            Ok(tls) => Ok(tls),
            Err(err) => {
                let host = self.host.to_str();
                match refusal_in(&err) {
                    Some(Refusal::UnknownName) => {
                        return Err(anyhow::Error::new(UnknownTunnel(format!(
                            "{} (via {via})",
                            Refusal::UnknownName.explain(&host)
                        ))));
                    }
                    Some(why) => anyhow::bail!("{} (via {via})", why.explain(&host)),
                    None => {}
                }
                Err(err).with_context(|| format!("TLS with {via} for {host}"))
            }
        }
    }
}

/// The node knows no tunnel by the name asked for.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UnknownTunnel(String);

/// The node's refusal an error from the TLS handshake carries, if any.
pub fn refusal_in(err: &std::io::Error) -> Option<Refusal> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Refusal::of_alert(*alert),
        _ => None,
    }
}

/// Local connections `specter connect --listen` serves at once; all come
/// from this machine, so no per-source share applies.
pub const CONNECT_MAX_LOCAL: usize = 1_024;

/// `specter connect --listen`: each local connection gets its own TLS
/// connection through `visitor`, until `stop` fires.
pub async fn connect_listener(
    listener: TcpListener,
    visitor: Arc<Visitor>,
    stop: CancellationToken,
) {
    let stats = Arc::new(IngressStats::default());
    let admission = Admission::new(
        Bounds {
            total: CONNECT_MAX_LOCAL,
            per_source: CONNECT_MAX_LOCAL,
            handshakes_per_source: CONNECT_MAX_LOCAL,
        },
        stats.clone(),
    );
    accept_loop(
        listener,
        stop,
        admission,
        stats,
        false,
        |mut local, _, ticket| {
            let visitor = visitor.clone();
            async move {
                let carry = async {
                    match visitor.connect().await {
                        Ok(mut tls) => {
                            let spliced =
                                specter_tunnel::splice::splice(&mut local, &mut tls).await;
                            if let Err(err) = spliced {
                                tracing::debug!(%err, "connection ended with an error");
                            }
                        }
                        Err(err) => tracing::warn!("{err:#}"),
                    }
                };
                tokio::select! {
                    () = carry => {}
                    // Shed: the listener is full and this one was idlest.
                    () = ticket.slot().closed() => {}
                }
            }
        },
    )
    .await;
}
