//! `potluck`: train one text-to-image transformer together over the Internet.
//!
//! One binary, one subcommand per job; see `potluck --help`. Errors are reported with what to do
//! next and map to exit code 1 (2 for bad command-line usage, from clap).

mod cmd;
mod config_file;
mod progress;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Pool your hardware with others to train one shared text-to-image transformer.
#[derive(Debug, Parser)]
#[command(name = "potluck", version, about, long_about = None)]
#[command(after_help = "Start with `potluck demo`; each command has its own --help.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (e.g. `info`, `potluck=debug`); also from RUST_LOG.
    #[arg(long, global = true, default_value = "info,libp2p_swarm=warn")]
    log: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the built-in demo on the embedded `shapes` data set (a good first command).
    Demo(cmd::demo::Args),
    /// Train the tokenizers on a data set and encode it into token shards for training.
    Prepare(Box<cmd::prepare::Args>),
    /// Train the transformer with a swarm (`--run-id`), or on this machine alone (`--solo`).
    Train(Box<cmd::train::Args>),
    /// Help a run without computing: average, serve its state, keep rolling checkpoints.
    Aux(Box<cmd::aux::Args>),
    /// Watch a run: gather its peers' metrics, keep the history, serve a web dashboard.
    Monitor(Box<cmd::monitor::Args>),
    /// Draw images for text prompts with a trained checkpoint.
    Generate(cmd::generate::Args),
    /// Score a checkpoint trained on `shapes`: per-slot and overall accuracy of its drawings.
    Eval(cmd::eval::Args),
    /// Make a peer identity file (an ed25519 key), so a peer keeps its id across restarts.
    Keygen(cmd::keygen::Args),
    /// Print the parameter counts of a model preset as built (unique and effective).
    ModelInfo(cmd::model_info::Args),
    /// An authorized run: its authority's key and the tokens that let peers in.
    #[command(subcommand)]
    Authority(cmd::authority::Command),
    /// Run a DHT bootstrap node, or read and write a live run's DHT (`serve`, `put`, `get`).
    #[command(subcommand)]
    Dht(cmd::dht::Command),
    /// Measure speed and memory (`bench train`).
    #[command(subcommand)]
    Bench(cmd::bench::Bench),
}

fn main() -> ExitCode {
    let argv = match config_file::expand(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    let filter = std::env::var("RUST_LOG").unwrap_or(cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Prepare(args) => cmd::prepare::run(*args),
        Command::Train(args) => cmd::train::run(*args),
        Command::Aux(args) => cmd::aux::run(*args),
        Command::Monitor(args) => cmd::monitor::run(*args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Keygen(args) => cmd::keygen::run(args),
        Command::ModelInfo(args) => cmd::model_info::run(args),
        Command::Bench(bench) => cmd::bench::run(bench),
        Command::Dht(command) => cmd::dht::run(command),
        Command::Authority(command) => cmd::authority::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_flag_keeps_every_value_and_a_single_one_takes_the_last() {
        let cli = Cli::try_parse_from([
            "potluck",
            "train",
            "--data",
            "d",
            "--out",
            "o",
            "--steps",
            "5",
            "--listen",
            "/a",
            "--listen",
            "/b",
            "--initial-peers",
            "/c",
            "--initial-peers",
            "/d,/e",
            "--steps",
            "9",
        ])
        .unwrap();
        let Command::Train(args) = cli.command else {
            panic!("not train")
        };
        assert_eq!(args.swarm.net.listen, ["/a", "/b"]);
        assert_eq!(args.swarm.net.initial_peers, ["/c", "/d", "/e"]);
        assert_eq!(args.steps, Some(9));
    }
}
