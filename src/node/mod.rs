//! The node daemon, composed in one place ([`Node::start`]) from:
//!
//! - [`membership`]: the task that owns the SWIM state machine, and the live
//!   set with its change events;
//! - [`dht`]: the task that owns the Chord state machine, and the
//!   [`dht::DhtHandle`] everyone else uses;
//! - [`rpc`]: DHT requests between nodes;
//! - [`tunnels`]: client sessions, visit routing, forwarded visitors;
//! - [`status`]: the snapshot `/status` shows, and [`histograms`] what
//!   `/metrics` adds;
//! - [`reload`]: certificates and settings read again while running;
//!
//! plus the network ([`crate::net`]), the public ingress
//! ([`crate::ingress`]) and the admin API ([`crate::admin`]). Callers bind
//! every socket ([`Sockets`]); tests bind port 0. [`run`] is the daemon:
//! start, write the ready file, serve until shutdown, leave gracefully.

pub mod dht;
pub mod histograms;
pub mod membership;
pub mod reload;
pub mod rpc;
pub mod status;
pub mod tunnels;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::Endpoint;
use rand::SeedableRng;
use rand::rngs::StdRng;
use specter_dht::Peer;
use specter_gossip::{GossipConfig, Membership, NodeId, NodeIdentity};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::dht::{DhtDriver, DhtHandle};
pub use self::membership::Readiness;
use self::membership::{Driver, Members, SharedView};
use self::reload::{ReloadSource, Reloader};
use self::status::{NodeState, NodeStatus};
use self::tunnels::{ClientAuth, TunnelParts, Tunnels};
use crate::config::NodeConfig;
use crate::ingress::http::HttpMode;
use crate::ingress::limits::{IngressLimits, IngressStats};
use crate::ingress::{Edge, Ingress};
use crate::net::tls::{NodeTls, TlsError};
use crate::net::{Transport, bind_endpoint};

/// What a node needs besides its sockets and TLS identity.
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
    /// What a visitor may hold, and for how long.
    pub ingress: IngressLimits,
    /// What one client key may register.
    pub clients: tunnels::quota::ClientLimits,
}

/// The plain-HTTP ingress.
pub struct PlainHttp {
    /// Bound listener.
    pub listener: TcpListener,
    /// Redirect to HTTPS, or proxy.
    pub mode: HttpMode,
    /// Tunnels are `<name>.<domain>`.
    pub domain: String,
}

/// The HTTPS (and raw TCP over TLS) ingress.
pub struct Https {
    /// Bound listener.
    pub listener: TcpListener,
    /// The wildcard certificate for `*.<domain>`.
    pub edge: Arc<Edge>,
}

/// Every socket a node serves on, bound by the caller.
pub struct Sockets {
    /// The QUIC endpoint (nodes and tunnel clients).
    pub endpoint: Endpoint,
    /// The loopback admin API.
    pub admin: Option<TcpListener>,
    /// The public TLS ingress.
    pub https: Option<Https>,
    /// The plain-HTTP ingress.
    pub http: Option<PlainHttp>,
}

impl Sockets {
    /// Only a QUIC endpoint: a node that routes and holds records but serves
    /// no visitors and no admin API.
    pub fn quic_only(endpoint: Endpoint) -> Sockets {
        Sockets {
            endpoint,
            admin: None,
            https: None,
            http: None,
        }
    }
}

/// Where a started node serves.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Addresses {
    /// The bound QUIC address.
    pub quic: SocketAddr,
    /// The advertised QUIC address.
    pub advertise: SocketAddr,
    /// The admin API.
    pub admin: Option<SocketAddr>,
    /// The TLS ingress.
    pub https: Option<SocketAddr>,
    /// The plain-HTTP ingress.
    pub http: Option<SocketAddr>,
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
    /// A socket's address could not be read.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// A running node.
pub struct Node {
    state: NodeState,
    transport: Arc<Transport>,
    tunnels: Arc<Tunnels>,
    addresses: Addresses,
    stop: CancellationToken,
    leave: CancellationToken,
    /// The membership task (first, so a graceful leave can wait for it),
    /// then the others.
    tasks: Vec<JoinHandle<()>>,
}

/// The address visitors reach the ingress at: the listener's, with the
/// advertised IP when the listener is bound to a wildcard.
fn public_addr(bound: SocketAddr, advertise: SocketAddr) -> SocketAddr {
    if bound.ip().is_unspecified() {
        SocketAddr::new(advertise.ip(), bound.port())
    } else {
        bound
    }
}

