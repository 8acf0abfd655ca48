//! A tunnel's local target (`tcp://HOST:PORT` or `http://HOST:PORT`) and how
//! visitors reach it.

use anyhow::{Result, bail};
use specter_tunnel::protocol::Ingress;

/// What a tunnel's target speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// Any TCP service: visitors come through `specter connect`.
    Tcp,
    /// An HTTP service: visitors come through the nodes' HTTPS ingress.
    Http,
}

/// A tunnel's local target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `host:port`.
    pub addr: String,
    /// What it speaks.
    pub scheme: Scheme,
}

impl Target {
    /// Parses `tcp://HOST:PORT` or `http://HOST:PORT`.
    pub fn parse(to: &str) -> Result<Target> {
        let (scheme, rest) = if let Some(rest) = to.strip_prefix("tcp://") {
            (Scheme::Tcp, rest)
        } else if let Some(rest) = to.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else {
            bail!("--to {to:?} must be tcp://HOST:PORT or http://HOST:PORT");
        };
        let addr = rest.trim_end_matches('/').to_string();
        if addr.is_empty() {
            bail!("--to {to:?} names no HOST:PORT");
        }
        Ok(Target { addr, scheme })
    }

    /// How a visitor reaches tunnel `name` through a node serving `ingress`:
    /// an HTTPS URL for HTTP targets, the `specter connect` command for raw
    /// TCP ones.
    pub fn public(&self, name: &str, ingress: &Ingress) -> String {
        match self.scheme {
            Scheme::Http => ingress.url(name),
            Scheme::Tcp => {
                let host = format!("{name}.{}", ingress.domain);
                format!(
                    "specter connect {host} --via {host}:{} --ca EDGE-CA.crt --listen 127.0.0.1:PORT",
                    ingress.https_port
                )
            }
        }
    }
}
