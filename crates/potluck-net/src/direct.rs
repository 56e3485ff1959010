//! Direct channels: bulk bytes between two peers over a TCP connection of their own, sealed
//! with AES-256-GCM under keys the two agreed over an authenticated libp2p stream.
//!
//! Why: a libp2p stream costs every byte noise's ChaCha20-Poly1305, yamux's framing and the
//! copies between them, about 1.8 CPU-seconds per GB for both ends (docs/BENCHMARKS.md); on
//! fast links that, not the link, bounds an all-reduce. A direct channel costs one AES-GCM pass
//! (hardware-accelerated on x86-64 and ARMv8) and one copy each way, in records of up to 1 MiB.
//!
//! How (`/potluck/allreduce/2` uses it; docs/PROTOCOL.md):
//! 1. The accepting side calls [`Listener::expect`] and sends the [`Offer`] (port, one-time
//!    token, one fresh key per direction) over the libp2p stream, which noise already
//!    authenticates and encrypts: only the peer it was sent to knows the keys.
//! 2. The dialing side calls [`connect`] with the offer: a TCP connection to the port, the
//!    token as its first 16 bytes, then records.
//! 3. It says on the stream which way it goes ([`Via`]); [`choose`] and [`chosen`] do steps 2
//!    and 3 on each side and give a [`Bulk`] channel: the direct one, or the stream where no
//!    direct connection could be made. [`Bulk::into_split`] gives a futures
//!    [`AsyncRead`](futures::AsyncRead) and [`AsyncWrite`](futures::AsyncWrite) half.
//!
//! A record is a `u32` little-endian length (at most [`MAX_RECORD`] + 16), then the sealed
//! bytes with their 16-byte tag; the nonce is the record's number in its direction, so
//! records cannot be dropped, reordered, replayed or reflected without the next one failing to
//! open. An empty record ends the stream (closing the writer sends it): a connection that ends
//! without it was cut, and the reader says so. Anyone can connect to the port, but a connection
//! that does not present a live token within [`HANDSHAKE`] is closed, at most
//! [`MAX_HANDSHAKES`] are read at once, and at most [`MAX_PENDING`] offers wait at once.
//!
//! Where a direct connection cannot be made (a NAT, a relay, a firewall) the caller stays on
//! its libp2p stream; nothing else changes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use potluck_core::lock;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead as TokioRead, AsyncReadExt, AsyncWrite as TokioWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};

use crate::frame::{read_message, write_message};

/// Plaintext bytes in one record, at most.
pub const MAX_RECORD: usize = 1 << 20;
/// How long a new connection has to present its token.
pub const HANDSHAKE: Duration = Duration::from_secs(5);
/// Connections read for their token at once, at most (more are closed at once).
pub const MAX_HANDSHAKES: usize = 64;
/// Offers waiting for their connection at once, at most.
pub const MAX_PENDING: usize = 1024;
/// How long the offered side tries to connect (each address) before it stays on the stream.
pub const CONNECT: Duration = Duration::from_secs(3);

const TAG: usize = 16;
const HEADER: usize = 4;
const TOKEN: usize = 16;
const KEY: usize = 32;

/// What the accepting side tells the dialing side (over an authenticated, encrypted stream:
/// the keys are secret).
#[derive(Clone, Serialize, Deserialize)]
pub struct Offer {
    /// The TCP port to connect to (at an address the dialer knows the peer by).
    pub port: u16,
    token: [u8; TOKEN],
    /// The dialer's sending key, then the accepter's.
    keys: [[u8; KEY]; 2],
}

impl std::fmt::Debug for Offer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offer")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

type Pending = Arc<Mutex<HashMap<[u8; TOKEN], oneshot::Sender<TcpStream>>>>;

