//! Who averages with whom: a round's [`Group`] of [`Member`]s, as every member sees it, and
//! the parts of the buffer each reduces (sized from their measured rates by [`balance`]).
//! Forming a group is [`crate::matchmaking`]'s business.

use std::ops::Range;

use libp2p::{Multiaddr, PeerId};

use crate::balance::{self, Mode};

/// Largest group.
pub const MAX_GROUP: usize = 256;

/// One member of a group.
#[derive(Debug, Clone)]
pub struct Member {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
    pub mode: Mode,
    /// Bytes per second it moves each way (as it declared; capped by [`Group::new`]).
    pub rate: f64,
    /// The most weight its contribution counts with (its samples as the swarm saw them
    /// reported); a larger weight in its hello is cut to this. Infinite: no bound known.
    pub max_weight: f64,
}

/// No member reduces more than this many fair shares of the buffer (the buffer over the
/// reducers). Rates are what members declare, and the balance gives a member whose rate is
/// n − 1 times the others' the whole buffer (their own sending already takes that long), one
/// twice as fast a third of a group of eight: a peer claiming any faster link reduces at most
/// two shares. (An honest fast peer, an aux on a datacentre link, is held to two shares as
/// well: the price of believing no claim.)
pub const MAX_SHARES: f64 = 2.0;

/// A group as every member sees it: the same members in the same order, the same parts.
#[derive(Debug, Clone)]
pub struct Group {
    /// Names the round (every stream says which round it belongs to).
    pub round: [u8; 32],
    pub members: Vec<Member>,
    /// Values in each member's part (0 for clients, unless all are), in member order.
    pub parts: Vec<usize>,
}

/// Why a group could not be formed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GroupError {
    #[error(transparent)]
    Balance(#[from] balance::Error),
    #[error("a group of {0} is larger than {MAX_GROUP}")]
    TooLarge(usize),
}

impl Group {
    /// A group whose parts are balanced by the members' rates for a buffer of `len` values.
    ///
    /// A group of clients alone reduces all the same, every member a part: they reached each
    /// other to form it (directly, punched or relayed), and a round over those connections
    /// beats no round. (Three peers that all found themselves unreachable once stopped
    /// averaging for good.)
    pub fn new(round: [u8; 32], members: Vec<Member>, len: usize) -> Result<Group, GroupError> {
        if members.len() > MAX_GROUP {
            return Err(GroupError::TooLarge(members.len()));
        }
        let all_clients = members.iter().all(|m| m.mode == Mode::Client);
        if all_clients && members.len() > 1 {
            tracing::warn!(
                "every member of a group of {} is a client: each reduces a part over the \
                 connections it has",
                members.len()
            );
        }
        let mode = |m: &Member| if all_clients { Mode::Full } else { m.mode };
        let peers: Vec<balance::Peer> = members
            .iter()
            .map(|m| balance::Peer {
                mode: mode(m),
                rate: m.rate,
            })
            .collect();
        let reduces: Vec<bool> = members.iter().map(|m| mode(m) != Mode::Client).collect();
        let parts = cap_shares(&balance::part_sizes(len, &peers)?, &reduces, len);
        Ok(Group {
            round,
            members,
            parts,
        })
    }

    /// The values of member `j`'s part.
    pub fn range(&self, j: usize) -> Range<usize> {
        let start: usize = self.parts[..j].iter().sum();
        start..start + self.parts[j]
    }

    /// Values in the whole buffer.
    pub(super) fn len(&self) -> usize {
        self.parts.iter().sum()
    }

    /// The most weight member `i`'s contribution counts with ([`Member::max_weight`] as an
    /// f32; none if that is not a number).
    pub(super) fn granted(&self, i: usize) -> f32 {
        let granted = self.members[i].max_weight;
        if granted >= 0.0 {
            granted.min(f64::from(f32::MAX)) as f32
        } else {
            0.0
        }
    }

    /// Whether member `i` sends values (an auxiliary member only reduces and receives).
    pub(super) fn sends(&self, i: usize) -> bool {
        self.members[i].mode != Mode::Auxiliary
    }

