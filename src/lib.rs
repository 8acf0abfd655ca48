//! Specter: a leaderless, self-hosted reverse-tunnel network over QUIC.
//!
//! This crate is the IO shell and composition root. The protocol logic lives
//! in the pure crates (`specter-gossip`, `specter-dht`, `specter-tunnel`); this
//! crate binds sockets, loads files, and runs the tasks that drive them. Its
//! modules, from the bottom up (none imports one that imports it back; a
//! test checks it):
//!
//! - [`clock`]: the wall clock (DHT versions, leases, generations).
//! - [`files`]: files written whole or not at all (ready files).
//! - [`pki`], [`token`]: the cluster CA, node and edge certificates, client
//!   tokens (`specter ca …`).
//! - [`wire`]: framing on QUIC streams, stream kinds, close and reset codes.
//! - [`net`]: TLS, QUIC settings, the endpoint and its connection pool,
//!   accept and routing, liveness.
//! - [`node`]: the node daemon: membership, DHT, RPC, tunnels, status, and
//!   [`node::Node::start`] composing them with the ingress and admin API.
//! - [`ingress`]: public TLS ingress (raw TCP by SNI, HTTPS, plain HTTP).
//! - [`admin`]: the loopback admin API (`/status`, `/metrics`, DHT).
//! - [`client`]: the client daemon (`specter tunnel`).
//! - [`config`]: the TOML file config and flags, resolved.
//! - [`demo`]: `specter demo`, a local overlay in one process.
//! - [`cli`]: the `specter` command line.

#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod demo;
pub mod files;
pub mod ingress;
pub mod net;
pub mod node;
pub mod pki;
pub mod token;
pub mod wire;
