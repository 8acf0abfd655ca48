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

/// `specter reload`: asks the node to read its files again; prints what was
/// reloaded and what needs a restart, or why nothing was; returns whether it
/// reloaded.
pub fn reload(admin: SocketAddr) -> Result<bool> {
    let (status, body) = request(admin, "POST", "/reload")?;
    if !status.starts_with("HTTP/1.1 200") {
        eprint!("reload refused: {body}");
        return Ok(false);
    }
    let report: serde_json::Value = serde_json::from_str(&body).context("reading the answer")?;
    for file in report["reloaded"].as_array().into_iter().flatten() {
        println!("reloaded {}", file.as_str().unwrap_or_default());
    }
    for setting in report["needs_restart"].as_array().into_iter().flatten() {
        println!(
            "changed, takes effect at restart: {}",
            setting.as_str().unwrap_or_default()
        );
    }
    Ok(true)
}

/// `specter status`: the node's `/status`, as JSON (`json`) or as a
/// terminal summary.
pub fn status(admin: SocketAddr, json: bool) -> Result<()> {
    let (status, body) = request(admin, "GET", "/status")?;
    anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "{admin}: {status}");
    if json {
        print!("{body}");
        return Ok(());
    }
    let s: serde_json::Value = serde_json::from_str(&body).context("reading /status")?;
    print!("{}", summary(&s));
    Ok(())
}

/// The terminal summary of a `/status` document.
pub fn summary(s: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(t) => t.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let d = &s["dht"];
    let _ = writeln!(
        out,
        "node {} at {} ({}, {}), ring of {}",
        text(&s["id"]),
        text(&s["addr"]),
        if s["joined"] == true {
            "joined"
        } else {
            "not joined"
        },
        if s["ready"] == true {
            "ready"
        } else {
            "not ready"
        },
        text(&d["ring_size"])
    );
    let _ = writeln!(out, "\nmembers:");
    let _ = writeln!(
        out,
        "  {:<16}  {:<22}  {:<8}  ingress",
        "id", "address", "state"
    );
    for m in s["members"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<16}  {:<22}  {:<8}  {}",
            text(&m["id"]),
            text(&m["addr"]),
            text(&m["state"]),
            text(&m["ingress"])
        );
    }
    let ids = |v: &serde_json::Value| -> String {
        let list: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| text(&p["id"]))
            .collect();
        if list.is_empty() {
            "-".into()
        } else {
            list.join(" ")
        }
    };
    let _ = writeln!(out, "\nring:");
    let _ = writeln!(out, "  predecessor  {}", text(&d["predecessor"]["id"]));
    let _ = writeln!(out, "  successors   {}", ids(&d["successors"]));
    let _ = writeln!(out, "  fingers      {}", ids(&d["fingers"]));
    let _ = writeln!(
        out,
        "  records      {} owned, {} as replica",
        text(&d["records_owned"]),
        text(&d["records_replica"])
    );
    let _ = writeln!(out, "\ntunnels attached here:");
    let tunnels = s["tunnels"].as_array().cloned().unwrap_or_default();
    if tunnels.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for t in &tunnels {
        let _ = writeln!(
            out,
            "  {} ({} connection(s))",
            text(&t["name"]),
            text(&t["connections"])
        );
    }
    let i = &s["ingress"];
    let c = &i["counters"];
    let _ = writeln!(out, "\ncounters:");
    let _ = writeln!(
        out,
        "  visitors     {} of {} now, {} accepted, {} shed, {} refused by source",
        text(&i["visitors"]),
        text(&i["limits"]["max_visitors"]),
        text(&c["accepted"]),
        text(&c["shed"]),
        c["refused_source_full"].as_u64().unwrap_or(0)
            + c["refused_source_handshakes"].as_u64().unwrap_or(0)
    );
    let t = &s["transport"];
    let _ = writeln!(
        out,
        "  quic         {} connections, {} datagrams out, {} in",
        text(&t["connections"]),
        text(&t["datagrams_sent"]),
        text(&t["datagrams_received"])
    );
    let g = &s["gossip"];
    let _ = writeln!(
        out,
        "  gossip       {} packets out, {} in, {} spoofed dropped",
        text(&g["packets_out"]),
        text(&g["packets_in"]),
        text(&g["spoofed_dropped"])
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_shows_members_ring_tunnels_and_counters() {
        let s = serde_json::json!({
            "id": "aaaa", "addr": "127.0.0.1:7000", "joined": true, "ready": true,
            "members": [{"id": "bbbb", "addr": "127.0.0.1:7001", "state": "alive", "ingress": "127.0.0.1:443"}],
            "dht": {"ring_size": 2, "predecessor": {"id": "bbbb"}, "successors": [{"id": "bbbb"}],
                    "fingers": [], "records_owned": 3, "records_replica": 1},
            "tunnels": [{"name": "brave-orange-tiger", "connections": 1}],
            "ingress": {"visitors": 5, "limits": {"max_visitors": 4096},
                        "counters": {"accepted": 9, "shed": 0, "refused_source_full": 1, "refused_source_handshakes": 2}},
            "transport": {"connections": 1, "datagrams_sent": 10, "datagrams_received": 11},
            "gossip": {"packets_out": 4, "packets_in": 5, "spoofed_dropped": 0},
        });
        let text = summary(&s);
        for want in [
            "node aaaa at 127.0.0.1:7000 (joined, ready), ring of 2",
            "bbbb",
            "alive",
            "127.0.0.1:443",
            "successors   bbbb",
            "fingers      -",
            "3 owned, 1 as replica",
            "brave-orange-tiger (1 connection(s))",
            "5 of 4096 now, 9 accepted, 0 shed, 3 refused by source",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
    }
}
