//! A visitor's connection as the ingress holds it: the socket (or TLS over
//! it), the [`Ticket`] that holds its room, activity recorded on every byte
//! either way, and a deadline on writes that make no progress (a visitor
//! that stopped reading).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::admission::{Slot, Ticket};
use super::limits::{Cut, IngressStats};

/// A visitor connection with its ticket, activity and write deadline.
pub struct Watched<IO> {
    io: IO,
    ticket: Ticket,
    stats: Arc<IngressStats>,
    write_stall: Duration,
    /// Armed while a write is blocked; cleared by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<IO> Watched<IO> {
    /// The watched connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Watches `io`, admitted with `ticket`.
    pub fn new(io: IO, ticket: Ticket, stats: Arc<IngressStats>, write_stall: Duration) -> Self {
        Watched {
            io,
            ticket,
            stats,
            write_stall,
            stalled: None,
        }
    }

    /// The connection's slot.
    pub fn slot(&self) -> &Arc<Slot> {
        self.ticket.slot()
    }

    /// Its ticket.
    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    /// A blocked write: arms the deadline, and fails once it passes.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let limit = self.write_stall;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        self.stats.cut(Cut::WriteStall);
        self.ticket.slot().close();
        Poll::Ready(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the visitor took none of the answer in time",
        ))
    }

    fn progressed(&mut self) {
        self.stalled = None;
        self.ticket.slot().wrote();
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.ticket.slot().touch();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, data) {
            Poll::Ready(result) => {
                if matches!(result, Ok(n) if n > 0) {
                    self.progressed();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.blocked(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => {
                if matches!(result, Ok(n) if n > 0) {
                    self.progressed();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.blocked(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.blocked(cx).map(Err),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::admission::test_ticket as ticket;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_visitor_that_stops_reading_is_cut_off_after_the_write_deadline() {
        let stats = Arc::new(IngressStats::default());
        let (near, _far) = tokio::io::duplex(1024);
        let mut io = Watched::new(near, ticket(&stats), stats.clone(), Duration::from_secs(30));
        let began = tokio::time::Instant::now();
        let chunk = vec![7u8; 4096];
        let err = loop {
            if let Err(e) = io.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        let waited = began.elapsed();
        assert!(waited >= Duration::from_secs(30) && waited < Duration::from_secs(31));
        assert_eq!(stats.counters().timeout_write_stall, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_bytes_is_not_cut_off() {
        let stats = Arc::new(IngressStats::default());
        let (near, mut far) = tokio::io::duplex(1024);
        let mut io = Watched::new(near, ticket(&stats), stats.clone(), Duration::from_secs(30));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut got = 0;
            while got < 64 * 1024 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                got += far.read(&mut buf).await.unwrap();
            }
        });
        io.write_all(&vec![1u8; 64 * 1024]).await.unwrap();
        reader.await.unwrap();
        assert_eq!(stats.counters().timeout_write_stall, 0);
        assert!(io.slot().idle() < Duration::from_secs(21));
    }
}
