//! HTTPS visitors: TLS is terminated at the entry node, requests (HTTP/1.1 or
//! HTTP/2 from the visitor) are sent to the tunnel's target as HTTP/1.1 over a
//! tunnel stream per request, with `X-Forwarded-For`, `X-Forwarded-Proto` and
//! `X-Forwarded-Host`. Bodies stream both ways and are never buffered whole;
//! WebSocket (and other) upgrades are carried as raw bytes once both sides
//! switched protocols. Unknown names get a 404 page, unreachable tunnels and
//! failing targets a 502 page naming the cause.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HOST, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use specter_tunnel::protocol::{Visit, VisitKind};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::node::tunnels::Tunnels;
use crate::node::tunnels::visit::OpenError;

type Body = BoxBody<Bytes, hyper::Error>;

/// A visitor must send a complete request head within this; one that stalls
/// mid-header is cut off (its connection and task freed).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest request head accepted (HTTP/1.1 buffer, HTTP/2 header list); a
/// larger one is refused with bounded memory.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves one visitor connection (already TLS-terminated) for tunnel `name`.
pub async fn serve<IO>(
    io: IO,
    name: String,
    visitor: SocketAddr,
    tunnels: Arc<Tunnels>,
    proto: &'static str,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (name, tunnels) = (name.clone(), tunnels.clone());
        async move { Ok::<_, Infallible>(forward(req, name, visitor, tunnels, proto).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX));
    if let Err(err) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        tracing::debug!(%visitor, %err, "visitor connection ended with an error");
    }
}

/// What the plain-HTTP port does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    /// Answer with a redirect to HTTPS (every visitor hop stays encrypted).
    #[default]
    Redirect,
    /// Carry the request like HTTPS does (for operators behind their own TLS
    /// terminator, and for benchmarks).
    Proxy,
}

