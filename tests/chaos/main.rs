//! The chaos-kill run (`tests/chaos-kill.sh`): real `specter` processes on
//! loopback, steady HTTPS load through every node, and a node SIGKILLed every
//! few seconds and restarted later.
//!
//! - `--mode attached` (default) kills a node the client is attached to;
//! - `--mode replica` kills a node that holds a replica of the tunnel's
//!   registration but no attachment.
//!
//! It prints, per entry node, the requests, failures and latency, and for each
//! kill how long the client took to be back to k healthy attachments. It
//! exits non-zero if a request failed through an entry node that was up for
//! the whole request, or if any body did not match its checksum.

#[path = "../common/procs.rs"]
mod procs;

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use rand::seq::IndexedRandom;
use sha2::{Digest, Sha256};

use procs::{BIN, Reaped, ca, issue_all, issue_edge, tunnel_cmd};

const DOMAIN: &str = "chaos.test";
const NAME: &str = "chaos";
const QUIC_PORT: u16 = 7000;
const HTTPS_PORT: u16 = 7443;

#[derive(Parser, Debug, Clone)]
#[command(about = "SIGKILL nodes under load and check that no visitor notices")]
struct Args {
    /// Nodes in the overlay.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Seconds between kills.
    #[arg(long, default_value_t = 5.0)]
    period: f64,
    /// Seconds the run lasts.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Seconds after a kill before the node is restarted.
    #[arg(long, default_value_t = 2.0)]
    restart_after: f64,
    /// Client attachments (k): 3 by default; in replica mode 2, so that with
    /// 5 nodes and 3 holders of the registration at least one holder has no
    /// attachment to kill.
    #[arg(long)]
    attachments: Option<usize>,
    /// Concurrent visitors per entry node.
    #[arg(long, default_value_t = 2)]
    visitors: usize,
    /// Which nodes are killed: `attached` or `replica`.
    #[arg(long, default_value = "attached")]
    mode: String,
    /// Seed for the choice of victims.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Folder for certificates, logs and state (a temporary one otherwise).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Accepted for `cargo bench`/`cargo test` compatibility.
    #[arg(long, hide = true)]
    bench: bool,
}

fn ip(i: usize) -> String {
    format!("127.0.0.{}", 101 + i)
}

/// A node slot: restarted in place, at the same addresses.
struct Slot {
    ip: String,
    dir: PathBuf,
    child: Option<Child>,
    id: String,
    admin: Option<SocketAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(slot: &mut Slot, root: &Path, seeds: &[String], restarts: usize) {
    let ready = slot.dir.join(format!("ready-{restarts}"));
    let edge = |f: &str| root.join("edge").join(f).to_str().unwrap().to_string();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(slot.dir.join("node.log"))
        .unwrap();
    let child = Command::new(BIN)
        .args(["node", "--listen", &format!("{}:{QUIC_PORT}", slot.ip)])
        .args(["--admin", "127.0.0.1:0"])
        .args(["--https", &format!("{}:{HTTPS_PORT}", slot.ip)])
        .args(["--domain", DOMAIN])
        .args([
            "--edge-cert",
            &edge("edge.crt"),
            "--edge-key",
            &edge("edge.key"),
        ])
        .args(["--ca", root.join("ca/ca.crt").to_str().unwrap()])
        .args(["--cert", slot.dir.join("node.crt").to_str().unwrap()])
        .args(["--key", slot.dir.join("node.key").to_str().unwrap()])
        .args(["--ready-file", ready.to_str().unwrap()])
        .args(["--join", &seeds.join(",")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn specter node");
    slot.child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&ready) {
            break t;
        }
        assert!(Instant::now() < deadline, "node {} not ready", slot.ip);
        std::thread::sleep(Duration::from_millis(10));
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    slot.id = v["id"].as_str().unwrap().to_string();
    slot.admin = v["admin"].as_str().and_then(|a| a.parse().ok());
}

/// Has the node joined and does it see `others` live members?
fn joined(slot: &Slot, others: usize) -> bool {
    let Some(admin) = slot.admin else {
        return false;
    };
    let proc_like = procs::http_get(admin, "/status")
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok());
    proc_like.is_some_and(|s| {
        let alive = s["members"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["state"] == "alive").count());
        s["joined"] == true && alive >= others
    })
}

