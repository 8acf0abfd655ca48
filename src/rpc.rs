//! DHT RPC over node↔node QUIC bi-streams: one request frame and one
//! response frame per stream (see `specter_dht::messages` for the framing).
//! Every request is attributed to the cert-derived id of its connection.

use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream, VarInt};
use specter_dht::Peer;
use specter_dht::messages::{self, ErrorCode, FrameError, MAX_FRAME_SIZE, Request, Response};
use specter_gossip::NodeId;
use tokio::sync::{mpsc, oneshot};

use crate::transport::{DialError, IncomingStream, Transport};
use specter_tunnel::protocol::{STREAM_FORWARD, STREAM_RPC};

/// Stream reset code: the stream's first byte names no known stream kind.
pub const STREAM_UNKNOWN_KIND: VarInt = VarInt::from_u32(0x23);

/// A request and its response must each arrive within this; a peer that
/// stalls mid-frame loses its stream, not the node's attention.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// Stream reset code: the frame exceeded `MAX_FRAME_SIZE`.
pub const STREAM_TOO_LARGE: VarInt = VarInt::from_u32(0x21);
/// Stream reset code: the request did not arrive in time.
pub const STREAM_TIMEOUT: VarInt = VarInt::from_u32(0x22);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No connection to the peer.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The connection failed while opening the stream.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Sending failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Receiving failed.
    #[error("read: {0}")]
    Read(String),
    /// A frame was refused.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The peer sent nothing at all for [`crate::transport::PEER_SILENCE`].
    #[error("peer silent")]
    Silent,
}

/// Reads one frame (length, version, body) from `recv`.
pub async fn read_frame<T: for<'de> serde::Deserialize<'de>>(
    recv: &mut RecvStream,
) -> Result<T, RpcError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| RpcError::Read(e.to_string()))?;
    let len = messages::frame_len(header)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| RpcError::Read(e.to_string()))?;
    Ok(messages::decode(&body)?)
}

/// Writes one frame and finishes the stream.
pub async fn write_frame<T: serde::Serialize>(
    send: &mut SendStream,
    msg: &T,
) -> Result<(), RpcError> {
    write_msg(send, msg).await?;
    let _ = send.finish();
    Ok(())
}

/// Writes one frame and keeps the stream open.
pub async fn write_msg<T: serde::Serialize>(
    send: &mut SendStream,
    msg: &T,
) -> Result<(), RpcError> {
    let frame = messages::encode(msg)?;
    send.write_all(&frame).await?;
    Ok(())
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
        let (_, conn) = transport.connect(to.addr, Some(to.id)).await?;
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&[STREAM_RPC]).await?;
            write_frame(&mut send, request).await?;
            read_frame::<Response>(&mut recv).await
        };
        tokio::select! {
            answer = exchange => answer,
            () = crate::transport::silent(&conn, crate::transport::PEER_SILENCE) => {
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

/// Serves incoming streams: reads each request, asks the DHT task, writes the
/// answer. Malformed frames get a typed error; oversized ones a stream reset.
/// Runs until `stop` fires or the stream inbox closes. Streams that carry a
/// forwarded visitor go to `forwards`.
pub async fn serve(
    mut streams: mpsc::Receiver<IncomingStream>,
    dht: mpsc::Sender<Served>,
    forwards: mpsc::Sender<IncomingStream>,
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
        let dht = dht.clone();
        let forwards = forwards.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let mut kind = [0u8; 1];
            let got = tokio::time::timeout(RPC_TIMEOUT, stream.recv.read_exact(&mut kind)).await;
            match (got, kind[0]) {
                (Ok(Ok(())), STREAM_RPC) => serve_one(stream, dht).await,
                (Ok(Ok(())), STREAM_FORWARD) => {
                    if let Err(mpsc::error::SendError(mut s)) = forwards.send(stream).await {
                        let _ = s.send.reset(crate::transport::STREAM_BUSY);
                        let _ = s.recv.stop(crate::transport::STREAM_BUSY);
                    }
                }
                _ => {
                    let _ = stream.send.reset(STREAM_UNKNOWN_KIND);
                    let _ = stream.recv.stop(STREAM_UNKNOWN_KIND);
                }
            }
        });
    }
}

async fn serve_one(stream: IncomingStream, dht: mpsc::Sender<Served>) {
    let IncomingStream {
        peer,
        mut send,
        mut recv,
    } = stream;
    let request = match tokio::time::timeout(RPC_TIMEOUT, read_frame::<Request>(&mut recv)).await {
        Err(_) => {
            let _ = send.reset(STREAM_TIMEOUT);
            let _ = recv.stop(STREAM_TIMEOUT);
            tracing::debug!(%peer, "rpc request timed out");
            return;
        }
        Ok(Err(RpcError::Frame(FrameError::TooLarge(len)))) => {
            let _ = send.reset(STREAM_TOO_LARGE);
            let _ = recv.stop(STREAM_TOO_LARGE);
            tracing::info!(%peer, len, max = MAX_FRAME_SIZE, "refused oversized rpc frame");
            return;
        }
        Ok(Err(RpcError::Frame(e))) => {
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
        Response::Error(ErrorCode::Unavailable)
    } else {
        match tokio::time::timeout(RPC_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            _ => Response::Error(ErrorCode::Unavailable),
        }
    };
    if let Err(e) = write_frame(&mut send, &response).await {
        tracing::debug!(%peer, err = %e, "rpc answer not sent");
    }
}
