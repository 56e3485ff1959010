//! Iterative Kademlia lookups (α parallel queries towards the k closest that answer) and what
//! they drive: joining through initial peers, refreshing the table, stores and gets.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use potluck_core::clock::{Time, now};
use potluck_core::lock;

use super::node::{CLIENT_MODE, Dht, Error, Shared, from_info, records_of, to_wire};
use super::record::{self, Item, Record, Rejection, Subkey};
use super::routing::{self, Contact, Id};
use super::store::Entry;
use super::wire::{self, PeerInfo, Request, RequestBody, Response, ResponseBody, WireEntry};
use crate::host;

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

impl Dht {
    /// Joins through `initial` peers (full multiaddrs with `/p2p/PEER_ID`): asks each for the
    /// peers near us, checks the clock against theirs, then looks itself up. Returns the
    /// largest clock skew seen among the peers it joined through (ms, signed: theirs minus
    /// ours).
    ///
    /// Clocks: when every answering peer's skew is past the limit, this machine's clock is the
    /// one off (an error, saying so); otherwise a peer whose skew is past the limit is left out
    /// (a warning), and the join goes on through the others.
    pub async fn bootstrap(&self, initial: &[Multiaddr]) -> Result<i64, Error> {
        let mut answered = 0;
        let mut errors = Vec::new();
        let mut answers = Vec::new();
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
                    let received = now();
                    let ours = (sent + received) / 2;
                    let skew = response.now as i64 - ours as i64;
                    answers.push((peer, addr, skew, response.body));
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        let limit = self.shared.config.skew_limit;
        let past = |skew: i64| Duration::from_millis(skew.unsigned_abs()) > limit;
        if let Some((peer, _, skew, _)) = answers.first()
            && answers.iter().all(|(_, _, s, _)| past(*s))
        {
            return Err(Error::ClockSkew {
                peer: *peer,
                skew_ms: *skew,
            });
        }
        let mut worst: i64 = 0;
        for (peer, addr, skew, body) in answers {
            if past(skew) {
                tracing::warn!(
                    "left out initial peer {peer}: its clock is {skew} ms off this machine's and \
                     the other peers'"
                );
                errors.push(format!("{addr}: its clock is {skew} ms off"));
                continue;
            }
            if Duration::from_millis(skew.unsigned_abs()) > self.shared.config.skew_warn {
                tracing::warn!(
                    "clock skew of {skew} ms against {peer}: check this machine's clock"
                );
            }
            if skew.abs() > worst.abs() {
                worst = skew;
            }
            answered += 1;
            lock(&self.shared.table).seen(peer, vec![addr.clone()], Instant::now());
            if let ResponseBody::Nodes { peers } = body {
                self.learn(&peers);
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
    ///
    /// A peer that has not answered within its patience ([`Rtts::patience`]: a few of its
    /// round trips) is stalled: it frees its slot for the next candidate and no longer holds
    /// the lookup back; its answer still counts if it comes while the lookup runs. A peer
    /// gone without a word (killed, its link cut, or a QUIC connection whose peer vanished)
    /// answers nothing until the request's deadline: every get and store near it waited that
    /// long, two seconds or more, and a swarm of five peers that lost one read each other's
    /// progress too late to see one another. Each request runs to its end on its own, so a
    /// peer that never answers is counted as failed (and banned after a few) even when the
    /// lookup finished without it.
    async fn lookup(&self, target: Id, ask: Ask<'_>) -> Found {
        let key = match ask {
            Ask::Value(key) => Some(key),
            _ => None,
        };
        let cfg = &self.shared.config;
        #[derive(PartialEq)]
        enum State {
            New,
            /// Asked, and by when it is stalled.
            Asked(Instant),
            Stalled,
            Answered {
                had_value: bool,
            },
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
            // The k closest that have not failed (or stalled): done when all of them answered.
            let live: Vec<&Id> = candidates
                .iter()
                .filter(|(_, (_, s))| !matches!(s, State::Failed | State::Stalled))
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
            let active = candidates
                .values()
                .filter(|(_, s)| matches!(s, State::Asked(_)))
                .count();
            // Nothing left to ask and no answer due: the stalled are waited for only while
            // the lookup has nothing to show (all peers may be slow, not gone).
            let shown = match ask {
                Ask::Value(_) => found.entry.is_some(),
                Ask::Store(_) => !found.stored.is_empty(),
                Ask::Nodes => candidates
                    .values()
                    .any(|(_, s)| matches!(s, State::Answered { .. })),
            };
            // Every live peer answered (or nothing is left to ask) while stalled ones are still
            // out: the lookup ends only if it has something to show. A get whose live peers
            // all answered without the value, the holders being stalled on a loaded machine,
            // came back empty, and a newcomer that read the swarm so took itself for alone.
            let idle = waiting.is_empty() && active == 0;
            let settled = shown || in_flight.is_empty();
            if done || ((all_answered || idle) && settled) {
                break;
            }
            for d in waiting.into_iter().take(cfg.alpha.saturating_sub(active)) {
                let Some((contact, state)) = candidates.get_mut(&d) else {
                    continue;
                };
                let patience = lock(&self.shared.rtts).patience(&contact.peer);
                *state = State::Asked(Instant::now() + patience);
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
                let call = tokio::spawn(async move { this.call(peer, addrs, body).await });
                in_flight.push(async move {
                    let result = call.await.map_err(|e| host::Error::Rpc {
                        peer,
                        reason: e.to_string(),
                    });
                    (d, result.and_then(|r| r))
                });
            }
            // The next answer, or the moment the first peer asked runs out of patience.
            let stalls = candidates.values().filter_map(|(_, s)| match s {
                State::Asked(by) => Some(*by),
                _ => None,
            });
            let next = match stalls.min() {
                Some(by) => match tokio::time::timeout_at(by.into(), in_flight.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let now = Instant::now();
                        for (_, state) in candidates.values_mut() {
                            if matches!(state, State::Asked(by) if *by <= now) {
                                *state = State::Stalled;
                            }
                        }
                        continue;
                    }
                },
                None => in_flight.next().await,
            };
            let Some((d, result)) = next else {
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
                State::New | State::Asked(_) => found.closest.push(contact),
                // Asked already (a store's request to it is still on its way).
                State::Stalled => {}
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
