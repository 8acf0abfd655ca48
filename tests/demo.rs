//! `specter demo` starts, its printed URLs answer through the tunnel, and
//! Ctrl-C stops it cleanly.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::procs::stdout_lines;

#[test]
fn the_demo_serves_its_printed_urls_and_stops_on_ctrl_c() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_specter"))
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = stdout_lines(&mut child);
    let mut urls = Vec::new();
    let mut https = Vec::new();
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) else {
            if urls.len() == 3 {
                break;
            }
            continue;
        };
        assert!(!line.contains("Warning"), "{line}");
        lines.push(line.clone());
        // (The 8080 one goes with the printed `specter connect` line.)
        if let Some(rest) = line
            .trim()
            .strip_prefix("curl http://")
            .filter(|r| !r.starts_with("127.0.0.1:8080"))
        {
            urls.push(rest.split('/').next().unwrap().to_string());
        }
        if line.trim().starts_with("curl --cacert") {
            https.push(line.trim().to_string());
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    assert_eq!(urls.len(), 3, "the demo printed {urls:?}");
    for url in &urls {
        let mut s = TcpStream::connect(url).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("Hello from behind the tunnel!"), "{body}");
    }
    // The printed HTTPS lines work as pasted.
    assert_eq!(https.len(), 3, "{https:?}");
    for line in &https {
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        let out = Command::new("curl")
            .args(["-s", "-m", "10"])
            .args(&args)
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            body.contains("Hello from behind the tunnel!"),
            "{line}: {body}"
        );
    }
    // Every command line the demo printed runs as printed (bash -c), the
    // `specter connect` one in the background with the curl after it.
    let commands: Vec<&String> = lines
        .iter()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("curl ") || l.contains(" connect ")
        })
        .collect();
    let connect = commands
        .iter()
        .find(|l| l.contains(" connect "))
        .expect("the demo prints a specter connect line");
    assert!(
        connect.trim_start().starts_with('/'),
        "{connect}: not a full path"
    );
    let visit = commands
        .iter()
        .find(|l| l.contains("127.0.0.1:8080/"))
        .expect("the demo says what to visit after specter connect");
    let script = format!(
        "{}\nfor i in $(seq 50); do {} -s -m 5 && break; sleep 0.1; done\nkill %1",
        connect.trim(),
        visit.trim()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("Hello from behind the tunnel!"),
        "{script}: {body}"
    );
    for line in commands
        .iter()
        .filter(|l| l.trim_start().starts_with("curl ") && !l.contains("127.0.0.1:8080/"))
    {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("{} -s -m 10", line.trim()))
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            body.contains("Hello from behind the tunnel!"),
            "{line}: {body}"
        );
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < end, "the demo did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    }
}
