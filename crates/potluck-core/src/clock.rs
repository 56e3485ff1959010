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

/// A lifetime in seconds in the largest whole unit that reads naturally: days from two days,
/// hours from two hours, minutes below.
pub fn humanize(secs: u64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3600 => format!("{} hours", s / 3600),
        s => format!("{} minutes", s / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_read_in_whole_units() {
        assert_eq!(humanize(3 * 86_400), "3 days");
        assert_eq!(humanize(599), "9 minutes");
        assert_eq!(humanize(5 * 3600), "5 hours");
    }
}
