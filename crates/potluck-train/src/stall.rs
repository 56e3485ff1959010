//! Whether the epoch a peer is in has stalled: it has run far longer than epochs here usually
//! take (a round whose group never forms, a swarm whose peers all went client, a state that
//! cannot be downloaded). Such a peer goes on computing or waiting and nothing else would say
//! so: its metrics are published as epochs end, and none ends. The training loop asks
//! [`Stall::check`] every tick and says it in the log, the metrics and so the dashboard.

use std::time::{Duration, Instant};

/// An epoch is stalled once it has run this many times the usual epoch here...
pub const FACTOR: f64 = 2.0;
/// ...and this much longer than it (short epochs: a few slow ones are not a stall).
pub const SLACK: Duration = Duration::from_secs(60);
/// The weight of the newest epoch in the usual time (an exponential average).
const NEWEST: f64 = 0.3;

/// How long epochs take here, and how long the current one has run.
#[derive(Debug, Clone)]
pub struct Stall {
    epoch: u64,
    began: Instant,
    /// The usual epoch (seconds); none until one epoch ran from its start to its end here.
    usual: Option<f64>,
    /// Whether the current epoch began here (not joined halfway or downloaded into).
    whole: bool,
    warned: bool,
}

impl Stall {
    /// Watching from `epoch`, reached at `now` (its time is not an epoch's: it may have begun
    /// before this peer came).
    pub fn new(epoch: u64, now: Instant) -> Stall {
        Stall {
            epoch,
            began: now,
            usual: None,
            whole: false,
            warned: false,
        }
    }

    /// The peer is at `epoch` at `now`: one epoch past the last ends it (its time counts
    /// toward the usual one); a jump (a downloaded state) only starts watching again.
    pub fn at(&mut self, epoch: u64, now: Instant) {
        if epoch == self.epoch {
            return;
        }
        if epoch == self.epoch + 1 && self.whole {
            let took = now.duration_since(self.began).as_secs_f64();
            self.usual = Some(match self.usual {
                Some(u) => (1.0 - NEWEST) * u + NEWEST * took,
                None => took,
            });
        }
        self.whole = epoch == self.epoch + 1;
        self.epoch = epoch;
        self.began = now;
        self.warned = false;
    }

    /// The usual epoch here, once known.
    pub fn usual(&self) -> Option<Duration> {
        self.usual.map(Duration::from_secs_f64)
    }

    /// How long the current epoch has run, if it has stalled (see [`FACTOR`], [`SLACK`]).
    pub fn check(&self, now: Instant) -> Option<Duration> {
        let usual = self.usual?;
        let ran = now.duration_since(self.began);
        let limit = (FACTOR * usual).max(usual + SLACK.as_secs_f64());
        (ran.as_secs_f64() > limit).then_some(ran)
    }

    /// Whether this stall is news: true once an epoch.
    pub fn first_word(&mut self) -> bool {
        !std::mem::replace(&mut self.warned, true)
    }

    /// The epoch being watched.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// Epochs of 100 s: one that has run 150 s is slow, 201 s stalled; said once. Short epochs
    /// need [`SLACK`] more. A downloaded state's jump teaches nothing.
    #[test]
    fn an_epoch_past_twice_the_usual_time_is_stalled_and_said_once() {
        let t0 = Instant::now();
        let mut s = Stall::new(3, t0);
        // Joined halfway through epoch 3: its end teaches nothing, nor can anything stall.
        s.at(4, t0 + S(30));
        assert_eq!(s.usual(), None);
        assert_eq!(s.check(t0 + S(10_000)), None);
        s.at(5, t0 + S(130));
        assert_eq!(s.usual(), Some(S(100)));
        assert_eq!(s.check(t0 + S(280)), None, "150 s: slow, not stalled");
        assert_eq!(s.check(t0 + S(331)), Some(S(201)));
        assert!(s.first_word());
        assert!(!s.first_word());
        // That epoch's 300 s weigh 0.3 in the usual time.
        s.at(6, t0 + S(430));
        assert!(s.first_word(), "a new epoch, a new word");
        assert_eq!(s.usual(), Some(S(160)));
        // Jumped by a download: the time of 6 to 9 is not an epoch's.
        s.at(9, t0 + S(2000));
        assert_eq!(s.usual(), Some(S(160)));
        assert_eq!(s.epoch(), 9);
        // Epochs of 2 s: stalled only past 62 s.
        let mut s = Stall::new(0, t0);
        s.at(1, t0);
        s.at(2, t0 + S(2));
        assert_eq!(s.check(t0 + S(2 + 61)), None);
        assert!(s.check(t0 + S(2 + 63)).is_some());
    }
}
