//! Kademlia routing: 256-bit ids (SHA-256 of a peer id or of a key), XOR distance, one bucket of
//! at most k contacts per distance prefix; dead contacts are evicted and banned for a while.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use sha2::{Digest, Sha256};

/// A position in the 256-bit id space.
pub type Id = [u8; 32];

/// The id of some bytes (a key, or a peer id's bytes).
pub fn id_of(bytes: &[u8]) -> Id {
    Sha256::digest(bytes).into()
}

/// The id of a peer.
pub fn peer_id(peer: &PeerId) -> Id {
    id_of(&peer.to_bytes())
}

/// XOR distance.
pub fn distance(a: &Id, b: &Id) -> Id {
    let mut d = [0u8; 32];
    for i in 0..32 {
        d[i] = a[i] ^ b[i];
    }
    d
}

/// Which bucket `other` falls in seen from `local`: the number of leading bits they share
/// (`None` for the same id).
pub fn bucket_of(local: &Id, other: &Id) -> Option<usize> {
    let d = distance(local, other);
    let zeros = d
        .iter()
        .position(|&b| b != 0)
        .map(|i| i * 8 + d[i].leading_zeros() as usize)?;
    Some(zeros)
}

/// A known peer.
#[derive(Debug, Clone)]
pub struct Contact {
    pub peer: PeerId,
    pub id: Id,
    pub addrs: Vec<Multiaddr>,
    pub last_seen: Instant,
    /// RPC failures since it last answered.
    pub failures: u32,
}

/// How many failures in a row evict a contact.
const MAX_FAILURES: u32 = 3;

/// The routing table.
#[derive(Debug)]
pub struct Table {
    local: Id,
    k: usize,
    buckets: Vec<Vec<Contact>>,
    /// When each bucket last saw a lookup or a new contact.
    touched: Vec<Instant>,
    banned: HashMap<PeerId, Instant>,
    ban: Duration,
}

impl Table {
    /// An empty table around `local` with buckets of `k`; evicted peers are not taken back
    /// on others' word for `ban`.
    pub fn new(local: Id, k: usize, ban: Duration) -> Table {
        Table {
            local,
            k,
            buckets: vec![Vec::new(); 256],
            touched: vec![Instant::now(); 256],
            banned: HashMap::new(),
            ban,
        }
    }

    /// This node's id.
    pub fn local(&self) -> Id {
        self.local
    }

    /// Contacts in the table.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `peer` is banned at `now`.
    pub fn is_banned(&mut self, peer: &PeerId, now: Instant) -> bool {
        match self.banned.get(peer) {
            Some(&until) if until > now => true,
            Some(_) => {
                self.banned.remove(peer);
                false
            }
            None => false,
        }
    }

    /// Records that `peer` itself answered or spoke to this node (it is alive) at `addrs`: an
    /// eviction no longer holds against it (a peer slow for a moment under load is back as
    /// soon as it is heard from again, or a busy swarm would split itself). A full bucket
    /// makes room only by dropping a contact that failed; otherwise the old, proven contacts
    /// stay. Returns whether `peer` is in the table now.
    pub fn seen(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, now: Instant) -> bool {
        self.banned.remove(&peer);
        self.insert(peer, addrs, now, true)
    }

    /// Records that another node named `peer` at `addrs` (hearsay): a peer evicted for failing
    /// is not taken back on others' word until its ban ends (dead peers linger in others'
    /// tables). Nor does hearsay clear the failures of a contact this node holds: every
    /// answer of the others named a peer gone without a word, and it was never evicted.
    /// Returns whether `peer` is in the table now.
    pub fn heard(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, now: Instant) -> bool {
        if self.is_banned(&peer, now) {
            return false;
        }
        self.insert(peer, addrs, now, false)
    }

    /// Puts `peer` in its bucket, or (`firsthand`: it answered) refreshes its contact.
    fn insert(
        &mut self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        now: Instant,
        firsthand: bool,
    ) -> bool {
        let id = peer_id(&peer);
        let Some(b) = bucket_of(&self.local, &id) else {
            return false;
        };
        self.touched[b] = now;
        let bucket = &mut self.buckets[b];
        if let Some(pos) = bucket.iter().position(|c| c.peer == peer) {
            if !firsthand {
                return true;
            }
            let mut c = bucket.remove(pos);
            c.last_seen = now;
            c.failures = 0;
            if !addrs.is_empty() {
                c.addrs = addrs;
            }
            bucket.push(c);
            return true;
        }
        if addrs.is_empty() {
            return false;
        }
        if bucket.len() >= self.k {
            match bucket.iter().position(|c| c.failures > 0) {
                Some(pos) => {
                    bucket.remove(pos);
                }
                None => return false,
            }
        }
        bucket.push(Contact {
            peer,
            id,
            addrs,
            last_seen: now,
            failures: 0,
        });
        true
    }

    /// Records a failed RPC to `peer`; after a few in a row it is evicted, and banned from
    /// hearsay (see [`Table::heard`]).
    pub fn failed(&mut self, peer: &PeerId, now: Instant) {
        let id = peer_id(peer);
        let Some(b) = bucket_of(&self.local, &id) else {
            return;
        };
        let bucket = &mut self.buckets[b];
        if let Some(pos) = bucket.iter().position(|c| c.peer == *peer) {
            bucket[pos].failures += 1;
            if bucket[pos].failures >= MAX_FAILURES {
                bucket.remove(pos);
                self.banned.insert(*peer, now + self.ban);
            }
        }
    }

    /// Removes `peer` (it left, or is not who it claimed).
    pub fn remove(&mut self, peer: &PeerId) {
        for bucket in &mut self.buckets {
            bucket.retain(|c| c.peer != *peer);
        }
    }

