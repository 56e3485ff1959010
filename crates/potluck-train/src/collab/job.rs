//! One epoch's end: the gradient's all-reduce, the spike guard, the inner step and, every few
//! epochs, the parameters' averaging.

use std::sync::Arc;
use std::time::Instant;

use potluck_allreduce::butterfly::{self, Group};
use potluck_allreduce::codec::{Codec, CodecPlan};
use potluck_core::Loss;

use super::{Alone, EpochReport, Net, Traffic};
use crate::guard::{Guard, Verdict};
use crate::optim::{self, Optimizer};
use crate::state::TrainState;

/// One epoch's averaging and step, with everything it needs (so it can run in the
/// background while the next epoch's gradients are computed).
pub(super) struct Job {
    pub(super) epoch: u64,
    /// The group, or why there is none.
    pub(super) group: Result<Group, Alone>,
    /// This peer's mean gradient.
    pub(super) grad: Vec<f32>,
    pub(super) samples: u64,
    /// The weight its gradient is sent with (its samples, unless it attacks).
    pub(super) weight: f32,
    pub(super) loss: Loss,
    /// The state to step: the job's own (donors serve the one it was taken from meanwhile).
    pub(super) state: TrainState,
    pub(super) net: Net,
    pub(super) averaging: butterfly::Settings,
    pub(super) state_every: u64,
    pub(super) guard: Guard,
    pub(super) started: Instant,
    /// Whether it may step on its own gradient if it cannot average (see
    /// [`super::Settings::alone_limit`]).
    pub(super) may_step_alone: bool,
    /// Error feedback of a lossy codec (see [`super::Collab`]), given back in [`Stepped`].
    pub(super) residual: Option<Vec<f32>>,
    /// Local-update mode: `grad` is the change of the parameters over a round.
    pub(super) local: bool,
}

