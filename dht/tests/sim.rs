//! Deterministic simulations of the DHT: 100 nodes, 1,000 records written
//! through random nodes, crashes, churn and a partition.

use std::net::SocketAddr;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use specter_dht::sim::{DhtSim, DhtSimConfig};
use specter_dht::{ClientId, DhtConfig, Outcome, WriteOp, key_of};
use specter_gossip::NodeId;

const NODES: usize = 100;
const RECORDS: usize = 1_000;
const LEASE_MS: u64 = 30_000;
const CLAIM_MS: u64 = 7 * 24 * 3_600_000;

fn name(i: usize) -> String {
    format!("name-{i:04}")
}

fn attach(client: u8, node: u64) -> WriteOp {
    WriteOp::Attach {
        client: ClientId([client; 32]),
        node: NodeId(node),
        addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
        version: 1,
        lease_ms: LEASE_MS,
        claim_ms: CLAIM_MS,
    }
}

fn running(sim: &DhtSim, rng: &mut StdRng) -> usize {
    loop {
        let i = rng.random_range(0..sim.len());
        if sim.is_running(i) {
            return i;
        }
    }
}

/// Writes every record through random nodes; returns the names acknowledged.
fn write_all(sim: &mut DhtSim, rng: &mut StdRng, names: &[String], seed: u64) -> Vec<String> {
    let mut ops = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let via = running(sim, rng);
        ops.push((n.clone(), sim.write(via, n, attach(1, i as u64))));
        sim.run_for(1);
    }
    assert!(
        sim.run_until_done(&ops.iter().map(|o| o.1).collect::<Vec<_>>(), 60_000),
        "seed {seed:#x}: writes did not finish"
    );
    ops.into_iter()
        .filter(|(_, op)| matches!(sim.result(*op), Some(Outcome::Wrote { .. })))
        .map(|(n, _)| n)
        .collect()
}

/// Reads `names` through `via` nodes; returns (found, hop counts).
fn read_all(sim: &mut DhtSim, via: &[usize], names: &[String]) -> (usize, Vec<u32>) {
    let mut ops = Vec::new();
    for &v in via {
        for n in names {
            ops.push((n.clone(), sim.get(v, n)));
        }
        sim.run_for(1);
    }
    let all: Vec<_> = ops.iter().map(|o| o.1).collect();
    sim.run_until_done(&all, 60_000);
    let mut found = 0;
    let mut hops = Vec::new();
    for (n, op) in ops {
        match sim.result(op) {
            Some(Outcome::Got {
                item: Some(item),
                hops: h,
            }) if item.name == n => {
                found += 1;
                hops.push(*h);
            }
            _ => {}
        }
    }
    (found, hops)
}

/// Every seventh running node reads every name and finds it.
fn assert_survivors_read_all(sim: &mut DhtSim, names: &[String], what: &str) {
    let survivors: Vec<usize> = (0..NODES)
        .filter(|&i| sim.is_running(i))
        .step_by(7)
        .collect();
    let (found, _) = read_all(sim, &survivors, names);
    assert_eq!(found, survivors.len() * names.len(), "{what}");
}

fn min_holders(sim: &DhtSim, names: &[String]) -> usize {
    names
        .iter()
        .map(|n| sim.holders(key_of(n)))
        .min()
        .unwrap_or(0)
}

