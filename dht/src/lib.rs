//! Chord ring, lookups and the replicated, leased registration store for
//! Specter nodes. Everything here is a pure state machine: no sockets, no
//! clocks (time is Unix milliseconds passed in), no global RNG.
//!
//! - [`ring`]: interval arithmetic on the 2^64 circle and a node's ring view
//!   (predecessor, successor list, fingers), rebuilt from SWIM's live set.
//! - [`lookup`]: an iterative lookup that starts at the owner the local view
//!   believes in and follows redirects, with bounded hops.
//! - [`record`]: registration records (claim + attachments) that merge as a
//!   CRDT.
//! - [`store`]: the records one node holds and the writes an owner applies.
//! - [`messages`]: the RPC protocol and its framing.
//! - [`node`]: [`DhtNode`], which ties these together: writes are applied at
//!   the owner and forwarded to `replicas - 1` successors before they are
//!   acknowledged; records move on ring changes; anti-entropy repairs misses.
//! - [`sim`]: a deterministic simulator of many [`DhtNode`]s.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod lookup;
pub mod messages;
pub mod node;
pub mod record;
pub mod ring;
pub mod sim;
pub mod store;

pub use node::{DhtConfig, DhtEvent, DhtNode, Handled, OpId, Outcome, Outgoing};
pub use record::{Attachment, Claim, ClientId, Record};
pub use ring::{Key, Peer, RingView, key_of};
pub use store::{Item, WriteError, WriteOp};
