//! Matchmaking over the DHT: the peers that want to average in a round find each other and
//! agree on groups, every member with the same ordered member list (and so the same parts).
//!
//! 1. **Declare.** Before the round's deadline each peer stores a signed offer (addresses,
//!    mode, measured rate) under its own subkey of `RUN/avg/ROUND`. A peer that cannot declare
//!    at least [`Settings::declare_ahead`] before the deadline is late: it waits for the next
//!    round ([`Error::TooLate`]).
//! 2. **Partition.** At the deadline every peer reads the offers and cuts them, ordered by
//!    `SHA-256(round, peer)`, into ⌈n / target⌉ groups of nearly equal size. The order changes
//!    every round, so a swarm larger than one group regroups every round (Moshpit-style random
//!    regrouping: averages mix across groups over rounds).
//! 3. **Agree.** The leader of a group (its smallest peer id) publishes the member list under
//!    its subkey of `RUN/avg/ROUND/groups`; members take the published group that holds them:
//!    the one their own partition gives, or after half a grace period the smallest leader's,
//!    should views have differed. If no group holding a member appears within
//!    [`Settings::grace`], the leaders it waited for are presumed gone: it partitions again
//!    without them, and leads if it is now a leader. A leader's failure costs one grace
//!    period, never the round. A peer whose offer reached the others after they read the
//!    offers finds them in a group published without it, just as the offers less its own
//!    partition: it missed the round ([`Error::Excluded`]) instead of leading a group of
//!    members that average elsewhere (it waited out the all-reduce's open timeout, and stepped
//!    on its own gradient as if it had averaged).
//!
//! A leader says only who is in its group. What each member is (its addresses, mode and
//! rate) every member reads from that member's own signed offer, never from the leader's
//! copy: a leader cannot make the others clients or give itself the whole buffer to reduce.
//! An offer whose rate is not finite and within [`MIN_RATE`]..=[`MAX_RATE`] is refused on
//! store and on read (its peer is left out), and [`Group::new`] caps every rate at a few times
//! the group's median, so no rate claimed by one peer hands it most of the buffer.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use potluck_core::clock::{self, Time};
use potluck_net::dht::record::Validator;
use potluck_net::dht::typed::{self, Owned, Typed};
use potluck_net::dht::{self, Dht};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::balance::Mode;
use crate::butterfly::{Group, GroupError, MAX_GROUP, Member};

/// How groups are formed.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Groups aim at this size (more peers: more groups).
    pub target: usize,
    /// A group smaller than this does not average.
    pub min_size: usize,
    /// An offer must be stored this long before the deadline.
    pub declare_ahead: Duration,
    /// How long a member waits for its leader before presuming it gone.
    pub grace: Duration,
    /// How often the DHT is read while waiting.
    pub poll: Duration,
    /// Leader failures tolerated in one round.
    pub attempts: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            target: 16,
            min_size: 2,
            declare_ahead: Duration::from_millis(500),
            grace: Duration::from_secs(3),
            poll: Duration::from_millis(100),
            attempts: 3,
        }
    }
}

/// The least rate an offer may declare (bytes/s each way): 1 kB/s.
pub const MIN_RATE: f64 = 1e3;
/// The greatest: 100 GB/s, beyond any link a volunteer has.
pub const MAX_RATE: f64 = 1e11;

/// What a peer offers for a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub addrs: Vec<Vec<u8>>,
    pub mode: WireMode,
    pub rate: f64,
}

/// [`Mode`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireMode {
    Full,
    Client,
    Auxiliary,
}

impl From<Mode> for WireMode {
    fn from(m: Mode) -> WireMode {
        match m {
            Mode::Full => WireMode::Full,
            Mode::Client => WireMode::Client,
            Mode::Auxiliary => WireMode::Auxiliary,
        }
    }
}

impl From<WireMode> for Mode {
    fn from(m: WireMode) -> Mode {
        match m {
            WireMode::Full => Mode::Full,
            WireMode::Client => Mode::Client,
            WireMode::Auxiliary => Mode::Auxiliary,
        }
    }
}

/// A leader's published group: members in order, with their offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Published {
    members: Vec<(Vec<u8>, Offer)>,
}

/// Bytes of a peer id on the wire (an identity multihash of an ed25519 key takes 38).
const MAX_PEER_ID: usize = 64;

