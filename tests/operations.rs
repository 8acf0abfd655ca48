//! Operating real nodes: reloading certificates and settings under load,
//! the status page in a real browser, and `/metrics` read by a parser.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::procs::*;
use common::web::{DOMAIN, client_config, ingress_cluster, keepalive_service};

/// One HTTPS request on a new connection to `https` for `host`: the leaf
/// certificate the node presented, or what went wrong.
fn served_leaf(ca: &Path, https: &str, host: &str) -> Result<Vec<u8>, String> {
    let config = client_config(ca, &[b"http/1.1"]);
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(https).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    if !answer.starts_with("HTTP/1.1 200") || !answer.ends_with("ok") {
        return Err(format!("answer: {answer:?}"));
    }
    let leaf = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first().cloned());
    leaf.map(|c| c.to_vec())
        .ok_or_else(|| "no certificate".into())
}

/// Reads one HTTP/1.1 answer with a `Content-Length` from a kept
/// connection; returns its body.
fn read_answer(r: &mut impl Read) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        r.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no length in {head:?}")))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).to_string())
}

/// The first certificate in a PEM file, as DER.
fn first_cert(path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).unwrap();
    rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// Issues a new edge certificate and moves it over `edge_dir`'s files, as a
/// certificate manager renewing in place does (rename: never a half file).
fn renew_edge(dir: &Path, edge_dir: &Path, round: usize) -> Vec<u8> {
    let fresh = dir.join(format!("renewed-{round}"));
    let (ca, out) = (dir.join("ca"), fresh.to_str().unwrap().to_string());
    specter_ok(&[
        "ca",
        "issue-edge",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--domain",
        DOMAIN,
        "--out",
        &out,
    ]);
    for file in ["edge.key", "edge.crt"] {
        std::fs::rename(fresh.join(file), edge_dir.join(file)).unwrap();
    }
    first_cert(&edge_dir.join("edge.crt"))
}

