//! HTTP visitors, on the HTTPS port (TLS terminated at the entry node) and
//! the plain-HTTP port: requests (HTTP/1.1 or HTTP/2 from the visitor) go
//! to the tunnel's target as HTTP/1.1 over a tunnel stream per request, with
//! `X-Forwarded-*`, `Forwarded` and `X-Real-IP` set by the node
//! ([`super::headers`]). Bodies stream both ways and are never buffered
//! whole; WebSocket (and other) upgrades are carried as raw bytes once both
//! sides switched protocols. Unknown names get a 404 page, unreachable
//! tunnels and failing targets a 502 page naming the cause, a request for
//! another tunnel than the TLS name 421.
//!
//! Every stage has a deadline ([`super::limits`]): the first request, the
//! head, HTTP/2 idle time and pings, the request body's rate, the target's
//! beginning of its answer (504 past it), and the visitor's reading of the
//! answer. A watchdog per connection enforces those
//! hyper does not.
//!
//! The HTTPS port's HTTP/1.1 connections start on the fast path
//! ([`super::fast`]), which carries bodiless `GET` and `HEAD` requests
//! itself and hands a connection here ([`serve_full`]) at its first other
//! request.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HOST, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use specter_tunnel::protocol::{MAX_EARLY_DATA, Visit, VisitKind};
use tokio::io::{AsyncRead, AsyncWrite};

use super::admission::Slot;
use super::bodies::{RateBody, Tracked};
use super::early::{Open, OpenOutcome, Opening};
use super::headers::{misdirected, set_forwarding};
use super::limits::{BODY_RATE_WINDOW, CLOSE_GRACE, Cut, IngressLimits};
use super::shared::{Ingress, idle};
use super::upstream::{Return, Returning, Upstream, Via};
use crate::node::tunnels::visit::{OpenError, Pair};

type Body = super::bodies::ProxyBody;

/// Largest request head accepted (HTTP/1.1 buffer, HTTP/2 header list); a
/// larger one is refused with bounded memory.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// How often a connection's watchdog looks at it.
const WATCH_EVERY: Duration = Duration::from_millis(500);

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

/// One visitor connection, as every request on it sees it.
#[derive(Clone)]
pub(super) struct Conn {
    pub(super) ingress: Arc<Ingress>,
    pub(super) slot: Arc<Slot>,
    pub(super) visitor: SocketAddr,
}

impl Conn {
    /// The request, held to the body rate, with the node's forwarding
    /// headers; `host` is its [`host_of`].
    fn prepare(
        &self,
        req: Request<Incoming>,
        host: Option<String>,
        proto: &'static str,
    ) -> Request<Body> {
        use hyper::body::Body as _;
        let limits = &self.ingress.limits;
        let trust = proto == "http" && limits.trust_proxy_headers;
        let (mut parts, body) = req.into_parts();
        // The target speaks HTTP/1.1: carry the authority of HTTP/2
        // requests as Host.
        if let Some(v) = host.as_deref().and_then(|h| HeaderValue::from_str(h).ok()) {
            parts.headers.insert(HOST, v);
        }
        set_forwarding(
            &mut parts.headers,
            self.visitor.ip(),
            proto,
            host.as_deref(),
            trust,
        );
        parts.version = Version::HTTP_11;
        // Origin form (`/path?query`), as HTTP/1.1 requests to a server are;
        // an HTTP/1.1 request's target mostly is already.
        if (parts.uri.scheme().is_some() || parts.uri.authority().is_some())
            && let Some(pq) = parts.uri.path_and_query().cloned()
        {
            parts.uri = pq.as_str().parse().unwrap_or_default();
        }
        // A body known to be empty (most GETs) has no rate to keep.
        if body.is_end_stream() {
            return Request::from_parts(parts, body.map_err(Into::into).boxed());
        }
        let sent = BodySent::default();
        let body = RateBody::new(
            body,
            self.slot.clone(),
            self.ingress.stats.clone(),
            limits.body_min_rate,
            BODY_RATE_WINDOW,
        )
        .telling_end(&sent.0);
        parts.extensions.insert(sent);
        Request::from_parts(parts, body.boxed())
    }
}

