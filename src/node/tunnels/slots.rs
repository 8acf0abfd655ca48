//! Isolation of tenants on a pair of nodes: how many streams one tunnel may
//! have open at once to one attached node when this node forwards its
//! visitors there.
//!
//! Every forwarded visitor and every DHT request between two nodes share one
//! QUIC connection and its flow-control credit. A stream whose far side
//! stops reading (a target that never reads, its client's stream full)
//! keeps up to a stream window of credit unread; enough of them held the
//! whole connection window, and every other tenant's visits and the DHT
//! between those nodes stalled with it. With at most
//! [`FORWARDS_PER_TUNNEL`] streams per tunnel and node, each with
//! [`crate::net::quic::NODE_STREAM_RECEIVE_WINDOW`], one tunnel can hold a
//! quarter of [`crate::net::quic::NODE_CONNECTION_RECEIVE_WINDOW`] at most.
//! Visitors past the bound wait for a stream to end (the visit's race tries
//! the tunnel's other attachments meanwhile); a stalled stream ends at the
//! splice's stall deadline. Idle HTTP upstreams hold their slots too: when a
//! visit starts waiting, the tunnel's idle upstreams through that node are
//! closed ([`ForwardSlots::on_wait`]), and while visits wait, answered
//! upstreams through it are closed rather than kept for reuse
//! ([`ForwardSlots::wanted`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use specter_gossip::NodeId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Streams one tunnel may have open at once to one node it is forwarded to.
/// Enough for the 64 keep-alive connections the HTTP ingress keeps per
/// tunnel ([`crate::ingress::upstream::IDLE_PER_TUNNEL`]); with
/// [`crate::net::quic::NODE_STREAM_RECEIVE_WINDOW`] of 512 KiB that is
/// 32 MiB, a quarter of the connection's window.
pub const FORWARDS_PER_TUNNEL: usize = 64;

type Key = (NodeId, String);

/// Closes tunnel `name`'s idle HTTP upstreams through a node (`None`: to a
/// client attached here): when a visit starts waiting for a slot to that
/// node, or the client detaches from here.
pub type EvictHook = Box<dyn Fn(&str, Option<NodeId>) + Send + Sync>;

/// The forwarded streams open per (attached node, tunnel).
pub struct ForwardSlots {
    limit: usize,
    open: Mutex<HashMap<Key, Arc<Semaphore>>>,
    /// Visits waiting for a slot, by tunnel and node.
    waiting: Mutex<HashMap<String, HashMap<NodeId, usize>>>,
    /// Called with the tunnel's name and the node when a visit starts
    /// waiting.
    on_wait: std::sync::OnceLock<EvictHook>,
    /// Forwarded visit attempts that waited for a slot (a visit raced over
    /// two paths may count twice).
    pub waited: AtomicU64,
}

/// One open forwarded stream's place; freed when dropped.
pub struct ForwardSlot {
    slots: Arc<ForwardSlots>,
    key: Key,
    permit: Option<OwnedSemaphorePermit>,
}

impl ForwardSlots {
    /// At most `limit` streams per tunnel and node.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(ForwardSlots {
            limit: limit.max(1),
            open: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            on_wait: std::sync::OnceLock::new(),
            waited: AtomicU64::new(0),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Semaphore>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a stream of tunnel `name` to `node`, waiting for one to
    /// be freed if the tunnel holds them all.
    pub async fn take(self: &Arc<Self>, node: NodeId, name: &str) -> ForwardSlot {
        let key = (node, name.to_string());
        // First, so that it is dropped last: a visit dropped while it waits
        // (its race won elsewhere) forgets the pair like an ended stream.
        let mut slot = ForwardSlot {
            slots: self.clone(),
            key: key.clone(),
            permit: None,
        };
        let semaphore = self
            .map()
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(self.limit)))
            .clone();
        let permit = match semaphore.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.waited.fetch_add(1, Ordering::Relaxed);
                let _waiting = Waiting::new(self, node, name);
                semaphore
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        drop(semaphore);
        slot.permit = Some(permit);
        slot
    }

    /// Sets what to do when a visit starts waiting (the HTTP ingress closes
    /// the tunnel's idle upstreams through that node, which hold its
    /// slots). Set once.
    pub fn on_wait(&self, hook: EvictHook) {
        let _ = self.on_wait.set(hook);
    }

    /// Whether visits of tunnel `name` are waiting for a slot to `node`: a
    /// stream of it there that is done should then end instead of waiting
    /// idle for reuse.
    pub fn wanted(&self, node: NodeId, name: &str) -> bool {
        let waiters = self.waiters();
        !waiters.is_empty() && waiters.get(name).is_some_and(|n| n.contains_key(&node))
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<NodeId, usize>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// (tunnel, node) pairs with a stream open or a visitor waiting.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether no forwarded stream is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A visit waiting for a slot of its tunnel, counted while it waits (and
/// uncounted if the visit is dropped meanwhile).
struct Waiting<'a> {
    slots: &'a ForwardSlots,
    node: NodeId,
    name: &'a str,
}

