//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod own_client;
pub mod procs;
pub mod web;

use std::time::{Duration, Instant};

/// Polls `cond` every 20 ms until it holds or `deadline` passes; returns how
/// long it took, or `None` on timeout.
pub async fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