/// `Host`, else the HTTP/2 `:authority`.
fn host_of(headers: &hyper::HeaderMap, uri: &hyper::Uri) -> Option<String> {
    headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| uri.authority().map(|a| a.to_string()))
}

/// Serves an HTTPS visitor connection (TLS done) whose TLS name chose
/// tunnel `name` on the full proxy (hyper, HTTP/1.1 or HTTP/2) until it
/// ends: from the start for HTTP/2, else once the HTTP/1.1 fast path
/// ([`super::fast`]) has handed it over.
pub(super) async fn serve_full<IO>(io: IO, name: String, conn: Conn)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ingress, slot, visitor) = (conn.ingress.clone(), conn.slot.clone(), conn.visitor);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (conn, name) = (conn.clone(), name.clone());
        async move {
            let in_flight = conn.slot.request();
            let head = req.method() == Method::HEAD;
            let host = host_of(req.headers(), req.uri());
            let resp = if misdirected(&name, host.as_deref(), conn.ingress.edge_domain()) {
                conn.ingress.stats.misdirected();
                tracing::info!(visitor = %conn.visitor, tunnel = %name, ?host, "421: the request names another tunnel");
                page(
                    StatusCode::MISDIRECTED_REQUEST,
                    &format!("This connection is for {name:?}; open a new one for {host:?}."),
                    head,
                )
            } else {
                let req = conn.prepare(req, host, "https");
                forward(req, &name, &conn, head).await
            };
            Ok::<_, Infallible>(track(resp, &conn, in_flight))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let limits = &ingress.limits;
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(super::limits::H2_PING_INTERVAL)
        .keep_alive_timeout(super::limits::H2_PING_TIMEOUT)
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let graceful = |conn: Pin<&mut _>| {
        hyper_util::server::conn::auto::UpgradeableConnection::graceful_shutdown(conn)
    };
    if let Err(err) = supervise(conn, graceful, &slot, &ingress, visitor).await {
        tracing::debug!(%visitor, %err, "visitor connection ended with an error");
    }
}

/// Drives a visitor connection until it ends, the slot is closed, or
/// [`watch`] finds a deadline passed. An idle connection is closed
/// gracefully (an HTTP/2 GOAWAY, so a request racing the close is retried on
/// a new connection), any other at once.
pub(super) async fn supervise<C, T: Default, E>(
    mut conn: Pin<&mut C>,
    graceful: impl FnOnce(Pin<&mut C>),
    slot: &Slot,
    ingress: &Ingress,
    visitor: SocketAddr,
) -> Result<T, E>
where
    C: Future<Output = Result<T, E>>,
{
    tokio::select! {
        r = conn.as_mut() => r,
        why = watch(slot, &ingress.limits) => {
            ingress.stats.cut(why);
            tracing::debug!(%visitor, ?why, "closing a visitor connection");
            if why == Cut::Idle {
                graceful(conn.as_mut());
                tokio::time::timeout(CLOSE_GRACE, conn).await.unwrap_or(Ok(T::default()))
            } else {
                Ok(T::default())
            }
        }
        () = slot.closed() => Ok(T::default()),
    }
}

