//! Training on one machine: accumulate the gradient of a batch over micro-batches, average it,
//! step the inner optimizer on the flat buffers, write the parameters back.

use std::time::{Duration, Instant};

use potluck_core::{Loss, Trainable};

use crate::optim::{self, Optimizer};
use crate::state::TrainState;

/// Errors of a training step.
#[derive(Debug, thiserror::Error)]
pub enum Error<E: std::error::Error + 'static> {
    #[error("model")]
    Model(#[source] E),
    #[error(transparent)]
    Optimizer(#[from] optim::Error),
}

/// What one step did and what it cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// Step number (1-based).
    pub step: u64,
    /// Mean loss over the step's samples, and its parts.
    pub loss: Loss,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the step was skipped because the gradient was not finite.
    pub skipped: bool,
    /// Forward and backward passes, including adding gradients into the flat buffer.
    pub compute: Duration,
    /// The optimizer step on the flat buffers.
    pub optimizer: Duration,
    /// Writing the parameters back into the model.
    pub copy: Duration,
}

/// A model, its optimizer and the flat buffers between them.
#[derive(Debug)]
pub struct Solo<T: Trainable> {
    model: T,
    state: TrainState,
    grad: Vec<f32>,
}

impl<T: Trainable> Solo<T> {
    /// Starts from the model's current parameters.
    pub fn new(model: T, optimizer: Optimizer) -> Result<Solo<T>, Error<T::Error>> {
        let n = model.layout().numel();
        let mut params = vec![0.0; n];
        model.read_params(&mut params).map_err(Error::Model)?;
        Ok(Solo {
            model,
            state: TrainState::new(params, optimizer, 0),
            grad: vec![0.0; n],
        })
    }

    /// Starts from saved parameters and a count of samples already trained on.
    pub fn resume(
        mut model: T,
        optimizer: Optimizer,
        params: Vec<f32>,
        samples: u64,
    ) -> Result<Solo<T>, Error<T::Error>> {
        model.write_params(&params).map_err(Error::Model)?;
        let n = params.len();
        Ok(Solo {
            model,
            state: TrainState::new(params, optimizer, samples),
            grad: vec![0.0; n],
        })
    }

    /// One optimizer step over `micro_batches` (together one batch).
    pub fn step(&mut self, micro_batches: &[T::Batch]) -> Result<Report, Error<T::Error>> {
        let started = Instant::now();
        self.grad.fill(0.0);
        let mut sum = Loss::default();
        for batch in micro_batches {
            let loss = self
                .model
                .accumulate_gradients(batch, &mut self.grad)
                .map_err(Error::Model)?;
            sum.add_weighted(&loss);
        }
        let total = sum.mean();
        let n = total.samples.max(1) as f64;
        let compute = started.elapsed();

        let started = Instant::now();
        // The buffer holds the summed gradient; the optimizer divides by the samples as it reads.
        let state = &mut self.state;
        let (info, skipped) =
            match state
                .optimizer
                .step_scaled(&mut state.params, &mut self.grad, 1.0 / n)
            {
                Ok(info) => (info, false),
                Err(optim::Error::NonFinite { norm }) => {
                    tracing::warn!("step skipped: the gradient is not finite (norm {norm})");
                    let info = optim::StepInfo {
                        step: state.optimizer.steps(),
                        lr: 0.0,
                        grad_norm: norm,
                    };
                    (info, true)
                }
                Err(e) => return Err(e.into()),
            };
        let optimizer = started.elapsed();
        let started = Instant::now();
        if !skipped {
            self.model
                .write_params(&self.state.params)
                .map_err(Error::Model)?;
            self.state.samples += total.samples as u64;
        }
        Ok(Report {
            step: info.step,
            loss: total,
            lr: info.lr,
            grad_norm: info.grad_norm,
            skipped,
            compute,
            optimizer,
            copy: started.elapsed(),
        })
    }

    /// The model.
    pub fn model(&self) -> &T {
        &self.model
    }

    /// The model, mutably (for evaluation).
    pub fn model_mut(&mut self) -> &mut T {
        &mut self.model
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &Optimizer {
        &self.state.optimizer
    }

    /// The optimizer, mutably (to change its schedule).
    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.state.optimizer
    }

    /// The current parameters.
    pub fn params(&self) -> &[f32] {
        &self.state.params
    }

    /// Samples trained on so far.
    pub fn samples(&self) -> u64 {
        self.state.samples
    }

    /// The whole training state.
    pub fn state(&self) -> &TrainState {
        &self.state
    }
}
