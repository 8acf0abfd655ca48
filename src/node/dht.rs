//! The task that owns the node's [`DhtNode`]: it feeds it membership
//! changes from gossip, requests from other nodes, answers to its own
//! requests and timers, and sends its requests over QUIC. Everyone else
//! reaches it through a [`DhtHandle`] (get, put, status) over a bounded
//! channel.

use super::histograms::Histograms;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use specter_dht::messages::Response;
use specter_dht::node::DhtStats;
use specter_dht::{DhtEvent, DhtNode, Handled, OpId, Outcome, Peer, WriteOp};
use specter_gossip::NodeId;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::membership::{MemberChange, Subscription, Update};
use super::rpc::{self, Served};
use crate::clock::now_ms;
use crate::net::Transport;

/// Requests from other nodes waiting for this task; beyond this they are
/// answered `Unavailable` at once.
pub const SERVED_CAPACITY: usize = 1_024;

/// Local operations waiting for this task: admin lookups, every visitor's
/// route lookup on a route-cache miss, and lease renewals. Senders wait for
/// room when it is full.
pub const COMMAND_CAPACITY: usize = 64;

/// Answers to our own requests waiting for this task. Each request in flight
/// holds one slot at most, and requests are only made by this task.
const RESPONSE_CAPACITY: usize = 4_096;

/// The status is republished at most this often (and on ring changes).
const STATUS_REFRESH: Duration = Duration::from_millis(500);

/// An operation for the DHT task, sent by a [`DhtHandle`].
pub enum Command {
    /// Read a name.
    Get {
        /// The name.
        name: String,
        /// Outcome and how long it took.
        reply: oneshot::Sender<(Outcome, Duration)>,
    },
    /// Write to a name.
    Put {
        /// The name.
        name: String,
        /// The change.
        op: WriteOp,
        /// Outcome and how long it took.
        reply: oneshot::Sender<(Outcome, Duration)>,
    },
}

/// A node in `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    /// Id (hex).
    pub id: String,
    /// Address.
    pub addr: std::net::SocketAddr,
}

impl From<Peer> for PeerStatus {
    fn from(p: Peer) -> Self {
        PeerStatus {
            id: p.id.to_string(),
            addr: p.addr,
        }
    }
}

/// The DHT part of `/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DhtStatus {
    /// Nodes on the ring, this one included.
    pub ring_size: usize,
    /// The node before this one.
    pub predecessor: Option<PeerStatus>,
    /// The successor list.
    pub successors: Vec<PeerStatus>,
    /// The distinct nodes among the 64 fingers, in finger order.
    pub fingers: Vec<PeerStatus>,
    /// Records held as their owner.
    pub records_owned: usize,
    /// Records held as a replica.
    pub records_replica: usize,
    /// [`STATUS_RECORDS_SHOWN`] of the records held (the first in key
    /// order), sorted by name.
    pub records: Vec<HeldRecord>,
    /// Records held in all.
    pub records_total: usize,
    /// Counters.
    pub stats: DhtStats,
}

/// At most this many records are listed in `/status` (the counts cover
/// all): a node may hold tens of thousands, and the status page polls.
pub const STATUS_RECORDS_SHOWN: usize = 200;

/// A record this node holds, as `/status` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct HeldRecord {
    /// The tunnel name.
    pub name: String,
    /// `owner` (this node is its owner on the ring) or `replica`.
    pub role: &'static str,
    /// Whether a client's claim on the name is live.
    pub claimed: bool,
    /// Live attachments.
    pub attachments: usize,
}

/// Where the driver publishes its status.
type SharedDhtStatus = Arc<RwLock<DhtStatus>>;

/// The way to the DHT task: reads, writes and the published status. Cheap to
/// clone.
#[derive(Clone)]
pub struct DhtHandle {
    commands: mpsc::Sender<Command>,
    status: SharedDhtStatus,
    histograms: Histograms,
}

