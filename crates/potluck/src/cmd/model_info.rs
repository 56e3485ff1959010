//! `potluck model-info`: the parameter counts of a model as built.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use potluck_data::tokens::TokenSet;
use potluck_model::dalle::{Config, Dalle};
use potluck_model::tch;

use crate::cmd::bench::shapes_tokens;
use crate::cmd::train::model_config;

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example: potluck model-info --config dalle-1.1b")]
pub(crate) struct Args {
    /// Model preset (tiny, small, gpt, dalle-1.1b).
    #[arg(long)]
    pub(crate) config: String,
    /// Prepared data whose token shapes `tiny` and `small` take [default: the shapes defaults].
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Print one JSON object (the configuration and the counts).
    #[arg(long)]
    pub(crate) json: bool,
}

/// The counts of a built model: unique (stored, sent) and effective (as if unshared).
pub(crate) fn counts(model: &Dalle) -> (usize, usize) {
    let cfg = model.config();
    let mut uses: HashMap<usize, usize> = HashMap::new();
    for layer in 0..cfg.layers {
        *uses.entry(layer % cfg.blocks.len()).or_default() += 1;
    }
    let mut unique = 0;
    let mut effective = 0;
    for e in model.layout().entries() {
        let n = e.numel();
        unique += n;
        let block = e
            .name
            .strip_prefix("blocks.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|u| u.parse::<usize>().ok());
        effective += n * block.map_or(1, |u| uses.get(&u).copied().unwrap_or(0));
    }
    (unique, effective)
}

pub(crate) fn run(args: Args) -> Result<()> {
    let config = match &args.data {
        Some(dir) => model_config(&args.config, &TokenSet::open(dir)?, false)?,
        None => Config::preset(&args.config, Some(shapes_tokens()))
            .or_else(|_| Config::preset(&args.config, None))?,
    };
    let model = Dalle::new(config, tch::Device::Cpu)?;
    let (unique, effective) = counts(&model);
    let cfg = model.config();
    if args.json {
        let json = serde_json::json!({
            "config": cfg,
            "unique_params": unique,
            "effective_params": effective,
        });
        println!("{json}");
        return Ok(());
    }
    println!(
        "{}: {} layers on {} unique blocks ({}), d_model {}, {} heads, GEGLU x{}, text {} of {}, \
         image {}x{} of {}",
        cfg.name,
        cfg.layers,
        cfg.blocks.len(),
        cfg.blocks
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        cfg.d_model,
        cfg.heads,
        cfg.ff_mult,
        cfg.tokens.text_len,
        cfg.tokens.text_vocab,
        cfg.tokens.image_grid,
        cfg.tokens.image_grid,
        cfg.tokens.image_vocab
    );
    println!("unique_params: {unique}");
    println!("effective_params: {effective}");
    Ok(())
}
