//! Tunnels end to end with real processes: five nodes with TLS ingress on
//! 127.0.0.2–127.0.0.6, a client attached to three of them, and visitors
//! entering through every node with `specter connect --stdio` (so both the
//! direct and the forwarded path), against a service that answers only after
//! reading its request to EOF (half-close).

mod common;

use std::io::{Read, Write};

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::procs::*;
use common::web::{
    DOMAIN, curl, header_of, http_service, ingress_cluster, keepalive_service, read_head,
    serve_each, spawn_download,
};

/// Reads each connection to EOF, then answers `len=<n>;` followed by the
/// request, and closes.
fn eof_service() -> std::net::SocketAddr {
    serve_each(|mut conn| {
        let mut request = Vec::new();
        if conn.read_to_end(&mut request).is_ok() {
            let _ = write!(conn, "len={};", request.len());
            let _ = conn.write_all(&request);
        }
    })
}

fn start_client(
    dir: &Path,
    state: &str,
    name: &str,
    target: std::net::SocketAddr,
    seed: &str,
) -> (Reaped, std::sync::mpsc::Receiver<String>) {
    let mut child = tunnel_cmd(dir, state, name, &format!("tcp://{target}"), seed)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = stdout_lines(&mut child);
    (Reaped(child), rx)
}