impl Typed for Offer {
    const NAME: &'static str = "offer";
    const MAX_BYTES: usize = 64 << 10;

    fn is_key(key: &[u8]) -> bool {
        typed::numbered(key, "avg", None)
    }

    fn check(&self) -> Result<(), String> {
        if !(MIN_RATE..=MAX_RATE).contains(&self.rate) {
            return Err(format!(
                "a rate of {} bytes/s (from {MIN_RATE} to {MAX_RATE})",
                self.rate
            ));
        }
        typed::check_addrs(&self.addrs)
    }
}

impl Typed for Published {
    const NAME: &'static str = "group";
    const MAX_BYTES: usize = 64 << 10;

    fn is_key(key: &[u8]) -> bool {
        typed::numbered(key, "avg", Some("groups"))
    }

    fn check(&self) -> Result<(), String> {
        if self.members.len() > MAX_GROUP {
            return Err(format!(
                "{} members (at most {MAX_GROUP})",
                self.members.len()
            ));
        }
        for (id, offer) in &self.members {
            if id.len() > MAX_PEER_ID {
                return Err(format!("a peer id of {} bytes", id.len()));
            }
            offer.check()?;
        }
        Ok(())
    }
}

/// The checks of matchmaking's records (offers, published groups), for a node's store.
pub fn validators() -> [std::sync::Arc<dyn Validator>; 2] {
    [typed::validator::<Offer>(), typed::validator::<Published>()]
}

/// Why no group was formed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("too late for round {round}: its deadline is {left_ms} ms away; join the next round")]
    TooLate { round: u64, left_ms: i64 },
    #[error("only {got} peers in the group, {min} needed")]
    NotEnough { got: usize, min: usize },
    #[error("no leader published a group holding this peer")]
    NoGroup,
    /// The others of this peer's partition formed their group without it (its offer reached
    /// them after they read the offers): its own group would wait for members averaging
    /// elsewhere. It missed the round, as if late.
    #[error(
        "round {round}: leader {leader} published the others' group without this peer (its \
         offer reached them too late); join the next round"
    )]
    Excluded { round: u64, leader: PeerId },
    #[error(transparent)]
    Dht(#[from] dht::Error),
    #[error(transparent)]
    Group(#[from] GroupError),
}

/// The offers of `round`: `RUN/avg/ROUND`.
fn offers_of(run: &str, round: u64) -> Owned<Offer> {
    Owned::at(format!("{run}/avg/{round}"))
}

/// The groups leaders published for `round`: `RUN/avg/ROUND/groups`.
fn groups_of(run: &str, round: u64) -> Owned<Published> {
    Owned::at(format!("{run}/avg/{round}/groups"))
}

/// The groups `peers` fall into in `round`: ordered by `SHA-256(round, peer)`, cut into
/// ⌈n / target⌉ nearly equal groups; each group sorted by peer id (its leader first).
pub fn partition(round: u64, peers: &[PeerId], target: usize) -> Vec<Vec<PeerId>> {
    let mut order: Vec<([u8; 32], PeerId)> = peers
        .iter()
        .map(|p| {
            let mut h = Sha256::new();
            h.update(round.to_le_bytes());
            h.update(p.to_bytes());
            (h.finalize().into(), *p)
        })
        .collect();
    order.sort();
    let n = order.len();
    if n == 0 {
        return Vec::new();
    }
    let count = n.div_ceil(target.clamp(1, MAX_GROUP));
    let mut groups = Vec::with_capacity(count);
    let mut at = 0;
    for g in 0..count {
        let size = n / count + usize::from(g < n % count);
        let mut group: Vec<PeerId> = order[at..at + size].iter().map(|(_, p)| *p).collect();
        group.sort();
        groups.push(group);
        at += size;
    }
    groups
}

/// A peer's part in matchmaking.
#[derive(Debug)]
pub struct Matchmaker<'a> {
    pub dht: &'a Dht,
    pub keypair: &'a Keypair,
    /// Names the run (and so the keys).
    pub run: &'a str,
    pub settings: Settings,
}

