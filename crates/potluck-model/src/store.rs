//! Named tensors on disk as safetensors, readable by PyTorch's `safetensors.torch.load_file`,
//! with the model's configuration in the file's metadata so a file describes itself. Files are
//! written atomically (temp file, fsync, rename).

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use tch::{Kind, Tensor, nn::VarStore};

use crate::Error;

/// Largest weights file we read.
const MAX_FILE_BYTES: u64 = 64 << 30;

fn format_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Writes every variable of `vs` (as f32) and `metadata` to `path`.
pub fn save(vs: &VarStore, path: &Path, metadata: HashMap<String, String>) -> Result<(), Error> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut buffers = Vec::with_capacity(named.len());
    for (name, tensor) in &named {
        let flat = tensor
            .to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .contiguous()
            .view(-1);
        let values = Vec::<f32>::try_from(&flat)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), shape, bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| format_error(path, e.to_string()))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| format_error(path, e.to_string()))?;
    potluck_core::file::write_atomic(path, &bytes)?;
    Ok(())
}

/// Reads the metadata of a weights file (its configuration), bounding the size first.
pub fn read_metadata(path: &Path) -> Result<(Vec<u8>, HashMap<String, String>), Error> {
    let bytes = potluck_core::file::read_limited(path, MAX_FILE_BYTES)?;
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| format_error(path, e.to_string()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    Ok((bytes, metadata))
}

/// Copies the tensors of a file (as read by [`read_metadata`]) into the variables of `vs`: every
/// variable must be present with its exact shape, and no tensor may be left over.
pub fn load_into(vs: &VarStore, bytes: &[u8], path: &Path) -> Result<(), Error> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format_error(path, e.to_string()))?;
    let vars = vs.variables();
    if st.len() != vars.len() {
        return Err(format_error(
            path,
            format!(
                "{} tensors in the file, the model has {}",
                st.len(),
                vars.len()
            ),
        ));
    }
    tch::no_grad(|| {
        for (name, var) in &vars {
            let view = st
                .tensor(name)
                .map_err(|_| format_error(path, format!("tensor {name} missing")))?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if view.dtype() != Dtype::F32 || shape != var.size() {
                return Err(format_error(
                    path,
                    format!(
                        "tensor {name} is {:?} {:?}, the model wants F32 {:?}",
                        view.dtype(),
                        view.shape(),
                        var.size()
                    ),
                ));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let src = Tensor::from_slice(&values).view(shape.as_slice());
            let mut var = var.shallow_clone();
            var.f_copy_(&src.to_device(var.device()))?;
        }
        Ok(())
    })
}
