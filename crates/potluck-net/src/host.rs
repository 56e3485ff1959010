//! The libp2p host, in-process: a swarm (TCP + noise + yamux and QUIC, or libp2p's in-memory
//! transport for tests; identify, ping, connection limits, and `/potluck/dht/1` over
//! request–response) driven by one task, and a [`Host`] handle that talks to it over a bounded
//! channel.
//!
//! Inbound requests are answered by an [`Inbound`] handler (the DHT); outbound ones are
//! [`Host::rpc`], each with its own deadline, so nothing waits forever on a peer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, Transport, connection_limits, identify, noise, ping,
    tcp, yamux,
};
use tokio::sync::{mpsc, oneshot};

use crate::dht::wire::{self, Request, Response};

/// Which transports a host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transports {
    /// TCP (noise, yamux) and QUIC: real networks.
    Network,
    /// libp2p's in-memory transport (noise, yamux): many nodes in one process, no ports.
    Memory,
}

/// How a host is set up.
#[derive(Debug, Clone)]
pub struct Config {
    pub keypair: Keypair,
    pub transports: Transports,
    /// Addresses to listen on (none: dial out only).
    pub listen: Vec<Multiaddr>,
    /// Serve `/potluck/dht/1` to others (false: client mode, we only ask).
    pub serve: bool,
    /// Hard cap on one request's time; each call also has its own, shorter deadline.
    pub request_timeout: Duration,
    /// Established connections at most, in all and per peer.
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// Connections stay open this long without traffic.
    pub idle_timeout: Duration,
}

impl Config {
    /// Defaults for `keypair` on `transports`.
    pub fn new(keypair: Keypair, transports: Transports) -> Config {
        Config {
            keypair,
            transports,
            listen: Vec::new(),
            serve: true,
            request_timeout: Duration::from_secs(10),
            max_connections: 512,
            max_connections_per_peer: 4,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

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
    #[error("the host has stopped")]
    Stopped,
}

/// Who answers inbound requests, and hears what identify learns.
pub trait Inbound: Send + Sync + 'static {
    /// The answer to `request` from `peer`.
    fn request(&self, peer: PeerId, request: Request) -> Response;
    /// `peer` told us its listen addresses and protocols.
    fn identified(&self, peer: PeerId, addrs: Vec<Multiaddr>, serves_dht: bool);
}

/// The request–response codec of `/potluck/dht/1`: a length-prefixed postcard message, the
/// length checked before anything is read.
#[derive(Debug, Clone, Default)]
struct Codec;

async fn read_frame<T: futures::AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> std::io::Result<Vec<u8>> {
    use futures::AsyncReadExt;
    let mut prefix = Vec::with_capacity(5);
    loop {
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await?;
        prefix.push(b[0]);
        if b[0] & 0x80 == 0 {
            break;
        }
        if prefix.len() == 5 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "bad length prefix",
            ));
        }
    }
    let (len, _) = wire::read_len(&prefix)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if len > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes over the limit of {limit}"),
        ));
    }
    let mut frame = prefix;
    let start = frame.len();
    frame.resize(start + len, 0);
    io.read_exact(&mut frame[start..]).await?;
    Ok(frame)
}

async fn write_frame<T: futures::AsyncWrite + Unpin + Send>(
    io: &mut T,
    frame: &[u8],
) -> std::io::Result<()> {
    use futures::AsyncWriteExt;
    io.write_all(frame).await?;
    io.close().await
}

impl request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Request>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let frame = read_frame(io, wire::MAX_REQUEST).await?;
        Request::decode(&frame).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Response>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let frame = read_frame(io, wire::MAX_RESPONSE).await?;
        Response::decode(&frame)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &wire::encode(&req)).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &wire::encode(&res)).await
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    dht: request_response::Behaviour<Codec>,
}

enum Command {
    Rpc {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
        reply: oneshot::Sender<Result<Response, Error>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Disconnect {
        peer: PeerId,
    },
}

/// A handle to a running host; cloning shares it. Dropping every handle stops the host.
#[derive(Debug, Clone)]
pub struct Host {
    peer: PeerId,
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Rpc { peer, .. } => write!(f, "Rpc({peer})"),
            Command::Dial { addr, .. } => write!(f, "Dial({addr})"),
            Command::ListenAddrs { .. } => f.write_str("ListenAddrs"),
            Command::Disconnect { peer } => write!(f, "Disconnect({peer})"),
        }
    }
}

fn build_swarm(cfg: &Config) -> Result<Swarm<Behaviour>, Error> {
    let protocol = StreamProtocol::new(wire::PROTOCOL);
    let support = if cfg.serve {
        ProtocolSupport::Full
    } else {
        ProtocolSupport::Outbound
    };
    let rr_config = request_response::Config::default()
        .with_request_timeout(cfg.request_timeout)
        .with_max_concurrent_streams(256);
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(cfg.max_connections))
        .with_max_established_per_peer(Some(cfg.max_connections_per_peer))
        .with_max_pending_incoming(Some(cfg.max_connections / 2 + 1));
    let behaviour = |key: &Keypair| Behaviour {
        limits: connection_limits::Behaviour::new(limits),
        identify: identify::Behaviour::new(identify::Config::new(
            "/potluck/1".into(),
            key.public(),
        )),
        ping: ping::Behaviour::new(ping::Config::new()),
        dht: request_response::Behaviour::new([(protocol.clone(), support)], rr_config.clone()),
    };
    let build = |e: String| Error::Build(e);
    let idle = cfg.idle_timeout;
    let swarm = match cfg.transports {
        Transports::Network => libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| build(e.to_string()))?
            .with_quic()
            .with_behaviour(behaviour)
            .map_err(|e| build(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
        Transports::Memory => {
            // Noise, as on TCP (measured here: a libp2p-tls handshake costs more, per fresh
            // connection, than noise's).
            let noise = noise::Config::new(&cfg.keypair).map_err(|e| build(e.to_string()))?;
            libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
                .with_tokio()
                .with_other_transport(move |_| {
                    MemoryTransport::default()
                        .upgrade(Version::V1)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                })
                .map_err(|e| build(e.to_string()))?
                .with_behaviour(behaviour)
                .map_err(|e| build(e.to_string()))?
                .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
                .build()
        }
    };
    Ok(swarm)
}

