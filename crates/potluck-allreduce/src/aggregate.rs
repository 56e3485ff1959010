//! Aggregation of the contributions to one part: checks first (a non-finite value, a bad
//! weight or a norm absurd against the group's drops the contribution and names its sender),
//! then the weighted mean or CenteredClip (Karimireddy, He and Jaggi, 2021), which bounds how
//! far any one contribution can pull the result.

/// How the contributions to a part are combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// Σ wᵢ xᵢ / Σ wᵢ.
    Mean,
    /// Starting from the coordinate-wise median, `iterations` times
    /// `v ← v + Σ wᵢ (xᵢ − v) min(1, τ / ‖xᵢ − v‖) / Σ wᵢ`: a contribution moves the result by
    /// at most τ (times its share of the weight) per iteration, however large it is.
    CenteredClip { tau: f32, iterations: usize },
    /// CenteredClip with τ taken from the contributions themselves: the median of their
    /// distances to the coordinate-wise median. Honest contributions lie about that far
    /// apart, whatever the gradients' scale at this point of training; one contribution far
    /// out pulls the result by at most its share of that.
    CenteredClipAuto { iterations: usize },
}

/// One peer's contribution to a part.
#[derive(Debug, Clone, Copy)]
pub struct Contribution<'a> {
    /// Index of the sender in the group.
    pub peer: usize,
    /// Its weight (samples behind it); 0 contributes nothing.
    pub weight: f32,
    pub values: &'a [f32],
}

/// Why a contribution was left out.
#[derive(Debug, Clone, PartialEq)]
pub enum Dropped {
    /// A value is NaN or infinite.
    NonFinite,
    /// The weight is negative, or not finite.
    BadWeight(f32),
    /// The norm is past `max_norm_ratio` times the group's (lower) median norm.
    Norm { norm: f32, limit: f32 },
    /// Not as many values as the part has.
    Length { got: usize, expected: usize },
}

/// What aggregating a part did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// Total weight of the contributions kept.
    pub weight: f64,
    /// Peers whose contributions were kept.
    pub kept: Vec<usize>,
    /// Peers whose contributions were left out, and why.
    pub dropped: Vec<(usize, Dropped)>,
}

/// Checks on contributions before they are combined.
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    /// A contribution whose norm is past this many times the lower median norm of the group
    /// is dropped (with three or more contributions; with two, a median says nothing).
    pub max_norm_ratio: f32,
}

impl Default for Checks {
    fn default() -> Checks {
        Checks {
            max_norm_ratio: 1e3,
        }
    }
}

/// The Euclidean norm, summed in f64 (no overflow for any f32 input): not finite exactly when
/// a value is not.
fn norm(v: &[f32]) -> f32 {
    let mut acc = [0f64; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += f64::from(*x) * f64::from(*x);
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|x| f64::from(*x).powi(2))
        .sum();
    (acc.iter().sum::<f64>() + tail).sqrt() as f32
}