/// Sends `data` through `specter connect --stdio`, closes its input, and
/// returns everything that came back.
fn visit(dir: &Path, via: &str, name: &str, data: &[u8]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args([
            "connect",
            &format!("{name}.{DOMAIN}"),
            "--via",
            via,
            "--stdio",
        ])
        .args(["--ca", dir.join("ca/ca.crt").to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
        // Dropping stdin half-closes the visitor's side.
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

#[test]
fn visitors_reach_the_service_through_every_node_with_half_close() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (2..=6).map(|i| format!("127.0.0.{i}")).collect();
    let procs = ingress_cluster(dir.path(), &ca_dir, &ips, |_| Vec::new());
    let seed = procs[0].quic();

    let service = eof_service();
    let (client, _lines) = start_client(dir.path(), "client-a", "half-close", service, &seed);
    assert!(
        wait_attached(&dir.path().join("client-a"), 3, Duration::from_secs(20)),
        "client did not attach to 3 nodes"
    );

    // The DHT lists three live attachments, so two nodes must forward.
    let record = dht_get(&procs[0], "half-close");
    let attached: Vec<String> = record["record"]["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["live"] == true)
        .map(|a| a["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(attached.len(), 3, "{record}");
    let forwarding = procs.iter().filter(|p| !attached.contains(&p.id())).count();
    assert_eq!(forwarding, 2);

    // Every node, attached or not, carries the visitor; the service only
    // answers after the visitor half-closed.
    for p in &procs {
        let out = visit(dir.path(), &p.https(), "half-close", b"ping");
        assert!(
            out.status.success(),
            "via {}: {}",
            p.https(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"len=4;ping", "via {}", p.https());
    }

    // A few MB through every node arrive intact.
    let data: Vec<u8> = (0..4_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for p in &procs {
        let out = visit(dir.path(), &p.https(), "half-close", &data);
        assert!(out.status.success());
        let prefix = format!("len={};", data.len());
        assert_eq!(&out.stdout[..prefix.len()], prefix.as_bytes());
        assert!(
            out.stdout[prefix.len()..] == data[..],
            "corrupted via {}",
            p.https()
        );
    }

    // 100 MB up and the same 100 MB back down through a node the client is
    // not attached to (the forwarded path), compared by SHA-256.
    let forwarder = procs.iter().find(|p| !attached.contains(&p.id())).unwrap();
    let big: Vec<u8> = (0..100_000_000u32)
        .map(|i| i.wrapping_mul(2_246_822_519).to_be_bytes()[1])
        .collect();
    let out = visit(dir.path(), &forwarder.https(), "half-close", &big);
    assert!(out.status.success());
    let prefix = format!("len={};", big.len());
    assert_eq!(&out.stdout[..prefix.len()], prefix.as_bytes());
    use sha2::Digest;
    assert_eq!(
        sha2::Sha256::digest(&out.stdout[prefix.len()..]),
        sha2::Sha256::digest(&big),
        "100 MB corrupted through the forwarded path"
    );

    // Unknown names are refused on every node with a TLS unrecognized_name
    // alert, which `specter connect` reads back as a sentence.
    for p in &procs {
        let out = visit(dir.path(), &p.https(), "no-such-tunnel", b"x");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && out.stdout.is_empty(), "{stderr}");
        assert!(
            stderr.contains("no tunnel named no-such-tunnel.tun.test is registered"),
            "{stderr}"
        );
    }

    // Another client (another key) cannot take the name.
    let mut thief = tunnel_cmd(
        dir.path(),
        "client-b",
        "half-close",
        &format!("tcp://{service}"),
        &seed,
    )
    .env("RUST_LOG", "error")
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let status =
        wait_exit(&mut thief, Duration::from_secs(20)).expect("the second client keeps running");
    let mut stderr = String::new();
    thief
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(stderr.contains("claimed by another client"), "{stderr}");

    // The owner crashes and comes straight back with the same key: it gets
    // its name at once, its new connections replace the stale ones, and
    // visitors are served through every node without waiting for timeouts.
    drop(client); // SIGKILL
    // A fresh ready file, so the wait below sees the new run.
    let _ = std::fs::remove_file(client_ready_file(&dir.path().join("client-a")));
    let (_client, _lines) = start_client(dir.path(), "client-a", "half-close", service, &seed);
    assert!(
        wait_attached(&dir.path().join("client-a"), 3, Duration::from_secs(20)),
        "the owner did not get its name back"
    );
    let began = Instant::now();
    for p in &procs {
        let out = visit(dir.path(), &p.https(), "half-close", b"again");
        assert_eq!(
            out.stdout,
            b"len=5;again",
            "via {} after the owner restarted",
            p.https()
        );
    }
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "visits waited for stale attachments: {:?}",
        began.elapsed()
    );
}

fn dht_get(p: &Proc, name: &str) -> serde_json::Value {
    serde_json::from_str(&http_get(p.admin(), &format!("/dht/get?name={name}")).unwrap()).unwrap()
}

/// Runs `cmd` (output captured) until it exits, or kills it after
/// `deadline`: its exit status if it exited, stdout, stderr.
fn run_to_exit(
    cmd: &mut Command,
    deadline: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, deadline);
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    (
        status,
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn wait_exit(child: &mut Child, deadline: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn under_token_auth_a_client_needs_a_valid_token() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips = vec!["127.0.0.7".to_string()];
    let dirs = issue_all(dir.path(), &ca_dir, &ips);
    let node = start_node_with(
        dir.path(),
        &dirs[0],
        &ips[0],
        None,
        &["--client-auth", "token"],
    );
    let service = eof_service();
    let run = |extra: &[&str], name: &str, state: &str| {
        let mut cmd = tunnel_cmd(
            dir.path(),
            state,
            name,
            &format!("tcp://{service}"),
            &node.quic(),
        );
        run_to_exit(cmd.args(extra), Duration::from_secs(10))
    };
    // No token: refused with a clear error.
    let (status, _, stderr) = run(&[], "team-web", "s1");
    assert!(status.is_some_and(|s| !s.success()), "{stderr}");
    assert!(stderr.contains("client token"), "{stderr}");

    // A token for another prefix: refused. The right one: attached.
    let token_for = |prefix: &str, file: &str| {
        let path = dir.path().join(file);
        let (ca, out) = (ca_dir.to_str().unwrap(), path.to_str().unwrap());
        specter_ok(&[
            "ca",
            "issue-client-token",
            "--ca-dir",
            ca,
            "--prefix",
            prefix,
            "--out",
            out,
        ]);
        path.to_str().unwrap().to_string()
    };
    let other = token_for("other-", "t1");
    let (status, _, stderr) = run(&["--token", &other], "team-web", "s2");
    assert!(status.is_some_and(|s| !s.success()), "{stderr}");
    let good = token_for("team-", "t2");
    let (status, stdout, stderr) = run(&["--token", &good], "team-web", "s3");
    assert!(
        status.is_none(),
        "the client with a valid token exited: {stderr}"
    );
    assert!(stdout.contains("attached to node"), "{stdout}");
}

#[test]
fn a_key_over_its_quota_of_new_names_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips = vec!["127.0.0.9".to_string()];
    let dirs = issue_all(dir.path(), &ca_dir, &ips);
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "[clients]\nclaims_per_minute = 20\n").unwrap();
    let node = start_node_with(
        dir.path(),
        &dirs[0],
        &ips[0],
        None,
        &["--config", config.to_str().unwrap()],
    );
    let service = eof_service();
    // A client of the key kept in `dir/q` serving `n` tunnels PREFIX-0…
    let client = |prefix: &str, n: usize| {
        let file = dir.path().join(format!("{prefix}.toml"));
        let tunnels: String = (0..n)
            .map(|i| format!("[[tunnels]]\nname = \"{prefix}-{i}\"\nto = \"tcp://{service}\"\n"))
            .collect();
        std::fs::write(&file, tunnels).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["tunnel", "--config", file.to_str().unwrap()])
            .args(["--via", &node.quic()])
            .args(["--ca", dir.path().join("ca/ca.crt").to_str().unwrap()])
            .args(["--state-dir", dir.path().join("q").to_str().unwrap()])
            .arg("--ready-file")
            .arg(dir.path().join(format!("{prefix}.ready")));
        cmd
    };
    // Sixteen names: within the quota.
    let _first = Reaped(
        client("alpha", 16)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let attached = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(dir.path().join("alpha.ready"))
            .is_ok_and(|r| r.contains("\"healthy\":1"))
    });
    assert!(attached.is_some(), "the first client did not attach");
    // The same key with eight more names within the minute: 24 > 20.
    let (exited, _, stderr) = run_to_exit(&mut client("beta", 8), Duration::from_secs(10));
    assert!(exited.is_some_and(|s| !s.success()), "{stderr}");
    assert!(
        stderr.contains("registered 20 new names at this node in the last minute"),
        "{stderr}"
    );
    let metrics = http_get(node.admin(), "/metrics").unwrap();
    assert!(
        metrics.contains("specter_clients_refused_total{quota=\"claims_per_minute\"} 1\n"),
        "{metrics}"
    );
    // The first client keeps its sixteen names.
    let held = status(&node).unwrap()["tunnels"].as_array().unwrap().len();
    assert_eq!(held, 16);
}

#[test]
fn https_visitors_over_http1_and_http2_and_upgrades_through_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (8..=10).map(|i| format!("127.0.0.{i}")).collect();
    let procs = ingress_cluster(dir.path(), &ca_dir, &ips, |i| {
        // Node 2's plain-HTTP port redirects; the others proxy.
        let mode = if i == 2 { "redirect" } else { "proxy" };
        vec![
            "--http".into(),
            format!("{}:0", ips[i]),
            "--http-mode".into(),
            mode.into(),
        ]
    });
    let seed = procs[0].quic();
    let service = http_service();
    let raw = eof_service();
    // Two tunnels from one client, configured in client.toml; one attachment
    // only, so two of the three nodes forward.
    let config = dir.path().join("client.toml");
    std::fs::write(
        &config,
        format!(
            "via = [\"{seed}\"]\nca = \"{ca}\"\nstate_dir = \"{state}\"\nattachments = 1\n\
             ready_file = \"{ready}\"\n\n\
             [[tunnels]]\nname = \"web\"\nto = \"http://{service}\"\n\n\
             [[tunnels]]\nname = \"raw\"\nto = \"tcp://{raw}\"\n",
            ca = dir.path().join("ca/ca.crt").display(),
            state = dir.path().join("web").display(),
            ready = client_ready_file(&dir.path().join("web")).display(),
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["tunnel", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The ready file lists both names and how visitors reach each, learned
    // from the node the client attached to.
    let ready = wait_client(
        &client_ready_file(&dir.path().join("web")),
        Duration::from_secs(20),
        |r| r["healthy"] == 1,
    )
    .expect("the client attached");
    assert_eq!(ready["names"], serde_json::json!(["raw", "web"]));
    assert_eq!(ready["k"], 1);
    assert_eq!(ready["attachments"].as_array().unwrap().len(), 1);
    let attached_https = procs[0].https();
    let port = attached_https.rsplit_once(':').unwrap().1;
    assert_eq!(
        ready["public"]["web"],
        format!("https://web.{DOMAIN}:{port}/")
    );
    let raw_how = ready["public"]["raw"].as_str().unwrap();
    assert!(
        raw_how.starts_with(&format!(
            "specter connect raw.{DOMAIN} --via raw.{DOMAIN}:{port}"
        )),
        "{raw_how}"
    );
    let _client = Reaped(child);
    // The second tunnel of the same client carries raw TCP.
    for p in &procs {
        let out = visit(dir.path(), &p.https(), "raw", b"second tunnel");
        assert_eq!(out.stdout, b"len=13;second tunnel", "via {}", p.https());
    }
    let host = format!("web.{DOMAIN}");
    for p in &procs {
        for http2 in [false, true] {
            let (body, status) = curl(dir.path(), &p.https(), &host, "/a/b?c=d", http2);
            assert_eq!(
                status,
                if http2 { "2 200" } else { "1.1 200" },
                "via {}: {body}",
                p.https()
            );
            assert!(
                body.starts_with("path=/a/b?c=d xff=127.0.0.1 proto=https"),
                "{body}"
            );
        }
        let (body, status) = curl(
            dir.path(),
            &p.https(),
            &format!("nope.{DOMAIN}"),
            "/",
            false,
        );
        assert_eq!(status, "1.1 404", "{body}");
        assert!(body.contains("nope"));
    }
    // Plain HTTP: Host names the tunnel; proxied, or redirected to HTTPS.
    for (i, p) in procs.iter().enumerate() {
        let (ip, port) = p
            .http()
            .rsplit_once(':')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap();
        let out = Command::new("curl")
            .args([
                "-s",
                "-m",
                "10",
                "-D",
                "-",
                "--resolve",
                &format!("{host}:{port}:{ip}"),
            ])
            .arg(format!("http://{host}:{port}/plain?x=1"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if i == 2 {
            let https_port = p.https().rsplit_once(':').unwrap().1.to_string();
            assert!(text.starts_with("HTTP/1.1 308"), "{text}");
            assert!(
                text.contains(&format!("location: https://{host}:{https_port}/plain?x=1")),
                "{text}"
            );
        } else {
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            assert!(
                text.contains("path=/plain?x=1 xff=127.0.0.1 proto=http"),
                "{text}"
            );
        }
    }

    // A tunnel whose target refuses connections: 502 naming the cause.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _down = attach_one(
        dir.path(),
        "down",
        "down",
        &format!("http://{closed}"),
        &seed,
    );
    let (body, status) = curl(
        dir.path(),
        &procs[1].https(),
        &format!("down.{DOMAIN}"),
        "/",
        false,
    );
    assert_eq!(status, "1.1 502", "{body}");
    assert!(body.contains("could not reach its target"), "{body}");

    // An upgrade carries raw bytes both ways afterwards.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for p in &procs {
        rt.block_on(upgrade_echo(dir.path(), &p.https(), &host));
    }
}

async fn upgrade_echo(dir: &Path, https: &str, host: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_to(dir, https, host).await;
    tls.write_all(
        format!("GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tls.read(&mut byte).await.unwrap(),
            1,
            "closed during the upgrade"
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // The server's first bytes came with its answer's head: they follow it.
    let mut greeting = vec![0u8; common::web::ECHO_GREETING.len()];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut greeting))
        .await
        .expect("no greeting within 10 s")
        .unwrap();
    assert_eq!(
        greeting,
        common::web::ECHO_GREETING,
        "{}",
        String::from_utf8_lossy(&greeting)
    );
    for msg in [&b"ping"[..], &b"pong pong"[..]] {
        tls.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
}

/// A TCP connection to `to` from one of many addresses (127.0.1.1–100), as
/// a crowd's are: a node serves one address only a share of its
/// connections.
async fn tcp_from_crowd(to: &str) -> tokio::net::TcpStream {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100;
    let source = std::net::SocketAddr::from(([127, 0, 1, u8::try_from(1 + n).unwrap()], 0));
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(source).unwrap();
    socket.connect(to.parse().unwrap()).await.unwrap()
}

async fn tls_to(
    dir: &Path,
    https: &str,
    host: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = common::web::client_config(&dir.join("ca/ca.crt"), &[b"http/1.1"]);
    let tcp = tcp_from_crowd(https).await;
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap()
}

async fn https_get(dir: &Path, https: &str, host: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_to(dir, https, host).await;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).to_string()
}

#[test]
fn a_thousand_concurrent_visitors_and_abusive_ones_leave_nothing_behind() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (11..=12).map(|i| format!("127.0.0.{i}")).collect();
    let procs = ingress_cluster(dir.path(), &ca_dir, &ips, |_| Vec::new());
    let seed = procs[0].quic();
    let service = http_service();
    let child = tunnel_cmd(
        dir.path(),
        "busy",
        "busy",
        &format!("http://{service}"),
        &seed,
    )
    .args(["--attachments", "1"])
    .stdout(Stdio::null())
    .env("RUST_LOG", "info")
    .stderr(std::fs::File::create(dir.path().join("busy-client.log")).unwrap())
    .spawn()
    .unwrap();
    assert!(wait_attached(
        &dir.path().join("busy"),
        1,
        Duration::from_secs(20)
    ));
    let client = Reaped(child);
    let host = format!("busy.{DOMAIN}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Warm up both paths, then take the baseline.
    for p in &procs {
        assert!(
            rt.block_on(https_get(dir.path(), &p.https(), &host, "/warm"))
                .starts_with("HTTP/1.1 200")
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let pids: Vec<u32> = procs
        .iter()
        .map(|p| p.child.id())
        .chain([client.0.id()])
        .collect();
    let baseline: Vec<usize> = pids.iter().map(|&p| open_fds(p)).collect();

    // 1,000 concurrent visitors through the forwarding node.
    let entry = procs[1].https();
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..1_000 {
            let (dir, entry, host) = (dir.path().to_path_buf(), entry.clone(), host.clone());
            tasks.push(tokio::spawn(async move {
                https_get(&dir, &entry, &host, &format!("/n{i}")).await
            }));
        }
        let mut failed = std::collections::BTreeMap::<String, usize>::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let body = t.await.unwrap();
            if !(body.starts_with("HTTP/1.1 200") && body.contains(&format!("path=/n{i} "))) {
                let first = body.lines().next().unwrap_or("(nothing)");
                let last = body.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
                let first = format!("{first} … {last}");
                *failed.entry(first).or_default() += 1;
            }
        }
        failed
    });
    if !results.is_empty() {
        let kept = dir.keep();
        panic!("every concurrent visitor is served; failures: {results:?}; logs in {kept:?}");
    }
    // The burst starves both processes; neither may take the other for dead.
    for ip in &ips {
        let log = std::fs::read_to_string(dir.path().join(ip).join(format!("{ip}.log"))).unwrap();
        assert!(
            !log.contains("member down") && !log.contains("declared down while alive"),
            "a false down under the burst at {ip}:\n{log}"
        );
    }

    // Abusive visitors, while a normal one is still served.
    rt.block_on(async {
        let began = Instant::now();
        // Garbage instead of a TLS hello: cut off at once.
        let mut raw = tokio::net::TcpStream::connect(&entry).await.unwrap();
        raw.write_all(&[0x42; 4096]).await.unwrap();
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "garbage was not cut off");
        // A 1 MB request head: refused with bounded memory.
        let mut big = tls_to(dir.path(), &entry, &host).await;
        let head = format!(
            "GET / HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\n\r\n",
            "a".repeat(1 << 20)
        );
        let _ = big.write_all(head.as_bytes()).await;
        let mut answer = Vec::new();
        let ended =
            tokio::time::timeout(Duration::from_secs(10), big.read_to_end(&mut answer)).await;
        assert!(ended.is_ok(), "a 1 MB head was neither refused nor cut off");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "a 1 MB head was not refused: {answer:.100}"
        );
        // A visitor that stalls mid-header...
        let mut stall = tls_to(dir.path(), &entry, &host).await;
        stall
            .write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n").as_bytes())
            .await
            .unwrap();
        // ...does not hold up others.
        let body = https_get(dir.path(), &entry, &host, "/meanwhile").await;
        assert!(body.contains("path=/meanwhile"), "{body}");
        // ...and is cut off after the header timeout.
        let mut rest = Vec::new();
        let cut = tokio::time::timeout(Duration::from_secs(20), stall.read_to_end(&mut rest)).await;
        assert!(cut.is_ok(), "a stalled visitor was never cut off");
        assert!(began.elapsed() < Duration::from_secs(25));
    });

    // Nothing is left behind: descriptors return to the baseline.
    let settled = wait_for(Duration::from_secs(20), || {
        pids.iter()
            .zip(&baseline)
            .all(|(&p, &b)| open_fds(p) <= b + 2)
    });
    let now: Vec<usize> = pids.iter().map(|&p| open_fds(p)).collect();
    assert!(
        settled.is_some(),
        "descriptors before {baseline:?}, after {now:?}"
    );
}

#[test]
fn http_visitors_reuse_upstream_connections_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (21..=22).map(|i| format!("127.0.0.{i}")).collect();
    let procs = ingress_cluster(dir.path(), &ca_dir, &ips, |_| Vec::new());
    let (service, accepted) = common::web::keepalive_service();
    let _client = attach_one(
        dir.path(),
        "reuse",
        "reuse",
        &format!("http://{service}"),
        &procs[0].quic(),
    );
    let host = format!("reuse.{DOMAIN}");
    // Twenty visitors, one after another, through the attached node and
    // through the forwarding one: each a new visitor connection.
    for p in &procs {
        for i in 0..20 {
            let (body, status) = curl(dir.path(), &p.https(), &host, &format!("/{i}"), i % 2 == 0);
            assert!(status.ends_with(" 200") && body == "ok", "{status}: {body}");
        }
    }
    // Each entry node opened a tunnel stream (the client a target
    // connection) for its HTTP/1.1 fast path and one for its full proxy
    // (the HTTP/2 visitors), and reused them; a few more are allowed for
    // timing.
    let opened = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        opened <= 6,
        "40 requests opened {opened} target connections"
    );
}

