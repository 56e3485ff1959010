//! What every command that joins a run shares: where a peer is on the network (`NetArgs`), the
//! flags of an authorized run (`AuthArgs`) and keeping up with its tokens and revocations,
//! parsing peers' addresses, starting this peer's DHT node and joining through the initial
//! peers (with what to do when that fails), the run's shared seed, publishing metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use potluck_core::{Layout, clock};
use potluck_data::tokens::TokenSet;
use potluck_net::auth::{AuthorityKey, Gate, Token, Verifier, watch_token};
use potluck_net::dht::{self, Dht};
use potluck_net::host::{self, ClientMode, Transports};
use potluck_net::identity;
use potluck_train::charter::Charter;
use potluck_train::optim::{self, Optimizer};
use potluck_train::{metrics, tokenizers};

/// Where a `dht serve` node listens unless told: every interface, a free TCP port and a free
/// QUIC one (a peer whose TCP is blocked or slow to connect may still reach it over UDP). A
/// training peer listens on the first alone unless told, though over QUIC each stream is its
/// own (on a 10 Mbit/s link full of averaging a DHT request over TCP waited behind megabytes
/// queued on the same connection: docs/BENCHMARKS.md). With QUIC by default, two of 299 tests
/// failed once in a full run: a `prepare --from-run` whose stream to the peer serving the
/// tokenizers was cancelled ("oneshot canceled", not understood yet), and a peer that printed
/// no QUIC address (fixed: `host::swarm::listen` waits for every listener).
pub(crate) const LISTEN: [&str; 2] = ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"];

/// Where a peer is on the network and how it joins.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct NetArgs {
    /// Peers of the run to join through (full multiaddrs ending in /p2p/PEER_ID; repeat or
    /// separate with commas). The first peer of a run needs none.
    #[arg(long, value_delimiter = ',')]
    pub(crate) initial_peers: Vec<String>,
    /// Addresses to listen on [default: every interface, a free TCP port; add e.g.
    /// /ip4/0.0.0.0/udp/0/quic-v1 for QUIC, which slow links need: docs/BENCHMARKS.md].
    #[arg(long)]
    pub(crate) listen: Vec<String>,
    /// Identity file: created if missing, so the peer keeps its id across restarts.
    #[arg(long)]
    pub(crate) identity: Option<PathBuf>,
    /// auto: serve while others can reach this peer; on: a client (behind a NAT: sends and
    /// receives, reduces no part); off: always serve.
    #[arg(long, default_value = "auto", value_parser = parse_client_mode)]
    pub(crate) client_mode: ClientMode,
    #[command(flatten)]
    pub(crate) auth: AuthArgs,
}

impl Default for NetArgs {
    /// The flags' defaults: no initial peers (the first peer of a run), every interface.
    fn default() -> NetArgs {
        NetArgs {
            initial_peers: Vec::new(),
            listen: Vec::new(),
            identity: None,
            client_mode: ClientMode::Auto,
            auth: AuthArgs::default(),
        }
    }
}

fn parse_client_mode(s: &str) -> Result<ClientMode, String> {
    s.parse()
}

/// The flags that make a peer part of an authorized run.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct AuthArgs {
    /// An authorized run's authority (the public key `potluck authority init` printed): only
    /// peers with its tokens are let in, and this peer must present one (--token).
    #[arg(long, requires = "token")]
    pub(crate) authority: Option<String>,
    /// This peer's token for the run (from `potluck authority grant`); it names this peer's
    /// id, so pass --identity with the key it was granted to. Re-read when the file changes.
    #[arg(long, requires = "authority")]
    pub(crate) token: Option<PathBuf>,
}

impl AuthArgs {
    /// The gate of an authorized run (None: an open run), after checking that the token is
    /// this run's, this peer's, signed by the authority and not expired.
    pub(crate) fn gate(&self, run: &str, keypair: &Keypair) -> Result<Option<Arc<Gate>>> {
        let (Some(authority), Some(path)) = (&self.authority, &self.token) else {
            return Ok(None);
        };
        let authority: AuthorityKey = authority.parse()?;
        let token = Token::load(path)?;
        let verifier = Verifier {
            run: run.to_owned(),
            authority,
        };
        let me = keypair.public().to_peer_id();
        if let Ok(grant) = token.grant()
            && grant.peer != me.to_bytes()
        {
            let named = PeerId::from_bytes(&grant.peer).map_or("?".into(), |p| p.to_string());
            bail!(
                "{} is a token for peer {named}, and this peer is {me}: pass --identity with the \
                 key file it was granted to",
                path.display()
            );
        }
        let grant = verifier
            .check(&token, me, clock::now())
            .with_context(|| format!("{} is not a valid token for run {run}", path.display()))?;
        let left = grant.expires.saturating_sub(clock::now()) / 1000;
        tracing::info!(
            "authorized run {run}: this peer is a {} for another {}",
            grant.role,
            clock::humanize(left)
        );
        Ok(Some(Arc::new(Gate::new(verifier, token))))
    }
}

