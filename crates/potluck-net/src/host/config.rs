//! How a host is set up: its transports, security, client mode, relay service and limits.

use std::sync::Arc;
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::identity::Keypair;

use crate::auth::Gate;
use crate::limit;

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
