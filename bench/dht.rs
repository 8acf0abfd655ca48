//! DHT figures for the README: lookup latency over real QUIC on loopback,
//! time to restore the replication factor after a crash (real QUIC and
//! simulated), and records lost (must be 0).
//!
//! `cargo bench --bench dht` (add `-- --quick` for a short run).

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use specter::demo::start_loopback_node;
use specter::node::Node;
use specter::node::dht::admin_registration;
use specter::pki::make_ca;
use specter_dht::sim::{DhtSim, DhtSimConfig};
use specter_dht::{ClientId, DhtConfig, Outcome, WriteOp, key_of};
use specter_gossip::NodeId;

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() - 1) * p / 100]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn held(nodes: &[Node]) -> u64 {
    nodes
        .iter()
        .map(|n| {
            let d = n.status().dht;
            (d.records_owned + d.records_replica) as u64
        })
        .sum()
}

async fn real(n: usize, records: usize, lookups: usize) {
    let ca = make_ca("bench").unwrap();
    let mut nodes = Vec::new();
    let mut seed = None;
    for i in 0..n {
        let node =
            start_loopback_node(&ca, &format!("n{i}.bench.invalid"), seed, i as u64).unwrap();
        let advertise = node.status().addr;
        seed.get_or_insert(advertise);
        nodes.push(node);
    }
    let start = Instant::now();
    while !nodes.iter().all(|x| x.status().dht.ring_size == n) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "ring did not form"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let names: Vec<String> = (0..records).map(|i| format!("bench-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let via = nodes[i % n].state();
        let op = admin_registration(via.me);
        let (outcome, _) = via.dht.put(name, op).await.unwrap();
        assert!(matches!(outcome, Outcome::Wrote { .. }), "{outcome:?}");
    }
    let mut rng = StdRng::seed_from_u64(3);
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for _ in 0..lookups {
        let via = nodes[rng.random_range(0..n)].state();
        let name = names[rng.random_range(0..records)].clone();
        // Timed from the caller's side: includes the hand-off to the DHT task.
        let began = Instant::now();
        let (outcome, _) = via.dht.get(&name).await.unwrap();
        let took = began.elapsed();
        match outcome {
            Outcome::Got {
                item: Some(_),
                hops: 0,
            } => local.push(took),
            Outcome::Got { item: Some(_), .. } => remote.push(took),
            other => panic!("lookup failed: {other:?}"),
        }
    }
    let mut all: Vec<Duration> = local.iter().chain(&remote).copied().collect();
    println!("### Lookups over real QUIC, {n} nodes on loopback, {records} records\n");
    println!("| lookups | count | p50 | p99 |");
    println!("|---|---|---|---|");
    println!(
        "| answered locally (0 hops) | {} | {} | {} |",
        local.len(),
        ms(pct(&mut local, 50)),
        ms(pct(&mut local, 99))
    );
    println!(
        "| one hop over QUIC | {} | {} | {} |",
        remote.len(),
        ms(pct(&mut remote, 50)),
        ms(pct(&mut remote, 99))
    );
    println!(
        "| all | {} | {} | {} |",
        all.len(),
        ms(pct(&mut all, 50)),
        ms(pct(&mut all, 99))
    );

    // Crash one node without a word; time until every record has 3 copies
    // again among the survivors, and check none was lost.
    let expected = 3 * records as u64;
    let settle = Instant::now();
    while held(&nodes) < expected {
        assert!(
            settle.elapsed() < Duration::from_secs(30),
            "records not replicated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim = nodes.remove(1);
    let crashed = Instant::now();
    victim.crash().await;
    let restored = loop {
        let now = held(&nodes);
        if now >= expected && nodes.iter().all(|x| x.status().dht.ring_size == n - 1) {
            break crashed.elapsed();
        }
        assert!(
            crashed.elapsed() < Duration::from_secs(60),
            "replication not restored ({now}/{expected})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut lost = 0;
    for name in &names {
        let (outcome, _) = nodes[0].state().dht.get(name).await.unwrap();
        if !matches!(outcome, Outcome::Got { item: Some(_), .. }) {
            lost += 1;
        }
    }
    println!(
        "\nCrash of 1 of {n} nodes (real QUIC): replication factor 3 restored after {}, records lost: {lost}.",
        ms(restored)
    );
    for node in nodes {
        node.shutdown().await;
    }
}

fn simulated(trials: usize) {
    let mut restore = Vec::new();
    let mut lost_total = 0;
    for t in 0..trials {
        let seed = 0xbe_7c00 + t as u64;
        let mut sim = DhtSim::new(100, DhtConfig::default(), DhtSimConfig::lan(seed));
        let names: Vec<String> = (0..1_000).map(|i| format!("n-{i}")).collect();
        let ops: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                sim.write(
                    i % 100,
                    n,
                    WriteOp::Attach {
                        client: ClientId([1; 32]),
                        node: NodeId(i as u64),
                        addr: "127.0.0.1:7000".parse().unwrap(),
                        version: 1,
                        lease_ms: 600_000,
                        claim_ms: 600_000,
                    },
                )
            })
            .collect();
        assert!(sim.run_until_done(&ops, 60_000));
        // Two consecutive nodes crash at once; membership reaches each node
        // 0.1–2 s later (the simulated SWIM lag).
        let victim = t * 7 % 100;
        let next = sim.index_of(sim.node(victim).unwrap().view().successors(1)[0].id);
        sim.crash(victim);
        sim.crash(next);
        sim.membership_changed();
        let began = sim.elapsed_ms();
        let min_holders = |s: &DhtSim| names.iter().map(|n| s.holders(key_of(n))).min().unwrap();
        while min_holders(&sim) < 3 && sim.elapsed_ms() - began < 60_000 {
            sim.run_for(50);
        }
        restore.push(Duration::from_millis(sim.elapsed_ms() - began));
        lost_total += names.iter().filter(|n| sim.holders(key_of(n)) == 0).count();
    }
    println!(
        "\nSimulated, 100 nodes, 1,000 records, two consecutive nodes crashed ({trials} trials, membership lag 0.1–2 s): \
         replication factor restored after median {} / max {}, records lost: {lost_total}.",
        ms(pct(&mut restore, 50)),
        ms(pct(&mut restore, 100))
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(real(
        5,
        if quick { 50 } else { 200 },
        if quick { 200 } else { 2_000 },
    ));
    simulated(if quick { 3 } else { 10 });
}
