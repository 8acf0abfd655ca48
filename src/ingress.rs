//! Public ingress: TLS on the node's HTTPS port. A visitor that offers ALPN
//! `specter-tcp` with SNI `<name>.<domain>` gets raw TCP to the tunnel's
//! local target (`specter connect` is the visitor side). TLS is terminated
//! with the operator's wildcard certificate for `*.<domain>`.
//!
//! Any other ALPN (`h2`, `http/1.1`, or none) is HTTPS: see `http_ingress`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use specter_tunnel::names::name_in_host;
use specter_tunnel::protocol::{ALPN_TCP, Visit, VisitKind};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;

use crate::tunnels::{OpenError, Tunnels};

/// A visitor must finish its TLS handshake this soon; a stalled one costs a
/// task for no longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Visitor connections served at once; beyond this they wait in the kernel's
/// accept queue.
pub const MAX_VISITORS: usize = 4_096;

/// The public TLS configuration of a node.
pub struct Edge {
    tcp: Arc<rustls::ServerConfig>,
    http: Arc<rustls::ServerConfig>,
    domain: String,
}

impl Edge {
    /// Loads the wildcard certificate and key for `*.domain`.
    pub fn load(domain: &str, cert: &Path, key: &Path) -> Result<Edge> {
        let cert_pem =
            std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        let key_pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing {}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .with_context(|| format!("parsing {}", key.display()))?;
        let mut tcp = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the edge certificate and key do not match")?;
        let mut http = tcp.clone();
        tcp.alpn_protocols = vec![ALPN_TCP.to_vec()];
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Edge {
            tcp: Arc::new(tcp),
            http: Arc::new(http),
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
        })
    }
}

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

/// Accepts visitors until `stop` fires, at most [`MAX_VISITORS`] served at
/// once (more wait in the kernel's accept queue), each in its own task.
async fn accept_loop<F, Fut>(listener: TcpListener, stop: CancellationToken, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(MAX_VISITORS));
    loop {
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (tcp, visitor) = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(%err, "ingress accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let task = serve(tcp, visitor);
        tokio::spawn(async move {
            let _permit = permit;
            task.await;
        });
    }
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
    if !tcp_alpn {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(edge.http.clone()))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        crate::http_ingress::serve(tls, name, visitor, tunnels.clone(), "https").await;
        return Ok(());
    }
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
    let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(edge.tcp.clone()))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let mut tunnel = tokio::io::join(&mut recv, &mut send);
    specter_tunnel::splice::splice(&mut tls, &mut tunnel)
        .await
        .map(|_| ())
        .map_err(|e| format!("tunnel {name}: stream ended: {e}"))
}

/// Answers a ClientHello with a fatal `unrecognized_name` alert (sent in the
/// clear, as alerts before the handshake are) and closes.
async fn unrecognized_name(io: &mut TcpStream) {
    use tokio::io::AsyncWriteExt;
    // TLS record: alert (21), legacy version 3.3, length 2; fatal (2),
    // unrecognized_name (112).
    const ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];
    let _ = io.write_all(&ALERT).await;
    let _ = io.shutdown().await;
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
        let (roots, _) = crate::tls::roots_from_pem(ca_pem)?;
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
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

/// Serves plain-HTTP visitors on `listener` until `stop` fires.
pub async fn serve_plain(
    listener: TcpListener,
    domain: String,
    mode: crate::http_ingress::HttpMode,
    https_port: Option<u16>,
    tunnels: Arc<Tunnels>,
    stop: CancellationToken,
) {
    let domain: Arc<str> = domain.trim_end_matches('.').to_ascii_lowercase().into();
    accept_loop(listener, stop, move |tcp, visitor| {
        let (domain, tunnels) = (domain.clone(), tunnels.clone());
        crate::http_ingress::serve_plain(tcp, visitor, domain, mode, https_port, tunnels)
    })
    .await;
}