impl Matchmaker<'_> {
    /// Stores this peer's offer for `round` (deadline `deadline`, wall-clock ms).
    pub async fn declare(&self, round: u64, deadline: Time, offer: &Offer) -> Result<(), Error> {
        let left_ms = deadline as i64 - clock::now() as i64;
        if left_ms < self.settings.declare_ahead.as_millis() as i64 {
            return Err(Error::TooLate { round, left_ms });
        }
        self.declare_until(round, deadline + 60_000, offer).await
    }

    /// Stores this peer's offer for `round` until `expiration` (wall-clock ms), the round's
    /// deadline not known yet: an offer its peer refreshes while it lives, so that a peer gone
    /// before the deadline is in no group. (An offer that outlived its peer by minutes put it
    /// in the group of the round it died in, and its part of the values went unaveraged.)
    pub async fn declare_until(
        &self,
        round: u64,
        expiration: Time,
        offer: &Offer,
    ) -> Result<(), Error> {
        offers_of(self.run, round)
            .put(self.dht, self.keypair, offer, expiration)
            .await?;
        Ok(())
    }

    /// Declares, waits for the deadline, and agrees on this peer's group for `round`; its
    /// parts balanced for a buffer of `len` values.
    pub async fn form_group(
        &self,
        round: u64,
        deadline: Time,
        offer: &Offer,
        len: usize,
    ) -> Result<Group, Error> {
        self.declare(round, deadline, offer).await?;
        self.wait_for(round, deadline, false).await?;
        self.agree(round, deadline, len).await
    }

    /// Waits for `round`'s `deadline`; `watching`, it reads the published groups as it waits
    /// and ends early with [`Error::Excluded`] once the others of its partition are seen in a
    /// group formed without it. A peer that saw another deadline of the round at hand or just
    /// past (too near to take: see the training swarm's `close`) waits for one of its own,
    /// and learns only at it that the others averaged by theirs without it: a newcomer to a
    /// swarm of one-second rounds came to the next round that late too, and missed every
    /// round. What ends the wait early is what [`Matchmaker::agree`] believes at the deadline:
    /// a proposed deadline alone changes nothing.
    pub async fn wait_for(&self, round: u64, deadline: Time, watching: bool) -> Result<(), Error> {
        let me = self.keypair.public().to_peer_id();
        loop {
            let left = deadline.saturating_sub(clock::now());
            if !watching {
                tokio::time::sleep(Duration::from_millis(left)).await;
                return Ok(());
            }
            if left == 0 {
                return Ok(());
            }
            // A failed read only leaves this peer waiting, as it would without watching.
            let read = async {
                let offers = self.offers(round).await?;
                let published = groups_of(self.run, round).get(self.dht).await?;
                Ok::<_, Error>((offers, published))
            };
            let (offers, published) = match read.await {
                Ok(read) => read,
                Err(e) => {
                    tracing::debug!("round {round}: reading its groups before the deadline: {e}");
                    Default::default()
                }
            };
            let peers: Vec<PeerId> = offers.keys().copied().collect();
            let mine = partition(round, &peers, self.settings.target)
                .into_iter()
                .find(|g| g.contains(&me))
                .unwrap_or_default();
            for (leader, group) in published {
                let Some(list) = listed(&group) else {
                    continue;
                };
                if well_formed(leader, &list, self.settings.target)
                    && shuts_out(round, &list, me, &mine, &peers, self.settings.target)
                {
                    let e = Error::Excluded { round, leader };
                    tracing::info!("{e} (seen before this peer's own deadline)");
                    return Err(e);
                }
            }
            // Every few polls: a peer that proposes deadlines at hand makes every peer watch,
            // and on a loaded machine the reads slowed the swarm it was in.
            let left = deadline.saturating_sub(clock::now());
            tokio::time::sleep(Duration::from_millis(left).min(self.settings.poll * 4)).await;
        }
    }

    /// After the deadline: partition, publish as a leader, take the published group.
    pub async fn agree(&self, round: u64, deadline: Time, len: usize) -> Result<Group, Error> {
        let me = self.keypair.public().to_peer_id();
        // The others' offers may not have reached this peer yet: a partition of too few would
        // put it in a group of its own (and, as a leader, publish it for peers that wait).
        let reading = tokio::time::Instant::now();
        let mut offers = self.offers(round).await?;
        while offers.len() < self.settings.min_size && reading.elapsed() < self.settings.grace / 2 {
            tokio::time::sleep(self.settings.poll).await;
            offers = self.offers(round).await?;
        }
        let mut gone: HashSet<PeerId> = HashSet::new();
        for _ in 0..self.settings.attempts.max(1) {
            let alive: Vec<PeerId> = offers
                .keys()
                .filter(|p| !gone.contains(p) || **p == me)
                .copied()
                .collect();
            let groups = partition(round, &alive, self.settings.target);
            let Some(mine) = groups.into_iter().find(|g| g.contains(&me)) else {
                return Err(Error::NoGroup);
            };
            if mine[0] == me {
                let members: Vec<(PeerId, Offer)> = mine
                    .iter()
                    .filter_map(|p| offers.get(p).map(|o| (*p, o.clone())))
                    .collect();
                self.publish(round, deadline, &members).await?;
                // The other leaders publish at the deadline too: a group of the others
                // without this peer shows within a poll or so ([`Error::Excluded`]).
                tokio::time::sleep(self.settings.poll).await;
            }
            let started = tokio::time::Instant::now();
            let until = started + self.settings.grace;
            loop {
                // Another leader's group only once this peer's own leader had time to publish.
                let any = started.elapsed() >= self.settings.grace / 2;
                let wanted = Wanted {
                    me,
                    mine: &mine,
                    any,
                };
                if let Some(group) = self
                    .published_group(round, wanted, len, &mut offers)
                    .await?
                {
                    return Ok(group);
                }
                if tokio::time::Instant::now() >= until {
                    break;
                }
                tokio::time::sleep(self.settings.poll).await;
            }
            tracing::warn!(
                "round {round}: leader {} published no group in {:?}; regrouping without it",
                mine[0],
                self.settings.grace
            );
            gone.insert(mine[0]);
        }
        Err(Error::NoGroup)
    }

    /// The offers of `round`, each signed by the peer it describes, by peer.
    pub async fn offers(&self, round: u64) -> Result<BTreeMap<PeerId, Offer>, Error> {
        Ok(offers_of(self.run, round)
            .get(self.dht)
            .await?
            .into_iter()
            .collect())
    }

    /// Publishes, as the leader of a group of `round`, who is in it (`members`, this peer
    /// first, with the offers it read for them: the others take each member's own offer).
    pub async fn publish(
        &self,
        round: u64,
        deadline: Time,
        members: &[(PeerId, Offer)],
    ) -> Result<(), Error> {
        let published = Published {
            members: members
                .iter()
                .map(|(p, o)| (p.to_bytes(), o.clone()))
                .collect(),
        };
        groups_of(self.run, round)
            .put(self.dht, self.keypair, &published, deadline + 60_000)
            .await?;
        Ok(())
    }

    /// A published group holding `wanted.me` as a [`Group`]: the one its own partition gives
    /// (`wanted.mine`), else (if `wanted.any`) the one whose leader has the smallest id. Its
    /// members are as their own offers say (re-read once if one is missing here); a group
    /// listed out of order, larger than the target, or naming a peer that made no offer is
    /// not taken.
    async fn published_group(
        &self,
        round: u64,
        wanted: Wanted<'_>,
        len: usize,
        offers: &mut BTreeMap<PeerId, Offer>,
    ) -> Result<Option<Group>, Error> {
        let published = groups_of(self.run, round).get(self.dht).await?;
        let peers: Vec<PeerId> = offers.keys().copied().collect();
        let mut lists: Vec<(PeerId, Vec<PeerId>)> = Vec::new();
        for (leader, group) in published {
            let Some(list) = listed(&group) else {
                continue;
            };
            if !well_formed(leader, &list, self.settings.target) {
                continue;
            }
            if !list.contains(&wanted.me) {
                let target = self.settings.target;
                if shuts_out(round, &list, wanted.me, wanted.mine, &peers, target) {
                    let e = Error::Excluded { round, leader };
                    tracing::info!("{e}");
                    return Err(e);
                }
                continue;
            }
            if list == wanted.mine || wanted.any {
                lists.push((leader, list));
            }
        }
        lists.sort_by_key(|(leader, list)| (list.as_slice() != wanted.mine, *leader));
        // A group too small to average in is taken only when no other will do.
        let mut small = None;
        for (leader, list) in lists {
            if list.iter().any(|p| !offers.contains_key(p)) {
                *offers = self.offers(round).await?;
            }
            let members: Option<Vec<Member>> = list
                .iter()
                .map(|p| offers.get(p).map(|o| member(*p, o)))
                .collect();
            let Some(members) = members else {
                tracing::warn!(
                    "round {round}: leader {leader} lists peers that made no offer; not taking \
                     its group"
                );
                continue;
            };
            if members.len() < self.settings.min_size {
                small = Some(members.len());
                continue;
            }
            let mut id = Sha256::new();
            id.update(self.run.as_bytes());
            id.update(round.to_le_bytes());
            for m in &members {
                id.update(m.peer.to_bytes());
            }
            return Ok(Some(Group::new(id.finalize().into(), members, len)?));
        }
        match small {
            Some(got) if wanted.any => Err(Error::NotEnough {
                got,
                min: self.settings.min_size,
            }),
            _ => Ok(None),
        }
    }
}

