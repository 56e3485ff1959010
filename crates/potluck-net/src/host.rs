//! The libp2p host, in-process: a swarm (TCP + noise + yamux and QUIC, or libp2p's in-memory
//! transport for tests; identify, ping, connection limits, autonat, relay v2 server and client,
//! dcutr hole punching, `/potluck/dht/1` over request–response and bulk byte streams) driven by
//! one task, and a [`Host`] handle that talks to it over a bounded channel.
//!
//! Inbound requests are answered by an [`Inbound`] handler (the DHT); outbound ones are
//! [`Host::rpc`], each with its own deadline, so nothing waits forever on a peer.
//!
//! Reachability: with [`ClientMode::Auto`] a host serves until autonat finds it unreachable;
//! then it switches to client mode by itself (it stops advertising [`SERVING`], so peers drop it
//! from their routing tables) and reserves slots on up to two relays among its peers, whose
//! circuit addresses it then listens on; dcutr upgrades relayed connections to direct ones
//! where the NATs allow.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, Transport, allow_block_list, autonat,
    connection_limits, dcutr, identify, noise, ping, relay, tcp, yamux,
};
use potluck_core::lock;
use tokio::sync::{mpsc, oneshot};

use crate::auth::{self, Gate, Role};
use crate::dht::wire::{self, Request, Response};
use crate::direct;
use crate::frame::{read_message, write_message};
use crate::limit::{self, Limiter, Verdict};

/// Which transports a host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transports {
    /// TCP (noise, yamux) and QUIC: real networks.
    Network,
    /// libp2p's in-memory transport (noise, yamux): many nodes in one process, no ports.
    Memory,
}

/// Whether a host serves others (answers the DHT, takes part as a full peer) or only asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMode {
    /// Serve while reachable; autonat decides (an unreachable host becomes a client).
    Auto,
    /// Always a client.
    On,
    /// Always serve (a bootstrap node or a peer known to be reachable).
    Off,
}

impl std::str::FromStr for ClientMode {
    type Err = String;
    fn from_str(s: &str) -> Result<ClientMode, String> {
        match s {
            "auto" => Ok(ClientMode::Auto),
            "on" => Ok(ClientMode::On),
            "off" => Ok(ClientMode::Off),
            _ => Err(format!("client mode `{s}`: use auto, on or off")),
        }
    }
}

/// What a host serving as a relay grants (relay v2). Circuits carry averaging traffic between
/// peers behind NATs when hole punching fails, so they are sized for tensors, not for pings.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    pub max_reservations: usize,
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    pub circuit_duration: Duration,
    pub circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> RelayLimits {
        RelayLimits {
            max_reservations: 128,
            max_circuits: 64,
            max_circuits_per_peer: 8,
            circuit_duration: Duration::from_secs(3600),
            circuit_bytes: 4 << 30,
        }
    }
}

/// The security handshake a host offers first on TCP (it accepts both; QUIC is always TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Noise XX, ChaCha20-Poly1305.
    Noise,
    /// TLS 1.3 (AES-GCM where the CPU has it).
    Tls,
}

/// How a host is set up.
#[derive(Debug, Clone)]
pub struct Config {
    pub keypair: Keypair,
    pub transports: Transports,
    /// Addresses to listen on (none: dial out only). A relay's circuit address
    /// (`…/p2p/RELAY/p2p-circuit`) listens through a reservation on that relay.
    pub listen: Vec<Multiaddr>,
    pub client_mode: ClientMode,
    /// Offered first on TCP.
    pub security: Security,
    /// Serve as a relay for peers behind NATs (None: don't).
    pub relay: Option<RelayLimits>,
    /// Relays to reserve slots on when unreachable, at most.
    pub max_relays: usize,
    /// Wait before the first reachability probe, and between probes.
    pub nat_boot_delay: Duration,
    pub nat_retry: Duration,
    /// Hard cap on one request's time; each call also has its own, shorter deadline.
    pub request_timeout: Duration,
    /// Established connections at most, in all and per peer.
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// Connections stay open this long without traffic.
    pub idle_timeout: Duration,
    /// Inbound bandwidth probes served at once, at most.
    pub max_probes: usize,
    /// Accept direct channels for bulk data ([`crate::direct`]) on a TCP port beside the
    /// libp2p listener (network transports only).
    pub direct: bool,
    /// An authorized run's gate ([`crate::auth`]): peers are served only once admitted, and
    /// asked only once they admitted us. None: an open run.
    pub auth: Option<Arc<Gate>>,
    /// Requests each peer may send ([`crate::limit`]): over the rate they are refused, and a
    /// peer that floods is banned for a while.
    pub requests: limit::Rate,
}

