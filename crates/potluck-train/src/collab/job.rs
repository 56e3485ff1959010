//! One epoch's end: the gradient's all-reduce, the spike guard, the inner step and, every few
//! epochs, the parameters' averaging.

use std::time::Instant;

use potluck_allreduce::butterfly::{self, Group};
use potluck_core::Loss;

use super::{EpochReport, Net};
use crate::guard::{Guard, Verdict};
use crate::optim::{self, Optimizer};

/// One epoch's averaging and step, with everything it needs (so it can run in the
/// background while the next epoch's gradients are computed).
pub(super) struct Job {
    pub(super) epoch: u64,
    /// The group, or why there is none ("" when alone).
    pub(super) group: Result<Group, String>,
    /// This peer's mean gradient.
    pub(super) grad: Vec<f32>,
    pub(super) samples: u64,
    pub(super) loss: Loss,
    pub(super) params: Vec<f32>,
    pub(super) optimizer: Optimizer,
    pub(super) net: Net,
    pub(super) averaging: butterfly::Settings,
    pub(super) state_every: u64,
    pub(super) guard: Guard,
    pub(super) started: Instant,
}

/// What a [`Job`] gives back.
pub(super) struct Stepped {
    pub(super) params: Vec<f32>,
    pub(super) optimizer: Optimizer,
    pub(super) guard: Guard,
    /// The gradient buffer, for reuse.
    pub(super) scratch: Vec<f32>,
    pub(super) report: EpochReport,
}

impl Job {
    pub(super) async fn run(self) -> Result<Stepped, optim::Error> {
        let Job {
            epoch,
            group,
            mut grad,
            samples,
            loss,
            mut params,
            mut optimizer,
            net,
            averaging,
            state_every,
            mut guard,
            started,
        } = self;
        let mut swarm_samples = samples as f64;
        let mut group_size = 1;
        let mut alone_because = None;
        let mut averaged: Option<(Group, usize)> = None;
        match group {
            Ok(group) => match group
                .members
                .iter()
                .position(|m| m.peer == net.dht.peer_id())
            {
                Some(me) => {
                    match butterfly::all_reduce(
                        &net.inbox,
                        &group,
                        me,
                        samples as f32,
                        &mut grad,
                        &averaging,
                    )
                    .await
                    {
                        Ok(report) => {
                            swarm_samples = report.weight();
                            group_size = group.members.len();
                            if !report.complete() {
                                tracing::warn!(
                                    "epoch {epoch}: parts of the gradient kept local values: {:?}",
                                    report.excluded
                                );
                            }
                            averaged = Some((group, me));
                        }
                        Err(e) => alone_because = Some(e.to_string()),
                    }
                }
                None => alone_because = Some("not in its own group".into()),
            },
            Err(why) if !why.is_empty() => alone_because = Some(why),
            Err(_) => {}
        }
        if let Some(why) = &alone_because {
            tracing::warn!("epoch {epoch}: stepping alone ({why})");
        }
        // The step is a few hundred milliseconds of arithmetic: off the async workers. A
        // spiking gradient rolls back to the guard's good state instead.
        let (optimizer_back, params_back, grad_back, guard_back, rolled_back, result) =
            tokio::task::spawn_blocking(move || {
                let norm = optim::global_norm(&grad, 1);
                let verdict = if norm.is_finite() {
                    guard.judge(norm)
                } else {
                    Verdict::Step
                };
                let result = match verdict {
                    Verdict::RollBack {
                        epoch: to,
                        norm,
                        ratio,
                    } if guard.restore(&mut params, &mut optimizer) => {
                        tracing::warn!(
                            "epoch {epoch}: the averaged gradient's norm {norm:.3e} is {ratio:.0}× \
                             the recent median: back to the state of epoch {to}"
                        );
                        optimizer.set_steps(epoch + 1);
                        let info = optim::StepInfo {
                            step: epoch + 1,
                            lr: 0.0,
                            grad_norm: norm,
                        };
                        return (optimizer, params, grad, guard, Some(to), Ok(info));
                    }
                    _ => optimizer.step(&mut params, &mut grad),
                };
                (optimizer, params, grad, guard, None, result)
            })
            .await
            .map_err(|_| optim::Error::NonFinite { norm: f64::NAN })?;
        (optimizer, params, grad, guard) = (optimizer_back, params_back, grad_back, guard_back);
        let (info, skipped) = match result {
            Ok(info) => (info, false),
            Err(optim::Error::NonFinite { norm }) => {
                tracing::warn!("epoch {epoch}: the averaged gradient is not finite, step skipped");
                optimizer.set_steps(epoch + 1);
                let info = optim::StepInfo {
                    step: epoch + 1,
                    lr: 0.0,
                    grad_norm: norm,
                };
                (info, true)
            }
            Err(e) => return Err(e),
        };
        let boundary = (epoch + 1).is_multiple_of(if state_every > 0 { state_every } else { 10 });
        let mut state_averaged = false;
        if let Some((group, me)) = &averaged
            && state_every > 0
            && boundary
        {
            let mut round = group.clone();
            round.round[31] ^= 0x5a;
            match butterfly::all_reduce(&net.inbox, &round, *me, 1.0, &mut params, &averaging).await
            {
                Ok(r) => state_averaged = r.complete(),
                Err(e) => tracing::warn!("epoch {epoch}: averaging the parameters failed: {e}"),
            }
        }
        // The state every few epochs is the one to go back to (the same on every peer once
        // the parameters were averaged).
        if boundary && !skipped && rolled_back.is_none() {
            guard.keep(epoch + 1, &params, &optimizer);
        }
        Ok(Stepped {
            params,
            optimizer,
            guard,
            scratch: grad,
            report: EpochReport {
                epoch: info.step,
                samples,
                swarm_samples,
                group: group_size,
                alone_because,
                loss,
                lr: info.lr,
                grad_norm: info.grad_norm,
                skipped,
                rolled_back,
                state_averaged,
                averaging: started.elapsed(),
            },
        })
    }
}
