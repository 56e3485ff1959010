//! The end of an epoch, as the compute loop sees it: the averaging and step handed to a
//! [`Job`] (here and now, or in the background with delayed updates), the result installed,
//! and the epochs in a row without averaging counted.

use std::sync::Arc;
use std::time::Instant;

use potluck_core::{Loss, Trainable, clock};

use super::{
    ALONE_WARN, Alone, Collab, EpochReport, Error, Guard, Job, Stepped, Tick, Traffic, TrainState,
};

impl<T: Trainable> Collab<T> {
    /// Ends the epoch: averages its gradient with the group (or not, alone) and steps, here
    /// and now, or in the background with delayed updates (then the report comes with a later
    /// tick, once the new parameters are in).
    pub(super) async fn finish_epoch(&mut self) -> Result<Tick, Error<T::Error>> {
        let started = Instant::now();
        let epoch = self.epoch;
        let group = match self.round.take() {
            Some(round) => match round.formed {
                Some(Err(Alone::TooLate)) => {
                    // This peer cannot take part: the swarm moves on without it, and it will
                    // download the new state.
                    tracing::info!("too late for epoch {}'s averaging", round.epoch);
                    self.missed = Some(round.epoch);
                    self.missed_deadline = round.deadline;
                    self.report(true);
                    return Ok(Tick::Epoch(self.missed_report(epoch, started)));
                }
                Some(formed) => formed,
                None => Err(Alone::NotFormed),
            },
            None => Err(Alone::Solitary),
        };
        // Each member's weight counts up to the samples it was seen to report for the epoch;
        // not in a checked round, whose two reducers of a part must weigh alike (their views
        // differ): robust aggregation caps every weight at twice the median there.
        let averaging = &self.settings.averaging;
        let checked = averaging.check && averaging.rule != potluck_allreduce::aggregate::Rule::Mean;
        let group = group.map(|mut g| {
            if checked {
                return g;
            }
            let view = self.view.borrow().clone();
            let now = clock::now();
            let me = self.net.dht.peer_id();
            for m in g.members.iter_mut().filter(|m| m.peer != me) {
                m.max_weight = view.as_ref().map_or(0.0, |v| v.granted(m.peer, epoch, now));
            }
            g
        });
        // One step at a time: the previous epoch's must be in before this one starts.
        let earlier = self.settle().await?;
        // The mean gradient of this peer's samples (weighted by their count in the average);
        // in local-update mode, the change of its parameters over the round.
        let samples = self.samples;
        let n = self.state.params.len();
        let mut grad = if self.inner.is_some() {
            // The gradient buffer is empty after the last inner step, and stays.
            let mut delta = std::mem::take(&mut self.spare);
            delta.resize(n, 0.0);
            self.round_change(&mut delta)?;
            delta
        } else {
            std::mem::replace(&mut self.grad, std::mem::take(&mut self.spare))
        };
        if grad.len() != n {
            grad = vec![0.0; n];
        }
        if self.grad.len() != grad.len() {
            self.grad = vec![0.0; grad.len()];
        }
        if self.inner.is_none() && samples > 0 {
            let inv = 1.0 / samples as f32;
            grad.iter_mut().for_each(|g| *g *= inv);
        }
        let weight = match &mut self.attacker {
            Some(attacker) => {
                attacker.corrupt(&mut grad);
                attacker.weight(samples)
            }
            None => samples as f32,
        };
        let job = Job {
            epoch,
            group,
            grad,
            samples,
            weight,
            loss: self.loss.mean(),
            // The step's own copy: donors serve the current state until the new one is in.
            state: TrainState::clone(&self.state),
            net: self.net.clone(),
            averaging: self.settings.averaging.clone(),
            state_every: self.settings.state_every,
            guard: self
                .guard
                .take()
                .unwrap_or_else(|| Guard::new(self.settings.spike)),
            started,
            may_step_alone: self.alone_epochs < self.settings.alone_limit,
            residual: self.residual.take(),
            local: self.inner.is_some(),
        };
        self.epoch += 1;
        self.samples = 0;
        self.loss = Loss::default();
        self.report(true);
        if self.settings.delayed {
            self.busy = Some(tokio::spawn(job.run()));
            return Ok(earlier.map_or(Tick::Waited, Tick::Epoch));
        }
        let stepped = job.run().await?;
        self.install(stepped).map(Tick::Epoch)
    }

    /// Waits for a step running in the background and installs its result.
    pub async fn settle(&mut self) -> Result<Option<EpochReport>, Error<T::Error>> {
        let Some(busy) = self.busy.take() else {
            return Ok(None);
        };
        let stepped = busy.await.map_err(Error::StepTask)??;
        self.install(stepped).map(Some)
    }

    /// Takes a finished step's state: the model gets its parameters, the state server serves
    /// it, and the guard keeps it if it is a good state to go back to.
    fn install(&mut self, mut stepped: Stepped) -> Result<EpochReport, Error<T::Error>> {
        self.count_alone(&mut stepped.report);
        self.state = Arc::new(stepped.state);
        if matches!(stepped.report.alone_because, Some(Alone::Unheard)) {
            self.unheard = Some(self.state.epoch());
        }
        self.spare = stepped.scratch;
        self.residual = stepped.residual;
        self.traffic += stepped.report.traffic;
        let mut guard = stepped.guard;
        if stepped.keep {
            guard.keep(&self.state);
        }
        self.guard = Some(guard);
        self.spare.fill(0.0);
        self.restart_round(true)?;
        self.shelve();
        Ok(stepped.report)
    }

    /// Counts the epochs in a row this peer could not average though others were around, into
    /// `report`, and says so loudly from [`ALONE_WARN`] on: its parameters drift from the
    /// swarm's while it steps alone.
    fn count_alone(&mut self, report: &mut EpochReport) {
        let fault = report.alone_because.as_ref().is_some_and(Alone::is_fault);
        self.alone_epochs = if fault { self.alone_epochs + 1 } else { 0 };
        report.alone_epochs = self.alone_epochs;
        if self.alone_epochs >= ALONE_WARN.min(self.settings.alone_limit.max(1)) {
            tracing::warn!(
                "{} epochs in a row without averaging with the swarm, though others are \
                 around: this peer's parameters drift from theirs{}",
                self.alone_epochs,
                if self.alone_epochs > self.settings.alone_limit {
                    " (it no longer steps alone)".to_owned()
                } else {
                    format!(
                        " (it stops stepping alone after {} epochs)",
                        self.settings.alone_limit
                    )
                }
            );
        }
    }

    fn missed_report(&self, epoch: u64, started: Instant) -> EpochReport {
        EpochReport {
            epoch,
            samples: self.samples,
            swarm_samples: 0.0,
            group: 0,
            alone_because: Some(Alone::TooLate),
            alone_epochs: self.alone_epochs,
            held_back: false,
            loss: Loss::default(),
            lr: 0.0,
            grad_norm: 0.0,
            skipped: true,
            non_finite: false,
            rolled_back: None,
            state_averaged: false,
            averaging: started.elapsed(),
            traffic: Traffic::default(),
        }
    }
}