impl Config {
    /// Defaults for `keypair` on `transports`.
    pub fn new(keypair: Keypair, transports: Transports) -> Config {
        Config {
            keypair,
            transports,
            listen: Vec::new(),
            client_mode: ClientMode::Auto,
            security: Security::Noise,
            relay: None,
            max_relays: 2,
            nat_boot_delay: Duration::from_secs(2),
            nat_retry: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            max_connections: 512,
            max_connections_per_peer: 4,
            idle_timeout: Duration::from_secs(60),
            max_probes: 4,
            direct: true,
            auth: None,
            requests: limit::Rate::default(),
        }
    }
}

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
}

/// Shared between the host task and its handles.
#[derive(Debug)]
struct Status {
    serving: AtomicBool,
    nat: Mutex<Nat>,
    relay_addrs: Mutex<Vec<Multiaddr>>,
    punched: AtomicU64,
    punch_failed: AtomicU64,
    /// Requests refused for their peer's rate, and peers banned for flooding.
    refused: AtomicU64,
    bans: AtomicU64,
}

/// The protocol a serving host advertises (through identify); a client host does not, so
/// nobody puts it in a routing table. Nothing is ever sent on it.
pub const SERVING: &str = "/potluck/serving/1";

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

/// Who answers inbound requests, and hears what identify learns.
pub trait Inbound: Send + Sync + 'static {
    /// The answer to `request` from `peer`.
    fn request(&self, peer: PeerId, request: Request) -> Response;
    /// `peer` told us its listen addresses and whether it serves (advertises [`SERVING`]).
    fn identified(&self, peer: PeerId, addrs: Vec<Multiaddr>, serves: bool);
    /// This host started (true) or stopped (false) serving.
    fn serving(&self, _serving: bool) {}
}

/// An [`Inbound`] for hosts that serve no DHT (benchmarks, tests): it refuses every request
/// and ignores what identify learns.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDht;

impl Inbound for NoDht {
    fn request(&self, _: PeerId, _: Request) -> Response {
        let reason = "no DHT here".into();
        Response {
            now: 0,
            body: crate::dht::wire::ResponseBody::Refused { reason },
        }
    }