/// The client's attachments as its output tells them.
#[derive(Default)]
struct ClientView {
    /// Attached node id → when it attached.
    held: HashMap<String, Instant>,
    silent: HashSet<String>,
    /// A killed attached node `(id, when)`, and `k`: the time the client was
    /// back to k healthy attachments without it goes to `restored`.
    watch: Option<(String, Instant, usize)>,
    restored: Option<Instant>,
}

impl ClientView {
    fn apply(&mut self, line: &str, at: Instant) {
        let word_after = |marker: &str| {
            line.split_once(marker)
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .map(str::to_string)
        };
        if let Some(id) = word_after("attached to node ") {
            self.held.insert(id.clone(), at);
            self.silent.remove(&id);
        } else if let Some(id) = word_after("lost node ") {
            self.held.remove(&id);
            self.silent.remove(&id);
        } else if line.contains(" is silent") {
            if let Some(id) = word_after(": node ") {
                self.silent.insert(id);
            }
        } else if line.contains(" answers again")
            && let Some(id) = word_after(": node ")
        {
            self.silent.remove(&id);
        }
        self.check(at);
    }

    /// Records `at` as the restore time once the client is back to k.
    fn check(&mut self, at: Instant) {
        if let Some((victim, killed, k)) = &self.watch
            && self.restored.is_none()
            && self.healthy_without(victim, *killed) >= *k
        {
            self.restored = Some(at);
        }
    }

    /// Healthy attachments that do not rely on a connection to `victim`
    /// made before `killed`.
    fn healthy_without(&self, victim: &str, killed: Instant) -> usize {
        self.held
            .iter()
            .filter(|(id, at)| {
                !self.silent.contains(*id) && (id.as_str() != victim || **at > killed)
            })
            .count()
    }

    fn attached(&self) -> Vec<String> {
        self.held
            .keys()
            .filter(|id| !self.silent.contains(*id))
            .cloned()
            .collect()
    }
}

/// The sample service: `GET /PATH` answers a body that starts with PATH,
/// with its SHA-256 in `x-checksum`.
fn body_for(path: &str) -> Vec<u8> {
    let digest = Sha256::digest(path.as_bytes());
    let len = 256 + usize::from(u16::from_le_bytes([digest[0], digest[1]]) % 8_192);
    let mut body = format!("{path}\n").into_bytes();
    let mut block = digest;
    while body.len() < len {
        body.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    body.truncate(len.max(path.len() + 1));
    body
}

async fn service() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = body_for(req.uri().path());
                        let sum = hex::encode(Sha256::digest(&body));
                        let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                        resp.headers_mut()
                            .insert("x-checksum", sum.parse().unwrap());
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Failed,
    Mismatch,
}

struct Sample {
    entry: usize,
    start: Instant,
    end: Instant,
    outcome: Outcome,
    why: String,
}

/// When each node was down: `(killed, back)`.
type Downtime = Arc<Mutex<Vec<Vec<(Instant, Option<Instant>)>>>>;

