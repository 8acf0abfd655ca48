//! The client daemon (`specter tunnel`): keeps a key and a name in its state
//! directory, attaches to `k` distinct nodes, and carries each visitor stream
//! a node opens to the local target.
//!
//! - this module: options, state, and the loop that keeps k healthy
//!   attachments (with the pure [`Dialer`] choosing whom to dial);
//! - [`attachment`]: one attachment's task;
//! - [`carry`]: one visitor.

mod attachment;
mod carry;
mod target;

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
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::attachment::{CLIENT_SILENCE, DETACH_DRAIN};
use self::attachment::{Handle, SILENCE_CHECK, Session, Update, attachment};
pub use self::target::{Scheme, Target};

/// Worker threads of the client's runtime unless `--workers` (`workers` in
/// `client.toml`) or `TOKIO_WORKER_THREADS` says otherwise. A client runs
/// beside the service it exposes, on a machine it shares, and each visitor
/// it carries is a short pipeline (QUIC stream to target socket and back):
/// a second worker mostly adds wake-ups across threads. One worker carried
/// the tunnel benchmark's single stream 2.37 / 2.25 Gbit/s against 1.91 /
/// 1.78 with one per core (direct path, 2 cores, two alternated pairs on
/// 2026-11-28; the client's CPU per GiB 2.18 / 2.14 s against 2.78 / 2.91),
/// forwarded 1.36 / 1.34 against 1.20 / 1.13, and HTTPS at 64 visitors
/// 19,815 / 20,570 req/s against 14,693 / 18,618 (the client's CPU per
/// request 20 µs against 30 / 26). One core of this machine carries over
/// 2 Gbit/s through the client; a client with more traffic than that and
/// cores to spare can raise it.
pub const WORKERS: usize = 1;

/// Attachments a client keeps (k): two nodes can fail at once and the tunnel
/// still has a path.
pub const ATTACHMENTS: usize = 3;
/// Backoff of one node's address after it failed, from this (jittered,
/// doubling per failure)...
const RETRY_MIN: Duration = Duration::from_millis(200);
/// ...up to this, forever: a client whose network is gone comes back within
/// this long of its return.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// More than k healthy attachments (a silent node that answers again after
/// its replacement came up) are kept this long, then the newest beyond k are
/// detached (the visitors they carry finish first, see [`DETACH_DRAIN`]):
/// long enough that a node flapping in and out of silence does not cost a
/// detach and a re-attach each time, short enough that nodes do not carry
/// unneeded attachments for long.
pub const SPARE_GRACE: Duration = Duration::from_secs(10);
/// A stopping client (the first SIGTERM or Ctrl-C) detaches everywhere and
/// waits this long at most for the visitors under way to finish, so that a
/// restart or an upgrade cuts none that ends within it; then it closes what
/// is left. A second signal stops it at once. The default of
/// `--grace-period` (`grace_period` in `client.toml`); as cloudflared's,
/// and under systemd's default stop timeout (90 s); Docker's default (10 s)
/// kills it sooner unless `--stop-timeout` says otherwise.
pub const GRACE_PERIOD: Duration = Duration::from_secs(30);
/// With fewer than k healthy attachments and no node left to dial, the
/// healthy ones ask their nodes for fresh members at most this often (the
/// sample may predate nodes that joined since).
const PEERS_ASK_EVERY: Duration = Duration::from_secs(1);
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
    /// Local service visitors are carried to.
    pub target: Target,
    /// Requested name; otherwise the saved one, or a new random one.
    pub name: Option<String>,
    /// How many nodes to attach to.
    pub attachments: usize,
    /// Client token, for nodes that require one.
    pub token: Option<String>,
    /// More tunnels served by the same client: `(name, target)`.
    pub extra: Vec<(String, Target)>,
    /// Written (JSON: names, public URLs, attachments) on every change.
    pub ready_file: Option<PathBuf>,
    /// How long a stopping client lets visitors under way finish (see
    /// [`GRACE_PERIOD`]).
    pub grace_period: Duration,
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
    crate::files::check_private(&key_path).map_err(anyhow::Error::msg)?;
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
    Ok(crate::net::tls::client_quic_config(
        &options.ca_pem,
        CertificateDer::from(cert.der().to_vec()),
        key_der,
    )?)
}

/// Decides when spare attachments are detached (see [`SPARE_GRACE`]).
#[derive(Debug, Default)]
struct Spares {
    /// Since when more than k attachments have been healthy.
    over_since: Option<Instant>,
}

impl Spares {
    /// Given the healthy attachments (node, attached at) and k, the nodes
    /// to detach now: none until more than k have been healthy for
    /// [`SPARE_GRACE`], then the newest beyond k.
    fn trim(&mut self, now: Instant, healthy: &[(NodeId, Instant)], k: usize) -> Vec<NodeId> {
        if healthy.len() <= k {
            self.over_since = None;
            return Vec::new();
        }
        let since = *self.over_since.get_or_insert(now);
        if now.saturating_duration_since(since) < SPARE_GRACE {
            return Vec::new();
        }
        self.over_since = None;
        let mut newest_first = healthy.to_vec();
        newest_first.sort_by_key(|&(id, at)| (std::cmp::Reverse(at), id));
        newest_first
            .into_iter()
            .take(healthy.len() - k)
            .map(|(id, _)| id)
            .collect()
    }
}

