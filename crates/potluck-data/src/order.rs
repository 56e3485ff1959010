//! Per-peer deterministic orders: every peer of a run reads the same data in its own order.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Mixes two 64-bit values into a seed (SplitMix64's finaliser over a combination): nearby
/// inputs give unrelated outputs, so `(seed, peer)` and `(seed, peer + 1)` are independent.
pub fn mix_seed(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_add(0x9E37_79B9_7F4A_7C15).rotate_left(23);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Which order a peer reads a data set in: the run's data seed and this peer's index (or any
/// number unique to the peer, such as a hash of its id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Order {
    /// The data seed shared by the run.
    pub seed: u64,
    /// What makes this peer's order its own.
    pub peer: u64,
    /// How many items the shuffle buffer of a streamed data set holds.
    pub buffer: usize,
}

impl Order {
    /// The order of `peer` under the run's `seed`, with a 1,000-item shuffle buffer.
    pub fn new(seed: u64, peer: u64) -> Order {
        Order {
            seed,
            peer,
            buffer: 1000,
        }
    }

    /// The same order with another shuffle-buffer size.
    pub fn with_buffer(self, buffer: usize) -> Order {
        Order { buffer, ..self }
    }

    /// The seed of this peer's stream.
    pub fn stream_seed(&self) -> u64 {
        mix_seed(self.seed, self.peer)
    }

    /// A generator seeded for this peer and a purpose (`salt`), so that, say, the shard order
    /// and the shuffle buffer do not share random numbers.
    pub fn rng(&self, salt: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(mix_seed(self.stream_seed(), salt))
    }

    /// A permutation of `0..n` for this peer (Fisher–Yates).
    pub fn permutation(&self, n: usize, salt: u64) -> Vec<usize> {
        let mut rng = self.rng(salt);
        let mut items: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            items.swap(i, rng.random_range(0..=i));
        }
        items
    }
}

/// Shuffles a stream with a buffer of `capacity` items: each incoming item replaces a random one
/// of the buffer, which is emitted. Memory is bounded by the buffer; the order is deterministic
/// for the generator.
#[derive(Debug)]
pub struct ShuffleBuffer<I: Iterator, R> {
    inner: I,
    buffer: Vec<I::Item>,
    capacity: usize,
    rng: R,
}

impl<I: Iterator, R: Rng> ShuffleBuffer<I, R> {
    /// Shuffles `inner` through a buffer of `capacity` items (at least one).
    pub fn new(inner: I, capacity: usize, rng: R) -> ShuffleBuffer<I, R> {
        let capacity = capacity.max(1);
        ShuffleBuffer {
            inner,
            buffer: Vec::with_capacity(capacity.min(1 << 16)),
            capacity,
            rng,
        }
    }
}

impl<I: Iterator, R: Rng> Iterator for ShuffleBuffer<I, R> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        while self.buffer.len() < self.capacity {
            match self.inner.next() {
                Some(item) => self.buffer.push(item),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let pick = self.rng.random_range(0..self.buffer.len());
        Some(self.buffer.swap_remove(pick))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_buffer_is_a_permutation() {
        let order = Order::new(1, 2);
        let out: Vec<u32> = ShuffleBuffer::new(0..1000u32, 64, order.rng(0)).collect();
        let mut sorted = out.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(out, sorted, "nothing was shuffled");
    }

    #[test]
    fn permutations_differ_per_peer_and_repeat_per_seed() {
        let a = Order::new(5, 0).permutation(100, 1);
        let b = Order::new(5, 1).permutation(100, 1);
        assert_ne!(a, b);
        assert_eq!(a, Order::new(5, 0).permutation(100, 1));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn mixed_seeds_of_neighbours_differ_in_many_bits() {
        for b in 0..100u64 {
            let d = (mix_seed(0, b) ^ mix_seed(0, b + 1)).count_ones();
            assert!(d > 10, "{b}: {d} bits");
        }
    }
}
