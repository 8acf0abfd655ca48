//! Deterministic simulations of the SWIM membership: 100 members on a virtual
//! clock with seeded 5 % packet loss.

use std::time::Duration;

use specter_gossip::sim::{Sim, SimConfig};
use specter_gossip::{GossipConfig, MemberEvent, NodeId};

const SEED: u64 = 0x5eed_0001;
const MEMBERS: usize = 100;
const LOSS: f64 = 0.05;
const STEP: Duration = Duration::from_millis(50);

fn config() -> GossipConfig {
    GossipConfig::lan(std::num::NonZeroU32::new(u32::try_from(MEMBERS).unwrap()).unwrap())
}

/// 100 members announce to member 0, a few at a time, and converge.
fn converged_cluster(seed: u64) -> Sim {
    let mut sim = Sim::new(MEMBERS, config(), SimConfig::lan(seed, LOSS));
    for i in 1..MEMBERS {
        sim.add_seed(i, 0);
        sim.run_for(Duration::from_millis(20));
    }
    let took = sim.run_until(Duration::from_secs(30), STEP, Sim::converged);
    assert!(
        took.is_some(),
        "seed {seed:#x}: 100 members did not converge in 30 s"
    );
    sim
}

/// Down events about members that were running under that identity at the time.
fn false_downs(sim: &Sim, crashed: &[(NodeId, Duration)]) -> Vec<String> {
    sim.log
        .iter()
        .filter_map(|o| match o.event {
            MemberEvent::Down(who) => {
                let legit = crashed.iter().any(|(id, at)| *id == who.id && o.at >= *at);
                (!legit).then(|| format!("{:?} saw {:?} down at {:?}", o.observer, who, o.at))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn hundred_members_converge_detect_a_crash_and_readmit_the_restarted_member() {
    let mut sim = converged_cluster(SEED);
    let cfg = config();
    // One-way latency is at most 2 ms in this network.
    let bound = cfg.detection_bound(Duration::from_millis(2));

    let victim = 17;
    let victim_id = sim.identity(victim).id;
    sim.crash(victim);
    let crashed_at = sim.elapsed();
    let took = sim.run_until(bound * 2, STEP, |s| {
        (0..s.len())
            .filter(|&i| s.is_running(i))
            .all(|i| !s.view(i).contains(&victim_id))
    });
    let mut worst = Duration::ZERO;
    for i in (0..sim.len()).filter(|&i| sim.is_running(i)) {
        let seen = sim
            .first_down_seen(i, victim_id, crashed_at)
            .unwrap_or_else(|| panic!("seed {SEED:#x}: member {i} never saw the crash"));
        worst = worst.max(seen - crashed_at);
    }
    assert!(took.is_some());
    assert!(
        worst <= bound,
        "seed {SEED:#x}: detection took {worst:?}, bound {bound:?} (2 probe periods + period + suspicion + 10 gossip rounds)"
    );

    // Restart with a renewed (higher) generation: up again everywhere.
    sim.restart(victim, 3);
    let new_identity = sim.identity(victim);
    let rejoined = sim.run_until(Duration::from_secs(10), STEP, |s| {
        (0..s.len()).filter(|&i| i != victim).all(|i| {
            s.membership(i)
                .unwrap()
                .up_members()
                .any(|m| *m == new_identity)
        }) && s.converged()
    });
    assert!(
        rejoined.is_some(),
        "seed {SEED:#x}: restarted member not readmitted"
    );

    // Keep running a while: live members are never declared down.
    sim.run_for(Duration::from_secs(30));
    let bad = false_downs(&sim, &[(victim_id, crashed_at)]);
    assert!(bad.is_empty(), "seed {SEED:#x}: false downs: {bad:#?}");
    assert!(sim.converged());
}

#[test]
fn two_consecutive_crashes_and_a_graceful_leave_are_all_seen() {
    let mut sim = converged_cluster(SEED + 1);
    let bound = config().detection_bound(Duration::from_millis(2));
    let (a, b, c) = (40, 41, 77);
    let ids = [sim.identity(a).id, sim.identity(b).id, sim.identity(c).id];
    let at = sim.elapsed();
    sim.crash(a);
    sim.crash(b);
    sim.leave(c);
    let took = sim.run_until(bound, STEP, Sim::converged);
    assert!(
        took.is_some(),
        "seed {:#x}: not converged within {bound:?}",
        SEED + 1
    );

    // The leave is seen sooner than the crashes, by everyone.
    let mut leave_worst = Duration::ZERO;
    let mut crash_best = Duration::MAX;
    for i in (0..sim.len()).filter(|&i| sim.is_running(i)) {
        leave_worst = leave_worst.max(sim.first_down_seen(i, ids[2], at).unwrap() - at);
        crash_best = crash_best.min(sim.first_down_seen(i, ids[0], at).unwrap() - at);
    }
    assert!(
        leave_worst < crash_best,
        "leave {leave_worst:?} vs crash {crash_best:?}"
    );
    let crashed: Vec<_> = ids.iter().map(|id| (*id, at)).collect();
    assert!(false_downs(&sim, &crashed).is_empty());
}

#[test]
fn a_healed_partition_converges_back_to_one_view() {
    let mut sim = converged_cluster(SEED + 2);
    sim.partition(|i| u8::from(i % 2 == 0));
    // Each half sees the other half down.
    let split = sim.run_until(Duration::from_secs(20), STEP, |s| {
        (0..s.len()).all(|i| s.view(i).len() == s.len() / 2 - 1)
    });
    assert!(split.is_some(), "halves did not separate");
    sim.heal();
    // Halves find each other again through foca's periodic announcements to
    // members they saw go down.
    let healed = sim.run_until(
        Duration::from_secs(180),
        Duration::from_millis(500),
        Sim::converged,
    );
    assert!(
        healed.is_some(),
        "seed {:#x}: partition did not heal",
        SEED + 2
    );
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed| {
        let mut sim = Sim::new(20, config(), SimConfig::lan(seed, LOSS));
        for i in 1..20 {
            sim.add_seed(i, 0);
        }
        sim.run_for(Duration::from_secs(5));
        sim.crash(5);
        sim.run_for(Duration::from_secs(5));
        sim.log
            .iter()
            .map(|o| format!("{:?}{}{:?}", o.at, o.observer, o.event))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(9), run(9));
    assert_ne!(run(9), run(10));
}
