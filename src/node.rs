//! The node daemon: composes the QUIC transport, the membership task, the DHT
//! task and its RPC server, the tunnels (client sessions and forwarding) and
//! the admin API. [`Node::start`] takes an already-bound endpoint (and the caller
//! binds the admin listener), so tests bind port 0 and the binary binds what
//! the operator asked for.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::Endpoint;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use specter_gossip::{GossipConfig, Membership, NodeId, NodeIdentity};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dht::{Command, DhtDriver, DhtStatus, SharedDhtStatus, read_status};
use crate::membership::{Driver, MemberStatus, SharedView, read_view};
use crate::tls::{NodeTls, TlsError};
use crate::transport::{Transport, TransportCounters};
use crate::tunnels::Tunnels;

/// What a node needs besides its endpoint and TLS identity.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Address other nodes dial (must be reachable by them).
    pub advertise: SocketAddr,
    /// Nodes to join through (`host:port`); empty for the first node.
    pub seeds: Vec<String>,
    /// SWIM settings.
    pub gossip: GossipConfig,
    /// This run's generation; must exceed every earlier run's (the binary uses
    /// the start time in milliseconds).
    pub generation: u64,
    /// Seed of the membership's RNG.
    pub rng_seed: u64,
    /// Whether tunnel clients need a token signed by the cluster CA.
    pub client_auth: ClientAuth,
}

/// Who may register tunnels at a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Any client (names are still owned by the first key that claims them).
    #[default]
    Open,
    /// Only clients holding a token from `specter ca issue-client-token`.
    Token,
}

/// Why a node did not start; nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The TLS material could not be turned into QUIC configs.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The gossip settings are inconsistent.
    #[error("gossip config: {0}")]
    Gossip(#[from] specter_gossip::config::ConfigError),
}

/// Everything `/status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    /// This node's id (hex).
    pub id: String,
    /// Its advertised QUIC address.
    pub addr: SocketAddr,
    /// Its current generation.
    pub generation: u64,
    /// Whether another member knows it.
    pub joined: bool,
    /// Every member it tracks (not itself).
    pub members: Vec<MemberStatus>,
    /// Gossip counters.
    pub gossip: specter_gossip::GossipStats,
    /// Transport counters.
    pub transport: TransportCounters,
    /// Ring neighbours, fingers and records held.
    pub dht: DhtStatus,
}

/// State shared by the node's tasks and the admin API.
pub struct NodeShared {
    /// This node's id.
    pub id: NodeId,
    /// Its advertised address.
    pub advertise: SocketAddr,
    /// The connection pool.
    pub transport: Arc<Transport>,
    /// Live members other than this node, as gossip sees them.
    pub live: tokio::sync::watch::Receiver<Vec<specter_dht::Peer>>,
    view: SharedView,
    dht_status: SharedDhtStatus,
    dht: tokio::sync::mpsc::Sender<Command>,
}

impl NodeShared {
    /// A consistent snapshot for `/status`.
    pub fn status(&self) -> NodeStatus {
        let view = read_view(&self.view);
        NodeStatus {
            id: self.id.to_string(),
            addr: self.advertise,
            generation: view.generation,
            joined: view.joined,
            members: view.members,
            gossip: view.gossip,
            transport: self.transport.counters(),
            dht: read_status(&self.dht_status),
        }
    }

    /// Runs a DHT operation and waits for its outcome.
    pub async fn dht(
        &self,
        command: impl FnOnce(
            tokio::sync::oneshot::Sender<(specter_dht::Outcome, std::time::Duration)>,
        ) -> Command,
    ) -> Option<(specter_dht::Outcome, std::time::Duration)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A burst waits for room rather than failing: the driver drains
        // commands quickly and each one is bounded by its RPC timeouts.
        self.dht.send(command(tx)).await.ok()?;
        rx.await.ok()
    }
}

/// Drops cached routes through nodes as soon as gossip declares them dead.
async fn forget_dead_routes(
    mut live: tokio::sync::watch::Receiver<Vec<specter_dht::Peer>>,
    tunnels: Arc<Tunnels>,
    stop: CancellationToken,
) {
    let mut known: std::collections::BTreeSet<NodeId> = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            changed = live.changed() => {
                if changed.is_err() {
                    return;
                }
                let now: std::collections::BTreeSet<NodeId> =
                    live.borrow_and_update().iter().map(|p| p.id).collect();
                for gone in known.difference(&now) {
                    tunnels.node_down(*gone);
                }
                known = now;
            }
        }
    }
}

