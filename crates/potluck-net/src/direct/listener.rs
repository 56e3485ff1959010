//! The TCP port direct channels are accepted on: it reads each new connection's token
//! (bounded in time and number) and hands the connection to the offer that expects it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use potluck_core::lock;
use potluck_core::slots::{Slot, Slots};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::offer::Side;
use super::{
    Channel, HANDSHAKE, KEY, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_IP, MAX_PENDING,
    MAX_PENDING_PER_PEER, Offer, TOKEN,
};
use libp2p::PeerId;

type Pending = Arc<Mutex<HashMap<[u8; TOKEN], oneshot::Sender<TcpStream>>>>;

/// The TCP port direct channels are accepted on; one per host. Dropping the last handle stops
/// accepting.
#[derive(Debug)]
pub struct Listener {
    addr: SocketAddr,
    pending: Pending,
    /// Places for offers: [`MAX_PENDING`] in all, [`MAX_PENDING_PER_PEER`] for one peer.
    offers: Slots<PeerId>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Listener {
    /// Listens on `ip` at a port the system picks (call inside a tokio runtime).
    pub fn bind(ip: IpAddr) -> io::Result<Listener> {
        let std = std::net::TcpListener::bind((ip, 0))?;
        std.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std)?;
        let addr = listener.local_addr()?;
        let pending: Pending = Arc::default();
        let accept = tokio::spawn(accept_loop(listener, pending.clone()));
        Ok(Listener {
            addr,
            pending,
            offers: Slots::new(MAX_PENDING, MAX_PENDING_PER_PEER),
            accept,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes an offer for one connection from `peer`: send the [`Offer`] to it, then wait for
    /// its connection with [`Expected::accept`]. None when [`MAX_PENDING`] offers already
    /// wait, or [`MAX_PENDING_PER_PEER`] for this peer (one member asking for channels again
    /// and again cannot take every offer).
    pub fn expect(&self, peer: PeerId) -> Option<(Offer, Expected)> {
        let slot = self.offers.try_enter(peer)?;
        let rng = SystemRandom::new();
        let mut token = [0u8; TOKEN];
        let mut keys = [[0u8; KEY]; 2];
        rng.fill(&mut token).ok()?;
        for k in &mut keys {
            rng.fill(k).ok()?;
        }
        let (tx, rx) = oneshot::channel();
        {
            lock(&self.pending).insert(token, tx);
        }
        let offer = Offer {
            port: self.addr.port(),
            token,
            keys,
        };
        let expected = Expected {
            token,
            keys,
            connection: Some(rx),
            pending: self.pending.clone(),
            _slot: slot,
        };
        Some((offer, expected))
    }
}

/// An offer's connection, still to come; dropping it withdraws the offer.
#[derive(Debug)]
pub struct Expected {
    token: [u8; TOKEN],
    keys: [[u8; KEY]; 2],
    connection: Option<oneshot::Receiver<TcpStream>>,
    pending: Pending,
    /// Its place among the listener's offers, given back with it.
    _slot: Slot<PeerId>,
}

impl Drop for Expected {
    fn drop(&mut self) {
        lock(&self.pending).remove(&self.token);
    }
}

impl Expected {
    /// The channel, once the dialer connected with the offer's token, or an error after
    /// `within`.
    pub async fn accept(mut self, within: Duration) -> io::Result<Channel> {
        let rx = self
            .connection
            .take()
            .ok_or_else(|| io::Error::other("already accepted"))?;
        let stream = match tokio::time::timeout(within, rx).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) => return Err(io::Error::other("the listener stopped")),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no direct connection within {within:?}"),
                ));
            }
        };
        Channel::new(stream, &self.keys, Side::Accepter)
    }
}

