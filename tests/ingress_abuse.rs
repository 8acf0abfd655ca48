//! One abusive visitor cannot take a node's ingress down. Each test runs a
//! real node with a TLS ingress and a tunnel client, floods it one way from
//! a few addresses, and meanwhile has a legitimate HTTPS visitor (from an
//! address of its own) fetch through the same node: every fetch must be
//! answered, p99 under 1 s. Afterwards the node's descriptors come back.
//!
//! The deadlines are shortened in the nodes' `[ingress]` settings so the
//! tests take seconds; the mechanisms are the ones the defaults drive.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::procs::*;
use common::web::{
    DOMAIN, client_config, curl, get_from, http_service, ingress_cluster_via, silent_taken,
    tcp_from, tls_from,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The floods share the machine's two cores: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The legitimate visitor's address.
const LEGIT: [u8; 4] = [127, 0, 0, 200];

/// A node with a TLS ingress, a client attached to it, and the runtime the
/// attacks and probes run on.
struct Fixture {
    dir: tempfile::TempDir,
    node: Proc,
    client: Reaped,
    host: String,
    rt: tokio::runtime::Runtime,
}

impl Fixture {
    /// A node on `ip` with `ingress` as its `[ingress]` settings, run
    /// through `launcher` if given.
    fn start(ip: &str, ingress: &str, launcher: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = ca(dir.path());
        let config = dir.path().join("node.toml");
        std::fs::write(&config, format!("[ingress]\n{ingress}\n")).unwrap();
        let config = config.to_str().unwrap().to_string();
        let mut procs =
            ingress_cluster_via(launcher, dir.path(), &ca_dir, &[ip.to_string()], |_| {
                vec!["--config".into(), config.clone()]
            });
        let node = procs.remove(0);
        let service = http_service();
        let client = attach_one(
            dir.path(),
            "web",
            "web",
            &format!("http://{service}"),
            &node.quic(),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let fixture = Fixture {
            dir,
            node,
            client,
            host: format!("web.{DOMAIN}"),
            rt,
        };
        // Warm up: the route is known and the path open.
        for _ in 0..3 {
            fixture
                .rt
                .block_on(legit_get(&fixture.ca(), fixture.entry(), &fixture.host))
                .unwrap();
        }
        fixture
    }

    /// Attaches tunnel `name` (`scheme://` a port nobody listens on) to the
    /// node, one attachment, and waits for it.
    fn attach_refusing(&self, name: &str, scheme: &str) -> Reaped {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let to = format!("{scheme}://{closed}");
        attach_one(self.dir.path(), name, name, &to, &self.node.quic())
    }

    fn entry(&self) -> SocketAddr {
        self.node.https().parse().unwrap()
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca/ca.crt")
    }

    fn pid(&self) -> u32 {
        self.node.child.id()
    }

    fn metric(&self, line_start: &str) -> u64 {
        metric(&self.node, line_start)
    }

    fn visitors(&self) -> u64 {
        self.metric("specter_ingress_visitors ")
    }

    /// Runs `attack` while the legitimate visitor fetches every 100 ms;
    /// returns the attack's result and the visitor's latencies. Panics if a
    /// fetch failed.
    fn during<T: Send + 'static>(
        &self,
        attack: impl std::future::Future<Output = T> + Send + 'static,
    ) -> (T, Vec<Duration>) {
        let stop = Arc::new(AtomicBool::new(false));
        let (ca, entry, host) = (self.ca(), self.entry(), self.host.clone());
        let flag = stop.clone();
        let prober = self.rt.spawn(async move {
            let mut took = Vec::new();
            let mut failed = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match legit_get(&ca, entry, &host).await {
                    Ok(t) => took.push(t),
                    Err(e) => failed.push(e),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (took, failed)
        });
        let result = self.rt.block_on(attack);
        stop.store(true, Ordering::Relaxed);
        let (took, failed) = self.rt.block_on(prober).unwrap();
        assert!(failed.is_empty(), "legitimate fetches failed: {failed:?}");
        assert!(took.len() >= 5, "only {} legitimate fetches", took.len());
        (result, took)
    }
}

/// CPU time (user + system) a process has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 after ')'.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = 100; // USER_HZ on Linux
    Duration::from_millis(ticks * 1_000 / hz)
}

/// One legitimate HTTPS fetch from [`LEGIT`]: its latency, or what went
/// wrong.
async fn legit_get(ca: &Path, to: SocketAddr, host: &str) -> Result<Duration, String> {
    get_from(IpAddr::from(LEGIT), ca, to, host, "/legit").await
}

/// Waits until `conn` is closed by the node (EOF or an error); how long that
/// took, or `None` within `limit`.
async fn closed_within<R: tokio::io::AsyncRead + Unpin>(
    conn: &mut R,
    limit: Duration,
) -> Option<Duration> {
    let began = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| began.elapsed())
}

