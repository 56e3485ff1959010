//! A node's local store of records, with the merge rules and a bound on its size.
//!
//! Rules (per key, after [`super::record::check`] passed):
//! - a value under a subkey replaces the one there only if it expires later;
//! - a plain value replaces a plain value that expires earlier, and a dictionary whose every
//!   subkey expires earlier and that holds no owner-signed subkey (anyone may write a plain
//!   value: it must not erase what owners signed);
//! - a subkey stored under a key holding a plain value turns it into a dictionary only if it
//!   expires later than the plain value;
//! - expired items vanish (they are never returned, and are dropped as time passes);
//! - when the store is full, the items that expire first are evicted to make room, and a new
//!   item that would itself be the first to go is refused;
//! - what one peer stored is charged to it, up to a quota: one peer cannot fill the store (and
//!   evict everyone else's records) alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use potluck_core::clock::Time;

use super::record::{Item, Limits, Record, Rejection, Subkey};

/// What a key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Value(Item),
    Dict(BTreeMap<Subkey, Item>),
}

impl Entry {
    /// The latest expiration in the entry.
    pub fn expiration(&self) -> Time {
        match self {
            Entry::Value(i) => i.expiration,
            Entry::Dict(d) => d.values().map(|i| i.expiration).max().unwrap_or(0),
        }
    }

    /// Whether the entry holds an owner-signed subkey.
    pub fn has_owners(&self) -> bool {
        matches!(self, Entry::Dict(d) if d.keys().any(|s| matches!(s, Subkey::Owner(_))))
    }

    /// Merges another node's view of the same key into this one, by the same rules as stores.
    pub fn merge(&mut self, other: &Entry) {
        match other {
            Entry::Value(i) => {
                if i.expiration > self.expiration() && !self.has_owners() {
                    *self = Entry::Value(i.clone());
                }
            }
            Entry::Dict(d) => {
                for (s, i) in d {
                    merge_subkey(self, s, i);
                }
            }
        }
    }
}

fn merge_subkey(entry: &mut Entry, subkey: &Subkey, item: &Item) -> bool {
    match entry {
        Entry::Value(v) => {
            if item.expiration > v.expiration {
                *entry = Entry::Dict(BTreeMap::from([(subkey.clone(), item.clone())]));
                true
            } else {
                false
            }
        }
        Entry::Dict(d) => match d.get(subkey) {
            Some(old) if old.expiration >= item.expiration => false,
            _ => {
                d.insert(subkey.clone(), item.clone());
                true
            }
        },
    }
}

/// Bytes an item is charged for in the store.
fn cost(key: &[u8], subkey: Option<&Subkey>, item: &Item) -> usize {
    let subkey = match subkey {
        Some(Subkey::Plain(b) | Subkey::Owner(b)) => b.len(),
        None => 0,
    };
    64 + key.len() + subkey + item.value.len() + item.signature.as_ref().map_or(0, Vec::len)
}

/// The store.
#[derive(Debug)]
pub struct Store {
    entries: HashMap<Vec<u8>, Entry>,
    /// (expiration, key, subkey) of every item: what expires and what is evicted first.
    by_expiry: BTreeSet<(Time, Vec<u8>, Option<Subkey>)>,
    bytes: usize,
    max_bytes: usize,
    limits: Limits,
    /// Who stored each item (absent: this node itself), and the bytes charged to each.
    storers: HashMap<(Vec<u8>, Option<Subkey>), Vec<u8>>,
    charged: HashMap<Vec<u8>, usize>,
    /// Bytes one storer may hold here.
    quota: usize,
}

impl Store {
    /// An empty store of at most `max_bytes` (charged per item: key, subkey, value, signature
    /// and 64 bytes of overhead).
    pub fn new(max_bytes: usize, limits: Limits) -> Store {
        Store::with_quota(max_bytes, max_bytes, limits)
    }