/// An attachment the client holds.
struct Held {
    peer: Peer,
    dialed: SocketAddr,
    /// When it was attached.
    since: Instant,
    /// Silent for a while: it does not count toward k until heard again.
    silent: bool,
    handle: Handle,
}

/// What the ready file says: written on every change, so scripts and tests
/// can wait for a state instead of reading the human output.
#[derive(serde::Serialize)]
struct Ready<'a> {
    /// Tunnel names served.
    names: &'a [String],
    /// Each tunnel's public URL (or `specter connect` command), once a node
    /// with an ingress said where it serves.
    public: &'a std::collections::BTreeMap<String, String>,
    /// The attachments held.
    attachments: Vec<ReadyAttachment>,
    /// Attachments that count toward k (not silent).
    healthy: usize,
    /// The k asked for.
    k: usize,
    pid: u32,
}

#[derive(serde::Serialize)]
struct ReadyAttachment {
    node: String,
    addr: SocketAddr,
    silent: bool,
}

fn write_ready(
    path: &Path,
    names: &[String],
    public: &std::collections::BTreeMap<String, String>,
    held: &HashMap<NodeId, Held>,
    k: usize,
) {
    let mut attachments: Vec<ReadyAttachment> = held
        .values()
        .map(|h| ReadyAttachment {
            node: h.peer.id.to_string(),
            addr: h.peer.addr,
            silent: h.silent,
        })
        .collect();
    attachments.sort_by(|a, b| a.node.cmp(&b.node));
    let ready = Ready {
        names,
        public,
        healthy: attachments.iter().filter(|a| !a.silent).count(),
        attachments,
        k,
        pid: std::process::id(),
    };
    let json = serde_json::to_string(&ready).unwrap_or_default();
    if let Err(err) = crate::files::write_atomically(path, &json) {
        tracing::warn!("{err:#}");
    }
}

/// How long a refused client waits for its other attachments to close
/// before it exits: each closes at once when dropped.
const REFUSED_CLOSE: Duration = Duration::from_secs(1);

/// Runs the client until `stop` fires (then it closes its attachments at
/// once) or a node refuses it.
pub async fn run(
    options: ClientOptions,
    endpoint: Endpoint,
    stop: CancellationToken,
) -> Result<()> {
    run_until(options, endpoint, stop.clone(), stop).await
}

