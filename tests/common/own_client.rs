//! A tunnel client of the tests' own, speaking the protocol directly over
//! real QUIC, for what `specter tunnel` never does (ask in a loop, detach
//! and attach again at once). Its connections share one key, so the nodes
//! see one client.
#![allow(dead_code)]

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use specter::wire::{FrameReader, write_msg};
use specter_tunnel::protocol::{ClientMsg, NodeMsg, TUNNEL_PROTOCOL_VERSION};

pub struct OwnClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
}

/// An attachment: its connection, and its control stream after the welcome.
pub struct Attached {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub control: FrameReader,
}

impl OwnClient {
    /// A client with a fresh key, trusting the cluster CA `ca_pem` (inside a
    /// tokio runtime).
    pub fn new(ca_pem: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["specter-client.invalid".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = specter::net::tls::client_quic_config(
            ca_pem,
            CertificateDer::from(cert.der().to_vec()),
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        let endpoint = specter::net::bind_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        OwnClient { endpoint, config }
    }

    /// A connection to the node at QUIC address `node`, nothing said yet.
    pub async fn connect(&self, node: std::net::SocketAddr) -> quinn::Connection {
        self.endpoint
            .connect_with(
                self.config.clone(),
                node,
                specter::net::tls::CLIENT_SERVER_NAME,
            )
            .unwrap()
            .await
            .unwrap()
    }

    /// Connects to the node at QUIC address `node` and registers `names`;
    /// panics unless welcomed.
    pub async fn attach(&self, node: &str, names: &[&str]) -> Attached {
        let conn = self.connect(node.parse().unwrap()).await;
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let hello = ClientMsg::Hello {
            version: TUNNEL_PROTOCOL_VERSION,
            names: names.iter().map(|n| n.to_string()).collect(),
            token: None,
        };
        write_msg(&mut send, &hello).await.unwrap();
        let mut control = FrameReader::new(recv);
        let welcome = control.next::<NodeMsg>().await.unwrap();
        assert!(matches!(welcome, NodeMsg::Welcome { .. }), "{welcome:?}");
        Attached {
            conn,
            send,
            control,
        }
    }
}
