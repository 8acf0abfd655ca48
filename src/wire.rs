//! What goes on a QUIC stream, in one place: message framing over quinn
//! streams, the kind byte that opens every node↔node stream, and every close
//! and reset code the project sends, with its meaning.
//!
//! Frames are `[u32 length][u8 version][MessagePack body]`, bounded by
//! [`MAX_FRAME_SIZE`] (the codec itself is `specter_dht::messages`, shared by
//! the DHT and tunnel protocols). Codes are grouped by range: `0x1_` close a
//! node↔node connection, `0x2_` reset a node↔node stream, `0x3_` concern
//! tunnel clients and their visitor streams.

use quinn::{RecvStream, SendStream, VarInt};
use specter_dht::messages::{self, FRAME_HEADER, FrameError};

pub use specter_dht::messages::MAX_FRAME_SIZE;

/// The first byte of a node↔node bi-stream says what it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// One DHT request frame, then one response frame.
    Rpc,
    /// A forwarded visitor: a `Visit` header, the attached node's
    /// `VisitReply`, then raw bytes both ways.
    Forward,
}

impl StreamKind {
    /// The byte that opens the stream.
    pub const fn byte(self) -> u8 {
        match self {
            StreamKind::Rpc => 1,
            StreamKind::Forward => 2,
        }
    }

    /// The kind a stream's first byte names, if any.
    pub const fn of(byte: u8) -> Option<StreamKind> {
        match byte {
            1 => Some(StreamKind::Rpc),
            2 => Some(StreamKind::Forward),
            _ => None,
        }
    }
}

// Connection close codes, node↔node (and the shared endpoint).

/// Close: this connection lost the simultaneous-dial tie-break.
pub const CLOSE_DUPLICATE: VarInt = VarInt::from_u32(0x10);
/// Close: the peer's certificate proves another id than the one dialed (or
/// our own).
pub const CLOSE_WRONG_PEER: VarInt = VarInt::from_u32(0x11);
/// Close: the connection carried nothing for the pool's idle time.
pub const CLOSE_IDLE: VarInt = VarInt::from_u32(0x12);
/// Close: the node is shutting down.
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0x13);
/// Close: the handshake negotiated an ALPN this node does not serve.
pub const CLOSE_BAD_ALPN: VarInt = VarInt::from_u32(0x14);
/// Close: a node connection whose certificate is not from the cluster CA.
pub const CLOSE_NOT_MEMBER: VarInt = VarInt::from_u32(0x15);
/// Close: too many connections waiting to be served.
pub const CLOSE_BUSY: VarInt = VarInt::from_u32(0x16);
/// Close: gossip declared the peer dead and it is silent.
pub const CLOSE_PEER_DOWN: VarInt = VarInt::from_u32(0x17);

// Stream reset codes, node↔node.

/// Reset: the node is shutting down and serves no more streams.
pub const STREAM_BUSY: VarInt = VarInt::from_u32(0x20);
/// Reset: the frame exceeded [`MAX_FRAME_SIZE`].
pub const STREAM_TOO_LARGE: VarInt = VarInt::from_u32(0x21);
/// Reset: the request did not arrive in time.
pub const STREAM_TIMEOUT: VarInt = VarInt::from_u32(0x22);
/// Reset: the stream's first byte names no [`StreamKind`].
pub const STREAM_UNKNOWN_KIND: VarInt = VarInt::from_u32(0x23);

// Tunnel clients.

/// Close (node → client): the client was refused (no certificate, no
/// hello, or a refused hello).
pub const CLOSE_REFUSED: VarInt = VarInt::from_u32(0x30);
/// Reset (visitor stream): the tunnel is not attached here, or the visit was
/// abandoned for another path.
pub const STREAM_NOT_HERE: VarInt = VarInt::from_u32(0x31);
/// Close (node → client): the same client connected again; this connection
/// is stale.
pub const CLOSE_REPLACED: VarInt = VarInt::from_u32(0x33);
/// Close (client → node): the client dropped this attachment (it stops, or
/// the attachment is a duplicate or a trimmed spare).
pub const CLOSE_DETACHED: VarInt = VarInt::from_u32(0x34);
/// Reset (visitor stream, any hop): the other side of this hop failed
/// mid-stream (its node died, its connection was reset). A stream that is
/// merely dropped is finished cleanly by quinn, which would make a cut
/// answer look complete to the visitor; this code says it is not.
pub const STREAM_BROKEN: VarInt = VarInt::from_u32(0x35);
/// Close (client → node): a detaching attachment closed with visitor
/// streams still open (its drain deadline passed, or its client was told to
/// stop at once); the node counts the detach as cut.
pub const CLOSE_DETACH_CUT: VarInt = VarInt::from_u32(0x36);

