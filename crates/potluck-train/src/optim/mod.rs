//! Inner optimizers on flat buffers: AdamW and LAMB, with their moments in `f32` or in 8-bit
//! blockwise form, a linear warm-up then linear decay, and global-norm gradient clipping. They
//! run in Rust on the CPU (as the reference run offloaded its optimizer), split across threads
//! by blocks of 4,096 values.
//!
//! Both compute, per value, the Adam direction `u = m̂ / (√v̂ + ε) + λ·p` (λ only where the
//! layout's role decays: weights and embeddings, not norms and biases; `m̂`, `v̂` bias-corrected
//! when asked). AdamW steps `p ← p − lr·u`; LAMB scales each tensor's step by its trust ratio
//! `min(‖p‖, clamp) / ‖u‖` (1 where either norm is 0).

mod quant;
mod schedule;

use std::ops::Range;

use potluck_core::Layout;
use serde::{Deserialize, Serialize};

pub use quant::{BLOCK, Map};
pub use schedule::Schedule;

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    AdamW,
    Lamb,
}

/// How the moments are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 8 bytes per parameter.
    F32,
    /// About 2 bytes per parameter: 8-bit codes and an `f32` scale per 4,096 values.
    Blockwise8,
}

/// An optimizer's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub rule: Rule,
    pub precision: Precision,
    /// Learning rate schedule (peak rate, warm-up, decay).
    pub schedule: Schedule,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
    /// Divide the moments by `1 − βᵗ`.
    pub bias_correction: bool,
    /// LAMB: the parameter norm in the trust ratio is clamped to at most this.
    pub clamp: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
}

impl Config {
    /// The reference run's LAMB: lr 0.0025, betas 0.9/0.96, ε 1e-6, weight decay 0.045, clip
    /// 4.0, warm-up 3,125 and decay to 31,250 steps, 8-bit state.
    pub fn reference_lamb() -> Config {
        Config {
            rule: Rule::Lamb,
            precision: Precision::Blockwise8,
            schedule: Schedule {
                peak: 0.0025,
                warmup: 3125,
                total: 31_250,
            },
            beta1: 0.9,
            beta2: 0.96,
            eps: 1e-6,
            weight_decay: 0.045,
            bias_correction: true,
            clamp: 10.0,
            max_grad_norm: 4.0,
        }
    }
}

/// Why a step was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("buffers of {params} parameters and {grad} gradients for a layout of {numel}")]
    Length {
        params: usize,
        grad: usize,
        numel: usize,
    },
    /// The gradient holds NaN or infinity: nothing was changed.
    #[error("the gradient is not finite (norm {norm}); parameters left unchanged")]
    NonFinite { norm: f64 },
    #[error("optimizer state of {got} values does not fit a layout of {want}")]
    State { got: usize, want: usize },
    #[error("optimizer state kept as {got:?}, this optimizer keeps {want:?}")]
    Precision { got: Precision, want: Precision },
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// The step number just taken (1-based).
    pub step: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// A stretch of one tensor, at most a block long: the unit of work and of quantization.
#[derive(Debug, Clone)]
struct Unit {
    entry: usize,
    range: Range<usize>,
    decay: bool,
}

/// The moments.
#[derive(Debug, Clone, PartialEq)]
pub enum Moments {
    F32 {
        m: Vec<f32>,
        v: Vec<f32>,
    },
    Blockwise8 {
        m: Vec<u8>,
        m_scale: Vec<f32>,
        v: Vec<u8>,
        v_scale: Vec<f32>,
    },
}

impl Moments {
    /// Bytes the moments take.
    pub fn bytes(&self) -> usize {
        match self {
            Moments::F32 { m, v } => 4 * (m.len() + v.len()),
            Moments::Blockwise8 {
                m,
                m_scale,
                v,
                v_scale,
            } => m.len() + v.len() + 4 * (m_scale.len() + v_scale.len()),
        }
    }
}

/// An optimizer with its state, for one layout.
#[derive(Debug, Clone)]
pub struct Optimizer {
    cfg: Config,
    units: Vec<Unit>,
    entries: usize,
    numel: usize,
    step: u64,
    moments: Moments,
    threads: usize,
}

/// Constants of one step.
#[derive(Debug, Clone, Copy)]
struct Step {
    b1: f32,
    b2: f32,
    eps: f32,
    wd: f32,
    c1: f32,
    c2: f32,
    /// Multiplies the gradient (clipping).
    gscale: f32,
    /// Raise v̂ to m̂² where it is below (8-bit state: see `direction`).
    floor_v: bool,
}

