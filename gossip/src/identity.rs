//! Who a member is: the cert-derived [`NodeId`] plus how to reach it and which
//! run of the process this is.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A node's position on the 2^64 ring and its cluster-wide name.
///
/// It is the first 8 bytes (big-endian) of the SHA-256 of the node certificate's
/// SubjectPublicKeyInfo, so only the holder of the key can prove it; the transport
/// derives it from the certificate a QUIC connection authenticated.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl NodeId {
    /// Derives the id from a SHA-256 digest of a public key (only the first 8 bytes are used).
    pub fn from_digest(digest: &[u8; 32]) -> Self {
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        NodeId(u64::from_be_bytes(first))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The identity foca gossips about: `{node_id, advertise_addr, generation}`.
///
/// `generation` distinguishes runs of the same node. A restarted node picks a
/// generation greater than any it used before (the binary uses the start time in
/// milliseconds), so its new identity wins foca's address conflict against the stale
/// one and it is up again at once instead of waiting for the old one to be forgotten.
/// When a live node learns it was declared down, foca renews it to `generation + 1`.
///
/// foca keeps its own per-identity `incarnation` counter for refuting suspicion; that
/// one is reported next to the generation in the live view.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// Cert-derived id (the foca "address": at most one live identity per id).
    pub id: NodeId,
    /// Where other nodes dial this node's QUIC endpoint.
    pub addr: SocketAddr,
    /// Which run of the node this is; higher wins.
    pub generation: u64,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.id, self.addr, self.generation)
    }
}

impl foca::Identity for NodeIdentity {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(NodeIdentity {
            generation: self.generation.wrapping_add(1),
            ..*self
        })
    }

    fn addr(&self) -> NodeId {
        self.id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    #[test]
    fn renewed_identity_wins_the_conflict_with_its_predecessor() {
        let old = NodeIdentity {
            id: NodeId(7),
            addr: "127.0.0.1:1".parse().unwrap(),
            generation: 41,
        };
        let new = old.renew().unwrap();
        assert_eq!(new.addr(), old.addr());
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
    }

    #[test]
    fn node_id_is_the_big_endian_prefix_of_the_digest() {
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(NodeId::from_digest(&d), NodeId(0x0102030405060708));
        assert_eq!(NodeId(0xab).to_string(), "00000000000000ab");
    }
}
