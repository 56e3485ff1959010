//! Part sizes from measured rates: the buffer of `total` values is split into one part per
//! reducing peer so that the slowest peer's modelled time is as small as it can be.
//!
//! The model, per peer `i` with rate `r_i` (bytes/s it can move each way, measured) and a part
//! of `x_i` values (N peers, S of them senders):
//!
//! - out: its contributions to the other parts (`total − x_i`, if it sends) and its averaged
//!   part back to the N − 1 others (`(N − 1)·x_i`);
//! - in: the other senders' contributions to its part (`(S − 1)·x_i`, or `S·x_i` if it does
//!   not send) and the other parts' results (`total − x_i`);
//! - time: `max(out, in) / r_i`. A client reduces nothing (`x_i = 0`).
//!
//! Several splits can share the least slowest time (two full peers take `total / r` whatever
//! the split; a peer whose own sending already makes it the slowest gains nothing from a
//! smaller part); among them the parts are proportional to the rates, within what each peer
//! can take by that time.

/// What a peer does in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sends its values, reduces a part, receives the result.
    Full,
    /// Sends and receives, reduces nothing (behind a NAT, or asked not to).
    Client,
    /// Reduces a part and receives the result, sends nothing of its own (weight 0).
    Auxiliary,
}

/// One peer as the balancer sees it.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub mode: Mode,
    /// Bytes per second it moves each way (measured).
    pub rate: f64,
}

/// Why no split exists.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("no peer of the group can reduce (all are clients)")]
    NoReducer,
    #[error("peer {0} has no usable rate ({1})")]
    BadRate(usize, f64),
}

/// Per-value traffic of peer `i` as `(fixed, per value of its part)` for out and in.
fn traffic(peers: &[Peer], i: usize, total: f64) -> [(f64, f64); 2] {
    let n = peers.len() as f64;
    let senders = peers.iter().filter(|p| p.mode != Mode::Auxiliary).count() as f64;
    match peers[i].mode {
        Mode::Full => [(total, n - 2.0), (total, senders - 2.0)],
        Mode::Client => [(total, 0.0), (total, 0.0)],
        Mode::Auxiliary => [(0.0, n - 1.0), (total, senders - 1.0)],
    }
}

/// The modelled time of peer `i` with a part of `x` values (in values per unit of rate).
pub fn time(peers: &[Peer], i: usize, total: usize, x: f64) -> f64 {
    traffic(peers, i, total as f64)
        .iter()
        .map(|(a, b)| (a + b * x).max(0.0))
        .fold(0.0, f64::max)
        / peers[i].rate
}

/// The largest part peer `i` can take and still finish by `t`.
fn capacity(peers: &[Peer], i: usize, total: usize, t: f64) -> f64 {
    if peers[i].mode == Mode::Client {
        return 0.0;
    }
    let budget = t * peers[i].rate;
    let mut cap = total as f64;
    for (a, b) in traffic(peers, i, total as f64) {
        if b > 0.0 {
            cap = cap.min((budget - a) / b);
        } else if a > budget * (1.0 + 1e-12) {
            cap = 0.0;
        }
    }
    cap.max(0.0)
}