    /// The same, where each storing peer may hold at most `quota` bytes.
    pub fn with_quota(max_bytes: usize, quota: usize, limits: Limits) -> Store {
        Store {
            entries: HashMap::new(),
            by_expiry: BTreeSet::new(),
            bytes: 0,
            max_bytes,
            limits,
            storers: HashMap::new(),
            charged: HashMap::new(),
            quota,
        }
    }

    /// Bytes charged to `storer` now.
    pub fn charged(&self, storer: &[u8]) -> usize {
        self.charged.get(storer).copied().unwrap_or(0)
    }

    /// Takes `cost` off the storer of `key`/`subkey`, if another peer stored it.
    fn uncharge(&mut self, key: &[u8], subkey: Option<&Subkey>, cost: usize) {
        if let Some(storer) = self.storers.remove(&(key.to_vec(), subkey.cloned()))
            && let Some(c) = self.charged.get_mut(&storer)
        {
            *c = c.saturating_sub(cost);
            if *c == 0 {
                self.charged.remove(&storer);
            }
        }
    }

    /// Bytes charged now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keys held (expired ones included until the next [`Store::expire`]).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn remove_item(&mut self, key: &[u8], subkey: Option<&Subkey>) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        match (entry, subkey) {
            (Entry::Value(item), None) => {
                let c = cost(key, None, item);
                self.bytes -= c;
                self.by_expiry
                    .remove(&(item.expiration, key.to_vec(), None));
                self.entries.remove(key);
                self.uncharge(key, None, c);
            }
            (Entry::Dict(d), Some(s)) => {
                if let Some(item) = d.remove(s) {
                    let c = cost(key, Some(s), &item);
                    self.bytes -= c;
                    self.by_expiry
                        .remove(&(item.expiration, key.to_vec(), Some(s.clone())));
                    if d.is_empty() {
                        self.entries.remove(key);
                    }
                    self.uncharge(key, Some(s), c);
                } else if d.is_empty() {
                    self.entries.remove(key);
                }
            }
            _ => {}
        }
    }

    fn remove_entry(&mut self, key: &[u8]) {
        match self.entries.get(key).cloned() {
            Some(Entry::Value(_)) => self.remove_item(key, None),
            Some(Entry::Dict(d)) => {
                for s in d.keys() {
                    self.remove_item(key, Some(s));
                }
            }
            None => {}
        }
    }

    fn insert_item(
        &mut self,
        key: &[u8],
        subkey: Option<&Subkey>,
        item: &Item,
        storer: Option<&[u8]>,
    ) {
        let c = cost(key, subkey, item);
        self.bytes += c;
        if let Some(storer) = storer {
            *self.charged.entry(storer.to_vec()).or_insert(0) += c;
            self.storers
                .insert((key.to_vec(), subkey.cloned()), storer.to_vec());
        }
        self.by_expiry
            .insert((item.expiration, key.to_vec(), subkey.cloned()));
        match subkey {
            None => {
                self.entries
                    .insert(key.to_vec(), Entry::Value(item.clone()));
            }
            Some(s) => match self.entries.get_mut(key) {
                Some(Entry::Dict(d)) => {
                    d.insert(s.clone(), item.clone());
                }
                _ => {
                    self.entries.insert(
                        key.to_vec(),
                        Entry::Dict(BTreeMap::from([(s.clone(), item.clone())])),
                    );
                }
            },
        }
    }

    /// Drops every item that expired by `now`.
    pub fn expire(&mut self, now: Time) {
        while let Some((at, key, subkey)) = self.by_expiry.first().cloned() {
            if at > now {
                break;
            }
            self.remove_item(&key, subkey.as_ref());
        }
    }

    /// Stores a checked record. `Ok(true)`: stored; `Err(Stale)`: something newer is there.
    pub fn put(&mut self, r: &Record, now: Time) -> Result<bool, Rejection> {
        self.put_by(r, now, None)
    }

    /// [`Store::put`] for `storer` (a peer's id bytes; None: this node), charged to it:
    /// `Err(Quota)` when it would hold more than its quota here.
    pub fn put_by(
        &mut self,
        r: &Record,
        now: Time,
        storer: Option<&[u8]>,
    ) -> Result<bool, Rejection> {
        self.expire(now);
        let key = r.key.as_slice();
        let item = &r.item;
        match (&r.subkey, self.entries.get(key)) {
            (None, Some(existing)) if existing.has_owners() => return Err(Rejection::Owned),
            (None, Some(existing)) if existing.expiration() >= item.expiration => {
                return Err(Rejection::Stale);
            }
            (Some(_), Some(Entry::Value(v))) if v.expiration >= item.expiration => {
                return Err(Rejection::Stale);
            }
            (Some(s), Some(Entry::Dict(d))) => {
                if d.get(s)
                    .is_some_and(|old| old.expiration >= item.expiration)
                {
                    return Err(Rejection::Stale);
                }
                if !d.contains_key(s) && d.len() >= self.limits.max_subkeys {
                    return Err(Rejection::Full);
                }
            }
            _ => {}
        }
        // Make room: evict what expires first, unless the newcomer itself would be first.
        let needed = cost(key, r.subkey.as_ref(), item);
        if needed > self.max_bytes {
            return Err(Rejection::Full);
        }
        if let Some(storer) = storer {
            // What it replaces of its own is credited back.
            let place = (key.to_vec(), r.subkey.clone());
            let own = match (self.storers.get(&place), self.entries.get(key), &r.subkey) {
                (Some(s), Some(Entry::Value(old)), None) if s == storer => cost(key, None, old),
                (Some(s), Some(Entry::Dict(d)), Some(sub)) if s == storer => {
                    d.get(sub).map_or(0, |old| cost(key, Some(sub), old))
                }
                _ => 0,
            };
            if self.charged(storer) - own.min(self.charged(storer)) + needed > self.quota {
                return Err(Rejection::Quota);
            }
        }
        while self.bytes + needed > self.max_bytes {
            let Some((at, k, s)) = self.by_expiry.first().cloned() else {
                break;
            };
            if at >= item.expiration {
                return Err(Rejection::Full);
            }
            self.remove_item(&k, s.as_ref());
        }
        match (&r.subkey, self.entries.get(key)) {
            (None, Some(_)) => self.remove_entry(key),
            (Some(_), Some(Entry::Value(_))) => self.remove_item(key, None),
            (Some(s), Some(Entry::Dict(d))) if d.contains_key(s) => self.remove_item(key, Some(s)),
            _ => {}
        }
        self.insert_item(key, r.subkey.as_ref(), item, storer);
        Ok(true)
    }

    /// What `key` holds at `now` (expired items left out).
    pub fn get(&mut self, key: &[u8], now: Time) -> Option<Entry> {
        self.expire(now);
        self.entries.get(key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(v: u8, expiration: Time) -> Item {
        Item {
            value: vec![v],
            expiration,
            signature: None,
        }
    }

    fn rec(subkey: Option<u8>, v: u8, expiration: Time) -> Record {
        Record {
            key: b"k".to_vec(),
            subkey: subkey.map(|s| Subkey::Plain(vec![s])),
            item: item(v, expiration),
        }
    }

    /// Squatting a run's key: a plain value, whatever its expiry, neither replaces the
    /// owner-signed records under a key (in a store or when a get merges replicas' answers)
    /// nor keeps their owners from writing.
    #[test]
    fn a_plain_value_never_displaces_owner_signed_records() {
        let owned = Record {
            key: b"k".to_vec(),
            subkey: Some(Subkey::Owner(vec![1; 38])),
            item: item(1, 100),
        };
        let squat = rec(None, 9, 10_000);
        let mut s = Store::new(1 << 20, Limits::default());
        s.put(&owned, 0).unwrap();
        assert_eq!(s.put(&squat, 0), Err(Rejection::Owned));
        let mut newer = owned.clone();
        newer.item = item(2, 200);
        assert!(s.put(&newer, 0).is_ok());
        let Some(mut seen) = s.get(b"k", 0) else {
            panic!("the owner's record is gone")
        };
        let before = seen.clone();
        seen.merge(&Entry::Value(item(9, 10_000)));
        assert_eq!(seen, before);
        // Dictionaries of plain subkeys are anyone's: a later plain value still replaces them.
        let mut s = Store::new(1 << 20, Limits::default());
        s.put(&rec(Some(1), 1, 100), 0).unwrap();
        assert!(s.put(&squat, 0).is_ok());
    }

    #[test]
    fn later_expiration_wins_per_subkey_and_values_and_dicts_replace_each_other() {
        let mut s = Store::new(1 << 20, Limits::default());
        assert!(s.put(&rec(None, 1, 100), 0).is_ok());
        assert_eq!(s.put(&rec(None, 2, 90), 0), Err(Rejection::Stale));
        assert_eq!(s.put(&rec(Some(7), 3, 100), 0), Err(Rejection::Stale));
        assert!(s.put(&rec(Some(7), 3, 101), 0).is_ok());
        assert!(s.put(&rec(Some(8), 4, 50), 0).is_ok());
        let Some(Entry::Dict(d)) = s.get(b"k", 0) else {
            panic!("not a dict")
        };
        assert_eq!(d.len(), 2);
        assert_eq!(s.put(&rec(None, 5, 101), 0), Err(Rejection::Stale));
        assert!(s.put(&rec(None, 5, 102), 0).is_ok());
        assert_eq!(s.get(b"k", 0), Some(Entry::Value(item(5, 102))));
        // Expiry.
        assert_eq!(s.get(b"k", 102), None);
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn a_full_store_evicts_what_expires_first() {
        let one = cost(b"a", None, &item(0, 0));
        let mut s = Store::new(3 * one, Limits::default());
        for (k, exp) in [(b"a", 30), (b"b", 10), (b"c", 20)] {
            s.put(
                &Record {
                    key: k.to_vec(),
                    subkey: None,
                    item: item(0, exp),
                },
                0,
            )
            .unwrap();
        }
        // d expires after b: b goes.
        s.put(
            &Record {
                key: b"d".to_vec(),
                subkey: None,
                item: item(0, 15),
            },
            0,
        )
        .unwrap();
        assert!(s.get(b"b", 0).is_none() && s.get(b"d", 0).is_some());
        // e would go first itself: refused.
        let e = Record {
            key: b"e".to_vec(),
            subkey: None,
            item: item(0, 5),
        };
        assert_eq!(s.put(&e, 0), Err(Rejection::Full));
        assert!(s.bytes() <= 3 * one);
    }

    #[test]
    fn one_storer_cannot_hold_more_than_its_quota() {
        let one = cost(b"a0", None, &item(0, 0));
        let mut s = Store::with_quota(100 * one, 3 * one, Limits::default());
        let at = |k: &str, exp| Record {
            key: k.as_bytes().to_vec(),
            subkey: None,
            item: item(0, exp),
        };
        let (greedy, other) = (b"greedy".as_slice(), b"other".as_slice());
        for k in ["a0", "a1", "a2"] {
            s.put_by(&at(k, 100), 0, Some(greedy)).unwrap();
        }
        assert_eq!(s.charged(greedy), 3 * one);
        assert_eq!(
            s.put_by(&at("a3", 100), 0, Some(greedy)),
            Err(Rejection::Quota)
        );
        // Replacing its own record is fine: what it replaces is credited back.
        s.put_by(&at("a0", 200), 0, Some(greedy)).unwrap();
        assert_eq!(s.charged(greedy), 3 * one);
        // Others and this node itself are not held back.
        s.put_by(&at("b0", 100), 0, Some(other)).unwrap();
        s.put(&at("c0", 100), 0).unwrap();
        // Another's newer record in its place takes the charge off it; expiry frees the rest.
        s.put_by(&at("a1", 300), 0, Some(other)).unwrap();
        assert_eq!((s.charged(greedy), s.charged(other)), (2 * one, 2 * one));
        s.put_by(&at("a3", 150), 0, Some(greedy)).unwrap();
        assert_eq!(s.get(b"a2", 100), None);
        assert_eq!(s.charged(greedy), 2 * one);
        assert_eq!(s.get(b"zz", 10_000), None);
        assert_eq!((s.charged(greedy), s.charged(other), s.bytes()), (0, 0, 0));
    }

    proptest! {
        #[test]
        fn charges_always_add_up_to_what_peers_hold(
            ops in proptest::collection::vec((0u8..3, 0u8..6, 0u8..3, 1u64..60), 1..60),
        ) {
            let one = cost(b"k0", None, &item(0, 0));
            let mut s = Store::with_quota(8 * one, 3 * one, Limits::default());
            for (who, key, sub, exp) in &ops {
                let r = Record {
                    key: vec![b'k', *key],
                    subkey: (*sub > 0).then(|| Subkey::Plain(vec![*sub])),
                    item: item(0, *exp),
                };
                let storer = [*who];
                let _ = s.put_by(&r, 0, (*who > 0).then_some(&storer[..]));
                prop_assert!(s.bytes() <= 8 * one);
                for w in 1..3u8 {
                    prop_assert!(s.charged(&[w]) <= 3 * one);
                }
                let charged: usize = s.charged.values().sum();
                prop_assert!(charged <= s.bytes());
            }
            // Everything expired: nothing is charged to anyone.
            s.expire(1000);
            prop_assert!(s.charged.is_empty() && s.storers.is_empty() && s.bytes() == 0);
        }

        #[test]
        fn subkey_merges_keep_the_latest_item_of_each_subkey(
            ops in proptest::collection::vec((0u8..4, 0u8..255, 1u64..50), 1..40),
        ) {
            let mut s = Store::new(1 << 20, Limits::default());
            let mut want: BTreeMap<Subkey, Item> = BTreeMap::new();
            for (sub, v, exp) in &ops {
                let r = rec(Some(*sub), *v, *exp);
                let _ = s.put(&r, 0);
                let k = Subkey::Plain(vec![*sub]);
                if want.get(&k).is_none_or(|old| old.expiration < *exp) {
                    want.insert(k, item(*v, *exp));
                }
            }
            prop_assert_eq!(s.get(b"k", 0), Some(Entry::Dict(want.clone())));
            // At any later time only unexpired subkeys are left.
            for t in [0u64, 10, 25, 49, 50] {
                let left: BTreeMap<Subkey, Item> =
                    want.iter().filter(|(_, i)| i.expiration > t).map(|(k, i)| (k.clone(), i.clone())).collect();
                let got = s.get(b"k", t);
                if left.is_empty() {
                    prop_assert_eq!(got, None);
                } else {
                    prop_assert_eq!(got, Some(Entry::Dict(left)));
                }
            }
        }

        #[test]
        fn merging_views_agrees_with_storing_and_is_order_free(
            ops in proptest::collection::vec((proptest::option::of(0u8..3), 0u8..255, 1u64..50), 1..20),
        ) {
            // Storing every record into one store equals merging per-record views, in any order.
            let mut s = Store::new(1 << 20, Limits::default());
            for (sub, v, exp) in &ops {
                let _ = s.put(&rec(*sub, *v, *exp), 0);
            }
            let views: Vec<Entry> = ops.iter().map(|(sub, v, exp)| match sub {
                None => Entry::Value(item(*v, *exp)),
                Some(k) => Entry::Dict(BTreeMap::from([(Subkey::Plain(vec![*k]), item(*v, *exp))])),
            }).collect();
            let mut forward = views[0].clone();
            for v in &views[1..] { forward.merge(v); }
            let stored = s.get(b"k", 0);
            prop_assert_eq!(stored.map(|e| e.expiration()), Some(forward.expiration()));
        }
    }
}
