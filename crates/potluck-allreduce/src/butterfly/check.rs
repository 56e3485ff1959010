//! Checked rounds ([`Settings::check`]): every part of the buffer is reduced twice, by two
//! different members, and each member compares what the two returned.
//!
//! The second reduction is a second round run at the same time as the first, over the same
//! members and the same parts, with the reducers rotated: the part member `P[i]` reduces in
//! the first is reduced in the second by `P[i + 1]` (the reducers in member order, wrapping).
//! Every member sends the same values to both, so two honest reducers return the same
//! average, up to the order of a float sum and the codec's rounding. Where both came back
//! whole from the same inputs and differ by more than that, one of the two lied: the part is
//! a [`Dispute`]. A lying reducer is in every dispute of its round, an honest one only in the
//! dispute with it: a reducer in disputes with two others this round is the liar, and the
//! other reducer's result is taken for its parts. Where the round does not show which (two
//! reducers only, or other inputs), this member keeps its own values there (what it does when
//! a reducer vanishes; the caller decides what such a part means, see [`Report::disputes`]).
//!
//! The cost: twice the bytes each way, a second copy of the buffer and the buffer as it was
//! (three in all).
//!
//! [`Settings::check`]: super::Settings::check

use std::ops::Range;

use libp2p::PeerId;
use sha2::{Digest, Sha256};

use super::round::{Error, PartResult, Report, Settings, run};
use super::{Group, Inbox};

/// A part that two reducers returned differently.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispute {
    /// The part's values in the buffer.
    pub range: Range<usize>,
    /// The member that reduced it in the round as formed, and the one that reduced it again.
    pub reducers: [PeerId; 2],
    /// How far apart the two results are, over the first's norm (the second's, or 1, where
    /// the first is zero); NaN where they came from different inputs.
    pub distance: f64,
    /// Whether both reducers averaged the same members' contributions with the same total
    /// weight. Where they did not (one dropped a sender the other kept: a sender that stalled
    /// in one round only; or a sender told them different weights), honest reducers can
    /// differ; where they did, one of the two lied.
    pub same_inputs: bool,
    /// The reducer this round showed lying (in disputes of the same inputs with two others),
    /// if one of the two is: the other's result was taken for the part. Where none is, this
    /// member kept its own values.
    pub liar: Option<PeerId>,
}

/// How far apart, relative to the larger result's norm, two honest results of one part may
/// lie (on top of the codec's rounding, twice its bound). Two honest reducers of the same
/// inputs differ by the order of their float sums, about 1e-7, and by the codec's rounding of
/// their own contribution (each averages its own values as they are, the others' as decoded).
/// Their weights must be alike: a caller that caps them by its own view of the senders'
/// reports ([`Member::max_weight`]) makes them differ (measured 0.7% to 1.2% apart, and past
/// the tolerance under a sender claiming a huge weight), so the collaborative optimizer leaves
/// the caps out of checked rounds. A tenth of the norm is less than what one sender of a few can
/// move a robust average (about its share of the weight times the contributions' spread, which
/// exceeds the average's norm when the gradient's noise does, as at small batches). Every
/// member compares the same two results, so all decide alike.
///
/// [`Member::max_weight`]: super::Member::max_weight
const TOLERANCE: f64 = 0.1;

/// The group of the check: the same members and parts, the reducers rotated by one, and a
/// round id of its own. None where fewer than two members reduce (nothing to check with).
pub(super) fn rotated(group: &Group) -> Option<Group> {
    let reducers: Vec<usize> = (0..group.members.len())
        .filter(|&j| group.parts[j] > 0)
        .collect();
    if reducers.len() < 2 {
        return None;
    }
    let mut members = group.members.clone();
    for (i, &j) in reducers.iter().enumerate() {
        members[j] = group.members[reducers[(i + 1) % reducers.len()]].clone();
    }
    let round: [u8; 32] = Sha256::new()
        .chain_update(b"potluck check round")
        .chain_update(group.round)
        .finalize()
        .into();
    Some(Group {
        round,
        members,
        parts: group.parts.clone(),
    })
}

