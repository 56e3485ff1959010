//! Tokens and the authority's keys: what the authority signs ([`Grant`]), the signed
//! [`Token`] and its text form, the [`Authority`] that signs and the [`AuthorityKey`] that
//! checks, and [`Verifier`], which says whether a token is valid for a run and a peer now.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::{Keypair, ed25519};
use potluck_core::clock::{Time, now};
use potluck_core::file;
use serde::{Deserialize, Serialize};

use super::{Error, MAX_TOKEN, MAX_TTL, Role, SKEW};

const TOKEN_TAG: &str = "potluck-token/1";
const SIGNING_DOMAIN: &[u8] = b"potluck token v1\0";

/// What the authority signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The run's name.
    pub run: String,
    /// The peer id's bytes.
    pub peer: Vec<u8>,
    pub role: Role,
    /// Wall clock, ms since the Unix epoch.
    pub issued: Time,
    pub expires: Time,
}

/// A grant with the authority's signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// The grant's postcard bytes, exactly as signed.
    pub grant: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a token ({0})")]
    Malformed(String),
    #[error("not signed by this run's authority")]
    Forged,
    #[error("a token for run {0:?}, not this one")]
    OtherRun(String),
    #[error("a token for another peer ({0})")]
    OtherPeer(String),
    #[error("expired {0} s ago: get a new token from the run's authority")]
    Expired(u64),
    #[error("issued {0} s in the future: check this machine's clock")]
    NotYet(u64),
    #[error("valid for longer than the {} days a token may be", MAX_TTL.as_secs() / 86_400)]
    TooLong,
    #[error("revoked by the run's authority")]
    Revoked,
}

/// The authority's public key: what every host of an authorized run is given
/// (`--authority`), printed and parsed as 64 hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthorityKey(ed25519::PublicKey);

impl AuthorityKey {
    pub fn ed25519(&self) -> &ed25519::PublicKey {
        &self.0
    }
}

impl fmt::Debug for AuthorityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthorityKey({self})")
    }
}

impl fmt::Display for AuthorityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0.to_bytes()))
    }
}

impl std::str::FromStr for AuthorityKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<AuthorityKey, Error> {
        let bad = |why: &str| Error::PublicKey(why.into());
        let bytes = unhex(s.trim()).ok_or_else(|| bad("not hex"))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| bad("not 32 bytes"))?;
        ed25519::PublicKey::try_from_bytes(&bytes)
            .map(AuthorityKey)
            .map_err(|e| Error::PublicKey(e.to_string()))
    }
}

/// The run authority: its keypair signs tokens.
#[derive(Clone)]
pub struct Authority {
    key: ed25519::Keypair,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Authority({})", self.public())
    }
}

impl Authority {
    /// A fresh authority.
    pub fn generate() -> Authority {
        Authority {
            key: ed25519::Keypair::generate(),
        }
    }

    /// From an ed25519 keypair (e.g. read with [`crate::identity::load`]).
    pub fn from_keypair(key: &Keypair) -> Option<Authority> {
        key.clone()
            .try_into_ed25519()
            .ok()
            .map(|key| Authority { key })
    }

    /// Reads an authority key file (an identity file: libp2p's encoding, mode 0600).
    pub fn load(path: &Path) -> Result<Authority, Error> {
        let key = crate::identity::load(path)?;
        Authority::from_keypair(&key).ok_or_else(|| Error::Invalid {
            path: path.into(),
            reason: "not an ed25519 key".into(),
        })
    }

    /// Writes the key file (refusing to overwrite one), readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        Ok(crate::identity::save(
            &Keypair::from(self.key.clone()),
            path,
        )?)
    }

    pub fn public(&self) -> AuthorityKey {
        AuthorityKey(self.key.public())
    }

    /// The signing key.
    pub fn ed25519(&self) -> &ed25519::Keypair {
        &self.key
    }

    /// A token for `peer` in `run` with `role`, valid from now for `ttl` (at most [`MAX_TTL`]).
    pub fn grant(&self, run: &str, peer: PeerId, role: Role, ttl: Duration) -> Token {
        let issued = now();
        self.grant_at(
            run,
            peer,
            role,
            issued,
            issued + ttl.min(MAX_TTL).as_millis() as Time,
        )
    }

    /// A token with explicit times (tests: expired or future tokens).
    pub fn grant_at(
        &self,
        run: &str,
        peer: PeerId,
        role: Role,
        issued: Time,
        expires: Time,
    ) -> Token {
        let grant = Grant {
            run: run.into(),
            peer: peer.to_bytes(),
            role,
            issued,
            expires,
        };
        let grant = postcard::to_allocvec(&grant).unwrap_or_default();
        let signature = self.key.sign(&signing_payload(&grant));
        Token { grant, signature }
    }
}

fn signing_payload(grant: &[u8]) -> Vec<u8> {
    [SIGNING_DOMAIN, grant].concat()
}