/// The members a published group lists, if every one is a peer id.
fn listed(group: &Published) -> Option<Vec<PeerId>> {
    group
        .members
        .iter()
        .map(|(id, _)| PeerId::from_bytes(id).ok())
        .collect()
}

/// Whether `leader` leads the group it published: first, in order, no larger than the target.
fn well_formed(leader: PeerId, list: &[PeerId], target: usize) -> bool {
    let ordered = list.windows(2).all(|w| w[0] < w[1]);
    list.first() == Some(&leader) && ordered && list.len() <= target.clamp(1, MAX_GROUP)
}

/// Whether a published `list` of `round` is the others of `me`'s partition (`mine`) averaging
/// without it, as the offers of `peers` less its own give them: its offer reached them too
/// late. (A leader can do no more with such a list than a slow network would.)
fn shuts_out(
    round: u64,
    list: &[PeerId],
    me: PeerId,
    mine: &[PeerId],
    peers: &[PeerId],
    target: usize,
) -> bool {
    if list.contains(&me) || !list.iter().any(|p| mine.contains(p)) {
        return false;
    }
    let without_me: Vec<PeerId> = peers.iter().filter(|p| **p != me).copied().collect();
    partition(round, &without_me, target)
        .iter()
        .any(|g| g == list)
}

/// Which published group a peer takes (see [`Matchmaker::published_group`]).
#[derive(Clone, Copy)]
struct Wanted<'a> {
    me: PeerId,
    /// The group its own partition gives.
    mine: &'a [PeerId],
    /// Whether another group holding it will do.
    any: bool,
}

