//! Node metadata spread as a foca custom broadcast: the node's public ingress
//! address and its load, versioned so newer values replace older ones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::identity::{NodeId, NodeIdentity};

/// First byte of an encoded [`NodeMeta`] broadcast.
const META_VERSION: u8 = 1;

/// Upper bound on metadata entries kept; one per node id, so it only binds if a
/// peer with a valid certificate forges broadcasts for made-up ids. Far above any
/// cluster this design targets (thousands of nodes).
pub const MAX_META_ENTRIES: usize = 16_384;

/// What a node tells the cluster about itself beyond its identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// The node this describes.
    pub id: NodeId,
    /// The identity generation it was published under.
    pub generation: u64,
    /// Increases with every change published by the same generation.
    pub seq: u64,
    /// Public ingress address (HTTPS), once the node serves one.
    pub ingress: Option<SocketAddr>,
    /// Relative load (0 = idle); room for load-aware attachment choices.
    pub load: u32,
}

impl NodeMeta {
    fn version(&self) -> (u64, u64) {
        (self.generation, self.seq)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![META_VERSION];
        // Encoding plain integers and an address into a Vec cannot fail.
        rmp_serde::encode::write(&mut out, self).expect("NodeMeta encodes");
        out
    }

    fn decode(data: &[u8]) -> Result<Self, MetaError> {
        match data.split_first() {
            Some((&META_VERSION, body)) => Ok(rmp_serde::from_slice(body)?),
            Some((&v, _)) => Err(MetaError::Version(Some(v))),
            None => Err(MetaError::Version(None)),
        }
    }
}

/// A metadata broadcast that could not be accepted; nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Empty, or a version this node does not speak.
    #[error("unsupported metadata version {0:?}")]
    Version(Option<u8>),
    /// The body is not a valid [`NodeMeta`].
    #[error("malformed metadata: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// Dissemination key: a newer `(generation, seq)` for the same node replaces an
/// older one still queued for sending.
#[derive(Debug, Clone, Copy)]
pub struct MetaKey {
    id: NodeId,
    version: (u64, u64),
}

impl foca::Invalidates for MetaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.id == other.id && self.version >= other.version
    }
}

/// The latest metadata seen per node. Shared between foca's broadcast handler and
/// the [`crate::Membership`] that owns it (foca keeps the handler private).
pub(crate) type MetaTable = Arc<Mutex<HashMap<NodeId, NodeMeta>>>;

pub(crate) fn lock(table: &MetaTable) -> std::sync::MutexGuard<'_, HashMap<NodeId, NodeMeta>> {
    // The table holds plain data; a panic elsewhere cannot leave it half-updated.
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// foca broadcast handler storing [`NodeMeta`] in a [`MetaTable`].
pub(crate) struct MetaHandler {
    pub(crate) table: MetaTable,
    /// This node: only it publishes metadata about itself.
    pub(crate) own: NodeId,
    /// Metadata about a node not in the table, refused because the table
    /// held [`MAX_META_ENTRIES`].
    pub(crate) refused: Arc<std::sync::atomic::AtomicU64>,
}

impl foca::BroadcastHandler<NodeIdentity> for MetaHandler {
    type Key = MetaKey;
    type Error = MetaError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeIdentity>,
    ) -> Result<Option<MetaKey>, MetaError> {
        let meta = NodeMeta::decode(data)?;
        // foca passes our own broadcasts with no sender; a relayed copy of
        // metadata about us is stale or forged.
        if meta.id == self.own && sender.is_some() {
            return Ok(None);
        }
        let key = MetaKey {
            id: meta.id,
            version: meta.version(),
        };
        let mut table = lock(&self.table);
        match table.get(&meta.id) {
            Some(known) if known.version() >= meta.version() => return Ok(None),
            None if table.len() >= MAX_META_ENTRIES => {
                self.refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(None);
            }
            _ => {}
        }
        table.insert(meta.id, meta);
        Ok(Some(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::BroadcastHandler;

    fn meta(id: u64, generation: u64, seq: u64) -> NodeMeta {
        NodeMeta {
            id: NodeId(id),
            generation,
            seq,
            ingress: Some("127.0.0.1:443".parse().unwrap()),
            load: 3,
        }
    }

    #[test]
    fn newer_metadata_replaces_older_and_stale_is_not_redisseminated() {
        let mut h = MetaHandler {
            table: Default::default(),
            own: NodeId(99),
            refused: Default::default(),
        };
        assert!(
            h.receive_item(&meta(1, 5, 2).encode(), None)
                .unwrap()
                .is_some()
        );
        assert!(
            h.receive_item(&meta(1, 5, 1).encode(), None)
                .unwrap()
                .is_none()
        );
        assert!(
            h.receive_item(&meta(1, 5, 2).encode(), None)
                .unwrap()
                .is_none()
        );
        assert!(
            h.receive_item(&meta(1, 6, 0).encode(), None)
                .unwrap()
                .is_some()
        );
        assert_eq!(lock(&h.table)[&NodeId(1)].generation, 6);
    }

    #[test]
    fn past_the_entry_bound_new_nodes_are_refused_and_counted_known_ones_updated() {
        let mut h = MetaHandler {
            table: Default::default(),
            own: NodeId(99),
            refused: Default::default(),
        };
        for id in 0..MAX_META_ENTRIES as u64 {
            lock(&h.table).insert(NodeId(id), meta(id, 1, 0));
        }
        let new = meta(MAX_META_ENTRIES as u64, 1, 0).encode();
        assert!(h.receive_item(&new, None).unwrap().is_none());
        assert_eq!(h.refused.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(lock(&h.table).len(), MAX_META_ENTRIES);
        // A node already known still gets its newer metadata.
        assert!(
            h.receive_item(&meta(5, 2, 0).encode(), None)
                .unwrap()
                .is_some()
        );
        assert_eq!(h.refused.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn malformed_metadata_is_an_error_and_stores_nothing() {
        let mut h = MetaHandler {
            table: Default::default(),
            own: NodeId(99),
            refused: Default::default(),
        };
        assert!(h.receive_item(&[], None).is_err());
        assert!(h.receive_item(&[7, 1, 2], None).is_err());
        assert!(h.receive_item(&[META_VERSION, 0xc1], None).is_err());
        assert!(lock(&h.table).is_empty());
    }
}