impl Step {
    /// Updates the moments of one unit in place.
    #[inline(always)]
    fn moments(&self, m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let (b1, b2, s) = (self.b1, self.b2, self.gscale);
        for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
            let g = g * s;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
        }
    }

    /// Writes the direction `u` into `out` (which held the gradient) and returns (Σu², Σp²).
    /// The sums run in eight lanes so the loop vectorises (a single running sum would pin the
    /// order of additions and keep it scalar).
    #[inline(always)]
    fn direction(
        &self,
        m: &[f32],
        v: &[f32],
        p: &[f32],
        out: &mut [f32],
        decay: bool,
    ) -> (f64, f64) {
        const LANES: usize = 8;
        let (ic1, ic2, eps) = (1.0 / self.c1, 1.0 / self.c2, self.eps);
        let wd = if decay { self.wd } else { 0.0 };
        let n = out.len().min(m.len()).min(v.len()).min(p.len());
        let (m, v, p, out) = (&m[..n], &v[..n], &p[..n], &mut out[..n]);
        let mut uu = [0.0f32; LANES];
        let mut pp = [0.0f32; LANES];
        let whole = n / LANES * LANES;
        let lanes = m[..whole]
            .chunks_exact(LANES)
            .zip(v[..whole].chunks_exact(LANES))
            .zip(p[..whole].chunks_exact(LANES))
            .zip(out[..whole].chunks_exact_mut(LANES));
        // With 8-bit state a small second moment can round to 0 while its first moment does
        // not, and m̂/(√0 + ε) would be a huge outlier that dominates LAMB's trust ratio. Since
        // v̂ ≥ m̂² holds for the exact moments (the mean square bounds the squared mean), the
        // stored v̂ is raised to m̂² where rounding took it below.
        let floor = self.floor_v;
        let dir = |m: f32, v: f32, p: f32| {
            let mh = m * ic1;
            let vh = v * ic2;
            let vh = if floor && mh * mh > vh { mh * mh } else { vh };
            mh / (vh.sqrt() + eps) + wd * p
        };
        for (((m, v), p), out) in lanes {
            for i in 0..LANES {
                let u = dir(m[i], v[i], p[i]);
                out[i] = u;
                uu[i] += u * u;
                pp[i] += p[i] * p[i];
            }
        }
        for i in whole..n {
            let u = dir(m[i], v[i], p[i]);
            out[i] = u;
            uu[0] += u * u;
            pp[0] += p[i] * p[i];
        }
        let sum = |a: [f32; LANES]| a.iter().map(|&x| f64::from(x)).sum::<f64>();
        (sum(uu), sum(pp))
    }
}

/// `p −= scale · u`.
#[inline(always)]
fn descend(p: &mut [f32], u: &[f32], scale: f32) {
    for (p, &u) in p.iter_mut().zip(u) {
        *p -= scale * u;
    }
}

/// Splits `s` into consecutive pieces ending at `ends` (relative to the start of `s`).
fn split_at_ends<'a, T>(mut s: &'a mut [T], starts_at: usize, ends: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(ends.len());
    let mut at = starts_at;
    for &end in ends {
        let (head, tail) = s.split_at_mut(end - at);
        out.push(head);
        s = tail;
        at = end;
    }
    out
}