/// A keep-alive target answering by path, each framing an HTTP/1.1 answer
/// can have: `/len` (a length), `/chunked` (chunks and a trailer),
/// `/to-end` (no length: the body ends with the connection), `POST` (the
/// body's length, read whole); `HEAD` gets `/len`'s head alone.
fn framings_service() -> std::net::SocketAddr {
    serve_each(|mut conn| {
        loop {
            let Some(head) = read_head(&mut conn) else {
                return;
            };
            let length: usize = header_of(&head, "content-length").parse().unwrap_or(0);
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            let xff = header_of(&head, "x-forwarded-for");
            let proto = header_of(&head, "x-forwarded-proto");
            let answer = if head.starts_with("POST ") {
                let mut body = vec![0u8; length];
                if conn.read_exact(&mut body).is_err() {
                    return;
                }
                let text = format!("got={length}");
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                    text.len()
                )
            } else if head.starts_with("HEAD ") {
                "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n".to_string()
            } else if path == "/len" {
                let text = format!("len xff={xff} proto={proto}");
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nKeep-Alive: timeout=5\r\n\r\n{text}",
                    text.len()
                )
            } else if path == "/chunked" {
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5;x=y\r\nworld\r\n0\r\nX-Done: yes\r\n\r\n".to_string()
            } else {
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\n\r\nto-end");
                return;
            };
            if conn.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    })
}