/// `peer` as its own `offer` describes it.
fn member(peer: PeerId, offer: &Offer) -> Member {
    Member {
        peer,
        addrs: offer
            .addrs
            .iter()
            .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
            .collect(),
        mode: offer.mode.into(),
        rate: offer.rate,
        max_weight: f64::INFINITY,
    }
}

/// The offer of a peer listening on `addrs`.
pub fn offer(addrs: &[Multiaddr], mode: Mode, rate: f64) -> Offer {
    Offer {
        addrs: addrs.iter().map(|a| a.to_vec()).collect(),
        mode: mode.into(),
        rate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_everyone_once_in_nearly_equal_groups_and_change_every_round() {
        let peers: Vec<PeerId> = (0..10).map(|_| PeerId::random()).collect();
        let r1 = partition(1, &peers, 4);
        let sizes: Vec<usize> = r1.iter().map(Vec::len).collect();
        assert_eq!(sizes, [4, 3, 3]);
        let mut all: Vec<PeerId> = r1.concat();
        all.sort();
        let mut want = peers.clone();
        want.sort();
        assert_eq!(all, want);
        for g in &r1 {
            assert!(g.windows(2).all(|w| w[0] < w[1]), "leader first");
        }
        // The same view gives the same groups; another round, other groups.
        assert_eq!(partition(1, &peers, 4), r1);
        let changed = (2..6).any(|r| {
            let mut a = partition(r, &peers, 4);
            let mut b = r1.clone();
            a.sort();
            b.sort();
            a != b
        });
        assert!(changed);
        assert_eq!(partition(1, &peers, 16).len(), 1);
        assert!(partition(1, &[], 4).is_empty());
    }

    /// A rate that is not finite, or beyond what any link does, is refused (its peer left out
    /// of every group) instead of breaking the split for everyone.
    #[test]
    fn offers_with_unbounded_rates_are_refused() {
        let with = |rate: f64| offer(&[], Mode::Full, rate).check();
        assert!(with(1e7).is_ok());
        assert!(with(MIN_RATE).is_ok() && with(MAX_RATE).is_ok());
        for bad in [f64::NAN, f64::INFINITY, -1.0, 0.0, 1e300, MAX_RATE * 2.0] {
            assert!(with(bad).is_err(), "{bad}");
        }
    }
}
