//! Accepting on the node's endpoint: handshakes (bounded), and routing each
//! connection by its ALPN: nodes (certificate from the cluster CA) to the
//! pool, tunnel clients to the client inbox, anything else closed.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::pool::{HANDSHAKE_TIMEOUT, SWEEP_PERIOD, Transport, bump};
use super::tls::{self, ALPN_CLIENT, ALPN_CLIENT_EARLY, ALPN_NODE, ALPN_NODE_EARLY};
use crate::wire::{CLOSE_BAD_ALPN, CLOSE_BUSY, CLOSE_NOT_MEMBER, CLOSE_WRONG_PEER};

/// What an accepted connection is, by the ALPN its handshake negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// Another node (`specter-node/1` or `/2`).
    Node,
    /// A tunnel client (`specter-client/1` or `/2`).
    Client,
    /// Anything else: closed.
    Other,
}

impl Alpn {
    /// Classifies a negotiated ALPN.
    pub fn of(protocol: Option<&[u8]>) -> Alpn {
        match protocol {
            Some(p) if p == ALPN_NODE || p == ALPN_NODE_EARLY => Alpn::Node,
            Some(p) if p == ALPN_CLIENT || p == ALPN_CLIENT_EARLY => Alpn::Client,
            _ => Alpn::Other,
        }
    }
}

impl Transport {
    /// Accepts connections until `cancel` fires, and closes idle ones.
    pub async fn serve(self: Arc<Self>, cancel: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_PERIOD);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                _ = sweep.tick() => self.close_idle(),
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
                        bump(&self.stats.handshakes_refused);
                        incoming.refuse();
                        continue;
                    };
                    let this = self.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        this.accept_one(incoming).await;
                    });
                }
            }
        }
    }

    async fn accept_one(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(err)) => {
                bump(&self.stats.handshakes_failed);
                tracing::info!(%remote, %err, "refused node connection");
                return;
            }
            Err(_) => {
                bump(&self.stats.handshakes_failed);
                tracing::info!(%remote, "node handshake timed out");
                return;
            }
        };
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        match Alpn::of(alpn.as_deref()) {
            Alpn::Client => {
                match self.clients.try_send(conn.clone()) {
                    Ok(()) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                        bump(&self.stats.clients_busy);
                        conn.close(CLOSE_BUSY, b"too many clients connecting");
                    }
                    // The node is stopping: nobody serves clients any more.
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                        conn.close(CLOSE_BUSY, b"node stopping");
                    }
                }
                return;
            }
            Alpn::Other => {
                conn.close(CLOSE_BAD_ALPN, b"unsupported protocol");
                return;
            }
            Alpn::Node => {}
        }
        // Node connections need a certificate from the cluster CA.
        let chain = tls::peer_chain(&conn).unwrap_or_default();
        if let Err(err) = self.tls().verify_node_chain(&chain) {
            bump(&self.stats.handshakes_failed);
            tracing::info!(%remote, %err, "refused node connection: certificate not from the cluster CA");
            conn.close(CLOSE_NOT_MEMBER, b"certificate not from the cluster CA");
            return;
        }
        let Some(peer) = tls::peer_node_id(&conn) else {
            conn.close(CLOSE_WRONG_PEER, b"no certificate");
            return;
        };
        if peer == self.local {
            conn.close(CLOSE_WRONG_PEER, b"self");
            return;
        }
        super::quic::prove_node(&conn);
        self.adopt(conn, peer, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_sorted_by_their_alpn() {
        assert_eq!(Alpn::of(Some(b"specter-node/1")), Alpn::Node);
        assert_eq!(Alpn::of(Some(b"specter-client/1")), Alpn::Client);
        assert_eq!(Alpn::of(Some(b"h2")), Alpn::Other);
        assert_eq!(Alpn::of(None), Alpn::Other);
    }
}
