//! `potluck authority init|grant|revoke`: a run's authority (an ed25519 key kept offline) and the
//! signed, expiring tokens that let peers into an authorized run (the flags by which a peer takes
//! part in one are `joining::AuthArgs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use potluck_core::clock;
use potluck_net::auth::{Authority, Gate, Role, Verifier};
use potluck_net::dht::Dht;
use potluck_net::host;

#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum Command {
    /// Make a run's authority: a key that signs its tokens (keep it offline).
    Init(InitArgs),
    /// Sign a token that lets one peer into the run, in one role, for a while.
    Grant(GrantArgs),
    /// Revoke peers: publish the authority's signed list in the run's DHT.
    Revoke(RevokeArgs),
    /// Publish the run's charter: the tokenizers its data must be encoded with, signed.
    Charter(CharterArgs),
    /// Write invite codes for the invite server.
    Invite(super::invite::InviteArgs),
    /// Hand tokens over HTTP to peers that present an invite code.
    Serve(super::invite::ServeArgs),
    /// Get a token from an invite server with an invite code.
    Request(super::invite::RequestArgs),
}

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck authority init --run-id shapes1 --out authority.key\n\
                        Then grant each peer a token: potluck authority grant --help"
)]
pub(crate) struct InitArgs {
    /// The run's name.
    #[arg(long)]
    pub(crate) run_id: String,
    /// Where to write the authority's key (never overwritten; mode 0600).
    #[arg(long, default_value = "authority.key")]
    pub(crate) out: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck authority grant --run-id shapes1 --peer 12D3KooW… --role trainer \
                  --ttl 6h --out peer1.token\n\
                  The peer's id is what `potluck keygen --out id.key` printed; the peer joins with \
                  --identity id.key --authority KEY --token peer1.token"
)]
pub(crate) struct GrantArgs {
    /// The authority's key file (from `potluck authority init`).
    #[arg(long, default_value = "authority.key")]
    pub(crate) key: PathBuf,
    /// The run's name.
    #[arg(long)]
    pub(crate) run_id: String,
    /// The peer id the token is for.
    #[arg(long)]
    pub(crate) peer: String,
    /// trainer, aux or monitor (a monitor reads the run and contributes nothing).
    #[arg(long, default_value = "trainer")]
    pub(crate) role: Role,
    /// How long the token is valid: e.g. 90m, 6h, 2d (at most 30 days).
    #[arg(long, default_value = "6h", value_parser = parse_ttl)]
    pub(crate) ttl: Duration,
    /// Where to write the token (stdout if not given).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck authority revoke --key authority.key --run-id shapes1 \
                  --peer 12D3KooW… --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW…\n\
                  Every peer of the run reads the list within 30 s and cuts the revoked peers off"
)]
pub(crate) struct RevokeArgs {
    /// The authority's key file (from `potluck authority init`).
    #[arg(long, default_value = "authority.key")]
    pub(crate) key: PathBuf,
    /// The run's name.
    #[arg(long)]
    pub(crate) run_id: String,
    /// A peer id to revoke (repeat for several); the list already published is kept.
    #[arg(long, required = true)]
    pub(crate) peer: Vec<String>,
    /// Peers of the run to publish through.
    #[arg(long, required = true, num_args = 1.., value_delimiter = ',')]
    pub(crate) initial_peers: Vec<String>,
}

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck authority charter --key authority.key --run-id shapes1 \
                  --data data/shapes --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW…\n\
                  Peers whose data was encoded with other tokenizers are refused from then on; \
                  newcomers take these with `potluck prepare --from-run`. Every peer steps with \
                  the optimizer settings given here (--optimizer, --lr, --state, --warmup, \
                  --decay-steps, --weight-decay; without --decay-steps the rate never decays)"
)]
pub(crate) struct CharterArgs {
    /// The authority's key file (from `potluck authority init`).
    #[arg(long, default_value = "authority.key")]
    pub(crate) key: PathBuf,
    /// The run's name.
    #[arg(long)]
    pub(crate) run_id: String,
    /// A directory written by `potluck prepare` whose tokenizers the run trains with.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// The run's optimizer settings (every peer steps with these, whatever its own flags).
    #[command(flatten)]
    pub(crate) optim: crate::cmd::train::OptimArgs,
    /// Peers of the run to publish through.
    #[arg(long, required = true, num_args = 1.., value_delimiter = ',')]
    pub(crate) initial_peers: Vec<String>,
}

/// A duration like `90m`, `6h`, `2d` or `3600s`.
pub(crate) fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: a number and a unit, e.g. 6h"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    let secs = n.saturating_mul(unit);
    let ttl = Duration::from_secs(secs);
    if ttl.is_zero() || ttl > potluck_net::auth::MAX_TTL {
        return Err(format!("{s:?}: between 1 s and 30 days"));
    }
    Ok(ttl)
}

pub(crate) fn run(command: Command) -> Result<()> {
    match command {
        Command::Init(args) => init(args),
        Command::Grant(args) => grant(args),
        Command::Revoke(args) => revoke(args),
        Command::Charter(args) => charter(args),
        Command::Invite(args) => super::invite::invite(args),
        Command::Serve(args) => super::invite::serve(args),
        Command::Request(args) => super::invite::request(args),
    }
}

fn init(args: InitArgs) -> Result<()> {
    let authority = Authority::generate();
    authority.save(&args.out)?;
    println!("run: {}", args.run_id);
    println!("authority: {}", authority.public());
    println!(
        "key written to {} (keep it offline: whoever holds it can let anyone in)",
        args.out.display()
    );
    println!(
        "peers join with --run-id {} --authority {} --token FILE; grant tokens with \
         `potluck authority grant --key {} --run-id {} --peer PEER_ID`",
        args.run_id,
        authority.public(),
        args.out.display(),
        args.run_id
    );
    Ok(())
}