fn source(third: u8, fourth: u8) -> IpAddr {
    IpAddr::from([127, 0, third, fourth])
}

/// Waits for the node's descriptors and visitor count to come back near
/// `baseline` (fds) and 0; panics with what it saw otherwise.
fn settles(f: &Fixture, fd_baseline: usize) {
    let settled = wait_for(Duration::from_secs(15), || {
        open_fds(f.pid()) <= fd_baseline + 4 && f.visitors() <= 1
    });
    assert!(
        settled.is_some(),
        "descriptors {} (baseline {fd_baseline}), visitors {}",
        open_fds(f.pid()),
        f.visitors()
    );
}

#[test]
fn connections_idle_after_tls_are_cut_at_the_first_request_deadline() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fixture::start("127.0.10.1", "first_request_timeout = 2", &[]);
    let (fds, rss) = (open_fds(f.pid()), rss_kib(f.pid()).unwrap());
    let (ca, entry, host) = (f.ca(), f.entry(), f.host.clone());
    // 240 connections from 20 addresses (12 each, within the per-source
    // bounds): TLS, then an HTTP/2 preface and nothing, or nothing at all.
    let (cut, took) = f.during(async move {
        let mut tasks = Vec::new();
        for i in 0..240u16 {
            let (ca, host) = (ca.clone(), host.clone());
            tasks.push(tokio::spawn(async move {
                let h2 = i % 2 == 0;
                let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
                let from = source(11, u8::try_from(1 + i % 20).unwrap());
                let mut tls = tls_from(from, entry, &host, client_config(&ca, alpn))
                    .await
                    .unwrap();
                if h2 {
                    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                        .await
                        .unwrap();
                }
                closed_within(&mut tls, Duration::from_secs(8)).await
            }));
        }
        let mut cut = Vec::new();
        for t in tasks {
            cut.push(t.await.unwrap());
        }
        cut
    });
    let slowest = cut
        .iter()
        .map(|c| c.expect("an idle connection was never cut"))
        .max()
        .unwrap();
    assert!(slowest < Duration::from_secs(4), "cut after {slowest:?}");
    assert!(
        p99(took.clone()) < Duration::from_secs(1),
        "legitimate p99 {:?}",
        p99(took)
    );
    assert!(f.metric("specter_ingress_timeouts_total{stage=\"first_request\"}") >= 240);
    settles(&f, fds);
    let after = rss_kib(f.pid()).unwrap();
    println!(
        "idle-after-TLS flood: RSS {rss} KiB before, {after} KiB after; legitimate p99 {:?}",
        p99(took)
    );
}

#[test]
fn a_request_body_trickle_is_cut_within_its_rate_window() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fixture::start("127.0.10.2", "", &[]);
    let fds = open_fds(f.pid());
    let (ca, entry, host) = (f.ca(), f.entry(), f.host.clone());
    // 20 uploads that send one byte every 2 s: far below 1 KiB/s.
    let (cut, took) = f.during(async move {
        let mut tasks = Vec::new();
        for i in 0..20u8 {
            let (ca, host) = (ca.clone(), host.clone());
            tasks.push(tokio::spawn(async move {
                let from = source(12, 1 + i % 2);
                let mut tls = tls_from(from, entry, &host, client_config(&ca, &[b"http/1.1"]))
                    .await
                    .unwrap();
                let head = format!(
                    "POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000\r\n\r\n"
                );
                tls.write_all(head.as_bytes()).await.unwrap();
                let began = Instant::now();
                let (mut reader, mut writer) = tokio::io::split(tls);
                let drip = tokio::spawn(async move {
                    while writer.write_all(b"x").await.is_ok() {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                });
                let closed = closed_within(&mut reader, Duration::from_secs(20)).await;
                drip.abort();
                closed.map(|_| began.elapsed())
            }));
        }
        let mut cut = Vec::new();
        for t in tasks {
            cut.push(t.await.unwrap());
        }
        cut
    });
    for c in &cut {
        let c = c.expect("a trickling upload was never cut");
        assert!(
            c >= Duration::from_secs(9) && c < Duration::from_secs(13),
            "cut after {c:?}"
        );
    }
    assert!(
        p99(took.clone()) < Duration::from_secs(1),
        "legitimate p99 {:?}",
        p99(took.clone())
    );
    println!("legitimate p99 {:?}", p99(took));
    assert!(f.metric("specter_ingress_timeouts_total{stage=\"body_rate\"}") >= 20);
    settles(&f, fds);
}

