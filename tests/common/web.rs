//! Web visitors against real nodes: a cluster of nodes with TLS ingress, a
//! small HTTP service that reports what it received, and curl.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use super::procs::*;

/// A visitor's connection, TLS or not.
pub trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Duplex for T {}

/// The domain the test nodes serve tunnels under.
pub const DOMAIN: &str = "tun.test";

/// Starts one node per address in `ips` with a TLS ingress for
/// [`DOMAIN`] (plus `extra(i)` flags), the first as the seed, and waits for
/// the ring to form.
pub fn ingress_cluster(
    dir: &Path,
    ca_dir: &Path,
    ips: &[String],
    extra: impl Fn(usize) -> Vec<String>,
) -> Vec<Proc> {
    ingress_cluster_via(&[], dir, ca_dir, ips, extra)
}

/// [`ingress_cluster`], each node run through `launcher` (see
/// [`start_node_via`]).
pub fn ingress_cluster_via(
    launcher: &[&str],
    dir: &Path,
    ca_dir: &Path,
    ips: &[String],
    extra: impl Fn(usize) -> Vec<String>,
) -> Vec<Proc> {
    let edge_dir = issue_edge(dir, ca_dir, DOMAIN);
    let dirs = issue_all(dir, ca_dir, ips);
    let edge = |f: &str| edge_dir.join(f).to_str().unwrap().to_string();
    let (cert, key) = (edge("edge.crt"), edge("edge.key"));
    let start = |i: usize, seed: Option<&str>| {
        let mut flags = vec![
            "--https".to_string(),
            format!("{}:0", ips[i]),
            "--domain".into(),
            DOMAIN.into(),
            "--edge-cert".into(),
            cert.clone(),
            "--edge-key".into(),
            key.clone(),
        ];
        flags.extend(extra(i));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        start_node_via(launcher, dir, &dirs[i], &ips[i], seed, &flags)
    };
    let mut procs = vec![start(0, None)];
    let seed = procs[0].quic();
    for i in 1..ips.len() {
        procs.push(start(i, Some(&seed)));
    }
    wait_ring(&procs);
    procs
}

/// `/silent` requests [`http_service`] received (in this test process).
static SILENT_TAKEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many `/silent` requests [`http_service`] has received, never to
/// answer them.
pub fn silent_taken() -> usize {
    SILENT_TAKEN.load(std::sync::atomic::Ordering::SeqCst)
}

/// What [`http_service`] says first after switching protocols.
pub const ECHO_GREETING: &[u8] = b"hello, upgraded\n";

/// A TCP service on 127.0.0.1 (a free port) that runs `handle` on each
/// connection it accepts, in a thread of its own.
pub fn serve_each(
    handle: impl Fn(std::net::TcpStream) + Send + Clone + 'static,
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let handle = handle.clone();
            std::thread::spawn(move || handle(conn));
        }
    });
    addr
}

/// A request head read from `conn` a byte at a time (nothing past it is
/// taken), or `None` if the connection ended first.
pub fn read_head(conn: &mut impl Read) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).to_string())
}

