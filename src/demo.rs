//! `specter demo`: a local overlay in one process, with a throwaway CA, on
//! loopback: three nodes with TLS ingress, a sample HTTP service, a tunnel
//! client attached to the nodes, and a visitor-side listener per node, so the
//! printed URLs go visitor → TLS ingress → tunnel → client → service. It also
//! prints ready-to-paste `curl --resolve --cacert` lines for HTTPS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use specter_gossip::GossipConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::client::{ClientOptions, Scheme, Target, run as run_client};
use crate::clock::generation_now;
use crate::ingress::Edge;
use crate::ingress::tcp::{Visitor, connect_listener};
use crate::net::bind_endpoint;
use crate::net::tls::NodeTls;
use crate::node::tunnels::ClientAuth;
use crate::node::{Https, Node, NodeOptions, Sockets};
use crate::pki::{CaPem, make_ca, make_edge_cert, make_node_cert};

/// How long the demo waits for its nodes and client before giving up.
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// The public domain of the demo's tunnels.
pub const DEMO_DOMAIN: &str = "demo.specter.test";

/// Starts a node on 127.0.0.1 (a port chosen by the OS) with a certificate
/// from `ca`, joining through `seed` if given, serving QUIC only. Used by the
/// benchmarks and the tests.
pub fn start_loopback_node(
    ca: &CaPem,
    name: &str,
    seed: Option<SocketAddr>,
    rng_seed: u64,
) -> Result<Node> {
    start_on_loopback(ca, name, seed, rng_seed, None)
}

/// Like [`start_loopback_node`], plus an admin API and, with `edge`, a TLS
/// ingress, each on a port chosen by the OS (see [`Node::addresses`]).
pub fn start_on_loopback(
    ca: &CaPem,
    name: &str,
    seed: Option<SocketAddr>,
    rng_seed: u64,
    edge: Option<Arc<Edge>>,
) -> Result<Node> {
    let pem = make_node_cert(ca, name, &["127.0.0.1".parse()?])?;
    let tls = NodeTls::from_pem(&ca.cert, &pem.cert, &pem.key)?;
    let endpoint = bind_endpoint("127.0.0.1:0".parse()?)?;
    let advertise = endpoint.local_addr()?;
    let listener = || -> Result<tokio::net::TcpListener> {
        let std = std::net::TcpListener::bind("127.0.0.1:0")?;
        std.set_nonblocking(true)?;
        Ok(tokio::net::TcpListener::from_std(std)?)
    };
    let mut sockets = Sockets::quic_only(endpoint);
    if let Some(edge) = edge {
        sockets.admin = Some(listener()?);
        sockets.https = Some(Https {
            listener: listener()?,
            edge,
        });
    }
    Ok(Node::start(
        sockets,
        &tls,
        NodeOptions {
            advertise,
            seeds: seed.iter().map(ToString::to_string).collect(),
            gossip: GossipConfig::default(),
            generation: generation_now(),
            rng_seed,
            client_auth: ClientAuth::Open,
            ingress: crate::ingress::limits::IngressLimits::default(),
            clients: crate::node::tunnels::quota::ClientLimits::default(),
        },
    )?)
}

/// A running demo.
pub struct Demo {
    /// The nodes; the first is the seed.
    pub nodes: Vec<Node>,
    /// Admin API address of each node.
    pub admin: Vec<SocketAddr>,
    /// Public TLS ingress of each node.
    pub ingress: Vec<SocketAddr>,
    /// Visitor-side listener through each node's ingress.
    pub urls: Vec<SocketAddr>,
    /// The tunnel's name.
    pub name: String,
    /// Files the demo wrote (CA certificate, client state).
    pub dir: PathBuf,
    cancel: CancellationToken,
}

/// A tiny HTTP service standing in for the user's application.
async fn sample_service(listener: tokio::net::TcpListener, cancel: CancellationToken) {
    let mut served = 0u64;
    loop {
        let (mut conn, _) = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        served += 1;
        let n = served;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8 * 1024];
            let mut len = 0;
            while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
                match conn.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => len += k,
                }
            }
            let body = format!("Hello from behind the tunnel! (request {n})\n");
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