async fn accept_loop(listener: TcpListener, pending: Pending) {
    // One source gets its share of the handshakes, never all of them.
    let handshakes = Slots::new(MAX_HANDSHAKES, MAX_HANDSHAKES_PER_IP);
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: give the system a moment rather than spin.
                tracing::debug!("direct listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = handshakes.try_enter(from.ip()) else {
            continue;
        };
        let pending = pending.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut stream = stream;
            let mut token = [0u8; TOKEN];
            if !matches!(
                tokio::time::timeout(HANDSHAKE, stream.read_exact(&mut token)).await,
                Ok(Ok(_))
            ) {
                return;
            }
            let waiting = lock(&pending).remove(&token);
            if let Some(tx) = waiting {
                let _ = tx.send(stream);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::io::AsyncWriteExt as _;

    use super::*;
    use crate::direct::{connect, ips};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_offer_connects_once_both_ways_and_a_wrong_token_gets_nothing() {
        let listener = Listener::bind(IpAddr::from([127, 0, 0, 1])).unwrap();
        let (offer, expected) = listener.expect(PeerId::random()).unwrap();
        // A stranger with a made-up token is closed and takes nothing.
        let mut stranger = TcpStream::connect(listener.addr()).await.unwrap();
        stranger.write_all(&[0u8; TOKEN]).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(stranger.read(&mut b).await.unwrap(), 0);

        let ips = ips(&["/ip4/127.0.0.1/tcp/1".parse().unwrap()]);
        let dial = tokio::spawn(async move {
            let ch = connect(&ips, &offer, Duration::from_secs(5)).await.unwrap();
            let (mut r, mut w) = ch.into_split();
            w.write_all(b"ping").await.unwrap();
            w.close().await.unwrap();
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        });
        let ch = expected.accept(Duration::from_secs(5)).await.unwrap();
        let (mut r, mut w) = ch.into_split();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        w.write_all(b"pong").await.unwrap();
        w.close().await.unwrap();
        assert_eq!(dial.await.unwrap(), b"pong");
        // The token is spent.
        assert!(lock(&listener.pending).is_empty());
    }

    /// One source address that opens connections and sends nothing holds only its share of
    /// the handshakes: a peer from another address still gets its channel (before, 64 idle
    /// connections from anyone held every slot for the handshake time).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_from_one_address_do_not_block_the_others() {
        let listener = Listener::bind(IpAddr::from([0, 0, 0, 0])).unwrap();
        let port = listener.addr().port();
        let mut idle = Vec::new();
        for _ in 0..MAX_HANDSHAKES {
            idle.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        }
        let (offer, expected) = listener.expect(PeerId::random()).unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut honest = socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
        honest.write_all(&offer.token).await.unwrap();
        let channel = expected.accept(Duration::from_secs(3)).await;
        assert!(channel.is_ok(), "{:?}", channel.err());
        drop(idle);
    }

    /// One peer asking for channel after channel holds its share of the offers; another
    /// peer still gets one, and a withdrawn offer's place comes back.
    #[tokio::test]
    async fn one_peer_cannot_take_every_offer() {
        let listener = Listener::bind(IpAddr::from([127, 0, 0, 1])).unwrap();
        let greedy = PeerId::random();
        let mut held: Vec<Expected> = (0..MAX_PENDING_PER_PEER)
            .map(|_| listener.expect(greedy).unwrap().1)
            .collect();
        assert!(listener.expect(greedy).is_none());
        assert!(listener.expect(PeerId::random()).is_some());
        held.pop();
        assert!(listener.expect(greedy).is_some());
    }

    #[tokio::test]
    async fn a_withdrawn_offer_is_forgotten_and_an_unanswered_one_times_out() {
        let listener = Listener::bind(IpAddr::from([127, 0, 0, 1])).unwrap();
        let (_, expected) = listener.expect(PeerId::random()).unwrap();
        drop(expected);
        assert!(lock(&listener.pending).is_empty());
        let (_, expected) = listener.expect(PeerId::random()).unwrap();
        let e = expected
            .accept(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(lock(&listener.pending).is_empty());
    }
}