/// Header `name`'s value in `head` (empty if it has none).
pub fn header_of(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// An HTTP/1.1 service on 127.0.0.1: answers `path=… xff=… proto=…` (what
/// reached it), greets ([`ECHO_GREETING`]) then echoes bytes after an
/// `Upgrade`, for `/big/N` sends N
/// bytes, for `/slow/N` sends N bytes at 20 KiB/s, and never answers
/// `/silent`: it holds that connection open for
/// the rest of the test process, whatever the other side does (a hung
/// application server; see [`silent_taken`]).
pub fn http_service() -> std::net::SocketAddr {
    serve_each(|mut conn| {
        let Some(head) = read_head(&mut conn) else {
            return;
        };
        let header = |name: &str| header_of(&head, name);
        if !header("upgrade").is_empty() {
            // A greeting in the same write as the switch, as a
            // server that speaks first does: it reaches the proxy
            // with the answer's head.
            let mut answer =
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
                    .to_vec();
            answer.extend_from_slice(ECHO_GREETING);
            let _ = conn.write_all(&answer);
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            return;
        }
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        if path == "/silent" {
            SILENT_TAKEN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            while conn.read(&mut buf).is_ok_and(|n| n > 0) {}
            // Even at the end of the request: held, never closed.
            loop {
                std::thread::park();
            }
        }
        if head.starts_with("POST ") {
            // Take the whole body before answering.
            let len: usize = header("content-length").parse().unwrap_or(0);
            let mut body = vec![0u8; len];
            if conn.read_exact(&mut body).is_err() {
                return;
            }
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        // `/slow/N`: N bytes, 2 KiB every 100 ms; `/big/N`: N bytes at once.
        let sized = |prefix: &str| path.strip_prefix(prefix)?.parse::<usize>().ok();
        let sent = sized("/slow/")
            .map(|n| (n, 2048, Some(std::time::Duration::from_millis(100))))
            .or_else(|| sized("/big/").map(|n| (n, 64 * 1024, None)));
        if let Some((n, piece, pause)) = sent {
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
            );
            let chunk = vec![b'x'; piece];
            let mut left = n;
            while left > 0 {
                let k = left.min(piece);
                if conn.write_all(&chunk[..k]).is_err() {
                    return;
                }
                left -= k;
                if let Some(pause) = pause {
                    std::thread::sleep(pause);
                }
            }
            return;
        }
        let body = format!(
            "path={path} xff={} proto={}",
            header("x-forwarded-for"),
            header("x-forwarded-proto")
        );
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    })
}

/// `curl` over HTTPS to `https` (ip:port) for `host`, HTTP/1.1 or HTTP/2:
/// `(body, "VERSION STATUS")`.
pub fn curl(dir: &Path, https: &str, host: &str, path: &str, http2: bool) -> (String, String) {
    let (ip, port) = https.rsplit_once(':').unwrap();
    let out = Command::new("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_version} %{http_code}"])
        .arg(if http2 { "--http2" } else { "--http1.1" })
        .args(["--cacert", dir.join("ca/ca.crt").to_str().unwrap()])
        .args(["--resolve", &format!("{host}:{port}:{ip}")])
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", ""));
    (body.to_string(), status.to_string())
}

/// Starts curl downloading `https://{host}{path}` over HTTP/1.1 through the
/// ingress at `https` into `out`, for at most `limit`, trusting the tests'
/// CA in `dir`.
pub fn spawn_download(
    dir: &Path,
    https: &str,
    host: &str,
    path: &str,
    out: &Path,
    limit: std::time::Duration,
) -> std::process::Child {
    let (ip, port) = https.rsplit_once(':').unwrap();
    Command::new("curl")
        .args(["-s", "-m", &limit.as_secs().to_string(), "--http1.1"])
        .args(["-o", out.to_str().unwrap()])
        .args(["--cacert", dir.join("ca/ca.crt").to_str().unwrap()])
        .args(["--resolve", &format!("{host}:{port}:{ip}")])
        .arg(format!("https://{host}:{port}{path}"))
        .spawn()
        .expect("curl is installed")
}

/// A keep-alive HTTP/1.1 service on 127.0.0.1 that answers every request
/// `ok` and counts the TCP connections it accepted.
pub fn keepalive_service() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = serve_each(move |mut conn| {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        while read_head(&mut conn).is_some() {
            let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            if conn.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    });
    (addr, accepted)
}

/// A TLS client trusting the CA in `ca` (PEM file), offering `alpn`.
pub fn client_config(ca: &Path, alpn: &[&[u8]]) -> std::sync::Arc<rustls::ClientConfig> {
    let pem = std::fs::read(ca).unwrap();
    let (roots, _) = specter::net::tls::roots_from_pem(&pem).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(specter::net::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    std::sync::Arc::new(config)
}

/// A TCP connection to `to` from the loopback address `source`.
pub async fn tcp_from(
    source: std::net::IpAddr,
    to: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// TLS to `to` for `host` from `source`.
pub async fn tls_from(
    source: std::net::IpAddr,
    to: std::net::SocketAddr,
    host: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tcp_from(source, to).await?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// One HTTPS GET of `path` from `source` on a connection of its own, within
/// 10 s: its latency, or what went wrong.
pub async fn get_from(
    source: std::net::IpAddr,
    ca: &Path,
    to: std::net::SocketAddr,
    host: &str,
    path: &str,
) -> Result<std::time::Duration, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let began = std::time::Instant::now();
    let fetch = async {
        let config = client_config(ca, &[b"http/1.1"]);
        let mut tls = tls_from(source, to, host, config)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer).to_string();
        if answer.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(format!("answer: {answer:?}"))
        }
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), fetch).await {
        Ok(Ok(())) => Ok(began.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no answer in 10 s".into()),
    }
}
