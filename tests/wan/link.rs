//! Wide-area links on loopback, in user space (this kernel has no
//! `sch_netem`): a QUIC socket that delays and drops what it sends according
//! to the destination, and a TCP relay that delays every chunk each way.
//!
//! Every emulated host has its own loopback address, so a [`Profile`] maps a
//! (source IP, destination IP) pair to the one-way conditions of that leg.
//! The QUIC socket applies them on send, so both ends of a connection must
//! use one to get the full round trip.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::RngExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// One direction of a link.
#[derive(Clone, Copy, Debug)]
pub struct Leg {
    /// Mean one-way delay.
    pub delay: Duration,
    /// Each packet's delay is uniform in `delay ± jitter`.
    pub jitter: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
}

impl Leg {
    fn sample(&self) -> Duration {
        let spread = self.jitter.as_secs_f64();
        let offset = rand::rng().random_range(-spread..=spread);
        Duration::from_secs_f64((self.delay.as_secs_f64() + offset).max(0.0))
    }
}

/// The conditions of every leg: `(from, to) -> Leg`.
pub type Profile = Arc<dyn Fn(IpAddr, IpAddr) -> Leg + Send + Sync>;

/// A datagram waiting on its leg.
struct Queued {
    due: Instant,
    contents: Vec<u8>,
    ecn: Option<quinn::udp::EcnCodepoint>,
    src_ip: Option<IpAddr>,
}

/// A QUIC socket whose datagrams leave after their leg's delay, or not at
/// all (loss). Each destination is a FIFO, as a router's queue is: jitter
/// varies the delay but never reorders (a datagram leaves no earlier than
/// the one before it), so QUIC's loss detection sees loss, not reordering.
pub struct LinkSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    local: IpAddr,
    profile: Profile,
    legs: Mutex<HashMap<SocketAddr, (Instant, mpsc::UnboundedSender<Queued>)>>,
}

impl fmt::Debug for LinkSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkSocket")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl LinkSocket {
    /// Binds `addr` and applies `profile` to everything sent from it.
    pub fn bind(addr: SocketAddr, profile: Profile) -> io::Result<Arc<LinkSocket>> {
        let std = std::net::UdpSocket::bind(addr)?;
        let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no runtime"))?;
        Ok(Arc::new(LinkSocket {
            inner: runtime.wrap_udp_socket(std)?,
            local: addr.ip(),
            profile,
            legs: Mutex::default(),
        }))
    }

    /// A QUIC endpoint on this socket (no server config: the node or client
    /// sets its own).
    pub fn endpoint(self: Arc<Self>) -> io::Result<quinn::Endpoint> {
        let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no runtime"))?;
        quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            None,
            self,
            runtime,
        )
    }
}

impl AsyncUdpSocket for LinkSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let leg = (self.profile)(self.local, transmit.destination.ip());
        if rand::rng().random::<f64>() < leg.loss {
            return Ok(());
        }
        let destination = transmit.destination;
        let mut legs = self
            .legs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, queue) = legs.entry(destination).or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
            let inner = self.inner.clone();
            tokio::spawn(async move {
                while let Some(q) = rx.recv().await {
                    tokio::time::sleep_until(q.due).await;
                    // A full socket buffer drops the datagram, as a router would.
                    let _ = inner.try_send(&Transmit {
                        destination,
                        ecn: q.ecn,
                        contents: &q.contents,
                        segment_size: None,
                        src_ip: q.src_ip,
                    });
                }
            });
            (Instant::now(), tx)
        });
        let due = (Instant::now() + leg.sample()).max(*last);
        *last = due;
        let _ = queue.send(Queued {
            due,
            contents: transmit.contents.to_vec(),
            ecn: transmit.ecn,
            src_ip: transmit.src_ip,
        });
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        // One datagram per transmit, so each gets its own fate.
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A TCP relay on `listen` to `upstream`: bytes from the visitor's side
/// arrive `to_upstream` later, bytes back `to_visitor` later, in order (the
/// visitor's TCP sees the delay; there is no loss on these legs).
pub async fn delayed_relay(
    listen: SocketAddr,
    upstream: SocketAddr,
    to_upstream: Duration,
    to_visitor: Duration,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((visitor, _)) = listener.accept().await {
            tokio::spawn(async move {
                // The connect itself costs the visitor a round trip.
                tokio::time::sleep(to_upstream + to_visitor).await;
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = visitor.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (vr, vw) = visitor.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(vr, sw, to_upstream));
                tokio::spawn(pipe(sr, vw, to_visitor));
            });
        }
    });
    Ok(addr)
}

/// Copies `from` to `to`, each chunk `delay` after it was read; EOF (and
/// errors) travel with the same delay.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let chunk = match from.read(&mut buf).await {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buf[..n].to_vec()),
            };
            let end = chunk.is_none();
            if tx.send((Instant::now() + delay, chunk)).is_err() || end {
                return;
            }
        }
    });
    while let Some((due, chunk)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        match chunk {
            Some(bytes) => {
                if to.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            None => {
                let _ = to.shutdown().await;
                return;
            }
        }
    }
}
