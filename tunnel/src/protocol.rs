//! The client↔node tunnel protocol, and the headers of the streams that carry
//! visitors. Frames use the DHT's framing (`[u32 length][u8 version][MessagePack]`,
//! bounded by `MAX_FRAME_SIZE`).
//!
//! - A client opens one **control stream** on each node connection: it sends
//!   [`ClientMsg::Hello`] with the names it serves; the node answers
//!   [`NodeMsg::Welcome`] (the names are registered and attached here) or
//!   [`NodeMsg::Refused`] with a typed [`RefuseCode`]. Later the client may ask
//!   for [`ClientMsg::Peers`]; the node pushes [`NodeMsg::Down`] whenever
//!   gossip declares nodes dead, so the client drops attachments to them
//!   without waiting for its own timeouts. A client that no longer needs
//!   an attachment sends [`ClientMsg::Detach`] and waits for the end of the
//!   control stream and of the visitor streams still open before closing.
//! - For each visitor the node opens a bi-stream to the client and writes a
//!   [`Visit`] header, which may carry the visitor's first bytes
//!   ([`Visit::early`]) so they need not wait for the client's answer; raw
//!   bytes follow both ways once the client answered [`VisitReply::Ready`].
//! - Between nodes, a forwarded visitor's stream (after its kind byte, see
//!   the node's `wire` module) carries the same [`Visit`] header to the
//!   attached node, then raw bytes.

use std::net::SocketAddr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use specter_dht::Peer;

pub use specter_dht::messages::{
    FrameError, MAX_FRAME_SIZE, decode, decode_frame, encode, frame_len,
};

/// Version the client and node must share. [`Visit::early`] is negotiated
/// apart, by the connection's ALPN (`specter-client/2`, `specter-node/2`),
/// so clients and nodes of either release work together: a header without
/// early bytes encodes exactly as before they existed.
pub const TUNNEL_PROTOCOL_VERSION: u16 = 1;

/// Most visitor bytes a [`Visit`] header carries ahead of `Ready`: a whole
/// request head as the HTTP ingress accepts it (64 KiB), so a request
/// without a body reaches the target in the header's flight. A node keeps
/// them until `Ready` to send them again on the next path, so this is also
/// what one opening visit holds. Sent only to a peer whose connection
/// negotiated them; others get the same bytes right after `Ready`.
pub const MAX_EARLY_DATA: usize = 64 * 1024;

/// ALPN a visitor uses for raw TCP over TLS.
pub const ALPN_TCP: &[u8] = b"specter-tcp";

/// ALPN a visitor uses to ask only whether a tunnel name is registered: the
/// node answers with the same alerts as for [`ALPN_TCP`], or completes the
/// handshake and closes, without opening a stream to the tunnel's client
/// (whose target would see a connection nobody uses).
pub const ALPN_CHECK: &[u8] = b"specter-check";

/// Client → node on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// Register and attach these names here.
    Hello {
        /// Must equal [`TUNNEL_PROTOCOL_VERSION`].
        version: u16,
        /// Tunnel names served by this client.
        names: Vec<String>,
        /// A client token from `specter ca issue-client-token`, if required.
        token: Option<String>,
    },
    /// Ask for a sample of live nodes to attach to.
    Peers,
    /// Send no new visitor over this connection: the node takes it off
    /// the client's names as if it had closed, then finishes its side of
    /// the control stream. Streams already open run to their end; the
    /// client closes the connection once they have (see the client's
    /// drain deadline), so detaching an attachment it no longer needs cuts
    /// no visitor. A node that predates this message reads it as a
    /// malformed one and ends the session the same way.
    Detach,
}

/// Node → client on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeMsg {
    /// The names are registered and attached at this node.
    Welcome {
        /// This node's id and address.
        node: Peer,
        /// The node's public ingress, if it serves one: visitors reach a
        /// tunnel at `https://<name>.<domain>[:port]/`.
        ingress: Option<Ingress>,
    },
    /// The hello was refused; nothing was registered.
    Refused {
        /// Why.
        code: RefuseCode,
        /// The name concerned, if one.
        name: Option<String>,
    },
    /// A random sample of live nodes.
    Peers {
        /// Nodes (id and QUIC address).
        nodes: Vec<Peer>,
    },
    /// Gossip declared these nodes dead.
    Down {
        /// Their ids.
        nodes: Vec<specter_gossip::NodeId>,
    },
}

/// Where a node serves visitors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ingress {
    /// Tunnels are `<name>.<domain>`.
    pub domain: String,
    /// The HTTPS port.
    pub https_port: u16,
}

impl Ingress {
    /// The public URL of tunnel `name`.
    pub fn url(&self, name: &str) -> String {
        if self.https_port == 443 {
            format!("https://{name}.{}/", self.domain)
        } else {
            format!("https://{name}.{}:{}/", self.domain, self.https_port)
        }
    }
}

/// Typed reasons for refusing a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RefuseCode {
    /// Another client holds the name.
    #[error("the name is claimed by another client")]
    NameTaken,
    /// The name is not a valid DNS label.
    #[error("invalid tunnel name")]
    InvalidName,
    /// No names, or too many.
    #[error("a hello must carry 1 to {max} names")]
    NameCount {
        /// The limit.
        max: usize,
    },
    /// The node requires a valid client token.
    #[error("a valid client token is required")]
    Unauthorized,
    /// The client speaks another protocol version.
    #[error("unsupported protocol version")]
    Version,
    /// The registration could not be stored (DHT unreachable).
    #[error("the registration could not be stored; try another node")]
    Unavailable,
    /// The key would hold more names at the node than its quota.
    #[error("this client key may hold at most {max} names at a node")]
    TooManyNames {
        /// The node's quota.
        max: usize,
    },
    /// The key registered its quota of new names at the node this minute.
    #[error(
        "this client key registered {per_minute} new names at this node in the last minute; wait and retry"
    )]
    TooManyNewNames {
        /// The node's quota.
        per_minute: usize,
    },
}

