//! One node's DHT as a pure state machine: routing, the store, write
//! coordination with replication, hand-off on ring changes, anti-entropy and
//! the stabilize check.
//!
//! Inputs: [`DhtNode::set_members`] (the live set from SWIM),
//! [`DhtNode::member_down`], [`DhtNode::handle_request`] (a request from an
//! authenticated node), [`DhtNode::handle_response`] (the answer to one of our
//! requests, or its failure), [`DhtNode::handle_timeout`], and the operations
//! [`DhtNode::start_get`] / [`DhtNode::start_write`]. Outputs:
//! [`DhtNode::poll_request`] (requests to send, each answered by exactly one
//! `handle_response` call, with an error if it failed or timed out),
//! [`DhtNode::poll_event`] (finished operations and deferred replies) and
//! [`DhtNode::poll_timeout`]. Time is Unix milliseconds, passed in.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use specter_gossip::NodeId;

use crate::lookup::{Lookup, MAX_HOPS, Next};
use crate::messages::{ErrorCode, Request, Response};
use crate::record::Record;
use crate::ring::{Key, Peer, RingView, Route, SUCCESSORS, in_open, key_of};
use crate::store::{Item, Store, WriteOp};

/// Largest encoded size of the records in one `Replicate` request: half the
/// frame limit ([`crate::messages::MAX_FRAME_SIZE`]). A node holding ~20,000
/// names handed them off in one batch of ~1.3 MB, which its peers refused
/// before reading (the frame limit bounds what a peer can make a node
/// buffer), so the records never arrived.
pub const REPLICATE_CHUNK_BYTES: usize = crate::messages::MAX_FRAME_SIZE / 2;

/// An item's share of a frame: its MessagePack, plus a little for the
/// array framing (an item that cannot be encoded counts as a whole chunk).
fn encoded_len(item: &Item) -> usize {
    rmp_serde::to_vec(item).map_or(REPLICATE_CHUNK_BYTES, |v| v.len()) + 8
}

/// Splits `items` into runs whose encoded size stays within
/// [`REPLICATE_CHUNK_BYTES`] (an item is never split; one item is far
/// smaller than a frame).
fn chunks(items: Vec<Item>) -> Vec<Vec<Item>> {
    let mut out: Vec<Vec<Item>> = Vec::new();
    let mut size = 0;
    for item in items {
        let len = encoded_len(&item);
        match out.last_mut() {
            Some(run) if size + len <= REPLICATE_CHUNK_BYTES => {
                run.push(item);
                size += len;
            }
            _ => {
                out.push(vec![item]);
                size = len;
            }
        }
    }
    out
}

/// Most `(key, digest)` pairs in one `Sync` request: about 19 bytes each
/// encoded, so ≈ 310 KB, well within a frame
/// ([`crate::messages::MAX_FRAME_SIZE`]). A node owning more sends one
/// request per part of its range. With all its digests in one request, a
/// node owning more than about 50,000 records sent a request over the frame
/// limit, which its replicas refused, and anti-entropy stopped for it.
pub const SYNC_DIGESTS_PER_REQUEST: usize = 16_384;

/// The digests of one `Sync` request and the part of the range, `(after,
/// upto]`, they cover.
type SyncPart = (Vec<(Key, u64)>, (Key, Key));

/// Splits the digests of the records a node owns (its range is `(pred,
/// me]`) into the parts of its `Sync` requests: at most
/// [`SYNC_DIGESTS_PER_REQUEST`] each, in clockwise order, each with the part
/// of the range it covers; together the parts cover the whole range (one
/// empty part when the node owns nothing).
fn sync_parts(mut owned: Vec<(Key, u64)>, pred: Key, me: Key) -> Vec<SyncPart> {
    // Clockwise from just after `pred` (`me`, when alone, comes last).
    owned.sort_unstable_by_key(|(key, _)| key.wrapping_sub(pred).wrapping_sub(1));
    let count = owned.len().div_ceil(SYNC_DIGESTS_PER_REQUEST).max(1);
    let mut parts = Vec::with_capacity(count);
    let mut after = pred;
    let mut rest = owned.as_slice();
    for i in 0..count {
        let (part, tail) = rest.split_at(rest.len().min(SYNC_DIGESTS_PER_REQUEST));
        rest = tail;
        let upto = match part.last() {
            Some((key, _)) if i + 1 < count => *key,
            _ => me,
        };
        parts.push((part.to_vec(), (after, upto)));
        after = upto;
    }
    parts
}

