//! Inbound streams of one protocol ([`Incoming`]), less those of peers the run's gate does not
//! admit.

use std::sync::Arc;

use futures::StreamExt;
use libp2p::{PeerId, StreamProtocol};

use super::Error;
use crate::auth::{Gate, Role};

pub(super) fn accept(
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
    pub(super) fn new(
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
