//! The libp2p host, in-process: a swarm (TCP + noise + yamux and QUIC, or libp2p's in-memory
//! transport for tests; identify, ping, connection limits, autonat, relay v2 server and client,
//! dcutr hole punching, the request–response protocol it is given and bulk byte streams)
//! driven by one task, and a [`Host`] handle that talks to it over a bounded channel.
//!
//! Inbound requests are answered by an [`Inbound`] handler (the DHT), which also says what the
//! requests are: the host carries their bytes; outbound ones are [`Host::rpc`], each with its
//! own deadline, so nothing waits forever on a peer.
//!
//! Reachability: with [`ClientMode::Auto`] a host serves until autonat finds it unreachable;
//! then it switches to client mode by itself (it stops advertising [`SERVING`], so peers drop it
//! from their routing tables) and reserves slots on up to two relays among its peers, whose
//! circuit addresses it then listens on; dcutr upgrades relayed connections to direct ones
//! where the NATs allow.
//!
//! - `config`: how a host is set up ([`Config`]);
//! - `swarm`: the swarm's behaviours and transports;
//! - `task`: the task that drives the swarm, serving the handles' commands;
//! - `requests`: the request–response protocol carried ([`Rpc`]), its [`Inbound`] handler;
//! - `incoming`: inbound streams, gated ([`Incoming`]);
//! - `channels`: direct channels ([`crate::direct`]) from the host's side;
//! - `probe`: bandwidth probes ([`Host::probe`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId, StreamProtocol};
use potluck_core::lock;
use tokio::sync::{mpsc, oneshot};

use crate::auth::{self, Gate, Role};
use crate::direct;

pub use channels::DIRECT_RETRY;
pub use config::{ClientMode, Config, RelayLimits, Security, Transports};
pub use incoming::Incoming;
pub use probe::{MAX_PROBE, PROBE, Probe, ProbeHello};
pub use requests::{Inbound, NoDht, Rpc};

mod channels;
mod config;
mod incoming;
mod probe;
mod requests;
mod swarm;
mod task;

/// What autonat concluded about this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Not probed yet, or no peer could probe.
    Unknown,
    /// Others reached us at one of our addresses.
    Public,
    /// Others could not reach us: behind a NAT or a firewall.
    Private,
}

/// This host's view of its own reachability.
#[derive(Debug, Clone)]
pub struct Reachability {
    pub nat: Nat,
    /// Advertising [`SERVING`] (not in client mode).
    pub serving: bool,
    /// Circuit addresses reserved on relays.
    pub relay_addrs: Vec<Multiaddr>,
    /// Relayed connections that dcutr upgraded to direct ones.
    pub hole_punches: u64,
    /// Hole punches that failed.
    pub hole_punch_failures: u64,
    /// Reachability probes of this host that a peer answered (dialed back or not).
    pub nat_probes: u64,
}

/// Shared between the host task and its handles.
#[derive(Debug)]
struct Status {
    serving: AtomicBool,
    nat: Mutex<Nat>,
    relay_addrs: Mutex<Vec<Multiaddr>>,
    punched: AtomicU64,
    punch_failed: AtomicU64,
    nat_probes: AtomicU64,
    /// Requests refused for their peer's rate, and peers banned for flooding.
    refused: AtomicU64,
    bans: AtomicU64,
}

/// The protocol a serving host advertises (through identify); a client host does not, so
/// nobody puts it in a routing table. Nothing is ever sent on it.
pub const SERVING: &str = "/potluck/serving/1";

/// Errors of the host.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("could not build the host: {0}")]
    Build(String),
    #[error("could not listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("request to {peer} failed: {reason}")]
    Rpc { peer: PeerId, reason: String },
    #[error("request to {peer} timed out after {after:?}")]
    Timeout { peer: PeerId, after: Duration },
    #[error("could not dial {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    #[error("stream to {peer} failed: {reason}")]
    Stream { peer: PeerId, reason: String },
    #[error("protocol {0} is already accepted by someone else")]
    AlreadyAccepted(String),
    #[error("the host has stopped")]
    Stopped,
    #[error("{peer} did not admit this peer to the run: {reason}")]
    NotAdmitted { peer: PeerId, reason: String },
}

