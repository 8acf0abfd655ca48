//! The client daemon (`specter tunnel`): keeps a key and a name in its state
//! directory, attaches to `k` distinct nodes, and carries each visitor stream
//! a node opens to the local target.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use quinn::Endpoint;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use specter_dht::Peer;
use specter_gossip::NodeId;
use specter_tunnel::dialer::Dialer;
use specter_tunnel::protocol::{
    ClientMsg, NodeMsg, RefuseCode, TUNNEL_PROTOCOL_VERSION, Visit, VisitReply,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::rpc::{read_frame, write_msg};

/// Attachments a client keeps (k): two nodes can fail at once and the tunnel
/// still has a path.
pub const ATTACHMENTS: usize = 3;
/// Backoff of one node's address after it failed, from this (jittered,
/// doubling per failure)...
const RETRY_MIN: Duration = Duration::from_millis(200);
/// ...up to this, forever: a client whose network is gone comes back within
/// this long of its return.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the peer sample is refreshed.
const PEERS_REFRESH: Duration = Duration::from_secs(30);
/// A visitor stream must deliver its header this soon.
const VISIT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A target that has not accepted a connection by then is reported as
/// refused. Long enough for two SYN retransmits (1 s, then 2 s more) when a
/// burst overflows the target's accept queue; well below the node's 10 s
/// deadline for an answer.
const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// File names in the state directory.
const KEY_FILE: &str = "client.key";
const NAME_FILE: &str = "name";

/// What the client serves and where it attaches.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Seeds (`host:port` of node QUIC endpoints).
    pub via: Vec<String>,
    /// The cluster CA (PEM).
    pub ca_pem: String,
    /// Where the key and name are kept.
    pub state_dir: PathBuf,
    /// Local service (`host:port`) visitors are carried to.
    pub target: String,
    /// Requested name; otherwise the saved one, or a new random one.
    pub name: Option<String>,
    /// How many nodes to attach to.
    pub attachments: usize,
    /// Client token, for nodes that require one.
    pub token: Option<String>,
    /// More tunnels served by the same client: `(name, target)`.
    pub extra: Vec<(String, String)>,
}

/// The client's key and name, created on first run.
pub struct ClientState {
    /// PEM of the private key.
    pub key_pem: String,
    /// The tunnel name.
    pub name: String,
}

/// Loads or creates the key (mode 0600) and the name in `dir`.
pub fn load_state(dir: &Path, requested: Option<&str>) -> Result<ClientState> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_path = dir.join(KEY_FILE);
    let key_pem = match std::fs::read_to_string(&key_path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = rcgen::KeyPair::generate().context("generating the client key")?;
            let pem = key.serialize_pem();
            crate::pki::write_file(&key_path, &pem, true, false)?;
            pem
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", key_path.display())),
    };
    let name_path = dir.join(NAME_FILE);
    let name = match requested {
        Some(n) => {
            specter_tunnel::names::validate(n).map_err(|e| anyhow::anyhow!("--name {n:?}: {e}"))?;
            n.to_string()
        }
        None => match std::fs::read_to_string(&name_path) {
            Ok(n) => n.trim().to_string(),
            Err(_) => specter_tunnel::names::random_name(&mut rand::rng()),
        },
    };
    std::fs::write(&name_path, &name)
        .with_context(|| format!("writing {}", name_path.display()))?;
    Ok(ClientState { key_pem, name })
}

