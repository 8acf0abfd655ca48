//! The task that owns the node's [`DhtNode`]: it feeds it the live set from
//! gossip, requests from other nodes, answers to its own requests and timers,
//! sends its requests over QUIC, and serves lookups for the admin API.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use specter_dht::messages::Response;
use specter_dht::node::DhtStats;
use specter_dht::{DhtEvent, DhtNode, Handled, OpId, Outcome, Peer, WriteOp};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::rpc::{self, Served};
use crate::transport::Transport;

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

/// Current Unix time in milliseconds (the DHT's clock).
pub fn now_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// An operation for the DHT task, from the admin API or the tunnels.
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
    /// Counters.
    pub stats: DhtStats,
}

/// Shared handle on the published DHT status.
pub type SharedDhtStatus = Arc<RwLock<DhtStatus>>;

/// Reads the published status.
pub fn read_status(s: &SharedDhtStatus) -> DhtStatus {
    s.read().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Inputs of the DHT task.
pub struct DhtDriver {
    /// The state machine.
    pub node: DhtNode,
    /// For sending requests.
    pub transport: Arc<Transport>,
    /// Requests from other nodes.
    pub served: mpsc::Receiver<Served>,
    /// Operations to run.
    pub commands: mpsc::Receiver<Command>,
    /// The live set from gossip (other nodes).
    pub members: watch::Receiver<Vec<Peer>>,
    /// Where the status goes.
    pub status: SharedDhtStatus,
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
            status,
            stop,
        } = self;
        let (resp_tx, mut resp_rx) =
            mpsc::channel::<(u64, Result<Response, ()>)>(RESPONSE_CAPACITY);
        let mut replies: HashMap<u64, oneshot::Sender<Response>> = HashMap::new();
        let mut ops: HashMap<OpId, (oneshot::Sender<(Outcome, Duration)>, Instant)> =
            HashMap::new();
        let mut known: BTreeSet<specter_gossip::NodeId> = BTreeSet::new();
        let mut published = Instant::now();
        loop {
            let wait = Duration::from_millis(node.poll_timeout().saturating_sub(now_ms()));
            let mut ring_changed = false;
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                changed = members.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let live: Vec<Peer> = members.borrow_and_update().clone();
                    let now = now_ms();
                    let ids: BTreeSet<_> = live.iter().map(|p| p.id).collect();
                    for gone in known.difference(&ids) {
                        node.member_down(now, *gone);
                    }
                    known = ids;
                    node.set_members(live);
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
    for item in node.store().iter() {
        if view.owns(item.key) {
            owned += 1;
        } else {
            replica += 1;
        }
    }
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
        stats: node.stats(),
    };
    *status.write().unwrap_or_else(PoisonError::into_inner) = next;
}

/// Lease of an operator test registration (`POST /dht/put`): long enough to
/// inspect, short enough to clean itself up.
pub const ADMIN_LEASE_MS: u64 = 10 * 60 * 1_000;

/// An operator test registration: the name is claimed by a client id derived
/// from this node's id and attached at this node.
pub fn admin_registration(node: &crate::node::NodeShared) -> WriteOp {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("specter-admin:{}", node.id));
    WriteOp::Attach {
        client: specter_dht::ClientId(digest.into()),
        node: node.id,
        addr: node.advertise,
        version: now_ms(),
        lease_ms: ADMIN_LEASE_MS,
        claim_ms: ADMIN_LEASE_MS,
    }
}

/// A record as JSON for the admin API.
pub fn record_json(record: &specter_dht::Record) -> serde_json::Value {
    let now = now_ms();
    serde_json::json!({
        "claim": record.claim.map(|c| serde_json::json!({
            "owner": c.owner.to_string(),
            "version": c.version,
            "claimed_at_ms": c.claimed_at,
            "expires_at_ms": c.expires_at,
        })),
        "attachments": record.attachments.iter().map(|(node, a)| serde_json::json!({
            "node": node.to_string(),
            "addr": a.addr,
            "version": a.version,
            "lease_expiry_ms": a.lease_expiry,
            "live": a.is_live(now),
        })).collect::<Vec<_>>(),
    })
}
