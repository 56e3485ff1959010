//! Checkpoints: a directory that a crash never leaves broken.
//!
//! ```text
//! CKPT/checkpoint.json               which files form the checkpoint, step, samples, extra
//! CKPT/model-000500.safetensors      parameters by layout name (F32), model metadata
//! CKPT/optimizer-000500.safetensors  moments and optimizer configuration
//! ```
//!
//! Each file is written to a temporary name, fsynced and renamed; `checkpoint.json` is replaced
//! last, and files it no longer names are removed only after that. A reader that follows
//! `checkpoint.json` always finds a complete, matching set. The parameter file is plain
//! safetensors, so `safetensors.torch.load_file` reads it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use potluck_core::Layout;
use potluck_core::file::{read_limited, write_atomic};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::optim::{self, Moments, Optimizer};

/// The format tag of `checkpoint.json`.
pub const FORMAT: &str = "potluck-checkpoint/1";
/// The manifest's file name.
pub const MANIFEST: &str = "checkpoint.json";
const MAX_MANIFEST_BYTES: u64 = 16 << 20;
const MAX_TENSOR_FILE_BYTES: u64 = 64 << 30;
const META_OPTIMIZER: &str = "potluck.optimizer";

/// Errors reading or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    File(#[from] potluck_core::file::Error),
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: no checkpoint here (no {MANIFEST})")]
    Missing { path: PathBuf },
    #[error(transparent)]
    Optimizer(#[from] optim::Error),
}

fn format_error(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// What `checkpoint.json` says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// Optimizer steps taken.
    pub step: u64,
    /// Samples trained on.
    pub samples: u64,
    /// The parameter file.
    pub model: String,
    /// The optimizer-state file, if saved.
    pub optimizer: Option<String>,
    /// Whatever the caller keeps with it (model configuration, data, figures).
    pub extra: serde_json::Value,
}

/// Reads `DIR/checkpoint.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, Error> {
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        return Err(Error::Missing {
            path: dir.to_path_buf(),
        });
    }
    let bytes = read_limited(&path, MAX_MANIFEST_BYTES)?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| format_error(&path, e))?;
    if m.format != FORMAT {
        return Err(format_error(
            &path,
            format!("format {:?}, expected {FORMAT:?}", m.format),
        ));
    }
    for file in std::iter::once(&m.model).chain(&m.optimizer) {
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(format_error(
                &path,
                format!("file name {file:?} leaves the directory"),
            ));
        }
    }
    Ok(m)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Serialises named tensors `(name, dtype, shape, bytes)` with metadata.
fn serialize(
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    meta: HashMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>, Error> {
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| format_error(path, e))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    safetensors::serialize(views, Some(meta)).map_err(|e| format_error(path, e))
}

/// What to save.
#[derive(Debug)]
pub struct Save<'a> {
    pub layout: &'a Layout,
    pub params: &'a [f32],
    pub optimizer: Option<&'a Optimizer>,
    pub samples: u64,
    /// Metadata of the parameter file (e.g. the model configuration).
    pub model_meta: HashMap<String, String>,
    pub extra: serde_json::Value,
}

