//! Typed records of a run. Every kind of record a run keeps in the DHT — progress reports,
//! metrics, ban reports, matchmaking offers and groups, epoch deadlines, the authority's
//! revocations — is one Rust type ([`Typed`]) stored under one kind of key, one value per
//! owner subkey, each signed by its owner.
//!
//! [`Owned`] is how peers publish and read them: it encodes and signs a value under the
//! publisher's subkey, and reads back every owner's value, decoded and checked (a value that
//! does not decode or fails its type's check is skipped, never trusted). [`validator`] is what
//! a node registers so that its store refuses, before storing, a value under a typed key that
//! is not a signed, well-formed value of the type (docs/PROTOCOL.md).

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use potluck_core::clock::Time;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::record::{self, Record, Subkey, Validator};
use super::store::Entry;
use super::{Dht, Error};

/// A kind of record a run keeps in the DHT.
pub trait Typed: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Names the kind in refusals and logs (`progress`, `metrics`…).
    const NAME: &'static str;

    /// The most bytes an encoded value of the kind takes.
    const MAX_BYTES: usize;

    /// Whether `key` is a key of this kind (e.g. it ends with `/progress`).
    fn is_key(key: &[u8]) -> bool;

    /// Checks a decoded value (sizes, finite numbers): a value that fails is neither stored
    /// nor read.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Whether `key`'s last `/`-separated segment is `name` (the key of a kind named so under a
/// run, `RUN/name`).
pub fn ends_with(key: &[u8], name: &str) -> bool {
    key.len() > name.len()
        && key.ends_with(name.as_bytes())
        && key[key.len() - name.len() - 1] == b'/'
}

/// Whether `key` is `…/name/N` (N a round or an epoch), with `suffix` after it if given
/// (`…/avg/N/groups`).
pub fn numbered(key: &[u8], name: &str, suffix: Option<&str>) -> bool {
    let Ok(key) = std::str::from_utf8(key) else {
        return false;
    };
    let mut segments = key.rsplit('/');
    if let Some(suffix) = suffix
        && segments.next() != Some(suffix)
    {
        return false;
    }
    let number = segments.next().is_some_and(|n| n.parse::<u64>().is_ok());
    number && segments.next() == Some(name) && segments.next().is_some()
}

/// Addresses a record may name (a peer's listen, external and relayed addresses).
pub const MAX_ADDRS: usize = 64;
/// Bytes of one address (a multiaddr) in a record.
pub const MAX_ADDR_BYTES: usize = 512;

/// Checks the addresses a record names (as multiaddr bytes) against [`MAX_ADDRS`] and
/// [`MAX_ADDR_BYTES`].
pub fn check_addrs(addrs: &[Vec<u8>]) -> Result<(), String> {
    if addrs.len() > MAX_ADDRS {
        return Err(format!("{} addresses (at most {MAX_ADDRS})", addrs.len()));
    }
    match addrs.iter().find(|a| a.len() > MAX_ADDR_BYTES) {
        Some(a) => Err(format!("an address of {} bytes", a.len())),
        None => Ok(()),
    }
}

/// Decodes a value of kind `T`: bounded, postcard, checked.
pub fn decode<T: Typed>(value: &[u8]) -> Result<T, String> {
    if value.len() > T::MAX_BYTES {
        return Err(format!(
            "a {} record of {} bytes (at most {})",
            T::NAME,
            value.len(),
            T::MAX_BYTES
        ));
    }
    let decoded: T =
        postcard::from_bytes(value).map_err(|e| format!("not a {} record: {e}", T::NAME))?;
    decoded
        .check()
        .map_err(|why| format!("a bad {} record: {why}", T::NAME))?;
    Ok(decoded)
}

/// The records of kind `T` under one key: publish this peer's, read everyone's.
pub struct Owned<T> {
    key: Vec<u8>,
    kind: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for Owned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Owned")
            .field(&String::from_utf8_lossy(&self.key))
            .finish()
    }
}

impl<T> Clone for Owned<T> {
    fn clone(&self) -> Owned<T> {
        Owned {
            key: self.key.clone(),
            kind: PhantomData,
        }
    }
}

impl<T: Typed> Owned<T> {
    /// The records under `key` (a key of `T`'s kind).
    pub fn at(key: impl Into<Vec<u8>>) -> Owned<T> {
        let key = key.into();
        debug_assert!(T::is_key(&key), "{:?} is no {} key", key, T::NAME);
        Owned {
            key,
            kind: PhantomData,
        }
    }

    /// The key.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// `value` as a record under `keypair`'s subkey, signed, expiring at `expiration`.
    pub fn record(&self, keypair: &Keypair, value: &T, expiration: Time) -> Record {
        let bytes = postcard::to_allocvec(value).unwrap_or_default();
        record::signed(keypair, &self.key, bytes, expiration)
    }

    /// Stores `value` under `keypair`'s subkey until `expiration`. Returns how many nodes
    /// took it.
    pub async fn put(
        &self,
        dht: &Dht,
        keypair: &Keypair,
        value: &T,
        expiration: Time,
    ) -> Result<usize, Error> {
        dht.store_record(self.record(keypair, value, expiration))
            .await
    }

    /// Every owner's value, as the DHT holds them now (see [`Owned::read`]).
    pub async fn get(&self, dht: &Dht) -> Result<Vec<(PeerId, T)>, Error> {
        Ok(dht
            .get(&self.key)
            .await?
            .map_or_else(Vec::new, |e| Self::read(&e)))
    }