impl Node {
    /// Starts serving on `sockets` and joining through `options.seeds`.
    pub fn start(sockets: Sockets, tls: &NodeTls, options: NodeOptions) -> Result<Node, NodeError> {
        let Sockets {
            endpoint,
            admin,
            https,
            http,
        } = sockets;
        let me = Peer {
            id: tls.id,
            addr: options.advertise,
        };
        let addresses = Addresses {
            quic: endpoint.local_addr()?,
            advertise: options.advertise,
            admin: admin.as_ref().map(TcpListener::local_addr).transpose()?,
            https: https
                .as_ref()
                .map(|h| h.listener.local_addr())
                .transpose()?,
            http: http.as_ref().map(|h| h.listener.local_addr()).transpose()?,
        };
        let identity = NodeIdentity {
            id: tls.id,
            addr: options.advertise,
            generation: options.generation,
        };
        let mut membership = Membership::new(
            identity,
            &options.gossip,
            StdRng::seed_from_u64(options.rng_seed),
        )?;
        // Members learn where this node serves visitors.
        let ingress = addresses
            .https
            .map(|bound| public_addr(bound, options.advertise));
        membership.set_meta(ingress, 0);
        let (transport, inboxes) = Transport::new(endpoint, tls)?;
        let view = SharedView::default();
        let members = Members::default();
        let ready = Readiness::new(options.seeds.is_empty());
        let stop = CancellationToken::new();
        let leave = CancellationToken::new();
        let (served_tx, served_rx) = tokio::sync::mpsc::channel(dht::SERVED_CAPACITY);
        let (dht, commands) = DhtHandle::new();
        let dht_driver = DhtDriver {
            node: specter_dht::DhtNode::new(
                me,
                specter_dht::DhtConfig::default(),
                crate::clock::now_ms(),
            ),
            transport: transport.clone(),
            served: served_rx,
            commands,
            members: members.subscribe(),
            handle: dht.clone(),
            stop: stop.clone(),
        };
        let driver = Driver {
            membership,
            transport: transport.clone(),
            inbox: inboxes.datagrams,
            seeds: options.seeds,
            view: view.clone(),
            stop: stop.clone(),
            leave: leave.clone(),
            members: members.clone(),
            ready: ready.clone(),
        };
        let token_cas = match options.client_auth {
            ClientAuth::Open => None,
            ClientAuth::Token => Some(tls.ca_certs().iter().map(|c| c.to_vec()).collect()),
        };
        let tunnels = Tunnels::new(TunnelParts {
            me,
            dht: dht.clone(),
            transport: transport.clone(),
            members,
            token_cas,
            ready: ready.clone(),
            clients: options.clients,
        });
        let (https_listener, edge) = match https {
            Some(Https { listener, edge }) => (Some(listener), Some(edge)),
            None => (None, None),
        };
        let ingress = Ingress::new(
            tunnels.clone(),
            options.ingress,
            edge,
            Arc::new(IngressStats::default()),
        );
        let state = NodeState {
            me,
            dht,
            ready,
            view,
            transport: transport.clone(),
            ingress: ingress.clone(),
            reloader: Arc::default(),
        };
        let mut tasks = vec![
            tokio::spawn(driver.run()),
            tokio::spawn(transport.clone().serve(stop.clone())),
            tokio::spawn(dht_driver.run()),
            tokio::spawn(rpc::serve(
                inboxes.rpc,
                served_tx,
                transport.clone(),
                stop.clone(),
            )),
            tokio::spawn(serve_clients(
                inboxes.clients,
                tunnels.clone(),
                stop.clone(),
            )),
            tokio::spawn(tunnels::forward::serve(
                tunnels.clone(),
                inboxes.forwards,
                stop.clone(),
            )),
            tokio::spawn(tunnels::forget_dead_routes(tunnels.clone(), stop.clone())),
        ];
        if let Some(listener) = admin {
            tasks.push(tokio::spawn(crate::admin::serve(
                listener,
                state.clone(),
                stop.clone(),
            )));
        }
        let https_port = addresses.https.map(|a| a.port());
        if let (Some(listener), Some(edge)) = (https_listener, ingress.edge()) {
            tunnels.set_public(edge.domain(), https_port.unwrap_or(443));
            tasks.push(tokio::spawn(crate::ingress::serve(
                listener,
                ingress.clone(),
                stop.clone(),
            )));
        }
        if let Some(PlainHttp {
            listener,
            mode,
            domain,
        }) = http
        {
            tasks.push(tokio::spawn(crate::ingress::serve_plain(
                listener,
                ingress.clone(),
                domain,
                mode,
                https_port,
                stop.clone(),
            )));
        }

        tracing::info!(id = %tls.id, advertise = %options.advertise, generation = options.generation, "node started");
        Ok(Node {
            state,
            transport,
            tunnels,
            addresses,
            stop,
            leave,
            tasks,
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.state.me.id
    }

    /// Where it serves.
    pub fn addresses(&self) -> Addresses {
        self.addresses
    }

    /// The node's tunnels.
    pub fn tunnels(&self) -> Arc<Tunnels> {
        self.tunnels.clone()
    }

    /// State for the admin API.
    pub fn state(&self) -> NodeState {
        self.state.clone()
    }

    /// A snapshot for `/status`.
    pub fn status(&self) -> NodeStatus {
        self.state.status()
    }

    /// Lets SIGHUP, `POST /reload` and `specter reload` read `running`'s
    /// files again through `source` (see [`reload`]).
    pub fn enable_reload(&self, source: ReloadSource, running: NodeConfig) -> Arc<Reloader> {
        let reloader = Arc::new(Reloader::new(
            source,
            running,
            self.transport.clone(),
            self.state.ingress.clone(),
            self.tunnels.clone(),
        ));
        let _ = self.state.reloader.set(reloader.clone());
        reloader
    }

    /// Whether it serves visitors and clients yet (see [`Readiness`]).
    pub fn readiness(&self) -> Readiness {
        self.state.ready.clone()
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
        self.transport.shutdown().await;
    }

    /// Stops at once without telling the cluster: as far as members can tell,
    /// the node crashed (they detect it through failed probes).
    pub async fn crash(mut self) {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.transport.shutdown().await;
    }
}

/// Accepts tunnel clients until `stop` fires.
async fn serve_clients(
    mut clients: crate::net::pool::ClientInbox,
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
        }
    }
}

