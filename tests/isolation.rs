//! Tenants that share a pair of nodes cannot stall each other. Every
//! forwarded visitor and every DHT request between two nodes rides one QUIC
//! connection and its flow-control credit; a tunnel whose target never reads
//! must not be able to take that credit from the others.
//!
//! Real `specter` processes: two nodes, A (both clients attach there) and E
//! (the entry the visitors use, so every visit is forwarded E → A). The
//! attacker's target accepts connections and never reads; hundreds of
//! raw-TCP visitors upload to it through E without pause. Meanwhile another
//! tenant's HTTPS visitors fetch through E, and DHT gets run from E for names
//! A owns.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::procs::*;
use common::web::{DOMAIN, client_config, get_from, http_service, ingress_cluster, tls_from};
use specter::node::tunnels::slots::FORWARDS_PER_TUNNEL;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The attacks share the machine's two cores: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Uploaders in the attack: 320 streams of 512 KiB each would hold more
/// than the node pair's whole 128 MiB window, were they all let through.
const UPLOADERS: usize = 320;
/// Source addresses they come from (the ingress bounds handshakes per
/// address).
const UPLOAD_SOURCES: u8 = 40;

/// E's `write_stall_timeout` in the attack test (seconds): short, so the
/// test sees the sockets come back in seconds.
const ENTRY_STALL_SECS: u64 = 3;

/// The attack: uploaders fill their streams for this long, then the
/// measurements run for `ATTACK_SECS`.
const FILL_SECS: u64 = 4;
const ATTACK_SECS: u64 = 12;

/// A TCP service that accepts connections and never reads them.
fn never_reading_service() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    addr
}

/// One uploader: raw TCP through the entry, writing without pause; again
/// whenever the node ends it, until `stop`.
async fn upload(source: IpAddr, entry: SocketAddr, ca: &Path, stop: Arc<AtomicBool>) {
    let host = format!("hog.{DOMAIN}");
    let chunk = vec![0x55u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut tls) =
            tls_from(source, entry, &host, client_config(ca, &[b"specter-tcp"])).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(500), tls.write_all(&chunk)).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(_)) => break,
            }
        }
    }
}

/// One HTTPS fetch of the other tenant's service through the entry.
async fn fetch(entry: SocketAddr, ca: &Path) -> Result<Duration, String> {
    let host = format!("web.{DOMAIN}");
    get_from(IpAddr::from([127, 0, 0, 200]), ca, entry, &host, "/other").await
}

/// How long a DHT get of `name` takes from `node` (the lookup's own time,
/// as the node reports it), and its hops; or the node's error.
fn dht_get(node: &Proc, name: &str) -> Result<(Duration, u64), String> {
    let answer = http_get(node.admin(), &format!("/dht/get?name={name}")).expect("admin answers");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    let ms = answer["latency_ms"]
        .as_f64()
        .ok_or_else(|| answer.to_string())?;
    Ok((
        Duration::from_secs_f64(ms / 1e3),
        answer["hops"].as_u64().unwrap_or(0),
    ))
}

/// Names whose lookups from `from` go to the other node.
fn names_elsewhere(from: &Proc, n: usize) -> Vec<String> {
    (0..200)
        .map(|i| format!("probe-{i}"))
        .filter(|name| dht_get(from, name).unwrap().1 > 0)
        .take(n)
        .collect()
}

/// Two nodes with TLS ingress and `config` as their `node.toml`: A, where
/// the tunnels attach, and E, where the visitors enter; the CA file, E's
/// HTTPS address, and a runtime for the visitors.
struct NodePair {
    dir: tempfile::TempDir,
    attached: Proc,
    entry_node: Proc,
    ca_file: std::path::PathBuf,
    entry: SocketAddr,
    rt: tokio::runtime::Runtime,
}

impl NodePair {
    fn start(ips: [&str; 2], config: &str) -> NodePair {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = ca(dir.path());
        let config_file = dir.path().join("node.toml");
        std::fs::write(&config_file, config).unwrap();
        let config_file = config_file.to_str().unwrap().to_string();
        let ips = ips.map(str::to_string);
        let mut nodes = ingress_cluster(dir.path(), &ca_dir, &ips, |_| {
            vec!["--config".into(), config_file.clone()]
        });
        let entry_node = nodes.remove(1);
        let attached = nodes.remove(0);
        let ca_file = dir.path().join("ca/ca.crt");
        let entry = entry_node.https().parse().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        NodePair {
            dir,
            attached,
            entry_node,
            ca_file,
            entry,
            rt,
        }
    }

    /// A client serving `name` at `to`, attached to A alone.
    fn attach(&self, name: &str, to: &str) -> Reaped {
        attach_one(self.dir.path(), name, name, to, &self.attached.quic())
    }

    /// E's `specter_forward_waits_total`.
    fn forward_waits(&self) -> u64 {
        metric(&self.entry_node, "specter_forward_waits_total ")
    }
}

