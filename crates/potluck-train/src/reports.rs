//! Reports of misbehaving peers: each peer publishes the members its reducer banned (their
//! contributions dropped again and again, see [`potluck_allreduce::butterfly::Inbox`]) and the
//! state donors it caught claiming a state they did not serve ([`Suspects`]) under
//! `RUN/reports`, its own subkey, signed. Anyone can read who reported whom (the monitor, the
//! run's organiser deciding on a revocation); a report alone bans no one anywhere else.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use libp2p::PeerId;
use potluck_core::clock;
use potluck_core::lock;
use potluck_net::dht::store::Entry;
use potluck_net::dht::typed::{self, Owned, Typed};
use potluck_net::dht::{self, Dht};
use serde::{Deserialize, Serialize};

/// Peers one report names, at most (the rest are left out).
pub const MAX_NAMED: usize = 256;
/// Why a reducer is named that returned averages other reducers of the same contributions
/// contradicted.
pub const DISHONEST_REDUCER: &str = "as a reducer, returned averages that two other reducers of the same contributions contradicted";
/// A reason's length, at most (longer ones are cut).
pub const MAX_WHY: usize = 200;
/// How long a published report lives (it is published again at every new ban).
pub const LIFETIME_MS: u64 = 3_600_000;

/// What one peer reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Peers it banned or caught lying (their id bytes), and why.
    pub banned: Vec<(Vec<u8>, String)>,
}

/// Bytes of a reported peer's id (an identity multihash of an ed25519 key takes 38).
const MAX_PEER_ID: usize = 64;

impl Typed for Report {
    const NAME: &'static str = "reports";
    const MAX_BYTES: usize = 64 << 10;

    fn is_key(key: &[u8]) -> bool {
        typed::ends_with(key, "reports")
    }

    fn check(&self) -> Result<(), String> {
        if self.banned.len() > MAX_NAMED {
            return Err(format!(
                "{} peers named (at most {MAX_NAMED})",
                self.banned.len()
            ));
        }
        match self
            .banned
            .iter()
            .find(|(peer, why)| peer.len() > MAX_PEER_ID || why.chars().count() > MAX_WHY)
        {
            Some(_) => Err("a peer id or a reason too long".into()),
            None => Ok(()),
        }
    }
}

/// Peers this peer caught misbehaving outside its reducer (a state donor that did not serve
/// the state it claimed), for its report: the last [`MAX_NAMED`] named within
/// [`LIFETIME_MS`], newest first.
#[derive(Debug, Clone, Default)]
pub struct Suspects(Arc<Mutex<Named>>);

#[derive(Debug, Default)]
struct Named {
    /// Each peer, why, and when it was named.
    peers: VecDeque<(PeerId, String, Instant)>,
    /// The pairs of reducers that returned different averages of one part lately (at most
    /// [`MAX_NAMED`]), and when.
    disputes: VecDeque<([PeerId; 2], Instant)>,
    /// Named since the last [`Suspects::take_fresh`].
    fresh: bool,
}

impl Suspects {
    /// Names `peer` for `why` (again: the newer reason replaces the older).
    pub fn name(&self, peer: PeerId, why: String) {
        let mut named = lock(&self.0);
        named.peers.retain(|(p, _, _)| *p != peer);
        named.peers.push_front((peer, why, Instant::now()));
        named.peers.truncate(MAX_NAMED);
        named.fresh = true;
    }

    /// Two reducers returned different averages of one part ([`Dispute`]): one of them lied.
    /// Where this peer is one of the two it knows its own was right, and names the other; else
    /// a reducer in disputes with two others lately is named (an honest one disputes only
    /// with the liar). The peer named, if one is.
    ///
    /// [`Dispute`]: potluck_allreduce::butterfly::Dispute
    pub fn disputed(&self, reducers: [PeerId; 2], me: PeerId) -> Option<PeerId> {
        let within = std::time::Duration::from_millis(LIFETIME_MS);
        let liar = {
            let mut named = lock(&self.0);
            named.disputes.retain(|(_, at)| at.elapsed() < within);
            named.disputes.push_front((reducers, Instant::now()));
            named.disputes.truncate(MAX_NAMED);
            if reducers[0] == reducers[1] {
                return None;
            }
            match reducers.iter().position(|&r| r == me) {
                Some(i) => Some(reducers[1 - i]),
                None => reducers.into_iter().find(|&r| {
                    let pairs = named.disputes.iter().map(|(pair, _)| pair);
                    potluck_allreduce::butterfly::disputes_two_others(pairs, r)
                }),
            }
        }?;
        self.name(liar, DISHONEST_REDUCER.into());
        Some(liar)
    }

