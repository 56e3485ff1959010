//! The sealed channel ([`Channel`]) and its record layer: a [`Writer`] seals bytes into
//! numbered records of at most [`MAX_RECORD`] bytes, a [`Reader`] opens them in order.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use tokio::io::{AsyncRead as TokioRead, AsyncReadExt, AsyncWrite as TokioWrite};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::offer::Side;
use super::pacing::{Pacing, pace_socket};
use super::{HEADER, KEY, MAX_RECORD, TAG};

pub(super) fn key(bytes: &[u8; KEY]) -> io::Result<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| io::Error::other("bad key"))
}

/// A sealed TCP connection to one peer.
#[derive(Debug)]
pub struct Channel {
    reader: Reader,
    writer: Writer,
}

impl Channel {
    pub(super) fn new(stream: TcpStream, keys: &[[u8; KEY]; 2], side: Side) -> io::Result<Channel> {
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
}
