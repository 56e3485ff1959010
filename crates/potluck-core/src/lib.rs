//! The seam between learning and networking: a model's parameters and gradients as flat `f32`
//! buffers, described by a [`Layout`] (name, shape and offset of every tensor), and the
//! [`Trainable`] trait a model implements so that optimizers, averaging and checkpoints can
//! drive it without knowing what it is.
//!
//! The model fills a gradient buffer; the averager averages buffers; the optimizer updates a
//! parameter buffer; the model reads it back. LAMB's per-tensor trust ratio, weight-decay masks
//! and per-tensor compression choices all come from the layout.
//!
//! Beside the seam, small things every crate shares: the wall clock ([`clock`]), bounded reads
//! and atomic writes of files with their one error type ([`file`]), bounded places for
//! concurrent work in all and per key ([`slots`]), and [`lock`], which locks a mutex whether or
//! not a panic poisoned it.

use std::ops::Range;

use serde::{Deserialize, Serialize};

pub mod clock;
pub mod file;
pub mod slots;
mod sync;

pub use sync::lock;

/// What a tensor is for; optimizers and codecs treat roles differently (no weight decay on norms
/// and biases, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A weight matrix of a linear or convolutional layer.
    Weight,
    /// A token embedding (tied to the output projection where the model says so).
    Embedding,
    /// A normalisation layer's scale or shift.
    Norm,
    /// A bias vector.
    Bias,
}

impl Role {
    /// Whether decoupled weight decay applies to tensors of this role.
    pub fn decays(self) -> bool {
        matches!(self, Role::Weight | Role::Embedding)
    }
}

/// One tensor of a layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The tensor's name (as in checkpoints, e.g. `blocks.0.attn.qkv.weight`).
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Where it starts in the flat buffer.
    pub offset: usize,
    /// What it is for.
    pub role: Role,
}

impl Entry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Its range in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// The layout of a flat buffer: tensors packed back to back in a fixed order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    entries: Vec<Entry>,
    numel: usize,
}

/// A layout that cannot be, or a buffer that does not fit its layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("tensor name {0:?} appears twice")]
    Duplicate(String),
    #[error("a buffer of {len} values does not fit a layout of {numel}")]
    Length { len: usize, numel: usize },
    #[error("tensor {name:?}: shape {shape:?} does not fit {expected:?}")]
    Shape {
        name: String,
        shape: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor {0:?} missing")]
    Missing(String),
}

impl Layout {
    /// A layout of `(name, shape, role)` tensors in the given order.
    pub fn new<I, S>(tensors: I) -> Result<Layout, LayoutError>
    where
        I: IntoIterator<Item = (S, Vec<usize>, Role)>,
        S: Into<String>,
    {
        let mut layout = Layout::default();
        let mut seen = std::collections::HashSet::new();
        for (name, shape, role) in tensors {
            let name = name.into();
            if !seen.insert(name.clone()) {
                return Err(LayoutError::Duplicate(name));
            }
            let entry = Entry {
                name,
                shape,
                offset: layout.numel,
                role,
            };
            layout.numel += entry.numel();
            layout.entries.push(entry);
        }
        Ok(layout)
    }

    /// The tensors, in buffer order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Total number of values.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Checks that a buffer has this layout's length.
    pub fn check(&self, buffer: &[f32]) -> Result<(), LayoutError> {
        if buffer.len() == self.numel {
            Ok(())
        } else {
            Err(LayoutError::Length {
                len: buffer.len(),
                numel: self.numel,
            })
        }
    }

    /// A mask per value: whether weight decay applies to it.
    pub fn decay_mask(&self) -> Vec<bool> {
        let mut mask = vec![false; self.numel];
        for e in &self.entries {
            mask[e.range()].fill(e.role.decays());
        }
        mask
    }
}

/// Figures of one forward and backward pass.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Loss {
    /// The training objective (what the gradient is of), averaged over samples.
    pub total: f64,
    /// Components the model reports (e.g. text and image cross-entropy); 0 where unused.
    pub parts: [f64; 2],
    /// Samples the gradient was computed on.
    pub samples: usize,
}

impl Loss {
    /// Adds `other` weighted by its samples: a running sum that [`Loss::mean`] turns back into
    /// per-sample figures.
    pub fn add_weighted(&mut self, other: &Loss) {
        let n = other.samples as f64;
        self.total += other.total * n;
        self.parts[0] += other.parts[0] * n;
        self.parts[1] += other.parts[1] * n;
        self.samples += other.samples;
    }

    /// The per-sample mean of a sum made by [`Loss::add_weighted`].
    pub fn mean(&self) -> Loss {
        let n = self.samples.max(1) as f64;
        Loss {
            total: self.total / n,
            parts: [self.parts[0] / n, self.parts[1] / n],
            samples: self.samples,
        }
    }
}

/// A model that optimizers, averaging and checkpoints drive through flat buffers.
pub trait Trainable {
    /// What one call of [`Trainable::accumulate_gradients`] consumes.
    type Batch;
    /// The model's error type.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The layout of parameter and gradient buffers.
    fn layout(&self) -> &Layout;

    /// Copies the current parameters into `out` (of the layout's length).
    fn read_params(&self, out: &mut [f32]) -> Result<(), Self::Error>;

    /// Replaces the parameters with `params` (of the layout's length).
    fn write_params(&mut self, params: &[f32]) -> Result<(), Self::Error>;

    /// Runs forward and backward on `batch` and **adds** the gradient of the summed loss over
    /// the batch's samples into `grad`, so several calls accumulate one large batch. Dividing
    /// by the total sample count is the caller's job. Returns the batch's mean loss.
    fn accumulate_gradients(
        &mut self,
        batch: &Self::Batch,
        grad: &mut [f32],
    ) -> Result<Loss, Self::Error>;

    /// Computes the loss without gradients.
    fn evaluate(&mut self, batch: &Self::Batch) -> Result<Loss, Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_pack_back_to_back() {
        let layout = Layout::new([
            ("a", vec![2, 3], Role::Weight),
            ("b", vec![4], Role::Bias),
            ("c", vec![], Role::Norm),
        ])
        .unwrap();
        assert_eq!(layout.numel(), 11);
        assert_eq!(layout.get("b").unwrap().range(), 6..10);
        assert_eq!(layout.get("c").unwrap().range(), 10..11);
        let mask = layout.decay_mask();
        assert_eq!(mask.iter().filter(|&&m| m).count(), 6);
        assert!(layout.check(&[0.0; 11]).is_ok());
        assert!(layout.check(&[0.0; 10]).is_err());
    }

    #[test]
    fn duplicate_names_are_refused() {
        let err = Layout::new([("a", vec![1], Role::Bias), ("a", vec![2], Role::Bias)]);
        assert_eq!(err, Err(LayoutError::Duplicate("a".into())));
    }
}
