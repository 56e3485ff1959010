//! The run's tokenizers: the text tokenizer and the image tokenizer (VQ-VAE) every peer's data
//! must be encoded with, as one [`Bundle`] named by its SHA-256 ([`Bundle::id`]).
//!
//! Two peers that each trained their own tokenizers give the same picture other codes (0.4% of
//! positions agree), and a gradient of one teaches the shared model nonsense for the other. So
//! the bundle's id is part of what a peer says of itself in its progress reports; a peer leaves
//! out of its epochs, groups and state downloads every peer of other tokenizers (and says so),
//! and a newcomer whose data the run's peers did not encode alike is refused at join
//! ([`crate::collab::Error::Tokenizers`]). Every peer serves its bundle over
//! `/potluck/tokenizers/1` ([`serve`]); a newcomer downloads the run's ([`from_run`]: the id
//! most live peers report, checked against the bytes) and encodes its data with it
//! (`potluck prepare --from-run`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{Multiaddr, PeerId, Stream};
use potluck_core::lock;
use potluck_core::slots::Slots;
use potluck_net::dht::Dht;
use potluck_net::frame::{read_frame, read_message, write_frame, write_message};
use potluck_net::host::{self, Host};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::progress;
use crate::sync::serve::Budgets;

/// The protocol's name.
pub const PROTOCOL: &str = "/potluck/tokenizers/1";

/// The SHA-256 a bundle is named by.
pub type Id = [u8; 32];

/// The id of no tokenizers (peers of one process that share their data: tests, benches).
pub const NONE: Id = [0; 32];

/// Largest text tokenizer file a peer sends or takes.
pub const MAX_TEXT: usize = 64 << 20;
/// Largest image tokenizer file a peer sends or takes.
pub const MAX_IMAGE: usize = 512 << 20;
/// Largest request or answer.
pub const MAX_CONTROL: usize = 256;

/// The files a run's data is encoded with, and the caption length the text is cut to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The text tokenizer (`tokenizer.json`).
    pub text: Vec<u8>,
    /// The image tokenizer's weights and configuration (`vqvae.safetensors`).
    pub image: Vec<u8>,
    /// Text ids per caption.
    pub text_len: u32,
}

impl Bundle {
    /// The SHA-256 of the bundle (its files' lengths and bytes, and the caption length).
    pub fn id(&self) -> Id {
        let mut h = Sha256::new();
        h.update(b"potluck tokenizers 1\0");
        h.update(self.text_len.to_le_bytes());
        h.update((self.text.len() as u64).to_le_bytes());
        h.update(&self.text);
        h.update((self.image.len() as u64).to_le_bytes());
        h.update(&self.image);
        h.finalize().into()
    }
}

/// The first 8 bytes of `id` in hex: how logs and errors name tokenizers.
pub fn short(id: &Id) -> String {
    id[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Why tokenizers could not be had.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no live peer of run {0:?} reports its tokenizers (is the run training? are the initial \
         peers its peers?)"
    )]
    NoPeers(String),
    #[error("no peer served tokenizers {}: {}", short(.want), .tried.join("; "))]
    Unserved { want: Id, tried: Vec<String> },
    #[error(transparent)]
    Host(#[from] host::Error),
    #[error(transparent)]
    Dht(#[from] potluck_net::dht::Error),
}

/// What a downloader asks for (postcard, at most [`MAX_CONTROL`] bytes).
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub want: Id,
}

/// What a peer answers (postcard, at most [`MAX_CONTROL`] bytes).
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// The files follow, one raw frame each: the text tokenizer, then the image tokenizer.
    Files {
        text: u64,
        image: u64,
        text_len: u32,
    },
    /// This peer holds other tokenizers.
    Other(Id),
    /// Over this peer's budget: ask again in this many seconds.
    Busy { retry_after_s: u32 },
}

/// Streams answered at once, at most, and of one peer.
const MAX_STREAMS: usize = 16;
const MAX_STREAMS_PER_PEER: usize = 1;

