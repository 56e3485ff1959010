//! Direct channels: bulk bytes between two peers over a TCP connection of their own, sealed
//! with AES-256-GCM under keys the two agreed over an authenticated libp2p stream.
//!
//! Why: a libp2p stream costs every byte noise's ChaCha20-Poly1305, yamux's framing and the
//! copies between them, about 1.8 CPU-seconds per GB for both ends (docs/BENCHMARKS.md); on
//! fast links that, not the link, bounds an all-reduce. A direct channel costs one AES-GCM pass
//! (hardware-accelerated on x86-64 and ARMv8) and one copy each way, in records of up to 1 MiB.
//!
//! How (`/potluck/allreduce/2` uses it; docs/PROTOCOL.md):
//! 1. The accepting side calls [`Listener::expect`] and sends the [`Offer`] (port, one-time
//!    token, one fresh key per direction) over the libp2p stream, which noise already
//!    authenticates and encrypts: only the peer it was sent to knows the keys.
//! 2. The dialing side calls [`connect`] with the offer: a TCP connection to the port, the
//!    token as its first 16 bytes, then records.
//! 3. It says on the stream which way it goes ([`Via`]); [`choose`] and [`chosen`] do steps 2
//!    and 3 on each side and give a [`Bulk`] channel: the direct one, or the stream where no
//!    direct connection could be made. [`Bulk::into_split`] gives a futures
//!    [`AsyncRead`](futures::AsyncRead) and [`AsyncWrite`](futures::AsyncWrite) half.
//!
//! A record is a `u32` little-endian length (at most [`MAX_RECORD`] + 16), then the sealed
//! bytes with their 16-byte tag; the nonce is the record's number in its direction, so
//! records cannot be dropped, reordered, replayed or reflected without the next one failing to
//! open. An empty record ends the stream (closing the writer sends it): a connection that ends
//! without it was cut, and the reader says so. Anyone can connect to the port, but a connection
//! that does not present a live token within [`HANDSHAKE`] is closed, at most
//! [`MAX_HANDSHAKES`] are read at once ([`MAX_HANDSHAKES_PER_IP`] from one address, so one
//! source cannot hold them all), and at most [`MAX_PENDING`] offers wait at once, [`MAX_PENDING_PER_PEER`] of them for one peer.
//!
//! Where a direct connection cannot be made (a NAT, a relay, a firewall) the caller stays on
//! its libp2p stream; nothing else changes.
//!
//! - `offer`: the offer (port, token, keys) and connecting with it;
//! - `listener`: the port that takes connections and matches them to offers;
//! - `records`: the sealed channel, its record layer;
//! - `pacing`: how fast a channel's writer may send.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::frame::{read_message, write_message};

pub use listener::{Expected, Listener};
pub use offer::{Offer, connect, ips};
pub use pacing::Pacing;
pub use records::{Channel, LINGER, Reader, Records, Writer};

mod listener;
mod offer;
mod pacing;
mod records;

/// Plaintext bytes in one record, at most.
pub const MAX_RECORD: usize = 1 << 20;
/// How long a new connection has to present its token.
pub const HANDSHAKE: Duration = Duration::from_secs(5);
/// Connections read for their token at once, at most (more are closed at once).
pub const MAX_HANDSHAKES: usize = 64;
/// Of those, from one source address at most (honest peers open one channel at a time per
/// round).
pub const MAX_HANDSHAKES_PER_IP: usize = 4;
/// Offers waiting for their connection at once, at most.
pub const MAX_PENDING: usize = 1024;
/// Of those, made to one peer at most (a member opens a channel to each reducer of a round,
/// and a probe one).
pub const MAX_PENDING_PER_PEER: usize = 16;
/// How long the offered side tries to connect (each address) before it stays on the stream.
pub const CONNECT: Duration = Duration::from_secs(3);

const TAG: usize = 16;
const HEADER: usize = 4;
const TOKEN: usize = 16;
const KEY: usize = 32;

/// The offered side's choice, sent on the stream after it tried to connect.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum Via {
    Direct,
    Stream,
}

/// A bulk channel to a peer: its libp2p stream, or the direct channel that replaced it.
#[derive(Debug)]
pub enum Bulk {
    Stream(libp2p::Stream),
    /// Boxed: two AES key schedules make it large.
    Direct(Box<Channel>),
}

/// The reading half of a [`Bulk`] channel.
pub type BoxReader = Box<dyn futures::AsyncRead + Send + Unpin>;
/// The writing half of a [`Bulk`] channel.
pub type BoxWriter = Box<dyn futures::AsyncWrite + Send + Unpin>;

impl Bulk {
    /// The reading and the writing half.
    pub fn into_split(self) -> (BoxReader, BoxWriter) {
        match self {
            Bulk::Stream(stream) => {
                let (r, w) = futures::AsyncReadExt::split(stream);
                (Box::new(r), Box::new(w))
            }
            Bulk::Direct(channel) => {
                let (r, w) = (*channel).into_split();
                (Box::new(r), Box::new(w))
            }
        }
    }

    /// Whether the bytes go over a direct channel.
    pub fn is_direct(&self) -> bool {
        matches!(self, Bulk::Direct(_))
    }

    /// A handle on how fast it sends (direct channels only).
    pub fn pacing(&self) -> Option<Pacing> {
        match self {
            Bulk::Direct(channel) => Some(channel.pacing()),
            Bulk::Stream(_) => None,
        }
    }
}

/// The offered side, after it received `offer` on `stream`: connects a direct channel at `ips`
/// ([`CONNECT`] each) and says on the stream whether it did; the channel to use.
pub async fn choose(mut stream: libp2p::Stream, ips: &[IpAddr], offer: &Offer) -> io::Result<Bulk> {
    match connect(ips, offer, CONNECT).await {
        Ok(channel) => {
            write_message(&mut stream, &Via::Direct).await?;
            Ok(Bulk::Direct(Box::new(channel)))
        }
        Err(e) => {
            tracing::debug!("no direct channel ({e}): staying on the stream");
            write_message(&mut stream, &Via::Stream).await?;
            Ok(Bulk::Stream(stream))
        }
    }
}

/// The offering side, after it sent the offer of `expected` on `stream`: reads the peer's
/// choice and gives the channel chosen (an error if the peer says nothing in time, or chose a
/// direct channel that did not come).
pub async fn chosen(mut stream: libp2p::Stream, expected: Expected) -> io::Result<Bulk> {
    let within = CONNECT * 2 + HANDSHAKE;
    let via = tokio::time::timeout(within, read_message::<Via>(&mut stream, 16))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the peer did not choose"))??;
    match via {
        Via::Stream => Ok(Bulk::Stream(stream)),
        Via::Direct => Ok(Bulk::Direct(Box::new(expected.accept(HANDSHAKE).await?))),
    }
}