#[test]
fn a_thousand_records_are_read_the_same_from_every_node_and_survive_two_crashes() {
    let seed = 0xd47_0001;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sim = DhtSim::new(NODES, DhtConfig::default(), DhtSimConfig::lan(seed));
    let names: Vec<String> = (0..RECORDS).map(name).collect();
    let acked = write_all(&mut sim, &mut rng, &names, seed);
    assert_eq!(
        acked.len(),
        RECORDS,
        "seed {seed:#x}: every write is acknowledged"
    );
    assert!(
        min_holders(&sim, &names) >= 3,
        "seed {seed:#x}: replication factor 3"
    );

    // Every node reads every key (100,000 lookups) and sees the same record.
    let everyone: Vec<usize> = (0..NODES).collect();
    let (found, hops) = read_all(&mut sim, &everyone, &names);
    assert_eq!(found, NODES * RECORDS, "seed {seed:#x}");
    assert!(
        hops.iter().all(|&h| h <= 1),
        "converged views answer in one hop"
    );
    let local = hops.iter().filter(|&&h| h == 0).count();
    println!(
        "converged reads: {} local, {} one hop",
        local,
        hops.len() - local
    );
    let (found, _) = read_all(&mut sim, &[0, 17, 42, 63, 99], &names);
    assert_eq!(found, 5 * RECORDS);

    // Crash two unrelated nodes at once, then two consecutive ones.
    let (a, b) = (33, 71);
    sim.crash(a);
    sim.crash(b);
    sim.membership_changed();
    sim.run_for(15_000);
    assert_survivors_read_all(
        &mut sim,
        &names,
        &format!("seed {seed:#x}: a record was lost"),
    );
    assert!(
        min_holders(&sim, &names) >= 3,
        "seed {seed:#x}: replication factor restored"
    );

    // Two consecutive nodes: an owner and its first replica.
    let victim = 10;
    let next = sim.index_of(sim.node(victim).unwrap().view().successors(1)[0].id);
    let owned = names
        .iter()
        .filter(|n| {
            sim.node(victim).unwrap().view().owns(key_of(n))
                || sim.node(next).unwrap().view().owns(key_of(n))
        })
        .count();
    assert!(owned > 0, "the crashed nodes own some of the records");
    println!("crashing two consecutive nodes that own {owned} records");
    sim.crash(victim);
    sim.crash(next);
    // Before membership catches up, reads still succeed through survivors.
    assert_survivors_read_all(
        &mut sim,
        &names,
        &format!("seed {seed:#x}: reads during detection"),
    );
    sim.membership_changed();
    sim.run_for(15_000);
    assert_survivors_read_all(
        &mut sim,
        &names,
        &format!("seed {seed:#x}: a record was lost"),
    );
    assert!(
        min_holders(&sim, &names) >= 3,
        "seed {seed:#x}: replication factor restored"
    );
}

#[test]
fn churn_during_writes_loses_no_acknowledged_write() {
    let seed = 0xd47_0002;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut net = DhtSimConfig::lan(seed);
    net.loss = 0.01;
    let mut sim = DhtSim::new(NODES, DhtConfig::default(), net);
    let names: Vec<String> = (0..RECORDS).map(name).collect();
    let mut crashed = Vec::new();
    let mut ops = Vec::new();
    for (i, n) in names.iter().enumerate() {
        if i % 100 == 50 {
            // Crash one node, restart an earlier one (empty), tell everyone.
            let victim = running(&sim, &mut rng);
            sim.crash(victim);
            crashed.push(victim);
            if crashed.len() > 2 {
                let back = crashed.remove(0);
                sim.restart(back);
            }
            sim.membership_changed();
        }
        let via = running(&sim, &mut rng);
        ops.push((n.clone(), sim.write(via, n, attach(1, i as u64))));
        sim.run_for(20);
    }
    let all: Vec<_> = ops.iter().map(|o| o.1).collect();
    assert!(sim.run_until_done(&all, 60_000));
    let acked: Vec<String> = ops
        .iter()
        .filter(|(_, op)| matches!(sim.result(*op), Some(Outcome::Wrote { .. })))
        .map(|(n, _)| n.clone())
        .collect();
    assert!(
        acked.len() > RECORDS * 9 / 10,
        "seed {seed:#x}: only {} acked",
        acked.len()
    );
    println!(
        "{} of {RECORDS} writes acknowledged during churn",
        acked.len()
    );
    // Churn stops; let membership and anti-entropy settle.
    for back in crashed.drain(..) {
        sim.restart(back);
    }
    sim.membership_changed();
    sim.run_for(30_000);
    let readers: Vec<usize> = (0..NODES).step_by(9).collect();
    let (found, _) = read_all(&mut sim, &readers, &acked);
    assert_eq!(
        found,
        readers.len() * acked.len(),
        "seed {seed:#x}: acknowledged write lost"
    );
    assert!(min_holders(&sim, &acked) >= 3, "seed {seed:#x}");
}