fn client_config(options: &ClientOptions, state: &ClientState) -> Result<quinn::ClientConfig> {
    let key = rcgen::KeyPair::from_pem(&state.key_pem).context("reading the client key")?;
    let mut params = rcgen::CertificateParams::new(vec!["specter-client.invalid".to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let cert = params
        .self_signed(&key)
        .context("self-signing the client certificate")?;
    let key_der = PrivateKeyDer::from_pem_slice(state.key_pem.as_bytes())
        .context("reading the client key")?;
    Ok(crate::tls::client_quic_config(
        &options.ca_pem,
        CertificateDer::from(cert.der().to_vec()),
        key_der,
    )?)
}

/// Reports from attachment tasks. Each carries the address that task dialed,
/// which can differ from the address the node advertises (a seed given by
/// host name, or behind NAT).
enum Update {
    Attached(SocketAddr, Peer, Option<specter_tunnel::protocol::Ingress>),
    /// The attachment ended (`Some(node)`) or never came up (`None`).
    Lost(SocketAddr, Option<Peer>, String),
    /// The node has been silent for [`CLIENT_SILENCE`] (`true`), or is heard
    /// again (`false`), on the attachment made through this address.
    Silent(SocketAddr, NodeId, bool),
    Peers(Vec<Peer>),
    /// Gossip (through one of our nodes) declared these nodes dead.
    Down(Vec<NodeId>),
    Refused(String),
}

/// An attachment the client holds.
struct Held {
    peer: Peer,
    dialed: SocketAddr,
    /// Silent for a while: it does not count toward k until heard again.
    silent: bool,
    handle: Handle,
}

/// How the client loop steers an attachment task.
#[derive(Clone, Default)]
struct Handle {
    /// Cancelled to drop the attachment.
    drop: CancellationToken,
    /// Notified when gossip declared the node dead: the task then counts it
    /// silent until it hears from the node again.
    suspect: Arc<tokio::sync::Notify>,
}

/// How often an attachment checks that its node is still heard.
const SILENCE_CHECK: Duration = Duration::from_millis(50);

/// An attachment whose node has sent nothing for this long (four missed
/// keep-alive answers, see [`crate::tls::CLIENT_KEEP_ALIVE`]) no longer
/// counts toward k: a replacement is attached at once, while the silent
/// connection is kept until QUIC's idle timeout decides. A node that was only
/// slow thus costs a spare attachment, never a dropped visitor.
pub const CLIENT_SILENCE: Duration = Duration::from_millis(400);

/// Runs the client until `stop` fires or a node refuses it.
pub async fn run(
    options: ClientOptions,
    endpoint: Endpoint,
    stop: CancellationToken,
) -> Result<()> {
    let state = load_state(&options.state_dir, options.name.as_deref())?;
    let config = client_config(&options, &state)?;
    let name = state.name.clone();
    let mut targets: HashMap<String, String> = HashMap::new();
    targets.insert(name.clone(), options.target.clone());
    for (extra, target) in &options.extra {
        specter_tunnel::names::validate(extra)
            .map_err(|e| anyhow::anyhow!("tunnel name {extra:?}: {e}"))?;
        if targets.insert(extra.clone(), target.clone()).is_some() {
            bail!("tunnel name {extra:?} is listed twice");
        }
    }
    let mut names: Vec<String> = targets.keys().cloned().collect();
    names.sort();
    let targets = Arc::new(targets);
    for (n, t) in targets.iter() {
        println!(
            "tunnel {n}: attaching to {} node(s) for {t}",
            options.attachments
        );
    }
    let name = names.join(",");
    let k = options.attachments;
    let mut printed_urls = false;
    let (tx, mut rx) = mpsc::channel::<Update>(64);
    let mut held: HashMap<NodeId, Held> = HashMap::new();
    let mut pending: HashMap<SocketAddr, Handle> = HashMap::new();
    let mut seeds = Vec::new();
    for seed in &options.via {
        seeds.extend(
            tokio::net::lookup_host(seed.as_str())
                .await
                .with_context(|| format!("resolving {seed}"))?,
        );
    }
    if seeds.is_empty() {
        bail!("no seed to attach through (--via)");
    }
    let mut dialer = Dialer::new(seeds, RETRY_MIN, RETRY_MAX);
    let healthy = |held: &HashMap<NodeId, Held>| held.values().filter(|h| !h.silent).count();
    let mut tick = tokio::time::interval(SILENCE_CHECK);
    loop {
        // Top up to k healthy attachments from whatever is not backing off.
        while healthy(&held) + pending.len() < k {
            let busy: HashSet<SocketAddr> = held
                .values()
                .flat_map(|h| [h.peer.addr, h.dialed])
                .chain(pending.keys().copied())
                .collect();
            let Some(addr) = dialer.next(Instant::now(), &busy, &mut rand::rng()) else {
                break;
            };
            let handle = Handle {
                drop: stop.child_token(),
                suspect: Arc::default(),
            };
            pending.insert(addr, handle.clone());
            let session = Session {
                endpoint: endpoint.clone(),
                config: config.clone(),
                names: names.clone(),
                token: options.token.clone(),
                targets: targets.clone(),
                updates: tx.clone(),
                handle,
            };
            tokio::spawn(attachment(session, addr));
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            Some(update) = rx.recv() => match update {
                Update::Attached(dialed, peer, ingress) => {
                    if let Some(ingress) = ingress.filter(|_| !printed_urls) {
                        printed_urls = true;
                        for n in &names {
                            println!("tunnel {n}: {}", ingress.url(n));
                        }
                    }
                    let handle = pending.remove(&dialed).unwrap_or_default();
                    dialer.succeeded(dialed);
                    // Reached a node we hold under another address: the node
                    // has just replaced our older connection with this one,
                    // so keep this one.
                    if let Some(old) = held.remove(&peer.id) {
                        old.handle.drop.cancel();
                    }
                    held.insert(peer.id, Held { peer, dialed, silent: false, handle });
                    println!("tunnel {name}: attached to node {} at {} ({}/{k})", peer.id, peer.addr, healthy(&held));
                }
                Update::Lost(dialed, peer, why) => {
                    pending.remove(&dialed);
                    dialer.failed(dialed, Instant::now(), &mut rand::rng());
                    match peer {
                        // Only the attachment this task held (not one to the
                        // same node under another address).
                        Some(peer) if held.get(&peer.id).is_some_and(|h| h.dialed == dialed) => {
                            held.remove(&peer.id);
                            println!("tunnel {name}: lost node {} ({why}); {}/{k} attached", peer.id, healthy(&held));
                        }
                        _ => tracing::info!(addr = %dialed, %why, "attach attempt failed"),
                    }
                }
                Update::Silent(dialed, node, silent) => {
                    if let Some(h) = held.get_mut(&node).filter(|h| h.dialed == dialed && h.silent != silent) {
                        h.silent = silent;
                        if silent {
                            println!("tunnel {name}: node {node} is silent; attaching a replacement; {}/{k} attached", healthy(&held));
                        } else {
                            println!("tunnel {name}: node {node} answers again; {}/{k} attached", healthy(&held));
                        }
                    }
                }
                Update::Peers(nodes) => dialer.set_sample(nodes.iter().map(|p| p.addr).collect()),
                Update::Down(nodes) => {
                    for node in nodes {
                        if let Some(h) = held.get(&node) {
                            // Not dropped at once: a node restarted since, or
                            // declared dead while it still answers, keeps
                            // serving; the attachment task decides.
                            tracing::info!(%node, "the cluster declared an attached node dead");
                            h.handle.suspect.notify_one();
                        }
                    }
                }
                Update::Refused(why) => bail!("tunnel {name}: refused: {why}"),
            },
            // Backoffs expire without an update: look again.
            _ = tick.tick() => {}
        }
    }
}

/// What an attachment task needs.
struct Session {
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    names: Vec<String>,
    token: Option<String>,
    targets: Arc<HashMap<String, String>>,
    updates: mpsc::Sender<Update>,
    /// Stops or suspects this attachment.
    handle: Handle,
}

/// One attachment: connect, register, then carry visitors until it ends.
async fn attachment(session: Session, addr: SocketAddr) {
    let Session {
        endpoint,
        config,
        names,
        token,
        targets,
        updates,
        handle,
    } = session;
    let Handle { drop, suspect } = handle;
    let result = async {
        let conn = endpoint
            .connect_with(config, addr, crate::tls::CLIENT_SERVER_NAME)?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = ClientMsg::Hello {
            version: TUNNEL_PROTOCOL_VERSION,
            names,
            token,
        };
        write_msg(&mut send, &hello).await?;
        match read_frame::<NodeMsg>(&mut recv).await? {
            NodeMsg::Welcome { node, ingress } => Ok((conn, send, recv, node, ingress)),
            NodeMsg::Refused { code, name } => {
                let why = format!(
                    "{code}{}",
                    name.map(|n| format!(" ({n})")).unwrap_or_default()
                );
                // Only this node could not store the registration: try others.
                if code != RefuseCode::Unavailable {
                    let _ = updates.send(Update::Refused(why.clone())).await;
                }
                anyhow::bail!("refused: {why}")
            }
            NodeMsg::Peers { .. } | NodeMsg::Down { .. } => {
                anyhow::bail!("unexpected message before the welcome")
            }
        }
    };
    let attached = tokio::select! {
        () = drop.cancelled() => Err(anyhow::anyhow!("stopping")),
        r = result => r,
    };
    let (conn, mut send, mut recv, node, ingress) = match attached {
        Ok(x) => x,
        Err(err) => {
            let _ = updates
                .send(Update::Lost(addr, None, err.to_string()))
                .await;
            return;
        }
    };
    let _ = updates.send(Update::Attached(addr, node, ingress)).await;
    let _ = write_msg(&mut send, &ClientMsg::Peers).await;
    let mut refresh = tokio::time::interval(PEERS_REFRESH);
    refresh.tick().await;
    let mut check = tokio::time::interval(SILENCE_CHECK);
    let mut heard = (conn.stats().udp_rx.datagrams, Instant::now());
    let mut silent = false;
    let why = loop {
        tokio::select! {
            biased;
            () = drop.cancelled() => {
                conn.close(0u32.into(), b"attachment dropped");
                break "dropped".to_string();
            }
            stream = conn.accept_bi() => match stream {
                Ok((s, r)) => {
                    tokio::spawn(carry(s, r, targets.clone()));
                }
                Err(e) => break e.to_string(),
            },
            msg = read_frame::<NodeMsg>(&mut recv) => match msg {
                Ok(NodeMsg::Peers { nodes }) => {
                    let _ = updates.send(Update::Peers(nodes)).await;
                }
                Ok(NodeMsg::Down { nodes }) => {
                    let _ = updates.send(Update::Down(nodes)).await;
                    // Fresh members to choose replacements from.
                    let _ = write_msg(&mut send, &ClientMsg::Peers).await;
                }
                Ok(_) => {}
                Err(e) => break e.to_string(),
            },
            () = suspect.notified() => {
                // Count it silent now; any packet from here on clears it.
                heard = (conn.stats().udp_rx.datagrams, Instant::now());
                if !silent {
                    silent = true;
                    let _ = updates.send(Update::Silent(addr, node.id, true)).await;
                }
            }
            _ = check.tick() => {
                let received = conn.stats().udp_rx.datagrams;
                if received != heard.0 {
                    heard = (received, Instant::now());
                    if silent {
                        silent = false;
                        let _ = updates.send(Update::Silent(addr, node.id, false)).await;
                    }
                } else if !silent && heard.1.elapsed() >= CLIENT_SILENCE {
                    silent = true;
                    let _ = updates.send(Update::Silent(addr, node.id, true)).await;
                }
            }
            _ = refresh.tick() => {
                let _ = write_msg(&mut send, &ClientMsg::Peers).await;
            }
        }
    };
    let _ = updates.send(Update::Lost(addr, Some(node), why)).await;
}

/// Carries one visitor: reads the header, dials the target, splices.
async fn carry(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    targets: Arc<HashMap<String, String>>,
) {
    let visit =
        match tokio::time::timeout(VISIT_HEADER_TIMEOUT, read_frame::<Visit>(&mut recv)).await {
            Ok(Ok(v)) => v,
            _ => return,
        };
    let Some(target) = targets.get(&visit.name) else {
        tracing::warn!(tunnel = %visit.name, "visit for a tunnel this client does not serve");
        let _ = crate::rpc::write_frame(&mut send, &VisitReply::TargetRefused).await;
        return;
    };
    // Answer well inside the node's wait for `Ready`, so a target that drops
    // connection attempts is reported as refused instead of making the node
    // give up on this whole attachment.
    let connecting = tokio::time::timeout(
        TARGET_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(target.as_str()),
    );
    let mut local = match connecting
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(tunnel = %visit.name, visitor = %visit.visitor, %target, %err, "target refused the visitor");
            let _ = crate::rpc::write_frame(&mut send, &VisitReply::TargetRefused).await;
            return;
        }
    };
    if write_msg(&mut send, &VisitReply::Ready).await.is_err() {
        return;
    }
    let _ = local.set_nodelay(true);
    let mut stream = tokio::io::join(&mut recv, &mut send);
    if let Err(err) = specter_tunnel::splice::splice(&mut stream, &mut local).await {
        tracing::debug!(tunnel = %visit.name, %err, "visitor stream ended with an error");
    }
}