/// Ends both halves of a stream as broken ([`STREAM_BROKEN`]): the far side
/// sees a reset both ways, never a clean end.
pub fn break_stream(send: &mut SendStream, recv: &mut RecvStream) {
    let _ = send.reset(STREAM_BROKEN);
    let _ = recv.stop(STREAM_BROKEN);
}

/// Completes when the far side of `send` stops reading it
/// (`STOP_SENDING`: its end of a splice gave up, or dropped the stream
/// unread); never on a clean finish or a lost connection, which a splice
/// sees by itself. For [`specter_tunnel::splice::splice_watching`].
pub fn stopped_by_peer(send: &SendStream) -> impl Future<Output = ()> + Send + 'static {
    let stopped = send.stopped();
    async move {
        if !matches!(stopped.await, Ok(Some(_))) {
            std::future::pending::<()>().await;
        }
    }
}

/// Splices the QUIC stream `send`/`recv` (as a [`QuicEnd`]) with `other`
/// within `stall`, ending as soon as the stream's far side stops reading
/// it ([`stopped_by_peer`]): how every hop between a socket and a tunnel
/// stream (the entry's raw-TCP and upgraded visitors, the client's target)
/// carries its bytes. What a failure resets is the caller's to decide.
pub async fn splice_stream<O>(
    send: &mut SendStream,
    recv: &mut RecvStream,
    other: &mut O,
    stall: std::time::Duration,
) -> std::io::Result<specter_tunnel::splice::Spliced>
where
    O: specter_tunnel::splice::End + ?Sized,
{
    let gone = stopped_by_peer(send);
    let mut stream = QuicEnd { send, recv };
    specter_tunnel::splice::splice_watching(&mut stream, other, stall, gone).await
}

/// Most of quinn's received chunks one read of a [`QuicEnd`] takes: a
/// chunk is up to a packet's payload, so 16 fill one vectored write of up
/// to ~140 KiB to a socket at jumbo-frame sizes (~23 KiB at 1,452 B), and
/// a blocked writer pins at most 16 received buffers.
const READ_CHUNKS: usize = 16;

/// A QUIC stream as one side of a splice
/// ([`specter_tunnel::splice::End`]), without a staging copy either way:
/// reads lend quinn's received chunks (written on to a socket, which
/// copies anyway), and writes hand quinn the bytes the splice read from a
/// socket (kept until acknowledged; they were read into the splice's own
/// packed allocation). Chunks lent by another QUIC stream are copied once
/// into one buffer, since each pins its whole received datagram; the
/// attached node's relay between two QUIC streams splices through a buffer
/// instead (see `node::tunnels::forward`), which held less under parallel
/// uploads.
pub struct QuicEnd<'a> {
    /// The half written to.
    pub send: &'a mut SendStream,
    /// The half read from.
    pub recv: &'a mut RecvStream,
}

