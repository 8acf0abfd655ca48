//! TLS for node↔node QUIC: mutual authentication against the cluster CA, and
//! the [`NodeId`] each side proves with its certificate.
//!
//! Both sides must present a chain to the cluster CA. The dialing side does not
//! check a DNS name: nodes are addressed by the id their key proves, so after
//! the handshake the transport compares the peer's cert-derived id with the id
//! it meant to reach (see `net::pool`). Only TLS 1.3 is offered (QUIC needs it).

use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use specter_gossip::NodeId;

use crate::pki;

/// ALPN of node↔node connections.
pub const ALPN_NODE: &[u8] = b"specter-node/1";

/// ALPN of node↔node connections whose visit headers may carry the
/// visitor's first bytes (`Visit::early`). Offered first; a node of an
/// earlier release answers with [`ALPN_NODE`], and then gets them after
/// `Ready`, as it expects (a header with early bytes would not decode there).
pub const ALPN_NODE_EARLY: &[u8] = b"specter-node/2";

/// ALPN of client→node connections (a tunnel client's self-signed certificate).
pub const ALPN_CLIENT: &[u8] = b"specter-client/1";

/// [`ALPN_CLIENT`] for a client that takes early bytes in visit headers (see
/// [`ALPN_NODE_EARLY`]).
pub const ALPN_CLIENT_EARLY: &[u8] = b"specter-client/2";

/// Whether the far end of `conn` negotiated an ALPN that takes early bytes
/// in visit headers ([`ALPN_NODE_EARLY`], [`ALPN_CLIENT_EARLY`]).
pub fn takes_early(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN_NODE_EARLY || p == ALPN_CLIENT_EARLY)
}

/// Server name sent when dialing a node. Not checked (see the module docs); it
/// only has to be a valid DNS name.
pub const NODE_SERVER_NAME: &str = "node.specter.invalid";

/// Why TLS material could not be loaded; nothing was bound or started.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A file holds no usable PEM object of the expected kind.
    #[error("{0}")]
    Pem(String),
    /// The private key is not the one the certificate was issued for.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// The certificate is not signed by the given CA (or is expired).
    #[error("the certificate is not valid under the given CA: {0}")]
    NotSignedByCa(rustls::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The certificate did not parse.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// The private key file is open to other users.
    #[error("{0}")]
    KeyExposed(String),
}

/// A node's TLS identity: its certificate chain and key, and the CA it trusts.
#[derive(Clone)]
pub struct NodeTls {
    /// The id this node's certificate proves.
    pub id: NodeId,
    roots: Arc<RootCertStore>,
    ca_certs: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    provider: Arc<CryptoProvider>,
    /// Whether to offer the ALPNs that take early bytes in visit headers;
    /// off only to play a node of an earlier release in tests.
    pub early: bool,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("NodeTls")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The one crypto provider used everywhere (passed explicitly: with two
/// providers compiled in, rustls' implicit default panics): ring's, with
/// AES-128-GCM first among the TLS 1.3 suites (ring lists AES-256-GCM
/// first). Every byte a visitor sends crosses two or three encrypted hops
/// (visitor TLS, node↔node and node↔client QUIC), each encrypted and
/// decrypted once, so the cipher is a large share of a node's CPU per
/// byte; AES-128 runs 10 AES rounds per block to AES-256's 14. Alternated
/// runs of the tunnel benchmark's single stream (four pairs, 2026-11-27):
/// 1.66 → 1.80 Gbit/s on the direct path, 1.07 → 1.23 forwarded. Our own
/// nodes and clients offer this order, so QUIC between them uses
/// AES-128-GCM (QUIC's own Initial packets always do); the ingress keeps
/// honouring a visitor's order (browsers put AES-128-GCM first; a visitor
/// without AES instructions may prefer ChaCha20, which it still gets).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // Stable: only AES-128-GCM for TLS 1.3 moves; the rest keep ring's order.
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl NodeTls {
    /// Loads and cross-checks the CA, certificate and key files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        crate::files::check_private(key).map_err(TlsError::KeyExposed)?;
        Self::from_pem(&read(ca)?, &read(cert)?, &read(key)?).map_err(|e| match e {
            TlsError::Pem(msg) => TlsError::Pem(format!(
                "{msg} (ca {}, cert {}, key {})",
                ca.display(),
                cert.display(),
                key.display()
            )),
            other => other,
        })
    }

    /// Builds the identity from PEM text, checking that the key matches the
    /// certificate and that the certificate chains to the CA.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let provider = provider();
        let (roots, ca_certs) = roots_from_pem(ca_pem.as_bytes())?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::Pem(format!("certificate file: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::Pem(
                "certificate file holds no certificate".into(),
            ));
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem(format!("key file: {e}")))?;

