//! The gossip wire format: foca headers and member updates as MessagePack.
//!
//! Every packet starts with [`WIRE_VERSION`] so a future format can be told apart
//! (and refused cleanly) instead of being misparsed.

use bytes::{Buf, BufMut};
use foca::{Header, Member};

use crate::identity::NodeIdentity;

/// First byte of every foca packet (version 1 of the gossip format).
pub const WIRE_VERSION: u8 = 1;

/// First byte of a push-pull state-sync packet (see [`SyncChunk`]).
pub const SYNC_TAG: u8 = 2;

/// Part of a member list sent in a push-pull state sync: SWIM spreads each
/// update a bounded number of times, so a newcomer or a member that missed
/// updates under loss pulls a full list from a random member, the way
/// memberlist's push-pull does. A list larger than one packet is split.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncChunk {
    /// The sender wants the receiver's list in return.
    pub reply_wanted: bool,
    /// Members as the sender knows them.
    pub members: Vec<Member<NodeIdentity>>,
    /// More chunks of the same list follow (a receiver waiting for the whole
    /// list, such as a node that just joined, waits for the last).
    pub more: bool,
}

impl SyncChunk {
    /// Encodes the chunk with its tag byte.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![SYNC_TAG];
        // Plain data into a Vec: cannot fail.
        rmp_serde::encode::write(&mut out, self).expect("SyncChunk encodes");
        out
    }

    /// Decodes a packet that starts with [`SYNC_TAG`].
    pub fn decode(packet: &[u8]) -> Result<Self, CodecError> {
        match packet.split_first() {
            Some((&SYNC_TAG, body)) => Ok(rmp_serde::from_slice(body)?),
            Some((&v, _)) => Err(CodecError::Version(Some(v))),
            None => Err(CodecError::Version(None)),
        }
    }

    /// Splits `members` into chunks whose encoding fits in `max_packet` bytes.
    pub fn split(
        members: &[Member<NodeIdentity>],
        reply_wanted: bool,
        max_packet: usize,
    ) -> Vec<Vec<u8>> {
        let mut chunks: Vec<SyncChunk> = Vec::new();
        let mut chunk = SyncChunk {
            reply_wanted,
            members: Vec::new(),
            // Sized as a middle chunk: the flag does not change the length.
            more: true,
        };
        for m in members {
            chunk.members.push(m.clone());
            if chunk.encode().len() > max_packet {
                let last = chunk.members.pop().expect("just pushed");
                if !chunk.members.is_empty() {
                    chunks.push(chunk.clone());
                }
                chunk.members = vec![last];
            }
        }
        if !chunk.members.is_empty() || chunks.is_empty() {
            chunks.push(chunk);
        }
        if let Some(last) = chunks.last_mut() {
            last.more = false;
        }
        chunks.iter().map(SyncChunk::encode).collect()
    }
}

/// Why a gossip packet could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The packet is empty or starts with a version this node does not speak.
    #[error("unsupported gossip wire version {0:?}")]
    Version(Option<u8>),
    /// The MessagePack body did not decode into the expected type.
    #[error("malformed gossip packet: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// Encoding failed (only possible for a bug in the types).
    #[error("could not encode gossip item: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The item does not fit in what is left of the packet; nothing was written.
    #[error("gossip item does not fit in the packet")]
    NoSpace,
}

/// foca codec using rmp-serde, stateless apart from a scratch buffer.
#[derive(Debug, Default)]
pub struct MsgpackCodec {
    scratch: Vec<u8>,
}

impl MsgpackCodec {
    fn put_scratch(&mut self, mut buf: impl BufMut) -> Result<(), CodecError> {
        if buf.remaining_mut() < self.scratch.len() {
            return Err(CodecError::NoSpace);
        }
        buf.put_slice(&self.scratch);
        Ok(())
    }
}

/// Decodes just the header of a gossip packet (used to authenticate the sender
/// before foca sees the packet).
pub fn peek_header(packet: &[u8]) -> Result<Header<NodeIdentity>, CodecError> {
    let mut buf = packet;
    foca::Codec::decode_header(&mut MsgpackCodec::default(), &mut buf)
}

