//! The accept loop every TCP listener shares (the ingress ports, `specter
//! connect --listen`, the admin API): admission (see [`Admission`]) decides
//! who is served, each connection gets its own task, and accept errors back
//! off instead of spinning (a process out of descriptors gets `EMFILE` at
//! once, every time it asks).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::admission::{Admission, Ticket};
use super::limits::IngressStats;

/// Connections the kernel completes and queues for an ingress port before
/// the node accepts them (capped by `net.core.somaxconn`, 4,096 by default).
/// A flood arrives faster than the node accepts; with tokio's default of
/// 1,024 the queue overflowed during the 1,500-connection flood of
/// `tests/ingress_abuse.rs` (3 drops a run, `TcpExtListenOverflows`), and a
/// legitimate visitor whose SYN was one of them waited the kernel's 1 s
/// retransmit. Queued connections hold no descriptor of ours.
pub const LISTEN_BACKLOG: u32 = 4_096;

/// Binds a TCP listener for visitors on `addr` with [`LISTEN_BACKLOG`].
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's bind does: a restarted node rebinds at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// First wait after a failed `accept`...
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// ...doubling up to this while it keeps failing.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line about failing accepts this often; the rest are
/// counted (`accept_errors` on `/metrics`) and summed in the next line.
pub const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Backoff and rate-limited logging for a failing `accept`.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    wait: Duration,
    logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptBackoff {
    /// For the listener described by `what` (in log lines).
    pub fn new(what: &'static str) -> Self {
        AcceptBackoff {
            what,
            wait: ACCEPT_BACKOFF_MIN,
            logged: None,
            unlogged: 0,
        }
    }

    /// An accept succeeded.
    pub fn succeeded(&mut self) {
        self.wait = ACCEPT_BACKOFF_MIN;
    }

    /// An accept failed with `err`: logs (at most every
    /// [`ACCEPT_LOG_EVERY`]) and returns how long to wait before the next.
    pub fn failed(&mut self, err: &std::io::Error) -> Duration {
        let now = Instant::now();
        if self
            .logged
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(what = self.what, %err, also_failed = self.unlogged, backoff = ?self.wait, "accept failed");
            self.logged = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        let wait = self.wait;
        self.wait = (self.wait * 2).min(ACCEPT_BACKOFF_MAX);
        wait
    }
}

/// Accepts connections until `stop` fires. Each is admitted (or refused by
/// `admission`, see [`Admission::admit`]; `tls`: connections start with a
/// TLS handshake) and served in its own task with its [`Ticket`].
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    admission: Arc<Admission>,
    stats: Arc<IngressStats>,
    tls: bool,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Ticket) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut backoff = AcceptBackoff::new("visitors");
    loop {
        let (tcp, visitor) = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    stats.accept_error();
                    let wait = backoff.failed(&err);
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(wait) => continue,
                    }
                }
            },
        };
        backoff.succeeded();
        stats.accepted();
        let Ok(ticket) = admission.admit(visitor, tls) else {
            // Over its source's share: closed at once (counted by admit).
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let task = serve(tcp, visitor, ticket);
        tokio::spawn(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_accepts_back_off_doubling_to_a_cap_and_reset_on_success() {
        let mut b = AcceptBackoff::new("test");
        let err = std::io::Error::from_raw_os_error(24); // EMFILE
        let waits: Vec<Duration> = (0..10).map(|_| b.failed(&err)).collect();
        assert_eq!(waits[0], ACCEPT_BACKOFF_MIN);
        assert_eq!(waits[1], ACCEPT_BACKOFF_MIN * 2);
        assert_eq!(*waits.last().unwrap(), ACCEPT_BACKOFF_MAX);
        // One line logged, the other nine counted for the next.
        assert_eq!(b.unlogged, 9);
        b.succeeded();
        assert_eq!(b.failed(&err), ACCEPT_BACKOFF_MIN);
    }
}