/// Writes a checkpoint into `dir` (created if missing) and removes the files of the one it
/// replaces.
pub fn save(dir: &Path, s: Save<'_>) -> Result<Manifest, Error> {
    std::fs::create_dir_all(dir).map_err(|e| potluck_core::file::Error::io(dir, e))?;
    s.layout.check(s.params).map_err(|e| format_error(dir, e))?;
    let step = s.optimizer.map_or(0, Optimizer::steps);
    let old = read_manifest(dir).ok();
    // A fresh name per save, so the files of the current checkpoint are never overwritten.
    let stamp = format!("{step:07}-{}", s.samples);
    let model = format!("model-{stamp}.safetensors");
    let tensors: Vec<_> = s
        .layout
        .entries()
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                Dtype::F32,
                e.shape.clone(),
                f32_bytes(&s.params[e.range()]),
            )
        })
        .collect();
    let path = dir.join(&model);
    write_atomic(&path, &serialize(&tensors, s.model_meta, &path)?)?;

    let optimizer = match s.optimizer {
        Some(opt) => {
            let file = format!("optimizer-{stamp}.safetensors");
            let path = dir.join(&file);
            let n = s.layout.numel();
            let tensors = match opt.moments() {
                Moments::F32 { m, v } => vec![
                    ("m".to_owned(), Dtype::F32, vec![n], f32_bytes(m)),
                    ("v".to_owned(), Dtype::F32, vec![n], f32_bytes(v)),
                ],
                Moments::Blockwise8 {
                    m,
                    m_scale,
                    v,
                    v_scale,
                } => vec![
                    ("m".to_owned(), Dtype::U8, vec![n], m.clone()),
                    (
                        "m_scale".to_owned(),
                        Dtype::F32,
                        vec![m_scale.len()],
                        f32_bytes(m_scale),
                    ),
                    ("v".to_owned(), Dtype::U8, vec![n], v.clone()),
                    (
                        "v_scale".to_owned(),
                        Dtype::F32,
                        vec![v_scale.len()],
                        f32_bytes(v_scale),
                    ),
                ],
            };
            let config = serde_json::to_string(opt.config()).map_err(|e| format_error(&path, e))?;
            let meta = HashMap::from([
                (META_OPTIMIZER.to_owned(), config),
                ("step".to_owned(), opt.steps().to_string()),
            ]);
            write_atomic(&path, &serialize(&tensors, meta, &path)?)?;
            Some(file)
        }
        None => None,
    };
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        step,
        samples: s.samples,
        model,
        optimizer,
        extra: s.extra,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| format_error(dir, e))?;
    write_atomic(&dir.join(MANIFEST), &json)?;
    if let Some(old) = old {
        for file in std::iter::once(&old.model).chain(&old.optimizer) {
            if *file != manifest.model && Some(file) != manifest.optimizer.as_ref() {
                let _ = std::fs::remove_file(dir.join(file));
            }
        }
    }
    Ok(manifest)
}

/// The metadata of a checkpoint's parameter file (read before the model is built).
pub fn read_model_meta(dir: &Path) -> Result<(Manifest, HashMap<String, String>), Error> {
    let manifest = read_manifest(dir)?;
    let path = dir.join(&manifest.model);
    let bytes = read_limited(&path, MAX_TENSOR_FILE_BYTES)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| format_error(&path, e))?;
    Ok((manifest, meta.metadata().clone().unwrap_or_default()))
}

/// Reads the parameters of a checkpoint laid out as `layout`: every tensor must be there with
/// its exact shape, values finite.
pub fn load_params(dir: &Path, layout: &Layout) -> Result<(Manifest, Vec<f32>), Error> {
    let manifest = read_manifest(dir)?;
    let path = dir.join(&manifest.model);
    let bytes = read_limited(&path, MAX_TENSOR_FILE_BYTES)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format_error(&path, e))?;
    if st.len() != layout.entries().len() {
        return Err(format_error(
            &path,
            format!(
                "{} tensors, the model has {}",
                st.len(),
                layout.entries().len()
            ),
        ));
    }
    let mut params = vec![0.0f32; layout.numel()];
    for e in layout.entries() {
        let view = st
            .tensor(&e.name)
            .map_err(|_| format_error(&path, format!("tensor {} missing", e.name)))?;
        if view.dtype() != Dtype::F32 || view.shape() != e.shape.as_slice() {
            return Err(format_error(
                &path,
                format!(
                    "tensor {} is {:?} {:?}, the model wants F32 {:?}",
                    e.name,
                    view.dtype(),
                    view.shape(),
                    e.shape
                ),
            ));
        }
        params[e.range()].copy_from_slice(&f32s(view.data()));
    }
    if let Some(i) = params.iter().position(|v| !v.is_finite()) {
        return Err(format_error(&path, format!("parameter {i} is not finite")));
    }
    Ok((manifest, params))
}

