//! Which admin request a request head asks for: pure, so it is tested
//! without sockets.

/// An admin request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /status`: JSON.
    Status,
    /// `GET /metrics`: Prometheus text.
    Metrics,
    /// `POST /reload`: read the config, certificate and key files again.
    Reload,
    /// `GET /`: the status page.
    Page,
    /// `GET /dht/get?name=N`: the record as seen from this node.
    DhtGet(String),
    /// `POST /dht/put?name=N`: an operator test registration.
    DhtPut(String),
    /// A `/dht/…` request whose name is not a valid tunnel name.
    BadName(String),
    /// Another `GET` path.
    NotFound,
    /// Another method, or a request line that does not parse.
    MethodNotAllowed,
    /// A request a browser could have been made to send: a `Host` that is
    /// not a loopback name or address (DNS rebinding), or an `Origin` that is
    /// not loopback (a page posting to the admin port). Tools send neither,
    /// or loopback ones.
    Forbidden(String),
}

/// Whether `host` (a `Host` value, or an origin's host, with an optional
/// port) names this machine's loopback.
fn loopback(host: &str) -> bool {
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses a head whose `Host` or `Origin` is not loopback.
fn browser_check(head: &str) -> Option<Route> {
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("host") && !loopback(value) {
            return Some(Route::Forbidden(format!("Host {value:?} is not loopback")));
        }
        if name.eq_ignore_ascii_case("origin") {
            let host = value
                .split_once("://")
                .map_or("", |(_, rest)| rest.split('/').next().unwrap_or_default());
            if !loopback(host) {
                return Some(Route::Forbidden(format!(
                    "Origin {value:?} is not loopback"
                )));
            }
        }
    }
    None
}

impl Route {
    /// Routes a request by its head (request line first).
    pub fn of(head: &[u8]) -> Route {
        let Ok(text) = std::str::from_utf8(head) else {
            return Route::MethodNotAllowed;
        };
        if let Some(refused) = browser_check(text) {
            return refused;
        }
        let line = text.split('\r').next().unwrap_or_default();
        let mut parts = line.split(' ');
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return Route::MethodNotAllowed;
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let name = || {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix("name="))
                .unwrap_or_default()
                .to_string()
        };
        let checked =
            |name: String, route: fn(String) -> Route| match specter_tunnel::names::validate(&name)
            {
                Ok(()) => route(name),
                Err(e) => Route::BadName(e.to_string()),
            };
        match (method, path) {
            ("GET", "/status") => Route::Status,
            ("GET", "/metrics") => Route::Metrics,
            ("GET", "/") => Route::Page,
            ("POST", "/reload") => Route::Reload,
            ("GET", "/dht/get") => checked(name(), Route::DhtGet),
            ("POST", "/dht/put") => checked(name(), Route::DhtPut),
            ("GET", _) => Route::NotFound,
            _ => Route::MethodNotAllowed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_method_path_and_name() {
        let r = |h: &str| Route::of(h.as_bytes());
        assert_eq!(r("GET /status HTTP/1.1\r\nHost: 127.0.0.1"), Route::Status);
        assert_eq!(r("GET /metrics HTTP/1.1"), Route::Metrics);
        assert_eq!(r("GET / HTTP/1.1"), Route::Page);
        assert_eq!(r("POST /reload HTTP/1.1"), Route::Reload);
        assert_eq!(r("GET /reload HTTP/1.1"), Route::NotFound);
        assert_eq!(
            r("GET /dht/get?name=brave-orange-tiger HTTP/1.1"),
            Route::DhtGet("brave-orange-tiger".into())
        );
        assert_eq!(
            r("POST /dht/put?x=1&name=a-b HTTP/1.1"),
            Route::DhtPut("a-b".into())
        );
        assert!(matches!(
            r("GET /dht/get?name=Bad_Name HTTP/1.1"),
            Route::BadName(_)
        ));
        assert!(matches!(r("GET /dht/get HTTP/1.1"), Route::BadName(_)));
        assert_eq!(r("GET /nope HTTP/1.1"), Route::NotFound);
        assert_eq!(r("POST /status HTTP/1.1"), Route::MethodNotAllowed);
        assert_eq!(r("GET /dht/put?name=a HTTP/1.1"), Route::NotFound);
        assert_eq!(r("garbage"), Route::MethodNotAllowed);
        assert_eq!(Route::of(&[0xff, 0xfe, b' ']), Route::MethodNotAllowed);
    }

    #[test]
    fn only_loopback_hosts_and_origins_are_served() {
        let r = |h: &str| Route::of(h.as_bytes());
        for host in [
            "127.0.0.1:9000",
            "localhost",
            "LOCALHOST:80",
            "[::1]:9000",
            "127.0.0.5",
        ] {
            assert_eq!(
                r(&format!("GET /status HTTP/1.1\r\nHost: {host}")),
                Route::Status,
                "{host}"
            );
        }
        // DNS rebinding: a page on attacker.example resolving to 127.0.0.1.
        assert!(matches!(
            r("POST /dht/put?name=a HTTP/1.1\r\nHost: attacker.example"),
            Route::Forbidden(_)
        ));
        assert!(matches!(
            r("GET /status HTTP/1.1\r\nHost: 10.0.0.1:9000"),
            Route::Forbidden(_)
        ));
        // A page elsewhere posting to the admin port.
        assert!(matches!(
            r(
                "POST /dht/put?name=a HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nOrigin: https://attacker.example"
            ),
            Route::Forbidden(_)
        ));
        assert_eq!(
            r(
                "POST /dht/put?name=a HTTP/1.1\r\nHost: 127.0.0.1:9000\r\norigin: http://127.0.0.1:9000"
            ),
            Route::DhtPut("a".into())
        );
        assert!(matches!(
            r("GET /status HTTP/1.1\r\nOrigin: null"),
            Route::Forbidden(_)
        ));
    }
}
