//! The request–response protocol a host carries: it is given one ([`Inbound::rpc`]) and carries
//! its messages each way without knowing what they say. Each message is one frame: an unsigned
//! LEB128 length, then the message; the host reads one frame at a time, checking the length
//! against the protocol's limit before it reads or allocates the rest, and hands it over whole.
//!
//! The [`Inbound`] handler decodes each request and answers it; the host refuses, with a
//! refusal the handler builds, the requests of peers over their rate ([`crate::limit`]) and
//! those of peers an authorized run has not admitted ([`crate::auth`]).

use libp2p::request_response;
use libp2p::{Multiaddr, PeerId, StreamProtocol};

use crate::auth::Role;

/// A request–response protocol as a host carries it: its name and its limits (bytes of a
/// frame, length prefix included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rpc {
    pub name: &'static str,
    pub max_request: usize,
    pub max_response: usize,
}

/// Who answers inbound requests, and hears what identify learns.
pub trait Inbound: Send + Sync + 'static {
    /// What a request decodes to.
    type Request;
    /// The protocol the host carries, both ways (None: it carries none).
    fn rpc(&self) -> Option<Rpc>;
    /// Decodes a request's frame. A frame that is not a request is dropped unanswered, as if
    /// it never came (it is not counted against its peer's rate).
    fn decode(&self, frame: &[u8]) -> Result<Self::Request, String>;
    /// The answer to `request` from `peer` (a frame), once the host admitted it: in an
    /// authorized run `role` is the peer's role (None: an open run).
    fn request(&self, peer: PeerId, role: Option<Role>, request: Self::Request) -> Vec<u8>;
    /// A refusal saying why (a frame).
    fn refusal(&self, reason: &str) -> Vec<u8>;
    /// `peer` told us its listen addresses and whether it serves (advertises
    /// [`super::SERVING`]).
    fn identified(&self, peer: PeerId, addrs: Vec<Multiaddr>, serves: bool);
    /// This host started (true) or stopped (false) serving.
    fn serving(&self, _serving: bool) {}
}

/// An [`Inbound`] for hosts that serve no DHT (benchmarks, tests): it carries no requests
/// either way and ignores what identify learns.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDht;

impl Inbound for NoDht {
    type Request = std::convert::Infallible;

    fn rpc(&self) -> Option<Rpc> {
        None
    }

    fn decode(&self, _: &[u8]) -> Result<Self::Request, String> {
        Err("this host carries no requests".into())
    }

    fn request(&self, _: PeerId, _: Option<Role>, request: Self::Request) -> Vec<u8> {
        match request {}
    }

    fn refusal(&self, _: &str) -> Vec<u8> {
        // Never asked: nothing comes on a protocol it does not carry.
        Vec::new()
    }

    fn identified(&self, _: PeerId, _: Vec<Multiaddr>, _: bool) {}
}

/// The request–response codec of an [`Rpc`]: frames as bytes, each read within its limit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Codec(Rpc);

impl Codec {
    pub(super) fn new(rpc: Rpc) -> Codec {
        Codec(rpc)
    }

    pub(super) fn protocol(&self) -> StreamProtocol {
        StreamProtocol::new(self.0.name)
    }
}

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
    // Seven bits a byte, the least significant first.
    let len = prefix
        .iter()
        .rev()
        .fold(0u64, |len, b| (len << 7) | u64::from(b & 0x7f));
    let len = usize::try_from(len).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed length prefix")
    })?;
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
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io, self.0.max_request).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io, self.0.max_response).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}
