//! Direct channels ([`crate::direct`]) from the host's side: its listener beside the libp2p
//! one, whether to ask a peer for a channel, and the offered side's choice (remembering peers a
//! channel to failed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use potluck_core::lock;

use super::swarm::is_relayed;
use super::{Host, Nat};
use crate::direct;

/// How long a peer a direct channel could not be opened to is reached over streams only.
pub const DIRECT_RETRY: Duration = Duration::from_secs(600);

/// A direct-channel listener on the IP of the first TCP listen address (none without one,
/// or if the port can't be bound: bulk data then stays on libp2p streams).
pub(super) fn direct_listener(listening: &[Multiaddr]) -> Option<Arc<direct::Listener>> {
    let tcp = listening
        .iter()
        .find(|a| !is_relayed(a) && a.iter().any(|p| matches!(p, Protocol::Tcp(_))))?;
    let ip = tcp.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
        _ => None,
    })?;
    match direct::Listener::bind(ip) {
        Ok(l) => Some(Arc::new(l)),
        Err(e) => {
            tracing::warn!("no direct channels on {ip}: {e}; bulk data stays on libp2p streams");
            None
        }
    }
}

impl Host {
    /// Where this host accepts direct channels ([`crate::direct`]), if it does: not while it
    /// is known to be behind a NAT (nobody could connect, and each try costs its peer
    /// [`direct::CONNECT`]).
    pub fn direct(&self) -> Option<&direct::Listener> {
        if *lock(&self.status.nat) == Nat::Private {
            return None;
        }
        self.direct.as_deref()
    }

    /// Whether this host asks `peer` for a direct channel: it can open them (it need not accept
    /// any: a peer that listens on nothing, or only through a relay), and none to `peer`
    /// failed in the last [`DIRECT_RETRY`].
    pub fn wants_direct(&self, peer: PeerId) -> bool {
        if !self.opens_direct {
            return false;
        }
        let mut failed = lock(&self.direct_failed);
        match failed.get(&peer) {
            Some(at) if at.elapsed() < DIRECT_RETRY => false,
            Some(_) => {
                failed.remove(&peer);
                true
            }
            None => true,
        }
    }

    /// The offered side of a direct channel to `peer` ([`direct::choose`]): tries only the IPs
    /// of our connections to it, never an address the peer merely names (a peer could name a
    /// service on our network, and we would write the offer's token to it); the channel to
    /// use. A failure is remembered ([`Host::wants_direct`]).
    pub async fn choose_direct(
        &self,
        stream: libp2p::Stream,
        peer: PeerId,
        offer: &direct::Offer,
    ) -> std::io::Result<direct::Bulk> {
        let connected = self.connections(peer).await.unwrap_or_default();
        let bulk = direct::choose(stream, &direct::ips(&connected), offer).await?;
        if !bulk.is_direct() {
            let mut failed = lock(&self.direct_failed);
            // Bounded: the oldest failures go first.
            if failed.len() >= 4096
                && let Some(oldest) = failed.iter().min_by_key(|(_, at)| **at).map(|(p, _)| *p)
            {
                failed.remove(&oldest);
            }
            failed.insert(peer, Instant::now());
        }
        Ok(bulk)
    }
}
