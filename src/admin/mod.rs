//! The loopback admin API: `GET /` (the status page), `GET /status`
//! (JSON), `GET /metrics` (Prometheus text, [`metrics`]), `POST /reload`,
//! and DHT reads and operator test writes (routes in [`routes`]). A deliberately small HTTP/1.1 responder: one
//! request per connection, bounded header size and read time, so a stuck or
//! abusive client costs one task for a few seconds at most.

mod metrics;
pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use self::routes::Route;
use crate::ingress::accept::AcceptBackoff;
use crate::node::status::NodeState;

/// The status page (`GET /`): one file, no external assets; it polls
/// `/status`.
const PAGE: &str = include_str!("status.html");

/// Largest request head accepted; the API takes no bodies.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A client has this long to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;

/// Serves the admin API on `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, node: NodeState, cancel: CancellationToken) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = AcceptBackoff::new("admin");
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
                    let wait = backoff.failed(&err);
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(wait) => continue,
                    }
                }
            },
        };
        backoff.succeeded();
        let node = node.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(err) = handle(stream, &node).await {
                tracing::debug!(%err, "admin request failed");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, node: &NodeState) -> std::io::Result<()> {
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
        Ok(Ok(Some(end))) => answer(Route::of(&buf[..end]), node).await,
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

async fn answer(route: Route, node: &NodeState) -> (&'static str, &'static str, String) {
    match route {
        Route::Status => {
            let json = serde_json::to_string_pretty(&node.status())
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
            ("200 OK", "application/json", json + "\n")
        }
        Route::Metrics => (
            "200 OK",
            metrics::CONTENT_TYPE,
            metrics::render(node.status(), node.dht.histograms()),
        ),
        Route::Page => ("200 OK", "text/html; charset=utf-8", PAGE.to_string()),
        Route::Reload => match node.reload().await {
            Some(Ok(report)) => (
                "200 OK",
                "application/json",
                serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
            ),
            Some(Err(err)) => ("409 Conflict", "text/plain", format!("{err}\n")),
            None => (
                "409 Conflict",
                "text/plain",
                "this node was not started from files (specter node); nothing to reload\n".into(),
            ),
        },
        Route::DhtGet(name) => dht(node, false, name).await,
        Route::DhtPut(name) => dht(node, true, name).await,
        Route::BadName(msg) => ("400 Bad Request", "text/plain", format!("{msg}\n")),
        Route::NotFound => ("404 Not Found", "text/plain", "not found\n".into()),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        ),
        Route::Forbidden(why) => {
            tracing::warn!(%why, "refused an admin request a browser could have sent");
            ("403 Forbidden", "text/plain", format!("{why}\n"))
        }
    }
}

/// Runs a DHT read (or an operator test registration) through this node.
async fn dht(node: &NodeState, write: bool, name: String) -> (&'static str, &'static str, String) {
    let outcome = if write {
        let op = crate::node::dht::admin_registration(node.me);
        node.dht.put(&name, op).await
    } else {
        node.dht.get(&name).await
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
            serde_json::json!({"name": name, "key": key, "hops": hops, "latency_ms": latency_ms, "record": item.map(|i| record_json(&i.record))}),
        ),
        specter_dht::Outcome::Wrote { record, hops } => (
            "200 OK",
            serde_json::json!({"name": name, "key": key, "hops": hops, "latency_ms": latency_ms, "record": record_json(&record)}),
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

/// A record as JSON for the admin API.
pub fn record_json(record: &specter_dht::Record) -> serde_json::Value {
    let now = crate::clock::now_ms();
    serde_json::json!({
        "claim": record.claim.map(|c| serde_json::json!({
            "owner": c.owner.to_string(),
            "version": c.version,
            "claimed_at_ms": c.claimed_at,
            "expires_at_ms": c.expires_at,
        })),
        "attachments": record.attachments.iter().map(|(node, a)| serde_json::json!({
            "node": node.to_string(),
            "addr": a.addr,
            "version": a.version,
            "lease_expiry_ms": a.lease_expiry,
            "live": a.is_live(now),
        })).collect::<Vec<_>>(),
    })
}