/// Reads one HTTP/1.1 answer from `tls` (`head`: to a HEAD, so no body):
/// its head and its body, chunks joined.
async fn read_answer<S: tokio::io::AsyncRead + Unpin>(
    tls: &mut S,
    have: &mut Vec<u8>,
    head: bool,
) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut more = async |have: &mut Vec<u8>| {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-answer: {}",
            String::from_utf8_lossy(have)
        );
        have.extend_from_slice(&buf[..n]);
    };
    let end = loop {
        if let Some(i) = have.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        more(have).await;
    };
    let text: String = String::from_utf8_lossy(&have[..end]).into();
    have.drain(..end);
    let lower = text.to_ascii_lowercase();
    let mut body = Vec::new();
    if head {
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let line = loop {
                if let Some(i) = have.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                more(have).await;
            };
            let size = String::from_utf8_lossy(&have[..line]).to_string();
            let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
            have.drain(..line + 2);
            if size == 0 {
                // Trailers, to the blank line.
                while !have.starts_with(b"\r\n") {
                    let Some(i) = have.windows(2).position(|w| w == b"\r\n") else {
                        more(have).await;
                        continue;
                    };
                    have.drain(..i + 2);
                }
                have.drain(..2);
                break;
            }
            while have.len() < size + 2 {
                more(have).await;
            }
            body.extend_from_slice(&have[..size]);
            have.drain(..size + 2);
        }
    } else {
        let length: usize = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .expect("a length or chunks");
        while have.len() < length {
            more(have).await;
        }
        body = have.drain(..length).collect();
    }
    (text, String::from_utf8(body).unwrap())
}

#[test]
fn one_keep_alive_connection_carries_every_framing_then_hands_over_to_the_full_proxy() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (13..=14).map(|i| format!("127.0.0.{i}")).collect();
    let procs = ingress_cluster(dir.path(), &ca_dir, &ips, |i| {
        let http = format!("{}:0", ips[i]);
        ["--http", &http, "--http-mode", "proxy"]
            .map(String::from)
            .to_vec()
    });
    let service = framings_service();
    let _client = attach_one(
        dir.path(),
        "framed",
        "framed",
        &format!("http://{service}"),
        &procs[0].quic(),
    );
    let host = format!("framed.{DOMAIN}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Through the attached node and through the forwarding one, over HTTPS
    // and over plain HTTP (proxied).
    for (p, plain) in procs.iter().flat_map(|p| [(p, false), (p, true)]) {
        rt.block_on(async {
            type Visitor = Box<dyn common::web::Duplex>;
            let mut tls: Visitor = if plain {
                Box::new(tcp_from_crowd(&p.http()).await)
            } else {
                Box::new(tls_to(dir.path(), &p.https(), &host).await)
            };
            let mut have = Vec::new();
            let get = |path: &str| {
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
            };
            // Every framing, twice, on one connection: each answer ends
            // where the next begins.
            for _ in 0..2 {
                tls.write_all(get("/len").as_bytes()).await.unwrap();
                let (head, body) = read_answer(&mut tls, &mut have, false).await;
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                assert!(
                    !head.to_ascii_lowercase().contains("keep-alive"),
                    "hop-by-hop passed on: {head}"
                );
                // The target sends no Date; the node adds one.
                assert_eq!(
                    head.to_ascii_lowercase().matches("\r\ndate: ").count(),
                    1,
                    "{head}"
                );
                let proto = if plain { "http" } else { "https" };
                assert!(
                    body.starts_with("len xff=127.0.1.")
                        && body.ends_with(&format!(" proto={proto}"))
                        && !body.contains("6.6.6.6"),
                    "the target was told {body:?}"
                );
                let head_req = format!("HEAD /len HTTP/1.1\r\nHost: {host}\r\n\r\n");
                tls.write_all(head_req.as_bytes()).await.unwrap();
                let (head, body) = read_answer(&mut tls, &mut have, true).await;
                assert!(
                    head.to_ascii_lowercase().contains("content-length: 8"),
                    "{head}"
                );
                assert!(body.is_empty());
                tls.write_all(get("/chunked").as_bytes()).await.unwrap();
                let (head, body) = read_answer(&mut tls, &mut have, false).await;
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                assert_eq!(body, "helloworld");
                tls.write_all(get("/to-end").as_bytes()).await.unwrap();
                let (head, body) = read_answer(&mut tls, &mut have, false).await;
                assert!(
                    head.to_ascii_lowercase()
                        .contains("transfer-encoding: chunked"),
                    "{head}"
                );
                assert_eq!(body, "to-end");
            }
            // Two requests in one write, answered in order.
            tls.write_all(format!("{}{}", get("/len"), get("/chunked")).as_bytes())
                .await
                .unwrap();
            assert!(
                read_answer(&mut tls, &mut have, false)
                    .await
                    .1
                    .starts_with("len ")
            );
            assert_eq!(
                read_answer(&mut tls, &mut have, false).await.1,
                "helloworld"
            );
            // A body: the full proxy takes over the connection, and carries
            // what follows on it too.
            let post =
                format!("POST /post HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\nabc");
            tls.write_all(post.as_bytes()).await.unwrap();
            assert_eq!(read_answer(&mut tls, &mut have, false).await.1, "got=3");
            tls.write_all(get("/chunked").as_bytes()).await.unwrap();
            assert_eq!(
                read_answer(&mut tls, &mut have, false).await.1,
                "helloworld"
            );
            tls.write_all(get("/len").as_bytes()).await.unwrap();
            assert!(
                read_answer(&mut tls, &mut have, false)
                    .await
                    .1
                    .starts_with("len xff=127.0.1.")
            );
            assert!(have.is_empty(), "bytes past the last answer: {have:?}");
        });
    }
    for p in &procs {
        // Each node answered the ten GETs before the POST itself on each
        // port, and handed each connection over once.
        let metrics = http_get(p.admin(), "/metrics").unwrap();
        for line in [
            "specter_ingress_fast_requests_total 20\n",
            "specter_ingress_fast_handoffs_total{reason=\"request\"} 2\n",
            "specter_ingress_fast_handoffs_total{reason=\"no_answer\"} 0\n",
        ] {
            assert!(metrics.contains(line), "{line} not in {metrics}");
        }
    }
}

