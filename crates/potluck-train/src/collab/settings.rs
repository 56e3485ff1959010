//! How a collaborative peer takes part ([`Settings`]) and its network side ([`Net`]).

use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use potluck_allreduce::balance::Mode;
use potluck_allreduce::butterfly::{self, Inbox};
use potluck_allreduce::codec::{Codec, CodecPlan};
use potluck_allreduce::matchmaking;
use potluck_net::dht::{self, Dht};

use super::{Attack, Error};
use crate::sync::{self, Shelf};
use crate::{reports, tokenizers};

/// How a peer takes part.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Names the run (every DHT key and round).
    pub run: String,
    /// Samples the swarm gathers per epoch (one optimizer step).
    pub target_batch: u64,
    /// How often progress is published and the swarm's read.
    pub report_every: Duration,
    /// How long before the estimated end of an epoch its averaging deadline is proposed (so
    /// the group is formed when the target is reached); at least one report interval plus the
    /// matchmaking's `declare_ahead` is always left.
    pub lead: Duration,
    pub matchmaking: matchmaking::Settings,
    pub averaging: butterfly::Settings,
    pub mode: Mode,
    /// Average the parameters and the optimizer's moments every this many epochs; 0: never.
    pub state_every: u64,
    /// Bytes per second this peer moves each way (for the parts it reduces), until a probe of
    /// its link measured it ([`Settings::measure_every`]).
    pub rate: f64,
    /// How often this peer measures its uplink by probing another live peer ([`super::links`]):
    /// the rate it offers in rounds is the median of its last measurements. None: it offers
    /// [`Settings::rate`] as it is.
    pub measure_every: Option<Duration>,
    pub sync: sync::Settings,
    /// Bytes per chunk of the state it serves.
    pub chunk_bytes: usize,
    /// How long after the deadline a round averages even if the swarm has not reached the
    /// target (peers left, or the estimate was far off).
    pub max_wait: Duration,
    /// Delayed parameter updates: average and step in the background while the next epoch's
    /// gradients are computed (on parameters one step stale).
    pub delayed: bool,
    /// How long a starting peer looks for a swarm before it starts one.
    pub join_wait: Duration,
    /// Roll back to the last good state when an averaged gradient's norm is more than this
    /// many times the recent median ([`crate::guard`]; infinite: never).
    pub spike: f64,
    /// For experiments and tests of robustness: this peer sends a corrupted gradient.
    pub attack: Option<Attack>,
    /// Epochs in a row a peer that knows of others may step on its own gradient alone (its
    /// group failed, or it was left out of one) before it stops stepping until it averages
    /// with the swarm again or downloads its state (which it tries once an epoch while held back,
    /// from the peers at its epoch); from [`ALONE_WARN`] epochs on it warns at
    /// every epoch. 0: never step alone while others are around.
    pub alone_limit: u64,
    /// The tokenizers this peer's data was encoded with ([`crate::tokenizers`]): peers that
    /// report others are left out of its epochs, groups and state downloads, and a newcomer
    /// the live peers outnumber with others is refused ([`Error::Tokenizers`]).
    pub tokenizers: tokenizers::Id,
    /// How each epoch's gradient travels in the averaging: peers of a run must agree (a part's
    /// chunks are cut where its codecs change).
    pub codec: Compression,
    /// Local-update mode (`train --local-steps`): None, every epoch's gradient is averaged
    /// and stepped by all; Some, an epoch is a round of inner steps ([`LocalUpdates`]).
    pub local: Option<LocalUpdates>,
    /// The optimizer's settings are the run's charter's ([`crate::charter`]): from the start
    /// this peer takes no other from a donor, as a peer that holds the run's state does.
    pub chartered: bool,
}

/// Local-update mode, as DiLoCo: every peer steps its own inner optimizer on its own samples
/// through a round (an epoch of [`Settings::target_batch`] samples of the swarm's), then the
/// peers average the change of their parameters since the round began (weighted by samples,
/// through the codec with error feedback) and all take the same outer step
/// ([`crate::optim::Config::outer`], the state's optimizer) from the round's starting
/// parameters. A slow peer takes fewer inner steps; nobody waits for it. With
/// [`Settings::delayed`] the averaging runs while the next round's inner steps are taken, and
/// the outer step lands one round late (the inner steps taken meanwhile are kept on top).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalUpdates {
    /// Rounds last this many of the swarm's batches (the `--local-steps` flag): part of the
    /// run's recipe, which every peer must share.
    pub steps: u64,
    /// The inner optimizer (the run's `--optimizer`, `--lr`…): each peer's own, never shared.
    pub inner: crate::optim::Config,
    /// Samples of its own a peer steps its inner optimizer on.
    pub inner_batch: u64,
}

/// Tensors of fewer values than this travel in fp16 under [`Compression::Auto`], as in the
/// reference run (norms, biases and small tensors); the others in blockwise 8-bit.
pub const SMALL_TENSOR: usize = 1 << 16;

/// How each epoch's gradient travels in the averaging (`train --codec`). A lossy codec is
/// used with error feedback: what a round's rounding left out of a peer's gradient is added to
/// what it sends the next epoch. The parameters' and moments' averaging every few epochs is
/// always exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// As the reference run: norms, biases and tensors under [`SMALL_TENSOR`] values in fp16,
    /// the others (weights, embeddings) in blockwise 8-bit: about a quarter of f32's bytes.
    Auto,
    /// One codec for the whole gradient.
    Uniform(Codec),
}

