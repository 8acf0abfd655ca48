//! The DHT across five real `specter` processes on 127.0.0.2–127.0.0.6: write
//! through one node, read through every node; SIGKILL the key's owner and
//! read through every survivor; restart it and it holds its share again.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::procs::*;
use serde_json::Value;

fn dht(p: &Proc, method: &str, name: &str) -> Option<(u16, Value)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(p.admin()).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let path = if method == "POST" {
        "/dht/put"
    } else {
        "/dht/get"
    };
    write!(
        s,
        "{method} {path}?name={name} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        p.admin()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, serde_json::from_str(body).ok()?))
}

fn owner_of(ids: &[String], key: u64) -> usize {
    let nums: Vec<u64> = ids
        .iter()
        .map(|i| u64::from_str_radix(i, 16).unwrap())
        .collect();
    (0..nums.len())
        .min_by_key(|&i| nums[i].wrapping_sub(key))
        .unwrap()
}

#[test]
fn records_survive_the_owners_sigkill_and_return_to_it_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let ips: Vec<String> = (2..=6).map(|i| format!("127.0.0.{i}")).collect();
    let dirs: Vec<PathBuf> = issue_all(dir.path(), &ca, &ips);
    let mut procs: Vec<Option<Proc>> = start_all(dir.path(), &dirs, &ips)
        .into_iter()
        .map(Some)
        .collect();
    let ids: Vec<String> = procs.iter().map(|p| p.as_ref().unwrap().id()).collect();
    let ring_of = |p: &Proc| status(p).map_or(0, |s| s["dht"]["ring_size"].as_u64().unwrap_or(0));
    assert!(
        wait_for(Duration::from_secs(20), || procs
            .iter()
            .flatten()
            .all(|p| ring_of(p) == 5))
        .is_some(),
        "ring did not form"
    );

    // Write 20 names through node 0; read each through every node.
    let names: Vec<String> = (0..20).map(|i| format!("tunnel-{i}")).collect();
    for n in &names {
        let (code, body) = dht(procs[0].as_ref().unwrap(), "POST", n).unwrap();
        assert_eq!(code, 200, "{body}");
    }
    for p in procs.iter().flatten() {
        for n in &names {
            let (code, body) = dht(p, "GET", n).unwrap();
            assert_eq!(code, 200, "{n} via {}: {body}", p.id());
            assert_eq!(body["record"]["attachments"][0]["node"], ids[0]);
            assert!(body["hops"].as_u64().unwrap() <= 1);
        }
    }
    assert_eq!(
        dht(procs[3].as_ref().unwrap(), "GET", "never-registered")
            .unwrap()
            .0,
        404
    );

    // SIGKILL the owner of the first name; every survivor still reads it.
    let key = u64::from_str_radix(
        dht(procs[1].as_ref().unwrap(), "GET", &names[0]).unwrap().1["key"]
            .as_str()
            .unwrap(),
        16,
    )
    .unwrap();
    let owner = owner_of(&ids, key);
    procs[owner] = None;
    for p in procs.iter().flatten() {
        for n in &names {
            let (code, body) = dht(p, "GET", n).unwrap();
            assert_eq!(code, 200, "{n} via {} after the owner died: {body}", p.id());
        }
    }

    // Restart it with the same certificate: it takes its share back.
    // Join through a survivor: the owner may have been the seed, and a
    // restarted node binds a new port.
    let survivor = procs.iter().flatten().next().unwrap().quic();
    procs[owner] = Some(start_node(
        dir.path(),
        &dirs[owner],
        &ips[owner],
        Some(&survivor),
    ));
    let back = procs[owner].as_ref().unwrap();
    let owned = |p: &Proc| status(p).map_or(0, |s| s["dht"]["records_owned"].as_u64().unwrap_or(0));
    let took = wait_for(Duration::from_secs(30), || owned(back) >= 1);
    if took.is_none() {
        let kept = dir.keep();
        panic!(
            "restarted owner never got its records back; logs in {}",
            kept.display()
        );
    }
    println!(
        "restarted owner holds its records again after {:?}",
        took.unwrap()
    );
    let (code, _) = dht(back, "GET", &names[0]).unwrap();
    assert_eq!(code, 200);
}

/// Nodes on `ips`, certificates from a fresh CA, started and joined in one
/// ring: their directory, each node's own, and the nodes.
fn ring(ips: &[String]) -> (tempfile::TempDir, Vec<PathBuf>, Vec<Proc>) {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let dirs: Vec<PathBuf> = issue_all(dir.path(), &ca, ips);
    let procs = start_all(dir.path(), &dirs, ips);
    wait_ring(&procs);
    (dir, dirs, procs)
}

fn records_total(p: &Proc) -> u64 {
    status(p).map_or(0, |s| s["dht"]["records_total"].as_u64().unwrap_or(0))
}

