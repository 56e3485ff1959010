//! Per-peer request rates: each peer's requests draw on a token bucket; a request with no token
//! left is refused (cheaply, before it is processed), and a peer that keeps sending far over its
//! rate is banned for a while: disconnected, and its connections refused until the ban ends.
//!
//! A peer's bucket outlives its connections (a flooder that reconnects keeps its refusals and
//! is banned all the same); buckets are bounded ([`MAX_BUCKETS`]): when they are all taken,
//! those that are back to a fresh peer's state go first, then the least suspicious.
//!
//! Honest peers send a few requests a second (progress reports, matchmaking, lookups); the
//! defaults leave them two orders of magnitude of room, and a flood of thousands a second is
//! banned within a second.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// How many requests a peer may send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests it may send at once above the sustained rate.
    pub burst: f64,
    /// Refused requests (net of the rate's decay) after which it is banned.
    pub ban_after: f64,
    pub ban_for: Duration,
}

impl Default for Rate {
    fn default() -> Rate {
        Rate {
            per_second: 500.0,
            burst: 1000.0,
            ban_after: 5000.0,
            ban_for: Duration::from_secs(60),
        }
    }
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Over the rate: refuse it.
    Refuse,
    /// Over the rate for too long: refuse it, and ban the peer ([`Limiter::ban`]).
    Ban,
}

/// Bans held at most (each peer that was connected once); beyond, the one ending first goes.
pub const MAX_BANNED: usize = 4096;

/// Peers whose buckets are kept at most (connected now or lately).
pub const MAX_BUCKETS: usize = 16_384;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// Refusals, decaying at the sustained rate.
    strikes: f64,
    at: Instant,
}

/// The buckets of the peers that sent requests, and the bans.
#[derive(Debug)]
pub struct Limiter {
    rate: Rate,
    buckets: HashMap<PeerId, Bucket>,
    banned: HashMap<PeerId, Instant>,
}

impl Limiter {
    pub fn new(rate: Rate) -> Limiter {
        Limiter {
            rate,
            buckets: HashMap::new(),
            banned: HashMap::new(),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Counts one request of `peer` at `now`.
    pub fn check(&mut self, peer: PeerId, now: Instant) -> Verdict {
        if self.is_banned(peer, now) {
            return Verdict::Refuse;
        }
        let rate = self.rate;
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(&peer) {
            self.make_room(now);
        }
        let b = self.buckets.entry(peer).or_insert(Bucket {
            tokens: rate.burst,
            strikes: 0.0,
            at: now,
        });
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        b.at = now;
        b.tokens = (b.tokens + dt * rate.per_second).min(rate.burst);
        b.strikes = (b.strikes - dt * rate.per_second).max(0.0);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Verdict::Allow;
        }
        b.strikes += 1.0;
        if b.strikes < rate.ban_after {
            return Verdict::Refuse;
        }
        Verdict::Ban
    }

    /// Bans `peer` from `now` for the configured time. Returns the peers no longer banned:
    /// bans that ended, or (with [`MAX_BANNED`] held) the one that would end first.
    pub fn ban(&mut self, peer: PeerId, now: Instant) -> Vec<PeerId> {
        self.buckets.remove(&peer);
        let mut unbanned = Vec::new();
        if self.banned.len() >= MAX_BANNED && !self.banned.contains_key(&peer) {
            unbanned = self.sweep(now);
            if self.banned.len() >= MAX_BANNED
                && let Some(first) = self.banned.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p)
            {
                self.banned.remove(&first);
                unbanned.push(first);
            }
        }
        self.banned.insert(peer, now + self.rate.ban_for);
        unbanned
    }

    /// Whether `peer` is banned at `now`.
    pub fn is_banned(&self, peer: PeerId, now: Instant) -> bool {
        self.banned.get(&peer).is_some_and(|until| *until > now)
    }

    /// Frees buckets for new peers: those back to a fresh peer's state (full, no refusals
    /// left), or else the one with the fewest refusals.
    fn make_room(&mut self, now: Instant) {
        let rate = self.rate;
        self.buckets.retain(|_, b| {
            let dt = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens + dt * rate.per_second < rate.burst || b.strikes > dt * rate.per_second
        });
        if self.buckets.len() >= MAX_BUCKETS
            && let Some(calmest) = self
                .buckets
                .iter()
                .min_by(|x, y| x.1.strikes.total_cmp(&y.1.strikes))
                .map(|(p, _)| *p)
        {
            self.buckets.remove(&calmest);
        }
    }

    /// Drops the bans that ended, and says whose.
    pub fn sweep(&mut self, now: Instant) -> Vec<PeerId> {
        let ended: Vec<PeerId> = self
            .banned
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in &ended {
            self.banned.remove(peer);
        }
        ended
    }