/// A checked round: the round as formed and its rotation at once (see the module's doc).
pub(super) async fn checked(
    inbox: &Inbox,
    group: &Group,
    me: usize,
    weight: f32,
    buffer: &mut [f32],
    settings: &Settings,
) -> Result<Report, Error> {
    let Some(again) = rotated(group) else {
        let mut report = run(inbox, group, me, weight, buffer, None, settings).await?;
        report.unchecked = report.parts.iter().filter(|p| p.chunks > 0).count();
        return Ok(report);
    };
    let me_again = again
        .members
        .iter()
        .position(|m| m.peer == group.members[me].peer)
        .ok_or(Error::NotAMember)?;
    let own = buffer.to_vec();
    let mut second = own.clone();
    let (first, other) = futures::join!(
        run(inbox, group, me, weight, buffer, None, settings),
        run(inbox, &again, me_again, weight, &mut second, None, settings),
    );
    let (mut report, other) = (first?, other?);
    let peers = |g: &Group, p: &PartResult| -> Vec<PeerId> {
        let mut v: Vec<PeerId> = p.contributors.iter().map(|&c| g.members[c].peer).collect();
        v.sort();
        v
    };
    // A part the second reducer brought back whole, in the first's place: its values and
    // its outcome, with members numbered as in the group as formed.
    let take_second = |report: &mut Report, buffer: &mut [f32], a: usize, b: &PartResult| {
        let range = group.range(report.parts[a].reducer);
        buffer[range.clone()].copy_from_slice(&second[range]);
        let mut part = b.clone();
        part.reducer = report.parts[a].reducer;
        part.contributors = b
            .contributors
            .iter()
            .filter_map(|&c| {
                let peer = again.members[c].peer;
                group.members.iter().position(|m| m.peer == peer)
            })
            .collect();
        report.parts[a] = part;
    };
    let mut disputed = Vec::new();
    for (k, &len) in group.parts.iter().enumerate() {
        if len == 0 {
            continue;
        }
        let range = group.range(k);
        let (Some(a), Some(b)) = (
            report.parts.iter().position(|p| p.reducer == k),
            other.parts.iter().find(|p| p.reducer == k),
        ) else {
            report.unchecked += 1;
            continue;
        };
        match (report.parts[a].complete(), b.complete()) {
            (true, true) => {
                let (x, y) = (report.parts[a].weight, b.weight);
                // A reducer that kept no contribution returns its own values: two of them
                // differ, and neither is an average.
                let same = x > 0.0
                    && peers(group, &report.parts[a]) == peers(&again, b)
                    && (x - y).abs() <= 1e-9 * x.abs().max(y.abs());
                // Two results of other inputs can't be compared: neither is taken (the first
                // may be a lie that claims another sender was dropped).
                let distance = if same {
                    apart(settings, range.clone(), buffer, &second)
                } else {
                    Some(f64::NAN)
                };
                if let Some(distance) = distance {
                    let dispute = Dispute {
                        range,
                        reducers: [group.members[k].peer, again.members[k].peer],
                        distance,
                        same_inputs: same,
                        liar: None,
                    };
                    disputed.push((dispute, a, b));
                }
            }
            // The second came back whole, the first did not: the second is the average.
            (false, true) => {
                take_second(&mut report, buffer, a, b);
                report.unchecked += 1;
            }
            // Only the first came back whole, or neither did: nothing to compare.
            _ => report.unchecked += 1,
        }
    }
    // The reducers this round shows lying: each in disputes of the same inputs with two
    // others. Every member sees the same disputes, so all find the same.
    let liars: Vec<PeerId> = group
        .members
        .iter()
        .map(|m| m.peer)
        .filter(|&r| {
            let pairs = disputed.iter().filter(|(d, _, _)| d.same_inputs);
            disputes_two_others(pairs.map(|(d, _, _)| &d.reducers), r)
        })
        .collect();
    for (mut dispute, a, b) in disputed {
        let [first, second_reducer] = dispute.reducers;
        dispute.liar = match (liars.contains(&first), liars.contains(&second_reducer)) {
            _ if !dispute.same_inputs => None,
            (true, false) => Some(first),
            (false, true) => Some(second_reducer),
            _ => None,
        };
        match dispute.liar {
            // The first reducer lied: the second's result is the part's.
            Some(l) if l == first => take_second(&mut report, buffer, a, b),
            // The second lied: the first's stands.
            Some(_) => {}
            None => {
                buffer[dispute.range.clone()].copy_from_slice(&own[dispute.range.clone()]);
                report.parts[a].chunks_done = 0;
            }
        }
        report.disputes.push(dispute);
    }
    report.bytes_sent += other.bytes_sent;
    report.bytes_received += other.bytes_received;
    report.direct_channels += other.direct_channels;
    report.channels += other.channels;
    Ok(report)
}

/// Whether `reducer` is in disputes with two other reducers or more, among `pairs` (the two
/// reducers of each disputed part): a liar disputes with every reducer checked against it, an
/// honest reducer only with the liar.
pub fn disputes_two_others<'a>(
    pairs: impl IntoIterator<Item = &'a [PeerId; 2]>,
    reducer: PeerId,
) -> bool {
    let mut others: Vec<PeerId> = pairs
        .into_iter()
        .filter(|pair| pair.contains(&reducer))
        .flat_map(|pair| pair.iter().copied().filter(|&p| p != reducer))
        .collect();
    others.sort();
    others.dedup();
    others.len() >= 2
}

/// How far apart two results of one part are, relative, where that is more than two honest
/// reducers' results can be: None where they agree.
fn apart(settings: &Settings, range: Range<usize>, a: &[f32], b: &[f32]) -> Option<f64> {
    let (mut diff, mut norm_a, mut norm_b, mut allowed) = (0f64, 0f64, 0f64, 0f64);
    for (r, codec) in settings.plan.chunks(range, settings.chunk) {
        let (x, y) = (&a[r.clone()], &b[r]);
        // Each reducer rounded its result with the codec; this member's own part is not.
        let bound = f64::from(codec.max_error(x).max(codec.max_error(y)));
        allowed += bound.powi(2) * x.len() as f64;
        for (u, v) in x.iter().zip(y) {
            diff += f64::from(u - v).powi(2);
            norm_a += f64::from(*u).powi(2);
            norm_b += f64::from(*v).powi(2);
        }
    }
    let (diff, norm_a, norm_b) = (diff.sqrt(), norm_a.sqrt(), norm_b.sqrt());
    let limit = TOLERANCE * norm_a.max(norm_b) + 2.0 * allowed.sqrt() + 1e-30;
    // Not finite is never agreement.
    if diff <= limit {
        return None;
    }
    let scale = if norm_a > 0.0 {
        norm_a
    } else {
        norm_b.max(1.0)
    };
    Some(diff / scale)
}
