//! Lookup hop counts on a 1,000-node ring, with converged views and with every
//! node missing a random 10 % of the members from its view. Routing follows
//! the DHT's rule: ask the owner in your view; a node that does not own the key
//! (by its own predecessor) redirects to the owner in its view.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use specter_dht::lookup::MAX_HOPS;
use specter_dht::ring::{Key, Peer, RingView, Route};
use specter_gossip::NodeId;

const N: usize = 1_000;
const LOOKUPS: usize = 20_000;

fn peer(id: u64) -> Peer {
    Peer {
        id: NodeId(id),
        addr: "127.0.0.1:7000".parse().unwrap(),
    }
}

struct Result {
    histogram: BTreeMap<u32, usize>,
    mean: f64,
    correct: f64,
}

fn run(missing: f64, seed: u64) -> Result {
    let mut rng = StdRng::seed_from_u64(seed);
    let ids: Vec<u64> = (0..N).map(|_| rng.random()).collect();
    let full: Vec<Peer> = ids.iter().map(|&i| peer(i)).collect();
    let views: Vec<RingView> = ids
        .iter()
        .map(|&me| {
            let mut v = RingView::new(peer(me));
            v.rebuild(
                full.iter()
                    .copied()
                    .filter(|_| rng.random::<f64>() >= missing),
            );
            v
        })
        .collect();
    let index: BTreeMap<u64, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut truth = RingView::new(full[0]);
    truth.rebuild(full.iter().copied());

    let mut histogram = BTreeMap::new();
    let (mut total, mut correct) = (0u64, 0usize);
    for _ in 0..LOOKUPS {
        let key: Key = rng.random();
        let mut at = rng.random_range(0..N);
        let mut hops = 0u32;
        let mut visited = vec![at];
        let answered_by = loop {
            match views[at].route(key) {
                Route::Local => break Some(at),
                Route::Remote(next) => {
                    let next = index[&next.id.0];
                    hops += 1;
                    if hops > MAX_HOPS || visited.contains(&next) {
                        break None;
                    }
                    visited.push(next);
                    at = next;
                }
            }
        };
        *histogram.entry(hops).or_insert(0) += 1;
        total += u64::from(hops);
        if answered_by.is_some_and(|i| ids[i] == truth.owner(key).id.0) {
            correct += 1;
        }
    }
    Result {
        histogram,
        mean: total as f64 / LOOKUPS as f64,
        correct: correct as f64 / LOOKUPS as f64,
    }
}

fn show(label: &str, r: &Result) {
    println!(
        "{label}: mean {:.3} hops, {:.1} % answered by the true owner",
        r.mean,
        r.correct * 100.0
    );
    for (hops, count) in &r.histogram {
        let bar = "#".repeat((count * 60).div_ceil(LOOKUPS));
        println!("  {hops:>2} hops {count:>6} {bar}");
    }
}

#[test]
fn converged_views_take_one_hop_and_partial_views_few() {
    let converged = run(0.0, 1);
    show("converged views, 1,000 nodes", &converged);
    assert!(converged.mean <= 1.2, "mean {}", converged.mean);
    assert_eq!(converged.correct, 1.0);

    let partial = run(0.10, 2);
    show("every view missing 10 % of members, 1,000 nodes", &partial);
    let bound = 0.5 * (N as f64).log2();
    assert!(
        partial.mean <= bound,
        "mean {} > ½·log2 N = {bound}",
        partial.mean
    );
    // Only a node that is itself missing the owner can answer wrongly.
    assert!(
        partial.correct >= 0.98,
        "{:.3} answered by the true owner",
        partial.correct
    );
}
