//! Chord ring, lookups and the replicated, leased registration store for
//! Specter nodes (pure state machines, no IO).
//!
//! Not built yet: the ring view, lookups and the store arrive with the DHT
//! work. Until then nodes keep membership only (see `specter-gossip`).

#![deny(missing_docs)]
#![forbid(unsafe_code)]
