//! The node's public TLS identity: the operator's wildcard certificate for
//! `*.<domain>`, one rustls config per ALPN family, and the alert sent for a
//! name that is not a tunnel.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use specter_tunnel::protocol::ALPN_TCP;
use tokio::net::TcpStream;

/// A visitor must finish its TLS handshake this soon; a stalled one costs a
/// task for no longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The public TLS configuration of a node.
pub struct Edge {
    pub(super) tcp: Arc<rustls::ServerConfig>,
    pub(super) http: Arc<rustls::ServerConfig>,
    pub(super) domain: String,
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
        let mut tcp = rustls::ServerConfig::builder_with_provider(crate::net::tls::provider())
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

    /// The domain tunnels are named under.
    pub fn domain(&self) -> &str {
        &self.domain
    }
}

/// Answers a ClientHello with a fatal `unrecognized_name` alert (sent in the
/// clear, as alerts before the handshake are) and closes.
pub(crate) async fn unrecognized_name(io: &mut TcpStream) {
    use tokio::io::AsyncWriteExt;
    // TLS record: alert (21), legacy version 3.3, length 2; fatal (2),
    // unrecognized_name (112).
    const ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];
    let _ = io.write_all(&ALERT).await;
    let _ = io.shutdown().await;
}
