//! The node's network layer: one QUIC endpoint (one UDP socket) per node.
//!
//! - [`tls`]: certificates and verifiers (mutual TLS against the cluster CA,
//!   cert-derived node ids, self-signed client keys).
//! - [`quic`]: QUIC transport settings (keep-alives, idle timeouts, windows).
//! - [`runtime`]: tokio for quinn, with a busy connection's datagrams
//!   coalesced.
//! - [`pool`]: the [`Transport`]: one connection per node pair, dialed
//!   lazily, with the simultaneous-dial tie-break; gossip datagrams.
//! - [`accept`]: the accept loop and routing by ALPN (nodes, clients).
//! - [`streams`]: node bi-streams routed by their kind byte.
//! - [`liveness`]: "has this peer gone silent?" from QUIC's packet counts.

pub mod accept;
pub mod liveness;
pub mod pool;
pub mod quic;
pub mod runtime;
pub mod streams;
pub mod tls;

use std::net::SocketAddr;

pub use pool::{DialError, Transport, TransportCounters};
pub use streams::IncomingStream;

/// UDP socket buffer size asked for. QUIC bursts a congestion window of
/// datagrams at once; the kernel's default (about 200 KiB) drops some of a
/// fast stream's packets, and every drop halves the sender's window. The
/// kernel caps the request at `net.core.rmem_max` / `wmem_max`.
pub const UDP_BUFFER: usize = 4 << 20;

/// Binds a QUIC endpoint on `addr` (one UDP socket for serving and dialing,
/// with [`UDP_BUFFER`] buffers). The transport installs the server config.
pub fn bind_endpoint(addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // Best effort: a smaller buffer only costs speed.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    let runtime = runtime::Coalescing::current()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        std::sync::Arc::new(runtime),
    )
}
