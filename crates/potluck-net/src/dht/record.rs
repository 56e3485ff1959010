//! DHT records with hivemind's semantics: a key holds a value, or a dictionary of subkeys each
//! with its own value; every value carries an absolute expiration (wall clock, ms since the Unix
//! epoch); a subkey that names an owner is accepted only with the owner's signature.

use std::fmt;
use std::sync::Arc;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use potluck_core::clock::Time;
use serde::{Deserialize, Serialize};

use crate::identity;

/// A subkey of a dictionary entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Subkey {
    /// Anyone may write it.
    Plain(Vec<u8>),
    /// Only the peer with this id (its bytes) may write it; the value carries its signature.
    Owner(Vec<u8>),
}

impl Subkey {
    /// The subkey owned by `peer`.
    pub fn owner(peer: &PeerId) -> Subkey {
        Subkey::Owner(peer.to_bytes())
    }

    fn len(&self) -> usize {
        match self {
            Subkey::Plain(b) | Subkey::Owner(b) => b.len(),
        }
    }
}

impl fmt::Display for Subkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subkey::Plain(b) => write!(f, "{}", String::from_utf8_lossy(b)),
            Subkey::Owner(b) => match PeerId::from_bytes(b) {
                Ok(p) => write!(f, "[owner:{p}]"),
                Err(_) => write!(f, "[owner:?]"),
            },
        }
    }
}

/// A value with its expiration (and, under an owner subkey, the owner's signature).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub value: Vec<u8>,
    pub expiration: Time,
    pub signature: Option<Vec<u8>>,
}

/// What one store writes: a value under a key, or under one subkey of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub key: Vec<u8>,
    pub subkey: Option<Subkey>,
    pub item: Item,
}

/// Size and time limits every record must meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_key: usize,
    pub max_subkey: usize,
    pub max_value: usize,
    pub max_signature: usize,
    /// How far in the future an expiration may lie (ms): nothing squats forever.
    pub max_ttl: Time,
    /// Subkeys one key may hold.
    pub max_subkeys: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_key: 256,
            max_subkey: 128,
            max_value: 64 << 10,
            max_signature: 128,
            max_ttl: 24 * 3600 * 1000,
            max_subkeys: 4096,
        }
    }
}

/// Why a record was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Rejection {
    #[error("{what} of {len} bytes is over the limit of {limit}")]
    TooLarge {
        what: String,
        len: usize,
        limit: usize,
    },
    #[error("expired at {at}")]
    Expired { at: Time },
    #[error("expiration {at} is more than the allowed time ahead")]
    TooFarAhead { at: Time },
    #[error("an owner subkey needs the owner's signature")]
    Unsigned,
    #[error("the signature does not match the owner")]
    BadSignature,
    #[error("the owner subkey does not name an ed25519 peer")]
    BadOwner,
    #[error("a plain value cannot be signed")]
    Signed,
    #[error("invalid value: {0}")]
    Invalid(String),
    #[error("a newer value is stored")]
    Stale,
    #[error("the store is full")]
    Full,
    #[error("the storing peer's share of this node's store is used up")]
    Quota,
    #[error("owner-signed records are stored here: a plain value does not replace them")]
    Owned,
}

/// The bytes an owner signs: a domain tag, then key, subkey, value and expiration.
pub fn signing_payload(key: &[u8], subkey: &Subkey, value: &[u8], expiration: Time) -> Vec<u8> {
    #[derive(Serialize)]
    struct Signed<'a> {
        domain: &'a str,
        key: &'a [u8],
        subkey: &'a Subkey,
        value: &'a [u8],
        expiration: Time,
    }
    let signed = Signed {
        domain: "potluck/dht/record/1",
        key,
        subkey,
        value,
        expiration,
    };
    // Serialising plain slices and integers to a Vec cannot fail.
    postcard::to_allocvec(&signed).unwrap_or_default()
}

/// A record under `key`'s subkey owned by `key_pair`'s peer, signed.
pub fn signed(keypair: &Keypair, key: &[u8], value: Vec<u8>, expiration: Time) -> Record {
    let subkey = Subkey::owner(&keypair.public().to_peer_id());
    let payload = signing_payload(key, &subkey, &value, expiration);
    let signature = keypair.sign(&payload).ok();
    Record {
        key: key.to_vec(),
        subkey: Some(subkey),
        item: Item {
            value,
            expiration,
            signature,
        },
    }
}

/// A check of record values by their key: typed records are decoded and checked before they
/// are stored.
pub trait Validator: Send + Sync + fmt::Debug {
    /// Whether this validator judges records under `key`.
    fn applies(&self, key: &[u8]) -> bool;
    /// Checks a value (`Err` says why it is refused).
    fn validate(&self, key: &[u8], subkey: Option<&Subkey>, value: &[u8]) -> Result<(), String>;
}

/// The validators of a node.
#[derive(Debug, Clone, Default)]
pub struct Validators(Vec<Arc<dyn Validator>>);

impl Validators {
    /// Adds a validator.
    pub fn with(mut self, v: Arc<dyn Validator>) -> Validators {
        self.0.push(v);
        self
    }
}

