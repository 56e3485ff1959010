//! A DHT node: answers `/potluck/dht/1` requests from its store and routing table, and runs
//! iterative Kademlia lookups (α parallel queries towards the k closest) for its own stores and
//! gets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use potluck_core::clock::{Time, now};
use potluck_core::lock;

use super::record::{self, Item, Limits, Record, Rejection, Subkey, Validators};
use super::routing::{self, Contact, Id, Table};
use super::store::{Entry, Store};
use super::wire::{self, PeerInfo, Request, RequestBody, Response, ResponseBody, WireEntry};
use crate::auth::Role;
use crate::host::{self, ClientMode, Host, Inbound, Rpc, Transports};

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
struct Rtts(HashMap<PeerId, f64>);

impl Rtts {
    fn observe(&mut self, peer: PeerId, rtt: Duration) {
        let s = rtt.as_secs_f64();
        let e = self.0.entry(peer).or_insert(s);
        *e = 0.8 * *e + 0.2 * s;
    }

    /// Four round trips plus slack, within [2 s, 10 s] (a busy peer answers late, not never);
    /// 5 s for an unknown peer.
    fn deadline(&self, peer: &PeerId) -> Duration {
        match self.0.get(peer) {
            Some(&rtt) => Duration::from_secs_f64((4.0 * rtt + 0.5).clamp(2.0, 10.0)),
            None => Duration::from_secs(5),
        }
    }
}

/// State shared by the node's handle and its host task.
#[derive(Debug)]
struct Shared {
    local: PeerId,
    config: Config,
    table: Mutex<Table>,
    store: Mutex<Store>,
    validators: Validators,
    rtts: Mutex<Rtts>,
    /// Peers identify says serve the DHT, with their addresses (routing candidates).
    servers: Mutex<HashMap<PeerId, Vec<Multiaddr>>>,
    /// In client mode now (set by the host as reachability changes).
    client: AtomicBool,
}

/// The refusal a client-mode node answers every request with; the asker drops it from its
/// routing table.
pub const CLIENT_MODE: &str = "client mode";

impl Shared {
    fn is_client(&self) -> bool {
        self.client.load(Ordering::Relaxed)
    }
}