impl Token {
    /// The grant inside, unchecked (to show what a token says).
    pub fn grant(&self) -> Result<Grant, Refusal> {
        postcard::from_bytes(&self.grant).map_err(|e| Refusal::Malformed(e.to_string()))
    }

    /// The token's text form (one line).
    pub fn to_text(&self) -> String {
        format!(
            "{TOKEN_TAG} {}\n",
            hex(&postcard::to_allocvec(self).unwrap_or_default())
        )
    }

    /// Parses the text form.
    pub fn from_text(text: &str) -> Result<Token, Refusal> {
        let bad = |why: &str| Refusal::Malformed(why.into());
        let body = text
            .trim()
            .strip_prefix(TOKEN_TAG)
            .ok_or_else(|| bad("no `potluck-token/1` tag"))?;
        let bytes = unhex(body.trim()).ok_or_else(|| bad("not hex"))?;
        if bytes.len() > MAX_TOKEN {
            return Err(bad("too long"));
        }
        postcard::from_bytes(&bytes).map_err(|e| Refusal::Malformed(e.to_string()))
    }

    /// Reads a token file.
    pub fn load(path: &Path) -> Result<Token, Error> {
        let text = file::read_text_limited(path, 4 * MAX_TOKEN as u64).map_err(|e| match e {
            file::Error::TooLarge { len, .. } => Error::Invalid {
                path: path.into(),
                reason: format!("{len} bytes: not a token"),
            },
            e => Error::File(e),
        })?;
        Token::from_text(&text).map_err(|e| Error::Invalid {
            path: path.into(),
            reason: e.to_string(),
        })
    }
}

/// Checks tokens for one run: its name and its authority's key.
#[derive(Debug, Clone)]
pub struct Verifier {
    pub run: String,
    pub authority: AuthorityKey,
}

impl Verifier {
    /// The grant of `token` if it is valid now (at `at`) for `peer`.
    pub fn check(&self, token: &Token, peer: PeerId, at: Time) -> Result<Grant, Refusal> {
        if token.grant.len() > MAX_TOKEN {
            return Err(Refusal::Malformed("too long".into()));
        }
        if !self
            .authority
            .0
            .verify(&signing_payload(&token.grant), &token.signature)
        {
            return Err(Refusal::Forged);
        }
        let grant = token.grant()?;
        if grant.run != self.run {
            return Err(Refusal::OtherRun(grant.run));
        }
        if grant.peer != peer.to_bytes() {
            let named = PeerId::from_bytes(&grant.peer)
                .map_or_else(|_| "not a peer id".into(), |p| p.to_string());
            return Err(Refusal::OtherPeer(named));
        }
        let skew = SKEW.as_millis() as Time;
        if grant.issued > at + skew {
            return Err(Refusal::NotYet((grant.issued - at) / 1000));
        }
        if grant.expires.saturating_sub(grant.issued) > MAX_TTL.as_millis() as Time {
            return Err(Refusal::TooLong);
        }
        if grant.expires + skew <= at {
            return Err(Refusal::Expired((at - grant.expires) / 1000));
        }
        Ok(grant)
    }
}

/// What a peer signs when it asks an invite server for a token with `code`.
fn invite_payload(code: &str, peer: &PeerId) -> Vec<u8> {
    let mut payload = b"potluck invite request v1\0".to_vec();
    payload.extend_from_slice(code.as_bytes());
    payload.push(0);
    payload.extend_from_slice(&peer.to_bytes());
    payload
}

/// Proof, for an invite server, that the peer asking with `code` holds the key of the peer id
/// its token will name (hex of its signature).
pub fn sign_invite_request(keypair: &Keypair, code: &str) -> String {
    let payload = invite_payload(code, &keypair.public().to_peer_id());
    hex(&keypair.sign(&payload).unwrap_or_default())
}

