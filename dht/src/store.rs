//! The registration store held by one node: records by key, the write
//! operations an owner applies, and merges from other replicas.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use specter_gossip::NodeId;

use crate::record::{Attachment, Claim, ClientId, Record};
use crate::ring::{Key, key_of};

/// A record with the name it belongs to (keys are hashes; the name is kept to
/// detect collisions and for display).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// `key_of(name)`.
    pub key: Key,
    /// The tunnel name.
    pub name: String,
    /// The record.
    pub record: Record,
}

/// A change an owner applies to a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOp {
    /// Claim (or renew the claim on) the name for `client` and attach it at
    /// `node`: the lease runs `lease_ms`, the claim `claim_ms` past `now`.
    Attach {
        /// The client registering the name.
        client: ClientId,
        /// The node holding the client's connection.
        node: NodeId,
        /// That node's address.
        addr: SocketAddr,
        /// That node's counter for this entry.
        version: u64,
        /// Lease length.
        lease_ms: u64,
        /// How long the claim outlives the last renewal.
        claim_ms: u64,
    },
    /// The client left `node` (tombstone with `version`).
    Detach {
        /// The client.
        client: ClientId,
        /// The node it left.
        node: NodeId,
        /// That node's counter for this entry.
        version: u64,
    },
}

/// Why a write was refused. The store is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum WriteError {
    /// Another client holds a live claim on the name.
    #[error("name is claimed by another client ({0})")]
    NameTaken(ClientId),
    /// Two names hash to the same key (never expected with 64-bit keys).
    #[error("key collision with name {0:?}")]
    KeyCollision(String),
    /// `name` does not hash to `key`.
    #[error("key does not match the name")]
    KeyMismatch,
}

/// Records held by one node.
#[derive(Clone, Debug, Default)]
pub struct Store {
    items: BTreeMap<Key, Item>,
}

impl Store {
    /// The item under `key`.
    pub fn get(&self, key: Key) -> Option<&Item> {
        self.items.get(&key)
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True if no record is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Every item, by key.
    pub fn iter(&self) -> impl Iterator<Item = &Item> {
        self.items.values()
    }

    /// Applies a write as the key's owner; returns the resulting record.
    pub fn apply(
        &mut self,
        key: Key,
        name: &str,
        op: &WriteOp,
        now: u64,
    ) -> Result<Record, WriteError> {
        if key_of(name) != key {
            return Err(WriteError::KeyMismatch);
        }
        if let Some(existing) = self.items.get(&key)
            && existing.name != name
        {
            return Err(WriteError::KeyCollision(existing.name.clone()));
        }
        let mut record = self
            .items
            .get(&key)
            .map(|i| i.record.clone())
            .unwrap_or_default();
        match *op {
            WriteOp::Attach {
                client,
                node,
                addr,
                version,
                lease_ms,
                claim_ms,
            } => {
                let claim = match record.live_claim(now) {
                    Some(c) if c.owner != client => return Err(WriteError::NameTaken(c.owner)),
                    Some(c) => Claim {
                        expires_at: c.expires_at.max(now + claim_ms),
                        ..c
                    },
                    None => Claim {
                        owner: client,
                        version: record.claim.map_or(1, |c| c.version + 1),
                        claimed_at: now,
                        expires_at: now + claim_ms,
                    },
                };
                let mut update = Record {
                    claim: Some(claim),
                    ..Default::default()
                };
                update.attachments.insert(
                    node,
                    Attachment {
                        addr,
                        version,
                        lease_expiry: now + lease_ms,
                        detached: false,
                    },
                );
                record.merge(&update);
            }
            WriteOp::Detach {
                client,
                node,
                version,
            } => {
                if let Some(c) = record.live_claim(now)
                    && c.owner != client
                {
                    return Err(WriteError::NameTaken(c.owner));
                }
                if let Some(a) = record.attachments.get(&node).copied() {
                    let mut update = Record::default();
                    update.attachments.insert(
                        node,
                        Attachment {
                            version: version.max(a.version + 1),
                            detached: true,
                            ..a
                        },
                    );
                    record.merge(&update);
                }
            }
        }
        self.items.insert(
            key,
            Item {
                key,
                name: name.to_string(),
                record: record.clone(),
            },
        );
        Ok(record)
    }

    /// Merges a replica's copy; returns whether anything changed.
    pub fn merge(&mut self, item: &Item) -> bool {
        if key_of(&item.name) != item.key {
            return false;
        }
        match self.items.get_mut(&item.key) {
            Some(mine) if mine.name == item.name => mine.record.merge(&item.record),
            Some(_) => false,
            None => {
                self.items.insert(item.key, item.clone());
                true
            }
        }
    }

    /// Turns every live attachment at `node` into a tombstone (the node was
    /// declared dead); returns the keys that changed.
    pub fn drop_node(&mut self, node: NodeId, now: u64) -> Vec<Key> {
        let mut changed = Vec::new();
        for item in self.items.values_mut() {
            if let Some(a) = item.record.attachments.get_mut(&node)
                && a.is_live(now)
            {
                a.detached = true;
                a.version += 1;
                changed.push(item.key);
            }
        }
        changed
    }

    /// Removes lapsed leases and forgotten records.
    pub fn prune(&mut self, now: u64) {
        self.items.retain(|_, item| !item.record.prune(now));
    }

    /// Removes a record (handed off to its new holders).
    pub fn remove(&mut self, key: Key) -> Option<Item> {
        self.items.remove(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach(client: u8, node: u64, version: u64) -> WriteOp {
        WriteOp::Attach {
            client: ClientId([client; 32]),
            node: NodeId(node),
            addr: "127.0.0.1:1".parse().unwrap(),
            version,
            lease_ms: 30_000,
            claim_ms: 7 * 24 * 3_600_000,
        }
    }

    #[test]
    fn the_first_client_keeps_its_name_and_others_are_refused() {
        let mut s = Store::default();
        let name = "brave-orange-tiger";
        let key = key_of(name);
        let r = s.apply(key, name, &attach(1, 10, 1), 1_000).unwrap();
        assert_eq!(r.claim.unwrap().owner, ClientId([1; 32]));
        assert_eq!(
            s.apply(key, name, &attach(2, 11, 1), 2_000),
            Err(WriteError::NameTaken(ClientId([1; 32])))
        );
        // The owner attaches elsewhere too.
        let r = s.apply(key, name, &attach(1, 11, 1), 3_000).unwrap();
        assert_eq!(r.live_attachments(3_000).count(), 2);
        // After the claim expires, another client may take the name.
        let later = 1_000 + 7 * 24 * 3_600_000 + 10_000;
        let r = s.apply(key, name, &attach(2, 12, 1), later).unwrap();
        assert_eq!(r.claim.unwrap().owner, ClientId([2; 32]));
        assert_eq!(r.claim.unwrap().version, 2);
    }

    #[test]
    fn a_dead_nodes_attachments_become_tombstones() {
        let mut s = Store::default();
        let key = key_of("a");
        s.apply(key, "a", &attach(1, 10, 1), 0).unwrap();
        s.apply(key, "a", &attach(1, 11, 1), 0).unwrap();
        assert_eq!(s.drop_node(NodeId(10), 5), vec![key]);
        let r = &s.get(key).unwrap().record;
        let live: Vec<NodeId> = r.live_attachments(5).map(|(n, _)| n).collect();
        assert_eq!(live, vec![NodeId(11)]);
        assert!(
            s.apply(key, "b", &attach(1, 10, 1), 0).is_err(),
            "wrong key"
        );
    }
}
