//! The donor's side: a peer serves the state on its [`Shelf`] to every downloader that asks,
//! one stream each, while it goes on training and averaging.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use libp2p::Stream;
use potluck_core::lock;
use potluck_core::slots::Slots;
use potluck_net::frame::{read_message, write_frame, write_message};
use potluck_net::host::{self, Host};

use super::snapshot::Snapshot;
use super::wire::{MAX_CONTROL, PROTOCOL, Request, Response};

/// The state this peer serves; replaced after every step.
#[derive(Debug, Clone, Default)]
pub struct Shelf(Arc<Mutex<Option<Arc<Snapshot>>>>);

impl Shelf {
    pub fn put(&self, snapshot: Snapshot) {
        *lock(&self.0) = Some(Arc::new(snapshot));
    }

    pub fn get(&self) -> Option<Arc<Snapshot>> {
        lock(&self.0).clone()
    }
}

/// How a donor serves (fault injection for tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct Serving {
    /// Vanish (close every stream, answer nothing more) after serving this many chunks.
    pub vanish_after: Option<usize>,
    /// Wait this long before each chunk (a slow donor).
    pub delay: Option<Duration>,
}

/// State streams answered at once, at most.
pub(super) const MAX_STREAMS: usize = 64;
/// Of those, for one peer at most (a downloader opens one stream to each donor).
pub(super) const MAX_STREAMS_PER_PEER: usize = 2;

/// Serves `shelf` on `host` until the host stops. Each stream answers requests in order; at
/// most [`MAX_STREAMS`] streams are answered at once, [`MAX_STREAMS_PER_PEER`] for one peer
/// (more are closed at once).
pub fn serve(host: &Host, shelf: Shelf, serving: Serving) -> Result<(), host::Error> {
    let mut incoming = host.accept(PROTOCOL)?;
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let streams = Slots::new(MAX_STREAMS, MAX_STREAMS_PER_PEER);
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let Some(slot) = streams.try_enter(peer) else {
                tracing::debug!("closed a state stream of {peer}: too many at once");
                continue;
            };
            let (shelf, served) = (shelf.clone(), served.clone());
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = answer(stream, shelf, serving, served).await {
                    tracing::debug!("state stream from {peer} ended: {e}");
                }
            });
        }
    });
    Ok(())
}

/// How long a donor waits for the next request on an open stream.
const IDLE: Duration = Duration::from_secs(60);

async fn answer(
    mut stream: Stream,
    shelf: Shelf,
    serving: Serving,
    served: Arc<std::sync::atomic::AtomicUsize>,
) -> std::io::Result<()> {
    // A chunk's bytes are encoded here from the shared state, one chunk at a time.
    let mut chunk = Vec::new();
    loop {
        let request = match tokio::time::timeout(IDLE, read_message(&mut stream, MAX_CONTROL)).await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let snapshot = shelf.get();
        match (request, snapshot) {
            (Request::Manifest, Some(s)) => {
                // Hashing a large state takes a while: off the async workers.
                let manifest = tokio::task::spawn_blocking(move || s.manifest())
                    .await
                    .map_err(std::io::Error::other)?;
                let bytes = postcard::to_allocvec(&manifest).map_err(std::io::Error::other)?;
                write_message(&mut stream, &Response::Manifest).await?;
                write_frame(&mut stream, &[&bytes]).await?;
            }
            (Request::Chunk { epoch, index }, Some(s))
                if s.epoch == epoch && (index as usize) * s.chunk() < s.len() =>
            {
                if let Some(n) = serving.vanish_after
                    && served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= n
                {
                    let _ = stream.close().await;
                    return Ok(());
                }
                if let Some(d) = serving.delay {
                    tokio::time::sleep(d).await;
                }
                s.read_chunk(index as usize, &mut chunk);
                write_message(&mut stream, &Response::Chunk).await?;
                write_frame(&mut stream, &[&chunk]).await?;
            }
            (_, s) => {
                let epoch = s.map(|s| s.epoch);
                write_message(&mut stream, &Response::Gone { epoch }).await?;
            }
        }
    }
}