/// The TCP port direct channels are accepted on; one per host. Dropping the last handle stops
/// accepting.
#[derive(Debug)]
pub struct Listener {
    addr: SocketAddr,
    pending: Pending,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Listener {
    /// Listens on `ip` at a port the system picks (call inside a tokio runtime).
    pub fn bind(ip: IpAddr) -> io::Result<Listener> {
        let std = std::net::TcpListener::bind((ip, 0))?;
        std.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std)?;
        let addr = listener.local_addr()?;
        let pending: Pending = Arc::default();
        let accept = tokio::spawn(accept_loop(listener, pending.clone()));
        Ok(Listener {
            addr,
            pending,
            accept,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes an offer for one connection: send the [`Offer`] to the peer, then wait for its
    /// connection with [`Expected::accept`]. None when [`MAX_PENDING`] offers already wait.
    pub fn expect(&self) -> Option<(Offer, Expected)> {
        let rng = SystemRandom::new();
        let mut token = [0u8; TOKEN];
        let mut keys = [[0u8; KEY]; 2];
        rng.fill(&mut token).ok()?;
        for k in &mut keys {
            rng.fill(k).ok()?;
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if pending.len() >= MAX_PENDING {
                return None;
            }
            pending.insert(token, tx);
        }
        let offer = Offer {
            port: self.addr.port(),
            token,
            keys,
        };
        let expected = Expected {
            token,
            keys,
            connection: Some(rx),
            pending: self.pending.clone(),
        };
        Some((offer, expected))
    }
}

/// An offer's connection, still to come; dropping it withdraws the offer.
#[derive(Debug)]
pub struct Expected {
    token: [u8; TOKEN],
    keys: [[u8; KEY]; 2],
    connection: Option<oneshot::Receiver<TcpStream>>,
    pending: Pending,
}

impl Drop for Expected {
    fn drop(&mut self) {
        lock(&self.pending).remove(&self.token);
    }
}

impl Expected {
    /// The channel, once the dialer connected with the offer's token, or an error after
    /// `within`.
    pub async fn accept(mut self, within: Duration) -> io::Result<Channel> {
        let rx = self
            .connection
            .take()
            .ok_or_else(|| io::Error::other("already accepted"))?;
        let stream = match tokio::time::timeout(within, rx).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) => return Err(io::Error::other("the listener stopped")),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no direct connection within {within:?}"),
                ));
            }
        };
        Channel::new(stream, &self.keys, Side::Accepter)
    }
}

async fn accept_loop(listener: TcpListener, pending: Pending) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: give the system a moment rather than spin.
                tracing::debug!("direct listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            continue;
        };
        let pending = pending.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut stream = stream;
            let mut token = [0u8; TOKEN];
            if !matches!(
                tokio::time::timeout(HANDSHAKE, stream.read_exact(&mut token)).await,
                Ok(Ok(_))
            ) {
                return;
            }
            let waiting = lock(&pending).remove(&token);
            if let Some(tx) = waiting {
                let _ = tx.send(stream);
            }
        });
    }
}

/// The IP addresses in `addrs` a direct connection can be tried at (relayed ones left out),
/// without repeats, in order.
pub fn ips(addrs: &[Multiaddr]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for a in addrs {
        if a.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
            continue;
        }
        let ip = a.iter().find_map(|p| match p {
            Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
            Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
            _ => None,
        });
        if let Some(ip) = ip
            && !ip.is_unspecified()
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// Connects to the peer that made `offer`, at the first of `ips` that answers within
/// `within` each.
pub async fn connect(ips: &[IpAddr], offer: &Offer, within: Duration) -> io::Result<Channel> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
    for ip in ips {
        let attempt = async {
            let mut stream = TcpStream::connect((*ip, offer.port)).await?;
            stream.write_all(&offer.token).await?;
            Ok::<_, io::Error>(stream)
        };
        match tokio::time::timeout(within, attempt).await {
            Ok(Ok(stream)) => return Channel::new(stream, &offer.keys, Side::Dialer),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{ip}:{} did not answer within {within:?}", offer.port),
                );
            }
        }
    }
    Err(last)
}

/// The offered side's choice, sent on the stream after it tried to connect.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum Via {
    Direct,
    Stream,
}

/// A bulk channel to a peer: its libp2p stream, or the direct channel that replaced it.
#[derive(Debug)]
pub enum Bulk {
    Stream(libp2p::Stream),
    /// Boxed: two AES key schedules make it large.
    Direct(Box<Channel>),
}

/// The reading half of a [`Bulk`] channel.
pub type BoxReader = Box<dyn futures::AsyncRead + Send + Unpin>;
/// The writing half of a [`Bulk`] channel.
pub type BoxWriter = Box<dyn futures::AsyncWrite + Send + Unpin>;

impl Bulk {
    /// The reading and the writing half.
    pub fn into_split(self) -> (BoxReader, BoxWriter) {
        match self {
            Bulk::Stream(stream) => {
                let (r, w) = futures::AsyncReadExt::split(stream);
                (Box::new(r), Box::new(w))
            }
            Bulk::Direct(channel) => {
                let (r, w) = (*channel).into_split();
                (Box::new(r), Box::new(w))
            }
        }
    }