fn grant(args: GrantArgs) -> Result<()> {
    let authority = Authority::load(&args.key)?;
    let peer: PeerId = args.peer.parse().with_context(|| {
        format!(
            "{:?} is not a peer id (e.g. 12D3KooW…, as `potluck keygen` prints)",
            args.peer
        )
    })?;
    let token = authority.grant(&args.run_id, peer, args.role, args.ttl);
    match &args.out {
        Some(path) => {
            std::fs::write(path, token.to_text())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "token for {peer} ({}, run {}, {}) written to {}",
                args.role,
                args.run_id,
                potluck_core::clock::humanize(args.ttl.as_secs()),
                path.display()
            );
        }
        None => print!("{}", token.to_text()),
    }
    Ok(())
}

/// Joins `run` for a moment through `initial_peers`, as a client with a ten-minute aux token
/// the authority grants itself (to publish what only the authority signs).
fn join_briefly(
    authority: &Authority,
    run: &str,
    initial_peers: &[String],
) -> Result<(tokio::runtime::Runtime, Dht, Verifier)> {
    let keypair = Keypair::generate_ed25519();
    let me = keypair.public().to_peer_id();
    let token = authority.grant(run, me, Role::Aux, Duration::from_secs(600));
    let verifier = Verifier {
        run: run.to_owned(),
        authority: authority.public(),
    };
    let mut host_config = host::Config::new(keypair, host::Transports::Network);
    host_config.listen = vec!["/ip4/0.0.0.0/tcp/0".parse()?];
    host_config.client_mode = host::ClientMode::On;
    host_config.auth = Some(Arc::new(Gate::new(verifier.clone(), token)));
    let config = potluck_net::dht::Config {
        client_mode: host::ClientMode::On,
        ..potluck_net::dht::Config::default()
    };
    let initial = crate::cmd::joining::parse_addrs(initial_peers)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dht = rt.block_on(async {
        let dht = Dht::start(host_config, config, potluck_train::records::validators()).await?;
        dht.bootstrap(&initial)
            .await
            .context("reaching the run through --initial-peers")?;
        anyhow::Ok(dht)
    })?;
    Ok((rt, dht, verifier))
}

/// Publishes the run's charter: the tokenizers of `--data` and the optimizer settings of the
/// flags, signed by the authority.
fn charter(args: CharterArgs) -> Result<()> {
    use potluck_train::{charter, tokenizers};
    let authority = Authority::load(&args.key)?;
    let optimizer = crate::cmd::train::optimizer_config(&args.optim, None)?;
    optimizer.check().map_err(anyhow::Error::msg)?;
    let data = potluck_data::tokens::TokenSet::open(&args.data)
        .with_context(|| format!("opening prepared data {}", args.data.display()))?;
    let id = crate::cmd::joining::tokenizers_of(&data)?.id();
    let (rt, dht, _) = join_briefly(&authority, &args.run_id, &args.initial_peers)?;
    rt.block_on(async {
        let expires = clock::now() + potluck_net::revoke::LIFETIME.as_millis() as u64;
        let chartered = charter::new(&args.run_id, id, optimizer);
        let signed = charter::sign(&authority, &chartered, expires);
        let stored = dht
            .store_record(signed)
            .await
            .context("publishing the charter")?;
        println!(
            "run {}: chartered tokenizers {} (of {}) and optimizer {}; the charter is on \
             {stored} peers and lives {} (publish it again to keep it)",
            args.run_id,
            tokenizers::short(&id),
            args.data.display(),
            crate::cmd::joining::describe(&optimizer),
            potluck_core::clock::humanize(potluck_net::revoke::LIFETIME.as_secs())
        );
        Ok(())
    })
}

/// Joins the run for a moment (with a short token the authority grants itself), adds `peer`s
/// to the published revocation list and publishes it.
fn revoke(args: RevokeArgs) -> Result<()> {
    use potluck_net::revoke;
    let authority = Authority::load(&args.key)?;
    let mut peers = Vec::new();
    for p in &args.peer {
        let peer: PeerId = p
            .parse()
            .with_context(|| format!("{p:?} is not a peer id (e.g. 12D3KooW…)"))?;
        peers.push(peer);
    }
    // The invite server refuses them from now on, whether or not the run can be reached.
    super::invite::record_revoked(&args.key, &args.run_id, &peers)?;
    let (rt, dht, verifier) = join_briefly(&authority, &args.run_id, &args.initial_peers)?;
    rt.block_on(async {
        let mut list = revoke::fetch(&dht, &verifier)
            .await
            .context("reading the published list")?;
        let before = list.len();
        for peer in peers {
            if !list.contains(&peer) {
                list.push(peer);
            }
        }
        if list.len() > revoke::MAX_REVOKED {
            bail!(
                "{} peers would be revoked, over the limit of {}: start a new run (a new \
                 authority) instead",
                list.len(),
                revoke::MAX_REVOKED
            );
        }
        let expires = clock::now() + revoke::LIFETIME.as_millis() as u64;
        let stored = dht
            .store_record(authority.revocations(&args.run_id, &list, expires))
            .await
            .context("publishing the list")?;
        println!(
            "revoked {} peers in run {} ({} new); the list is on {stored} peers and lives {} \
             (revoke again to republish it)",
            list.len(),
            args.run_id,
            list.len() - before,
            potluck_core::clock::humanize(revoke::LIFETIME.as_secs())
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_their_units_and_bounds() {
        assert_eq!(parse_ttl("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("6h"), Ok(Duration::from_secs(21_600)));
        assert_eq!(parse_ttl("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_ttl("6").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("31d").is_err());
        assert!(parse_ttl("99999999999999999d").is_err());
    }
}
