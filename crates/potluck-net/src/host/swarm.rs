//! The swarm: its behaviours (identify, ping, connection limits, bans, autonat, relay v2
//! server and client, dcutr, request–response, bulk streams) and its transports, built from a
//! [`Config`]; and the wait for its listeners.

use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, Swarm, Transport, allow_block_list, autonat, connection_limits, dcutr, identify,
    noise, ping, relay, tcp, yamux,
};

use super::requests::{Codec, Rpc};
use super::{ClientMode, Config, Error, Security, Transports};

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) limits: connection_limits::Behaviour,
    /// Peers banned for flooding: their connections are denied before any stream opens.
    pub(super) banned: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) rpc: Toggle<request_response::Behaviour<Codec>>,
    pub(super) streams: libp2p_stream::Behaviour,
    pub(super) autonat: Toggle<autonat::Behaviour>,
    pub(super) relay: Toggle<relay::Behaviour>,
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) dcutr: dcutr::Behaviour,
}

/// The swarm of a host set up by `cfg`, carrying `rpc`.
pub(super) fn build_swarm(cfg: &Config, rpc: Option<Rpc>) -> Result<Swarm<Behaviour>, Error> {
    let codec = rpc.map(Codec::new);
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
            rpc: codec
                .map(|codec| {
                    request_response::Behaviour::with_codec(
                        codec,
                        [(codec.protocol(), ProtocolSupport::Full)],
                        rr_config.clone(),
                    )
                })
                .into(),
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
                .with_quic_config(quic_config)
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

/// QUIC as libp2p sets it, but a connection whose peer vanished without a word (killed, its
/// link cut: no close, and UDP has no reset) ends after 4 s without a packet from it instead
/// of 10 s, and every second of silence is filled with a keep-alive so that a live peer is
/// never taken for gone. Until it ends, every stream opened on it waits out its own timeout:
/// a butterfly member killed in a churning swarm held each round it was named in for its 15 s
/// open timeout.
fn quic_config(mut config: libp2p::quic::Config) -> libp2p::quic::Config {
    config.max_idle_timeout = 4_000;
    config.keep_alive_interval = Duration::from_secs(1);
    config
}

/// Listens on `addrs`: the addresses it listens on, once all of them are up.
pub(super) async fn listen(
    swarm: &mut Swarm<Behaviour>,
    addrs: &[Multiaddr],
) -> Result<Vec<Multiaddr>, Error> {
    let mut listening = Vec::new();
    // Each listener, until it reports its first address. One on every interface reports one
    // address per interface: counting addresses, the two of a TCP listener on 0.0.0.0 stood
    // for both listeners, and a peer printed no QUIC address.
    let mut pending = std::collections::HashMap::new();
    for addr in addrs {
        let id = swarm.listen_on(addr.clone()).map_err(|e| Error::Listen {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
        pending.insert(id, addr.clone());
    }
    let failed =
        |pending: &std::collections::HashMap<_, Multiaddr>, id, reason: String| Error::Listen {
            addr: pending
                .get(&id)
                .or_else(|| pending.values().next())
                .cloned()
                .unwrap_or_else(Multiaddr::empty),
            reason,
        };
    // Wait for the listeners to come up (or fail), so callers can print real addresses.
    while let Some(&any) = pending.keys().next() {
        match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr {
                listener_id,
                address,
            }) => {
                pending.remove(&listener_id);
                listening.push(address);
            }
            Ok(SwarmEvent::ListenerError { listener_id, error })
            | Ok(SwarmEvent::ListenerClosed {
                listener_id,
                reason: Err(error),
                ..
            }) => return Err(failed(&pending, listener_id, error.to_string())),
            Ok(_) => {}
            Err(_) => {
                return Err(failed(&pending, any, "no listener came up in 10 s".into()));
            }
        }
    }
    Ok(listening)
}

pub(super) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}