fn info(c: &Contact) -> PeerInfo {
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

fn from_info(p: &PeerInfo) -> Option<(PeerId, Vec<Multiaddr>)> {
    let peer = PeerId::from_bytes(&p.id).ok()?;
    let addrs = p
        .addrs
        .iter()
        .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
        .collect();
    Some((peer, addrs))
}

fn to_wire(e: Entry) -> WireEntry {
    match e {
        Entry::Value(i) => WireEntry::Value(i),
        Entry::Dict(d) => WireEntry::Dict(d.into_iter().collect()),
    }
}

/// Records of a wire entry under `key`.
fn records_of(key: &[u8], e: &WireEntry) -> Vec<Record> {
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
    fn closest_infos(&self, target: &Id, exclude: &PeerId) -> Vec<PeerInfo> {
        lock(&self.table)
            .closest(target, self.config.k + 1)
            .iter()
            .filter(|c| c.peer != *exclude)
            .take(self.config.k.min(wire::MAX_PEERS))
            .map(info)
            .collect()
    }

    /// Stores checked records locally, charged to `storer` (None: this node's own).
    fn store_local(
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

impl Shared {
    /// The answer to `request` from `peer`, from the store and the routing table.
    fn answer(&self, peer: PeerId, request: Request) -> Response {
        let now = now();
        if self.is_client() {
            let reason = CLIENT_MODE.into();
            return Response {
                now,
                body: ResponseBody::Refused { reason },
            };
        }
        // A serving peer that asks is alive: back into the table if it fell out (its
        // addresses as identify gave them).
        if !request.client
            && let Some(addrs) = lock(&self.servers).get(&peer).cloned()
        {
            lock(&self.table).seen(peer, addrs, Instant::now());
        }
        let body = match request.body {
            RequestBody::FindNode { target } => ResponseBody::Nodes {
                peers: self.closest_infos(&target, &peer),
            },
            RequestBody::Get { key } => {
                if key.len() > self.config.limits.max_key {
                    ResponseBody::Refused {
                        reason: "key too long".into(),
                    }
                } else {
                    let entry = lock(&self.store).get(&key, now).map(to_wire);
                    ResponseBody::Value {
                        entry,
                        closer: self.closest_infos(&routing::id_of(&key), &peer),
                    }
                }
            }
            RequestBody::Store { records } => ResponseBody::Stored {
                results: self.store_local(&records, now, Some(&peer)),
            },
            RequestBody::StoreNear { target, records } => ResponseBody::StoredNear {
                results: self.store_local(&records, now, Some(&peer)),
                peers: self.closest_infos(&target, &peer),
            },
        };
        Response { now, body }
    }
}

impl Inbound for Shared {
    type Request = Request;

    fn rpc(&self) -> Option<Rpc> {
        Some(wire::RPC)
    }

    fn decode(&self, frame: &[u8]) -> Result<Request, String> {
        Request::decode(frame).map_err(|e| e.to_string())
    }

    fn request(&self, peer: PeerId, role: Option<Role>, request: Request) -> Vec<u8> {
        answer_as(peer, role, request, |request| self.answer(peer, request))
    }

    fn refusal(&self, reason: &str) -> Vec<u8> {
        wire::encode(&refused(reason))
    }

    fn serving(&self, serving: bool) {
        self.client.store(!serving, Ordering::Relaxed);
    }

    fn identified(&self, peer: PeerId, addrs: Vec<Multiaddr>, serves: bool) {
        if serves {
            lock(&self.servers).insert(peer, addrs.clone());
            lock(&self.table).seen(peer, addrs, Instant::now());
        } else {
            lock(&self.servers).remove(&peer);
            lock(&self.table).remove(&peer);
        }
    }
}

/// An [`Inbound`] for a host that asks others but holds no DHT of its own (tests): it
/// refuses every request and ignores what identify learns.
#[derive(Debug, Clone, Copy, Default)]
pub struct Refusing;

impl Inbound for Refusing {
    type Request = Request;

    fn rpc(&self) -> Option<Rpc> {
        Some(wire::RPC)
    }

    fn decode(&self, frame: &[u8]) -> Result<Request, String> {
        Request::decode(frame).map_err(|e| e.to_string())
    }

    fn request(&self, peer: PeerId, role: Option<Role>, request: Request) -> Vec<u8> {
        answer_as(peer, role, request, |_| {
            let reason = "no DHT here".into();
            Response {
                now: 0,
                body: ResponseBody::Refused { reason },
            }
        })
    }

    fn refusal(&self, reason: &str) -> Vec<u8> {
        wire::encode(&refused(reason))
    }

    fn identified(&self, _: PeerId, _: Vec<Multiaddr>, _: bool) {}
}

/// `answer`'s answer to `request` from `peer`, unless its `role` in an authorized run may not
/// ask it: a monitor reads the run, it writes nothing. The frame to send.
fn answer_as(
    peer: PeerId,
    role: Option<Role>,
    request: Request,
    answer: impl FnOnce(Request) -> Response,
) -> Vec<u8> {
    let stores = matches!(
        request.body,
        RequestBody::Store { .. } | RequestBody::StoreNear { .. }
    );
    let response = if role == Some(Role::Monitor) && stores {
        let reason = "a monitor may not store records in this run";
        tracing::warn!("refused a request from {peer}: {reason}");
        refused(reason)
    } else {
        answer(request)
    };
    wire::encode(&response)
}

/// A refusal, saying why.
fn refused(reason: &str) -> Response {
    Response {
        now: now(),
        body: ResponseBody::Refused {
            reason: reason.into(),
        },
    }
}

/// What a lookup asks each peer on its way.
#[derive(Debug, Clone, Copy)]
enum Ask<'a> {
    /// Only for closer peers.
    Nodes,
    /// For the value of a key, and closer peers.
    Value(&'a [u8]),
    /// To store these records, and for closer peers.
    Store(&'a [Record]),
}

/// What a lookup found.
#[derive(Debug, Default)]
struct Found {
    /// Peers that took the records of an `Ask::Store` lookup.
    stored: HashSet<PeerId>,
    /// The last refusal of a record, if any.
    rejection: Option<Rejection>,
    /// The k closest peers not known to be dead, nearest first.
    closest: Vec<Contact>,
    /// The merged entry, for gets.
    entry: Option<Entry>,
    /// Peers among the closest that answered without the value (where to cache it).
    lacking: Vec<Contact>,
}

/// A running DHT node; cloning shares it.
#[derive(Debug, Clone)]
pub struct Dht {
    host: Host,
    shared: Arc<Shared>,
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

    /// A node on the in-memory transport at a random port (for tests and benchmarks).
    pub async fn start_memory(keypair: Keypair, config: Config) -> Result<Dht, Error> {
        let port = rand::random::<u64>() | 1;
        let mut host_config = host::Config::new(keypair, Transports::Memory);
        host_config.listen = vec![libp2p::multiaddr::Protocol::Memory(port).into()];
        Dht::start(host_config, config, Validators::default()).await
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

    /// Joins through `initial` peers (full multiaddrs with `/p2p/PEER_ID`): asks each for the
    /// peers near us, checks the clock against theirs, then looks itself up. Returns the
    /// largest clock skew seen (ms, signed: theirs minus ours).
    pub async fn bootstrap(&self, initial: &[Multiaddr]) -> Result<i64, Error> {
        let mut answered = 0;
        let mut errors = Vec::new();
        let mut worst: i64 = 0;
        for addr in initial {
            let Some(peer) = addr.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                _ => None,
            }) else {
                return Err(Error::NoPeerId(addr.clone()));
            };
            if peer == self.peer_id() {
                // We are the first node of the run.
                answered += 1;
                continue;
            }
            let sent = now();
            let target = routing::peer_id(&self.peer_id());
            match self
                .call(peer, vec![addr.clone()], RequestBody::FindNode { target })
                .await
            {
                Ok(Response {
                    body: ResponseBody::Refused { reason },
                    ..
                }) if reason != CLIENT_MODE => errors.push(format!("{addr}: refused: {reason}")),
                Ok(response) => {
                    answered += 1;
                    let received = now();
                    let ours = (sent + received) / 2;
                    let skew = response.now as i64 - ours as i64;
                    let abs = Duration::from_millis(skew.unsigned_abs());
                    if abs > self.shared.config.skew_limit {
                        return Err(Error::ClockSkew {
                            peer,
                            skew_ms: skew,
                        });
                    }
                    if abs > self.shared.config.skew_warn {
                        tracing::warn!(
                            "clock skew of {skew} ms against {peer}: check this machine's clock"
                        );
                    }
                    if skew.abs() > worst.abs() {
                        worst = skew;
                    }
                    lock(&self.shared.table).seen(peer, vec![addr.clone()], Instant::now());
                    if let ResponseBody::Nodes { peers } = response.body {
                        self.learn(&peers);
                    }
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        if answered == 0 && !initial.is_empty() {
            return Err(Error::NoBootstrap(errors.join("; ")));
        }
        self.lookup(routing::peer_id(&self.peer_id()), Ask::Nodes)
            .await;
        Ok(worst)
    }

    /// Looks up random ids in buckets not refreshed for `every`, keeping the table fresh.
    pub async fn refresh(&self, every: Duration) {
        let now = Instant::now();
        let stale = lock(&self.shared.table).stale_buckets(now, every);
        for b in stale {
            let random: Id = rand::random();
            let target = lock(&self.shared.table).id_in_bucket(b, random);
            lock(&self.shared.table).touch(b, now);
            self.lookup(target, Ask::Nodes).await;
        }
    }

    fn learn(&self, peers: &[PeerInfo]) {
        let now = Instant::now();
        let mut table = lock(&self.shared.table);
        for p in peers.iter().take(wire::MAX_PEERS) {
            if let Some((peer, addrs)) = from_info(p)
                && peer != self.shared.local
            {
                table.heard(peer, addrs, now);
            }
        }
    }

    async fn call(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        body: RequestBody,
    ) -> Result<Response, host::Error> {
        let deadline = lock(&self.shared.rtts).deadline(&peer);
        let started = Instant::now();
        let request = Request {
            client: self.shared.is_client(),
            body,
        };
        let result = wire::rpc(&self.host, peer, addrs, &request, deadline).await;
        match &result {
            Ok(Response {
                body: ResponseBody::Refused { reason },
                ..
            }) if reason == CLIENT_MODE => {
                lock(&self.shared.servers).remove(&peer);
                lock(&self.shared.table).remove(&peer);
            }
            Ok(_) => lock(&self.shared.rtts).observe(peer, started.elapsed()),
            Err(_) => lock(&self.shared.table).failed(&peer, Instant::now()),
        }
        result
    }

    /// An iterative lookup of `target`: queries the closest known peers α at a time, moving
    /// towards the k closest that answer; with `key`, asks for its value and merges every
    /// answer.
    async fn lookup(&self, target: Id, ask: Ask<'_>) -> Found {
        let key = match ask {
            Ask::Value(key) => Some(key),
            _ => None,
        };
        let cfg = &self.shared.config;
        #[derive(PartialEq)]
        enum State {
            New,
            Asked,
            Answered { had_value: bool },
            Failed,
        }
        let mut candidates: BTreeMap<Id, (Contact, State)> = BTreeMap::new();
        for c in lock(&self.shared.table).closest(&target, cfg.k) {
            candidates.insert(routing::distance(&c.id, &target), (c, State::New));
        }
        let mut found = Found::default();
        let mut in_flight = FuturesUnordered::new();
        let (started, mut asked) = (Instant::now(), 0usize);
        loop {
            // The k closest that have not failed: done when all of them answered.
            let live: Vec<&Id> = candidates
                .iter()
                .filter(|(_, (_, s))| *s != State::Failed)
                .take(cfg.k)
                .map(|(d, _)| d)
                .collect();
            let waiting: Vec<Id> = live
                .iter()
                .filter(|d| candidates[**d].1 == State::New)
                .map(|d| **d)
                .collect();
            let answered = |d: &&Id| matches!(candidates[*d].1, State::Answered { .. });
            let all_answered = live.iter().all(answered);
            // Converged once the α closest live peers answered (no answer brought anyone closer
            // than them). A get stops there once it holds a value (stores reach the k closest,
            // so the nearest hold the latest); a node lookup stops there and hands back the k
            // closest it knows, the stores that follow check them.
            let converged = live.iter().take(cfg.alpha).all(answered);
            let done = match key {
                Some(_) => converged && found.entry.is_some(),
                None => converged,
            };
            if all_answered || done || (waiting.is_empty() && in_flight.is_empty()) {
                break;
            }
            for d in waiting
                .into_iter()
                .take(cfg.alpha.saturating_sub(in_flight.len()))
            {
                let Some((contact, state)) = candidates.get_mut(&d) else {
                    continue;
                };
                *state = State::Asked;
                asked += 1;
                let (peer, addrs) = (contact.peer, contact.addrs.clone());
                let body = match ask {
                    Ask::Value(key) => RequestBody::Get { key: key.to_vec() },
                    Ask::Nodes => RequestBody::FindNode { target },
                    Ask::Store(records) => RequestBody::StoreNear {
                        target,
                        records: records.to_vec(),
                    },
                };
                let this = self.clone();
                in_flight.push(async move { (d, this.call(peer, addrs, body).await) });
            }
            let Some((d, result)) = in_flight.next().await else {
                break;
            };
            let Some((contact, state)) = candidates.get_mut(&d) else {
                continue;
            };
            let peers = match result {
                Ok(Response {
                    body: ResponseBody::Nodes { peers },
                    ..
                }) => {
                    *state = State::Answered { had_value: false };
                    peers
                }
                Ok(Response {
                    body: ResponseBody::Value { entry, closer },
                    ..
                }) => {
                    *state = State::Answered {
                        had_value: entry.is_some(),
                    };
                    if let (Some(e), Some(key)) = (entry, key) {
                        merge_wire(&mut found.entry, key, &e, &self.shared);
                    }
                    closer
                }
                Ok(Response {
                    body: ResponseBody::StoredNear { results, peers },
                    ..
                }) => {
                    *state = State::Answered { had_value: false };
                    match results.first() {
                        Some(Ok(()) | Err(Rejection::Stale)) => {
                            found.stored.insert(contact.peer);
                        }
                        Some(Err(e)) => found.rejection = Some(e.clone()),
                        None => {}
                    }
                    peers
                }
                Ok(_) | Err(_) => {
                    *state = State::Failed;
                    Vec::new()
                }
            };
            let (contact_peer, contact_addrs) = (contact.peer, contact.addrs.clone());
            if matches!(candidates[&d].1, State::Answered { .. }) {
                lock(&self.shared.table).seen(contact_peer, contact_addrs, Instant::now());
            }
            let now = Instant::now();
            for p in peers.iter().take(wire::MAX_PEERS) {
                let Some((peer, addrs)) = from_info(p) else {
                    continue;
                };
                if peer == self.shared.local
                    || addrs.is_empty()
                    || lock(&self.shared.table).is_banned(&peer, now)
                {
                    continue;
                }
                let id = routing::peer_id(&peer);
                candidates
                    .entry(routing::distance(&id, &target))
                    .or_insert_with(|| {
                        let c = Contact {
                            peer,
                            id,
                            addrs: addrs.clone(),
                            last_seen: now,
                            failures: 0,
                        };
                        (c, State::New)
                    });
                lock(&self.shared.table).heard(peer, addrs, now);
            }
        }
        tracing::debug!(
            "lookup: {asked} peers asked in {:.1} ms, value {}",
            started.elapsed().as_secs_f64() * 1e3,
            found.entry.is_some()
        );
        for (contact, state) in candidates.into_values() {
            if found.closest.len() >= cfg.k {
                break;
            }
            match state {
                State::Failed => {}
                State::Answered { had_value } => {
                    if !had_value {
                        found.lacking.push(contact.clone());
                    }
                    found.closest.push(contact);
                }
                State::New | State::Asked => found.closest.push(contact),
            }
        }
        found
    }

    /// Stores `value` under `key` (and `subkey`) until `expiration` on the k closest nodes (and
    /// locally, for a server among them). Owner subkeys must be signed: see [`Dht::store_signed`].
    /// Returns how many nodes took it.
    pub async fn store(
        &self,
        key: &[u8],
        subkey: Option<Subkey>,
        value: Vec<u8>,
        expiration: Time,
    ) -> Result<usize, Error> {
        let record = Record {
            key: key.to_vec(),
            subkey,
            item: Item {
                value,
                expiration,
                signature: None,
            },
        };
        self.store_record(record).await
    }

    /// Stores `value` under `key`, in this node's own signed subkey.
    pub async fn store_signed(
        &self,
        keypair: &Keypair,
        key: &[u8],
        value: Vec<u8>,
        expiration: Time,
    ) -> Result<usize, Error> {
        self.store_record(record::signed(keypair, key, value, expiration))
            .await
    }

    /// Stores a prepared record.
    pub async fn store_record(&self, record: Record) -> Result<usize, Error> {
        record::check(
            &record,
            now(),
            &self.shared.config.limits,
            &self.shared.validators,
        )?;
        // The lookup stores on the peers it meets near the key; then the k closest it found
        // that do not hold the record yet get it too.
        let records = std::slice::from_ref(&record);
        let found = self
            .lookup(routing::id_of(&record.key), Ask::Store(records))
            .await;
        let mut stored = found.stored.len();
        let mut last_rejection = found.rejection.clone();
        if !self.shared.is_client() {
            let local_distance = routing::distance(
                &routing::peer_id(&self.shared.local),
                &routing::id_of(&record.key),
            );
            let kth = found
                .closest
                .get(self.shared.config.k.saturating_sub(1))
                .map(|c| routing::distance(&c.id, &routing::id_of(&record.key)));
            if kth.is_none_or(|kth| local_distance < kth)
                && self.shared.store_local(records, now(), None)[0].is_ok()
            {
                stored += 1;
            }
        }
        let mut calls = FuturesUnordered::new();
        for c in found
            .closest
            .iter()
            .filter(|c| !found.stored.contains(&c.peer))
        {
            let body = RequestBody::Store {
                records: vec![record.clone()],
            };
            calls.push(self.call(c.peer, c.addrs.clone(), body));
        }
        while let Some(result) = calls.next().await {
            if let Ok(Response {
                body: ResponseBody::Stored { results },
                ..
            }) = result
            {
                match results.first() {
                    Some(Ok(())) => stored += 1,
                    Some(Err(Rejection::Stale)) => stored += 1,
                    Some(Err(e)) => last_rejection = Some(e.clone()),
                    None => {}
                }
            }
        }
        if stored == 0 {
            return Err(match last_rejection {
                Some(r) => Error::Rejected(r),
                None => Error::NotStored,
            });
        }
        Ok(stored)
    }

    /// What `key` holds across the network (the latest of every replica, merged), or `None`.
    /// The result is cached on the nearest node that lacked it.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Entry>, Error> {
        let now = now();
        let mut entry = if self.shared.is_client() {
            None
        } else {
            lock(&self.shared.store).get(key, now)
        };
        let found = self.lookup(routing::id_of(key), Ask::Value(key)).await;
        if let Some(remote) = &found.entry {
            match &mut entry {
                Some(e) => e.merge(remote),
                None => entry = Some(remote.clone()),
            }
        }
        if let (Some(e), Some(target)) = (&entry, found.lacking.first()) {
            let records = records_of(key, &to_wire(e.clone()));
            let records: Vec<Record> = records.into_iter().take(wire::MAX_RECORDS).collect();
            let _ = self
                .call(
                    target.peer,
                    target.addrs.clone(),
                    RequestBody::Store { records },
                )
                .await;
        }
        Ok(entry)
    }
}

impl Dht {
    /// The values under `key`'s owner subkeys, decoded as postcard `T`, by owner (signatures
    /// checked on the way in; values that don't decode are skipped): the pattern of every
    /// per-peer record (offers, progress reports).
    pub async fn get_owned<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Vec<(PeerId, T)>, Error> {
        let mut out = Vec::new();
        if let Some(Entry::Dict(d)) = self.get(key).await? {
            for (subkey, item) in d {
                let Subkey::Owner(owner) = subkey else {
                    continue;
                };
                if let (Ok(peer), Ok(value)) = (
                    PeerId::from_bytes(&owner),
                    postcard::from_bytes::<T>(&item.value),
                ) {
                    out.push((peer, value));
                }
            }
        }
        Ok(out)
    }
}

/// Merges a replica's answer into what a get found, keeping only records that pass the checks
/// (a node may lie).
fn merge_wire(found: &mut Option<Entry>, key: &[u8], e: &WireEntry, shared: &Shared) {
    let now = now();
    for r in records_of(key, e) {
        if record::check(&r, now, &shared.config.limits, &shared.validators).is_err() {
            continue;
        }
        let view = match r.subkey {
            None => Entry::Value(r.item),
            Some(s) => Entry::Dict(BTreeMap::from([(s, r.item)])),
        };
        match found {
            Some(f) => f.merge(&view),
            None => *found = Some(view),
        }
    }
}