        let spki = pki::spki_of(leaf)?;
        let key_pair = rcgen::KeyPair::from_pem(key_pem)
            .map_err(|e| TlsError::Pem(format!("key file: {e}")))?;
        if rcgen::PublicKeyData::subject_public_key_info(&key_pair) != spki {
            return Err(TlsError::KeyMismatch);
        }
        let parsed = ParsedCertificate::try_from(leaf).map_err(TlsError::NotSignedByCa)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(TlsError::NotSignedByCa)?;
        Ok(NodeTls {
            id: pki::node_id_of_spki(&spki),
            roots: Arc::new(roots),
            ca_certs,
            chain,
            key: Arc::new(key),
            provider,
            early: true,
        })
    }

    /// The cluster CA certificates (DER), for verifying client tokens.
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca_certs
    }

    fn cluster_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))
    }

    /// Checks that a peer's certificate chain leads to the cluster CA (done
    /// after the handshake for node connections, see [`server_config`]).
    ///
    /// [`server_config`]: NodeTls::server_config
    pub fn verify_node_chain(&self, chain: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
        let (leaf, rest) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.cluster_verifier()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_client_cert(leaf, rest, UnixTime::now())
            .map(|_| ())
    }

    /// QUIC server config for both ALPNs. The handshake requires a client
    /// certificate and proof of its key, from anyone: clients present
    /// self-signed certificates. Which certificates are acceptable depends on
    /// the ALPN, so the chain to the cluster CA is checked right after the
    /// handshake for `specter-node/1` (the transport closes the connection
    /// before reading anything from it otherwise).
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let quic = QuicServerConfig::try_from(self.server_tls()?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(super::quic::accepted_transport()));
        Ok(config)
    }

    /// The TLS half of [`Self::server_config`].
    fn server_tls(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = Arc::new(AnyClientKey {
            algorithms: self.provider.signature_verification_algorithms,
        });
        let mut tls = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        // The server's order decides: the newer protocols first.
        tls.alpn_protocols = if self.early {
            vec![
                ALPN_NODE_EARLY.to_vec(),
                ALPN_CLIENT_EARLY.to_vec(),
                ALPN_NODE.to_vec(),
                ALPN_CLIENT.to_vec(),
            ]
        } else {
            vec![ALPN_NODE.to_vec(), ALPN_CLIENT.to_vec()]
        };
        Ok(tls)
    }

    /// QUIC client config for dialing nodes: presents our certificate and
    /// accepts any server certificate that chains to the cluster CA.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let quic = QuicClientConfig::try_from(self.client_tls()?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(super::quic::node_transport()));
        Ok(config)
    }

    /// The TLS half of [`Self::client_config`].
    fn client_tls(&self) -> Result<rustls::ClientConfig, TlsError> {
        self.client_tls_with(self.provider.clone())
    }

    fn client_tls_with(
        &self,
        provider: Arc<CryptoProvider>,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let verifier = Arc::new(ClusterCaVerifier {
            roots: self.roots.clone(),
            algorithms: provider.signature_verification_algorithms,
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = if self.early {
            vec![ALPN_NODE_EARLY.to_vec(), ALPN_NODE.to_vec()]
        } else {
            vec![ALPN_NODE.to_vec()]
        };
        Ok(tls)
    }
}

/// Server name a client sends to a node (nodes are identified by the CA, not
/// by name).
pub const CLIENT_SERVER_NAME: &str = "node.specter.invalid";

/// QUIC config for a tunnel client: trusts nodes whose certificate chains to
/// the cluster CA in `ca_pem`, presents `cert` (self-signed) with `key`.
pub fn client_quic_config(
    ca_pem: &str,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let (roots, _) = roots_from_pem(ca_pem.as_bytes())?;
    let verifier = Arc::new(ClusterCaVerifier {
        roots: Arc::new(roots),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN_CLIENT_EARLY.to_vec(), ALPN_CLIENT.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(super::quic::client_transport()));
    Ok(config)
}

/// The id of the tunnel client behind a connection: SHA-256 of its
/// certificate's public key.
pub fn peer_client_id(conn: &quinn::Connection) -> Option<specter_dht::ClientId> {
    use sha2::{Digest, Sha256};
    let chain = peer_chain(conn)?;
    let spki = pki::spki_of(chain.first()?).ok()?;
    Some(specter_dht::ClientId(Sha256::digest(spki).into()))
}

/// The id proven by the certificate a connection's peer presented.
pub fn peer_node_id(conn: &quinn::Connection) -> Option<NodeId> {
    pki::node_id_of(peer_chain(conn)?.first()?).ok()
}

/// Requires a client certificate and a valid TLS 1.3 signature with its key,
/// and accepts any such certificate; see [`NodeTls::server_config`].
#[derive(Debug)]
struct AnyClientKey {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Must at least parse; the signature check below proves the key.
        ParsedCertificate::try_from(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The CA certificates in `ca_pem`, as a root store and as DER; an error if
/// there is none or one does not parse.
pub fn roots_from_pem(
    ca_pem: &[u8],
) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), TlsError> {
    let mut roots = RootCertStore::empty();
    let mut certs = Vec::new();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        let ca = ca.map_err(|e| TlsError::Pem(format!("CA file: {e}")))?;
        certs.push(ca.clone());
        roots
            .add(ca)
            .map_err(|e| TlsError::Pem(format!("CA certificate: {e}")))?;
    }
    if certs.is_empty() {
        return Err(TlsError::Pem("CA file holds no certificate".into()));
    }
    Ok((roots, certs))
}

/// The certificate chain a connection's peer presented.
pub fn peer_chain(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|b| *b)
}

/// Accepts a server certificate that chains to the cluster CA, whatever name it
/// carries; the peer's identity is its key, checked by the transport.
#[derive(Debug)]
struct ClusterCaVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ClusterCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{make_ca, make_node_cert};
    use rustls::CipherSuite;

    #[test]
    fn a_certificate_from_another_ca_or_a_foreign_key_is_refused() {
        let ca = make_ca("a").unwrap();
        let other = make_ca("b").unwrap();
        let node = make_node_cert(&ca, "n", &[]).unwrap();
        let stranger = make_node_cert(&other, "n", &[]).unwrap();

        let ok = NodeTls::from_pem(&ca.cert, &node.cert, &node.key).unwrap();
        assert_eq!(ok.id, node.id);
        assert!(matches!(
            NodeTls::from_pem(&ca.cert, &stranger.cert, &stranger.key),
            Err(TlsError::NotSignedByCa(_))
        ));
        assert!(matches!(
            NodeTls::from_pem(&ca.cert, &node.cert, &stranger.key),
            Err(TlsError::KeyMismatch)
        ));
        assert!(matches!(
            NodeTls::from_pem("garbage", &node.cert, &node.key),
            Err(TlsError::Pem(_))
        ));
        ok.server_config().unwrap();
        ok.client_config().unwrap();
    }

    /// Runs a TLS handshake in memory and returns the suite it settled on.
    fn negotiated(client: rustls::ClientConfig, server: rustls::ServerConfig) -> CipherSuite {
        let name = rustls::pki_types::ServerName::try_from(CLIENT_SERVER_NAME).unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        let mut pipe = Vec::new();
        while c.is_handshaking() || s.is_handshaking() {
            pipe.clear();
            c.write_tls(&mut pipe).unwrap();
            s.read_tls(&mut pipe.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            pipe.clear();
            s.write_tls(&mut pipe).unwrap();
            c.read_tls(&mut pipe.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
        let suite = c.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(Some(suite), s.negotiated_cipher_suite().map(|s| s.suite()));
        suite
    }

    #[test]
    fn our_nodes_and_clients_settle_on_aes_128_gcm_and_a_visitors_order_is_kept() {
        let ca = make_ca("a").unwrap();
        let node = make_node_cert(&ca, "n", &[]).unwrap();
        let tls = NodeTls::from_pem(&ca.cert, &node.cert, &node.key).unwrap();
        // Nothing of ring's suites is dropped, only reordered.
        let ours: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let mut ring: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(ours[0], CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_ne!(ring[0], ours[0], "ring's own order starts elsewhere");
        ring.sort_by_key(|s| *s != CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(ours, ring);

        // Node to node, and so over QUIC, which takes these configs.
        let suite = negotiated(tls.client_tls().unwrap(), tls.server_tls().unwrap());
        assert_eq!(suite, CipherSuite::TLS13_AES_128_GCM_SHA256);

        // A visitor that prefers another suite gets it.
        for first in [
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let mut p = (*provider()).clone();
            p.cipher_suites.sort_by_key(|s| s.suite() != first);
            let visitor = tls.client_tls_with(Arc::new(p)).unwrap();
            assert_eq!(negotiated(visitor, tls.server_tls().unwrap()), first);
        }
    }
}