    /// The `n` contacts closest to `target`.
    pub fn closest(&self, target: &Id, n: usize) -> Vec<Contact> {
        let mut all: Vec<&Contact> = self.buckets.iter().flatten().collect();
        all.sort_by_key(|c| distance(&c.id, target));
        all.into_iter().take(n).cloned().collect()
    }

    /// The addresses known for `peer`.
    pub fn addrs(&self, peer: &PeerId) -> Option<Vec<Multiaddr>> {
        self.buckets
            .iter()
            .flatten()
            .find(|c| c.peer == *peer)
            .map(|c| c.addrs.clone())
    }

    /// Buckets not touched for `every` that hold contacts or could (below the deepest
    /// non-empty one): each wants a lookup of a random id in its range.
    pub fn stale_buckets(&self, now: Instant, every: Duration) -> Vec<usize> {
        let deepest = self
            .buckets
            .iter()
            .rposition(|b| !b.is_empty())
            .unwrap_or(0);
        (0..=deepest.min(255))
            .filter(|&b| now.duration_since(self.touched[b]) >= every)
            .collect()
    }

    /// Marks bucket `b` as freshly looked up.
    pub fn touch(&mut self, b: usize, now: Instant) {
        if let Some(t) = self.touched.get_mut(b) {
            *t = now;
        }
    }

    /// A random id in bucket `b`'s range: the local id's first `b` bits, bit `b` flipped, the
    /// rest from `random`.
    pub fn id_in_bucket(&self, b: usize, random: Id) -> Id {
        let b = b.min(255);
        let mut id = random;
        id[..b / 8].copy_from_slice(&self.local[..b / 8]);
        let (byte, bit) = (b / 8, b % 8);
        let before: u8 = if bit == 0 { 0 } else { 0xff << (8 - bit) };
        let flip: u8 = 0x80 >> bit;
        let local = self.local[byte];
        id[byte] = (local & before) | (!local & flip) | (random[byte] & !(before | flip));
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> Vec<Multiaddr> {
        vec!["/memory/1".parse().unwrap()]
    }

    #[test]
    fn ids_in_a_bucket_fall_in_it() {
        let local = id_of(b"local");
        let t = Table::new(local, 20, Duration::from_secs(1));
        for b in [0, 1, 7, 8, 9, 100, 255] {
            for seed in 0..20u8 {
                let id = t.id_in_bucket(b, id_of(&[seed, b as u8]));
                assert_eq!(bucket_of(&local, &id), Some(b), "bucket {b}");
            }
        }
    }

    #[test]
    fn full_buckets_keep_live_contacts_and_failing_ones_are_evicted_and_banned() {
        let now = Instant::now();
        let mut t = Table::new(id_of(b"me"), 2, Duration::from_secs(60));
        // Peers landing in bucket 0 (half of all ids) fill it quickly.
        let peers: Vec<PeerId> = (0..200).map(|_| PeerId::random()).collect();
        let in0: Vec<PeerId> = peers
            .into_iter()
            .filter(|p| bucket_of(&t.local(), &peer_id(p)) == Some(0))
            .take(3)
            .collect();
        assert!(t.seen(in0[0], addr(), now));
        assert!(t.seen(in0[1], addr(), now));
        assert!(
            !t.seen(in0[2], addr(), now),
            "a full bucket of live contacts took a newcomer"
        );
        t.failed(&in0[0], now);
        assert!(
            t.seen(in0[2], addr(), now),
            "a failing contact should make room"
        );
        for _ in 0..MAX_FAILURES {
            t.failed(&in0[1], now);
        }
        assert!(t.addrs(&in0[1]).is_none());
        assert!(
            !t.heard(in0[1], addr(), now),
            "banned peer re-entered on hearsay"
        );
        assert!(t.heard(in0[1], addr(), now + Duration::from_secs(61)));
    }

    #[test]
    fn an_evicted_peer_that_answers_itself_is_back_at_once() {
        let now = Instant::now();
        let mut t = Table::new(id_of(b"me"), 20, Duration::from_secs(60));
        let slow = PeerId::random();
        assert!(t.seen(slow, addr(), now));
        for _ in 0..MAX_FAILURES {
            t.failed(&slow, now);
        }
        assert!(t.addrs(&slow).is_none(), "three failures evict");
        assert!(!t.heard(slow, addr(), now), "others' word is not enough");
        assert!(t.seen(slow, addr(), now), "its own answer is");
        assert!(t.heard(slow, addr(), now), "and clears the ban");
    }

    #[test]
    fn others_naming_a_failing_peer_do_not_clear_its_failures() {
        let now = Instant::now();
        let mut t = Table::new(id_of(b"me"), 20, Duration::from_secs(60));
        let gone = PeerId::random();
        assert!(t.seen(gone, addr(), now));
        for _ in 0..MAX_FAILURES {
            t.failed(&gone, now);
            // Every other node's answer names it still (their tables lag).
            assert!(t.heard(gone, addr(), now) || t.addrs(&gone).is_none());
        }
        assert!(
            t.addrs(&gone).is_none(),
            "hearsay kept a failing peer in the table"
        );
    }

    #[test]
    fn closest_sorts_by_xor_distance() {
        let mut t = Table::new(id_of(b"me"), 20, Duration::from_secs(60));
        let now = Instant::now();
        for _ in 0..100 {
            t.seen(PeerId::random(), addr(), now);
        }
        let target = id_of(b"target");
        let got = t.closest(&target, 10);
        assert_eq!(got.len(), 10);
        assert!(
            got.windows(2)
                .all(|w| distance(&w[0].id, &target) <= distance(&w[1].id, &target))
        );
    }
}