/// Restores `optimizer`'s moments and step from a checkpoint (which must have saved state of
/// the same precision and size).
pub fn load_optimizer(
    dir: &Path,
    manifest: &Manifest,
    optimizer: &mut Optimizer,
) -> Result<(), Error> {
    let Some(file) = &manifest.optimizer else {
        return Err(format_error(dir, "the checkpoint holds no optimizer state"));
    };
    let path = dir.join(file);
    let bytes = read_limited(&path, MAX_TENSOR_FILE_BYTES)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format_error(&path, e))?;
    let get = |name: &str, dtype: Dtype| -> Result<&[u8], Error> {
        let view = st
            .tensor(name)
            .map_err(|_| format_error(&path, format!("tensor {name} missing")))?;
        if view.dtype() != dtype {
            return Err(format_error(
                &path,
                format!("tensor {name} is {:?}", view.dtype()),
            ));
        }
        Ok(view.data())
    };
    let moments = match optimizer.config().precision {
        optim::Precision::F32 => Moments::F32 {
            m: f32s(get("m", Dtype::F32)?),
            v: f32s(get("v", Dtype::F32)?),
        },
        optim::Precision::Blockwise8 => Moments::Blockwise8 {
            m: get("m", Dtype::U8)?.to_vec(),
            m_scale: f32s(get("m_scale", Dtype::F32)?),
            v: get("v", Dtype::U8)?.to_vec(),
            v_scale: f32s(get("v_scale", Dtype::F32)?),
        },
    };
    optimizer.restore(moments, manifest.step)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{Config, Precision};
    use potluck_core::Role;

    fn layout() -> Layout {
        Layout::new([("w", vec![3, 5], Role::Weight), ("b", vec![5], Role::Bias)]).unwrap()
    }

    fn save_one(dir: &Path, params: &[f32], opt: &Optimizer, samples: u64) -> Manifest {
        save(
            dir,
            Save {
                layout: &layout(),
                params,
                optimizer: Some(opt),
                samples,
                model_meta: HashMap::from([("k".into(), "v".into())]),
                extra: serde_json::json!({"note": "test"}),
            },
        )
        .unwrap()
    }

    #[test]
    fn save_load_round_trips_and_replaces_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let layout = layout();
        for precision in [Precision::F32, Precision::Blockwise8] {
            let cfg = Config {
                precision,
                ..Config::reference_lamb()
            };
            let mut opt = Optimizer::new(cfg, &layout);
            let mut params: Vec<f32> = (0..20).map(|i| i as f32 * 0.1).collect();
            let grad: Vec<f32> = (0..20).map(|i| (i as f32).sin()).collect();
            opt.step(&mut params, &mut grad.clone()).unwrap();
            save_one(dir.path(), &params, &opt, 10);
            opt.step(&mut params, &mut grad.clone()).unwrap();
            let m = save_one(dir.path(), &params, &opt, 20);
            assert_eq!((m.step, m.samples), (2, 20));
            let (read, loaded) = load_params(dir.path(), &layout).unwrap();
            assert_eq!(read, m);
            assert_eq!(loaded, params);
            let mut fresh = Optimizer::new(cfg, &layout);
            load_optimizer(dir.path(), &read, &mut fresh).unwrap();
            assert_eq!(fresh.moments(), opt.moments());
            assert_eq!(fresh.steps(), 2);
            let (_, meta) = read_model_meta(dir.path()).unwrap();
            assert_eq!(meta["k"], "v");
            // Only the newest set is left.
            let files = std::fs::read_dir(dir.path()).unwrap().count();
            assert_eq!(files, 3);
        }
    }

    #[test]
    fn damaged_checkpoints_are_refused_and_the_reason_named() {
        let dir = tempfile::tempdir().unwrap();
        let layout = layout();
        let opt = Optimizer::new(Config::reference_lamb(), &layout);
        let params = vec![0.5f32; 20];
        let m = save_one(dir.path(), &params, &opt, 1);
        let model = dir.path().join(&m.model);
        let bytes = std::fs::read(&model).unwrap();
        std::fs::write(&model, &bytes[..bytes.len() - 3]).unwrap();
        assert!(load_params(dir.path(), &layout).is_err());
        // A checkpoint of another model.
        let other = Layout::new([("w", vec![4, 5], Role::Weight)]).unwrap();
        save_one(dir.path(), &params, &opt, 2);
        assert!(load_params(dir.path(), &other).is_err());
        // Non-finite parameters.
        let mut bad = params.clone();
        bad[3] = f32::NAN;
        save_one(dir.path(), &bad, &opt, 3);
        assert!(
            load_params(dir.path(), &layout)
                .unwrap_err()
                .to_string()
                .contains("finite")
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_params(empty.path(), &layout),
            Err(Error::Missing { .. })
        ));
    }
}
