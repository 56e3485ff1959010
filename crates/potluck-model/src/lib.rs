//! potluck's models, on libtorch through `tch`: the DALL-E-style transformer ([`dalle`]), the
//! image tokenizer ([`vqvae`]), the text tokenizer ([`text`]), and the tensor files they live
//! in ([`store`]).
//!
//! This is the only crate that knows about tensors. Everything above it (training, averaging,
//! networking) will see flat `f32` buffers only.

pub mod dalle;
pub mod device;
pub mod store;
pub mod text;
pub mod vqvae;

pub use device::Device;
pub use tch;

/// Errors of the model layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libtorch refused an operation (shapes, device, out of memory).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The text tokenizer failed to train, load or encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A file could not be read or written, or is larger than its reader accepts.
    #[error(transparent)]
    File(#[from] potluck_core::file::Error),
    /// A weights file does not match the model that reads it.
    #[error("{path}: {reason}")]
    Format {
        path: std::path::PathBuf,
        reason: String,
    },
    /// A configuration that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An error of the data layer.
    #[error(transparent)]
    Data(#[from] potluck_data::Error),
}
