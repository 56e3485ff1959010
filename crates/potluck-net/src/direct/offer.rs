//! The offer: what the accepting side sends over the authenticated libp2p stream (port,
//! one-time token, a fresh key per direction), and connecting with it.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{Channel, KEY, TOKEN};

/// What the accepting side tells the dialing side (over an authenticated, encrypted stream:
/// the keys are secret).
#[derive(Clone, Serialize, Deserialize)]
pub struct Offer {
    /// The TCP port to connect to (at an address the dialer knows the peer by).
    pub port: u16,
    pub(super) token: [u8; TOKEN],
    /// The dialer's sending key, then the accepter's.
    pub(super) keys: [[u8; KEY]; 2],
}

impl std::fmt::Debug for Offer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offer")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Side {
    Dialer,
    Accepter,
}

/// The IP addresses in `addrs` a direct connection can be tried at (relayed ones left out),
/// without repeats, in order.
pub fn ips(addrs: &[Multiaddr]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for a in addrs {
        if a.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
            continue;
        }
        let ip = a.iter().find_map(|p| match p {
            Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
            Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
            _ => None,
        });
        if let Some(ip) = ip
            && !ip.is_unspecified()
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// Connects to the peer that made `offer`, at the first of `ips` that answers within
/// `within` each.
pub async fn connect(ips: &[IpAddr], offer: &Offer, within: Duration) -> io::Result<Channel> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
    for ip in ips {
        let attempt = async {
            let mut stream = TcpStream::connect((*ip, offer.port)).await?;
            stream.write_all(&offer.token).await?;
            Ok::<_, io::Error>(stream)
        };
        match tokio::time::timeout(within, attempt).await {
            Ok(Ok(stream)) => return Channel::new(stream, &offer.keys, Side::Dialer),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{ip}:{} did not answer within {within:?}", offer.port),
                );
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_and_unspecified_addresses_are_not_tried() {
        let addrs: Vec<Multiaddr> = [
            "/ip4/10.0.0.1/tcp/4001",
            "/ip4/10.0.0.1/udp/4001/quic-v1",
            "/ip4/0.0.0.0/tcp/1",
            "/ip4/1.2.3.4/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
            "/ip6/::1/tcp/2",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        assert_eq!(
            ips(&addrs),
            vec![
                IpAddr::from([10, 0, 0, 1]),
                "::1".parse::<IpAddr>().unwrap()
            ]
        );
    }
}