/// How often a peer of an authorized run reads the authority's revocations.
const REVOCATIONS_EVERY: Duration = Duration::from_secs(30);

/// In an authorized run: applies the authority's revocations now (before this peer serves
/// anyone it revoked) and then in the background ([`potluck_net::revoke::watch`]), and keeps
/// this peer's token fresh ([`watch_token`]).
async fn keep_up(dht: &Dht, auth: &AuthArgs) {
    if let Some(path) = &auth.token {
        if let Err(e) = potluck_net::revoke::apply(dht).await {
            tracing::warn!("could not read the run's revocations yet: {e}");
        }
        tokio::spawn(watch_token(dht.host().clone(), path.clone()));
        tokio::spawn(potluck_net::revoke::watch(dht.clone(), REVOCATIONS_EVERY));
    }
}

pub(crate) fn parse_addrs(addrs: &[String]) -> Result<Vec<libp2p::Multiaddr>> {
    addrs
        .iter()
        .map(|a| {
            a.parse().with_context(|| {
                format!("{a:?} is not a multiaddr (e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW…)")
            })
        })
        .collect()
}

/// A seed every peer of the run derives alike (so peers that start together start equal).
pub(crate) fn run_seed(run: &str, seed: u64) -> u64 {
    use sha2::Digest;
    let h = sha2::Sha256::digest(run.as_bytes());
    u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]) ^ seed
}

/// Starts this peer's DHT node (and host) for `run` and joins through the initial peers;
/// prints where it listens.
pub(crate) async fn start_dht(
    run: &str,
    args: &NetArgs,
) -> Result<(Dht, libp2p::identity::Keypair)> {
    let keypair = match &args.identity {
        Some(path) => identity::load_or_create(path)?,
        None => identity::generate(),
    };
    let gate = args.auth.gate(run, &keypair)?;
    let listen = if args.listen.is_empty() {
        vec![LISTEN[0].to_owned()]
    } else {
        args.listen.clone()
    };
    let mut host_config = host::Config::new(keypair.clone(), Transports::Network);
    host_config.listen = parse_addrs(&listen)?;
    host_config.auth = gate;
    let dht_config = dht::Config {
        client_mode: args.client_mode,
        ..dht::Config::default()
    };
    let dht = start_node(host_config, dht_config).await?;
    join(&dht, &args.initial_peers, &args.auth).await?;
    println!("peer id: {}", dht.peer_id());
    for addr in dht.addrs().await? {
        println!("  listening on {addr}");
    }
    Ok((dht, keypair))
}

/// Starts a DHT node that checks the run's typed records, saying what to do when the port it
/// is to listen on is taken.
pub(crate) async fn start_node(host_config: host::Config, config: dht::Config) -> Result<Dht> {
    Dht::start(host_config, config, potluck_train::records::validators())
        .await
        .map_err(|e| match e {
            dht::Error::Host(host::Error::Listen { addr, reason }) => anyhow::anyhow!(
                "could not listen on {addr}: {reason} (is the port in use? pick another with \
                 --listen)"
            ),
            e => e.into(),
        })
}

/// Joins through the initial peers (none: this node starts the run) and keeps up with an
/// authorized run's tokens and revocations.
pub(crate) async fn join(dht: &Dht, initial_peers: &[String], auth: &AuthArgs) -> Result<()> {
    let initial = parse_addrs(initial_peers)?;
    if !initial.is_empty() {
        dht.bootstrap(&initial)
            .await
            .map_err(|e| joining(e, initial_peers))?;
    }
    keep_up(dht, auth).await;
    Ok(())
}

