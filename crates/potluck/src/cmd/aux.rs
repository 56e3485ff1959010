//! `potluck aux`: a peer that computes nothing. It keeps the swarm's state (it averages with
//! every group as an auxiliary member: it reduces a part and adds no weight), serves it to
//! newcomers, and keeps a rolling set of checkpoints of it, from which a whole swarm can be
//! restarted (`potluck train --init DIR`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use potluck_allreduce::balance::Mode;
use potluck_core::clock;
use potluck_data::tokens::TokenSet;
use potluck_model::Device;
use potluck_model::dalle::{Dalle, TokenBatch};
use potluck_net::host::ClientMode;
use potluck_train::collab::{Collab, Net, Tick};
use potluck_train::optim::Optimizer;
use serde_json::json;

use crate::cmd::joining::{
    NetArgs, follow_charter, join_failed, publish_metrics, run_seed, start_dht,
};
use crate::cmd::run;
use crate::cmd::together::{RunArgs, collab_settings, init_from};
use crate::cmd::train::{OptimArgs, model_config, optimizer_config, save_state};

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck aux --run-id shapes1 --data data/shapes \
                        --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW… \
                        --checkpoint-dir runs/aux --keep 3"
)]
pub(crate) struct Args {
    /// The run to help.
    #[arg(long)]
    pub(crate) run_id: String,
    #[command(flatten)]
    pub(crate) net: NetArgs,
    #[command(flatten)]
    pub(crate) run: RunArgs,
    /// A directory written by `potluck prepare` (the model's shapes and the tokenizers that go
    /// into each checkpoint).
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Model preset of the run.
    #[arg(long, default_value = "small")]
    pub(crate) config: String,
    /// The run's optimizer (what a swarm this peer starts takes; joining one, the swarm's).
    #[command(flatten)]
    pub(crate) optim: OptimArgs,
    /// Where checkpoints go: one directory per kept epoch, `epoch-NNNNNNN`.
    #[arg(long)]
    pub(crate) checkpoint_dir: PathBuf,
    /// Checkpoints kept (the oldest go first).
    #[arg(long, default_value_t = 3)]
    pub(crate) keep: usize,
    /// Epochs between checkpoints.
    #[arg(long, default_value_t = 10)]
    pub(crate) every: u64,
    /// Stop after this global epoch (default: run until interrupted).
    #[arg(long)]
    pub(crate) epochs: Option<u64>,
    /// Start a new swarm from this checkpoint if none is running.
    #[arg(long)]
    pub(crate) init: Option<PathBuf>,
}