#[test]
fn a_tunnel_whose_target_never_reads_cannot_stall_other_tenants_on_the_node_pair() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Short stall deadline so the test sees the sockets come back in
    // seconds; the mechanism is the one the 30 s default drives.
    let pair = NodePair::start(
        ["127.0.88.1", "127.0.88.2"],
        &format!(
            "[ingress]\nwrite_stall_timeout = {ENTRY_STALL_SECS}\nhandshakes_per_source = 64\n"
        ),
    );
    let hog_client = pair.attach("hog", &format!("tcp://{}", never_reading_service()));
    let _web_client = pair.attach("web", &format!("http://{}", http_service()));
    let waits_now = || pair.forward_waits();
    let NodePair {
        attached,
        entry_node,
        ca_file,
        entry,
        rt,
        ..
    } = &pair;
    let entry = *entry;

    // Before: the other tenant's visits and the DHT, for comparison.
    let a_names = names_elsewhere(entry_node, 10);
    assert!(a_names.len() >= 5, "few names owned by A: {a_names:?}");
    for _ in 0..5 {
        rt.block_on(fetch(entry, ca_file)).unwrap();
    }
    let quiet_dht: Vec<Duration> = a_names
        .iter()
        .map(|n| dht_get(entry_node, n).unwrap().0)
        .collect();
    let fd_baseline = (open_fds(entry_node.child.id()), open_fds(hog_client.0.id()));

    // The attack.
    let stop = Arc::new(AtomicBool::new(false));
    let mut uploaders = Vec::new();
    for i in 0..UPLOADERS {
        let source = IpAddr::from([
            127,
            0,
            89,
            1 + u8::try_from(i % usize::from(UPLOAD_SOURCES)).unwrap(),
        ]);
        let (ca_file, stop) = (ca_file.clone(), stop.clone());
        uploaders.push(rt.spawn(async move { upload(source, entry, &ca_file, stop).await }));
    }
    // Let the streams fill: every uploader pushes until blocked.
    std::thread::sleep(Duration::from_secs(FILL_SECS));
    let (mut took, mut failed, mut dht) = (Vec::new(), Vec::new(), Vec::new());
    let mut dht_failed = Vec::new();
    let (mut rss_entry, mut rss_attached) = (0, 0);
    // Streams E holds open to A, as A counts them.
    let mut peer_streams = 0;
    let attack_until = Instant::now() + Duration::from_secs(ATTACK_SECS);
    while Instant::now() < attack_until {
        match rt.block_on(fetch(entry, ca_file)) {
            Ok(t) => took.push(t),
            Err(e) => failed.push(e),
        }
        for name in &a_names {
            match dht_get(entry_node, name) {
                Ok((took, _)) => dht.push(took),
                Err(e) => dht_failed.push(e),
            }
        }
        rss_entry = rss_entry.max(rss_kib(entry_node.child.id()).unwrap_or(0));
        rss_attached = rss_attached.max(rss_kib(attached.child.id()).unwrap_or(0));
        peer_streams = peer_streams.max(metric(attached, "specter_quic_peer_streams "));
        std::thread::sleep(Duration::from_millis(100));
    }
    let waits = waits_now();
    stop.store(true, Ordering::Relaxed);
    for u in uploaders {
        rt.block_on(u).unwrap();
    }
    println!(
        "other tenant: {} fetches, p99 {:?}; DHT gets from E for names A owns: p99 {:?} (quiet: p99 {:?}); \
         forwarded visitors that waited for a slot: {waits}; streams E held open to A: {peer_streams} at most; \
         peak RSS E {} MiB, A {} MiB",
        took.len(),
        p99(took.clone()),
        p99(dht.clone()),
        p99(quiet_dht.clone()),
        rss_entry / 1024,
        rss_attached / 1024,
    );
    assert!(
        failed.is_empty(),
        "the other tenant's visits failed: {failed:?}"
    );
    assert!(took.len() >= 10, "only {} fetches", took.len());
    assert!(p99(took) < Duration::from_secs(1), "the other tenant's p99");
    assert!(dht_failed.is_empty(), "DHT gets failed: {dht_failed:?}");
    // Answered, and within the bound the other tenant's fetches have. What
    // this guards against is gets starved of the pair's credit, which
    // failed at their 2 s deadline. Since the attached node and the client
    // let a stream go as soon as the hop before stopped reading it
    // (`splice_watching`), the attack's freed slots take fresh streams at
    // once and it moves more bytes: the gets' p99 was 45–85 ms in most runs
    // on a slow day, above 100 ms in one full suite run, and 72–417 ms in
    // an earlier trial of the same change.
    let dht_bound = Duration::from_secs(1).max(p99(quiet_dht) * 10);
    assert!(p99(dht) < dht_bound, "DHT gets' p99 over {dht_bound:?}");
    assert!(waits > 0, "the attack never reached the tunnel's bound");
    // At least the tunnel's bound. At most that many more for every time E
    // gave its streams up at its stall deadline during the attack: A (and
    // the client behind it) hold a stream E gave up until their own 30 s
    // stall deadline, since a splice blocked on the client's side reads
    // nothing from E's. Bounded by the slots; unbounded would be thousands.
    // (Plus the other tenant's upstream and a DHT request or two.)
    let bound = FORWARDS_PER_TUNNEL as u64;
    let give_ups = (FILL_SECS + ATTACK_SECS) / ENTRY_STALL_SECS + 1;
    assert!(
        (bound..=bound * (1 + give_ups) + 8).contains(&peer_streams),
        "A counted {peer_streams} streams from E at most"
    );

    // After: the entry's sockets come back (its stalled splices end at its
    // 3 s stall deadline, the others once their visitor or A is gone), and the
    // attacker's client closes its connections to the target. Each hop that
    // ends its splice stops reading its stream, and the hop before it sees
    // that (`splice_watching`) even when its splice is half-closed and idle
    // (the uploader finished, the target never answers): before, such
    // splices at the attached node and the client wrote nothing, so never
    // learnt, and held their sockets and streams for good. Now well under a
    // second each; 20 s is a margin for a loaded machine.
    let entry_settled = wait_for(Duration::from_secs(20), || {
        open_fds(entry_node.child.id()) <= fd_baseline.0 + 4
    });
    assert!(
        entry_settled.is_some(),
        "descriptors at E: {} (baseline {})",
        open_fds(entry_node.child.id()),
        fd_baseline.0
    );
    let client_settled = wait_for(Duration::from_secs(20), || {
        open_fds(hog_client.0.id()) <= fd_baseline.1 + 4
    });
    assert!(
        client_settled.is_some(),
        "descriptors of the attacker's client: {} (baseline {})",
        open_fds(hog_client.0.id()),
        fd_baseline.1
    );
    println!(
        "descriptors back: E after {:?}, the attacker's client after {:?} more",
        entry_settled.unwrap(),
        client_settled.unwrap()
    );
    // The attached node ended its blocked splices (and counted them).
    let broken = metric(attached, "specter_forwards_broken_total ");
    assert!(broken > 0, "no forwarded splice ended at A");
    // Back to what the other tenant and the DHT hold now and then.
    let streams_back = wait_for(Duration::from_secs(40), || {
        metric(attached, "specter_quic_peer_streams ") <= 4
    });
    assert!(
        streams_back.is_some(),
        "A still counts {} streams from E",
        metric(attached, "specter_quic_peer_streams ")
    );
    // And the other tenant is served as before.
    rt.block_on(fetch(entry, ca_file)).unwrap();
}

