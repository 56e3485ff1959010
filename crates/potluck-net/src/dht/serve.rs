//! Answering `/potluck/dht/1` requests from the node's store and routing table: the node is its
//! host's [`Inbound`] handler. A monitor of an authorized run may read, not store; a node in
//! client mode refuses everything ([`super::node::CLIENT_MODE`]). [`Refusing`] speaks the
//! protocol and holds nothing.

use std::sync::atomic::Ordering;
use std::time::Instant;

use libp2p::{Multiaddr, PeerId};
use potluck_core::clock::now;
use potluck_core::lock;

use super::node::{CLIENT_MODE, Shared, info, to_wire};
use super::routing::{self, Id};
use super::wire::{self, PeerInfo, Request, RequestBody, Response, ResponseBody};
use crate::auth::Role;
use crate::host::{Inbound, Rpc};

impl Shared {
    fn closest_infos(&self, target: &Id, exclude: &PeerId) -> Vec<PeerInfo> {
        lock(&self.table)
            .closest(target, self.config.k + 1)
            .iter()
            .filter(|c| c.peer != *exclude)
            .take(self.config.k.min(wire::MAX_PEERS))
            .map(info)
            .collect()
    }

    /// The answer to `request` from `peer`, from the store and the routing table.
    fn answer(&self, peer: PeerId, request: Request) -> Response {
        let now = now();
        if self.is_client() {
            let reason = CLIENT_MODE.into();
            return Response {
                now,
                body: ResponseBody::Refused { reason },
            };
        }
        // A serving peer that asks is alive: back into the table if it fell out (its
        // addresses as identify gave them).
        if !request.client
            && let Some(addrs) = lock(&self.servers).get(&peer).cloned()
        {
            lock(&self.table).seen(peer, addrs, Instant::now());
        }
        let body = match request.body {
            RequestBody::FindNode { target } => ResponseBody::Nodes {
                peers: self.closest_infos(&target, &peer),
            },
            RequestBody::Get { key } => {
                if key.len() > self.config.limits.max_key {
                    ResponseBody::Refused {
                        reason: "key too long".into(),
                    }
                } else {
                    let entry = lock(&self.store).get(&key, now).map(to_wire);
                    ResponseBody::Value {
                        entry,
                        closer: self.closest_infos(&routing::id_of(&key), &peer),
                    }
                }
            }
            RequestBody::Store { records } => ResponseBody::Stored {
                results: self.store_local(&records, now, Some(&peer)),
            },
            RequestBody::StoreNear { target, records } => ResponseBody::StoredNear {
                results: self.store_local(&records, now, Some(&peer)),
                peers: self.closest_infos(&target, &peer),
            },
        };
        Response { now, body }
    }
}

impl Inbound for Shared {
    type Request = Request;

    fn rpc(&self) -> Option<Rpc> {
        Some(wire::RPC)
    }

    fn decode(&self, frame: &[u8]) -> Result<Request, String> {
        Request::decode(frame).map_err(|e| e.to_string())
    }

    fn request(&self, peer: PeerId, role: Option<Role>, request: Request) -> Vec<u8> {
        answer_as(peer, role, request, |request| self.answer(peer, request))
    }

    fn refusal(&self, reason: &str) -> Vec<u8> {
        wire::encode(&refused(reason))
    }

    fn serving(&self, serving: bool) {
        self.client.store(!serving, Ordering::Relaxed);
    }

    fn identified(&self, peer: PeerId, addrs: Vec<Multiaddr>, serves: bool) {
        if serves {
            lock(&self.servers).insert(peer, addrs.clone());
            lock(&self.table).seen(peer, addrs, Instant::now());
        } else {
            lock(&self.servers).remove(&peer);
            lock(&self.table).remove(&peer);
        }
    }
}

/// An [`Inbound`] for a host that asks others but holds no DHT of its own (tests): it
/// refuses every request and ignores what identify learns.
#[derive(Debug, Clone, Copy, Default)]
pub struct Refusing;

impl Inbound for Refusing {
    type Request = Request;

    fn rpc(&self) -> Option<Rpc> {
        Some(wire::RPC)
    }

    fn decode(&self, frame: &[u8]) -> Result<Request, String> {
        Request::decode(frame).map_err(|e| e.to_string())
    }

    fn request(&self, peer: PeerId, role: Option<Role>, request: Request) -> Vec<u8> {
        answer_as(peer, role, request, |_| {
            let reason = "no DHT here".into();
            Response {
                now: 0,
                body: ResponseBody::Refused { reason },
            }
        })
    }

    fn refusal(&self, reason: &str) -> Vec<u8> {
        wire::encode(&refused(reason))
    }

    fn identified(&self, _: PeerId, _: Vec<Multiaddr>, _: bool) {}
}

/// `answer`'s answer to `request` from `peer`, unless its `role` in an authorized run may not
/// ask it: a monitor reads the run, it writes nothing. The frame to send.
fn answer_as(
    peer: PeerId,
    role: Option<Role>,
    request: Request,
    answer: impl FnOnce(Request) -> Response,
) -> Vec<u8> {
    let stores = matches!(
        request.body,
        RequestBody::Store { .. } | RequestBody::StoreNear { .. }
    );
    let response = if role == Some(Role::Monitor) && stores {
        let reason = "a monitor may not store records in this run";
        tracing::warn!("refused a request from {peer}: {reason}");
        refused(reason)
    } else {
        answer(request)
    };
    wire::encode(&response)
}

/// A refusal, saying why.
fn refused(reason: &str) -> Response {
    Response {
        now: now(),
        body: ResponseBody::Refused {
            reason: reason.into(),
        },
    }
}
