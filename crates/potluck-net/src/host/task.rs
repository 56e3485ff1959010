//! The host task: owns the swarm and serves the handles' commands and the swarm's events
//! (connections, identify, reachability, relays, dcutr, requests) until every handle is gone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::PortUse;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, identify, relay};
use potluck_core::lock;
use tokio::sync::{mpsc, oneshot};

use super::incoming::accept;
use super::swarm::{Behaviour, BehaviourEvent, is_relayed};
use super::{ClientMode, Command, Config, Error, Inbound, Nat, SERVING, Status};
use crate::auth::{self, Gate, Role};
use crate::limit::{Limiter, Verdict};

/// Why a request over its peer's rate is refused.
const OVER_RATE: &str = "over this peer's request rate: slow down";

/// The host task's state: owns the swarm, serves commands and events until every handle is
/// gone.
pub(super) struct Task<I> {
    swarm: Swarm<Behaviour>,
    inbound: Arc<I>,
    listening: Vec<Multiaddr>,
    status: Arc<Status>,
    client_mode: ClientMode,
    max_relays: usize,
    /// Held while serving: advertises SERVING.
    marker: Option<libp2p_stream::IncomingStreams>,
    control: libp2p_stream::Control,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>, Error>>>,
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
    /// Since when autonat has found this host unreachable after it had found it reachable
    /// (it goes on serving for [`PRIVATE_GRACE`]), and whether it was ever found reachable.
    private_since: Option<Instant>,
    was_public: bool,
}

/// Whether `endpoint` is a connection this host dialed from a fresh port: autonat's dial-back
/// when it probes a peer's reachability (every other dial reuses the listening port).
fn is_dial_back(endpoint: &ConnectedPoint) -> bool {
    matches!(
        endpoint,
        ConnectedPoint::Dialer {
            port_use: PortUse::New,
            ..
        }
    )
}

/// How long a host once found reachable goes on serving while autonat finds it unreachable: a
/// probe's dial-back can fail for a while on a link full of averaging without the host being
/// unreachable. A host that really lost its reachability stops serving after this long.
pub(super) const PRIVATE_GRACE: Duration = Duration::from_secs(600);

impl<I: Inbound> Task<I> {
    /// The task of a host whose swarm listens on `listening`; `marker` is held while it serves
    /// (it advertises SERVING).
    pub(super) fn new(
        swarm: Swarm<Behaviour>,
        inbound: Arc<I>,
        cfg: &Config,
        listening: Vec<Multiaddr>,
        status: Arc<Status>,
        marker: Option<libp2p_stream::IncomingStreams>,
        control: libp2p_stream::Control,
    ) -> Task<I> {
        Task {
            swarm,
            inbound,
            listening,
            status,
            client_mode: cfg.client_mode,
            max_relays: cfg.max_relays,
            marker,
            control,
            pending: HashMap::new(),
            dials: HashMap::new(),
            connects: HashMap::new(),
            connections: HashMap::new(),
            relays: HashMap::new(),
            reserved: HashSet::new(),
            gate: cfg.auth.clone(),
            unadmitted: HashMap::new(),
            limiter: Limiter::new(cfg.requests),
            private_since: None,
            was_public: false,
        }
    }

    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
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
        if self
            .private_since
            .is_some_and(|t| t.elapsed() >= PRIVATE_GRACE)
        {
            self.private_since = None;
            tracing::warn!(
                "autonat has found this host unreachable for {} s: client mode",
                PRIVATE_GRACE.as_secs()
            );
            self.set_serving(false);
            self.reserve_relays();
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

    /// The role `peer` is admitted as in an authorized run (None: an open run), or why its
    /// requests are refused: it is not admitted. (What a role may ask is the handler's.)
    fn admitted(&self, peer: PeerId) -> Result<Option<Role>, &'static str> {
        let Some(gate) = &self.gate else {
            return Ok(None);
        };
        match gate.role(peer) {
            None => Err("not admitted to this run: present a token first"),
            Some(role) => Ok(Some(role)),
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
            } => match self.swarm.behaviour_mut().rpc.as_mut() {
                Some(rpc) => {
                    let id = rpc.send_request_with_addresses(&peer, request, addrs);
                    self.pending.insert(id, reply);
                }
                None => {
                    let _ = reply.send(Err(Error::Rpc {
                        peer,
                        reason: "this host carries no requests".into(),
                    }));
                }
            },
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
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(event)) => self.rpc_event(event),
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
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::OutboundProbe(
                autonat::OutboundProbeEvent::Response { .. }
                | autonat::OutboundProbeEvent::Error { peer: Some(_), .. },
            ))) => {
                self.status.nat_probes.fetch_add(1, Ordering::Relaxed);
            }
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
                    Nat::Private if self.was_public && self.client_mode == ClientMode::Auto => {
                        if self.private_since.is_none() {
                            tracing::warn!(
                                "autonat's probes of this host failed (a link too busy for \
                                 their dial-backs?): it goes on serving unless they fail for \
                                 {} s",
                                PRIVATE_GRACE.as_secs()
                            );
                            self.private_since = Some(Instant::now());
                        }
                    }
                    Nat::Private => {
                        self.set_serving(false);
                        self.reserve_relays();
                    }
                    Nat::Public => {
                        self.was_public = true;
                        self.private_since = None;
                        self.set_serving(true);
                    }
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
                if is_dial_back(&endpoint) && num_established.get() > 1 {
                    // Autonat's dial-back to a peer we already talk to (a fresh port; nothing
                    // else here dials one) has done its work once it is up. Left open, it would
                    // carry requests (spread over all of a peer's connections) and never idle
                    // out, and a few probes later the per-peer connection limit denied the next
                    // dial-back: autonat then found every peer of a run unreachable.
                    tracing::debug!("closing autonat's dial-back connection to {peer_id}");
                    self.swarm.close_connection(connection_id);
                }
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

    fn rpc_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let request = match self.inbound.decode(&request) {
                        Ok(request) => request,
                        Err(e) => {
                            // Dropped unanswered, as if it never came.
                            tracing::debug!("inbound request from {peer} failed: {e}");
                            return;
                        }
                    };
                    // Counted before anything else is done with it: a flood costs this little.
                    let verdict = self.limiter.check(peer, Instant::now());
                    let admitted = match verdict {
                        Verdict::Allow => self.admitted(peer),
                        Verdict::Refuse | Verdict::Ban => {
                            self.status.refused.fetch_add(1, Ordering::Relaxed);
                            Err(OVER_RATE)
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
                    let response = match admitted {
                        Ok(role) => self.inbound.request(peer, role, request),
                        Err(OVER_RATE) => self.inbound.refusal(OVER_RATE),
                        Err(reason) => {
                            tracing::warn!("refused a request from {peer}: {reason}");
                            self.inbound.refusal(reason)
                        }
                    };
                    if let Some(rpc) = self.swarm.behaviour_mut().rpc.as_mut() {
                        let _ = rpc.send_response(channel, response);
                    }
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
