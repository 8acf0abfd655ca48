//! Copying bytes between a visitor and a tunnel stream, both ways, keeping
//! half-close: when one side finishes sending, the other side's write half is
//! shut down (QUIC FIN, TCP FIN) and the opposite direction keeps flowing until
//! it finishes too. A service that reads a request to EOF before answering
//! works through the tunnel.
//!
//! Each side is an [`End`]: any `AsyncRead + AsyncWrite` (read into the
//! direction's own buffer, written by copying), or a side that holds its
//! bytes in chunks already and passes them on without a copy (a QUIC
//! stream, `specter::wire::QuicEnd`).
//!
//! A side that stops taking bytes (a target that never reads, a visitor
//! whose window stays full, a stream out of flow-control credit) ends the
//! splice after a deadline ([`splice_within`]): blocked, neither side's
//! reset or close would ever be seen, and both sockets would stay open.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::IoSlice;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_util::io::poll_read_buf;

/// Largest buffer per direction. The 8 KiB default of `copy_bidirectional`
/// costs many more wake-ups per byte; 1 MiB measured ≈ 2.5× the throughput
/// on a TCP→QUIC→TCP relay on this project's machine.
pub const SPLICE_BUFFER: usize = 1 << 20;

/// Buffer a direction starts with (one TLS record): what an idle or chatty
/// connection holds. A read that fills the buffer doubles it, up to
/// [`SPLICE_BUFFER`], so a bulk transfer reaches large reads within a few
/// of them; a small read on a grown buffer shrinks it back. Thousands of
/// idle visitors then cost kilobytes each, not 2 MiB per process.
pub const SPLICE_BUFFER_START: usize = 16 * 1024;

/// How long a spliced side may take none of the bytes waiting for it before
/// [`splice_within`] ends both ways, where nobody set another: at attached
/// nodes and clients, and the default of a node's ingress
/// (`write_stall_timeout`). Long enough for a slow reader that keeps taking
/// bytes, or a paused stream; short enough that a blocked splice does not
/// hold its sockets and its stream's flow-control credit for minutes.
pub const SPLICE_STALL: Duration = Duration::from_secs(30);

/// Bytes moved by a finished splice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spliced {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
}

/// A read that left less room than this in the buffer's allocation starts
/// a new one for the next: reads pack into one allocation until it is
/// nearly full. Bytes handed on by reference (a QUIC send buffer keeps them
/// until the peer acknowledges them) then pin at most a third more than
/// they are (an allocation is left with at least 12 of its 16 KiB used),
/// however small the reads: a new allocation per read would let a peer
/// sending one byte at a time pin 16 KiB per byte.
const ROOM_FLOOR: usize = 4 * 1024;

/// Where a direction's reads land, when its reader copies into a buffer:
/// the size of the next read grows and shrinks with the traffic (see
/// [`SPLICE_BUFFER_START`]), and read bytes leave as [`Bytes`] that share
/// the allocation, so a writer may keep them without a copy.
pub struct Room {
    buf: BytesMut,
    size: usize,
}

impl Room {
    fn new() -> Self {
        Room {
            buf: BytesMut::new(),
            size: SPLICE_BUFFER_START,
        }
    }

    /// Reads once from `reader`: `Ok(None)` at EOF.
    pub fn poll_read_from<R>(
        &mut self,
        cx: &mut Context<'_>,
        reader: Pin<&mut R>,
    ) -> Poll<io::Result<Option<Bytes>>>
    where
        R: AsyncRead + ?Sized,
    {
        if self.buf.capacity() < ROOM_FLOOR.min(self.size) {
            // Reuses the allocation in place once every byte read into it
            // is gone; a new one while a writer still holds some.
            self.buf.reserve(self.size);
        }
        let limit = self.size.min(self.buf.capacity());
        let n = ready!(poll_read_buf(reader, cx, &mut (&mut self.buf).limit(limit)))?;
        if n == 0 {
            return Poll::Ready(Ok(None));
        }
        let read = self.buf.split().freeze();
        self.resize_after(n, limit);
        Poll::Ready(Ok(Some(read)))
    }

