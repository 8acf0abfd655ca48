//! Bi-streams that nodes open to us, sorted by their first byte (a
//! [`StreamKind`]) into one inbox per kind: DHT requests for the RPC server,
//! forwarded visitors for the tunnels.

use std::sync::Arc;
use std::time::Duration;

use quinn::Connection;
use specter_gossip::NodeId;
use tokio::sync::mpsc;

use super::quic::{HeldStream, StreamBudget};
use crate::wire::{STREAM_BUSY, STREAM_UNKNOWN_KIND, StreamKind};

/// A node stream must name its kind (its first byte) this soon; a peer that
/// opens streams and sends nothing loses them, not a task forever.
pub const STREAM_KIND_TIMEOUT: Duration = Duration::from_secs(2);

/// Streams of each kind waiting for their server. When full, the stream
/// waits (backpressure) rather than queueing without bound or refusing a
/// visitor that a burst brought; QUIC's per-connection stream limit bounds
/// how many can wait.
pub const STREAM_INBOX_CAPACITY: usize = 256;

/// A bi-stream a node opened to us, with the cert-derived id of its
/// connection. Its kind byte has been read.
pub struct IncomingStream {
    /// The node that opened it.
    pub peer: NodeId,
    /// Our sending half.
    pub send: quinn::SendStream,
    /// Our receiving half.
    pub recv: quinn::RecvStream,
    /// Counts the stream toward its connection's limit while held.
    pub held: HeldStream,
}

impl IncomingStream {
    /// Resets both halves with `code`.
    pub fn refuse(mut self, code: quinn::VarInt) {
        let _ = self.send.reset(code);
        let _ = self.recv.stop(code);
    }
}

/// Bi-streams of one kind.
pub type StreamInbox = mpsc::Receiver<IncomingStream>;

/// Where streams of each kind go.
#[derive(Clone)]
pub struct StreamRoutes {
    /// [`StreamKind::Rpc`].
    pub rpc: mpsc::Sender<IncomingStream>,
    /// [`StreamKind::Forward`].
    pub forwards: mpsc::Sender<IncomingStream>,
}

impl StreamRoutes {
    /// Routes and the inboxes they fill: `(routes, rpc, forwards)`.
    pub fn new() -> (StreamRoutes, StreamInbox, StreamInbox) {
        let (rpc, rpc_rx) = mpsc::channel(STREAM_INBOX_CAPACITY);
        let (forwards, forwards_rx) = mpsc::channel(STREAM_INBOX_CAPACITY);
        (StreamRoutes { rpc, forwards }, rpc_rx, forwards_rx)
    }

    fn inbox(&self, kind: StreamKind) -> &mpsc::Sender<IncomingStream> {
        match kind {
            StreamKind::Rpc => &self.rpc,
            StreamKind::Forward => &self.forwards,
        }
    }

    /// Sorts every bi-stream `peer` opens on `conn` until the connection
    /// ends, counting each in `budget` while it is held. Each stream waits on
    /// its own, so one that is slow to name its kind holds back nothing else;
    /// QUIC's stream limit bounds how many wait.
    pub async fn serve(self, conn: Connection, peer: NodeId, budget: Arc<StreamBudget>) {
        while let Ok((send, mut recv)) = conn.accept_bi().await {
            let routes = self.clone();
            let held = budget.opened();
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                let got =
                    tokio::time::timeout(STREAM_KIND_TIMEOUT, recv.read_exact(&mut byte)).await;
                let stream = IncomingStream {
                    peer,
                    send,
                    recv,
                    held,
                };
                let kind = match got {
                    Ok(Ok(())) => StreamKind::of(byte[0]),
                    _ => None,
                };
                let Some(kind) = kind else {
                    return stream.refuse(STREAM_UNKNOWN_KIND);
                };
                if let Err(mpsc::error::SendError(stream)) = routes.inbox(kind).send(stream).await {
                    // The node is shutting down.
                    stream.refuse(STREAM_BUSY);
                }
            });
        }
    }
}