#[test]
fn a_flood_of_silent_connections_from_one_address_gets_only_its_share() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fixture::start("127.0.10.3", "handshake_timeout = 3", &[]);
    let fds = open_fds(f.pid());
    let entry = f.entry();
    // 600 connections from one address that never send a ClientHello.
    let (held, took) = f.during(async move {
        let mut conns = Vec::new();
        for _ in 0..600 {
            if let Ok(c) = tcp_from(source(13, 1), entry).await {
                conns.push(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The node closed all but its share at once.
        let mut open = 0;
        for c in &mut conns {
            let mut b = [0u8; 1];
            // Nothing to read yet: still held (a closed one reads EOF).
            if tokio::time::timeout(Duration::from_millis(5), c.read(&mut b))
                .await
                .is_err()
            {
                open += 1;
            }
        }
        // Then the ones it held are cut at the handshake deadline.
        tokio::time::sleep(Duration::from_secs(4)).await;
        open
    });
    assert!(held <= 16, "one address holds {held} connections");
    assert!(
        p99(took.clone()) < Duration::from_secs(1),
        "legitimate p99 {:?}",
        p99(took.clone())
    );
    println!("legitimate p99 {:?}", p99(took));
    assert!(f.metric("specter_ingress_refused_total{reason=\"source_handshakes\"}") >= 580);
    assert!(f.metric("specter_ingress_timeouts_total{stage=\"handshake\"}") >= 1);
    settles(&f, fds);
}

#[test]
fn under_a_1024_descriptor_limit_a_flood_costs_little_cpu_and_few_log_lines() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fixture::start(
        "127.0.10.4",
        "handshake_timeout = 60",
        &["prlimit", "--nofile=1024:1024"],
    );
    let log = f.dir.path().join("127.0.10.4/127.0.10.4.log");
    let lines = || std::fs::read_to_string(&log).map_or(0, |t| t.lines().count());
    assert_eq!(f.metric("specter_ingress_max_visitors "), 1024 - 256);
    let (fds, lines_before) = (open_fds(f.pid()), lines());
    let entry = f.entry();
    let pid = f.pid();
    // 1,500 silent connections from 100 addresses (15 each, within every
    // per-source bound): more than the node may hold, so it sheds.
    let (conns, took) = f.during(async move {
        let mut conns = Vec::new();
        for i in 0..1_500u16 {
            let from = source(14, u8::try_from(1 + i % 100).unwrap());
            if let Ok(c) = tcp_from(from, entry).await {
                conns.push(c);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        conns
    });
    // The flood held, the legitimate visitor gone: what holding it costs.
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(5));
    let cpu = cpu_time(pid) - before;
    drop(conns);
    let share = cpu.as_secs_f64() / 5.0;
    assert!(
        share < 0.05,
        "the node used {:.1} % of a core holding the flood",
        share * 100.0
    );
    assert!(f.metric("specter_ingress_shed_total") >= 1_500 - 768);
    let logged = lines() - lines_before;
    assert!(logged < 50, "{logged} log lines during the flood");
    assert!(
        p99(took.clone()) < Duration::from_secs(1),
        "legitimate p99 {:?}",
        p99(took.clone())
    );
    println!("legitimate p99 {:?}", p99(took));
    settles(&f, fds);
    println!(
        "descriptor-limit flood: node CPU {:.2} %, {logged} log lines",
        share * 100.0
    );
}

#[test]
fn a_visitor_that_stops_reading_the_answer_is_cut_off() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fixture::start("127.0.10.5", "write_stall_timeout = 3", &[]);
    let fds = open_fds(f.pid());
    let (ca, entry, host) = (f.ca(), f.entry(), f.host.clone());
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let before = f.metric("specter_ingress_timeouts_total{stage=\"write_stall\"}");
        let (ca, host) = (ca.clone(), host.clone());
        let (cut, took) = f.during(async move {
            let config = client_config(&ca, &[alpn]);
            let tls = tls_from(source(15, 1), entry, &host, config).await.unwrap();
            if alpn == b"h2" {
                // An HTTP/2 request whose stream window is never opened
                // beyond the default: the client stops reading.
                let (mut send, conn) = h2_client(tls).await;
                let conn = tokio::spawn(conn);
                let req = hyper::Request::get(format!("https://{host}/big/100000000"))
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                // Read nothing of the body; wait for the node to give up.
                let _body = resp;
                let began = Instant::now();
                let ended = tokio::time::timeout(Duration::from_secs(20), conn).await;
                ended.ok().map(|_| began.elapsed())
            } else {
                let mut tls = tls;
                let req = format!("GET /big/100000000 HTTP/1.1\r\nHost: {host}\r\n\r\n");
                tls.write_all(req.as_bytes()).await.unwrap();
                let mut first = [0u8; 1024];
                let _ = tls.read(&mut first).await.unwrap();
                // Stop reading: buffers fill, then nothing moves.
                let began = Instant::now();
                tokio::time::sleep(Duration::from_secs(8)).await;
                let closed = closed_within(&mut tls, Duration::from_secs(60)).await;
                closed.map(|_| began.elapsed())
            }
        });
        assert!(
            cut.is_some(),
            "{} visitor that stopped reading was not cut",
            String::from_utf8_lossy(alpn)
        );
        assert!(
            p99(took.clone()) < Duration::from_secs(1),
            "legitimate p99 {:?}",
            p99(took)
        );
        let after = f.metric("specter_ingress_timeouts_total{stage=\"write_stall\"}");
        assert!(
            after > before,
            "no write stall counted for {}",
            String::from_utf8_lossy(alpn)
        );
    }
    settles(&f, fds);
}

