//! The spike guard of collaborative training: a bad step (one peer's corrupted batch, a
//! numerical blow-up) shows as an averaged gradient far larger than the recent ones. The guard
//! keeps the norms of the last epochs' averaged gradients and, every few epochs, a good state
//! (parameters and optimizer: the peer's own state of that epoch, shared); an averaged gradient whose norm is more than
//! `factor` times the recent median rolls the peer back to that state instead of stepping
//! (the epoch still advances, so the schedule goes on). Every member of a group holds the same
//! averaged gradient and, having taken the same steps, the same history: they all decide
//! alike. A peer that joined late judges only once it has seen enough epochs, and a state
//! averaging realigns any peer that decided otherwise.
//!
//! Should the gradients' scale change for good, three rollbacks in a row accept the new scale
//! (the history starts over) rather than stalling training.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::state::TrainState;

/// Epochs of history the median is taken over, and the fewest it judges with.
const HISTORY: usize = 16;
const MIN_HISTORY: usize = 8;
/// Rollbacks in a row after which the guard accepts the new scale.
const MAX_ROLLBACKS: u32 = 3;

/// What the guard says of an averaged gradient.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Step with it.
    Step,
    /// Its norm is `norm`, `ratio` times the recent median: go back to the good state of
    /// `epoch` instead.
    RollBack { epoch: u64, norm: f64, ratio: f64 },
}

/// Norm history and the last good state (see the module doc).
#[derive(Debug, Clone)]
pub struct Guard {
    factor: f64,
    norms: VecDeque<f64>,
    /// The good state, shared with whoever else holds it (the peer while it is current).
    good: Option<Arc<TrainState>>,
    rollbacks: u32,
}

impl Guard {
    /// A guard that rolls back on norms above `factor` × the recent median (`f64::INFINITY`:
    /// never).
    pub fn new(factor: f64) -> Guard {
        Guard {
            factor,
            norms: VecDeque::with_capacity(HISTORY),
            good: None,
            rollbacks: 0,
        }
    }

    /// Judges an averaged gradient of norm `norm` (finite: a non-finite one is skipped by the
    /// caller without judging).
    pub fn judge(&mut self, norm: f64) -> Verdict {
        if self.norms.len() >= MIN_HISTORY && self.good.is_some() {
            let mut sorted: Vec<f64> = self.norms.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            let median = sorted[sorted.len() / 2].max(f64::MIN_POSITIVE);
            let ratio = norm / median;
            if ratio > self.factor {
                self.rollbacks += 1;
                if self.rollbacks <= MAX_ROLLBACKS {
                    let epoch = self.good.as_ref().map_or(0, |g| g.epoch());
                    return Verdict::RollBack { epoch, norm, ratio };
                }
                tracing::warn!(
                    "{MAX_ROLLBACKS} rollbacks in a row: taking gradient norms near {norm:.3e} \
                     as the new scale"
                );
                self.norms.clear();
            }
        }
        self.rollbacks = 0;
        if self.norms.len() == HISTORY {
            self.norms.pop_front();
        }
        self.norms.push_back(norm);
        Verdict::Step
    }

    /// Keeps `state` as the good state (shared, not copied: a state is never changed once
    /// shared, the next step works on a copy).
    pub fn keep(&mut self, state: &Arc<TrainState>) {
        self.good = Some(Arc::clone(state));
    }

    /// Puts the good state's parameters and optimizer into `state` (its sample count stays:
    /// the samples were trained on all the same); false if there is none.
    pub fn restore(&self, state: &mut TrainState) -> bool {
        match &self.good {
            Some(good) if good.params.len() == state.params.len() => {
                state.params.copy_from_slice(&good.params);
                state.optimizer.clone_from(&good.optimizer);
                true
            }
            _ => false,
        }
    }

    /// Forgets the history (a downloaded state starts it over) and keeps this state as good.
    pub fn restart(&mut self, state: &Arc<TrainState>) {
        self.norms.clear();
        self.rollbacks = 0;
        self.keep(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{Config, Optimizer};
    use potluck_core::{Layout, Role};

    /// A state of four parameters `v` after `epoch` steps.
    fn state(v: f32, epoch: u64) -> TrainState {
        let layout = Layout::new([("w", vec![4], Role::Weight)]).unwrap();
        let mut optimizer = Optimizer::new(Config::reference_lamb(), &layout);
        optimizer.set_steps(epoch);
        TrainState::new(vec![v; 4], optimizer, 0)
    }

    #[test]
    fn a_spike_rolls_back_to_the_good_state_and_normal_norms_step() {
        let mut guard = Guard::new(10.0);
        let good = Arc::new(state(1.0, 5));
        guard.keep(&good);
        // Too little history: no judgement yet.
        assert_eq!(guard.judge(1e6), Verdict::Step);
        guard.restart(&good);
        for i in 0..MIN_HISTORY {
            assert_eq!(guard.judge(1.0 + i as f64 * 0.1), Verdict::Step);
        }
        // Twice the median is noise; a hundred times is a spike.
        assert_eq!(guard.judge(2.5), Verdict::Step);
        match guard.judge(150.0) {
            Verdict::RollBack { epoch, ratio, .. } => {
                assert_eq!(epoch, 5);
                assert!((90.0..150.0).contains(&ratio), "{ratio}");
            }
            v => panic!("{v:?}"),
        }
        let mut now = state(7.0, 9);
        assert!(guard.restore(&mut now));
        assert_eq!(now.params, good.params);
    }

    #[test]
    fn a_lasting_new_scale_is_accepted_after_a_few_rollbacks() {
        let mut guard = Guard::new(10.0);
        guard.restart(&Arc::new(state(1.0, 0)));
        for _ in 0..MIN_HISTORY {
            guard.judge(1.0);
        }
        for _ in 0..MAX_ROLLBACKS {
            assert!(matches!(guard.judge(100.0), Verdict::RollBack { .. }));
        }
        assert_eq!(guard.judge(100.0), Verdict::Step);
        // The history started over at the new scale.
        for _ in 0..MIN_HISTORY {
            assert_eq!(guard.judge(100.0), Verdict::Step);
        }
        assert!(matches!(guard.judge(5000.0), Verdict::RollBack { .. }));
    }

    #[test]
    fn without_a_good_state_nothing_is_restored() {
        let guard = Guard::new(10.0);
        let mut now = state(3.0, 0);
        assert!(!guard.restore(&mut now));
        assert_eq!(now.params, vec![3.0; 4]);
    }
}
