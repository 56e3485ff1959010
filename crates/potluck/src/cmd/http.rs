//! The listener of potluck's HTTP servers (the invite server, the monitor): at most so many
//! connections at once and so many from one address, each closed once it has lived its
//! lifetime. Without these one client could hold every connection open by sending a header a
//! byte at a time (a server gives no answer before the request is in), and keep volunteers
//! from getting their tokens.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use potluck_core::slots::{Slot, Slots};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Connections served at once, at most.
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// Of those, from one IP address at most (a browser opens six).
pub(crate) const MAX_PER_ADDRESS: usize = 8;

/// Binds the HTTP listener a command serves on, saying what to do when the port is taken;
/// a connection lives at most `lifetime`.
pub(crate) async fn bind(addr: SocketAddr, lifetime: Duration) -> anyhow::Result<Bounded> {
    use anyhow::Context;
    let inner = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "listening on {addr} (in use? pick another port with --http, or 127.0.0.1:0 for any \
             free one)"
        )
    })?;
    Ok(Bounded::new(inner, lifetime))
}

/// A TCP listener whose connections are bounded in number, per address and in time.
pub(crate) struct Bounded {
    inner: TcpListener,
    slots: Slots<IpAddr>,
    lifetime: Duration,
}

impl Bounded {
    pub(crate) fn new(inner: TcpListener, lifetime: Duration) -> Bounded {
        Bounded {
            inner,
            slots: Slots::new(MAX_CONNECTIONS, MAX_PER_ADDRESS),
            lifetime,
        }
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl Listener for Bounded {
    type Io = Deadlined;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Deadlined, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, from)) => match self.slots.try_enter(from.ip()) {
                    Some(slot) => {
                        let until = Box::pin(tokio::time::sleep(self.lifetime));
                        return (
                            Deadlined {
                                stream,
                                until,
                                _slot: slot,
                            },
                            from,
                        );
                    }
                    // Closed at once: the client may try again later.
                    None => tracing::debug!("{from}: too many HTTP connections, closing one"),
                },
                // Out of file descriptors and the like: wait a moment, as servers do.
                Err(e) => {
                    tracing::debug!("accepting an HTTP connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A request's peer, as handlers see it (`ConnectInfo<Remote>`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Remote(pub(crate) SocketAddr);

impl Connected<IncomingStream<'_, Bounded>> for Remote {
    fn connect_info(stream: IncomingStream<'_, Bounded>) -> Remote {
        Remote(*stream.remote_addr())
    }
}

/// A connection that fails every read and write once its lifetime is over (the server then
/// closes it), and gives its place back when dropped.
pub(crate) struct Deadlined {
    stream: TcpStream,
    until: Pin<Box<tokio::time::Sleep>>,
    _slot: Slot<IpAddr>,
}

impl Deadlined {
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.until.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection outlived its lifetime",
            )
        })
    }
}

impl AsyncRead for Deadlined {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Deadlined {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{Router, routing};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(lifetime: Duration) -> SocketAddr {
        let listener = bind("127.0.0.1:0".parse().unwrap(), lifetime)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", routing::get(|| async { "hello" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    async fn hello(addr: SocketAddr) -> io::Result<String> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).await?;
        Ok(reply)
    }

    /// Clients that send their header a byte at a time hold at most their address's share of
    /// the connections, and only for a lifetime: another client is answered meanwhile, and
    /// the slow ones are closed.
    #[tokio::test]
    async fn slow_clients_neither_hold_every_connection_nor_hold_one_forever() {
        let lifetime = Duration::from_secs(3);
        let addr = server(lifetime).await;
        let mut slow = Vec::new();
        for _ in 0..MAX_PER_ADDRESS + 4 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(b"GET / HT").await;
            slow.push(s);
        }
        // Over their share, the extra ones were closed at once (well before half a lifetime;
        // the others stay open for all of it).
        let reads = slow.iter_mut().map(|s| async move {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(lifetime / 2, s.read(&mut byte)).await;
            matches!(read, Ok(Ok(0)) | Ok(Err(_)))
        });
        let closed = futures::future::join_all(reads).await;
        assert_eq!(closed.iter().filter(|&&c| c).count(), 4);
        // The rest are closed once their lifetime is over, unanswered.
        for s in &mut slow {
            let mut rest = Vec::new();
            let read =
                tokio::time::timeout(lifetime + Duration::from_secs(5), s.read_to_end(&mut rest))
                    .await
                    .expect("a slow client's connection outlived its lifetime");
            assert!(read.is_err() || rest.is_empty(), "{rest:?}");
        }
        // And a client that asks at once is answered.
        let reply = hello(addr).await.unwrap();
        assert!(
            reply.starts_with("HTTP/1.1 200") && reply.ends_with("hello"),
            "{reply}"
        );
    }
}
