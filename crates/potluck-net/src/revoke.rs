//! Revocations: the run authority publishes the peers it revoked (or banned) in the DHT, and
//! every peer of an authorized run reads them and refuses those peers from then on.
//!
//! The list lives under `RUN/revoked` as an owner record of the authority's own peer id, signed
//! by its key: only the authority can write it, the newest list (latest expiration) replaces
//! older ones, and every node that stores or reads it checks the signature. A peer keeps every
//! revocation it has seen for as long as it runs, so a list that expires from the DHT (records
//! live a day at most) is not forgotten by peers that read it; the authority publishes the
//! whole list each time it adds to it.

use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use potluck_core::clock::{Time, now};
use serde::{Deserialize, Serialize};

use crate::auth::{Authority, AuthorityKey, Verifier};
use crate::dht::record::{Record, Subkey};
use crate::dht::store::Entry;
use crate::dht::typed::{self, Owned, Typed};
use crate::dht::{self, Dht};

/// Peers one list names, at most (a list must fit in one record's value).
pub const MAX_REVOKED: usize = 1024;

/// How long a published list lives in the DHT (the longest a record may).
pub const LIFETIME: Duration = Duration::from_secs(23 * 3600);

/// The list as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    pub run: String,
    /// When it was signed (ms since the epoch).
    pub issued: Time,
    /// Revoked peer ids (their bytes).
    pub peers: Vec<Vec<u8>>,
}

impl Typed for Revocations {
    const NAME: &'static str = "revocations";
    const MAX_BYTES: usize = 64 << 10;

    fn is_key(key: &[u8]) -> bool {
        typed::ends_with(key, "revoked")
    }

    fn check(&self) -> Result<(), String> {
        if self.peers.len() > MAX_REVOKED {
            return Err(format!(
                "{} peers (at most {MAX_REVOKED})",
                self.peers.len()
            ));
        }
        Ok(())
    }
}

/// Why a list was not used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the revocation list is malformed: {0}")]
    Malformed(String),
    #[error("the revocation list names {0} peers, over the limit of {MAX_REVOKED}")]
    TooMany(usize),
    #[error("the revocation list is for run {0:?}")]
    OtherRun(String),
    #[error(transparent)]
    Dht(#[from] dht::Error),
}

/// `run`'s list: `RUN/revoked`, under the authority's subkey.
pub fn records(run: &str) -> Owned<Revocations> {
    Owned::at(format!("{run}/revoked"))
}

/// The authority's peer id: the owner of the list's subkey.
pub fn owner(authority: &AuthorityKey) -> PeerId {
    PublicKey::from(authority.ed25519().clone()).to_peer_id()
}

impl Authority {
    /// The signed record of `run`'s list naming `peers`, expiring at `expiration`.
    pub fn revocations(&self, run: &str, peers: &[PeerId], expiration: Time) -> Record {
        let list = Revocations {
            run: run.into(),
            issued: now(),
            peers: peers.iter().map(|p| p.to_bytes()).collect(),
        };
        let keypair = Keypair::from(self.ed25519().clone());
        records(run).record(&keypair, &list, expiration)
    }
}

/// The revoked peers in what a node holds under the list's key: only the authority's
/// subkey counts (its signature was checked when the record was stored and read).
pub fn decode(entry: &Entry, verifier: &Verifier) -> Result<Vec<PeerId>, Error> {
    let owner = Subkey::owner(&owner(&verifier.authority));
    let Entry::Dict(subkeys) = entry else {
        return Ok(Vec::new());
    };
    let Some(item) = subkeys.get(&owner) else {
        return Ok(Vec::new());
    };
    let list: Revocations =
        postcard::from_bytes(&item.value).map_err(|e| Error::Malformed(e.to_string()))?;
    if list.peers.len() > MAX_REVOKED {
        return Err(Error::TooMany(list.peers.len()));
    }
    if list.run != verifier.run {
        return Err(Error::OtherRun(list.run));
    }
    Ok(list
        .peers
        .iter()
        .filter_map(|p| PeerId::from_bytes(p).ok())
        .collect())
}

/// The revoked peers of `verifier`'s run, as the DHT holds them now.
pub async fn fetch(dht: &Dht, verifier: &Verifier) -> Result<Vec<PeerId>, Error> {
    match dht.get(records(&verifier.run).key()).await? {
        Some(entry) => decode(&entry, verifier),
        None => Ok(Vec::new()),
    }
}

/// Reads the list once and revokes what it names in this host's gate (the host then
/// disconnects those peers and refuses them). Nothing to do in an open run.
pub async fn apply(dht: &Dht) -> Result<(), Error> {
    let Some(gate) = dht.host().gate() else {
        return Ok(());
    };
    let me = dht.peer_id();
    for peer in fetch(dht, gate.verifier()).await? {
        if peer == me {
            tracing::error!("the run's authority revoked this peer");
        } else if gate.revoke(peer) {
            tracing::warn!("{peer} was revoked by the run's authority");
        }
    }
    Ok(())
}

/// [`apply`] every `every`, for as long as its task lives.
pub async fn watch(dht: Dht, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = apply(&dht).await {
            tracing::debug!("reading the revocation list: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::dht::record::Item;

    /// What a node would hold under the key after `record` was stored.
    fn held(record: Record) -> Entry {
        let subkey = record.subkey.unwrap_or(Subkey::Plain(Vec::new()));
        Entry::Dict(BTreeMap::from([(subkey, record.item)]))
    }

    fn verifier(authority: &Authority, run: &str) -> Verifier {
        Verifier {
            run: run.into(),
            authority: authority.public(),
        }
    }

    #[test]
    fn only_the_authoritys_list_for_this_run_counts() {
        let authority = Authority::generate();
        let (a, b) = (PeerId::random(), PeerId::random());
        let exp = now() + 60_000;
        let list = held(authority.revocations("r", &[a, b], exp));
        assert_eq!(decode(&list, &verifier(&authority, "r")).unwrap(), [a, b]);
        // Another run's list from the same authority.
        assert!(matches!(
            decode(&list, &verifier(&authority, "r2")),
            Err(Error::OtherRun(_))
        ));
        // Another key's list sits under its own subkey: it names nobody for this run.
        let forged = held(Authority::generate().revocations("r", &[a], exp));
        assert!(
            decode(&forged, &verifier(&authority, "r"))
                .unwrap()
                .is_empty()
        );
        // Too long a list is refused whole.
        let many: Vec<PeerId> = (0..=MAX_REVOKED).map(|_| PeerId::random()).collect();
        let long = held(authority.revocations("r", &many, exp));
        assert!(matches!(
            decode(&long, &verifier(&authority, "r")),
            Err(Error::TooMany(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_under_the_authoritys_subkey_decode_or_fail_cleanly(
            value in proptest::collection::vec(proptest::num::u8::ANY, 0..512)
        ) {
            let authority = Authority::generate();
            let subkey = Subkey::owner(&owner(&authority.public()));
            let item = Item { value, expiration: 1, signature: None };
            let entry = Entry::Dict(BTreeMap::from([(subkey, item)]));
            let _ = decode(&entry, &verifier(&authority, "r"));
        }
    }
}
