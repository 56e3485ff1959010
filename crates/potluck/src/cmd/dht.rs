//! `potluck dht serve|put|get`: a bootstrap node for a run, and debugging access to a live DHT.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use potluck_core::clock;
use potluck_net::dht::record::Subkey;
use potluck_net::dht::store::Entry;
use potluck_net::dht::{Config, Dht};
use potluck_net::host::{self, Transports};
use potluck_net::identity;

use crate::cmd::joining::{join, parse_addrs, start_node};

#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum Command {
    /// Run a bootstrap node (a DHT server) and print the addresses others join through.
    Serve(ServeArgs),
    /// Store a value in a live DHT (as a client: this process is gone afterwards).
    Put(PutArgs),
    /// Read a key from a live DHT.
    Get(GetArgs),
    /// Measure the link to a peer: bytes over a bulk stream, direct or through a relay.
    Probe(ProbeArgs),
}

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck dht serve --listen /ip4/0.0.0.0/tcp/31337 \
                        --identity bootstrap.key"
)]
pub(crate) struct ServeArgs {
    /// Address to listen on (repeat for several) [default: every interface, a free TCP port
    /// and a free QUIC port].
    #[arg(long)]
    pub(crate) listen: Vec<String>,
    /// Identity file: created if missing, so the node keeps its peer id across restarts.
    #[arg(long)]
    pub(crate) identity: Option<PathBuf>,
    /// Peers of an existing DHT to join (full multiaddrs ending in /p2p/PEER_ID; repeat or
    /// separate with commas).
    #[arg(long, value_delimiter = ',')]
    pub(crate) initial_peers: Vec<String>,
    /// auto: serve while others can reach this node, become a client (and listen through a
    /// relay) when they cannot; on: always a client; off: always serve.
    #[arg(long, default_value = "off", value_parser = parse_client_mode)]
    pub(crate) client_mode: host::ClientMode,
    /// Don't serve as a relay for peers behind NATs.
    #[arg(long)]
    pub(crate) no_relay: bool,
    /// The run this node serves (needed in an authorized run: tokens name it).
    #[arg(long)]
    pub(crate) run_id: Option<String>,
    #[command(flatten)]
    pub(crate) auth: crate::cmd::joining::AuthArgs,
}

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck dht probe --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW… \
                        --peer /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW…/p2p-circuit/p2p/12D3KooW…"
)]
pub(crate) struct ProbeArgs {
    /// Peers to join first (a relay for a circuit address); repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    pub(crate) initial_peers: Vec<String>,
    /// The peer to measure: a full multiaddr ending in /p2p/PEER_ID (a relay circuit address
    /// works too).
    #[arg(long)]
    pub(crate) peer: String,
    /// Bytes per round.
    #[arg(long, default_value_t = 16 << 20)]
    pub(crate) bytes: u64,
    /// Rounds (after the first, dcutr may have replaced a relayed connection by a direct one).
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Seconds one round may take.
    #[arg(long, default_value_t = 60)]
    pub(crate) timeout: u64,
    /// Seconds to wait for a hole punch after a relayed round.
    #[arg(long, default_value_t = 10)]
    pub(crate) punch_wait: u64,
}

