//! The HTTP/1.1 fast path of the HTTPS port, and of the plain-HTTP port in
//! proxy mode (there each request's `Host` names its tunnel). Most requests
//! a browser or an API client sends over HTTP/1.1 are a `GET` or `HEAD` with
//! no body: for those, the visitor's own task writes the request head to a
//! pooled tunnel stream as bytes (the forwarding headers set, hop-by-hop
//! ones dropped), reads the answer's head, and copies the answer to the
//! visitor as it comes, its framing (length, chunks, or the end of the
//! stream) followed so the stream can be reused. No request or header map
//! is built, no second codec encodes the request again, and no task or
//! channel stands between the visitor and the tunnel stream.
//!
//! Anything else goes to the full HTTP proxy ([`super::http`], hyper on
//! both sides) with what was read so far, for the rest of the connection:
//! another method, a body, an upgrade, `Expect`, `Connection: close`, an
//! HTTP/1.0 or HTTP/2 visitor, a head over the limits, a `Host` naming
//! another tunnel (421 there) or, on plain HTTP, none (404 there), and a
//! request whose pooled stream failed before its answer began (hyper's path
//! sends it again on another path; such a request is a `GET` or `HEAD`,
//! which may reach the target twice, see `http::Replay`). A request for
//! which no stream could be opened gets the full proxy's page from here (it
//! would look the route up again).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use specter_tunnel::names::name_in_host;
use specter_tunnel::protocol::MAX_EARLY_DATA;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::admission::Slot;
use super::headers::{misdirected, set_forwarding};
use super::http::{
    self, Conn, HttpMode, MAX_HEADER_BYTES, Unanswered, answer_timed_out, open_failed, serve_full,
    supervise, tunnel_stream,
};
use super::limits::Fast;
use super::shared::Ingress;
use super::upstream::{RawLink, Upstream, home};

/// Header lines parsed in a head, the visitor's or the target's; a head
/// with more goes to the full proxy (hyper's own limit is 100 too).
const MAX_HEADERS: usize = 100;

/// What the target's answer is read into at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Request headers not carried to the target: hop-by-hop ones (of this
/// connection only) and those the node sets itself (see
/// [`set_forwarding`]).
const DROPPED: [&str; 12] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
];

/// A visitor connection handed to the full proxy: the bytes already read
/// from it come first.
pub struct Rewind<IO> {
    read: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How a connection's requests name their tunnel, and how they came.
struct Entry<'a> {
    /// HTTPS: the TLS name's tunnel (a `Host` naming another goes to the
    /// full proxy, 421 there). Plain HTTP: `None`, each request's `Host`
    /// names its own.
    tls_name: Option<&'a str>,
    /// The domain tunnels are named under.
    domain: &'a str,
    /// `https` or `http`, for the forwarding headers.
    proto: &'static str,
    /// Extend the forwarding headers a trusted proxy in front of the node
    /// set, rather than replace them (plain HTTP, `trust_proxy_headers`).
    trust: bool,
}

/// The forwarding headers a trusted proxy's values are kept in (see
/// [`set_forwarding`]).
const CHAINED: [&str; 3] = ["x-forwarded-for", "forwarded", "x-forwarded-proto"];

/// A request the fast path carries.
#[derive(Debug)]
struct Simple {
    /// The tunnel it is for.
    name: String,
    /// Its head as the target gets it.
    head: Vec<u8>,
    /// A `HEAD`: the answer has no body, whatever its head says.
    head_only: bool,
    /// Bytes of the visitor's head.
    len: usize,
}