    /// Every owner's value in `entry`, by owner: values that do not decode or fail the
    /// type's check are skipped (signatures were checked when the records were stored and
    /// read).
    pub fn read(entry: &Entry) -> Vec<(PeerId, T)> {
        let Entry::Dict(subkeys) = entry else {
            return Vec::new();
        };
        subkeys
            .iter()
            .filter_map(|(subkey, item)| {
                let Subkey::Owner(owner) = subkey else {
                    return None;
                };
                let peer = PeerId::from_bytes(owner).ok()?;
                match decode::<T>(&item.value) {
                    Ok(value) => Some((peer, value)),
                    Err(why) => {
                        tracing::debug!("{peer}: {why}");
                        None
                    }
                }
            })
            .collect()
    }

    /// `owner`'s value in `entry`, if it has a good one.
    pub fn read_from(entry: &Entry, owner: &PeerId) -> Option<Result<T, String>> {
        let Entry::Dict(subkeys) = entry else {
            return None;
        };
        subkeys
            .get(&Subkey::owner(owner))
            .map(|item| decode::<T>(&item.value))
    }
}

/// The store's check of `T`'s records (see [`validator`]).
struct Check<T>(PhantomData<fn() -> T>);

impl<T> fmt::Debug for Check<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Check")
            .field(&std::any::type_name::<T>())
            .finish()
    }
}

impl<T: Typed> Validator for Check<T> {
    fn applies(&self, key: &[u8]) -> bool {
        T::is_key(key)
    }

    fn validate(&self, _key: &[u8], subkey: Option<&Subkey>, value: &[u8]) -> Result<(), String> {
        if !matches!(subkey, Some(Subkey::Owner(_))) {
            return Err(format!(
                "a {} record goes under its owner's signed subkey",
                T::NAME
            ));
        }
        decode::<T>(value).map(drop)
    }
}

/// The validator of `T`'s records, for a node's store: under a key of `T`'s kind it takes
/// only values its owner signed that decode as a `T` and pass `T`'s check.
pub fn validator<T: Typed>() -> Arc<dyn Validator> {
    Arc::new(Check::<T>(PhantomData))
}

#[cfg(test)]
mod tests {
    use potluck_core::clock;
    use serde::Deserialize;

    use super::*;
    use crate::dht::record::{Limits, Rejection, Validators};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Rate {
        per_second: f64,
    }

    impl Typed for Rate {
        const NAME: &'static str = "rate";
        const MAX_BYTES: usize = 64;
        fn is_key(key: &[u8]) -> bool {
            ends_with(key, "rate")
        }
        fn check(&self) -> Result<(), String> {
            if self.per_second.is_finite() {
                Ok(())
            } else {
                Err("not finite".into())
            }
        }
    }

    #[test]
    fn keys_are_recognised_by_their_last_segments() {
        assert!(ends_with(b"run/progress", "progress"));
        assert!(!ends_with(b"run/myprogress", "progress"));
        assert!(!ends_with(b"progress", "progress"));
        assert!(numbered(b"run/avg/12", "avg", None));
        assert!(numbered(b"a/b/avg/12/groups", "avg", Some("groups")));
        assert!(!numbered(b"avg/12", "avg", None));
        assert!(!numbered(b"run/avg/x", "avg", None));
        assert!(!numbered(b"run/avg/12/groups", "avg", None));
        assert!(!numbered(b"run/avg/12", "avg", Some("groups")));
        assert!(!numbered(b"run/close/12", "avg", None));
    }

    #[test]
    fn the_store_takes_only_signed_good_values_of_a_typed_key() {
        let key = Keypair::generate_ed25519();
        let rates = Owned::<Rate>::at("run/rate");
        let validators = Validators::default().with(validator::<Rate>());
        let (limits, now) = (Limits::default(), clock::now());
        let check = |r: &Record| record::check(r, now, &limits, &validators);
        let good = rates.record(&key, &Rate { per_second: 3.0 }, now + 1000);
        assert_eq!(check(&good), Ok(()));
        let nan = rates.record(
            &key,
            &Rate {
                per_second: f64::NAN,
            },
            now + 1000,
        );
        assert!(matches!(check(&nan), Err(Rejection::Invalid(_))));
        let garbage = record::signed(&key, b"run/rate", vec![0xff; 9], now + 1000);
        assert!(matches!(check(&garbage), Err(Rejection::Invalid(_))));
        // A plain value under the typed key is refused too.
        let plain = Record {
            subkey: None,
            item: record::Item {
                signature: None,
                ..good.item.clone()
            },
            ..good.clone()
        };
        assert!(matches!(check(&plain), Err(Rejection::Invalid(_))));
        // Other keys are not this validator's business.
        let other = record::signed(&key, b"run/other", vec![0xff; 9], now + 1000);
        assert_eq!(check(&other), Ok(()));
        // Read back: the bad owner's value is skipped.
        let liar = Keypair::generate_ed25519();
        let entry = Entry::Dict(
            [
                (Subkey::owner(&key.public().to_peer_id()), good.item.clone()),
                (Subkey::owner(&liar.public().to_peer_id()), nan.item.clone()),
            ]
            .into_iter()
            .collect(),
        );
        let read = Owned::<Rate>::read(&entry);
        assert_eq!(
            read,
            vec![(key.public().to_peer_id(), Rate { per_second: 3.0 })]
        );
        assert!(matches!(
            Owned::<Rate>::read_from(&entry, &liar.public().to_peer_id()),
            Some(Err(_))
        ));
    }
}