/// 20,000 names make replication and hand-off batches larger than a frame
/// (they once reached 1.3 MB against the 1 MiB limit, and the receiving
/// node refused them, logged at debug level only): they must be split, and
/// every record must arrive when a node leaves and comes back.
#[test]
fn twenty_thousand_names_survive_a_restart_with_every_batch_accepted() {
    const NAMES: usize = 20_000;
    const WRITERS: usize = 8;
    let ips: Vec<String> = (1..=3).map(|i| format!("127.0.91.{i}")).collect();
    let (dir, dirs, started) = ring(&ips);
    let mut procs: Vec<Option<Proc>> = started.into_iter().map(Some).collect();

    let began = std::time::Instant::now();
    let writer = procs[0].as_ref().unwrap().admin();
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            std::thread::spawn(move || {
                for i in (w..NAMES).step_by(WRITERS) {
                    let body = admin_request(writer, "POST", &format!("/dht/put?name=bulk-{i}"));
                    if !body.starts_with("HTTP/1.1 200") {
                        return Err(format!("bulk-{i}: {body}"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    let failed: Vec<String> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap().err())
        .collect();
    if !failed.is_empty() {
        let kept = dir.keep();
        panic!("puts failed: {failed:?}; logs in {}", kept.display());
    }
    println!("{NAMES} names written in {:?}", began.elapsed());
    let held: Vec<u64> = procs.iter().flatten().map(records_total).collect();
    assert!(
        held.iter().sum::<u64>() >= 2 * NAMES as u64,
        "every name on its owner and a replica: {held:?}"
    );

    // Node 1 leaves (SIGTERM: it hands its records off) and comes back
    // with the same key; the others hand its share back.
    let leaving = procs[1].take().unwrap();
    let before = held[1];
    signal(leaving.child.id(), "-TERM");
    let mut leaving = leaving;
    let exited = wait_for(Duration::from_secs(20), || {
        matches!(leaving.child.try_wait(), Ok(Some(_)))
    });
    assert!(exited.is_some(), "node 1 did not leave on SIGTERM");
    let survivor = procs[0].as_ref().unwrap().quic();
    procs[1] = Some(start_node(dir.path(), &dirs[1], &ips[1], Some(&survivor)));
    let back = procs[1].as_ref().unwrap();
    let took = wait_for(Duration::from_secs(90), || records_total(back) >= before);
    assert!(
        took.is_some(),
        "the restarted node holds {} records, {before} before",
        records_total(back)
    );
    println!(
        "restarted node holds its {before} records again after {:?}",
        took.unwrap()
    );
    for p in procs.iter().flatten() {
        assert_eq!(
            metric(p, "specter_dht_frames_refused_total "),
            0,
            "{}",
            p.id()
        );
    }
    // They came as replication batches the restarted node took in (one
    // batch of them all would be ~1.3 MB).
    let arrived = metric(back, "specter_dht_repaired_total ");
    assert!(
        arrived >= before,
        "{arrived} records arrived, {before} expected"
    );
    // Every name still reads back through the restarted node (a sample:
    // one in twenty).
    for i in (0..NAMES).step_by(20) {
        let (code, body) = dht(back, "GET", &format!("bulk-{i}")).unwrap();
        assert_eq!(code, 200, "bulk-{i}: {body}");
    }
}

/// One request to an admin API; the whole answer.
fn admin_request(admin: std::net::SocketAddr, method: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A node that stops running for a while (an overloaded or descheduled
/// machine; here SIGSTOP) finds its peers' answers waiting in its socket
/// when it runs again. It must read them, not take the time it could not
/// run for the peers' silence. Counting it presumed live peers dead (1 to
/// 3 times in five stalls, in each of three runs) and failed every request
/// waiting on them at once, as the 20,000-name test above once saw under
/// load ("no node that holds the key answered").
#[test]
fn a_node_stalled_for_a_second_presumes_no_peer_dead_and_fails_no_put() {
    const WRITERS: usize = 8;
    const STALLS: usize = 5;
    let ips: Vec<String> = (4..=6).map(|i| format!("127.0.91.{i}")).collect();
    let (dir, _, procs) = ring(&ips);
    let writer = procs[0].admin();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (done, written) = (done.clone(), written.clone());
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                let mut i = w;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    let body = admin_request(writer, "POST", &format!("/dht/put?name=stall-{i}"));
                    if body.starts_with("HTTP/1.1 200") {
                        written.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    } else {
                        failed.push(format!("stall-{i}: {body}"));
                    }
                    i += WRITERS;
                }
                failed
            })
        })
        .collect();
    let pid = procs[0].child.id();
    for _ in 0..STALLS {
        // Puts under way, then the stall itself (its length is the
        // scenario, not a wait for something).
        let before = written.load(std::sync::atomic::Ordering::SeqCst);
        let flowing = wait_for(Duration::from_secs(20), || {
            written.load(std::sync::atomic::Ordering::SeqCst) >= before + 20
        });
        assert!(flowing.is_some(), "puts stopped flowing");
        signal(pid, "-STOP");
        std::thread::sleep(Duration::from_secs(1));
        signal(pid, "-CONT");
    }
    let before = written.load(std::sync::atomic::Ordering::SeqCst);
    let flowing = wait_for(Duration::from_secs(20), || {
        written.load(std::sync::atomic::Ordering::SeqCst) >= before + 20
    });
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let failed: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let presumed = metric(&procs[0], "specter_peers_presumed_silent_total ");
    if !failed.is_empty() || presumed > 0 || flowing.is_none() {
        let kept = dir.keep();
        panic!(
            "{} puts failed, {presumed} peers presumed silent: {failed:?}; logs in {}",
            failed.len(),
            kept.display()
        );
    }
    println!(
        "{} puts through {STALLS} stalls of the writing node, none failed",
        written.load(std::sync::atomic::Ordering::SeqCst)
    );
}