impl Demo {
    /// Starts `n` nodes, the service, the client and the visitor listeners.
    pub async fn start(n: usize) -> Result<Demo> {
        let dir = std::env::temp_dir().join(format!("specter-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = make_ca("Specter demo CA")?;
        std::fs::write(dir.join("ca.crt"), &ca.cert)?;
        let edge_pem = make_edge_cert(&ca, DEMO_DOMAIN)?;
        std::fs::write(dir.join("edge.crt"), &edge_pem.cert)?;
        crate::pki::write_file(&dir.join("edge.key"), &edge_pem.key, true, true)?;
        let edge = Arc::new(Edge::load(
            DEMO_DOMAIN,
            &dir.join("edge.crt"),
            &dir.join("edge.key"),
        )?);
        let cancel = CancellationToken::new();
        let (mut nodes, mut admins, mut ingress) = (Vec::new(), Vec::new(), Vec::new());
        let mut seed: Option<SocketAddr> = None;
        for i in 0..n {
            let node = start_on_loopback(
                &ca,
                &format!("node{i}.demo.invalid"),
                seed,
                rand::random(),
                Some(edge.clone()),
            )?;
            let a = node.addresses();
            seed.get_or_insert(a.advertise);
            admins.extend(a.admin);
            ingress.extend(a.https);
            nodes.push(node);
        }
        let service = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let target = service.local_addr()?.to_string();
        tokio::spawn(sample_service(service, cancel.clone()));
        let name = specter_tunnel::names::random_name(&mut rand::rng());
        let options = ClientOptions {
            via: vec![seed.context("no nodes")?.to_string()],
            ca_pem: ca.cert.clone(),
            state_dir: dir.join("client"),
            target: Target {
                addr: target,
                scheme: Scheme::Http,
            },
            name: Some(name.clone()),
            attachments: n.min(crate::client::ATTACHMENTS),
            token: None,
            extra: Vec::new(),
            ready_file: None,
            grace_period: crate::client::GRACE_PERIOD,
        };
        let endpoint = bind_endpoint("127.0.0.1:0".parse()?)?;
        let client_stop = cancel.clone();
        tokio::spawn(async move {
            if let Err(err) = run_client(options, endpoint, client_stop).await {
                eprintln!("demo client: {err:#}");
            }
        });
        let ca_pem = ca.cert.clone().into_bytes();
        let host = format!("{name}.{DEMO_DOMAIN}");
        let mut urls = Vec::new();
        for public in &ingress {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            urls.push(listener.local_addr()?);
            let visitor = Arc::new(Visitor::new(&public.to_string(), &host, &ca_pem)?);
            tokio::spawn(connect_listener(listener, visitor, cancel.clone()));
        }
        Ok(Demo {
            nodes,
            admin: admins,
            ingress,
            urls,
            name,
            dir,
            cancel,
        })
    }

    /// Waits until every node sees every other one and the tunnel is attached
    /// to as many nodes as it wants; false on timeout.
    pub async fn ready(&self, deadline: Duration) -> bool {
        let start = Instant::now();
        let want = self.nodes.len().min(crate::client::ATTACHMENTS);
        while start.elapsed() < deadline {
            let ring = self
                .nodes
                .iter()
                .all(|n| n.status().dht.ring_size == self.nodes.len());
            let attached = self
                .nodes
                .iter()
                .filter(|n| {
                    n.tunnels()
                        .attached_names()
                        .iter()
                        .any(|(t, _)| *t == self.name)
                })
                .count();
            if ring && attached >= want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Stops everything; nodes leave gracefully, all at once (one by one,
    /// the last would find itself alone and warn about it).
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let leaving: Vec<_> = self
            .nodes
            .into_iter()
            .map(|node| tokio::spawn(node.shutdown()))
            .collect();
        for node in leaving {
            let _ = node.await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the demo until Ctrl-C.
pub async fn run(n: usize) -> Result<()> {
    anyhow::ensure!(n >= 1, "--nodes must be at least 1");
    let demo = Demo::start(n).await?;
    let ready = demo.ready(READY_DEADLINE).await;
    println!();
    println!("Specter demo: {n} nodes on loopback, a sample HTTP service, and a tunnel client.");
    for ((node, admin), public) in demo.nodes.iter().zip(&demo.admin).zip(&demo.ingress) {
        let s = node.status();
        println!(
            "  node {}  quic {}  ingress {}  status page http://{admin}/",
            s.id, s.addr, public
        );
    }
    if !ready {
        println!("Warning: the overlay was not ready within {READY_DEADLINE:?}; see the logs.");
    }
    println!();
    let state = if ready {
        "is attached"
    } else {
        "is still attaching"
    };
    println!(
        "Tunnel {}.{DEMO_DOMAIN} {state}. Visit it through any node:",
        demo.name
    );
    for (url, public) in demo.urls.iter().zip(&demo.ingress) {
        println!("  # through the ingress at {public}");
        println!("  curl http://{url}/");
    }
    println!();
    println!("Or over HTTPS straight to a node's ingress (HTTP/1.1 or HTTP/2):");
    for public in &demo.ingress {
        println!(
            "  curl --cacert {ca} --resolve {name}.{DEMO_DOMAIN}:{port}:127.0.0.1 https://{name}.{DEMO_DOMAIN}:{port}/",
            ca = demo.dir.join("ca.crt").display(),
            name = demo.name,
            port = public.port()
        );
    }
    println!();
    println!(
        "Each http:// URL above is a local `specter connect` listener: TLS to a node's ingress"
    );
    println!(
        "(SNI {}.{DEMO_DOMAIN}, ALPN specter-tcp), then QUIC through the overlay to the client.",
        demo.name
    );
    println!("The same from another terminal, then visit it:");
    // The running binary's path, so the line works without `specter` on
    // PATH (e.g. after `cargo run`).
    let me = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "specter".into());
    println!(
        "  {me} connect {}.{DEMO_DOMAIN} --via {} --ca {} --listen 127.0.0.1:8080 &",
        demo.name,
        demo.ingress[0],
        demo.dir.join("ca.crt").display()
    );
    println!("  curl http://127.0.0.1:8080/");
    println!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    println!("Stopping…");
    demo.shutdown().await;
    Ok(())
}
