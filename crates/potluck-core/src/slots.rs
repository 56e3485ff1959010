//! Bounded places for concurrent work: at most so many in all, and so many per key (a peer, a
//! source address), so that one key cannot take every place. A place is held by a [`Slot`] and
//! given back when it is dropped; a key's count is forgotten when it is back to zero, so memory
//! is bounded by the places in use.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use crate::lock;

#[derive(Debug)]
struct Used<K> {
    all: usize,
    by_key: HashMap<K, usize>,
}

/// The places, shared by clones.
#[derive(Debug)]
pub struct Slots<K: Eq + Hash + Clone> {
    used: Arc<Mutex<Used<K>>>,
    total: usize,
    per_key: usize,
}

impl<K: Eq + Hash + Clone> Clone for Slots<K> {
    fn clone(&self) -> Slots<K> {
        Slots {
            used: self.used.clone(),
            total: self.total,
            per_key: self.per_key,
        }
    }
}

impl<K: Eq + Hash + Clone> Slots<K> {
    /// At most `total` places at once, `per_key` of them for one key.
    pub fn new(total: usize, per_key: usize) -> Slots<K> {
        Slots {
            used: Arc::new(Mutex::new(Used {
                all: 0,
                by_key: HashMap::new(),
            })),
            total,
            per_key,
        }
    }

    /// A place for `key`, if there is one free in all and within its share.
    pub fn try_enter(&self, key: K) -> Option<Slot<K>> {
        let mut used = lock(&self.used);
        if used.all >= self.total {
            return None;
        }
        let n = used.by_key.entry(key.clone()).or_insert(0);
        if *n >= self.per_key {
            return None;
        }
        *n += 1;
        used.all += 1;
        Some(Slot {
            used: self.used.clone(),
            key,
        })
    }

    /// Places held now.
    pub fn in_use(&self) -> usize {
        lock(&self.used).all
    }
}

/// One place, given back when dropped.
#[derive(Debug)]
pub struct Slot<K: Eq + Hash + Clone> {
    used: Arc<Mutex<Used<K>>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut used = lock(&self.used);
        used.all = used.all.saturating_sub(1);
        if let Some(n) = used.by_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                used.by_key.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_share_the_others_the_rest_and_places_come_back() {
        let slots = Slots::new(5, 2);
        let a: Vec<_> = (0..3).filter_map(|_| slots.try_enter("a")).collect();
        assert_eq!(a.len(), 2, "one key holds its share only");
        let b: Vec<_> = (0..3).filter_map(|_| slots.try_enter("b")).collect();
        assert_eq!(b.len(), 2);
        assert!(slots.try_enter("c").is_some_and(|c| {
            // Five in all: nobody else now.
            let full = slots.try_enter("d").is_none();
            drop(c);
            full
        }));
        drop(a);
        assert_eq!(slots.in_use(), 2);
        assert!(slots.try_enter("a").is_some());
        drop(b);
        assert_eq!(slots.in_use(), 0);
        assert!(
            lock(&slots.used).by_key.is_empty(),
            "counts at zero are forgotten"
        );
    }
}
