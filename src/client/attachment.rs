//! One attachment: dial a node, send the hello, then carry the visitor
//! streams the node opens and follow its control messages (peer samples,
//! down notices, refusals) until the attachment ends or is dropped. Reports
//! every transition to the client loop as an [`Update`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::Endpoint;
use specter_dht::Peer;
use specter_gossip::NodeId;
use specter_tunnel::protocol::{ClientMsg, NodeMsg, RefuseCode, TUNNEL_PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::carry::carry;
use super::target::Target;
use crate::wire::{CLOSE_DETACHED, FrameReader, write_msg};

/// How often the peer sample is refreshed.
const PEERS_REFRESH: Duration = Duration::from_secs(30);

/// Reports from attachment tasks. Each carries the address that task dialed,
/// which can differ from the address the node advertises (a seed given by
/// host name, or behind NAT).
pub enum Update {
    Attached(SocketAddr, Peer, Option<specter_tunnel::protocol::Ingress>),
    /// The attachment ended (`Some(node)`) or never came up (`None`).
    Lost(SocketAddr, Option<Peer>, String),
    /// The node has been silent for [`CLIENT_SILENCE`] (`true`), or is heard
    /// again (`false`), on the attachment made through this address.
    Silent(SocketAddr, NodeId, bool),
    Peers(Vec<Peer>),
    /// Gossip (through one of our nodes) declared these nodes dead.
    Down(Vec<NodeId>),
    /// A node refused the client; `true` when the refusal is that node's
    /// alone (a token it wants), so other nodes may still take the client.
    Refused(String, bool),
}

/// How the client loop steers an attachment task.
#[derive(Clone, Default)]
pub struct Handle {
    /// Cancelled to drop the attachment.
    pub drop: CancellationToken,
    /// Notified when gossip declared the node dead: the task then counts it
    /// silent until it hears from the node again.
    pub suspect: Arc<tokio::sync::Notify>,
    /// Notified when the client has no node left to dial: the task asks its
    /// node for a fresh sample of members.
    pub refresh: Arc<tokio::sync::Notify>,
}

/// How often an attachment checks that its node is still heard.
pub const SILENCE_CHECK: Duration = Duration::from_millis(50);

/// An attachment whose node has sent nothing for this long (four missed
/// keep-alive answers, see [`crate::net::quic::CLIENT_KEEP_ALIVE`]) no longer
/// counts toward k: a replacement is attached at once, while the silent
/// connection is kept until QUIC's idle timeout decides. A node that was only
/// slow thus costs a spare attachment, never a dropped visitor.
pub const CLIENT_SILENCE: Duration = Duration::from_millis(400);

/// What an attachment task needs.
pub(super) struct Session {
    pub(super) endpoint: Endpoint,
    pub(super) config: quinn::ClientConfig,
    pub(super) names: Vec<String>,
    pub(super) token: Option<String>,
    pub(super) targets: Arc<HashMap<String, Target>>,
    pub(super) updates: mpsc::Sender<Update>,
    /// Stops or suspects this attachment.
    pub(super) handle: Handle,
}

/// One attachment: connect, register, then carry visitors until it ends.
pub(super) async fn attachment(session: Session, addr: SocketAddr) {
    let Session {
        endpoint,
        config,
        names,
        token,
        targets,
        updates,
        handle,
    } = session;
    let Handle {
        drop,
        suspect,
        refresh: ask_peers,
    } = handle;
    let result = async {
        let conn = endpoint
            .connect_with(config, addr, crate::net::tls::CLIENT_SERVER_NAME)?
            .await?;
        let (mut send, recv) = conn.open_bi().await?;
        let hello = ClientMsg::Hello {
            version: TUNNEL_PROTOCOL_VERSION,
            names,
            token,
        };
        write_msg(&mut send, &hello).await?;
        let mut control = FrameReader::new(recv);
        match control.next::<NodeMsg>().await? {
            NodeMsg::Welcome { node, ingress } => Ok((conn, send, control, node, ingress)),
            NodeMsg::Refused { code, name } => {
                let why = refusal(&code, name);
                // Only this node could not store the registration: try others.
                if code != RefuseCode::Unavailable {
                    // Only a token check differs from node to node; every
                    // other refusal (name taken or invalid, too many names,
                    // version) would come from all of them.
                    let node_local = code == RefuseCode::Unauthorized;
                    let _ = updates.send(Update::Refused(why.clone(), node_local)).await;
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
    let (conn, mut send, mut control, node, ingress) = match attached {
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
    let budget = crate::net::quic::StreamBudget::new(&conn, Default::default());
    let mut silent = false;
    let why = loop {
        tokio::select! {
            biased;
            () = drop.cancelled() => {
                // The client loop dropped it and has forgotten it already.
                conn.close(CLOSE_DETACHED, b"attachment dropped");
                return;
            }
            stream = conn.accept_bi() => match stream {
                Ok((s, r)) => {
                    let (held, targets) = (budget.opened(), targets.clone());
                    tokio::spawn(async move {
                        let _held = held;
                        carry(s, r, targets).await;
                    });
                }
                Err(e) => break e.to_string(),
            },
            // Cancel-safe: a frame split across packets survives the other
            // branches firing.
            msg = control.next::<NodeMsg>() => match msg {
                Ok(NodeMsg::Peers { nodes }) => {
                    let _ = updates.send(Update::Peers(nodes)).await;
                }
                Ok(NodeMsg::Down { nodes }) => {
                    let _ = updates.send(Update::Down(nodes)).await;
                    // Fresh members to choose replacements from.
                    let _ = write_msg(&mut send, &ClientMsg::Peers).await;
                }
                Ok(NodeMsg::Refused { code, name }) => {
                    // A name of ours is now claimed by another client.
                    let why = refusal(&code, name);
                    let _ = updates.send(Update::Refused(why.clone(), false)).await;
                    break why;
                }
                Ok(NodeMsg::Welcome { .. }) => {}
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
            () = ask_peers.notified() => {
                let _ = write_msg(&mut send, &ClientMsg::Peers).await;
            }
        }
    };
    let _ = updates.send(Update::Lost(addr, Some(node), why)).await;
}

fn refusal(code: &RefuseCode, name: Option<String>) -> String {
    format!(
        "{code}{}",
        name.map(|n| format!(" ({n})")).unwrap_or_default()
    )
}
