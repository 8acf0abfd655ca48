//! Running real `specter` processes: certificates through the CLI, nodes that
//! write a ready file, and the admin API over plain HTTP/1.1. Shared by the
//! process tests and the membership benchmark.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_specter");

pub fn specter(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run specter")
}

/// Runs `specter` and asserts that it succeeded.
pub fn specter_ok(args: &[&str]) -> std::process::Output {
    let out = specter(args);
    assert!(
        out.status.success(),
        "specter {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn ca(dir: &Path) -> PathBuf {
    let ca = dir.join("ca");
    specter_ok(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    ca
}

pub fn issue(ca: &Path, name: &str, ip: &str, out: &Path) {
    let ca = ca.to_str().unwrap();
    let out = out.to_str().unwrap();
    specter_ok(&[
        "ca",
        "issue-node",
        "--ca-dir",
        ca,
        "--name",
        name,
        "--ip",
        ip,
        "--out",
        out,
    ]);
}

/// Issues the wildcard edge certificate for `*.domain` into `dir/edge`.
pub fn issue_edge(dir: &Path, ca: &Path, domain: &str) -> PathBuf {
    let edge = dir.join("edge");
    let (ca, out) = (ca.to_str().unwrap(), edge.to_str().unwrap());
    specter_ok(&[
        "ca",
        "issue-edge",
        "--ca-dir",
        ca,
        "--domain",
        domain,
        "--out",
        out,
    ]);
    edge
}

/// `specter tunnel --to TO --name NAME --via VIA` with the CA in `dir/ca`,
/// its state in `dir/STATE` and its ready file there too (see
/// [`wait_attached`]); callers add flags and stdio.
pub fn tunnel_cmd(dir: &Path, state: &str, name: &str, to: &str, via: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["tunnel", "--to", to, "--name", name, "--via", via])
        .args(["--ca", dir.join("ca/ca.crt").to_str().unwrap()])
        .args(["--state-dir", dir.join(state).to_str().unwrap()])
        .arg("--ready-file")
        .arg(client_ready_file(&dir.join(state)));
    cmd
}

/// A client serving `name` (`to`, e.g. `http://HOST:PORT`) through `via`
/// with one attachment, its state in `dir/STATE`, quiet; returns once it is
/// attached.
pub fn attach_one(dir: &Path, state: &str, name: &str, to: &str, via: &str) -> Reaped {
    let child = tunnel_cmd(dir, state, name, to, via)
        .args(["--attachments", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = Reaped(child);
    assert!(
        wait_attached(&dir.join(state), 1, Duration::from_secs(20)),
        "client {name} did not attach"
    );
    client
}

/// Where a client whose state is in `state_dir` writes its ready file.
pub fn client_ready_file(state_dir: &Path) -> PathBuf {
    state_dir.join("ready.json")
}

/// Waits up to `deadline` for the client's ready file to satisfy `want`;
/// returns its last contents if it did.
pub fn wait_client(
    ready_file: &Path,
    deadline: Duration,
    want: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if let Some(ready) = std::fs::read_to_string(ready_file)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .filter(|ready| want(ready))
        {
            return Some(ready);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Waits for the client with state in `state_dir` to hold `n` healthy
/// attachments.
pub fn wait_attached(state_dir: &Path, n: u64, deadline: Duration) -> bool {
    wait_client(&client_ready_file(state_dir), deadline, |r| {
        r["healthy"].as_u64() == Some(n)
    })
    .is_some()
}

/// The child's stdout, a line at a time, read on a thread of its own.
pub fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits up to `deadline` for a line containing `needle`.
pub fn wait_line(
    rx: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    deadline: Duration,
) -> Option<String> {
    let end = Instant::now() + deadline;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Issues a node certificate for each IP into `dir/IP`; returns the folders.
pub fn issue_all(dir: &Path, ca: &Path, ips: &[String]) -> Vec<PathBuf> {
    ips.iter()
        .map(|ip| {
            let d = dir.join(ip);
            issue(ca, &format!("{ip}.test.invalid"), ip, &d);
            d
        })
        .collect()
}

/// Starts one node per folder, the first as the seed of the others.
pub fn start_all(dir: &Path, dirs: &[PathBuf], ips: &[String]) -> Vec<Proc> {
    let mut procs = vec![start_node(dir, &dirs[0], &ips[0], None)];
    let seed = procs[0].quic();
    for i in 1..dirs.len() {
        procs.push(start_node(dir, &dirs[i], &ips[i], Some(&seed)));
    }
    procs
}

/// A child process killed (and reaped) when dropped, also when a test panics.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub ready: Value,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn admin(&self) -> SocketAddr {
        self.ready["admin"].as_str().unwrap().parse().unwrap()
    }
    pub fn quic(&self) -> String {
        self.ready["quic"].as_str().unwrap().to_string()
    }
    pub fn http(&self) -> String {
        self.ready["http"].as_str().unwrap().to_string()
    }
    pub fn https(&self) -> String {
        self.ready["https"].as_str().unwrap().to_string()
    }
    pub fn id(&self) -> String {
        self.ready["id"].as_str().unwrap().to_string()
    }
}

pub fn start_node(dir: &Path, node_dir: &Path, ip: &str, join: Option<&str>) -> Proc {
    start_node_with(dir, node_dir, ip, join, &[])
}

/// [`start_node`] with extra flags.
pub fn start_node_with(
    dir: &Path,
    node_dir: &Path,
    ip: &str,
    join: Option<&str>,
    extra: &[&str],
) -> Proc {
    start_node_via(&[], dir, node_dir, ip, join, extra)
}

/// Spawns a `specter node` like [`start_node_via`] without waiting for it:
/// the child and the path its ready file will have.
pub fn spawn_node_via(
    launcher: &[&str],
    dir: &Path,
    node_dir: &Path,
    ip: &str,
    join: Option<&str>,
    extra: &[&str],
) -> (Child, PathBuf) {
    let ready = node_dir.join(format!("ready-{:016x}", rand::random::<u64>()));
    let mut cmd = match launcher.split_first() {
        None => Command::new(BIN),
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(BIN);
            cmd
        }
    };
    cmd.arg("node");
    // `extra` may choose the addresses itself.
    if !extra.contains(&"--listen") {
        cmd.args(["--listen", &format!("{ip}:0")]);
    }
    if !extra.contains(&"--admin") {
        cmd.args(["--admin", "127.0.0.1:0"]);
    }
    cmd.args(["--ca", dir.join("ca/ca.crt").to_str().unwrap()])
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
    cmd.args(extra);
    (cmd.spawn().expect("spawn node"), ready)
}

/// [`start_node_with`], run through `launcher` (e.g. `prlimit
/// --nofile=1024:1024`) when it is not empty.
pub fn start_node_via(
    launcher: &[&str],
    dir: &Path,
    node_dir: &Path,
    ip: &str,
    join: Option<&str>,
    extra: &[&str],
) -> Proc {
    let (mut child, ready) = spawn_node_via(launcher, dir, node_dir, ip, join, extra);
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

pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

pub fn status(p: &Proc) -> Option<Value> {
    serde_json::from_str(&http_get(p.admin(), "/status")?).ok()
}

/// State of member `id` as `observer` sees it ("alive", "suspect", "down", or
/// "absent").
pub fn state_of(observer: &Proc, id: &str) -> String {
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

/// Sends `sig` (`-STOP`, `-TERM`, …) to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

pub fn wait_for(deadline: Duration, cond: impl FnMut() -> bool) -> Option<Duration> {
    wait_for_every(deadline, Duration::from_millis(25), cond)
}

/// [`wait_for`] with a chosen polling interval.
pub fn wait_for_every(
    deadline: Duration,
    every: Duration,
    mut cond: impl FnMut() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if cond() {
            return Some(start.elapsed());
        }
        std::thread::sleep(every);
    }
    None
}

/// A sample of `p`'s `/metrics` whose line starts with `line_start` (a
/// name, with its labels if any, and the trailing space).
pub fn metric(p: &Proc, line_start: &str) -> u64 {
    let text = http_get(p.admin(), "/metrics").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
}

/// Descriptors a process holds open (from /proc).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The 99th percentile of `took`.
pub fn p99(mut took: Vec<Duration>) -> Duration {
    took.sort();
    took[(took.len() * 99 / 100).min(took.len() - 1)]
}

/// Resident set size of a process in KiB (from /proc).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Waits until every process in `procs` sees a ring of all of them.
pub fn wait_ring(procs: &[Proc]) {
    let ring = |p: &Proc| status(p).map_or(0, |s| s["dht"]["ring_size"].as_u64().unwrap_or(0));
    let n = u64::try_from(procs.len()).unwrap();
    let formed = wait_for(Duration::from_secs(20), || {
        procs.iter().all(|p| ring(p) == n)
    });
    assert!(formed.is_some(), "the ring did not form");
}