impl<'a> Waiting<'a> {
    fn new(slots: &'a ForwardSlots, node: NodeId, name: &'a str) -> Self {
        *slots
            .waiters()
            .entry(name.to_string())
            .or_default()
            .entry(node)
            .or_default() += 1;
        if let Some(hook) = slots.on_wait.get() {
            hook(name, Some(node));
        }
        Waiting { slots, node, name }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiters = self.slots.waiters();
        if let Some(nodes) = waiters.get_mut(self.name)
            && let Some(n) = nodes.get_mut(&self.node)
        {
            *n -= 1;
            if *n == 0 {
                nodes.remove(&self.node);
            }
            if nodes.is_empty() {
                waiters.remove(self.name);
            }
        }
    }
}

impl Drop for ForwardSlot {
    fn drop(&mut self) {
        let mut map = self.slots.map();
        drop(self.permit.take());
        // Forget the pair once nothing holds or awaits its semaphore: the
        // map holds one reference, and any waiter one more.
        if let Some(semaphore) = map.get(&self.key)
            && Arc::strong_count(semaphore) == 1
            && semaphore.available_permits() == self.slots.limit
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_tunnel_waits_past_its_bound_while_others_do_not() {
        let slots = ForwardSlots::new(2);
        let (a, b) = (NodeId(1), NodeId(2));
        let first = slots.take(a, "greedy").await;
        let _second = slots.take(a, "greedy").await;
        // The third stream of the same tunnel to the same node waits...
        let waiting = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take(a, "greedy").await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        assert!(slots.wanted(a, "greedy") && !slots.wanted(b, "greedy"));
        assert!(!slots.wanted(a, "quiet"));
        // ...while another tunnel, or the same one to another node, does not.
        let _other = tokio::time::timeout(Duration::from_secs(1), slots.take(a, "quiet"))
            .await
            .unwrap();
        let _elsewhere = tokio::time::timeout(Duration::from_secs(1), slots.take(b, "greedy"))
            .await
            .unwrap();
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(slots.waited.load(Ordering::Relaxed), 1);
        assert!(!slots.wanted(a, "greedy"));
        drop(third);
    }

    #[tokio::test]
    async fn a_visit_dropped_while_it_waits_leaves_nothing_behind() {
        let slots = ForwardSlots::new(1);
        let held = slots.take(NodeId(1), "t").await;
        let waiting = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take(NodeId(1), "t").await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(slots.wanted(NodeId(1), "t"));
        // Its slot is handed over as the visit is dropped.
        drop(held);
        waiting.abort();
        let _ = waiting.await;
        assert!(!slots.wanted(NodeId(1), "t"));
        assert!(slots.is_empty(), "{} pairs left", slots.len());
    }

    #[tokio::test]
    async fn pairs_are_forgotten_once_their_streams_end() {
        let slots = ForwardSlots::new(4);
        let held: Vec<ForwardSlot> = futures_join(&slots, 50).await;
        assert_eq!(slots.len(), 50);
        drop(held);
        assert!(slots.is_empty());
    }

    async fn futures_join(slots: &Arc<ForwardSlots>, n: u64) -> Vec<ForwardSlot> {
        let mut held = Vec::new();
        for i in 0..n {
            held.push(slots.take(NodeId(i), "t").await);
        }
        held
    }
}
