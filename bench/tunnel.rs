//! Tunnels side by side, in one run, against the same local target:
//!
//! - direct loopback TCP (the baseline every ratio is taken against);
//! - Specter's direct path (entry node = the node the client is attached to)
//!   and its forwarded path (entry ≠ attached), as real `specter node` and
//!   `specter tunnel` processes, visitors speaking TLS to the ingress;
//! - rathole (plain TCP and Noise transports) and bore, when their binaries
//!   are on `PATH` or in `target/peers/bin`, or can be installed there from
//!   crates.io (`cargo install rathole bore-cli`; skipped with `--no-install`).
//!
//! For each: single-stream throughput, latency of one connection's sequential
//! requests (p50/p99), and requests/s with p99 over 64 keep-alive
//! connections, each also as a ratio to direct. Prints a Markdown table and
//! writes a latency plot to `target/bench-tunnel.png`.
//!
//! `cargo bench --bench tunnel` (add `-- --quick` for a short run, `--
//! --specter-only` for Specter's rows alone).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use specter::ingress::tcp::Visitor;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// The `specter` binary: this build's, or `SPECTER_BENCH_BIN` (to compare
/// two builds in one session).
fn bin() -> String {
    std::env::var("SPECTER_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_specter").into())
}
const DOMAIN: &str = "bench.specter.test";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
const CONNS: usize = 64;

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

/// A connection of either kind.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// How visitors reach the target.
#[derive(Clone)]
enum Entry {
    /// Plain TCP to this address.
    Tcp(SocketAddr),
    /// TLS to a Specter ingress (ALPN `specter-tcp`).
    Specter(Arc<Visitor>),
    /// HTTPS to a Specter ingress (ALPN `http/1.1`): the node's HTTP path.
    Https(Arc<Https>),
}

/// An HTTPS visitor of one tunnel through one node.
struct Https {
    addr: SocketAddr,
    host: rustls::pki_types::ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
}

impl Https {
    fn new(addr: SocketAddr, host: &str, ca_pem: &[u8]) -> Self {
        let (roots, _) = specter::net::tls::roots_from_pem(ca_pem).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(specter::net::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Https {
            addr,
            host: rustls::pki_types::ServerName::try_from(host.to_string()).unwrap(),
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }
}

impl Entry {
    async fn open(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(match self {
            Entry::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Entry::Specter(v) => Box::new(v.connect().await.map_err(std::io::Error::other)?),
            Entry::Https(h) => {
                let tcp = tokio::net::TcpStream::connect(h.addr).await?;
                tcp.set_nodelay(true)?;
                Box::new(h.connector.connect(h.host.clone(), tcp).await?)
            }
        })
    }

    /// The request visitors send (HTTPS names the tunnel in `Host`).
    fn request(&self) -> Vec<u8> {
        let host = match self {
            Entry::Https(h) => h.host.to_str().to_string(),
            _ => "t".into(),
        };
        format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
    }
}

/// Reads one HTTP/1.1 response (its head, then `Content-Length` bytes) from
/// `s`; `have` keeps what was read past it.
async fn read_response(s: &mut Box<dyn Conn>, have: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&have[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("no length: {head}")))?;
            while have.len() < end + 4 + len {
                let k = s.read(&mut chunk).await?;
                if k == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                have.extend_from_slice(&chunk[..k]);
            }
            have.drain(..end + 4 + len);
            return Ok(());
        }
        let k = s.read(&mut chunk).await?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have.extend_from_slice(&chunk[..k]);
    }
}

/// Opens a visitor through `entry` and has one request answered on it.
async fn answered(entry: &Entry) -> std::io::Result<Box<dyn Conn>> {
    let mut c = entry.open().await?;
    c.write_all(&entry.request()).await?;
    read_response(&mut c, &mut Vec::new()).await?;
    Ok(c)
}

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used, in clock ticks of
/// `USER_HZ` (100 per second on Linux, whatever the kernel's own rate).
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which may hold spaces: state is
            // field 3, utime 14 and stime 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

const USER_HZ: f64 = 100.0;

