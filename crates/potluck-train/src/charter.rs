//! A run's charter: the settings its authority signs, which no peer's word changes. It names
//! the tokenizers the run's data is encoded with ([`crate::tokenizers`]) and the run's
//! optimizer settings: in an authorized run whose authority published a charter, a peer whose
//! data was encoded with other tokenizers is refused at once, whatever the peers around it use,
//! and `prepare --from-run` takes the chartered tokenizers (not merely those most peers
//! report); every peer trains with the chartered optimizer settings, whatever its command line
//! says, and a newcomer takes no other from a donor (not merely those most donors offer).
//!
//! The charter lives under `RUN/charter` as an owner record of the authority's own peer id,
//! signed by its key (like its revocations, [`potluck_net::revoke`]): only the authority can
//! write it, and a record under any other subkey is ignored. It lives 23 hours in the DHT;
//! the authority publishes it again (`potluck authority charter`) to keep it there.

use libp2p::identity::Keypair;
use potluck_core::clock::{Time, now};
use potluck_net::auth::{Authority, Verifier};
use potluck_net::dht::record::{Record, Subkey};
use potluck_net::dht::store::Entry;
use potluck_net::dht::typed::{self, Owned, Typed};
use potluck_net::dht::{self, Dht};
use potluck_net::revoke;
use serde::{Deserialize, Serialize};

use crate::{optim, tokenizers};

/// What the authority signs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charter {
    pub run: String,
    /// When it was signed (ms since the epoch).
    pub issued: Time,
    /// The tokenizers every peer's data must be encoded with.
    pub tokenizers: tokenizers::Id,
    /// The optimizer settings every peer steps with (rule, moments' precision, schedule,
    /// betas, decay, clipping).
    pub optimizer: optim::Config,
}

impl Typed for Charter {
    const NAME: &'static str = "charter";
    const MAX_BYTES: usize = 1024;

    fn is_key(key: &[u8]) -> bool {
        typed::ends_with(key, "charter")
    }
}

/// Why a charter was not used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the run's charter is malformed: {0}")]
    Malformed(String),
    #[error("the run's charter is for run {0:?}")]
    OtherRun(String),
    #[error(transparent)]
    Dht(#[from] dht::Error),
}

/// `run`'s charter: `RUN/charter`, under the authority's subkey.
pub fn records(run: &str) -> Owned<Charter> {
    Owned::at(format!("{run}/charter"))
}

/// The record of `charter` signed by `authority`, expiring at `expiration`.
pub fn sign(authority: &Authority, charter: &Charter, expiration: Time) -> Record {
    let keypair = Keypair::from(authority.ed25519().clone());
    records(&charter.run).record(&keypair, charter, expiration)
}

/// The charter in what a node holds under its key: only the authority's subkey counts (its
/// signature was checked when the record was stored and read).
pub fn decode(entry: &Entry, verifier: &Verifier) -> Result<Option<Charter>, Error> {
    let owner = Subkey::owner(&revoke::owner(&verifier.authority));
    let Entry::Dict(subkeys) = entry else {
        return Ok(None);
    };
    let Some(item) = subkeys.get(&owner) else {
        return Ok(None);
    };
    let charter: Charter =
        postcard::from_bytes(&item.value).map_err(|e| Error::Malformed(e.to_string()))?;
    if charter.run != verifier.run {
        return Err(Error::OtherRun(charter.run));
    }
    charter.optimizer.check().map_err(Error::Malformed)?;
    Ok(Some(charter))
}

/// The charter of `verifier`'s run as the DHT holds it now (none published: `None`).
pub async fn fetch(dht: &Dht, verifier: &Verifier) -> Result<Option<Charter>, Error> {
    match dht.get(records(&verifier.run).key()).await? {
        Some(entry) => decode(&entry, verifier),
        None => Ok(None),
    }
}

/// A charter for `run` naming `tokenizers` and `optimizer`, signed now.
pub fn new(run: &str, tokenizers: tokenizers::Id, optimizer: optim::Config) -> Charter {
    Charter {
        run: run.to_owned(),
        issued: now(),
        tokenizers,
        optimizer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the authority's charter is read: one that another key signed under the same key
    /// (any member can store its own subkey there) names nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_authority_s_charter_counts() {
        let nodes = crate::test_nodes(2).await;
        let authority = Authority::generate();
        let verifier = Verifier {
            run: "run".into(),
            authority: authority.public(),
        };
        let (dht, member) = (&nodes[0].0, &nodes[1].1);
        assert_eq!(fetch(dht, &verifier).await.unwrap(), None);
        let expires = now() + 60_000;
        // A member's own charter, under its own subkey: ignored.
        let forged = new("run", [9; 32], optim::Config::reference_lamb());
        records("run")
            .put(dht, member, &forged, expires)
            .await
            .unwrap();
        assert_eq!(fetch(dht, &verifier).await.unwrap(), None);
        // The authority's.
        let charter = new("run", [7; 32], optim::Config::reference_lamb());
        dht.store_record(sign(&authority, &charter, expires))
            .await
            .unwrap();
        assert_eq!(fetch(dht, &verifier).await.unwrap(), Some(charter.clone()));
        // One naming optimizer settings no run trains with is not taken, though signed.
        let mut absurd = charter.clone();
        absurd.optimizer.schedule.peak = f64::NAN;
        dht.store_record(sign(&authority, &absurd, expires + 1))
            .await
            .unwrap();
        let err = fetch(dht, &verifier).await.unwrap_err();
        assert!(err.to_string().contains("no run trains with"), "{err}");
        // Another run's authority reads nothing of this one's.
        let other = Verifier {
            run: "run".into(),
            authority: Authority::generate().public(),
        };
        assert_eq!(fetch(&nodes[1].0, &other).await.unwrap(), None);
    }
}