impl Optimizer {
    /// A fresh optimizer (zero moments, step 0) for `layout`.
    pub fn new(cfg: Config, layout: &Layout) -> Optimizer {
        let mut units = Vec::new();
        for (i, entry) in layout.entries().iter().enumerate() {
            let r = entry.range();
            let mut start = r.start;
            while start < r.end {
                let end = (start + BLOCK).min(r.end);
                units.push(Unit {
                    entry: i,
                    range: start..end,
                    decay: entry.role.decays(),
                });
                start = end;
            }
        }
        let n = layout.numel();
        let moments = match cfg.precision {
            Precision::F32 => Moments::F32 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            },
            Precision::Blockwise8 => Moments::Blockwise8 {
                m: vec![0; n],
                m_scale: vec![0.0; units.len()],
                v: vec![0; n],
                v_scale: vec![0.0; units.len()],
            },
        };
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(16);
        Optimizer {
            cfg,
            units,
            entries: layout.entries().len(),
            numel: n,
            step: 0,
            moments,
            threads,
        }
    }

    /// Runs on at most `threads` threads.
    pub fn with_threads(mut self, threads: usize) -> Optimizer {
        self.threads = threads.max(1);
        self
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Values it steps (the layout's length).
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The moments (for checkpoints).
    pub fn moments(&self) -> &Moments {
        &self.moments
    }

    /// Restores moments and the step count (from a checkpoint).
    pub fn restore(&mut self, moments: Moments, step: u64) -> Result<(), Error> {
        let ok = match (&moments, self.cfg.precision) {
            (Moments::F32 { m, v }, Precision::F32) => {
                m.len() == self.numel && v.len() == self.numel
            }
            (
                Moments::Blockwise8 {
                    m,
                    m_scale,
                    v,
                    v_scale,
                },
                Precision::Blockwise8,
            ) => {
                m.len() == self.numel
                    && v.len() == self.numel
                    && m_scale.len() == self.units.len()
                    && v_scale.len() == self.units.len()
            }
            _ => false,
        };
        if !ok {
            let got = match &moments {
                Moments::F32 { m, .. } => m.len(),
                Moments::Blockwise8 { m, .. } => m.len(),
            };
            return Err(Error::State {
                got,
                want: self.numel,
            });
        }
        self.moments = moments;
        self.step = step;
        Ok(())
    }

    /// The moments as one `f32` buffer, the first moments then the second (`2 × numel`
    /// values, decoded where the state is 8-bit): what peers average with their parameters.
    pub fn moments_f32(&self) -> Vec<f32> {
        let n = self.numel;
        let mut out = vec![0f32; 2 * n];
        match &self.moments {
            Moments::F32 { m, v } => {
                out[..n].copy_from_slice(m);
                out[n..].copy_from_slice(v);
            }
            Moments::Blockwise8 {
                m,
                m_scale,
                v,
                v_scale,
            } => {
                let (om, ov) = out.split_at_mut(n);
                for (j, u) in self.units.iter().enumerate() {
                    let r = u.range.clone();
                    Map::signed().dequantize(&m[r.clone()], m_scale[j], &mut om[r.clone()]);
                    Map::unsigned().dequantize(&v[r.clone()], v_scale[j], &mut ov[r]);
                }
            }
        }
        out
    }

    /// Replaces the moments with `values`, laid out as [`Optimizer::moments_f32`] gives them
    /// (quantized again where the state is 8-bit). Non-finite values, or negative second
    /// moments, are refused: the moments stay as they were.
    pub fn set_moments_f32(&mut self, values: &[f32]) -> Result<(), Error> {
        let n = self.numel;
        if values.len() != 2 * n {
            return Err(Error::State {
                got: values.len() / 2,
                want: n,
            });
        }
        let (vm, vv) = values.split_at(n);
        if !vm.iter().all(|x| x.is_finite()) || !vv.iter().all(|x| x.is_finite() && *x >= 0.0) {
            return Err(Error::NonFinite { norm: f64::NAN });
        }
        match &mut self.moments {
            Moments::F32 { m, v } => {
                m.copy_from_slice(vm);
                v.copy_from_slice(vv);
            }
            Moments::Blockwise8 {
                m,
                m_scale,
                v,
                v_scale,
            } => {
                let mut block = vec![0f32; BLOCK];
                for (j, u) in self.units.iter().enumerate() {
                    let r = u.range.clone();
                    let b = &mut block[..r.len()];
                    b.copy_from_slice(&vm[r.clone()]);
                    m_scale[j] = Map::signed().quantize(b, &mut m[r.clone()]);
                    b.copy_from_slice(&vv[r.clone()]);
                    v_scale[j] = Map::unsigned().quantize(b, &mut v[r]);
                }
            }
        }
        Ok(())
    }

    /// Replaces the learning-rate schedule (e.g. once the length of a timed run is known).
    pub fn set_schedule(&mut self, schedule: Schedule) {
        self.cfg.schedule = schedule;
    }

    /// Takes another optimizer's settings (a run's, when joining it); the moments' precision
    /// must be this one's.
    pub fn adopt(&mut self, cfg: Config) -> Result<(), Error> {
        if cfg.precision != self.cfg.precision {
            return Err(Error::Precision {
                got: cfg.precision,
                want: self.cfg.precision,
            });
        }
        self.cfg = cfg;
        Ok(())
    }

    /// Sets the step count (e.g. to the global epoch after joining a run).
    pub fn set_steps(&mut self, step: u64) {
        self.step = step;
    }

    /// Consecutive groups of units of about equal size, one per thread.
    fn groups(&self) -> Vec<Range<usize>> {
        let per = self.numel.div_ceil(self.threads).max(1);
        let mut groups = Vec::new();
        let mut start = 0;
        let mut size = 0;
        for (i, u) in self.units.iter().enumerate() {
            size += u.range.len();
            if size >= per {
                groups.push(start..i + 1);
                start = i + 1;
                size = 0;
            }
        }
        if start < self.units.len() {
            groups.push(start..self.units.len());
        }
        groups
    }

    /// One step with the averaged gradient `grad`: updates `params` in place. `grad` is used
    /// as scratch: afterwards it holds the step's direction, not the gradient.
    pub fn step(&mut self, params: &mut [f32], grad: &mut [f32]) -> Result<StepInfo, Error> {
        self.step_scaled(params, grad, 1.0)
    }

    /// [`Optimizer::step`] with the gradient `scale · grad` (a sum of gradients and
    /// `1 / samples`, say), without a pass over the buffer to scale it first.
    pub fn step_scaled(
        &mut self,
        params: &mut [f32],
        grad: &mut [f32],
        scale: f64,
    ) -> Result<StepInfo, Error> {
        if params.len() != self.numel || grad.len() != self.numel {
            return Err(Error::Length {
                params: params.len(),
                grad: grad.len(),
                numel: self.numel,
            });
        }
        let grad_norm = global_norm(grad, self.threads) * scale.abs();
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite { norm: grad_norm });
        }
        let t = self.step + 1;
        let cfg = self.cfg;
        let lr = cfg.schedule.lr(self.step);
        // As PyTorch's clip_grad_norm_: max / (norm + 1e-6), never above 1.
        let clip = if cfg.max_grad_norm > 0.0 {
            (cfg.max_grad_norm / (grad_norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let gscale = clip * scale;
        let (c1, c2) = if cfg.bias_correction {
            (
                1.0 - cfg.beta1.powf(t as f64),
                1.0 - cfg.beta2.powf(t as f64),
            )
        } else {
            (1.0, 1.0)
        };
        let k = Step {
            b1: cfg.beta1 as f32,
            b2: cfg.beta2 as f32,
            eps: cfg.eps as f32,
            wd: cfg.weight_decay as f32,
            c1: c1 as f32,
            c2: c2 as f32,
            gscale: gscale as f32,
            floor_v: cfg.precision == Precision::Blockwise8,
        };
        let groups = self.groups();
        match cfg.rule {
            Rule::AdamW => {
                self.update(&groups, params, grad, &k, Some(lr as f32));
            }
            Rule::Lamb => {
                let sums = self.update(&groups, params, grad, &k, None);
                let ratios: Vec<f32> = sums
                    .iter()
                    .map(|&(uu, pp)| {
                        let (u, p) = (uu.sqrt(), pp.sqrt().min(cfg.clamp));
                        if u > 0.0 && p > 0.0 {
                            (p / u) as f32
                        } else {
                            1.0
                        }
                    })
                    .collect();
                self.descend_scaled(&groups, params, grad, lr as f32, &ratios);
            }
        }
        self.step = t;
        Ok(StepInfo {
            step: t,
            lr,
            grad_norm,
        })
    }

    /// Updates the moments of every unit and writes its direction into `grad`; with `lr`
    /// (AdamW) also steps. Returns per-tensor (Σu², Σp²).
    fn update(
        &mut self,
        groups: &[Range<usize>],
        params: &mut [f32],
        grad: &mut [f32],
        k: &Step,
        lr: Option<f32>,
    ) -> Vec<(f64, f64)> {
        let units = &self.units;
        let flat_ends: Vec<usize> = groups.iter().map(|g| units[g.end - 1].range.end).collect();
        let unit_ends: Vec<usize> = groups.iter().map(|g| g.end).collect();
        let param_parts = split_at_ends(params, 0, &flat_ends);
        let grad_parts = split_at_ends(grad, 0, &flat_ends);
        let partials: Vec<Vec<(usize, f64, f64)>> = match &mut self.moments {
            Moments::F32 { m, v } => {
                let m_parts = split_at_ends(m, 0, &flat_ends);
                let v_parts = split_at_ends(v, 0, &flat_ends);
                std::thread::scope(|s| {
                    let handles: Vec<_> = groups
                        .iter()
                        .zip(param_parts.into_iter().zip(grad_parts))
                        .zip(m_parts.into_iter().zip(v_parts))
                        .map(|((group, (p, g)), (m, v))| {
                            let part = F32Part {
                                units: &units[group.clone()],
                                m,
                                v,
                                p,
                                g,
                            };
                            s.spawn(move || kernels::f32_part(k, part, lr))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or_default())
                        .collect()
                })
            }
            Moments::Blockwise8 {
                m,
                m_scale,
                v,
                v_scale,
            } => {
                let m_parts = split_at_ends(m, 0, &flat_ends);
                let v_parts = split_at_ends(v, 0, &flat_ends);
                let ms_parts = split_at_ends(m_scale, 0, &unit_ends);
                let vs_parts = split_at_ends(v_scale, 0, &unit_ends);
                std::thread::scope(|s| {
                    let handles: Vec<_> = groups
                        .iter()
                        .zip(param_parts.into_iter().zip(grad_parts))
                        .zip(m_parts.into_iter().zip(v_parts))
                        .zip(ms_parts.into_iter().zip(vs_parts))
                        .map(|(((group, (p, g)), (mq, vq)), (ms, vs))| {
                            let part = Q8Part {
                                units: &units[group.clone()],
                                mq,
                                vq,
                                ms,
                                vs,
                                p,
                                g,
                            };
                            s.spawn(move || kernels::q8_part(k, part, lr))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or_default())
                        .collect()
                })
            }
        };
        let mut results = vec![(0.0f64, 0.0f64); self.entries];
        for (entry, uu, pp) in partials.into_iter().flatten() {
            results[entry].0 += uu;
            results[entry].1 += pp;
        }
        results
    }

    /// LAMB's second pass: `p −= lr · ratio(tensor) · u` with the directions in `grad`.
    fn descend_scaled(
        &self,
        groups: &[Range<usize>],
        params: &mut [f32],
        grad: &[f32],
        lr: f32,
        ratios: &[f32],
    ) {
        let units = &self.units;
        let flat_ends: Vec<usize> = groups.iter().map(|g| units[g.end - 1].range.end).collect();
        let param_parts = split_at_ends(params, 0, &flat_ends);
        std::thread::scope(|s| {
            for (group, p) in groups.iter().zip(param_parts) {
                let units = &units[group.clone()];
                let g = &grad[units[0].range.start..units[units.len() - 1].range.end];
                s.spawn(move || kernels::descend_part(units, p, g, lr, ratios));
            }
        });
    }
}

/// One thread's share with `f32` moments: slices start at the first unit's offset.
struct F32Part<'a> {
    units: &'a [Unit],
    m: &'a mut [f32],
    v: &'a mut [f32],
    p: &'a mut [f32],
    g: &'a mut [f32],
}

/// One thread's share with 8-bit moments; `ms`/`vs` hold one scale per unit.
struct Q8Part<'a> {
    units: &'a [Unit],
    mq: &'a mut [u8],
    vq: &'a mut [u8],
    ms: &'a mut [f32],
    vs: &'a mut [f32],
    p: &'a mut [f32],
    g: &'a mut [f32],
}

/// The per-thread loops, compiled twice: for the baseline x86-64 instruction set and, chosen at
/// run time where the processor has them, for AVX2 + FMA (wider vectors for every loop).
mod kernels {
    use super::{BLOCK, F32Part, Map, Q8Part, Step, Unit, descend};

    type Sums = Vec<(usize, f64, f64)>;

    #[inline(always)]
    fn f32_body(k: &Step, part: F32Part<'_>, lr: Option<f32>) -> Sums {
        let base = part.units.first().map_or(0, |u| u.range.start);
        let mut out = Vec::with_capacity(part.units.len());
        for u in part.units {
            let r = (u.range.start - base)..(u.range.end - base);
            let (m, v) = (&mut part.m[r.clone()], &mut part.v[r.clone()]);
            let (p, g) = (&mut part.p[r.clone()], &mut part.g[r]);
            k.moments(m, v, g);
            out.push(finish(k, u, m, v, p, g, lr));
        }
        out
    }

    /// The direction of a unit whose moments are updated (written into `g`), and with `lr`
    /// the step along it.
    #[inline(always)]
    fn finish(
        k: &Step,
        u: &Unit,
        m: &[f32],
        v: &[f32],
        p: &mut [f32],
        g: &mut [f32],
        lr: Option<f32>,
    ) -> (usize, f64, f64) {
        let (uu, pp) = k.direction(m, v, p, g, u.decay);
        if let Some(lr) = lr {
            descend(p, g, lr);
        }
        (u.entry, uu, pp)
    }

    #[inline(always)]
    fn q8_body(k: &Step, part: Q8Part<'_>, lr: Option<f32>) -> Sums {
        let base = part.units.first().map_or(0, |u| u.range.start);
        let mut m = vec![0f32; BLOCK];
        let mut v = vec![0f32; BLOCK];
        let mut out = Vec::with_capacity(part.units.len());
        for (j, u) in part.units.iter().enumerate() {
            let r = (u.range.start - base)..(u.range.end - base);
            let n = r.len();
            let (mq, vq) = (&mut part.mq[r.clone()], &mut part.vq[r.clone()]);
            let (p, g) = (&mut part.p[r.clone()], &mut part.g[r]);
            let (m, v) = (&mut m[..n], &mut v[..n]);
            Map::signed().dequantize(mq, part.ms[j], m);
            Map::unsigned().dequantize(vq, part.vs[j], v);
            k.moments(m, v, g);
            // Leaves m and v as stored: the step uses the stored state.
            part.ms[j] = Map::signed().quantize(m, mq);
            part.vs[j] = Map::unsigned().quantize(v, vq);
            out.push(finish(k, u, m, v, p, g, lr));
        }
        out
    }

    #[inline(always)]
    fn descend_body(units: &[Unit], p: &mut [f32], g: &[f32], lr: f32, ratios: &[f32]) {
        let base = units.first().map_or(0, |u| u.range.start);
        for u in units {
            let r = (u.range.start - base)..(u.range.end - base);
            descend(&mut p[r.clone()], &g[r], lr * ratios[u.entry]);
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn wide() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn f32_avx2(k: &Step, part: F32Part<'_>, lr: Option<f32>) -> Sums {
        f32_body(k, part, lr)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn q8_avx2(k: &Step, part: Q8Part<'_>, lr: Option<f32>) -> Sums {
        q8_body(k, part, lr)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn descend_avx2(units: &[Unit], p: &mut [f32], g: &[f32], lr: f32, ratios: &[f32]) {
        descend_body(units, p, g, lr, ratios)
    }

    pub(super) fn f32_part(k: &Step, part: F32Part<'_>, lr: Option<f32>) -> Sums {
        #[cfg(target_arch = "x86_64")]
        if wide() {
            // SAFETY: the processor has AVX2 and FMA (checked just above).
            return unsafe { f32_avx2(k, part, lr) };
        }
        f32_body(k, part, lr)
    }

    pub(super) fn q8_part(k: &Step, part: Q8Part<'_>, lr: Option<f32>) -> Sums {
        #[cfg(target_arch = "x86_64")]
        if wide() {
            // SAFETY: the processor has AVX2 and FMA (checked just above).
            return unsafe { q8_avx2(k, part, lr) };
        }
        q8_body(k, part, lr)
    }

    pub(super) fn descend_part(units: &[Unit], p: &mut [f32], g: &[f32], lr: f32, ratios: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if wide() {
            // SAFETY: the processor has AVX2 and FMA (checked just above).
            return unsafe { descend_avx2(units, p, g, lr, ratios) };
        }
        descend_body(units, p, g, lr, ratios)
    }
}

/// The L2 norm of `values`, summed in `f64` per thread.
pub fn global_norm(values: &[f32], threads: usize) -> f64 {
    let chunk = values.len().div_ceil(threads.max(1)).max(1);
    let sums: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = values
            .chunks(chunk)
            .map(|c| {
                s.spawn(move || {
                    // f32 partial sums over short runs keep the loop vectorised.
                    c.chunks(1024)
                        .map(|r| f64::from(r.iter().map(|x| x * x).sum::<f32>()))
                        .sum::<f64>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(f64::NAN))
            .collect()
    });
    sums.iter().sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_core::Role;

    // Reference values from PyTorch 2.13 (float64), produced by this script:
    //
    // import math, torch
    // torch.set_default_dtype(torch.float64)
    // def problem():
    //     w = torch.tensor([math.sin(0.7 * i) for i in range(6)]).reshape(2, 3)
    //     b = torch.tensor([0.1 * i - 0.2 for i in range(4)])
    //     return w, b
    // def grads(s):
    //     gw = torch.tensor([math.cos(0.37 * i + s) for i in range(6)]).reshape(2, 3)
    //     gb = torch.tensor([math.sin(1.3 * i - s) * 2.0 for i in range(4)])
    //     return gw, gb
    // def schedule(step, peak=0.1, warmup=2, total=10):
    //     if step < warmup: return peak * (step + 1) / warmup
    //     return peak * max(0.0, (total - step) / (total - warmup))
    // def run(rule, clip):
    //     w, b = problem(); w.requires_grad_(); b.requires_grad_()
    //     if rule == "adamw":
    //         opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
    //                                 lr=0.1, betas=(0.9, 0.96), eps=1e-6)
    //     m = {id(w): torch.zeros_like(w), id(b): torch.zeros_like(b)}
    //     v = {id(w): torch.zeros_like(w), id(b): torch.zeros_like(b)}
    //     for s in range(3):
    //         lr = schedule(s)
    //         gw, gb = grads(s); w.grad = gw.clone(); b.grad = gb.clone()
    //         if clip: torch.nn.utils.clip_grad_norm_([w, b], max_norm=clip)
    //         if rule == "adamw":
    //             for g in opt.param_groups: g["lr"] = lr
    //             opt.step()
    //         else:
    //             t = s + 1; c1 = 1 - 0.9 ** t; c2 = 1 - 0.96 ** t
    //             with torch.no_grad():
    //                 for p, wd in ((w, 0.1), (b, 0.0)):
    //                     m[id(p)].mul_(0.9).add_(p.grad, alpha=0.1)
    //                     v[id(p)].mul_(0.96).addcmul_(p.grad, p.grad, value=0.04)
    //                     u = (m[id(p)] / c1) / ((v[id(p)] / c2).sqrt() + 1e-6) + wd * p
    //                     pn = p.norm().clamp(max=0.5); un = u.norm()
    //                     ratio = (pn / un).item() if pn > 0 and un > 0 else 1.0
    //                     p.sub_(lr * ratio * u)
    //     return torch.cat([w.detach().flatten(), b.detach()]).tolist()
    // for rule in ("adamw", "lamb"):
    //     for clip in (0.0, 1.0):
    //         print(rule, clip, [round(x, 7) for x in run(rule, clip)])
    //
    // Output (rule, clip, w then b after three steps):
    const ADAMW: [f64; 10] = [
        -0.1899215, 0.4864778, 0.8885722, 0.8626735, 0.423609, -0.1111914, -0.0412629, -0.258253,
        -0.2418082, 0.1569686,
    ];
    const ADAMW_CLIP: [f64; 10] = [
        -0.1946084, 0.4786289, 0.881523, 0.8592963, 0.4231026, -0.1119076, -0.0415709, -0.265575,
        -0.2402454, 0.1634325,
    ];
    const LAMB: [f64; 10] = [
        -0.0521678, 0.6033091, 0.9639966, 0.8708904, 0.3692923, -0.2813873, -0.1719704, -0.1252582,
        -0.0407551, 0.1073853,
    ];
    const LAMB_CLIP: [f64; 10] = [
        -0.0537539, 0.6005864, 0.9615332, 0.8696874, 0.3690243, -0.2817661, -0.1718747, -0.1266904,
        -0.0406269, 0.1085437,
    ];

    fn layout() -> Layout {
        Layout::new([("w", vec![2, 3], Role::Weight), ("b", vec![4], Role::Bias)]).unwrap()
    }

    fn params() -> Vec<f32> {
        let w = (0..6).map(|i| (0.7 * i as f64).sin() as f32);
        let b = (0..4).map(|i| (0.1 * i as f64 - 0.2) as f32);
        w.chain(b).collect()
    }

    fn grads(s: u64) -> Vec<f32> {
        let s = s as f64;
        let w = (0..6).map(|i| (0.37 * i as f64 + s).cos() as f32);
        let b = (0..4).map(|i| ((1.3 * i as f64 - s).sin() * 2.0) as f32);
        w.chain(b).collect()
    }

    fn config(rule: Rule, precision: Precision, clip: f64) -> Config {
        Config {
            rule,
            precision,
            schedule: Schedule {
                peak: 0.1,
                warmup: 2,
                total: 10,
            },
            beta1: 0.9,
            beta2: 0.96,
            eps: 1e-6,
            weight_decay: 0.1,
            bias_correction: true,
            clamp: 0.5,
            max_grad_norm: clip,
        }
    }

    fn run(cfg: Config, threads: usize) -> Vec<f32> {
        let mut opt = Optimizer::new(cfg, &layout()).with_threads(threads);
        let mut p = params();
        for s in 0..3 {
            opt.step(&mut p, &mut grads(s)).unwrap();
        }
        p
    }

    #[test]
    fn f32_state_matches_pytorch() {
        for (rule, clip, want) in [
            (Rule::AdamW, 0.0, ADAMW),
            (Rule::AdamW, 1.0, ADAMW_CLIP),
            (Rule::Lamb, 0.0, LAMB),
            (Rule::Lamb, 1.0, LAMB_CLIP),
        ] {
            let got = run(config(rule, Precision::F32, clip), 2);
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (f64::from(*g) - w).abs() < 2e-6,
                    "{rule:?} clip {clip}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn moments_come_out_as_f32_and_go_back_unchanged() {
        for precision in [Precision::F32, Precision::Blockwise8] {
            let mut opt = Optimizer::new(config(Rule::Lamb, precision, 0.0), &layout());
            let mut p = params();
            for s in 0..3 {
                opt.step(&mut p, &mut grads(s)).unwrap();
            }
            let flat = opt.moments_f32();
            assert_eq!(flat.len(), 2 * p.len());
            assert!(flat.iter().any(|x| *x != 0.0) && flat[p.len()..].iter().all(|x| *x >= 0.0));
            let before = opt.moments().clone();
            opt.set_moments_f32(&flat).unwrap();
            assert_eq!(opt.moments(), &before, "{precision:?}");
            // The mean of two peers' moments is what both hold after averaging.
            let half: Vec<f32> = flat.iter().map(|x| x / 2.0).collect();
            opt.set_moments_f32(&half).unwrap();
            let got = opt.moments_f32();
            for (g, w) in got.iter().zip(&half) {
                assert!(
                    (g - w).abs() <= 0.02 * w.abs().max(1e-3),
                    "{precision:?}: {g} vs {w}"
                );
            }
            // Bad values are refused and change nothing.
            let kept = opt.moments().clone();
            let mut bad = half.clone();
            bad[0] = f32::NAN;
            assert!(opt.set_moments_f32(&bad).is_err());
            let mut negative = half.clone();
            negative[p.len()] = -1.0;
            assert!(opt.set_moments_f32(&negative).is_err());
            assert!(opt.set_moments_f32(&half[1..]).is_err());
            assert_eq!(opt.moments(), &kept);
        }
    }

    #[test]
    fn eight_bit_state_stays_close_to_f32() {
        for rule in [Rule::AdamW, Rule::Lamb] {
            let a = run(config(rule, Precision::F32, 0.0), 2);
            let b = run(config(rule, Precision::Blockwise8, 0.0), 2);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 0.01, "{rule:?}: {a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn eight_bit_state_stays_close_with_gradients_over_many_decades() {
        // One block whose gradients span 1e-9..1: small second moments round to 0 in 8 bits,
        // which must not turn into outlier steps.
        let layout = Layout::new([("w", vec![BLOCK], Role::Weight)]).unwrap();
        let grad: Vec<f32> = (0..BLOCK)
            .map(|i| 10f32.powi(-((i % 10) as i32)) * if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let run = |precision| {
            let mut opt = Optimizer::new(config(Rule::Lamb, precision, 0.0), &layout);
            let mut p: Vec<f32> = (0..BLOCK).map(|i| ((i as f32) * 0.01).cos()).collect();
            for _ in 0..5 {
                opt.step(&mut p, &mut grad.clone()).unwrap();
            }
            p
        };
        let (a, b) = (run(Precision::F32), run(Precision::Blockwise8));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.01, "largest difference {worst}");
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        // A layout spanning many blocks, so threads really split the work.
        let layout = Layout::new([
            ("a", vec![3 * BLOCK + 17], Role::Weight),
            ("b", vec![100], Role::Bias),
            ("c", vec![2 * BLOCK], Role::Embedding),
        ])
        .unwrap();
        let n = layout.numel();
        let grad: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.013).sin()).collect();
        for precision in [Precision::F32, Precision::Blockwise8] {
            for rule in [Rule::AdamW, Rule::Lamb] {
                let cfg = config(rule, precision, 0.0);
                let mut results = Vec::new();
                for threads in [1, 2, 5] {
                    let mut opt = Optimizer::new(cfg, &layout).with_threads(threads);
                    let mut p: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.007).cos()).collect();
                    for _ in 0..2 {
                        opt.step(&mut p, &mut grad.clone()).unwrap();
                    }
                    results.push(p);
                }
                assert_eq!(results[0], results[1], "{rule:?} {precision:?}");
                assert_eq!(results[0], results[2], "{rule:?} {precision:?}");
            }
        }
    }

    #[test]
    fn a_non_finite_gradient_changes_nothing() {
        let mut opt = Optimizer::new(config(Rule::Lamb, Precision::F32, 0.0), &layout());
        let mut p = params();
        let mut g = grads(0);
        g[3] = f32::NAN;
        assert!(matches!(
            opt.step(&mut p, &mut g),
            Err(Error::NonFinite { .. })
        ));
        assert_eq!(p, params());
        assert_eq!(opt.steps(), 0);
        assert!(opt.step(&mut p, &mut grads(0)[..5]).is_err());
    }

    #[test]
    fn eight_bit_state_is_about_four_times_smaller() {
        let layout = Layout::new([("w", vec![1 << 20], Role::Weight)]).unwrap();
        let f32 = Optimizer::new(config(Rule::Lamb, Precision::F32, 0.0), &layout);
        let q8 = Optimizer::new(config(Rule::Lamb, Precision::Blockwise8, 0.0), &layout);
        let ratio = f32.moments().bytes() as f64 / q8.moments().bytes() as f64;
        assert!(ratio > 3.99, "{ratio}");
    }
}