/// Checks a record before anything stores it: sizes, expiration, signature, validators.
pub fn check(
    r: &Record,
    now: Time,
    limits: &Limits,
    validators: &Validators,
) -> Result<(), Rejection> {
    let too_large = |what: &str, len: usize, limit: usize| {
        if len > limit {
            Err(Rejection::TooLarge {
                what: what.to_owned(),
                len,
                limit,
            })
        } else {
            Ok(())
        }
    };
    too_large("key", r.key.len(), limits.max_key)?;
    too_large("value", r.item.value.len(), limits.max_value)?;
    if let Some(s) = &r.subkey {
        too_large("subkey", s.len(), limits.max_subkey)?;
    }
    if let Some(sig) = &r.item.signature {
        too_large("signature", sig.len(), limits.max_signature)?;
    }
    if r.item.expiration <= now {
        return Err(Rejection::Expired {
            at: r.item.expiration,
        });
    }
    if r.item.expiration > now.saturating_add(limits.max_ttl) {
        return Err(Rejection::TooFarAhead {
            at: r.item.expiration,
        });
    }
    match &r.subkey {
        Some(Subkey::Owner(owner)) => {
            let peer = PeerId::from_bytes(owner).map_err(|_| Rejection::BadOwner)?;
            let public = identity::public_key(&peer).ok_or(Rejection::BadOwner)?;
            let sig = r.item.signature.as_ref().ok_or(Rejection::Unsigned)?;
            let subkey = Subkey::Owner(owner.clone());
            let payload = signing_payload(&r.key, &subkey, &r.item.value, r.item.expiration);
            if !public.verify(&payload, sig) {
                return Err(Rejection::BadSignature);
            }
        }
        _ => {
            if r.item.signature.is_some() {
                return Err(Rejection::Signed);
            }
        }
    }
    for v in validators.0.iter().filter(|v| v.applies(&r.key)) {
        v.validate(&r.key, r.subkey.as_ref(), &r.item.value)
            .map_err(Rejection::Invalid)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(value: &[u8], expiration: Time) -> Record {
        Record {
            key: b"k".to_vec(),
            subkey: None,
            item: Item {
                value: value.to_vec(),
                expiration,
                signature: None,
            },
        }
    }

    #[derive(Debug)]
    struct Numbers;

    impl Validator for Numbers {
        fn applies(&self, key: &[u8]) -> bool {
            key.ends_with(b".number")
        }
        fn validate(&self, _: &[u8], _: Option<&Subkey>, value: &[u8]) -> Result<(), String> {
            std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .map(|_| ())
                .ok_or_else(|| "not a number".into())
        }
    }

    #[test]
    fn signed_records_pass_and_forgeries_fail() {
        let (limits, v, now) = (Limits::default(), Validators::default(), 1_000);
        let alice = Keypair::generate_ed25519();
        let mallory = Keypair::generate_ed25519();
        let good = signed(&alice, b"run.progress", b"epoch 3".to_vec(), now + 100);
        assert_eq!(check(&good, now, &limits, &v), Ok(()));
        // Mallory writes under Alice's subkey with her own signature.
        let mut forged = signed(&mallory, b"run.progress", b"epoch 99".to_vec(), now + 100);
        forged.subkey = good.subkey.clone();
        assert_eq!(
            check(&forged, now, &limits, &v),
            Err(Rejection::BadSignature)
        );
        // A changed value, a changed expiration, no signature.
        let mut changed = good.clone();
        changed.item.value = b"epoch 4".to_vec();
        assert_eq!(
            check(&changed, now, &limits, &v),
            Err(Rejection::BadSignature)
        );
        let mut later = good.clone();
        later.item.expiration += 1;
        assert_eq!(
            check(&later, now, &limits, &v),
            Err(Rejection::BadSignature)
        );
        let mut unsigned = good.clone();
        unsigned.item.signature = None;
        assert_eq!(check(&unsigned, now, &limits, &v), Err(Rejection::Unsigned));
        let mut bogus = good;
        bogus.subkey = Some(Subkey::Owner(b"not a peer".to_vec()));
        assert_eq!(check(&bogus, now, &limits, &v), Err(Rejection::BadOwner));
    }

    #[test]
    fn sizes_times_and_validators_are_enforced() {
        let (limits, now) = (Limits::default(), 1_000);
        let v = Validators::default().with(Arc::new(Numbers));
        assert_eq!(check(&plain(b"x", now + 1), now, &limits, &v), Ok(()));
        assert!(matches!(
            check(
                &plain(&vec![0; limits.max_value + 1], now + 1),
                now,
                &limits,
                &v
            ),
            Err(Rejection::TooLarge { .. })
        ));
        assert_eq!(
            check(&plain(b"x", now), now, &limits, &v),
            Err(Rejection::Expired { at: now })
        );
        let far = now + limits.max_ttl + 1;
        assert_eq!(
            check(&plain(b"x", far), now, &limits, &v),
            Err(Rejection::TooFarAhead { at: far })
        );
        let mut typed = plain(b"12", now + 1);
        typed.key = b"run.number".to_vec();
        assert_eq!(check(&typed, now, &limits, &v), Ok(()));
        typed.item.value = b"twelve".to_vec();
        assert!(matches!(
            check(&typed, now, &limits, &v),
            Err(Rejection::Invalid(_))
        ));
        let mut signed_plain = plain(b"x", now + 1);
        signed_plain.item.signature = Some(vec![1; 64]);
        assert_eq!(
            check(&signed_plain, now, &limits, &v),
            Err(Rejection::Signed)
        );
    }
}
