//! `specter demo`: a local overlay in one process, with a throwaway CA, on
//! loopback. The zero-setup way to see the cluster form.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use specter_gossip::GossipConfig;
use tokio_util::sync::CancellationToken;

use crate::node::{Node, NodeOptions};
use crate::pki::{CaPem, make_ca, make_node_cert};
use crate::tls::NodeTls;
use crate::{admin, bind_endpoint, generation_now};

/// How long the demo waits for its nodes to see each other before printing.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(15);

/// Starts a node on 127.0.0.1 (a port chosen by the OS) with a certificate
/// from `ca`, joining through `seed` if given. Used by the demo, the
/// benchmarks and the tests.
pub fn start_loopback_node(
    ca: &CaPem,
    name: &str,
    seed: Option<SocketAddr>,
    rng_seed: u64,
) -> Result<Node> {
    let pem = make_node_cert(ca, name, &["127.0.0.1".parse()?])?;
    let tls = NodeTls::from_pem(&ca.cert, &pem.cert, &pem.key)?;
    let endpoint = bind_endpoint("127.0.0.1:0".parse()?)?;
    let advertise = endpoint.local_addr()?;
    Ok(Node::start(
        endpoint,
        &tls,
        NodeOptions {
            advertise,
            seeds: seed.iter().map(ToString::to_string).collect(),
            gossip: GossipConfig::default(),
            generation: generation_now(),
            rng_seed,
        },
    )?)
}

/// A running demo overlay.
pub struct Demo {
    /// The nodes, first one is the seed.
    pub nodes: Vec<Node>,
    /// Admin API address of each node.
    pub admin: Vec<SocketAddr>,
    cancel: CancellationToken,
}

impl Demo {
    /// Starts `n` nodes on 127.0.0.1 (ports chosen by the OS); all join the first.
    pub async fn start(n: usize) -> Result<Demo> {
        let ca = make_ca("Specter demo CA")?;
        let cancel = CancellationToken::new();
        let mut nodes = Vec::new();
        let mut admins = Vec::new();
        let mut seed: Option<SocketAddr> = None;
        for i in 0..n {
            let node =
                start_loopback_node(&ca, &format!("node{i}.demo.invalid"), seed, rand::random())?;
            let advertise = node.status().addr;
            seed.get_or_insert(advertise);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .context("binding the admin API")?;
            admins.push(listener.local_addr()?);
            tokio::spawn(admin::serve(listener, node.shared(), cancel.clone()));
            nodes.push(node);
        }
        Ok(Demo {
            nodes,
            admin: admins,
            cancel,
        })
    }

    /// Waits until every node sees every other one alive; false on timeout.
    pub async fn converge(&self, deadline: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < deadline {
            let all = self.nodes.iter().all(|n| {
                n.status()
                    .members
                    .iter()
                    .filter(|m| m.state == specter_gossip::MemberState::Alive)
                    .count()
                    == self.nodes.len() - 1
            });
            if all {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Stops every node gracefully.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for node in self.nodes {
            node.shutdown().await;
        }
    }
}

/// Runs the demo until Ctrl-C.
pub async fn run(n: usize) -> Result<()> {
    anyhow::ensure!(n >= 1, "--nodes must be at least 1");
    let demo = Demo::start(n).await?;
    let converged = demo.converge(CONVERGE_DEADLINE).await;
    println!();
    println!("Specter demo: {n} nodes on loopback, one cluster CA made for this run.");
    for (node, admin) in demo.nodes.iter().zip(&demo.admin) {
        let s = node.status();
        println!(
            "  node {}  quic {}  status http://{admin}/status",
            s.id, s.addr
        );
    }
    if converged {
        println!("All nodes see each other alive (SWIM over QUIC datagrams).");
    } else {
        println!("Warning: nodes did not converge within {CONVERGE_DEADLINE:?}; see the logs.");
    }
    println!();
    println!("See the membership from any node:");
    println!("  curl -s http://{}/status", demo.admin[0]);
    println!("Tunnels (client daemon and public ingress) are not part of this build yet.");
    println!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    println!("Stopping…");
    demo.shutdown().await;
    Ok(())
}