/// Whether `proof` is `peer`'s signature of a request with `code` ([`sign_invite_request`]).
pub fn check_invite_request(peer: &PeerId, code: &str, proof: &str) -> bool {
    if proof.len() > 256 {
        return false;
    }
    let (Some(public), Some(signature)) = (crate::identity::public_key(peer), unhex(proof)) else {
        return false;
    };
    public.verify(&invite_payload(code, peer), &signature)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::auth::Reply;

    #[test]
    fn an_invite_request_proves_the_key_of_its_peer() {
        let (alice, bob) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let alice_id = alice.public().to_peer_id();
        let proof = sign_invite_request(&alice, "c0de");
        assert!(check_invite_request(&alice_id, "c0de", &proof));
        assert!(!check_invite_request(&alice_id, "other", &proof));
        // Bob binding a code to Alice's id: he cannot sign for her.
        let forged = sign_invite_request(&bob, "c0de");
        assert!(!check_invite_request(&alice_id, "c0de", &forged));
        assert!(!check_invite_request(&alice_id, "c0de", "zz"));
        assert!(!check_invite_request(&alice_id, "c0de", &"00".repeat(200)));
    }

    pub(in crate::auth) fn setup() -> (Authority, Verifier, PeerId) {
        let authority = Authority::generate();
        let verifier = Verifier {
            run: "run1".into(),
            authority: authority.public(),
        };
        (authority, verifier, PeerId::random())
    }

    #[test]
    fn a_granted_token_is_valid_for_its_peer_and_run_only() {
        let (authority, verifier, peer) = setup();
        let token = authority.grant("run1", peer, Role::Trainer, Duration::from_secs(3600));
        let grant = verifier.check(&token, peer, now()).unwrap();
        assert_eq!(grant.role, Role::Trainer);
        let other = PeerId::random();
        assert!(matches!(
            verifier.check(&token, other, now()),
            Err(Refusal::OtherPeer(_))
        ));
        let elsewhere = authority.grant("run2", peer, Role::Trainer, Duration::from_secs(60));
        assert_eq!(
            verifier.check(&elsewhere, peer, now()),
            Err(Refusal::OtherRun("run2".into()))
        );
    }

    #[test]
    fn a_token_of_another_authority_or_altered_is_forged() {
        let (_, verifier, peer) = setup();
        let impostor = Authority::generate();
        let token = impostor.grant("run1", peer, Role::Trainer, Duration::from_secs(60));
        assert_eq!(verifier.check(&token, peer, now()), Err(Refusal::Forged));

        let (authority, verifier, peer) = setup();
        let mut token = authority.grant("run1", peer, Role::Monitor, Duration::from_secs(60));
        let mut grant = token.grant().unwrap();
        grant.role = Role::Trainer;
        token.grant = postcard::to_allocvec(&grant).unwrap();
        assert_eq!(verifier.check(&token, peer, now()), Err(Refusal::Forged));
    }

    #[test]
    fn expired_future_and_overlong_tokens_are_refused() {
        let (authority, verifier, peer) = setup();
        let t = now();
        let hour = 3_600_000;
        let expired = authority.grant_at("run1", peer, Role::Trainer, t - 2 * hour, t - hour);
        assert_eq!(
            verifier.check(&expired, peer, t),
            Err(Refusal::Expired(3600))
        );
        let future = authority.grant_at("run1", peer, Role::Trainer, t + hour, t + 2 * hour);
        assert_eq!(verifier.check(&future, peer, t), Err(Refusal::NotYet(3600)));
        let long = authority.grant_at("run1", peer, Role::Trainer, t, t + 31 * 24 * hour);
        assert_eq!(verifier.check(&long, peer, t), Err(Refusal::TooLong));
        // Within the skew both ways: still valid.
        let recent = authority.grant_at("run1", peer, Role::Trainer, t - hour, t - 60_000);
        assert!(verifier.check(&recent, peer, t).is_ok());
    }

    #[test]
    fn tokens_and_keys_round_trip_through_text_and_files() {
        let (authority, verifier, peer) = setup();
        let token = authority.grant("run1", peer, Role::Aux, Duration::from_secs(60));
        let text = token.to_text();
        assert_eq!(Token::from_text(&text).unwrap(), token);
        assert!(Token::from_text("potluck-token/1 zz").is_err());
        assert!(Token::from_text(&text[1..]).is_err());
        let key: AuthorityKey = authority.public().to_string().parse().unwrap();
        assert_eq!(key, verifier.authority);
        assert!("abcd".parse::<AuthorityKey>().is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authority.key");
        authority.save(&path).unwrap();
        assert!(authority.save(&path).is_err(), "never overwritten");
        assert_eq!(Authority::load(&path).unwrap().public(), authority.public());
        let file = dir.path().join("token");
        std::fs::write(&file, &text).unwrap();
        assert_eq!(Token::load(&file).unwrap(), token);
    }

    proptest::proptest! {
        /// Whatever a stranger sends as a token or a token file, nothing panics and nothing
        /// is admitted.
        #[test]
        fn no_made_up_token_is_admitted(bytes in proptest::collection::vec(0u8.., 0..600),
                                        text in ".{0,300}") {
            let (_, verifier, peer) = setup();
            let _ = postcard::from_bytes::<Reply>(&bytes);
            if let Ok(token) = postcard::from_bytes::<Token>(&bytes) {
                proptest::prop_assert!(verifier.check(&token, peer, now()).is_err());
            }
            if let Ok(token) = Token::from_text(&text) {
                proptest::prop_assert!(verifier.check(&token, peer, now()).is_err());
            }
            let hexed = format!("{TOKEN_TAG} {}", hex(&bytes));
            if let Ok(token) = Token::from_text(&hexed) {
                proptest::prop_assert!(verifier.check(&token, peer, now()).is_err());
            }
        }
    }
}
