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
    /// Bytes per second it moves each way (measured).
    pub rate: f64,
}

/// A group as every member sees it: the same members in the same order, the same parts.
#[derive(Debug, Clone)]
pub struct Group {
    /// Names the round (every stream says which round it belongs to).
    pub round: [u8; 32],
    pub members: Vec<Member>,
    /// Values in each member's part (0 for clients), in member order.
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
    pub fn new(round: [u8; 32], members: Vec<Member>, len: usize) -> Result<Group, GroupError> {
        if members.len() > MAX_GROUP {
            return Err(GroupError::TooLarge(members.len()));
        }
        let peers: Vec<balance::Peer> = members
            .iter()
            .map(|m| balance::Peer {
                mode: m.mode,
                rate: m.rate,
            })
            .collect();
        let parts = balance::part_sizes(len, &peers)?;
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

    /// Whether member `i` sends values (an auxiliary member only reduces and receives).
    pub(super) fn sends(&self, i: usize) -> bool {
        self.members[i].mode != Mode::Auxiliary
    }

    /// The index of `peer` in the group.
    pub(super) fn index_of(&self, peer: &PeerId) -> Option<usize> {
        self.members.iter().position(|m| m.peer == *peer)
    }
}