impl specter_tunnel::splice::End for QuicEnd<'_> {
    fn poll_fill(
        &mut self,
        cx: &mut std::task::Context<'_>,
        _: &mut specter_tunnel::splice::Room,
        held: &mut specter_tunnel::splice::Held,
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut chunks: [bytes::Bytes; READ_CHUNKS] = Default::default();
        let read = {
            let read = std::pin::pin!(self.recv.read_chunks(&mut chunks));
            std::task::ready!(read.poll(cx))
        };
        std::task::Poll::Ready(match read {
            Ok(None) => Ok(0),
            Ok(Some(k)) => {
                let n = chunks[..k].iter().map(bytes::Bytes::len).sum();
                held.push_lent(chunks.into_iter().take(k));
                Ok(n)
            }
            Err(err) => Err(err.into()),
        })
    }

    fn poll_drain(
        &mut self,
        cx: &mut std::task::Context<'_>,
        held: &mut specter_tunnel::splice::Held,
    ) -> std::task::Poll<std::io::Result<usize>> {
        // Lent by another QUIC stream (a splice of two `QuicEnd`s; the
        // attached node relays through a buffer instead): copied once, into
        // one buffer handed over whole.
        held.own();
        let written = {
            let write = std::pin::pin!(self.send.write_chunks(held.chunks().make_contiguous()));
            std::task::ready!(write.poll(cx)).map_err(std::io::Error::from)?
        };
        // Whole chunks taken are gone; a partly taken one was advanced.
        held.chunks().drain(..written.chunks);
        std::task::Poll::Ready(Ok(written.bytes))
    }

    fn poll_flush_end(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // quinn sends what it was given without being asked.
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown_end(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut *self.send), cx)
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed while opening a stream.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Sending failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Receiving failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream ended before a whole frame arrived (cleanly between frames
    /// or in the middle of one).
    #[error("stream ended")]
    Finished,
    /// A frame was refused (too large, wrong version, undecodable).
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one frame from `recv`. Not cancel-safe: a frame half read when the
/// future is dropped is lost. Use [`FrameReader`] inside `select!`.
pub async fn read_frame<T: for<'de> serde::Deserialize<'de>>(
    recv: &mut RecvStream,
) -> Result<T, WireError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await.map_err(exact)?;
    let len = messages::frame_len(header)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(exact)?;
    Ok(messages::decode(&body)?)
}

fn exact(err: quinn::ReadExactError) -> WireError {
    match err {
        quinn::ReadExactError::FinishedEarly(_) => WireError::Finished,
        quinn::ReadExactError::ReadError(e) => WireError::Read(e),
    }
}

/// Writes one frame and finishes the stream.
pub async fn write_frame<T: serde::Serialize>(
    send: &mut SendStream,
    msg: &T,
) -> Result<(), WireError> {
    write_msg(send, msg).await?;
    let _ = send.finish();
    Ok(())
}

/// Writes one frame and keeps the stream open.
pub async fn write_msg<T: serde::Serialize>(
    send: &mut SendStream,
    msg: &T,
) -> Result<(), WireError> {
    let frame = messages::encode(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads a sequence of frames from a long-lived stream (a control stream),
/// keeping partial frames across calls, so [`FrameReader::next`] is
/// cancel-safe: a `select!` that drops it mid-frame loses nothing.
pub struct FrameReader {
    recv: RecvStream,
    buf: Vec<u8>,
}

/// Bytes asked of the stream per read: control messages are small, and a
/// larger frame simply takes more reads.
const READ_CHUNK: usize = 4 * 1024;

impl FrameReader {
    /// Reads frames from `recv`.
    pub fn new(recv: RecvStream) -> Self {
        FrameReader {
            recv,
            buf: Vec::new(),
        }
    }

    /// The next frame. Cancel-safe: bytes read before a cancellation stay
    /// buffered for the next call. A frame is refused (and the stream is
    /// then unusable) if its header announces more than [`MAX_FRAME_SIZE`].
    pub async fn next<T: for<'de> serde::Deserialize<'de>>(&mut self) -> Result<T, WireError> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(messages::decode(&frame)?);
            }
            // quinn's `read_chunk` is cancel-safe: if this future is dropped,
            // no bytes were taken from the stream, and nothing was added to
            // the buffer.
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None => return Err(WireError::Finished),
            }
        }
    }

    /// Splits a whole frame's body off the front of the buffer, if one is
    /// there.
    fn take_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(header) = self.buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = messages::frame_len(*header)?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(body))
    }
}

