//! Which admin request a request head asks for: pure, so it is tested
//! without sockets.

/// An admin request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /status`: JSON.
    Status,
    /// `GET /metrics`: Prometheus text.
    Metrics,
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
}

impl Route {
    /// Routes a request by its head (request line first).
    pub fn of(head: &[u8]) -> Route {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let Ok(line) = std::str::from_utf8(line) else {
            return Route::MethodNotAllowed;
        };
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
        assert_eq!(r("GET /status HTTP/1.1\r\nHost: x"), Route::Status);
        assert_eq!(r("GET /metrics HTTP/1.1"), Route::Metrics);
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
}
