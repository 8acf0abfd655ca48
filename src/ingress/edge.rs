//! The node's public TLS identity: the operator's wildcard certificate for
//! `*.<domain>`, one rustls config per ALPN family, and the alerts that
//! refuse a raw-TCP visitor before the handshake ([`Refusal`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use specter_tunnel::protocol::{ALPN_CHECK, ALPN_TCP};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// The public TLS configuration of a node.
pub struct Edge {
    pub(super) tcp: Arc<rustls::ServerConfig>,
    pub(super) http: Arc<rustls::ServerConfig>,
    pub(super) domain: String,
}

impl Edge {
    /// Loads the wildcard certificate and key for `*.domain`.
    pub fn load(domain: &str, cert: &Path, key: &Path) -> Result<Edge> {
        crate::files::check_private(key).map_err(anyhow::Error::msg)?;
        let cert_pem =
            std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        let key_pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing {}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .with_context(|| format!("parsing {}", key.display()))?;
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let leaf = chain
            .first()
            .with_context(|| format!("{} holds no certificate", cert.display()))?;
        covers(leaf, &domain).with_context(|| format!("{}", cert.display()))?;
        let mut tcp = rustls::ServerConfig::builder_with_provider(crate::net::tls::provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the edge certificate and key do not match")?;
        let mut http = tcp.clone();
        tcp.alpn_protocols = vec![ALPN_TCP.to_vec(), ALPN_CHECK.to_vec()];
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Edge {
            tcp: Arc::new(tcp),
            http: Arc::new(http),
            domain,
        })
    }

    /// The domain tunnels are named under.
    pub fn domain(&self) -> &str {
        &self.domain
    }
}

/// Checks that `leaf` is valid now and names every tunnel of `domain`
/// (`*.domain` among its DNS names): a certificate for another domain, or an
/// expired one, would fail every visitor's handshake.
fn covers(leaf: &CertificateDer<'_>, domain: &str) -> Result<()> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| anyhow::anyhow!("the certificate does not parse: {e}"))?;
    anyhow::ensure!(
        cert.validity().is_valid(),
        "the certificate is not valid now (valid {} to {})",
        cert.validity().not_before,
        cert.validity().not_after
    );
    let wildcard = format!("*.{domain}");
    let names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.trim_end_matches('.').to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    anyhow::ensure!(
        names.contains(&wildcard),
        "the certificate is not for {wildcard} (it names {names:?})"
    );
    Ok(())
}

/// Why a visitor is refused before its TLS handshake, sent as a fatal TLS
/// alert (the only thing a TLS client reads at that point). `specter
/// connect` turns each back into a sentence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No such tunnel (or a name outside the domain): `unrecognized_name`.
    UnknownName,
    /// The tunnel is registered but no attachment answered: `internal_error`.
    Unreachable,
    /// The tunnel's client could not reach its target: `access_denied`.
    TargetRefused,
}

impl Refusal {
    /// The TLS alert description code.
    pub const fn alert(self) -> u8 {
        match self {
            Refusal::UnknownName => 112,
            Refusal::Unreachable => 80,
            Refusal::TargetRefused => 49,
        }
    }

    /// The refusal a received alert stands for, if any.
    pub fn of_alert(alert: rustls::AlertDescription) -> Option<Refusal> {
        match alert {
            rustls::AlertDescription::UnrecognisedName => Some(Refusal::UnknownName),
            rustls::AlertDescription::InternalError => Some(Refusal::Unreachable),
            rustls::AlertDescription::AccessDenied => Some(Refusal::TargetRefused),
            _ => None,
        }
    }

    /// What a visitor is told.
    pub fn explain(self, host: &str) -> String {
        match self {
            Refusal::UnknownName => format!("no tunnel named {host} is registered"),
            Refusal::Unreachable => {
                format!("tunnel {host} is registered, but none of its attachments answered")
            }
            Refusal::TargetRefused => {
                format!("tunnel {host}: its client could not reach the service it exposes")
            }
        }
    }
}

/// Answers a ClientHello with the fatal alert for `why` (sent in the clear,
/// as alerts before the handshake are) and closes.
pub(crate) async fn refuse<IO: AsyncWrite + Unpin>(io: &mut IO, why: Refusal) {
    // TLS record: alert (21), legacy version 3.3, length 2; fatal (2), code.
    let alert: [u8; 7] = [21, 3, 3, 0, 2, 2, why.alert()];
    let _ = io.write_all(&alert).await;
    let _ = io.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edge_certificate_must_name_every_tunnel_of_the_domain() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::pki::make_ca("test").unwrap();
        let edge = crate::pki::make_edge_cert(&ca, "tun.example").unwrap();
        let (cert, key) = (dir.path().join("e.crt"), dir.path().join("e.key"));
        std::fs::write(&cert, &edge.cert).unwrap();
        crate::pki::write_file(&key, &edge.key, true, true).unwrap();
        assert!(Edge::load("tun.example", &cert, &key).is_ok());
        assert!(Edge::load("TUN.example.", &cert, &key).is_ok());
        let err = Edge::load("other.example", &cert, &key).err().unwrap();
        assert!(
            format!("{err:#}").contains("not for *.other.example"),
            "{err:#}"
        );
    }

    #[test]
    fn each_refusal_reads_back_from_its_alert() {
        for why in [
            Refusal::UnknownName,
            Refusal::Unreachable,
            Refusal::TargetRefused,
        ] {
            let alert = rustls::AlertDescription::from(why.alert());
            assert_eq!(Refusal::of_alert(alert), Some(why));
        }
        assert_eq!(
            Refusal::of_alert(rustls::AlertDescription::HandshakeFailure),
            None
        );
    }
}
