//! Drawing images: image codes sampled one at a time after the caption, with temperature,
//! top-k and top-p (nucleus) filtering. Each prompt draws from its own generator seeded by
//! `(seed, prompt index)`, so a prompt's image does not depend on what else is in the batch.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use super::flat::ids;
use super::model::{Cache, Dalle};
use crate::Error;

/// How to draw each image code.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Divides the logits; 1 keeps the model's distribution, lower is greedier.
    pub temperature: f64,
    /// Keep only the k most likely codes (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely codes whose probability reaches p (1: all).
    pub top_p: f64,
    /// Seed of the draws.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Draws an index from `logits` under `s`.
pub(crate) fn draw(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> usize {
    let t = s.temperature.max(1e-6) as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut order: Vec<(usize, f32)> = logits
        .iter()
        .map(|&l| ((l - max) / t).exp())
        .enumerate()
        .collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let total: f32 = order.iter().map(|p| p.1).sum();
    if s.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = 0;
        for (_, p) in &order {
            cumulative += p / total;
            keep += 1;
            if f64::from(cumulative) >= s.top_p {
                break;
            }
        }
        order.truncate(keep.max(1));
    }
    let total: f32 = order.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f32>() * total;
    for &(i, p) in &order {
        if u < p {
            return i;
        }
        u -= p;
    }
    order.last().map_or(0, |p| p.0)
}

impl Dalle {
    /// Image codes `[grid²]` for each caption's text ids (each of `text_len` ids). Each step
    /// runs only the new position: the keys and values of those before are cached.
    pub fn generate(&self, prompts: &[Vec<u16>], s: &Sampling) -> Result<Vec<Vec<u16>>, Error> {
        self.draw_codes(prompts, s, true)
    }

    /// [`generate`](Dalle::generate) recomputing the whole prefix at every step, as it did
    /// before the cache: the reference the cached one is measured against (`potluck bench
    /// generate`) and checked against.
    pub fn generate_uncached(
        &self,
        prompts: &[Vec<u16>],
        s: &Sampling,
    ) -> Result<Vec<Vec<u16>>, Error> {
        self.draw_codes(prompts, s, false)
    }

    fn draw_codes(
        &self,
        prompts: &[Vec<u16>],
        s: &Sampling,
        cached: bool,
    ) -> Result<Vec<Vec<u16>>, Error> {
        let t = self.cfg.tokens;
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        if prompts
            .iter()
            .any(|p| p.len() != t.text_len || p.iter().any(|&v| usize::from(v) >= t.text_vocab))
        {
            return Err(Error::Config(format!(
                "prompts must be {} text ids below {}",
                t.text_len, t.text_vocab
            )));
        }
        let b = prompts.len();
        let flat: Vec<u16> = prompts.iter().flatten().copied().collect();
        let text = ids(&flat, b, self.device());
        let mut rngs: Vec<ChaCha8Rng> = (0..b)
            .map(|i| ChaCha8Rng::seed_from_u64(potluck_data::mix_seed(s.seed, i as u64)))
            .collect();
        let mut codes: Vec<Vec<u16>> = vec![Vec::with_capacity(t.image_len()); b];
        let offset = t.text_vocab as i64;
        tch::no_grad(|| -> Result<(), Error> {
            // Cached: the caption once, then one new position a step.
            let mut cache = Cache::new(self.cfg.layers);
            let mut next = text.shallow_clone();
            for _ in 0..t.image_len() {
                let h = if cached {
                    self.hidden_cached(&next, &mut cache)
                } else {
                    let so_far: Vec<u16> = codes.iter().flatten().copied().collect();
                    let image = if so_far.is_empty() {
                        Tensor::zeros([b as i64, 0], (Kind::Int64, self.device()))
                    } else {
                        ids(&so_far, b, self.device())
                    };
                    self.hidden(&self.input_ids(&text, &image))
                };
                let logits = self.next_image_logits(&h).to_kind(Kind::Float);
                let logits = Vec::<f32>::try_from(
                    &logits.to_device(tch::Device::Cpu).contiguous().view(-1),
                )?;
                let mut drawn = Vec::with_capacity(b);
                for (i, row) in logits.chunks_exact(t.image_vocab).enumerate() {
                    let code = draw(row, s, &mut rngs[i]) as u16;
                    codes[i].push(code);
                    drawn.push(code);
                }
                next = ids(&drawn, b, self.device()) + offset;
            }
            Ok(())
        })?;
        Ok(codes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy_and_temperature_sharpens() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let greedy = Sampling {
            top_k: 1,
            ..Sampling::default()
        };
        for _ in 0..20 {
            assert_eq!(draw(&logits, &greedy, &mut rng), 1);
        }
        let cold = Sampling {
            temperature: 0.01,
            ..Sampling::default()
        };
        assert!((0..50).all(|_| draw(&logits, &cold, &mut rng) == 1));
    }

    #[test]
    fn top_p_keeps_the_nucleus_and_draws_follow_probabilities() {
        let logits = [2.0f32.ln(), 1.0f32.ln(), 1.0f32.ln(), -30.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let nucleus = Sampling {
            top_p: 0.5,
            ..Sampling::default()
        };
        assert!((0..50).all(|_| draw(&logits, &nucleus, &mut rng) == 0));
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[draw(&logits, &Sampling::default(), &mut rng)] += 1;
        }
        assert!((counts[0] as f64 / 4000.0 - 0.5).abs() < 0.04, "{counts:?}");
        assert_eq!(counts[3], 0);
    }

    #[test]
    fn cached_generation_gives_the_logits_of_the_whole_prefix() {
        use crate::dalle::model::tests::{batch, tiny};
        tch::manual_seed(3);
        let m = Dalle::new(tiny(false), tch::Device::Cpu).unwrap();
        let t = m.config().tokens;
        let b = 2;
        let (text, image) = batch(m.config(), b, 9);
        let text = ids(&text, b, m.device());
        let image = ids(&image, b, m.device());
        let offset = t.text_vocab as i64;
        tch::no_grad(|| {
            let mut cache = Cache::new(m.config().layers);
            let mut next = text.shallow_clone();
            for n in 0..t.image_len() as i64 {
                let cached = m.next_image_logits(&m.hidden_cached(&next, &mut cache));
                let prefix = image.narrow(1, 0, n);
                let whole = m.next_image_logits(&m.hidden(&m.input_ids(&text, &prefix)));
                let diff = (cached - whole).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "position {n}: {diff}");
                next = image.narrow(1, n, 1) + offset;
            }
        });
    }
}