/// A port on `ip` that was free a moment ago.
fn free_port(ip: &str, udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

#[test]
fn a_node_serves_visitors_only_once_it_has_joined() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let edge_dir = issue_edge(dir.path(), &ca_dir, DOMAIN);
    let ips: Vec<String> = ["127.0.0.71", "127.0.0.72"].map(String::from).to_vec();
    let dirs = issue_all(dir.path(), &ca_dir, &ips);
    // The seed is not up yet.
    let seed = format!("{}:{}", ips[0], free_port(&ips[0], true));
    // Admin and HTTPS on two addresses: two probes of one address could be
    // handed the same free port.
    let admin = format!("{}:{}", ips[1], free_port(&ips[1], false));
    let https = format!("127.0.0.73:{}", free_port("127.0.0.73", false));
    let edge = |f: &str| edge_dir.join(f).to_str().unwrap().to_string();
    let (cert, key) = (edge("edge.crt"), edge("edge.key"));
    let flags = [
        "--admin",
        &admin,
        "--https",
        &https,
        "--domain",
        DOMAIN,
        "--edge-cert",
        &cert,
        "--edge-key",
        &key,
    ];
    let (child, ready_file) =
        spawn_node_via(&[], dir.path(), &dirs[1], &ips[1], Some(&seed), &flags);
    let _late = Reaped(child);
    let admin_addr = admin.parse().unwrap();
    let status = || -> Option<serde_json::Value> {
        serde_json::from_str(&http_get(admin_addr, "/status")?).ok()
    };
    assert!(wait_for(Duration::from_secs(20), || status().is_some()).is_some());
    assert_eq!(status().unwrap()["ready"], false);
    // A visitor is asked to come back, not told the name is unknown.
    let began = Instant::now();
    let out = Command::new("curl")
        .args(["-s", "-i", "-m", "20", "--http1.1"])
        .args(["--cacert", dir.path().join("ca/ca.crt").to_str().unwrap()])
        .args([
            "--resolve",
            &format!(
                "nobody.{DOMAIN}:{}:127.0.0.73",
                https.rsplit_once(':').unwrap().1
            ),
        ])
        .arg(format!(
            "https://nobody.{DOMAIN}:{}/",
            https.rsplit_once(':').unwrap().1
        ))
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(
        began.elapsed() >= Duration::from_secs(4),
        "{:?}",
        began.elapsed()
    );
    assert!(
        !ready_file.exists(),
        "the ready file came before the node joined"
    );

    // The seed comes up: the node joins, says it is ready, and now knows
    // the name is unknown.
    let _seed = start_node_with(dir.path(), &dirs[0], &ips[0], None, &["--listen", &seed]);
    assert!(
        wait_for(Duration::from_secs(20), || ready_file.exists()).is_some(),
        "the node did not become ready once its seed was up"
    );
    assert_eq!(status().unwrap()["ready"], true);
    let (_, code) = curl(dir.path(), &https, &format!("nobody.{DOMAIN}"), "/", false);
    assert_eq!(code, "1.1 404");
}

