//! Authorized runs. A run authority — an ed25519 key its organiser keeps offline — signs
//! short-lived tokens, each naming one run, one peer and one role. A run's identity is its name
//! together with the authority's public key: every host of an authorized run is given both, and
//! admits a connection's requests only after its peer has presented a valid token for them.
//!
//! The handshake (`/potluck/auth/1`) runs right after the secure channel: each side opens one
//! stream to the other, sends its token and reads [`Reply`]. The token names the peer id the
//! secure channel (noise or TLS) authenticated, so a token copied by someone else is useless;
//! until a peer is admitted nothing it sends is processed (its DHT requests are refused, its
//! streams dropped, what identify says of it held back), and a peer that presents no valid token
//! within [`HANDSHAKE`] is disconnected. Admissions end when the token expires.
//!
//! A token on disk is one line of text: `potluck-token/1 ` and the hex of its postcard bytes.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::{Keypair, ed25519};
use potluck_core::lock;
use serde::{Deserialize, Serialize};

use potluck_core::clock::{Time, now};

/// The handshake's protocol.
pub const PROTOCOL: &str = "/potluck/auth/1";

/// Largest encoded token (or reply) read from a peer or a file.
pub const MAX_TOKEN: usize = 1024;

/// Clock difference tolerated between the authority, the holder and the checker.
pub const SKEW: Duration = Duration::from_secs(120);

/// A peer that has not presented a valid token by then is disconnected.
pub const HANDSHAKE: Duration = Duration::from_secs(10);

/// Revoked peers a gate holds, at most.
pub const MAX_REVOKED_HELD: usize = 4096;

/// Longest a token may live: an authority grants for hours, not forever.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

const TOKEN_TAG: &str = "potluck-token/1";
const SIGNING_DOMAIN: &[u8] = b"potluck token v1\0";

/// What a token lets its peer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Computes gradients, averages, serves state.
    Trainer,
    /// Averages (with weight 0) and serves state; computes nothing.
    Aux,
    /// Reads the run (DHT, state) and contributes nothing to averages.
    Monitor,
}

impl Role {
    /// Whether the role takes part in averaging (sends or reduces parts).
    pub fn averages(self) -> bool {
        matches!(self, Role::Trainer | Role::Aux)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Trainer => "trainer",
            Role::Aux => "aux",
            Role::Monitor => "monitor",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "trainer" => Ok(Role::Trainer),
            "aux" => Ok(Role::Aux),
            "monitor" => Ok(Role::Monitor),
            other => Err(format!("unknown role {other:?}: trainer, aux or monitor")),
        }
    }
}

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

/// The answer to a presented token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Admitted,
    Refused(String),
}