pub(crate) fn run(args: Args) -> Result<()> {
    // It computes nothing but the state's arithmetic: one kernel thread is plenty.
    crate::cmd::train::set_threads(Some(1));
    let data = TokenSet::open(&args.data)
        .with_context(|| format!("opening prepared data {}", args.data.display()))?;
    let config = model_config(&args.config, &data, false)?;
    // The same initial weights as the run's trainers (with the default --seed).
    potluck_model::tch::manual_seed(run_seed(&args.run_id, 0) as i64);
    let mut model = Dalle::new(config, Device::Cpu.tch()?)?;
    // A swarm this peer starts takes these settings (the first peer's); joining one, the
    // swarm's replace them; the run's charter, where its authority published one, fixes them.
    let cfg = args
        .run
        .state_optimizer(optimizer_config(&args.optim, args.epochs)?)?;
    let mut optimizer = Optimizer::new(cfg, potluck_core::Trainable::layout(&model));
    if let Some(dir) = &args.init {
        init_from(dir, &mut model, &mut optimizer)?;
    }
    std::fs::create_dir_all(&args.checkpoint_dir)
        .with_context(|| format!("creating {}", args.checkpoint_dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(args, data, model, optimizer))
}

async fn serve(
    mut args: Args,
    data: TokenSet,
    model: Dalle,
    mut optimizer: Optimizer,
) -> Result<()> {
    args.net.client_mode = reachable(args.net.client_mode)?;
    let (dht, keypair) = start_dht(&args.run_id, &args.net).await?;
    let net = Net::start(dht.clone(), keypair.clone())?;
    // An aux peer takes no inner steps: the inner optimizer is there for the recipe alone.
    let inner = optimizer_config(&args.optim, args.epochs)?;
    let mut settings = collab_settings(&args.run_id, &args.run, inner, 1);
    settings.mode = Mode::Auxiliary;
    follow_charter(
        &dht,
        &data,
        &mut settings,
        &mut optimizer,
        potluck_core::Trainable::layout(&model),
        &args.net,
    )
    .await?;
    let mut peer = Collab::join(model, optimizer, net, settings)
        .await
        .map_err(|e| join_failed(e, &args.run_id, &args.net, &data))?;
    println!(
        "aux for run {}: at epoch {}, checkpoints every {} epochs into {}",
        args.run_id,
        peer.epoch(),
        args.every,
        args.checkpoint_dir.display()
    );
    let started = Instant::now();
    let mut interrupt = super::Interrupt::new()?;
    let mut never = |_: usize| -> Result<TokenBatch, Box<dyn std::error::Error + Send + Sync>> {
        Err("an aux peer computes nothing".into())
    };
    loop {
        if let Some(n) = args.epochs {
            if peer.epoch() >= n {
                break;
            }
            // The swarm got there without this peer (it missed the last averaging) and left
            // before it could download that state: nobody is left to get it from.
            if peer.swarm_epoch() >= n && peer.alone() {
                let epoch = peer.epoch();
                let dir = checkpoint(&args, &peer, epoch, started)?;
                anyhow::bail!(
                    "the swarm reached epoch {} and left before this aux peer could download \
                     that state; its own last state, epoch {epoch}, is in {}",
                    peer.swarm_epoch(),
                    dir.display()
                );
            }
        }
        let tick = tokio::select! {
            tick = peer.tick(&mut never) => tick?,
            () = interrupt.recv() => break,
        };
        let epoch = match tick {
            Tick::Epoch(r) if !r.skipped || r.group > 0 => r.epoch,
            Tick::Synced(_, epoch) => {
                println!("downloaded the swarm's state at epoch {epoch}");
                epoch
            }
            _ => continue,
        };
        let traffic = peer.traffic();
        let m = potluck_train::metrics::Metrics {
            epoch: peer.epoch(),
            loss: None,
            samples: 0,
            samples_per_second: 0.0,
            device: String::new(),
            role: "aux".into(),
            uptime_s: started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").into(),
            client: false,
            alone_epochs: peer.alone_epochs(),
            stalled_s: 0,
            strangers: (peer.strangers().len() + peer.misfits().len()) as u64,
            recipe: peer.recipe(),
            sent: traffic.sent,
            received: traffic.received,
            computing: 0.0,
            time: clock::now(),
        };
        publish_metrics(&dht, &keypair, &args.run_id, m);
        if epoch > 0 && epoch.is_multiple_of(args.every) {
            let dir = checkpoint(&args, &peer, epoch, started)?;
            println!("epoch {epoch}: checkpoint {}", dir.display());
        }
    }
    let epoch = peer.epoch();
    let dir = checkpoint(&args, &peer, epoch, started)?;
    println!("stopped at epoch {epoch}: checkpoint {}", dir.display());
    Ok(())
}

/// Writes the state of `epoch` into `DIR/epoch-NNNNNNN` and drops the oldest beyond `--keep`.
fn checkpoint(args: &Args, peer: &Collab<Dalle>, epoch: u64, started: Instant) -> Result<PathBuf> {
    let dir = args.checkpoint_dir.join(format!("epoch-{epoch:07}"));
    run::copy_tokenizers(&args.data, &dir)?;
    save_state(
        &dir,
        peer.model(),
        peer.params(),
        peer.optimizer(),
        peer.swarm_samples(),
        json!({
            "run_id": args.run_id,
            "epoch": epoch,
            "data": args.data,
            "seconds": started.elapsed().as_secs_f64(),
        }),
    )?;
    prune(&args.checkpoint_dir, args.keep.max(1))?;
    Ok(dir)
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("epoch-"))
        })
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep);
    for old in &dirs[..excess] {
        std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

/// An aux peer exists to serve: it reduces parts for the others and holds the DHT's records, so
/// it always serves (`auto` means `off`: a reachability probe that fails on a loaded machine
/// must not turn the swarm's helper into a client), and cannot be a client.
fn reachable(mode: ClientMode) -> Result<ClientMode> {
    match mode {
        ClientMode::On => anyhow::bail!(
            "an aux peer cannot be a client: it reduces parts for the others, who must reach it \
             (run it where it has a public address, or run `potluck train --client-mode on`)"
        ),
        ClientMode::Auto | ClientMode::Off => Ok(ClientMode::Off),
    }
}
