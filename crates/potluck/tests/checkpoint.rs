//! A model saved by the training layer's checkpoint loads back into a fresh model unchanged
//! (moved here from potluck-model, so the model's tests need not build the training stack).

use potluck_core::Trainable;
use potluck_model::dalle::{Config, Dalle, Sampling};
use potluck_model::tch;
use potluck_train::checkpoint::{Save, load_params, save};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::collab::{TOKENS, batch};

#[test]
fn a_saved_checkpoint_loads_into_a_model_with_identical_outputs() {
    tch::manual_seed(6);
    let mut a = Dalle::new(Config::tiny(TOKENS), tch::Device::Cpu).unwrap();
    let mut flat = vec![0.0; a.layout().numel()];
    a.read_params(&mut flat).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save(
        dir.path(),
        Save {
            layout: a.layout(),
            params: &flat,
            optimizer: None,
            samples: 0,
            model_meta: Default::default(),
            extra: serde_json::Value::Null,
        },
    )
    .unwrap();
    tch::manual_seed(7);
    let mut b = Dalle::new(Config::tiny(TOKENS), tch::Device::Cpu).unwrap();
    let batch = batch(&mut ChaCha8Rng::seed_from_u64(3), 3);
    assert_ne!(a.evaluate(&batch).unwrap(), b.evaluate(&batch).unwrap());
    let (_, loaded) = load_params(dir.path(), b.layout()).unwrap();
    b.write_params(&loaded).unwrap();
    assert_eq!(a.evaluate(&batch).unwrap(), b.evaluate(&batch).unwrap());
    let s = Sampling {
        seed: 2,
        ..Sampling::default()
    };
    let prompts = vec![vec![1u16, 2, 3, 4, 1, 0]];
    assert_eq!(
        a.generate(&prompts, &s).unwrap(),
        b.generate(&prompts, &s).unwrap()
    );
}