/// Copies of each record: the owner and the next two distinct nodes, so any
/// two nodes may fail at once without losing a registration.
pub const REPLICATION_FACTOR: usize = 3;

/// Owners compare digests with their replicas this often, repairing whatever
/// a push missed. Records are small and few per node, so this is cheap.
pub const ANTI_ENTROPY_MS: u64 = 5_000;

/// Each node checks its successor's view of the ring this often.
pub const STABILIZE_MS: u64 = 2_000;

/// Lapsed leases are dropped this often.
pub const PRUNE_MS: u64 = 1_000;

/// Settings of a [`DhtNode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhtConfig {
    /// See [`REPLICATION_FACTOR`].
    pub replicas: usize,
    /// See [`MAX_HOPS`].
    pub max_hops: u32,
    /// See [`ANTI_ENTROPY_MS`].
    pub anti_entropy_ms: u64,
    /// See [`STABILIZE_MS`].
    pub stabilize_ms: u64,
    /// See [`PRUNE_MS`].
    pub prune_ms: u64,
}

impl Default for DhtConfig {
    fn default() -> Self {
        DhtConfig {
            replicas: REPLICATION_FACTOR,
            max_hops: MAX_HOPS,
            anti_entropy_ms: ANTI_ENTROPY_MS,
            stabilize_ms: STABILIZE_MS,
            prune_ms: PRUNE_MS,
        }
    }
}

/// Identifies an operation started with `start_get` / `start_write`.
pub type OpId = u64;

/// A request to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Pass back to [`DhtNode::handle_response`].
    pub id: u64,
    /// Where to send it.
    pub to: Peer,
    /// What to send.
    pub request: Request,
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A read finished.
    Got {
        /// The record, if the name is registered.
        item: Option<Item>,
        /// Requests it took (0 when this node owns the key).
        hops: u32,
    },
    /// A write was applied at the owner and forwarded to the live replicas.
    Wrote {
        /// The record after the write.
        record: Record,
        /// Requests it took to reach the owner.
        hops: u32,
    },
    /// The owner refused the operation.
    Refused(ErrorCode),
    /// No node that could serve it answered.
    Unreachable {
        /// Requests sent.
        hops: u32,
    },
}

/// Something for the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DhtEvent {
    /// An operation finished.
    Completed {
        /// Which one.
        op: OpId,
        /// How.
        outcome: Outcome,
    },
    /// The answer to a request that [`DhtNode::handle_request`] deferred.
    Reply {
        /// The token it returned.
        token: u64,
        /// The answer.
        response: Response,
    },
}

/// What [`DhtNode::handle_request`] did with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Send this answer now.
    Reply(Response),
    /// The answer comes later as [`DhtEvent::Reply`] with this token.
    Deferred(u64),
}

/// Counters, for `/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DhtStats {
    /// Requests served.
    pub requests: u64,
    /// Requests answered with a redirect.
    pub redirects: u64,
    /// Items merged from replication or anti-entropy that changed something.
    pub repaired: u64,
    /// Records dropped here after their owner acknowledged them.
    pub handed_off: u64,
    /// Stabilize answers that disagreed with our view.
    pub stabilize_mismatches: u64,
    /// Anti-entropy answers that left records out to stay within
    /// [`REPLICATE_CHUNK_BYTES`] (the rest goes in later rounds).
    pub sync_answers_cut: u64,
}

enum OpKind {
    /// `missed`: a holder answered that it has no such record. A node that
    /// just took over a range may not have received it yet, so a miss is
    /// only believed once a second holder confirms it. `unconfirmed`: a node
    /// asked after the miss failed to answer, so running out of nodes to ask
    /// is not a confirmation.
    Get {
        name: String,
        missed: bool,
        unconfirmed: bool,
    },
    Write {
        name: String,
        op: WriteOp,
    },
}

struct Op {
    kind: OpKind,
    lookup: Lookup,
}

enum Origin {
    Local(OpId, u32),
    Remote(u64),
}

struct Coordination {
    waiting: usize,
    record: Record,
    origin: Origin,
}