/// Part sizes (values) for `peers`, summing to `total`; clients get 0.
pub fn part_sizes(total: usize, peers: &[Peer]) -> Result<Vec<usize>, Error> {
    for (i, p) in peers.iter().enumerate() {
        if !(p.rate.is_finite() && p.rate > 0.0) {
            return Err(Error::BadRate(i, p.rate));
        }
    }
    let reducers: Vec<usize> = (0..peers.len())
        .filter(|&i| peers[i].mode != Mode::Client)
        .collect();
    if reducers.is_empty() {
        return Err(Error::NoReducer);
    }
    if total == 0 {
        return Ok(vec![0; peers.len()]);
    }
    let m = total as f64;
    let fits = |t: f64| {
        reducers
            .iter()
            .map(|&i| capacity(peers, i, total, t))
            .sum::<f64>()
            >= m
    };
    // The least time any split can have: every peer's time with no part at all.
    let mut lo = (0..peers.len())
        .map(|i| time(peers, i, total, 0.0))
        .fold(0.0, f64::max);
    let mut t = lo;
    if !fits(lo) {
        // The whole buffer on the fastest reducer always fits by its own time.
        let mut hi = reducers
            .iter()
            .map(|&i| time(peers, i, total, m))
            .fold(f64::INFINITY, f64::min)
            .max(lo);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if fits(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        t = hi;
    }
    let caps: Vec<f64> = (0..peers.len())
        .map(|i| capacity(peers, i, total, t))
        .collect();
    // Proportional to rates within the capacities: x_i = min(cap_i, λ·r_i), Σ x_i = total.
    let share = |lambda: f64| -> f64 {
        reducers
            .iter()
            .map(|&i| caps[i].min(lambda * peers[i].rate))
            .sum()
    };
    let (mut a, mut b) = (0.0, 1.0);
    while share(b) < m && b < 1e300 {
        b *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (a + b);
        if share(mid) >= m {
            b = mid;
        } else {
            a = mid;
        }
    }
    let exact: Vec<f64> = (0..peers.len())
        .map(|i| {
            if peers[i].mode == Mode::Client {
                0.0
            } else {
                caps[i].min(b * peers[i].rate)
            }
        })
        .collect();
    Ok(round_to_total(&exact, total))
}

/// Integers summing to `total`, each the floor or ceiling of its real share (largest
/// remainders first).
pub(crate) fn round_to_total(exact: &[f64], total: usize) -> Vec<usize> {
    let sum: f64 = exact.iter().sum();
    let scaled: Vec<f64> = exact.iter().map(|x| x * total as f64 / sum).collect();
    let mut parts: Vec<usize> = scaled.iter().map(|x| x.floor() as usize).collect();
    let mut left = total.saturating_sub(parts.iter().sum());
    let mut order: Vec<usize> = (0..exact.len()).filter(|&i| exact[i] > 0.0).collect();
    order.sort_by(|&i, &j| {
        let (fi, fj) = (scaled[i] - scaled[i].floor(), scaled[j] - scaled[j].floor());
        fj.total_cmp(&fi).then(i.cmp(&j))
    });
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn full(rate: f64) -> Peer {
        Peer {
            mode: Mode::Full,
            rate,
        }
    }

    fn slowest(peers: &[Peer], parts: &[usize], total: usize) -> f64 {
        (0..peers.len())
            .map(|i| time(peers, i, total, parts[i] as f64))
            .fold(0.0, f64::max)
    }

    #[test]
    fn parts_are_proportional_to_rates_when_the_split_does_not_change_the_time() {
        // Two full peers: each moves the whole buffer whatever the split.
        let peers = [full(1e6), full(3e6)];
        assert_eq!(part_sizes(1000, &peers).unwrap(), [250, 750]);
        // Four peers of equal rate: equal parts.
        let peers = [full(5e6); 4];
        assert_eq!(part_sizes(1000, &peers).unwrap(), [250; 4]);
    }

    #[test]
    fn faster_peers_take_more_and_the_slowest_time_is_minimal() {
        let peers = [full(1e6), full(2e6), full(3e6), full(4e6)];
        let parts = part_sizes(1_000_000, &peers).unwrap();
        assert_eq!(parts.iter().sum::<usize>(), 1_000_000);
        assert!(parts.windows(2).all(|w| w[0] <= w[1]), "{parts:?}");
        // The slowest peer is already the bottleneck with its own sending: no part for it,
        // and the others' parts are proportional to their rates.
        assert_eq!(parts[0], 0);
        let ratio = |i: usize, j: usize| parts[i] as f64 / parts[j] as f64;
        assert!((ratio(3, 1) - 2.0).abs() < 1e-3 && (ratio(2, 1) - 1.5).abs() < 1e-3);
        let equal = [250_000; 4];
        assert!(slowest(&peers, &parts, 1_000_000) <= slowest(&peers, &equal, 1_000_000));
    }

    #[test]
    fn clients_reduce_nothing_and_auxiliaries_do() {
        let peers = [
            full(2e6),
            Peer {
                mode: Mode::Client,
                rate: 9e6,
            },
            Peer {
                mode: Mode::Auxiliary,
                rate: 2e6,
            },
        ];
        let parts = part_sizes(9000, &peers).unwrap();
        assert_eq!(parts[1], 0);
        assert!(parts[0] > 0 && parts[2] > 0, "{parts:?}");
        assert_eq!(parts.iter().sum::<usize>(), 9000);
        let clients = [Peer {
            mode: Mode::Client,
            rate: 1.0,
        }; 2];
        assert_eq!(part_sizes(10, &clients), Err(Error::NoReducer));
        assert!(matches!(
            part_sizes(10, &[full(f64::NAN)]),
            Err(Error::BadRate(0, _))
        ));
    }

    proptest! {
        #[test]
        fn parts_sum_to_the_total_and_beat_equal_and_proportional_splits(
            rates in prop::collection::vec(1e5f64..1e8, 2..9),
            total in 1usize..5_000_000,
        ) {
            let peers: Vec<Peer> = rates.iter().map(|&r| full(r)).collect();
            let parts = part_sizes(total, &peers).unwrap();
            prop_assert_eq!(parts.iter().sum::<usize>(), total);
            let n = peers.len();
            let equal: Vec<usize> = (0..n).map(|i| total / n + usize::from(i < total % n)).collect();
            let sum: f64 = rates.iter().sum();
            let prop: Vec<f64> = rates.iter().map(|r| r / sum * total as f64).collect();
            let prop = round_to_total(&prop, total);
            let ours = slowest(&peers, &parts, total);
            // Within rounding (one value on the slowest peer).
            let slack = 1.0 + 1e-6;
            prop_assert!(ours <= slowest(&peers, &equal, total) * slack + 1e-3);
            prop_assert!(ours <= slowest(&peers, &prop, total) * slack + 1e-3);
        }
    }
}