    /// Whether the bytes go over a direct channel.
    pub fn is_direct(&self) -> bool {
        matches!(self, Bulk::Direct(_))
    }

    /// A handle on how fast it sends (direct channels only).
    pub fn pacing(&self) -> Option<Pacing> {
        match self {
            Bulk::Direct(channel) => Some(channel.pacing()),
            Bulk::Stream(_) => None,
        }
    }
}

/// The offered side, after it received `offer` on `stream`: connects a direct channel at `ips`
/// ([`CONNECT`] each) and says on the stream whether it did; the channel to use.
pub async fn choose(mut stream: libp2p::Stream, ips: &[IpAddr], offer: &Offer) -> io::Result<Bulk> {
    match connect(ips, offer, CONNECT).await {
        Ok(channel) => {
            write_message(&mut stream, &Via::Direct).await?;
            Ok(Bulk::Direct(Box::new(channel)))
        }
        Err(e) => {
            tracing::debug!("no direct channel ({e}): staying on the stream");
            write_message(&mut stream, &Via::Stream).await?;
            Ok(Bulk::Stream(stream))
        }
    }
}

/// The offering side, after it sent the offer of `expected` on `stream`: reads the peer's
/// choice and gives the channel chosen (an error if the peer says nothing in time, or chose a
/// direct channel that did not come).
pub async fn chosen(mut stream: libp2p::Stream, expected: Expected) -> io::Result<Bulk> {
    let within = CONNECT * 2 + HANDSHAKE;
    let via = tokio::time::timeout(within, read_message::<Via>(&mut stream, 16))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the peer did not choose"))??;
    match via {
        Via::Stream => Ok(Bulk::Stream(stream)),
        Via::Direct => Ok(Bulk::Direct(Box::new(expected.accept(HANDSHAKE).await?))),
    }
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Dialer,
    Accepter,
}

fn key(bytes: &[u8; KEY]) -> io::Result<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| io::Error::other("bad key"))
}

/// How fast a direct channel's writer may send: Linux's per-socket pacing
/// (`SO_MAX_PACING_RATE`; elsewhere nothing happens). Set it from anywhere; the writer applies it
/// before its next write. A member's flows that share an uplink share it evenly when each is
/// paced at its share of the uplink's measured rate; left to TCP, the flows through one FIFO
/// bottleneck share it badly (docs/BENCHMARKS.md).
#[derive(Debug, Clone, Default)]
pub struct Pacing(Arc<AtomicU64>);

impl Pacing {
    /// At most `bytes_per_second` (None: as fast as TCP goes).
    pub fn set(&self, bytes_per_second: Option<f64>) {
        let v = bytes_per_second.map_or(0, |r| r.clamp(1.0, u64::MAX as f64) as u64);
        self.0.store(v, Ordering::Relaxed);
    }
}

/// Applies a pacing rate to a socket (0: none).
#[cfg(target_os = "linux")]
fn pace_socket(fd: std::os::fd::RawFd, bytes_per_second: u64) -> io::Result<()> {
    // u32 is what every kernel takes; its maximum means no pacing.
    let rate: u32 = match bytes_per_second {
        0 => u32::MAX,
        r => u32::try_from(r).unwrap_or(u32::MAX),
    };
    // SAFETY: `fd` is an open socket (the writer holds its half of it); the option value is a
    // u32 of the given size that outlives the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&raw const rate).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn pace_socket(_: i32, _: u64) -> io::Result<()> {
    Ok(())
}

/// A sealed TCP connection to one peer.
#[derive(Debug)]
pub struct Channel {
    reader: Reader,
    writer: Writer,
}

impl Channel {
    fn new(stream: TcpStream, keys: &[[u8; KEY]; 2], side: Side) -> io::Result<Channel> {
        stream.set_nodelay(true)?;

        let (send, receive) = match side {
            Side::Dialer => (&keys[0], &keys[1]),
            Side::Accepter => (&keys[1], &keys[0]),
        };
        #[cfg(unix)]
        let fd = Some(std::os::fd::AsRawFd::as_raw_fd(&stream));
        #[cfg(not(unix))]
        let fd = None;
        let (r, w) = stream.into_split();
        let mut writer = Writer::new(w, key(send)?);
        writer.fd = fd;
        Ok(Channel {
            reader: Reader(Records::new(r, key(receive)?)),
            writer,
        })
    }