/// Each process's reading of a counter (`read`: [`cpu_ticks`], [`sleeps`])
/// now, to measure from with [`growth`].
fn marks(pids: &[(&'static str, u32)], read: fn(u32) -> u64) -> Vec<u64> {
    pids.iter().map(|(_, pid)| read(*pid)).collect()
}

/// How much each process's counter grew since `before` (from [`marks`]),
/// divided by `per`.
fn growth(
    pids: &[(&'static str, u32)],
    before: &[u64],
    read: fn(u32) -> u64,
    per: f64,
) -> Vec<(&'static str, f64)> {
    pids.iter()
        .zip(before)
        .map(|((name, pid), b)| (*name, read(*pid).saturating_sub(*b) as f64 / per))
        .collect()
}

/// How many times the process's threads have gone to sleep so far (their
/// voluntary context switches, from `/proc`): each is a wake-up later, which
/// is dear on a virtual machine. Involuntary switches (a thread preempted by
/// another process on a shared core) are left out.
fn sleeps(pid: u32) -> u64 {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    threads
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .sum()
}

/// `SPECTER_BENCH_PERF=DIR`: `perf record -g` of the tunnel's processes
/// while a row's c64 load runs, into `DIR/<row>.data` (to compare where two
/// paths spend a request); stopped by [`stop_perf`].
fn start_perf(label: &str, pids: &[(&'static str, u32)]) -> Option<Child> {
    let dir = std::env::var("SPECTER_BENCH_PERF").ok()?;
    let list: Vec<String> = pids.iter().map(|(_, p)| p.to_string()).collect();
    let file: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let out = Path::new(&dir).join(format!("{file}.data"));
    Command::new("perf")
        .args(["record", "-g", "-F", "2000", "-p", &list.join(",")])
        .arg("-o")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .inspect_err(|err| eprintln!("perf record: {err}"))
        .ok()
}

fn stop_perf(perf: Option<Child>) {
    if let Some(perf) = perf {
        // perf writes its file on SIGINT.
        let _ = Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait_with_output();
    }
}

async fn bulk(entry: &Entry, bytes: u64) -> std::io::Result<f64> {
    let mut s = entry.open().await?;
    let chunk = vec![7u8; 1 << 20];
    let start = Instant::now();
    s.write_all(b"B").await?;
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    if u64::from_be_bytes(count) != sent {
        return Err(std::io::Error::other("bytes lost"));
    }
    Ok((sent as f64 * 8.0) / start.elapsed().as_secs_f64() / 1e9)
}

/// `SPECTER_BENCH_STREAMS=N`: the single stream's bytes as `n` uploads at
/// once (each a multiple of the 1 MiB write), and the highest RSS (KiB) of
/// each of the tunnel's processes while they ran: what parallel bulk
/// streams make a process hold.
async fn bulk_parallel(
    entry: &Entry,
    bytes: u64,
    n: u64,
    pids: &[(&'static str, u32)],
) -> std::io::Result<(f64, u64, Vec<(&'static str, u64)>)> {
    let each = (bytes / n).max(1 << 20) & !((1 << 20) - 1);
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let entry = entry.clone();
            tokio::spawn(async move { bulk(&entry, each).await })
        })
        .collect();
    let mut peak: Vec<(&'static str, u64)> = pids.iter().map(|(p, _)| (*p, 0)).collect();
    while !tasks.iter().all(|t| t.is_finished()) {
        for ((_, pid), (_, high)) in pids.iter().zip(peak.iter_mut()) {
            *high = (*high).max(rss_kib(*pid));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        t.await.map_err(std::io::Error::other)??;
    }
    let gbps = (each * n) as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9;
    Ok((gbps, each * n, peak))
}

/// Sequential requests on one connection until `until`; their latencies.
async fn requests(
    mut s: Box<dyn Conn>,
    request: Vec<u8>,
    until: Instant,
) -> std::io::Result<Vec<Duration>> {
    let mut lat = Vec::new();
    let mut have = Vec::new();
    while Instant::now() < until {
        let t = Instant::now();
        s.write_all(&request).await?;
        read_response(&mut s, &mut have).await?;
        lat.push(t.elapsed());
    }
    Ok(lat)
}

/// `conns` keep-alive connections, timed once all are open: requests/s and
/// every latency, sorted.
async fn load(entry: &Entry, conns: usize, secs: f64) -> std::io::Result<(f64, Vec<Duration>)> {
    let mut open = Vec::new();
    for _ in 0..conns {
        open.push(entry.open().await?);
    }
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = open
        .into_iter()
        .map(|c| tokio::spawn(requests(c, entry.request(), until)))
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(std::io::Error::other)??);
    }
    let rps = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort();
    Ok((rps, all))
}

/// One line per row of the CPU its tunnel's processes spent `what`, in
/// `unit` with `digits` decimals (`of` picks the figures from a row).
fn print_cpu(
    rows: &[Row],
    what: &str,
    unit: &str,
    digits: usize,
    of: impl Fn(&Row) -> &Vec<(&'static str, f64)>,
) {
    print_per_process(
        rows,
        &format!("CPU {what} (user + system, the tunnel's own processes; lower is better)"),
        unit,
        digits,
        of,
    );
}

fn print_per_process(
    rows: &[Row],
    title: &str,
    unit: &str,
    digits: usize,
    of: impl Fn(&Row) -> &Vec<(&'static str, f64)>,
) {
    if rows.iter().all(|r| of(r).is_empty()) {
        return;
    }
    println!("\n{title}:\n");
    for r in rows.iter().filter(|r| !of(r).is_empty()) {
        let total: f64 = of(r).iter().map(|(_, v)| v).sum();
        let each: Vec<String> = of(r)
            .iter()
            .map(|(p, v)| format!("{p} {v:.digits$}"))
            .collect();
        let total = format!("{total:.digits$} {unit}");
        println!("- {}: {} ({})", r.label, total.trim_end(), each.join(", "));
    }
}

/// The `permille`/1000 quantile of sorted latencies.
fn pct(sorted: &[Duration], permille: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() - 1) * permille / 1000]
}

/// One row of the table.
struct Row {
    label: String,
    /// Single-stream throughput (raw TCP paths only).
    gbps: Option<f64>,
    /// CPU seconds per GiB of the single stream, per process of the tunnel
    /// (its own processes only: not the visitor's or the target's).
    cpu: Vec<(&'static str, f64)>,
    /// CPU microseconds per request of the c64 run, per process of the
    /// tunnel (as `cpu`): where a request's cost goes, to compare within
    /// a run (it moves with the machine's load as the rate does).
    cpu_c64: Vec<(&'static str, f64)>,
    /// Times per request the tunnel's processes went to sleep (see
    /// [`sleeps`]) in the c1 and the c64 run: the wake-ups a request costs.
    sleeps_c1: Vec<(&'static str, f64)>,
    sleeps_c64: Vec<(&'static str, f64)>,
    /// Highest RSS (KiB) per process during parallel uploads
    /// (`SPECTER_BENCH_STREAMS`).
    peak_rss: Vec<(&'static str, u64)>,
    c1: Vec<Duration>,
    rps: f64,
    c64: Vec<Duration>,
}

async fn measure(
    label: &str,
    entry: &Entry,
    pids: &[(&'static str, u32)],
    bytes: u64,
    secs: f64,
) -> std::io::Result<Row> {
    let before = marks(pids, cpu_ticks);
    let streams = std::env::var("SPECTER_BENCH_STREAMS")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|&n| n > 1);
    let (gbps, moved, peak_rss) = match (entry, streams) {
        (Entry::Https(_), _) => (None, 0, Vec::new()),
        (_, None) => (Some(bulk(entry, bytes).await?), bytes, Vec::new()),
        (_, Some(n)) => {
            let (gbps, moved, peak) = bulk_parallel(entry, bytes, n, pids).await?;
            (Some(gbps), moved, peak)
        }
    };
    let gib = moved as f64 / f64::from(1u32 << 30);
    let cpu = match gbps {
        Some(_) => growth(pids, &before, cpu_ticks, gib * USER_HZ),
        None => Vec::new(),
    };
    // `SPECTER_BENCH_BULK_ONLY=1`: the single stream alone (its latency
    // columns left empty), to compare builds' throughput in a short run.
    if std::env::var_os("SPECTER_BENCH_BULK_ONLY").is_some() {
        return Ok(Row {
            label: label.to_string(),
            gbps,
            cpu,
            cpu_c64: Vec::new(),
            sleeps_c1: Vec::new(),
            sleeps_c64: Vec::new(),
            peak_rss,
            c1: Vec::new(),
            rps: 0.0,
            c64: Vec::new(),
        });
    }
    let slept = marks(pids, sleeps);
    let (c1_rps, c1) = load(entry, 1, secs).await?;
    let sleeps_c1 = growth(pids, &slept, sleeps, (c1_rps * secs).max(1.0));
    let before = marks(pids, cpu_ticks);
    let slept = marks(pids, sleeps);
    let perf = start_perf(label, pids);
    let (rps, c64) = load(entry, CONNS, secs).await?;
    stop_perf(perf);
    let sleeps_c64 = growth(pids, &slept, sleeps, (rps * secs).max(1.0));
    // Microseconds per request.
    let cpu_c64 = growth(
        pids,
        &before,
        cpu_ticks,
        (rps * secs).max(1.0) / 1e6 * USER_HZ,
    );
    Ok(Row {
        label: label.to_string(),
        gbps,
        cpu,
        cpu_c64,
        sleeps_c1,
        sleeps_c64,
        peak_rss,
        c1,
        rps,
        c64,
    })
}

/// Child processes, killed when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until a request through `entry` is answered.
async fn until_serving(entry: &Entry, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = tokio::time::timeout(Duration::from_secs(2), answered(entry))
            .await
            .ok()
            .and_then(Result::ok);
        if ok.is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "{what} did not start serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn specter(args: &[&str]) {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "specter {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `SPECTER_BENCH_WORKERS=N` runs Specter's processes with N tokio workers
/// (`TOKIO_WORKER_THREADS`; the default is one per core), leaving the
/// benchmark's own runtime as it is.
fn workers(cmd: &mut Command) {
    if let Ok(n) = std::env::var("SPECTER_BENCH_WORKERS") {
        cmd.env("TOKIO_WORKER_THREADS", n);
    }
}

/// Specter's visitor entries and processes.
struct Setup {
    /// Raw TCP over TLS (`specter-tcp`): direct and forwarded path.
    tcp: (Entry, Entry),
    /// HTTPS to an `http://` tunnel of the same client: direct and forwarded.
    https: (Entry, Entry),
    /// The attached node, the forwarding node and the client.
    pids: Vec<(&'static str, u32)>,
}

/// Idle visitors held at once through one path in the memory rows. Each
/// raw-TCP visitor holds a QUIC stream on the client's connection (at most
/// `MAX_STREAMS_PER_PEER`, 16,384).
const IDLE_VISITORS: usize = 5_000;

/// Two `specter node` processes with ingress and a `specter tunnel` client
/// attached to one of them, serving a `tcp://` and an `http://` tunnel.
async fn start_specter(dir: &Path, target: SocketAddr, procs: &mut Procs) -> Setup {
    let ca = dir.join("ca");
    specter(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    let ca_dir = ca.to_str().unwrap();
    let edge = dir.join("edge");
    specter(&[
        "ca",
        "issue-edge",
        "--ca-dir",
        ca_dir,
        "--domain",
        DOMAIN,
        "--out",
        edge.to_str().unwrap(),
    ]);
    let mut nodes: Vec<(u16, u16)> = Vec::new();
    for (i, name) in ["a", "b"].iter().enumerate() {
        let nd = dir.join(name);
        specter(&[
            "ca",
            "issue-node",
            "--ca-dir",
            ca_dir,
            "--name",
            name,
            "--ip",
            "127.0.0.1",
            "--out",
            nd.to_str().unwrap(),
        ]);
        let (quic, https) = (free_port(), free_port());
        let ready = nd.join("ready");
        let mut cmd = Command::new(bin());
        workers(&mut cmd);
        cmd.args(["node", "--listen", &format!("127.0.0.1:{quic}")])
            .args([
                "--admin",
                "127.0.0.1:0",
                "--https",
                &format!("127.0.0.1:{https}"),
            ])
            .args(["--domain", DOMAIN])
            .args(["--edge-cert", edge.join("edge.crt").to_str().unwrap()])
            .args(["--edge-key", edge.join("edge.key").to_str().unwrap()])
            .args(["--ca", ca.join("ca.crt").to_str().unwrap()])
            .args(["--cert", nd.join("node.crt").to_str().unwrap()])
            .args(["--key", nd.join("node.key").to_str().unwrap()])
            .args(["--ready-file", ready.to_str().unwrap()])
            // Every visitor of the benchmark comes from 127.0.0.1, and the
            // memory rows hold thousands at once.
            .args(["--visitors-per-source", "20000"])
            .args(["--max-visitors", "20000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if i > 0 {
            cmd.args(["--join", &format!("127.0.0.1:{}", nodes[0].0)]);
        }
        procs.0.push(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            assert!(
                Instant::now() < deadline,
                "specter node {name} did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nodes.push((quic, https));
    }
    let tunnels = dir.join("client.toml");
    std::fs::write(
        &tunnels,
        format!(
            "[[tunnels]]\nname = \"bench\"\nto = \"tcp://{target}\"\n[[tunnels]]\nname = \"web\"\nto = \"http://{target}\"\n"
        ),
    )
    .unwrap();
    let mut client = tokio::process::Command::new(bin());
    workers(client.as_std_mut());
    let mut client = client
        .args(["tunnel", "--config", tunnels.to_str().unwrap()])
        .args(["--via", &format!("127.0.0.1:{}", nodes[0].0)])
        .args(["--attachments", "1"])
        .args(["--ca", ca.join("ca.crt").to_str().unwrap()])
        .args(["--state-dir", dir.join("client").to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(client.stdout.take().unwrap()).lines();
    let client_pid = client.id().unwrap();
    let attached_quic: u16 = loop {
        let line = lines.next_line().await.unwrap().expect("client output");
        if let Some((_, rest)) = line.split_once(" at 127.0.0.1:") {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    tokio::spawn(async move {
        // Keep the client (and its stdout) alive for the whole run.
        while let Ok(Some(_)) = lines.next_line().await {}
        drop(client);
    });
    let ca_pem = std::fs::read(ca.join("ca.crt")).unwrap();
    let host = format!("bench.{DOMAIN}");
    let visitor = |https: u16| {
        Entry::Specter(Arc::new(
            Visitor::new(&format!("127.0.0.1:{https}"), &host, &ca_pem).unwrap(),
        ))
    };
    let node_pids = (procs.0[0].id(), procs.0[1].id());
    let ((direct, direct_pid), (forwarded, forwarded_pid)) = if nodes[0].0 == attached_quic {
        ((nodes[0].1, node_pids.0), (nodes[1].1, node_pids.1))
    } else {
        ((nodes[1].1, node_pids.1), (nodes[0].1, node_pids.0))
    };
    let web = format!("web.{DOMAIN}");
    let https = |port: u16| {
        Entry::Https(Arc::new(Https::new(
            format!("127.0.0.1:{port}").parse().unwrap(),
            &web,
            &ca_pem,
        )))
    };
    let setup = Setup {
        tcp: (visitor(direct), visitor(forwarded)),
        https: (https(direct), https(forwarded)),
        pids: vec![
            ("attached node", direct_pid),
            ("forwarding node", forwarded_pid),
            ("client", client_pid),
        ],
    };
    until_serving(&setup.tcp.0, "Specter (direct)").await;
    until_serving(&setup.tcp.1, "Specter (forwarded)").await;
    until_serving(&setup.https.0, "Specter HTTPS (direct)").await;
    until_serving(&setup.https.1, "Specter HTTPS (forwarded)").await;
    setup
}

/// Holds `n` idle visitors through `entry`, each with one request answered
/// (so the whole path is open), a few opened at a time as a crowd arrives.
async fn hold_idle(entry: &Entry, n: usize) -> std::io::Result<Vec<Box<dyn Conn>>> {
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        let batch = (n - held.len()).min(8);
        let opened = futures_join(entry, batch)
            .await
            .map_err(|e| std::io::Error::other(format!("after {}: {e}", held.len())))?;
        held.extend(opened);
    }
    Ok(held)
}

async fn futures_join(entry: &Entry, k: usize) -> std::io::Result<Vec<Box<dyn Conn>>> {
    let tasks: Vec<_> = (0..k)
        .map(|_| {
            let entry = entry.clone();
            tokio::spawn(async move { answered(&entry).await })
        })
        .collect();
    let mut out = Vec::with_capacity(k);
    for t in tasks {
        out.push(t.await.map_err(std::io::Error::other)??);
    }
    Ok(out)
}

/// RSS (KiB) of each process in `pids`, after a second to settle.
async fn rss_of(pids: &[(&'static str, u32)]) -> Vec<u64> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    pids.iter().map(|(_, pid)| rss_kib(*pid)).collect()
}

/// One process's memory figures.
struct Memory {
    subject: String,
    process: &'static str,
    idle: u64,
    after_load: Option<(u64, u64)>,
    /// RSS before and with [`IDLE_VISITORS`] idle raw-TCP visitors, and
    /// before and with as many idle keep-alive HTTPS visitors.
    raw: Option<(u64, u64)>,
    https: Option<(u64, u64)>,
    /// RSS 10 s after the idle visitors left.
    after_idle: Option<u64>,
}

fn print_memory(rows: &[Memory]) {
    let n = IDLE_VISITORS as f64;
    let per = |with: Option<(u64, u64)>| {
        with.map_or("–".to_string(), |(before, w)| {
            format!(
                "{:.1} MiB ({:.1} KiB/visitor)",
                w as f64 / 1024.0,
                w.saturating_sub(before) as f64 / n
            )
        })
    };
    println!(
        "| subject | process | idle | after the c64 runs | 10 s later | {IDLE_VISITORS} idle raw-TCP visitors | {IDLE_VISITORS} idle keep-alive HTTPS visitors | 10 s after they left |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for m in rows {
        let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
        let (after, later) = m
            .after_load
            .map_or(("–".into(), "–".into()), |(a, b)| (mib(a), mib(b)));
        println!(
            "| {} | {} | {} | {after} | {later} | {} | {} | {} |",
            m.subject,
            m.process,
            mib(m.idle),
            per(m.raw),
            per(m.https),
            m.after_idle.map_or("–".into(), mib),
        );
    }
}

/// A peer's binary: on PATH, in `target/peers/bin`, or installed there.
fn peer_binary(bin: &str, krate: &str, extra: &[&str], install: bool) -> Option<PathBuf> {
    if let Ok(out) = Command::new("which").arg(bin).output()
        && out.status.success()
    {
        return Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers");
    let path = root.join("bin").join(bin);
    if path.exists() {
        return Some(path);
    }
    if !install {
        return None;
    }
    eprintln!("installing {krate} into {} (once)…", root.display());
    let ok = Command::new("cargo")
        .args(["install", "--root", root.to_str().unwrap(), krate])
        .args(extra)
        .status()
        .is_ok_and(|s| s.success());
    (ok && path.exists()).then_some(path)
}

/// rathole server and client with the `tcp` or `noise` transport.
async fn start_rathole(
    bin: &Path,
    dir: &Path,
    target: SocketAddr,
    noise: bool,
    procs: &mut Procs,
) -> Entry {
    let (control, public) = (free_port(), free_port());
    let (server_t, client_t) = if noise {
        let out = Command::new(bin).arg("--genkey").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut keys = text
            .lines()
            .skip_while(|l| !l.contains("Private Key"))
            .filter(|l| !l.trim().is_empty());
        let (_, private) = (keys.next(), keys.next().unwrap().trim().to_string());
        let public_key = text
            .lines()
            .skip_while(|l| !l.contains("Public Key"))
            .nth(1)
            .unwrap()
            .trim()
            .to_string();
        (
            format!(
                "[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n"
            ),
            format!(
                "[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public_key}\"\n"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    let kind = if noise { "noise" } else { "tcp" };
    let server = dir.join(format!("rathole-server-{kind}.toml"));
    std::fs::write(
        &server,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n{server_t}[server.services.bench]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{public}\"\nnodelay = true\n"
        ),
    )
    .unwrap();
    let client = dir.join(format!("rathole-client-{kind}.toml"));
    std::fs::write(
        &client,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\n{client_t}[client.services.bench]\ntoken = \"bench\"\nlocal_addr = \"{target}\"\nnodelay = true\n"
        ),
    )
    .unwrap();
    for (flag, cfg) in [("--server", &server), ("--client", &client)] {
        procs.0.push(
            Command::new(bin)
                .arg(flag)
                .arg(cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let entry = Entry::Tcp(format!("127.0.0.1:{public}").parse().unwrap());
    until_serving(&entry, "rathole").await;
    entry
}

async fn start_bore(bin: &Path, target: SocketAddr, procs: &mut Procs) -> Entry {
    let public = free_port();
    procs.0.push(
        Command::new(bin)
            // Loopback only: bore binds every interface by default.
            .args(["server", "--bind-addr", "127.0.0.1"])
            .args(["--min-port", &public.to_string()])
            .args(["--max-port", &public.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    procs.0.push(
        Command::new(bin)
            .args(["local", &target.port().to_string()])
            .args(["--local-host", &target.ip().to_string()])
            .args(["--to", "127.0.0.1", "--port", &public.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let entry = Entry::Tcp(format!("127.0.0.1:{public}").parse().unwrap());
    until_serving(&entry, "bore").await;
    entry
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

// The rows the targets compare.
const LOOPBACK: &str = "direct loopback TCP";
const RAW_DIRECT: &str = "Specter, direct path (TLS + QUIC)";
const RAW_FORWARDED: &str = "Specter, forwarded path (TLS + QUIC)";
const HTTPS_DIRECT: &str = "Specter HTTPS, direct path (HTTP/1.1 over TLS, keep-alive)";
const HTTPS_FORWARDED: &str = "Specter HTTPS, forwarded path";
const NOISE: &str = "rathole, noise transport (encrypted)";

/// `SPECTER_BENCH_ROUNDS=N`: every row is measured N times, the rows taking
/// turns round after round, so that the machine's drift falls on all of them
/// alike; the targets are then judged in each round. Default 1.
fn rounds() -> usize {
    std::env::var("SPECTER_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// A speed target of the tunnel issue, judged within one round against
/// rathole's Noise mode.
enum Target {
    /// `of`'s c64 request rate at least `times` Noise's.
    Rate { of: &'static str, times: f64 },
    /// `of`'s single-stream throughput at least `times` Noise's.
    Stream { of: &'static str, times: f64 },
    /// `of`'s c1 p50 over direct loopback's at most `times` × (Noise's
    /// added p50 + 50 µs).
    Added { of: &'static str, times: f64 },
}

const TARGETS: [(&str, Target); 6] = [
    (
        "HTTPS c64, direct ≥ 1.0× Noise",
        Target::Rate {
            of: HTTPS_DIRECT,
            times: 1.0,
        },
    ),
    (
        "HTTPS c64, forwarded ≥ 0.75× Noise",
        Target::Rate {
            of: HTTPS_FORWARDED,
            times: 0.75,
        },
    ),
    (
        "HTTPS c1 p50 added, direct ≤ Noise's + 50 µs",
        Target::Added {
            of: HTTPS_DIRECT,
            times: 1.0,
        },
    ),
    (
        "HTTPS c1 p50 added, forwarded ≤ 2 × (Noise's + 50 µs)",
        Target::Added {
            of: HTTPS_FORWARDED,
            times: 2.0,
        },
    ),
    (
        "raw single stream, direct ≥ 1.3× Noise",
        Target::Stream {
            of: RAW_DIRECT,
            times: 1.3,
        },
    ),
    (
        "raw single stream, forwarded ≥ 1.0× Noise",
        Target::Stream {
            of: RAW_FORWARDED,
            times: 1.0,
        },
    ),
];

impl Target {
    /// The cell for one round and whether it meets the target; `None` if a
    /// row it needs did not run.
    fn judge(&self, rows: &[Row]) -> Option<(String, bool)> {
        let row = |label: &str| rows.iter().find(|r| r.label == label);
        let noise = row(NOISE)?;
        match *self {
            Target::Rate { of, times } => {
                let ratio = row(of)?.rps / noise.rps;
                Some((format!("{ratio:.2}×"), ratio >= times))
            }
            Target::Stream { of, times } => {
                let ratio = row(of)?.gbps? / noise.gbps?;
                Some((format!("{ratio:.2}×"), ratio >= times))
            }
            Target::Added { of, times } => {
                let base = pct(&row(LOOPBACK)?.c1, 500).as_secs_f64() * 1e6;
                let added = |r: &Row| pct(&r.c1, 500).as_secs_f64() * 1e6 - base;
                let (value, bound) = (added(row(of)?), times * (added(noise) + 50.0));
                Some((format!("{value:.0} µs (≤ {bound:.0})"), value <= bound))
            }
        }
    }
}

/// The targets in every round, and in how many rounds each was met.
fn print_targets(rounds: &[Vec<Row>]) {
    let judged: Vec<(&str, Vec<(String, bool)>)> = TARGETS
        .iter()
        .filter_map(|(name, target)| {
            let cells: Option<Vec<_>> = rounds.iter().map(|rows| target.judge(rows)).collect();
            Some((*name, cells?))
        })
        .collect();
    if judged.is_empty() {
        return;
    }
    println!(
        "\n## The speed targets, round by round (ratios to rathole's Noise mode in the same round)\n"
    );
    let heads: Vec<String> = (1..=rounds.len()).map(|i| format!("round {i}")).collect();
    println!("| target | {} | met in |", heads.join(" | "));
    println!("|---|{}---:|", "---:|".repeat(rounds.len()));
    for (name, cells) in judged {
        let met = cells.iter().filter(|(_, ok)| *ok).count();
        let shown: Vec<&str> = cells.iter().map(|(c, _)| c.as_str()).collect();
        println!(
            "| {name} | {} | {met} of {} |",
            shown.join(" | "),
            cells.len()
        );
    }
}

fn print_table(rows: &[Row]) {
    let base = &rows[0];
    let (b_c1, b_p99) = (pct(&base.c1, 500), pct(&base.c64, 990));
    println!(
        "| path | single stream | × direct | c1 p50 | c1 p99 | × direct (p50) | c64 req/s | × direct | c64 p99 | × direct |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let (p50, p99) = (pct(&r.c1, 500), pct(&r.c1, 990));
        let c64_p99 = pct(&r.c64, 990);
        let (gbps, ratio) = match (r.gbps, base.gbps) {
            (Some(g), Some(b)) => (format!("{g:.2} Gbit/s"), format!("{:.2}", g / b)),
            _ => ("–".into(), "–".into()),
        };
        println!(
            "| {} | {gbps} | {ratio} | {} ms | {} ms | {:.1} | {:.0} | {:.2} | {} ms | {:.1} |",
            r.label,
            ms(p50),
            ms(p99),
            p50.as_secs_f64() / b_c1.as_secs_f64(),
            r.rps,
            r.rps / base.rps,
            ms(c64_p99),
            c64_p99.as_secs_f64() / b_p99.as_secs_f64(),
        );
    }
}

/// Latency percentiles (c1 and c64) of every row, log-scaled, as a PNG.
fn plot(rows: &[Row], out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| "font")?;
    let root = BitMapBackend::new(out, (1200, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    let percentiles: Vec<usize> = vec![500, 750, 900, 950, 990, 999];
    for (area, pick, title) in [
        (&left, 0usize, "one connection (c1)"),
        (&right, 1usize, "64 connections (c64)"),
    ] {
        let series: Vec<(String, Vec<f64>)> = rows
            .iter()
            .map(|r| {
                let lat = if pick == 0 { &r.c1 } else { &r.c64 };
                let pts = percentiles
                    .iter()
                    .map(|&p| pct(lat, p).as_secs_f64() * 1e3)
                    .collect();
                (r.label.clone(), pts)
            })
            .collect();
        let max = series
            .iter()
            .flat_map(|(_, s)| s.iter().copied())
            .fold(0.01, f64::max);
        let min = series
            .iter()
            .flat_map(|(_, s)| s.iter().copied())
            .fold(f64::MAX, f64::min)
            .max(0.001);
        let mut chart = ChartBuilder::on(area)
            .caption(format!("latency, {title}"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (0usize..percentiles.len() - 1).into_segmented(),
                (min / 1.5..max * 1.5).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("ms")
            .y_labels(8)
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                    let p = percentiles.get(*i).copied().unwrap_or(0);
                    if p % 10 == 0 {
                        format!("p{}", p / 10)
                    } else {
                        format!("p{}.{}", p / 10, p % 10)
                    }
                }
                SegmentValue::Last => String::new(),
            })
            .draw()?;
        for (i, (label, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    pts.iter()
                        .enumerate()
                        .map(|(j, ms)| (SegmentValue::CenterOf(j), *ms)),
                    color.stroke_width(2),
                ))?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

async fn run(quick: bool, install: bool, peers: bool) {
    // Thousands of idle visitors at once, and their target connections.
    specter::files::raise_descriptor_limit();
    let dir = std::env::temp_dir().join(format!("specter-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = t.local_addr().unwrap();
    tokio::spawn(target(t));
    let bytes: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let secs = if quick { 1.0 } else { 5.0 };

    let mut procs = Procs(Vec::new());
    // (label, entry, processes whose memory is measured)
    type Pids = Vec<(&'static str, u32)>;
    let mut subjects: Vec<(String, Entry, Pids)> =
        vec![(LOOPBACK.into(), Entry::Tcp(target_addr), Vec::new())];
    let setup = start_specter(&dir, target_addr, &mut procs).await;
    subjects.push((RAW_DIRECT.into(), setup.tcp.0.clone(), setup.pids.clone()));
    subjects.push((RAW_FORWARDED.into(), setup.tcp.1.clone(), Vec::new()));
    subjects.push((HTTPS_DIRECT.into(), setup.https.0.clone(), Vec::new()));
    subjects.push((HTTPS_FORWARDED.into(), setup.https.1.clone(), Vec::new()));
    let last_two = |procs: &Procs| -> Pids {
        let n = procs.0.len();
        vec![
            ("server", procs.0[n - 2].id()),
            ("client", procs.0[n - 1].id()),
        ]
    };
    let mut missing = Vec::new();
    // Without the default native-tls feature, which needs OpenSSL headers.
    let rathole_features = ["--no-default-features", "--features", "server,client,noise"];
    match peers
        .then(|| peer_binary("rathole", "rathole", &rathole_features, install))
        .flatten()
    {
        Some(bin) => {
            let plain = start_rathole(&bin, &dir, target_addr, false, &mut procs).await;
            subjects.push((
                "rathole, tcp transport (no encryption)".into(),
                plain,
                last_two(&procs),
            ));
            let noise = start_rathole(&bin, &dir, target_addr, true, &mut procs).await;
            subjects.push((NOISE.into(), noise, last_two(&procs)));
        }
        None => missing.push("rathole"),
    }
    match peers
        .then(|| peer_binary("bore", "bore-cli", &[], install))
        .flatten()
    {
        Some(bin) => {
            let entry = start_bore(&bin, target_addr, &mut procs).await;
            subjects.push(("bore (no encryption)".into(), entry, last_two(&procs)));
        }
        None => missing.push("bore"),
    }

    // Memory before any load.
    let mut memory = Vec::new();
    for (label, _, pids) in &subjects {
        for ((process, _), idle) in pids.iter().zip(rss_of(pids).await) {
            memory.push(Memory {
                subject: label.clone(),
                process,
                idle,
                after_load: None,
                raw: None,
                https: None,
                after_idle: None,
            });
        }
    }

    // `SPECTER_BENCH_ONLY=text`: only the rows whose label contains it (the
    // direct loopback row always runs, for the ratios), e.g. to profile one
    // path.
    let only = std::env::var("SPECTER_BENCH_ONLY").ok();
    let mut rounds_run = Vec::new();
    let rounds = rounds();
    for round in 1..=rounds {
        if rounds > 1 {
            eprintln!("round {round} of {rounds}");
        }
        let mut rows = Vec::new();
        for (i, (label, entry, pids)) in subjects.iter().enumerate() {
            if i > 0 && only.as_ref().is_some_and(|o| !label.contains(o.as_str())) {
                continue;
            }
            // A forwarded visit crosses all three Specter processes.
            let cpu_pids = if label.starts_with("Specter") {
                &setup.pids
            } else {
                pids
            };
            match measure(label, entry, cpu_pids, bytes, secs).await {
                Ok(row) => rows.push(row),
                Err(err) => eprintln!("{label}: {err}"),
            }
        }
        rounds_run.push(rows);
    }
    // The table, the CPU and sleep figures and the plot are the first
    // round's; the targets are judged in each.
    let rows: &[Row] = &rounds_run[0];

    // Memory after the load (every row has run), then with idle visitors.
    let after = rss_of(&setup.pids).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    let later = rss_of(&setup.pids).await;
    for (i, m) in memory.iter_mut().take(setup.pids.len()).enumerate() {
        m.after_load = Some((after[i], later[i]));
    }
    let mut at = 0;
    for (label, entry, pids) in &subjects {
        if pids.is_empty() || !peers {
            continue;
        }
        let rows = &mut memory[at..at + pids.len()];
        at += pids.len();
        let before = rss_of(pids).await;
        match hold_idle(entry, IDLE_VISITORS).await {
            Ok(held) => {
                for ((m, rss), b) in rows.iter_mut().zip(rss_of(pids).await).zip(&before) {
                    m.raw = Some((*b, rss));
                }
                drop(held);
            }
            Err(err) => eprintln!("{label}: holding idle visitors: {err}"),
        }
        if label.starts_with("Specter") {
            let before = rss_of(pids).await;
            match hold_idle(&setup.https.0, IDLE_VISITORS).await {
                Ok(held) => {
                    for ((m, rss), b) in rows.iter_mut().zip(rss_of(pids).await).zip(&before) {
                        m.https = Some((*b, rss));
                    }
                    drop(held);
                }
                Err(err) => eprintln!("{label}: holding idle HTTPS visitors: {err}"),
            }
        }
        tokio::time::sleep(Duration::from_secs(9)).await;
        for (m, rss) in rows.iter_mut().zip(rss_of(pids).await) {
            m.after_idle = Some(rss);
        }
    }

    println!("## Tunnels side by side (loopback, one run)\n");
    print_table(rows);
    println!(
        "\n{} MiB single stream (upload); {secs} s per latency row; c64 = {CONNS} keep-alive connections, each sending its next request when the last is answered. Every process on one machine with {} CPUs.",
        bytes >> 20,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    print_cpu(rows, "per GiB of the single stream", "s", 2, |r| &r.cpu);
    print_cpu(rows, "per request of the c64 run", "µs", 1, |r| &r.cpu_c64);
    for (run, of) in [
        (
            "c1",
            (|r: &Row| &r.sleeps_c1) as fn(&Row) -> &Vec<(&'static str, f64)>,
        ),
        ("c64", |r: &Row| &r.sleeps_c64),
    ] {
        let title = format!(
            "Sleeps per request of the {run} run (voluntary context switches of the tunnel's own processes, each a wake-up later; lower is better)"
        );
        print_per_process(rows, &title, "", 2, of);
    }
    for r in rows.iter().filter(|r| !r.peak_rss.is_empty()) {
        let each: Vec<String> = r
            .peak_rss
            .iter()
            .map(|(p, kib)| format!("{p} {:.1} MiB", *kib as f64 / 1024.0))
            .collect();
        println!(
            "- peak RSS during the parallel uploads, {}: {}",
            r.label,
            each.join(", ")
        );
    }
    print_targets(&rounds_run);
    println!("\n## Memory (RSS), same run\n");
    print_memory(&memory);
    if !missing.is_empty() {
        println!(
            "\nNot measured (no binary, install failed or skipped): {}.",
            missing.join(", ")
        );
    }
    let png = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tunnel.png");
    match plot(rows, &png) {
        Ok(()) => println!("\nLatency plot: {}", png.display()),
        Err(err) => eprintln!("latency plot not written: {err}"),
    }
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let install = !std::env::args().any(|a| a == "--no-install");
    // Specter's rows only, without the idle-visitor memory rows: for
    // comparing two builds (SPECTER_BENCH_BIN) quickly.
    let peers = !std::env::args().any(|a| a == "--specter-only");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(quick, install, peers));
}