/// Serves `bundle` on `host` until the host stops: a request naming its id gets the files; any
/// other is told the id this peer holds. At most [`MAX_STREAMS`] streams at once, one per
/// peer, and each peer takes at most its byte budget (a few bundles an hour).
pub fn serve(host: &Host, bundle: Arc<Bundle>) -> Result<(), host::Error> {
    let mut incoming = host.accept(PROTOCOL)?;
    let streams = Slots::new(MAX_STREAMS, MAX_STREAMS_PER_PEER);
    let budgets = Arc::new(Mutex::new(Budgets::default()));
    let id = bundle.id();
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let Some(slot) = streams.try_enter(peer) else {
                continue;
            };
            let (bundle, budgets) = (bundle.clone(), budgets.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let answered = tokio::time::timeout(
                    ANSWER_WITHIN,
                    answer(peer, stream, &bundle, id, &budgets),
                )
                .await;
                if let Ok(Err(e)) = answered {
                    tracing::debug!("tokenizers stream of {peer} ended: {e}");
                }
            });
        }
    });
    Ok(())
}

/// How long a donor spends on one request at most (a bundle of hundreds of MB at 1 MB/s).
const ANSWER_WITHIN: Duration = Duration::from_secs(600);

async fn answer(
    peer: PeerId,
    mut stream: Stream,
    bundle: &Bundle,
    id: Id,
    budgets: &Mutex<Budgets>,
) -> std::io::Result<()> {
    let request: Request = read_message(&mut stream, MAX_CONTROL).await?;
    if request.want != id {
        return write_message(&mut stream, &Response::Other(id)).await;
    }
    let bytes = bundle.text.len() + bundle.image.len();
    let charged = lock(budgets).take(peer, bytes, bytes, Instant::now());
    if let Err(retry_after_s) = charged {
        return write_message(&mut stream, &Response::Busy { retry_after_s }).await;
    }
    let header = Response::Files {
        text: bundle.text.len() as u64,
        image: bundle.image.len() as u64,
        text_len: bundle.text_len,
    };
    write_message(&mut stream, &header).await?;
    write_frame(&mut stream, &[&bundle.text]).await?;
    write_frame(&mut stream, &[&bundle.image]).await
}

/// The least rate a download is allowed (its timeout is the bundle's size at this rate, plus
/// [`OPEN`]).
const MIN_RATE: f64 = 250e3;
/// How long opening a stream and the first answer may take.
const OPEN: Duration = Duration::from_secs(20);

/// Whether a bundle of these files' sizes may be taken (checked before anything is read).
pub fn check_sizes(text: u64, image: u64) -> Result<(), String> {
    if text > MAX_TEXT as u64 || image > MAX_IMAGE as u64 {
        return Err(format!(
            "it offered {text} + {image} bytes, over the limits of {MAX_TEXT} + {MAX_IMAGE}"
        ));
    }
    Ok(())
}

/// Downloads the bundle `want` from `peer`, checking every size against the limits before
/// anything is allocated and the bytes against `want`.
pub async fn fetch(
    host: &Host,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    want: Id,
) -> Result<Bundle, String> {
    let mut stream = host
        .open_stream(peer, addrs, PROTOCOL, OPEN)
        .await
        .map_err(|e| e.to_string())?;
    let header = tokio::time::timeout(OPEN, async {
        write_message(&mut stream, &Request { want }).await?;
        read_message::<Response>(&mut stream, MAX_CONTROL).await
    })
    .await
    .map_err(|_| format!("no answer within {OPEN:?}"))?
    .map_err(|e| e.to_string())?;
    let (text, image, text_len) = match header {
        Response::Files {
            text,
            image,
            text_len,
        } => (text, image, text_len),
        Response::Other(id) => return Err(format!("it holds tokenizers {}", short(&id))),
        Response::Busy { retry_after_s } => {
            return Err(format!("busy: ask again in {retry_after_s} s"));
        }
    };
    check_sizes(text, image)?;
    let within = OPEN + Duration::from_secs_f64((text + image) as f64 / MIN_RATE);
    let bundle = tokio::time::timeout(within, async {
        let mut bundle = Bundle {
            text: Vec::new(),
            image: Vec::new(),
            text_len,
        };
        read_frame(&mut stream, text as usize, &mut bundle.text).await?;
        read_frame(&mut stream, image as usize, &mut bundle.image).await?;
        std::io::Result::Ok(bundle)
    })
    .await
    .map_err(|_| format!("not sent within {within:?}"))?
    .map_err(|e| e.to_string())?;
    if bundle.id() != want {
        return Err(format!(
            "it sent tokenizers {} for {}",
            short(&bundle.id()),
            short(&want)
        ));
    }
    Ok(bundle)
}