    /// The reading and the writing half.
    pub fn into_split(self) -> (Reader, Writer) {
        (self.reader, self.writer)
    }

    /// A handle on how fast this channel sends.
    pub fn pacing(&self) -> Pacing {
        self.writer.pacing.clone()
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[NONCE_LEN - 8..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The reading half of a [`Channel`]. Dropped before the peer's end record, it reads on
/// (discarding) in the background until the peer closes, for [`LINGER`] at most: a TCP socket
/// closed with unread bytes resets the connection, and the reset would throw away what we sent
/// the peer and it has not read yet.
#[derive(Debug)]
pub struct Reader(Records<OwnedReadHalf>);

/// How long a dropped [`Reader`] reads on for the peer's end.
pub const LINGER: Duration = Duration::from_secs(10);

impl Drop for Reader {
    fn drop(&mut self) {
        if self.0.ended {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(mut io) = self.0.io.take() else {
            return;
        };
        runtime.spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            let drain = async {
                while let Ok(n) = io.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
        });
    }
}

impl futures::AsyncRead for Reader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read(cx, out)
    }
}

/// Records read from `R` and opened: the decoding half of a [`Reader`] (public for tests and
/// fuzzing).
#[doc(hidden)]
pub struct Records<R> {
    /// Taken by a dropped [`Reader`] to read on.
    io: Option<R>,
    key: LessSafeKey,
    counter: u64,
    header: [u8; HEADER],
    header_got: usize,
    /// The record being read (its first `want` bytes), then its plaintext.
    buf: Vec<u8>,
    want: usize,
    got: usize,
    /// Plaintext not handed out yet: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
    ended: bool,
}

impl<R> std::fmt::Debug for Records<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("records", &self.counter)
            .finish_non_exhaustive()
    }
}

impl<R: TokioRead + Unpin> Records<R> {
    fn new(io: R, key: LessSafeKey) -> Records<R> {
        Records {
            io: Some(io),
            key,
            counter: 0,
            header: [0; HEADER],
            header_got: 0,
            buf: Vec::new(),
            want: 0,
            got: 0,
            plain: (0, 0),
            ended: false,
        }
    }

    /// A reader of records sealed with `key` (for tests and fuzzing).
    pub fn with_key(io: R, key: &[u8; KEY]) -> io::Result<Records<R>> {
        Ok(Records::new(io, self::key(key)?))
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, into: Region) -> Poll<io::Result<usize>> {
        let slice = match into {
            Region::Header => &mut self.header[self.header_got..],
            Region::Record => &mut self.buf[self.got..self.want],
        };
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        let mut rb = tokio::io::ReadBuf::new(slice);
        ready!(Pin::new(io).poll_read(cx, &mut rb))?;
        Poll::Ready(Ok(rb.filled().len()))
    }

    /// Reads and opens the next record into `plain`.
    fn poll_record(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.header_got < HEADER {
            let n = ready!(self.poll_fill(cx, Region::Header))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the direct connection ended without its end record (cut)",
                )));
            }
            self.header_got += n;
            if self.header_got == HEADER {
                let len = u32::from_le_bytes(self.header) as usize;
                if !(TAG..=MAX_RECORD + TAG).contains(&len) {
                    return Poll::Ready(Err(bad("a record's length is out of bounds")));
                }
                if self.buf.len() < len {
                    self.buf.resize(len, 0);
                }
                self.want = len;
                self.got = 0;
            }
        }
        while self.got < self.want {
            let n = ready!(self.poll_fill(cx, Region::Record))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the direct connection ended inside a record",
                )));
            }
            self.got += n;
        }
        let counter = self.counter;
        self.counter = counter
            .checked_add(1)
            .ok_or_else(|| bad("too many records"))?;
        self.header_got = 0;
        let plain = self
            .key
            .open_in_place(nonce(counter), Aad::empty(), &mut self.buf[..self.want])
            .map_err(|_| bad("a record failed authentication"))?
            .len();
        if plain == 0 {
            self.ended = true;
        }
        self.plain = (0, plain);
        Poll::Ready(Ok(()))
    }
}

#[derive(Clone, Copy)]
enum Region {
    Header,
    Record,
}