fn parse_client_mode(s: &str) -> Result<host::ClientMode, String> {
    s.parse()
}

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck dht put --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW… \
                        run1.note hello --ttl 600"
)]
pub(crate) struct PutArgs {
    /// Peers of the DHT (full multiaddrs ending in /p2p/PEER_ID; repeat or separate with commas).
    #[arg(long, value_delimiter = ',', required = true)]
    pub(crate) initial_peers: Vec<String>,
    /// Store under this subkey (a dictionary entry).
    #[arg(long, conflicts_with = "identity")]
    pub(crate) subkey: Option<String>,
    /// Store under the subkey owned by this identity, signed with it.
    #[arg(long)]
    pub(crate) identity: Option<PathBuf>,
    /// Seconds until the value expires.
    #[arg(long, default_value_t = 600)]
    pub(crate) ttl: u64,
    pub(crate) key: String,
    pub(crate) value: String,
}

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck dht get --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW… \
                        run1.note"
)]
pub(crate) struct GetArgs {
    /// Peers of the DHT (full multiaddrs ending in /p2p/PEER_ID; repeat or separate with commas).
    #[arg(long, value_delimiter = ',', required = true)]
    pub(crate) initial_peers: Vec<String>,
    pub(crate) key: String,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn run(command: Command) -> Result<()> {
    let rt = runtime()?;
    match command {
        Command::Serve(args) => rt.block_on(serve(args)),
        Command::Put(args) => rt.block_on(put(args)),
        Command::Get(args) => rt.block_on(get(args)),
        Command::Probe(args) => rt.block_on(probe(args)),
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let keypair = match &args.identity {
        Some(path) => identity::load_or_create(path)?,
        None => identity::generate(),
    };
    let listen = if args.listen.is_empty() {
        crate::cmd::joining::LISTEN.map(str::to_owned).to_vec()
    } else {
        args.listen.clone()
    };
    let gate = match (&args.run_id, &args.auth.authority) {
        (Some(run), _) => args.auth.gate(run, &keypair)?,
        (None, Some(_)) => bail!("an authorized run's node needs its --run-id (tokens name it)"),
        (None, None) => None,
    };
    let mut host_config = host::Config::new(keypair, Transports::Network);
    host_config.listen = parse_addrs(&listen)?;
    host_config.relay = (!args.no_relay).then(host::RelayLimits::default);
    host_config.auth = gate;
    let config = Config {
        client_mode: args.client_mode,
        ..Config::default()
    };
    let dht = start_node(host_config, config).await?;
    join(&dht, &args.initial_peers, &args.auth).await?;
    println!("peer id: {}", dht.peer_id());
    println!("listening on:");
    for addr in dht.addrs().await? {
        println!("  {addr}");
    }
    println!("pass one of these as --initial-peers");
    use std::io::Write;
    std::io::stdout().flush()?;
    let mut refresh = tokio::time::interval(Duration::from_secs(60));
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let mut shown = Shown::default();
    let mut interrupt = super::Interrupt::new()?;
    loop {
        tokio::select! {
            () = interrupt.recv() => break,
            _ = refresh.tick() => {
                dht.refresh(Duration::from_secs(600)).await;
                tracing::info!("{} peers in the routing table", dht.routing_len());
            }
            _ = watch.tick() => shown.update(&dht.host().reachability())?,
        }
    }
    tracing::info!("stopping");
    Ok(())
}

/// What `serve` has printed of its reachability, so it prints changes only.
#[derive(Debug, Default)]
struct Shown {
    nat: Option<host::Nat>,
    serving: Option<bool>,
    relay_addrs: Vec<libp2p::Multiaddr>,
    hole_punches: u64,
}

impl Shown {
    fn update(&mut self, now: &host::Reachability) -> Result<()> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if self.nat != Some(now.nat) && now.nat != host::Nat::Unknown {
            let nat = match now.nat {
                host::Nat::Public => "public (others reach this node)",
                _ => "private (behind a NAT or firewall)",
            };
            writeln!(out, "reachability: {nat}")?;
            self.nat = Some(now.nat);
        }
        if self.serving.is_some_and(|s| s != now.serving) {
            let mode = if now.serving {
                "serving"
            } else {
                "client mode"
            };
            writeln!(out, "now in {mode}")?;
        }
        self.serving = Some(now.serving);
        for addr in &now.relay_addrs {
            if !self.relay_addrs.contains(addr) {
                writeln!(out, "reachable through a relay: {addr}")?;
            }
        }
        self.relay_addrs = now.relay_addrs.clone();
        if now.hole_punches > self.hole_punches {
            writeln!(out, "hole punches: {} direct connections", now.hole_punches)?;
            self.hole_punches = now.hole_punches;
        }
        out.flush()?;
        Ok(())
    }
}

async fn probe(args: ProbeArgs) -> Result<()> {
    let target: libp2p::Multiaddr = parse_addrs(std::slice::from_ref(&args.peer))?.remove(0);
    let Some(libp2p::multiaddr::Protocol::P2p(peer)) = target.iter().last() else {
        bail!("{target} does not end in /p2p/PEER_ID: use the full address the peer printed");
    };
    let host_config = host::Config::new(identity::generate(), Transports::Network);
    let host_config = host::Config {
        listen: parse_addrs(&crate::cmd::joining::LISTEN.map(str::to_owned))?,
        ..host_config
    };
    let config = Config {
        client_mode: host::ClientMode::On,
        ..Config::default()
    };
    let dht = Dht::start(host_config, config, potluck_train::records::validators()).await?;
    if !args.initial_peers.is_empty() {
        dht.bootstrap(&parse_addrs(&args.initial_peers)?)
            .await
            .context("no route to the initial peers: check the addresses and that the nodes run")?;
    }
    let deadline = Duration::from_secs(args.timeout);
    for round in 1..=args.rounds {
        let p = dht
            .host()
            .probe(peer, vec![target.clone()], args.bytes, deadline)
            .await
            .with_context(|| format!("probing {peer}"))?;
        println!(
            "round {round}: {} bytes in {:.3} s = {:.1} MB/s over a {} connection",
            p.bytes,
            p.elapsed.as_secs_f64(),
            p.bytes_per_second() / 1e6,
            if p.relayed { "relayed" } else { "direct" }
        );
        if p.relayed && round < args.rounds {
            // Give dcutr its chance to replace the relayed connection by a direct one.
            let before = dht.host().reachability();
            let tried = |r: &host::Reachability| {
                r.hole_punches + r.hole_punch_failures
                    > before.hole_punches + before.hole_punch_failures
            };
            let wait = tokio::time::Instant::now() + Duration::from_secs(args.punch_wait);
            while !tried(&dht.host().reachability()) && tokio::time::Instant::now() < wait {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let r = dht.host().reachability();
    println!(
        "hole punches: {} succeeded, {} failed",
        r.hole_punches, r.hole_punch_failures
    );
    Ok(())
}

async fn client(initial: &[String]) -> Result<Dht> {
    let host_config = host::Config::new(identity::generate(), Transports::Network);
    let dht = Dht::start(
        host_config,
        Config {
            client_mode: host::ClientMode::On,
            ..Config::default()
        },
        potluck_train::records::validators(),
    )
    .await?;
    let initial = parse_addrs(initial)?;
    dht.bootstrap(&initial)
        .await
        .context("no route to the initial peers: check the addresses and that the nodes run")?;
    Ok(dht)
}

async fn put(args: PutArgs) -> Result<()> {
    let dht = client(&args.initial_peers).await?;
    let expiration = clock::now() + args.ttl * 1000;
    let value = args.value.clone().into_bytes();
    let stored = match &args.identity {
        Some(path) => {
            let keypair = identity::load(path)?;
            dht.store_signed(&keypair, args.key.as_bytes(), value, expiration)
                .await?
        }
        None => {
            let subkey = args
                .subkey
                .as_ref()
                .map(|s| Subkey::Plain(s.clone().into_bytes()));
            dht.store(args.key.as_bytes(), subkey, value, expiration)
                .await?
        }
    };
    println!("stored on {stored} nodes, expires in {} s", args.ttl);
    Ok(())
}

fn show(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("{} bytes", value.len()),
    }
}

async fn get(args: GetArgs) -> Result<()> {
    let dht = client(&args.initial_peers).await?;
    let now = clock::now();
    match dht.get(args.key.as_bytes()).await? {
        None => bail!("{} holds nothing (or it expired)", args.key),
        Some(Entry::Value(item)) => {
            println!(
                "{} = {} (expires in {} s)",
                args.key,
                show(&item.value),
                item.expiration.saturating_sub(now) / 1000
            );
        }
        Some(Entry::Dict(d)) => {
            println!("{}: {} subkeys", args.key, d.len());
            for (subkey, item) in d {
                println!(
                    "  {subkey} = {} (expires in {} s)",
                    show(&item.value),
                    item.expiration.saturating_sub(now) / 1000
                );
            }
        }
    }
    Ok(())
}
