//! A DHT node's handle ([`Dht`]) and what its parts share: the node's configuration and
//! errors, the state its handle and its host task both hold (routing table, store, round-trip
//! times), and the conversions between that state and the wire's types. Answering requests is
//! `serve`'s; lookups, stores and gets are `lookup`'s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use potluck_core::clock::Time;
use potluck_core::lock;

use super::record::{self, Limits, Record, Rejection, Validators};
use super::routing::{self, Contact, Table};
use super::store::{Entry, Store};
use super::wire::{self, PeerInfo, WireEntry};
use crate::host::{self, ClientMode, Host, Transports};

/// How a DHT node behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bucket size and replication factor.
    pub k: usize,
    /// Parallel queries of a lookup.
    pub alpha: usize,
    /// Client mode (query and store through others, answer nobody, sit in no routing table):
    /// on, off, or decided by reachability.
    pub client_mode: ClientMode,
    /// Bytes the local store may hold.
    pub store_bytes: usize,
    /// Bytes of the local store one other peer's records may take.
    pub store_quota: usize,
    pub limits: Limits,
    /// How long a peer that kept failing stays out of the routing table.
    pub ban: Duration,
    /// Clock skew against initial peers past which we warn, and past which we refuse to run.
    pub skew_warn: Duration,
    pub skew_limit: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            k: 20,
            alpha: 3,
            client_mode: ClientMode::Auto,
            store_bytes: 64 << 20,
            store_quota: 8 << 20,
            limits: Limits::default(),
            ban: Duration::from_secs(60),
            skew_warn: Duration::from_secs(3),
            skew_limit: Duration::from_secs(30),
        }
    }
}

/// Errors of DHT operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Host(#[from] host::Error),
    #[error("record refused: {0}")]
    Rejected(#[from] Rejection),
    #[error("{0} has no /p2p/PEER_ID part: use the full address `potluck dht serve` prints")]
    NoPeerId(Multiaddr),
    #[error("none of the initial peers answered: {0}")]
    NoBootstrap(String),
    #[error(
        "this machine's clock is {skew_ms} ms off the initial peer {peer}'s: set the clock (e.g. \
         enable NTP) and start again"
    )]
    ClockSkew { peer: PeerId, skew_ms: i64 },
    #[error("no peer stored the record")]
    NotStored,
}

/// Round-trip times per peer, for per-request deadlines.
#[derive(Debug, Default)]
pub(super) struct Rtts(HashMap<PeerId, f64>);

impl Rtts {
    pub(super) fn observe(&mut self, peer: PeerId, rtt: Duration) {
        let s = rtt.as_secs_f64();
        let e = self.0.entry(peer).or_insert(s);
        *e = 0.8 * *e + 0.2 * s;
    }

    /// How long a lookup waits for `peer` before it asks the next candidate in its place
    /// (the request goes on): three round trips plus slack, within [0.25 s, 2 s]; 1 s for an
    /// unknown peer.
    pub(super) fn patience(&self, peer: &PeerId) -> Duration {
        match self.0.get(peer) {
            Some(&rtt) => Duration::from_secs_f64((3.0 * rtt + 0.1).clamp(0.25, 2.0)),
            None => Duration::from_secs(1),
        }
    }

    /// Four round trips plus slack, within [2 s, 10 s] (a busy peer answers late, not never);
    /// 5 s for an unknown peer.
    pub(super) fn deadline(&self, peer: &PeerId) -> Duration {
        match self.0.get(peer) {
            Some(&rtt) => Duration::from_secs_f64((4.0 * rtt + 0.5).clamp(2.0, 10.0)),
            None => Duration::from_secs(5),
        }
    }
}

/// State shared by the node's handle and its host task.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) local: PeerId,
    pub(super) config: Config,
    pub(super) table: Mutex<Table>,
    pub(super) store: Mutex<Store>,
    pub(super) validators: Validators,
    pub(super) rtts: Mutex<Rtts>,
    /// Peers identify says serve the DHT, with their addresses (routing candidates).
    pub(super) servers: Mutex<HashMap<PeerId, Vec<Multiaddr>>>,
    /// In client mode now (set by the host as reachability changes).
    pub(super) client: AtomicBool,
}

/// The refusal a client-mode node answers every request with; the asker drops it from its
/// routing table.
pub const CLIENT_MODE: &str = "client mode";

impl Shared {
    pub(super) fn is_client(&self) -> bool {
        self.client.load(Ordering::Relaxed)
    }
}

