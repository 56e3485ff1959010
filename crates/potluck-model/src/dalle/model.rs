//! The network: token embedding (tied to the output), `layers` pre-LayerNorm blocks that reuse
//! `blocks.len()` unique attention + GEGLU feed-forward weights, a final LayerNorm.
//!
//! Shapes: text ids `[B, T]`, image codes `[B, N]` (`i64`); hidden states `[B, L, d]` with
//! `L = T + N - 1`; logits over the text vocabulary for the `T - 1` text targets and over the
//! image codebook for the `N` image targets.

use std::collections::HashMap;

use potluck_core::{Layout, Role};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::config::{Attention, Config};
use super::mask;
use crate::Error;

/// Weight of the image cross-entropy in the loss, as in the reference run: (text + 7·image) / 8.
pub const IMAGE_LOSS_WEIGHT: f64 = 7.0;

#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

#[derive(Debug)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let d = self.weight.size()[0];
        x.layer_norm([d], Some(&self.weight), Some(&self.bias), 1e-5, true)
    }
}

/// One unique block: attention and feed-forward weights (no norms: each layer has its own).
#[derive(Debug)]
struct Block {
    qkv: Linear,
    out: Linear,
    ff_in: Linear,
    ff_out: Linear,
}

/// One layer: its own norms around a (possibly shared) block.
#[derive(Debug)]
struct Layer {
    norm_attn: Norm,
    norm_ff: Norm,
}

/// Builds variables in a var store and records them, in order, for the flat layout.
struct Builder<'a> {
    root: nn::Path<'a>,
    named: Vec<(String, Tensor, Role)>,
}

impl Builder<'_> {
    fn var(&mut self, path: &[&str], shape: &[usize], role: Role, init: Init) -> Tensor {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let (last, dirs) = path.split_last().unwrap_or((&"x", &[]));
        let mut p = self.root.clone();
        for d in dirs {
            p = p / *d;
        }
        let t = p.var(last, &dims, init);
        self.named.push((path.join("."), t.shallow_clone(), role));
        t
    }

    fn linear(&mut self, path: &[&str], i: usize, o: usize, bias: bool, std: f64) -> Linear {
        let w = [path, &["weight"]].concat();
        let weight = self.var(
            &w,
            &[o, i],
            Role::Weight,
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        );
        let bias = bias.then(|| {
            let b = [path, &["bias"]].concat();
            self.var(&b, &[o], Role::Bias, Init::Const(0.0))
        });
        Linear { weight, bias }
    }

    fn norm(&mut self, path: &[&str], d: usize) -> Norm {
        let w = [path, &["weight"]].concat();
        let b = [path, &["bias"]].concat();
        Norm {
            weight: self.var(&w, &[d], Role::Norm, Init::Const(1.0)),
            bias: self.var(&b, &[d], Role::Norm, Init::Const(0.0)),
        }
    }
}

/// One layer's keys and values of the positions run so far: `[B, heads, len, Dh]`.
#[derive(Debug, Default)]
pub(crate) struct Past {
    keys: Option<Tensor>,
    values: Option<Tensor>,
}

/// What generation keeps between steps: every layer's keys and values of the positions run so
/// far, so each new position costs one position's work instead of the whole prefix's.
#[derive(Debug)]
pub(crate) struct Cache {
    layers: Vec<Past>,
    len: i64,
}

impl Cache {
    pub(crate) fn new(layers: usize) -> Cache {
        Cache {
            layers: (0..layers).map(|_| Past::default()).collect(),
            len: 0,
        }
    }
}

/// The transformer with its weights, masks and rotary tables.
#[derive(Debug)]
pub struct Dalle {
    pub(crate) cfg: Config,
    pub(crate) vs: nn::VarStore,
    embedding: Tensor,
    blocks: Vec<Block>,
    layers: Vec<Layer>,
    final_norm: Norm,
    /// `[L, L]` boolean masks, one per pattern in use.
    masks: HashMap<Attention, Tensor>,
    /// `[L, pairs]` rotary turns as unit complex numbers `cos θ + i sin θ`.
    rot: Tensor,
    pub(crate) layout: Layout,
    /// The variables in layout order.
    pub(crate) params: Vec<Tensor>,
}