/// Errors of key and token files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("not an authority public key ({0}): 64 hex digits, as `potluck authority init` prints")]
    PublicKey(String),
    #[error("{0}")]
    Identity(#[from] crate::identity::Error),
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
        let io = |source| Error::Io {
            path: path.into(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > 4 * MAX_TOKEN as u64 {
            return Err(Error::Invalid {
                path: path.into(),
                reason: format!("{len} bytes: not a token"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
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

/// A host's side of an authorized run: the token it presents, the peers it admitted (with
/// their roles, until their tokens expire) and the peers that admitted it.
#[derive(Debug)]
pub struct Gate {
    verifier: Verifier,
    own: Mutex<Token>,
    state: Mutex<GateState>,
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct GateState {
    /// Peers whose token we accepted: role and expiry (with the skew allowed).
    admitted: HashMap<PeerId, (Role, Time)>,
    /// Peers that accepted our token (on the connection now open).
    admitted_by: HashMap<PeerId, Time>,
    /// Peers that refused our token, and why (until we present it again).
    refused_by: HashMap<PeerId, String>,
    /// The handshake session of each connected peer (a new one per first connection): a
    /// handshake of a connection gone by the time it ends changes nothing.
    sessions: HashMap<PeerId, u64>,
    next_session: u64,
    /// Peers the authority revoked.
    revoked: std::collections::HashSet<PeerId>,
}

impl Gate {
    /// A gate for `verifier`'s run presenting `own`.
    pub fn new(verifier: Verifier, own: Token) -> Gate {
        Gate {
            verifier,
            own: Mutex::new(own),
            state: Mutex::default(),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The token this host presents.
    pub fn token(&self) -> Token {
        lock(&self.own).clone()
    }

    /// Replaces the token this host presents (a renewed one); the host presents it again.
    pub fn set_token(&self, token: Token) {
        *lock(&self.own) = token;
    }

    /// Checks a token `peer` presented and admits it if valid.
    pub fn present(&self, peer: PeerId, token: &Token) -> Result<Role, Refusal> {
        let grant = self.verifier.check(token, peer, now())?;
        let mut state = lock(&self.state);
        if state.revoked.contains(&peer) {
            return Err(Refusal::Revoked);
        }
        let until = grant.expires + SKEW.as_millis() as Time;
        state.admitted.insert(peer, (grant.role, until));
        drop(state);
        self.changed.notify_waiters();
        Ok(grant.role)
    }

    /// A fresh connection to `peer`: our token is to be presented to it (again); the new
    /// handshake session.
    pub fn presenting(&self, peer: PeerId) -> u64 {
        let mut state = lock(&self.state);
        state.next_session += 1;
        let session = state.next_session;
        state.sessions.insert(peer, session);
        state.refused_by.remove(&peer);
        state.admitted_by.remove(&peer);
        session
    }

    /// The handshake session with `peer` now, if connected.
    pub fn session(&self, peer: PeerId) -> Option<u64> {
        lock(&self.state).sessions.get(&peer).copied()
    }

    /// `peer` accepted our token in `session` (ignored if that session is over).
    pub fn admitted_by(&self, peer: PeerId, session: u64) {
        let expires = self.token().grant().map_or(0, |g| g.expires);
        let mut state = lock(&self.state);
        if state.sessions.get(&peer) != Some(&session) {
            return;
        }
        state.refused_by.remove(&peer);
        state.admitted_by.insert(peer, expires);
        drop(state);
        self.changed.notify_waiters();
    }

    /// `peer` refused our token in `session`, or never answered, saying why.
    pub fn refused_by(&self, peer: PeerId, session: u64, why: String) {
        let mut state = lock(&self.state);
        if state.sessions.get(&peer) != Some(&session) {
            return;
        }
        if state.refused_by.len() >= 4096 {
            state.refused_by.clear();
        }
        state.refused_by.insert(peer, why);
        drop(state);
        self.changed.notify_waiters();
    }

    /// The role of `peer` if it is admitted now.
    pub fn role(&self, peer: PeerId) -> Option<Role> {
        self.role_at(peer, now())
    }

    /// The role of `peer` if it is admitted at `at`.
    pub fn role_at(&self, peer: PeerId, at: Time) -> Option<Role> {
        let state = lock(&self.state);
        let (role, until) = *state.admitted.get(&peer)?;
        (until > at && !state.revoked.contains(&peer)).then_some(role)
    }

    /// Whether `peer` may be sent requests: it is admitted and it admitted us.
    pub fn ready(&self, peer: PeerId) -> bool {
        self.role(peer).is_some() && lock(&self.state).admitted_by.contains_key(&peer)
    }

    /// Waits until [`Gate::ready`] for `peer`, at most `deadline`. Err: refused (why), or
    /// no answer in time (None).
    pub async fn wait_ready(&self, peer: PeerId, deadline: Duration) -> Result<(), Option<String>> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if self.ready(peer) {
                    return Ok(());
                }
                if let Some(why) = lock(&self.state).refused_by.get(&peer) {
                    return Err(Some(why.clone()));
                }
                changed.await;
            }
        };
        tokio::time::timeout(deadline, wait)
            .await
            .unwrap_or(Err(None))
    }

    /// Forgets `peer`'s handshake (its last connection closed): it presents again next time.
    pub fn forget(&self, peer: PeerId) {
        let mut state = lock(&self.state);
        state.admitted.remove(&peer);
        state.admitted_by.remove(&peer);
        state.sessions.remove(&peer);
    }

    /// Peers admitted before whose admission has run out now.
    pub fn expired(&self) -> Vec<PeerId> {
        self.expired_at(now())
    }

    /// Peers admitted before whose admission has run out at `at` (they are forgotten).
    pub fn expired_at(&self, at: Time) -> Vec<PeerId> {
        let mut state = lock(&self.state);
        let gone: Vec<PeerId> = state
            .admitted
            .iter()
            .filter(|(p, (_, until))| *until <= at || state.revoked.contains(p))
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            state.admitted.remove(p);
        }
        gone
    }

    /// Revokes `peer`: it is refused from now on (and disconnected at the host's next
    /// sweep). Whether it was not revoked before. At most [`MAX_REVOKED_HELD`] are held.
    pub fn revoke(&self, peer: PeerId) -> bool {
        let mut state = lock(&self.state);
        if state.revoked.len() >= MAX_REVOKED_HELD && !state.revoked.contains(&peer) {
            tracing::warn!("{MAX_REVOKED_HELD} peers revoked already: {peer} is not");
            return false;
        }
        state.revoked.insert(peer)
    }
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
mod tests {
    use super::*;

    fn setup() -> (Authority, Verifier, PeerId) {
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

    #[test]
    fn a_gate_admits_until_expiry_or_revocation() {
        let (authority, verifier, peer) = setup();
        let own = authority.grant(
            "run1",
            PeerId::random(),
            Role::Trainer,
            Duration::from_secs(60),
        );
        let gate = Gate::new(verifier, own);
        assert_eq!(gate.role(peer), None);
        let t = now();
        let skew = SKEW.as_millis() as Time;
        // Valid for another minute (and the skew allowed beyond).
        let short = authority.grant_at("run1", peer, Role::Monitor, t - 10_000, t + 60_000);
        assert_eq!(gate.present(peer, &short), Ok(Role::Monitor));
        assert_eq!(gate.role(peer), Some(Role::Monitor));
        assert!(!gate.ready(peer), "ready only once it admitted us too");
        let old = gate.presenting(peer);
        let session = gate.presenting(peer);
        gate.admitted_by(peer, old);
        assert!(
            !gate.ready(peer),
            "an answer of a connection gone changes nothing"
        );
        gate.admitted_by(peer, session);
        assert!(gate.ready(peer));
        let lapsed = t + 60_000 + skew;
        assert_eq!(gate.role_at(peer, lapsed - 1), Some(Role::Monitor));
        assert_eq!(gate.role_at(peer, lapsed), None);
        assert_eq!(gate.expired_at(lapsed - 1), vec![]);
        assert_eq!(gate.expired_at(lapsed), vec![peer]);
        assert_eq!(gate.role(peer), None, "forgotten once expired");

        let long = authority.grant("run1", peer, Role::Trainer, Duration::from_secs(60));
        assert_eq!(gate.present(peer, &long), Ok(Role::Trainer));
        assert!(gate.revoke(peer));
        assert_eq!(gate.role(peer), None);
        assert_eq!(gate.present(peer, &long), Err(Refusal::Revoked));
    }
}
