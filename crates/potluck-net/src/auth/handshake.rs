//! The token handshake (`/potluck/auth/1`): on every fresh connection each side opens a stream
//! to the other, sends its token and reads the [`Reply`]. [`serve`] answers the peers' tokens
//! (admits them in the [`Gate`], or says why not); [`present`] presents ours. What the host
//! does with a peer once the handshake is over is its own ([`Outcome`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::auth::{self, Gate};
use crate::frame::{read_message, write_message};

/// The answer to a presented token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Admitted,
    Refused(String),
}

/// What a served handshake decided about its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Admitted: what the host held back of it may be used now.
    Admitted(PeerId),
    /// Refused (it was told why): to be disconnected.
    Refused(PeerId),
}

/// Serves the auth handshake: reads each peer's token (bounded, within
/// [`auth::HANDSHAKE`]), admits it or says why not and disconnects it (the [`Outcome`] goes
/// to `commands`, the host's).
pub(crate) async fn serve<C: From<Outcome> + Send + 'static>(
    mut incoming: libp2p_stream::IncomingStreams,
    gate: Arc<Gate>,
    commands: mpsc::Sender<C>,
) {
    // Each handshake is one small message; at most this many are read at once.
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    while let Some((peer, mut stream)) = incoming.next().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("dropping a handshake from {peer}: too many at once");
            continue;
        };
        let (gate, commands) = (gate.clone(), commands.clone());
        tokio::spawn(async move {
            // One small message: a peer that takes longer holds a slot for nothing.
            let token = tokio::time::timeout(
                auth::HANDSHAKE / 3,
                read_message::<auth::Token>(&mut stream, auth::MAX_TOKEN),
            )
            .await;
            let verdict = match token {
                Ok(Ok(token)) => gate.present(peer, &token).map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(format!("not a token: {e}")),
                Err(_) => Err("no token within the handshake's time".into()),
            };
            let reply = match &verdict {
                Ok(_) => auth::Reply::Admitted,
                Err(why) => auth::Reply::Refused(why.clone()),
            };
            let _ = tokio::time::timeout(auth::HANDSHAKE / 3, async {
                write_message(&mut stream, &reply).await?;
                futures::AsyncWriteExt::close(&mut stream).await?;
                // A refused peer is disconnected once it has read why (it drops the stream).
                if verdict.is_err() {
                    let _ = futures::AsyncReadExt::read(&mut stream, &mut [0u8; 1]).await;
                }
                std::io::Result::Ok(())
            })
            .await;
            let outcome = match verdict {
                Ok(role) => {
                    tracing::debug!("admitted {peer} as a {role}");
                    Outcome::Admitted(peer)
                }
                Err(why) => {
                    tracing::warn!("refused {peer}: {why}");
                    Outcome::Refused(peer)
                }
            };
            let _ = commands.send(outcome.into()).await;
            drop(slot);
        });
    }
}

/// Presents this host's token to `peer` in handshake `session` and records its answer;
/// retried with backoff (a burst of opens can be refused) until [`auth::HANDSHAKE`] has
/// passed or the session is over (the connection closed).
pub(crate) async fn present(
    mut control: libp2p_stream::Control,
    gate: Arc<Gate>,
    peer: PeerId,
    session: u64,
) {
    let started = Instant::now();
    let mut attempt = 0u64;
    while started.elapsed() < auth::HANDSHAKE && gate.session(peer) == Some(session) {
        attempt += 1;
        let exchange = async {
            let mut stream = control
                .open_stream(peer, StreamProtocol::new(auth::PROTOCOL))
                .await
                .map_err(|e| e.to_string())?;
            write_message(&mut stream, &gate.token())
                .await
                .map_err(|e| e.to_string())?;
            read_message::<auth::Reply>(&mut stream, auth::MAX_TOKEN)
                .await
                .map_err(|e| e.to_string())
        };
        let left = auth::HANDSHAKE.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, exchange).await {
            Ok(Ok(auth::Reply::Admitted)) => {
                gate.admitted_by(peer, session);
                return;
            }
            Ok(Ok(auth::Reply::Refused(why))) => {
                tracing::warn!("{peer} refused this peer's token: {why}");
                gate.refused_by(peer, session, why);
                return;
            }
            Ok(Err(e)) => tracing::debug!("presenting the token to {peer} failed: {e}"),
            Err(_) => tracing::debug!("presenting the token to {peer} timed out"),
        }
        let backoff = (50 * attempt).min(1000) + rand::random_range(0..50);
        tokio::time::sleep(Duration::from_millis(backoff)).await;
    }
    let why = "no answer to the token handshake (is it a peer of this run?)".to_owned();
    gate.refused_by(peer, session, why);
}