    /// Whether a peer was named since the last call.
    pub fn take_fresh(&self) -> bool {
        std::mem::take(&mut lock(&self.0).fresh)
    }

    /// The peers named within [`LIFETIME_MS`], and why.
    pub fn named(&self) -> Vec<(PeerId, String)> {
        let named = lock(&self.0);
        let within = std::time::Duration::from_millis(LIFETIME_MS);
        named
            .peers
            .iter()
            .filter(|(_, _, at)| at.elapsed() < within)
            .map(|(p, why, _)| (*p, why.clone()))
            .collect()
    }
}

/// `run`'s reports: `RUN/reports`.
pub fn records(run: &str) -> Owned<Report> {
    Owned::at(format!("{run}/reports"))
}

/// Publishes the bans of `net`'s reducer as this peer's report.
pub async fn publish(
    dht: &Dht,
    keypair: &libp2p::identity::Keypair,
    run: &str,
    bans: &[(PeerId, String)],
) -> Result<usize, dht::Error> {
    let report = Report {
        banned: bans
            .iter()
            .take(MAX_NAMED)
            .map(|(p, why)| (p.to_bytes(), why.chars().take(MAX_WHY).collect()))
            .collect(),
    };
    records(run)
        .put(dht, keypair, &report, clock::now() + LIFETIME_MS)
        .await
}

/// Every report in what a node holds under the key: (reporter, reported, why). A report that
/// does not decode, or names too many, is skipped.
pub fn decode(entry: &Entry) -> Vec<(PeerId, PeerId, String)> {
    let mut out = Vec::new();
    for (reporter, report) in Owned::<Report>::read(entry) {
        for (peer, why) in report.banned {
            if let Ok(peer) = PeerId::from_bytes(&peer) {
                out.push((reporter, peer, why));
            }
        }
    }
    out
}

/// The reports of `run` the DHT holds now.
pub async fn fetch(dht: &Dht, run: &str) -> Result<Vec<(PeerId, PeerId, String)>, dht::Error> {
    Ok(dht
        .get(records(run).key())
        .await?
        .map_or_else(Vec::new, |e| decode(&e)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use potluck_net::dht::record::{Item, Subkey};

    proptest::proptest! {
        #[test]
        fn any_report_bytes_decode_or_are_skipped(
            value in proptest::collection::vec(proptest::num::u8::ANY, 0..512)
        ) {
            let owner = Subkey::owner(&PeerId::random());
            let item = Item { value, expiration: 1, signature: None };
            let _ = decode(&Entry::Dict(BTreeMap::from([(owner, item)])));
        }
    }

    /// A liar disputes with each honest reducer it is checked against, an honest reducer only
    /// with the liar: the liar is named at its second partner, no honest one ever; a reducer
    /// knows its own result, and names the other of its dispute at once.
    #[test]
    fn the_reducer_in_disputes_with_two_others_is_named_and_no_honest_one() {
        let [me, liar, a, b] = [(); 4].map(|()| PeerId::random());
        let suspects = Suspects::default();
        assert_eq!(suspects.disputed([liar, a], me), None);
        assert_eq!(suspects.disputed([a, liar], me), None);
        assert!(suspects.named().is_empty());
        assert_eq!(suspects.disputed([b, liar], me), Some(liar));
        assert_eq!(suspects.named().len(), 1);
        assert!(suspects.take_fresh());
        let checked = Suspects::default();
        assert_eq!(checked.disputed([me, liar], me), Some(liar));
        assert_eq!(checked.named()[0].0, liar);
    }
}