/// Serves one plain-HTTP visitor connection: `Host` names the tunnel.
pub async fn serve_plain<IO>(
    io: IO,
    visitor: SocketAddr,
    domain: Arc<str>,
    mode: HttpMode,
    https_port: Option<u16>,
    tunnels: Arc<Tunnels>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (domain, tunnels) = (domain.clone(), tunnels.clone());
        async move {
            let host = req
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let Some(name) = specter_tunnel::names::name_in_host(&host, &domain) else {
                tracing::info!(%visitor, %host, "404: unknown host");
                return Ok::<_, Infallible>(page(
                    StatusCode::NOT_FOUND,
                    &format!("{host:?} is not a tunnel under {domain}."),
                ));
            };
            match mode {
                HttpMode::Proxy => Ok(forward(req, name, visitor, tunnels, "http").await),
                HttpMode::Redirect => {
                    let bare = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
                    let port = https_port
                        .filter(|p| *p != 443)
                        .map(|p| format!(":{p}"))
                        .unwrap_or_default();
                    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
                    let location = format!("https://{bare}{port}{path}");
                    let mut r = page(
                        StatusCode::PERMANENT_REDIRECT,
                        &format!("Moved to {location}"),
                    );
                    if let Ok(v) = HeaderValue::from_str(&location) {
                        r.headers_mut().insert(hyper::header::LOCATION, v);
                    }
                    Ok(r)
                }
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    if let Err(err) = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(%visitor, %err, "plain-HTTP visitor connection ended with an error");
    }
}

/// A small HTML page for errors a visitor sees.
pub fn page(status: StatusCode, message: &str) -> Response<Body> {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let html = format!(
        "<!doctype html><html><head><title>{title}</title></head><body><h1>{title}</h1><p>{}</p><hr><p>specter</p></body></html>\n",
        message.replace('&', "&amp;").replace('<', "&lt;")
    );
    let mut r = Response::new(
        Full::new(Bytes::from(html))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// Opens a stream to the tunnel's client and sends `req` over it as
/// HTTP/1.1. `Err` is the page the visitor gets, and whether the request
/// never reached the target's answer (so a replayable one may be retried).
async fn send_once(
    req: Request<Body>,
    name: &str,
    visitor: SocketAddr,
    tunnels: &Tunnels,
) -> Result<Response<Incoming>, (Response<Body>, bool)> {
    let visit = Visit {
        name: name.to_string(),
        visitor,
        kind: VisitKind::Http,
    };
    let (send, recv) = match tunnels.open(name, &visit).await {
        Ok(pair) => pair,
        Err(err) => {
            let (status, message) = match err {
                OpenError::Unknown => (
                    StatusCode::NOT_FOUND,
                    format!("No tunnel named {name:?} is registered."),
                ),
                OpenError::TargetRefused => (
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "Tunnel {name:?}: the client could not reach its target (connection refused)."
                    ),
                ),
                OpenError::Unreachable => (
                    StatusCode::BAD_GATEWAY,
                    format!("Tunnel {name:?} is registered but none of its attachments answered."),
                ),
            };
            tracing::info!(%visitor, tunnel = %name, %err, "{}", status.as_u16());
            return Err((page(status, &message), false));
        }
    };
    let io = TokioIo::new(tokio::io::join(recv, send));
    let (mut sender, conn) = match hyper::client::conn::http1::handshake::<_, Body>(io).await {
        Ok(x) => x,
        Err(err) => {
            let page = page(StatusCode::BAD_GATEWAY, &format!("Tunnel {name:?}: {err}"));
            return Err((page, true));
        }
    };
    tokio::spawn(async move {
        if let Err(err) = conn.with_upgrades().await {
            tracing::debug!(%err, "tunnel HTTP connection ended with an error");
        }
    });
    sender.send_request(req).await.map_err(|err| {
        tracing::info!(%visitor, tunnel = %name, %err, "502: target did not answer");
        let page = page(
            StatusCode::BAD_GATEWAY,
            &format!(
                "Tunnel {name:?}: the client could not reach its target, or the target did not answer ({err})."
            ),
        );
        (page, true)
    })
}

/// What is needed to send a request again: one with an idempotent method,
/// no body and no upgrade. If its path dies before the answer starts (the
/// node it went through was killed), it is retried on another path instead
/// of failing the visitor.
struct Replay {
    method: hyper::Method,
    uri: hyper::Uri,
    headers: hyper::HeaderMap,
}

impl Replay {
    fn of(req: &Request<Incoming>) -> Option<Replay> {
        use hyper::body::Body as _;
        replayable(req.method(), req.headers(), req.body().is_end_stream()).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
        })
    }

    fn request(&self) -> Request<Body> {
        let mut req = Request::new(
            http_body_util::Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        );
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Whether a request may be sent again on another path: an idempotent
/// method, no body (`body_done`: the body is known empty) and no upgrade.
fn replayable(method: &hyper::Method, headers: &hyper::HeaderMap, body_done: bool) -> bool {
    use hyper::Method;
    let idempotent = [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::DELETE,
        Method::PUT,
    ]
    .contains(method);
    idempotent && body_done && !headers.contains_key(hyper::header::UPGRADE)
}

/// Attempts at a replayable request.
const REPLAY_ATTEMPTS: usize = 3;

async fn forward(
    mut req: Request<Incoming>,
    name: String,
    visitor: SocketAddr,
    tunnels: Arc<Tunnels>,
    proto: &'static str,
) -> Response<Body> {
    // The target speaks HTTP/1.1: carry the authority of HTTP/2 requests as Host.
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if let Some(host) = &host {
        if let Ok(v) = HeaderValue::from_str(host) {
            req.headers_mut().insert(HOST, v.clone());
            req.headers_mut().insert("x-forwarded-host", v);
        }
    }
    *req.version_mut() = Version::HTTP_11;
    if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = pq.as_str().parse().unwrap_or_default();
    }
    let xff = match req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {}", visitor.ip()),
        None => visitor.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        req.headers_mut().insert("x-forwarded-for", v);
    }
    req.headers_mut()
        .insert("x-forwarded-proto", HeaderValue::from_static(proto));

    let wants_upgrade = req.headers().contains_key(hyper::header::UPGRADE);
    let visitor_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let replay = Replay::of(&req);
    let mut next = Some(req.map(BodyExt::boxed));
    let mut attempts = 0;
    let mut resp = loop {
        attempts += 1;
        let req = next.take().or_else(|| replay.as_ref().map(Replay::request));
        let Some(req) = req else {
            unreachable!("only replayable requests are attempted again")
        };
        match send_once(req, &name, visitor, &tunnels).await {
            Ok(resp) => break resp,
            Err((page, retry)) => match &replay {
                Some(_) if retry && attempts < REPLAY_ATTEMPTS => {
                    tracing::info!(%visitor, tunnel = %name, attempts, "retrying a replayable request on another path");
                }
                _ => return page,
            },
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(visitor_upgrade) = visitor_upgrade
    {
        let target_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(v), Ok(t)) = tokio::join!(visitor_upgrade, target_upgrade) {
                let (mut v, mut t) = (TokioIo::new(v), TokioIo::new(t));
                let _ = specter_tunnel::splice::splice(&mut v, &mut t).await;
            }
        });
    }
    resp.map(BodyExt::boxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::{HeaderMap, Method};

    #[test]
    fn only_idempotent_requests_without_body_or_upgrade_are_replayed() {
        let plain = HeaderMap::new();
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::DELETE,
            Method::PUT,
        ] {
            assert!(replayable(&m, &plain, true), "{m}");
            assert!(!replayable(&m, &plain, false), "{m} with a body");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!replayable(&m, &plain, true), "{m}");
        }
        let mut upgrade = HeaderMap::new();
        upgrade.insert(
            hyper::header::UPGRADE,
            HeaderValue::from_static("websocket"),
        );
        assert!(!replayable(&Method::GET, &upgrade, true));
    }
}