#[test]
fn a_healed_partition_converges_and_no_name_has_two_owners() {
    let seed = 0xd47_0003;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sim = DhtSim::new(NODES, DhtConfig::default(), DhtSimConfig::lan(seed));
    let names: Vec<String> = (0..200).map(name).collect();
    let acked = write_all(&mut sim, &mut rng, &names[..100], seed);
    assert_eq!(acked.len(), 100);

    sim.partition(|i| u8::from(i % 2 == 1));
    sim.membership_changed();
    sim.run_for(10_000);
    // Each side registers the same 100 new names for a different client.
    let mut ops = Vec::new();
    for (i, n) in names[100..].iter().enumerate() {
        let even = 2 * rng.random_range(0..NODES / 2);
        ops.push(sim.write(even, n, attach(2, i as u64)));
        ops.push(sim.write(even + 1, n, attach(3, 1_000 + i as u64)));
    }
    assert!(sim.run_until_done(&ops, 30_000));
    // Both halves accepted their claims: the conflict is real.
    let wrote = ops
        .iter()
        .filter(|op| matches!(sim.result(**op), Some(Outcome::Wrote { .. })))
        .count();
    assert_eq!(
        wrote,
        ops.len(),
        "seed {seed:#x}: a side refused its writes"
    );

    sim.partition(|_| 0);
    sim.membership_changed();
    sim.run_for(30_000);
    // Every node now reads one owner per name, the same everywhere.
    let readers: Vec<usize> = (0..NODES).step_by(5).collect();
    for n in &names {
        let mut owners = std::collections::BTreeSet::new();
        let reads: Vec<_> = readers.iter().map(|&r| sim.get(r, n)).collect();
        assert!(sim.run_until_done(&reads, 10_000));
        for op in reads {
            match sim.result(op) {
                Some(Outcome::Got {
                    item: Some(item), ..
                }) => {
                    owners.insert(item.record.claim.unwrap().owner);
                }
                other => panic!("seed {seed:#x}: {n}: {other:?}"),
            }
        }
        assert_eq!(owners.len(), 1, "seed {seed:#x}: {n} has owners {owners:?}");
    }
    assert!(min_holders(&sim, &names) >= 3);
    println!("100 names claimed on both sides of a partition each resolved to one owner");
}

/// A node that comes back empty owns its keys again at once, before any
/// hand-off reached it: its "not found" must not be believed alone.
#[test]
fn an_owner_that_restarted_empty_still_finds_every_record() {
    let seed = 0xd47_0004;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sim = DhtSim::new(NODES, DhtConfig::default(), DhtSimConfig::lan(seed));
    let names: Vec<String> = (0..RECORDS).map(name).collect();
    let acked = write_all(&mut sim, &mut rng, &names, seed);
    assert_eq!(acked.len(), RECORDS, "seed {seed:#x}");
    let owner = sim.node(0).unwrap().view().owner(key_of(&names[0])).id;
    let restarted = sim.index_of(owner);
    let owned: Vec<String> = names
        .iter()
        .filter(|n| {
            sim.node(restarted)
                .is_some_and(|d| d.view().owns(key_of(n)))
        })
        .cloned()
        .collect();
    assert!(!owned.is_empty(), "node {restarted} owns some keys");
    sim.crash(restarted);
    sim.restart(restarted);
    assert_eq!(
        sim.holders(key_of(&owned[0])),
        2,
        "the restarted owner holds nothing yet"
    );
    // Through the restarted owner itself, and through others (which route
    // to it).
    let (found, _) = read_all(&mut sim, &[restarted, 0, 77], &owned);
    assert_eq!(found, 3 * owned.len(), "seed {seed:#x}");
    // A name nobody wrote is still reported missing, not unreachable.
    let op = sim.get(restarted, "never-written");
    assert!(sim.run_until_done(&[op], 10_000));
    assert!(matches!(
        sim.result(op),
        Some(Outcome::Got { item: None, .. })
    ));
}