/// Completes when the connection has outstayed a deadline hyper does not
/// enforce: no first request, HTTP/2 idle, or an answer the visitor stopped
/// taking. Returns which.
async fn watch(slot: &Slot, limits: &IngressLimits) -> Cut {
    // One timer for the connection's life, moved rather than made anew: a
    // busy keep-alive connection costs a wake-up per tick, not a timer and a
    // wake-up per request.
    let tick = tokio::time::sleep(WATCH_EVERY);
    tokio::pin!(tick);
    let mut idle_wait = false;
    loop {
        if idle_wait {
            tokio::select! {
                () = tick.as_mut() => {}
                // A request began: its answer is now worth watching every
                // tick.
                () = slot.request_began() => {}
            }
        } else {
            tick.as_mut().await;
        }
        idle_wait = false;
        tick.as_mut()
            .reset(tokio::time::Instant::now() + WATCH_EVERY);
        // A frame the visitor has not taken, and no byte written to it
        // either: it stopped reading. (A stream paused while the connection
        // still moves bytes is the visitor's choice, not a stall.)
        let stall = slot.stalled_for().min(slot.write_idle());
        if stall >= limits.write_stall_timeout {
            return Cut::WriteStall;
        }
        if slot.in_flight() > 0 {
            continue;
        }
        let (limit, why) = if slot.requests() == 0 {
            (limits.first_request_timeout, Cut::FirstRequest)
        } else {
            (limits.http_idle_timeout, Cut::Idle)
        };
        // HTTP exchanges only: keep-alive pings do not keep a connection
        // that asks for nothing.
        let idle = slot.exchange_idle();
        if idle >= limit {
            return why;
        }
        // Nothing in flight (so no answer to stall): an idle connection costs
        // one wake-up per idle deadline, not one per tick, unless a request
        // begins meanwhile.
        let wait = (limit - idle).max(WATCH_EVERY);
        tick.as_mut().reset(tokio::time::Instant::now() + wait);
        idle_wait = true;
    }
}

/// The response, its body tracked on the connection's slot and the request
/// kept in flight until the body is done.
fn track(
    resp: Response<Body>,
    conn: &Conn,
    in_flight: super::admission::InFlight,
) -> Response<Body> {
    let (slot, stats) = (conn.slot.clone(), conn.ingress.stats.clone());
    resp.map(|body| Tracked::new(body, slot, stats, in_flight).boxed())
}

