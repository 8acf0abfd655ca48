//! The headers a proxied request carries, decided without IO: which tunnel
//! a request names, and the `X-Forwarded-*` / `Forwarded` / `X-Real-IP`
//! headers the node sets.

use std::net::IpAddr;

use hyper::HeaderMap;
use hyper::header::{FORWARDED, HeaderValue};

/// Headers that say who the visitor is. A visitor's own are dropped (it
/// could claim any address) unless the node trusts a proxy in front of it.
const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
const X_FORWARDED_HOST: &str = "x-forwarded-host";
const X_REAL_IP: &str = "x-real-ip";

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
    let chain = |name: &str, ours: String, headers: &HeaderMap| -> String {
        let theirs: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if trust_incoming && !theirs.is_empty() {
            format!("{}, {ours}", theirs.join(", "))
        } else {
            ours
        }
    };
    let node_for = match visitor {
        IpAddr::V6(_) => format!("\"[{ip}]\""),
        IpAddr::V4(_) => ip.clone(),
    };
    let mut element = format!("for={node_for};proto={proto}");
    if let Some(host) = host.filter(|h| h.bytes().all(|b| b.is_ascii_graphic())) {
        element.push_str(&format!(";host=\"{host}\""));
    }
    let xff = chain(X_FORWARDED_FOR, ip.clone(), headers);
    let forwarded = chain(FORWARDED.as_str(), element, headers);
    let proto_value = if trust_incoming {
        headers
            .get(X_FORWARDED_PROTO)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| proto.to_string())
    } else {
        proto.to_string()
    };
    for name in [
        X_FORWARDED_FOR,
        X_FORWARDED_PROTO,
        X_FORWARDED_HOST,
        X_REAL_IP,
    ] {
        headers.remove(name);
    }
    headers.remove(FORWARDED);
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set(X_FORWARDED_FOR, &xff);
    set(X_FORWARDED_PROTO, &proto_value);
    set(X_REAL_IP, &ip);
    set(FORWARDED.as_str(), &forwarded);
    if let Some(host) = host {
        set(X_FORWARDED_HOST, host);
    }
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
        set_forwarding(&mut h, proxy, "http", None, true);
        assert_eq!(h[X_FORWARDED_FOR], "198.51.100.7, 10.0.0.2");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(h[FORWARDED], "for=198.51.100.7, for=10.0.0.2;proto=http");
    }

    #[test]
    fn ipv6_visitors_are_quoted_in_forwarded() {
        let mut h = HeaderMap::new();
        set_forwarding(&mut h, "2001:db8::1".parse().unwrap(), "https", None, false);
        assert_eq!(h[FORWARDED], "for=\"[2001:db8::1]\";proto=https");
        assert_eq!(h[X_FORWARDED_FOR], "2001:db8::1");
    }
}