#[test]
fn a_spare_attached_while_a_node_was_silent_is_detached_once_it_answers_again() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (81..=83).map(|i| format!("127.0.0.{i}")).collect();
    let procs = ingress_cluster(dir.path(), &ca_dir, &ips, |_| Vec::new());
    let seed = procs[0].quic();
    let service = http_service();
    let (_client, ready, log) = logged_client(dir.path(), "spare", &service, &seed, 2);
    let nodes = |r: &serde_json::Value| -> Vec<String> {
        r["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["node"].as_str().unwrap().to_string())
            .collect()
    };
    let first = wait_client(&ready, Duration::from_secs(20), |r| r["healthy"] == 2)
        .expect("two attachments");
    let held = nodes(&first);
    let paused = procs.iter().find(|p| held.contains(&p.id())).unwrap();
    // The node stops answering: the client attaches a replacement...
    signal(paused.child.id(), "-STOP");
    let replaced = wait_client(&ready, Duration::from_secs(10), |r| {
        r["healthy"] == 2 && r["attachments"].as_array().unwrap().len() == 3
    });
    signal(paused.child.id(), "-CONT");
    let client_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let replaced = replaced.unwrap_or_else(|| {
        panic!(
            "no replacement while the node was silent:\n{}",
            client_log()
        )
    });
    let spare: Vec<String> = nodes(&replaced)
        .into_iter()
        .filter(|n| !held.contains(n))
        .collect();
    assert_eq!(spare.len(), 1);
    // A visitor downloads through the spare (attached there: the direct
    // path) for about 20 s, longer than the grace period.
    let spare_node = procs.iter().find(|p| p.id() == spare[0]).unwrap();
    let size = 400 * 1024;
    let body = dir.path().join("slow-body");
    let mut download = spawn_download(
        dir.path(),
        &spare_node.https(),
        &format!("spare.{DOMAIN}"),
        &format!("/slow/{size}"),
        &body,
        Duration::from_secs(90),
    );
    let got = || std::fs::metadata(&body).map_or(0, |m| m.len());
    // ...the node answers again (three healthy), and the newest goes after
    // the grace period.
    let trimmed = wait_client(&ready, Duration::from_secs(30), |r| {
        r["healthy"] == 2 && r["attachments"].as_array().unwrap().len() == 2
    })
    .unwrap_or_else(|| panic!("the spare was never detached:\n{}", client_log()));
    let at_detach = got();
    if let Some(status) = download.try_wait().unwrap() {
        panic!(
            "the download ended as the spare was detached: {status} after {at_detach} of {size} bytes\n{}",
            client_log()
        );
    }
    assert!(
        at_detach > 0 && at_detach < size,
        "the download was not under way at the detach ({at_detach} bytes)"
    );
    let kept = nodes(&trimmed);
    assert!(!kept.contains(&spare[0]), "kept {kept:?}, spare {spare:?}");
    let mut want = held.clone();
    want.sort();
    let mut kept = kept;
    kept.sort();
    assert_eq!(kept, want);
    // The spare's node holds the connection while the download runs...
    let draining = wait_for(Duration::from_secs(5), || {
        metric(spare_node, "specter_tunnel_clients_detaching ") == 1
    });
    assert!(
        draining.is_some(),
        "the node does not count the detaching connection"
    );
    // ...and the visitor that was using it finishes its download whole...
    let status = wait_exit(&mut download, Duration::from_secs(60)).expect("the download ended");
    assert!(
        status.success() && got() == size,
        "the detach cut the download: {status} after {} of {size} bytes\n{}",
        got(),
        client_log()
    );
    // ...and then the spare's connection closes, without waiting for the
    // drain deadline.
    let done = format!("node {} detached; its visitors were done", spare[0]);
    assert!(
        wait_for(Duration::from_secs(15), || client_log().contains(&done)).is_some(),
        "the spare's connection stayed open after its last visitor:\n{}",
        client_log()
    );
    // The node let it go when the client closed it, not at its deadline.
    let gone = wait_for(Duration::from_secs(10), || {
        metric(spare_node, "specter_tunnel_clients_detaching ") == 0
    });
    assert!(
        gone.is_some(),
        "the node still holds the detached connection"
    );
    assert_eq!(metric(spare_node, "specter_tunnel_detaches_cut_total "), 0);
}

/// A service whose answers have no length (they end when the connection
/// closes): it sends a head and 4 KiB, then holds the connection open.
fn unended_service() -> std::net::SocketAddr {
    serve_each(|mut conn| {
        let mut head = [0u8; 4096];
        let _ = conn.read(&mut head);
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let _ = conn.write_all(&[b'x'; 4096]);
        std::thread::sleep(Duration::from_secs(60));
    })
}

#[test]
fn an_answer_cut_by_the_death_of_its_client_is_an_error_not_a_short_body() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (91..=92).map(|i| format!("127.0.0.{i}")).collect();
    let procs = ingress_cluster(dir.path(), &ca_dir, &ips, |_| Vec::new());
    let service = unended_service();
    let child = tunnel_cmd(
        dir.path(),
        "cut",
        "cut",
        &format!("http://{service}"),
        &procs[0].quic(),
    )
    .args(["--attachments", "1"])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut client = Reaped(child);
    let ready = wait_client(
        &client_ready_file(&dir.path().join("cut")),
        Duration::from_secs(20),
        |r| r["healthy"] == 1,
    )
    .expect("attached");
    let attached = ready["attachments"][0]["node"]
        .as_str()
        .unwrap()
        .to_string();
    // Through the node that forwards to the attached one.
    let entry = procs.iter().find(|p| p.id() != attached).unwrap();
    let body = dir.path().join("body");
    let mut curl = spawn_download(
        dir.path(),
        &entry.https(),
        &format!("cut.{DOMAIN}"),
        "/",
        &body,
        Duration::from_secs(30),
    );
    let size = || std::fs::metadata(&body).map_or(0, |m| m.len());
    assert!(
        wait_for(Duration::from_secs(10), || size() >= 4096).is_some(),
        "the answer never started"
    );
    // The answer is under way; its client dies.
    client.0.kill().unwrap();
    let status = wait_exit(&mut curl, Duration::from_secs(25)).expect("the visitor was never told");
    // 18: "transfer closed with outstanding read data remaining".
    assert_eq!(
        status.code(),
        Some(18),
        "the visitor saw {status} after {} bytes",
        size()
    );
    let metrics = http_get(entry.admin(), "/metrics").unwrap();
    let broken = metrics
        .lines()
        .find_map(|l| l.strip_prefix("specter_ingress_broken_total "))
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(broken, Some(1), "{metrics}");
}