impl<R: TokioRead + Unpin> futures::AsyncRead for Records<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let (start, end) = this.plain;
            if start < end {
                let n = (end - start).min(out.len());
                out[..n].copy_from_slice(&this.buf[start..start + n]);
                this.plain.0 += n;
                return Poll::Ready(Ok(n));
            }
            if this.ended || out.is_empty() {
                return Poll::Ready(Ok(0));
            }
            ready!(this.poll_record(cx))?;
        }
    }
}

/// The writing half of a [`Channel`]: bytes gather into a record until it is full or
/// flushed.
pub struct Writer<W = OwnedWriteHalf> {
    io: W,
    key: LessSafeKey,
    counter: u64,
    /// The record being gathered (header space, then plaintext) or, once sealed, sent.
    buf: Vec<u8>,
    sealed: bool,
    written: usize,
    /// The end record is sealed (closing).
    ending: bool,
    pacing: Pacing,
    paced: u64,
    /// The socket, for its pacing (open while the writer holds its half).
    fd: Option<i32>,
}

impl<W> std::fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("records", &self.counter)
            .finish_non_exhaustive()
    }
}

impl<W: TokioWrite + Unpin> Writer<W> {
    fn new(io: W, key: LessSafeKey) -> Writer<W> {
        Writer {
            io,
            key,
            counter: 0,
            buf: Vec::new(),
            sealed: false,
            written: 0,
            ending: false,
            pacing: Pacing::default(),
            paced: 0,
            fd: None,
        }
    }

    fn apply_pacing(&mut self) {
        let want = self.pacing.0.load(Ordering::Relaxed);
        if want != self.paced {
            self.paced = want;
            if let Some(fd) = self.fd
                && let Err(e) = pace_socket(fd, want)
            {
                tracing::debug!("pacing a direct channel: {e}");
            }
        }
    }

    /// A writer sealing with `key` (for tests and fuzzing).
    #[doc(hidden)]
    pub fn with_key(io: W, key: &[u8; KEY]) -> io::Result<Writer<W>> {
        Ok(Writer::new(io, self::key(key)?))
    }

    /// What it wrote into (for tests and fuzzing).
    #[doc(hidden)]
    pub fn into_inner(self) -> W {
        self.io
    }

    fn seal(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            self.buf.resize(HEADER, 0);
        }
        let counter = self.counter;
        self.counter = counter
            .checked_add(1)
            .ok_or_else(|| bad("too many records"))?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::empty(), &mut self.buf[HEADER..])
            .map_err(|_| io::Error::other("sealing failed"))?;
        self.buf.extend_from_slice(tag.as_ref());
        let len = (self.buf.len() - HEADER) as u32;
        self.buf[..HEADER].copy_from_slice(&len.to_le_bytes());
        self.sealed = true;
        self.written = 0;
        Ok(())
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.sealed = false;
        Poll::Ready(Ok(()))
    }
}

