//! Real `specter` processes on 127.0.0.2–127.0.0.6: a cluster forms, a
//! SIGKILLed node is seen down, and comes back up when restarted with the same
//! certificate. Plus the command line's refusals.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use specter_gossip::GossipConfig;

const BIN: &str = env!("CARGO_BIN_EXE_specter");

fn specter(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run specter")
}

fn ca(dir: &Path) -> PathBuf {
    let ca = dir.join("ca");
    let out = specter(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ca
}

fn issue(ca: &Path, name: &str, ip: &str, out: &Path) {
    let o = specter(&[
        "ca",
        "issue-node",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--name",
        name,
        "--ip",
        ip,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A node process, killed when dropped.
struct Proc {
    child: Child,
    ready: Value,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn admin(&self) -> SocketAddr {
        self.ready["admin"].as_str().unwrap().parse().unwrap()
    }
    fn quic(&self) -> String {
        self.ready["quic"].as_str().unwrap().to_string()
    }
    fn id(&self) -> String {
        self.ready["id"].as_str().unwrap().to_string()
    }
}

fn start_node(dir: &Path, node_dir: &Path, ip: &str, join: Option<&str>) -> Proc {
    let ready = node_dir.join(format!("ready-{:016x}", rand::random::<u64>()));
    let mut cmd = Command::new(BIN);
    cmd.args([
        "node",
        "--listen",
        &format!("{ip}:0"),
        "--admin",
        "127.0.0.1:0",
    ])
    .args(["--ca", dir.join("ca/ca.crt").to_str().unwrap()])
    .args(["--cert", node_dir.join("node.crt").to_str().unwrap()])
    .args(["--key", node_dir.join("node.key").to_str().unwrap()])
    .args(["--ready-file", ready.to_str().unwrap()])
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    .stderr(Stdio::from(
        std::fs::File::create(node_dir.join(format!("{ip}.log"))).unwrap(),
    ));
    if let Some(seed) = join {
        cmd.args(["--join", seed]);
    }
    let mut child = cmd.spawn().expect("spawn node");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            let ready: Value = serde_json::from_str(&text).unwrap();
            return Proc { child, ready };
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("node {ip} exited early: {status}");
        }
        assert!(Instant::now() < deadline, "node {ip} not ready in 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

fn status(p: &Proc) -> Option<Value> {
    serde_json::from_str(&http_get(p.admin(), "/status")?).ok()
}

/// State of member `id` as `observer` sees it ("alive", "suspect", "down", or
/// "absent").
fn state_of(observer: &Proc, id: &str) -> String {
    let Some(s) = status(observer) else {
        return "unreachable".into();
    };
    s["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .map_or("absent".into(), |m| {
            m["state"].as_str().unwrap().to_string()
        })
}

fn wait_for(deadline: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if cond() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

#[test]
fn five_processes_see_a_sigkill_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let ips: Vec<String> = (2..=6).map(|i| format!("127.0.0.{i}")).collect();
    let node_dirs: Vec<PathBuf> = ips
        .iter()
        .map(|ip| {
            let d = dir.path().join(ip);
            issue(&ca, &format!("{ip}.test.invalid"), ip, &d);
            d
        })
        .collect();
    let mut procs = vec![start_node(dir.path(), &node_dirs[0], &ips[0], None)];
    let seed = procs[0].quic();
    for i in 1..5 {
        procs.push(start_node(dir.path(), &node_dirs[i], &ips[i], Some(&seed)));
    }
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

    // /metrics answers too, and the admin API survives garbage.
    let metrics = http_get(procs[0].admin(), "/metrics").unwrap();
    assert!(
        metrics.contains("specter_members{state=\"alive\"} 4"),
        "{metrics}"
    );
    let mut raw = TcpStream::connect(procs[0].admin()).unwrap();
    raw.write_all(&[0xff; 10_000]).unwrap();
    assert!(status(&procs[0]).is_some());
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

    let cases: Vec<(Vec<String>, &str)> = vec![
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
