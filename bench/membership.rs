//! Membership figures for the README, measured side by side in one run:
//! failure-detection time over repeated kills (simulated members and real
//! `specter` processes), gossip bytes/s per node, and a node's idle RSS.
//!
//! `cargo bench --bench membership` (add `-- --quick` for a short run).

#[path = "../tests/common/procs.rs"]
mod procs;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use procs::*;
use rand::{RngExt, SeedableRng};
use specter_gossip::sim::{Sim, SimConfig};
use specter_gossip::{GossipConfig, MemberEvent, NodeId, Timing};

struct Detection {
    first: Vec<Duration>,
    all: Vec<Duration>,
    false_downs: usize,
    bytes_per_node_s: f64,
}

/// The `p`-th percentile (0–100, nearest rank below).
fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() - 1) * p / 100]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn simulate(members: usize, net: SimConfig, kills: usize, seed: u64) -> Detection {
    let cfg = GossipConfig::lan(NonZeroU32::new(u32::try_from(members).unwrap()).unwrap());
    let mut sim = Sim::new(members, cfg, net);
    // Each member's timers follow the worst round trip it measures, as a
    // node's do from its QUIC connections (a no-op on the LAN rows).
    sim.adapt_timers();
    for i in 1..members {
        sim.add_seed(i, 0);
    }
    let step = Duration::from_millis(20);
    sim.run_until(Duration::from_secs(60), step, Sim::converged)
        .expect("converged");
    // Steady-state traffic over 30 s with nothing happening.
    let before: u64 = (0..members).map(|i| sim.bytes_out(i)).sum();
    sim.run_for(Duration::from_secs(30));
    let after: u64 = (0..members).map(|i| sim.bytes_out(i)).sum();
    let bytes_per_node_s = (after - before) as f64 / 30.0 / members as f64;

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut first, mut all) = (Vec::new(), Vec::new());
    let mut crashed: Vec<(NodeId, Duration)> = Vec::new();
    for _ in 0..kills {
        let victim = rng.random_range(1..members);
        let id = sim.identity(victim).id;
        sim.crash(victim);
        let at = sim.elapsed();
        crashed.push((id, at));
        sim.run_until(Duration::from_secs(30), step, |s| {
            (0..s.len()).filter(|&i| s.is_running(i)).all(|i| {
                s.first_down_seen(i, id, at).is_some()
                    || !s.membership(i).unwrap().up_members().any(|m| m.id == id)
            })
        });
        let seen: Vec<Duration> = (0..members)
            .filter(|&i| sim.is_running(i))
            .filter_map(|i| sim.first_down_seen(i, id, at))
            .map(|t| t - at)
            .collect();
        first.push(*seen.iter().min().unwrap());
        all.push(*seen.iter().max().unwrap());
        sim.restart(victim, 0);
        sim.run_until(Duration::from_secs(60), step, Sim::converged)
            .expect("re-converged");
    }
    let false_downs = sim
        .log
        .iter()
        .filter(|o| match o.event {
            MemberEvent::Down(w) => !crashed.iter().any(|(id, at)| *id == w.id && o.at >= *at),
            _ => false,
        })
        .count();
    Detection {
        first,
        all,
        false_downs,
        bytes_per_node_s,
    }
}

/// How often the benchmark asks every node's /status during a kill.
const POLL: Duration = Duration::from_millis(100);

struct Real {
    all: Vec<Duration>,
    bytes_per_node_s: f64,
    rss_kib: u64,
}