    /// Sizes the next read after one of `n` bytes into `limit` of room.
    fn resize_after(&mut self, n: usize, limit: usize) {
        if n == self.size {
            self.size = (self.size * 2).min(SPLICE_BUFFER);
        } else if n < limit && n < self.size / 8 {
            // Small, and not for want of room: back to the start, and a
            // grown allocation goes once the bytes read into it are gone.
            self.size = SPLICE_BUFFER_START;
            if self.buf.capacity() > SPLICE_BUFFER_START {
                self.buf = BytesMut::new();
            }
        }
    }
}

/// Bytes a direction read and has not written yet, in order.
#[derive(Default)]
pub struct Held {
    chunks: VecDeque<Bytes>,
    lent: bool,
}

impl Held {
    /// Appends bytes the splice read into its own [`Room`]: a writer may
    /// keep them (see [`Held::lent`]).
    pub fn push_own(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.chunks.push_back(bytes);
        }
    }

    /// Appends chunks a reader lent: slices of buffers it allocated (a QUIC
    /// datagram), which may be far larger than the chunk.
    pub fn push_lent(&mut self, chunks: impl IntoIterator<Item = Bytes>) {
        self.lent = true;
        self.chunks
            .extend(chunks.into_iter().filter(|c| !c.is_empty()));
    }

    /// Whether the bytes pin buffers other than the splice's own: a writer
    /// that would keep them (until a peer acknowledges them) copies them
    /// instead, so what it holds costs what it is.
    pub fn lent(&self) -> bool {
        self.lent
    }

    /// The chunks, front first; a writer that takes some whole pops them,
    /// and one that takes part of a chunk advances it.
    pub fn chunks(&mut self) -> &mut VecDeque<Bytes> {
        &mut self.chunks
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Copies lent chunks into one buffer of the splice's own, for a writer
    /// that keeps what it takes: one copy, where the chunks would pin their
    /// whole received buffers until acknowledged.
    pub fn own(&mut self) {
        if !self.lent {
            return;
        }
        let total = self.chunks.iter().map(Bytes::len).sum();
        let mut own = BytesMut::with_capacity(total);
        for chunk in self.chunks.drain(..) {
            own.extend_from_slice(&chunk);
        }
        self.chunks.push_back(own.freeze());
        self.lent = false;
    }

    /// Drops the first `n` bytes (written out by a copying writer).
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.chunks.pop_front();
        }
    }
}

/// Most chunks one vectored write takes (on the stack: a QUIC side lends
/// at most 16 per read, a socket read is one).
const WRITE_SLICES: usize = 32;

/// One side of a splice: where a direction reads its bytes and where the
/// other writes them. Every `AsyncRead + AsyncWrite` is one, read through
/// the direction's [`Room`] and written by copying; a side that has its
/// bytes in chunks already (a QUIC stream) implements it to lend them on
/// reads and to take owned ones on writes, a copy fewer each way.
pub trait End {
    /// Reads what is ready into `held` (empty when called), through `room`
    /// if this side copies: the number of bytes added, 0 at EOF.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        room: &mut Room,
        held: &mut Held,
    ) -> Poll<io::Result<usize>>;

    /// Writes from the front of `held` (never empty when called), removing
    /// what was taken: the number of bytes, 0 if none could be.
    fn poll_drain(&mut self, cx: &mut Context<'_>, held: &mut Held) -> Poll<io::Result<usize>>;

    /// Pushes out what was written.
    fn poll_flush_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Ends the write half (FIN).
    fn poll_shutdown_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl<T> End for T
where
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        room: &mut Room,
        held: &mut Held,
    ) -> Poll<io::Result<usize>> {
        let Some(read) = ready!(room.poll_read_from(cx, Pin::new(self)))? else {
            return Poll::Ready(Ok(0));
        };
        let n = read.len();
        held.push_own(read);
        Poll::Ready(Ok(n))
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>, held: &mut Held) -> Poll<io::Result<usize>> {
        let n = if held.chunks.len() > 1 && self.is_write_vectored() {
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
            let mut n = 0;
            for (slot, chunk) in slices.iter_mut().zip(&held.chunks) {
                *slot = IoSlice::new(chunk);
                n += 1;
            }
            ready!(Pin::new(&mut *self).poll_write_vectored(cx, &slices[..n]))?
        } else {
            let front = held.chunks.front().map_or(&[][..], |c| &c[..]);
            ready!(Pin::new(&mut *self).poll_write(cx, front))?
        };
        held.advance(n);
        Poll::Ready(Ok(n))
    }

    fn poll_flush_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_flush(cx)
    }

    fn poll_shutdown_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_shutdown(cx)
    }
}