/// An HTTP/2 client connection over `tls` that never reads response bodies
/// (so their stream windows stay full once the first 64 KiB arrived).
async fn h2_client(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    impl std::future::Future<Output = ()>,
) {
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    (send, async move {
        let _ = conn.await;
    })
}

#[test]
fn misdirected_requests_forged_forwarding_headers_and_http2_head_are_answered_right() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fixture::start("127.0.10.6", "", &[]);
    let https = f.node.https();
    let (ip, port) = https.rsplit_once(':').unwrap();
    let ca = f.ca();
    let curl_args = |host: &str| {
        let mut c = Command::new("curl");
        c.args(["-s", "-m", "10"])
            .arg("--cacert")
            .arg(&ca)
            .args(["--resolve", &format!("{host}:{port}:{ip}")]);
        c
    };
    // TLS name web, Host another tunnel: 421, over HTTP/1.1 and HTTP/2.
    for version in ["--http1.1", "--http2"] {
        let out = curl_args(&f.host)
            .args([version, "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-H", &format!("Host: other.{DOMAIN}")])
            .arg(format!("https://{}:{port}/", f.host))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "421", "{version}");
    }
    assert!(f.metric("specter_ingress_misdirected_total ") >= 2);
    // A forged X-Forwarded-For is replaced by the visitor's real address.
    let out = curl_args(&f.host)
        .args([
            "-H",
            "X-Forwarded-For: 6.6.6.6",
            "-H",
            "X-Forwarded-Proto: gopher",
        ])
        .arg(format!("https://{}:{port}/xff", f.host))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.starts_with("path=/xff xff=127.0.0.1 proto=https"),
        "{body}"
    );
    // HEAD over HTTP/2 on the node's own pages: 404 (unknown name) and 502
    // (a tunnel whose target refuses).
    let _down = f.attach_refusing("down", "http");
    for (name, code) in [("nobody", "404"), ("down", "502")] {
        let host = format!("{name}.{DOMAIN}");
        let out = curl_args(&host)
            .args(["--http2", "-I", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("https://{host}:{port}/"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl -I {host}: exit {:?}",
            out.status.code()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), code, "HEAD {host}");
        let (_, status) = curl(f.dir.path(), &https, &host, "/", true);
        assert_eq!(status, format!("2 {code}"));
    }
}

