//! The runtime QUIC endpoints run on: tokio's, with datagrams coalesced
//! while a connection is busy.
//!
//! quinn drives each endpoint and each connection from a task of its own (the
//! "driver"), woken whenever a stream has something to send or a datagram has
//! arrived. tokio's multi-thread scheduler runs a task woken from another
//! task right after it (its LIFO slot), so under load each visitor's request
//! or answer woke the driver on its own and left in a datagram of its own:
//! about one `sendmsg` and one datagram per request in each direction, though
//! a datagram can carry many streams' frames. Here a driver that is polled
//! again less than [`BUSY_GAP`] after its last poll ended first yields
//! (`tokio::task::yield_now`: tokio keeps the wake aside until its worker has
//! run the other tasks in its queue, or for at most one maintenance interval
//! of 61 polls), so the streams whose tasks are ready too write their frames
//! before it sends, and one pass sends them in fewer, fuller datagrams; the
//! endpoint likewise finds more datagrams to read in one batch. A driver that
//! was idle longer runs at once, so a lone request waits for nothing. It is
//! the idea of Linux's TCP autocorking: hold small writes back only while
//! earlier ones are still being worked on. Measured in `cargo bench --bench
//! tunnel` (README: Tunnels, side by side).
//!
//! quinn's own re-polls (a driver that sent 20 datagrams or read for 50 µs
//! wakes itself to go on) count as busy too and yield: during a bulk transfer
//! that lets the splice refill the stream first, and under mixed load a bulk
//! sender waits behind the worker's other ready tasks, as any task does.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

/// How recently a driver must have run to count as busy and yield once
/// before running again. Under load a connection's driver is woken every few
/// microseconds (at 64 concurrent HTTPS visitors, each request and answer
/// woke it); with one request at a time, each process a request crosses
/// takes tens of microseconds between two wakes (a read from the visitor or
/// the target, a packet each way). Measured on the HTTPS direct path, three
/// alternated rounds each: with 20 µs, c64 gained 22 % (36,800 req/s
/// against 29,800) with c1's p50 unchanged (0.214 ms); 10 µs left some
/// rounds without the gain, and 50 µs cost c1 10–30 µs, its yields then
/// delaying lone requests for nothing.
pub const BUSY_GAP: Duration = Duration::from_micros(20);

/// tokio's runtime for quinn, with its drivers wrapped in [`coalescing`].
#[derive(Debug)]
pub struct Coalescing {
    tokio: Arc<dyn quinn::Runtime>,
    busy_gap: Duration,
}

impl Coalescing {
    /// The runtime of the calling tokio context, coalescing after
    /// [`BUSY_GAP`]; `None` outside one.
    pub fn current() -> Option<Self> {
        Self::with_gap(BUSY_GAP)
    }

    fn with_gap(busy_gap: Duration) -> Option<Self> {
        let tokio = quinn::default_runtime()?;
        Some(Self { tokio, busy_gap })
    }
}

impl quinn::Runtime for Coalescing {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        self.tokio.new_timer(at)
    }

    fn spawn(&self, driver: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.tokio
            .spawn(Box::pin(coalescing(driver, self.busy_gap)));
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        self.tokio.wrap_udp_socket(socket)
    }

    fn now(&self) -> Instant {
        self.tokio.now()
    }
}

/// Runs `driver`; each time it is to be polled again less than `busy_gap`
/// after its last poll ended, yields once first (see the module's text).
async fn coalescing(mut driver: Pin<Box<dyn Future<Output = ()> + Send>>, busy_gap: Duration) {
    loop {
        // Poll the driver once; its waker is this task's.
        if poll_fn(|cx| Poll::Ready(driver.as_mut().poll(cx)))
            .await
            .is_ready()
        {
            return;
        }
        let polled = Instant::now();
        // Wait for the wake the driver registered for.
        let mut woken = false;
        poll_fn(|_| {
            if std::mem::replace(&mut woken, true) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        if polled.elapsed() < busy_gap {
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Spawns a driver through a runtime with `gap`, wakes it once it has
    /// run, makes another task ready right after, and returns who ran first.
    async fn first_after_a_wake(gap: Duration) -> Vec<&'static str> {
        let order = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let driver = {
            let order = order.clone();
            async move {
                rx.recv().await;
                order.lock().unwrap().push("driver");
                let _ = done_tx.send(());
            }
        };
        let runtime = Coalescing::with_gap(gap).unwrap();
        quinn::Runtime::spawn(&runtime, Box::pin(driver));
        // The driver's first poll: it waits on the channel.
        tokio::task::yield_now().await;
        tx.send(()).unwrap();
        let other = {
            let order = order.clone();
            tokio::spawn(async move { order.lock().unwrap().push("other") })
        };
        other.await.unwrap();
        done_rx.await.unwrap();
        order.lock().unwrap().clone()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_busy_driver_runs_after_the_tasks_that_became_ready_with_it() {
        // Any wake comes "soon" after a poll with a gap of an hour.
        let order = first_after_a_wake(Duration::from_secs(3_600)).await;
        assert_eq!(order, ["other", "driver"]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_driver_runs_at_once() {
        // No wake comes within a gap of zero.
        let order = first_after_a_wake(Duration::ZERO).await;
        assert_eq!(order, ["driver", "other"]);
    }
}
