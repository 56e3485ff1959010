//! The arithmetic of one optimizer step: the per-value update of the moments and the
//! direction (`Step`), the split of the flat buffers into one share per thread, and the
//! per-thread loops (`kernels`, compiled for the baseline instruction set and for AVX2 + FMA).

use std::ops::Range;

use super::{BLOCK, Error, Map, Moments, Optimizer, Precision, Rule, StepInfo, Unit};

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
        if cfg.rule == Rule::Nesterov {
            self.nesterov(params, grad, gscale as f32, cfg.beta1 as f32, lr as f32);
            self.step = t;
            return Ok(StepInfo {
                step: t,
                lr,
                grad_norm,
            });
        }
        let groups = self.groups();
        match cfg.rule {
            Rule::AdamW | Rule::Nesterov => {
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

    /// SGD with Nesterov momentum `mu` on `scale · grad`, its buffer in the first moments
    /// (8-bit moments are decoded and quantized again). Once a round, on one thread: the
    /// arithmetic is a few passes over the buffers.
    fn nesterov(&mut self, params: &mut [f32], grad: &mut [f32], scale: f32, mu: f32, lr: f32) {
        let apply = |b: &mut [f32], p: &mut [f32], g: &mut [f32]| {
            for ((b, p), g) in b.iter_mut().zip(p.iter_mut()).zip(g.iter_mut()) {
                let g0 = *g * scale;
                *b = mu * *b + g0;
                let u = g0 + mu * *b;
                *p -= lr * u;
                *g = u;
            }
        };
        match &mut self.moments {
            Moments::F32 { m, .. } => apply(m, params, grad),
            Moments::Blockwise8 { m, m_scale, .. } => {
                let mut block = vec![0f32; BLOCK];
                for (j, u) in self.units.iter().enumerate() {
                    let r = u.range.clone();
                    let b = &mut block[..r.len()];
                    Map::signed().dequantize(&m[r.clone()], m_scale[j], b);
                    apply(b, &mut params[r.clone()], &mut grad[r.clone()]);
                    m_scale[j] = Map::signed().quantize(b, &mut m[r]);
                }
            }
        }
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