    fn identified(&self, _: PeerId, _: Vec<Multiaddr>, _: bool) {}
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    /// Peers banned for flooding: their connections are denied before any stream opens.
    banned: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    dht: request_response::Behaviour<wire::Codec>,
    streams: libp2p_stream::Behaviour,
    autonat: Toggle<autonat::Behaviour>,
    relay: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
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

/// How long a peer a direct channel could not be opened to is reached over streams only.
pub const DIRECT_RETRY: Duration = Duration::from_secs(600);

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

fn build_swarm(cfg: &Config) -> Result<Swarm<Behaviour>, Error> {
    let protocol = StreamProtocol::new(wire::PROTOCOL);
    let rr_config = request_response::Config::default()
        .with_request_timeout(cfg.request_timeout)
        .with_max_concurrent_streams(256);
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(cfg.max_connections))
        .with_max_established_per_peer(Some(cfg.max_connections_per_peer))
        .with_max_pending_incoming(Some(cfg.max_connections / 2 + 1));
    // Every network host answers others' reachability probes; only an `Auto` one probes.
    // (Autonat dials back an IP address, which the in-memory transport has none of.)
    let autonat_on = cfg.transports == Transports::Network;
    let nat_config = autonat::Config {
        use_connected: cfg.client_mode == ClientMode::Auto,
        boot_delay: cfg.nat_boot_delay,
        retry_interval: cfg.nat_retry,
        refresh_interval: cfg.nat_retry * 10,
        throttle_server_period: cfg.nat_retry,
        // Swarms on one LAN (private addresses) must be able to probe each other.
        only_global_ips: false,
        ..autonat::Config::default()
    };
    let relay_limits = cfg.relay;
    let behaviour = move |key: &Keypair, relay_client: relay::client::Behaviour| {
        let local = key.public().to_peer_id();
        Behaviour {
            limits: connection_limits::Behaviour::new(limits),
            banned: allow_block_list::Behaviour::default(),
            identify: identify::Behaviour::new(identify::Config::new(
                "/potluck/1".into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new()),
            // Everyone answers requests; whether a host counts as a server is what it
            // advertises (SERVING), which can change while it runs.
            dht: request_response::Behaviour::new(
                [(protocol.clone(), ProtocolSupport::Full)],
                rr_config.clone(),
            ),
            streams: libp2p_stream::Behaviour::new(),
            autonat: autonat_on
                .then(|| autonat::Behaviour::new(local, nat_config.clone()))
                .into(),
            relay: relay_limits
                .map(|l| {
                    relay::Behaviour::new(
                        local,
                        relay::Config {
                            max_reservations: l.max_reservations,
                            max_circuits: l.max_circuits,
                            max_circuits_per_peer: l.max_circuits_per_peer,
                            max_circuit_duration: l.circuit_duration,
                            max_circuit_bytes: l.circuit_bytes,
                            ..relay::Config::default()
                        },
                    )
                })
                .into(),
            relay_client,
            dcutr: dcutr::Behaviour::new(local),
        }
    };
    let build = |e: String| Error::Build(e);
    let idle = cfg.idle_timeout;
    // The two TCP security orders are different types: one builder, written once.
    macro_rules! network {
        ($security:expr) => {
            libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
                .with_tokio()
                .with_tcp(
                    tcp::Config::default().nodelay(true),
                    $security,
                    yamux::Config::default,
                )
                .map_err(|e| build(e.to_string()))?
                .with_quic()
                .with_relay_client(noise::Config::new, yamux::Config::default)
                .map_err(|e| build(e.to_string()))?
                .with_behaviour(behaviour)
                .map_err(|e| build(e.to_string()))?
                .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
                .build()
        };
    }
    let swarm = match (cfg.transports, cfg.security) {
        (Transports::Network, Security::Noise) => {
            network!((noise::Config::new, libp2p::tls::Config::new))
        }
        (Transports::Network, Security::Tls) => {
            network!((libp2p::tls::Config::new, noise::Config::new))
        }
        (Transports::Memory, _) => {
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
                .with_relay_client(noise::Config::new, yamux::Config::default)
                .map_err(|e| build(e.to_string()))?
                .with_behaviour(behaviour)
                .map_err(|e| build(e.to_string()))?
                .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
                .build()
        }
    };
    Ok(swarm)
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// A direct-channel listener on the IP of the first TCP listen address (none without one,
/// or if the port can't be bound: bulk data then stays on libp2p streams).
fn direct_listener(listening: &[Multiaddr]) -> Option<Arc<direct::Listener>> {
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
    /// Starts a host on the current tokio runtime; inbound requests go to `inbound`. Returns
    /// once it listens on every address of `cfg.listen` (a circuit address: once the relay
    /// granted the reservation).
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
        if cfg.client_mode == ClientMode::Off {
            // Known reachable: our listen addresses are our external ones (a relay serves
            // only with a confirmed external address).
            for addr in listening.iter().filter(|a| !is_relayed(a)) {
                swarm.add_external_address(addr.clone());
            }
        }
        let direct = match cfg.transports {
            Transports::Network if cfg.direct => direct_listener(&listening),
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
                    .filter(|a| is_relayed(a))
                    .cloned()
                    .collect(),
            ),
            punched: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bans: AtomicU64::new(0),
            punch_failed: AtomicU64::new(0),
        });
        let marker = if serving {
            Some(accept(&mut streams, SERVING)?)
        } else {
            None
        };
        let (tx, rx) = mpsc::channel(1024);
        let probes = Incoming::new(accept(&mut streams, PROBE)?, cfg.auth.clone(), |_| true);
        tokio::spawn(serve_probes(probes, cfg.max_probes, direct.clone()));
        if let Some(gate) = &cfg.auth {
            let handshakes = accept(&mut streams, auth::PROTOCOL)?;
            tokio::spawn(auth::handshake::serve(handshakes, gate.clone(), tx.clone()));
        }
        inbound.serving(serving);
        let task = Task {
            swarm,
            inbound,
            listening,
            status: status.clone(),
            client_mode: cfg.client_mode,
            max_relays: cfg.max_relays,
            marker,
            control: streams.clone(),
            pending: HashMap::new(),
            dials: HashMap::new(),
            connects: HashMap::new(),
            connections: HashMap::new(),
            relays: HashMap::new(),
            reserved: HashSet::new(),
            gate: cfg.auth.clone(),
            unadmitted: HashMap::new(),
            limiter: Limiter::new(cfg.requests),
        };
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

