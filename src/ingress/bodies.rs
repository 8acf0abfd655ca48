//! Bodies with deadlines: a request body must keep a minimum rate while the
//! tunnel waits for it ([`RateBody`]), and a response body notes when the
//! visitor stops taking it ([`Tracked`]), so the connection's watchdog can
//! cut a visitor that stopped reading; the response body holds the request
//! in flight until it is dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::admission::{InFlight, Slot};
use super::limits::{Cut, IngressStats};

/// Errors of the bodies the ingress passes on.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body on its way through the HTTP ingress, either way.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A visitor's request body held to a minimum rate: over each `window` of
/// time spent waiting for the visitor (not for the tunnel), at least
/// `min_rate` bytes per second on average must arrive, or the body fails and
/// the connection is closed.
pub struct RateBody<B> {
    inner: B,
    slot: Arc<Slot>,
    stats: Arc<IngressStats>,
    min_bytes: u64,
    window: Duration,
    /// Waiting time already spent in this window (closed spells).
    waited: Duration,
    /// Bytes received in this window.
    bytes: u64,
    /// Since when we have been waiting for the visitor, if we are.
    waiting_since: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    /// Cancelled once the body has ended or is dropped (see
    /// [`RateBody::telling_end`]).
    ended: Option<tokio_util::sync::DropGuard>,
}

impl<B> RateBody<B> {
    /// Holds `inner` to `min_rate` bytes per second over `window`.
    pub fn new(
        inner: B,
        slot: Arc<Slot>,
        stats: Arc<IngressStats>,
        min_rate: u64,
        window: Duration,
    ) -> Self {
        RateBody {
            inner,
            slot,
            stats,
            min_bytes: min_rate.saturating_mul(window.as_secs().max(1)),
            window,
            waited: Duration::ZERO,
            bytes: 0,
            waiting_since: None,
            timer: Box::pin(tokio::time::sleep(window)),
            ended: None,
        }
    }

    /// Cancels `token` when the body has ended (its last frame was taken)
    /// or is dropped: when the whole request has been sent.
    pub fn telling_end(mut self, token: &tokio_util::sync::CancellationToken) -> Self {
        self.ended = Some(token.clone().drop_guard());
        self
    }

    /// Closes the current window if it is over: `Err` if it was too slow.
    fn check(&mut self, now: Instant) -> Result<(), ()> {
        let waited = self.waited + self.waiting_since.map_or(Duration::ZERO, |s| now - s);
        if waited < self.window {
            return Ok(());
        }
        if self.bytes < self.min_bytes {
            return Err(());
        }
        self.waited = Duration::ZERO;
        self.bytes = 0;
        self.waiting_since = self.waiting_since.map(|_| now);
        Ok(())
    }
}

impl<B> Body for RateBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(frame) => {
                    let now = Instant::now();
                    if let Some(since) = this.waiting_since.take() {
                        this.waited += now - since;
                    }
                    if let Some(Ok(f)) = &frame
                        && let Some(data) = f.data_ref()
                    {
                        this.bytes += data.len() as u64;
                    }
                    let _ = this.check(now);
                    if frame.is_none() || this.inner.is_end_stream() {
                        drop(this.ended.take());
                    }
                    return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
                }
                Poll::Pending => {
                    let now = Instant::now();
                    let since = *this.waiting_since.get_or_insert(now);
                    if this.check(now).is_err() {
                        this.stats.cut(Cut::BodyRate);
                        this.slot.close();
                        let err = std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the request body arrived too slowly",
                        );
                        return Poll::Ready(Some(Err(err.into())));
                    }
                    let left = this.window.saturating_sub(this.waited + (now - since));
                    this.timer.as_mut().reset(now + left);
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // The window just ended: look again.
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body on its way to the visitor: records, in its slot, a frame
/// handed over that has not been followed by a request for the next (the
/// visitor is not taking it), and holds the request in flight until it is
/// dropped.
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
    slot: Arc<Slot>,
    /// Counts an answer whose upstream failed mid-body: hyper then resets
    /// the visitor's HTTP/2 stream, or closes its HTTP/1.1 connection short
    /// of the announced length or final chunk, so the cut shows.
    stats: Arc<IngressStats>,
    /// This body's key among its slot's unfinished hand-overs.
    key: u64,
}

impl<B> Tracked<B> {
    /// Tracks `inner`, a response of the request `in_flight`.
    pub fn new(inner: B, slot: Arc<Slot>, stats: Arc<IngressStats>, in_flight: InFlight) -> Self {
        let key = slot.new_body_key();
        Tracked {
            inner,
            _in_flight: in_flight,
            slot,
            stats,
            key,
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.slot.pulled(self.key);
    }
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        this.slot.pulled(this.key);
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(|d| !d.is_empty()) => {
                this.slot.handed(this.key);
            }
            Poll::Ready(Some(Err(_))) => {
                this.stats.broken();
                tracing::info!("an answer was cut: its path died mid-body; the visitor is reset");
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use http_body_util::channel::Channel;

    fn slot() -> (crate::ingress::admission::Ticket, Arc<IngressStats>) {
        let stats = Arc::new(IngressStats::default());
        (crate::ingress::admission::test_ticket(&stats), stats)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_dripping_a_byte_every_few_seconds_fails_after_one_window() {
        let (ticket, stats) = slot();
        let (mut tx, body) = Channel::<Bytes, std::convert::Infallible>::new(4);
        tokio::spawn(async move {
            loop {
                if tx.send_data(Bytes::from_static(b"x")).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let began = Instant::now();
        let mut rate = RateBody::new(
            body,
            ticket.slot().clone(),
            stats.clone(),
            1_024,
            Duration::from_secs(10),
        );
        let err = loop {
            match rate.frame().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => break e,
                None => panic!("ended"),
            }
        };
        assert!(err.to_string().contains("too slowly"));
        let took = began.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took <= Duration::from_secs(11),
            "{took:?}"
        );
        assert_eq!(stats.counters().timeout_body_rate, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_upload_and_time_spent_waiting_on_the_tunnel_do_not_count() {
        let (ticket, stats) = slot();
        let (mut tx, body) = Channel::<Bytes, std::convert::Infallible>::new(1);
        tokio::spawn(async move {
            for _ in 0..60 {
                // 2 KiB/s: over the 1 KiB/s floor.
                if tx.send_data(Bytes::from(vec![0u8; 2_048])).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let mut rate = RateBody::new(
            body,
            ticket.slot().clone(),
            stats.clone(),
            1_024,
            Duration::from_secs(10),
        );
        let mut got = 0;
        while let Some(frame) = rate.frame().await {
            got += frame.unwrap().into_data().unwrap().len();
            if got == 20 * 2_048 {
                // The tunnel stops taking bytes for a minute: not the
                // visitor's fault.
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
        assert_eq!(got, 60 * 2_048);
        assert_eq!(stats.counters().timeout_body_rate, 0);
    }
}