impl Host {
    /// Starts a host on the current tokio runtime; inbound requests go to `inbound`. Returns
    /// once it listens on every address of `cfg.listen`.
    pub async fn start(cfg: Config, inbound: Arc<dyn Inbound>) -> Result<Host, Error> {
        let mut swarm = build_swarm(&cfg)?;
        let mut listening = Vec::new();
        for addr in &cfg.listen {
            swarm.listen_on(addr.clone()).map_err(|e| Error::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        }
        // Wait for the listeners to come up (or fail), so callers can print real addresses.
        while listening.len() < cfg.listen.len() {
            match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await {
                Ok(SwarmEvent::NewListenAddr { address, .. }) => listening.push(address),
                Ok(SwarmEvent::ListenerError { error, .. })
                | Ok(SwarmEvent::ListenerClosed {
                    reason: Err(error), ..
                }) => {
                    return Err(Error::Listen {
                        addr: cfg.listen[listening.len()].clone(),
                        reason: error.to_string(),
                    });
                }
                Ok(_) => {}
                Err(_) => {
                    return Err(Error::Listen {
                        addr: cfg.listen[listening.len()].clone(),
                        reason: "no listener came up in 10 s".into(),
                    });
                }
            }
        }
        let peer = *swarm.local_peer_id();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(run(swarm, rx, inbound, listening));
        Ok(Host { peer, commands: tx })
    }

    /// This host's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer
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

    /// Sends `request` to `peer` (dialing `addrs` if not connected) and waits at most
    /// `deadline` for the answer.
    pub async fn rpc(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
        deadline: Duration,
    ) -> Result<Response, Error> {
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

    /// The addresses this host listens on.
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

/// The host task: owns the swarm, serves commands and events until every handle is gone.
async fn run(
    mut swarm: Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    inbound: Arc<dyn Inbound>,
    mut listening: Vec<Multiaddr>,
) {
    let mut pending: HashMap<
        OutboundRequestId,
        (PeerId, oneshot::Sender<Result<Response, Error>>),
    > = HashMap::new();
    let mut dials: HashMap<
        libp2p::swarm::ConnectionId,
        (Multiaddr, oneshot::Sender<Result<(), Error>>),
    > = HashMap::new();
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { break };
                match command {
                    Command::Rpc { peer, addrs, request, reply } => {
                        let id = swarm.behaviour_mut().dht.send_request_with_addresses(&peer, request, addrs);
                        pending.insert(id, (peer, reply));
                    }
                    Command::Dial { addr, reply } => {
                        let opts = libp2p::swarm::dial_opts::DialOpts::unknown_peer_id().address(addr.clone()).build();
                        let id = opts.connection_id();
                        match swarm.dial(opts) {
                            Ok(()) => { dials.insert(id, (addr, reply)); }
                            Err(e) => { let _ = reply.send(Err(Error::Dial { addr, reason: e.to_string() })); }
                        }
                    }
                    Command::ListenAddrs { reply } => { let _ = reply.send(listening.clone()); }
                    Command::Disconnect { peer } => { let _ = swarm.disconnect_peer_id(peer); }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(BehaviourEvent::Dht(event)) => match event {
                    request_response::Event::Message { peer, message, .. } => match message {
                        request_response::Message::Request { request, channel, .. } => {
                            let response = inbound.request(peer, request);
                            let _ = swarm.behaviour_mut().dht.send_response(channel, response);
                        }
                        request_response::Message::Response { request_id, response } => {
                            if let Some((_, reply)) = pending.remove(&request_id) {
                                let _ = reply.send(Ok(response));
                            }
                        }
                    },
                    request_response::Event::OutboundFailure { request_id, error, peer, .. } => {
                        if let Some((_, reply)) = pending.remove(&request_id) {
                            let _ = reply.send(Err(Error::Rpc { peer, reason: error.to_string() }));
                        }
                    }
                    request_response::Event::InboundFailure { peer, error, .. } => {
                        tracing::debug!("inbound request from {peer} failed: {error}");
                    }
                    request_response::Event::ResponseSent { .. } => {}
                },
                SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                    let serves = info.protocols.iter().any(|p| p.as_ref() == wire::PROTOCOL);
                    inbound.identified(peer_id, info.listen_addrs, serves);
                }
                SwarmEvent::ConnectionEstablished { connection_id, .. } => {
                    if let Some((_, reply)) = dials.remove(&connection_id) {
                        let _ = reply.send(Ok(()));
                    }
                }
                SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                    if let Some((addr, reply)) = dials.remove(&connection_id) {
                        let _ = reply.send(Err(Error::Dial { addr, reason: error.to_string() }));
                    }
                }
                SwarmEvent::NewListenAddr { address, .. } if !listening.contains(&address) => listening.push(address),
                SwarmEvent::ExpiredListenAddr { address, .. } => listening.retain(|a| *a != address),
                _ => {}
            },
        }
    }
}