/// Accepts tunnel clients and forwarded visitors until `stop` fires.
async fn serve_clients(
    mut clients: crate::transport::ClientInbox,
    mut forwards: tokio::sync::mpsc::Receiver<crate::transport::IncomingStream>,
    tunnels: Arc<Tunnels>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            conn = clients.recv() => match conn {
                Some(conn) => {
                    tokio::spawn(tunnels.clone().serve_client(conn, stop.clone()));
                }
                None => return,
            },
            stream = forwards.recv() => match stream {
                Some(stream) => {
                    tokio::spawn(tunnels.clone().serve_forward(stream));
                }
                None => return,
            },
        }
    }
}

/// A running node.
pub struct Node {
    shared: Arc<NodeShared>,
    tunnels: Arc<Tunnels>,
    stop: CancellationToken,
    leave: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Starts serving on `endpoint` and joining through `options.seeds`.
    pub fn start(
        endpoint: Endpoint,
        tls: &NodeTls,
        options: NodeOptions,
    ) -> Result<Node, NodeError> {
        let identity = NodeIdentity {
            id: tls.id,
            addr: options.advertise,
            generation: options.generation,
        };
        let membership = Membership::new(
            identity,
            &options.gossip,
            StdRng::seed_from_u64(options.rng_seed),
        )?;
        let (transport, inboxes) = Transport::new(endpoint, tls)?;
        let crate::transport::Inboxes {
            datagrams: inbox,
            streams,
            clients,
        } = inboxes;
        let view = SharedView::default();
        let stop = CancellationToken::new();
        let leave = CancellationToken::new();
        let (live_tx, live_rx) = tokio::sync::watch::channel(Vec::new());
        let (served_tx, served_rx) = tokio::sync::mpsc::channel(crate::dht::SERVED_CAPACITY);
        let (cmd_tx, cmd_rx) = tokio::sync::mpsc::channel(crate::dht::COMMAND_CAPACITY);
        let dht_status = SharedDhtStatus::default();
        let me = specter_dht::Peer {
            id: tls.id,
            addr: options.advertise,
        };
        let dht = DhtDriver {
            node: specter_dht::DhtNode::new(
                me,
                specter_dht::DhtConfig::default(),
                crate::dht::now_ms(),
            ),
            transport: transport.clone(),
            served: served_rx,
            commands: cmd_rx,
            members: live_rx.clone(),
            status: dht_status.clone(),
            stop: stop.clone(),
        };
        let driver = Driver {
            membership,
            transport: transport.clone(),
            inbox,
            seeds: options.seeds,
            view: view.clone(),
            stop: stop.clone(),
            leave: leave.clone(),
            live: live_tx,
        };
        let shared = Arc::new(NodeShared {
            id: tls.id,
            advertise: options.advertise,
            transport: transport.clone(),
            live: live_rx.clone(),
            view,
            dht_status,
            dht: cmd_tx,
        });
        let token_cas = match options.client_auth {
            ClientAuth::Open => None,
            ClientAuth::Token => Some(tls.ca_certs().iter().map(|c| c.to_vec()).collect()),
        };
        let tunnels = Tunnels::new(shared.clone(), token_cas);
        let (forward_tx, forward_rx) =
            tokio::sync::mpsc::channel(crate::transport::STREAM_INBOX_CAPACITY);
        let tasks = vec![
            tokio::spawn(driver.run()),
            tokio::spawn(transport.clone().serve(stop.clone())),
            tokio::spawn(dht.run()),
            tokio::spawn(crate::rpc::serve(
                streams,
                served_tx,
                forward_tx,
                stop.clone(),
            )),
            tokio::spawn(serve_clients(
                clients,
                forward_rx,
                tunnels.clone(),
                stop.clone(),
            )),
            tokio::spawn(forget_dead_routes(live_rx, tunnels.clone(), stop.clone())),
        ];
        tracing::info!(id = %tls.id, advertise = %options.advertise, generation = options.generation, "node started");
        Ok(Node {
            shared,
            tunnels,
            stop,
            leave,
            tasks,
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared.id
    }

    /// The node's tunnels (for ingress).
    pub fn tunnels(&self) -> Arc<Tunnels> {
        self.tunnels.clone()
    }

    /// State for the admin API.
    pub fn shared(&self) -> Arc<NodeShared> {
        self.shared.clone()
    }

    /// A snapshot for `/status`.
    pub fn status(&self) -> NodeStatus {
        self.shared.status()
    }

    /// Leaves the cluster gracefully (members see it down at once), then closes.
    pub async fn shutdown(mut self) {
        self.leave.cancel();
        // The membership task (first) returns once its leave packets are out.
        if !self.tasks.is_empty() {
            let _ = self.tasks.remove(0).await;
        }
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        self.shared.transport.shutdown().await;
    }

    /// Stops at once without telling the cluster: as far as members can tell,
    /// the node crashed (they detect it through failed probes).
    pub async fn crash(mut self) {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.shared.transport.shutdown().await;
    }
}
