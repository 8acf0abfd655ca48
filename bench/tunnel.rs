//! Tunnel figures, side by side in one run: single-stream throughput and
//! requests/s at 64 keep-alive connections, for direct loopback, Specter's
//! direct path (entry node = attached node) and its forwarded path (entry ≠
//! attached), each also as a ratio to direct loopback.
//!
//! `cargo bench --bench tunnel` (add `-- --quick` for a short run).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use specter::client::ClientOptions;
use specter::demo::start_loopback_node;
use specter::ingress::{Edge, Visitor};
use specter::pki::{make_ca, make_edge_cert};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const DOMAIN: &str = "bench.specter.test";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// Target: the first byte says what to do: `B` = sink everything and answer
/// the byte count at EOF; anything else = an HTTP/1.1 keep-alive responder.
async fn target(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut first = [0u8; 1];
            if s.read_exact(&mut first).await.is_err() {
                return;
            }
            if first[0] == b'B' {
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            let mut have = vec![first[0]];
            loop {
                while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                    have.drain(..end + 4);
                    if s.write_all(RESPONSE).await.is_err() {
                        return;
                    }
                }
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => have.extend_from_slice(&buf[..k]),
                }
            }
        });
    }
}

async fn bulk<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, bytes: u64) -> f64 {
    let chunk = vec![7u8; 1 << 20];
    let start = Instant::now();
    s.write_all(b"B").await.unwrap();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
    }
    s.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.unwrap();
    assert_eq!(u64::from_be_bytes(count), sent, "bytes lost");
    (sent as f64 * 8.0) / start.elapsed().as_secs_f64() / 1e9
}

async fn requests<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, until: Instant) -> u64 {
    let mut n = 0;
    let mut buf = [0u8; RESPONSE.len()];
    while Instant::now() < until {
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        s.read_exact(&mut buf).await.unwrap();
        n += 1;
    }
    n
}

#[derive(Clone)]
enum Path {
    Direct(SocketAddr),
    Specter(Arc<Visitor>),
}

/// A connection of either kind.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

impl Path {
    async fn open(&self) -> Box<dyn Conn> {
        match self {
            Path::Direct(a) => Box::new(tokio::net::TcpStream::connect(a).await.unwrap()),
            Path::Specter(v) => Box::new(v.connect().await.unwrap()),
        }
    }

    async fn bulk(&self, bytes: u64) -> f64 {
        bulk(self.open().await, bytes).await
    }

    /// Requests per second over `conns` keep-alive connections, timed only
    /// once every connection is open (handshakes excluded).
    async fn rps(&self, conns: usize, secs: f64) -> f64 {
        let mut open = Vec::new();
        for _ in 0..conns {
            open.push(self.open().await);
        }
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(secs);
        let tasks: Vec<_> = open
            .into_iter()
            .map(|c| tokio::spawn(requests(c, until)))
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total as f64 / start.elapsed().as_secs_f64()
    }
}

async fn run(quick: bool) {
    let ca = make_ca("bench").unwrap();
    let dir = std::env::temp_dir().join(format!("specter-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let edge = make_edge_cert(&ca, DOMAIN).unwrap();
    std::fs::write(dir.join("edge.crt"), &edge.cert).unwrap();
    std::fs::write(dir.join("edge.key"), &edge.key).unwrap();
    let edge = Arc::new(Edge::load(DOMAIN, &dir.join("edge.crt"), &dir.join("edge.key")).unwrap());
    let stop = CancellationToken::new();
    let a = start_loopback_node(&ca, "a.bench.invalid", None, 1).unwrap();
    let b = start_loopback_node(&ca, "b.bench.invalid", Some(a.status().addr), 2).unwrap();
    let mut ingress = Vec::new();
    for n in [&a, &b] {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        ingress.push(l.local_addr().unwrap());
        tokio::spawn(specter::ingress::serve(
            l,
            edge.clone(),
            n.tunnels(),
            stop.clone(),
        ));
    }
    while a.status().dht.ring_size != 2 || b.status().dht.ring_size != 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = t.local_addr().unwrap();
    tokio::spawn(target(t));
    let options = ClientOptions {
        via: vec![a.status().addr.to_string()],
        ca_pem: ca.cert.clone(),
        state_dir: dir.join("client"),
        target: target_addr.to_string(),
        name: Some("bench".into()),
        attachments: 1,
        token: None,
        extra: Vec::new(),
    };
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    tokio::spawn(specter::client::run(options, endpoint, stop.clone()));
    while !a
        .tunnels()
        .attached_names()
        .iter()
        .any(|(n, _)| n == "bench")
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ca_pem = ca.cert.clone().into_bytes();
    let host = format!("bench.{DOMAIN}");
    let paths = [
        ("direct loopback TCP", Path::Direct(target_addr)),
        (
            "Specter, direct path (entry = attached node)",
            Path::Specter(Arc::new(
                Visitor::new(&ingress[0].to_string(), &host, &ca_pem).unwrap(),
            )),
        ),
        (
            "Specter, forwarded path (entry ≠ attached)",
            Path::Specter(Arc::new(
                Visitor::new(&ingress[1].to_string(), &host, &ca_pem).unwrap(),
            )),
        ),
    ];
    let bytes: u64 = if quick { 64 << 20 } else { 512 << 20 };
    let secs = if quick { 1.0 } else { 5.0 };
    println!("## Tunnel throughput and requests/s (loopback, TLS at the ingress, QUIC inside)\n");
    println!("| path | single stream | × direct | req/s, 64 connections | × direct |");
    println!("|---|---|---|---|---|");
    let mut base = (0.0, 0.0);
    for (label, path) in &paths {
        let gbps = path.bulk(bytes).await;
        let rps = path.rps(64, secs).await;
        if base.0 == 0.0 {
            base = (gbps, rps);
        }
        println!(
            "| {label} | {gbps:.2} Gbit/s | {:.2} | {rps:.0} | {:.2} |",
            gbps / base.0,
            rps / base.1
        );
    }
    println!(
        "\n{} MiB per stream; {secs} s of keep-alive HTTP/1.1 requests per row; one process, 2 cores.",
        bytes >> 20
    );
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(quick));
}