enum Pending {
    Op(OpId),
    Replicate(Option<u64>),
    /// Records sent to their owner, with the digest of what was sent.
    Handoff(Vec<(Key, u64)>),
    Sync(Peer),
    Neighbours(Peer),
}

/// One node's DHT state.
pub struct DhtNode {
    view: RingView,
    store: Store,
    config: DhtConfig,
    next_id: u64,
    outbox: VecDeque<Outgoing>,
    events: VecDeque<DhtEvent>,
    pending: BTreeMap<u64, Pending>,
    ops: BTreeMap<OpId, Op>,
    coordinations: BTreeMap<u64, Coordination>,
    next_anti_entropy: u64,
    next_stabilize: u64,
    next_prune: u64,
    stats: DhtStats,
}

impl DhtNode {
    /// A node alone on its ring.
    pub fn new(me: Peer, config: DhtConfig, now: u64) -> Self {
        DhtNode {
            view: RingView::new(me),
            store: Store::default(),
            next_anti_entropy: now + config.anti_entropy_ms,
            next_stabilize: now + config.stabilize_ms,
            next_prune: now + config.prune_ms,
            config,
            next_id: 0,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            pending: BTreeMap::new(),
            ops: BTreeMap::new(),
            coordinations: BTreeMap::new(),
            stats: DhtStats::default(),
        }
    }

    /// The ring as this node sees it.
    pub fn view(&self) -> &RingView {
        &self.view
    }