/// What kind of visitor a stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VisitKind {
    /// Raw TCP (TCP over TLS through `specter connect`).
    Tcp,
    /// HTTP/1.1 requests from the node's HTTP(S) ingress.
    Http,
}

/// Header of a stream that carries one visitor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visit {
    /// The tunnel name.
    pub name: String,
    /// The visitor's address, as the entry node saw it.
    pub visitor: SocketAddr,
    /// What the stream carries.
    pub kind: VisitKind,
    /// The visitor's first bytes (at most [`MAX_EARLY_DATA`]), for the
    /// client to write to the target as soon as it connected, before its
    /// `Ready` comes back. Only bytes that may reach the target twice are
    /// sent early (an idempotent request without a body): a path that fails
    /// before `Ready` is replaced by the next one with the same header, and
    /// a slow one raced against it.
    #[serde(default, skip_serializing_if = "Bytes::is_empty")]
    pub early: Bytes,
}

impl Visit {
    /// Whether the header is well formed: early bytes within bounds.
    pub fn check(&self) -> Result<(), String> {
        if self.early.len() > MAX_EARLY_DATA {
            return Err(format!(
                "{} early bytes, more than {MAX_EARLY_DATA}",
                self.early.len()
            ));
        }
        Ok(())
    }
}

/// The client's answer to a [`Visit`] header, sent once it tried the target.
/// The node only starts carrying the visitor's bytes (past the header's early
/// ones) after `Ready`, so a dead attachment (no answer) costs latency, never
/// an error: the node tries the next one with the same header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VisitReply {
    /// Connected to the target; raw bytes follow.
    Ready,
    /// The target refused the connection.
    TargetRefused,
}

/// Names one client may serve over one connection.
pub const MAX_NAMES_PER_CLIENT: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use specter_gossip::NodeId;

    #[test]
    fn a_detach_is_a_clear_error_to_a_node_that_predates_it() {
        /// The client messages before `Detach` existed.
        #[derive(Debug, PartialEq, Deserialize)]
        enum Before {
            Hello {
                version: u16,
                names: Vec<String>,
                token: Option<String>,
            },
            Peers,
        }
        let detach = encode(&ClientMsg::Detach).unwrap();
        assert_eq!(
            decode_frame::<ClientMsg>(&detach).unwrap(),
            ClientMsg::Detach
        );
        assert!(decode_frame::<Before>(&detach).is_err());
        // The older messages still read the same both ways.
        let peers = encode(&ClientMsg::Peers).unwrap();
        assert_eq!(decode_frame::<Before>(&peers).unwrap(), Before::Peers);
        let hello = ClientMsg::Hello {
            version: TUNNEL_PROTOCOL_VERSION,
            names: vec!["a".into()],
            token: Some("t".into()),
        };
        assert_eq!(
            decode_frame::<Before>(&encode(&hello).unwrap()).unwrap(),
            Before::Hello {
                version: TUNNEL_PROTOCOL_VERSION,
                names: vec!["a".into()],
                token: Some("t".into()),
            }
        );
    }

    #[test]
    fn messages_round_trip_through_frames() {
        let hello = ClientMsg::Hello {
            version: TUNNEL_PROTOCOL_VERSION,
            names: vec!["brave-orange-tiger".into()],
            token: None,
        };
        assert_eq!(
            decode_frame::<ClientMsg>(&encode(&hello).unwrap()).unwrap(),
            hello
        );
        let refused = NodeMsg::Refused {
            code: RefuseCode::NameTaken,
            name: Some("x".into()),
        };
        assert_eq!(
            decode_frame::<NodeMsg>(&encode(&refused).unwrap()).unwrap(),
            refused
        );
        let welcome = NodeMsg::Welcome {
            node: Peer {
                id: NodeId(7),
                addr: "127.0.0.1:1".parse().unwrap(),
            },
            ingress: Some(Ingress {
                domain: "example.net".into(),
                https_port: 8443,
            }),
        };
        let NodeMsg::Welcome {
            ingress: Some(i), ..
        } = &welcome
        else {
            unreachable!()
        };
        assert_eq!(i.url("a"), "https://a.example.net:8443/");
        assert_eq!(
            decode_frame::<NodeMsg>(&encode(&welcome).unwrap()).unwrap(),
            welcome
        );
        let visit = Visit {
            name: "a".into(),
            visitor: "127.0.0.9:5555".parse().unwrap(),
            kind: VisitKind::Tcp,
            early: Bytes::new(),
        };
        assert_eq!(
            decode_frame::<Visit>(&encode(&visit).unwrap()).unwrap(),
            visit
        );
        let early = Visit {
            kind: VisitKind::Http,
            early: Bytes::from_static(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"),
            ..visit.clone()
        };
        let frame = encode(&early).unwrap();
        assert_eq!(decode_frame::<Visit>(&frame).unwrap(), early);
        assert!(early.check().is_ok());
        // Without early bytes the header is as short as before they existed.
        assert!(encode(&visit).unwrap().len() < frame.len() - early.early.len());
        let flood = Visit {
            early: Bytes::from(vec![b'x'; MAX_EARLY_DATA + 1]),
            ..visit.clone()
        };
        assert!(flood.check().is_err());
        assert!(decode_frame::<Visit>(&[0, 0, 0, 2, 1, 0xc1]).is_err());
    }
}
