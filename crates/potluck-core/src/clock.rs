//! The wall clock every peer of a run shares: DHT expirations, token lifetimes and revocation
//! lists are absolute times, compared across machines. What a clock skew means is left to each
//! caller (the DHT checks it against its initial peers, tokens allow for it).

/// Milliseconds since the Unix epoch.
pub type Time = u64;

/// The wall clock, in [`Time`].
pub fn now() -> Time {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Time)
}