    /// Peers banned now.
    pub fn banned(&self, now: Instant) -> usize {
        self.banned.values().filter(|t| **t > now).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate() -> Rate {
        Rate {
            per_second: 10.0,
            burst: 20.0,
            ban_after: 50.0,
            ban_for: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_peer_within_its_rate_is_never_refused() {
        let mut l = Limiter::new(rate());
        let (peer, t0) = (PeerId::random(), Instant::now());
        // The burst at once, then the sustained rate for a minute.
        for _ in 0..20 {
            assert_eq!(l.check(peer, t0), Verdict::Allow);
        }
        for i in 1..=600 {
            let t = t0 + Duration::from_millis(100 * i);
            assert_eq!(l.check(peer, t), Verdict::Allow, "request {i}");
        }
    }

    #[test]
    fn a_burst_over_the_limit_is_refused_then_served_again() {
        let mut l = Limiter::new(rate());
        let (peer, t0) = (PeerId::random(), Instant::now());
        let verdicts: Vec<Verdict> = (0..30).map(|_| l.check(peer, t0)).collect();
        assert!(verdicts[..20].iter().all(|v| *v == Verdict::Allow));
        assert!(verdicts[20..].iter().all(|v| *v == Verdict::Refuse));
        // A second later ten tokens are back.
        let t1 = t0 + Duration::from_secs(1);
        assert!((0..10).all(|_| l.check(peer, t1) == Verdict::Allow));
        assert_eq!(l.check(peer, t1), Verdict::Refuse);
        assert_eq!(l.banned(t1), 0);
    }

    #[test]
    fn a_flood_is_banned_for_the_ban_time_and_others_are_untouched() {
        let mut l = Limiter::new(rate());
        let (flood, honest, t0) = (PeerId::random(), PeerId::random(), Instant::now());
        // 1,000 requests a second: banned once 50 refusals outrun the decay.
        let mut banned_at = None;
        for i in 0..1000 {
            let t = t0 + Duration::from_millis(i);
            if l.check(flood, t) == Verdict::Ban {
                assert!(l.ban(flood, t).is_empty());
                banned_at = Some(i);
                break;
            }
        }
        let at = banned_at.expect("the flood was never banned");
        assert!(at < 200, "banned only after {at} ms");
        let t = t0 + Duration::from_millis(at);
        assert!(l.is_banned(flood, t));
        assert_eq!(l.check(flood, t + Duration::from_secs(59)), Verdict::Refuse);
        assert_eq!(l.check(honest, t), Verdict::Allow);
        // The ban ends; the peer starts over with a full bucket.
        let later = t + Duration::from_secs(61);
        assert!(!l.is_banned(flood, later));
        assert_eq!(l.check(flood, later), Verdict::Allow);
        assert_eq!(l.sweep(later), [flood]);
        assert_eq!(l.banned(later), 0);
    }

    /// A flooder that stays under the ban in each connection and reconnects keeps its
    /// refusals: the host no longer forgets a bucket when a peer disconnects.
    #[test]
    fn refusals_add_up_over_reconnections() {
        let mut l = Limiter::new(rate());
        let (peer, t0) = (PeerId::random(), Instant::now());
        // 20 allowed, 40 refused: under the ban at 50.
        assert!((0..60).all(|_| l.check(peer, t0) != Verdict::Ban));
        // A second later (10 tokens, 10 refusals decayed), the same again: banned.
        let t1 = t0 + Duration::from_secs(1);
        assert!((0..60).any(|_| l.check(peer, t1) == Verdict::Ban));
    }

    #[test]
    fn buckets_are_bounded_and_the_calm_go_first() {
        let mut l = Limiter::new(rate());
        let t0 = Instant::now();
        let flooder = PeerId::random();
        assert!((0..40).all(|_| l.check(flooder, t0) != Verdict::Ban));
        for _ in 1..MAX_BUCKETS {
            l.check(PeerId::random(), t0);
        }
        assert_eq!(l.buckets.len(), MAX_BUCKETS);
        // Full: a newcomer makes room; a second later the calm peers' buckets are back to a
        // fresh peer's state and go, the flooder's (20 refusals left) stays.
        let t1 = t0 + Duration::from_secs(1);
        l.check(PeerId::random(), t1);
        assert!(l.buckets.len() < MAX_BUCKETS);
        assert!(l.buckets.contains_key(&flooder));
        // Full of suspicious peers: the one with the fewest refusals goes.
        let mut l = Limiter::new(rate());
        let mild = PeerId::random();
        assert!((0..22).all(|_| l.check(mild, t0) != Verdict::Ban));
        for _ in 1..MAX_BUCKETS {
            let p = PeerId::random();
            assert!((0..30).all(|_| l.check(p, t0) != Verdict::Ban));
        }
        l.check(PeerId::random(), t0);
        assert_eq!(l.buckets.len(), MAX_BUCKETS);
        assert!(!l.buckets.contains_key(&mild));
    }

    #[test]
    fn bans_are_bounded() {
        let mut l = Limiter::new(rate());
        let t0 = Instant::now();
        let first = PeerId::random();
        assert!(l.ban(first, t0).is_empty());
        for i in 1..MAX_BANNED {
            let unbanned = l.ban(PeerId::random(), t0 + Duration::from_millis(i as u64));
            assert!(unbanned.is_empty());
        }
        // Full: the ban that ends first makes room, and the caller learns whose it was.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(l.ban(PeerId::random(), later), [first]);
        assert_eq!(l.banned.len(), MAX_BANNED);
    }
}
