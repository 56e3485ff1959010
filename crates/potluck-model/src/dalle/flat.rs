//! The flat-buffer seam: parameters and gradients of the transformer as `f32` slices in layout
//! order, so optimizers and averaging never see a tensor.

use potluck_core::{Loss, Trainable};
use potluck_data::tokens::Row;
use tch::{Kind, Tensor};

use super::model::Dalle;
use crate::Error;

/// A batch of encoded samples: `size` rows of text ids and image codes, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    pub text: Vec<u16>,
    pub image: Vec<u16>,
    pub size: usize,
}

impl TokenBatch {
    /// Packs rows (all of one shape) into a batch.
    pub fn from_rows(rows: &[Row]) -> TokenBatch {
        TokenBatch {
            text: rows.iter().flat_map(|r| r.text.iter().copied()).collect(),
            image: rows.iter().flat_map(|r| r.image.iter().copied()).collect(),
            size: rows.len(),
        }
    }
}

/// `values` as an `i64` tensor `[rows, values / rows]` on `device`.
pub(crate) fn ids(values: &[u16], rows: usize, device: tch::Device) -> Tensor {
    let wide: Vec<i64> = values.iter().map(|&v| i64::from(v)).collect();
    Tensor::from_slice(&wide)
        .view([rows as i64, -1])
        .to_device(device)
}

/// A CPU tensor over `dst`'s memory. The tensor must not outlive the borrow of `dst`: callers
/// use it inside one statement and drop it.
fn blob(dst: &mut [f32]) -> Tensor {
    // SAFETY: `dst` is valid, initialised f32 memory of `dst.len()` values, and the returned
    // tensor (which does not own it) is dropped by the callers below before `dst` is released.
    unsafe {
        Tensor::from_blob(
            dst.as_mut_ptr().cast::<u8>(),
            &[dst.len() as i64],
            &[1],
            Kind::Float,
            tch::Device::Cpu,
        )
    }
}

/// A CPU tensor over `src`'s memory, only ever read (the source of a copy), with the same
/// lifetime rule as [`blob`].
fn source(src: &[f32]) -> Tensor {
    // SAFETY: as for `blob`; the tensor is only read, and dropped before `src` is released.
    unsafe {
        Tensor::from_blob(
            src.as_ptr().cast::<u8>(),
            &[src.len() as i64],
            &[1],
            Kind::Float,
            tch::Device::Cpu,
        )
    }
}

impl Dalle {
    fn check_batch(&self, batch: &TokenBatch) -> Result<(), Error> {
        let t = self.cfg.tokens;
        let ok = batch.size > 0
            && batch.text.len() == batch.size * t.text_len
            && batch.image.len() == batch.size * t.image_len()
            && batch.text.iter().all(|&v| usize::from(v) < t.text_vocab)
            && batch.image.iter().all(|&v| usize::from(v) < t.image_vocab);
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "a batch of {} samples does not fit the model's tokens ({} text ids below {}, \
                 {} image codes below {})",
                batch.size,
                t.text_len,
                t.text_vocab,
                t.image_len(),
                t.image_vocab
            )))
        }
    }

    fn batch_tensors(&self, batch: &TokenBatch) -> (Tensor, Tensor) {
        let device = self.device();
        (
            ids(&batch.text, batch.size, device),
            ids(&batch.image, batch.size, device),
        )
    }

    fn check_len(&self, len: usize) -> Result<(), Error> {
        if len == self.layout.numel() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "a buffer of {len} values for a model of {}",
                self.layout.numel()
            )))
        }
    }
}

impl Trainable for Dalle {
    type Batch = TokenBatch;
    type Error = Error;

    fn layout(&self) -> &potluck_core::Layout {
        &self.layout
    }

    fn read_params(&self, out: &mut [f32]) -> Result<(), Error> {
        self.check_len(out.len())?;
        for (entry, param) in self.layout.entries().iter().zip(&self.params) {
            let src = param
                .detach()
                .to_device(tch::Device::Cpu)
                .contiguous()
                .view(-1);
            blob(&mut out[entry.range()]).f_copy_(&src)?;
        }
        Ok(())
    }

    fn write_params(&mut self, params: &[f32]) -> Result<(), Error> {
        self.check_len(params.len())?;
        tch::no_grad(|| {
            for (entry, param) in self.layout.entries().iter().zip(&self.params) {
                // One copy, straight from the caller's buffer into the parameter.
                let src = source(&params[entry.range()]).view(param.size().as_slice());
                param.shallow_clone().f_copy_(&src)?;
            }
            Ok(())
        })
    }

    fn accumulate_gradients(
        &mut self,
        batch: &TokenBatch,
        grad: &mut [f32],
    ) -> Result<Loss, Error> {
        self.check_len(grad.len())?;
        self.check_batch(batch)?;
        let (text, image) = self.batch_tensors(batch);
        let (loss, text_ce, image_ce) = self.backward(&text, &image, batch.size as f64)?;
        for (entry, param) in self.layout.entries().iter().zip(&self.params) {
            let mut param = param.shallow_clone();
            let g = param.grad();
            if g.defined() {
                let g = g.to_device(tch::Device::Cpu).contiguous().view(-1);
                let _ = blob(&mut grad[entry.range()]).f_add_(&g)?;
                param.zero_grad();
            }
        }
        Ok(Loss {
            total: loss,
            parts: [text_ce, image_ce],
            samples: batch.size,
        })
    }

