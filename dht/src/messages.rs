//! DHT RPC messages and their framing: one request and one response per QUIC
//! bi-stream, each a frame of `[u32 length][u8 version][MessagePack body]`.

use serde::{Deserialize, Serialize};

use crate::record::Record;
use crate::ring::{Key, Peer};
use crate::store::{Item, WriteError, WriteOp};

/// Version byte of every DHT frame.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest frame accepted. A replication batch of a few thousand records fits;
/// anything larger is refused before it is read, so a peer cannot make a node
/// buffer without bound.
pub const MAX_FRAME_SIZE: usize = 1 << 20;

/// Length of the frame header (length + version).
pub const FRAME_HEADER: usize = 5;

/// A request from one node to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Read the record for a name. With `any_replica`, a replica answers from
    /// its copy even if it does not own the key (the owner looked unreachable).
    Get {
        /// `key_of(name)`.
        key: Key,
        /// The name.
        name: String,
        /// Accept an answer from a replica.
        any_replica: bool,
    },
    /// Apply a write at the key's owner. With `any_replica`, a replica
    /// coordinates it (the owner looked unreachable); records merge, so the
    /// owner picks it up later.
    Write {
        /// `key_of(name)`.
        key: Key,
        /// The name.
        name: String,
        /// The change.
        op: WriteOp,
        /// Accept coordination by a replica.
        any_replica: bool,
    },
    /// Merge these copies (replication, hand-off).
    Replicate {
        /// The records.
        items: Vec<Item>,
    },
    /// Anti-entropy: the sender's digests of the records it owns, in one
    /// part of its range (a node owning many records sends several).
    Sync {
        /// `(key, digest)` pairs.
        digests: Vec<(Key, u64)>,
        /// The part of the sender's range these digests cover, `(after,
        /// upto]` clockwise: the responder sends back the records of this
        /// part that were not listed. `None`: the sender's whole range, in
        /// one request. Left out of the encoding when `None`, so such a
        /// request reads the same to a node from before parts existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        within: Option<(Key, Key)>,
    },
    /// Stabilize: tell me your predecessor and successors.
    Neighbours,
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The record (or its absence) from the owner or a replica.
    Found {
        /// The record, if the name is registered.
        item: Option<Item>,
    },
    /// Ask this node instead.
    Redirect {
        /// The node that owns the key in the responder's view.
        to: Peer,
    },
    /// The write was applied at the owner and forwarded to the live replicas.
    Written {
        /// The record after the write.
        record: Record,
    },
    /// Replicated items merged.
    Ack,
    /// Anti-entropy answer: records that differ, and keys the sender should send.
    SyncReply {
        /// The responder's copies of keys whose digest differed or that the
        /// sender lacked.
        items: Vec<Item>,
        /// Keys the responder lacks or holds differently.
        want: Vec<Key>,
    },
    /// Stabilize answer.
    Neighbours {
        /// The responder's predecessor.
        predecessor: Peer,
        /// The responder's successor list.
        successors: Vec<Peer>,
    },
    /// The request was refused.
    Error(ErrorCode),
}

/// Typed reasons for a refusal (never free text on the wire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ErrorCode {
    /// The write conflicts with the record (see [`WriteError`]).
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The request did not decode.
    #[error("malformed request")]
    Malformed,
    /// The frame exceeds [`MAX_FRAME_SIZE`].
    #[error("frame too large")]
    TooLarge,
    /// The frame's version is not [`PROTOCOL_VERSION`].
    #[error("unsupported protocol version")]
    Version,
    /// The responder is shutting down or overloaded.
    #[error("unavailable")]
    Unavailable,
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The declared length exceeds [`MAX_FRAME_SIZE`].
    #[error("frame of {0} bytes exceeds the maximum")]
    TooLarge(usize),
    /// Wrong version byte.
    #[error("unsupported frame version {0}")]
    Version(u8),
    /// Shorter than its header says, or a body that does not decode.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl From<&FrameError> for ErrorCode {
    fn from(e: &FrameError) -> Self {
        match e {
            FrameError::TooLarge(_) => ErrorCode::TooLarge,
            FrameError::Version(_) => ErrorCode::Version,
            FrameError::Malformed(_) => ErrorCode::Malformed,
        }
    }
}