/// One direction of a splice: read, write out, and at EOF flush and shut
/// the writer down.
struct Direction {
    room: Room,
    held: Held,
    read_done: bool,
    need_flush: bool,
    shut_down: bool,
    moved: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            room: Room::new(),
            held: Held::default(),
            read_done: false,
            need_flush: false,
            shut_down: false,
            moved: 0,
        }
    }

    /// Whether read bytes wait for the writer.
    fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: End + ?Sized,
        W: End + ?Sized,
    {
        loop {
            while !self.held.is_empty() {
                let n = ready!(writer.poll_drain(cx, &mut self.held))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.moved += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                if self.need_flush {
                    ready!(writer.poll_flush_end(cx))?;
                    self.need_flush = false;
                }
                if !self.shut_down {
                    ready!(writer.poll_shutdown_end(cx))?;
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(self.moved));
            }
            self.held.lent = false;
            match reader.poll_fill(cx, &mut self.room, &mut self.held) {
                Poll::Pending => {
                    // Nothing more to send for now: push out what was written.
                    if self.need_flush {
                        ready!(writer.poll_flush_end(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // Written out at the top of the loop.
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(_)) => {}
            }
        }
    }
}

/// Copies `a → b` and `b → a` until both directions reached EOF, preserving
/// half-close. Returns the byte counts, or the first IO error. Each
/// direction's buffer grows with the traffic (see [`SPLICE_BUFFER_START`]).
/// No deadline: for a local pipe (stdin/stdout); a splice between parties
/// that may stop reading uses [`splice_within`].
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<Spliced>
where
    A: End + ?Sized,
    B: End + ?Sized,
{
    splice_inner(a, b, None, std::future::pending()).await
}

/// [`splice`], ending with [`io::ErrorKind::TimedOut`] when a side has
/// taken none of the bytes waiting for it for `stall`, so the caller resets
/// both sides and their sockets and streams are freed.
pub async fn splice_within<A, B>(a: &mut A, b: &mut B, stall: Duration) -> io::Result<Spliced>
where
    A: End + ?Sized,
    B: End + ?Sized,
{
    splice_inner(a, b, Some(stall), std::future::pending()).await
}

/// When each direction last saw its writer take nothing of what it held,
/// and the timer for the earliest deadline.
struct Stall {
    after: Duration,
    since: [Option<Instant>; 2],
    moved: [u64; 2],
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    /// Notes direction `i`'s state after a poll; `Err` once it held bytes
    /// without progress for the deadline.
    fn check(&mut self, cx: &mut Context<'_>, dirs: [&Direction; 2]) -> io::Result<()> {
        let mut deadline: Option<Instant> = None;
        for (i, d) in dirs.into_iter().enumerate() {
            if !d.holding() || d.moved != self.moved[i] {
                self.since[i] = None;
                self.moved[i] = d.moved;
            }
            if d.holding() {
                let since = *self.since[i].get_or_insert_with(Instant::now);
                let at = since + self.after;
                deadline = Some(deadline.map_or(at, |d| d.min(at)));
            }
        }
        let Some(deadline) = deadline else {
            // Kept armed: a spurious wake-up at its deadline is cheaper than
            // dropping and re-registering it whenever a write blocks.
            return Ok(());
        };
        // Armed once per stall, not on every blocked write: one that fires
        // early (progress was made since) is moved to the new deadline.
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("a side took none of the bytes for {:?}", self.after),
                ));
            }
            timer.as_mut().reset(deadline);
        }
        Ok(())
    }
}

