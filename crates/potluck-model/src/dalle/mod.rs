//! The DALL-E-style transformer: a decoder-only model over `[text tokens; image tokens]` with
//! pre-LayerNorm blocks, rotary positions (1-D over the text, 2-D over the image grid), the
//! reference run's attention patterns per layer (full, axial row, axial column, conv-like),
//! weight sharing across layers, GEGLU feed-forward, tied embeddings, and the loss
//! (text CE + 7 · image CE) / 8.
//!
//! It implements [`potluck_core::Trainable`] (flat `f32` parameter and gradient buffers), and
//! samples images with temperature, top-k and top-p.

mod config;
mod flat;
pub(crate) mod mask;
mod model;
mod sample;

pub use config::{Attention, Config, PRESETS, Tokens};
pub use flat::TokenBatch;
pub use model::{Dalle, IMAGE_LOSS_WEIGHT};
pub use sample::Sampling;