/// Combines `contributions` into `out` (left as zeros when nothing is kept).
pub fn aggregate(
    rule: Rule,
    checks: Checks,
    contributions: &[Contribution<'_>],
    out: &mut [f32],
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut kept: Vec<(Contribution<'_>, f32)> = Vec::new();
    for c in contributions {
        let bad = if c.values.len() != out.len() {
            Some(Dropped::Length {
                got: c.values.len(),
                expected: out.len(),
            })
        } else if !(c.weight.is_finite() && c.weight >= 0.0) {
            Some(Dropped::BadWeight(c.weight))
        } else {
            None
        };
        let n = if bad.is_none() { norm(c.values) } else { 0.0 };
        match bad {
            Some(why) => outcome.dropped.push((c.peer, why)),
            None if !n.is_finite() => outcome.dropped.push((c.peer, Dropped::NonFinite)),
            None => kept.push((*c, n)),
        }
    }
    // Only contributions with weight count: a peer with no samples sends zeros, which would
    // drag the median down and make every real contribution look absurd.
    kept.retain(|(c, _)| c.weight > 0.0);
    if kept.len() >= 3 {
        let mut norms: Vec<f32> = kept.iter().map(|(_, n)| *n).collect();
        norms.sort_by(f32::total_cmp);
        let median = norms[(norms.len() - 1) / 2];
        let limit = checks.max_norm_ratio * median.max(f32::MIN_POSITIVE);
        kept.retain(|(c, n)| {
            let ok = *n <= limit;
            if !ok {
                outcome
                    .dropped
                    .push((c.peer, Dropped::Norm { norm: *n, limit }));
            }
            ok
        });
    }
    if rule != Rule::Mean {
        cap_weights(&mut kept);
    }
    outcome.kept = kept.iter().map(|(c, _)| c.peer).collect();
    outcome.weight = kept.iter().map(|(c, _)| f64::from(c.weight)).sum();
    if kept.is_empty() || outcome.weight <= 0.0 {
        out.fill(0.0);
        return outcome;
    }
    let total = outcome.weight;
    match rule {
        Rule::Mean => {
            for (k, (c, _)) in kept.iter().enumerate() {
                let w = (f64::from(c.weight) / total) as f32;
                if k == 0 {
                    for (o, v) in out.iter_mut().zip(c.values) {
                        *o = w * v;
                    }
                } else {
                    for (o, v) in out.iter_mut().zip(c.values) {
                        *o += w * v;
                    }
                }
            }
        }
        Rule::CenteredClip { tau, iterations } => {
            median_into(&kept, out);
            centered_clip(&kept, total, tau, iterations, out);
        }
        Rule::CenteredClipAuto { iterations } => {
            median_into(&kept, out);
            let mut dists: Vec<f64> = kept.iter().map(|(c, _)| distance(c.values, out)).collect();
            dists.sort_by(f64::total_cmp);
            let tau = dists[(dists.len() - 1) / 2] as f32;
            centered_clip(&kept, total, tau, iterations, out);
        }
    }
    outcome
}

/// Under a robust rule no contribution weighs more than this many times the median weight.
pub const MAX_WEIGHT_SPREAD: f32 = 2.0;

/// Cuts every weight in `kept` to [`MAX_WEIGHT_SPREAD`] times their median (upper middle): a
/// peer that is granted many samples still pulls a robust result like a few honest peers at
/// most, not like all of them.
fn cap_weights(kept: &mut [(Contribution<'_>, f32)]) {
    if kept.len() < 2 {
        return;
    }
    let mut weights: Vec<f32> = kept.iter().map(|(c, _)| c.weight).collect();
    weights.sort_by(f32::total_cmp);
    let cap = weights[weights.len() / 2] * MAX_WEIGHT_SPREAD;
    for (c, _) in kept {
        c.weight = c.weight.min(cap);
    }
}

/// The Euclidean distance between `a` and `b`, summed in f64.
fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, v)| f64::from(x - v).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// `iterations` CenteredClip steps with radius `tau` from the centre in `out`.
fn centered_clip(
    kept: &[(Contribution<'_>, f32)],
    total: f64,
    tau: f32,
    iterations: usize,
    out: &mut [f32],
) {
    let mut step = vec![0f32; out.len()];
    for _ in 0..iterations {
        step.fill(0.0);
        for (c, _) in kept {
            let dist = distance(c.values, out);
            let clip = if dist > f64::from(tau) {
                f64::from(tau) / dist
            } else {
                1.0
            };
            let w = (f64::from(c.weight) / total * clip) as f32;
            for ((s, x), v) in step.iter_mut().zip(c.values).zip(out.iter()) {
                *s += w * (x - v);
            }
        }
        for (o, s) in out.iter_mut().zip(&step) {
            *o += s;
        }
    }
}

/// The coordinate-wise median (lower middle for an even count) of the kept contributions.
fn median_into(kept: &[(Contribution<'_>, f32)], out: &mut [f32]) {
    let mut column = Vec::with_capacity(kept.len());
    for (j, o) in out.iter_mut().enumerate() {
        column.clear();
        column.extend(kept.iter().map(|(c, _)| c.values[j]));
        column.sort_by(f32::total_cmp);
        *o = column[(column.len() - 1) / 2];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contributions<'a>(values: &'a [Vec<f32>], weights: &[f32]) -> Vec<Contribution<'a>> {
        values
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(peer, (v, &weight))| Contribution {
                peer,
                weight,
                values: v,
            })
            .collect()
    }

    fn distance(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f32>()
            .sqrt()
    }

    #[test]
    fn the_mean_is_weighted_by_samples() {
        let values = vec![vec![1.0, 2.0], vec![4.0, -1.0], vec![0.0, 0.0]];
        let mut out = [0f32; 2];
        let o = aggregate(
            Rule::Mean,
            Checks::default(),
            &contributions(&values, &[1.0, 2.0, 0.0]),
            &mut out,
        );
        assert_eq!(out, [3.0, 0.0]);
        assert_eq!(o.weight, 3.0);
        assert_eq!(o.kept, [0, 1]);
    }

    /// Peers that computed nothing this round send zeros with weight 0: they must not make
    /// the others' norms look absurd (the median of the norms counts only weighted ones).
    #[test]
    fn empty_contributions_do_not_drag_the_norm_check() {
        let values = vec![vec![0.0; 4], vec![0.0; 4], vec![2.0; 4], vec![1.0; 4]];
        let mut out = [0f32; 4];
        let o = aggregate(
            Rule::Mean,
            Checks::default(),
            &contributions(&values, &[0.0, 0.0, 1.0, 3.0]),
            &mut out,
        );
        assert!(o.dropped.is_empty(), "{:?}", o.dropped);
        assert_eq!(o.kept, [2, 3]);
        assert_eq!(o.weight, 4.0);
        assert_eq!(out, [1.25; 4]);
    }

    #[test]
    fn broken_and_absurd_contributions_are_dropped_and_named() {
        let honest: Vec<Vec<f32>> = (0..4).map(|i| vec![1.0 + i as f32 * 0.1; 8]).collect();
        let mut values = honest.clone();
        values.push(vec![f32::NAN; 8]);
        values.push(vec![1e9; 8]);
        values.push(vec![1.0; 7]);
        values.push(vec![1.0; 8]);
        let weights = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, f32::INFINITY];
        let mut out = [0f32; 8];
        let o = aggregate(
            Rule::Mean,
            Checks::default(),
            &contributions(&values, &weights),
            &mut out,
        );
        assert_eq!(o.kept, [0, 1, 2, 3]);
        let why: Vec<usize> = o.dropped.iter().map(|(p, _)| *p).collect();
        assert_eq!(why, [4, 6, 7, 5]);
        assert!(matches!(o.dropped[3].1, Dropped::Norm { .. }));
        assert!((out[0] - 1.15).abs() < 1e-6);
    }

    /// Four honest contributions of `n` values, spread about zero, times `scale`.
    fn honest_peers(n: usize, scale: f32) -> Vec<Vec<f32>> {
        (0..4)
            .map(|p| {
                (0..n)
                    .map(|j| (((p * 31 + j * 7) % 13) as f32 * 0.01 - 0.06) * scale)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn centered_clip_auto_bounds_an_attacker_at_every_scale_of_the_gradients() {
        let n = 64;
        let checks = Checks {
            max_norm_ratio: f32::INFINITY,
        };
        for scale in [1e-4f32, 1.0, 1e4] {
            let honest = honest_peers(n, scale);
            let mut mean = vec![0f32; n];
            let honest_only = contributions(&honest, &[1.0; 4]);
            aggregate(Rule::Mean, checks, &honest_only, &mut mean);
            let spread = honest
                .iter()
                .map(|h| distance(h, &mean))
                .fold(0f32, f32::max);
            // Sign-flipped and scaled a hundred times, as an attacker would.
            let mut values = honest.clone();
            values.push(honest[0].iter().map(|v| v * -100.0).collect());
            let rule = Rule::CenteredClipAuto { iterations: 10 };
            let mut robust = vec![0f32; n];
            let o = aggregate(
                rule,
                checks,
                &contributions(&values, &[1.0; 5]),
                &mut robust,
            );
            assert_eq!(o.kept.len(), 5);
            let mut plain = vec![0f32; n];
            aggregate(
                Rule::Mean,
                checks,
                &contributions(&values, &[1.0; 5]),
                &mut plain,
            );
            let (moved, pulled) = (distance(&robust, &mean), distance(&plain, &mean));
            assert!(moved <= spread, "scale {scale}: moved {moved} > {spread}");
            assert!(
                pulled > 10.0 * spread,
                "scale {scale}: the mean moved {pulled}"
            );
            // Honest peers alone: close to their mean.
            let mut alone = vec![0f32; n];
            aggregate(rule, checks, &honest_only, &mut alone);
            assert!(distance(&alone, &mean) <= 0.5 * spread);
        }
    }

    #[test]
    fn centered_clip_keeps_a_peer_scaled_by_a_million_within_tau() {
        let n = 64;
        let honest = honest_peers(n, 1.0);
        let mut mean = vec![0f32; n];
        aggregate(
            Rule::Mean,
            Checks::default(),
            &contributions(&honest, &[1.0; 4]),
            &mut mean,
        );
        let mut values = honest.clone();
        values.push(honest[0].iter().map(|v| v * 1e6).collect());
        let tau = 0.1;
        let mut clipped = vec![0f32; n];
        let rule = Rule::CenteredClip {
            tau,
            iterations: 20,
        };
        // Norm checks off: CenteredClip alone must hold.
        let checks = Checks {
            max_norm_ratio: f32::INFINITY,
        };
        let o = aggregate(
            rule,
            checks,
            &contributions(&values, &[1.0; 5]),
            &mut clipped,
        );
        assert_eq!(o.kept.len(), 5);
        // τ below the honest spread: against the same rule over the honest peers alone
        // (CenteredClip is then a robust centre, not the mean).
        let mut reference = vec![0f32; n];
        aggregate(
            rule,
            checks,
            &contributions(&honest, &[1.0; 4]),
            &mut reference,
        );
        let moved = distance(&clipped, &reference);
        // Honest contributions clipped too pull back less: the bound is looser, still tiny
        // against the attack's 10⁶.
        assert!(moved <= 2.0 * tau, "moved {moved} > 2τ = {}", 2.0 * tau);
        // τ at least the honest contributions' distance from their mean (the setting
        // CenteredClip is meant for): one peer moves the mean by at most τ.
        let spread = honest
            .iter()
            .map(|h| distance(h, &mean))
            .fold(0f32, f32::max);
        let wide_tau = spread;
        let wide_rule = Rule::CenteredClip {
            tau: wide_tau,
            iterations: 20,
        };
        aggregate(
            wide_rule,
            checks,
            &contributions(&values, &[1.0; 5]),
            &mut clipped,
        );
        let moved = distance(&clipped, &mean);
        assert!(moved <= wide_tau, "moved {moved} > τ = {wide_tau}");
        let mut plain = vec![0f32; n];
        aggregate(
            Rule::Mean,
            checks,
            &contributions(&values, &[1.0; 5]),
            &mut plain,
        );
        assert!(distance(&plain, &mean) > 1e3 * tau);
        // With honest peers only, CenteredClip with a large τ is the mean.
        let mut same = vec![0f32; n];
        let wide = Rule::CenteredClip {
            tau: 1e3,
            iterations: 5,
        };
        aggregate(wide, checks, &contributions(&honest, &[1.0; 4]), &mut same);
        assert!(distance(&same, &mean) < 1e-6);
    }

    /// Under a robust rule a weight far above the others' (granted or not) counts for
    /// [`MAX_WEIGHT_SPREAD`] times the median weight: a far-out contribution with a huge
    /// weight moves the result by about what it would with an honest weight.
    #[test]
    fn a_huge_weight_buys_little_under_a_robust_rule() {
        let n = 64;
        let honest = honest_peers(n, 1.0);
        let mut values = honest.clone();
        values.push(vec![1.0; n]);
        let rule = Rule::CenteredClipAuto { iterations: 10 };
        let moved = |weight: f32| {
            let mut weights = vec![1.0; 4];
            weights.push(weight);
            let mut out = vec![0f32; n];
            let o = aggregate(
                rule,
                Checks::default(),
                &contributions(&values, &weights),
                &mut out,
            );
            (out, o.weight)
        };
        let (fair, _) = moved(1.0);
        let (heavy, total) = moved(3e38);
        assert!(total <= 4.0 + f64::from(MAX_WEIGHT_SPREAD), "{total}");
        let mut mean = vec![0f32; n];
        aggregate(
            Rule::Mean,
            Checks::default(),
            &contributions(&honest, &[1.0; 4]),
            &mut mean,
        );
        let d_fair = distance(&fair, &mean);
        let d_heavy = distance(&heavy, &mean);
        assert!(
            d_heavy <= d_fair * MAX_WEIGHT_SPREAD * 1.5,
            "a weight of 3e38 moved it {d_heavy}, an honest one {d_fair}"
        );
    }
}