/// `specter reload --admin ADDR`: (success, stdout, stderr).
fn reload(admin: std::net::SocketAddr) -> (bool, String, String) {
    let out = specter(&["reload", "--admin", &admin.to_string()]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn log_count(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[test]
fn certificates_and_settings_reload_under_load_without_a_failed_visitor() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (41..=42).map(|i| format!("127.0.0.{i}")).collect();
    // The first node also reads a config file, to be edited below.
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "log_format = \"human\"\n").unwrap();
    let config_flag = config.to_str().unwrap().to_string();
    let procs = ingress_cluster(dir.path(), &ca_dir, &ips, |i| {
        if i == 0 {
            vec!["--config".into(), config_flag.clone()]
        } else {
            Vec::new()
        }
    });
    let (service, _) = keepalive_service();
    let _client = attach_one(
        dir.path(),
        "reload",
        "reload",
        &format!("http://{service}"),
        &procs[0].quic(),
    );
    let host = format!("reload.{DOMAIN}");
    let ca_pem = dir.path().join("ca/ca.crt");
    let edge_dir = dir.path().join("edge");
    let node = &procs[0];
    let https = node.https();
    let log: PathBuf = dir.path().join(&ips[0]).join(format!("{}.log", ips[0]));
    let original = first_cert(&edge_dir.join("edge.crt"));
    assert_eq!(served_leaf(&ca_pem, &https, &host), Ok(original.clone()));

    // Load: visitors on new connections through both nodes all along, and
    // one keep-alive visitor that stays on its connection throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for i in 0..4 {
        let entry = procs[i % 2].https();
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (ca_pem, host) = (ca_pem.clone(), host.clone());
        load.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match served_leaf(&ca_pem, &entry, &host) {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        eprintln!("visitor failed: {e}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    let kept_requests = Arc::new(AtomicUsize::new(0));
    let kept = {
        let (stop, ca_pem, host, https) =
            (stop.clone(), ca_pem.clone(), host.clone(), https.clone());
        let counted = kept_requests.clone();
        std::thread::spawn(move || -> Result<(usize, Vec<u8>), String> {
            let config = client_config(&ca_pem, &[b"http/1.1"]);
            let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
            let conn = rustls::ClientConnection::new(config, name).unwrap();
            let tcp = std::net::TcpStream::connect(&https).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut requests = 0;
            while !stop.load(Ordering::SeqCst) {
                write!(tls, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")
                    .map_err(|e| format!("request {requests}: {e}"))?;
                let answer =
                    read_answer(&mut tls).map_err(|e| format!("answer {requests}: {e}"))?;
                if answer != "ok" {
                    return Err(format!("answer {requests}: {answer:?}"));
                }
                requests += 1;
                counted.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
            let leaf = tls.conn.peer_certificates().unwrap()[0].to_vec();
            Ok((requests, leaf))
        })
    };
    let served_now = || served_leaf(&ca_pem, &https, &host).ok();

    // 1. A renewed edge certificate, picked up by `specter reload`.
    let second = renew_edge(dir.path(), &edge_dir, 2);
    let (reloaded, stdout, stderr) = reload(node.admin());
    assert!(reloaded, "reload refused: {stderr}");
    assert!(stdout.contains("edge.crt"), "{stdout}");
    assert!(!stdout.contains("restart"), "{stdout}");
    assert_eq!(served_now(), Some(second.clone()));
    // The other node was not reloaded: it still serves the old one.
    assert_eq!(
        served_leaf(&ca_pem, &procs[1].https(), &host),
        Ok(original.clone())
    );

    // 2. A broken certificate file is refused with one log line; the node
    //    keeps serving the certificate in force.
    std::fs::write(edge_dir.join("edge.crt"), "not a certificate\n").unwrap();
    let (reloaded, _, stderr) = reload(node.admin());
    assert!(!reloaded && stderr.contains("edge certificate"), "{stderr}");
    assert_eq!(log_count(&log, "reload refused"), 1);
    assert_eq!(served_now(), Some(second.clone()));

    // 3. A key that would make this another node is refused.
    let other = dir.path().join("other-node");
    issue(&dir.path().join("ca"), "other", &ips[0], &other);
    let node_dir = dir.path().join(&ips[0]);
    let saved = dir.path().join("saved-node");
    std::fs::create_dir(&saved).unwrap();
    for file in ["node.crt", "node.key"] {
        std::fs::rename(node_dir.join(file), saved.join(file)).unwrap();
        std::fs::copy(other.join(file), node_dir.join(file)).unwrap();
    }
    let _ = renew_edge(dir.path(), &edge_dir, 3);
    let (reloaded, _, stderr) = reload(node.admin());
    assert!(!reloaded && stderr.contains("new node"), "{stderr}");
    assert_eq!(served_now(), Some(second.clone()));
    for file in ["node.crt", "node.key"] {
        std::fs::rename(saved.join(file), node_dir.join(file)).unwrap();
    }

    // 4. SIGHUP reloads too, and a changed setting that needs a restart is
    //    reported, not applied; a config file that does not parse is refused.
    std::fs::write(&config, "log_format = \"json\"\n").unwrap();
    let fourth = renew_edge(dir.path(), &edge_dir, 4);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let switched = wait_for(Duration::from_secs(10), || {
        served_now() == Some(fourth.clone())
    });
    assert!(
        switched.is_some(),
        "SIGHUP did not reload the edge certificate"
    );
    assert!(
        wait_for(Duration::from_secs(5), || log_count(
            &log,
            "take effect at restart"
        ) == 1)
        .is_some()
    );
    std::fs::write(&config, "log_format = [\n").unwrap();
    let (reloaded, _, stderr) = reload(node.admin());
    assert!(!reloaded && stderr.contains("node.toml"), "{stderr}");
    assert_eq!(served_now(), Some(fourth.clone()));

    // The kept connection goes on after every reload, the visitors on new
    // connections get answers, and the node still works with its cluster.
    let after = kept_requests.load(Ordering::SeqCst);
    let goes_on = wait_for(Duration::from_secs(10), || {
        kept_requests.load(Ordering::SeqCst) >= after + 5 && ok.load(Ordering::SeqCst) >= 50
    });
    assert!(goes_on.is_some(), "visitors stopped being answered");
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join().unwrap();
    }
    let (requests, kept_leaf) = kept.join().unwrap().expect("the kept connection failed");
    assert_eq!(
        kept_leaf, original,
        "an open connection keeps its certificate"
    );
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    println!("{ok} visitors answered, {failed} failed, {requests} on the kept connection");
    assert_eq!(failed, 0);
    assert_eq!(state_of(node, &procs[1].id()), "alive");
    assert_eq!(state_of(&procs[1], &node.id()), "alive");
}

/// Runs headless chromium on `url` with `args` (after the page's scripts
/// had `budget` of virtual time); returns its standard output.
fn chromium(url: &str, profile: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium is installed (.ci/run installs it: apt-get install chromium)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn the_status_page_draws_every_member_of_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (51..=55).map(|i| format!("127.0.0.{i}")).collect();
    let dirs = issue_all(dir.path(), &ca_dir, &ips);
    let procs = start_all(dir.path(), &dirs, &ips);
    wait_ring(&procs);
    let url = format!("http://{}/", procs[0].admin());
    let profile = dir.path().join("chromium");

    // The page as the browser left it once its scripts ran.
    let dom = chromium(&url, &profile, &["--dump-dom"]);
    assert!(
        dom.contains("data-loaded=\"1\""),
        "the page did not load /status"
    );
    assert!(dom.contains("data-members=\"5\""), "{dom}");
    for p in &procs {
        let id = p.id();
        assert!(
            dom.contains(&format!("data-id=\"{id}\" data-state=\"alive\"")),
            "member {id} is not drawn alive"
        );
    }
    assert_eq!(dom.matches("class=\"member self\"").count(), 1);
    assert_eq!(dom.matches("class=\"member").count(), 5);

    // A screenshot, kept with the build's test files.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &url,
        &profile,
        &[
            "--window-size=1280,900",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    println!("status page screenshot: {}", shot.display());
}

#[test]
fn metrics_parse_as_openmetrics_with_histograms_and_every_figure() {
    use openmetrics_parser::{OpenMetricsType, OpenMetricsValue};
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let ips: Vec<String> = (61..=62).map(|i| format!("127.0.0.{i}")).collect();
    let procs = ingress_cluster(dir.path(), &ca_dir, &ips, |_| Vec::new());
    let (service, _) = keepalive_service();
    let _client = attach_one(
        dir.path(),
        "metrics",
        "metrics",
        &format!("http://{service}"),
        &procs[0].quic(),
    );
    // Visits through the forwarding node (lookups there), and one for a
    // name nobody registered.
    let ca_pem = dir.path().join("ca/ca.crt");
    let host = format!("metrics.{DOMAIN}");
    for _ in 0..5 {
        served_leaf(&ca_pem, &procs[1].https(), &host).unwrap();
    }
    let (_, status) = common::web::curl(
        dir.path(),
        &procs[1].https(),
        &format!("nobody.{DOMAIN}"),
        "/",
        false,
    );
    assert!(status.ends_with("404"), "{status}");

    let text = http_get(procs[1].admin(), "/metrics").unwrap();
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("/metrics is not valid OpenMetrics: {e:?}\n{text}"));
    let family = |name: &str| {
        parsed
            .families
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    let value = |name: &str, labels: &[&str]| -> f64 {
        let labels: Vec<String> = labels.iter().map(|l| (*l).to_string()).collect();
        let sample = family(name)
            .get_sample_by_label_values(&labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?}"));
        match &sample.value {
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            OpenMetricsValue::Gauge(g) => g.as_f64(),
            OpenMetricsValue::Histogram(h) => h.count.unwrap() as f64,
            other => panic!("{name}: {other:?}"),
        }
    };
    // Every family is named specter_…, and counters read …_total.
    for (name, f) in &parsed.families {
        assert!(name.starts_with("specter_"), "{name}");
        if f.family_type == OpenMetricsType::Counter {
            assert!(text.contains(&format!("\n{name}_total")), "{name}");
        }
    }
    // Histograms of visit opens, lookups and hops, with what happened.
    for h in [
        "specter_visit_open_seconds",
        "specter_dht_lookup_seconds",
        "specter_dht_lookup_hops",
    ] {
        assert_eq!(family(h).family_type, OpenMetricsType::Histogram, "{h}");
    }
    assert!(value("specter_visit_open_seconds", &[]) >= 1.0);
    assert!(value("specter_dht_lookup_seconds", &[]) >= 2.0);
    assert!(value("specter_visits", &["opened"]) >= 1.0);
    assert_eq!(value("specter_visits", &["unknown"]), 1.0);
    // Figures from every part of the node.
    assert_eq!(value("specter_members", &["alive"]), 1.0);
    assert_eq!(value("specter_ready", &[]), 1.0);
    assert_eq!(value("specter_dht_ring_size", &[]), 2.0);
    assert!(value("specter_gossip_packets_out", &[]) > 0.0);
    assert!(value("specter_quic_connections", &[]) >= 1.0);
    for name in [
        "specter_quic_duplicates_closed",
        "specter_quic_duplicate_streams_cut",
        "specter_quic_idle_closed",
        "specter_dht_requests",
        "specter_dht_handed_off",
        "specter_dht_sync_answers_cut",
        "specter_dht_requests_refused",
        "specter_clients_busy",
        "specter_ingress_broken",
        "specter_tunnel_detaches_cut",
        "specter_tunnel_route_refreshes_skipped",
        "specter_client_peer_requests_coalesced",
        "specter_gossip_meta_refused",
        "specter_dht_requests_late",
        "specter_ingress_fast_requests",
        "specter_ingress_fast_read_ahead_full",
    ] {
        assert_eq!(family(name).family_type, OpenMetricsType::Counter, "{name}");
    }
    assert!(value("specter_ingress_accepted", &[]) >= 6.0);
    assert_eq!(value("specter_ingress_timeouts", &["idle"]), 0.0);
    assert_eq!(value("specter_ingress_timeouts", &["answer"]), 0.0);
    // The five `Connection: close` visits are the full proxy's.
    assert!(value("specter_ingress_fast_handoffs", &["request"]) >= 5.0);
    for reason in ["head", "no_answer"] {
        assert_eq!(value("specter_ingress_fast_handoffs", &[reason]), 0.0);
    }
    assert!(family("specter_dht_records").family_type == OpenMetricsType::Gauge);
    assert_eq!(value("specter_tunnel_clients_detaching", &[]), 0.0);
    assert!(family("specter_quic_duplicates_draining").family_type == OpenMetricsType::Gauge);
    // The attached node counts the client holding the tunnel.
    let one_client = wait_for(Duration::from_secs(5), || {
        http_get(procs[0].admin(), "/metrics")
            .is_some_and(|m| m.contains("\nspecter_tunnel_client_connections 1\n"))
    });
    assert!(
        one_client.is_some(),
        "the attached node does not count its client"
    );
}