/// Why a [`Job`] could not step.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failed {
    #[error(transparent)]
    Optimizer(#[from] optim::Error),
    /// The optimizer step's thread panicked.
    #[error("the optimizer step stopped")]
    Task(#[from] tokio::task::JoinError),
}

/// What a [`Job`] gives back.
pub(super) struct Stepped {
    pub(super) state: TrainState,
    pub(super) guard: Guard,
    /// The guard is to keep the new state as the good one (once it is shared).
    pub(super) keep: bool,
    /// The gradient buffer, for reuse.
    pub(super) scratch: Vec<f32>,
    pub(super) residual: Option<Vec<f32>>,
    pub(super) report: EpochReport,
}

impl Job {
    pub(super) async fn run(self) -> Result<Stepped, Failed> {
        let Job {
            epoch,
            group,
            mut grad,
            samples,
            weight,
            loss,
            mut state,
            net,
            averaging,
            state_every,
            mut guard,
            started,
            may_step_alone,
            mut residual,
            local,
        } = self;
        let mut swarm_samples = samples as f64;
        let mut group_size = 1;
        let mut alone_because = None;
        let mut averaged: Option<(Group, usize)> = None;
        let mut traffic = Traffic::default();
        match group {
            Ok(group) => match group
                .members
                .iter()
                .position(|m| m.peer == net.dht.peer_id())
            {
                Some(me) => {
                    let reduced = match residual.as_mut() {
                        Some(r) => {
                            butterfly::all_reduce_with_feedback(
                                &net.inbox, &group, me, weight, &mut grad, r, &averaging,
                            )
                            .await
                        }
                        None => {
                            butterfly::all_reduce(
                                &net.inbox, &group, me, weight, &mut grad, &averaging,
                            )
                            .await
                        }
                    };
                    // What feedback carries is owed to an average that happened in full.
                    if !matches!(&reduced, Ok(r) if r.complete())
                        && let Some(r) = residual.as_mut()
                    {
                        r.fill(0.0);
                    }
                    // A disputed part whose liar the round did not show counts for nothing
                    // this epoch, alike on every member (each kept its own values there).
                    if let Ok(report) = &reduced {
                        traffic += Traffic::of(report);
                        tell_disputes(&net, epoch, "gradient", &report.disputes);
                        for d in report.disputes.iter().filter(|d| d.liar.is_none()) {
                            grad[d.range.clone()].fill(0.0);
                        }
                    }
                    match reduced {
                        Ok(report)
                            if group.members.len() > 1
                                && !report.parts.iter().any(|p| {
                                    p.chunks > 0 && p.contributors.iter().any(|&c| c != me)
                                }) =>
                        {
                            alone_because = Some(Alone::Unheard);
                        }
                        Ok(report) => {
                            swarm_samples = report.weight();
                            group_size = group.members.len();
                            if !report.complete() && local {
                                // A member's own change for a part that did not come back
                                // would set its outer parameters apart from the others' for
                                // good (their manifests then disagree, and downloaders take
                                // honest donors for liars): every member that lacks the part
                                // leaves it where the round began.
                                for p in report.parts.iter().filter(|p| !p.complete()) {
                                    grad[p.range.clone()].fill(0.0);
                                }
                                tracing::warn!(
                                    "round {epoch}: parts of the change did not come back, and \
                                     stay as the round began: {:?}",
                                    report.excluded
                                );
                            } else if !report.complete() {
                                tracing::warn!(
                                    "epoch {epoch}: parts of the gradient kept local values: {:?}",
                                    report.excluded
                                );
                            }
                            averaged = Some((group, me));
                        }
                        Err(e) => alone_because = Some(Alone::AllReduce(Arc::new(e))),
                    }
                }
                None => alone_because = Some(Alone::NotAMember),
            },
            Err(why) if why.is_fault() => alone_because = Some(why),
            Err(_) => {}
        }
        if alone_because.is_some()
            && let Some(r) = residual.as_mut()
        {
            r.fill(0.0);
        }
        let held_back = alone_because.is_some()
            && (!may_step_alone || matches!(alone_because, Some(Alone::Unheard)));
        match &alone_because {
            Some(why) if held_back => tracing::warn!(
                "epoch {epoch}: not stepping alone again ({why}): the parameters stay as they \
                 are until this peer averages with the swarm or downloads its state"
            ),
            Some(why) => tracing::warn!("epoch {epoch}: stepping alone ({why})"),
            None => {}
        }
        if held_back {
            state.optimizer.set_steps(epoch + 1);
            return Ok(Stepped {
                keep: false,
                report: EpochReport {
                    epoch: epoch + 1,
                    samples,
                    swarm_samples: 0.0,
                    group: 1,
                    alone_because,
                    alone_epochs: 0,
                    held_back,
                    loss,
                    lr: 0.0,
                    grad_norm: optim::global_norm(&grad, 1),
                    skipped: true,
                    non_finite: false,
                    rolled_back: None,
                    state_averaged: false,
                    averaging: started.elapsed(),
                    traffic,
                },
                state,
                guard,
                scratch: grad,
                residual,
            });
        }
        // The step is a few hundred milliseconds of arithmetic: off the async workers. A
        // spiking gradient rolls back to the guard's good state instead.
        let (state_back, grad_back, guard_back, rolled_back, result) =
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
                    } if guard.restore(&mut state) => {
                        tracing::warn!(
                            "epoch {epoch}: the averaged gradient's norm {norm:.3e} is {ratio:.0}× \
                             the recent median: back to the state of epoch {to}"
                        );
                        state.optimizer.set_steps(epoch + 1);
                        let info = optim::StepInfo {
                            step: epoch + 1,
                            lr: 0.0,
                            grad_norm: norm,
                        };
                        return (state, grad, guard, Some(to), Ok(info));
                    }
                    _ => state.optimizer.step(&mut state.params, &mut grad),
                };
                (state, grad, guard, None, result)
            })
            .await?;
        (state, grad, guard) = (state_back, grad_back, guard_back);
        let (info, skipped) = match result {
            Ok(info) => (info, false),
            Err(optim::Error::NonFinite { norm }) => {
                tracing::warn!("epoch {epoch}: the averaged gradient is not finite, step skipped");
                state.optimizer.set_steps(epoch + 1);
                let info = optim::StepInfo {
                    step: epoch + 1,
                    lr: 0.0,
                    grad_norm: norm,
                };
                (info, true)
            }
            Err(e) => return Err(e.into()),
        };
        let boundary = (epoch + 1).is_multiple_of(if state_every > 0 { state_every } else { 10 });
        let mut state_averaged = false;
        if let Some((group, me)) = &averaged
            && state_every > 0
            && boundary
        {
            let TrainState {
                params, optimizer, ..
            } = &mut state;
            // The state travels exactly: a lossy codec's rounding of the parameters every few
            // epochs would erase the small steps between.
            let exact = butterfly::Settings {
                plan: CodecPlan::uniform(Codec::None),
                ..averaging.clone()
            };
            state_averaged = average_state(
                &net,
                epoch,
                (group, *me),
                &exact,
                params,
                optimizer,
                &mut traffic,
            )
            .await
            .inspect_err(|e| tracing::warn!("epoch {epoch}: averaging the state failed: {e}"))
            .unwrap_or(false);
        }
        state.samples += swarm_samples.max(0.0) as u64;
        // The state every few epochs is the one to go back to (the same on every peer once
        // the parameters were averaged).
        let keep = boundary && !skipped && rolled_back.is_none();
        Ok(Stepped {
            state,
            guard,
            keep,
            scratch: grad,
            residual,
            report: EpochReport {
                epoch: info.step,
                samples,
                swarm_samples,
                group: group_size,
                alone_because,
                alone_epochs: 0,
                held_back,
                loss,
                lr: info.lr,
                grad_norm: info.grad_norm,
                skipped,
                non_finite: skipped,
                rolled_back,
                state_averaged,
                averaging: started.elapsed(),
                traffic,
            },
        })
    }
}