pub(super) fn info(c: &Contact) -> PeerInfo {
    PeerInfo {
        id: c.peer.to_bytes(),
        addrs: c
            .addrs
            .iter()
            .take(wire::MAX_ADDRS)
            .map(|a| a.to_vec())
            .collect(),
    }
}

pub(super) fn from_info(p: &PeerInfo) -> Option<(PeerId, Vec<Multiaddr>)> {
    let peer = PeerId::from_bytes(&p.id).ok()?;
    let addrs = p
        .addrs
        .iter()
        .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
        .collect();
    Some((peer, addrs))
}

pub(super) fn to_wire(e: Entry) -> WireEntry {
    match e {
        Entry::Value(i) => WireEntry::Value(i),
        Entry::Dict(d) => WireEntry::Dict(d.into_iter().collect()),
    }
}

/// Records of a wire entry under `key`.
pub(super) fn records_of(key: &[u8], e: &WireEntry) -> Vec<Record> {
    match e {
        WireEntry::Value(i) => vec![Record {
            key: key.to_vec(),
            subkey: None,
            item: i.clone(),
        }],
        WireEntry::Dict(d) => d
            .iter()
            .map(|(s, i)| Record {
                key: key.to_vec(),
                subkey: Some(s.clone()),
                item: i.clone(),
            })
            .collect(),
    }
}

impl Shared {
    /// Stores checked records locally, charged to `storer` (None: this node's own).
    pub(super) fn store_local(
        &self,
        records: &[Record],
        now: Time,
        storer: Option<&PeerId>,
    ) -> Vec<Result<(), Rejection>> {
        let storer = storer.map(|p| p.to_bytes());
        records
            .iter()
            .map(|r| {
                record::check(r, now, &self.config.limits, &self.validators)?;
                lock(&self.store)
                    .put_by(r, now, storer.as_deref())
                    .map(|_| ())
            })
            .collect()
    }
}

/// A running DHT node; cloning shares it.
#[derive(Debug, Clone)]
pub struct Dht {
    pub(super) host: Host,
    pub(super) shared: Arc<Shared>,
}

impl Dht {
    /// Starts a node with its own host.
    pub async fn start(
        host_config: host::Config,
        config: Config,
        validators: Validators,
    ) -> Result<Dht, Error> {
        let local = host_config.keypair.public().to_peer_id();
        let shared = Arc::new(Shared {
            local,
            table: Mutex::new(Table::new(routing::peer_id(&local), config.k, config.ban)),
            store: Mutex::new(Store::with_quota(
                config.store_bytes,
                config.store_quota,
                config.limits,
            )),
            validators,
            rtts: Mutex::new(Rtts::default()),
            servers: Mutex::new(HashMap::new()),
            client: AtomicBool::new(config.client_mode == ClientMode::On),
            config,
        });
        let host_config = host::Config {
            client_mode: shared.config.client_mode,
            ..host_config
        };
        let host = Host::start(host_config, shared.clone()).await?;
        Ok(Dht { host, shared })
    }

    /// A node on the in-memory transport at a random port that checks no typed records (for
    /// the DHT's own tests and benchmarks).
    pub async fn start_memory(keypair: Keypair, config: Config) -> Result<Dht, Error> {
        Dht::start_memory_with(keypair, config, Validators::default()).await
    }

    /// A node on the in-memory transport at a random port that checks records with
    /// `validators` (a run's, for in-process swarms that store what production nodes check).
    pub async fn start_memory_with(
        keypair: Keypair,
        config: Config,
        validators: Validators,
    ) -> Result<Dht, Error> {
        let port = rand::random::<u64>() | 1;
        let mut host_config = host::Config::new(keypair, Transports::Memory);
        host_config.listen = vec![libp2p::multiaddr::Protocol::Memory(port).into()];
        Dht::start(host_config, config, validators).await
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.local
    }

    /// The host underneath (for other protocols' use).
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Addresses others can reach this node at, each ending in `/p2p/PEER_ID`.
    pub async fn addrs(&self) -> Result<Vec<Multiaddr>, Error> {
        let id = self.peer_id();
        Ok(self
            .host
            .listen_addrs()
            .await?
            .into_iter()
            .map(|a| a.with_p2p(id).unwrap_or_else(|a| a))
            .collect())
    }

    /// Contacts in the routing table.
    pub fn routing_len(&self) -> usize {
        lock(&self.shared.table).len()
    }
}