    /// The offered side of a direct channel to `peer` ([`direct::choose`]): tries the IPs of
    /// our connections to it (they work), then those of `addrs`; the channel to use. A failure
    /// is remembered ([`Host::wants_direct`]).
    pub async fn choose_direct(
        &self,
        stream: libp2p::Stream,
        peer: PeerId,
        addrs: &[Multiaddr],
        offer: &direct::Offer,
    ) -> std::io::Result<direct::Bulk> {
        let mut all = self.connections(peer).await.unwrap_or_default();
        all.extend(addrs.iter().cloned());
        let bulk = direct::choose(stream, &direct::ips(&all), offer).await?;
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

    /// Sends `request` to `peer` (dialing `addrs` if not connected) and waits at most
    /// `deadline` for the answer.
    pub async fn rpc(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
        deadline: Duration,
    ) -> Result<Response, Error> {
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
        let inner = accept(&mut self.streams.clone(), protocol)?;
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
        let until = Instant::now() + deadline;
        let mut bytes = 1u64 << 20;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let probe = self
                .probe_via(peer, addrs.clone(), bytes, left, direct)
                .await?;
            let took = probe.elapsed.as_secs_f64().max(1e-6);
            if took >= target.as_secs_f64() / 4.0 || bytes >= MAX_PROBE {
                return Ok(probe);
            }
            let grow = (target.as_secs_f64() / took).clamp(2.0, 64.0);
            bytes = ((bytes as f64 * grow) as u64).min(MAX_PROBE);
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
                Some(offer) => self.choose_direct(stream, peer, &addrs, &offer).await,
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

fn accept(
    control: &mut libp2p_stream::Control,
    protocol: &'static str,
) -> Result<libp2p_stream::IncomingStreams, Error> {
    control
        .accept(StreamProtocol::new(protocol))
        .map_err(|_| Error::AlreadyAccepted(protocol.to_owned()))
}

/// Inbound streams of one protocol, less those of peers the run's gate does not admit (or
/// whose role `allow` refuses).
pub struct Incoming {
    inner: libp2p_stream::IncomingStreams,
    gate: Option<Arc<Gate>>,
    allow: fn(Role) -> bool,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("gated", &self.gate.is_some())
            .finish()
    }
}

impl Incoming {
    fn new(
        inner: libp2p_stream::IncomingStreams,
        gate: Option<Arc<Gate>>,
        allow: fn(Role) -> bool,
    ) -> Incoming {
        Incoming { inner, gate, allow }
    }
}

impl futures::Stream for Incoming {
    type Item = (PeerId, libp2p::Stream);

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            let Some((peer, stream)) = futures::ready!(self.inner.poll_next_unpin(cx)) else {
                return std::task::Poll::Ready(None);
            };
            let Some(gate) = &self.gate else {
                return std::task::Poll::Ready(Some((peer, stream)));
            };
            match gate.role(peer) {
                Some(role) if (self.allow)(role) => {
                    return std::task::Poll::Ready(Some((peer, stream)));
                }
                Some(role) => tracing::warn!("refused a stream from {peer}: a {role} may not"),
                None => tracing::warn!("refused a stream from {peer}: not admitted to the run"),
            }
        }
    }
}