/// Runs the client until `stop` fires or a node refuses it. Stopping, it
/// detaches from every node and lets the visitors under way finish, for at
/// most `options.grace_period` (default [`GRACE_PERIOD`]) or until `now`
/// fires.
pub async fn run_until(
    options: ClientOptions,
    endpoint: Endpoint,
    stop: CancellationToken,
    now: CancellationToken,
) -> Result<()> {
    let state = load_state(&options.state_dir, options.name.as_deref())?;
    let config = client_config(&options, &state)?;
    let mut targets: HashMap<String, Target> = HashMap::new();
    targets.insert(state.name.clone(), options.target.clone());
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
            "tunnel {n}: attaching to {} node(s) for {}://{}",
            options.attachments,
            match t.scheme {
                Scheme::Tcp => "tcp",
                Scheme::Http => "http",
            },
            t.addr
        );
    }
    let name = names.join(",");
    let k = options.attachments;
    let mut public = std::collections::BTreeMap::new();
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
    let mut spares = Spares::default();
    let mut asked_peers: Option<Instant> = None;
    let mut tasks = tokio::task::JoinSet::new();
    // Drops every attachment at once, spares still detaching included.
    let hard = now.child_token();
    loop {
        while tasks.try_join_next().is_some() {}
        // Top up to k healthy attachments from whatever is not backing off.
        while healthy(&held) + pending.len() < k {
            let busy: HashSet<SocketAddr> = held
                .values()
                .flat_map(|h| [h.peer.addr, h.dialed])
                .chain(pending.keys().copied())
                .collect();
            let Some(addr) = dialer.next(Instant::now(), &busy, &mut rand::rng()) else {
                if asked_peers.is_none_or(|at| at.elapsed() >= PEERS_ASK_EVERY) {
                    asked_peers = Some(Instant::now());
                    for h in held.values().filter(|h| !h.silent) {
                        h.handle.refresh.notify_one();
                    }
                }
                break;
            };
            let handle = Handle {
                drop: hard.child_token(),
                detach: CancellationToken::new(),
                suspect: Arc::default(),
                refresh: Arc::default(),
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
            tasks.spawn(attachment(session, addr));
        }
        let changed = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(update) = rx.recv() => match update {
                Update::Attached(dialed, peer, ingress) => {
                    if let Some(ingress) = ingress.filter(|_| public.is_empty()) {
                        for n in &names {
                            let url = targets[n].public(n, &ingress);
                            println!("tunnel {n}: {url}");
                            public.insert(n.clone(), url);
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
                    held.insert(peer.id, Held { peer, dialed, since: Instant::now(), silent: false, handle });
                    println!("tunnel {name}: attached to node {} at {} ({}/{k})", peer.id, peer.addr, healthy(&held));
                    true
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
                            true
                        }
                        _ => {
                            tracing::info!(addr = %dialed, %why, "attach attempt failed");
                            false
                        }
                    }
                }
                Update::Silent(dialed, node, silent) => {
                    match held.get_mut(&node).filter(|h| h.dialed == dialed && h.silent != silent) {
                        Some(h) => {
                            h.silent = silent;
                            if silent {
                                println!("tunnel {name}: node {node} is silent; attaching a replacement; {}/{k} attached", healthy(&held));
                            } else {
                                println!("tunnel {name}: node {node} answers again; {}/{k} attached", healthy(&held));
                            }
                            true
                        }
                        None => false,
                    }
                }
                Update::Peers(nodes) => {
                    dialer.set_sample(nodes.iter().map(|p| p.addr).collect());
                    false
                }
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
                    false
                }
                // One node refusing a hello (say, the only one that wants a
                // token) does not end a client that is served elsewhere: it
                // is backed off like a node that failed. Refused everywhere,
                // or a name taken mid-session, it exits with the reason.
                Update::Refused(why, true) if healthy(&held) > 0 || pending.len() > 1 => {
                    println!("tunnel {name}: a node refused it ({why}); serving through the others");
                    false
                }
                Update::Refused(why, _) => {
                    // Every attachment closes as dropped (`CLOSE_DETACHED`),
                    // so its node logs a detach, not a bare close.
                    hard.cancel();
                    let ended = async { while tasks.join_next().await.is_some() {} };
                    let _ = tokio::time::timeout(REFUSED_CLOSE, ended).await;
                    bail!("tunnel {name}: refused: {why}")
                }
            },
            // Backoffs expire without an update: look again.
            _ = tick.tick() => false,
        };
        let healthy_now: Vec<(NodeId, Instant)> = held
            .values()
            .filter(|h| !h.silent)
            .map(|h| (h.peer.id, h.since))
            .collect();
        let trimmed = spares.trim(Instant::now(), &healthy_now, k);
        for node in &trimmed {
            if let Some(h) = held.remove(node) {
                // Its visitors finish first: this node still serves them.
                h.handle.detach.cancel();
                println!(
                    "tunnel {name}: detaching spare node {node} (its visitors finish first); {}/{k} attached",
                    healthy(&held)
                );
            }
        }
        let changed = changed || !trimmed.is_empty();
        if changed && let Some(path) = &options.ready_file {
            write_ready(path, &names, &public, &held, k);
        }
    }
    if now.is_cancelled() {
        // Each closes its connection as it ends.
        tasks.detach_all();
        return Ok(());
    }
    // Stopping: no node sends a new visitor, and those under way finish.
    println!(
        "tunnel {name}: stopping; visitors under way finish first (at most {} s; signal again to stop now)",
        options.grace_period.as_secs()
    );
    for h in held.values() {
        h.handle.detach.cancel();
    }
    for h in pending.values() {
        h.drop.cancel();
    }
    let deadline = tokio::time::sleep(options.grace_period);
    tokio::pin!(deadline);
    let mut cut = false;
    loop {
        tokio::select! {
            biased;
            () = now.cancelled(), if !cut => cut = true,
            () = &mut deadline, if !cut => {
                println!("tunnel {name}: grace period over; stopping now");
                cut = true;
            }
            joined = tasks.join_next() => if joined.is_none() {
                return Ok(());
            },
            // Read, so that no attachment waits on a full channel.
            Some(_) = rx.recv() => {}
        }
        if cut {
            hard.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spares_are_detached_newest_first_once_more_than_k_stayed_healthy() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (a, b, c, d) = (NodeId(1), NodeId(2), NodeId(3), NodeId(4));
        let mut spares = Spares::default();
        let three = [(a, at(0)), (b, at(1)), (c, at(5))];
        // k healthy: nothing to do.
        assert!(spares.trim(at(6), &three, 3).is_empty());
        // A fourth (the replacement for a node that was silent and is back).
        let four = [(a, at(0)), (b, at(1)), (c, at(5)), (d, at(7))];
        assert!(spares.trim(at(7), &four, 3).is_empty());
        assert!(spares.trim(at(7) + SPARE_GRACE / 2, &four, 3).is_empty());
        // Back to k for a moment restarts the wait.
        assert!(spares.trim(at(12), &three, 3).is_empty());
        assert!(spares.trim(at(13), &four, 3).is_empty());
        assert!(spares.trim(at(13) + SPARE_GRACE / 2, &four, 3).is_empty());
        assert_eq!(spares.trim(at(13) + SPARE_GRACE, &four, 3), vec![d]);
        // Two over k: the two newest go.
        let mut spares = Spares::default();
        assert!(spares.trim(at(20), &four, 2).is_empty());
        assert_eq!(spares.trim(at(20) + SPARE_GRACE, &four, 2), vec![d, c]);
    }
}
