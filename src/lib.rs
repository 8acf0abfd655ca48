//! Specter: a leaderless, self-hosted reverse-tunnel network over QUIC.
//!
//! This crate is the IO shell and composition root. The protocol logic lives
//! in the pure crates (`specter-gossip`, `specter-dht`, `specter-tunnel`); this
//! crate binds sockets, loads files, and runs the tasks that drive them:
//!
//! - [`pki`]: the cluster CA and node certificates (`specter ca …`).
//! - [`token`]: client tokens signed by the cluster CA.
//! - [`tls`]: mutual TLS against the cluster CA, cert-derived node ids.
//! - [`transport`]: the node's QUIC endpoint and its connection pool.
//! - [`membership`]: the task that owns the SWIM state machine.
//! - [`rpc`]: DHT requests over node↔node QUIC bi-streams.
//! - [`dht`]: the task that owns the DHT state machine.
//! - [`tunnels`]: client sessions, local attachments, visitor streams.
//! - [`ingress`]: public TLS ingress (TCP over TLS by SNI).
//! - [`node`]: the node daemon, composed from the above.
//! - [`admin`]: the loopback admin API (`/status`, `/metrics`).
//! - [`config`]: the TOML file config and its conversion.
//! - [`client`]: the client daemon (`specter tunnel`).
//! - [`demo`]: `specter demo`, a local overlay in one process.

#![forbid(unsafe_code)]

pub mod admin;
pub mod client;
pub mod config;
pub mod demo;
pub mod dht;
pub mod http_ingress;
pub mod ingress;
pub mod membership;
pub mod node;
pub mod pki;
pub mod rpc;
pub mod tls;
pub mod token;
pub mod transport;
pub mod tunnels;

use std::net::SocketAddr;

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
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        runtime,
    )
}

/// A generation for a node starting now: milliseconds since the Unix epoch,
/// so every restart (even with the same certificate) has a higher one.
pub fn generation_now() -> u64 {
    dht::now_ms()
}