/// Answers bandwidth probes, `max` at a time; a probe that stalls for 30 s is dropped.
async fn serve_probes(mut incoming: Incoming, max: usize, direct: Option<Arc<direct::Listener>>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    while let Some((peer, stream)) = incoming.next().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("dropping a probe from {peer}: {max} already running");
            continue;
        };
        let direct = direct.clone();
        tokio::spawn(async move {
            if let Err(e) = answer_probe(stream, direct.as_deref()).await {
                tracing::debug!("probe from {peer} failed: {e}");
            }
            drop(slot);
        });
    }
}

async fn answer_probe(
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
    let offer = listener.filter(|_| hello.direct).and_then(|l| l.expect());
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

/// Why a request over its peer's rate is refused.
const OVER_RATE: &str = "over this peer's request rate: slow down";

/// A refusal, saying why.
fn refused(reason: &str) -> Response {
    Response {
        now: potluck_core::clock::now(),
        body: crate::dht::wire::ResponseBody::Refused {
            reason: reason.into(),
        },
    }
}

/// The host task's state: owns the swarm, serves commands and events until every handle is
/// gone.
struct Task {
    swarm: Swarm<Behaviour>,
    inbound: Arc<dyn Inbound>,
    listening: Vec<Multiaddr>,
    status: Arc<Status>,
    client_mode: ClientMode,
    max_relays: usize,
    /// Held while serving: advertises SERVING.
    marker: Option<libp2p_stream::IncomingStreams>,
    control: libp2p_stream::Control,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<Response, Error>>>,
    dials: HashMap<ConnectionId, (Multiaddr, oneshot::Sender<Result<(), Error>>)>,
    connects: HashMap<PeerId, Vec<oneshot::Sender<Result<(), Error>>>>,
    /// Every established connection: its peer, remote address, and whether we dialed it.
    connections: HashMap<ConnectionId, (PeerId, Multiaddr, bool)>,
    /// Peers that offer relay service, with an address we reached them at directly.
    relays: HashMap<PeerId, Multiaddr>,
    /// Relays we asked for a reservation.
    reserved: HashSet<PeerId>,
    gate: Option<Arc<Gate>>,
    /// Authorized runs: peers connected but not admitted yet, since when, and what identify
    /// said of them (held back until they are admitted).
    unadmitted: HashMap<PeerId, (Instant, Option<identify::Info>)>,
    limiter: Limiter,
}

impl Task {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.event(event),
                _ = sweep.tick() => self.sweep(),
            }
        }
    }

    /// Drops ended bans; in authorized runs, disconnects peers that presented no valid token
    /// in time, and those whose admission ran out (expired or revoked).
    fn sweep(&mut self) {
        for peer in self.limiter.sweep(Instant::now()) {
            self.swarm.behaviour_mut().banned.unblock_peer(peer);
        }
        let Some(gate) = &self.gate else { return };
        let mut out = gate.expired();
        for (peer, (since, _)) in &mut self.unadmitted {
            if since.elapsed() > auth::HANDSHAKE && gate.role(*peer).is_none() {
                tracing::warn!("{peer} presented no valid token: disconnected");
                out.push(*peer);
                // Until the connection is closed (which forgets it), once per handshake time.
                *since = Instant::now();
            }
        }
        for peer in out {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Why a DHT request of `peer` is refused in an authorized run: it is not admitted, or
    /// it is a monitor asking to store (a monitor reads the run, it writes nothing).
    fn refusal(&self, peer: PeerId, request: &Request) -> Option<&'static str> {
        let gate = self.gate.as_ref()?;
        let stores = matches!(
            request.body,
            crate::dht::wire::RequestBody::Store { .. }
                | crate::dht::wire::RequestBody::StoreNear { .. }
        );
        match gate.role(peer) {
            None => Some("not admitted to this run: present a token first"),
            Some(Role::Monitor) if stores => Some("a monitor may not store records in this run"),
            Some(_) => None,
        }
    }

    /// What identify said of `peer`: relay service, listen addresses, whether it serves.
    fn identified(&mut self, peer_id: PeerId, info: identify::Info) {
        // A monitor never serves others in an authorized run: it holds and answers no records
        // (what a server answers to a read is merged into the reader's result).
        let monitor = self
            .gate
            .as_ref()
            .is_some_and(|g| g.role(peer_id) == Some(Role::Monitor));
        let serves = !monitor && info.protocols.iter().any(|p| p.as_ref() == SERVING);
        if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
            let direct = self
                .connections
                .values()
                .find(|(p, a, dialed)| *p == peer_id && *dialed && !is_relayed(a))
                .map(|(_, a, _)| a.clone());
            if let Some(addr) = direct {
                self.relays.insert(peer_id, addr);
                self.reserve_relays();
            }
        }
        self.inbound.identified(peer_id, info.listen_addrs, serves);
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Rpc {
                peer,
                addrs,
                request,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .dht
                    .send_request_with_addresses(&peer, request, addrs);
                self.pending.insert(id, reply);
            }
            Command::Dial { addr, reply } => {
                let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.dials.insert(id, (addr, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(Error::Dial {
                            addr,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::Connect { peer, addrs, reply } => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                let opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                match self.swarm.dial(opts) {
                    // Dialing now, or already: the connection (or the failure) answers.
                    Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {
                        self.connects.entry(peer).or_default().push(reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(Error::Rpc {
                            peer,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::Connections { peer, reply } => {
                let addrs = self
                    .connections
                    .values()
                    .filter(|(p, ..)| *p == peer)
                    .map(|(_, a, _)| a.clone())
                    .collect();
                let _ = reply.send(addrs);
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.listening.clone());
            }
            Command::Disconnect { peer } => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Admitted { peer } => {
                if let Some((_, Some(info))) = self.unadmitted.remove(&peer) {
                    self.identified(peer, info);
                }
            }
            Command::Present => {
                let Some(gate) = &self.gate else { return };
                let peers: HashSet<PeerId> = self.connections.values().map(|(p, ..)| *p).collect();
                for peer in peers {
                    if let Some(session) = gate.session(peer) {
                        let control = self.control.clone();
                        tokio::spawn(auth::handshake::present(
                            control,
                            gate.clone(),
                            peer,
                            session,
                        ));
                    }
                }
            }
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Dht(event)) => self.dht_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => match &self.gate {
                // Held back until the peer is admitted (dropped if it never is).
                Some(gate) if gate.role(peer_id).is_none() => {
                    if let Some((_, held)) = self.unadmitted.get_mut(&peer_id) {
                        *held = Some(info);
                    }
                }
                _ => self.identified(peer_id, info),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                new,
                ..
            })) => {
                let nat = match new {
                    autonat::NatStatus::Public(_) => Nat::Public,
                    autonat::NatStatus::Private => Nat::Private,
                    autonat::NatStatus::Unknown => Nat::Unknown,
                };
                tracing::info!("reachability: {nat:?}");
                *lock(&self.status.nat) = nat;
                match nat {
                    Nat::Private => {
                        self.set_serving(false);
                        self.reserve_relays();
                    }
                    Nat::Public => self.set_serving(true),
                    Nat::Unknown => {}
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted { relay_peer_id, .. },
            )) => tracing::debug!("relay {relay_peer_id} granted a reservation"),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => {
                    tracing::info!("hole punched to {remote_peer_id}: direct connection");
                    self.status.punched.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::debug!("hole punching to {remote_peer_id} failed: {e}");
                    self.status.punch_failed.fetch_add(1, Ordering::Relaxed);
                }
            },
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                if let Some(gate) = &self.gate
                    && num_established.get() == 1
                {
                    if gate.role(peer_id).is_none() {
                        self.unadmitted.insert(peer_id, (Instant::now(), None));
                    }
                    let session = gate.presenting(peer_id);
                    let control = self.control.clone();
                    tokio::spawn(auth::handshake::present(
                        control,
                        gate.clone(),
                        peer_id,
                        session,
                    ));
                }
                self.connections.insert(
                    connection_id,
                    (
                        peer_id,
                        endpoint.get_remote_address().clone(),
                        endpoint.is_dialer(),
                    ),
                );
                if let Some((_, reply)) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Ok(()));
                }
                for reply in self.connects.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(()));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.connections.remove(&connection_id);
                if num_established == 0 {
                    self.limiter.forget(peer_id);
                }
                if num_established == 0
                    && let Some(gate) = &self.gate
                {
                    gate.forget(peer_id);
                    self.unadmitted.remove(&peer_id);
                }
                if !self.swarm.is_connected(&peer_id) && self.relays.remove(&peer_id).is_some() {
                    self.reserved.remove(&peer_id);
                    self.reserve_relays();
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                if let Some((addr, reply)) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Err(Error::Dial {
                        addr,
                        reason: error.to_string(),
                    }));
                }
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                {
                    for reply in self.connects.remove(&peer).unwrap_or_default() {
                        let _ = reply.send(Err(Error::Rpc {
                            peer,
                            reason: error.to_string(),
                        }));
                    }
                }
            }
            SwarmEvent::NewListenAddr { address, .. } if !self.listening.contains(&address) => {
                if is_relayed(&address) {
                    tracing::info!("reachable through a relay at {address}");
                    lock(&self.status.relay_addrs).push(address.clone());
                }
                self.listening.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                lock(&self.status.relay_addrs).retain(|a| *a != address);
                self.listening.retain(|a| *a != address);
            }
            _ => {}
        }
    }

    fn dht_event(&mut self, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    // Counted before anything else is done with it: a flood costs this little.
                    let verdict = self.limiter.check(peer, Instant::now());
                    let refusal = match verdict {
                        Verdict::Allow => self.refusal(peer, &request),
                        Verdict::Refuse | Verdict::Ban => {
                            self.status.refused.fetch_add(1, Ordering::Relaxed);
                            Some(OVER_RATE)
                        }
                    };
                    if verdict == Verdict::Ban {
                        self.status.bans.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "{peer} sent requests far over its rate: banned for {:?}",
                            self.limiter.rate().ban_for
                        );
                        // Closes its connections and denies new ones until the ban ends.
                        let banned = &mut self.swarm.behaviour_mut().banned;
                        banned.block_peer(peer);
                        for ended in self.limiter.ban(peer, Instant::now()) {
                            banned.unblock_peer(ended);
                        }
                    }
                    let response = match refusal {
                        None => self.inbound.request(peer, request),
                        Some(OVER_RATE) => refused(OVER_RATE),
                        Some(reason) => {
                            tracing::warn!("refused a request from {peer}: {reason}");
                            refused(reason)
                        }
                    };
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .dht
                        .send_response(channel, response);
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(Error::Rpc {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!("inbound request from {peer} failed: {error}");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// Starts or stops serving (in `Auto` mode only): advertises SERVING or withdraws it, and
    /// tells the inbound handler. Identify pushes the change to connected peers.
    fn set_serving(&mut self, serving: bool) {
        if self.client_mode != ClientMode::Auto
            || self.status.serving.swap(serving, Ordering::Relaxed) == serving
        {
            return;
        }
        self.marker = if serving {
            accept(&mut self.control, SERVING).ok()
        } else {
            None
        };
        tracing::info!(
            "{}",
            if serving {
                "reachable: serving others"
            } else {
                "not reachable: client mode"
            }
        );
        self.inbound.serving(serving);
    }

    /// Unreachable: listens through up to `max_relays` relays among the connected peers.
    fn reserve_relays(&mut self) {
        if *lock(&self.status.nat) != Nat::Private {
            return;
        }
        let candidates: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .filter(|(p, _)| !self.reserved.contains(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (peer, addr) in candidates {
            if self.reserved.len() >= self.max_relays {
                break;
            }
            let circuit = addr
                .with_p2p(peer)
                .unwrap_or_else(|a| a)
                .with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(_) => {
                    tracing::info!("reserving a slot on relay {circuit}");
                    self.reserved.insert(peer);
                }
                Err(e) => tracing::debug!("cannot listen on {circuit}: {e}"),
            }
        }
    }
}