impl foca::Codec<NodeIdentity> for MsgpackCodec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &Header<NodeIdentity>,
        buf: impl BufMut,
    ) -> Result<(), CodecError> {
        self.scratch.clear();
        self.scratch.push(WIRE_VERSION);
        rmp_serde::encode::write(&mut self.scratch, header)?;
        self.put_scratch(buf)
    }

    fn decode_header(&mut self, mut buf: impl Buf) -> Result<Header<NodeIdentity>, CodecError> {
        if !buf.has_remaining() {
            return Err(CodecError::Version(None));
        }
        let version = buf.get_u8();
        if version != WIRE_VERSION {
            return Err(CodecError::Version(Some(version)));
        }
        Ok(rmp_serde::decode::from_read(buf.reader())?)
    }

    fn encode_member(
        &mut self,
        member: &Member<NodeIdentity>,
        buf: impl BufMut,
    ) -> Result<(), CodecError> {
        self.scratch.clear();
        rmp_serde::encode::write(&mut self.scratch, member)?;
        self.put_scratch(buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<NodeIdentity>, CodecError> {
        Ok(rmp_serde::decode::from_read(buf.reader())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeId;
    use foca::{Codec, Message, State};

    fn ident(n: u64) -> NodeIdentity {
        NodeIdentity {
            id: NodeId(n),
            addr: format!("127.0.0.{}:4000", n % 200 + 1).parse().unwrap(),
            generation: n.wrapping_mul(3),
        }
    }

    #[test]
    fn header_and_members_round_trip_back_to_back() {
        let mut c = MsgpackCodec::default();
        let header = Header {
            src: ident(1),
            src_incarnation: 9,
            dst: ident(2),
            message: Message::Ping(77),
        };
        let m1 = Member::new(ident(3), 4, State::Suspect);
        let m2 = Member::new(ident(u64::MAX), 0, State::Down);
        let mut out = Vec::new();
        c.encode_header(&header, &mut out).unwrap();
        c.encode_member(&m1, &mut out).unwrap();
        c.encode_member(&m2, &mut out).unwrap();
        assert_eq!(out[0], WIRE_VERSION);

        let mut rd = &out[..];
        assert_eq!(c.decode_header(&mut rd).unwrap(), header);
        assert_eq!(c.decode_member(&mut rd).unwrap(), m1);
        assert_eq!(c.decode_member(&mut rd).unwrap(), m2);
        assert!(rd.is_empty());
    }

    #[test]
    fn an_item_that_does_not_fit_leaves_the_buffer_untouched() {
        let mut c = MsgpackCodec::default();
        let mut backing = [0u8; 8];
        let mut buf = &mut backing[..];
        let m = Member::new(ident(3), 4, State::Alive);
        assert!(matches!(
            c.encode_member(&m, &mut buf),
            Err(CodecError::NoSpace)
        ));
        assert_eq!(backing, [0u8; 8]);
    }

    #[test]
    fn a_large_member_list_splits_into_packets_that_fit() {
        let members: Vec<_> = (0..300)
            .map(|n| Member::new(ident(n), 1, State::Alive))
            .collect();
        let packets = SyncChunk::split(&members, true, 1_100);
        assert!(packets.len() > 1);
        let mut back = Vec::new();
        for (i, p) in packets.iter().enumerate() {
            assert!(p.len() <= 1_100);
            let c = SyncChunk::decode(p).unwrap();
            assert!(c.reply_wanted);
            // Only the last chunk says the list is whole.
            assert_eq!(c.more, i + 1 < packets.len());
            back.extend(c.members);
        }
        assert_eq!(back, members);
        let empty = SyncChunk::split(&[], false, 1_100);
        assert_eq!(empty.len(), 1);
        assert!(!SyncChunk::decode(&empty[0]).unwrap().more);
    }

    #[test]
    fn garbage_and_foreign_versions_are_refused() {
        assert!(matches!(peek_header(&[]), Err(CodecError::Version(None))));
        assert!(matches!(
            peek_header(&[9, 1, 2]),
            Err(CodecError::Version(Some(9)))
        ));
        assert!(matches!(
            peek_header(&[WIRE_VERSION, 0xc1, 0xff]),
            Err(CodecError::Decode(_))
        ));
    }
}