    /// The records this node holds.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Counters.
    pub fn stats(&self) -> DhtStats {
        self.stats
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Sends `items` to `to` as one or more `Replicate` requests, each well
    /// under the frame limit (see [`REPLICATE_CHUNK_BYTES`]); `purpose` makes
    /// each request's pending entry from the items it carries.
    fn send_items(&mut self, to: Peer, items: Vec<Item>, purpose: impl Fn(&[Item]) -> Pending) {
        for chunk in chunks(items) {
            let pending = purpose(&chunk);
            self.send(to, Request::Replicate { items: chunk }, pending);
        }
    }

    fn send(&mut self, to: Peer, request: Request, purpose: Pending) {
        let id = self.id();
        self.pending.insert(id, purpose);
        self.outbox.push_back(Outgoing { id, to, request });
    }

    /// The nodes that should hold `key`. Below `r + 1` nodes a ring cannot be
    /// kept provably consistent (Zave), so every node holds every record.
    pub fn replica_set(&self, key: Key) -> Vec<Peer> {
        if self.view.len() <= SUCCESSORS {
            let owner = self.view.owner(key);
            let mut all = vec![owner];
            all.extend(
                self.view
                    .members()
                    .iter()
                    .copied()
                    .filter(|p| p.id != owner.id),
            );
            all
        } else {
            self.view.replicas(key, self.config.replicas)
        }
    }

    fn is_replica(&self, key: Key) -> bool {
        let me = self.view.me().id;
        self.replica_set(key).iter().any(|p| p.id == me)
    }

    /// Adopts a new live set and moves records to their new holders.
    pub fn set_members(&mut self, live: impl IntoIterator<Item = Peer>) {
        self.view.rebuild(live);
        self.hand_off();
    }

    /// Pushes every record to the other nodes that should hold it; records this
    /// node should no longer hold go to their owner and are dropped once it
    /// has them.
    fn hand_off(&mut self) {
        let me = self.view.me().id;
        let mut batches: BTreeMap<NodeId, (Peer, Vec<Item>)> = BTreeMap::new();
        let mut leaving: BTreeMap<NodeId, (Peer, Vec<Item>)> = BTreeMap::new();
        for item in self.store.iter() {
            let holders = self.replica_set(item.key);
            let mine = holders.iter().any(|p| p.id == me);
            for (i, p) in holders.iter().enumerate().filter(|(_, p)| p.id != me) {
                // A record we no longer hold goes to its owner in a batch
                // whose acknowledgement lets us drop our copy.
                let batch = if !mine && i == 0 {
                    &mut leaving
                } else {
                    &mut batches
                };
                batch
                    .entry(p.id)
                    .or_insert((*p, Vec::new()))
                    .1
                    .push(item.clone());
            }
        }
        for (_, (peer, items)) in leaving {
            self.send_items(peer, items, |chunk| {
                Pending::Handoff(chunk.iter().map(|i| (i.key, i.record.digest())).collect())
            });
        }
        for (_, (peer, items)) in batches {
            self.send_items(peer, items, |_| Pending::Replicate(None));
        }
    }

    /// A node was declared dead: its attachments in records this node owns
    /// become tombstones at once (no waiting for the lease), and go to the
    /// replicas.
    pub fn member_down(&mut self, now: u64, node: NodeId) {
        let changed = self.store.drop_node(node, now);
        let mine: Vec<Item> = changed
            .into_iter()
            .filter(|k| self.view.owns(*k))
            .filter_map(|k| self.store.get(k).cloned())
            .collect();
        self.replicate(mine, None);
    }

    /// Sends `items` to every other holder; returns how many requests went out.
    fn replicate(&mut self, items: Vec<Item>, coordination: Option<u64>) -> usize {
        let me = self.view.me().id;
        let mut batches: BTreeMap<NodeId, (Peer, Vec<Item>)> = BTreeMap::new();
        for item in items {
            for p in self
                .replica_set(item.key)
                .into_iter()
                .filter(|p| p.id != me)
            {
                batches
                    .entry(p.id)
                    .or_insert((p, Vec::new()))
                    .1
                    .push(item.clone());
            }
        }
        // A coordinated write replicates one item: one request per holder,
        // which is what the caller counts.
        let n = batches.len();
        for (_, (peer, items)) in batches {
            self.send_items(peer, items, |_| Pending::Replicate(coordination));
        }
        n
    }

    /// Reads `name`.
    pub fn start_get(&mut self, name: &str) -> OpId {
        let op = self.id();
        let key = key_of(name);
        let mut lookup = Lookup::new(key, &self.view, self.config.max_hops);
        let mut missed = false;
        if self.view.route(key) == Route::Local {
            let item = self.store.get(key).cloned();
            if item.is_some() {
                self.complete(op, Outcome::Got { item, hops: 0 });
                return op;
            }
            // Ours, but not here (yet?): ask a replica before saying "none".
            missed = true;
            lookup.failed();
        }
        self.ops.insert(
            op,
            Op {
                kind: OpKind::Get {
                    name: name.to_string(),
                    missed,
                    unconfirmed: false,
                },
                lookup,
            },
        );
        self.advance(op);
        op
    }

    /// Writes `op` to `name` at its owner.
    pub fn start_write(&mut self, now: u64, name: &str, write: WriteOp) -> OpId {
        let op = self.id();
        let key = key_of(name);
        if self.view.route(key) == Route::Local {
            self.coordinate(now, key, name, &write, Origin::Local(op, 0));
            return op;
        }
        let lookup = Lookup::new(key, &self.view, self.config.max_hops);
        self.ops.insert(
            op,
            Op {
                kind: OpKind::Write {
                    name: name.to_string(),
                    op: write,
                },
                lookup,
            },
        );
        self.advance(op);
        op
    }

    /// Applies a write here and forwards it to the replicas; the origin hears
    /// back once every replica answered (or failed).
    fn coordinate(&mut self, now: u64, key: Key, name: &str, write: &WriteOp, origin: Origin) {
        match self.store.apply(key, name, write, now) {
            Err(e) => self.finish(origin, Err(ErrorCode::Write(e))),
            Ok(record) => {
                let item = Item {
                    key,
                    name: name.to_string(),
                    record: record.clone(),
                };
                let cid = self.id();
                let waiting = self.replicate(vec![item], Some(cid));
                if waiting == 0 {
                    self.finish(origin, Ok(record));
                } else {
                    self.coordinations.insert(
                        cid,
                        Coordination {
                            waiting,
                            record,
                            origin,
                        },
                    );
                }
            }
        }
    }

    fn finish(&mut self, origin: Origin, result: Result<Record, ErrorCode>) {
        match origin {
            Origin::Local(op, hops) => self.complete(
                op,
                match result {
                    Ok(record) => Outcome::Wrote { record, hops },
                    Err(code) => Outcome::Refused(code),
                },
            ),
            Origin::Remote(token) => self.events.push_back(DhtEvent::Reply {
                token,
                response: match result {
                    Ok(record) => Response::Written { record },
                    Err(code) => Response::Error(code),
                },
            }),
        }
    }

    fn complete(&mut self, op: OpId, outcome: Outcome) {
        self.ops.remove(&op);
        self.events.push_back(DhtEvent::Completed { op, outcome });
    }

    /// Sends an operation's next request, or ends it.
    fn advance(&mut self, op: OpId) {
        let Some(state) = self.ops.get_mut(&op) else {
            return;
        };
        match state.lookup.next_step() {
            Next::Ask { to, any_replica } => {
                let key = state.lookup.key();
                let request = match &state.kind {
                    OpKind::Get { name, .. } => Request::Get {
                        key,
                        name: name.clone(),
                        any_replica,
                    },
                    OpKind::Write { name, op } => Request::Write {
                        key,
                        name: name.clone(),
                        op: op.clone(),
                        any_replica,
                    },
                };
                self.send(to, request, Pending::Op(op));
            }
            Next::Exhausted => {
                let hops = state.lookup.hops();
                let confirmed = matches!(
                    state.kind,
                    OpKind::Get {
                        missed: true,
                        unconfirmed: false,
                        ..
                    }
                );
                let outcome = if confirmed {
                    // Nobody else to ask: the holder's "none" stands.
                    Outcome::Got { item: None, hops }
                } else {
                    Outcome::Unreachable { hops }
                };
                self.complete(op, outcome);
            }
        }
    }

    /// Serves a request from node `from` (authenticated by the transport).
    pub fn handle_request(&mut self, now: u64, from: NodeId, request: Request) -> Handled {
        self.stats.requests += 1;
        let reply = match request {
            Request::Get {
                key,
                name,
                any_replica,
            } => {
                let held = self.store.get(key).filter(|i| i.name == name).cloned();
                if self.view.owns(key) || (any_replica && self.is_replica(key)) {
                    Response::Found { item: held }
                } else {
                    self.redirect(key)
                }
            }
            Request::Write {
                key,
                name,
                op,
                any_replica,
            } => {
                if key_of(&name) != key {
                    Response::Error(ErrorCode::Malformed)
                } else if self.view.owns(key) || (any_replica && self.is_replica(key)) {
                    let token = self.id();
                    self.coordinate(now, key, &name, &op, Origin::Remote(token));
                    return Handled::Deferred(token);
                } else {
                    self.redirect(key)
                }
            }
            Request::Replicate { items } => {
                for item in &items {
                    if self.store.merge(item) {
                        self.stats.repaired += 1;
                    }
                }
                Response::Ack
            }
            Request::Sync { digests, within } => self.answer_sync(from, digests, within),
            Request::Neighbours => Response::Neighbours {
                predecessor: self.view.predecessor(),
                successors: self.view.successors(SUCCESSORS),
            },
        };
        Handled::Reply(reply)
    }

    fn redirect(&mut self, key: Key) -> Response {
        self.stats.redirects += 1;
        Response::Redirect {
            to: self.view.owner(key),
        }
    }

    /// The records the sender of a `Sync` lacks or holds differently, and
    /// the keys this node wants from it. The records stay within
    /// [`REPLICATE_CHUNK_BYTES`], so the answer fits a frame however much
    /// differs (a node that restarted empty lacks its whole range); what did
    /// not fit goes in the next rounds, since the sender then lists what it
    /// merged.
    ///
    /// Only the records in `within` (the part of its range the sender
    /// listed, see [`SYNC_DIGESTS_PER_REQUEST`]) count as unlisted.
    fn answer_sync(
        &mut self,
        from: NodeId,
        digests: Vec<(Key, u64)>,
        within: Option<(Key, Key)>,
    ) -> Response {
        let theirs: BTreeMap<Key, u64> = digests.into_iter().collect();
        let mut items = Vec::new();
        let mut want = Vec::new();
        let mut room = REPLICATE_CHUNK_BYTES;
        let mut cut = false;
        let mut fits = |item: &Item| {
            let len = encoded_len(item);
            let fit = len <= room;
            if fit {
                room -= len;
            } else {
                cut = true;
            }
            fit
        };
        for (key, digest) in &theirs {
            match self.store.get(*key) {
                None => want.push(*key),
                Some(mine) if mine.record.digest() != *digest => {
                    if fits(mine) {
                        items.push(mine.clone());
                    }
                    want.push(*key);
                }
                Some(_) => {}
            }
        }
        // Records in the sender's range that it did not list at all.
        let sender_pred = self
            .view
            .members()
            .iter()
            .rev()
            .chain(self.view.members().iter().rev())
            .skip_while(|p| p.id != from)
            .nth(1)
            .map(|p| p.id.0);
        if let Some(pred) = sender_pred {
            for item in self.store.iter() {
                if !theirs.contains_key(&item.key)
                    && crate::ring::in_open_closed(item.key, pred, from.0)
                    && within.is_none_or(|(after, upto)| {
                        crate::ring::in_open_closed(item.key, after, upto)
                    })
                {
                    if !fits(item) {
                        break;
                    }
                    items.push(item.clone());
                }
            }
        }
        if cut {
            self.stats.sync_answers_cut += 1;
        }
        Response::SyncReply { items, want }
    }

    /// Takes the answer to request `id` (`Err` if it failed or timed out).
    pub fn handle_response(&mut self, now: u64, id: u64, result: Result<Response, ()>) {
        let Some(purpose) = self.pending.remove(&id) else {
            return;
        };
        match purpose {
            Pending::Op(op) => self.op_answered(now, op, result),
            Pending::Replicate(coordination) => {
                let Some(cid) = coordination else { return };
                let Some(c) = self.coordinations.get_mut(&cid) else {
                    return;
                };
                c.waiting -= 1;
                if c.waiting == 0 {
                    let c = self.coordinations.remove(&cid).expect("present");
                    self.finish(c.origin, Ok(c.record));
                }
            }
            Pending::Handoff(sent) => {
                if let Ok(Response::Ack) = result {
                    for (key, digest) in sent {
                        // Keep a copy that changed since it was sent, or that
                        // this node should hold again.
                        let unchanged = self
                            .store
                            .get(key)
                            .is_some_and(|i| i.record.digest() == digest);
                        if unchanged && !self.is_replica(key) {
                            self.store.remove(key);
                            self.stats.handed_off += 1;
                        }
                    }
                }
            }
            Pending::Sync(peer) => {
                if let Ok(Response::SyncReply { items, want }) = result {
                    for item in &items {
                        if self.store.merge(item) {
                            self.stats.repaired += 1;
                        }
                    }
                    let send: Vec<Item> = want
                        .iter()
                        .filter_map(|k| self.store.get(*k).cloned())
                        .collect();
                    if !send.is_empty() {
                        self.send_items(peer, send, |_| Pending::Replicate(None));
                    }
                }
            }
            Pending::Neighbours(peer) => {
                if let Ok(Response::Neighbours { predecessor, .. }) = result {
                    let me = self.view.me();
                    // Our successor believes someone sits between us that our
                    // view lacks (or that we believe is between and it lacks):
                    // gossip has not converged yet. Counted; the next
                    // membership update repairs the view.
                    let between_unknown = predecessor.id != me.id
                        && in_open(predecessor.id.0, me.id.0, peer.id.0)
                        && !self.view.contains(predecessor.id);
                    if between_unknown
                        || predecessor.id != me.id && !in_open(predecessor.id.0, me.id.0, peer.id.0)
                    {
                        self.stats.stabilize_mismatches += 1;
                    }
                }
            }
        }
    }

    fn op_answered(&mut self, now: u64, op: OpId, result: Result<Response, ()>) {
        let Some(state) = self.ops.get_mut(&op) else {
            return;
        };
        let hops = state.lookup.hops();
        match result {
            Ok(Response::Found { item: None })
                if matches!(state.kind, OpKind::Get { missed: false, .. }) =>
            {
                if let OpKind::Get { missed, .. } = &mut state.kind {
                    *missed = true;
                }
                state.lookup.failed();
                self.advance(op);
            }
            Ok(Response::Found { item }) => self.complete(op, Outcome::Got { item, hops }),
            Ok(Response::Written { record }) => self.complete(op, Outcome::Wrote { record, hops }),
            Ok(Response::Error(code)) => self.complete(op, Outcome::Refused(code)),
            Ok(Response::Redirect { to }) => {
                if to.id == self.view.me().id {
                    // The owner in its view is us: the views disagree. Let
                    // replicas answer; a write we can coordinate ourselves.
                    state.lookup.failed();
                    let key = state.lookup.key();
                    let write = match &state.kind {
                        OpKind::Write { name, op: w } => Some((name.clone(), w.clone())),
                        OpKind::Get { .. } => None,
                    };
                    if let Some((name, w)) = write
                        && self.is_replica(key)
                    {
                        self.ops.remove(&op);
                        self.coordinate(now, key, &name, &w, Origin::Local(op, hops));
                        return;
                    }
                } else {
                    state.lookup.redirected(to);
                }
                self.advance(op);
            }
            Ok(_) | Err(()) => {
                if let OpKind::Get {
                    missed: true,
                    unconfirmed,
                    ..
                } = &mut state.kind
                {
                    *unconfirmed = true;
                }
                state.lookup.failed();
                self.advance(op);
            }
        }
    }

    /// When [`DhtNode::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> u64 {
        self.next_anti_entropy
            .min(self.next_stabilize)
            .min(self.next_prune)
    }

