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
mod step;
#[cfg(test)]
mod tests;

use std::ops::Range;

use potluck_core::Layout;
use serde::{Deserialize, Serialize};

pub use quant::{BLOCK, Map};
pub use schedule::Schedule;
pub use step::global_norm;

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    AdamW,
    Lamb,
    /// SGD with Nesterov momentum (`beta1` the momentum), as PyTorch's `SGD(nesterov=True)`:
    /// `b ← μ·b + g`, `p ← p − lr·(g + μ·b)`, the buffer `b` kept as the first moment (the
    /// second stays zero). The outer optimizer of local-update mode ([`Config::outer`]).
    Nesterov,
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
    /// Fails, saying why, with settings no run trains with (a learning rate outside [0, 1],
    /// betas outside [0, 1), ε outside (0, 1), a weight decay outside [0, 1], a clamp or a
    /// clipping norm negative or not finite): what a donor's manifest or a charter names is
    /// checked before a peer takes it.
    pub fn check(&self) -> Result<(), String> {
        let sane = (0.0..=1.0).contains(&self.schedule.peak)
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && self.eps < 1.0
            && (0.0..=1.0).contains(&self.weight_decay)
            && self.clamp.is_finite()
            && self.clamp >= 0.0
            && self.max_grad_norm.is_finite()
            && self.max_grad_norm >= 0.0;
        if sane {
            return Ok(());
        }
        Err(format!(
            "optimizer settings no run trains with (learning rate {}, betas {} and {}, ε {}, \
             weight decay {}, clamp {}, clip {})",
            self.schedule.peak,
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
            self.clamp,
            self.max_grad_norm
        ))
    }

    /// A short digest of these settings (the first 8 bytes of the SHA-256 of their postcard
    /// encoding): what a peer's progress report says it trains with, so that peers can tell
    /// whether they share the run's settings without sending them.
    pub fn digest(&self) -> u64 {
        use sha2::{Digest, Sha256};
        // A Config of plain numbers and enums always encodes.
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        let hash = Sha256::digest(&bytes);
        u64::from_le_bytes(hash[..8].try_into().unwrap_or_default())
    }

    /// The outer optimizer of local-update mode, as DiLoCo's: Nesterov momentum `momentum`,
    /// a constant rate `lr`, on the change of the parameters averaged over a round, its state
    /// in `f32` (it is stepped once a round, and every peer must hold the same).
    pub fn outer(lr: f64, momentum: f64) -> Config {
        Config {
            rule: Rule::Nesterov,
            precision: Precision::F32,
            schedule: Schedule::constant(lr),
            beta1: momentum,
            beta2: 0.0,
            eps: 1e-8,
            weight_decay: 0.0,
            bias_correction: false,
            clamp: 0.0,
            max_grad_norm: 0.0,
        }
    }

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
    /// An outer optimizer (local-update mode) offered an inner one's settings, or the reverse.
    #[error("optimizer settings of rule {got:?} for an optimizer of rule {want:?}")]
    Rule { got: Rule, want: Rule },
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

    /// Threads it steps on.
    pub fn threads(&self) -> usize {
        self.threads
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

    /// An optimizer laid out as this one (same layout and threads) holding `moments` (moved
    /// in, not copied) at step `step`, with settings `cfg` (of this one's precision): a state
    /// downloaded from the swarm.
    pub fn restored(&self, moments: Moments, step: u64, cfg: Config) -> Result<Optimizer, Error> {
        let mut optimizer = Optimizer {
            cfg: self.cfg,
            units: self.units.clone(),
            entries: self.entries,
            numel: self.numel,
            step: 0,
            moments: Moments::F32 {
                m: Vec::new(),
                v: Vec::new(),
            },
            threads: self.threads,
        };
        optimizer.restore(moments, step)?;
        optimizer.adopt(cfg)?;
        Ok(optimizer)
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
        if (cfg.rule == Rule::Nesterov) != (self.cfg.rule == Rule::Nesterov) {
            return Err(Error::Rule {
                got: cfg.rule,
                want: self.cfg.rule,
            });
        }
        self.cfg = cfg;
        Ok(())
    }

    /// Sets the step count (e.g. to the global epoch after joining a run).
    pub fn set_steps(&mut self, step: u64) {
        self.step = step;
    }
}
