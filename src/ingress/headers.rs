//! The headers a proxied request carries, decided without IO: which tunnel
//! a request names, and the `X-Forwarded-*` / `Forwarded` / `X-Real-IP`
//! headers the node sets.

use std::fmt::Write as _;
use std::net::IpAddr;

use bytes::Bytes;
use hyper::HeaderMap;
use hyper::header::{FORWARDED, HeaderName, HeaderValue};

/// Headers that say who the visitor is. A visitor's own are dropped (it
/// could claim any address) unless the node trusts a proxy in front of it.
/// (Names made once: one parsed from a string on each use showed in a
/// profile of every request.)
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Whether a request whose TLS name chose tunnel `tls_name` is misdirected:
/// its `Host` (or `:authority`) names another tunnel, or nothing under
/// `domain`. Browsers reuse one HTTP/2 connection for every name a wildcard
/// certificate covers, so the TLS name alone does not say which tunnel a
/// request is for; such requests get 421 and the browser retries on a
/// connection of their own.
pub fn misdirected(tls_name: &str, host: Option<&str>, domain: &str) -> bool {
    match host {
        // HTTP/1.0 without Host: the TLS name decides.
        None => false,
        Some(host) => {
            specter_tunnel::names::name_in_host(host, domain).as_deref() != Some(tls_name)
        }
    }
}

/// Sets the headers that tell the target who the visitor is: `visitor`
/// reached the node over `proto` asking for `host`. Unless `trust_incoming`,
/// whatever the visitor sent in these headers is replaced; with it (a node
/// behind the operator's proxy), the node appends to the chain.
pub fn set_forwarding(
    headers: &mut HeaderMap,
    visitor: IpAddr,
    proto: &'static str,
    host: Option<&str>,
    trust_incoming: bool,
) {
    let ip = visitor.to_string();
    // What a trusted proxy already put in chain `name`, joined.
    let theirs = |name: &HeaderName, headers: &HeaderMap| -> Option<String> {
        if !trust_incoming {
            return None;
        }
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    };
    let xff = match theirs(&X_FORWARDED_FOR, headers) {
        Some(theirs) => format!("{theirs}, {ip}"),
        None => ip.clone(),
    };
    let mut element = match theirs(&FORWARDED, headers) {
        Some(theirs) => theirs + ", for=",
        None => "for=".to_string(),
    };
    let _ = match visitor {
        IpAddr::V6(_) => write!(element, "\"[{ip}]\";proto={proto}"),
        IpAddr::V4(_) => write!(element, "{ip};proto={proto}"),
    };
    if let Some(host) = host.filter(|h| h.bytes().all(|b| b.is_ascii_graphic())) {
        let _ = write!(element, ";host=\"{host}\"");
    }
    let proto_value = trust_incoming
        .then(|| headers.get(&X_FORWARDED_PROTO))
        .flatten()
        .filter(|v| v.to_str().is_ok())
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(proto));
    // `insert` replaces every value the visitor sent under that name.
    let mut set = |name: HeaderName, value: String| match header_value(value) {
        Some(v) => {
            headers.insert(name, v);
        }
        None => {
            headers.remove(name);
        }
    };
    set(X_FORWARDED_FOR, xff);
    set(X_REAL_IP, ip);
    set(FORWARDED, element);
    match host {
        Some(host) => set(X_FORWARDED_HOST, host.to_string()),
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
    headers.insert(X_FORWARDED_PROTO, proto_value);
}

/// `value` as a header value, without copying it again.
fn header_value(value: String) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(Bytes::from(value)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_naming_another_tunnel_than_the_tls_name_is_misdirected() {
        let d = "tun.example.net";
        assert!(!misdirected("a", Some("a.tun.example.net"), d));
        assert!(!misdirected("a", Some("A.Tun.Example.Net:8443"), d));
        assert!(misdirected("a", Some("b.tun.example.net"), d));
        assert!(misdirected("a", Some("example.org"), d));
        assert!(misdirected("a", Some("a.tun.example.net.evil.org"), d));
        assert!(!misdirected("a", None, d));
    }

    #[test]
    fn a_visitor_cannot_choose_the_address_the_target_sees() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        h.insert(X_REAL_IP, HeaderValue::from_static("1.2.3.4"));
        h.insert(FORWARDED, HeaderValue::from_static("for=1.2.3.4"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("gopher"));
        let visitor: IpAddr = "203.0.113.9".parse().unwrap();
        set_forwarding(&mut h, visitor, "https", Some("a.tun.example.net"), false);
        assert_eq!(h[X_FORWARDED_FOR], "203.0.113.9");
        assert_eq!(h[X_REAL_IP], "203.0.113.9");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(h[X_FORWARDED_HOST], "a.tun.example.net");
        assert_eq!(
            h[FORWARDED],
            "for=203.0.113.9;proto=https;host=\"a.tun.example.net\""
        );
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
    }

    #[test]
    fn behind_a_trusted_proxy_the_chain_is_kept_and_extended() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.7"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(FORWARDED, HeaderValue::from_static("for=198.51.100.7"));
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        set_forwarding(&mut h, proxy, "http", Some("a.tun.example.net"), true);
        assert_eq!(h[X_FORWARDED_FOR], "198.51.100.7, 10.0.0.2");
        assert_eq!(h[X_FORWARDED_HOST], "a.tun.example.net");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(
            h[FORWARDED],
            "for=198.51.100.7, for=10.0.0.2;proto=http;host=\"a.tun.example.net\""
        );
    }

    #[test]
    fn ipv6_visitors_are_quoted_in_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_HOST, HeaderValue::from_static("evil.example"));
        set_forwarding(&mut h, "2001:db8::1".parse().unwrap(), "https", None, false);
        assert_eq!(h[FORWARDED], "for=\"[2001:db8::1]\";proto=https");
        assert_eq!(h[X_FORWARDED_FOR], "2001:db8::1");
        assert_eq!(h[X_REAL_IP], "2001:db8::1");
        // No host to name: the visitor's claim goes, nothing replaces it.
        assert!(h.get(X_FORWARDED_HOST).is_none());
    }
}
