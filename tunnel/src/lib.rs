//! Tunnel building blocks for Specter, free of sockets and QUIC types:
//!
//! - [`names`]: random three-word tunnel names, name validation, and finding
//!   the tunnel name in a Host header or SNI value.
//! - [`splice`]: two-way byte copying that keeps half-close, generic over
//!   `AsyncRead + AsyncWrite` (QUIC streams and TCP sockets alike).
//! - [`route_cache`]: where a name was last found, with short lifetimes,
//!   negative entries and invalidation.
//! - [`protocol`]: the client↔node control messages and visitor stream headers.
//! - [`dialer`]: which node a client dials next, with per-address backoff.
//!
//! The client↔node protocol, ingress and forwarding build on these.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod dialer;
pub mod names;
pub mod protocol;
pub mod route_cache;
pub mod splice;
