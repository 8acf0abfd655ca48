//! An upstream HTTP connection whose tunnel stream opens when the request is
//! written, so the request travels in the [`Visit`] header's flight
//! ([`Visit::early`]) instead of a round trip later, after the client's
//! `Ready`.
//!
//! hyper's HTTP/1.1 client writes the request head and flushes; [`Opening`]
//! keeps those bytes (up to its `early` limit) and, at the flush (or once the
//! limit is reached), starts the open with them. The open's race sends the
//! same bytes again on the next path if one fails before `Ready`, so only a
//! request that may reach the target twice is given a non-zero limit: an
//! idempotent one without a body. Other requests open with no early bytes
//! and are written once the path is ready, as before.
//!
//! Why the open failed (unknown name, starting node, …) is kept in the
//! [`OpenOutcome`] slot, since hyper only sees an I/O error.
//!
//! [`Visit`]: specter_tunnel::protocol::Visit
//! [`Visit::early`]: specter_tunnel::protocol::Visit

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::node::tunnels::visit::OpenError;

/// Opens the stream, given the early bytes.
pub type Open<S> = Box<dyn FnOnce(Bytes) -> OpenFuture<S> + Send>;
/// The open in flight.
pub type OpenFuture<S> = Pin<Box<dyn Future<Output = Result<S, OpenError>> + Send>>;

/// A handle on an [`Opening`]: why its open failed, once it has (for the
/// page the visitor gets), and a way to give its stream up.
#[derive(Clone, Default)]
pub struct OpenOutcome(Arc<Outcome>);

#[derive(Default)]
struct Outcome {
    failed: Mutex<Option<OpenError>>,
    abandoned: AtomicBool,
}

impl OpenOutcome {
    /// The open's error, if it failed.
    pub fn failed(&self) -> Option<OpenError> {
        self.0
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, err: OpenError) {
        *self.0.failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(err);
    }

    /// Gives the stream up: when the [`Opening`] is shut down or dropped
    /// from now on, its stream is reset rather than ended cleanly. Dropped
    /// mid-answer, a stream would otherwise end with a clean end of the
    /// request, and the far side (the client's splice to its target) would
    /// go on waiting for an answer that nobody will read.
    pub fn abandon(&self) {
        self.0.abandoned.store(true, Ordering::Relaxed);
    }

    fn abandoned(&self) -> bool {
        self.0.abandoned.load(Ordering::Relaxed)
    }
}

enum State<S> {
    /// Keeping written bytes until the flush.
    Keeping(Open<S>),
    Opening(OpenFuture<S>),
    Open(S),
    Failed,
}

/// A stream that opens on the first flush with what was written before it.
pub struct Opening<S> {
    state: State<S>,
    early: BytesMut,
    limit: usize,
    outcome: OpenOutcome,
    /// Resets the open stream (see [`OpenOutcome::abandon`]).
    reset: fn(&mut S),
    /// A read and a write (or flush) waiting for the open: whichever polls
    /// the open last is the one its future wakes, so both are woken here
    /// when it starts and when it ends.
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl<S> Opening<S> {
    /// A stream that will call `open` with up to `limit` early bytes;
    /// `reset` resets the opened stream if it is abandoned.
    pub fn new(open: Open<S>, limit: usize, reset: fn(&mut S)) -> (Self, OpenOutcome) {
        let outcome = OpenOutcome::default();
        let opening = Opening {
            state: State::Keeping(open),
            early: BytesMut::new(),
            limit,
            outcome: outcome.clone(),
            reset,
            reader: None,
            writer: None,
        };
        (opening, outcome)
    }
}

impl<S: Unpin> Opening<S> {
    /// Drives the open until the stream is ready (starting it if needed).
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut S>> {
        ready!(self.poll_opened(cx))?;
        match &mut self.state {
            State::Open(stream) => Poll::Ready(Ok(stream)),
            _ => unreachable!("opened"),
        }
    }

    fn poll_opened(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Keeping(_) => {
                    let State::Keeping(open) = std::mem::replace(&mut self.state, State::Failed)
                    else {
                        unreachable!()
                    };
                    let early = std::mem::take(&mut self.early).freeze();
                    self.state = State::Opening(open(early));
                    self.wake_waiting();
                }
                State::Opening(fut) => {
                    let opened = ready!(fut.as_mut().poll(cx));
                    self.wake_waiting();
                    match opened {
                        Ok(stream) => self.state = State::Open(stream),
                        Err(err) => {
                            self.outcome.set(err.clone());
                            self.state = State::Failed;
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::NotConnected,
                                err,
                            )));
                        }
                    }
                }
                State::Open(_) => return Poll::Ready(Ok(())),
                State::Failed => {
                    return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
                }
            }
        }
    }
}

impl<S> Opening<S> {
    fn wake_waiting(&mut self) {
        for waker in [self.reader.take(), self.writer.take()]
            .into_iter()
            .flatten()
        {
            waker.wake();
        }
    }

    /// The opened stream, once it is.
    pub fn stream_mut(&mut self) -> Option<&mut S> {
        match &mut self.state {
            State::Open(stream) => Some(stream),
            _ => None,
        }
    }

    /// Nothing kept yet, and the open not started.
    fn untouched(&self) -> bool {
        matches!(self.state, State::Keeping(_)) && self.early.is_empty()
    }

    /// Resets the stream if it was abandoned (and opened); whether it was.
    fn reset_if_abandoned(&mut self) -> bool {
        if !self.outcome.abandoned() {
            return false;
        }
        if let State::Open(stream) = &mut self.state {
            (self.reset)(stream);
        }
        self.state = State::Failed;
        true
    }
}

