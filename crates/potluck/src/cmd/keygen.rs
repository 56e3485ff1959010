//! `potluck keygen`: make a peer identity file (an ed25519 key).

use std::path::PathBuf;

use anyhow::Result;

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example: potluck keygen --out id.key\n\
                        Pass it as --identity id.key so the peer keeps its id across restarts.")]
pub(crate) struct Args {
    /// Where to write the key (never overwritten).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let key = potluck_net::identity::generate();
    potluck_net::identity::save(&key, &args.out)?;
    println!("peer id: {}", key.public().to_peer_id());
    println!("identity written to {}", args.out.display());
    Ok(())
}
