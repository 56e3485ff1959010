//! Data sets for potluck: everything yields (caption, RGB image) pairs.
//!
//! - [`shapes`]: the embedded default, generated, unbounded and deterministic for a seed;
//! - [`emoji`]: the image–caption pairs of the npm packages `emoji-datasource-google` and
//!   `emoji-datasource-twitter`;
//! - [`webdataset`]: tar shards of `KEY.jpg|png` + `KEY.txt` (the LAION / img2dataset
//!   convention) and plain folders of images with `.txt` sidecars;
//! - [`tokens`]: the token shards `potluck prepare` writes once, so training never runs the image
//!   tokenizer.
//!
//! Every loader gives each peer its own deterministic order ([`Order`]): peers of one run do not
//! repeat each other's work. Bad input (a corrupt image, a missing caption, a truncated tar) is
//! skipped and counted in [`Skips`], never a panic: one broken file must not cost a run.
//!
//! Nothing here knows about tensors or models; images are `image::RgbImage`.

pub mod detect;
pub mod emoji;
pub mod font;
pub mod grid;
mod order;
pub mod shapes;
mod skips;
mod source;
pub mod tokens;
pub mod webdataset;

pub use order::{Order, ShuffleBuffer, mix_seed};
pub use skips::{SkipReason, Skips};
pub use source::{Dataset, Spec, fit_square};

use image::RgbImage;

/// One training example: a caption and its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub caption: String,
    pub image: RgbImage,
}

/// Errors of the data layer that stop a job (bad input *items* are skipped instead, see
/// [`Skips`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written, or is larger than its reader accepts.
    #[error(transparent)]
    File(#[from] potluck_core::file::Error),
    /// The data set name is not one we know.
    #[error(
        "unknown data set {0:?}: use `shapes`, `emoji`, `emoji:DIR` or `webdataset:PATH` \
         (a .tar shard, a directory of shards, or a folder of images with .txt captions)"
    )]
    UnknownDataset(String),
    /// A data set's files are missing or unusable as a whole.
    #[error("{0}")]
    Invalid(String),
    /// A token shard or manifest is malformed.
    #[error("{path}: {reason}")]
    Format {
        path: std::path::PathBuf,
        reason: String,
    },
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Error {
        Error::File(potluck_core::file::Error::io(path, source))
    }
}
