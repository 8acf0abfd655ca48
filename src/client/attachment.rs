//! One attachment: dial a node, send the hello, then carry the visitor
//! streams the node opens and follow its control messages (peer samples,
//! down notices, refusals) until the attachment ends or is dropped. Reports
//! every transition to the client loop as an [`Update`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::Endpoint;
use specter_dht::Peer;
use specter_gossip::NodeId;
use specter_tunnel::protocol::{ClientMsg, NodeMsg, RefuseCode, TUNNEL_PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::carry::carry;
use super::target::Target;
use crate::net::liveness::{Heard, Hearing};
use crate::net::quic::StreamBudget;
use crate::wire::{CLOSE_DETACH_CUT, CLOSE_DETACHED, FrameReader, write_msg};

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
    /// Cancelled to drop the attachment at once.
    pub drop: CancellationToken,
    /// Cancelled to detach it without cutting a visitor: the node is told
    /// to send no new one ([`ClientMsg::Detach`]), and the connection
    /// closes once the streams still open have ended, or at
    /// [`DETACH_DRAIN`].
    pub detach: CancellationToken,
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

/// Longest a detaching attachment waits for its open visitor streams to
/// end before it closes them: long enough for a download or an answer
/// in flight (the HTTP ingress gives a target 100 s to begin one), and for
/// the nodes' pooled HTTP upstreams through it to retire (see
/// `ingress::upstream::Upstreams::take_routed`); a tunnel stream open longer than
/// this (a shell, a WebSocket) is cut, as it would be by a node's restart.
pub const DETACH_DRAIN: Duration = Duration::from_secs(180);

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
        detach,
        suspect,
        refresh: ask_peers,
    } = handle;
    let label = names.join(",");
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
    let hearing = || Hearing::new(&conn, SILENCE_CHECK, CLIENT_SILENCE);
    let mut heard = hearing();
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
            () = detach.cancelled() => {
                // Forgotten by the client loop too, but its visitors finish.
                // (A node too slow to take even this is dropped at the
                // second signal.)
                tokio::select! {
                    biased;
                    () = drop.cancelled() => {}
                    _ = write_msg(&mut send, &ClientMsg::Detach) => {}
                }
                match drain(&conn, control, &budget, &targets, &drop).await {
                    Some(0) => println!("tunnel {label}: node {} detached; its visitors were done", node.id),
                    Some(n) => println!("tunnel {label}: node {} detached; {n} visitor stream(s) still open were cut", node.id),
                    None => {}
                }
                return;
            }
            stream = conn.accept_bi() => match stream {
                Ok((s, r)) => carry_counted(s, r, &budget, &targets),
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
                heard = hearing();
                if !silent {
                    silent = true;
                    let _ = updates.send(Update::Silent(addr, node.id, true)).await;
                }
            }
            _ = check.tick() => {
                // Quiet counts only while this process could run (see
                // `Hearing`): a client that was stalled reads its nodes'
                // packets before it judges them.
                match heard.hear(&conn) {
                    Heard::Again if silent => {
                        silent = false;
                        let _ = updates.send(Update::Silent(addr, node.id, false)).await;
                    }
                    Heard::Silent if !silent => {
                        silent = true;
                        let _ = updates.send(Update::Silent(addr, node.id, true)).await;
                    }
                    _ => {}
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

/// Carries a stream the node opened, counted in `budget` until it ends.
fn carry_counted(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    budget: &Arc<StreamBudget>,
    targets: &Arc<HashMap<String, Target>>,
) {
    let (held, targets) = (budget.opened(), targets.clone());
    tokio::spawn(async move {
        let _held = held;
        carry(send, recv, targets).await;
    });
}

/// A detaching attachment, after its `Detach`: carries what the node still
/// opens until the node has ended the control stream (it sends no new
/// visitor after that), then waits for the open streams to end, and
/// closes. At [`DETACH_DRAIN`], or when `drop` fires, it closes whatever
/// is left, with [`CLOSE_DETACH_CUT`] if that is a visitor stream, so the
/// node counts the cut. The streams it closed, or `None` when the node
/// closed first.
async fn drain(
    conn: &quinn::Connection,
    mut control: FrameReader,
    budget: &Arc<StreamBudget>,
    targets: &Arc<HashMap<String, Target>>,
    drop: &CancellationToken,
) -> Option<u32> {
    let deadline = tokio::time::sleep(DETACH_DRAIN);
    tokio::pin!(deadline);
    let mut check = tokio::time::interval(SILENCE_CHECK);
    // Two checks in a row must find no stream open, not two ticks owed
    // since the drain began.
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut told = false;
    // Empty at two checks in a row after the node's end: a stream the node
    // opened just before it is in flight for a moment.
    let mut empty = 0;
    loop {
        tokio::select! {
            biased;
            () = drop.cancelled() => break,
            () = &mut deadline => break,
            _ = conn.closed() => return None,
            stream = conn.accept_bi() => match stream {
                Ok((s, r)) => carry_counted(s, r, budget, targets),
                Err(_) => return None,
            },
            // The node may still send a message or two before its end.
            msg = control.next::<NodeMsg>(), if !told => {
                told = msg.is_err();
                if told {
                    check.reset();
                }
            }
            _ = check.tick(), if told => {
                empty = if budget.open() == 0 { empty + 1 } else { 0 };
                if empty >= 2 {
                    break;
                }
            }
        }
    }
    let left = budget.open();
    if left == 0 {
        conn.close(CLOSE_DETACHED, b"attachment detached");
    } else {
        conn.close(CLOSE_DETACH_CUT, b"detach cut its visitor streams");
    }
    Some(left)
}

fn refusal(code: &RefuseCode, name: Option<String>) -> String {
    format!(
        "{code}{}",
        name.map(|n| format!(" ({n})")).unwrap_or_default()
    )
}