fn is_up(down: &Downtime, entry: usize) -> bool {
    down.lock().unwrap()[entry]
        .last()
        .is_none_or(|(_, back)| back.is_some())
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>;

async fn connect(tls: Arc<rustls::ClientConfig>, addr: &str) -> Result<Sender, String> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let host = rustls::pki_types::ServerName::try_from(format!("{NAME}.{DOMAIN}")).unwrap();
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(tls).connect(host, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS: {e}"))?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn request(sender: &mut Sender, path: &str) -> Result<Outcome, String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let req = hyper::Request::get(path)
        .header("host", format!("{NAME}.{DOMAIN}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(15), sender.send_request(req))
        .await
        .map_err(|_| "no answer in 15 s".to_string())?
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let sum = resp
        .headers()
        .get("x-checksum")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = tokio::time::timeout(Duration::from_secs(15), resp.into_body().collect())
        .await
        .map_err(|_| "body timed out".to_string())?
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    if status != 200 {
        let text = String::from_utf8_lossy(&body);
        let reason = text
            .split("<p>")
            .nth(1)
            .and_then(|t| t.split("</p>").next())
            .unwrap_or("");
        return Err(format!("{status} {reason}"));
    }
    let intact = sum.as_deref() == Some(hex::encode(Sha256::digest(&body)).as_str())
        && body.as_ref() == body_for(path).as_slice();
    Ok(if intact {
        Outcome::Ok
    } else {
        Outcome::Mismatch
    })
}

async fn visitor(
    entry: usize,
    worker: usize,
    tls: Arc<rustls::ClientConfig>,
    down: Downtime,
    samples: Arc<Mutex<Vec<Sample>>>,
    until: Instant,
) {
    let addr = format!("{}:{HTTPS_PORT}", ip(entry));
    let mut sender: Option<Sender> = None;
    let mut seq = 0u64;
    while Instant::now() < until {
        if !is_up(&down, entry) {
            sender = None;
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        seq += 1;
        let path = format!("/e{entry}/w{worker}/{seq}");
        let start = Instant::now();
        let result = async {
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                sender = Some(connect(tls.clone(), &addr).await?);
            }
            let s = sender.as_mut().expect("connected above");
            request(s, &path).await
        }
        .await;
        let end = Instant::now();
        let (outcome, why) = match result {
            Ok(o) => (o, String::new()),
            Err(why) => {
                sender = None;
                (Outcome::Failed, why)
            }
        };
        samples.lock().unwrap().push(Sample {
            entry,
            start,
            end,
            outcome,
            why,
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The `permille`/1000 quantile of sorted latencies.
fn pct(sorted: &[Duration], permille: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() - 1) * permille / 1000]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// The nodes that should hold `name`'s record: the owner (first id at or
/// after the key) and the next ones up to the replication factor, or every
/// node in a ring too small to keep consistent (see `DhtNode::replica_set`).
fn replica_holders(ids: &[u64], name: &str) -> Vec<u64> {
    let key = specter_dht::key_of(name);
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let first = sorted.iter().position(|&id| id >= key).unwrap_or(0);
    let holders = if sorted.len() <= specter_dht::ring::SUCCESSORS {
        sorted.len()
    } else {
        specter_dht::node::REPLICATION_FACTOR
    };
    (0..holders)
        .map(|i| sorted[(first + i) % sorted.len()])
        .collect()
}

#[allow(clippy::too_many_lines)]
fn main() {
    let args = Args::parse();
    assert!(
        args.mode == "attached" || args.mode == "replica",
        "--mode is attached or replica"
    );
    let k = args
        .attachments
        .unwrap_or(if args.mode == "replica" { 2 } else { 3 });
    let tmp = tempfile::tempdir().unwrap();
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&root).unwrap();
    let ca_dir = ca(&root);
    issue_edge(&root, &ca_dir, DOMAIN);
    let ips: Vec<String> = (0..args.nodes).map(ip).collect();
    let dirs = issue_all(&root, &ca_dir, &ips);
    let seeds: Vec<String> = ips.iter().map(|i| format!("{i}:{QUIC_PORT}")).collect();
    let mut slots: Vec<Slot> = ips
        .iter()
        .zip(&dirs)
        .map(|(ip, dir)| Slot {
            ip: ip.clone(),
            dir: dir.clone(),
            child: None,
            id: String::new(),
            admin: None,
        })
        .collect();
    let mut restarts = 0;
    for slot in &mut slots {
        start(slot, &root, &seeds, restarts);
    }
    let n = args.nodes;
    procs::wait_for(Duration::from_secs(30), || {
        slots.iter().all(|s| joined(s, n - 1))
    })
    .expect("the overlay formed");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let svc = rt.block_on(service());

    // The client.
    let mut client = Reaped(
        tunnel_cmd(
            &root,
            "client",
            NAME,
            &format!("http://{svc}"),
            &seeds.join(","),
        )
        .args(["--attachments", &k.to_string()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(root.join("client.log")).unwrap(),
        ))
        .spawn()
        .expect("spawn specter tunnel"),
    );
    let view = Arc::new(Mutex::new(ClientView::default()));
    let began = Instant::now();
    {
        let view = view.clone();
        let stdout = client.0.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                println!(
                    "[{:7.3}] client: {line}",
                    at.duration_since(began).as_secs_f64()
                );
                view.lock().unwrap().apply(&line, at);
            }
        });
    }
    procs::wait_for(Duration::from_secs(30), || {
        view.lock().unwrap().attached().len() >= k
    })
    .expect("the client attached to k nodes");

    // Visitors through every node.
    let ca_pem = std::fs::read(root.join("ca/ca.crt")).unwrap();
    let (roots, _) = specter::net::tls::roots_from_pem(&ca_pem).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(specter::net::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = Arc::new(tls);
    let down: Downtime = Arc::new(Mutex::new(vec![Vec::new(); n]));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let load_began = Instant::now();
    let until = load_began + Duration::from_secs_f64(args.duration);
    for entry in 0..n {
        for worker in 0..args.visitors {
            rt.spawn(visitor(
                entry,
                worker,
                tls.clone(),
                down.clone(),
                samples.clone(),
                until,
            ));
        }
    }

    // Kills.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(args.seed);
    let mut kills: Vec<(f64, usize, String, Option<Duration>)> = Vec::new();
    let mut next_kill = load_began + Duration::from_secs_f64(args.period);
    let mut pending_restart: Vec<(Instant, usize)> = Vec::new();
    let mut awaiting: Option<(usize, Instant)> = None;
    let stamp = |t: Instant| t.duration_since(began).as_secs_f64();
    while Instant::now() < until {
        let now = Instant::now();
        // Restore-to-k of the last attached kill.
        if let Some((i, killed)) = awaiting
            && let Some(at) = view.lock().unwrap().restored
        {
            kills[i].3 = Some(at.duration_since(killed));
            awaiting = None;
        }
        // Restarts.
        pending_restart.retain(|&(at, idx)| {
            if now < at {
                return true;
            }
            restarts += 1;
            start(&mut slots[idx], &root, &seeds, restarts);
            let up = slots.iter().filter(|s| s.child.is_some()).count();
            procs::wait_for(Duration::from_secs(20), || joined(&slots[idx], up - 1))
                .expect("the restarted node rejoined");
            let back = Instant::now();
            if let Some(last) = down.lock().unwrap()[idx].last_mut() {
                last.1 = Some(back);
            }
            println!(
                "[{:7.3}] node {} ({}) restarted and joined",
                stamp(back),
                slots[idx].id,
                slots[idx].ip
            );
            false
        });
        if now >= next_kill && awaiting.is_none() {
            next_kill += Duration::from_secs_f64(args.period);
            let up: Vec<usize> = (0..n).filter(|&i| slots[i].child.is_some()).collect();
            let attached = view.lock().unwrap().attached();
            let candidates: Vec<usize> = if args.mode == "attached" {
                up.iter()
                    .copied()
                    .filter(|&i| attached.contains(&slots[i].id))
                    .collect()
            } else {
                let ids: Vec<u64> = slots
                    .iter()
                    .map(|s| u64::from_str_radix(&s.id, 16).unwrap())
                    .collect();
                let holders = replica_holders(&ids, NAME);
                up.iter()
                    .copied()
                    .filter(|&i| !attached.contains(&slots[i].id) && holders.contains(&ids[i]))
                    .collect()
            };
            let Some(&victim) = candidates.choose(&mut rng) else {
                println!(
                    "[{:7.3}] no node to kill in mode {}; skipping",
                    stamp(now),
                    args.mode
                );
                continue;
            };
            let killed = Instant::now();
            if args.mode == "attached" {
                let mut v = view.lock().unwrap();
                v.watch = Some((slots[victim].id.clone(), killed, k));
                v.restored = None;
                // A spare attachment may already cover the loss.
                v.check(killed);
            }
            if let Some(mut c) = slots[victim].child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            down.lock().unwrap()[victim].push((killed, None));
            let id = slots[victim].id.clone();
            println!(
                "[{:7.3}] SIGKILL node {id} ({})",
                stamp(killed),
                slots[victim].ip
            );
            kills.push((stamp(killed), victim, id.clone(), None));
            if args.mode == "attached" {
                awaiting = Some((kills.len() - 1, killed));
            }
            pending_restart.push((killed + Duration::from_secs_f64(args.restart_after), victim));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Let the last requests finish, and the last kill be repaired.
    std::thread::sleep(Duration::from_secs(1));
    if let Some((i, killed)) = awaiting {
        let restored = procs::wait_for(Duration::from_secs(5), || {
            view.lock().unwrap().restored.is_some()
        });
        if restored.is_some() {
            let at = view.lock().unwrap().restored.unwrap();
            kills[i].3 = Some(at.duration_since(killed));
        }
    }
    drop(client);

    // Report.
    let samples = samples.lock().unwrap();
    let down = down.lock().unwrap();
    let entry_was_down = |s: &Sample| {
        down[s.entry]
            .iter()
            .any(|(killed, back)| *killed <= s.end && back.is_none_or(|b| b >= s.start))
    };
    println!();
    println!(
        "chaos-kill: {n} nodes, k = {k}, mode {}, a kill every {} s, restart after {} s, {} s, {} visitors per node",
        args.mode, args.period, args.restart_after, args.duration, args.visitors
    );
    println!();
    println!(
        "| entry node | requests | failed (entry up) | corrupted | cut by own kill | p50 | p99 | max |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut bad = 0;
    let mut corrupted = 0;
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for (entry, slot) in slots.iter().enumerate() {
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.entry == entry).collect();
        let (cut, counted): (Vec<&Sample>, Vec<&Sample>) =
            mine.iter().partition(|s| entry_was_down(s));
        let failed: Vec<&&Sample> = counted
            .iter()
            .filter(|s| s.outcome == Outcome::Failed)
            .collect();
        let mism = mine
            .iter()
            .filter(|s| s.outcome == Outcome::Mismatch)
            .count();
        for f in &failed {
            *reasons.entry(f.why.clone()).or_default() += 1;
        }
        bad += failed.len();
        corrupted += mism;
        let mut lat: Vec<Duration> = counted
            .iter()
            .filter(|s| s.outcome == Outcome::Ok)
            .map(|s| s.end - s.start)
            .collect();
        lat.sort();
        println!(
            "| {} ({}) | {} | {} | {} | {} | {} | {} | {} |",
            slot.id,
            slot.ip,
            mine.len(),
            failed.len(),
            mism,
            cut.len(),
            ms(pct(&lat, 500)),
            ms(pct(&lat, 990)),
            ms(lat.last().copied().unwrap_or_default()),
        );
    }
    println!();
    println!("| kill | at | node | back to k attachments |");
    println!("|---:|---:|---|---:|");
    let mut restores = Vec::new();
    for (i, (at, _, id, restore)) in kills.iter().enumerate() {
        let shown = match (args.mode.as_str(), restore) {
            ("replica", _) => "n/a (no attachment)".to_string(),
            (_, Some(d)) => {
                restores.push(*d);
                ms(*d)
            }
            (_, None) => "not within the run".to_string(),
        };
        println!("| {} | {at:.1} s | {id} | {shown} |", i + 1);
    }
    restores.sort();
    println!();
    if !restores.is_empty() {
        println!(
            "restore to k: median {}, max {} over {} kills",
            ms(pct(&restores, 500)),
            ms(*restores.last().unwrap()),
            restores.len()
        );
    }
    let total = samples.len();
    println!(
        "requests: {total}, failed through a live entry node: {bad}, corrupted bodies: {corrupted}"
    );
    for (why, count) in &reasons {
        println!("  failure: {count} × {why}");
    }
    let unrestored = args.mode == "attached" && kills.iter().any(|k| k.3.is_none());
    if args.dir.is_none() && (bad > 0 || corrupted > 0) {
        let kept = tmp.keep();
        println!("logs kept in {}", kept.display());
    }
    // `exit` skips destructors: stop the nodes first.
    drop(slots);
    if bad > 0 || corrupted > 0 || total == 0 || kills.is_empty() || unrestored {
        println!("FAIL");
        std::process::exit(1);
    }
    println!("PASS");
}