/// Why [`splice_watching`] ended: its `gone` completed.
#[derive(Debug)]
struct FarSideGone;

impl std::fmt::Display for FarSideGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the far side stopped reading")
    }
}

impl std::error::Error for FarSideGone {}

/// Whether a splice ended because its far side was gone (see
/// [`splice_watching`]): an end the far side chose (it gave up, or let an
/// idle pooled stream go), not a failure here.
pub fn far_side_gone(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|e| e.is::<FarSideGone>())
}

/// [`splice_within`], also ending with [`io::ErrorKind::ConnectionReset`]
/// when `gone` completes: a far side that stopped reading a QUIC stream
/// (`STOP_SENDING`, its end of the splice gave up) is seen only by a
/// write, and a half-closed splice whose other side is idle writes nothing
/// (a visitor that finished sending, a target that never answers): without
/// this, both sockets stayed open for good.
pub async fn splice_watching<A, B>(
    a: &mut A,
    b: &mut B,
    stall: Duration,
    gone: impl Future<Output = ()>,
) -> io::Result<Spliced>
where
    A: End + ?Sized,
    B: End + ?Sized,
{
    splice_inner(a, b, Some(stall), gone).await
}

async fn splice_inner<A, B>(
    a: &mut A,
    b: &mut B,
    stall: Option<Duration>,
    gone: impl Future<Output = ()>,
) -> io::Result<Spliced>
where
    A: End + ?Sized,
    B: End + ?Sized,
{
    let mut gone = std::pin::pin!(gone);
    let (mut a_to_b, mut b_to_a) = (Direction::new(), Direction::new());
    let (mut a_done, mut b_done) = (None, None);
    let mut stall = stall.map(|after| Stall {
        after,
        since: [None, None],
        moved: [0, 0],
        timer: None,
    });
    // Within the task's budget, as tokio's own copy is: two QUIC streams
    // are rarely pending, and one splice must not hold its worker.
    tokio::task::coop::cooperative(poll_fn(|cx| {
        if a_done.is_none()
            && let Poll::Ready(moved) = a_to_b.poll_copy(cx, &mut *a, &mut *b)
        {
            a_done = Some(moved?);
        }
        if b_done.is_none()
            && let Poll::Ready(moved) = b_to_a.poll_copy(cx, &mut *b, &mut *a)
        {
            b_done = Some(moved?);
        }
        match (a_done, b_done) {
            (Some(a_to_b), Some(b_to_a)) => Poll::Ready(Ok(Spliced { a_to_b, b_to_a })),
            _ => {
                // Checked once both directions had their turn: a splice
                // that finished both ways ends cleanly whatever came after.
                if gone.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        FarSideGone,
                    )));
                }
                if let Some(stall) = &mut stall {
                    stall.check(cx, [&a_to_b, &b_to_a])?;
                }
                Poll::Pending
            }
        }
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// A half-closed splice whose open direction is idle (the visitor
    /// finished sending, the service never answers) ends when the far side
    /// is gone, and only then.
    #[tokio::test]
    async fn a_half_closed_idle_splice_ends_when_the_far_side_is_gone() {
        let (mut visitor, mut relay_a) = duplex(1024);
        let (mut relay_b, _silent_service) = duplex(1024);
        let (tell, gone) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(async move {
            splice_watching(&mut relay_a, &mut relay_b, Duration::from_secs(60), async {
                let _ = gone.await;
            })
            .await
        });
        visitor.write_all(b"request").await.unwrap();
        visitor.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!relay.is_finished(), "ended before the far side went");
        tell.send(()).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("still spliced after the far side went")
            .unwrap();
        let err = ended.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(far_side_gone(&err), "{err}");
        assert!(!far_side_gone(&io::ErrorKind::ConnectionReset.into()));
    }

    /// visitor ⇄ [splice] ⇄ service, where the service reads the whole
    /// request (to EOF) and only then answers.
    #[tokio::test]
    async fn a_service_that_answers_after_eof_works_through_the_splice() {
        let (mut visitor, mut relay_a) = duplex(64 * 1024);
        let (mut relay_b, mut service) = duplex(64 * 1024);
        let relay = tokio::spawn(async move { splice(&mut relay_a, &mut relay_b).await });
        let server = tokio::spawn(async move {
            let mut request = Vec::new();
            service.read_to_end(&mut request).await.unwrap();
            service.write_all(b"got ").await.unwrap();
            service.write_all(&request).await.unwrap();
            service.shutdown().await.unwrap();
        });
        visitor.write_all(b"hello").await.unwrap();
        visitor.shutdown().await.unwrap(); // half-close: still reading
        let mut answer = Vec::new();
        visitor.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"got hello");
        server.await.unwrap();
        let moved = relay.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Spliced {
                a_to_b: 5,
                b_to_a: 9
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_side_that_stops_reading_ends_the_splice_after_the_deadline() {
        // The far side never reads: the pipe fills, then the splice's
        // buffer, and it must give up rather than hold both ends forever.
        let (mut visitor, mut relay_a) = duplex(1024);
        let (mut relay_b, _never_read) = duplex(1024);
        let stall = Duration::from_secs(30);
        let relay =
            tokio::spawn(async move { splice_within(&mut relay_a, &mut relay_b, stall).await });
        let began = Instant::now();
        let writer = tokio::spawn(async move {
            let chunk = [7u8; 4096];
            while visitor.write_all(&chunk).await.is_ok() {}
        });
        let err = relay.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = began.elapsed();
        assert!(
            took >= stall && took < stall + Duration::from_secs(1),
            "{took:?}"
        );
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_bytes_is_not_a_stall() {
        let (mut visitor, mut relay_a) = duplex(1024);
        let (mut relay_b, mut slow) = duplex(1024);
        let relay = tokio::spawn(async move {
            splice_within(&mut relay_a, &mut relay_b, Duration::from_secs(5)).await
        });
        let total = 64 * 1024;
        tokio::spawn(async move {
            visitor.write_all(&vec![1u8; total]).await.unwrap();
            visitor.shutdown().await.unwrap();
            let mut rest = Vec::new();
            visitor.read_to_end(&mut rest).await.unwrap();
        });
        // 1 KiB every 2 s: far slower than the writer, never stalled 5 s.
        let mut got = 0;
        let mut buf = [0u8; 1024];
        while got < total {
            tokio::time::sleep(Duration::from_secs(2)).await;
            got += slow.read(&mut buf).await.unwrap();
        }
        slow.shutdown().await.unwrap();
        let moved = relay.await.unwrap().unwrap();
        assert_eq!(moved.a_to_b, total as u64);
    }

    /// A reader that hands out `sizes` bytes per read, then EOF.
    struct Reads(VecDeque<usize>);

    impl AsyncRead for Reads {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(n) = self.0.pop_front() {
                let n = n.min(buf.remaining());
                buf.put_slice(&vec![1u8; n]);
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Reads `sizes` through a room, keeping every read (as a QUIC send
    /// buffer keeps bytes until they are acknowledged).
    fn read_all(room: &mut Room, sizes: &[usize]) -> Vec<Bytes> {
        let mut reader = Reads(sizes.iter().copied().collect());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut kept = Vec::new();
        while let Poll::Ready(Ok(Some(read))) = room.poll_read_from(&mut cx, Pin::new(&mut reader))
        {
            kept.push(read);
        }
        kept
    }

    /// How many allocations the kept reads sit in: each read that does not
    /// start where the one before it ended began a new one.
    fn run_starts(reads: impl IntoIterator<Item = (usize, usize)>) -> Vec<usize> {
        let mut starts = Vec::new();
        let mut end = None;
        for (at, len) in reads {
            if end != Some(at) {
                starts.push(at);
            }
            end = Some(at + len);
        }
        starts
    }

    /// Where each read lies: its address and length.
    fn spans(kept: &[Bytes]) -> impl Iterator<Item = (usize, usize)> + '_ {
        kept.iter().map(|b| (b.as_ptr() as usize, b.len()))
    }

    #[test]
    fn reads_grow_with_full_reads_and_shrink_after_small_ones() {
        let mut room = Room::new();
        let mut sizes = vec![room.size];
        while room.size < SPLICE_BUFFER {
            let full = room.size;
            let _ = read_all(&mut room, &[full]);
            sizes.push(room.size);
        }
        assert_eq!(sizes.len(), 7, "16 KiB doubles to 1 MiB in six full reads");
        let _ = read_all(&mut room, &[SPLICE_BUFFER]);
        assert_eq!(room.size, SPLICE_BUFFER, "never past the bound");
        let _ = read_all(&mut room, &[SPLICE_BUFFER / 2]);
        assert_eq!(room.size, SPLICE_BUFFER, "a half-full read keeps it");
        let _ = read_all(&mut room, &[100]);
        assert_eq!(room.size, SPLICE_BUFFER_START, "a small read shrinks it");
        assert!(
            room.buf.capacity() <= SPLICE_BUFFER_START,
            "and lets the grown allocation go"
        );
    }

    #[test]
    fn small_reads_kept_by_a_writer_pack_into_few_allocations() {
        // A peer trickling 100-byte writes at a node whose QUIC send buffer
        // keeps each read until acknowledged: 1,000 reads must not hold
        // 1,000 allocations of 16 KiB.
        let mut room = Room::new();
        let kept = read_all(&mut room, &[100; 1000]);
        assert_eq!(kept.len(), 1000);
        let bytes: usize = kept.iter().map(Bytes::len).sum();
        let allocations = run_starts(spans(&kept)).len();
        let most = bytes.div_ceil(SPLICE_BUFFER_START - ROOM_FLOOR);
        assert!(
            allocations <= most,
            "{allocations} allocations for {bytes} bytes (at most {most})"
        );
        // Once the writer lets go, the room reuses its allocation in place:
        // after the rest of the current one, every run starts at its front.
        drop(kept);
        let mut reader = Reads([100; 600].into_iter().collect());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let reads =
            std::iter::from_fn(
                || match room.poll_read_from(&mut cx, Pin::new(&mut reader)) {
                    // Each read dropped at once, as a copying writer does.
                    Poll::Ready(Ok(Some(read))) => Some((read.as_ptr() as usize, read.len())),
                    _ => None,
                },
            );
        let starts = run_starts(reads);
        assert!(starts.len() > 2, "{starts:?}");
        assert!(starts[1..].iter().all(|&s| s == starts[1]), "{starts:?}");
    }

    /// A side holding its bytes in chunks, as a QUIC stream does: lends
    /// them on reads (`lend` chunks of `chunk` bytes each, then EOF) and
    /// keeps the owned ones it is given on writes.
    struct Chunked {
        lend: VecDeque<Bytes>,
        kept: Vec<Bytes>,
        copied: usize,
        finished: bool,
    }

    impl End for Chunked {
        fn poll_fill(
            &mut self,
            _: &mut Context<'_>,
            _: &mut Room,
            held: &mut Held,
        ) -> Poll<io::Result<usize>> {
            let batch: Vec<Bytes> = (0..3).filter_map(|_| self.lend.pop_front()).collect();
            let n = batch.iter().map(Bytes::len).sum();
            held.push_lent(batch);
            Poll::Ready(Ok(n))
        }

        fn poll_drain(&mut self, _: &mut Context<'_>, held: &mut Held) -> Poll<io::Result<usize>> {
            if held.lent() {
                held.own();
                self.copied += held.chunks().iter().map(Bytes::len).sum::<usize>();
            }
            let taken: Vec<Bytes> = held.chunks().drain(..).collect();
            let n = taken.iter().map(Bytes::len).sum();
            self.kept.extend(taken);
            Poll::Ready(Ok(n))
        }

        fn poll_flush_end(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown_end(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.finished = true;
            Poll::Ready(Ok(()))
        }
    }

    impl Chunked {
        /// Lends `count` 100-byte slices of `datagram`.
        fn lending(datagram: &Bytes, count: usize) -> Self {
            Chunked {
                lend: (0..count)
                    .map(|i| datagram.slice(i * 100..i * 100 + 100))
                    .collect(),
                kept: Vec::new(),
                copied: 0,
                finished: false,
            }
        }
    }

    #[tokio::test]
    async fn chunk_sides_take_owned_reads_and_copy_lent_chunks() {
        let datagram = Bytes::from(vec![9u8; 64 * 1024]);
        let mut quic = Chunked::lending(&datagram, 10);
        let (mut visitor, mut socket) = duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            visitor.write_all(&[5u8; 200_000]).await.unwrap();
            visitor.shutdown().await.unwrap();
            let mut back = Vec::new();
            visitor.read_to_end(&mut back).await.unwrap();
            back
        });
        let moved = splice(&mut socket, &mut quic).await.unwrap();
        assert_eq!(
            moved,
            Spliced {
                a_to_b: 200_000,
                b_to_a: 1_000
            }
        );
        // The socket's reads were handed over whole, without a copy...
        assert_eq!(quic.kept.iter().map(Bytes::len).sum::<usize>(), 200_000);
        assert!(quic.kept.iter().all(|b| b.iter().all(|&x| x == 5)));
        assert!(quic.finished);
        // ...and the lent chunks went to the socket, which copies anyway.
        assert_eq!(writer.await.unwrap(), vec![9u8; 1_000]);
        // Between two chunk sides, lent chunks are copied, not kept: they
        // would pin their whole datagram until acknowledged.
        let mut from = Chunked::lending(&datagram, 10);
        let mut to = Chunked::lending(&datagram, 0);
        splice(&mut from, &mut to).await.unwrap();
        assert_eq!(to.copied, 1_000);
        assert!(
            to.kept
                .iter()
                .all(|k| !datagram.as_ptr_range().contains(&k.as_ptr())),
            "a kept chunk still points into the datagram"
        );
    }

    #[tokio::test]
    async fn large_transfers_arrive_intact_in_both_directions() {
        let (mut left, mut relay_a) = duplex(1 << 16);
        let (mut relay_b, mut right) = duplex(1 << 16);
        let relay = tokio::spawn(async move { splice(&mut relay_a, &mut relay_b).await });
        let data: Vec<u8> = (0..8_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let expected = data.clone();
        let back = data.clone();
        let writer = tokio::spawn(async move {
            left.write_all(&data).await.unwrap();
            left.shutdown().await.unwrap();
            let mut echoed = Vec::new();
            left.read_to_end(&mut echoed).await.unwrap();
            echoed
        });
        let mut got = Vec::new();
        right.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
        right.write_all(&back).await.unwrap();
        right.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), expected);
        let moved = relay.await.unwrap().unwrap();
        assert_eq!(moved.a_to_b, 8_000_000);
        assert_eq!(moved.b_to_a, 8_000_000);
    }
}