    /// Runs the periodic work due at `now`.
    pub fn handle_timeout(&mut self, now: u64) {
        if now >= self.next_prune {
            self.next_prune = now + self.config.prune_ms;
            self.store.prune(now);
        }
        if now >= self.next_stabilize {
            self.next_stabilize = now + self.config.stabilize_ms;
            if let Some(succ) = self.view.successors(1).first().copied() {
                self.send(succ, Request::Neighbours, Pending::Neighbours(succ));
            }
        }
        if now >= self.next_anti_entropy {
            self.next_anti_entropy = now + self.config.anti_entropy_ms;
            self.anti_entropy();
        }
    }

    fn anti_entropy(&mut self) {
        let me = self.view.me().id;
        let owned: Vec<(Key, u64)> = self
            .store
            .iter()
            .filter(|i| self.view.owns(i.key))
            .map(|i| (i.key, i.record.digest()))
            .collect();
        let peers: BTreeSet<Peer> = owned
            .iter()
            .flat_map(|(k, _)| self.replica_set(*k))
            .filter(|p| p.id != me)
            .collect();
        let peers = if peers.is_empty() {
            // Nothing owned: still ask the successors for what we should own.
            self.view
                .successors(self.config.replicas - 1)
                .into_iter()
                .collect()
        } else {
            peers
        };
        let parts = sync_parts(owned, self.view.predecessor().id.0, me.0);
        // One part is the whole range: sent as before parts existed.
        let whole = parts.len() == 1;
        for peer in peers {
            for (digests, within) in &parts {
                self.send(
                    peer,
                    Request::Sync {
                        digests: digests.clone(),
                        within: (!whole).then_some(*within),
                    },
                    Pending::Sync(peer),
                );
            }
        }
        // Records we hold but should not: push them to their holders.
        if self.store.iter().any(|i| !self.is_replica(i.key)) {
            self.hand_off();
        }
    }