    fn evaluate(&mut self, batch: &TokenBatch) -> Result<Loss, Error> {
        self.check_batch(batch)?;
        let (text, image) = self.batch_tensors(batch);
        let (loss, text_ce, image_ce) = tch::no_grad(|| self.forward_loss(&text, &image));
        Ok(Loss {
            total: loss.f_double_value(&[])?,
            parts: [text_ce.f_double_value(&[])?, image_ce.f_double_value(&[])?],
            samples: batch.size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dalle::Sampling;
    use crate::dalle::config::{Config, Tokens};

    fn tiny() -> Config {
        let tokens = Tokens {
            text_len: 4,
            text_vocab: 13,
            image_grid: 3,
            image_vocab: 9,
        };
        Config::tiny(tokens)
    }

    fn batch(cfg: &Config, b: usize) -> TokenBatch {
        let t = cfg.tokens;
        TokenBatch {
            text: (0..b * t.text_len)
                .map(|i| (i * 7 % t.text_vocab) as u16)
                .collect(),
            image: (0..b * t.image_len())
                .map(|i| (i * 5 % t.image_vocab) as u16)
                .collect(),
            size: b,
        }
    }

    #[test]
    fn params_round_trip_through_flat_buffers() {
        tch::manual_seed(3);
        let a = Dalle::new(tiny(), tch::Device::Cpu).unwrap();
        let mut b = Dalle::new(tiny(), tch::Device::Cpu).unwrap();
        let mut flat = vec![0.0; a.layout().numel()];
        a.read_params(&mut flat).unwrap();
        b.write_params(&flat).unwrap();
        let mut again = vec![1.0; flat.len()];
        b.read_params(&mut again).unwrap();
        assert_eq!(flat, again);
        let mut a = a;
        let batch = batch(&a.cfg, 2);
        assert_eq!(a.evaluate(&batch).unwrap(), b.evaluate(&batch).unwrap());
        assert!(b.write_params(&flat[1..]).is_err());
    }

    #[test]
    fn gradients_accumulate_and_sum_over_samples() {
        tch::manual_seed(4);
        let mut m = Dalle::new(tiny(), tch::Device::Cpu).unwrap();
        let n = m.layout().numel();
        let one = batch(&m.cfg, 1);
        let mut g1 = vec![0.0; n];
        m.accumulate_gradients(&one, &mut g1).unwrap();
        let mut g2 = vec![0.0; n];
        m.accumulate_gradients(&one, &mut g2).unwrap();
        m.accumulate_gradients(&one, &mut g2).unwrap();
        for (a, b) in g1.iter().zip(&g2) {
            assert!((2.0 * a - b).abs() <= 1e-5 * a.abs().max(1e-3), "{a} {b}");
        }
        // A batch of the same sample twice gives the gradient of the summed loss.
        let two = TokenBatch {
            text: [one.text.clone(), one.text.clone()].concat(),
            image: [one.image.clone(), one.image.clone()].concat(),
            size: 2,
        };
        let mut g3 = vec![0.0; n];
        m.accumulate_gradients(&two, &mut g3).unwrap();
        for (a, b) in g2.iter().zip(&g3) {
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1e-2), "{a} {b}");
        }
        assert!(g1.iter().any(|&g| g != 0.0));
    }

    #[test]
    fn bad_batches_are_refused() {
        let mut m = Dalle::new(tiny(), tch::Device::Cpu).unwrap();
        let mut b = batch(&m.cfg, 2);
        b.image[0] = 9; // the codebook has 9 codes: 0..=8
        let mut g = vec![0.0; m.layout().numel()];
        assert!(m.accumulate_gradients(&b, &mut g).is_err());
        let mut b = batch(&m.cfg, 2);
        b.size = 3;
        assert!(m.evaluate(&b).is_err());
    }

    #[test]
    fn sampling_is_reproducible_for_a_seed() {
        tch::manual_seed(5);
        let m = Dalle::new(tiny(), tch::Device::Cpu).unwrap();
        let prompts = vec![vec![1u16, 2, 3, 0], vec![4, 5, 0, 0], vec![1, 2, 3, 0]];
        let s = Sampling {
            seed: 11,
            ..Sampling::default()
        };
        let a = m.generate(&prompts, &s).unwrap();
        assert_eq!(a, m.generate(&prompts, &s).unwrap());
        assert_eq!(a.len(), 3);
        assert!(
            a.iter()
                .all(|codes| codes.len() == 9 && codes.iter().all(|&c| c < 9))
        );
        // A prompt's image does not depend on the rest of the batch.
        assert_eq!(m.generate(&prompts[..1], &s).unwrap()[0], a[0]);
        let other = m.generate(&prompts, &Sampling { seed: 12, ..s }).unwrap();
        assert_ne!(a, other);
    }
}
