//! Real `specter` processes on 127.0.0.2–127.0.0.6: a cluster forms, a
//! SIGKILLed node is seen down, and comes back up when restarted with the same
//! certificate. Plus the command line's refusals.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::procs::*;
use specter_gossip::GossipConfig;

#[test]
fn five_processes_see_a_sigkill_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let ips: Vec<String> = (2..=6).map(|i| format!("127.0.0.{i}")).collect();
    let node_dirs: Vec<PathBuf> = issue_all(dir.path(), &ca, &ips);
    let mut procs = start_all(dir.path(), &node_dirs, &ips);
    let seed = procs[0].quic();
    let ids: Vec<String> = procs.iter().map(Proc::id).collect();
    let all_alive = |procs: &[Proc]| {
        procs.iter().all(|p| {
            ids.iter()
                .filter(|id| **id != p.id())
                .all(|id| state_of(p, id) == "alive")
        })
    };
    assert!(
        wait_for(Duration::from_secs(20), || all_alive(&procs)).is_some(),
        "no convergence"
    );

    // SIGKILL node 3: everyone else sees it down within the bound.
    let bound = GossipConfig::default().detection_bound(Duration::from_millis(20));
    let victim = procs.remove(3);
    let victim_id = victim.id();
    let killed_at = Instant::now();
    drop(victim);
    let seen = wait_for(bound, || {
        procs.iter().all(|p| state_of(p, &victim_id) == "down")
    });
    assert!(
        seen.is_some(),
        "SIGKILL not seen as down everywhere within {bound:?}"
    );
    println!(
        "SIGKILL seen down by all 4 survivors after {:?}",
        killed_at.elapsed()
    );

    // Restart with the same certificate: up again everywhere, as the same id.
    let restarted = start_node(dir.path(), &node_dirs[3], &ips[3], Some(&seed));
    assert_eq!(restarted.id(), victim_id);
    procs.push(restarted);
    let back = wait_for(Duration::from_secs(10), || all_alive(&procs));
    assert!(back.is_some(), "restarted node not up everywhere");
    println!("restarted node up everywhere after {:?}", back.unwrap());

    // SIGTERM: the node leaves gracefully, exits 0, and is seen down at once
    // (well before crash detection could have noticed).
    let mut leaver = procs.remove(1);
    let leaver_id = leaver.id();
    let term_at = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &leaver.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let exit = leaver.child.wait().unwrap();
    assert!(exit.success(), "SIGTERM exit: {exit}");
    // A crash cannot be declared down sooner than a missed probe plus the
    // suspicion time; a leave must be seen well inside that.
    let cfg = GossipConfig::default();
    let crash_floor = cfg.probe_rtt + cfg.suspect_to_down_after;
    let left = wait_for(bound, || {
        procs.iter().all(|p| state_of(p, &leaver_id) == "down")
    });
    assert!(left.is_some(), "graceful leave not seen");
    let left = left.unwrap();
    assert!(
        left < crash_floor,
        "leave seen {left:?} after the exit, no sooner than a crash could be ({crash_floor:?})"
    );
    println!("SIGTERM seen down by all after {:?}", term_at.elapsed());

    // /metrics answers too, and the admin API survives garbage.
    let metrics = http_get(procs[0].admin(), "/metrics").unwrap();
    assert!(
        metrics.contains("specter_members{state=\"alive\"} 3"),
        "{metrics}"
    );
    let mut raw = TcpStream::connect(procs[0].admin()).unwrap();
    raw.write_all(&[0xff; 10_000]).unwrap();
    assert!(status(&procs[0]).is_some());
    // What a web page could make the operator's browser send is refused: a
    // rebound name, or a post from another origin.
    for head in [
        "POST /dht/put?name=rebound HTTP/1.1\r\nHost: attacker.example\r\n".to_string(),
        format!(
            "POST /dht/put?name=posted HTTP/1.1\r\nHost: {}\r\nOrigin: https://attacker.example\r\n",
            procs[0].admin()
        ),
    ] {
        let mut s = TcpStream::connect(procs[0].admin()).unwrap();
        write!(s, "{head}Connection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    }
}

#[test]
fn bad_certificates_and_flags_exit_with_code_2_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let other = dir.path().join("other");
    assert!(
        specter(&["ca", "init", "--dir", other.to_str().unwrap()])
            .status
            .success()
    );
    let ours = dir.path().join("ours");
    let theirs = dir.path().join("theirs");
    issue(&ca, "a.test.invalid", "127.0.0.7", &ours);
    issue(&other, "b.test.invalid", "127.0.0.7", &theirs);
    let f = |p: &Path, name: &str| p.join(name).to_str().unwrap().to_string();
    // A copy of our key that every user can read.
    let exposed = dir.path().join("exposed.key");
    std::fs::copy(ours.join("node.key"), &exposed).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                f(&ca, "ca.crt"),
                f(&ours, "node.crt"),
                exposed.to_str().unwrap().to_string(),
            ],
            "chmod 600",
        ),
        (
            vec![
                f(&ca, "ca.crt"),
                f(&theirs, "node.crt"),
                f(&theirs, "node.key"),
            ],
            "not valid under the given CA",
        ),
        (
            vec![
                f(&ca, "ca.crt"),
                f(&ours, "node.crt"),
                f(&theirs, "node.key"),
            ],
            "does not match",
        ),
        (
            vec![
                f(&ca, "ca.crt"),
                f(&ours, "missing.crt"),
                f(&ours, "node.key"),
            ],
            "No such file",
        ),
    ];
    for (files, expected) in cases {
        let out = Command::new(BIN)
            .args(["node", "--listen", "127.0.0.7:0"])
            .args(["--ca", &files[0], "--cert", &files[1], "--key", &files[2]])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    let out = specter(&["node", "--listen", "not-an-address"]);
    assert_eq!(out.status.code(), Some(2));
    let out = specter(&["node", "--listen", "127.0.0.7:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing --ca"));
    // Refuses to overwrite keys without --force.
    let out = specter(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
}
