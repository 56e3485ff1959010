//! Drawing with the newest checkpoint. The monitor watches a checkpoint directory (an aux
//! peer's `--checkpoint-dir`, or one checkpoint); when a newer one appears it loads it, draws
//! the sample prompts, scores the model on prompts of the `shapes` grammar when the run trains
//! on `shapes`, keeps the images and the score in the history, and answers prompts from the
//! dashboard's form with it.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use image::RgbImage;
use potluck_core::{clock, lock};
use potluck_model::dalle::Sampling;
use potluck_train::checkpoint;

use super::store::{MAX_PNG, SampleSet, Store};
use super::watch::{Eval, Line, Watch};
use crate::cmd::{eval, run};

/// Subdirectories looked at for checkpoints, at most.
const MAX_ENTRIES: usize = 10_000;
/// Seed of the sample grid and of the scored prompts (the same every time, so checkpoints
/// compare).
const SEED: u64 = 7;

/// What to draw and how often to look.
#[derive(Debug, Clone)]
pub(super) struct Drawing {
    pub(super) checkpoints: PathBuf,
    pub(super) prompts: Vec<String>,
    pub(super) eval_prompts: usize,
    pub(super) temperature: f64,
    pub(super) every: Duration,
}

/// The model the monitor draws with, and the epoch of its checkpoint.
pub(super) struct Model {
    pub(super) loaded: run::Loaded,
    pub(super) epoch: u64,
    /// The run trains on `shapes`: its images can be scored.
    shapes: bool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("epoch", &self.epoch).finish()
    }
}

/// The model, shared by the drawing loop and the prompt form's requests.
pub(super) type Slot = Arc<tokio::sync::Mutex<Option<Model>>>;

/// The epoch a checkpoint holds: what its writer put in the manifest (aux peers and swarm
/// peers do), else its optimizer steps.
fn epoch_of(m: &checkpoint::Manifest) -> u64 {
    m.extra
        .get("epoch")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(m.step)
}

/// The newest complete checkpoint: `root` itself, or the one of its subdirectories with the
/// highest epoch (an aux peer's `epoch-NNNNNNN`).
pub(super) fn newest(root: &Path) -> Option<(PathBuf, u64)> {
    if let Ok(m) = checkpoint::read_manifest(root) {
        return Some((root.to_path_buf(), epoch_of(&m)));
    }
    std::fs::read_dir(root)
        .ok()?
        .take(MAX_ENTRIES)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter_map(|p| {
            let m = checkpoint::read_manifest(&p).ok()?;
            Some((p, epoch_of(&m)))
        })
        .max_by_key(|(_, epoch)| *epoch)
}

/// Loads a checkpoint to draw with (on the CPU).
fn load(dir: &Path) -> Result<Model> {
    let loaded = run::load(dir, potluck_model::tch::Device::Cpu)?;
    let epoch = epoch_of(&loaded.manifest);
    let shapes = loaded
        .manifest
        .extra
        .get("data")
        .and_then(serde_json::Value::as_str)
        .and_then(|data| potluck_data::tokens::TokenSet::open(Path::new(data)).ok())
        .is_some_and(|d| d.manifest.dataset == "shapes");
    Ok(Model {
        loaded,
        epoch,
        shapes,
    })
}

fn png(image: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// Draws the sample prompts and scores the model.
fn draw_set(model: &Model, d: &Drawing) -> Result<(SampleSet, Eval)> {
    let sampling = Sampling {
        seed: SEED,
        temperature: d.temperature,
        ..Sampling::default()
    };
    let images = run::draw(&model.loaded, &d.prompts, &sampling)?;
    let images = d
        .prompts
        .iter()
        .zip(&images)
        .map(|(p, i)| Ok((p.clone(), png(i)?)))
        .collect::<Result<Vec<_>>>()?;
    let accuracy = if model.shapes && d.eval_prompts > 0 {
        let (a, _, _) = eval::score_loaded(&model.loaded, d.eval_prompts, &sampling)?;
        Some(a.overall)
    } else {
        None
    };
    let set = SampleSet {
        epoch: model.epoch,
        images,
    };
    let eval = Eval {
        epoch: model.epoch,
        time: clock::now(),
        accuracy,
        prompts: if accuracy.is_some() {
            d.eval_prompts
        } else {
            0
        },
    };
    Ok((set, eval))
}

/// Draws one image for a prompt from the dashboard's form.
pub(super) fn draw_one(
    model: &Model,
    prompt: &str,
    seed: u64,
    temperature: f64,
) -> Result<Vec<u8>> {
    let sampling = Sampling {
        seed,
        temperature,
        ..Sampling::default()
    };
    let images = run::draw(&model.loaded, &[prompt.to_owned()], &sampling)?;
    let image = images.first().context("the model drew nothing")?;
    png(image)
}

/// Looks for a newer checkpoint every `d.every`; loads it, draws and scores, and keeps what it
/// drew (in `watch` and the history). The first model is loaded even when the history already
/// holds its drawings (after a restart), for the prompt form.
pub(super) async fn keep_drawing(
    d: Drawing,
    slot: Slot,
    watch: Arc<Mutex<Watch>>,
    store: Arc<Mutex<Store>>,
) {
    let mut tick = tokio::time::interval(d.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some((dir, epoch)) = newest(&d.checkpoints) else {
            continue;
        };
        let have = slot.lock().await.as_ref().map(|m| m.epoch);
        if have == Some(epoch) {
            continue;
        }
        let drawn = lock(&watch).samples.epoch;
        let (dd, shown) = (d.clone(), dir.display().to_string());
        let job = tokio::task::spawn_blocking(move || -> Result<_> {
            let model = load(&dir)?;
            let set = if model.epoch == drawn {
                None
            } else {
                Some(draw_set(&model, &dd)?)
            };
            Ok((model, set))
        });
        let (model, set) = match job.await.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(done) => done,
            Err(e) => {
                // A checkpoint being written or pruned as it was read: the next look retries.
                let why = format!("drawing with {shown}: {e:#}");
                tracing::warn!("{why}");
                lock(&watch).samples_error = Some(why);
                continue;
            }
        };
        if let Some((set, eval)) = set {
            tracing::info!(
                "drew {} samples with the checkpoint of epoch {}{}",
                set.images.len(),
                set.epoch,
                eval.accuracy
                    .map_or(String::new(), |a| format!(", accuracy {a:.3}"))
            );
            let kept = {
                let mut s = lock(&store);
                s.put_samples(&set)
                    .and_then(|()| s.append(&[Line::Eval(eval.clone())]))
            };
            if let Err(e) = kept {
                tracing::warn!("keeping the samples: {e:#}");
            }
            let mut w = lock(&watch);
            w.samples = set;
            w.take(Line::Eval(eval));
            w.samples_error = None;
        }
        *slot.lock().await = Some(model);
    }
}

/// The PNG of sample `i` of the set drawn at `epoch`, if that is the newest set.
pub(super) fn sample_png(watch: &Watch, epoch: u64, i: usize) -> Option<Vec<u8>> {
    if watch.samples.epoch != epoch {
        return None;
    }
    let png = &watch.samples.images.get(i)?.1;
    (png.len() <= MAX_PNG).then(|| png.clone())
}