impl DhtHandle {
    /// A handle and the command queue (at most [`COMMAND_CAPACITY`] waiting)
    /// that the driver, or a test standing in for it, serves.
    pub fn new() -> (DhtHandle, mpsc::Receiver<Command>) {
        let (commands, rx) = mpsc::channel(COMMAND_CAPACITY);
        let handle = DhtHandle {
            commands,
            status: SharedDhtStatus::default(),
            histograms: Histograms::default(),
        };
        (handle, rx)
    }

    async fn run(
        &self,
        command: impl FnOnce(oneshot::Sender<(Outcome, Duration)>) -> Command,
    ) -> Option<(Outcome, Duration)> {
        let (tx, rx) = oneshot::channel();
        // A burst waits for room rather than failing: the driver drains
        // commands quickly and each one is bounded by its RPC timeouts.
        self.commands.send(command(tx)).await.ok()?;
        let done = rx.await.ok()?;
        self.histograms.lookup_done(&done.0, done.1);
        Some(done)
    }

    /// The node's histograms (kept here: every part of the node holds this
    /// handle).
    pub fn histograms(&self) -> &Histograms {
        &self.histograms
    }

    /// Reads `name`: the outcome and how long it took; `None` if the DHT
    /// task is gone (the node is stopping).
    pub async fn get(&self, name: &str) -> Option<(Outcome, Duration)> {
        let name = name.to_string();
        self.run(|reply| Command::Get { name, reply }).await
    }

    /// Applies `op` to `name`; `None` if the DHT task is gone.
    pub async fn put(&self, name: &str, op: WriteOp) -> Option<(Outcome, Duration)> {
        let name = name.to_string();
        self.run(|reply| Command::Put { name, op, reply }).await
    }