/// Binds every socket `config` names (the QUIC endpoint first).
pub async fn bind(config: &NodeConfig) -> anyhow::Result<Sockets> {
    let endpoint =
        bind_endpoint(config.listen).with_context(|| format!("binding UDP {}", config.listen))?;
    let admin = match config.admin {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the admin API on {addr}"))?,
        ),
        None => None,
    };
    let https = match &config.ingress {
        Some(ingress) => Some(Https {
            edge: Arc::new(Edge::load(
                &ingress.domain,
                &ingress.edge_cert,
                &ingress.edge_key,
            )?),
            listener: crate::ingress::accept::listen(ingress.https)
                .with_context(|| format!("binding the ingress on {}", ingress.https))?,
        }),
        None => None,
    };
    let http = match &config.http {
        Some((addr, mode, domain)) => Some(PlainHttp {
            listener: crate::ingress::accept::listen(*addr)
                .with_context(|| format!("binding the plain-HTTP ingress on {addr}"))?,
            mode: *mode,
            domain: domain.clone(),
        }),
        None => None,
    };
    Ok(Sockets {
        endpoint,
        admin,
        https,
        http,
    })
}

/// The node daemon: binds what `config` names, starts, writes the ready file
/// (`{id, quic, advertise, admin, https, http, pid}`), serves until
/// `shutdown` completes, then leaves the cluster gracefully. SIGHUP reloads
/// through `reload` (see [`reload`]).
pub async fn run(
    config: NodeConfig,
    tls: NodeTls,
    reload: ReloadSource,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Watched from the start: until then SIGHUP would end the process.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("watching SIGHUP")?;
    // A reload compares the file with the settings as read, before the
    // descriptor limit lowered any.
    let as_read = config.clone();
    let mut config = config;
    let fds = crate::files::raise_descriptor_limit();
    if config.ingress_limits.fit_descriptors(fds) {
        tracing::warn!(
            descriptors = fds,
            max_visitors = config.ingress_limits.max_visitors,
            "the descriptor limit caps visitor connections"
        );
    }
    let sockets = bind(&config).await?;
    let mut advertise = config.advertise;
    // `--listen IP:0` lets the OS pick the port; advertise the one it picked.
    if advertise.port() == 0 {
        advertise.set_port(sockets.endpoint.local_addr()?.port());
    }
    let node = Node::start(
        sockets,
        &tls,
        NodeOptions {
            advertise,
            seeds: config.join.clone(),
            gossip: GossipConfig::default(),
            generation: crate::clock::generation_now(),
            rng_seed: rand::random(),
            client_auth: config.client_auth,
            ingress: config.ingress_limits.clone(),
            clients: config.client_limits.clone(),
        },
    )?;
    let reloader = node.enable_reload(reload, as_read);
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let reloader = reloader.clone();
            // File reads: off the runtime's workers.
            let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
        }
    });
    let mut shutdown = std::pin::pin!(shutdown);
    if let Some(path) = &config.ready_file {
        // Written only once the node serves (see `Readiness`).
        let ready = node.readiness();
        let became_ready = async { while !ready.wait(Duration::from_secs(3600)).await {} };
        tokio::select! {
            () = &mut shutdown => {
                tracing::info!("shutting down before it was ready");
                node.shutdown().await;
                return Ok(());
            }
            () = became_ready => {}
        }
        write_ready_file(path, &node)?;
    }
    shutdown.await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

fn write_ready_file(path: &std::path::Path, node: &Node) -> anyhow::Result<()> {
    let a = node.addresses();
    let ready = serde_json::json!({
        "id": node.id().to_string(),
        "quic": a.quic,
        "advertise": a.advertise,
        "admin": a.admin,
        "https": a.https,
        "http": a.http,
        "pid": std::process::id(),
    });
    crate::files::write_atomically(path, &ready.to_string())
}