impl Compression {
    /// The codec of each stretch of a buffer laid out as `layout`.
    pub fn plan(self, layout: &potluck_core::Layout) -> CodecPlan {
        match self {
            Compression::Auto => {
                CodecPlan::for_layout(layout, SMALL_TENSOR, Codec::Fp16, Codec::Blockwise8)
            }
            Compression::Uniform(codec) => CodecPlan::uniform(codec),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Auto => "auto",
            Compression::Uniform(Codec::None) => "none",
            Compression::Uniform(Codec::Fp16) => "fp16",
            Compression::Uniform(Codec::Blockwise8) => "8bit",
            Compression::Uniform(Codec::Bf16) => "bf16",
            Compression::Uniform(Codec::Uniform8) => "uniform8",
        })
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Compression, String> {
        match s {
            "auto" => Ok(Compression::Auto),
            "none" | "f32" => Ok(Compression::Uniform(Codec::None)),
            "fp16" => Ok(Compression::Uniform(Codec::Fp16)),
            "8bit" => Ok(Compression::Uniform(Codec::Blockwise8)),
            _ => Err(format!("codec `{s}`: use auto, none, fp16 or 8bit")),
        }
    }
}

/// Epochs in a row stepping alone, with others around, from which a peer warns at every epoch.
pub const ALONE_WARN: u64 = 3;

impl Settings {
    /// Defaults for a run named `run` with `target_batch` samples per epoch.
    pub fn new(run: &str, target_batch: u64) -> Settings {
        Settings {
            run: run.into(),
            target_batch,
            report_every: Duration::from_millis(500),
            lead: Duration::from_secs(2),
            matchmaking: matchmaking::Settings::default(),
            averaging: butterfly::Settings::default(),
            mode: Mode::Full,
            state_every: 10,
            rate: 1e8,
            measure_every: Some(Duration::from_secs(300)),
            sync: sync::Settings::default(),
            chunk_bytes: 1 << 20,
            delayed: false,
            max_wait: Duration::from_secs(30),
            join_wait: Duration::from_secs(3),
            spike: 10.0,
            attack: None,
            alone_limit: 10,
            tokenizers: tokenizers::NONE,
            chartered: false,
            codec: Compression::Uniform(Codec::None),
            local: None,
        }
    }

    /// How the run trains, as every peer of it must (said in its progress reports; a peer of
    /// another recipe is left out and told so): every step averaged, or local updates and
    /// their length, and the codec its averaging sends.
    pub fn recipe(&self) -> String {
        let mode = match &self.local {
            None => "every step averaged".to_owned(),
            Some(l) => format!("local updates, rounds of {} batches", l.steps),
        };
        format!("{mode}, codec {}", self.codec)
    }

    /// The prefix of the keys of this peer's rounds (deadlines, matchmaking): the run's name,
    /// its tokenizers' short id unless they are [`tokenizers::NONE`], and a short hash of its
    /// [`Settings::recipe`], so that peers of other tokenizers or another recipe never propose
    /// an epoch's end or form a group together.
    pub fn scope(&self) -> String {
        use sha2::{Digest, Sha256};
        let recipe: String = Sha256::digest(self.recipe().as_bytes())[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if self.tokenizers == tokenizers::NONE {
            format!("{}/{recipe}", self.run)
        } else {
            format!(
                "{}/{}/{recipe}",
                self.run,
                tokenizers::short(&self.tokenizers)
            )
        }
    }

    /// Short intervals for peers in one process, where an epoch takes milliseconds (tests,
    /// benches): reports every 50 ms, deadlines 0.3 s ahead, 64 KiB state chunks.
    pub fn in_process(run: &str, target_batch: u64) -> Settings {
        let mut s = Settings::new(run, target_batch);
        s.report_every = Duration::from_millis(50);
        s.lead = Duration::from_millis(300);
        s.join_wait = Duration::from_millis(300);
        s.matchmaking.declare_ahead = Duration::from_millis(100);
        s.matchmaking.poll = Duration::from_millis(20);
        s.matchmaking.grace = Duration::from_secs(2);
        s.chunk_bytes = 64 << 10;
        s.measure_every = None;
        s
    }
}

/// The network side of a peer: its DHT node (and host), the all-reduce inbox, the state it
/// serves.
#[derive(Debug, Clone)]
pub struct Net {
    pub dht: Dht,
    pub keypair: Keypair,
    pub inbox: Inbox,
    pub shelf: Shelf,
    /// Peers this one caught lying about the state they hold: reported with its reducer's
    /// bans.
    pub suspects: reports::Suspects,
    /// Its uplink as its probes measured it.
    pub link: super::Link,
}

impl Net {
    /// A peer on libp2p's in-memory transport with a fresh identity, joined through `boot`
    /// (peers of one process: tests, benches).
    pub async fn start_memory(boot: &[Multiaddr]) -> Result<Net, Error<std::convert::Infallible>> {
        let keypair = Keypair::generate_ed25519();
        let dht = Dht::start_memory_with(
            keypair.clone(),
            dht::Config::default(),
            crate::records::validators(),
        )
        .await?;
        dht.bootstrap(boot).await?;
        Ok(Net::start(dht, keypair)?)
    }

    /// Starts the all-reduce inbox and the state server on `dht`'s host.
    pub fn start(dht: Dht, keypair: Keypair) -> Result<Net, potluck_net::host::Error> {
        let inbox = Inbox::start(dht.host())?;
        let shelf = Shelf::default();
        sync::serve(dht.host(), shelf.clone(), sync::Serving::default())?;
        Ok(Net {
            dht,
            keypair,
            inbox,
            shelf,
            suspects: reports::Suspects::default(),
            link: super::Link::default(),
        })
    }
}