/// Averages the parameters, then the optimizer's moments (as `f32`, decoded and quantized
/// again where the state is 8-bit), with the same group in two more rounds of the all-reduce,
/// every member weighing the same: peers that ever stepped alone, or whose 8-bit moments
/// rounded apart, hold one state again. Returns whether both rounds completed in full (a part
/// that failed keeps this peer's own values there). Moments that come back non-finite are not
/// installed.
async fn average_state(
    net: &Net,
    epoch: u64,
    (group, me): (&Group, usize),
    averaging: &butterfly::Settings,
    params: &mut [f32],
    optimizer: &mut Optimizer,
    traffic: &mut Traffic,
) -> Result<bool, String> {
    let mut round = group.clone();
    round.round[31] ^= 0x5a;
    let report = butterfly::all_reduce(&net.inbox, &round, me, 1.0, params, averaging)
        .await
        .map_err(|e| format!("the parameters: {e}"))?;
    *traffic += Traffic::of(&report);
    tell_disputes(net, epoch, "parameters", &report.disputes);
    let params_done = report.complete();
    let mut moments = optimizer.moments_f32();
    round.round[31] ^= 0xff;
    let round = Group::new(round.round, group.members.clone(), moments.len())
        .map_err(|e| format!("the moments' group: {e}"))?;
    let report = butterfly::all_reduce(&net.inbox, &round, me, 1.0, &mut moments, averaging)
        .await
        .map_err(|e| format!("the moments: {e}"))?;
    *traffic += Traffic::of(&report);
    tell_disputes(net, epoch, "moments", &report.disputes);
    optimizer
        .set_moments_f32(&moments)
        .map_err(|e| format!("the averaged moments: {e}"))?;
    Ok(params_done && report.complete())
}

