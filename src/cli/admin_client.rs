//! A small blocking HTTP/1.1 client for a node's loopback admin API (`specter
//! dht get|put`): one request per connection, bounded in time.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

/// Connecting to the admin API must succeed this soon.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole answer must arrive this soon (a DHT lookup is bounded well
/// below it).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `method path` to the admin API at `admin`; returns the status line
/// and the body.
pub fn request(admin: SocketAddr, method: &str, path: &str) -> Result<(String, String)> {
    let mut stream = std::net::TcpStream::connect_timeout(&admin, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to the admin API at {admin}"))?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed answer from the admin API")?;
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

/// `specter dht get|put NAME`: prints the answer; returns whether it was a
/// success.
pub fn dht(admin: SocketAddr, write: bool, name: &str) -> Result<bool> {
    let (method, path) = if write {
        ("POST", "/dht/put")
    } else {
        ("GET", "/dht/get")
    };
    let (status, body) = request(admin, method, &format!("{path}?name={name}"))?;
    print!("{body}");
    Ok(status.starts_with("HTTP/1.1 200"))
}