    /// The status last published by the driver.
    pub fn status(&self) -> DhtStatus {
        self.status
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Inputs of the DHT task.
pub struct DhtDriver {
    /// The state machine.
    pub node: DhtNode,
    /// For sending requests.
    pub transport: Arc<Transport>,
    /// Requests from other nodes.
    pub served: mpsc::Receiver<Served>,
    /// Operations to run (from [`DhtHandle::new`]).
    pub commands: mpsc::Receiver<Command>,
    /// Membership changes from gossip.
    pub members: Subscription,
    /// The handle whose status this task publishes.
    pub handle: DhtHandle,
    /// Stops the task.
    pub stop: CancellationToken,
}

impl DhtDriver {
    /// Runs until `stop` fires.
    pub async fn run(self) {
        let DhtDriver {
            mut node,
            transport,
            mut served,
            mut commands,
            mut members,
            handle,
            stop,
        } = self;
        let status = handle.status;
        let mut live: BTreeMap<NodeId, Peer> =
            members.snapshot.iter().map(|p| (p.id, *p)).collect();
        node.set_members(live.values().copied());
        let (resp_tx, mut resp_rx) =
            mpsc::channel::<(u64, Result<Response, ()>)>(RESPONSE_CAPACITY);
        let mut replies: HashMap<u64, oneshot::Sender<Response>> = HashMap::new();
        let mut ops: HashMap<OpId, (oneshot::Sender<(Outcome, Duration)>, Instant)> =
            HashMap::new();
        let mut published = Instant::now();
        loop {
            let wait = Duration::from_millis(node.poll_timeout().saturating_sub(now_ms()));
            let mut ring_changed = false;
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                update = members.next() => {
                    let Some(update) = update else { return };
                    let now = now_ms();
                    match update {
                        Update::Change(MemberChange::Up(peer)) => {
                            live.insert(peer.id, peer);
                        }
                        Update::Change(MemberChange::Down(peer)) => {
                            live.remove(&peer.id);
                            node.member_down(now, peer.id);
                        }
                        Update::Resync(snapshot) => {
                            // Fell behind: whatever left the set meanwhile
                            // went down.
                            let fresh: BTreeMap<NodeId, Peer> =
                                snapshot.into_iter().map(|p| (p.id, p)).collect();
                            for gone in live.keys().filter(|id| !fresh.contains_key(id)) {
                                node.member_down(now, *gone);
                            }
                            live = fresh;
                        }
                    }
                    node.set_members(live.values().copied());
                    ring_changed = true;
                }
                Some(s) = served.recv() => {
                    match node.handle_request(now_ms(), s.from, s.request) {
                        Handled::Reply(r) => {
                            let _ = s.reply.send(r);
                        }
                        Handled::Deferred(token) => {
                            replies.insert(token, s.reply);
                        }
                    }
                }
                Some((id, result)) = resp_rx.recv() => node.handle_response(now_ms(), id, result),
                Some(cmd) = commands.recv() => {
                    let now = now_ms();
                    let (op, reply) = match cmd {
                        Command::Get { name, reply } => (node.start_get(&name), reply),
                        Command::Put { name, op, reply } => (node.start_write(now, &name, op), reply),
                    };
                    ops.insert(op, (reply, Instant::now()));
                }
                () = tokio::time::sleep(wait) => node.handle_timeout(now_ms()),
            }
            while let Some(out) = node.poll_request() {
                let transport = transport.clone();
                let tx = resp_tx.clone();
                tokio::spawn(async move {
                    let result = rpc::call(&transport, out.to, &out.request).await;
                    if let Err(err) = &result {
                        tracing::debug!(peer = %out.to.id, %err, "dht request failed");
                    }
                    let _ = tx.send((out.id, result.map_err(|_| ()))).await;
                });
            }
            while let Some(event) = node.poll_event() {
                match event {
                    DhtEvent::Completed { op, outcome } => {
                        if let Some((reply, started)) = ops.remove(&op) {
                            let _ = reply.send((outcome, started.elapsed()));
                        }
                    }
                    DhtEvent::Reply { token, response } => {
                        if let Some(reply) = replies.remove(&token) {
                            let _ = reply.send(response);
                        }
                    }
                }
            }
            if ring_changed || published.elapsed() >= STATUS_REFRESH {
                publish(&node, &status);
                published = Instant::now();
            }
        }
    }
}

fn publish(node: &DhtNode, status: &SharedDhtStatus) {
    let view = node.view();
    let mut fingers: Vec<PeerStatus> = Vec::new();
    let mut seen = BTreeSet::new();
    for f in view.fingers() {
        if f.id != view.me().id && seen.insert(f.id) {
            fingers.push(f.into());
        }
    }
    let (mut owned, mut replica) = (0, 0);
    let mut records = Vec::new();
    let now = crate::clock::now_ms();
    for item in node.store().iter() {
        let owner = view.owns(item.key);
        if owner {
            owned += 1;
        } else {
            replica += 1;
        }
        if records.len() < STATUS_RECORDS_SHOWN {
            records.push(HeldRecord {
                name: item.name.clone(),
                role: if owner { "owner" } else { "replica" },
                claimed: item.record.claim.is_some_and(|c| c.is_live(now)),
                attachments: item
                    .record
                    .attachments
                    .values()
                    .filter(|a| a.is_live(now))
                    .count(),
            });
        }
    }
    records.sort_by(|a, b| a.name.cmp(&b.name));
    let next = DhtStatus {
        ring_size: view.len(),
        predecessor: (!view.is_alone()).then(|| view.predecessor().into()),
        successors: view
            .successors(specter_dht::ring::SUCCESSORS)
            .into_iter()
            .map(Into::into)
            .collect(),
        fingers,
        records_owned: owned,
        records_replica: replica,
        records_total: owned + replica,
        records,
        stats: node.stats(),
    };
    *status.write().unwrap_or_else(PoisonError::into_inner) = next;
}

/// Lease of an operator test registration (`POST /dht/put`): long enough to
/// inspect, short enough to clean itself up.
pub const ADMIN_LEASE_MS: u64 = 10 * 60 * 1_000;

/// An operator test registration: the name is claimed by a client id derived
/// from this node's id and attached at this node.
pub fn admin_registration(me: Peer) -> WriteOp {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("specter-admin:{}", me.id));
    WriteOp::Attach {
        client: specter_dht::ClientId(digest.into()),
        node: me.id,
        addr: me.addr,
        version: now_ms(),
        lease_ms: ADMIN_LEASE_MS,
        claim_ms: ADMIN_LEASE_MS,
    }
}