impl Dalle {
    /// A freshly initialised model (GPT-2-style: normal(0, 0.02) weights, residual outputs
    /// scaled down by √(2·layers)).
    pub fn new(cfg: Config, device: tch::Device) -> Result<Dalle, Error> {
        cfg.validate()?;
        let vs = nn::VarStore::new(device);
        let d = cfg.d_model;
        let hidden = cfg.ff_mult * d;
        let vocab = cfg.tokens.text_vocab + cfg.tokens.image_vocab;
        let residual_std = 0.02 / (2.0 * cfg.layers as f64).sqrt();
        let mut b = Builder {
            root: vs.root(),
            named: Vec::new(),
        };
        let embedding = b.var(
            &["embedding", "weight"],
            &[vocab, d],
            Role::Embedding,
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let blocks = (0..cfg.blocks.len())
            .map(|u| {
                let u = u.to_string();
                Block {
                    qkv: b.linear(&["blocks", &u, "attn", "qkv"], d, 3 * d, false, 0.02),
                    out: b.linear(&["blocks", &u, "attn", "out"], d, d, true, residual_std),
                    ff_in: b.linear(&["blocks", &u, "ff", "in"], d, 2 * hidden, true, 0.02),
                    ff_out: b.linear(&["blocks", &u, "ff", "out"], hidden, d, true, residual_std),
                }
            })
            .collect();
        let layers = (0..cfg.layers)
            .map(|i| {
                let i = i.to_string();
                Layer {
                    norm_attn: b.norm(&["layers", &i, "norm_attn"], d),
                    norm_ff: b.norm(&["layers", &i, "norm_ff"], d),
                }
            })
            .collect();
        let final_norm = b.norm(&["final_norm"], d);
        let named = std::mem::take(&mut b.named);
        drop(b);
        let layout = Layout::new(named.iter().map(|(name, t, role)| {
            let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
            (name.clone(), shape, *role)
        }))
        .map_err(|e| Error::Config(e.to_string()))?;
        let params = named.into_iter().map(|(_, t, _)| t).collect();

        let len = cfg.tokens.seq_len();
        let mut masks = HashMap::new();
        for &pattern in &cfg.blocks {
            masks.entry(pattern).or_insert_with(|| {
                let m = mask::mask(&cfg.tokens, pattern, len);
                Tensor::from_slice(&m)
                    .view([len as i64, len as i64])
                    .to_device(device)
            });
        }
        let pairs = cfg.head_dim() / 2;
        let angles = mask::rotary_angles(&cfg.tokens, pairs, len);
        let angles = Tensor::from_slice(&angles)
            .view([len as i64, pairs as i64])
            .to_device(device);
        Ok(Dalle {
            rot: Tensor::complex(&angles.cos(), &angles.sin()),
            cfg,
            vs,
            embedding,
            blocks,
            layers,
            final_norm,
            masks,
            layout,
            params,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The flat layout of parameters and gradients.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The device the weights live on.
    pub fn device(&self) -> tch::Device {
        self.vs.device()
    }

    /// Input ids `[B, len]`: text ids, then image codes offset past the text vocabulary.
    pub(crate) fn input_ids(&self, text: &Tensor, image: &Tensor) -> Tensor {
        let offset = self.cfg.tokens.text_vocab as i64;
        if image.size()[1] == 0 {
            return text.shallow_clone();
        }
        Tensor::cat(&[text, &(image + offset)], 1)
    }

    /// Embeds `[B, len]` ids.
    pub(crate) fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embedding, ids, -1, false, false)
    }

    /// Rotates `x` `[..., len, Dh]` by the rotary angles of positions `start..start + len`:
    /// the head's values pair up as `(x[2i], x[2i+1])`, read as complex numbers and multiplied
    /// by the position's unit turns (one kernel instead of slices, products and a
    /// concatenation).
    fn rotate(&self, x: &Tensor, start: i64, len: i64) -> Tensor {
        let pairs = self.cfg.head_dim() as i64 / 2;
        let rot = self.rot.narrow(0, start, len);
        (x.unflatten(-1, [pairs, 2]).view_as_complex() * rot)
            .view_as_real()
            .flatten(-2, -1)
    }

    /// Layer `i` on hidden states `[B, len, d]` (`len` ≤ L: generation runs on prefixes).
    pub(crate) fn layer(&self, i: usize, h: &Tensor) -> Tensor {
        self.layer_from(i, h, 0, None)
    }

    /// Layer `i` on the hidden states `[B, len, d]` of positions `start..start + len`; with
    /// `past`, the keys and values of positions `0..start` come from it (and these positions'
    /// are added to it), so a prefix is never computed twice.
    fn layer_from(&self, i: usize, h: &Tensor, start: i64, past: Option<&mut Past>) -> Tensor {
        let layer = &self.layers[i];
        let block = &self.blocks[i % self.blocks.len()];
        let size = h.size();
        let (b, len, d) = (size[0], size[1], size[2]);
        let heads = self.cfg.heads as i64;
        let dh = d / heads;
        let a = layer.norm_attn.forward(h);
        let qkv = block
            .qkv
            .forward(&a)
            .view([b, len, 3, heads, dh])
            .permute([2, 0, 3, 1, 4]);
        let q = self.rotate(&qkv.get(0), start, len);
        let mut k = self.rotate(&qkv.get(1), start, len);
        let mut v = qkv.get(2);
        if let Some(past) = past {
            if let (Some(pk), Some(pv)) = (&past.keys, &past.values) {
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            past.keys = Some(k.shallow_clone());
            past.values = Some(v.shallow_clone());
        }
        let mask = &self.masks[&self.cfg.attention(i)];
        let mask = mask.narrow(0, start, len).narrow(1, 0, start + len);
        let o =
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.0, false, None, false);
        let o = o.transpose(1, 2).reshape([b, len, d]);
        let h = h + block.out.forward(&o);
        let f = layer.norm_ff.forward(&h);
        let u = block.ff_in.forward(&f);
        let parts = u.chunk(2, -1);
        let u = &parts[0] * parts[1].gelu("none");
        h + block.ff_out.forward(&u)
    }

    /// Hidden states of the positions after those in `cache`, from their ids `[B, n]`; adds
    /// their keys and values to the cache.
    pub(crate) fn hidden_cached(&self, ids: &Tensor, cache: &mut Cache) -> Tensor {
        let start = cache.len;
        let mut h = self.embed(ids);
        for (i, past) in cache.layers.iter_mut().enumerate().take(self.cfg.layers) {
            h = self.layer_from(i, &h, start, Some(past));
        }
        cache.len += ids.size()[1];
        h
    }

    /// Final norm and logits: over the text vocabulary for `[B, T - 1]` text targets (`None`
    /// when `T = 1`) and over the codebook for the image positions that follow.
    pub(crate) fn head(&self, h: &Tensor) -> (Option<Tensor>, Tensor) {
        let t = self.cfg.tokens;
        let h = self.final_norm.forward(h);
        let len = h.size()[1];
        let text_vocab = t.text_vocab as i64;
        let text_emb = self.embedding.narrow(0, 0, text_vocab);
        let image_emb = self.embedding.narrow(0, text_vocab, t.image_vocab as i64);
        let text_targets = t.text_len as i64 - 1;
        let text = (text_targets > 0).then(|| h.narrow(1, 0, text_targets).matmul(&text_emb.tr()));
        let image = h
            .narrow(1, text_targets, len - text_targets)
            .matmul(&image_emb.tr());
        (text, image)
    }

    /// Logits over the codebook `[B, image_vocab]` at the last position of hidden states
    /// `[B, len, d]`: the distribution of the next image code.
    pub(crate) fn next_image_logits(&self, h: &Tensor) -> Tensor {
        let t = self.cfg.tokens;
        let len = h.size()[1];
        let last = self.final_norm.forward(&h.narrow(1, len - 1, 1));
        let emb = self
            .embedding
            .narrow(0, t.text_vocab as i64, t.image_vocab as i64);
        last.matmul(&emb.tr()).squeeze_dim(1)
    }

    /// Mean text and image cross-entropies of logits against `text` `[B, T]` and `image`
    /// `[B, N]` targets, and the loss (text + 7·image) / 8.
    pub(crate) fn loss(
        &self,
        logits: (Option<Tensor>, Tensor),
        text: &Tensor,
        image: &Tensor,
    ) -> (Tensor, Tensor, Tensor) {
        let (text_logits, image_logits) = logits;
        let t = self.cfg.tokens;
        let ce = |logits: &Tensor, targets: &Tensor, vocab: usize| {
            logits
                .view([-1, vocab as i64])
                .cross_entropy_loss::<Tensor>(
                    &targets.reshape([-1]),
                    None,
                    tch::Reduction::Mean,
                    -100,
                    0.0,
                )
        };
        let image_ce = ce(&image_logits, image, t.image_vocab);
        let text_ce = match text_logits {
            Some(logits) => ce(
                &logits,
                &text.narrow(1, 1, t.text_len as i64 - 1),
                t.text_vocab,
            ),
            None => Tensor::zeros([], (Kind::Float, image_ce.device())),
        };
        let loss = (&text_ce + &image_ce * IMAGE_LOSS_WEIGHT) / (1.0 + IMAGE_LOSS_WEIGHT);
        (loss, text_ce, image_ce)
    }

    /// Hidden states after every layer, from ids `[B, len]`.
    pub(crate) fn hidden(&self, ids: &Tensor) -> Tensor {
        let mut h = self.embed(ids);
        for i in 0..self.cfg.layers {
            h = self.layer(i, &h);
        }
        h
    }

    /// The full training sequence's loss for `text` `[B, T]` and `image` `[B, N]` (i64 on the
    /// model's device): (loss, text CE, image CE).
    pub fn forward_loss(&self, text: &Tensor, image: &Tensor) -> (Tensor, Tensor, Tensor) {
        let n = self.cfg.tokens.image_len() as i64;
        let ids = self.input_ids(text, &image.narrow(1, 0, n - 1));
        let h = self.hidden(&ids);
        self.loss(self.head(&h), text, image)
    }

    /// Runs forward and backward, leaving gradients of `scale · loss` in the variables'
    /// `.grad`; with checkpointing, each layer's activations are recomputed in the backward
    /// pass from its saved input, one layer at a time. Returns (loss, text CE, image CE).
    pub(crate) fn backward(
        &self,
        text: &Tensor,
        image: &Tensor,
        scale: f64,
    ) -> Result<(f64, f64, f64), Error> {
        let n = self.cfg.tokens.image_len() as i64;
        let ids = self.input_ids(text, &image.narrow(1, 0, n - 1));
        let (loss, text_ce, image_ce) = if !self.cfg.checkpointing {
            let h = self.hidden(&ids);
            let out = self.loss(self.head(&h), text, image);
            (&out.0 * scale).f_backward()?;
            out
        } else {
            let x0 = self.embed(&ids);
            let mut inputs = Vec::with_capacity(self.cfg.layers);
            let mut h = x0.detach();
            tch::no_grad(|| {
                for i in 0..self.cfg.layers {
                    let next = self.layer(i, &h);
                    inputs.push(std::mem::replace(&mut h, next));
                }
            });
            let top = h.detach().set_requires_grad(true);
            let out = self.loss(self.head(&top), text, image);
            (&out.0 * scale).f_backward()?;
            let mut grad = top.grad();
            for i in (0..self.cfg.layers).rev() {
                let input = inputs[i].detach().set_requires_grad(true);
                let output = self.layer(i, &input);
                (output * &grad).sum(Kind::Float).f_backward()?;
                grad = input.grad();
            }
            (x0 * grad).sum(Kind::Float).f_backward()?;
            out
        };
        Ok((
            loss.f_double_value(&[])?,
            text_ce.f_double_value(&[])?,
            image_ce.f_double_value(&[])?,
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dalle::config::Tokens;
    use crate::dalle::flat::ids;

    pub(crate) fn tiny(checkpointing: bool) -> Config {
        let tokens = Tokens {
            text_len: 3,
            text_vocab: 11,
            image_grid: 3,
            image_vocab: 7,
        };
        Config {
            checkpointing,
            ..Config::tiny(tokens)
        }
    }

    pub(crate) fn batch(cfg: &Config, b: usize, seed: u64) -> (Vec<u16>, Vec<u16>) {
        let t = cfg.tokens;
        let mut x = seed;
        let mut next = |n: usize| {
            x = potluck_data::mix_seed(x, 1);
            (x % n as u64) as u16
        };
        let text = (0..b * t.text_len).map(|_| next(t.text_vocab)).collect();
        let image = (0..b * t.image_len())
            .map(|_| next(t.image_vocab))
            .collect();
        (text, image)
    }

    fn tensors(m: &Dalle, b: usize, seed: u64) -> (Tensor, Tensor) {
        let (text, image) = batch(&m.cfg, b, seed);
        (ids(&text, b, m.device()), ids(&image, b, m.device()))
    }

    /// The model in float64, so finite differences are meaningful.
    fn double(cfg: Config) -> Dalle {
        let mut m = Dalle::new(cfg, tch::Device::Cpu).unwrap();
        m.vs.double();
        m.rot = m.rot.to_kind(Kind::ComplexDouble);
        m
    }

    #[test]
    fn gradients_match_finite_differences() {
        tch::manual_seed(0);
        let m = double(tiny(false));
        let (text, image) = tensors(&m, 2, 5);
        m.backward(&text, &image, 1.0).unwrap();
        let mut checked = 0;
        for (entry, param) in m.layout.entries().iter().zip(&m.params) {
            let grad = param.grad().view(-1);
            let flat = param.view(-1);
            for idx in [0, entry.numel() / 2, entry.numel() - 1] {
                let idx = idx as i64;
                let orig = flat.double_value(&[idx]);
                let h = 1e-6;
                let at = |v: f64| {
                    tch::no_grad(|| {
                        let _ = flat.get(idx).fill_(v);
                        m.forward_loss(&text, &image).0.double_value(&[])
                    })
                };
                let numeric = (at(orig + h) - at(orig - h)) / (2.0 * h);
                tch::no_grad(|| {
                    let _ = flat.get(idx).fill_(orig);
                });
                let analytic = grad.double_value(&[idx]);
                let tol = 1e-6 + 1e-4 * numeric.abs().max(analytic.abs());
                assert!(
                    (numeric - analytic).abs() < tol,
                    "{}[{idx}]: numeric {numeric} vs autograd {analytic}",
                    entry.name
                );
                checked += 1;
            }
        }
        assert!(checked > 50);
    }

    #[test]
    fn checkpointing_gives_the_same_gradients() {
        tch::manual_seed(1);
        let plain = double(tiny(false));
        let mut ckpt = double(tiny(true));
        ckpt.vs.copy(&plain.vs).unwrap();
        let (text, image) = tensors(&plain, 3, 7);
        let a = plain.backward(&text, &image, 3.0).unwrap();
        let b = ckpt.backward(&text, &image, 3.0).unwrap();
        assert!((a.0 - b.0).abs() < 1e-12);
        for (p, q) in plain.params.iter().zip(&ckpt.params) {
            let diff = (p.grad() - q.grad()).abs().max().double_value(&[]);
            assert!(diff < 1e-10, "{diff}");
        }
    }

    #[test]
    fn no_position_is_influenced_by_a_later_one() {
        // Changing the last image code must not change any earlier logits.
        tch::manual_seed(2);
        let m = Dalle::new(tiny(false), tch::Device::Cpu).unwrap();
        let (text, image) = tensors(&m, 1, 3);
        let n = m.cfg.tokens.image_len() as i64;
        let run = |image: &Tensor| {
            let ids = m.input_ids(&text, &image.narrow(1, 0, n - 1));
            tch::no_grad(|| m.head(&m.hidden(&ids)).1)
        };
        let before = run(&image);
        let changed = image.copy();
        let _ = changed
            .get(0)
            .get(n - 2)
            .fill_((image.int64_value(&[0, n - 2]) + 1) % 7);
        let after = run(&changed);
        let same = before
            .narrow(1, 0, n - 1)
            .eq_tensor(&after.narrow(1, 0, n - 1))
            .all();
        assert!(same.int64_value(&[]) == 1);
        let last_differs = before
            .narrow(1, n - 1, 1)
            .ne_tensor(&after.narrow(1, n - 1, 1))
            .any();
        assert!(last_differs.int64_value(&[]) == 1);
    }
}