#[test]
fn raw_tcp_refusals_say_why_and_normal_ends_are_not_refusals() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fixture::start("127.0.10.7", "", &[]);
    let via = f.node.https();
    // `specter connect NAME.DOMAIN` through the node, quiet.
    let connect_cmd = |name: &str| {
        let mut cmd = Command::new(BIN);
        cmd.args(["connect", &format!("{name}.{DOMAIN}"), "--via", &via])
            .arg("--ca")
            .arg(f.ca())
            .env("RUST_LOG", "error");
        cmd
    };
    let connect = |name: &str, input: &[u8]| {
        let mut child = connect_cmd(name)
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = connect("nobody", b"x");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("no tunnel named nobody.{DOMAIN} is registered")),
        "{stderr}"
    );
    // `specter connect --listen` checks the name before it listens: an
    // unknown one is an error, and a known one is checked without a
    // connection to the target (a service that serves one session at a
    // time, as iperf3 does, would take it for a session).
    let listen = |name: &str| {
        connect_cmd(name)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let out = listen("nobody").wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("no tunnel named nobody.{DOMAIN} is registered")),
        "{stderr}"
    );
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    target.set_nonblocking(true).unwrap();
    let to = format!("tcp://{}", target.local_addr().unwrap());
    let _counted = attach_one(f.dir.path(), "counted", "counted", &to, &f.node.quic());
    let mut local = Reaped(listen("counted"));
    let lines = stdout_lines(&mut local.0);
    let line = wait_line(&lines, "listening on", Duration::from_secs(20))
        .expect("connect --listen did not listen");
    let addr = line.split_whitespace().nth(2).unwrap().to_string();
    assert_eq!(
        target.accept().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::WouldBlock),
        "checking the name reached the target"
    );
    // A local connection is one target connection, carrying its bytes.
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(&mut conn, b"hello").unwrap();
    let mut served = None;
    wait_for(Duration::from_secs(20), || {
        served = target.accept().ok().map(|(conn, _)| conn);
        served.is_some()
    });
    let mut served = served.expect("no target connection");
    served.set_nonblocking(false).unwrap();
    let mut got = [0u8; 5];
    std::io::Read::read_exact(&mut served, &mut got).unwrap();
    assert_eq!(&got, b"hello");
    assert_eq!(
        target.accept().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::WouldBlock),
        "one local connection reached the target twice"
    );
    drop(local);
    let _refused = f.attach_refusing("refused", "tcp");
    let out = connect("refused", b"x");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("could not reach the service it exposes"),
        "{stderr}"
    );
    // A normal raw session (an HTTP request over raw TCP, then EOF) is not
    // logged as a refusal.
    let log = f.dir.path().join("127.0.10.7/127.0.10.7.log");
    let refusals = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("visitor refused"))
            .count()
    };
    let before = refusals();
    let request = format!(
        "GET /raw HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        f.host
    );
    let out = connect("web", request.as_bytes());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(refusals(), before, "a normal end was logged as a refusal");
    // `specter status` shows the tunnel attached here and what was refused.
    let admin = f.node.admin().to_string();
    let out = Command::new(BIN)
        .args(["status", "--admin", &admin])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("web (1 connection(s))"), "{text}");
    assert!(text.contains(&format!("node {}", f.node.id())), "{text}");
    let out = Command::new(BIN)
        .args(["status", "--admin", &admin, "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = json["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["counted", "refused", "web"]);
}

#[test]
fn http2_pings_do_not_keep_a_connection_that_asks_for_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fixture::start(
        "127.0.10.8",
        "first_request_timeout = 2\nhttp_idle_timeout = 3",
        &[],
    );
    let (ca, entry, host) = (f.ca(), f.entry(), f.host.clone());
    let ended = f.rt.block_on(async move {
        let mut ended = Vec::new();
        // One client that never asks, one that asks once; both ping every
        // 500 ms and keep the connection busy with nothing else.
        for requests in [0, 1] {
            let tls = tls_from(source(16, 1), entry, &host, client_config(&ca, &[b"h2"]))
                .await
                .unwrap();
            let (mut send, conn) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive_interval(Duration::from_millis(500))
                    .keep_alive_while_idle(true)
                    .handshake::<_, http_body_util::Empty<bytes::Bytes>>(
                        hyper_util::rt::TokioIo::new(tls),
                    )
                    .await
                    .unwrap();
            let began = Instant::now();
            let conn = tokio::spawn(conn);
            for _ in 0..requests {
                let req = hyper::Request::get(format!("https://{host}/once"))
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            }
            let done = tokio::time::timeout(Duration::from_secs(15), conn).await;
            ended.push(done.ok().map(|_| began.elapsed()));
        }
        ended
    });
    let first = ended[0].expect("a pinging connection with no request was kept");
    assert!(first < Duration::from_secs(4), "cut after {first:?}");
    let idle = ended[1].expect("a pinging idle connection was kept");
    assert!(idle < Duration::from_secs(6), "cut after {idle:?}");
    assert!(f.metric("specter_ingress_timeouts_total{stage=\"first_request\"}") >= 1);
    assert!(f.metric("specter_ingress_timeouts_total{stage=\"idle\"}") >= 1);
}