/// Keep-alive HTTPS visitors through E: `requests` each, one after another
/// on one connection; the latency of every answer.
async fn keepalive_visitor(
    entry: SocketAddr,
    ca: &Path,
    host: &str,
    requests: usize,
) -> Result<Vec<Duration>, String> {
    let config = client_config(ca, &[b"http/1.1"]);
    let mut tls = tls_from(IpAddr::from([127, 0, 0, 201]), entry, host, config)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut took = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..requests {
        let began = Instant::now();
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n\r\nok") {
            let read = tokio::time::timeout(Duration::from_secs(15), tls.read(&mut buf)).await;
            match read {
                Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
                other => {
                    return Err(format!(
                        "after {} answers: {other:?}, got {:?}",
                        took.len(),
                        String::from_utf8_lossy(&answer)
                    ));
                }
            }
        }
        if !answer.starts_with(b"HTTP/1.1 200") {
            return Err(String::from_utf8_lossy(&answer).to_string());
        }
        took.push(began.elapsed());
    }
    Ok(took)
}

/// A tunnel with more keep-alive visitors through a node pair than its bound
/// of forwarded streams: the ones past it wait for a stream of the tunnel to
/// be done (an answered upstream is then closed instead of kept idle, so it
/// frees its slot), never for the visit's 10 s deadline.
#[test]
fn visitors_past_a_tunnels_bound_wait_for_a_stream_and_are_all_answered() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    const VISITORS: usize = 16;
    const REQUESTS: usize = 40;
    let pair = NodePair::start(
        ["127.0.88.3", "127.0.88.4"],
        "[clients]\nforwards_per_tunnel = 4\n",
    );
    let (service, _) = common::web::keepalive_service();
    let _client = pair.attach("ka", &format!("http://{service}"));
    let (ca_file, entry, rt) = (&pair.ca_file, pair.entry, &pair.rt);
    let host = format!("ka.{DOMAIN}");
    let visitors: Vec<_> = (0..VISITORS)
        .map(|_| {
            let (ca_file, host) = (ca_file.clone(), host.clone());
            rt.spawn(async move { keepalive_visitor(entry, &ca_file, &host, REQUESTS).await })
        })
        .collect();
    let mut took = Vec::new();
    for v in visitors {
        took.extend(rt.block_on(v).unwrap().expect("every request answered"));
    }
    let waits = pair.forward_waits();
    let slowest = *took.iter().max().unwrap();
    println!(
        "{} answers, p99 {:?}, slowest {slowest:?}; {waits} visits waited for a slot",
        took.len(),
        p99(took.clone())
    );
    assert_eq!(took.len(), VISITORS * REQUESTS);
    assert!(waits > 0, "the bound was never reached");
    assert!(
        slowest < Duration::from_secs(5),
        "a visit waited {slowest:?}"
    );
}
