//! Reused upstreams for HTTP visitors, as a reverse proxy keeps idle
//! keep-alive connections to its backends: an HTTP/1.1 connection over a
//! tunnel stream (the client's TCP connection to the target behind it) goes
//! back to a per-tunnel idle list when its answer is done, and the next
//! request for that tunnel takes it instead of opening a stream, waiting for
//! the client's `Ready` and making the client dial the target again.
//!
//! A pooled connection that died meanwhile (its node was killed, the target
//! closed it) is found closed before use, or fails before the request was
//! sent and the request goes to a fresh stream; one that fails after sending
//! costs a retry for a replayable request, as any path does.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;

/// Idle connections kept per tunnel: enough for 64 keep-alive visitors
/// through one node without reopening.
pub const IDLE_PER_TUNNEL: usize = 64;

/// Idle connections kept in all; past it an answered connection is closed.
pub const IDLE_TOTAL: usize = 1_024;

/// An idle connection older than this is closed rather than reused: well
/// under common server keep-alive times (nginx: 75 s), so the target seldom
/// closes one just as it is reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

/// The idle upstream connections of a node's HTTP ingress, by tunnel.
pub struct Upstreams<B> {
    idle: Mutex<HashMap<String, Vec<Idle<B>>>>,
}

impl<B> Default for Upstreams<B> {
    fn default() -> Self {
        Upstreams {
            idle: Mutex::new(HashMap::new()),
        }
    }
}

impl<B> Upstreams<B> {
    fn idle(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Idle<B>>>> {
        // Handles only; a panic elsewhere leaves the map usable.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle, open, ready connection to tunnel `name`, newest first.
    pub fn take(&self, name: &str) -> Option<SendRequest<B>> {
        let mut idle = self.idle();
        let list = idle.get_mut(name)?;
        let found = loop {
            let Some(candidate) = list.pop() else {
                break None;
            };
            let usable = candidate.since.elapsed() < IDLE_TIMEOUT
                && !candidate.sender.is_closed()
                && candidate.sender.is_ready();
            if usable {
                break Some(candidate.sender);
            }
        };
        if list.is_empty() {
            idle.remove(name);
        }
        found
    }

    /// Keeps `sender`, whose answer is done, for the next request to `name`
    /// (unless the bounds are reached; then it is dropped and closes).
    pub fn put(&self, name: &str, sender: SendRequest<B>) {
        let mut idle = self.idle();
        // Drop what expired or closed meanwhile, everywhere, so the map holds
        // at most the bounds of live connections.
        idle.retain(|_, list| {
            list.retain(|i| i.since.elapsed() < IDLE_TIMEOUT && !i.sender.is_closed());
            !list.is_empty()
        });
        let total: usize = idle.values().map(Vec::len).sum();
        if total >= IDLE_TOTAL {
            return;
        }
        let list = idle.entry(name.to_string()).or_default();
        if list.len() < IDLE_PER_TUNNEL {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes every idle connection to `name`: visits of that tunnel wait
    /// for a forwarded stream, and idle ones hold theirs (see
    /// `node::tunnels::slots`).
    pub fn evict(&self, name: &str) {
        let evicted = self.idle().remove(name);
        drop(evicted);
    }

    /// Idle connections kept now.
    pub fn len(&self) -> usize {
        self.idle().values().map(Vec::len).sum()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