/// Encodes a message as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = rmp_serde::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = body.len() + 1;
    if len > MAX_FRAME_SIZE {
        return Err(FrameError::TooLarge(len));
    }
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge(len))?;
    let mut out = Vec::with_capacity(FRAME_HEADER + body.len());
    out.extend_from_slice(&len32.to_be_bytes());
    out.push(PROTOCOL_VERSION);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads the length field of a frame header; refuses oversized frames before
/// their body is read.
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = usize::try_from(u32::from_be_bytes(header))
        .map_err(|_| FrameError::TooLarge(usize::MAX))?;
    if len > MAX_FRAME_SIZE {
        return Err(FrameError::TooLarge(len));
    }
    if len == 0 {
        return Err(FrameError::Malformed("empty frame".into()));
    }
    Ok(len)
}

/// Decodes a frame body (the `len` bytes after the length field).
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    match body.split_first() {
        Some((&PROTOCOL_VERSION, rest)) => {
            rmp_serde::from_slice(rest).map_err(|e| FrameError::Malformed(e.to_string()))
        }
        Some((&v, _)) => Err(FrameError::Version(v)),
        None => Err(FrameError::Malformed("empty frame".into())),
    }
}

/// Decodes a whole frame held in memory (header included).
pub fn decode_frame<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<T, FrameError> {
    if frame.len() < 4 {
        return Err(FrameError::Malformed("short frame".into()));
    }
    let len = frame_len([frame[0], frame[1], frame[2], frame[3]])?;
    if frame.len() != 4 + len {
        return Err(FrameError::Malformed("length mismatch".into()));
    }
    decode(&frame[4..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ClientId;
    use proptest::prelude::*;
    use specter_gossip::NodeId;

    fn peer(n: u64) -> Peer {
        Peer {
            id: NodeId(n),
            addr: "127.0.0.1:7".parse().unwrap(),
        }
    }

    /// `Request::Sync` as nodes encoded it before requests came in parts.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum OldRequest {
        Sync { digests: Vec<(Key, u64)> },
    }

    #[test]
    fn a_sync_of_one_part_reads_the_same_to_nodes_before_parts_and_back() {
        let digests = vec![(7, 8), (9, 10)];
        let new = Request::Sync {
            digests: digests.clone(),
            within: None,
        };
        let old = OldRequest::Sync {
            digests: digests.clone(),
        };
        assert_eq!(
            rmp_serde::to_vec(&new).unwrap(),
            rmp_serde::to_vec(&old).unwrap()
        );
        let read: OldRequest = rmp_serde::from_slice(&rmp_serde::to_vec(&new).unwrap()).unwrap();
        assert_eq!(read, old);
        let read: Request = rmp_serde::from_slice(&rmp_serde::to_vec(&old).unwrap()).unwrap();
        assert_eq!(read, new);
    }

    proptest! {
        #[test]
        fn requests_round_trip(key: u64, name in "[a-z-]{0,30}", any_replica: bool, v: u64) {
            for req in [
                Request::Get { key, name: name.clone(), any_replica },
                Request::Write { key, name: name.clone(), op: WriteOp::Detach { client: ClientId([3; 32]), node: NodeId(v), version: v }, any_replica },
                Request::Sync { digests: vec![(key, v)], within: Some((v, key)) },
                Request::Sync { digests: vec![], within: None },
                Request::Neighbours,
            ] {
                let frame = encode(&req).unwrap();
                prop_assert_eq!(decode_frame::<Request>(&frame).unwrap(), req);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_frame::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
        }
    }

    #[test]
    fn a_small_frame_has_a_stable_layout() {
        let frame = encode(&Response::Ack).unwrap();
        assert_eq!(
            &frame[..5],
            &[
                0,
                0,
                0,
                u8::try_from(frame.len() - 4).unwrap(),
                PROTOCOL_VERSION
            ]
        );
        let redirect = encode(&Response::Redirect { to: peer(1) }).unwrap();
        assert_eq!(
            decode_frame::<Response>(&redirect).unwrap(),
            Response::Redirect { to: peer(1) }
        );
    }

    #[test]
    fn oversized_wrong_version_and_truncated_frames_are_refused() {
        assert!(matches!(
            frame_len(u32::MAX.to_be_bytes()),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            frame_len([0, 0, 0, 0]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Request>(&[9, 0x90]),
            Err(FrameError::Version(9))
        ));
        let mut frame = encode(&Request::Neighbours).unwrap();
        frame.pop();
        assert!(decode_frame::<Request>(&frame).is_err());
        assert_eq!(ErrorCode::from(&FrameError::Version(2)), ErrorCode::Version);
    }
}
