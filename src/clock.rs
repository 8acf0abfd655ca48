//! The wall clock, read in one place: the DHT's versions and leases are Unix
//! milliseconds, and a node's generation is its start time in them.

/// Current Unix time in milliseconds (the DHT's clock).
pub fn now_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// A generation for a node starting now: milliseconds since the Unix epoch,
/// so every restart (even with the same certificate) has a higher one.
pub fn generation_now() -> u64 {
    now_ms()
}