/// Warns of every part of `what` two reducers returned differently, and names the reducer
/// that lied where that is known: shown by the round ([`butterfly::Dispute::liar`]), or by
/// the disputes of the last rounds ([`crate::reports::Suspects::disputed`]).
fn tell_disputes(net: &Net, epoch: u64, what: &str, disputes: &[butterfly::Dispute]) {
    for d in disputes {
        let [a, b] = d.reducers;
        let (start, end) = (d.range.start, d.range.end);
        if !d.same_inputs {
            tracing::warn!(
                "epoch {epoch}: reducers {a} and {b} averaged {what} values {start}..{end} from \
                 different senders or weights: the part is not taken"
            );
            continue;
        }
        tracing::warn!(
            "epoch {epoch}: reducers {a} and {b} returned {what} values {start}..{end} {:.3e} \
             apart for the same contributions: one of them lied; {}",
            d.distance,
            match d.liar {
                Some(liar) =>
                    format!("{liar} did (in disputes with two others), the other's taken"),
                None => "the part is not taken".into(),
            }
        );
        let liar = match d.liar {
            Some(liar) => {
                net.suspects
                    .name(liar, crate::reports::DISHONEST_REDUCER.into());
                Some(liar)
            }
            None => net.suspects.disputed(d.reducers, net.dht.peer_id()),
        };
        if let Some(liar) = liar {
            tracing::warn!("epoch {epoch}: {liar} reported as a dishonest reducer");
        }
    }
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;
    use potluck_allreduce::balance::Mode;
    use potluck_allreduce::butterfly::Member;
    use potluck_core::{Layout, Role};
    use potluck_net::dht::{self, Dht};

    use super::*;
    use crate::optim::{Config, Precision};

    /// Two peers whose parameters and moments went apart (as after stepping alone) hold their
    /// means after one state averaging, in either precision of the optimizer's state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn state_averaging_brings_parameters_and_moments_to_their_mean() {
        const N: usize = 10_000;
        let layout = Layout::new([("w", vec![N], Role::Weight)]).unwrap();
        let boot = Dht::start_memory_with(
            Keypair::generate_ed25519(),
            dht::Config::default(),
            crate::records::validators(),
        )
        .await
        .unwrap();
        let boot = boot.addrs().await.unwrap();
        let nets = [
            Net::start_memory(&boot).await.unwrap(),
            Net::start_memory(&boot).await.unwrap(),
        ];
        let mut members = Vec::new();
        for net in &nets {
            members.push(Member {
                peer: net.dht.peer_id(),
                addrs: net.dht.addrs().await.unwrap(),
                mode: Mode::Full,
                rate: 1e8,
                max_weight: f64::INFINITY,
            });
        }
        for (k, precision) in [Precision::F32, Precision::Blockwise8]
            .into_iter()
            .enumerate()
        {
            let group = Group::new([k as u8; 32], members.clone(), N).unwrap();
            // Each peer steps alone on its own gradients a different number of times.
            let peers: Vec<(Vec<f32>, Optimizer)> = (0..2)
                .map(|i| {
                    let cfg = Config {
                        precision,
                        ..Config::reference_lamb()
                    };
                    let mut opt = Optimizer::new(cfg, &layout).with_threads(1);
                    let mut params: Vec<f32> = (0..N).map(|j| (j % 7) as f32 * 0.1).collect();
                    for s in 0..=i {
                        let mut grad: Vec<f32> = (0..N)
                            .map(|j| ((j * (s + 3) + 11 * i) % 13) as f32 * 0.01 - 0.05)
                            .collect();
                        opt.step(&mut params, &mut grad).unwrap();
                    }
                    (params, opt)
                })
                .collect();
            let mean = |a: &[f32], b: &[f32]| -> Vec<f32> {
                a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect()
            };
            let want_params = mean(&peers[0].0, &peers[1].0);
            let want_moments = mean(&peers[0].1.moments_f32(), &peers[1].1.moments_f32());
            assert!(peers[0].1.moments_f32() != peers[1].1.moments_f32());
            let tasks: Vec<_> = peers
                .into_iter()
                .enumerate()
                .map(|(me, (mut params, mut opt))| {
                    let (net, group) = (nets[me].clone(), group.clone());
                    tokio::spawn(async move {
                        let settings = butterfly::Settings::default();
                        let mut traffic = Traffic::default();
                        let done = average_state(
                            &net,
                            0,
                            (&group, me),
                            &settings,
                            &mut params,
                            &mut opt,
                            &mut traffic,
                        )
                        .await;
                        // Both rounds moved the state's values (f32: 4 bytes each).
                        assert!(traffic.sent > 0 && traffic.received > 0, "{traffic:?}");
                        (done, params, opt)
                    })
                })
                .collect();
            let mut results = Vec::new();
            for t in tasks {
                results.push(t.await.unwrap());
            }
            for (done, params, opt) in &results {
                assert_eq!(done, &Ok(true), "{precision:?}");
                assert_eq!(params, &want_params, "{precision:?}");
                let tolerance = match precision {
                    Precision::F32 => 0.0,
                    // Quantized again after averaging: within a block's resolution.
                    Precision::Blockwise8 => 0.02,
                };
                for (got, want) in opt.moments_f32().iter().zip(&want_moments) {
                    assert!(
                        (got - want).abs() <= tolerance * want.abs().max(1e-4),
                        "{precision:?}: {got} vs {want}"
                    );
                }
            }
            // Both hold the very same state afterwards.
            assert_eq!(
                results[0].2.moments(),
                results[1].2.moments(),
                "{precision:?}"
            );
        }
    }
}
