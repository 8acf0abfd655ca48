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

/// Binds a QUIC endpoint on `addr` (one UDP socket for serving and dialing).
/// The transport installs the server config.
pub fn bind_endpoint(addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
}

/// A generation for a node starting now: milliseconds since the Unix epoch,
/// so every restart (even with the same certificate) has a higher one.
pub fn generation_now() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}