#[test]
fn a_client_refused_by_one_node_keeps_serving_through_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = ["127.0.0.95", "127.0.0.96"].map(String::from).to_vec();
    let dirs = issue_all(dir.path(), &ca_dir, &ips);
    let open = start_node(dir.path(), &dirs[0], &ips[0], None);
    // This one wants a token the client does not have.
    let strict = start_node_with(
        dir.path(),
        &dirs[1],
        &ips[1],
        Some(&open.quic()),
        &["--client-auth", "token"],
    );
    let service = http_service();
    let via = format!("{},{}", strict.quic(), open.quic());
    let (mut client, ready, log) = logged_client(dir.path(), "mixed", &service, &via, 2);
    assert!(
        wait_client(&ready, Duration::from_secs(20), |r| r["healthy"] == 1).is_some(),
        "not attached to the open node: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let refused = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("a node refused it"))
    });
    assert!(
        refused.is_some(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Still running a while later, and still served.
    std::thread::sleep(Duration::from_secs(2));
    assert!(client.0.try_wait().unwrap().is_none(), "the client exited");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    assert_eq!(r["healthy"], 1);
}

#[test]
fn a_stopping_client_lets_the_visitors_under_way_finish_unless_told_twice() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (97..=98).map(|i| format!("127.0.0.{i}")).collect();
    let procs = ingress_cluster(dir.path(), &ca_dir, &ips, |_| Vec::new());
    let service = http_service();
    let ready = client_ready_file(&dir.path().join("stopping"));
    let start = || {
        let child = tunnel_cmd(
            dir.path(),
            "stopping",
            "stopping",
            &format!("http://{service}"),
            &procs[0].quic(),
        )
        .args(["--attachments", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        let pid = child.id();
        let client = Reaped(child);
        wait_client(&ready, Duration::from_secs(20), |r| {
            r["pid"] == pid && r["healthy"] == 2
        })
        .expect("attached to both nodes");
        client
    };
    let (https, host) = (procs[1].https(), format!("stopping.{DOMAIN}"));
    let body = dir.path().join("body");
    let download = |size: usize| {
        let _ = std::fs::remove_file(&body);
        let curl = spawn_download(
            dir.path(),
            &https,
            &host,
            &format!("/slow/{size}"),
            &body,
            Duration::from_secs(60),
        );
        assert!(
            wait_for(Duration::from_secs(10), || got(&body) > 0).is_some(),
            "the download never started"
        );
        curl
    };

    // A download of about 5 s is under way when the client is told to stop:
    // it finishes whole, then the client exits by itself.
    let mut client = start();
    let size = 100 * 1024;
    let mut curl = download(size);
    signal(client.0.id(), "-TERM");
    let status = wait_exit(&mut curl, Duration::from_secs(30)).expect("the download ended");
    assert!(
        status.success() && got(&body) == size as u64,
        "the stop cut the download: {status} after {} of {size} bytes",
        got(&body)
    );
    let exit = wait_exit(&mut client.0, Duration::from_secs(10))
        .expect("the client did not exit once its visitors were done");
    assert!(exit.success(), "{exit}");
    let cut = || -> u64 {
        procs
            .iter()
            .map(|p| metric(p, "specter_tunnel_detaches_cut_total "))
            .sum()
    };
    // Once both nodes have seen the client's closes: none was a cut.
    let let_go = wait_for(Duration::from_secs(5), || {
        procs
            .iter()
            .all(|p| metric(p, "specter_tunnel_clients_detaching ") == 0)
    });
    assert!(let_go.is_some(), "a node still holds the stopped client");
    assert_eq!(cut(), 0, "a node counted the graceful stop as cut");

    // Told twice, it stops at once, and the visitor sees its download cut.
    let mut client = start();
    let mut curl = download(400 * 1024);
    signal(client.0.id(), "-TERM");
    assert!(
        wait_exit(&mut client.0, Duration::from_secs(1)).is_none(),
        "the client exited with a visitor under way"
    );
    signal(client.0.id(), "-TERM");
    let exit = wait_exit(&mut client.0, Duration::from_secs(5))
        .expect("a second signal did not stop the client");
    assert!(exit.success(), "{exit}");
    let status = wait_exit(&mut curl, Duration::from_secs(30)).expect("the visitor was never told");
    assert_eq!(status.code(), Some(18), "after {} bytes", got(&body));
    // The node the download went through counts the detach as cut; the
    // other had no visitor under way.
    assert!(
        wait_for(Duration::from_secs(5), || cut() == 1).is_some(),
        "nodes counted {} cut detaches, not 1",
        cut()
    );
}

/// A stopping client is not held up by another node's pooled HTTP
/// upstreams through the nodes it detaches from: that node checks the
/// tunnel's route before each reuse, so it lets them go once its route
/// cache has expired (10 s), not at their 60 s reuse age, even while
/// visitors keep coming.
#[test]
fn pooled_upstreams_through_a_detaching_node_are_let_go_with_its_route() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (84..=86).map(|i| format!("127.0.0.{i}")).collect();
    let procs = ingress_cluster(dir.path(), &ca_dir, &ips, |_| Vec::new());
    let (service, accepted) = keepalive_service();
    let ready = client_ready_file(&dir.path().join("pooled"));
    let child = tunnel_cmd(
        dir.path(),
        "pooled",
        "pooled",
        &format!("http://{service}"),
        &procs[0].quic(),
    )
    .args(["--attachments", "2", "--grace-period", "120"])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let pid = child.id();
    let mut client = Reaped(child);
    let attached = wait_client(&ready, Duration::from_secs(20), |r| {
        r["pid"] == pid && r["healthy"] == 2
    })
    .expect("attached to two nodes");
    // Visitors enter through the node the client is not attached to: every
    // request of theirs is forwarded, on upstreams pooled there.
    let addrs: Vec<&str> = attached["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["addr"].as_str().unwrap())
        .collect();
    let entry = procs
        .iter()
        .find(|p| !addrs.contains(&p.quic().as_str()))
        .expect("a node without the client");
    let (https, host) = (entry.https(), format!("pooled.{DOMAIN}"));
    let (stop, answered) = (AtomicBool::new(false), AtomicUsize::new(0));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let (_, status) = curl(dir.path(), &https, &host, "/", false);
                if status == "1.1 200" {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let warm = wait_for(Duration::from_secs(20), || {
            answered.load(Ordering::Relaxed) >= 10
        });
        // Ten answers over one or two target connections: they were pooled.
        let reused = warm.is_some() && accepted.load(Ordering::Relaxed) <= 2;
        if !reused {
            stop.store(true, Ordering::Relaxed);
        }
        assert!(
            reused,
            "{} answers over {} target connections",
            answered.load(Ordering::Relaxed),
            accepted.load(Ordering::Relaxed)
        );
        signal(pid, "-TERM");
        let exited = wait_exit(&mut client.0, Duration::from_secs(45));
        stop.store(true, Ordering::Relaxed);
        let exit = exited.expect(
            "the client was still held 45 s after its stop: the entry node kept reusing \
             its pooled upstreams through the detaching nodes",
        );
        assert!(exit.success(), "{exit}");
    });
}

/// A client key that attaches and detaches in a loop, keeping every
/// detached connection open, holds at most `LINGERING_PER_CLIENT` (4) of
/// them at a node: each one past that closes its oldest, counted as a cut
/// detach, and the node forgets them all once they are closed.
#[test]
fn a_client_detaching_in_a_loop_keeps_at_most_four_connections_lingering() {
    use common::own_client::OwnClient;
    use specter::wire::write_msg;
    use specter_tunnel::protocol::ClientMsg;

    let (_dir, node, ca_pem, runtime) = lone_node("127.0.0.87");
    runtime.block_on(async {
        let client = OwnClient::new(&ca_pem);
        let mut held = Vec::new();
        for i in 1..=7u64 {
            let mut a = client.attach(&node.quic(), &["lingering"]).await;
            write_msg(&mut a.send, &ClientMsg::Detach).await.unwrap();
            // The node's end of the control stream: it has detached it.
            while a
                .control
                .next::<specter_tunnel::protocol::NodeMsg>()
                .await
                .is_ok()
            {}
            held.push(a);
            // Each detach past the fourth closes the oldest lingering one.
            let (want, cut) = (i.min(4), i.saturating_sub(4));
            let settled = common::wait_until(Duration::from_secs(5), || {
                metric(&node, "specter_tunnel_clients_detaching ") == want
                    && metric(&node, "specter_tunnel_detaches_cut_total ") == cut
            })
            .await;
            assert!(
                settled.is_some(),
                "after {i} detaches the node holds {} lingering and cut {}, not {want} and {cut}",
                metric(&node, "specter_tunnel_clients_detaching "),
                metric(&node, "specter_tunnel_detaches_cut_total ")
            );
        }
        // The three oldest were closed by the node, as replaced; the rest
        // are still open.
        for (i, a) in held.iter().enumerate() {
            if i < 3 {
                let closed = tokio::time::timeout(Duration::from_secs(5), a.conn.closed()).await;
                let replaced = matches!(&closed, Ok(quinn::ConnectionError::ApplicationClosed(c))
                    if c.error_code == specter::wire::CLOSE_REPLACED);
                assert!(replaced, "detached connection {i}: {closed:?}");
            } else {
                let closed = a.conn.close_reason();
                assert!(closed.is_none(), "detached connection {i}: {closed:?}");
            }
        }
        for a in &held {
            a.conn.close(specter::wire::CLOSE_DETACHED, b"done");
        }
        let gone = common::wait_until(Duration::from_secs(5), || {
            metric(&node, "specter_tunnel_clients_detaching ") == 0
        })
        .await;
        assert!(gone.is_some(), "the node still holds detached connections");
        assert_eq!(metric(&node, "specter_tunnel_detaches_cut_total "), 3);

        // A client told to stop twice before its `Detach` left closes with
        // the cut code and no detach: counted too. A plain close is not.
        for (code, cut) in [
            (specter::wire::CLOSE_DETACHED, 3),
            (specter::wire::CLOSE_DETACH_CUT, 4),
        ] {
            let a = client.attach(&node.quic(), &["lingering"]).await;
            a.conn.close(code, b"stopped at once");
            let settled = common::wait_until(Duration::from_secs(5), || {
                metric(&node, "specter_tunnel_client_connections ") == 0
            })
            .await;
            assert!(settled.is_some(), "the node still holds the closed client");
            assert_eq!(
                metric(&node, "specter_tunnel_detaches_cut_total "),
                cut,
                "after a close with {code}"
            );
        }
    });
}

/// One node at `ip`, the cluster CA's certificate (for a client of the
/// test's own, `common::own_client`) and a runtime to drive that client.
fn lone_node(ip: &str) -> (tempfile::TempDir, Proc, String, tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips = vec![ip.to_string()];
    let dirs = issue_all(dir.path(), &ca_dir, &ips);
    let node = start_node(dir.path(), &dirs[0], ip, None);
    let ca_pem = std::fs::read_to_string(dir.path().join("ca/ca.crt")).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    (dir, node, ca_pem, runtime)
}

fn got(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[test]
fn a_client_asking_for_peers_in_a_loop_gets_one_answer_per_gap() {
    use common::own_client::{Attached, OwnClient};
    use specter::wire::write_msg;
    use specter_tunnel::protocol::{ClientMsg, NodeMsg};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let (_dir, node, ca_pem, runtime) = lone_node("127.0.0.99");
    let (sent, answered, after) = runtime.block_on(async {
        let Attached {
            conn: _conn,
            mut send,
            mut control,
        } = OwnClient::new(&ca_pem)
            .attach(&node.quic(), &["peers-loop"])
            .await;
        let answers = Arc::new(AtomicUsize::new(0));
        let counted = answers.clone();
        tokio::spawn(async move {
            while let Ok(msg) = control.next::<NodeMsg>().await {
                if matches!(msg, NodeMsg::Peers { .. }) {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        // Asks as fast as the node takes the requests, for 2 s.
        let start = Instant::now();
        let mut sent = 0;
        while start.elapsed() < Duration::from_secs(2) {
            write_msg(&mut send, &ClientMsg::Peers).await.unwrap();
            sent += 1;
        }
        let answered = answers.load(Ordering::SeqCst);
        // The node has taken every request once each was answered or
        // coalesced into an answer (on a loaded machine it may still be
        // working through them long after the flood: a quiet second is no
        // sign). Then a request is answered at once: the client is still
        // served.
        let coalesced = || metric(&node, "specter_client_peer_requests_coalesced_total ");
        let drained = wait_for(Duration::from_secs(30), || {
            coalesced() + answers.load(Ordering::SeqCst) as u64 == sent as u64
        });
        assert!(
            drained.is_some(),
            "{} of {sent} requests coalesced, {} answers",
            coalesced(),
            answers.load(Ordering::SeqCst)
        );
        let settled = answers.load(Ordering::SeqCst);
        write_msg(&mut send, &ClientMsg::Peers).await.unwrap();
        let last = wait_for(Duration::from_secs(5), || {
            answers.load(Ordering::SeqCst) > settled
        });
        (sent, answered, last.map(|_| answers.load(Ordering::SeqCst)))
    });
    println!("{sent} peer requests in 2 s, {answered} answers");
    // One answer at once, then at most one per 250 ms.
    assert!(sent > 1_000, "only {sent} requests sent");
    assert!(
        (2..=10).contains(&answered),
        "{answered} answers to {sent} requests in 2 s"
    );
    assert!(
        after.is_some(),
        "a request after the flood was not answered ({answered} answers to {sent} requests)"
    );
    // Every request was either answered or answered with another: the
    // flood and the one after it.
    let total = after.unwrap() as u64;
    let coalesced = metric(&node, "specter_client_peer_requests_coalesced_total ");
    assert_eq!(
        coalesced + total,
        sent as u64 + 1,
        "{coalesced} coalesced, {total} answers in all"
    );
}

/// A client that stops running for a while (a small, overloaded machine;
/// here SIGSTOP) finds its nodes' packets waiting in its socket when it
/// runs again, and reads them before it judges its nodes: it must not count
/// the time it could not run as their silence, and attach replacements for
/// nodes that answered all along.
#[test]
fn a_client_stalled_for_a_second_takes_none_of_its_nodes_for_silent() {
    const STALLS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (88..=90).map(|i| format!("127.0.0.{i}")).collect();
    let procs = ingress_cluster(dir.path(), &ca_dir, &ips, |_| Vec::new());
    let seed = procs[0].quic();
    let service = http_service();
    let (client, ready, log) = logged_client(dir.path(), "stall", &service, &seed, 2);
    wait_client(&ready, Duration::from_secs(20), |r| r["healthy"] == 2).expect("two attachments");
    let host = format!("stall.{DOMAIN}");
    for _ in 0..STALLS {
        // The stall's length is the scenario, not a wait for something.
        signal(client.0.id(), "-STOP");
        std::thread::sleep(Duration::from_secs(1));
        signal(client.0.id(), "-CONT");
        // Running again: it serves a visitor.
        let (body, code) = curl(dir.path(), &procs[0].https(), &host, "/", false);
        assert_eq!(code, "1.1 200", "{body}");
    }
    let client_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !client_log.contains("is silent"),
        "a node was taken for silent after the client's own stall:\n{client_log}"
    );
    let now = wait_client(&ready, Duration::from_secs(1), |_| true).expect("a ready file");
    assert_eq!(
        now["attachments"].as_array().map(Vec::len),
        Some(2),
        "{now}"
    );
}

/// A client serving tunnel `name` (state in `dir/NAME`) for the HTTP
/// service at `service` through `via`, holding `attachments`, its output
/// in `dir/NAME-client.log`: the client, its ready file and its log.
fn logged_client(
    dir: &Path,
    name: &str,
    service: &std::net::SocketAddr,
    via: &str,
    attachments: u32,
) -> (Reaped, std::path::PathBuf, std::path::PathBuf) {
    let log = dir.join(format!("{name}-client.log"));
    let child = tunnel_cmd(dir, name, name, &format!("http://{service}"), via)
        .args(["--attachments", &attachments.to_string()])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Reaped(child), client_ready_file(&dir.join(name)), log)
}