#[test]
fn a_target_that_never_answers_gets_a_504_at_the_answer_deadline_and_is_let_go() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let limit = Duration::from_secs(2);
    let f = Fixture::start("127.0.10.9", "answer_timeout = 2", &[]);
    let fds = open_fds(f.pid());
    let client_fds = open_fds(f.client.0.id());
    let taken = silent_taken();
    let before = f.metric("specter_ingress_timeouts_total{stage=\"answer\"}");
    let (ca, entry, host) = (f.ca(), f.entry(), f.host.clone());
    // Without a body (the deadline runs from the request), and with one
    // (from the body's end), on fresh tunnel streams.
    let requests = [
        format!("GET /silent HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        format!("POST /silent HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello"),
    ];
    let (answers, took) = f.during(async move {
        let mut answers = Vec::new();
        for (request, fourth) in requests.iter().zip(1u8..) {
            let config = client_config(&ca, &[b"http/1.1"]);
            let mut tls = tls_from(source(17, fourth), entry, &host, config)
                .await
                .unwrap();
            let began = Instant::now();
            tls.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                let read = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf));
                match read.await {
                    Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
                    other => panic!("no answer: {other:?}"),
                }
            }
            answers.push((
                String::from_utf8_lossy(&answer).to_string(),
                began.elapsed(),
            ));
        }
        answers
    });
    for (answer, waited) in &answers {
        assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
        assert!(
            *waited >= limit && *waited < limit + Duration::from_secs(5),
            "answered after {waited:?}"
        );
    }
    assert!(
        p99(took.clone()) < Duration::from_secs(1),
        "legitimate p99 {:?}",
        p99(took)
    );
    let after = f.metric("specter_ingress_timeouts_total{stage=\"answer\"}");
    assert_eq!(after - before, 2, "each 504 is counted");
    assert_eq!(
        silent_taken() - taken,
        2,
        "both requests reached the target"
    );
    // The tunnel stream is reset with it, so the client closes its
    // connection to the target (which would hold it open for ever): a
    // clean end of the request would leave the client waiting for an answer.
    // (One more for the legitimate visitor's pooled upstream, which one of
    // the two may have taken and so made it open another; with the two held,
    // two more.)
    let client_settled = wait_for(Duration::from_secs(15), || {
        open_fds(f.client.0.id()) <= client_fds + 1
    });
    assert!(
        client_settled.is_some(),
        "the client holds {} descriptors, {client_fds} before",
        open_fds(f.client.0.id())
    );

    // A visitor that leaves before the answer began: no 504 is due, and
    // its stream is reset all the same. Its request takes the pooled
    // upstream if there is one (the client then holds one fewer once it is
    // reset), else opens one.
    let client_before = open_fds(f.client.0.id());
    let pooled = f.metric("specter_ingress_idle_upstreams ") > 0;
    let client_after = client_before - usize::from(pooled);
    let (ca, entry, host) = (f.ca(), f.entry(), f.host.clone());
    f.rt.block_on(async move {
        let config = client_config(&ca, &[b"http/1.1"]);
        let mut tls = tls_from(source(17, 3), entry, &host, config).await.unwrap();
        let request = format!("GET /silent HTTP/1.1\r\nHost: {host}\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while silent_taken() - taken < 3 {
            assert!(
                Instant::now() < deadline,
                "the request did not reach the target"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Gone, well before the 2 s answer deadline.
    });
    let client_settled = wait_for(Duration::from_secs(15), || {
        open_fds(f.client.0.id()) <= client_after
    });
    assert!(
        client_settled.is_some(),
        "after a visitor left, the client holds {} descriptors, {client_before} before (pooled: {pooled})",
        open_fds(f.client.0.id())
    );
    // Past the 2 s deadline: nothing was left to time out.
    let answered = wait_for(Duration::from_secs(3), || {
        f.metric("specter_ingress_timeouts_total{stage=\"answer\"}") > after
    });
    assert!(answered.is_none(), "a visitor that left was answered 504");
    settles(&f, fds);
}