impl<S> Drop for Opening<S> {
    fn drop(&mut self) {
        self.reset_if_abandoned();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Opening<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Keeping(_) = this.state {
            // Nothing to read before the request is sent.
            this.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if !matches!(this.state, State::Open(_)) {
            this.reader = Some(cx.waker().clone());
        }
        let stream = ready!(this.poll_open(cx))?;
        Pin::new(stream).poll_read(cx, buf)
    }
}

impl<S: Unpin> Opening<S> {
    /// [`Opening::poll_open`] for a write, flush or shutdown.
    fn poll_writer_open(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut S>> {
        if !matches!(self.state, State::Open(_)) {
            self.writer = Some(cx.waker().clone());
        }
        self.poll_open(cx)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Opening<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let State::Keeping(_) = this.state {
            let room = this.limit - this.early.len();
            if room > 0 {
                let n = room.min(buf.len());
                this.early.extend_from_slice(&buf[..n]);
                return Poll::Ready(Ok(n));
            }
        }
        let stream = ready!(this.poll_writer_open(cx))?;
        Pin::new(stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.untouched() {
            // hyper flushes on every turn of its loop, also before it wrote
            // anything: opening then would send the request late.
            return Poll::Ready(Ok(()));
        }
        let stream = ready!(this.poll_writer_open(cx))?;
        Pin::new(stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reset_if_abandoned() {
            return Poll::Ready(Ok(()));
        }
        if this.untouched() {
            // Closed before anything was written: nothing to open.
            this.state = State::Failed;
            return Poll::Ready(Ok(()));
        }
        let stream = ready!(this.poll_writer_open(cx))?;
        Pin::new(stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;

    /// An open that hands back one end of a duplex pipe and reports the
    /// early bytes it was given.
    fn pipe_open(
        far: DuplexStream,
        early_seen: tokio::sync::oneshot::Sender<Bytes>,
        opens: Arc<AtomicUsize>,
    ) -> Open<DuplexStream> {
        Box::new(move |early| {
            opens.fetch_add(1, Ordering::SeqCst);
            let _ = early_seen.send(early);
            Box::pin(async move { Ok(far) })
        })
    }

    #[tokio::test]
    async fn the_request_written_before_the_flush_goes_with_the_open() {
        let (near, mut far) = duplex(1 << 16);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let opens = Arc::new(AtomicUsize::new(0));
        let (mut io, _) = Opening::new(pipe_open(near, tx, opens.clone()), 64, |_| {});
        io.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        io.write_all(b"\r\n").await.unwrap();
        // Nothing opened until the flush.
        assert_eq!(opens.load(Ordering::SeqCst), 0);
        io.flush().await.unwrap();
        assert_eq!(&rx.await.unwrap()[..], b"GET / HTTP/1.1\r\n\r\n");
        // Later bytes go through the opened stream; answers come back.
        io.write_all(b"more").await.unwrap();
        let mut got = [0u8; 4];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"more");
        far.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let mut answer = [0u8; 17];
        io.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200 OK\r\n");
        assert_eq!(opens.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn past_the_limit_the_rest_follows_the_open() {
        let (near, mut far) = duplex(1 << 16);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (mut io, _) = Opening::new(pipe_open(near, tx, Arc::default()), 4, |_| {});
        io.write_all(b"0123456789").await.unwrap();
        assert_eq!(&rx.await.unwrap()[..], b"0123");
        let mut rest = [0u8; 6];
        far.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"456789");
    }

    #[tokio::test]
    async fn with_no_limit_nothing_goes_early() {
        let (near, mut far) = duplex(1 << 16);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (mut io, _) = Opening::new(pipe_open(near, tx, Arc::default()), 0, |_| {});
        io.write_all(b"POST").await.unwrap();
        assert!(rx.await.unwrap().is_empty());
        let mut got = [0u8; 4];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"POST");
    }

    #[tokio::test]
    async fn a_reader_waiting_before_the_open_is_woken_by_it() {
        let (near, mut far) = duplex(1 << 16);
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let (io, _) = Opening::new(pipe_open(near, tx, Arc::default()), 64, |_| {});
        let (mut reader, mut writer) = tokio::io::split(io);
        let read = tokio::spawn(async move {
            let mut got = [0u8; 2];
            reader.read_exact(&mut got).await.map(|_| got)
        });
        tokio::task::yield_now().await;
        writer.write_all(b"hi").await.unwrap();
        writer.flush().await.unwrap();
        far.write_all(b"ok").await.unwrap();
        assert_eq!(&read.await.unwrap().unwrap(), b"ok");
    }

    #[tokio::test]
    async fn a_flush_before_anything_was_written_opens_nothing() {
        let (near, _far) = duplex(1 << 16);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let opens = Arc::new(AtomicUsize::new(0));
        let (mut io, _) = Opening::new(pipe_open(near, tx, opens.clone()), 64, |_| {});
        io.flush().await.unwrap();
        assert_eq!(opens.load(Ordering::SeqCst), 0);
        io.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(&rx.await.unwrap()[..], b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_failed_open_is_kept_for_the_page() {
        let open: Open<DuplexStream> = Box::new(|_| Box::pin(async { Err(OpenError::Unknown) }));
        let (mut io, outcome) = Opening::new(open, 64, |_| {});
        io.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(io.flush().await.is_err());
        assert!(matches!(outcome.failed(), Some(OpenError::Unknown)));
        assert!(io.write_all(b"x").await.is_err());
        let mut buf = [0u8; 1];
        assert!(io.read(&mut buf).await.is_err());
    }
}