/// Serves one plain-HTTP visitor connection: `Host` names the tunnel.
pub async fn serve_plain<IO>(
    io: IO,
    visitor: SocketAddr,
    slot: Arc<Slot>,
    ingress: Arc<Ingress>,
    domain: Arc<str>,
    mode: HttpMode,
    https_port: Option<u16>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Conn {
        ingress: ingress.clone(),
        slot: slot.clone(),
        visitor,
    };
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (conn, domain) = (conn.clone(), domain.clone());
        async move {
            let in_flight = conn.slot.request();
            let head = req.method() == Method::HEAD;
            let host = req
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let resp = match specter_tunnel::names::name_in_host(&host, &domain) {
                None => {
                    tracing::info!(visitor = %conn.visitor, %host, "404: unknown host");
                    page(
                        StatusCode::NOT_FOUND,
                        &format!("{host:?} is not a tunnel under {domain}."),
                        head,
                    )
                }
                Some(name) => match mode {
                    HttpMode::Proxy => {
                        let host = host_of(req.headers(), req.uri());
                        let req = conn.prepare(req, host, "http");
                        forward(req, &name, &conn, head).await
                    }
                    HttpMode::Redirect => redirect(&req, &host, https_port, head),
                },
            };
            Ok::<_, Infallible>(track(resp, &conn, in_flight))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    let limits = &ingress.limits;
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let graceful = |conn: Pin<&mut _>| {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(conn)
    };
    if let Err(err) = supervise(conn, graceful, &slot, &ingress, visitor).await {
        tracing::debug!(%visitor, %err, "plain-HTTP visitor connection ended with an error");
    }
}

/// The 308 to the same URL over HTTPS.
fn redirect(
    req: &Request<Incoming>,
    host: &str,
    https_port: Option<u16>,
    head: bool,
) -> Response<Body> {
    let bare = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let port = https_port
        .filter(|p| *p != 443)
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{bare}{port}{path}");
    let mut r = page(
        StatusCode::PERMANENT_REDIRECT,
        &format!("Moved to {location}"),
        head,
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(hyper::header::LOCATION, v);
    }
    r
}

/// A small HTML page for errors a visitor sees. A `head` request gets the
/// headers alone (an HTTP/2 HEAD answer must carry no body, nor announce
/// one it does not send).
pub fn page(status: StatusCode, message: &str, head: bool) -> Response<Body> {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let html = format!(
        "<!doctype html><html><head><title>{title}</title></head><body><h1>{title}</h1><p>{}</p><hr><p>specter</p></body></html>\n",
        message.replace('&', "&amp;").replace('<', "&lt;")
    );
    let body = if head {
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed()
    } else {
        Full::new(Bytes::from(html))
            .map_err(|never| match never {})
            .boxed()
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// Cancelled when a request's body has been sent (a request without one
/// has no such token): the target's time to answer runs from then.
#[derive(Clone, Default)]
struct BodySent(tokio_util::sync::CancellationToken);

/// `answer` (a request's answer head, or its failure), unless the target
/// has not begun it within `limit` of the request having been sent, body
/// and all (`sent`, if it has a body): then `None`, and `answer` is dropped
/// with its connection.
async fn within_answer_limit<F: Future>(
    answer: F,
    sent: Option<&BodySent>,
    limit: Duration,
) -> Option<F::Output> {
    let deadline = async {
        if let Some(BodySent(token)) = sent {
            token.cancelled().await;
        }
        tokio::time::sleep(limit).await;
    };
    tokio::select! {
        biased;
        out = answer => Some(out),
        () = deadline => None,
    }
}

/// Resets an upstream's tunnel stream (see `OpenOutcome::abandon`) unless
/// its request was answered: a request given up before its answer began
/// (past `answer_timeout`, or its visitor left) would otherwise end its
/// stream cleanly, and the client would keep its connection to the target
/// waiting for an answer nobody reads.
pub(super) struct Unanswered(pub(super) Option<OpenOutcome>);

impl Unanswered {
    /// The answer began: the connection may end cleanly or be reused.
    pub(super) fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(stream) = self.0.take() {
            stream.abandon();
        }
    }
}

/// The 504 for a request whose target did not begin its answer in time.
pub(super) fn answer_timed_out(name: &str, conn: &Conn, head: bool) -> (Response<Body>, bool) {
    let limit = conn.ingress.limits.answer_timeout;
    conn.ingress.stats.cut(Cut::Answer);
    tracing::info!(visitor = %conn.visitor, tunnel = %name, ?limit, "504: the target did not begin its answer in time");
    let page = page(
        StatusCode::GATEWAY_TIMEOUT,
        &format!("Tunnel {name:?}: the target did not begin its answer within {limit:?}."),
        head,
    );
    // It may have taken the request: not sent again.
    (page, false)
}

/// Sends `req` to tunnel `name`'s target as HTTP/1.1: on an idle pooled
/// connection if there is one (see [`super::upstream`]), else over a new
/// tunnel stream. `Ok` is the answer and, unless the request asked for an
/// upgrade, its connection, to go back to the pool when the answer is done.
/// `Err` is the page the visitor gets, and whether the request may not have
/// reached the target's answer (so a replayable one may be retried).
async fn send_once(
    mut req: Request<Body>,
    name: &str,
    conn: &Conn,
    head: bool,
) -> Result<(Response<Incoming>, Option<Upstream<SendRequest<Body>>>), (Response<Body>, bool)> {
    let visitor = conn.visitor;
    let upstreams = &conn.ingress.upstreams;
    let limit = conn.ingress.limits.answer_timeout;
    let sent = req.extensions_mut().remove::<BodySent>();
    let reuse = !req.headers().contains_key(hyper::header::UPGRADE);
    let tunnels = &conn.ingress.tunnels;
    if reuse && let Some(mut pooled) = upstreams.take_routed(name, tunnels) {
        let unanswered = Unanswered(Some(pooled.stream.clone()));
        let answer = within_answer_limit(pooled.link.try_send_request(req), sent.as_ref(), limit);
        let Some(answer) = answer.await else {
            return Err(answer_timed_out(name, conn, head));
        };
        match answer {
            Ok(resp) => {
                unanswered.answered();
                return Ok((resp, Some(pooled)));
            }
            Err(mut err) => match err.take_message() {
                // Never sent (the connection had died): a fresh stream.
                Some(unsent) => {
                    // Nothing reached the stream: it may end cleanly.
                    unanswered.answered();
                    req = unsent;
                }
                None => {
                    let err = err.into_error();
                    tracing::info!(%visitor, tunnel = %name, %err, "502: a reused connection failed");
                    return Err((bad_gateway(name, &err, head), true));
                }
            },
        }
    }
    // The stream opens when hyper has written the request head, which then
    // goes with the visit header; only a request that may reach the target
    // twice (see `Replay`) is sent before the client's `Ready`.
    let early_limit = if Replay::of(&req).is_some() {
        MAX_EARLY_DATA
    } else {
        0
    };
    let (io, outcome, opened, via) = tunnel_stream(name, conn, early_limit);
    let unanswered = Unanswered(Some(outcome.clone()));
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(io)).await {
            Ok(x) => x,
            Err(err) => {
                let page = page(
                    StatusCode::BAD_GATEWAY,
                    &format!("Tunnel {name:?}: {err}"),
                    head,
                );
                return Err((page, true));
            }
        };
    tokio::spawn(async move {
        if let Err(err) = connection.with_upgrades().await {
            tracing::debug!(%err, "tunnel HTTP connection ended with an error");
        }
    });
    let answer = within_answer_limit(sender.send_request(req), sent.as_ref(), limit);
    let Some(answer) = answer.await else {
        return Err(answer_timed_out(name, conn, head));
    };
    match answer {
        Ok(resp) => {
            unanswered.answered();
            Ok((
                resp,
                reuse.then(|| Upstream::new(sender, outcome, opened, via)),
            ))
        }
        Err(err) => {
            if let Some(failed) = outcome.failed() {
                // No path was opened: say why, and do not try again.
                return Err((open_failed(name, visitor, &failed, head), false));
            }
            tracing::info!(%visitor, tunnel = %name, %err, "502: target did not answer");
            Err((bad_gateway(name, &err, head), true))
        }
    }
}

/// A tunnel stream to `name`'s target for `conn`'s visitor that opens on
/// its first flush, what was written before it (up to `early_limit` bytes)
/// going with the visit header; with the handle that resets it, when its
/// opening began, and the node it goes through once open.
pub(super) fn tunnel_stream(
    name: &str,
    conn: &Conn,
    early_limit: usize,
) -> (Opening<Pair>, OpenOutcome, std::time::Instant, Via) {
    let (tunnels, owned_name, visitor) =
        (conn.ingress.tunnels.clone(), name.to_string(), conn.visitor);
    let via = Via::default();
    let path = via.clone();
    let open: Open<_> = Box::new(move |early| {
        Box::pin(async move {
            let visit = Visit {
                name: owned_name.clone(),
                visitor,
                kind: VisitKind::Http,
                early,
            };
            let pair = tunnels.open(&owned_name, &visit).await?;
            if let Some(node) = pair.via {
                let _ = path.set(node);
            }
            Ok(pair)
        })
    });
    let opened = std::time::Instant::now();
    let (io, outcome) = Opening::new(open, early_limit, Pair::reset);
    (io, outcome, opened, via)
}

/// The page for a visitor whose tunnel stream could not be opened.
pub(super) fn open_failed(
    name: &str,
    visitor: SocketAddr,
    err: &OpenError,
    head: bool,
) -> Response<Body> {
    let (status, message) = match err {
        OpenError::Unknown => (
            StatusCode::NOT_FOUND,
            format!("No tunnel named {name:?} is registered."),
        ),
        OpenError::TargetRefused => (
            StatusCode::BAD_GATEWAY,
            format!("Tunnel {name:?}: the client could not reach its target (connection refused)."),
        ),
        OpenError::Unreachable => (
            StatusCode::BAD_GATEWAY,
            format!("Tunnel {name:?} is registered but none of its attachments answered."),
        ),
        OpenError::NotReady => (
            StatusCode::SERVICE_UNAVAILABLE,
            "This node is starting and cannot route yet; try again in a moment.".to_string(),
        ),
    };
    tracing::info!(%visitor, tunnel = %name, %err, "{}", status.as_u16());
    let mut page = page(status, &message, head);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        page.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    page
}

fn bad_gateway(name: &str, err: &hyper::Error, head: bool) -> Response<Body> {
    page(
        StatusCode::BAD_GATEWAY,
        &format!(
            "Tunnel {name:?}: the client could not reach its target, or the target did not answer ({err})."
        ),
        head,
    )
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
    fn of(req: &Request<Body>) -> Option<Replay> {
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

/// Sends a prepared request through the tunnel (again on another path if
/// it is replayable and its path died before the answer), and splices an
/// upgrade once both sides switched.
async fn forward(mut req: Request<Body>, name: &str, conn: &Conn, head: bool) -> Response<Body> {
    let visitor = conn.visitor;
    let wants_upgrade = req.headers().contains_key(hyper::header::UPGRADE);
    let visitor_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let replay = Replay::of(&req);
    let mut next = Some(req);
    let mut attempts = 0;
    let (mut resp, reusable) = loop {
        attempts += 1;
        let req = next.take().or_else(|| replay.as_ref().map(Replay::request));
        let Some(req) = req else {
            unreachable!("only replayable requests are attempted again")
        };
        match send_once(req, name, conn, head).await {
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
        let (slot, stats) = (conn.slot.clone(), conn.ingress.stats.clone());
        let idle_limit = conn.ingress.limits.raw_tcp_idle;
        let stall = conn.ingress.limits.write_stall_timeout;
        tokio::spawn(async move {
            if let (Ok(v), Ok(t)) = tokio::join!(visitor_upgrade, target_upgrade) {
                // Upgraded (a WebSocket): raw bytes, with raw TCP's idle rule.
                tokio::select! {
                    spliced = splice_upgraded(TokioIo::new(v), t, stall) => {
                        if let Err(err) = spliced
                            && err.kind() != std::io::ErrorKind::UnexpectedEof
                        {
                            stats.broken();
                            tracing::info!(%err, "upgraded connection broken mid-way; reset");
                        }
                    }
                    () = idle(&slot, idle_limit) => stats.cut(Cut::RawIdle),
                    () = slot.closed() => {}
                }
            }
        });
    }
    // A reused (or reusable) connection goes back to the pool when its
    // answer has been read to the end.
    match reusable {
        Some(upstream) => {
            let back = Return {
                upstream,
                name: name.to_string(),
                upstreams: conn.ingress.upstreams.clone(),
                tunnels: conn.ingress.tunnels.clone(),
            };
            resp.map(|body| Returning::new(body, back).boxed())
        }
        None => resp.map(|body| body.map_err(Into::into).boxed()),
    }
}

/// Splices an upgraded visitor connection with the tunnel stream under its
/// upgraded upstream connection (always a fresh one: upgrades are never
/// pooled), as the raw-TCP ingress does: the bytes hyper read past the
/// switch go to the visitor first, then the stream is spliced as its own
/// QUIC end (no staging copy), ending when the client's end stops reading
/// it. A side that broke or stalled resets the stream: the client does not
/// see a clean end as if the visitor were done.
async fn splice_upgraded(
    mut visitor: TokioIo<hyper::upgrade::Upgraded>,
    upstream: hyper::upgrade::Upgraded,
    stall: Duration,
) -> std::io::Result<()> {
    type Upstream = TokioIo<Opening<crate::node::tunnels::visit::Pair>>;
    let parts = match upstream.downcast::<Upstream>() {
        Ok(parts) => parts,
        // Not ours (never so today): spliced as any connection.
        Err(other) => {
            let mut other = TokioIo::new(other);
            return specter_tunnel::splice::splice_within(&mut visitor, &mut other, stall)
                .await
                .map(drop);
        }
    };
    let mut opening = parts.io.into_inner();
    let Some(pair) = opening.stream_mut() else {
        return Err(std::io::Error::other(
            "upgraded before its tunnel stream opened",
        ));
    };
    let spliced = async {
        if !parts.read_buf.is_empty() {
            use tokio::io::AsyncWriteExt;
            tokio::time::timeout(stall, visitor.write_all(&parts.read_buf))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        }
        crate::wire::splice_stream(&mut pair.send, &mut pair.recv, &mut visitor, stall)
            .await
            .map(drop)
    }
    .await;
    if let Err(err) = &spliced
        && err.kind() != std::io::ErrorKind::UnexpectedEof
    {
        pair.reset();
    }
    spliced
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