fn processes(n: usize, kills: usize) -> Real {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (0..n).map(|i| format!("127.0.0.{}", i + 2)).collect();
    let dirs: Vec<PathBuf> = issue_all(dir.path(), &ca_dir, &ips);
    let mut procs: Vec<Option<Proc>> = vec![Some(start_node(dir.path(), &dirs[0], &ips[0], None))];
    let seed = procs[0].as_ref().unwrap().quic();
    for i in 1..n {
        procs.push(Some(start_node(dir.path(), &dirs[i], &ips[i], Some(&seed))));
    }
    let ids: Vec<String> = procs.iter().map(|p| p.as_ref().unwrap().id()).collect();
    let converged = |procs: &[Option<Proc>]| {
        procs.iter().flatten().all(|p| {
            ids.iter()
                .filter(|id| **id != p.id())
                .all(|id| state_of(p, id) == "alive")
        })
    };
    wait_for(Duration::from_secs(30), || converged(&procs)).expect("converged");

    // Idle: traffic and memory of node 1 over 10 s.
    let p1 = procs[1].as_ref().unwrap();
    let out = |p: &Proc| status(p).unwrap()["gossip"]["bytes_out"].as_u64().unwrap();
    let (b0, t0) = (procs.iter().flatten().map(out).sum::<u64>(), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let b1 = procs.iter().flatten().map(out).sum::<u64>();
    let bytes_per_node_s = (b1 - b0) as f64 / t0.elapsed().as_secs_f64() / n as f64;
    let rss_kib = rss_kib(p1.child.id()).unwrap_or(0);

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut all = Vec::new();
    for _ in 0..kills {
        let victim = rng.random_range(1..n);
        let id = ids[victim].clone();
        let killed_at = Instant::now();
        procs[victim] = None; // SIGKILL
        let mut first_seen: Vec<Option<Duration>> = vec![None; n];
        wait_for_every(Duration::from_secs(30), POLL, || {
            for (i, p) in procs.iter().enumerate() {
                if let Some(p) = p
                    && first_seen[i].is_none()
                    && state_of(p, &id) == "down"
                {
                    first_seen[i] = Some(killed_at.elapsed());
                }
            }
            procs
                .iter()
                .enumerate()
                .all(|(i, p)| p.is_none() || first_seen[i].is_some())
        })
        .expect("kill seen");
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!("per node: {first_seen:?}");
        }
        all.push(killed_at.elapsed());
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!("kill {victim}: seen by all after {:?}", killed_at.elapsed());
        }
        procs[victim] = Some(start_node(
            dir.path(),
            &dirs[victim],
            &ips[victim],
            Some(&seed),
        ));
        wait_for(Duration::from_secs(30), || converged(&procs)).expect("rejoined");
    }
    Real {
        all,
        bytes_per_node_s,
        rss_kib,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let kills = if quick { 5 } else { 20 };
    let cfg = GossipConfig::default();
    println!("## Membership (SWIM over QUIC datagrams)\n");
    println!(
        "Config: probe every {:?}, probe RTT {:?}, suspicion {:?}, gossip every {:?}; {kills} kills per row.\n",
        cfg.probe_period, cfg.probe_rtt, cfg.suspect_to_down_after, cfg.gossip_period
    );
    println!(
        "| setting | first member sees the crash, median / max | all members see it, median / max | false downs | gossip B/s per node (idle) |"
    );
    println!("|---|---|---|---|---|");
    let ms_ = Duration::from_millis;
    let rows: Vec<(usize, String, SimConfig)> = if std::env::args().any(|a| a == "--real-only") {
        Vec::new()
    } else {
        let mut rows = Vec::new();
        for (members, loss) in [(10, 0.0), (10, 0.05), (100, 0.0), (100, 0.05)] {
            let seed = 0xbe_4c + members as u64;
            rows.push((
                members,
                format!("{:.0} % loss", loss * 100.0),
                SimConfig::lan(seed, loss),
            ));
        }
        for (name, net) in [
            (
                "RTT 40 ms, 0.5 % loss",
                SimConfig::wan(0xbe_4d, 0.005, ms_(40)),
            ),
            (
                "RTT 80 ms, 2 % loss",
                SimConfig::wan(0xbe_4e, 0.02, ms_(80)),
            ),
            (
                "two regions, RTT 5 / 150 ms, 0.5 % loss",
                SimConfig::regions(0xbe_4f, 0.005, 2, ms_(5), ms_(150)),
            ),
            (
                "two regions, RTT 5 / 220 ms, 0.5 % loss",
                SimConfig::regions(0xbe_50, 0.005, 2, ms_(5), ms_(220)),
            ),
            (
                "two regions, RTT 5 / 300 ms, 2 % loss",
                SimConfig::regions(0xbe_51, 0.02, 2, ms_(5), ms_(300)),
            ),
        ] {
            let t = Timing::for_rtt(cfg.timing(), net.worst_rtt(0, 20));
            rows.push((
                20,
                format!(
                    "{name} (probe RTT {:?}, period {:?}, suspicion {:?})",
                    t.probe_rtt, t.probe_period, t.suspect_to_down_after
                ),
                net,
            ));
        }
        rows
    };
    for (members, setting, net) in rows {
        let seed = net.seed;
        let mut d = simulate(members, net, kills, seed);
        println!(
            "| simulated, {members} members, {setting} | {} / {} | {} / {} | {} | {:.0} |",
            ms(pct(&mut d.first, 50)),
            ms(pct(&mut d.first, 100)),
            ms(pct(&mut d.all, 50)),
            ms(pct(&mut d.all, 100)),
            d.false_downs,
            d.bytes_per_node_s,
        );
    }
    let n = 10;
    let mut r = processes(n, kills);
    println!(
        "| real processes, {n} nodes on loopback, SIGKILL | — | {} / {} | — | {:.0} |",
        ms(pct(&mut r.all, 50)),
        ms(pct(&mut r.all, 100)),
        r.bytes_per_node_s
    );
    println!(
        "\nIdle RSS of one node in a {n}-node cluster: {:.1} MiB.",
        r.rss_kib as f64 / 1024.0
    );
    println!("Real-process detection is observed by polling every node's /status every {POLL:?}.");
}