/// A failure to join through the initial peers, saying what to do about it.
fn joining(e: dht::Error, initial_peers: &[String]) -> anyhow::Error {
    match e {
        dht::Error::NoBootstrap(why) => anyhow::anyhow!(
            "could not reach any of --initial-peers {} ({why}): check the addresses (the full \
             /ip4/…/tcp/…/p2p/… that a peer of the run prints), that a peer is up there, and \
             that no firewall between blocks its port",
            initial_peers.join(",")
        ),
        e => anyhow::Error::from(e).context("joining through --initial-peers"),
    }
}

/// Publishes this peer's metrics record ([`metrics`]) in the background: once an epoch.
pub(crate) fn publish_metrics(dht: &Dht, keypair: &Keypair, run: &str, m: metrics::Metrics) {
    let (dht, keypair, run) = (dht.clone(), keypair.clone(), run.to_owned());
    tokio::spawn(async move {
        if let Err(e) = metrics::publish(&dht, &keypair, &run, &m).await {
            tracing::debug!("publishing metrics: {e}");
        }
    });
}

/// The tokenizers `data` was encoded with ([`potluck_train::tokenizers::Bundle`]: the files'
/// bytes, each bounded before it is read, and the caption length).
pub(crate) fn tokenizers_of(data: &TokenSet) -> Result<tokenizers::Bundle> {
    let read = |name: &str, max: usize| -> Result<Vec<u8>> {
        let path = data.dir.join(name);
        potluck_core::file::read_limited(&path, max as u64)
            .with_context(|| format!("reading the tokenizer {}", path.display()))
    };
    let m = &data.manifest;
    Ok(tokenizers::Bundle {
        text: read(&m.tokenizer, tokenizers::MAX_TEXT)?,
        image: read(&m.vqvae, tokenizers::MAX_IMAGE)?,
        text_len: u32::try_from(m.text_len).context("the data's caption length")?,
    })
}

/// Makes `data`'s tokenizers this peer's in `settings` (it reports their id, and leaves peers
/// of others out) and serves them to newcomers (`potluck prepare --from-run`). In an
/// authorized run whose authority published a charter, fails with what to do when the
/// charter names other tokenizers, and makes the chartered optimizer settings `optimizer`'s
/// and the run's (a newcomer takes no other from its donors), whatever this peer's flags said.
pub(crate) async fn follow_charter(
    dht: &Dht,
    data: &TokenSet,
    settings: &mut potluck_train::collab::Settings,
    optimizer: &mut Optimizer,
    layout: &Layout,
    net: &NetArgs,
) -> Result<()> {
    let bundle = tokenizers_of(data)?;
    let ours = bundle.id();
    settings.tokenizers = ours;
    tracing::info!(
        "this peer's data was encoded with tokenizers {}",
        tokenizers::short(&ours)
    );
    if let Some(c) = chartered(dht).await {
        if c.tokenizers != ours {
            return Err(other_tokenizers(
                "the run's authority chartered other tokenizers".into(),
                &ours,
                &c.tokenizers,
                &settings.run,
                net,
                data,
            ));
        }
        // In local-update mode the charter's optimizer is the inner one (each peer's own);
        // the state's is the outer optimizer of the run's flags.
        match &mut settings.local {
            Some(local) => {
                let mut inner = Optimizer::new(local.inner, layout);
                take_chartered(&mut inner, c.optimizer, layout)?;
                local.inner = *inner.config();
            }
            None => take_chartered(optimizer, c.optimizer, layout)?,
        }
        settings.chartered = true;
    }
    tokenizers::serve(dht.host(), Arc::new(bundle))?;
    Ok(())
}

/// Makes `chartered` `optimizer`'s settings, saying so when this peer's flags gave others. A
/// fresh optimizer whose moments are of another precision is made anew; moments restored
/// from a checkpoint (`--init`) must be of the charter's.
fn take_chartered(
    optimizer: &mut Optimizer,
    chartered: optim::Config,
    layout: &Layout,
) -> Result<()> {
    let own = *optimizer.config();
    if own == chartered {
        return Ok(());
    }
    println!(
        "the run's charter fixes its optimizer: {} (this peer's flags said {})",
        describe(&chartered),
        describe(&own)
    );
    if optimizer.adopt(chartered).is_ok() {
        return Ok(());
    }
    if optimizer.steps() > 0 {
        bail!(
            "the run's charter keeps the optimizer's moments in {:?} and --init's checkpoint \
             holds them in {:?}: start from a checkpoint of the run's precision",
            chartered.precision,
            own.precision
        );
    }
    *optimizer = Optimizer::new(chartered, layout);
    Ok(())
}

