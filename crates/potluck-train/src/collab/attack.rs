//! A peer that misbehaves on purpose, for experiments and tests of Byzantine robustness: what it
//! sends to the all-reduce in place of its true mean gradient.

use std::collections::VecDeque;

use crate::state::TrainState;
use crate::sync::Snapshot;

/// How an attacking peer corrupts the gradient it sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attack {
    /// Its gradient times this factor (−100: sign-flipped and a hundred times larger).
    Scale(f32),
    /// Random values with the norm of its gradient.
    Noise,
    /// Not a number, everywhere.
    NonFinite,
    /// Its gradient of this many epochs before (computed on parameters that old).
    Stale(usize),
    /// Its gradient sign-flipped, sent with this weight whatever its samples (3e38: the mean
    /// is its vector alone, and CenteredClip is pulled by it each iteration, unless weights
    /// are bounded).
    Weight(f32),
    /// It says it is this many epochs ahead of where it is (saturating: `u64::MAX` claims the
    /// counter's end), and serves its parameters sign-flipped as the state of that epoch: were
    /// a claim believed, it would be the only donor, and every peer that synced would hold its
    /// parameters (and serve them on).
    Ahead(u64),
    /// It says it computed a thousand times the epoch's target the moment the epoch begins,
    /// at 1e9 samples/s, and proposes a deadline already past for every epoch: believed, it
    /// ends every epoch at once, and every peer is too late to average.
    Rush,
    /// As a reducer it returns its part's average negated and ten times over (what it sends
    /// is honest): believed, every member steps the wrong way on that part, ten times as far.
    Reducer,
}

impl Attack {
    /// How many epochs ahead of its own the attacker claims to be.
    pub(super) fn ahead(self) -> u64 {
        match self {
            Attack::Ahead(k) => k,
            _ => 0,
        }
    }
}

/// An attack and what it needs to remember (the gradients a stale attack replays).
#[derive(Debug)]
pub(super) struct Attacker {
    attack: Attack,
    past: VecDeque<Vec<f32>>,
    draws: u64,
}

impl Attacker {
    pub(super) fn new(attack: Attack) -> Attacker {
        Attacker {
            attack,
            past: VecDeque::new(),
            draws: 0,
        }
    }

    /// The weight it sends its gradient with, having computed `samples`.
    pub(super) fn weight(&self, samples: u64) -> f32 {
        match self.attack {
            Attack::Weight(w) => w,
            _ => samples as f32,
        }
    }

    /// The state it serves in place of `state`, if it lies about it.
    pub(super) fn served(&self, state: &TrainState, chunk: usize) -> Option<Snapshot> {
        let Attack::Ahead(k) = self.attack else {
            return None;
        };
        let flipped: Vec<f32> = state.params.iter().map(|p| -p).collect();
        let mut snapshot = Snapshot::take(&flipped, &state.optimizer, state.samples, chunk);
        snapshot.epoch = snapshot.epoch.saturating_add(k);
        Some(snapshot)
    }

    /// Replaces `grad` (this peer's true mean gradient) with what the attack sends.
    pub(super) fn corrupt(&mut self, grad: &mut [f32]) {
        match self.attack {
            Attack::Scale(factor) => grad.iter_mut().for_each(|g| *g *= factor),
            Attack::Weight(_) => grad.iter_mut().for_each(|g| *g = -*g),
            // It sends its true gradient: its lies are about its progress and its state.
            Attack::Ahead(_) | Attack::Rush | Attack::Reducer => {}
            Attack::NonFinite => grad.fill(f32::NAN),
            Attack::Noise => {
                let norm = grad
                    .iter()
                    .map(|g| f64::from(*g).powi(2))
                    .sum::<f64>()
                    .sqrt();
                self.draws += 1;
                let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ self.draws;
                for g in grad.iter_mut() {
                    // xorshift64*: uniform in [-1, 1).
                    state ^= state >> 12;
                    state ^= state << 25;
                    state ^= state >> 27;
                    let bits = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
                    *g = bits as f32 / (1u64 << 23) as f32 - 1.0;
                }
                let drawn = grad
                    .iter()
                    .map(|g| f64::from(*g).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let k = if drawn > 0.0 { norm / drawn } else { 0.0 } as f32;
                grad.iter_mut().for_each(|g| *g *= k);
            }
            Attack::Stale(epochs) => {
                self.past.push_back(grad.to_vec());
                while self.past.len() > epochs + 1 {
                    self.past.pop_front();
                }
                if let Some(old) = self.past.front() {
                    grad.copy_from_slice(old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(v: &[f32]) -> f64 {
        v.iter().map(|g| f64::from(*g).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn each_attack_sends_what_it_says() {
        let grad: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.01).collect();
        let mut g = grad.clone();
        Attacker::new(Attack::Scale(-100.0)).corrupt(&mut g);
        assert!(g.iter().zip(&grad).all(|(a, b)| *a == -100.0 * b));
        let mut g = grad.clone();
        Attacker::new(Attack::NonFinite).corrupt(&mut g);
        assert!(g.iter().all(|v| v.is_nan()));
        let mut g = grad.clone();
        Attacker::new(Attack::Noise).corrupt(&mut g);
        assert!((norm(&g) - norm(&grad)).abs() < 1e-4 * norm(&grad));
        assert_ne!(g, grad);
        // Two epochs stale: the first two epochs send the first gradient, then each sends
        // the one of two epochs before.
        let mut stale = Attacker::new(Attack::Stale(2));
        let sent: Vec<f32> = (0..5)
            .map(|e| {
                let mut g = vec![e as f32];
                stale.corrupt(&mut g);
                g[0]
            })
            .collect();
        assert_eq!(sent, vec![0.0, 0.0, 0.0, 1.0, 2.0]);
    }
}
