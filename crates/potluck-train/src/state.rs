//! One peer's training state: the parameters, the inner optimizer (its moments, settings and
//! step count, which is the global epoch) and the samples the swarm trained on to reach it.
//!
//! There is one of it per peer. A collaborative peer holds its current state behind an
//! [`Arc`](std::sync::Arc): the state server hands out the very same allocation to
//! downloaders ([`crate::sync::Snapshot`] reads its bytes on demand, it keeps no copy), the
//! spike guard keeps an `Arc` of its last good state, and the end of an epoch moves the state
//! into its job and takes the stepped state back. A copy is made only where two versions must
//! live at once: the step works on its own while donors still serve the state it started from.

use crate::optim::Optimizer;

/// Parameters, optimizer and progress of one peer's training.
#[derive(Debug, Clone)]
pub struct TrainState {
    /// The flat parameter buffer (the model's layout).
    pub params: Vec<f32>,
    /// The inner optimizer with its moments; its step count is the state's epoch.
    pub optimizer: Optimizer,
    /// Samples trained on to reach this state (by the swarm, in a collaborative run).
    pub samples: u64,
}

impl TrainState {
    /// A state of `params` and `optimizer` after `samples` samples.
    pub fn new(params: Vec<f32>, optimizer: Optimizer, samples: u64) -> TrainState {
        TrainState {
            params,
            optimizer,
            samples,
        }
    }

    /// Optimizer steps taken to reach it (the global epoch of a collaborative run).
    pub fn epoch(&self) -> u64 {
        self.optimizer.steps()
    }

    /// Bytes its parameters and moments take.
    pub fn bytes(&self) -> usize {
        4 * self.params.len() + self.optimizer.moments().bytes()
    }
}