/// The tokenizers the live peers of `run` report, most reported first: each id, how many
/// peers report it, and those peers with their addresses.
pub async fn reported(
    dht: &Dht,
    keypair: &libp2p::identity::Keypair,
    run: &str,
    live: Duration,
) -> Result<Vec<(Id, Vec<(PeerId, Vec<Multiaddr>)>)>, Error> {
    let tracker = progress::Tracker {
        dht,
        keypair,
        run,
        ttl: live,
    };
    let now = potluck_core::clock::now();
    let mut by_id: HashMap<Id, Vec<(PeerId, Vec<Multiaddr>)>> = HashMap::new();
    for (peer, r) in tracker.fetch().await? {
        if r.time + live.as_millis() as u64 >= now && peer != dht.peer_id() {
            let addrs = r
                .addrs
                .iter()
                .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                .collect();
            by_id.entry(r.tokenizers).or_default().push((peer, addrs));
        }
    }
    let mut ids: Vec<_> = by_id.into_iter().collect();
    ids.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    Ok(ids)
}

/// Downloads the tokenizers of `run`: `chartered` (the run's charter, [`crate::charter`]) if
/// given, else those most of its live peers report (looking for `within`), from the first of
/// their peers that serves them; with how many live peers report them, and how many others.
pub async fn from_run(
    dht: &Dht,
    keypair: &libp2p::identity::Keypair,
    run: &str,
    chartered: Option<Id>,
    within: Duration,
) -> Result<(Bundle, usize, usize), Error> {
    let until = Instant::now() + within;
    let ids = loop {
        let mut ids = reported(dht, keypair, run, Duration::from_secs(30)).await?;
        if let Some(want) = chartered
            && let Some(at) = ids.iter().position(|(id, _)| *id == want)
        {
            ids.swap(0, at);
        }
        let found = ids
            .first()
            .is_some_and(|(id, _)| chartered.is_none_or(|c| c == *id));
        if found || Instant::now() >= until {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let Some((want, peers)) = ids.first() else {
        return Err(Error::NoPeers(run.to_owned()));
    };
    if let Some(c) = chartered
        && c != *want
    {
        return Err(Error::Unserved {
            want: c,
            tried: vec!["no live peer reports the chartered tokenizers".into()],
        });
    }
    let others = ids.iter().skip(1).map(|(_, p)| p.len()).sum();
    let mut tried = Vec::new();
    for (peer, addrs) in peers {
        match fetch(dht.host(), *peer, addrs.clone(), *want).await {
            Ok(bundle) => return Ok((bundle, peers.len(), others)),
            Err(e) => {
                tracing::warn!("tokenizers from {peer}: {e}");
                tried.push(format!("{peer}: {e}"));
            }
        }
    }
    Err(Error::Unserved { want: *want, tried })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(seed: u8) -> Bundle {
        Bundle {
            text: vec![seed; 1000],
            image: (0..5000u32).map(|i| (i as u8) ^ seed).collect(),
            text_len: 16,
        }
    }

    #[test]
    fn an_id_names_every_byte_and_the_caption_length() {
        let a = bundle(1);
        assert_eq!(a.id(), bundle(1).id());
        let mut b = a.clone();
        b.image[4999] ^= 1;
        assert_ne!(a.id(), b.id());
        let mut c = a.clone();
        c.text_len = 17;
        assert_ne!(a.id(), c.id());
        // Bytes moved from one file to the other are another bundle.
        let mut d = a.clone();
        d.text.push(d.image.remove(0));
        assert_ne!(a.id(), d.id());
    }

    #[tokio::test]
    async fn a_peer_downloads_the_tokenizers_it_asks_for_and_no_others() {
        let nodes = crate::test_nodes(2).await;
        let (server, client) = (nodes[0].0.host(), nodes[1].0.host());
        let held = bundle(7);
        serve(server, Arc::new(held.clone())).unwrap();
        let addrs = nodes[0].0.addrs().await.unwrap();
        let got = fetch(client, server.peer_id(), addrs.clone(), held.id())
            .await
            .unwrap();
        assert_eq!(got, held);
        // Another id: told what the peer holds, nothing downloaded.
        let err = fetch(client, server.peer_id(), addrs, bundle(8).id())
            .await
            .unwrap_err();
        assert!(err.contains(&short(&held.id())), "{err}");
    }
}