/// The request whose head is `buf` (complete), if the fast path carries
/// it, on a connection from `visitor` to `entry`.
fn simple(buf: &[u8], entry: &Entry<'_>, visitor: std::net::IpAddr) -> Option<Simple> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = req.parse(buf).ok()? else {
        return None;
    };
    if req.version != Some(1) {
        return None;
    }
    let method = req.method?;
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return None,
    };
    let path = req.path?;
    if !path.starts_with('/') {
        return None;
    }
    let mut host = None;
    let mut forwarding = HeaderMap::new();
    for h in req.headers.iter() {
        let is = |n: &str| h.name.eq_ignore_ascii_case(n);
        if entry.trust && CHAINED.iter().any(|c| is(c)) {
            let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
            forwarding.append(name, HeaderValue::from_bytes(h.value).ok()?);
            continue;
        }
        if is("host") {
            if host.is_some() {
                return None;
            }
            host = Some(std::str::from_utf8(h.value).ok()?);
            continue;
        }
        // A body, an upgrade, an expectation, or a connection option other
        // than keep-alive: the full proxy's.
        let other = (is("content-length") && h.value != b"0")
            || is("transfer-encoding")
            || is("upgrade")
            || is("expect")
            || (is("connection")
                && !h
                    .value
                    .split(|b| *b == b',')
                    .all(|t| t.trim_ascii().eq_ignore_ascii_case(b"keep-alive")));
        if other {
            return None;
        }
    }
    let host = host?;
    let name = match entry.tls_name {
        Some(tls_name) if misdirected(tls_name, Some(host), entry.domain) => return None,
        Some(tls_name) => tls_name.to_string(),
        None => name_in_host(host, entry.domain)?,
    };
    let mut head = Vec::with_capacity(len + 256);
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        if DROPPED.iter().any(|d| h.name.eq_ignore_ascii_case(d)) {
            continue;
        }
        line(&mut head, h.name.as_bytes(), h.value);
    }
    set_forwarding(
        &mut forwarding,
        visitor,
        entry.proto,
        Some(host),
        entry.trust,
    );
    for (k, v) in &forwarding {
        line(&mut head, k.as_str().as_bytes(), v.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    Some(Simple {
        name,
        head,
        head_only,
        len,
    })
}

/// Appends header line `name: value`.
fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Where the end of a complete head is in `buf` (past its blank line),
/// looking only past `*seen`, the bytes an earlier call found no end in (so
/// a head trickled in a byte at a time costs one pass, not one per byte).
fn head_end(buf: &[u8], seen: &mut usize) -> Option<usize> {
    let from = (*seen).min(buf.len()).saturating_sub(3);
    let end = buf[from..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| from + i + 4);
    *seen = if end.is_some() { 0 } else { buf.len() };
    end
}

/// Writes `page` (one of `http::page`'s: its body is whole) to the visitor,
/// whose connection stays open for the next request; dated, as hyper's
/// server dates the same pages on the full proxy.
async fn write_page<IO>(
    io: &mut IO,
    page: hyper::Response<super::bodies::ProxyBody>,
) -> io::Result<()>
where
    IO: AsyncWrite + Unpin,
{
    use http_body_util::BodyExt;
    let (parts, body) = page.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    let status = parts.status;
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (k, v) in &parts.headers {
        line(&mut out, k.as_str().as_bytes(), v.as_bytes());
    }
    line(
        &mut out,
        b"content-length",
        body.len().to_string().as_bytes(),
    );
    line(&mut out, b"date", &date_now());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    io.write_all(&out).await?;
    io.flush().await
}

/// How an answer's body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body (a `HEAD`'s answer, 204, 304).
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`, carried as it is.
    Chunked,
    /// At the end of the stream: the stream is not reused, and the visitor
    /// gets the body in chunks, so that a body cut short shows as cut (no
    /// last chunk), as hyper's path frames it.
    ToEnd,
}

/// An HTTP-date (`Sun, 06 Nov 1994 08:49:37 GMT`).
type Date = [u8; 29];

/// The time now as an HTTP-date, formatted once a second per thread.
fn date_now() -> Date {
    use std::cell::Cell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static LAST: Cell<(u64, Date)> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    LAST.with(|last| {
        let (at, date) = last.get();
        if at == second {
            return date;
        }
        let mut date = [0; 29];
        let text = httpdate::fmt_http_date(now);
        date.copy_from_slice(&text.as_bytes()[..29]);
        last.set((second, date));
        date
    })
}

/// An answer's head, read.
#[derive(Debug)]
struct Answer {
    /// Bytes of the target's head (in its read buffer).
    len: usize,
    /// An informational answer (1xx but 101), skipped as hyper does.
    informational: bool,
    /// Its head as the visitor gets it.
    head: Vec<u8>,
    framing: Framing,
    /// The stream may carry another request after it.
    reusable: bool,
}

/// The answer whose head starts `buf`: `Ok(None)` while incomplete, `Err`
/// when it is not a valid HTTP/1.1 answer to a fast-path request. An answer
/// without a `Date` gets `date` (RFC 9110 6.6.1: a proxy with a clock adds
/// one; hyper's path does too).
fn answer(buf: &[u8], head_only: bool, date: &[u8]) -> Result<Option<Answer>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let code = resp.code.ok_or(())?;
    if code == 101 {
        // Nothing asked to switch.
        return Err(());
    }
    if (100..200).contains(&code) {
        return Ok(Some(Answer {
            len,
            informational: true,
            head: Vec::new(),
            framing: Framing::Empty,
            reusable: true,
        }));
    }
    let mut close = resp.version != Some(1);
    let mut dated = false;
    let mut chunked = None;
    let mut length = None;
    for h in resp.headers.iter() {
        let is = |n: &str| h.name.eq_ignore_ascii_case(n);
        if is("transfer-encoding") {
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if is("content-length") {
            let n: u64 = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(())?;
            if length.is_some_and(|m| m != n) {
                return Err(());
            }
            length = Some(n);
        } else if is("date") {
            dated = true;
        } else if is("connection") {
            close |= h
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    let framing = if head_only || code == 204 || code == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::ToEnd,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::ToEnd,
        }
    };
    let mut head = Vec::with_capacity(len + 32);
    head.extend_from_slice(format!("HTTP/1.1 {code} ").as_bytes());
    head.extend_from_slice(resp.reason.unwrap_or_default().as_bytes());
    head.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let is = |n: &str| h.name.eq_ignore_ascii_case(n);
        // Hop-by-hop; a length beside chunks is ignored (and not passed on).
        if is("connection")
            || is("keep-alive")
            || is("proxy-connection")
            || (chunked.is_some() && is("content-length"))
        {
            continue;
        }
        line(&mut head, h.name.as_bytes(), h.value);
    }
    if !dated {
        line(&mut head, b"date", date);
    }
    if framing == Framing::ToEnd {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Ok(Some(Answer {
        len,
        informational: false,
        head,
        reusable: !close && framing != Framing::ToEnd,
        framing,
    }))
}

/// Where a chunked body ends, followed byte by byte as it passes.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    size: u64,
    digits: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunks {
    /// Follows `bytes`: `Ok(Some(n))` when the body ends after `n` of them.
    fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() {
            if self.state == Data {
                let take = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - i);
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.state = match (self.state, b) {
                (Size, b) if b.is_ascii_hexdigit() => {
                    let d = u64::from(char::from(b).to_digit(16).ok_or(())?);
                    self.digits += 1;
                    if self.digits > 15 {
                        return Err(());
                    }
                    self.size = self.size * 16 + d;
                    Size
                }
                (Size, b';' | b' ' | b'\t') if self.digits > 0 => Extension,
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Extension, b'\r') => SizeLf,
                (Extension, _) => Extension,
                (SizeLf, b'\n') if self.size == 0 => TrailerStart,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    self.digits = 0;
                    Size
                }
                (TrailerStart, b'\r') => EndLf,
                (Trailer, b'\r') => TrailerLf,
                (TrailerStart | Trailer, _) => Trailer,
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => {
                    self.state = Done;
                    return Ok(Some(i));
                }
                _ => return Err(()),
            };
        }
        Ok(None)
    }
}

/// How a request on the fast path went.
enum Exchanged {
    /// Answered; the visitor connection stays open for the next.
    Answered,
    /// Not answered here, nothing written to the visitor: the full proxy
    /// takes the request (and the connection).
    Handoff,
}

/// Serves one HTTPS visitor connection (TLS done) whose TLS name chose
/// tunnel `name`: on the fast path while its requests are ones it carries,
/// then (or from the start, for HTTP/2) on the full proxy.
pub async fn serve_https<IO>(
    io: IO,
    name: String,
    visitor: SocketAddr,
    slot: Arc<Slot>,
    ingress: Arc<Ingress>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Conn {
        ingress: ingress.clone(),
        slot,
        visitor,
    };
    let entry = Entry {
        tls_name: Some(&name),
        domain: ingress.edge_domain(),
        proto: "https",
        trust: false,
    };
    if let Some(rest) = serve(io, &entry, &conn).await {
        serve_full(rest, name, conn).await;
    }
}

/// Serves one visitor connection to the plain-HTTP port: in proxy mode
/// (`Host` names each request's tunnel under `domain`) as [`serve_https`]
/// does, the fast path then the full proxy; in redirect mode, hyper's
/// redirects alone.
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
    if mode == HttpMode::Redirect {
        return http::serve_plain(io, visitor, slot, ingress, domain, mode, https_port).await;
    }
    let conn = Conn {
        ingress: ingress.clone(),
        slot: slot.clone(),
        visitor,
    };
    let entry = Entry {
        tls_name: None,
        domain: &domain,
        proto: "http",
        trust: ingress.limits.trust_proxy_headers,
    };
    if let Some(rest) = serve(io, &entry, &conn).await {
        http::serve_plain(
            rest,
            visitor,
            slot,
            ingress,
            domain.clone(),
            mode,
            https_port,
        )
        .await;
    }
}

/// Runs the fast path on a visitor connection under the watchdog's
/// deadlines ([`supervise`]): the connection, with what was read of it,
/// once it is the full proxy's.
async fn serve<IO>(io: IO, entry: &Entry<'_>, conn: &Conn) -> Option<Rewind<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (slot, ingress, visitor) = (&conn.slot, &conn.ingress, conn.visitor);
    let closing = CancellationToken::new();
    let fast = run(io, entry, conn, closing.clone());
    tokio::pin!(fast);
    let graceful = |_: Pin<&mut _>| closing.cancel();
    match supervise(fast, graceful, slot, ingress, visitor).await {
        Ok(rest) => rest,
        Err(err) => {
            tracing::debug!(%visitor, %err, "visitor connection ended with an error");
            None
        }
    }
}

/// Serves a visitor's HTTP/1.1 connection to `entry` until it ends
/// (`Ok(None)`), `closing` fires between requests, or a request the fast
/// path does not carry: then the connection, with what was read of it, for
/// the full proxy.
async fn run<IO>(
    mut io: IO,
    entry: &Entry<'_>,
    conn: &Conn,
    closing: CancellationToken,
) -> io::Result<Option<Rewind<IO>>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header_limit = conn.ingress.limits.header_read_timeout;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        // The next head. Waiting for its first byte is the watchdog's to
        // bound (first request, idle); the head itself has hyper's deadline.
        let mut deadline = None;
        let mut seen = 0;
        let end = loop {
            if let Some(end) = head_end(&buf, &mut seen) {
                break end;
            }
            if buf.len() >= MAX_HEADER_BYTES {
                // hyper's path refuses it (431).
                conn.ingress.stats.fast(Fast::HandoffHead);
                return Ok(Some(Rewind {
                    read: buf.freeze(),
                    io,
                }));
            }
            buf.reserve(4096);
            let read = match deadline {
                None if buf.is_empty() => tokio::select! {
                    biased;
                    () = closing.cancelled() => return Ok(None),
                    read = io.read_buf(&mut buf) => read?,
                },
                _ => {
                    let at = *deadline.get_or_insert_with(|| Instant::now() + header_limit);
                    match tokio::time::timeout_at(at.into(), io.read_buf(&mut buf)).await {
                        Ok(read) => read?,
                        Err(_) => {
                            tracing::debug!(visitor = %conn.visitor, "request head not read in time; closed");
                            return Ok(None);
                        }
                    }
                }
            };
            if read == 0 {
                return Ok(None);
            }
        };
        let Some(req) = simple(&buf[..end], entry, conn.visitor.ip()) else {
            conn.ingress.stats.fast(Fast::HandoffRequest);
            return Ok(Some(Rewind {
                read: buf.freeze(),
                io,
            }));
        };
        let in_flight = conn.slot.request();
        let exchanged = exchange(&req, conn, &mut io, &mut buf).await?;
        drop(in_flight);
        match exchanged {
            Exchanged::Answered => {
                conn.ingress.stats.fast(Fast::Answered);
                buf.advance(req.len);
            }
            Exchanged::Handoff => {
                conn.ingress.stats.fast(Fast::HandoffNoAnswer);
                return Ok(Some(Rewind {
                    read: buf.freeze(),
                    io,
                }));
            }
        }
    }
}

/// A new tunnel stream to `name`'s target, its visit header to carry the
/// request head as early data (a `GET` or `HEAD` may reach the target twice).
fn open(name: &str, conn: &Conn) -> Upstream<RawLink> {
    let (io, outcome, opened, via) = tunnel_stream(name, conn, MAX_EARLY_DATA);
    Upstream::new(RawLink(io), outcome, opened, via)
}

/// Carries one request and its answer. While the answer has not begun, the
/// visitor's side is read on into `buf` (what it sends next, up to a head's
/// worth), so a visitor that leaves is seen: its request is given up.
async fn exchange<IO>(
    req: &Simple,
    conn: &Conn,
    visitor: &mut IO,
    buf: &mut BytesMut,
) -> io::Result<Exchanged>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (ingress, name) = (&conn.ingress, req.name.as_str());
    let mut upstream = match ingress.fast_upstreams.take_routed(name, &ingress.tunnels) {
        Some(pooled) => pooled,
        None => open(name, conn),
    };
    // Reset if dropped before its answer began (the visitor left, or the
    // answer took too long), so the client drops its target connection.
    let unanswered = Unanswered(Some(upstream.stream.clone()));
    let stream = &mut upstream.link.0;
    let mut read = BytesMut::new();
    let limit = ingress.limits.answer_timeout;
    let began = async {
        stream.write_all(&req.head).await?;
        stream.flush().await?;
        let mut seen = 0;
        loop {
            let answer = loop {
                if head_end(&read, &mut seen).is_some() {
                    match answer(&read, req.head_only, &date_now()) {
                        Ok(Some(answer)) => break answer,
                        _ => return Err(io::Error::other("not an HTTP/1.1 answer")),
                    }
                }
                if read.len() >= MAX_HEADER_BYTES {
                    return Err(io::Error::other("an answer head over the limit"));
                }
                read.reserve(READ_CHUNK);
                if stream.read_buf(&mut read).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            };
            read.advance(answer.len);
            if !answer.informational {
                return Ok(answer);
            }
        }
    };
    let began = tokio::time::timeout(limit, began);
    tokio::pin!(began);
    let watch_until = req.len + MAX_HEADER_BYTES;
    let began = loop {
        tokio::select! {
            biased;
            began = &mut began => break began,
            read = visitor.read_buf(buf), if buf.len() < watch_until => match read {
                Ok(0) | Err(_) => {
                    tracing::debug!(visitor = %conn.visitor, tunnel = %name, "the visitor left before its answer began");
                    return Err(io::ErrorKind::ConnectionAborted.into());
                }
                Ok(_) if buf.len() >= watch_until => ingress.stats.fast(Fast::ReadAheadFull),
                Ok(_) => {}
            },
        }
    };
    let answer = match began {
        Ok(Ok(answer)) => answer,
        Ok(Err(err)) => {
            if let Some(failed) = upstream.stream.failed() {
                // No path was opened: say why, as the full proxy would
                // (it would look again, and count the visit twice).
                let page = open_failed(name, conn.visitor, &failed, req.head_only);
                write_page(visitor, page).await?;
                return Ok(Exchanged::Answered);
            }
            tracing::debug!(visitor = %conn.visitor, tunnel = %name, %err, "fast path: no answer; the full proxy takes the request");
            return Ok(Exchanged::Handoff);
        }
        Err(_) => {
            let (page, _) = answer_timed_out(name, conn, req.head_only);
            write_page(visitor, page).await?;
            return Ok(Exchanged::Answered);
        }
    };
    unanswered.answered();
    let copied = copy_body(
        stream,
        &mut read,
        visitor,
        answer.head,
        answer.framing,
        &conn.slot,
    )
    .await;
    match copied {
        Ok(()) => {}
        Err(Broke::Target(err)) => {
            upstream.stream.abandon();
            ingress.stats.broken();
            tracing::info!(visitor = %conn.visitor, tunnel = %name, %err, "an answer was cut: its path died mid-body; the visitor is closed");
            return Err(err);
        }
        Err(Broke::Visitor(err)) => {
            upstream.stream.abandon();
            return Err(err);
        }
    }
    if answer.reusable && read.is_empty() {
        home(&ingress.fast_upstreams, &ingress.tunnels, name, upstream);
    }
    Ok(Exchanged::Answered)
}

/// Which side of a copy failed.
enum Broke {
    Target(io::Error),
    Visitor(io::Error),
}

/// Writes `head` and then the body framed by `framing` to `visitor`, the
/// body read from `stream` after what `read` holds of it; the head goes with
/// the first of the body in one write. Each write is recorded on `slot` as
/// handed over until the visitor has taken it (see `http::watch`).
async fn copy_body<S, IO>(
    stream: &mut S,
    read: &mut BytesMut,
    visitor: &mut IO,
    head: Vec<u8>,
    framing: Framing,
    slot: &Arc<Slot>,
) -> Result<(), Broke>
where
    S: AsyncRead + Unpin,
    IO: AsyncWrite + Unpin,
{
    let key = slot.new_body_key();
    let mut out = BytesMut::from(&head[..]);
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut chunks = Chunks::default();
    let mut done = matches!(framing, Framing::Empty | Framing::Length(0));
    loop {
        if !done && !read.is_empty() {
            let take = match framing {
                Framing::Length(_) => usize::try_from(left).unwrap_or(usize::MAX).min(read.len()),
                Framing::Chunked => match chunks.scan(read) {
                    Ok(Some(end)) => {
                        done = true;
                        end
                    }
                    Ok(None) => read.len(),
                    Err(()) => {
                        return Err(Broke::Target(io::Error::other("malformed chunked body")));
                    }
                },
                _ => read.len(),
            };
            left -= take as u64;
            done |= matches!(framing, Framing::Length(_)) && left == 0;
            let body = read.split_to(take);
            if framing == Framing::ToEnd {
                out.extend_from_slice(format!("{take:x}\r\n").as_bytes());
                out.extend_from_slice(&body);
                out.extend_from_slice(b"\r\n");
            } else if out.is_empty() {
                out = body;
            } else {
                out.extend_from_slice(&body);
            }
        }
        if done && framing == Framing::ToEnd {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        if !out.is_empty() {
            slot.handed(key);
            let wrote = visitor.write_all(&out).await;
            slot.pulled(key);
            wrote.map_err(Broke::Visitor)?;
            out.clear();
        }
        if done {
            visitor.flush().await.map_err(Broke::Visitor)?;
            return Ok(());
        }
        read.reserve(READ_CHUNK);
        match stream.read_buf(read).await {
            Ok(0) if framing == Framing::ToEnd => done = true,
            Ok(0) => return Err(Broke::Target(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(err) => return Err(Broke::Target(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "tun.example.net";
    const DATE: &[u8] = b"Sat, 28 Nov 2026 00:00:00 GMT";

    const HTTPS: Entry<'static> = Entry {
        tls_name: Some("a"),
        domain: D,
        proto: "https",
        trust: false,
    };

    fn req(head: &str) -> Option<Simple> {
        simple(head.as_bytes(), &HTTPS, "203.0.113.9".parse().unwrap())
    }

    fn forwarded_to_target(out: &str) -> Vec<&str> {
        let mut lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("x-") || l.starts_with("forwarded"))
            .collect();
        lines.sort_unstable();
        lines
    }

    #[test]
    fn on_plain_http_each_requests_host_names_its_tunnel() {
        let plain = Entry {
            tls_name: None,
            proto: "http",
            ..HTTPS
        };
        let visitor = "203.0.113.9".parse().unwrap();
        let carried = |head: &str, entry: &Entry<'_>| simple(head.as_bytes(), entry, visitor);
        for (host, name) in [("a.tun.example.net", "a"), ("B.Tun.Example.Net:8080", "b")] {
            let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            let r = carried(&head, &plain).expect("carried");
            assert_eq!(r.name, name);
            let out = String::from_utf8(r.head).unwrap();
            assert!(out.contains("x-forwarded-proto: http\r\n"), "{out}");
            assert!(
                out.contains(&format!("x-forwarded-host: {host}\r\n")),
                "{out}"
            );
        }
        // A host under no tunnel: the full proxy's 404.
        for host in ["tun.example.net", "a.elsewhere.net", "a.b.tun.example.net"] {
            let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            assert!(carried(&head, &plain).is_none(), "carried: {host}");
        }
        // A proxy in front of the node: its chain is kept and extended
        // only when trusted, as on the full proxy.
        let head = "GET / HTTP/1.1\r\nHost: a.tun.example.net\r\nX-Forwarded-For: 198.51.100.7\r\nForwarded: for=198.51.100.7\r\nX-Forwarded-Proto: https\r\n\r\n";
        let trusted = Entry {
            trust: true,
            ..plain
        };
        let out = String::from_utf8(carried(head, &trusted).unwrap().head).unwrap();
        assert_eq!(
            forwarded_to_target(&out),
            [
                "forwarded: for=198.51.100.7, for=203.0.113.9;proto=http;host=\"a.tun.example.net\"",
                "x-forwarded-for: 198.51.100.7, 203.0.113.9",
                "x-forwarded-host: a.tun.example.net",
                "x-forwarded-proto: https",
                "x-real-ip: 203.0.113.9",
            ]
        );
        let out = String::from_utf8(carried(head, &plain).unwrap().head).unwrap();
        assert!(!out.contains("198.51.100.7"), "{out}");
        assert!(out.contains("x-forwarded-proto: http\r\n"), "{out}");
        // The same headers through the full proxy's own setter.
        let mut map = HeaderMap::new();
        for (k, v) in [
            ("x-forwarded-for", "198.51.100.7"),
            ("forwarded", "for=198.51.100.7"),
            ("x-forwarded-proto", "https"),
        ] {
            map.insert(k, HeaderValue::from_static(v));
        }
        set_forwarding(&mut map, visitor, "http", Some("a.tun.example.net"), true);
        let mut full: Vec<String> = map
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        full.sort_unstable();
        assert_eq!(
            forwarded_to_target(&String::from_utf8(carried(head, &trusted).unwrap().head).unwrap()),
            full
        );
    }

    #[test]
    fn a_plain_get_is_carried_with_the_nodes_forwarding_headers() {
        let head = "GET /x?y=1 HTTP/1.1\r\nHost: a.tun.example.net\r\nAccept: */*\r\nConnection: keep-alive\r\nX-Forwarded-For: 1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\n\r\n";
        let r = req(head).expect("carried");
        assert_eq!(r.len, head.len());
        assert!(!r.head_only);
        let out = String::from_utf8(r.head).unwrap();
        assert!(
            out.starts_with("GET /x?y=1 HTTP/1.1\r\nHost: a.tun.example.net\r\nAccept: */*\r\n"),
            "{out}"
        );
        assert!(out.contains("x-forwarded-for: 203.0.113.9\r\n"), "{out}");
        assert!(out.contains("x-real-ip: 203.0.113.9\r\n"), "{out}");
        assert!(out.contains("x-forwarded-proto: https\r\n"), "{out}");
        assert!(
            out.contains("forwarded: for=203.0.113.9;proto=https;host=\"a.tun.example.net\"\r\n"),
            "{out}"
        );
        assert!(
            !out.contains("1.2.3.4"),
            "the visitor's claim was kept: {out}"
        );
        assert!(!out.to_ascii_lowercase().contains("connection:"), "{out}");
        assert!(out.ends_with("\r\n\r\n"));
        assert!(
            req("HEAD / HTTP/1.1\r\nHost: a.tun.example.net\r\n\r\n")
                .unwrap()
                .head_only
        );
    }

    #[test]
    fn anything_but_a_bodiless_get_or_head_for_this_tunnel_goes_to_the_full_proxy() {
        for head in [
            "POST / HTTP/1.1\r\nHost: a.tun.example.net\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.tun.example.net\r\nContent-Length: 5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.tun.example.net\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.tun.example.net\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.tun.example.net\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.tun.example.net\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a.tun.example.net\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: b.tun.example.net\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.tun.example.net\r\nHost: a.tun.example.net\r\n\r\n",
            "GET http://a.tun.example.net/ HTTP/1.1\r\nHost: a.tun.example.net\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert!(req(head).is_none(), "carried: {head:?}");
        }
    }

    #[test]
    fn an_answers_framing_and_reuse_follow_its_head() {
        let a = |h: &str, head_only| answer(h.as_bytes(), head_only, DATE).unwrap().unwrap();
        let len = a(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nok",
            false,
        );
        assert_eq!(len.framing, Framing::Length(2));
        assert!(len.reusable);
        assert_eq!(
            String::from_utf8(len.head).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\ndate: Sat, 28 Nov 2026 00:00:00 GMT\r\n\r\n"
        );
        // The target's own Date is kept, and no second one added.
        let dated = a(
            "HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert_eq!(
            String::from_utf8(dated.head).unwrap(),
            "HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 0\r\n\r\n"
        );
        let chunked = a(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            false,
        );
        assert_eq!(chunked.framing, Framing::Chunked);
        assert!(
            !String::from_utf8(chunked.head)
                .unwrap()
                .contains("Content-Length")
        );
        let to_end = a("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(to_end.framing, Framing::ToEnd);
        assert!(!to_end.reusable);
        assert!(
            String::from_utf8(to_end.head)
                .unwrap()
                .contains("transfer-encoding: chunked\r\n")
        );
        let close = a(
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            false,
        );
        assert!(!close.reusable);
        assert_eq!(close.framing, Framing::Length(0));
        assert!(!a("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).reusable);
        assert_eq!(
            a("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).framing,
            Framing::Empty
        );
        assert_eq!(
            a("HTTP/1.1 304 Not Modified\r\n\r\n", false).framing,
            Framing::Empty
        );
        assert!(a("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", false).informational);
        assert!(
            answer(b"HTTP/1.1 200 OK\r\nContent-Le", false, DATE)
                .unwrap()
                .is_none()
        );
        assert!(answer(b"HTTP/1.1 101 Switching\r\n\r\n", false, DATE).is_err());
        assert!(
            answer(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false,
                DATE
            )
            .is_err()
        );
        assert!(answer(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false, DATE).is_err());
        assert!(answer(b"SSH-2.0-OpenSSH\r\n\r\n", false, DATE).is_err());
    }

    #[tokio::test]
    async fn a_page_the_node_writes_is_framed_and_dated() {
        let page = super::super::http::page(hyper::StatusCode::NOT_FOUND, "no <tunnel>", false);
        let mut out = Vec::new();
        write_page(&mut out, page).await.unwrap();
        let out = String::from_utf8(out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
        assert!(
            head.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{head}"
        );
        assert_eq!(head.matches("\r\ndate: ").count(), 1, "{head}");
        assert!(body.contains("no &lt;tunnel>"), "{body}");
    }

    #[test]
    fn the_date_added_is_an_http_date_of_now() {
        let date = date_now();
        let parsed = httpdate::parse_http_date(std::str::from_utf8(&date).unwrap()).unwrap();
        let off = std::time::SystemTime::now()
            .duration_since(parsed)
            .unwrap_or_default();
        assert!(off < std::time::Duration::from_secs(2), "{off:?}");
        // Taken from the thread's copy within the second: never earlier.
        let again = httpdate::parse_http_date(std::str::from_utf8(&date_now()).unwrap()).unwrap();
        assert!(again >= parsed);
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers_wherever_the_reads_split_it() {
        let body = b"5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\nX-Trailer: yes\r\n\r\n";
        for split in 0..body.len() {
            let mut c = Chunks::default();
            let first = c.scan(&body[..split]).unwrap();
            assert_eq!(first, None, "ended early at {split}");
            assert_eq!(c.scan(&body[split..]).unwrap(), Some(body.len() - split));
        }
        let mut c = Chunks::default();
        assert_eq!(c.scan(b"0\r\n\r\nextra").unwrap(), Some(5));
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\r\nhelloX",
            b"1234567890abcdef0\r\n",
        ] {
            assert!(Chunks::default().scan(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_head_trickled_a_byte_at_a_time_ends_where_its_blank_line_does() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next";
        let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let mut seen = 0;
        for n in 0..head.len() {
            let found = head_end(&head[..n], &mut seen);
            assert_eq!(found, (n >= end).then_some(end), "after {n} bytes");
            if found.is_some() {
                // Found: the next head is looked for from its start.
                assert_eq!(seen, 0);
                seen = 0;
            }
        }
    }

    #[tokio::test]
    async fn a_rewound_connection_reads_what_was_read_first() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut r = Rewind {
            read: Bytes::from_static(b"GET / "),
            io: near,
        };
        far.write_all(b"HTTP/1.1\r\n").await.unwrap();
        let mut got = vec![0u8; 16];
        let mut n = 0;
        while n < 16 {
            n += r.read(&mut got[n..]).await.unwrap();
        }
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
    }
}