impl<W: TokioWrite + Unpin> futures::AsyncWrite for Writer<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.ending {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.apply_pacing();
        if this.sealed {
            ready!(this.poll_drain(cx))?;
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.buf.is_empty() {
            this.buf.reserve(HEADER + MAX_RECORD.min(data.len()) + TAG);
            this.buf.resize(HEADER, 0);
        }
        let n = (HEADER + MAX_RECORD - this.buf.len()).min(data.len());
        this.buf.extend_from_slice(&data[..n]);
        if this.buf.len() == HEADER + MAX_RECORD {
            this.seal()?;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.sealed && this.buf.len() > HEADER {
            this.seal()?;
        }
        if this.sealed {
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ending {
            ready!(Pin::new(&mut *this).poll_flush(cx))?;
            // The end record: empty.
            this.buf.clear();
            this.seal()?;
            this.ending = true;
        }
        if this.sealed {
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    const K: [u8; KEY] = [7; KEY];

    /// Records written by a writer with key `K` (the end record too when `close`).
    async fn records(parts: &[&[u8]], close: bool) -> Vec<u8> {
        let mut w = Writer::with_key(Vec::new(), &K).unwrap();
        for p in parts {
            w.write_all(p).await.unwrap();
            w.flush().await.unwrap();
        }
        if close {
            w.close().await.unwrap();
        }
        w.io
    }

    async fn read_all(wire: &[u8], key: &[u8; KEY]) -> io::Result<Vec<u8>> {
        let mut r = Records::with_key(wire, key)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn records_round_trip_and_large_writes_split_into_bounded_records() {
        let big: Vec<u8> = (0..3 * MAX_RECORD + 5).map(|i| (i % 251) as u8).collect();
        let wire = records(&[b"hello ", &big, b"", b"!"], true).await;
        let mut want = b"hello ".to_vec();
        want.extend_from_slice(&big);
        want.push(b'!');
        assert_eq!(read_all(&wire, &K).await.unwrap(), want);
        // Every record's length is within bounds: hello, 4 for the big write, !, the end.
        let mut at = 0;
        let mut n = 0;
        while at < wire.len() {
            let len = u32::from_le_bytes(wire[at..at + 4].try_into().unwrap()) as usize;
            assert!((TAG..=MAX_RECORD + TAG).contains(&len));
            at += 4 + len;
            n += 1;
        }
        assert_eq!(n, 7);
    }

    #[tokio::test]
    async fn tampered_reordered_cut_or_foreign_records_are_refused() {
        let wire = records(&[b"first", b"second"], true).await;
        // One flipped bit anywhere in a record.
        for at in [5, 10, 4 + 5 + TAG + 4 + 2] {
            let mut t = wire.clone();
            t[at] ^= 1;
            let e = read_all(&t, &K).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "bit at {at}");
        }
        // The second record first.
        let first = 4 + 5 + TAG;
        let second = 4 + 6 + TAG;
        let mut swapped = wire[first..first + second].to_vec();
        swapped.extend_from_slice(&wire[..first]);
        assert!(read_all(&swapped, &K).await.is_err());
        // A replayed first record.
        let mut replayed = wire[..first].to_vec();
        replayed.extend_from_slice(&wire);
        assert!(read_all(&replayed, &K).await.is_err());
        // Cut before the end record, or inside a record.
        let e = read_all(&wire[..first + second], &K).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(read_all(&wire[..first + 3], &K).await.is_err());
        // Another key.
        assert!(read_all(&wire, &[8; KEY]).await.is_err());
    }

    #[tokio::test]
    async fn a_record_length_out_of_bounds_is_refused_before_reading_it() {
        for len in [
            0u32,
            TAG as u32 - 1,
            (MAX_RECORD + TAG + 1) as u32,
            u32::MAX,
        ] {
            let wire = len.to_le_bytes();
            let e = read_all(&wire, &K).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{len}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_offer_connects_once_both_ways_and_a_wrong_token_gets_nothing() {
        let listener = Listener::bind(IpAddr::from([127, 0, 0, 1])).unwrap();
        let (offer, expected) = listener.expect().unwrap();
        // A stranger with a made-up token is closed and takes nothing.
        let mut stranger = TcpStream::connect(listener.addr()).await.unwrap();
        stranger.write_all(&[0u8; TOKEN]).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(stranger.read(&mut b).await.unwrap(), 0);

        let ips = ips(&["/ip4/127.0.0.1/tcp/1".parse().unwrap()]);
        let dial = tokio::spawn(async move {
            let ch = connect(&ips, &offer, Duration::from_secs(5)).await.unwrap();
            let (mut r, mut w) = ch.into_split();
            w.write_all(b"ping").await.unwrap();
            w.close().await.unwrap();
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        });
        let ch = expected.accept(Duration::from_secs(5)).await.unwrap();
        let (mut r, mut w) = ch.into_split();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        w.write_all(b"pong").await.unwrap();
        w.close().await.unwrap();
        assert_eq!(dial.await.unwrap(), b"pong");
        // The token is spent.
        assert!(lock(&listener.pending).is_empty());
    }

    #[tokio::test]
    async fn a_withdrawn_offer_is_forgotten_and_an_unanswered_one_times_out() {
        let listener = Listener::bind(IpAddr::from([127, 0, 0, 1])).unwrap();
        let (_, expected) = listener.expect().unwrap();
        drop(expected);
        assert!(lock(&listener.pending).is_empty());
        let (_, expected) = listener.expect().unwrap();
        let e = expected
            .accept(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(lock(&listener.pending).is_empty());
    }

    #[test]
    fn relayed_and_unspecified_addresses_are_not_tried() {
        let addrs: Vec<Multiaddr> = [
            "/ip4/10.0.0.1/tcp/4001",
            "/ip4/10.0.0.1/udp/4001/quic-v1",
            "/ip4/0.0.0.0/tcp/1",
            "/ip4/1.2.3.4/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
            "/ip6/::1/tcp/2",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        assert_eq!(
            ips(&addrs),
            vec![
                IpAddr::from([10, 0, 0, 1]),
                "::1".parse::<IpAddr>().unwrap()
            ]
        );
    }
}
