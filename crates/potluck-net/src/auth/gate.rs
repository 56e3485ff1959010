//! A host's side of an authorized run, [`Gate`]: whom it admitted and who admitted it. The
//! handshake fills it; the host asks it before it serves a peer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use libp2p::PeerId;
use potluck_core::clock::{Time, now};
use potluck_core::lock;

use super::{MAX_REVOKED_HELD, Refusal, Role, SKEW, Token, Verifier};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::tests::setup;

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