const _: () = assert!(FRAME_HEADER == 5, "length (4) + version (1)");

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A connected pair of node endpoints on loopback: `(dialer's
    /// connection, acceptor's connection)`.
    async fn loopback_pair() -> (quinn::Connection, quinn::Connection) {
        use crate::net::tls::{NODE_SERVER_NAME, NodeTls};
        let ca = crate::pki::make_ca("wire test").unwrap();
        let tls = |name: &str| {
            let pem = crate::pki::make_node_cert(&ca, name, &[]).unwrap();
            NodeTls::from_pem(&ca.cert, &pem.cert, &pem.key).unwrap()
        };
        let (a, b) = (tls("a"), tls("b"));
        let server = crate::net::bind_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        server.set_server_config(Some(b.server_config().unwrap()));
        let client = crate::net::bind_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let dial = client
            .connect_with(a.client_config().unwrap(), addr, NODE_SERVER_NAME)
            .unwrap();
        let (dialed, accepted) = tokio::join!(dial, async {
            server.accept().await.unwrap().await.unwrap()
        });
        (dialed.unwrap(), accepted)
    }

    #[tokio::test]
    async fn a_frame_split_across_packets_survives_cancelled_reads() {
        let (dialer, acceptor) = loopback_pair().await;
        let (mut send, _recv) = dialer.open_bi().await.unwrap();
        let first = messages::encode(&("hello".to_string(), 7u32)).unwrap();
        let second = messages::encode(&("again".to_string(), 8u32)).unwrap();
        // The first byte goes alone so the peer's accept fires.
        send.write_all(&first[..1]).await.unwrap();
        let (_, recv) = acceptor.accept_bi().await.unwrap();
        let mut reader = FrameReader::new(recv);
        let writer = tokio::spawn(async move {
            for part in [&first[1..3], &first[3..], &second[..]] {
                tokio::time::sleep(Duration::from_millis(30)).await;
                send.write_all(part).await.unwrap();
            }
            send.finish().unwrap();
            send
        });
        let mut got = Vec::new();
        let mut cancelled = 0;
        while got.len() < 2 {
            tokio::select! {
                frame = reader.next::<(String, u32)>() => got.push(frame.unwrap()),
                () = tokio::time::sleep(Duration::from_millis(5)) => cancelled += 1,
            }
        }
        assert!(
            cancelled > 5,
            "the reads were not interrupted ({cancelled})"
        );
        assert_eq!(got, vec![("hello".into(), 7), ("again".into(), 8)]);
        assert!(matches!(
            reader.next::<(String, u32)>().await,
            Err(WireError::Finished)
        ));
        let _send = writer.await.unwrap();
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_its_body_is_read() {
        let (dialer, acceptor) = loopback_pair().await;
        let (mut send, _recv) = dialer.open_bi().await.unwrap();
        let len = u32::try_from(MAX_FRAME_SIZE + 1).unwrap();
        send.write_all(&len.to_be_bytes()).await.unwrap();
        let (_, recv) = acceptor.accept_bi().await.unwrap();
        let mut reader = FrameReader::new(recv);
        assert!(matches!(
            reader.next::<u32>().await,
            Err(WireError::Frame(FrameError::TooLarge(_)))
        ));
    }

    #[test]
    fn stream_kinds_round_trip_through_their_byte() {
        for kind in [StreamKind::Rpc, StreamKind::Forward] {
            assert_eq!(StreamKind::of(kind.byte()), Some(kind));
        }
        assert_eq!(StreamKind::of(0), None);
        assert_eq!(StreamKind::of(0xff), None);
    }

    #[test]
    fn close_and_reset_codes_are_distinct() {
        let codes = [
            CLOSE_DUPLICATE,
            CLOSE_WRONG_PEER,
            CLOSE_IDLE,
            CLOSE_SHUTDOWN,
            CLOSE_BAD_ALPN,
            CLOSE_NOT_MEMBER,
            CLOSE_BUSY,
            CLOSE_PEER_DOWN,
            STREAM_BUSY,
            STREAM_TOO_LARGE,
            STREAM_TIMEOUT,
            STREAM_UNKNOWN_KIND,
            CLOSE_REFUSED,
            STREAM_NOT_HERE,
            CLOSE_REPLACED,
            CLOSE_DETACHED,
            STREAM_BROKEN,
            CLOSE_DETACH_CUT,
        ];
        let distinct: std::collections::BTreeSet<u64> =
            codes.iter().map(|c| c.into_inner()).collect();
        assert_eq!(distinct.len(), codes.len());
        assert!(codes.iter().all(|c| c.into_inner() != 0));
    }
}
