//! The loopback admin API: `GET /status` (JSON) and `GET /metrics`
//! (Prometheus text). A deliberately small HTTP/1.1 responder: one request per
//! connection, bounded header size and read time, so a stuck or abusive client
//! costs one task for a few seconds at most.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::node::NodeShared;

/// Largest request head accepted; the API takes no bodies.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A client has this long to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;

/// Serves the admin API on `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, node: Arc<NodeShared>, cancel: CancellationToken) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            permit = limit.clone().acquire_owned() => permit.expect("semaphore never closed"),
        };
        let (stream, _) = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(%err, "admin accept failed");
                    continue;
                }
            },
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(err) = handle(stream, &node).await {
                tracing::debug!(%err, "admin request failed");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, node: &NodeShared) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(Some(end));
            }
            if buf.len() >= MAX_REQUEST_HEAD {
                return Ok(None);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let (status, content_type, body) = match head {
        Err(_) => return Ok(()),
        Ok(Err(err)) => return Err(err),
        Ok(Ok(None)) => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
        Ok(Ok(Some(end))) => match dht_route(&buf[..end]) {
            Some(Ok((write, name))) => dht(node, write, name).await,
            Some(Err(msg)) => ("400 Bad Request", "text/plain", format!("{msg}\n")),
            None => route(&buf[..end], node),
        },
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn route(head: &[u8], node: &NodeShared) -> (&'static str, &'static str, String) {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    match (method, path) {
        (Some(b"GET"), Some(b"/status")) => {
            let json = serde_json::to_string_pretty(&node.status())
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
            ("200 OK", "application/json", json + "\n")
        }
        (Some(b"GET"), Some(b"/metrics")) => ("200 OK", "text/plain; version=0.0.4", metrics(node)),
        (Some(b"GET"), Some(_)) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        ),
    }
}

/// `GET /dht/get?name=N` or `POST /dht/put?name=N`: `Some(Ok((is_write, name)))`.
fn dht_route(head: &[u8]) -> Option<Result<(bool, String), String>> {
    let line = std::str::from_utf8(head.split(|&b| b == b'\r').next()?).ok()?;
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let write = match (method, path) {
        ("GET", "/dht/get") => false,
        ("POST", "/dht/put") => true,
        _ => return None,
    };
    let name = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("name="))
        .unwrap_or_default();
    Some(
        specter_tunnel::names::validate(name)
            .map(|()| (write, name.to_string()))
            .map_err(|e| e.to_string()),
    )
}

/// Runs a DHT read (or an operator test registration) through this node.
async fn dht(node: &NodeShared, write: bool, name: String) -> (&'static str, &'static str, String) {
    let outcome = if write {
        let op = crate::dht::admin_registration(node);
        node.dht(|reply| crate::dht::Command::Put {
            name: name.clone(),
            op,
            reply,
        })
        .await
    } else {
        node.dht(|reply| crate::dht::Command::Get {
            name: name.clone(),
            reply,
        })
        .await
    };
    let Some((outcome, took)) = outcome else {
        return ("503 Service Unavailable", "text/plain", "dht busy\n".into());
    };
    let key = format!("{:016x}", specter_dht::key_of(&name));
    let latency_ms = took.as_secs_f64() * 1e3;
    let (status, json) = match outcome {
        specter_dht::Outcome::Got { item, hops } => (
            if item.is_some() {
                "200 OK"
            } else {
                "404 Not Found"
            },
            serde_json::json!({"name": name, "key": key, "hops": hops, "latency_ms": latency_ms, "record": item.map(|i| crate::dht::record_json(&i.record))}),
        ),
        specter_dht::Outcome::Wrote { record, hops } => (
            "200 OK",
            serde_json::json!({"name": name, "key": key, "hops": hops, "latency_ms": latency_ms, "record": crate::dht::record_json(&record)}),
        ),
        specter_dht::Outcome::Refused(code) => (
            "409 Conflict",
            serde_json::json!({"name": name, "key": key, "error": code.to_string()}),
        ),
        specter_dht::Outcome::Unreachable { hops } => (
            "502 Bad Gateway",
            serde_json::json!({"name": name, "key": key, "hops": hops, "error": "no node that holds the key answered"}),
        ),
    };
    (status, "application/json", json.to_string() + "\n")
}

fn metrics(node: &NodeShared) -> String {
    let s = node.status();
    let mut out = String::new();
    let count = |state| s.members.iter().filter(|m| m.state == state).count();
    let alive = count(specter_gossip::MemberState::Alive);
    let suspect = count(specter_gossip::MemberState::Suspect);
    let down = count(specter_gossip::MemberState::Down);
    let _ = writeln!(out, "# TYPE specter_members gauge");
    for (state, n) in [("alive", alive), ("suspect", suspect), ("down", down)] {
        let _ = writeln!(out, "specter_members{{state=\"{state}\"}} {n}");
    }
    let g = s.gossip;
    let t = s.transport;
    for (name, v) in [
        ("specter_gossip_packets_out_total", g.packets_out),
        ("specter_gossip_bytes_out_total", g.bytes_out),
        ("specter_gossip_packets_in_total", g.packets_in),
        ("specter_gossip_bytes_in_total", g.bytes_in),
        ("specter_gossip_spoofed_dropped_total", g.spoofed_dropped),
        ("specter_gossip_invalid_dropped_total", g.invalid_dropped),
        ("specter_quic_datagrams_sent_total", t.datagrams_sent),
        (
            "specter_quic_datagrams_received_total",
            t.datagrams_received,
        ),
        (
            "specter_quic_datagram_send_errors_total",
            t.datagram_send_errors,
        ),
        ("specter_quic_inbox_dropped_total", t.inbox_dropped),
        ("specter_quic_handshakes_failed_total", t.handshakes_failed),
        (
            "specter_quic_handshakes_refused_total",
            t.handshakes_refused,
        ),
        ("specter_quic_wrong_peer_total", t.wrong_peer),
    ] {
        let _ = writeln!(out, "# TYPE {name} counter\n{name} {v}");
    }
    let _ = writeln!(
        out,
        "# TYPE specter_quic_connections gauge\nspecter_quic_connections {}",
        t.connections
    );
    out
}