    /// The next request to send.
    pub fn poll_request(&mut self) -> Option<Outgoing> {
        self.outbox.pop_front()
    }

    /// The next finished operation or deferred reply.
    pub fn poll_event(&mut self) -> Option<DhtEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::in_open_closed;

    #[test]
    fn sync_parts_cover_the_range_in_order_within_the_size() {
        // A range that wraps past zero, and keys spread over it.
        let (pred, me) = (u64::MAX - 1_000_000, 3_000_000);
        let owned: Vec<(Key, u64)> = (0..40_000u64)
            .map(|i| (pred.wrapping_add(1 + i * 99), i))
            .rev()
            .collect();
        assert!(owned.iter().all(|(k, _)| in_open_closed(*k, pred, me)));
        let parts = sync_parts(owned.clone(), pred, me);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].1.0, pred, "from the start of the range");
        assert_eq!(parts[2].1.1, me, "to its end");
        for pair in parts.windows(2) {
            assert_eq!(pair[0].1.1, pair[1].1.0, "parts meet");
        }
        let mut listed = 0;
        for (digests, (after, upto)) in &parts {
            assert!(digests.len() <= SYNC_DIGESTS_PER_REQUEST);
            assert!(
                digests
                    .iter()
                    .all(|(k, _)| in_open_closed(*k, *after, *upto))
            );
            listed += digests.len();
        }
        assert_eq!(listed, owned.len());
    }

    #[test]
    fn a_node_owning_nothing_still_asks_for_its_whole_range() {
        assert_eq!(sync_parts(Vec::new(), 5, 9), vec![(Vec::new(), (5, 9))]);
    }
}