    /// The index of `peer` in the group.
    pub(super) fn index_of(&self, peer: &PeerId) -> Option<usize> {
        self.members.iter().position(|m| m.peer == *peer)
    }
}

/// `parts` (summing to `len`) with none above [`MAX_SHARES`] fair shares (`len` over the
/// members that may reduce, `reduces`): what is over is spread over those below the bound, in
/// proportion to their headroom (which holds it all: the bounds sum to twice `len`).
fn cap_shares(parts: &[usize], reduces: &[bool], len: usize) -> Vec<usize> {
    let reducers = reduces.iter().filter(|&&r| r).count();
    if reducers < 2 {
        return parts.to_vec();
    }
    let limit = MAX_SHARES * len as f64 / reducers as f64;
    let mut exact: Vec<f64> = parts.iter().map(|&p| p as f64).collect();
    let over: f64 = exact.iter().map(|x| (x - limit).max(0.0)).sum();
    if over <= 0.0 {
        return parts.to_vec();
    }
    let headroom: f64 = exact
        .iter()
        .zip(reduces)
        .filter(|(_, r)| **r)
        .map(|(x, _)| (limit - x).max(0.0))
        .sum();
    for (x, r) in exact.iter_mut().zip(reduces) {
        if *x >= limit {
            *x = limit;
        } else if *r {
            *x += over * (limit - *x) / headroom;
        }
    }
    balance::round_to_total(&exact, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(mode: Mode, rate: f64) -> Member {
        Member {
            peer: PeerId::random(),
            addrs: Vec::new(),
            mode,
            rate,
            max_weight: f64::INFINITY,
        }
    }

    /// A member claiming a link a thousand times faster than the others' (or twice as fast)
    /// reduces at most [`MAX_SHARES`] fair shares, not the whole buffer (or a third).
    #[test]
    fn a_claimed_rate_buys_a_few_shares_at_most() {
        let len = 100_000;
        let mut members: Vec<Member> = (0..7).map(|_| member(Mode::Full, 1e7)).collect();
        members.push(member(Mode::Client, 1e7));
        members.push(member(Mode::Full, 1e10));
        let group = Group::new([0; 32], members.clone(), len).unwrap();
        assert_eq!(group.parts.iter().sum::<usize>(), len);
        assert_eq!(group.parts[7], 0, "a client reduces nothing");
        let liar = group.parts[8] as f64 / len as f64;
        let fair = 1.0 / 8.0;
        assert!(
            liar <= fair * MAX_SHARES + 1e-4,
            "the liar reduces {liar:.3} of the buffer"
        );
        members[8].rate = 2e7;
        let group = Group::new([0; 32], members, len).unwrap();
        let liar = group.parts[8] as f64 / len as f64;
        assert!(liar <= fair * MAX_SHARES + 1e-4, "{liar:.3}");
        // Without the cap, twice the rate would have reduced about a third of it.
        let uncapped = balance::part_sizes(
            len,
            &group
                .members
                .iter()
                .map(|m| balance::Peer {
                    mode: m.mode,
                    rate: m.rate,
                })
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert!(uncapped[8] as f64 / len as f64 > 0.3);
    }

    /// Clients alone all reduce (before, such a group failed: no reducer); with a full member
    /// among them, they reduce nothing.
    #[test]
    fn a_group_of_clients_alone_reduces_all_the_same() {
        let len = 30_000;
        let clients: Vec<Member> = (0..3).map(|_| member(Mode::Client, 1e6)).collect();
        let group = Group::new([0; 32], clients.clone(), len).unwrap();
        assert_eq!(group.parts.iter().sum::<usize>(), len);
        assert!(group.parts.iter().all(|&p| p > 0), "{:?}", group.parts);
        let mut mixed = clients;
        mixed.push(member(Mode::Full, 1e6));
        let group = Group::new([0; 32], mixed, len).unwrap();
        assert_eq!(group.parts, vec![0, 0, 0, len]);
    }
}
