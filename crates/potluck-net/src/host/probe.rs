//! Bandwidth probes (`/potluck/probe/2`): [`Host::probe`] sends bytes to a peer and times
//! them until it confirms, over a direct channel where both can open one; every host answers
//! others' probes, a few at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};

use super::swarm::is_relayed;
use super::{Error, Host, Incoming};
use crate::direct;
use crate::frame::{read_message, write_message};

/// Bulk bandwidth probes: the dialer says how many bytes it will send and whether it can open
/// a direct channel ([`ProbeHello`]); the listener answers with a direct-channel offer or none;
/// then (on the direct channel where one connected, see [`direct::choose`]) the dialer sends
/// the bytes and the listener answers with their count (`u64` little-endian) once it has read
/// them all.
pub const PROBE: &str = "/potluck/probe/2";

/// What a probe's dialer says first.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct ProbeHello {
    pub bytes: u64,
    pub direct: bool,
}

/// Largest control message of a probe (hello, offer).
const MAX_PROBE_CONTROL: usize = 256;

/// The largest probe a host answers.
pub const MAX_PROBE: u64 = 1 << 30;

/// A probe's outcome.
#[derive(Debug, Clone)]
pub struct Probe {
    pub bytes: u64,
    pub elapsed: Duration,
    /// Whether every connection to the peer went through a relay.
    pub relayed: bool,
}

impl Probe {
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl Host {
    /// Sends `bytes` to `peer` over a bulk stream and times it until the peer confirms.
    pub async fn probe(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        bytes: u64,
        deadline: Duration,
    ) -> Result<Probe, Error> {
        self.probe_via(peer, addrs, bytes, deadline, true).await
    }

    /// The rate of the path to `peer` (bulk bytes each way per second, over a direct channel
    /// where `direct` and one connects): probes that grow from 1 MiB until one takes at least
    /// a quarter of `target` (short probes measure the connection's start, not its rate: 4 MiB
    /// over loopback measured a fifth of the real rate). The last probe's outcome.
    pub async fn measure(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        target: Duration,
        deadline: Duration,
        direct: bool,
    ) -> Result<Probe, Error> {
        self.measure_at_most(peer, addrs, target, deadline, direct, MAX_PROBE)
            .await
    }

    /// [`Host::measure`] with probes of at most `max` bytes (a rate beyond `4 · max / target`
    /// is measured as that: a volunteer's link is far below it, and a loopback or a LAN is not
    /// worth a gigabyte to learn it is fast).
    pub async fn measure_at_most(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        target: Duration,
        deadline: Duration,
        direct: bool,
        max: u64,
    ) -> Result<Probe, Error> {
        let max = max.clamp(1 << 20, MAX_PROBE);
        let until = Instant::now() + deadline;
        let mut bytes = 1u64 << 20;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let probe = self
                .probe_via(peer, addrs.clone(), bytes, left, direct)
                .await?;
            let took = probe.elapsed.as_secs_f64().max(1e-6);
            if took >= target.as_secs_f64() / 4.0 || bytes >= max {
                return Ok(probe);
            }
            let grow = (target.as_secs_f64() / took).clamp(2.0, 64.0);
            bytes = ((bytes as f64 * grow) as u64).min(max);
        }
    }

    /// [`Host::probe`], over a direct channel where both hosts can open one (`direct`), else
    /// over the libp2p stream.
    pub async fn probe_via(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        bytes: u64,
        deadline: Duration,
        direct: bool,
    ) -> Result<Probe, Error> {
        use futures::{AsyncReadExt, AsyncWriteExt};
        let failed = |e: std::io::Error| Error::Stream {
            peer,
            reason: e.to_string(),
        };
        let mut stream = self
            .open_stream(peer, addrs.clone(), PROBE, deadline)
            .await?;
        // How we are connected as the probe starts (dcutr may add a direct connection while
        // it runs; the stream stays where it was opened).
        let connections = self.connections(peer).await?;
        let relayed = !connections.is_empty() && connections.iter().all(is_relayed);
        let hello = ProbeHello {
            bytes,
            direct: direct && self.wants_direct(peer),
        };
        let setup = async {
            write_message(&mut stream, &hello).await?;
            let offer: Option<direct::Offer> = read_message(&mut stream, MAX_PROBE_CONTROL).await?;
            match offer {
                Some(offer) => self.choose_direct(stream, peer, &offer).await,
                None => Ok(direct::Bulk::Stream(stream)),
            }
        };
        let timed_out = |_| Error::Timeout {
            peer,
            after: deadline,
        };
        let bulk = tokio::time::timeout(deadline, setup)
            .await
            .map_err(timed_out)?
            .map_err(failed)?;
        let (mut reader, mut writer) = bulk.into_split();
        let started = Instant::now();
        let send = async {
            let chunk = vec![0x5au8; 256 << 10];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                writer.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
            writer.flush().await?;
            let mut answer = [0u8; 8];
            reader.read_exact(&mut answer).await?;
            Ok::<u64, std::io::Error>(u64::from_le_bytes(answer))
        };
        let confirmed = tokio::time::timeout(deadline, send)
            .await
            .map_err(timed_out)?
            .map_err(failed)?;
        let elapsed = started.elapsed();
        if confirmed != bytes {
            return Err(Error::Stream {
                peer,
                reason: format!("sent {bytes} bytes, the peer confirmed {confirmed}"),
            });
        }
        Ok(Probe {
            bytes,
            elapsed,
            relayed,
        })
    }
}

/// Answers bandwidth probes, `max` at a time; a probe that stalls for 30 s is dropped.
pub(super) async fn serve_probes(
    mut incoming: Incoming,
    max: usize,
    direct: Option<Arc<direct::Listener>>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    while let Some((peer, stream)) = incoming.next().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("dropping a probe from {peer}: {max} already running");
            continue;
        };
        let direct = direct.clone();
        tokio::spawn(async move {
            if let Err(e) = answer_probe(peer, stream, direct.as_deref()).await {
                tracing::debug!("probe from {peer} failed: {e}");
            }
            drop(slot);
        });
    }
}

async fn answer_probe(
    peer: PeerId,
    mut stream: libp2p::Stream,
    listener: Option<&direct::Listener>,
) -> std::io::Result<()> {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let stall = Duration::from_secs(30);
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "probe stalled");
    let hello: ProbeHello =
        tokio::time::timeout(stall, read_message(&mut stream, MAX_PROBE_CONTROL))
            .await
            .map_err(|_| timed_out())??;
    let n = hello.bytes;
    if n > MAX_PROBE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("probe of {n} bytes over the limit of {MAX_PROBE}"),
        ));
    }
    let offer = listener
        .filter(|_| hello.direct)
        .and_then(|l| l.expect(peer));
    let bulk = match offer {
        Some((offer, expected)) => {
            write_message(&mut stream, &Some(offer)).await?;
            direct::chosen(stream, expected).await?
        }
        None => {
            write_message(&mut stream, &None::<direct::Offer>).await?;
            direct::Bulk::Stream(stream)
        }
    };
    let (mut reader, mut writer) = bulk.into_split();
    let mut buf = vec![0u8; 256 << 10];
    let mut left = n;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let got = tokio::time::timeout(stall, reader.read(&mut buf[..want]))
            .await
            .map_err(|_| timed_out())??;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        left -= got as u64;
    }
    writer.write_all(&n.to_le_bytes()).await?;
    writer.close().await
}