/// Optimizer settings in a few words, for people.
pub(crate) fn describe(c: &optim::Config) -> String {
    let decay = match c.schedule.total {
        u64::MAX => "no decay".to_owned(),
        total => format!("decayed to 0 at step {total}"),
    };
    format!(
        "{:?}, {:?} moments, learning rate {} (warm-up {} steps, {decay}), weight decay {}",
        c.rule, c.precision, c.schedule.peak, c.schedule.warmup, c.weight_decay
    )
}

/// The charter of the run's authority, in an authorized run that has one (said in the log when
/// it has none, or it could not be read).
pub(crate) async fn chartered(dht: &Dht) -> Option<Charter> {
    let gate = dht.host().gate()?;
    match potluck_train::charter::fetch(dht, gate.verifier()).await {
        Ok(Some(c)) => Some(c),
        Ok(None) => {
            tracing::warn!(
                "the run's authority published no charter: its tokenizers are those most of its \
                 live peers train with and its optimizer settings those most donors offer \
                 (`potluck authority charter` fixes them)"
            );
            None
        }
        Err(e) => {
            tracing::warn!("could not read the run's charter: {e}");
            None
        }
    }
}

/// What joining the run failed with, saying what to do when this peer's data was encoded with
/// other tokenizers than the run's.
pub(crate) fn join_failed<E>(
    e: potluck_train::collab::Error<E>,
    run: &str,
    net: &NetArgs,
    data: &TokenSet,
) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    use potluck_train::collab::Error;
    if let Error::Tokenizers { ours, theirs, .. } = &e {
        return other_tokenizers(e.to_string(), ours, theirs, run, net, data);
    }
    anyhow::Error::new(e).context("joining the run")
}

/// `why` this peer's data (encoded with `ours`) cannot join `run` (whose tokenizers are
/// `theirs`), and the command that encodes it with the run's.
fn other_tokenizers(
    why: String,
    ours: &tokenizers::Id,
    theirs: &tokenizers::Id,
    run: &str,
    net: &NetArgs,
    data: &TokenSet,
) -> anyhow::Error {
    let out = data.dir.with_file_name(format!(
        "{}-{}",
        data.dir
            .file_name()
            .map_or("data".into(), |n| n.to_string_lossy()),
        tokenizers::short(theirs)
    ));
    let peers = if net.initial_peers.is_empty() {
        "ADDRESS_OF_A_PEER".to_owned()
    } else {
        net.initial_peers.join(",")
    };
    let auth = match (&net.auth.authority, &net.auth.token, &net.identity) {
        (Some(key), Some(token), identity) => format!(
            " --authority {key} --token {}{}",
            token.display(),
            identity
                .as_ref()
                .map_or(String::new(), |i| format!(" --identity {}", i.display()))
        ),
        _ => String::new(),
    };
    anyhow::anyhow!(
        "{why}.\nThis data ({}) was encoded with tokenizers {}; the run's are {}. Encode it \
         with the run's and train on that:\n  potluck prepare --from-run {run} \
         --initial-peers {peers}{auth} --dataset {} --out {}",
        data.dir.display(),
        tokenizers::short(ours),
        tokenizers::short(theirs),
        data.manifest.dataset,
        out.display()
    )
}

#[cfg(test)]
mod tests {
    use potluck_net::auth::{Authority, Role};

    use super::*;

    #[test]
    fn a_gate_is_made_only_from_this_peers_valid_token() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::generate();
        let me = Keypair::generate_ed25519();
        let path = dir.path().join("token");
        let args = AuthArgs {
            authority: Some(authority.public().to_string()),
            token: Some(path.clone()),
        };
        let write = |t: Token| std::fs::write(&path, t.to_text()).unwrap();
        let hour = Duration::from_secs(3600);
        write(authority.grant("r", me.public().to_peer_id(), Role::Trainer, hour));
        assert!(args.gate("r", &me).unwrap().is_some());
        let other = args.gate("r2", &me).unwrap_err().to_string();
        assert!(other.contains("not a valid token for run r2"), "{other}");
        write(authority.grant("r", PeerId::random(), Role::Trainer, hour));
        let err = args.gate("r", &me).unwrap_err().to_string();
        assert!(err.contains("pass --identity"), "{err}");
        assert!(AuthArgs::default().gate("r", &me).unwrap().is_none());
    }
}