enum Command {
    Rpc {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, Error>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Connect {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Connections {
        peer: PeerId,
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Disconnect {
        peer: PeerId,
    },
    /// The auth handshake admitted `peer`: what identify said of it may be used now.
    Admitted {
        peer: PeerId,
    },
    /// Present our (renewed) token to every connected peer.
    Present,
}

/// A handle to a running host; cloning shares it. Dropping every handle stops the host.
#[derive(Clone)]
pub struct Host {
    peer: PeerId,
    commands: mpsc::Sender<Command>,
    streams: libp2p_stream::Control,
    status: Arc<Status>,
    direct: Option<Arc<direct::Listener>>,
    /// Direct channels are on and the transport is TCP: this host can open them.
    opens_direct: bool,
    /// Peers a direct channel to failed lately, and when (their offers are not tried again for
    /// [`DIRECT_RETRY`]: each try costs up to [`direct::CONNECT`]).
    direct_failed: Arc<Mutex<HashMap<PeerId, Instant>>>,
    gate: Option<Arc<Gate>>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("peer", &self.peer).finish()
    }
}

impl From<auth::handshake::Outcome> for Command {
    fn from(outcome: auth::handshake::Outcome) -> Command {
        match outcome {
            auth::handshake::Outcome::Admitted(peer) => Command::Admitted { peer },
            auth::handshake::Outcome::Refused(peer) => Command::Disconnect { peer },
        }
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Rpc { peer, .. } => write!(f, "Rpc({peer})"),
            Command::Dial { addr, .. } => write!(f, "Dial({addr})"),
            Command::Connect { peer, .. } => write!(f, "Connect({peer})"),
            Command::Connections { peer, .. } => write!(f, "Connections({peer})"),
            Command::ListenAddrs { .. } => f.write_str("ListenAddrs"),
            Command::Disconnect { peer } => write!(f, "Disconnect({peer})"),
            Command::Admitted { peer } => write!(f, "Admitted({peer})"),
            Command::Present => f.write_str("Present"),
        }
    }
}

impl Host {
    /// Starts a host on the current tokio runtime; inbound requests go to `inbound`. Returns
    /// once it listens on every address of `cfg.listen` (a circuit address: once the relay
    /// granted the reservation).
    pub async fn start<I: Inbound>(cfg: Config, inbound: Arc<I>) -> Result<Host, Error> {
        let mut swarm = swarm::build_swarm(&cfg, inbound.rpc())?;
        let listening = swarm::listen(&mut swarm, &cfg.listen).await?;
        if cfg.client_mode == ClientMode::Off {
            // Known reachable: our listen addresses are our external ones (a relay serves
            // only with a confirmed external address).
            for addr in listening.iter().filter(|a| !swarm::is_relayed(a)) {
                swarm.add_external_address(addr.clone());
            }
        }
        let direct = match cfg.transports {
            Transports::Network if cfg.direct => channels::direct_listener(&listening),
            _ => None,
        };
        let peer = *swarm.local_peer_id();
        let mut streams = swarm.behaviour().streams.new_control();
        let serving = cfg.client_mode != ClientMode::On;
        let status = Arc::new(Status {
            serving: AtomicBool::new(serving),
            nat: Mutex::new(Nat::Unknown),
            relay_addrs: Mutex::new(
                listening
                    .iter()
                    .filter(|a| swarm::is_relayed(a))
                    .cloned()
                    .collect(),
            ),
            punched: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bans: AtomicU64::new(0),
            punch_failed: AtomicU64::new(0),
            nat_probes: AtomicU64::new(0),
        });
        let marker = if serving {
            Some(incoming::accept(&mut streams, SERVING)?)
        } else {
            None
        };
        let (tx, rx) = mpsc::channel(1024);
        let probes = Incoming::new(
            incoming::accept(&mut streams, PROBE)?,
            cfg.auth.clone(),
            |_| true,
        );
        tokio::spawn(probe::serve_probes(probes, cfg.max_probes, direct.clone()));
        if let Some(gate) = &cfg.auth {
            let handshakes = incoming::accept(&mut streams, auth::PROTOCOL)?;
            tokio::spawn(auth::handshake::serve(handshakes, gate.clone(), tx.clone()));
        }
        inbound.serving(serving);
        let task = task::Task::new(
            swarm,
            inbound,
            &cfg,
            listening,
            status.clone(),
            marker,
            streams.clone(),
        );
        tokio::spawn(task.run(rx));
        Ok(Host {
            peer,
            commands: tx,
            streams,
            status,
            direct,
            opens_direct: cfg.direct && matches!(cfg.transports, Transports::Network),
            direct_failed: Arc::default(),
            gate: cfg.auth,
        })
    }

