//! The client↔node tunnel protocol, tunnel names, ingress parsing (SNI, Host),
//! stream splicing with half-close, and the route cache.
//!
//! Not built yet: this crate fills in with the tunnel work.

#![deny(missing_docs)]
#![forbid(unsafe_code)]
