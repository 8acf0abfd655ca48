//! DHT RPC over node↔node QUIC bi-streams: one request frame and one
//! response frame per stream (see `specter_dht::messages` for the framing).
//! Every request is attributed to the cert-derived id of its connection.

use std::sync::Arc;
use std::time::Duration;

use specter_dht::Peer;
use specter_dht::messages::{ErrorCode, FrameError, MAX_FRAME_SIZE, Request, Response};
use specter_gossip::NodeId;
use tokio::sync::{mpsc, oneshot};

use crate::net::liveness::{PEER_SILENCE, silent};
use crate::net::pool::{NodeStream, StreamError};
use crate::net::streams::StreamInbox;
use crate::net::{IncomingStream, Transport};
use crate::wire::{
    STREAM_TIMEOUT, STREAM_TOO_LARGE, StreamKind, WireError, read_frame, write_frame,
};

/// A request and its response must each arrive within this; a peer that
/// stalls mid-frame loses its stream, not the node's attention.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No connection to the peer, or no stream on it.
    #[error(transparent)]
    Open(#[from] StreamError),
    /// The stream failed or carried a bad frame.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The peer sent nothing at all for [`PEER_SILENCE`].
    #[error("peer silent")]
    Silent,
}

/// Sends `request` to `to` and waits for the answer.
pub async fn call(
    transport: &Arc<Transport>,
    to: Peer,
    request: &Request,
) -> Result<Response, RpcError> {
    if transport.is_silent(to.id) {
        return Err(RpcError::Silent);
    }
    tokio::time::timeout(RPC_TIMEOUT, async {
        let NodeStream {
            conn,
            mut send,
            mut recv,
            held: _held,
        } = transport
            .open_stream(to.addr, to.id, StreamKind::Rpc)
            .await?;
        let exchange = async {
            write_frame(&mut send, request).await?;
            Ok(read_frame::<Response>(&mut recv).await?)
        };
        tokio::select! {
            answer = exchange => answer,
            () = silent(&conn, PEER_SILENCE) => {
                transport.mark_silent(to.id, &conn);
                Err(RpcError::Silent)
            }
        }
    })
    .await
    .map_err(|_| RpcError::Timeout)?
}

/// A request for the DHT task, with where to send its answer.
pub struct Served {
    /// The node that sent it (proven by its certificate).
    pub from: NodeId,
    /// The request.
    pub request: Request,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Response>,
}

/// Serves DHT requests (streams of kind `Rpc`): reads each request, asks the
/// DHT task, writes the answer. Malformed frames get a typed error; oversized
/// ones a stream reset. Runs until `stop` fires or the inbox closes.
pub async fn serve(
    mut streams: StreamInbox,
    dht: mpsc::Sender<Served>,
    transport: Arc<Transport>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            s = streams.recv() => match s {
                Some(s) => s,
                None => return,
            },
        };
        tokio::spawn(serve_one(stream, dht.clone(), transport.clone()));
    }
}

async fn serve_one(stream: IncomingStream, dht: mpsc::Sender<Served>, transport: Arc<Transport>) {
    let IncomingStream {
        peer,
        mut send,
        mut recv,
        held: _held,
    } = stream;
    let request = match tokio::time::timeout(RPC_TIMEOUT, read_frame::<Request>(&mut recv)).await {
        Err(_) => {
            let _ = send.reset(STREAM_TIMEOUT);
            let _ = recv.stop(STREAM_TIMEOUT);
            tracing::debug!(%peer, "rpc request timed out");
            return;
        }
        Ok(Err(WireError::Frame(FrameError::TooLarge(len)))) => {
            let _ = send.reset(STREAM_TOO_LARGE);
            let _ = recv.stop(STREAM_TOO_LARGE);
            // Records lost in flight unless the sender splits its batches:
            // worth an operator's attention.
            transport.frame_refused();
            tracing::warn!(%peer, len, max = MAX_FRAME_SIZE, "refused an oversized DHT request frame");
            return;
        }
        Ok(Err(WireError::Frame(e))) => {
            tracing::info!(%peer, err = %e, "refused malformed rpc frame");
            let _ = write_frame(&mut send, &Response::Error(ErrorCode::from(&e))).await;
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, err = %e, "rpc stream failed");
            return;
        }
        Ok(Ok(request)) => request,
    };
    let (tx, rx) = oneshot::channel();
    let served = Served {
        from: peer,
        request,
        reply: tx,
    };
    let response = if dht.try_send(served).is_err() {
        transport.dht_request_refused();
        Response::Error(ErrorCode::Unavailable)
    } else {
        match tokio::time::timeout(RPC_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Err(_) => {
                transport.dht_request_late();
                Response::Error(ErrorCode::Unavailable)
            }
            // The DHT task dropped the request unanswered: it is stopping.
            Ok(Err(_)) => Response::Error(ErrorCode::Unavailable),
        }
    };
    if let Err(e) = write_frame(&mut send, &response).await {
        tracing::debug!(%peer, err = %e, "rpc answer not sent");
    }
}