    /// This host's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// What this host knows of its own reachability.
    pub fn reachability(&self) -> Reachability {
        Reachability {
            nat: *lock(&self.status.nat),
            serving: self.status.serving.load(Ordering::Relaxed),
            relay_addrs: lock(&self.status.relay_addrs).clone(),
            hole_punches: self.status.punched.load(Ordering::Relaxed),
            hole_punch_failures: self.status.punch_failed.load(Ordering::Relaxed),
            nat_probes: self.status.nat_probes.load(Ordering::Relaxed),
        }
    }

    /// Requests refused because their peer sent over its rate, and peers banned for flooding,
    /// since the start.
    pub fn refusals(&self) -> (u64, u64) {
        (
            self.status.refused.load(Ordering::Relaxed),
            self.status.bans.load(Ordering::Relaxed),
        )
    }

    /// Sends a command whose answer comes back on the channel it is built with, and waits at
    /// most `deadline` for it (`None`: too late).
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
        deadline: Duration,
    ) -> Result<Option<T>, Error> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| Error::Stopped)?;
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(answer)) => Ok(Some(answer)),
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Ok(None),
        }
    }

    /// Sends `request` (a frame of the protocol this host carries, see [`Rpc`]) to `peer`
    /// (dialing `addrs` if not connected) and waits at most `deadline` for the answer's frame.
    pub async fn rpc(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Vec<u8>,
        deadline: Duration,
    ) -> Result<Vec<u8>, Error> {
        let started = Instant::now();
        let addrs = match &self.gate {
            Some(_) => {
                self.connect(peer, addrs, deadline).await?;
                self.admitted(peer, deadline.saturating_sub(started.elapsed()))
                    .await?;
                Vec::new()
            }
            None => addrs,
        };
        let deadline = deadline.saturating_sub(started.elapsed());
        let rpc = |reply| Command::Rpc {
            peer,
            addrs,
            request,
            reply,
        };
        self.ask(rpc, deadline)
            .await?
            .unwrap_or(Err(Error::Timeout {
                peer,
                after: deadline,
            }))
    }

    /// Dials an address (e.g. an initial peer) and waits until connected.
    pub async fn dial(&self, addr: Multiaddr, deadline: Duration) -> Result<(), Error> {
        let dial = |reply| Command::Dial {
            addr: addr.clone(),
            reply,
        };
        self.ask(dial, deadline).await?.unwrap_or_else(|| {
            Err(Error::Dial {
                addr: addr.clone(),
                reason: format!("no connection within {deadline:?}"),
            })
        })
    }

    /// Makes sure there is a connection to `peer` (dialing `addrs`, which may be circuit
    /// addresses through a relay, when there is none).
    ///
    /// Two peers that dial each other at the same moment from their listen ports (TCP port
    /// reuse, which hole punching needs) can meet in one TCP simultaneous open where both act
    /// as the initiator and the security handshake fails: a failed dial is retried after a
    /// random pause (a connection the other side made meanwhile is then used).
    pub async fn connect(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        deadline: Duration,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_sub(started.elapsed());
            let connect = |reply| Command::Connect {
                peer,
                addrs: addrs.clone(),
                reply,
            };
            let result = self
                .ask(connect, left)
                .await?
                .unwrap_or(Err(Error::Timeout {
                    peer,
                    after: deadline,
                }));
            attempt += 1;
            let pause = Duration::from_millis(rand::random_range(10..150));
            match result {
                Err(Error::Rpc { .. }) if attempt < 4 && started.elapsed() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                }
                result => return result,
            }
        }
    }

    /// The remote addresses of the connections to `peer` now.
    pub async fn connections(&self, peer: PeerId) -> Result<Vec<Multiaddr>, Error> {
        let connections = |reply| Command::Connections { peer, reply };
        Ok(self
            .ask(connections, Duration::from_secs(10))
            .await?
            .unwrap_or_default())
    }

    /// Opens a bulk byte stream to `peer` on `protocol` (connecting first, within `deadline`).
    /// Yamux's flow control gives backpressure: a writer waits while the reader lags.
    pub async fn open_stream(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        protocol: &'static str,
        deadline: Duration,
    ) -> Result<libp2p::Stream, Error> {
        let started = Instant::now();
        self.connect(peer, addrs, deadline).await?;
        if self.gate.is_some() {
            self.admitted(peer, deadline.saturating_sub(started.elapsed()))
                .await?;
        }
        let left = deadline.saturating_sub(started.elapsed());
        let mut control = self.streams.clone();
        match tokio::time::timeout(
            left,
            control.open_stream(peer, StreamProtocol::new(protocol)),
        )
        .await
        {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(Error::Stream {
                peer,
                reason: e.to_string(),
            }),
            Err(_) => Err(Error::Timeout {
                peer,
                after: deadline,
            }),
        }
    }

    /// Inbound streams on `protocol`, with the peer that opened each. Streams that arrive
    /// while the previous one has not been taken are dropped (bounded, never queued); in an
    /// authorized run, so are streams of peers not admitted.
    pub fn accept(&self, protocol: &'static str) -> Result<Incoming, Error> {
        self.accept_from(protocol, |_| true)
    }

    /// [`Host::accept`] for peers whose role passes `allow` (in an open run: everyone).
    pub fn accept_from(
        &self,
        protocol: &'static str,
        allow: fn(Role) -> bool,
    ) -> Result<Incoming, Error> {
        let inner = incoming::accept(&mut self.streams.clone(), protocol)?;
        Ok(Incoming::new(inner, self.gate.clone(), allow))
    }

    /// The run's gate, in an authorized run.
    pub fn gate(&self) -> Option<&Arc<Gate>> {
        self.gate.as_ref()
    }

    /// Presents a renewed token from now on, to the peers connected now too (before the old
    /// one expires, so that they keep admitting this host).
    pub async fn renew_token(&self, token: auth::Token) -> Result<(), Error> {
        if let Some(gate) = &self.gate {
            gate.set_token(token);
            self.commands
                .send(Command::Present)
                .await
                .map_err(|_| Error::Stopped)?;
        }
        Ok(())
    }

    /// Waits until `peer` and this host admitted each other (authorized runs).
    async fn admitted(&self, peer: PeerId, deadline: Duration) -> Result<(), Error> {
        let Some(gate) = &self.gate else {
            return Ok(());
        };
        gate.wait_ready(peer, deadline)
            .await
            .map_err(|refused| Error::NotAdmitted {
                peer,
                reason: refused.unwrap_or_else(|| format!("no answer within {deadline:?}")),
            })
    }

    /// The addresses this host listens on (relay circuit addresses included).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, Error> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::ListenAddrs { reply })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Closes every connection to `peer`.
    pub async fn disconnect(&self, peer: PeerId) {
        let _ = self.commands.send(Command::Disconnect { peer }).await;
    }
}
